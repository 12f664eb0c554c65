//! The Lambda binary: configuration and clients once per cold start, then `lambda_runtime`
//! serves the handler (panics, deadlines and the request's tracing span are its). One thread:
//! a function instance handles one invocation at a time, and a small batch costs less without
//! cross-thread wake-ups.
#![recursion_limit = "256"]

use ecom_settings_exporter::adapters::cloudflare::RetryPolicy;
use ecom_settings_exporter::build_exporter;
use ecom_settings_exporter::config::Config;
use ecom_settings_exporter::entry::{self, HandlerError};
use lambda_runtime::{service_fn, LambdaEvent};
use serde::de::IgnoredAny;
use serde_json::Value;

/// jemalloc, not glibc's malloc: a 10,000-record batch allocates some 340,000 blocks
/// (attribute trees, decoded settings, plan entries) and frees most of them again, and
/// jemalloc does both in less time (10,000 records: about 12% less CPU, measured alternately
/// against glibc; see the README's performance section).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Freed memory stays with the process: jemalloc would return it to the kernel 10 s after a
/// batch, and the next batch would pay again to fault the same pages in. A Lambda instance
/// holds one batch at a time, so memory kept for the next batch is not wasted.
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
static malloc_conf: Option<&'static std::ffi::c_char> =
    // SAFETY: a pointer to the first byte of a 'static, NUL-terminated string.
    Some(unsafe { &*c"dirty_decay_ms:-1,muzzy_decay_ms:-1".as_ptr() });

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    lambda_runtime::tracing::init_default_subscriber();
    match Config::from_env() {
        Ok(config) => {
            let exporter = build_exporter(&config, RetryPolicy::default()).await;
            let (exporter, margin) = (&exporter, config.deadline_margin);
            let handler = service_fn(move |event| entry::handle(exporter, margin, event));
            lambda_runtime::run(handler).await
        }
        Err(error) => {
            // Keep answering, so every invocation says which setting is missing.
            tracing::error!("{error}");
            let handler = service_fn(move |_: LambdaEvent<IgnoredAny>| {
                let error = HandlerError::Config(error.clone());
                entry::log_failure(&error);
                async move { Err::<Value, _>(error) }
            });
            lambda_runtime::run(handler).await
        }
    }
}
