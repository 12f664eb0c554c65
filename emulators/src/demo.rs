//! `make demo`: the whole flow on this machine. A moto table with a stream, the real function
//! binary behind a local Lambda runtime API, a poller that feeds it the stream like Lambda's
//! event-source mapping, the KV emulator and the API-keys stand-in. A short scenario is written
//! to the table; each change is timed until KV shows it; at the end the function's own `verify`
//! mode must find KV in sync with the table.

pub mod propagation;
mod stack;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use serde_json::{json, Value};
use tokio::time::Instant;

use stack::{s, start, Stack};

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

    /// Prints and keeps how long a step's change took to reach KV (`None`: it never did).
    fn step(&mut self, title: &str, propagation: Option<Duration>) {
        match propagation {
            Some(d) => println!("  ok    {title:<62} {:>6.2} s", d.as_secs_f64()),
            None => println!(
                "  FAIL  {title:<62} not in KV after {} s",
                STEP_TIMEOUT.as_secs()
            ),
        }
        let title = title.into();
        self.steps.push(StepReport { title, propagation });
    }

    fn check(&mut self, what: &str, held: bool, detail: String) {
        self.checks.push((what.into(), held, detail));
    }
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
    println!("Scenario (time from the table write until KV shows it):");
    write_indexes(&mut stack, &mut report).await?;
    remove_indexes(&mut stack, &mut report).await?;
    check_with_verify(&stack, &mut report).await;
    check_namespaces(&stack, &mut report);
    check_retries_and_log(&stack, &options, &mut report);
    check_at_the_edge(&stack, &mut report).await;
    print_kv(&stack);
    println!("\nChecks:");
    for (what, ok, detail) in &report.checks {
        println!("  {}  {what} ({detail})", if *ok { "ok  " } else { "FAIL" });
    }
    let _ = stack.stop.send(true);
    Ok(report)
}

/// Steps 1-3: an index with a shop id (through one retry), a read alias cut over, a query
/// override.
async fn write_indexes(stack: &mut Stack, report: &mut DemoReport) -> Result<(), String> {
    // The API keys service fails once, so Lambda retries.
    stack.keys.fail_next(ACCOUNT, 503, 1);
    let t = Instant::now();
    let shop = "demo-shop.myshopify.com";
    stack.put(index_item("products", Some(shop))).await?;
    let d = stack
        .propagated(t, |s| {
            s.settings(shop).is_some() && s.settings("acct-demo-products").is_some()
        })
        .await;
    report.step(&format!("index `products` with shop `{shop}` (1 retry)"), d);

    let t = Instant::now();
    stack.put(index_item("products-v2", None)).await?;
    let mut cut_over = index_item("products", Some(shop));
    let alias = read_alias_to("acct-demo-products-v2");
    cut_over.insert("index_aliases".into(), alias);
    stack.put(cut_over).await?;
    let d = stack
        .propagated(t, |s| {
            s.settings(shop)
                .is_some_and(|v| doc_reads_target(&v) == Some("acct-demo-products-v2"))
                && s.settings("acct-demo-products-v2").is_some()
        })
        .await;
    report.step("reads of `products` cut over to `products-v2`", d);

    let t = Instant::now();
    let pinned = AttributeValue::L(vec![s("sku-trail-42"), s("sku-road-7")]);
    let query = HashMap::from([
        ("pk".to_string(), s(ACCOUNT)),
        ("sk".to_string(), s("INDEX#products#QUERY#running shoes")),
        (
            "query_config".to_string(),
            AttributeValue::M(HashMap::from([("pinned".to_string(), pinned)])),
        ),
    ]);
    stack.put(query).await?;
    let d = stack
        .propagated(t, |s| !s.kv.keys(CF_ACCOUNT, QCFG_NS).is_empty())
        .await;
    report.step("query override for `running shoes`", d);
    Ok(())
}

/// Steps 4-5: an index removed while a live alias points at it (its keys stay), then one
/// removed freely (both its keys go; the shop id is read from KV: a NEW_IMAGE stream).
async fn remove_indexes(stack: &mut Stack, report: &mut DemoReport) -> Result<(), String> {
    let t = Instant::now();
    stack.delete("INDEX#products-v2").await?;
    let d = stack
        .propagated(t, |s| s.settings("acct-demo-products-v2").is_some())
        .await;
    let title = "`products-v2` removed, kept in KV: `products` reads from it";
    report.step(title, d);

    let t = Instant::now();
    let shop = "old-campaign.myshopify.com";
    stack.put(index_item("old-campaign", Some(shop))).await?;
    let d = stack.propagated(t, |s| s.settings(shop).is_some()).await;
    report.step("index `old-campaign` with its own shop", d);
    let t = Instant::now();
    stack.delete("INDEX#old-campaign").await?;
    let d = stack
        .propagated(t, |s| {
            s.settings("acct-demo-old-campaign").is_none() && s.settings(shop).is_none()
        })
        .await;
    report.step("`old-campaign` removed: both its keys deleted", d);
    Ok(())
}

/// What the table implies, checked by the function's own `verify` mode.
async fn check_with_verify(stack: &Stack, report: &mut DemoReport) {
    let request = json!({"mode": "verify", "system_account_id": ACCOUNT,
        "index_name": "products", "include_query_configs": true});
    let verify = stack.runtime.invoke(request, Duration::from_secs(30)).await;
    let (in_sync, detail) = match &verify {
        Ok(answer) => (answer["in_sync"] == true, answer["counts"].to_string()),
        Err(error) => (false, error.to_string()),
    };
    report.check("verify `products`: KV matches the table", in_sync, detail);
}

/// What must be gone from KV or kept in it.
fn check_namespaces(stack: &Stack, report: &mut DemoReport) {
    let expected_settings = [
        "acct-demo-products",
        "acct-demo-products-v2",
        "demo-shop.myshopify.com",
    ];
    let settings_keys = stack.kv.keys(CF_ACCOUNT, SETTINGS_NS);
    report.check(
        "settings namespace holds exactly the live and the protected index",
        settings_keys == expected_settings,
        format!("{settings_keys:?}"),
    );
    let qcfg_keys = stack.kv.keys(CF_ACCOUNT, QCFG_NS);
    let overrides = qcfg_keys.iter().filter(|k| k.starts_with("qcfg-")).count();
    let filter = (stack.kv).json(CF_ACCOUNT, QCFG_NS, "qfilter-acct-demo-products");
    report.check(
        "query-config namespace holds the one override and the index's filter of it",
        overrides == 1 && qcfg_keys.len() == 2 && filter.is_some_and(|f| f["count"] == 1),
        format!("{qcfg_keys:?}"),
    );
}

/// The failed API-key call came back through `batchItemFailures`; no secret reached the log.
fn check_retries_and_log(stack: &Stack, options: &DemoOptions, report: &mut DemoReport) {
    let invocations = stack.progress.invocations.lock().unwrap().clone();
    report.invocations = invocations.len();
    report.retried_invocations = (invocations.iter())
        .filter(|i| i.retry_from.is_some())
        .count();
    let detail = format!(
        "{} invocations, {} resumed from a reported record",
        report.invocations, report.retried_invocations
    );
    let retried = report.retried_invocations >= 1;
    let what = "the failed API-key call was retried through batchItemFailures";
    report.check(what, retried, detail);
    let leaked = std::fs::read_to_string(&options.function_log)
        .map(|log| log.contains(API_KEY) || log.contains(TOKEN))
        .unwrap_or(true);
    let log = options.function_log.display().to_string();
    report.check("no API key or token in the function's log", !leaked, log);
}

/// The edge's own reading, when node and the Worker's runtime are here (`make edge`): a Worker
/// in workerd reads what KV holds through Cloudflare's API (`proxy/edge/check.mjs`), parses every
/// settings value, resolves the demo shop to its index and finds its override through the filter,
/// each compared with what the demo wrote.
async fn check_at_the_edge(stack: &Stack, report: &mut DemoReport) {
    let installed = std::path::Path::new("proxy/node_modules/miniflare").exists();
    if !installed {
        println!(
            "\n(The edge Worker is not installed: `make edge` with node and npm adds that check.)"
        );
        return;
    }
    let shop = "demo-shop.myshopify.com";
    let pinned = json!({"pinned": ["sku-trail-42", "sku-road-7"]});
    let check = json!({
        "cloudflare": {"base_url": stack.kv.base_url(), "token": TOKEN, "account": CF_ACCOUNT,
                       "namespaces": {"KV": SETTINGS_NS, "KV_QCFG": QCFG_NS}},
        "settings": {shop: {"index_id": "acct-demo-products", "marqo_api_key": API_KEY}},
        "overrides": [{"account": ACCOUNT, "index": "products", "query": "running shoes",
                       "config": pinned}],
        "searches": [{"shop": shop, "q": "running shoes", "index_id": "acct-demo-products",
                      "override": pinned}],
        "non_members": 1000,
    });
    let file = std::env::temp_dir().join(format!("demo-edge-{}.json", std::process::id()));
    let answer = match std::fs::write(&file, check.to_string()) {
        Err(e) => Err(e.to_string()),
        Ok(()) => tokio::process::Command::new("node")
            .args(["proxy/edge/check.mjs", &file.display().to_string()])
            .output()
            .await
            .map_err(|e| e.to_string())
            .and_then(|out| {
                serde_json::from_slice::<Value>(&out.stdout)
                    .map_err(|_| String::from_utf8_lossy(&out.stderr).into_owned())
            }),
    };
    let _ = std::fs::remove_file(&file);
    let (held, detail) =
        match answer {
            Ok(report) => {
                let clean = |field: &str| report[field] == json!([]);
                let held = [
                    "schema_errors",
                    "missing",
                    "mismatches",
                    "overrides_wrong",
                    "searches_wrong",
                ]
                .into_iter()
                .all(clean);
                let detail =
                    format!(
                "{} keys parsed; {shop} -> acct-demo-products, `running shoes` -> {pinned}{}",
                report["settings_read"],
                if held { String::new() } else { format!(": {report}") }
            );
                (held, detail)
            }
            Err(error) => (false, error),
        };
    let what = "the edge Worker (workerd) reads the shop's settings and finds its override";
    report.check(what, held, detail);
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
