//! `make demo`: the whole flow on this machine. A moto table with a stream, the real function
//! binary behind a local Lambda runtime API, a poller that feeds it the stream like Lambda's
//! event-source mapping, the KV emulator and the API-keys stand-in. A short scenario is written
//! to the table; each change is timed until KV shows it; at the end the function's own `verify`
//! mode must find KV in sync with the table.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_dynamodb::types::{AttributeValue, StreamViewType};
use serde_json::{json, Value};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::api_keys::ApiKeysStandIn;
use crate::kv::KvEmulator;
use crate::poller::{Poller, PollerConfig, Progress};
use crate::runtime_api::RuntimeApi;
use crate::streams::StreamReader;

const ACCOUNT: &str = "acct-demo";
const API_KEY: &str = "demo-marqo-key-5f2c9a";
const TOKEN: &str = "demo-cloudflare-token";
const CF_ACCOUNT: &str = "demo-cf-account";
const SETTINGS_NS: &str = "settings";
const QCFG_NS: &str = "qcfg";
const REGION: &str = "eu-west-1";
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The `ecom-settings-exporter` binary to run.
    pub function_binary: PathBuf,
    /// A running moto server; when `None`, `moto_server` is started from this path.
    pub moto_endpoint: Option<String>,
    pub moto_server: PathBuf,
    pub table_name: String,
    pub batching_window: Duration,
    /// Where the function's own log lines go.
    pub function_log: PathBuf,
}

/// One scenario step and how long its change took to reach KV.
#[derive(Debug, Clone)]
pub struct StepReport {
    pub title: String,
    pub propagation: Option<Duration>,
}

#[derive(Debug, Clone, Default)]
pub struct DemoReport {
    pub steps: Vec<StepReport>,
    /// (what was checked, whether it held, detail)
    pub checks: Vec<(String, bool, String)>,
    pub invocations: usize,
    pub retried_invocations: usize,
}

impl DemoReport {
    pub fn ok(&self) -> bool {
        self.steps.iter().all(|s| s.propagation.is_some()) && self.checks.iter().all(|c| c.1)
    }
}

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

async fn start_moto(server: &PathBuf) -> Result<(String, Process), String> {
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

struct Stack {
    ddb: aws_sdk_dynamodb::Client,
    kv: KvEmulator,
    keys: ApiKeysStandIn,
    runtime: Arc<RuntimeApi>,
    progress: Arc<Progress>,
    table: String,
    /// Stream records written so far (one per table write).
    writes: usize,
    _function: Process,
    _moto: Option<Process>,
    stop: watch::Sender<bool>,
}

async fn start(options: &DemoOptions) -> Result<Stack, String> {
    let (endpoint, moto) = match &options.moto_endpoint {
        Some(endpoint) => (endpoint.clone(), None),
        None => {
            let (endpoint, process) = start_moto(&options.moto_server).await?;
            (endpoint, Some(process))
        }
    };
    let aws = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(&endpoint)
        .region(aws_config::Region::new(REGION))
        .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
            "testing", "testing", None, None, "demo",
        ))
        .load()
        .await;
    let ddb = aws_sdk_dynamodb::Client::new(&aws);
    // NEW_IMAGE, as the production stream: removes find the shop id in KV.
    let stream_arn =
        crate::streams::create_settings_table(&ddb, &options.table_name, StreamViewType::NewImage)
            .await?;
    let secret_id = format!("{}/CloudFlareApiToken", options.table_name);
    aws_sdk_secretsmanager::Client::new(&aws)
        .create_secret()
        .name(&secret_id)
        .secret_string(TOKEN)
        .send()
        .await
        .map_err(|e| {
            format!(
                "create secret: {}",
                aws_sdk_secretsmanager::error::DisplayErrorContext(e)
            )
        })?;

    let kv = KvEmulator::start(0, &[TOKEN])
        .await
        .map_err(|e| e.to_string())?;
    kv.create_namespace(SETTINGS_NS);
    kv.create_namespace(QCFG_NS);
    let keys = ApiKeysStandIn::start(0).await.map_err(|e| e.to_string())?;
    keys.set_key(ACCOUNT, API_KEY);
    let runtime = Arc::new(RuntimeApi::start(0).await.map_err(|e| e.to_string())?);

    if let Some(dir) = options.function_log.parent() {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    let log = std::fs::File::create(&options.function_log).map_err(|e| e.to_string())?;
    let function = Command::new(&options.function_binary)
        .env("AWS_LAMBDA_RUNTIME_API", runtime.endpoint())
        .env(
            "AWS_LAMBDA_FUNCTION_NAME",
            "demo-EcomSettingsExporterLambda",
        )
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env(
            "AWS_LAMBDA_LOG_GROUP_NAME",
            "/aws/lambda/demo-EcomSettingsExporterLambda",
        )
        .env("AWS_LAMBDA_LOG_STREAM_NAME", "demo")
        .env("AWS_ENDPOINT_URL", &endpoint)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", REGION)
        .env("SETTINGS_TABLE_NAME", &options.table_name)
        .env("CLOUDFLARE_ACCOUNT_ID", CF_ACCOUNT)
        .env("CLOUDFLARE_KV_NAMESPACE_ID", SETTINGS_NS)
        .env("CLOUDFLARE_QCFG_NAMESPACE_ID", QCFG_NS)
        .env("CLOUDFLARE_API_TOKEN_SECRET_ID", &secret_id)
        .env("CLOUDFLARE_API_BASE_URL", kv.base_url())
        .env("API_KEYS_SERVICE_URL", keys.url_template())
        .env("SETTINGS_TABLE_STREAM_ARN", &stream_arn)
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", options.function_binary.display()))?;

    let reader = StreamReader::open(
        aws_sdk_dynamodbstreams::Client::new(&aws),
        &stream_arn,
        REGION,
    )
    .await
    .map_err(|e| format!("open the stream: {e}"))?;
    let poller = Poller::new(
        reader,
        runtime.clone(),
        PollerConfig {
            batching_window: options.batching_window,
            retry_delay: Duration::from_millis(500),
            ..PollerConfig::default()
        },
    );
    let progress = poller.progress();
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(async move {
        if let Err(e) = poller.run(stopped).await {
            eprintln!("poller stopped: {e}");
        }
    });
    Ok(Stack {
        ddb,
        kv,
        keys,
        runtime,
        progress,
        table: options.table_name.clone(),
        writes: 0,
        _function: Process(function),
        _moto: moto,
        stop,
    })
}

fn s(value: &str) -> AttributeValue {
    AttributeValue::S(value.into())
}

fn index_item(name: &str, shop: Option<&str>) -> HashMap<String, AttributeValue> {
    let mut item = HashMap::from([
        ("pk".to_string(), s(ACCOUNT)),
        ("sk".to_string(), s(&format!("INDEX#{name}"))),
        (
            "index_endpoint".to_string(),
            s(&format!("https://{ACCOUNT}-{name}.idx.example")),
        ),
        (
            "search_config".to_string(),
            AttributeValue::M(HashMap::from([(
                "limit".to_string(),
                AttributeValue::N("24".into()),
            )])),
        ),
    ]);
    if let Some(shop) = shop {
        item.insert("shop_id".into(), s(shop));
    }
    item
}

fn read_alias_to(target: &str) -> AttributeValue {
    let target = AttributeValue::M(HashMap::from([
        ("index_id".to_string(), s(target)),
        ("weight".to_string(), AttributeValue::N("1.0".into())),
    ]));
    AttributeValue::M(HashMap::from([(
        "doc_reads".to_string(),
        AttributeValue::M(HashMap::from([
            ("enabled".to_string(), AttributeValue::Bool(true)),
            ("targets".to_string(), AttributeValue::L(vec![target])),
        ])),
    )]))
}

impl Stack {
    async fn put(&mut self, item: HashMap<String, AttributeValue>) -> Result<(), String> {
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

    async fn delete(&mut self, sk: &str) -> Result<(), String> {
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

    fn settings(&self, key: &str) -> Option<Value> {
        self.kv.json(CF_ACCOUNT, SETTINGS_NS, key)
    }

    /// Waits until every table write so far went through the function and `holds` is true.
    async fn propagated(
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

fn doc_reads_target(value: &Value) -> Option<&str> {
    value["index_aliases"]["doc_reads"]["targets"][0]["index_id"].as_str()
}

/// Runs the scenario and prints what happens. `Err` when the demo could not run at all.
pub async fn run(options: DemoOptions) -> Result<DemoReport, String> {
    println!("Starting moto (DynamoDB + stream + Secrets Manager), the Cloudflare KV emulator,");
    println!("the API-keys stand-in and the function behind a local Lambda runtime API...");
    let mut stack = start(&options).await?;
    println!(
        "Function log: {}. Batching window: {:.1} s (production: 10 s).\n",
        options.function_log.display(),
        options.batching_window.as_secs_f64()
    );
    let mut report = DemoReport::default();
    let mut step = |title: &str, propagation: Option<Duration>| {
        match propagation {
            Some(d) => println!("  ok    {title:<62} {:>6.2} s", d.as_secs_f64()),
            None => println!(
                "  FAIL  {title:<62} not in KV after {} s",
                STEP_TIMEOUT.as_secs()
            ),
        }
        report.steps.push(StepReport {
            title: title.into(),
            propagation,
        });
    };
    println!("Scenario (time from the table write until KV shows it):");

    // 1. An index with a shop id; the API keys service fails once, so Lambda retries.
    stack.keys.fail_next(ACCOUNT, 503, 1);
    let t = Instant::now();
    stack
        .put(index_item("products", Some("demo-shop.myshopify.com")))
        .await?;
    let d = stack
        .propagated(t, |s| {
            s.settings("demo-shop.myshopify.com").is_some()
                && s.settings("acct-demo-products").is_some()
        })
        .await;
    step(
        "index `products` with shop `demo-shop.myshopify.com` (1 retry)",
        d,
    );

    // 2. A read alias cut over to a new index.
    let t = Instant::now();
    stack.put(index_item("products-v2", None)).await?;
    let mut cut_over = index_item("products", Some("demo-shop.myshopify.com"));
    cut_over.insert(
        "index_aliases".into(),
        read_alias_to("acct-demo-products-v2"),
    );
    stack.put(cut_over).await?;
    let d = stack
        .propagated(t, |s| {
            s.settings("demo-shop.myshopify.com")
                .is_some_and(|v| doc_reads_target(&v) == Some("acct-demo-products-v2"))
                && s.settings("acct-demo-products-v2").is_some()
        })
        .await;
    step("reads of `products` cut over to `products-v2`", d);

    // 3. A query-config override.
    let t = Instant::now();
    let mut query = HashMap::from([
        ("pk".to_string(), s(ACCOUNT)),
        ("sk".to_string(), s("INDEX#products#QUERY#running shoes")),
    ]);
    query.insert(
        "query_config".into(),
        AttributeValue::M(HashMap::from([(
            "pinned".to_string(),
            AttributeValue::L(vec![s("sku-trail-42"), s("sku-road-7")]),
        )])),
    );
    stack.put(query).await?;
    let d = stack
        .propagated(t, |s| !s.kv.keys(CF_ACCOUNT, QCFG_NS).is_empty())
        .await;
    step("query override for `running shoes`", d);

    // 4. An index removed while a live alias still points at it: its keys stay.
    let t = Instant::now();
    stack.delete("INDEX#products-v2").await?;
    let d = stack
        .propagated(t, |s| s.settings("acct-demo-products-v2").is_some())
        .await;
    step(
        "`products-v2` removed, kept in KV: `products` reads from it",
        d,
    );

    // 5. An index removed freely: both keys go (the shop id is read from KV: NEW_IMAGE stream).
    let t = Instant::now();
    stack
        .put(index_item(
            "old-campaign",
            Some("old-campaign.myshopify.com"),
        ))
        .await?;
    let d = stack
        .propagated(t, |s| s.settings("old-campaign.myshopify.com").is_some())
        .await;
    step("index `old-campaign` with its own shop", d);
    let t = Instant::now();
    stack.delete("INDEX#old-campaign").await?;
    let d = stack
        .propagated(t, |s| {
            s.settings("acct-demo-old-campaign").is_none()
                && s.settings("old-campaign.myshopify.com").is_none()
        })
        .await;
    step("`old-campaign` removed: both its keys deleted", d);

    // What the table implies, checked by the function itself, and what must be gone or kept.
    let verify = stack
        .runtime
        .invoke(
            json!({"mode": "verify", "system_account_id": ACCOUNT, "index_name": "products", "include_query_configs": true}),
            Duration::from_secs(30),
        )
        .await;
    let (in_sync, detail) = match &verify {
        Ok(answer) => (answer["in_sync"] == true, answer["counts"].to_string()),
        Err(error) => (false, error.to_string()),
    };
    report.checks.push((
        "verify `products`: KV matches the table".into(),
        in_sync,
        detail,
    ));
    let expected_settings = [
        "acct-demo-products",
        "acct-demo-products-v2",
        "demo-shop.myshopify.com",
    ];
    let settings_keys = stack.kv.keys(CF_ACCOUNT, SETTINGS_NS);
    report.checks.push((
        "settings namespace holds exactly the live and the protected index".into(),
        settings_keys == expected_settings,
        format!("{settings_keys:?}"),
    ));
    let qcfg_keys = stack.kv.keys(CF_ACCOUNT, QCFG_NS);
    let overrides = qcfg_keys.iter().filter(|k| k.starts_with("qcfg-")).count();
    let filter = stack
        .kv
        .json(CF_ACCOUNT, QCFG_NS, "qfilter-acct-demo-products");
    report.checks.push((
        "query-config namespace holds the one override and the index's filter of it".into(),
        overrides == 1 && qcfg_keys.len() == 2 && filter.is_some_and(|f| f["count"] == 1),
        format!("{qcfg_keys:?}"),
    ));
    let invocations = stack.progress.invocations.lock().unwrap().clone();
    report.invocations = invocations.len();
    report.retried_invocations = invocations
        .iter()
        .filter(|i| i.retry_from.is_some())
        .count();
    report.checks.push((
        "the failed API-key call was retried through batchItemFailures".into(),
        report.retried_invocations >= 1,
        format!(
            "{} invocations, {} resumed from a reported record",
            report.invocations, report.retried_invocations
        ),
    ));
    let leaked = std::fs::read_to_string(&options.function_log)
        .map(|log| log.contains(API_KEY) || log.contains(TOKEN))
        .unwrap_or(true);
    report.checks.push((
        "no API key or token in the function's log".into(),
        !leaked,
        options.function_log.display().to_string(),
    ));

    print_kv(&stack);
    println!("\nChecks:");
    for (what, ok, detail) in &report.checks {
        println!("  {}  {what} ({detail})", if *ok { "ok  " } else { "FAIL" });
    }
    let _ = stack.stop.send(true);
    Ok(report)
}

/// KV as the edge sees it, API keys masked.
fn print_kv(stack: &Stack) {
    println!("\nCloudflare KV, namespace `{SETTINGS_NS}` (the proxy's KV binding):");
    for key in stack.kv.keys(CF_ACCOUNT, SETTINGS_NS) {
        let value = stack.settings(&key).unwrap_or_default();
        let reads = doc_reads_target(&value)
            .map(|t| format!(", reads from {t}"))
            .unwrap_or_default();
        println!(
            "  {key:<28} index {} at {}{reads}, api key {}",
            value["index_id"].as_str().unwrap_or("?"),
            value["index_url"].as_str().unwrap_or("?"),
            if value["marqo_api_key"].is_string() {
                "<masked>"
            } else {
                "missing"
            },
        );
    }
    println!("Cloudflare KV, namespace `{QCFG_NS}` (KV_QCFG):");
    for key in stack.kv.keys(CF_ACCOUNT, QCFG_NS) {
        let value = stack.kv.json(CF_ACCOUNT, QCFG_NS, &key).unwrap_or_default();
        if key.starts_with("qfilter-") {
            println!(
                "  {key}  filter of {} override(s), {} bytes of fingerprints (base64)",
                value["count"],
                value["fingerprints"].as_str().map_or(0, str::len)
            );
            continue;
        }
        let short: String = key.chars().take(40).collect();
        println!(
            "  {short}...  query {:?} -> {}",
            value["query"].as_str().unwrap_or("?"),
            value["config"]
        );
    }
}
