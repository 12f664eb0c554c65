//! The Lambda binary: configuration and clients once per cold start, then the handler. One
//! thread: a function instance handles one invocation at a time, and a small batch costs less
//! without cross-thread wake-ups.
#![recursion_limit = "256"]

use ecom_settings_exporter::adapters::cloudflare::RetryPolicy;
use ecom_settings_exporter::build_exporter;
use ecom_settings_exporter::config::Config;
use ecom_settings_exporter::entry::{self, HandlerError};
use ecom_settings_exporter::runtime_api;
use serde_json::Value;

/// Large buffers (the event, the bulk bodies) come from the heap and stay there: glibc would
/// otherwise map each one afresh and return it when freed, so every batch paid again to fault
/// the same memory in (10,000 records: 205 -> 175 ms of CPU, and less peak memory). A Lambda
/// instance holds one batch at a time, so memory kept for the next batch is not wasted.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // SAFETY: mallopt only sets allocator parameters; called first, on the only thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20); // glibc's maximum
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    keep_freed_memory();
    lambda_runtime::tracing::init_default_subscriber();
    match Config::from_env() {
        Ok(config) => {
            let exporter = build_exporter(&config, RetryPolicy::default()).await;
            let exporter = &exporter;
            runtime_api::run(|event| entry::handle(exporter, config.deadline_margin, event)).await
        }
        Err(error) => {
            // Keep answering, so every invocation says which setting is missing.
            tracing::error!("{error}");
            runtime_api::run(move |_| {
                let error = HandlerError::Config(error.clone());
                async move { Err::<Value, _>(error) }
            })
            .await
        }
    }
}
