//! One function process of the bench and what it is measured by: the release binary behind the
//! runtime API, configured as the template deploys it (the ledger table set), its DynamoDB
//! calls through the proxy. A first process runs against moto with the proxy recording every
//! answer; its twin runs the same invocations with DynamoDB answered from that recording alone
//! after the set latency, its CPU held to Lambda's share for 512 MB where the machine allows:
//! the twin's figures are the function's.

use std::collections::BTreeSet;
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::records::{self, Kind, ACCOUNTS, STREAM_ARN};
use super::BenchOptions;
use crate::api_keys::ApiKeysStandIn;
use crate::dynamo_proxy::{round_trips_in_sequence, DynamoCall, DynamoProxy};
use crate::kv::{Fault, KvEmulator, RequestRecord};
use crate::runtime_api::RuntimeApi;

const TOKEN: &str = "bench-token";
pub const CF_ACCOUNT: &str = "cf-bench";
pub const SETTINGS_NS: &str = "ns-settings";

/// How the function is configured and what DynamoDB costs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Setup {
    pub dynamo_latency_ms: u64,
}

/// What one batch cost the function.
#[derive(Clone, Debug)]
pub struct Measured {
    pub kind: Kind,
    pub records: usize,
    pub event_bytes: usize,
    pub cpu_ms: f64,
    pub wall_ms: f64,
    /// The process's peak RSS so far.
    pub peak_rss_mib: f64,
    pub calls: Vec<DynamoCall>,
    pub round_trips: usize,
    pub kv: Vec<RequestRecord>,
    /// Records the function reported for retry (`batchItemFailures`).
    pub failed: usize,
    /// Bytes the batch printed: what CloudWatch Logs ingests of it (its log lines and its EMF
    /// document; the template's `SystemLogLevel: WARN` keeps Lambda's own lines out).
    pub log_bytes: usize,
}

/// What the function printed, as CloudWatch would take it in: every byte (Logs ingestion), and
/// each metric of its EMF documents under each of its dimension sets (a custom metric).
#[derive(Default)]
pub struct Printed {
    bytes: AtomicUsize,
    metrics: Mutex<BTreeSet<String>>,
}

impl Printed {
    fn read(self: &Arc<Self>, from: impl std::io::Read + Send + 'static) {
        let printed = self.clone();
        std::thread::spawn(move || {
            // Bytes, not text: a line that is not UTF-8 is counted and read past, never left
            // in the pipe (the function would block writing once it filled).
            for line in std::io::BufReader::new(from).split(b'\n') {
                let Ok(line) = line else { break };
                printed.bytes.fetch_add(line.len() + 1, Ordering::SeqCst);
                let line = String::from_utf8_lossy(&line);
                let start = line.find('{').unwrap_or(line.len());
                let Ok(document) = serde_json::from_str::<Value>(&line[start..]) else {
                    continue;
                };
                let directives = document["_aws"]["CloudWatchMetrics"].as_array().cloned();
                for directive in directives.unwrap_or_default() {
                    let dimension_sets = directive["Dimensions"].as_array().cloned();
                    for dimensions in dimension_sets.unwrap_or_default() {
                        let metrics = directive["Metrics"].as_array().cloned();
                        for metric in metrics.unwrap_or_default() {
                            let name = metric["Name"].as_str().unwrap_or_default();
                            printed
                                .metrics
                                .lock()
                                .unwrap()
                                .insert(format!("{name} by {dimensions}"));
                        }
                    }
                }
            }
        });
    }

    /// The bytes printed so far, once the readers have caught up (nothing new for 20 ms).
    fn settled_bytes(&self) -> usize {
        let mut seen = self.bytes.load(Ordering::SeqCst);
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(20));
            let now = self.bytes.load(Ordering::SeqCst);
            if now == seen {
                break;
            }
            seen = now;
        }
        seen
    }

    /// Each custom metric the function published: `name by ["dimension", ...]`.
    pub fn metrics(&self) -> BTreeSet<String> {
        self.metrics.lock().unwrap().clone()
    }
}

/// One MODIFY's way to KV.
#[derive(Clone, Copy, Debug)]
pub struct OneModify {
    pub round_trips: usize,
    /// From the invocation's start until its KV write landed.
    pub landed_ms: f64,
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The function's peers for one process: KV (each request delayed as a real edge would be),
/// the API-keys stand-in, the runtime API, the tables and the token's secret in moto, and the
/// proxy the function reaches DynamoDB through.
pub struct Function {
    kv: KvEmulator,
    keys: ApiKeysStandIn,
    runtime: Arc<RuntimeApi>,
    proxy: DynamoProxy,
    ddb: aws_sdk_dynamodb::Client,
    table: String,
    ledger: String,
    secret_id: String,
    tag: String,
    /// A twin answered from a recording: the table is not written.
    replaying: bool,
    process: Option<Killed>,
    pub printed: Arc<Printed>,
}

fn unique(what: &str) -> String {
    static RUN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{what}-{}-{run}", std::process::id())
}

impl Function {
    /// Starts the peers and the function against moto, the proxy recording moto's answers; runs
    /// the migration's backfill first (references complete, as after the first deploy's runbook
    /// step).
    pub async fn start(options: &BenchOptions) -> Result<Self, String> {
        let moto =
            std::env::var("AWS_ENDPOINT_URL").map_err(|_| "AWS_ENDPOINT_URL: run under moto")?;
        let aws = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
        let ddb = aws_sdk_dynamodb::Client::new(&aws);
        let secret_id = unique("bench/CloudFlareApiToken");
        aws_sdk_secretsmanager::Client::new(&aws)
            .create_secret()
            .name(&secret_id)
            .secret_string(TOKEN)
            .send()
            .await
            .map_err(|e| format!("secret in moto: {e}"))?;
        let table = unique("bench-EcomIndexSettingsTable");
        // With a stream, as the settings table has (the bench's records are made, not read).
        let view = aws_sdk_dynamodb::types::StreamViewType::NewAndOldImages;
        crate::streams::create_settings_table(&ddb, &table, view).await?;
        let ledger = format!("{table}-ledger");
        crate::streams::create_ledger_table(&ddb, &ledger).await?;
        let tag = unique("acct");
        let (kv, keys) = peers(options, &tag).await?;
        let runtime = Arc::new(RuntimeApi::start(0).await.map_err(|e| e.to_string())?);
        let proxy = DynamoProxy::start(&moto).await.map_err(|e| e.to_string())?;
        proxy.record();
        let mut function = Self {
            kv,
            keys,
            runtime,
            proxy,
            ddb,
            table,
            ledger,
            secret_id,
            tag,
            replaying: false,
            process: None,
            printed: Arc::default(),
        };
        function.spawn(options, None)?;
        function.migrate_and_warm_up().await?;
        Ok(function)
    }

    /// A fresh process with fresh peers (KV empty, as this one's was) and the same names, its
    /// DynamoDB calls answered from what this one recorded after `setup`'s latency; migrated
    /// and warmed up as this one was.
    pub async fn twin(&self, options: &BenchOptions, setup: Setup) -> Result<Self, String> {
        let (kv, keys) = peers(options, &self.tag).await?;
        let moto = std::env::var("AWS_ENDPOINT_URL").unwrap_or_default();
        let proxy = DynamoProxy::start(&moto).await.map_err(|e| e.to_string())?;
        proxy.replay(self.proxy.recorded());
        proxy.set_latency(Duration::from_millis(setup.dynamo_latency_ms));
        let mut twin = Self {
            kv,
            keys,
            runtime: Arc::new(RuntimeApi::start(0).await.map_err(|e| e.to_string())?),
            proxy,
            ddb: self.ddb.clone(),
            table: self.table.clone(),
            ledger: self.ledger.clone(),
            secret_id: self.secret_id.clone(),
            tag: self.tag.clone(),
            replaying: true,
            process: None,
            printed: Arc::default(),
        };
        twin.spawn(options, options.cpu_share)?;
        twin.migrate_and_warm_up().await?;
        Ok(twin)
    }

    /// Requests the twin met that its recording lacked (0: it ran as the recorded run did).
    pub fn misses(&self) -> u64 {
        self.proxy.misses()
    }

    /// Every key and value of both namespaces.
    pub fn kv_held(&self) -> Vec<(String, Option<String>)> {
        let mut held = Vec::new();
        for namespace in [SETTINGS_NS, "ns-qcfg"] {
            for key in self.kv.keys(CF_ACCOUNT, namespace) {
                let value = self.kv.value(CF_ACCOUNT, namespace, &key);
                held.push((format!("{namespace}/{key}"), value));
            }
        }
        held
    }

    fn spawn(&mut self, options: &BenchOptions, cpu_share: Option<f64>) -> Result<(), String> {
        let wrapped = cpu_share.map(super::cpu_share::wrapper);
        let mut command = match wrapped {
            Some(Ok(mut wrapped)) => {
                wrapped.arg(&options.function_binary);
                wrapped
            }
            _ => Command::new(&options.function_binary),
        };
        command
            .env("AWS_LAMBDA_RUNTIME_API", self.runtime.endpoint())
            .env("AWS_LAMBDA_FUNCTION_NAME", "ecom-settings-exporter")
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512")
            // The stream invokes `live`: a published version.
            .env("AWS_LAMBDA_FUNCTION_VERSION", "1")
            .env("AWS_LAMBDA_LOG_FORMAT", "JSON")
            .env("AWS_ENDPOINT_URL", self.proxy.endpoint())
            .env("SETTINGS_TABLE_NAME", &self.table)
            .env("CLOUDFLARE_ACCOUNT_ID", CF_ACCOUNT)
            .env("CLOUDFLARE_KV_NAMESPACE_ID", SETTINGS_NS)
            .env("CLOUDFLARE_QCFG_NAMESPACE_ID", "ns-qcfg")
            .env("CLOUDFLARE_API_TOKEN_SECRET_ID", &self.secret_id)
            .env("CLOUDFLARE_API_BASE_URL", self.kv.base_url())
            .env("API_KEYS_SERVICE_URL", self.keys.url_template())
            .env("SETTINGS_TABLE_STREAM_ARN", STREAM_ARN)
            .env("LEDGER_TABLE_NAME", &self.ledger)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .map_err(|e| format!("{}: {e}", options.function_binary.display()))?;
        self.printed.read(child.stdout.take().expect("piped"));
        self.printed.read(child.stderr.take().expect("piped"));
        self.process = Some(Killed(child));
        Ok(())
    }

    /// The migration's backfill, then a warm container: the token fetched and the clients
    /// connected by a batch of other indexes of the same accounts.
    async fn migrate_and_warm_up(&self) -> Result<(), String> {
        let answer = self.invoke(json!({"mode": "backfill"})).await?;
        if answer["complete"] != json!(true) {
            return Err(format!("the migration's backfill: {answer}"));
        }
        let warm = format!("{}-warm", self.tag);
        self.change_table(&warm, ACCOUNTS, Kind::Insert).await?;
        let answer = self
            .invoke(records::event(&warm, ACCOUNTS, Kind::Insert))
            .await?;
        if answer != json!({"batchItemFailures": []}) {
            return Err(format!("the warm-up: {answer}"));
        }
        Ok(())
    }

    /// Invokes a twin with the template's timeout (`Timeout: 120`); the recorded run, which is
    /// not measured, with Lambda's longest (900 s): moto answers a Query in tens of
    /// milliseconds, and a 5,000-record override batch's 5,000 of them outlast 120 s there, so
    /// its recording would end at the deadline and its twin meet requests it lacks.
    async fn invoke(&self, payload: Value) -> Result<Value, String> {
        let timeout = match self.replaying {
            true => 120,
            false => 900,
        };
        self.runtime
            .invoke(payload, Duration::from_secs(timeout))
            .await
            .map_err(|e| format!("the function failed: {e}"))
    }

    /// The table changed as `kind` changes it (not by a twin: its answers are recorded).
    async fn change_table(&self, tag: &str, records: usize, kind: Kind) -> Result<(), String> {
        if self.replaying {
            return Ok(());
        }
        records::change_table(&self.ddb, &self.table, tag, records, kind).await
    }

    /// The table first changed as `kind` changes it, then its stream batch sent and measured.
    pub async fn batch(&self, records: usize, kind: Kind) -> Result<Measured, String> {
        let pid = self.process.as_ref().map_or(0, |p| p.0.id());
        self.change_table(&self.tag, records, kind).await?;
        let event = records::event(&self.tag, records, kind);
        let event_bytes = event.to_string().len();
        let (calls_before, kv_before) = (self.proxy.calls().len(), self.kv.requests().len());
        let printed_before = self.printed.settled_bytes();
        let cpu_before = cpu_ns(pid);
        let started = Instant::now();
        let answer = self.invoke(event).await?;
        let wall = started.elapsed();
        let cpu = cpu_ns(pid) - cpu_before;
        let failed = answer["batchItemFailures"].as_array().map(Vec::len);
        let failed = failed.ok_or_else(|| format!("{} batch: {answer}", kind.name()))?;
        let calls = self.proxy.calls().split_off(calls_before);
        Ok(Measured {
            kind,
            records,
            event_bytes,
            cpu_ms: cpu as f64 / 1e6,
            wall_ms: wall.as_secs_f64() * 1000.0,
            peak_rss_mib: peak_rss_kib(pid) as f64 / 1024.0,
            round_trips: round_trips_in_sequence(&calls),
            calls,
            kv: self.kv.requests().split_off(kv_before),
            failed,
            log_bytes: self.printed.settled_bytes() - printed_before,
        })
    }

    /// One MODIFY of a warm index: the DynamoDB round trips it waits for before its KV write,
    /// and how long after the invocation began that write landed (KV answered).
    pub async fn one_modify(&self, kv_latency: Duration) -> Result<OneModify, String> {
        let warm = format!("{}-warm", self.tag);
        self.change_table(&warm, 1, Kind::Modify).await?;
        let (calls_before, kv_before) = (self.proxy.calls().len(), self.kv.requests().len());
        let started = Instant::now();
        let answer = self.invoke(records::event(&warm, 1, Kind::Modify)).await?;
        if answer != json!({"batchItemFailures": []}) {
            return Err(format!("one MODIFY: {answer}"));
        }
        let kv: Vec<RequestRecord> = self.kv.requests().split_off(kv_before);
        let first_write = kv
            .iter()
            .filter(|r| r.operation == "bulk")
            .map(|r| r.received)
            .min();
        let first_write = first_write.ok_or("one MODIFY wrote nothing")?;
        let calls = self.proxy.calls().split_off(calls_before);
        let before: Vec<DynamoCall> = calls
            .into_iter()
            .filter(|c| c.ended <= first_write)
            .collect();
        let landed = first_write.saturating_duration_since(started) + kv_latency;
        Ok(OneModify {
            round_trips: round_trips_in_sequence(&before),
            landed_ms: landed.as_secs_f64() * 1000.0,
        })
    }

    pub fn settings_keys(&self) -> usize {
        self.kv.keys(CF_ACCOUNT, SETTINGS_NS).len()
    }
}

/// KV (empty, each request answered after the bench's latency) and the API-keys stand-in with
/// the keys of the accounts `{tag}-*`.
async fn peers(options: &BenchOptions, tag: &str) -> Result<(KvEmulator, ApiKeysStandIn), String> {
    let kv = KvEmulator::start(0, &[TOKEN])
        .await
        .map_err(|e| e.to_string())?;
    kv.create_namespace(SETTINGS_NS);
    kv.create_namespace("ns-qcfg");
    let millis = options.kv_latency.as_millis() as u64;
    kv.inject(Fault::Delay { millis }, usize::MAX);
    let keys = ApiKeysStandIn::start(0).await.map_err(|e| e.to_string())?;
    for a in 0..ACCOUNTS {
        keys.set_key(&format!("{tag}-{a}"), "marqo-key-bench");
        keys.set_key(&format!("{tag}-warm-{a}"), "marqo-key-warm");
    }
    Ok((kv, keys))
}

/// CPU time of every thread of a process, from the scheduler's own accounting.
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Peak resident memory of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}
