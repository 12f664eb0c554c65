//! A stand-in for the API keys service: `GET [/cells/{cell}]/accounts/{account}/api-key`
//! answers `200 {"api_key": ...}` for known accounts and `404` for the others. Per-account
//! behaviours simulate an outage, a slow answer or a malformed body; every call is recorded.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Behaviour {
    Status {
        status: u16,
    },
    Delay {
        millis: u64,
    },
    Malformed,
    /// A `302` to `location`, which a client must not follow.
    Redirect {
        location: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KeyCall {
    pub cell: Option<String>,
    pub account: String,
}

#[derive(Default)]
pub struct ApiKeysState {
    keys: HashMap<String, String>,
    /// The key of every account not in `keys` (a fleet too large to list), if any.
    default_key: Option<String>,
    behaviours: HashMap<String, Behaviour>,
    /// Per account: answer this status to the next n calls.
    failures: HashMap<String, (u16, usize)>,
    calls: Vec<KeyCall>,
}

type Shared = Arc<Mutex<ApiKeysState>>;

pub struct ApiKeysStandIn {
    addr: SocketAddr,
    state: Shared,
    _server: crate::ServerHandle,
}

impl ApiKeysStandIn {
    pub async fn start(port: u16) -> std::io::Result<Self> {
        let state: Shared = Arc::default();
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

    /// What `API_KEYS_SERVICE_URL` should be.
    pub fn url_template(&self) -> String {
        format!("http://{}/cells/{{cell}}", self.addr)
    }

    pub fn set_key(&self, account: &str, key: &str) {
        self.state
            .lock()
            .unwrap()
            .keys
            .insert(account.into(), key.into());
    }

    /// Makes every call for `account` behave so, until cleared.
    pub fn set_behaviour(&self, account: &str, behaviour: Option<Behaviour>) {
        let mut state = self.state.lock().unwrap();
        match behaviour {
            Some(b) => state.behaviours.insert(account.into(), b),
            None => state.behaviours.remove(account),
        };
    }

    /// The next `times` calls for `account` answer `status`, then it recovers.
    pub fn fail_next(&self, account: &str, status: u16, times: usize) {
        self.state
            .lock()
            .unwrap()
            .failures
            .insert(account.into(), (status, times));
    }

    pub fn calls(&self) -> Vec<KeyCall> {
        self.state.lock().unwrap().calls.clone()
    }
}

pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/cells/{cell}/accounts/{account}/api-key", get(with_cell))
        .route("/accounts/{account}/api-key", get(without_cell))
        .with_state(state)
}

pub fn new_state(keys: &[(String, String)]) -> Shared {
    let state: Shared = Arc::default();
    state.lock().unwrap().keys = keys.iter().cloned().collect();
    state
}

/// Every account not named in `keys` gets `key` (the binary's `--default-key`).
pub fn set_default_key(state: &Shared, key: Option<String>) {
    state.lock().unwrap().default_key = key;
}

async fn with_cell(
    State(state): State<Shared>,
    Path((cell, account)): Path<(String, String)>,
) -> Response {
    answer(state, Some(cell), account).await
}

async fn without_cell(State(state): State<Shared>, Path(account): Path<String>) -> Response {
    answer(state, None, account).await
}

async fn answer(state: Shared, cell: Option<String>, account: String) -> Response {
    let (key, behaviour) = {
        let mut s = state.lock().unwrap();
        s.calls.push(KeyCall {
            cell,
            account: account.clone(),
        });
        let scripted = s
            .failures
            .get_mut(&account)
            .filter(|(_, n)| *n > 0)
            .map(|(status, n)| {
                *n -= 1;
                Behaviour::Status { status: *status }
            });
        let behaviour = scripted.or_else(|| s.behaviours.get(&account).cloned());
        let key = s.keys.get(&account).or(s.default_key.as_ref()).cloned();
        (key, behaviour)
    };
    match behaviour {
        Some(Behaviour::Status { status }) => {
            return StatusCode::from_u16(status)
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
                .into_response()
        }
        Some(Behaviour::Malformed) => return (StatusCode::OK, "{\"api_key\": ").into_response(),
        Some(Behaviour::Redirect { location }) => {
            return (StatusCode::FOUND, [("location", location)]).into_response()
        }
        Some(Behaviour::Delay { millis }) => {
            tokio::time::sleep(Duration::from_millis(millis)).await
        }
        None => {}
    }
    match key {
        Some(key) => Json(json!({ "api_key": key })).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "no API key for this account"})),
        )
            .into_response(),
    }
}
