//! ecom-settings-exporter: keeps Cloudflare Workers KV in step with the index-settings table.
//!
//! The pipeline, one module per step: payload ([`handler`]) -> records ([`records`]) ->
//! planned KV operations ([`plan`]) -> KV requests ([`requests`], sent by [`cloudflare`]) ->
//! batch response ([`handler`]). [`exporter`] runs the steps; [`api_keys`], [`cloudflare`],
//! [`secrets`] and [`table`] are the adapters to the outside, each behind a small trait.

pub mod api_keys;
pub mod cloudflare;
pub mod config;
pub mod exporter;
pub mod handler;
pub mod manual;
pub mod metrics;
pub mod model;
pub mod plan;
pub mod records;
pub mod requests;
pub mod secrets;
pub mod table;

use api_keys::{ApiKeyCache, HttpApiKeys};
use cloudflare::{CloudflareConfig, CloudflareKv, RetryPolicy};
use config::Config;
use exporter::{ExportOptions, Exporter};
use secrets::SecretsManagerToken;
use table::DynamoSettingsTable;

/// The exporter wired to the real services.
pub type LambdaExporter =
    Exporter<CloudflareKv<SecretsManagerToken>, HttpApiKeys, DynamoSettingsTable>;

/// Builds the clients once per cold start; the AWS SDK reads its usual environment
/// (`AWS_REGION`, credentials, `AWS_ENDPOINT_URL`).
pub async fn build_exporter(config: &Config, retry: RetryPolicy) -> LambdaExporter {
    let aws = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    let token = SecretsManagerToken::new(
        aws_sdk_secretsmanager::Client::new(&aws),
        &config.api_token_secret_id,
    );
    Exporter {
        kv: CloudflareKv::new(
            CloudflareConfig {
                api_base_url: config.cloudflare_api_base_url.clone(),
                account_id: config.cloudflare_account_id.clone(),
                settings_namespace_id: config.settings_namespace_id.clone(),
                query_config_namespace_id: config.query_config_namespace_id.clone(),
            },
            retry,
            token,
        ),
        api_keys: ApiKeyCache::new(
            HttpApiKeys::new(&config.api_keys_service_url, config.api_keys_timeout),
            config.api_key_cache_ttl,
        ),
        table: DynamoSettingsTable::new(
            aws_sdk_dynamodb::Client::new(&aws),
            &config.settings_table_name,
            &config.default_configs_sk,
        ),
        options: ExportOptions {
            default_cell: config.default_cell.clone(),
            default_configs_sk: config.default_configs_sk.clone(),
        },
    }
}
