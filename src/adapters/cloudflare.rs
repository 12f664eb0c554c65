//! The Cloudflare Workers KV adapter: bulk writes, bulk deletes, bulk reads and listing under
//! `{base}/accounts/{account}/storage/kv/namespaces/{namespace}`, with the retry rules the
//! exporter depends on (docs/contract.md, "Cloudflare KV calls"). Here: the client, one call
//! with its retries, the token and the pacing; `encode.rs` planned operations as bulk requests;
//! `bulk.rs` their sending (resends, splits); `wire.rs` Cloudflare's envelope and headers read.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use reqwest::{header, Method, StatusCode, Url};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::pacing::Pacer;
use crate::domain::kv::{KvKey, KvOp};
use crate::domain::{ApiToken, Namespace};
use crate::ports::{KeyPage, KvStore, PortError};

/// Where the Cloudflare token comes from (Secrets Manager, `adapters/secrets_manager.rs`); fetched at first use and again after a 401/403.
pub trait TokenSource: Send + Sync {
    fn fetch_token(&self) -> impl std::future::Future<Output = Result<ApiToken, PortError>> + Send;
}

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
    /// Requests this client may make per 5 minutes (Cloudflare allows 1,200 per token).
    pub requests_per_5_minutes: u32,
}

pub struct CloudflareKv<T> {
    http: reqwest::Client,
    config: CloudflareConfig,
    retry: RetryPolicy,
    tokens: T,
    /// The token in use; refetched once when Cloudflare rejects it (a rotation).
    token: Mutex<Option<ApiToken>>,
    pacer: Pacer,
    requests: AtomicUsize,
    retries: AtomicUsize,
}

/// The last answer of a call, after the transport-level retries.
/// Bodies are kept as text: Cloudflare answers JSON, and our values are UTF-8 JSON.
struct Answer {
    status: StatusCode,
    body: String,
}

mod bulk;
pub mod encode;
mod wire;

use encode::MAX_BULK_GET_KEYS;

pub use wire::MAX_RETRY_AFTER;
use wire::{describe, refused, retry_after, transport_error};
use wire::{BulkGetAnswer, ListAnswer};

impl<T: TokenSource> CloudflareKv<T> {
    pub fn new(config: CloudflareConfig, retry: RetryPolicy, tokens: T) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            // A redirect would resend the body, API keys inside, to another host.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("a TLS backend is compiled in");
        Self {
            http,
            pacer: Pacer::new(config.requests_per_5_minutes),
            config,
            retry,
            tokens,
            token: Mutex::new(None),
            requests: AtomicUsize::new(0),
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
        let (mut retries, mut refreshed, mut refresh) = (0, false, false);
        loop {
            self.budget(deadline).await?;
            // The SDK already retried Secrets Manager: without a token, give up at once.
            let token = self.token(std::mem::take(&mut refresh)).await?;
            let attempt = self.attempt(&method, url, body.as_ref(), &token, deadline);
            let retry = match attempt.await {
                Attempt::Rejected(status, _) if !refreshed => {
                    // A rotated token: fetch the current one once, then try again at once.
                    tracing::warn!(
                        status = status.as_u16(),
                        "Cloudflare rejected the API token; refetching it from Secrets Manager"
                    );
                    (refreshed, refresh) = (true, true);
                    continue;
                }
                Attempt::Rejected(status, body) => return Ok(Answer { status, body }),
                Attempt::Answered(answer) => return Ok(answer),
                Attempt::Retry(retry) => retry,
            };
            let delay = self.delay_before_retry(retry, retries, deadline).await?;
            retries += 1;
            self.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(delay).await;
        }
    }

    /// Waits for the request budget; past the deadline, or locked out beyond it, gives up.
    async fn budget(&self, deadline: Instant) -> Result<(), PortError> {
        if Instant::now() >= deadline {
            return Err(PortError::PastDeadline(
                "the invocation deadline is near; not sent".into(),
            ));
        }
        if let Err(held) = self.pacer.acquire(deadline).await {
            // A lockout (or the budget) outlasts this invocation: spend it waiting rather
            // than burning one of Lambda's retries at once.
            tokio::time::sleep_until(deadline).await;
            return Err(PortError::Throttled(format!(
                "{held}; waited until the invocation deadline"
            )));
        }
        Ok(())
    }

    /// One HTTP attempt, and what it calls for.
    async fn attempt(
        &self,
        method: &Method,
        url: &Url,
        body: Option<&Bytes>,
        token: &ApiToken,
        deadline: Instant,
    ) -> Attempt {
        let timeout =
            (self.retry.request_timeout).min(deadline.saturating_duration_since(Instant::now()));
        let mut request = (self.http.request(method.clone(), url.clone()))
            .bearer_auth(token.expose())
            .timeout(timeout);
        if let Some(body) = body {
            // `Bytes` clones share the buffer: a retry does not copy the body.
            request = request
                .header(header::CONTENT_TYPE, "application/json")
                .body(body.clone());
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) => return Attempt::Retry(Retry::after(transport_error(&e), None)),
        };
        let status = response.status();
        let wait = retry_after(response.headers());
        let body = match response.text().await {
            Ok(body) => body,
            Err(e) => return Attempt::Retry(Retry::after(transport_error(&e), None)),
        };
        match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Attempt::Rejected(status, body),
            StatusCode::TOO_MANY_REQUESTS => {
                if let Some(wait) = wait {
                    self.pacer.block_for(wait).await;
                }
                Attempt::Retry(Retry {
                    reason: describe(status, &body),
                    wait,
                    locked_out: true,
                })
            }
            _ if status.is_server_error() => {
                Attempt::Retry(Retry::after(describe(status, &body), wait))
            }
            _ => Attempt::Answered(Answer { status, body }),
        }
    }

    /// How long to wait before retrying, or why not to: out of retries, or the wait would
    /// outlast the invocation (a lockout is then waited out, so Lambda's retry comes after it).
    async fn delay_before_retry(
        &self,
        retry: Retry,
        retries: u32,
        deadline: Instant,
    ) -> Result<Duration, PortError> {
        let reason = retry.reason;
        if retries >= self.retry.max_retries {
            return Err(PortError::Unavailable(format!(
                "{reason}, after {retries} retries"
            )));
        }
        let delay = retry.wait.unwrap_or_else(|| self.retry.backoff(retries));
        if Instant::now() + delay >= deadline {
            if retry.locked_out {
                tokio::time::sleep_until(deadline).await;
                return Err(PortError::Throttled(format!(
                    "{reason}; rate limited for {} s, waited until the invocation deadline",
                    delay.as_secs()
                )));
            }
            return Err(PortError::PastDeadline(format!(
                "{reason}; stopped retrying to answer before the invocation deadline"
            )));
        }
        tracing::debug!(%reason, retry = retries + 1, delay_ms = delay.as_millis() as u64, "retrying Cloudflare request");
        Ok(delay)
    }
}

/// What one HTTP attempt calls for.
enum Attempt {
    /// A final answer: 2xx, 404, any other 4xx.
    Answered(Answer),
    /// 401 or 403: the token may have been rotated.
    Rejected(StatusCode, String),
    /// A 5xx, a 429, a timeout or a connection error.
    Retry(Retry),
}

struct Retry {
    reason: String,
    /// What the server asked for (`Retry-After`); otherwise the policy's backoff.
    wait: Option<Duration>,
    /// A 429: the wait is Cloudflare's lockout.
    locked_out: bool,
}

impl Retry {
    fn after(reason: String, wait: Option<Duration>) -> Self {
        Self {
            reason,
            wait,
            locked_out: false,
        }
    }
}

impl<T: TokenSource> KvStore for CloudflareKv<T> {
    fn requests(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }

    fn retries(&self) -> usize {
        self.retries.load(Ordering::Relaxed)
    }

    async fn apply(&self, ops: Vec<KvOp>, deadline: Instant) -> Vec<(KvKey, PortError)> {
        let requests = encode::requests(ops);
        self.requests.fetch_add(requests.len(), Ordering::Relaxed);
        self.send_all(requests, deadline).await
    }

    async fn get_many(
        &self,
        namespace: Namespace,
        keys: &[String],
        deadline: Instant,
    ) -> Result<std::collections::HashMap<String, Option<String>>, PortError> {
        let url = self.namespace_url(namespace, &["bulk", "get"]);
        let mut values = std::collections::HashMap::with_capacity(keys.len());
        for chunk in keys.chunks(MAX_BULK_GET_KEYS) {
            let body = serde_json::to_vec(&serde_json::json!({"keys": chunk, "type": "text"}))
                .expect("strings serialize");
            let answer = self
                .call(Method::POST, &url, Some(Bytes::from(body)), deadline)
                .await?;
            if !answer.status.is_success() {
                return Err(refused(answer.status, &answer.body));
            }
            let page: BulkGetAnswer = serde_json::from_str(&answer.body).map_err(|e| {
                PortError::Unavailable(format!("unreadable bulk get answer from Cloudflare: {e}"))
            })?;
            for key in chunk {
                let value = page.result.values.get(key).cloned().flatten();
                values.insert(key.clone(), value);
            }
        }
        Ok(values)
    }

    async fn list_page(
        &self,
        namespace: Namespace,
        prefix: &str,
        cursor: Option<&str>,
        limit: u32,
        deadline: Instant,
    ) -> Result<KeyPage, PortError> {
        let mut url = self.namespace_url(namespace, &["keys"]);
        url.query_pairs_mut()
            .append_pair("prefix", prefix)
            .append_pair("limit", &limit.clamp(10, 1000).to_string());
        if let Some(cursor) = cursor.filter(|c| !c.is_empty()) {
            url.query_pairs_mut().append_pair("cursor", cursor);
        }
        let answer = self.call(Method::GET, &url, None, deadline).await?;
        if !answer.status.is_success() {
            return Err(refused(answer.status, &answer.body));
        }
        let page: ListAnswer = serde_json::from_str(&answer.body).map_err(|e| {
            PortError::Unavailable(format!("unreadable key list from Cloudflare: {e}"))
        })?;
        Ok(KeyPage {
            keys: page.result,
            cursor: page
                .result_info
                .and_then(|i| i.cursor)
                .filter(|c| !c.is_empty()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_half_of_each_step_random() {
        let policy = RetryPolicy::default();
        for retry in 0..40 {
            let step = (policy.base_delay * 2u32.pow(retry.min(16))).min(policy.max_delay);
            let wait = policy.backoff(retry);
            assert!(wait >= step / 2 && wait <= step, "{retry}: {wait:?}");
        }
    }
}
