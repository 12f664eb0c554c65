//! `PUT /bulk` and `POST /bulk/delete`: the pairs checked as Cloudflare checks them, then
//! stored or removed, less what an injected fault leaves out.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};

use super::call::{check_count, check_key, ApiError, Call};
use super::state::epoch_seconds;
use super::{codes, Shared, MAX_VALUE_BYTES};

#[derive(Deserialize)]
pub(super) struct WritePair {
    pub(super) key: String,
    pub(super) value: String,
    #[serde(default)]
    base64: bool,
    #[serde(default)]
    pub(super) metadata: Option<Value>,
    /// Seconds since the epoch, at least 60 from now.
    #[serde(default)]
    pub(super) expiration: Option<u64>,
    /// Seconds from now, at least 60.
    #[serde(default)]
    pub(super) expiration_ttl: Option<u64>,
}

/// Cloudflare: "the metadata ... must not exceed 1024 bytes" (serialized JSON).
pub const MAX_METADATA_BYTES: usize = 1024;

impl WritePair {
    /// Cloudflare stores what a `base64` value decodes to (this emulator keeps text).
    pub(super) fn decode(mut self) -> Result<Self, ApiError> {
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
    pub(super) fn expires_at(&self) -> Result<Option<u64>, ApiError> {
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

    pub(super) fn check(&self) -> Result<(), ApiError> {
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
pub(super) struct LeaveOut {
    /// The first `count`; a negative count applies all and reports that many never-sent keys.
    pub(super) count: isize,
    /// Keys starting with this.
    pub(super) prefix: Option<String>,
}

/// Stores or removes every item the fault does not leave out; those are reported unsuccessful.
pub(super) fn apply_all<T>(
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

pub(super) async fn bulk_write(
    State(state): State<Shared>,
    Path((account, namespace)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let call = Call {
        received: std::time::Instant::now(),
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

pub(super) async fn bulk_delete(
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
