//! The control routes under `/__emulator/`: faults, releasing holds, the request log, a dump.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::state::InjectedFault;
use super::Shared;

/// `POST /__emulator/faults`: the body is read as JSON whatever its `Content-Type` (a plain
/// `curl -d` sends a form type), and the answer says what was set, or why nothing was.
pub(super) async fn add_fault(State(state): State<Shared>, body: Bytes) -> Response {
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
                 foreign_unsuccessful_keys, unsuccessful_keys_starting_with, refuse_key, hold, stale_reads, \
                 latency)"
            );
            (StatusCode::BAD_REQUEST, Json(json!({"error": message}))).into_response()
        }
    }
}

/// `GET /__emulator/faults`: every fault still waiting for requests.
pub(super) async fn list_faults(State(state): State<Shared>) -> Response {
    Json(state.lock().unwrap().faults_left()).into_response()
}

/// `DELETE /__emulator/faults`: forgets them all; answers how many there were.
pub(super) async fn clear_faults(State(state): State<Shared>) -> Response {
    Json(json!({"cleared": state.lock().unwrap().clear_faults()})).into_response()
}

pub(super) fn release(state: &Shared) -> usize {
    let mut state = state.lock().unwrap();
    state.releases += 1;
    state.holds.clear();
    state.stale = None;
    state.held
}

/// `POST /__emulator/release`: every held request goes on; the answer says how many.
pub(super) async fn release_held(State(state): State<Shared>) -> Response {
    Json(json!({"released": release(&state)})).into_response()
}

pub(super) async fn list_requests(State(state): State<Shared>) -> Response {
    Json(state.lock().unwrap().requests.clone()).into_response()
}

pub(super) async fn dump(State(state): State<Shared>) -> Response {
    let state = state.lock().unwrap();
    let mut out = serde_json::Map::new();
    for ((account, namespace), values) in &state.namespaces {
        out.insert(format!("{account}/{namespace}"), json!(values));
    }
    Json(Value::Object(out)).into_response()
}
