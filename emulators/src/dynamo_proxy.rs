//! A DynamoDB stand-in in front of moto: every request is forwarded as it came (moto does the
//! work), after a latency it can set, and logged with its operation, tables, timing and
//! estimated capacity units. Chosen calls can be delayed, failed or held until released, so a
//! test forces a race or a slow ledger past the SDK's retries, and a bench measures what a
//! batch costs in DynamoDB requests and round trips. Like DynamoDB (and unlike moto), it refuses a
//! key over DynamoDB's size limits.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::Value;
use tokio::sync::watch;

use crate::ServerHandle;

/// One call the proxy answered.
#[derive(Debug, Clone)]
pub struct DynamoCall {
    /// `GetItem`, `TransactWriteItems`, ... (from `X-Amz-Target`).
    pub operation: String,
    /// The tables the request names.
    pub tables: Vec<String>,
    pub started: Instant,
    pub ended: Instant,
    pub status: u16,
    /// Estimated as DynamoDB charges: 4 KB a read unit (half for an eventually consistent
    /// read), 1 KB a write unit, each item's size taken as its JSON text's.
    pub read_units: f64,
    pub write_units: f64,
    /// The partition key (`pk`, a string) of each item the call writes.
    pub partitions_written: Vec<String>,
}

/// What to do to the next calls a [`Rule`] matches.
#[derive(Debug, Clone, PartialEq)]
pub enum DynamoFault {
    /// Wait this long, then forward.
    Delay(Duration),
    /// Answer this status with a DynamoDB error of this type (`ThrottlingException`, ...).
    Fail { status: u16, error_type: String },
    /// Wait until [`DynamoProxy::release`], then forward.
    Hold,
}

#[derive(Debug, Clone)]
struct Rule {
    operation: Option<String>,
    table: Option<String>,
    fault: DynamoFault,
    times: usize,
}

struct ProxyState {
    upstream: String,
    client: reqwest::Client,
    latency_micros: AtomicU64,
    calls: Mutex<Vec<DynamoCall>>,
    rules: Mutex<Vec<Rule>>,
    held: AtomicU64,
    releases: watch::Sender<u64>,
}

/// The proxy; stops when dropped. Point `AWS_ENDPOINT_URL` at [`DynamoProxy::endpoint`].
pub struct DynamoProxy {
    endpoint: String,
    state: Arc<ProxyState>,
    _server: ServerHandle,
}

impl DynamoProxy {
    /// Serves on a free loopback port, forwarding to `upstream` (moto's endpoint).
    pub async fn start(upstream: &str) -> std::io::Result<Self> {
        let state = Arc::new(ProxyState {
            upstream: upstream.trim_end_matches('/').to_owned(),
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .map_err(std::io::Error::other)?,
            latency_micros: AtomicU64::new(0),
            calls: Mutex::default(),
            rules: Mutex::default(),
            held: AtomicU64::new(0),
            releases: watch::channel(0).0,
        });
        let shared = state.clone();
        let router = Router::new().fallback(move |method, uri, headers, body| {
            forward(shared.clone(), method, uri, headers, body)
        });
        let (addr, server) = crate::serve(0, router).await?;
        Ok(Self {
            endpoint: format!("http://{addr}"),
            state,
            _server: server,
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Every call waits this long before it is forwarded (a network's round trip).
    pub fn set_latency(&self, latency: Duration) {
        let micros = latency.as_micros() as u64;
        self.state.latency_micros.store(micros, Ordering::Relaxed);
    }

    /// Applies `fault` to the next `times` calls of `operation` (any, when `None`) naming a
    /// table whose name holds `table` (any, when `None`), or, for `={name}`, the table of that
    /// exact name (the settings table's name is the start of its ledger's).
    pub fn inject(
        &self,
        operation: Option<&str>,
        table: Option<&str>,
        fault: DynamoFault,
        times: usize,
    ) {
        self.state.rules.lock().unwrap().push(Rule {
            operation: operation.map(str::to_owned),
            table: table.map(str::to_owned),
            fault,
            times,
        });
    }

    pub fn clear_faults(&self) {
        self.state.rules.lock().unwrap().clear();
    }

    /// How many calls wait on a hold now.
    pub fn held(&self) -> u64 {
        self.state.held.load(Ordering::SeqCst)
    }

    /// Lets every held call go on.
    pub fn release(&self) {
        self.state
            .releases
            .send_modify(|generation| *generation += 1);
    }

    /// Every call answered so far, in the order they ended.
    pub fn calls(&self) -> Vec<DynamoCall> {
        self.state.calls.lock().unwrap().clone()
    }
}

/// Whether a rule's `table` names the table `name`: `={name}` exactly, else a part of it.
fn names(name: &str, table: &str) -> bool {
    match table.strip_prefix('=') {
        Some(exact) => name == exact,
        None => name.contains(table),
    }
}

/// The longest chain of calls each of which started after the one before it ended: how many
/// round trips the caller waited for one after another.
pub fn round_trips_in_sequence(calls: &[DynamoCall]) -> usize {
    let mut sorted: Vec<&DynamoCall> = calls.iter().collect();
    sorted.sort_by_key(|c| c.started);
    let mut chain = vec![0usize; sorted.len()];
    for i in 0..sorted.len() {
        let before = (0..i)
            .filter(|&j| sorted[j].ended <= sorted[i].started)
            .map(|j| chain[j])
            .max()
            .unwrap_or(0);
        chain[i] = before + 1;
    }
    chain.into_iter().max().unwrap_or(0)
}

async fn forward(
    state: Arc<ProxyState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let started = Instant::now();
    let operation = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .and_then(|t| t.rsplit('.').next())
        .unwrap_or("")
        .to_owned();
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let tables = tables_of(&request);
    let latency = state.latency_micros.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_micros(latency)).await;
    let fault = match oversized_key(&request) {
        true => Some(DynamoFault::Fail {
            status: 400,
            error_type: "ValidationException".into(),
        }),
        false => next_fault(&state, &operation, &tables),
    };
    let answer = match fault {
        Some(DynamoFault::Fail { status, error_type }) => Err((status, error_type)),
        Some(DynamoFault::Delay(delay)) => {
            tokio::time::sleep(delay).await;
            Ok(())
        }
        Some(DynamoFault::Hold) => {
            wait_for_release(&state).await;
            Ok(())
        }
        None => Ok(()),
    };
    let (status, response_headers, response_body) = match answer {
        Ok(()) => upstream(&state, method, &uri, headers, body).await,
        Err((status, error_type)) => failure(status, &error_type),
    };
    let (read_units, write_units) = units(&operation, &request, &response_body);
    let partitions_written = partitions_written(&operation, &request);
    state.calls.lock().unwrap().push(DynamoCall {
        operation,
        tables,
        started,
        ended: Instant::now(),
        status: status.as_u16(),
        read_units,
        write_units,
        partitions_written,
    });
    (status, response_headers, response_body).into_response()
}

fn next_fault(state: &ProxyState, operation: &str, tables: &[String]) -> Option<DynamoFault> {
    let mut rules = state.rules.lock().unwrap();
    let matches = |rule: &Rule| {
        rule.operation.as_deref().is_none_or(|o| o == operation)
            && rule
                .table
                .as_deref()
                .is_none_or(|t| tables.iter().any(|name| names(name, t)))
    };
    let at = rules.iter().position(matches)?;
    let fault = rules[at].fault.clone();
    rules[at].times -= 1;
    if rules[at].times == 0 {
        rules.remove(at);
    }
    Some(fault)
}

async fn wait_for_release(state: &ProxyState) {
    let mut releases = state.releases.subscribe();
    state.held.fetch_add(1, Ordering::SeqCst);
    let _ = releases.changed().await;
    state.held.fetch_sub(1, Ordering::SeqCst);
}

async fn upstream(
    state: &ProxyState,
    method: Method,
    uri: &Uri,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, HeaderMap, Bytes) {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut forwarded = headers;
    forwarded.remove("host");
    let sent = state
        .client
        .request(method, format!("{}{path}", state.upstream))
        .headers(forwarded)
        .body(body)
        .send()
        .await;
    let Ok(response) = sent else {
        return failure(500, "InternalServerError");
    };
    let status = response.status();
    let mut headers = response.headers().clone();
    // Hop-by-hop headers are the upstream connection's, not the function's: moto's
    // `Connection: close` passed on would make the function connect again for every call,
    // which DynamoDB never asks of it.
    for hop in [
        "connection",
        "keep-alive",
        "content-length",
        "transfer-encoding",
    ] {
        headers.remove(hop);
    }
    let body = response.bytes().await.unwrap_or_default();
    (status, headers, body)
}

fn failure(status: u16, error_type: &str) -> (StatusCode, HeaderMap, Bytes) {
    let mut headers = HeaderMap::new();
    headers.insert(
        "content-type",
        "application/x-amz-json-1.0".parse().expect("valid"),
    );
    let body = serde_json::json!({
        "__type": format!("com.amazonaws.dynamodb.v20120810#{error_type}"),
        "message": "injected by the DynamoDB proxy",
    });
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, headers, Bytes::from(body.to_string()))
}

/// Whether the request names a key DynamoDB refuses: a partition key (`pk`) over 2,048 bytes or
/// a sort key (`sk`) over 1,024 (moto does not check), in a key, an item, a batch's keys and
/// items, or a Query's `:pk`.
fn oversized_key(request: &Value) -> bool {
    let too_long = |key: &Value| {
        let length = |name: &str| key[name]["S"].as_str().map_or(0, str::len);
        length("pk") > 2048 || length("sk") > 1024
    };
    let batch = request["RequestItems"]
        .as_object()
        .into_iter()
        .flat_map(|t| t.values());
    let batch_keys = batch.flat_map(|table| {
        let gets = table["Keys"].as_array().into_iter().flatten();
        let writes = table
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|r| [&r["PutRequest"]["Item"], &r["DeleteRequest"]["Key"]]);
        gets.chain(writes)
    });
    let query_pk = request["ExpressionAttributeValues"][":pk"]["S"].as_str();
    let transact_keys = transact_actions(request).map(|(_, key)| key);
    [&request["Key"], &request["Item"]]
        .into_iter()
        .chain(batch_keys)
        .chain(transact_keys)
        .any(too_long)
        || query_pk.is_some_and(|pk| pk.len() > 2048)
}

/// Each action of a TransactWriteItems: what it writes (a Put's item, another's key), and
/// whether it is a Put.
fn transact_actions(request: &Value) -> impl Iterator<Item = (bool, &Value)> {
    let items = request["TransactItems"].as_array().into_iter().flatten();
    let actions = items.filter_map(|item| item.as_object()?.iter().next());
    actions.map(|(kind, action)| match kind.as_str() {
        "Put" => (true, &action["Item"]),
        _ => (false, &action["Key"]),
    })
}

fn tables_of(request: &Value) -> Vec<String> {
    if let Some(name) = request["TableName"].as_str() {
        return vec![name.to_owned()];
    }
    if let Some(items) = request["RequestItems"].as_object() {
        return items.keys().cloned().collect();
    }
    let transact = request["TransactItems"].as_array().into_iter().flatten();
    let mut names: Vec<String> = transact
        .filter_map(|item| item.as_object()?.values().next()?["TableName"].as_str())
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    names
}

fn partitions_written(operation: &str, request: &Value) -> Vec<String> {
    let pk = |item: &Value| item["pk"]["S"].as_str().map(str::to_owned);
    match operation {
        "PutItem" => pk(&request["Item"]).into_iter().collect(),
        "UpdateItem" | "DeleteItem" => pk(&request["Key"]).into_iter().collect(),
        "BatchWriteItem" => {
            let requests = request["RequestItems"].as_object().into_iter();
            let each = requests.flat_map(|t| t.values()).flat_map(|r| r.as_array());
            let items = each.flatten().map(|r| match r.get("PutRequest") {
                Some(put) => &put["Item"],
                None => &r["DeleteRequest"]["Key"],
            });
            items.filter_map(pk).collect()
        }
        "TransactWriteItems" => transact_actions(request)
            .filter_map(|(_, item)| pk(item))
            .collect(),
        _ => Vec::new(),
    }
}

/// Read and write units as DynamoDB would charge them, from the items' sizes.
fn units(operation: &str, request: &Value, response: &[u8]) -> (f64, f64) {
    let size = |item: &Value| item.to_string().len() as f64;
    let writes = |bytes: f64| (bytes / 1024.0).ceil().max(1.0);
    let reads = |bytes: f64, consistent: bool| {
        (bytes / 4096.0).ceil().max(1.0) * if consistent { 1.0 } else { 0.5 }
    };
    let consistent = request["ConsistentRead"].as_bool() == Some(true);
    let answer: Value = serde_json::from_slice(response).unwrap_or(Value::Null);
    match operation {
        "PutItem" => (0.0, writes(size(&request["Item"]))),
        "UpdateItem" | "DeleteItem" => (0.0, writes(size(&request["Key"]))),
        "BatchWriteItem" => {
            let requests = request["RequestItems"].as_object().into_iter();
            let each = requests.flat_map(|t| t.values()).flat_map(|r| r.as_array());
            let units = each.flatten().map(|r| match r.get("PutRequest") {
                Some(put) => writes(size(&put["Item"])),
                None => 1.0,
            });
            (0.0, units.sum())
        }
        // A transaction's write costs twice a plain one's.
        "TransactWriteItems" => {
            let units = transact_actions(request).map(|(_, item)| 2.0 * writes(size(item)));
            (0.0, units.sum())
        }
        "GetItem" => (reads(size(&answer["Item"]), consistent), 0.0),
        "BatchGetItem" => {
            let consistent = |table: &str| {
                request["RequestItems"][table]["ConsistentRead"].as_bool() == Some(true)
            };
            let responses = answer["Responses"].as_object().into_iter().flatten();
            let units = responses.flat_map(|(table, items)| {
                let items = items.as_array().into_iter().flatten();
                items.map(move |item| reads(size(item), consistent(table)))
            });
            (units.sum(), 0.0)
        }
        "Query" | "Scan" => {
            let items = answer["Items"].as_array().into_iter().flatten();
            (reads(items.map(size).sum(), consistent), 0.0)
        }
        _ => (0.0, 0.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(started_ms: u64, ended_ms: u64, origin: Instant) -> DynamoCall {
        DynamoCall {
            operation: "GetItem".into(),
            tables: vec![],
            started: origin + Duration::from_millis(started_ms),
            ended: origin + Duration::from_millis(ended_ms),
            status: 200,
            read_units: 0.0,
            write_units: 0.0,
            partitions_written: vec![],
        }
    }

    #[test]
    fn calls_in_flight_together_count_as_one_round_trip() {
        let o = Instant::now();
        let together = [call(0, 10, o), call(1, 11, o), call(2, 9, o)];
        assert_eq!(round_trips_in_sequence(&together), 1);
        let chained = [
            call(0, 10, o),
            call(10, 20, o),
            call(5, 8, o),
            call(21, 30, o),
        ];
        assert_eq!(round_trips_in_sequence(&chained), 3);
        assert_eq!(round_trips_in_sequence(&[]), 0);
    }

    #[test]
    fn units_follow_item_sizes_and_consistency() {
        let put = serde_json::json!({"TableName": "t", "Item": {"pk": {"S": "x".repeat(1500)}}});
        assert_eq!(units("PutItem", &put, b""), (0.0, 2.0));
        let query = serde_json::json!({"TableName": "t", "ConsistentRead": false});
        let answer = br#"{"Items": [{"pk": {"S": "a"}}, {"pk": {"S": "b"}}]}"#;
        assert_eq!(units("Query", &query, answer), (0.5, 0.0));
        let batch = serde_json::json!({"RequestItems": {"t": [
            {"PutRequest": {"Item": {"pk": {"S": "a"}}}}, {"DeleteRequest": {"Key": {}}}]}});
        assert_eq!(units("BatchWriteItem", &batch, b""), (0.0, 2.0));
        assert_eq!(tables_of(&batch), vec!["t".to_string()]);
        assert_eq!(
            partitions_written("BatchWriteItem", &batch),
            vec!["a".to_string()]
        );
        let transaction = serde_json::json!({"TransactItems": [
            {"Put": {"TableName": "t", "Item": {"pk": {"S": "a"}, "v": {"S": "x".repeat(1500)}}}},
            {"Update": {"TableName": "t", "Key": {"pk": {"S": "b"}}}}]});
        assert_eq!(units("TransactWriteItems", &transaction, b""), (0.0, 6.0));
        assert_eq!(
            partitions_written("TransactWriteItems", &transaction),
            vec!["a".to_string(), "b".to_string()]
        );
        assert_eq!(tables_of(&transaction), vec!["t".to_string()]);
    }

    #[test]
    fn keys_dynamodb_refuses_are_refused() {
        let long = "x".repeat(2049);
        let get = serde_json::json!({"RequestItems": {"t": {"Keys": [{"pk": {"S": long}}]}}});
        assert!(oversized_key(&get));
        let put = serde_json::json!({"Item": {"pk": {"S": "a"}, "sk": {"S": "y".repeat(1025)}}});
        assert!(oversized_key(&put));
        let pk = "x".repeat(2049);
        let query = serde_json::json!({"ExpressionAttributeValues": {":pk": {"S": pk}}});
        assert!(oversized_key(&query));
        let update = serde_json::json!({"TransactItems": [{"Update": {"Key": {"pk": {"S": pk}}}}]});
        assert!(oversized_key(&update));
        let fine = serde_json::json!({"Key": {"pk": {"S": "x".repeat(2048)}, "sk": {"S": "s"}}});
        assert!(!oversized_key(&fine));
    }
}
