//! API keys fetched by earlier warm invocations reused for a short while (failures are not
//! kept), and always fetched fresh for the operator modes; a few lookups at a time, none past
//! the deadline (docs/contract.md, "The API keys service").

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt as _;
use tokio::time::Instant;

use crate::domain::validate::cut;
use crate::domain::AccountCell;
use crate::domain::ApiKey;
use crate::ports::{before_deadline, ApiKeySource, LookupCounts, PortError};

/// How many accounts are looked up at once.
const CONCURRENT_LOOKUPS: usize = 8;

/// Keys fetched by earlier warm invocations are reused for a short while; failures are not kept.
pub struct ApiKeyCache<S> {
    source: S,
    ttl: Duration,
    entries: Mutex<HashMap<AccountCell, (ApiKey, Instant)>>,
}

impl<S: ApiKeySource> ApiKeyCache<S> {
    pub fn new(source: S, ttl: Duration) -> Self {
        Self {
            source,
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn cached(&self, wanted: &AccountCell) -> Option<ApiKey> {
        let entries = self.entries.lock().expect("not poisoned");
        entries
            .get(wanted)
            .filter(|(_, fetched)| fetched.elapsed() < self.ttl)
            .map(|(key, _)| key.clone())
    }

    /// One call per (cell, account) not in the cache (every one when `fresh`: operators must
    /// never write a key that was rotated out), a few at a time.
    pub async fn lookup_all(
        &self,
        wanted: BTreeSet<AccountCell>,
        fresh: bool,
        deadline: Instant,
    ) -> (
        HashMap<AccountCell, Result<ApiKey, PortError>>,
        LookupCounts,
    ) {
        let mut answers = HashMap::new();
        let mut counts = LookupCounts::default();
        let mut missing = Vec::new();
        for account in wanted {
            match self.cached(&account).filter(|_| !fresh) {
                Some(key) => {
                    counts.cache_hits += 1;
                    answers.insert(account, Ok(key));
                }
                None => missing.push(account),
            }
        }
        counts.calls = missing.len();
        let fetched: Vec<_> = futures::stream::iter(missing)
            .map(|account| async move {
                // Whatever is not answered by the deadline is reported for retry, not waited for.
                let what = format!("API keys service (cell {})", cut(&account.cell));
                let answer = before_deadline(deadline, &what, self.source.fetch(&account)).await;
                (account, answer)
            })
            .buffer_unordered(CONCURRENT_LOOKUPS)
            .collect()
            .await;
        let mut entries = self.entries.lock().expect("not poisoned");
        // Expired keys go as new ones come: a warm container that ran a backfill of the fleet
        // holds the keys of the last TTL, not of every account it ever saw.
        if !fetched.is_empty() {
            entries.retain(|_, (_, fetched)| fetched.elapsed() < self.ttl);
        }
        for (account, answer) in fetched {
            if let Ok(key) = &answer {
                entries.insert(account.clone(), (key.clone(), Instant::now()));
            }
            answers.insert(account, answer);
        }
        (answers, counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Counting(AtomicUsize);

    impl ApiKeySource for Counting {
        async fn fetch(&self, wanted: &AccountCell) -> Result<ApiKey, PortError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            if wanted.account == "missing" {
                Err(PortError::NotFound("none".into()))
            } else {
                Ok(ApiKey::new(format!("key-{}", wanted.account)))
            }
        }
    }

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    fn wanted(accounts: &[&str]) -> BTreeSet<AccountCell> {
        accounts
            .iter()
            .map(|a| AccountCell {
                cell: "default".into(),
                account: a.to_string(),
            })
            .collect()
    }

    #[tokio::test]
    async fn warm_invocations_reuse_keys_but_not_failures() {
        let cache = ApiKeyCache::new(Counting(AtomicUsize::new(0)), Duration::from_secs(60));
        let (_, first) = cache
            .lookup_all(wanted(&["a", "b", "missing"]), false, later())
            .await;
        let (answers, second) = cache
            .lookup_all(wanted(&["a", "b", "missing"]), false, later())
            .await;
        assert_eq!(
            first,
            LookupCounts {
                calls: 3,
                cache_hits: 0
            }
        );
        assert_eq!(
            second,
            LookupCounts {
                calls: 1,
                cache_hits: 2
            }
        );
        assert_eq!(cache.source.0.load(Ordering::SeqCst), 4);
        assert_eq!(answers.len(), 3);
    }

    #[tokio::test]
    async fn fresh_lookups_skip_the_cache_and_refill_it() {
        let cache = ApiKeyCache::new(Counting(AtomicUsize::new(0)), Duration::from_secs(60));
        cache.lookup_all(wanted(&["a"]), false, later()).await;
        let (_, fresh) = cache.lookup_all(wanted(&["a"]), true, later()).await;
        assert_eq!(fresh.calls, 1);
        let (_, cached) = cache.lookup_all(wanted(&["a"]), false, later()).await;
        assert_eq!(cached.cache_hits, 1);
        assert_eq!(cache.source.0.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn expired_keys_are_fetched_again() {
        let cache = ApiKeyCache::new(Counting(AtomicUsize::new(0)), Duration::ZERO);
        cache.lookup_all(wanted(&["a"]), false, later()).await;
        let (_, counts) = cache.lookup_all(wanted(&["a"]), false, later()).await;
        assert_eq!(counts.calls, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_warm_container_holds_only_the_keys_of_the_last_while() {
        let cache = ApiKeyCache::new(Counting(AtomicUsize::new(0)), Duration::from_secs(60));
        let pages: Vec<Vec<String>> = (0..3)
            .map(|page| (0..100).map(|i| format!("p{page}-a{i}")).collect())
            .collect();
        for page in &pages {
            let accounts: Vec<&str> = page.iter().map(String::as_str).collect();
            cache.lookup_all(wanted(&accounts), true, later()).await;
            tokio::time::advance(Duration::from_secs(61)).await;
        }
        let held = cache.entries.lock().unwrap().len();
        assert_eq!(held, 100, "only the last page's keys are held");
        let (_, counts) = cache.lookup_all(wanted(&["p0-a0"]), false, later()).await;
        assert_eq!(counts.calls, 1, "an expired key is fetched again");
    }

    struct Slow;

    impl ApiKeySource for Slow {
        async fn fetch(&self, wanted: &AccountCell) -> Result<ApiKey, PortError> {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok(ApiKey::new(format!("key-{}", wanted.account)))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn lookups_stop_at_the_deadline_and_report_the_rest_for_retry() {
        let cache = ApiKeyCache::new(Slow, Duration::from_secs(60));
        let accounts: Vec<String> = (0..40).map(|i| format!("a{i}")).collect();
        let accounts: Vec<&str> = accounts.iter().map(String::as_str).collect();
        let started = Instant::now();
        let deadline = started + Duration::from_millis(2_500);
        let (answers, _) = cache.lookup_all(wanted(&accounts), true, deadline).await;
        assert!(
            started.elapsed() <= Duration::from_millis(2_600),
            "{:?}",
            started.elapsed()
        );
        let late = answers
            .values()
            .filter(|a| matches!(a, Err(PortError::PastDeadline(_))))
            .count();
        // Eight at a time, a second each: two rounds answered before the deadline.
        assert_eq!((answers.len(), late), (40, 24));
    }
}
