//! A DynamoDB stand-in in front of moto: every request is forwarded as it came (moto does the
//! work), after a latency it can set, and logged with its operation, tables, timing and
//! estimated capacity units. Chosen calls can be delayed, failed or held until released, so a
//! test forces a race or a slow ledger past the SDK's retries, and a bench measures what a
//! batch costs in DynamoDB requests and round trips. Like DynamoDB (and unlike moto), it refuses a
//! key over DynamoDB's size limits.
//!
//! For a bench it can also record every answer moto gave ([`DynamoProxy::record`]) and later
//! answer a second run of the same function from that recording alone
//! ([`DynamoProxy::replay`]): the same request (operation and body) gets moto's answer, after the
//! set latency and nothing else, so the second run's wall time is the function's and not moto's.
//! A request the recording lacks is answered 500 and counted ([`DynamoProxy::misses`]).

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

mod accounting;
mod recording;

use accounting::{oversized_key, partitions_written, tables_of, units};
pub use recording::Recording;

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
    /// Cancel a transaction as DynamoDB does: a `TransactionCanceledException` whose first
    /// action's reason is this code (`TransactionConflict`, ...), every other's `None`.
    Cancel(String),
}

#[derive(Debug, Clone)]
struct Rule {
    operation: Option<String>,
    table: Option<String>,
    fault: DynamoFault,
    times: usize,
}

#[derive(Default)]
enum Mode {
    #[default]
    Forward,
    Record(Recording),
    Replay(Recording),
}

struct ProxyState {
    mode: Mutex<Mode>,
    misses: AtomicU64,
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
            mode: Mutex::default(),
            misses: AtomicU64::new(0),
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

    /// From now on every answer moto gives is kept, by request.
    pub fn record(&self) {
        *self.state.mode.lock().unwrap() = Mode::Record(Recording::default());
    }

    /// Answers from now on come from `recording` alone (another proxy's [`Self::recorded`]).
    pub fn replay(&self, recording: Recording) {
        *self.state.mode.lock().unwrap() = Mode::Replay(recording);
    }

    /// A copy of what was recorded so far (recording goes on).
    pub fn recorded(&self) -> Recording {
        match &*self.state.mode.lock().unwrap() {
            Mode::Record(recording) => recording.clone(),
            Mode::Replay(_) | Mode::Forward => Recording::default(),
        }
    }

    /// Requests a replay could not answer from its recording.
    pub fn misses(&self) -> u64 {
        self.state.misses.load(Ordering::SeqCst)
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
        Some(DynamoFault::Fail { status, error_type }) => Err(failure(status, &error_type, None)),
        Some(DynamoFault::Cancel(code)) => {
            let actions = request["TransactItems"].as_array().map_or(1, Vec::len);
            let mut reasons = vec![serde_json::json!({"Code": "None"}); actions.max(1)];
            reasons[0] = serde_json::json!({"Code": code, "Message": "injected"});
            let cancelled = "TransactionCanceledException";
            Err(failure(400, cancelled, Some(reasons)))
        }
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
        Ok(()) => answer_of(&state, &operation, method, &uri, headers, body).await,
        Err(failed) => failed,
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

/// Moto's answer: forwarded (and kept, when recording), or taken from the recording.
async fn answer_of(
    state: &ProxyState,
    operation: &str,
    method: Method,
    uri: &Uri,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, HeaderMap, Bytes) {
    if let Mode::Replay(recording) = &mut *state.mode.lock().unwrap() {
        return recording.answer(operation, &body).unwrap_or_else(|| {
            state.misses.fetch_add(1, Ordering::SeqCst);
            failure(500, "NotInTheRecording", None)
        });
    }
    let answer = upstream(state, method, uri, headers, body.clone()).await;
    if let Mode::Record(recording) = &mut *state.mode.lock().unwrap() {
        recording.keep(operation, body, &answer);
    }
    answer
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
        return failure(500, "InternalServerError", None);
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

fn failure(
    status: u16,
    error_type: &str,
    reasons: Option<Vec<Value>>,
) -> (StatusCode, HeaderMap, Bytes) {
    let mut headers = HeaderMap::new();
    headers.insert(
        "content-type",
        "application/x-amz-json-1.0".parse().expect("valid"),
    );
    let mut body = serde_json::json!({
        "__type": format!("com.amazonaws.dynamodb.v20120810#{error_type}"),
        "message": "injected by the DynamoDB proxy",
    });
    if let Some(reasons) = reasons {
        body["CancellationReasons"] = Value::Array(reasons);
    }
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, headers, Bytes::from(body.to_string()))
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
