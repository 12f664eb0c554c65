//! `ecom-emulators demo --propagation SECONDS` (`make propagation`): how long a change takes to
//! reach KV under a steady stream of changes, through the local stack (moto's table and stream,
//! the poller with the batching window, the function, the KV emulator). A new index is written
//! every `1 / rate` seconds for the given time; each is timed from its table write until KV holds
//! its own key; p50, p99 and the largest are printed.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use super::stack::{start, Stack};
use super::{index_item, DemoOptions, ACCOUNT, CF_ACCOUNT, SETTINGS_NS};

/// Times from a table write to its KV value, in the order they were written.
pub async fn run(options: &DemoOptions, seconds: f64, rate: f64) -> Result<Vec<Duration>, String> {
    let mut stack = start(options).await?;
    let result = steady_stream(&mut stack, seconds, rate).await;
    let _ = stack.stop.send(true);
    result
}

async fn steady_stream(
    stack: &mut Stack,
    seconds: f64,
    rate: f64,
) -> Result<Vec<Duration>, String> {
    let began = Instant::now();
    let every = Duration::from_secs_f64(1.0 / rate);
    let changes = (seconds * rate).round() as usize;
    let mut pending: VecDeque<(usize, Instant)> = VecDeque::new();
    let mut times = vec![Duration::ZERO; changes];
    let (mut written, mut landed) = (0, 0);
    let deadline = began + Duration::from_secs_f64(seconds) + Duration::from_secs(120);
    while landed < changes {
        if Instant::now() > deadline {
            return Err(format!("{landed} of {changes} changes reached KV in time"));
        }
        if written < changes && Instant::now() >= began + every * written as u32 {
            stack
                .put(index_item(&format!("steady-{written:05}"), None))
                .await?;
            pending.push_back((written, Instant::now()));
            written += 1;
        }
        pending.retain(|&(n, at)| {
            let key = format!("{ACCOUNT}-steady-{n:05}");
            let held = stack.kv.value(CF_ACCOUNT, SETTINGS_NS, &key).is_some();
            if held {
                times[n] = at.elapsed();
                landed += 1;
            }
            !held
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(times)
}

/// The `q` quantile of `times` (nearest rank).
pub fn quantile(times: &[Duration], q: f64) -> Duration {
    let mut sorted = times.to_vec();
    sorted.sort();
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}
