//! A local Lambda runtime API (the interface `lambda_runtime` polls), so a test or the demo
//! can run the real bootstrap binary and invoke it like Lambda does: `next`, then `response`
//! or `error`, with the request id, deadline and function ARN headers.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

pub const FUNCTION_ARN: &str =
    "arn:aws:lambda:eu-west-1:000000000000:function:ecom-settings-exporter";

struct Invocation {
    id: String,
    payload: Value,
    deadline_ms: u128,
}

struct RuntimeState {
    queue: tokio::sync::Mutex<mpsc::Receiver<Invocation>>,
    waiting: Mutex<HashMap<String, oneshot::Sender<Result<Value, Value>>>>,
    init_error: Mutex<Option<Value>>,
    /// When the function first asked for an invocation: the end of its cold start.
    first_poll: Mutex<Option<std::time::Instant>>,
}

type Shared = Arc<RuntimeState>;

pub struct RuntimeApi {
    addr: SocketAddr,
    state: Shared,
    sender: mpsc::Sender<Invocation>,
    next_id: Mutex<u64>,
    _server: crate::ServerHandle,
}

impl RuntimeApi {
    pub async fn start(port: u16) -> std::io::Result<Self> {
        let (sender, receiver) = mpsc::channel(64);
        let state = Arc::new(RuntimeState {
            queue: tokio::sync::Mutex::new(receiver),
            waiting: Mutex::default(),
            init_error: Mutex::default(),
            first_poll: Mutex::default(),
        });
        let router = Router::new()
            .route("/2018-06-01/runtime/invocation/next", get(next))
            .route(
                "/2018-06-01/runtime/invocation/{id}/response",
                post(response),
            )
            .route("/2018-06-01/runtime/invocation/{id}/error", post(error))
            .route("/2018-06-01/runtime/init/error", post(init_error))
            .with_state(state.clone());
        let (addr, server) = crate::serve(port, router).await?;
        Ok(Self {
            addr,
            state,
            sender,
            next_id: Mutex::new(0),
            _server: server,
        })
    }

    /// What `AWS_LAMBDA_RUNTIME_API` should be.
    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }

    /// Invokes the function; `Ok` is its response, `Err` the error document it posted.
    /// `timeout` is the invocation's deadline as the function sees it.
    pub async fn invoke(&self, payload: Value, timeout: Duration) -> Result<Value, Value> {
        let id = {
            let mut next = self.next_id.lock().unwrap();
            *next += 1;
            format!("req-{:06}", *next)
        };
        let (tx, rx) = oneshot::channel();
        self.state.waiting.lock().unwrap().insert(id.clone(), tx);
        let deadline_ms = (SystemTime::now() + timeout)
            .duration_since(UNIX_EPOCH)
            .expect("after the epoch")
            .as_millis();
        self.sender
            .send(Invocation {
                id,
                payload,
                deadline_ms,
            })
            .await
            .map_err(|_| Value::String("runtime API stopped".into()))?;
        // Like Lambda, give the function a little past its deadline before calling it lost.
        match tokio::time::timeout(timeout + Duration::from_secs(2), rx).await {
            Ok(Ok(answer)) => answer,
            _ => Err(Value::String("Task timed out".into())),
        }
    }

    /// When the function first polled for an invocation.
    pub fn first_poll(&self) -> Option<std::time::Instant> {
        *self.state.first_poll.lock().unwrap()
    }

    pub fn init_error(&self) -> Option<Value> {
        self.state.init_error.lock().unwrap().clone()
    }
}

async fn next(State(state): State<Shared>) -> Response {
    state
        .first_poll
        .lock()
        .unwrap()
        .get_or_insert_with(std::time::Instant::now);
    let invocation = state.queue.lock().await.recv().await;
    let Some(invocation) = invocation else {
        return StatusCode::GONE.into_response();
    };
    let mut headers = HeaderMap::new();
    let header = |v: &str| HeaderValue::from_str(v).expect("ASCII header");
    headers.insert("lambda-runtime-aws-request-id", header(&invocation.id));
    headers.insert(
        "lambda-runtime-deadline-ms",
        header(&invocation.deadline_ms.to_string()),
    );
    headers.insert("lambda-runtime-invoked-function-arn", header(FUNCTION_ARN));
    headers.insert(
        "lambda-runtime-trace-id",
        header("Root=1-00000000-000000000000000000000000"),
    );
    headers.insert("content-type", header("application/json"));
    (headers, invocation.payload.to_string()).into_response()
}

fn parse(body: &Bytes) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into()))
}

fn complete(state: &Shared, id: &str, answer: Result<Value, Value>) -> Response {
    match state.waiting.lock().unwrap().remove(id) {
        Some(tx) => {
            let _ = tx.send(answer);
            StatusCode::ACCEPTED.into_response()
        }
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn response(State(state): State<Shared>, Path(id): Path<String>, body: Bytes) -> Response {
    complete(&state, &id, Ok(parse(&body)))
}

async fn error(State(state): State<Shared>, Path(id): Path<String>, body: Bytes) -> Response {
    complete(&state, &id, Err(parse(&body)))
}

async fn init_error(State(state): State<Shared>, body: Bytes) -> Response {
    *state.init_error.lock().unwrap() = Some(parse(&body));
    StatusCode::ACCEPTED.into_response()
}
