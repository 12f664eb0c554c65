//! Reads: one value, one key's metadata, up to 100 values at once, and key listings.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};

use super::call::{check_key, envelope_ok, key_not_found, ApiError, Call};
use super::state::KvState;
use super::{codes, Shared};

/// `GET /values/{key}`: the raw bytes, or 404.
pub(super) async fn read_value(
    State(state): State<Shared>,
    Path(path): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    read_one(&state, path, &headers, "values", |state, id, key| {
        match state.read_values(id).and_then(|ns| ns.get(key)) {
            // Cloudflare answers the raw bytes as `application/octet-stream`.
            Some(value) => {
                let octets = [("content-type", "application/octet-stream")];
                (StatusCode::OK, octets, value.clone()).into_response()
            }
            None => key_not_found(),
        }
    })
    .await
}

/// `GET /metadata/{key}`: the key's metadata in the envelope (`null` without any), or 404.
pub(super) async fn read_metadata(
    State(state): State<Shared>,
    Path(path): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    read_one(&state, path, &headers, "metadata", |state, id, key| {
        if !state.read_values(id).is_some_and(|ns| ns.contains_key(key)) {
            return key_not_found();
        }
        let metadata = state.read_metadata(id).and_then(|m| m.get(key)).cloned();
        envelope_ok(metadata.unwrap_or(Value::Null))
    })
    .await
}

/// A read of one key: held and admitted like any request, the namespace's expired keys
/// purged, then `answer` from what reads see; recorded as one item.
async fn read_one(
    state: &Shared,
    (account, namespace, key): (String, String, String),
    headers: &HeaderMap,
    operation: &'static str,
    answer: impl FnOnce(&KvState, &(String, String), &str) -> Response,
) -> Response {
    let call = Call {
        received: std::time::Instant::now(),
        state,
        method: "GET",
        namespace: &namespace,
        operation,
        body_bytes: 0,
    };
    call.wait_if_held(Value::from(key.as_str()).to_string().as_bytes())
        .await;
    if let Err(response) = call.admit(headers).await {
        return call.record(0, response);
    }
    let response = {
        let mut guard = state.lock().unwrap();
        let id = (account, namespace.clone());
        guard.purge_expired(&id);
        answer(&guard, &id, &key)
    };
    call.record(1, response)
}

/// `POST /bulk/get` body: up to 100 keys; `type` and `withMetadata` as Cloudflare takes them.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BulkGet {
    pub(super) keys: Vec<String>,
    #[serde(default, rename = "type")]
    pub(super) kind: Option<String>,
    #[serde(default, rename = "withMetadata")]
    pub(super) with_metadata: bool,
}

/// At most 100 keys a request; absent keys read as `null`.
pub(super) const MAX_BULK_GET_KEYS: usize = 100;

pub(super) async fn bulk_get(
    State(state): State<Shared>,
    Path((account, namespace)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let call = Call {
        received: std::time::Instant::now(),
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
pub(super) struct ListQuery {
    #[serde(default)]
    pub(super) prefix: String,
    #[serde(default)]
    pub(super) limit: Option<usize>,
    #[serde(default)]
    pub(super) cursor: Option<String>,
}

/// `GET /keys?prefix&limit&cursor`: names in order, at most `limit` (10 to 1000, default 1000)
/// a page; the cursor is the last name of the page, "" after the last page.
pub(super) async fn list_keys(
    State(state): State<Shared>,
    Path((account, namespace)): Path<(String, String)>,
    Query(query): Query<ListQuery>,
    headers: HeaderMap,
) -> Response {
    let call = Call {
        received: std::time::Instant::now(),
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
    let after = match taken_back(&guard, query.cursor.as_deref()) {
        Ok(after) => after,
        Err(error) => {
            drop(guard);
            return call.record(0, error.into_response());
        }
    };
    let id = (account, namespace.clone());
    let (result, cursor) = page(&mut guard, &id, &query.prefix, &after, limit);
    drop(guard);
    let count = result.len();
    let body = json!({"success": true, "errors": [], "messages": [], "result": result,
        "result_info": {"count": count, "cursor": cursor}});
    call.record(count, Json(body).into_response())
}

/// The name a cursor stands for ("" for none): only cursors this emulator handed out.
fn taken_back(state: &KvState, cursor: Option<&str>) -> Result<String, ApiError> {
    match cursor.filter(|c| !c.is_empty()) {
        None => Ok(String::new()),
        Some(cursor) if state.cursors.contains(cursor) => {
            let name = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(cursor);
            Ok(String::from_utf8(name.unwrap_or_default()).unwrap_or_default())
        }
        Some(_) => Err(ApiError::bad_request(codes::BAD_CURSOR, "Invalid cursor")),
    }
}

/// One page of names after `after`, each with its metadata and expiration, and the cursor of
/// the next page ("" after the last).
fn page(
    state: &mut KvState,
    id: &(String, String),
    prefix: &str,
    after: &str,
    limit: usize,
) -> (Vec<Value>, String) {
    state.purge_expired(id);
    let names: Vec<String> = (state.read_values(id).into_iter())
        .flat_map(|ns| ns.keys())
        .filter(|k| k.starts_with(prefix) && (after.is_empty() || k.as_str() > after))
        .take(limit + 1)
        .cloned()
        .collect();
    let more = names.len() > limit;
    let page = &names[..names.len().min(limit)];
    // Opaque, as Cloudflare's are; only the ones handed out are taken back.
    let cursor = match page.last().filter(|_| more) {
        Some(last) => base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(last),
        None => String::new(),
    };
    if !cursor.is_empty() {
        state.cursors.insert(cursor.clone());
    }
    let meta = state.read_metadata(id);
    let expiring = state.expirations.get(id);
    let rows = page.iter().map(|k| {
        let mut row = json!({"name": k});
        if let Some(metadata) = meta.and_then(|m| m.get(k)) {
            row["metadata"] = metadata.clone();
        }
        if let Some(at) = expiring.and_then(|e| e.get(k)) {
            row["expiration"] = json!(at);
        }
        row
    });
    (rows.collect(), cursor)
}
