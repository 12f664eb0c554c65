//! The Lambda Invoke API (`POST /2015-03-31/functions/{name}/invocations`) in front of a
//! [`RuntimeApi`]: what the AWS SDK or `aws lambda invoke --endpoint-url` talks to, so the
//! operator CLI drives the real function binary as it would in AWS.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde_json::Value;

use crate::runtime_api::RuntimeApi;

/// A scripted function: its answer (`Err`: the error document) to each payload.
pub type Script = Arc<dyn Fn(Value) -> Result<Value, Value> + Send + Sync>;

enum Backend {
    Runtime(Arc<RuntimeApi>, Duration),
    Script(Script, Duration),
}

struct InvokeState {
    backend: Backend,
    /// Payloads received, in order, with the `Qualifier` each named (an alias or a version).
    payloads: Mutex<Vec<(Value, Option<String>)>>,
    /// Answer a function error as `cargo lambda watch` does: HTTP 500, no error header.
    errors_as_cargo_lambda: std::sync::atomic::AtomicBool,
}

/// A running Invoke API; stops when dropped.
pub struct InvokeApi {
    addr: SocketAddr,
    state: Arc<InvokeState>,
    _server: crate::ServerHandle,
}

impl InvokeApi {
    /// Invocations reach `runtime` with `timeout` as the function's deadline.
    pub async fn start(runtime: Arc<RuntimeApi>, timeout: Duration) -> std::io::Result<Self> {
        Self::start_on(0, runtime, timeout).await
    }

    /// As [`InvokeApi::start`], on `127.0.0.1:{port}` (0: a free port).
    pub async fn start_on(
        port: u16,
        runtime: Arc<RuntimeApi>,
        timeout: Duration,
    ) -> std::io::Result<Self> {
        Self::serve(port, Backend::Runtime(runtime, timeout)).await
    }

    /// Answers with `script`, each answer after `delay` (a function that takes its time).
    pub async fn scripted(script: Script, delay: Duration) -> std::io::Result<Self> {
        Self::serve(0, Backend::Script(script, delay)).await
    }

    /// From now on, answers a function error as `cargo lambda watch` does.
    pub fn errors_as_cargo_lambda(&self) {
        let flag = &self.state.errors_as_cargo_lambda;
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    async fn serve(port: u16, backend: Backend) -> std::io::Result<Self> {
        let state = Arc::new(InvokeState {
            backend,
            payloads: Mutex::default(),
            errors_as_cargo_lambda: Default::default(),
        });
        let router = Router::new()
            .route("/2015-03-31/functions/{name}/invocations", post(invoke))
            .with_state(state.clone());
        let (addr, server) = crate::serve(port, router).await?;
        Ok(Self {
            addr,
            state,
            _server: server,
        })
    }

    /// For `--endpoint-url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn payloads(&self) -> Vec<Value> {
        let payloads = self.state.payloads.lock().unwrap();
        payloads
            .iter()
            .map(|(payload, _)| payload.clone())
            .collect()
    }

    /// The `Qualifier` each invocation named, in order (`None`: the function unqualified).
    pub fn qualifiers(&self) -> Vec<Option<String>> {
        let payloads = self.state.payloads.lock().unwrap();
        payloads
            .iter()
            .map(|(_, qualifier)| qualifier.clone())
            .collect()
    }
}

async fn invoke(
    State(state): State<Arc<InvokeState>>,
    Path(_name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let payload: Value = match serde_json::from_slice(&body) {
        Ok(payload) => payload,
        Err(e) => {
            let message = format!("Could not parse request body into json: {e}");
            let body = serde_json::json!({"Type": "User", "message": message});
            return (StatusCode::BAD_REQUEST, body.to_string()).into_response();
        }
    };
    let qualifier = query.get("Qualifier").cloned();
    state
        .payloads
        .lock()
        .unwrap()
        .push((payload.clone(), qualifier));
    let answer = match &state.backend {
        Backend::Runtime(runtime, timeout) => runtime.invoke(payload, *timeout).await,
        Backend::Script(script, delay) => {
            tokio::time::sleep(*delay).await;
            script(payload)
        }
    };
    match answer {
        Ok(answer) => (StatusCode::OK, answer.to_string()).into_response(),
        Err(error)
            if state
                .errors_as_cargo_lambda
                .load(std::sync::atomic::Ordering::SeqCst) =>
        {
            (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response()
        }
        // A function error is still a 200, flagged in a header, as Lambda answers.
        Err(error) => {
            let mut response = (StatusCode::OK, error.to_string()).into_response();
            response.headers_mut().insert(
                "x-amz-function-error",
                HeaderValue::from_static("Unhandled"),
            );
            response
        }
    }
}
