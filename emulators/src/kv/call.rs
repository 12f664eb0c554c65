//! What every data request goes through: auth, the namespace, holds and injected faults,
//! the envelope, and the request log.

use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::state::{Fault, RequestRecord};
use super::write::LeaveOut;
use super::{codes, Shared, MAX_BODY_BYTES, MAX_BULK_ITEMS, MAX_KEY_BYTES};

/// A Cloudflare-style failure: an HTTP status and one `{code, message}` in the envelope.
pub(super) struct ApiError {
    pub(super) status: StatusCode,
    pub(super) code: u32,
    pub(super) message: String,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, code: u32, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub(super) fn bad_request(code: u32, message: impl Into<String>) -> Self {
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

pub(super) fn envelope_ok(result: Value) -> Response {
    Json(json!({"success": true, "errors": [], "messages": [], "result": result})).into_response()
}

pub(super) struct Call<'a> {
    pub(super) state: &'a Shared,
    pub(super) method: &'static str,
    pub(super) namespace: &'a str,
    pub(super) operation: &'static str,
    pub(super) body_bytes: usize,
    /// When the request came in (before any hold or delay).
    pub(super) received: std::time::Instant,
}

impl Call<'_> {
    /// Waits while a hold matches this request (polled: the emulator is for tests).
    pub(super) async fn wait_if_held(&self, body: &[u8]) {
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

    pub(super) fn record(&self, items: usize, response: Response) -> Response {
        self.state.lock().unwrap().requests.push(RequestRecord {
            method: self.method.into(),
            namespace: self.namespace.into(),
            operation: self.operation.into(),
            items,
            body_bytes: self.body_bytes,
            status: response.status().as_u16(),
            received: self.received,
        });
        response
    }

    /// Auth, then any injected fault. `Ok(n)` means: go on, leaving out `n` keys (a negative
    /// `n`: report that many keys that were never sent).
    pub(super) async fn admit(&self, headers: &HeaderMap) -> Result<isize, Response> {
        Ok(self.admit_keys(headers).await?.0)
    }

    /// As `admit`, and a prefix of keys to leave out.
    pub(super) async fn admit_keys(
        &self,
        headers: &HeaderMap,
    ) -> Result<(isize, Option<String>), Response> {
        self.authorize(headers)
            .map_err(IntoResponse::into_response)?;
        let latency = self
            .state
            .lock()
            .unwrap()
            .latencies
            .get(self.operation)
            .copied();
        if let Some(millis) = latency {
            tokio::time::sleep(Duration::from_millis(millis)).await;
        }
        match self.next_fault() {
            None => Ok((0, None)),
            Some(Fault::Delay { millis }) => {
                tokio::time::sleep(Duration::from_millis(millis)).await;
                Ok((0, None))
            }
            Some(Fault::UnsuccessfulKeys { count }) => Ok((count as isize, None)),
            Some(Fault::ForeignUnsuccessfulKeys { count }) => Ok((-(count as isize), None)),
            Some(Fault::UnsuccessfulKeysStartingWith { prefix }) => Ok((0, Some(prefix))),
            // Never queued.
            Some(
                Fault::RefuseKey { .. }
                | Fault::Hold { .. }
                | Fault::StaleReads
                | Fault::Latency { .. },
            ) => Ok((0, None)),
            Some(status @ Fault::Status { .. }) => Err(injected_status(status)),
        }
    }

    /// A bearer token the emulator accepts, for a namespace that exists.
    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let token = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let state = self.state.lock().unwrap();
        if !token.is_some_and(|t| state.tokens.contains(t)) {
            let (status, code) = (StatusCode::UNAUTHORIZED, codes::AUTHENTICATION);
            return Err(ApiError::new(status, code, "Authentication error"));
        }
        if !state.known_namespaces.contains(self.namespace) {
            let (status, code) = (StatusCode::NOT_FOUND, codes::NAMESPACE_NOT_FOUND);
            return Err(ApiError::new(status, code, "namespace not found"));
        }
        Ok(())
    }

    /// The queued fault this request uses up, if any.
    fn next_fault(&self) -> Option<Fault> {
        let mut state = self.state.lock().unwrap();
        let fault = state.faults.front_mut().map(|f| {
            f.times = f.times.saturating_sub(1);
            f.fault.clone()
        });
        if state.faults.front().is_some_and(|f| f.times == 0) {
            state.faults.pop_front();
        }
        fault
    }

    /// Runs a bulk operation after auth and faults, and records what was answered.
    pub(super) async fn bulk(
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

pub(super) fn check_key(key: &str) -> Result<(), ApiError> {
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

pub(super) fn check_count(items: usize) -> Result<(), ApiError> {
    if items > MAX_BULK_ITEMS {
        return Err(ApiError::bad_request(
            codes::TOO_MANY_ITEMS,
            format!("A bulk request may hold at most {MAX_BULK_ITEMS} items"),
        ));
    }
    Ok(())
}

/// Cloudflare's answer for a key it does not hold.
pub(super) fn key_not_found() -> Response {
    let error = ApiError::new(
        StatusCode::NOT_FOUND,
        codes::KEY_NOT_FOUND,
        "get: 'key not found'",
    );
    error.into_response()
}

/// Endpoints of the schema this emulator does not serve (the exporter never calls them):
/// refused in Cloudflare's envelope, never a bare 404/405.
pub(super) async fn not_emulated() -> Response {
    let message = "not emulated: this emulator serves bulk write, bulk delete, bulk get, \
                   list keys, read value and read metadata";
    ApiError::new(StatusCode::NOT_IMPLEMENTED, codes::NOT_EMULATED, message).into_response()
}

/// The answer an injected [`Fault::Status`] asks for, with its `Retry-After` in whichever form
/// it names and any `Location`.
fn injected_status(fault: Fault) -> Response {
    let Fault::Status {
        status,
        retry_after,
        retry_after_date,
        retry_after_ms,
        location,
        retry_after_raw,
    } = fault
    else {
        unreachable!("only a status fault answers with a status")
    };
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = ApiError::new(status, codes::INJECTED, "injected fault").into_response();
    let headers = response.headers_mut();
    if let Some(seconds) = retry_after {
        headers.insert("retry-after", HeaderValue::from(seconds));
    }
    if let Some(seconds) = retry_after_date {
        let at = std::time::SystemTime::now() + Duration::from_secs(seconds);
        let date = httpdate::fmt_http_date(at);
        headers.insert("retry-after", HeaderValue::from_str(&date).unwrap());
    }
    if let Some(millis) = retry_after_ms {
        headers.insert("retry-after-ms", HeaderValue::from(millis));
    }
    if let Some(raw) = retry_after_raw.and_then(|r| HeaderValue::from_str(&r).ok()) {
        headers.insert("retry-after", raw);
    }
    if let Some(location) = location.and_then(|l| HeaderValue::from_str(&l).ok()) {
        headers.insert("location", location);
    }
    response
}
