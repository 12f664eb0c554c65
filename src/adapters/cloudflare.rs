//! The Cloudflare Workers KV adapter: bulk writes, bulk deletes, bulk reads and listing under
//! `{base}/accounts/{account}/storage/kv/namespaces/{namespace}`, with the retry rules the
//! exporter depends on (docs/contract.md, "Cloudflare KV calls").

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use reqwest::{header, Method, StatusCode, Url};
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::pacing::Pacer;
use crate::domain::kv::{KvRequest, MAX_BULK_GET_KEYS};
use crate::domain::{ApiToken, Namespace};
use crate::ports::{KeyFailures, KeyPage, KvCounters, KvStore, ListedKey, PortError, TokenSource};

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
struct ListAnswer {
    #[serde(default)]
    result: Vec<ListedKey>,
    #[serde(default)]
    result_info: Option<ResultInfo>,
}

#[derive(Deserialize)]
struct ResultInfo {
    #[serde(default)]
    cursor: Option<String>,
}

/// `POST /bulk/get` with `type: text`: each key's value, `null` when absent.
#[derive(Deserialize)]
struct BulkGetAnswer {
    result: BulkGetResult,
}

#[derive(Deserialize)]
struct BulkGetResult {
    values: std::collections::HashMap<String, Option<String>>,
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

/// The longest wait a server can ask for: Cloudflare's lockout lasts 5 minutes, so a longer
/// `Retry-After` (a year, a date in 9999) is a fault that must not silence a warm container.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// How long the server asks us to wait: Cloudflare's `retry-after-ms`, or `Retry-After` as
/// seconds or as an HTTP date (both forms RFC 9110 allows); at most [`MAX_RETRY_AFTER`].
fn retry_after(headers: &header::HeaderMap) -> Option<Duration> {
    let text = |name: &str| headers.get(name)?.to_str().ok().map(str::trim);
    let seconds = |value: &str, scale: f64| {
        let wait = value
            .parse::<f64>()
            .ok()
            .filter(|s| !s.is_nan() && *s >= 0.0)?;
        // Out of `Duration`'s range (1e20 s, infinity): as long as allowed, never a panic.
        Some(Duration::try_from_secs_f64(wait * scale).unwrap_or(MAX_RETRY_AFTER))
    };
    let wait = match text("retry-after-ms").and_then(|v| seconds(v, 0.001)) {
        Some(wait) => wait,
        None => {
            let value = text(header::RETRY_AFTER.as_str())?;
            seconds(value, 1.0).or_else(|| {
                let at = httpdate::parse_http_date(value).ok()?;
                Some(
                    at.duration_since(std::time::SystemTime::now())
                        .unwrap_or_default(),
                )
            })?
        }
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

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
            if let Err(held) = self.pacer.acquire(deadline).await {
                // A lockout (or the budget) outlasts this invocation: spend it waiting rather
                // than burning one of Lambda's retries at once.
                tokio::time::sleep_until(deadline).await;
                return Err(PortError::Transient(format!(
                    "{held}; waited until the invocation deadline"
                )));
            }
            let now = Instant::now();
            let timeout = self
                .retry
                .request_timeout
                .min(deadline.saturating_duration_since(now));
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
            let (reason, wait, locked_out) = match attempt.await {
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
                Ok((status, wait, body)) if status == StatusCode::TOO_MANY_REQUESTS => {
                    if let Some(wait) = wait {
                        self.pacer.block_for(wait).await;
                    }
                    (describe(status, &body), wait, true)
                }
                Ok((status, wait, body)) if status.is_server_error() => {
                    (describe(status, &body), wait, false)
                }
                Ok((status, _, body)) => return Ok(Answer { status, body }),
                Err(reason) => (reason, None, false),
            };
            if retries >= self.retry.max_retries {
                return Err(PortError::Transient(format!(
                    "{reason}, after {retries} retries"
                )));
            }
            let delay = wait.unwrap_or_else(|| self.retry.backoff(retries));
            if Instant::now() + delay >= deadline {
                if locked_out {
                    tokio::time::sleep_until(deadline).await;
                    return Err(PortError::Transient(format!(
                        "{reason}; rate limited for {} s, waited until the invocation deadline",
                        delay.as_secs()
                    )));
                }
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

    /// A bulk request, split when Cloudflare refuses it (a 4xx), so that one key it will not
    /// take never fails the rest: each refused part is halved and sent again, within
    /// [`MAX_SPLIT_REQUESTS`]. A key refused alone while other keys landed is its record's own
    /// fault (permanent); when nothing landed, every key is reported for retry.
    async fn split_on_refusal(
        &self,
        request: &KvRequest,
        deadline: Instant,
    ) -> Result<(), Vec<KeyFailures>> {
        let mut parts = std::collections::VecDeque::from([request.clone()]);
        let (mut landed, mut splits) = (false, 0);
        let (mut failures, mut alone) = (Vec::new(), Vec::new());
        while let Some(part) = parts.pop_front() {
            let keys = part.keys().len();
            match self.bulk(&part, deadline).await {
                Ok(()) => landed = true,
                Err(Sent::Refused(failure)) if keys > 1 && splits < MAX_SPLIT_REQUESTS => {
                    let (first, second) = halves(&part);
                    parts.extend([first, second]);
                    splits += 2;
                    tracing::debug!(keys, error = %failure.error, "Cloudflare refused a bulk request; splitting it");
                }
                Err(Sent::Refused(failure)) if keys == 1 => alone.push(failure),
                Err(Sent::Refused(failure) | Sent::Failed(failure)) => failures.push(failure),
            }
        }
        for KeyFailures { keys, error } in alone {
            let error = match landed {
                true => PortError::Permanent(format!("Cloudflare refused this key alone: {error}")),
                false => error,
            };
            failures.push(KeyFailures { keys, error });
        }
        match failures.is_empty() {
            true => Ok(()),
            false => Err(failures),
        }
    }

    /// A bulk request; keys Cloudflare reports in `unsuccessful_keys` are sent again.
    async fn bulk(&self, request: &KvRequest, deadline: Instant) -> Result<(), Sent> {
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
                .call(method.clone(), &url, Some(pending.body()), deadline)
                .await
                .map_err(|e| Sent::Failed(failed(e)))?;
            let envelope: Envelope = serde_json::from_str(&answer.body).unwrap_or_default();
            if !answer.status.is_success() || !envelope.success {
                let failure = failed(refused(answer.status, &answer.body));
                // A key or a size Cloudflare will not take: worth splitting. Auth, rate
                // limits and missing namespaces are no single key's fault.
                return Err(match answer.status.as_u16() {
                    400 | 413 | 422 => Sent::Refused(failure),
                    _ => Sent::Failed(failure),
                });
            }
            let reported = envelope.result.unwrap_or_default().unsuccessful_keys;
            let sent: std::collections::HashSet<&str> = pending.keys().into_iter().collect();
            let (unsuccessful, foreign): (Vec<String>, Vec<String>) = reported
                .into_iter()
                .partition(|key| sent.contains(key.as_str()));
            if !foreign.is_empty() {
                // Nothing to resend for keys we never sent; say so once.
                tracing::warn!(
                    count = foreign.len(),
                    keys = %foreign.iter().take(5).cloned().collect::<Vec<_>>().join(", "),
                    "Cloudflare reported unsuccessful keys that were not in the request; ignored"
                );
            }
            if unsuccessful.is_empty() {
                return Ok(());
            }
            let reason = format!(
                "Cloudflare reported {} unsuccessful keys",
                unsuccessful.len()
            );
            let delay = self.retry.backoff(resends);
            if resends >= self.retry.max_retries || Instant::now() + delay >= deadline {
                return Err(Sent::Failed(KeyFailures {
                    keys: unsuccessful,
                    error: PortError::Transient(format!("{reason}, after {resends} resends")),
                }));
            }
            pending.retain_keys(&unsuccessful);
            resends += 1;
            self.retries.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%reason, resend = resends, "resending unsuccessful keys");
            tokio::time::sleep(delay).await;
        }
    }
}

/// How a bulk request ended when not all of it was written.
enum Sent {
    /// Cloudflare refused the request (400, 413, 422): one of its keys may be the cause.
    Refused(KeyFailures),
    /// Anything else: an outage, a timeout, keys still unsuccessful after resends.
    Failed(KeyFailures),
}

/// Split requests one refused request may cost at most (each counts against the rate limit):
/// enough to isolate a couple of bad keys among 10,000.
const MAX_SPLIT_REQUESTS: usize = 32;

/// A request's first and second half.
fn halves(request: &KvRequest) -> (KvRequest, KvRequest) {
    let keys: Vec<String> = request.keys().into_iter().map(str::to_owned).collect();
    let (first, second) = keys.split_at(keys.len() / 2);
    let (mut a, mut b) = (request.clone(), request.clone());
    a.retain_keys(first);
    b.retain_keys(second);
    (a, b)
}

/// A final answer that is not a success. Transient, a 4xx included: a whole request refused
/// is more likely a misconfiguration fixed later than a fault of every record in it (a key
/// refused alone is told apart in [`CloudflareKv::send`]).
fn refused(status: StatusCode, body: &str) -> PortError {
    if status.is_redirection() {
        return PortError::Transient(format!(
            "HTTP {} from Cloudflare: a redirect, not followed",
            status.as_u16()
        ));
    }
    PortError::Transient(describe(status, body))
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

    async fn send(&self, request: &KvRequest, deadline: Instant) -> Result<(), Vec<KeyFailures>> {
        self.split_on_refusal(request, deadline).await
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
                PortError::Transient(format!("unreadable bulk get answer from Cloudflare: {e}"))
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
            PortError::Transient(format!("unreadable key list from Cloudflare: {e}"))
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

    fn headers(pairs: &[(&'static str, &str)]) -> header::HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| {
                (
                    header::HeaderName::from_static(name),
                    header::HeaderValue::from_str(value).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn retry_after_is_read_in_every_form_and_capped_never_panicking() {
        let wait = |pairs: &[(&'static str, &str)]| retry_after(&headers(pairs));
        assert_eq!(wait(&[("retry-after", "7")]), Some(Duration::from_secs(7)));
        assert_eq!(
            wait(&[("retry-after-ms", "1500"), ("retry-after", "9")]),
            Some(Duration::from_millis(1500))
        );
        let soon = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(30));
        assert!(wait(&[("retry-after", &soon)]).is_some_and(|w| w <= Duration::from_secs(30)));
        for huge in [
            &[("retry-after", "1e20")][..],
            &[("retry-after-ms", "1e25")],
            &[("retry-after", "inf")],
            &[("retry-after", "31536000")],
            &[("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT")],
        ] {
            assert_eq!(wait(huge), Some(MAX_RETRY_AFTER), "{huge:?}");
        }
        for nonsense in ["-1", "NaN", "soon", ""] {
            assert_eq!(wait(&[("retry-after", nonsense)]), None, "{nonsense}");
        }
    }

    #[test]
    fn backoff_grows_to_its_cap_with_half_of_each_step_random() {
        let policy = RetryPolicy::default();
        for retry in 0..40 {
            let step = (policy.base_delay * 2u32.pow(retry.min(16))).min(policy.max_delay);
            let wait = policy.backoff(retry);
            assert!(wait >= step / 2 && wait <= step, "{retry}: {wait:?}");
        }
    }

    #[test]
    fn failures_quote_cloudflare_s_envelope_and_never_follow_a_redirect() {
        let body = r#"{"success": false, "errors": [{"code": 10020, "message": "bad key"}]}"#;
        assert_eq!(
            describe(StatusCode::BAD_REQUEST, body),
            "HTTP 400 (10020 bad key)"
        );
        assert_eq!(describe(StatusCode::BAD_GATEWAY, "<html>"), "HTTP 502");
        let redirect = refused(StatusCode::TEMPORARY_REDIRECT, "");
        assert!(redirect.is_transient());
        assert!(
            redirect.to_string().contains("HTTP 307") && redirect.to_string().contains("redirect")
        );
        assert!(refused(StatusCode::BAD_REQUEST, body).is_transient());
    }
}
