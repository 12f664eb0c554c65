//! Keeps the Cloudflare client under its API rate limit (1,200 requests per 5 minutes per
//! token; a 429 locks the token out for 5 minutes). A token bucket paces requests under a
//! configured budget, and a lockout Cloudflare announces holds every request until it ends.
//! Each warm container paces itself: concurrent containers share the budget only
//! approximately (docs/contract.md, "Decisions").

use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

/// The window Cloudflare counts requests in.
pub const RATE_WINDOW: Duration = Duration::from_secs(300);

pub struct Pacer {
    /// Seconds between requests at the budgeted rate.
    interval: Duration,
    /// Requests that may go at once after a quiet spell.
    burst: f64,
    state: Mutex<Bucket>,
}

struct Bucket {
    tokens: f64,
    refilled: Instant,
    /// Cloudflare said to wait until then (a 429's `Retry-After`).
    blocked_until: Option<Instant>,
}

impl Pacer {
    /// `budget` requests per 5 minutes; a tenth of it may go in a burst.
    pub fn new(budget: u32) -> Self {
        let budget = budget.max(1);
        let burst = (budget as f64 / 10.0).max(1.0);
        Self {
            interval: RATE_WINDOW / budget,
            burst,
            state: Mutex::new(Bucket {
                tokens: burst,
                refilled: Instant::now(),
                blocked_until: None,
            }),
        }
    }

    /// Waits for the next request's turn. `Err` says how long, and who holds it, when the wait
    /// would pass `deadline`.
    pub async fn acquire(&self, deadline: Instant) -> Result<(), Held> {
        let mut bucket = self.state.lock().await;
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(bucket.refilled);
        bucket.tokens =
            (bucket.tokens + elapsed.as_secs_f64() / self.interval.as_secs_f64()).min(self.burst);
        bucket.refilled = now;
        let mut wait = Duration::ZERO;
        if bucket.tokens < 1.0 {
            wait = self.interval.mul_f64(1.0 - bucket.tokens);
        }
        let lockout = bucket
            .blocked_until
            .map_or(Duration::ZERO, |until| until.saturating_duration_since(now));
        if now + wait.max(lockout) >= deadline {
            return Err(match lockout > wait {
                true => Held::Lockout(lockout),
                false => Held::Budget(wait),
            });
        }
        let wait = wait.max(lockout);
        bucket.tokens -= 1.0;
        // Holding the lock while waiting keeps requests in line.
        tokio::time::sleep(wait).await;
        Ok(())
    }

    /// Cloudflare answered 429: hold every request until `wait` has passed.
    pub async fn block_for(&self, wait: Duration) {
        let until = Instant::now() + wait;
        let mut bucket = self.state.lock().await;
        bucket.blocked_until = Some(bucket.blocked_until.map_or(until, |b| b.max(until)));
    }
}

/// Why a request cannot go before the deadline, and for how long more.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Held {
    /// This container's own budget (`CLOUDFLARE_REQUESTS_PER_5_MINUTES`) is spent for now.
    Budget(Duration),
    /// Cloudflare answered 429 and asked us to wait.
    Lockout(Duration),
}

impl std::fmt::Display for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Held::Budget(wait) => write!(
                f,
                "this container's request pacer (CLOUDFLARE_REQUESTS_PER_5_MINUTES) holds requests for {:.1} s more",
                wait.as_secs_f64()
            ),
            Held::Lockout(wait) => write!(
                f,
                "Cloudflare's rate limit (a 429's Retry-After) holds requests for {:.1} s more",
                wait.as_secs_f64()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_goes_at_once_then_requests_are_spaced_by_the_budget() {
        let pacer = Pacer::new(600); // 2 a second, bursts of 60
        let deadline = Instant::now() + Duration::from_secs(3600);
        let started = Instant::now();
        for _ in 0..60 {
            pacer.acquire(deadline).await.unwrap();
        }
        assert_eq!(started.elapsed(), Duration::ZERO);
        for _ in 0..10 {
            pacer.acquire(deadline).await.unwrap();
        }
        let spaced = started.elapsed();
        assert!(
            spaced >= Duration::from_millis(4_900) && spaced <= Duration::from_millis(5_100),
            "{spaced:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lockout_holds_requests_and_a_wait_past_the_deadline_is_refused() {
        let pacer = Pacer::new(600);
        pacer.block_for(Duration::from_secs(300)).await;
        let soon = Instant::now() + Duration::from_secs(10);
        let refused = pacer.acquire(soon).await.unwrap_err();
        let Held::Lockout(wait) = refused else {
            panic!("a lockout, not {refused:?}")
        };
        assert!(wait > Duration::from_secs(299), "{refused:?}");
        assert!(
            refused.to_string().starts_with("Cloudflare's rate limit"),
            "{refused}"
        );
        let later = Instant::now() + Duration::from_secs(400);
        pacer.acquire(later).await.unwrap();
        assert!(Instant::now() + Duration::from_secs(100) >= later);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_for_the_own_budget_names_the_pacer_and_the_real_wait() {
        let pacer = Pacer::new(1); // one request per 5 minutes
        let deadline = Instant::now() + Duration::from_secs(10);
        pacer.acquire(deadline).await.unwrap();
        let held = pacer.acquire(deadline).await.unwrap_err();
        assert!(matches!(held, Held::Budget(_)), "{held:?}");
        assert_eq!(
            held.to_string(),
            "this container's request pacer (CLOUDFLARE_REQUESTS_PER_5_MINUTES) holds requests for 300.0 s more"
        );
    }
}
