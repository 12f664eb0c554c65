//! Claims on KV keys, taken in the ledger before every KV write: the ledger's record of what KV
//! holds, which a reconcile lists beside KV (docs/contract.md, "Concurrent writers"). Every
//! writer claims its keys whoever held them; what keeps writers from undoing each other is the
//! check of what landed against the table (`converge.rs`), not the claims.

use std::collections::HashMap;
use std::hash::{BuildHasher as _, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::time::Instant;

use super::Exporter;
use crate::domain::{IndexRef, KvKey, Namespace};
use crate::ports::{before_deadline, Ports};
use crate::ports::{Claim, KeyClaim, Ledger, PortError};

/// Milliseconds since the epoch (seeds tokens; never compared across writers).
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// A claim no other writer's can equal (random per process, counted within it).
fn new_claim() -> Claim {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let seed = *SEED.get_or_init(|| RandomState::new().hash_one(now_ms()));
    let count = NEXT.fetch_add(1, Ordering::Relaxed);
    Claim {
        token: format!("{seed:016x}-{count}"),
        owner: None,
        digest: None,
        query: None,
    }
}

impl<P: Ports> Exporter<P> {
    /// Claims the keys about to be written, whoever held them (nothing without a ledger), and
    /// answers those that could not be claimed (the ledger failed, or the deadline came first):
    /// they are not sent, and their records are retried.
    pub(super) async fn claim(
        &self,
        keys: Vec<KeyClaim>,
        deadline: Instant,
    ) -> HashMap<KvKey, PortError> {
        if !self.ledger.enabled() || keys.is_empty() {
            return HashMap::new();
        }
        let claim = new_claim();
        let claimed = self.ledger.claim_all(&keys, &claim);
        let claimed = before_deadline(deadline, "ledger claims", async { Ok(claimed.await) });
        let refused = claimed.await.unwrap_or_else(|e| {
            // Some may have landed, as when a KV write fails after its claim: the retry rewrites.
            keys.into_iter().map(|k| (k.key, e.clone())).collect()
        });
        refused.into_iter().collect()
    }

    /// The current claims of `keys` (a reconcile compares them with what the table implies).
    pub async fn read_claims(&self, keys: &[KvKey]) -> Result<HashMap<KvKey, Claim>, PortError> {
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        self.ledger.claims(keys).await
    }

    /// The claims of a namespace's keys in `(after, upto]`, in key order: what the ledger says
    /// KV holds there.
    pub async fn claims_between(
        &self,
        namespace: Namespace,
        after: Option<&str>,
        upto: Option<&str>,
        deadline: Instant,
    ) -> Result<Vec<(String, Claim)>, PortError> {
        let query = self.ledger.claims_between(namespace, after, upto);
        before_deadline(deadline, "ledger claims", query).await
    }

    /// KV was found holding `digest` for `owner` under `key`: the claim read (`None`: none)
    /// says so from now on, unless someone claimed the key since.
    pub async fn confirm_value(
        &self,
        key: &KvKey,
        read: Option<&Claim>,
        (owner, query): (&IndexRef, Option<&str>),
        digest: &str,
    ) {
        let answer = match read {
            Some(read) => self.ledger.set_digest(key, &read.token, Some(digest)).await,
            None => {
                let write = KeyClaim {
                    key: key.clone(),
                    owner: Some(owner.clone()),
                    digest: Some(digest.to_owned()),
                    query: query.map(str::to_owned),
                };
                self.ledger.claim_if(&write, None, &new_claim()).await
            }
        };
        if let Err(e) = answer {
            let key = crate::domain::validate::cut(&key.key);
            tracing::warn!(%key, error = %e, "the ledger does not know the value KV holds");
        }
    }

    /// KV was found not holding what the claim `token` names: the claim stops naming it.
    pub async fn forget_value(&self, key: &KvKey, token: &str) {
        if let Err(e) = self.ledger.set_digest(key, token, None).await {
            let key = crate::domain::validate::cut(&key.key);
            tracing::warn!(%key, error = %e, "the claim of a key KV lacks still names its value");
        }
    }
}
