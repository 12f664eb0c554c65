//! The Lambda binary: configuration and clients once per cold start, then the handler. One
//! thread: a function instance handles one invocation at a time, and a small batch costs less
//! without cross-thread wake-ups.
#![recursion_limit = "256"]

use ecom_settings_exporter::adapters::cloudflare::RetryPolicy;
use ecom_settings_exporter::build_exporter;
use ecom_settings_exporter::config::Config;
use ecom_settings_exporter::entry::{self, HandlerError};
use lambda_runtime::{service_fn, LambdaEvent};
use serde_json::value::RawValue;
use serde_json::Value;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), lambda_runtime::Error> {
    lambda_runtime::tracing::init_default_subscriber();
    match Config::from_env() {
        Ok(config) => {
            let exporter = build_exporter(&config, RetryPolicy::default()).await;
            let exporter = &exporter;
            lambda_runtime::run(service_fn(
                move |event: LambdaEvent<Box<RawValue>>| async move {
                    entry::handle(exporter, config.deadline_margin, event).await
                },
            ))
            .await
        }
        Err(error) => {
            // Keep answering, so every invocation says which setting is missing.
            tracing::error!("{error}");
            lambda_runtime::run(service_fn(move |_: LambdaEvent<Value>| {
                let error = HandlerError::Config(error.clone());
                async move { Err::<Value, _>(error) }
            }))
            .await
        }
    }
}
