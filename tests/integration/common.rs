//! What every integration test stands on: its own table (with a stream) and secret in the moto
//! server that `make test` starts, its own KV emulator and API-keys stand-in, and the exporter
//! wired to them through its real adapters.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_dynamodb::types::StreamViewType;
use ecom_emulators::api_keys::ApiKeysStandIn;
use ecom_emulators::kv::KvEmulator;
use ecom_emulators::runtime_api::RuntimeApi;
use ecom_emulators::streams::StreamReader;
use ecom_settings_exporter::adapters::cloudflare::RetryPolicy;
use ecom_settings_exporter::config::Config;
use ecom_settings_exporter::{build_exporter, LambdaExporter};
use serde_json::{json, Value};

pub const CF_ACCOUNT: &str = "cf-account";
pub const SETTINGS_NS: &str = "ns-settings";
pub const QCFG_NS: &str = "ns-qcfg";
pub const TOKEN: &str = "cf-token-1";
pub const REGION: &str = "eu-west-1";

/// Tests that time invocations against short deadlines, and the few that load both cores for
/// a minute, take this in turn: on a 2-core machine the one starves the other's deadlines.
pub async fn heavy_or_timed() -> tokio::sync::MutexGuard<'static, ()> {
    static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    TURN.lock().await
}

/// Fast enough for tests, and still exercising every retry.
pub fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        max_retries: 3,
        base_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(200),
        request_timeout: Duration::from_secs(2),
    }
}

fn unique(prefix: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

pub fn moto_endpoint() -> String {
    std::env::var("AWS_ENDPOINT_URL")
        .expect("AWS_ENDPOINT_URL must point at a moto server: run the tests with `make test`")
}

pub async fn aws() -> aws_config::SdkConfig {
    moto_endpoint();
    aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await
}

/// The SDK's configuration as the function builds it (its app name in the user agent): calls
/// made with it through the function's adapters are checked against the role like its own.
pub async fn function_aws() -> aws_config::SdkConfig {
    moto_endpoint();
    let app = aws_config::AppName::new("ecom-settings-exporter").expect("a valid app name");
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest()).app_name(app);
    config.load().await
}

pub struct Harness {
    pub table: String,
    /// The function's own ledger table.
    pub ledger: String,
    /// The table's stream: the function exports records of this source only.
    pub stream_arn: String,
    pub secret_id: String,
    pub ddb: aws_sdk_dynamodb::Client,
    pub secrets: aws_sdk_secretsmanager::Client,
    pub kv: KvEmulator,
    pub keys: ApiKeysStandIn,
    pub config: Config,
    pub exporter: LambdaExporter,
    stream: StreamReader,
}

impl Harness {
    pub async fn new() -> Self {
        Self::with_view(StreamViewType::NewAndOldImages).await
    }

    /// A new table on `view`, migrated as the procedure does before the stream runs (an empty
    /// table: the backfill marks the ledger's references complete).
    pub async fn with_view(view: StreamViewType) -> Self {
        let h = Self::before_migration(view).await;
        h.migrate().await;
        h
    }

    /// A new table on `view` whose ledger's references are not complete yet.
    pub async fn before_migration(view: StreamViewType) -> Self {
        let aws = aws().await;
        let ddb = aws_sdk_dynamodb::Client::new(&aws);
        let secrets = aws_sdk_secretsmanager::Client::new(&aws);
        let table = unique("settings");
        let stream_arn = ecom_emulators::streams::create_settings_table(&ddb, &table, view)
            .await
            .expect("create table in moto");
        let ledger = format!("{table}-ledger");
        ecom_emulators::streams::create_ledger_table(&ddb, &ledger)
            .await
            .expect("create the ledger table in moto");
        let stream = StreamReader::open(
            aws_sdk_dynamodbstreams::Client::new(&aws),
            &stream_arn,
            REGION,
        )
        .await
        .expect("open the stream");

        let secret_id = unique("dev/CloudFlareApiToken");
        secrets
            .create_secret()
            .name(&secret_id)
            .secret_string(TOKEN)
            .send()
            .await
            .expect("create secret in moto");

        let kv = KvEmulator::start(0, &[TOKEN]).await.unwrap();
        kv.create_namespace(SETTINGS_NS);
        kv.create_namespace(QCFG_NS);
        let keys = ApiKeysStandIn::start(0).await.unwrap();
        let env = HashMap::from([
            ("SETTINGS_TABLE_NAME", table.clone()),
            ("CLOUDFLARE_ACCOUNT_ID", CF_ACCOUNT.to_string()),
            ("CLOUDFLARE_KV_NAMESPACE_ID", SETTINGS_NS.to_string()),
            ("CLOUDFLARE_QCFG_NAMESPACE_ID", QCFG_NS.to_string()),
            ("CLOUDFLARE_API_TOKEN_SECRET_ID", secret_id.clone()),
            ("CLOUDFLARE_API_BASE_URL", kv.base_url()),
            ("API_KEYS_SERVICE_URL", keys.url_template()),
            ("SETTINGS_TABLE_STREAM_ARN", stream_arn.clone()),
            ("LEDGER_TABLE_NAME", ledger.clone()),
        ]);
        let config = Config::from_lookup(|name| env.get(name).cloned()).unwrap();
        let exporter = build_exporter(&config, fast_retry()).await;
        Self {
            table,
            ledger,
            stream_arn,
            secret_id,
            ddb,
            secrets,
            kv,
            keys,
            config,
            exporter,
            stream,
        }
    }

    /// Rebuilds the exporter with one setting changed.
    pub async fn reconfigure(&mut self, name: &str, value: &str) {
        let mut env: HashMap<String, String> = self
            .lambda_env()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        env.insert(name.into(), value.into());
        self.config = Config::from_lookup(|name| env.get(name).cloned()).unwrap();
        self.exporter = build_exporter(&self.config, fast_retry()).await;
    }

    /// The environment the Lambda binary needs to talk to this harness.
    pub fn lambda_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("SETTINGS_TABLE_NAME", self.table.clone()),
            ("CLOUDFLARE_ACCOUNT_ID", CF_ACCOUNT.into()),
            ("CLOUDFLARE_KV_NAMESPACE_ID", SETTINGS_NS.into()),
            ("CLOUDFLARE_QCFG_NAMESPACE_ID", QCFG_NS.into()),
            ("CLOUDFLARE_API_TOKEN_SECRET_ID", self.secret_id.clone()),
            ("CLOUDFLARE_API_BASE_URL", self.kv.base_url()),
            ("API_KEYS_SERVICE_URL", self.keys.url_template()),
            ("SETTINGS_TABLE_STREAM_ARN", self.stream_arn.clone()),
            ("LEDGER_TABLE_NAME", self.ledger.clone()),
        ]
    }

    /// Writes an item given in DynamoDB JSON.
    pub async fn put(&self, item: Value) {
        let item: HashMap<String, aws_sdk_dynamodb::types::AttributeValue> =
            serde_dynamo::Item::from(
                serde_json::from_value::<HashMap<String, serde_dynamo::AttributeValue>>(item)
                    .unwrap(),
            )
            .into();
        self.ddb
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .send()
            .await
            .expect("put item");
    }

    /// The table as a batch of stream records leaves it (each item's last record: its new
    /// image, or none after a REMOVE), for records made without a table behind them: the
    /// function exports an item as the table holds it. BatchWriteItems, so 10,000 take seconds;
    /// they go to the table's stream too.
    pub async fn seed_table(&self, records: &[Value]) {
        use aws_sdk_dynamodb::types::{DeleteRequest, PutRequest, WriteRequest};
        use futures::StreamExt as _;
        let mut last: BTreeMap<(String, String), Option<Value>> = BTreeMap::new();
        for record in records {
            let change = &record["dynamodb"];
            let key = |name: &str| change["Keys"][name]["S"].as_str().map(str::to_owned);
            let (Some(pk), Some(sk)) = (key("pk"), key("sk")) else {
                continue;
            };
            let image = match record["eventName"].as_str() {
                Some("INSERT" | "MODIFY") => Some(change["NewImage"].clone()),
                _ => None,
            };
            last.insert((pk, sk), image);
        }
        let attributes = |item: Value| -> HashMap<String, aws_sdk_dynamodb::types::AttributeValue> {
            let item: HashMap<String, serde_dynamo::AttributeValue> =
                serde_json::from_value(item).unwrap();
            serde_dynamo::Item::from(item).into()
        };
        let requests: Vec<WriteRequest> = (last.into_iter())
            .map(|((pk, sk), image)| match image {
                Some(image) => WriteRequest::builder()
                    .put_request(
                        PutRequest::builder()
                            .set_item(Some(attributes(image)))
                            .build()
                            .unwrap(),
                    )
                    .build(),
                None => {
                    let key = attributes(json!({"pk": {"S": pk}, "sk": {"S": sk}}));
                    WriteRequest::builder()
                        .delete_request(
                            DeleteRequest::builder().set_key(Some(key)).build().unwrap(),
                        )
                        .build()
                }
            })
            .collect();
        let chunks: Vec<Vec<WriteRequest>> = requests.chunks(25).map(<[_]>::to_vec).collect();
        futures::stream::iter(chunks)
            .map(|chunk| async move {
                let written = self
                    .ddb
                    .batch_write_item()
                    .request_items(&self.table, chunk);
                let answer = written.send().await.expect("seed the table");
                assert!(answer.unprocessed_items.unwrap_or_default().is_empty());
            })
            .buffer_unordered(8)
            .collect::<Vec<()>>()
            .await;
    }

    pub async fn delete(&self, pk: &str, sk: &str) {
        use aws_sdk_dynamodb::types::AttributeValue::S;
        self.ddb
            .delete_item()
            .table_name(&self.table)
            .key("pk", S(pk.into()))
            .key("sk", S(sk.into()))
            .send()
            .await
            .expect("delete item");
    }

    /// The stream records written since the last call, in Lambda's event format.
    pub async fn stream_records(&mut self) -> Vec<Value> {
        self.stream.read().await.expect("read the stream")
    }

    /// Runs the stream path on everything the stream holds, like one Lambda invocation.
    pub async fn export_stream(&mut self) -> Value {
        let records = self.stream_records().await;
        assert!(!records.is_empty(), "the stream has new records");
        self.invoke(json!({ "Records": records })).await
    }

    /// The migration's backfill (docs/operations.md): one full backfill, completed.
    pub async fn migrate(&self) {
        let migrated = self.invoke(json!({"mode": "backfill"})).await;
        assert_eq!(migrated["complete"], true, "{migrated}");
    }

    pub async fn invoke(&self, payload: Value) -> Value {
        self.try_invoke(payload, Duration::from_secs(60))
            .await
            .expect("the invocation succeeds")
    }

    /// `timeout` is how long retries may go on, as the invocation deadline less its margin.
    /// Stream records that name no source get the table's stream, as Lambda stamps each one.
    pub async fn try_invoke(&self, mut payload: Value, timeout: Duration) -> Result<Value, String> {
        if let Some(records) = payload.get_mut("Records").and_then(Value::as_array_mut) {
            for record in records.iter_mut().filter_map(Value::as_object_mut) {
                let arn = Value::from(self.stream_arn.clone());
                record.entry("eventSourceARN").or_insert(arn);
            }
        }
        self.invoke_as_sent(payload, timeout).await
    }

    /// Invokes with the payload exactly as given.
    pub async fn invoke_as_sent(&self, payload: Value, timeout: Duration) -> Result<Value, String> {
        let deadline = tokio::time::Instant::now() + timeout;
        // As the runtime hands it over: the payload's JSON text.
        let payload = serde_json::to_vec(&payload).expect("JSON");
        ecom_settings_exporter::entry::route(&self.exporter, payload, deadline)
            .await
            .map_err(|e| e.to_string())
    }

    pub fn settings(&self, key: &str) -> Option<Value> {
        self.kv.json(CF_ACCOUNT, SETTINGS_NS, key)
    }

    pub fn query_config(&self, key: &str) -> Option<Value> {
        self.kv.json(CF_ACCOUNT, QCFG_NS, key)
    }

    /// The number of pairs in each bulk write the KV emulator answered.
    pub fn bulk_write_sizes(&self) -> Vec<usize> {
        self.kv
            .requests()
            .iter()
            .filter(|r| r.operation == "bulk")
            .map(|r| r.items)
            .collect()
    }

    /// Data requests the KV emulator answered, by operation.
    pub fn kv_calls(&self, operation: &str) -> usize {
        self.kv
            .requests()
            .iter()
            .filter(|r| r.operation == operation)
            .count()
    }
}

/// An index-settings item in DynamoDB JSON.
pub fn index_item(account: &str, index: &str, shop: Option<&str>) -> Value {
    let mut item = json!({
        "pk": {"S": account},
        "sk": {"S": format!("INDEX#{index}")},
        "index_endpoint": {"S": format!("https://{account}-{index}.idx.example")},
    });
    if let Some(shop) = shop {
        item["shop_id"] = json!({"S": shop});
    }
    item
}

/// An index whose enabled read alias reads `target`.
pub fn aliasing(account: &str, index: &str, target: &str) -> Value {
    let mut item = index_item(account, index, None);
    item["index_aliases"] = json!({"M": {"doc_reads": {"M": {"enabled": {"BOOL": true},
        "targets": {"L": [{"M": {"index_id": {"S": target}, "weight": {"N": "1"}}}]}}}}});
    item
}

/// The override keys (`qcfg-...`) in the query-config namespace, filters left out.
pub fn override_keys(h: &Harness) -> Vec<String> {
    h.kv.keys(CF_ACCOUNT, QCFG_NS)
        .into_iter()
        .filter(|k| k.starts_with("qcfg-"))
        .collect()
}

/// An index's override filter as KV holds it.
pub fn filter_of(h: &Harness, account: &str, index: &str) -> Option<Value> {
    h.query_config(&format!("qfilter-{account}-{index}"))
}

/// A query-config override item in DynamoDB JSON.
pub fn query_item(account: &str, index: &str, query: &str) -> Value {
    json!({"pk": {"S": account}, "sk": {"S": format!("INDEX#{index}#QUERY#{query}")},
           "query_config": {"M": {"boost": {"N": "2"}}}})
}

/// The KV key of an override, computed here independently of the function.
pub fn qcfg_key(account: &str, index: &str, query: &str) -> String {
    use sha2::{Digest, Sha256};
    let hash: String = Sha256::digest(query.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("qcfg-{account}-{index}-{hash}")
}

/// `{"batchItemFailures": [...]}` as a list of sequence numbers.
pub fn failures(response: &Value) -> Vec<String> {
    response["batchItemFailures"]
        .as_array()
        .expect("a partial batch response")
        .iter()
        .map(|f| f["itemIdentifier"].as_str().unwrap().to_owned())
        .collect()
}

pub fn sequence_numbers(records: &[Value]) -> Vec<String> {
    records
        .iter()
        .map(|r| r["dynamodb"]["SequenceNumber"].as_str().unwrap().to_owned())
        .collect()
}

thread_local! {
    /// This thread's log output: each test runs on its own thread (current-thread runtime).
    static THREAD_LOGS: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Log lines written by the current test. One global subscriber routes every line to the
/// writing thread's buffer: thread-local subscribers can miss events when parallel tests race
/// on `tracing`'s callsite cache.
pub struct Logs;

impl Logs {
    /// Starts capturing (again) for this test's thread.
    pub fn capture() -> Self {
        static INSTALL: std::sync::Once = std::sync::Once::new();
        INSTALL.call_once(|| {
            let subscriber = tracing_subscriber::fmt()
                .with_writer(|| ThreadWriter)
                .with_ansi(false)
                .with_max_level(tracing::Level::DEBUG)
                .finish();
            tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
        });
        THREAD_LOGS.with(|logs| logs.borrow_mut().clear());
        Logs
    }

    pub fn lines(&self) -> Vec<String> {
        THREAD_LOGS.with(|logs| {
            String::from_utf8_lossy(&logs.borrow())
                .lines()
                .map(str::to_owned)
                .collect()
        })
    }

    pub fn matching(&self, needle: &str) -> Vec<String> {
        self.lines()
            .into_iter()
            .filter(|l| l.contains(needle))
            .collect()
    }
}

struct ThreadWriter;

impl std::io::Write for ThreadWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        THREAD_LOGS.with(|logs| logs.borrow_mut().extend_from_slice(buf));
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The bootstrap process; killed when dropped. Its stdout (the logs) is collected.
pub struct Function {
    child: Child,
    output: Arc<Mutex<String>>,
}

impl Function {
    pub fn start(runtime: &RuntimeApi, env: &[(&'static str, String)]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ecom-settings-exporter"));
        command
            .env("AWS_LAMBDA_RUNTIME_API", runtime.endpoint())
            .env("AWS_LAMBDA_FUNCTION_NAME", "ecom-settings-exporter")
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            .env(
                "AWS_LAMBDA_LOG_GROUP_NAME",
                "/aws/lambda/ecom-settings-exporter",
            )
            .env("AWS_LAMBDA_LOG_STREAM_NAME", "local")
            .env("AWS_LAMBDA_LOG_FORMAT", "JSON")
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().expect("start the bootstrap binary");
        let output = Arc::new(Mutex::new(String::new()));
        for mut stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let output = output.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    output
                        .lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        Self { child, output }
    }

    /// The JSON log lines written so far.
    pub fn log_lines(&self) -> Vec<Value> {
        self.output
            .lock()
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// The output once it holds `needle` (the answer can arrive before the log is read).
    pub async fn wait_for(&self, needle: &str) -> String {
        for _ in 0..100 {
            let output = self.output();
            if output.contains(needle) {
                return output;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no `{needle}` in the function's output: {}", self.output())
    }
}

impl Drop for Function {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP forwarder that can be switched off (connections are dropped at once) and on again:
/// a peer that is unreachable for a while.
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    up: Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    pub async fn start(target: String, up: bool) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(std::sync::atomic::AtomicBool::new(up));
        let flag = state.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !flag.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let target = target.clone();
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Self { addr, up: state }
    }

    /// A proxy in front of the moto server.
    pub async fn to_moto(up: bool) -> Self {
        let endpoint = moto_endpoint();
        Self::start(endpoint.trim_start_matches("http://").to_string(), up).await
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
    }
}

/// The real binary behind a runtime API, its DynamoDB calls through the project's DynamoDB proxy
/// (which slows, fails or holds chosen calls, and refuses keys DynamoDB refuses).
pub struct ProxiedFunction {
    pub dynamodb: ecom_emulators::dynamo_proxy::DynamoProxy,
    pub runtime: RuntimeApi,
    pub function: Function,
}

pub async fn behind_a_dynamodb_proxy(h: &Harness) -> ProxiedFunction {
    let dynamodb = ecom_emulators::dynamo_proxy::DynamoProxy::start(&moto_endpoint())
        .await
        .unwrap();
    let runtime = RuntimeApi::start(0).await.unwrap();
    let mut env = h.lambda_env();
    env.push(("AWS_ENDPOINT_URL_DYNAMODB", dynamodb.endpoint().to_owned()));
    let function = Function::start(&runtime, &env);
    ProxiedFunction {
        dynamodb,
        runtime,
        function,
    }
}

/// A test that forces a race or a fault on the stream, run once on each stream view type
/// (docs/contract.md, "Concurrent writers"): the body gets `$view` to build its harness with,
/// and runs as `$name::new_image` and `$name::new_and_old_images`.
#[macro_export]
macro_rules! on_both_views {
    ($(#[$attr:meta])* async fn $name:ident($view:ident) $body:block) => {
        $(#[$attr])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            async fn run($view: aws_sdk_dynamodb::types::StreamViewType) $body

            #[tokio::test]
            async fn new_image() {
                run(aws_sdk_dynamodb::types::StreamViewType::NewImage).await
            }

            #[tokio::test]
            async fn new_and_old_images() {
                run(aws_sdk_dynamodb::types::StreamViewType::NewAndOldImages).await
            }
        }
    };
}
