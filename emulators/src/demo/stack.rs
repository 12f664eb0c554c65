//! The demo's running parts: moto, the KV emulator, the API-keys stand-in, the function behind
//! a local runtime API, and a poller feeding it the table's stream; and the table writes the
//! scenario makes, each awaited until KV shows it.

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_dynamodb::types::{AttributeValue, StreamViewType};
use serde_json::Value;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::time::Instant;

use super::{
    DemoOptions, ACCOUNT, API_KEY, CF_ACCOUNT, QCFG_NS, REGION, SETTINGS_NS, STEP_TIMEOUT, TOKEN,
};
use crate::api_keys::ApiKeysStandIn;
use crate::kv::KvEmulator;
use crate::poller::{Poller, PollerConfig, Progress};
use crate::runtime_api::RuntimeApi;
use crate::streams::StreamReader;

/// A child process that is killed when the demo ends, however it ends.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

async fn start_moto(server: &Path) -> Result<(String, Process), String> {
    let port = free_port()?;
    let child = Command::new(server)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {} (run `make venv`): {e}", server.display()))?;
    let process = Process(child);
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok((format!("http://127.0.0.1:{port}"), process));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err("moto did not start within 10 s".into())
}

pub(super) struct Stack {
    ddb: aws_sdk_dynamodb::Client,
    pub(super) kv: KvEmulator,
    pub(super) keys: ApiKeysStandIn,
    pub(super) runtime: Arc<RuntimeApi>,
    pub(super) progress: Arc<Progress>,
    table: String,
    /// Stream records written so far (one per table write).
    writes: usize,
    _function: Process,
    _moto: Option<Process>,
    pub(super) stop: watch::Sender<bool>,
}

/// moto's endpoint, and the moto process when the demo started its own.
async fn moto(options: &DemoOptions) -> Result<(String, Option<Process>), String> {
    match &options.moto_endpoint {
        Some(endpoint) => Ok((endpoint.clone(), None)),
        None => {
            let (endpoint, process) = start_moto(&options.moto_server).await?;
            Ok((endpoint, Some(process)))
        }
    }
}

/// The settings table with its NEW_IMAGE stream, the function's ledger table, and the
/// Cloudflare token's secret. Answers the stream's ARN and the secret's id.
async fn table_and_secret(
    aws: &aws_config::SdkConfig,
    ddb: &aws_sdk_dynamodb::Client,
    table: &str,
) -> Result<(String, String), String> {
    let stream_arn =
        crate::streams::create_settings_table(ddb, table, StreamViewType::NewImage).await?;
    crate::streams::create_ledger_table(ddb, &format!("{table}-ledger")).await?;
    let secret_id = format!("{table}/CloudFlareApiToken");
    aws_sdk_secretsmanager::Client::new(aws)
        .create_secret()
        .name(&secret_id)
        .secret_string(TOKEN)
        .send()
        .await
        .map_err(|e| {
            let e = aws_sdk_secretsmanager::error::DisplayErrorContext(e);
            format!("create secret: {e}")
        })?;
    Ok((stream_arn, secret_id))
}

/// Where the function finds its peers.
struct Peers<'a> {
    runtime: &'a RuntimeApi,
    endpoint: &'a str,
    kv: &'a KvEmulator,
    keys: &'a ApiKeysStandIn,
    stream_arn: &'a str,
    secret_id: &'a str,
}

/// The function binary, configured as the SAM template configures it, its log in a file.
fn start_function(options: &DemoOptions, peers: &Peers) -> Result<Process, String> {
    if let Some(dir) = options.function_log.parent() {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    let log = std::fs::File::create(&options.function_log).map_err(|e| e.to_string())?;
    let name = "demo-EcomSettingsExporterLambda";
    let child = Command::new(&options.function_binary)
        .env("AWS_LAMBDA_RUNTIME_API", peers.runtime.endpoint())
        .env("AWS_LAMBDA_FUNCTION_NAME", name)
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("AWS_LAMBDA_LOG_GROUP_NAME", format!("/aws/lambda/{name}"))
        .env("AWS_LAMBDA_LOG_STREAM_NAME", "demo")
        .env("AWS_ENDPOINT_URL", peers.endpoint)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", REGION)
        .env("SETTINGS_TABLE_NAME", &options.table_name)
        .env("CLOUDFLARE_ACCOUNT_ID", CF_ACCOUNT)
        .env("CLOUDFLARE_KV_NAMESPACE_ID", SETTINGS_NS)
        .env("CLOUDFLARE_QCFG_NAMESPACE_ID", QCFG_NS)
        .env("CLOUDFLARE_API_TOKEN_SECRET_ID", peers.secret_id)
        .env("CLOUDFLARE_API_BASE_URL", peers.kv.base_url())
        .env("API_KEYS_SERVICE_URL", peers.keys.url_template())
        .env("SETTINGS_TABLE_STREAM_ARN", peers.stream_arn)
        .env(
            "LEDGER_TABLE_NAME",
            format!("{}-ledger", options.table_name),
        )
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", options.function_binary.display()))?;
    Ok(Process(child))
}

/// The migration before the stream runs (docs/operations.md, "Migrating a table that holds
/// indexes", `make migrate` without the mapping): a backfill, then a reconcile pass with
/// repair, each followed to `"complete": true`.
pub async fn migrate(runtime: &RuntimeApi) -> Result<(), String> {
    for first in [
        serde_json::json!({"mode": "backfill"}),
        serde_json::json!({"mode": "reconcile", "repair": true}),
    ] {
        let mut payload = first;
        let mut invocations = 0;
        loop {
            let answer = runtime.invoke(payload.clone(), std::time::Duration::from_secs(60));
            let answer = answer.await.map_err(|e| format!("the migration: {e}"))?;
            match answer["continuation_token"].as_str() {
                None if answer["complete"] == true => break,
                Some(token) if invocations < 100 => payload["continuation_token"] = token.into(),
                _ => return Err(format!("the migration did not complete: {answer}")),
            }
            invocations += 1;
        }
    }
    Ok(())
}

/// A poller feeding the stream to the runtime API in the background, until `stop` says so.
async fn start_poller(
    aws: &aws_config::SdkConfig,
    stream_arn: &str,
    runtime: Arc<RuntimeApi>,
    batching_window: Duration,
) -> Result<(Arc<Progress>, watch::Sender<bool>), String> {
    let streams = aws_sdk_dynamodbstreams::Client::new(aws);
    let reader = StreamReader::open(streams, stream_arn, REGION)
        .await
        .map_err(|e| format!("open the stream: {e}"))?;
    let config = PollerConfig {
        batching_window,
        retry_delay: Duration::from_millis(500),
        ..PollerConfig::default()
    };
    let poller = Poller::new(reader, runtime, config);
    let progress = poller.progress();
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(async move {
        if let Err(e) = poller.run(stopped).await {
            eprintln!("poller stopped: {e}");
        }
    });
    Ok((progress, stop))
}

pub(super) async fn start(options: &DemoOptions) -> Result<Stack, String> {
    let (endpoint, moto) = moto(options).await?;
    let credentials =
        aws_sdk_dynamodb::config::Credentials::new("testing", "testing", None, None, "demo");
    let aws = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(&endpoint)
        .region(aws_config::Region::new(REGION))
        .credentials_provider(credentials)
        .load()
        .await;
    let ddb = aws_sdk_dynamodb::Client::new(&aws);
    let (stream_arn, secret_id) = table_and_secret(&aws, &ddb, &options.table_name).await?;
    let kv = KvEmulator::start(0, &[TOKEN])
        .await
        .map_err(|e| e.to_string())?;
    kv.create_namespace(SETTINGS_NS);
    kv.create_namespace(QCFG_NS);
    let keys = ApiKeysStandIn::start(0).await.map_err(|e| e.to_string())?;
    keys.set_key(ACCOUNT, API_KEY);
    let runtime = Arc::new(RuntimeApi::start(0).await.map_err(|e| e.to_string())?);
    let peers = Peers {
        runtime: &runtime,
        endpoint: &endpoint,
        kv: &kv,
        keys: &keys,
        stream_arn: &stream_arn,
        secret_id: &secret_id,
    };
    let function = start_function(options, &peers)?;
    migrate(&runtime).await?;
    let (progress, stop) =
        start_poller(&aws, &stream_arn, runtime.clone(), options.batching_window).await?;
    Ok(Stack {
        ddb,
        kv,
        keys,
        runtime,
        progress,
        table: options.table_name.clone(),
        writes: 0,
        _function: function,
        _moto: moto,
        stop,
    })
}

pub(super) fn s(value: &str) -> AttributeValue {
    AttributeValue::S(value.into())
}

impl Stack {
    pub(super) async fn put(
        &mut self,
        item: HashMap<String, AttributeValue>,
    ) -> Result<(), String> {
        self.ddb
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .send()
            .await
            .map_err(|e| {
                format!(
                    "put item: {}",
                    aws_sdk_dynamodb::error::DisplayErrorContext(e)
                )
            })?;
        self.writes += 1;
        Ok(())
    }

    pub(super) async fn delete(&mut self, sk: &str) -> Result<(), String> {
        self.ddb
            .delete_item()
            .table_name(&self.table)
            .key("pk", s(ACCOUNT))
            .key("sk", s(sk))
            .send()
            .await
            .map_err(|e| {
                format!(
                    "delete item: {}",
                    aws_sdk_dynamodb::error::DisplayErrorContext(e)
                )
            })?;
        self.writes += 1;
        Ok(())
    }

    pub(super) fn settings(&self, key: &str) -> Option<Value> {
        self.kv.json(CF_ACCOUNT, SETTINGS_NS, key)
    }

    /// Waits until every table write so far went through the function and `holds` is true.
    pub(super) async fn propagated(
        &self,
        started: Instant,
        holds: impl Fn(&Stack) -> bool,
    ) -> Option<Duration> {
        while started.elapsed() < STEP_TIMEOUT {
            if self.progress.done.load(Ordering::SeqCst) >= self.writes && holds(self) {
                return Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }
}
