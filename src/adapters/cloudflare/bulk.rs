//! Bulk writes and deletes sent, a few at a time: keys Cloudflare reports unsuccessful sent
//! again, and a request it refuses split in halves, so that one key it will not take never
//! fails the rest.

use std::sync::atomic::Ordering;

use futures::StreamExt as _;
use reqwest::Method;
use tokio::time::Instant;

use super::encode::KvRequest;
use super::wire::{refused, Envelope};
use super::CloudflareKv;
use super::TokenSource;
use crate::domain::KvKey;
use crate::ports::PortError;

/// Keys a bulk request did not store or delete, and why.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct KeyFailures {
    pub keys: Vec<String>,
    pub error: PortError,
}

/// Bulk requests of one batch in flight at once.
const CONCURRENT_REQUESTS: usize = 4;

impl<T: TokenSource> CloudflareKv<T> {
    /// A batch's requests, a few at a time; the keys that did not land, and why.
    pub(super) async fn send_all(
        &self,
        requests: Vec<KvRequest>,
        deadline: Instant,
    ) -> Vec<(KvKey, PortError)> {
        futures::stream::iter(requests)
            .map(|request| async move {
                let failures = self.split_on_refusal(&request, deadline).await.err();
                let namespace = request.namespace();
                let failed = failures.into_iter().flatten().flat_map(move |failure| {
                    let error = failure.error;
                    (failure.keys.into_iter())
                        .map(move |key| (KvKey { namespace, key }, error.clone()))
                });
                futures::stream::iter(failed)
            })
            .buffer_unordered(CONCURRENT_REQUESTS)
            .flatten()
            .collect()
            .await
    }

    /// A bulk request, split when Cloudflare refuses it (a 4xx), so that one key it will not
    /// take never fails the rest: each refused part is halved and sent again, within
    /// [`MAX_SPLIT_REQUESTS`]. A key refused alone while other keys landed is its record's own
    /// fault (permanent); when nothing landed, every key is reported for retry.
    pub(super) async fn split_on_refusal(
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
                true => PortError::Invalid(format!("Cloudflare refused this key alone: {error}")),
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
                    error: PortError::Unavailable(format!("{reason}, after {resends} resends")),
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
