//! The Cloudflare Workers KV adapter: bulk writes, bulk deletes and single reads under
//! `{base}/accounts/{account}/storage/kv/namespaces/{namespace}`, with the retry rules the
//! exporter depends on (docs/contract.md, "Cloudflare KV calls").

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use reqwest::{header, Method, StatusCode, Url};
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::domain::kv::KvRequest;
use crate::domain::{ApiToken, Namespace};
use crate::ports::{KeyFailures, KvCounters, KvStore, PortError, TokenSource};

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Retries after the first attempt, for 5xx, 429, timeouts and connection errors.
    pub max_retries: u32,
    pub base_delay: Duration,
    pub max_delay: Duration,
    pub request_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 4,
            base_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(8),
            request_timeout: Duration::from_secs(15),
        }
    }
}

impl RetryPolicy {
    /// Exponential backoff with equal jitter: half the step is fixed, half random.
    fn backoff(&self, retry: u32) -> Duration {
        let step = self
            .base_delay
            .saturating_mul(1u32 << retry.min(16))
            .min(self.max_delay);
        let half = step / 2;
        half + half.mul_f64(fastrand::f64())
    }
}

#[derive(Debug, Clone)]
pub struct CloudflareConfig {
    pub api_base_url: Url,
    pub account_id: String,
    pub settings_namespace_id: String,
    pub query_config_namespace_id: String,
}

pub struct CloudflareKv<T> {
    http: reqwest::Client,
    config: CloudflareConfig,
    retry: RetryPolicy,
    tokens: T,
    /// The token in use; refetched once when Cloudflare rejects it (a rotation).
    token: Mutex<Option<ApiToken>>,
    attempts: AtomicUsize,
    retries: AtomicUsize,
}

/// Cloudflare's response envelope.
#[derive(Deserialize, Default)]
struct Envelope {
    #[serde(default)]
    success: bool,
    #[serde(default)]
    errors: Vec<EnvelopeError>,
    #[serde(default)]
    result: Option<BulkResult>,
}

#[derive(Deserialize)]
struct EnvelopeError {
    code: Option<i64>,
    message: Option<String>,
}

/// `GET /keys`: one page of names, and the cursor of the next page ("" at the end).
#[derive(Deserialize)]
struct KeyPage {
    #[serde(default)]
    result: Vec<KeyName>,
    #[serde(default)]
    result_info: Option<ResultInfo>,
}

#[derive(Deserialize)]
struct KeyName {
    name: String,
}

#[derive(Deserialize)]
struct ResultInfo {
    #[serde(default)]
    cursor: Option<String>,
}

#[derive(Deserialize, Default)]
struct BulkResult {
    #[serde(default)]
    unsuccessful_keys: Vec<String>,
}

/// The last answer of a call, after the transport-level retries.
/// Bodies are kept as text: Cloudflare answers JSON, and our values are UTF-8 JSON.
struct Answer {
    status: StatusCode,
    body: String,
}

fn describe(status: StatusCode, body: &str) -> String {
    let envelope: Envelope = serde_json::from_str(body).unwrap_or_default();
    let errors: Vec<String> = envelope
        .errors
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e.code.map(|c| c.to_string()).unwrap_or_default(),
                e.message.as_deref().unwrap_or("")
            )
            .trim()
            .to_owned()
        })
        .collect();
    if errors.is_empty() {
        format!("HTTP {}", status.as_u16())
    } else {
        format!("HTTP {} ({})", status.as_u16(), errors.join("; "))
    }
}

fn retry_after(headers: &header::HeaderMap) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?;
    value
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
}

impl<T: TokenSource> CloudflareKv<T> {
    pub fn new(config: CloudflareConfig, retry: RetryPolicy, tokens: T) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .expect("a TLS backend is compiled in");
        Self {
            http,
            config,
            retry,
            tokens,
            token: Mutex::new(None),
            attempts: AtomicUsize::new(0),
            retries: AtomicUsize::new(0),
        }
    }

    fn namespace_url(&self, namespace: Namespace, tail: &[&str]) -> Url {
        let namespace_id = match namespace {
            Namespace::Settings => &self.config.settings_namespace_id,
            Namespace::QueryConfigs => &self.config.query_config_namespace_id,
        };
        let mut url = self.config.api_base_url.clone();
        url.path_segments_mut()
            .expect("an http(s) base URL")
            .pop_if_empty()
            .extend([
                "accounts",
                &self.config.account_id,
                "storage",
                "kv",
                "namespaces",
            ])
            .push(namespace_id)
            .extend(tail);
        url
    }

    async fn token(&self, refresh: bool) -> Result<ApiToken, PortError> {
        let mut current = self.token.lock().await;
        match &*current {
            Some(token) if !refresh => Ok(token.clone()),
            _ => {
                let token = self
                    .tokens
                    .fetch_token()
                    .await
                    .map_err(|e| e.context("cannot fetch the Cloudflare API token"))?;
                *current = Some(token.clone());
                Ok(token)
            }
        }
    }

    /// One call with the transport-level rules: retries on 5xx, 429 (honouring
    /// `Retry-After`), timeouts and connection errors; one token refetch on 401/403. Returns
    /// the final answer (2xx, 404, other 4xx) or why it gave up.
    async fn call(
        &self,
        method: Method,
        url: &Url,
        body: Option<Bytes>,
        deadline: Instant,
    ) -> Result<Answer, PortError> {
        let mut retries = 0;
        let mut refreshed = false;
        let mut refresh = false;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(PortError::Transient(
                    "the invocation deadline is near; not sent".into(),
                ));
            }
            let timeout = self.retry.request_timeout.min(deadline - now);
            let refresh_now = std::mem::take(&mut refresh);
            // The SDK already retried Secrets Manager: without a token, give up at once.
            let token = self.token(refresh_now).await?;
            self.attempts.fetch_add(1, Ordering::Relaxed);
            let attempt = async {
                let mut request = self
                    .http
                    .request(method.clone(), url.clone())
                    .bearer_auth(token.expose())
                    .timeout(timeout);
                if let Some(body) = &body {
                    // `Bytes` clones share the buffer: a retry does not copy the body.
                    request = request
                        .header(header::CONTENT_TYPE, "application/json")
                        .body(body.clone());
                }
                let response = request.send().await.map_err(|e| transport_error(&e))?;
                let status = response.status();
                let wait = retry_after(response.headers());
                let body = response.text().await.map_err(|e| transport_error(&e))?;
                Ok::<_, String>((status, wait, body))
            };
            let (reason, wait) = match attempt.await {
                Ok((status, _, _))
                    if (status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN)
                        && !refreshed =>
                {
                    // A rotated token: fetch the current one once, then try again at once.
                    tracing::warn!(
                        status = status.as_u16(),
                        "Cloudflare rejected the API token; refetching it from Secrets Manager"
                    );
                    refreshed = true;
                    refresh = true;
                    continue;
                }
                Ok((status, wait, body))
                    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS =>
                {
                    (describe(status, &body), wait)
                }
                Ok((status, _, body)) => return Ok(Answer { status, body }),
                Err(reason) => (reason, None),
            };
            if retries >= self.retry.max_retries {
                return Err(PortError::Transient(format!(
                    "{reason}, after {retries} retries"
                )));
            }
            let delay = wait.unwrap_or_else(|| self.retry.backoff(retries));
            if Instant::now() + delay >= deadline {
                return Err(PortError::Transient(format!(
                    "{reason}; stopped retrying to answer before the invocation deadline"
                )));
            }
            retries += 1;
            self.retries.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%reason, retry = retries, delay_ms = delay.as_millis() as u64, "retrying Cloudflare request");
            tokio::time::sleep(delay).await;
        }
    }

    /// A bulk request; keys Cloudflare reports in `unsuccessful_keys` are sent again.
    async fn bulk(&self, request: &KvRequest, deadline: Instant) -> Result<(), KeyFailures> {
        let (method, url) = match request {
            KvRequest::Put { namespace, .. } => {
                (Method::PUT, self.namespace_url(*namespace, &["bulk"]))
            }
            KvRequest::Delete { namespace, .. } => (
                Method::POST,
                self.namespace_url(*namespace, &["bulk", "delete"]),
            ),
        };
        let mut pending = request.clone();
        let mut resends = 0;
        loop {
            let failed = |error: PortError| KeyFailures {
                keys: pending.keys().into_iter().map(str::to_owned).collect(),
                error,
            };
            let answer = self
                .call(
                    method.clone(),
                    &url,
                    Some(Bytes::from(pending.body())),
                    deadline,
                )
                .await
                .map_err(failed)?;
            let envelope: Envelope = serde_json::from_str(&answer.body).unwrap_or_default();
            if !answer.status.is_success() || !envelope.success {
                return Err(failed(refused(answer.status, &answer.body)));
            }
            let unsuccessful = envelope.result.unwrap_or_default().unsuccessful_keys;
            if unsuccessful.is_empty() {
                return Ok(());
            }
            let reason = format!(
                "Cloudflare reported {} unsuccessful keys",
                unsuccessful.len()
            );
            let delay = self.retry.backoff(resends);
            if resends >= self.retry.max_retries || Instant::now() + delay >= deadline {
                return Err(KeyFailures {
                    keys: unsuccessful,
                    error: PortError::Transient(format!("{reason}, after {resends} resends")),
                });
            }
            pending.retain_keys(&unsuccessful);
            resends += 1;
            self.retries.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%reason, resend = resends, "resending unsuccessful keys");
            tokio::time::sleep(delay).await;
        }
    }
}

/// A final answer that is not a success: a client error will not change by itself.
fn refused(status: StatusCode, body: &str) -> PortError {
    let reason = describe(status, body);
    if status.is_client_error() {
        PortError::Permanent(reason)
    } else {
        PortError::Transient(reason)
    }
}

fn transport_error(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "Cloudflare did not answer in time".into()
    } else if e.is_connect() {
        "cannot connect to Cloudflare".into()
    } else {
        format!("Cloudflare request failed: {e}")
    }
}

impl<T: TokenSource> KvStore for CloudflareKv<T> {
    fn counters(&self) -> KvCounters {
        KvCounters {
            attempts: self.attempts.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
        }
    }

    async fn send(&self, request: &KvRequest, deadline: Instant) -> Result<(), KeyFailures> {
        self.bulk(request, deadline).await
    }

    async fn get(
        &self,
        namespace: Namespace,
        key: &str,
        deadline: Instant,
    ) -> Result<Option<String>, PortError> {
        let url = self.namespace_url(namespace, &["values", key]);
        let answer = self.call(Method::GET, &url, None, deadline).await?;
        match answer.status {
            status if status.is_success() => Ok(Some(answer.body)),
            StatusCode::NOT_FOUND => Ok(None),
            status => Err(refused(status, &answer.body)),
        }
    }

    async fn list_keys(
        &self,
        namespace: Namespace,
        prefix: &str,
        deadline: Instant,
    ) -> Result<Vec<String>, PortError> {
        let mut keys = Vec::new();
        let mut cursor = String::new();
        loop {
            let mut url = self.namespace_url(namespace, &["keys"]);
            url.query_pairs_mut()
                .append_pair("prefix", prefix)
                .append_pair("limit", "1000");
            if !cursor.is_empty() {
                url.query_pairs_mut().append_pair("cursor", &cursor);
            }
            let answer = self.call(Method::GET, &url, None, deadline).await?;
            if !answer.status.is_success() {
                return Err(refused(answer.status, &answer.body));
            }
            let page: KeyPage = serde_json::from_str(&answer.body).map_err(|e| {
                PortError::Transient(format!("unreadable key list from Cloudflare: {e}"))
            })?;
            keys.extend(page.result.into_iter().map(|k| k.name));
            match page.result_info.and_then(|i| i.cursor) {
                Some(next) if !next.is_empty() => cursor = next,
                _ => return Ok(keys),
            }
        }
    }
}
