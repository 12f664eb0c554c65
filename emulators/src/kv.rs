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
//! `POST /__emulator/release`), `GET` and `DELETE /__emulator/faults` (what is left, or clear
//! it), `GET /__emulator/requests`,
//! `GET /__emulator/namespaces`.

mod call;
mod control;
mod read;
mod state;
mod write;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post, put};
use axum::Router;
use serde_json::Value;

use call::not_emulated;
use control::{add_fault, clear_faults, dump, list_faults, list_requests, release, release_held};
use read::{bulk_get, list_keys, read_metadata, read_value};
pub use state::{Fault, InjectedFault, KvState, RequestRecord};
pub use write::MAX_METADATA_BYTES;
use write::{bulk_delete, bulk_write};

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
        self.state.lock().unwrap().clear_faults();
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
        .route(
            "/__emulator/faults",
            post(add_fault).get(list_faults).delete(clear_faults),
        )
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
