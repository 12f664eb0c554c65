//! `ecom-emulators bench` (what `make bench` runs): the release function binary end to end
//! behind the runtime API, with the KV emulator (50 ms a request) and the API-keys stand-in in
//! this process and Secrets Manager in moto. For each batch size it measures the function
//! process only: CPU time of all its threads (from /proc schedstat, in ns), wall time of the
//! invocation, peak RSS, and cold start to the first poll; then the Python reference
//! (`bench/reference.py`: boto3's TypeDeserializer, the value built, json.dumps) on the same
//! event, and the ratio.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::api_keys::ApiKeysStandIn;
use crate::kv::{Fault, KvEmulator};
use crate::runtime_api::RuntimeApi;

pub struct BenchOptions {
    pub function_binary: PathBuf,
    pub python: PathBuf,
    pub reference: PathBuf,
    pub sizes: Vec<usize>,
    pub kv_latency: Duration,
    /// Runs of each size (a fresh function process each): the table shows the median.
    pub runs: usize,
}

const ACCOUNTS: usize = 5;
const TOKEN: &str = "bench-token";

/// One INSERT record of an index with a realistic settings image (about 870 bytes).
fn record(i: usize) -> Value {
    let account = format!("acct-{}", i % ACCOUNTS);
    let index = format!("index-{i:05}");
    let image = json!({
        "pk": {"S": account}, "sk": {"S": format!("INDEX#{index}")},
        "index_endpoint": {"S": format!("https://{account}-{index}.idx.example.com/indexes/{index}")},
        "shop_id": {"S": format!("shop-{i:05}.myshopify.com")},
        "cell": {"S": "default"},
        "pixel_id": {"S": format!("px-{i:08}")},
        "search_config": {"M": {
            "limit": {"N": "20"}, "offset": {"N": "0"}, "ratio": {"N": "0.75"},
            "searchable_attributes": {"L": [{"S": "title"}, {"S": "description"}]}
        }},
        "feature_flags": {"M": {"rerank": {"BOOL": true}, "variants": {"SS": ["a", "b"]}}},
        "index_aliases": {"M": {
            "doc_reads": {"M": {"enabled": {"BOOL": true}, "targets": {"L": [
                {"M": {"index_id": {"S": format!("{account}-{index}")}, "weight": {"N": "1"}}}]}}},
            "analytics": {"M": {"enabled": {"BOOL": false}, "index_id": {"NULL": true}}}
        }}
    });
    json!({
        "eventID": format!("{i:032x}"), "eventName": "INSERT", "eventVersion": "1.1",
        "eventSource": "aws:dynamodb", "awsRegion": "eu-west-1", "eventSourceARN": STREAM_ARN,
        "dynamodb": {
            "ApproximateCreationDateTime": 1.7e9,
            "Keys": {"pk": image["pk"], "sk": image["sk"]},
            "NewImage": image,
            "SequenceNumber": format!("{:021}", 100_000_000 + i),
            "SizeBytes": 800, "StreamViewType": "NEW_AND_OLD_IMAGES"
        }
    })
}

/// The stream the bench's records come from (the function exports no other).
const STREAM_ARN: &str =
    "arn:aws:dynamodb:eu-west-1:123456789012:table/bench-EcomIndexSettingsTable/stream/2026-01-01T00:00:00.000";

/// The same records for other accounts (`{tag}-0` ...) and other shops: new keys in KV, and
/// API keys not fetched yet.
fn of_accounts(mut event: Value, tag: &str) -> Value {
    let records = event["Records"].as_array_mut().expect("records");
    for (i, record) in records.iter_mut().enumerate() {
        let account = json!({"S": format!("{tag}-{}", i % ACCOUNTS)});
        record["dynamodb"]["NewImage"]["pk"] = account.clone();
        record["dynamodb"]["Keys"]["pk"] = account;
        record["dynamodb"]["NewImage"]["shop_id"] =
            json!({"S": format!("shop-{tag}-{i:05}.myshopify.com")});
    }
    event
}

pub fn event(records: usize) -> Value {
    json!({ "Records": (0..records).map(record).collect::<Vec<_>>() })
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

#[derive(Debug, Clone, Default)]
pub struct Figures {
    pub records: usize,
    pub event_bytes: usize,
    pub cpu_ms: f64,
    /// CPU of a second batch of the same size (other accounts and shops) in the same process:
    /// what an instance that has handled such a batch before pays.
    pub again_cpu_ms: f64,
    pub wall_ms: f64,
    pub peak_rss_mib: f64,
    pub cold_start_ms: f64,
    pub bulk_writes: usize,
    pub api_key_calls: usize,
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The function's peers for one run: KV (each request delayed as a real edge would be), the
/// API-keys stand-in with every account the batches name, the runtime API, the token's secret.
struct Peers {
    kv: KvEmulator,
    keys: ApiKeysStandIn,
    runtime: Arc<RuntimeApi>,
    secret_id: String,
}

async fn peers(options: &BenchOptions) -> Result<Peers, String> {
    let aws = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    static RUN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let run = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let secret_id = format!("bench/CloudFlareApiToken-{}-{run}", std::process::id());
    aws_sdk_secretsmanager::Client::new(&aws)
        .create_secret()
        .name(&secret_id)
        .secret_string(TOKEN)
        .send()
        .await
        .map_err(|e| format!("secret in moto: {e}"))?;
    let kv = KvEmulator::start(0, &[TOKEN])
        .await
        .map_err(|e| e.to_string())?;
    kv.create_namespace("ns-settings");
    kv.create_namespace("ns-qcfg");
    let millis = options.kv_latency.as_millis() as u64;
    kv.inject(Fault::Delay { millis }, 1_000_000);
    let keys = ApiKeysStandIn::start(0).await.map_err(|e| e.to_string())?;
    for a in 0..ACCOUNTS {
        keys.set_key(&format!("acct-{a}"), &format!("marqo-key-{a}"));
    }
    for tag in ["warm", "again"] {
        for a in 0..ACCOUNTS {
            keys.set_key(&format!("{tag}-{a}"), &format!("marqo-key-{tag}-{a}"));
        }
    }
    let runtime = Arc::new(RuntimeApi::start(0).await.map_err(|e| e.to_string())?);
    Ok(Peers {
        kv,
        keys,
        runtime,
        secret_id,
    })
}

/// The function binary behind the runtime API, and how long it took to first ask for work.
async fn start_function(
    options: &BenchOptions,
    peers: &Peers,
    moto: &str,
) -> Result<(Killed, Duration), String> {
    let spawned = Instant::now();
    let child = Command::new(&options.function_binary)
        .env("AWS_LAMBDA_RUNTIME_API", peers.runtime.endpoint())
        .env("AWS_LAMBDA_FUNCTION_NAME", "ecom-settings-exporter")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("AWS_LAMBDA_LOG_FORMAT", "JSON")
        .env("AWS_ENDPOINT_URL", moto)
        .env("SETTINGS_TABLE_NAME", "bench-EcomIndexSettingsTable")
        .env("CLOUDFLARE_ACCOUNT_ID", "cf-bench")
        .env("CLOUDFLARE_KV_NAMESPACE_ID", "ns-settings")
        .env("CLOUDFLARE_QCFG_NAMESPACE_ID", "ns-qcfg")
        .env("CLOUDFLARE_API_TOKEN_SECRET_ID", &peers.secret_id)
        .env("CLOUDFLARE_API_BASE_URL", peers.kv.base_url())
        .env("API_KEYS_SERVICE_URL", peers.keys.url_template())
        .env("SETTINGS_TABLE_STREAM_ARN", STREAM_ARN)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("{}: {e}", options.function_binary.display()))?;
    let child = Killed(child);
    loop {
        if let Some(at) = peers.runtime.first_poll() {
            return Ok((child, at.duration_since(spawned)));
        }
        if spawned.elapsed() > Duration::from_secs(10) {
            return Err("the function never polled the runtime API".into());
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

fn bulk_writes(kv: &KvEmulator) -> usize {
    kv.requests()
        .iter()
        .filter(|r| r.operation == "bulk")
        .count()
}

async fn rust_figures(options: &BenchOptions, records: usize) -> Result<Figures, String> {
    let moto = std::env::var("AWS_ENDPOINT_URL").map_err(|_| "AWS_ENDPOINT_URL: run under moto")?;
    let peers = peers(options).await?;
    let (kv, keys, runtime) = (&peers.kv, &peers.keys, &peers.runtime);
    let payload = event(records);
    let event_bytes = payload.to_string().len();
    let (child, cold_start) = start_function(options, &peers, &moto).await?;
    let pid = child.0.id();
    // A warm container: the token fetched and the clients connected by an earlier batch, one
    // of other accounts (their keys are not the ones the measured batch needs) as many as the
    // measured batch has, so the API-keys client holds a connection for each.
    let warm_up = of_accounts(event(ACCOUNTS), "warm");
    runtime
        .invoke(warm_up, Duration::from_secs(60))
        .await
        .map_err(|e| format!("the warm-up failed: {e}"))?;
    let (bulk_before, calls_before) = (bulk_writes(kv), keys.calls().len());

    let cpu_before = cpu_ns(pid);
    let started = Instant::now();
    let answer = runtime
        .invoke(payload, Duration::from_secs(120))
        .await
        .map_err(|e| format!("the function failed: {e}"))?;
    let wall = started.elapsed();
    let cpu = cpu_ns(pid) - cpu_before;
    if answer != json!({"batchItemFailures": []}) {
        return Err(format!("unexpected answer: {answer}"));
    }
    let written = kv.keys("cf-bench", "ns-settings").len();
    let expected = (records + ACCOUNTS) * 2;
    if written != expected {
        return Err(format!("{written} keys in KV, expected {expected}"));
    }
    let bulk_writes = bulk_writes(kv) - bulk_before;
    let api_key_calls = keys.calls().len() - calls_before;

    let again = of_accounts(event(records), "again");
    let cpu_before = cpu_ns(pid);
    let answer = runtime
        .invoke(again, Duration::from_secs(120))
        .await
        .map_err(|e| format!("the function failed on the second batch: {e}"))?;
    let again_cpu = cpu_ns(pid) - cpu_before;
    let written = kv.keys("cf-bench", "ns-settings").len();
    if answer != json!({"batchItemFailures": []}) || written != (2 * records + ACCOUNTS) * 2 {
        return Err(format!("the second batch: {answer}, {written} keys in KV"));
    }
    Ok(Figures {
        records,
        event_bytes,
        cpu_ms: cpu as f64 / 1e6,
        again_cpu_ms: again_cpu as f64 / 1e6,
        wall_ms: wall.as_secs_f64() * 1000.0,
        peak_rss_mib: peak_rss_kib(pid) as f64 / 1024.0,
        cold_start_ms: cold_start.as_secs_f64() * 1000.0,
        bulk_writes,
        api_key_calls,
    })
}

fn python_figures(options: &BenchOptions, records: usize) -> Result<Value, String> {
    let path =
        std::env::temp_dir().join(format!("bench-event-{}-{records}.json", std::process::id()));
    std::fs::write(&path, event(records).to_string()).map_err(|e| e.to_string())?;
    let output = Command::new(&options.python)
        .arg(&options.reference)
        .arg(&path)
        .output()
        .map_err(|e| format!("{}: {e}", options.python.display()));
    let _ = std::fs::remove_file(&path);
    let output = output?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    serde_json::from_slice(&output.stdout).map_err(|e| e.to_string())
}

/// The run with the median CPU time; its other figures, each the median of its own.
fn median(mut runs: Vec<Figures>) -> Figures {
    let middle = runs.len() / 2;
    let mut pick = |key: fn(&Figures) -> f64| {
        runs.sort_by(|a, b| key(a).total_cmp(&key(b)));
        key(&runs[middle])
    };
    let (wall_ms, peak_rss_mib) = (pick(|f| f.wall_ms), pick(|f| f.peak_rss_mib));
    let cold_start_ms = pick(|f| f.cold_start_ms);
    let again_cpu_ms = pick(|f| f.again_cpu_ms);
    pick(|f| f.cpu_ms);
    Figures {
        wall_ms,
        peak_rss_mib,
        cold_start_ms,
        again_cpu_ms,
        ..runs.swap_remove(middle)
    }
}

/// Runs every size and prints the table; `Err` names what went wrong.
pub async fn run(options: BenchOptions) -> Result<Vec<(Figures, Value)>, String> {
    println!(
        "| records | event | Rust CPU ms (warm) | CPU ms, next such batch | wall ms | peak RSS MiB | records/s (CPU) | cold start ms | requests | Python CPU ms | wall ms | peak RSS MiB | records/s (CPU) | Python / Rust CPU |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|");
    let mut all = Vec::new();
    for &records in &options.sizes {
        let mut runs = Vec::new();
        for _ in 0..options.runs.max(1) {
            runs.push(rust_figures(&options, records).await?);
        }
        let rust = median(runs);
        let mut pythons = Vec::new();
        for _ in 0..options.runs.max(1) {
            pythons.push(python_figures(&options, records)?);
        }
        pythons.sort_by(|a, b| {
            a["cpu_ms"]
                .as_f64()
                .partial_cmp(&b["cpu_ms"].as_f64())
                .unwrap()
        });
        let python = pythons.swap_remove(pythons.len() / 2);
        let py_cpu = python["cpu_ms"].as_f64().unwrap_or(f64::NAN);
        println!(
            "| {} | {:.1} MB | {:.1} | {:.1} | {:.0} | {:.1} | {:.0} | {:.1} | {} bulk writes, {} API-key calls | {:.1} | {:.0} | {:.1} | {:.0} | {:.1}x |",
            records,
            rust.event_bytes as f64 / 1e6,
            rust.cpu_ms,
            rust.again_cpu_ms,
            rust.wall_ms,
            rust.peak_rss_mib,
            records as f64 / (rust.cpu_ms / 1000.0),
            rust.cold_start_ms,
            rust.bulk_writes,
            rust.api_key_calls,
            py_cpu,
            python["wall_ms"].as_f64().unwrap_or(f64::NAN),
            python["peak_rss_mib"].as_f64().unwrap_or(f64::NAN),
            records as f64 / (py_cpu / 1000.0),
            py_cpu / rust.cpu_ms,
        );
        all.push((rust, python));
    }
    Ok(all)
}
