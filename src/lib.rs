//! ecom-settings-exporter: keeps Cloudflare Workers KV in step with the index-settings table.
//! What it promises is written down in `docs/contract.md`; how to run it, in
//! `docs/operations.md`.
//!
//! # Layout
//!
//! One room per concept; arrows point the only way imports go.
//!
//! - [`entry`]: the thin Lambda entry (the binary serves it with `lambda_runtime::run`). Routes a payload (stream batch or operator request),
//!   sets the retry deadline, turns a report into the partial-batch response.
//! - [`pipeline`]: the one routine every writer hands records to: [`pipeline::records`]
//!   (stream records and table records become changes), then the stages of
//!   [`pipeline::exporter`] (docs/contract.md, "The reconciler's stages"): the snapshot, the
//!   pure [`pipeline::plan`] (one KV operation per key), the intents, the write, the check,
//!   the stream's shrink. How operations become requests is the store adapter's.
//! - [`operator`]: the manual modes, one file each: re-export, verify, backfill, reconcile (and
//!   its scheduled passes). They call the exporter through its methods.
//! - [`report`]: the batch report, its log lines and EMF metrics.
//! - [`ports`]: the traits the core needs from the outside, `Ports` (the four an exporter holds,
//!   as one type parameter: `Exporter<P: Ports>`), and `PortError` (transient or permanent).
//! - [`adapters`]: Cloudflare KV (its bulk requests' encoding, pacing), the API keys service,
//!   the settings table, the function's own ledger table, Secrets Manager; and the in-memory
//!   fakes the unit tests share.
//! - [`dynamo`]: DynamoDB's attribute-value format read into the domain (table items as
//!   `ChangeRecord`s, stream records); the ports speak only the domain.
//! - [`domain`]: the shared vocabulary (indexes, settings, records and their one `Outcome`, KV
//!   keys and limits, secrets).
//! - [`config`]: the environment.
//! - [`simulation`](#layout) (tests only): every writer, seeded, over the in-memory world, checked
//!   against a reference model of what KV the table implies (docs/contract.md, "The
//!   simulation").
//!
//! Arrows: simulation -> entry -> config -> adapters -> ports, dynamo;
//! entry -> operator -> pipeline -> report -> ports -> domain; pipeline -> dynamo -> domain.
//! (A room may import what its arrows reach; `tests/integration/code_shape.rs` holds this.)
//!
//! Public is what the binary, the integration tests, the benches and the fuzz targets use (and
//! the ports, the seam a new adapter plugs into); the rest is `pub(crate)`.

// The Layout above names every room, public or not.
#![allow(rustdoc::private_intra_doc_links)]

pub mod adapters;
pub mod config;
pub mod domain;
pub mod dynamo;
pub mod entry;
pub(crate) mod operator;
pub mod pipeline;
pub mod ports;
pub mod report;
#[cfg(test)]
mod simulation;

use adapters::api_keys::HttpApiKeys;
use adapters::cloudflare::{CloudflareConfig, CloudflareKv, RetryPolicy};
use adapters::dynamodb::DynamoSettingsTable;
use adapters::ledger::DynamoLedger;
use adapters::secrets_manager::SecretsManagerToken;
use config::Config;
use pipeline::api_key_cache::ApiKeyCache;
use pipeline::exporter::{ExportOptions, Exporter};

/// The exporter wired to the real services.
pub type LambdaExporter = Exporter<(
    CloudflareKv<SecretsManagerToken>,
    HttpApiKeys,
    DynamoSettingsTable,
    DynamoLedger,
)>;

/// Builds the clients once per cold start; the AWS SDK reads its usual environment
/// (`AWS_REGION`, credentials, `AWS_ENDPOINT_URL`). Every AWS call names the function in its
/// user agent (`app/ecom-settings-exporter`), so the calls it makes can be told from others'
/// (the test suite checks each against the role's policy).
pub async fn build_exporter(config: &Config, retry: RetryPolicy) -> LambdaExporter {
    let app = aws_config::AppName::new("ecom-settings-exporter").expect("a valid app name");
    let aws = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .app_name(app)
        .load()
        .await;
    let token = SecretsManagerToken::new(
        aws_sdk_secretsmanager::Client::new(&aws),
        &config.api_token_secret_id,
    );
    Exporter::new(
        CloudflareKv::new(
            CloudflareConfig {
                api_base_url: config.cloudflare_api_base_url.clone(),
                account_id: config.cloudflare_account_id.clone(),
                settings_namespace_id: config.settings_namespace_id.clone(),
                query_config_namespace_id: config.query_config_namespace_id.clone(),
                requests_per_5_minutes: config.cloudflare_requests_per_5_minutes,
            },
            retry,
            token,
        ),
        ApiKeyCache::new(
            HttpApiKeys::new(config.api_keys_service_url.clone(), config.api_keys_timeout),
            config.api_key_cache_ttl,
        ),
        DynamoSettingsTable::new(
            &aws,
            &config.settings_table_name,
            &config.default_configs_sk,
        ),
        DynamoLedger::new(&aws, config.ledger_table_name.clone()),
        ExportOptions {
            reconcile_every: config.reconcile_every,
            default_cell: config.default_cell.clone(),
            default_configs_sk: config.default_configs_sk.clone(),
            stream_arn: Some(config.settings_table_stream_arn.clone()),
        },
    )
}
