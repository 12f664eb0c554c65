//! A Cloudflare Workers KV emulator that is strict about what Cloudflare documents: bearer
//! auth, the bulk limits (10,000 items, under 100 MB), key rules (at most 512 bytes, not `.` or
//! `..`), the 25 MiB value limit and the `{success, errors, messages, result}` envelope.
//! Faults can be injected for the next requests: a status, a delay, or a 200 that reports
//! `unsuccessful_keys`.
//!
//! Routes, under `/client/v4/accounts/{account}/storage/kv/namespaces/{namespace}` (only
//! namespaces created with [`KvEmulator::create_namespace`] exist; others answer 404):
//! `PUT /bulk`, `POST /bulk/delete`, `POST /bulk/get`, `GET /values/{key}` (raw bytes,
//! `application/octet-stream`), `GET /metadata/{key}`, `GET /keys` (opaque cursors, only the
//! ones it handed out taken back). `expiration` / `expiration_ttl` are checked (60 s at least)
//! and honoured. The schema's other endpoints answer 501 in the envelope. Control routes for
//! manual experiments: `POST /__emulator/faults` (a `hold` kind stops matching requests until
//! `POST /__emulator/release`), `GET /__emulator/requests`,
//! `GET /__emulator/namespaces`.

use base64::Engine as _;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub const MAX_BULK_ITEMS: usize = 10_000;
pub const MAX_BODY_BYTES: usize = 100_000_000;
pub const MAX_KEY_BYTES: usize = 512;
pub const MAX_VALUE_BYTES: usize = 25 * 1024 * 1024;

/// Error codes the emulator answers with (Cloudflare's where known).
pub mod codes {
    pub const AUTHENTICATION: u32 = 10000;
    pub const BAD_REQUEST: u32 = 10001;
    pub const KEY_NOT_FOUND: u32 = 10009;
    pub const KEY_TOO_LONG: u32 = 10019;
    pub const VALUE_TOO_LARGE: u32 = 10033;
    pub const TOO_MANY_ITEMS: u32 = 10026;
    pub const BODY_TOO_LARGE: u32 = 10014;
    pub const NAMESPACE_NOT_FOUND: u32 = 10013;
    pub const BAD_EXPIRATION: u32 = 10016;
    pub const BAD_CURSOR: u32 = 10017;
    pub const NOT_EMULATED: u32 = 10998;
    pub const INJECTED: u32 = 10999;
}

/// What to do to the next matching data request (bulk write, bulk delete, read, list).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Fault {
    /// Answer this status with an error envelope, optionally with `Retry-After: {seconds}`.
    Status {
        status: u16,
        #[serde(default)]
        retry_after: Option<u64>,
        /// `Retry-After` as an HTTP date this many seconds ahead (RFC 9110's other form).
        #[serde(default)]
        retry_after_date: Option<u64>,
        /// Cloudflare's `retry-after-ms` header.
        #[serde(default)]
        retry_after_ms: Option<u64>,
        /// A `Location` header (with a 3xx: a redirect the client must not follow).
        #[serde(default)]
        location: Option<String>,
        /// `Retry-After` exactly as given (`1e20`, a date in 9999): what a broken server sends.
        #[serde(default)]
        retry_after_raw: Option<String>,
    },
    /// Refuse (400, as Cloudflare refuses a key it will not take) the next `times` bulk writes
    /// or deletes that hold this key, whatever else they hold.
    RefuseKey { key: String },
    /// Wait this long before handling the request normally.
    Delay { millis: u64 },
    /// Handle a bulk write or delete, but leave out the first `count` keys and report them
    /// in `result.unsuccessful_keys`.
    UnsuccessfulKeys { count: usize },
    /// Handle a bulk write or delete in full, but name `count` keys that were not in the
    /// request in `result.unsuccessful_keys` (seen from Cloudflare's schema-generated mock).
    ForeignUnsuccessfulKeys { count: usize },
    /// Handle a bulk write or delete, but leave out the keys that start with `prefix` and
    /// report them in `result.unsuccessful_keys`.
    UnsuccessfulKeysStartingWith { prefix: String },
    /// Hold the next `times` requests of this operation (`bulk`, `bulk/delete`, `bulk/get`,
    /// `keys`, `values`, `metadata`), and with `key` only requests whose body names that key,
    /// until `POST /__emulator/release`: a writer stopped between two steps, to force a race.
    /// A held write lands when released.
    Hold {
        operation: String,
        #[serde(default)]
        key: Option<String>,
    },
    /// Reads (values, metadata, bulk get, listings) answer what KV held when this was set,
    /// until `POST /__emulator/release`: Cloudflare's reads are only eventually consistent
    /// (up to 60 s). Writes land as usual.
    StaleReads,
}

/// What reads answer while [`Fault::StaleReads`] holds.
#[derive(Debug, Clone, Default)]
struct Snapshot {
    namespaces: HashMap<(String, String), BTreeMap<String, String>>,
    metadata: HashMap<(String, String), HashMap<String, Value>>,
}

/// A hold waiting for its requests.
#[derive(Debug, Clone)]
struct HoldRule {
    operation: String,
    /// The key as it appears in a JSON body (quoted).
    key: Option<String>,
    times: usize,
}

/// A fault and how many more requests it applies to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InjectedFault {
    #[serde(flatten)]
    pub fault: Fault,
    #[serde(default = "one")]
    pub times: usize,
}

fn one() -> usize {
    1
}

/// One request the emulator answered, for tests to count calls.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestRecord {
    pub method: String,
    pub namespace: String,
    /// `bulk`, `bulk/delete`, `values` or `keys`.
    pub operation: String,
    pub items: usize,
    pub body_bytes: usize,
    pub status: u16,
}

/// The emulator's data, faults and request log.
#[derive(Default)]
pub struct KvState {
    /// (account, namespace) -> key -> value.
    namespaces: HashMap<(String, String), BTreeMap<String, String>>,
    /// (account, namespace) -> key -> metadata, for keys written with some.
    metadata: HashMap<(String, String), HashMap<String, Value>>,
    tokens: HashSet<String>,
    faults: VecDeque<InjectedFault>,
    /// Keys whose bulk requests are refused, and how many more times.
    refused_keys: HashMap<String, usize>,
    /// Namespace ids that exist: any other answers 404, as Cloudflare does.
    known_namespaces: HashSet<String>,
    /// (account, namespace) -> key -> when it expires (seconds since the epoch).
    expirations: HashMap<(String, String), HashMap<String, u64>>,
    /// Cursors this emulator handed out: any other is refused.
    cursors: HashSet<String>,
    requests: Vec<RequestRecord>,
    holds: Vec<HoldRule>,
    /// Requests waiting on a hold now.
    held: usize,
    /// Grows with every release: a held request goes on once it changes.
    releases: u64,
    stale: Option<Snapshot>,
}

impl KvState {
    /// Queues a fault; a refused key applies to the requests that hold it, not the next ones.
    fn add_fault(&mut self, fault: InjectedFault) {
        match fault.fault {
            Fault::RefuseKey { key } => {
                self.refused_keys.insert(key, fault.times);
            }
            Fault::StaleReads => {
                self.stale = Some(Snapshot {
                    namespaces: self.namespaces.clone(),
                    metadata: self.metadata.clone(),
                });
            }
            Fault::Hold { operation, key } => self.holds.push(HoldRule {
                operation,
                key: key.map(|k| Value::from(k).to_string()),
                times: fault.times,
            }),
            _ => self.faults.push_back(fault),
        }
    }

    /// A 400 naming the first refused key among `keys`, if any (one refusal used up).
    fn refuse<'k>(&mut self, mut keys: impl Iterator<Item = &'k str>) -> Result<(), ApiError> {
        let refused = keys.find(|k| self.refused_keys.get(*k).is_some_and(|n| *n > 0));
        let Some(key) = refused else { return Ok(()) };
        *self.refused_keys.get_mut(key).expect("found above") -= 1;
        Err(ApiError::bad_request(
            codes::BAD_REQUEST,
            format!("Invalid key name: `{key}` (refused by an injected fault)"),
        ))
    }

    /// A namespace's values as reads see them (stale while [`Fault::StaleReads`] holds).
    fn read_values(&self, id: &(String, String)) -> Option<&BTreeMap<String, String>> {
        match &self.stale {
            Some(snapshot) => snapshot.namespaces.get(id),
            None => self.namespaces.get(id),
        }
    }

    fn read_metadata(&self, id: &(String, String)) -> Option<&HashMap<String, Value>> {
        match &self.stale {
            Some(snapshot) => snapshot.metadata.get(id),
            None => self.metadata.get(id),
        }
    }

    /// Makes these namespaces exist (the binary's `--namespace`).
    pub fn create_namespaces(&mut self, ids: &[String]) {
        self.known_namespaces.extend(ids.iter().cloned());
    }

    /// Forgets the namespace's keys whose expiration has passed.
    fn purge_expired(&mut self, id: &(String, String)) {
        let now = epoch_seconds();
        let Some(expiring) = self.expirations.get_mut(id) else {
            return;
        };
        let gone: Vec<String> = expiring
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in gone {
            expiring.remove(&key);
            self.namespaces.get_mut(id).map(|ns| ns.remove(&key));
            self.metadata.get_mut(id).map(|m| m.remove(&key));
        }
    }

    /// One namespace's values and metadata, created empty when new.
    fn namespace_mut(
        &mut self,
        account: String,
        namespace: String,
    ) -> (&mut BTreeMap<String, String>, &mut HashMap<String, Value>) {
        let id = (account, namespace);
        let values = self.namespaces.entry(id.clone()).or_default();
        let metadata = self.metadata.entry(id).or_default();
        (values, metadata)
    }
}

type Shared = Arc<Mutex<KvState>>;

/// A running emulator; it stops when dropped.
pub struct KvEmulator {
    addr: SocketAddr,
    state: Shared,
    _server: crate::ServerHandle,
}

impl KvEmulator {
    /// Starts on `127.0.0.1:{port}` (0 picks a free port), accepting these bearer tokens.
    pub async fn start(port: u16, tokens: &[&str]) -> std::io::Result<Self> {
        let tokens: Vec<String> = tokens.iter().map(|t| t.to_string()).collect();
        let state = new_state(&tokens);
        let (addr, server) = crate::serve(port, router(state.clone())).await?;
        Ok(Self {
            addr,
            state,
            _server: server,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Makes a namespace exist: requests to any other answer 404.
    pub fn create_namespace(&self, id: &str) {
        self.state
            .lock()
            .unwrap()
            .known_namespaces
            .insert(id.into());
    }

    /// What `CLOUDFLARE_API_BASE_URL` should be.
    pub fn base_url(&self) -> String {
        format!("http://{}/client/v4", self.addr)
    }

    pub fn value(&self, account: &str, namespace: &str, key: &str) -> Option<String> {
        let state = self.state.lock().unwrap();
        state
            .namespaces
            .get(&(account.to_owned(), namespace.to_owned()))?
            .get(key)
            .cloned()
    }

    /// The value parsed as JSON.
    pub fn json(&self, account: &str, namespace: &str, key: &str) -> Option<Value> {
        self.value(account, namespace, key)
            .map(|v| serde_json::from_str(&v).expect("values are JSON"))
    }

    pub fn keys(&self, account: &str, namespace: &str) -> Vec<String> {
        let state = self.state.lock().unwrap();
        state
            .namespaces
            .get(&(account.to_owned(), namespace.to_owned()))
            .map(|ns| ns.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Writes a value as a hand edit would: without metadata.
    pub fn insert(&self, account: &str, namespace: &str, key: &str, value: &str) {
        self.insert_with_metadata(account, namespace, key, value, None);
    }

    pub fn insert_with_metadata(
        &self,
        account: &str,
        namespace: &str,
        key: &str,
        value: &str,
        metadata: Option<Value>,
    ) {
        let mut state = self.state.lock().unwrap();
        let (values, meta) = state.namespace_mut(account.to_owned(), namespace.to_owned());
        values.insert(key.to_owned(), value.to_owned());
        match metadata {
            Some(metadata) => meta.insert(key.to_owned(), metadata),
            None => meta.remove(key),
        };
    }

    /// The metadata a key was written with.
    pub fn metadata(&self, account: &str, namespace: &str, key: &str) -> Option<Value> {
        let state = self.state.lock().unwrap();
        state
            .metadata
            .get(&(account.to_owned(), namespace.to_owned()))?
            .get(key)
            .cloned()
    }

    pub fn remove(&self, account: &str, namespace: &str, key: &str) -> Option<String> {
        let mut state = self.state.lock().unwrap();
        let ns = (account.to_owned(), namespace.to_owned());
        if let Some(meta) = state.metadata.get_mut(&ns) {
            meta.remove(key);
        }
        state.namespaces.get_mut(&ns)?.remove(key)
    }

    pub fn inject(&self, fault: Fault, times: usize) {
        self.state
            .lock()
            .unwrap()
            .add_fault(InjectedFault { fault, times });
    }

    /// Holds the next request of `operation` (naming `key`, when given) until [`Self::release`].
    pub fn hold(&self, operation: &str, key: Option<&str>) {
        let fault = Fault::Hold {
            operation: operation.into(),
            key: key.map(str::to_owned),
        };
        self.inject(fault, 1);
    }

    /// How many requests wait on a hold now.
    pub fn held(&self) -> usize {
        self.state.lock().unwrap().held
    }

    /// Lets every held request go on (in the order they go on from here, not guaranteed).
    pub fn release(&self) {
        release(&self.state);
    }

    /// Reads answer what KV holds now until [`Self::release`] (writes still land).
    pub fn stale_reads(&self) {
        self.inject(Fault::StaleReads, 1);
    }

    pub fn clear_faults(&self) {
        let mut state = self.state.lock().unwrap();
        state.faults.clear();
        state.refused_keys.clear();
    }

    /// Replaces the accepted tokens, as a rotation does.
    pub fn set_tokens(&self, tokens: &[&str]) {
        self.state.lock().unwrap().tokens = tokens.iter().map(|t| t.to_string()).collect();
    }

    pub fn requests(&self) -> Vec<RequestRecord> {
        self.state.lock().unwrap().requests.clone()
    }
}

pub fn router(state: Shared) -> Router {
    let namespace = "/client/v4/accounts/{account}/storage/kv/namespaces/{namespace}";
    Router::new()
        .route(
            &format!("{namespace}/bulk"),
            put(bulk_write).delete(not_emulated),
        )
        .route(&format!("{namespace}/bulk/delete"), post(bulk_delete))
        .route(&format!("{namespace}/bulk/get"), post(bulk_get))
        .route(
            &format!("{namespace}/values/{{key}}"),
            get(read_value).put(not_emulated).delete(not_emulated),
        )
        .route(&format!("{namespace}/metadata/{{key}}"), get(read_metadata))
        .route(&format!("{namespace}/keys"), get(list_keys))
        .route("/__emulator/faults", post(add_fault))
        .route("/__emulator/release", post(release_held))
        .route("/__emulator/requests", get(list_requests))
        .route("/__emulator/namespaces", get(dump))
        // The emulator checks the 100 MB limit itself, to answer with Cloudflare's envelope.
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// A standalone emulator's state, for the binary.
pub fn new_state(tokens: &[String]) -> Shared {
    let state: Shared = Arc::default();
    state.lock().unwrap().tokens = tokens.iter().cloned().collect();
    state
}

/// A Cloudflare-style failure: an HTTP status and one `{code, message}` in the envelope.
struct ApiError {
    status: StatusCode,
    code: u32,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: u32, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad_request(code: u32, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "success": false,
            "errors": [{"code": self.code, "message": self.message}],
            "messages": [],
            "result": null
        });
        (self.status, Json(body)).into_response()
    }
}

fn envelope_ok(result: Value) -> Response {
    Json(json!({"success": true, "errors": [], "messages": [], "result": result})).into_response()
}

struct Call<'a> {
    state: &'a Shared,
    method: &'static str,
    namespace: &'a str,
    operation: &'static str,
    body_bytes: usize,
}

impl Call<'_> {
    /// Waits while a hold matches this request (polled: the emulator is for tests).
    async fn wait_if_held(&self, body: &[u8]) {
        let generation = {
            let mut state = self.state.lock().unwrap();
            let body = String::from_utf8_lossy(body);
            let rule = state.holds.iter().position(|rule| {
                rule.operation == self.operation
                    && rule
                        .key
                        .as_ref()
                        .is_none_or(|key| body.contains(key.as_str()))
            });
            let Some(rule) = rule else { return };
            state.holds[rule].times -= 1;
            if state.holds[rule].times == 0 {
                state.holds.remove(rule);
            }
            state.held += 1;
            state.releases
        };
        while self.state.lock().unwrap().releases == generation {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.state.lock().unwrap().held -= 1;
    }

    fn record(&self, items: usize, response: Response) -> Response {
        self.state.lock().unwrap().requests.push(RequestRecord {
            method: self.method.into(),
            namespace: self.namespace.into(),
            operation: self.operation.into(),
            items,
            body_bytes: self.body_bytes,
            status: response.status().as_u16(),
        });
        response
    }

    /// Auth, then any injected fault. `Ok(n)` means: go on, leaving out `n` keys (a negative
    /// `n`: report that many keys that were never sent).
    async fn admit(&self, headers: &HeaderMap) -> Result<isize, Response> {
        Ok(self.admit_keys(headers).await?.0)
    }

    /// As `admit`, and a prefix of keys to leave out.
    async fn admit_keys(&self, headers: &HeaderMap) -> Result<(isize, Option<String>), Response> {
        let token = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let authorized = token.is_some_and(|t| self.state.lock().unwrap().tokens.contains(t));
        if !authorized {
            let error = ApiError::new(
                StatusCode::UNAUTHORIZED,
                codes::AUTHENTICATION,
                "Authentication error",
            );
            return Err(error.into_response());
        }
        if !self
            .state
            .lock()
            .unwrap()
            .known_namespaces
            .contains(self.namespace)
        {
            let message = "namespace not found";
            let error = ApiError::new(StatusCode::NOT_FOUND, codes::NAMESPACE_NOT_FOUND, message);
            return Err(error.into_response());
        }
        let fault = {
            let mut state = self.state.lock().unwrap();
            let fault = state.faults.front_mut().map(|f| {
                f.times = f.times.saturating_sub(1);
                f.fault.clone()
            });
            if state.faults.front().is_some_and(|f| f.times == 0) {
                state.faults.pop_front();
            }
            fault
        };
        match fault {
            None => Ok((0, None)),
            Some(Fault::Delay { millis }) => {
                tokio::time::sleep(Duration::from_millis(millis)).await;
                Ok((0, None))
            }
            Some(Fault::UnsuccessfulKeys { count }) => Ok((count as isize, None)),
            Some(Fault::ForeignUnsuccessfulKeys { count }) => Ok((-(count as isize), None)),
            Some(Fault::UnsuccessfulKeysStartingWith { prefix }) => Ok((0, Some(prefix))),
            // Never queued.
            Some(Fault::RefuseKey { .. } | Fault::Hold { .. } | Fault::StaleReads) => Ok((0, None)),
            Some(Fault::Status {
                status,
                retry_after,
                retry_after_date,
                retry_after_ms,
                location,
                retry_after_raw,
            }) => {
                let status =
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                let mut response =
                    ApiError::new(status, codes::INJECTED, "injected fault").into_response();
                if let Some(seconds) = retry_after {
                    response
                        .headers_mut()
                        .insert("retry-after", HeaderValue::from(seconds));
                }
                if let Some(seconds) = retry_after_date {
                    let at = std::time::SystemTime::now() + Duration::from_secs(seconds);
                    let date = httpdate::fmt_http_date(at);
                    response
                        .headers_mut()
                        .insert("retry-after", HeaderValue::from_str(&date).unwrap());
                }
                if let Some(millis) = retry_after_ms {
                    response
                        .headers_mut()
                        .insert("retry-after-ms", HeaderValue::from(millis));
                }
                if let Some(raw) = retry_after_raw.and_then(|r| HeaderValue::from_str(&r).ok()) {
                    response.headers_mut().insert("retry-after", raw);
                }
                if let Some(location) = location.and_then(|l| HeaderValue::from_str(&l).ok()) {
                    response.headers_mut().insert("location", location);
                }
                Err(response)
            }
        }
    }

    /// Runs a bulk operation after auth and faults, and records what was answered.
    async fn bulk(
        &self,
        headers: &HeaderMap,
        body: &Bytes,
        apply: impl FnOnce(&Bytes, LeaveOut) -> Result<(usize, Value), (usize, ApiError)>,
    ) -> Response {
        self.wait_if_held(body).await;
        let leave_out = match self.admit_keys(headers).await {
            Ok((count, prefix)) => LeaveOut { count, prefix },
            Err(response) => return self.record(0, response),
        };
        if body.len() >= MAX_BODY_BYTES {
            let error = ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                codes::BODY_TOO_LARGE,
                "Request body must be less than 100 MB",
            );
            return self.record(0, error.into_response());
        }
        match apply(body, leave_out) {
            Ok((items, result)) => self.record(items, envelope_ok(result)),
            Err((items, error)) => self.record(items, error.into_response()),
        }
    }
}

fn check_key(key: &str) -> Result<(), ApiError> {
    if key.is_empty() || key == "." || key == ".." {
        return Err(ApiError::bad_request(
            codes::BAD_REQUEST,
            format!("Invalid key name: `{key}`"),
        ));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(ApiError::bad_request(
            codes::KEY_TOO_LONG,
            format!("Key names must be at most {MAX_KEY_BYTES} bytes long"),
        ));
    }
    // The schema: "All printable, non-whitespace characters are valid."
    if key.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ApiError::bad_request(
            codes::BAD_REQUEST,
            format!("Invalid key name: {key:?} holds whitespace or an unprintable character"),
        ));
    }
    Ok(())
}

fn check_count(items: usize) -> Result<(), ApiError> {
    if items > MAX_BULK_ITEMS {
        return Err(ApiError::bad_request(
            codes::TOO_MANY_ITEMS,
            format!("A bulk request may hold at most {MAX_BULK_ITEMS} items"),
        ));
    }
    Ok(())
}

#[derive(Deserialize)]
struct WritePair {
    key: String,
    value: String,
    #[serde(default)]
    base64: bool,
    #[serde(default)]
    metadata: Option<Value>,
    /// Seconds since the epoch, at least 60 from now.
    #[serde(default)]
    expiration: Option<u64>,
    /// Seconds from now, at least 60.
    #[serde(default)]
    expiration_ttl: Option<u64>,
}

fn epoch_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Cloudflare: "the metadata ... must not exceed 1024 bytes" (serialized JSON).
pub const MAX_METADATA_BYTES: usize = 1024;

impl WritePair {
    /// Cloudflare stores what a `base64` value decodes to (this emulator keeps text).
    fn decode(mut self) -> Result<Self, ApiError> {
        if self.base64 {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(self.value.as_bytes())
                .map_err(|e| {
                    let message = format!("Invalid base64 value for key {}: {e}", self.key);
                    ApiError::bad_request(codes::BAD_REQUEST, message)
                })?;
            self.value = String::from_utf8_lossy(&bytes).into_owned();
            self.base64 = false;
        }
        Ok(self)
    }

    /// When the pair expires, as Cloudflare takes `expiration` and `expiration_ttl`.
    fn expires_at(&self) -> Result<Option<u64>, ApiError> {
        let now = epoch_seconds();
        let bad = |message: String| Err(ApiError::bad_request(codes::BAD_EXPIRATION, message));
        match (self.expiration_ttl, self.expiration) {
            (Some(ttl), _) if ttl < 60 => bad(format!(
                "Invalid expiration_ttl of {ttl}. Expiration TTL must be at least 60."
            )),
            (Some(ttl), _) => Ok(Some(now + ttl)),
            (None, Some(at)) if at < now + 60 => bad(format!(
                "Invalid expiration of {at}. Expiration times must be at least 60 seconds in the future."
            )),
            (None, at) => Ok(at),
        }
    }

    fn check(&self) -> Result<(), ApiError> {
        check_key(&self.key)?;
        self.expires_at()?;
        let value_bytes = self.value.len();
        if value_bytes > MAX_VALUE_BYTES {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                codes::VALUE_TOO_LARGE,
                "Values must be at most 25 MiB",
            ));
        }
        let metadata_bytes = self.metadata.as_ref().map_or(0, |m| {
            serde_json::to_string(m).map_or(usize::MAX, |s| s.len())
        });
        if metadata_bytes > MAX_METADATA_BYTES {
            return Err(ApiError::bad_request(
                codes::BAD_REQUEST,
                format!("Metadata must be at most {MAX_METADATA_BYTES} bytes"),
            ));
        }
        Ok(())
    }
}

/// Which keys of a bulk request an injected fault leaves out.
pub struct LeaveOut {
    /// The first `count`; a negative count applies all and reports that many never-sent keys.
    count: isize,
    /// Keys starting with this.
    prefix: Option<String>,
}

/// Stores or removes every item the fault does not leave out; those are reported unsuccessful.
fn apply_all<T>(
    items: Vec<T>,
    leave_out: LeaveOut,
    key: impl Fn(&T) -> &str,
    mut apply: impl FnMut(T),
) -> Value {
    let total = items.len();
    let mut unsuccessful = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        let by_prefix = leave_out
            .prefix
            .as_deref()
            .is_some_and(|p| key(&item).starts_with(p));
        if (i as isize) < leave_out.count || by_prefix {
            unsuccessful.push(key(&item).to_owned());
        } else {
            apply(item);
        }
    }
    let successful = total - unsuccessful.len();
    unsuccessful.extend((0..-leave_out.count.min(0)).map(|i| format!("never-sent-{i}")));
    json!({"successful_key_count": successful, "unsuccessful_keys": unsuccessful})
}

async fn bulk_write(
    State(state): State<Shared>,
    Path((account, namespace)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let call = Call {
        state: &state,
        method: "PUT",
        namespace: &namespace,
        operation: "bulk",
        body_bytes: body.len(),
    };
    call.bulk(&headers, &body, |body, leave_out| {
        let pairs: Vec<WritePair> = serde_json::from_slice(body).map_err(|e| {
            let message = format!("Invalid request body: expected an array of {{key, value}}: {e}");
            (0, ApiError::bad_request(codes::BAD_REQUEST, message))
        })?;
        let items = pairs.len();
        check_count(items).map_err(|e| (items, e))?;
        let pairs = pairs
            .into_iter()
            .map(WritePair::decode)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| (items, e))?;
        pairs
            .iter()
            .try_for_each(WritePair::check)
            .map_err(|e| (items, e))?;
        let mut guard = state.lock().unwrap();
        guard
            .refuse(pairs.iter().map(|p| p.key.as_str()))
            .map_err(|e| (items, e))?;
        let id = (account.clone(), namespace.clone());
        let mut expirations = guard.expirations.remove(&id).unwrap_or_default();
        let (ns, meta) = guard.namespace_mut(account, namespace.clone());
        let result = apply_all(
            pairs,
            leave_out,
            |p| &p.key,
            |p| {
                match p.expires_at().ok().flatten() {
                    Some(at) => expirations.insert(p.key.clone(), at),
                    None => expirations.remove(&p.key),
                };
                match p.metadata {
                    Some(m) => meta.insert(p.key.clone(), m),
                    None => meta.remove(&p.key),
                };
                ns.insert(p.key, p.value);
            },
        );
        guard.expirations.insert(id, expirations);
        Ok((items, result))
    })
    .await
}

async fn bulk_delete(
    State(state): State<Shared>,
    Path((account, namespace)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let call = Call {
        state: &state,
        method: "POST",
        namespace: &namespace,
        operation: "bulk/delete",
        body_bytes: body.len(),
    };
    call.bulk(&headers, &body, |body, leave_out| {
        let keys: Vec<String> = serde_json::from_slice(body).map_err(|e| {
            let message = format!("Invalid request body: expected an array of key names: {e}");
            (0, ApiError::bad_request(codes::BAD_REQUEST, message))
        })?;
        let items = keys.len();
        check_count(items).map_err(|e| (items, e))?;
        keys.iter()
            .try_for_each(|k| check_key(k))
            .map_err(|e| (items, e))?;
        let mut guard = state.lock().unwrap();
        guard
            .refuse(keys.iter().map(String::as_str))
            .map_err(|e| (items, e))?;
        let (ns, meta) = guard.namespace_mut(account, namespace.clone());
        let result = apply_all(
            keys,
            leave_out,
            |k| k,
            |k| {
                meta.remove(&k);
                ns.remove(&k);
            },
        );
        Ok((items, result))
    })
    .await
}

async fn read_value(
    State(state): State<Shared>,
    Path((account, namespace, key)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let call = Call {
        state: &state,
        method: "GET",
        namespace: &namespace,
        operation: "values",
        body_bytes: 0,
    };
    call.wait_if_held(Value::from(key.as_str()).to_string().as_bytes())
        .await;
    if let Err(response) = call.admit(&headers).await {
        return call.record(0, response);
    }
    let value = {
        let mut guard = state.lock().unwrap();
        let id = (account, namespace.clone());
        guard.purge_expired(&id);
        guard.read_values(&id).and_then(|ns| ns.get(&key).cloned())
    };
    let response = match value {
        // Cloudflare answers the raw bytes as `application/octet-stream`.
        Some(value) => {
            let octets = [("content-type", "application/octet-stream")];
            (StatusCode::OK, octets, value).into_response()
        }
        None => key_not_found(),
    };
    call.record(1, response)
}

/// Cloudflare's answer for a key it does not hold.
fn key_not_found() -> Response {
    let error = ApiError::new(
        StatusCode::NOT_FOUND,
        codes::KEY_NOT_FOUND,
        "get: 'key not found'",
    );
    error.into_response()
}

/// `GET /metadata/{key}`: the key's metadata in the envelope (`null` without any), or 404.
async fn read_metadata(
    State(state): State<Shared>,
    Path((account, namespace, key)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let call = Call {
        state: &state,
        method: "GET",
        namespace: &namespace,
        operation: "metadata",
        body_bytes: 0,
    };
    call.wait_if_held(Value::from(key.as_str()).to_string().as_bytes())
        .await;
    if let Err(response) = call.admit(&headers).await {
        return call.record(0, response);
    }
    let found = {
        let mut guard = state.lock().unwrap();
        let id = (account, namespace.clone());
        guard.purge_expired(&id);
        let exists = guard
            .read_values(&id)
            .is_some_and(|ns| ns.contains_key(&key));
        exists.then(|| guard.read_metadata(&id).and_then(|m| m.get(&key)).cloned())
    };
    let response = match found {
        Some(metadata) => envelope_ok(metadata.unwrap_or(Value::Null)),
        None => key_not_found(),
    };
    call.record(1, response)
}

/// Endpoints of the schema this emulator does not serve (the exporter never calls them):
/// refused in Cloudflare's envelope, never a bare 404/405.
async fn not_emulated() -> Response {
    let message = "not emulated: this emulator serves bulk write, bulk delete, bulk get, \
                   list keys, read value and read metadata";
    ApiError::new(StatusCode::NOT_IMPLEMENTED, codes::NOT_EMULATED, message).into_response()
}

/// `POST /bulk/get` body: up to 100 keys; `type` and `withMetadata` as Cloudflare takes them.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BulkGet {
    keys: Vec<String>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default, rename = "withMetadata")]
    with_metadata: bool,
}

/// At most 100 keys a request; absent keys read as `null`.
const MAX_BULK_GET_KEYS: usize = 100;

async fn bulk_get(
    State(state): State<Shared>,
    Path((account, namespace)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let call = Call {
        state: &state,
        method: "POST",
        namespace: &namespace,
        operation: "bulk/get",
        body_bytes: body.len(),
    };
    call.wait_if_held(&body).await;
    if let Err(response) = call.admit(&headers).await {
        return call.record(0, response);
    }
    let request: BulkGet = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            let message = format!("Invalid request body: expected {{keys: [...]}}: {e}");
            let error = ApiError::bad_request(codes::BAD_REQUEST, message);
            return call.record(0, error.into_response());
        }
    };
    let items = request.keys.len();
    if items == 0 || items > MAX_BULK_GET_KEYS {
        let message = format!("keys must hold 1 to {MAX_BULK_GET_KEYS} names");
        let error = ApiError::bad_request(codes::BAD_REQUEST, message);
        return call.record(items, error.into_response());
    }
    if let Err(error) = request.keys.iter().try_for_each(|k| check_key(k)) {
        return call.record(items, error.into_response());
    }
    let json = match request.kind.as_deref() {
        None | Some("text") => false,
        Some("json") => true,
        Some(other) => {
            let message = format!("type must be text or json, not {other}");
            let error = ApiError::bad_request(codes::BAD_REQUEST, message);
            return call.record(items, error.into_response());
        }
    };
    let mut guard = state.lock().unwrap();
    let id = (account, namespace.clone());
    guard.purge_expired(&id);
    let ns = guard.read_values(&id);
    let meta = guard.read_metadata(&id);
    let expiring = guard.expirations.get(&id);
    let mut values = serde_json::Map::new();
    for key in request.keys {
        let value = ns.and_then(|ns| ns.get(&key)).map(|v| {
            if json {
                serde_json::from_str(v).unwrap_or(Value::Null)
            } else {
                Value::String(v.clone())
            }
        });
        // The schema: plain values are never null (a missing key is left out); with
        // metadata, a missing key is null and `expiration` is there only when set.
        let value = match (value, request.with_metadata) {
            (None, false) => continue,
            (None, true) => Value::Null,
            (Some(v), false) => v,
            (Some(v), true) => {
                let metadata = meta.and_then(|m| m.get(&key)).cloned();
                let mut entry = json!({"value": v, "metadata": metadata});
                if let Some(at) = expiring.and_then(|e| e.get(&key)) {
                    entry["expiration"] = json!(at);
                }
                entry
            }
        };
        values.insert(key, value);
    }
    drop(guard);
    call.record(items, envelope_ok(json!({ "values": values })))
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    prefix: String,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    cursor: Option<String>,
}

/// `GET /keys?prefix&limit&cursor`: names in order, at most `limit` (10 to 1000, default 1000)
/// a page; the cursor is the last name of the page, "" after the last page.
async fn list_keys(
    State(state): State<Shared>,
    Path((account, namespace)): Path<(String, String)>,
    Query(query): Query<ListQuery>,
    headers: HeaderMap,
) -> Response {
    let call = Call {
        state: &state,
        method: "GET",
        namespace: &namespace,
        operation: "keys",
        body_bytes: 0,
    };
    call.wait_if_held(b"").await;
    if let Err(response) = call.admit(&headers).await {
        return call.record(0, response);
    }
    let limit = query.limit.unwrap_or(1000);
    if !(10..=1000).contains(&limit) {
        let error = ApiError::bad_request(codes::BAD_REQUEST, "limit must be between 10 and 1000");
        return call.record(0, error.into_response());
    }
    let mut guard = state.lock().unwrap();
    let after = match query.cursor.filter(|c| !c.is_empty()) {
        None => String::new(),
        Some(cursor) if guard.cursors.contains(&cursor) => {
            let name = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&cursor);
            String::from_utf8(name.unwrap_or_default()).unwrap_or_default()
        }
        Some(_) => {
            drop(guard);
            let error = ApiError::bad_request(codes::BAD_CURSOR, "Invalid cursor");
            return call.record(0, error.into_response());
        }
    };
    let id = (account, namespace.clone());
    guard.purge_expired(&id);
    let names: Vec<String> = guard
        .read_values(&id)
        .map(|ns| {
            ns.keys()
                .filter(|k| {
                    k.starts_with(&query.prefix)
                        && (after.is_empty() || k.as_str() > after.as_str())
                })
                .take(limit + 1)
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let more = names.len() > limit;
    let page: Vec<&String> = names.iter().take(limit).collect();
    // Opaque, as Cloudflare's are; only the ones handed out are taken back.
    let cursor = match page.last().filter(|_| more) {
        Some(last) => base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(last),
        None => String::new(),
    };
    if !cursor.is_empty() {
        guard.cursors.insert(cursor.clone());
    }
    let meta = guard.read_metadata(&id);
    let expiring = guard.expirations.get(&id);
    let result: Vec<Value> = page
        .iter()
        .map(|k| {
            let mut row = json!({"name": k});
            if let Some(metadata) = meta.and_then(|m| m.get(*k)) {
                row["metadata"] = metadata.clone();
            }
            if let Some(at) = expiring.and_then(|e| e.get(*k)) {
                row["expiration"] = json!(at);
            }
            row
        })
        .collect();
    drop(guard);
    let count = result.len();
    let body = json!({"success": true, "errors": [], "messages": [], "result": result,
        "result_info": {"count": count, "cursor": cursor}});
    call.record(count, Json(body).into_response())
}

/// `POST /__emulator/faults`: the body is read as JSON whatever its `Content-Type` (a plain
/// `curl -d` sends a form type), and the answer says what was set, or why nothing was.
async fn add_fault(State(state): State<Shared>, body: Bytes) -> Response {
    match serde_json::from_slice::<InjectedFault>(&body) {
        Ok(fault) if fault.times == 0 => {
            let error = json!({"error": "no fault set: `times` must be at least 1"});
            (StatusCode::BAD_REQUEST, Json(error)).into_response()
        }
        Ok(fault) => {
            let set = json!({"set": fault});
            state.lock().unwrap().add_fault(fault);
            (StatusCode::OK, Json(set)).into_response()
        }
        Err(e) => {
            let message = format!(
                "no fault set: {e} (kinds: status, delay, unsuccessful_keys, \
                 foreign_unsuccessful_keys, unsuccessful_keys_starting_with, refuse_key, hold, stale_reads)"
            );
            (StatusCode::BAD_REQUEST, Json(json!({"error": message}))).into_response()
        }
    }
}

fn release(state: &Shared) -> usize {
    let mut state = state.lock().unwrap();
    state.releases += 1;
    state.holds.clear();
    state.stale = None;
    state.held
}

/// `POST /__emulator/release`: every held request goes on; the answer says how many.
async fn release_held(State(state): State<Shared>) -> Response {
    Json(json!({"released": release(&state)})).into_response()
}

async fn list_requests(State(state): State<Shared>) -> Response {
    Json(state.lock().unwrap().requests.clone()).into_response()
}

async fn dump(State(state): State<Shared>) -> Response {
    let state = state.lock().unwrap();
    let mut out = serde_json::Map::new();
    for ((account, namespace), values) in &state.namespaces {
        out.insert(format!("{account}/{namespace}"), json!(values));
    }
    Json(Value::Object(out)).into_response()
}
