//! Claims on KV keys, taken in the ledger around every KV write so that concurrent writers
//! never undo each other (docs/contract.md, "Concurrent writers").
//!
//! The stream claims each key it is about to write, whoever held it: its record is the newest
//! word on its item. An override filter depends on other items, so the stream reads the
//! filter's claim before it reads the overrides and claims it only if nobody claimed since.
//! An operator (re-export, verify, backfill, reconcile) claims every key it writes, whoever
//! held it, and reads the claims back after writing: a key another writer claimed meanwhile may
//! hold that writer's value or this one's older one, so it is recomputed from the table as it is
//! now and written again (`converge.rs`).

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher as _, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt as _;

use tokio::time::Instant;

use super::{Exporter, Run};
use crate::domain::{IndexRef, KvKey, Namespace};
use crate::pipeline::plan::{self, Lookups};
use crate::pipeline::records::ChangeRecord;
use crate::ports::{before_deadline, Ports};
use crate::ports::{Claim, KeyClaim, Ledger, PortError, Referred};

/// Conditional claims in flight at once.
const CONCURRENT_CLAIMS: usize = 16;

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

/// One planned operation as claims see it.
#[derive(Debug)]
pub struct Planned {
    pub key: KvKey,
    /// The index whose value is put (`None`: a delete).
    pub value_of: Option<IndexRef>,
    /// The index of the record that planned it.
    pub record_of: Option<IndexRef>,
    /// The digest of the value put (`None`: a delete).
    pub digest: Option<String>,
    /// A query config's: its override's query.
    pub query: Option<String>,
}

impl Planned {
    fn claim(self) -> KeyClaim {
        KeyClaim {
            key: self.key,
            owner: self.value_of,
            digest: self.digest,
            query: self.query,
        }
    }
}

/// What a stream batch read of claims before reading what its derived keys depend on.
#[derive(Debug, Default)]
pub struct StreamReads {
    /// Filters: their claims' tokens, read before the overrides.
    pub filters: HashMap<KvKey, Option<String>>,
    /// Shop keys an index gives up: their claims, read before the claimers' settings.
    pub shops: HashMap<KvKey, Result<Option<Claim>, PortError>>,
}

/// Whether a shop key an index gave up may still be deleted or repointed by it: nobody wrote
/// it since the index did (or it was deleted), or the claimer's own value is what it holds.
fn gives_up(read: Option<&Claim>, op: &Planned) -> bool {
    let Some(read) = read else { return true };
    match &read.owner {
        None => true,
        Some(writer) => {
            Some(writer) == op.record_of.as_ref() || Some(writer) == op.value_of.as_ref()
        }
    }
}

/// What the claims decided before anything was sent.
#[derive(Debug, Default)]
pub struct Guard {
    pub claim: Option<Claim>,
    /// Not sent: the claim could not be taken (the ledger failed, or, for the stream's
    /// filters, another writer claimed it while the overrides were read).
    pub refused: Vec<(KvKey, PortError)>,
    /// Claimed on a condition: read back after the write.
    pub to_check: Vec<KvKey>,
    /// Not sent, on purpose, with why: a shop key another index's value holds now.
    pub dropped: Vec<(KvKey, String)>,
}

impl<P: Ports> Exporter<P> {
    /// Claims the keys about to be written, as `run` claims them (nothing without a ledger).
    pub(super) async fn claim(
        &self,
        ops: Vec<Planned>,
        run: Run,
        reads: &StreamReads,
        deadline: Instant,
    ) -> Guard {
        if !self.ledger.enabled() || ops.is_empty() {
            return Guard::default();
        }
        if run.is_stream() {
            return self.claim_for_stream(ops, reads, deadline).await;
        }
        self.claim_for_operator(ops, deadline).await
    }

    /// The claims of the shop keys the batch's indexes give up, read before the settings of
    /// whoever else claims those shops are (a failed read refuses those keys later).
    pub(super) async fn read_shop_claims(
        &self,
        records: &[ChangeRecord],
        lookups: &Lookups,
    ) -> HashMap<KvKey, Result<Option<Claim>, PortError>> {
        let keys: Vec<KvKey> = (plan::reference_questions(records, lookups).into_iter())
            .filter_map(|asked| match asked {
                Referred::Shop(shop) => Some(KvKey::settings(shop)),
                Referred::Alias(_) => None,
            })
            .collect();
        match self.read_claims(&keys).await {
            Ok(mut read) => (keys.into_iter())
                .map(|k| {
                    let claim = read.remove(&k);
                    (k, Ok(claim))
                })
                .collect(),
            Err(e) => keys.into_iter().map(|k| (k, Err(e.clone()))).collect(),
        }
    }

    /// The current claims of `keys` (a stream batch reads its filters' before their overrides;
    /// a reconcile compares them with what the table implies).
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

    /// The stream's claims: its records' own keys at once, whoever held them; keys derived
    /// from other items (filters, shop keys an index gives up) only if unclaimed since read.
    pub(super) async fn claim_for_stream(
        &self,
        ops: Vec<Planned>,
        reads: &StreamReads,
        deadline: Instant,
    ) -> Guard {
        let claim = new_claim();
        let mut guard = Guard::default();
        let (mut own, mut conditional) = (Vec::new(), Vec::new());
        for op in ops {
            if let Some(read) = reads.filters.get(&op.key) {
                let read = read.clone();
                conditional.push((op.claim(), read));
                continue;
            }
            let derived = op.value_of.is_none() || op.value_of != op.record_of;
            let shop = reads.shops.get(&op.key).filter(|_| derived);
            let Some(read) = shop else {
                own.push(op.claim());
                continue;
            };
            match read {
                Err(e) => guard.refused.push((op.key, e.clone())),
                Ok(read) if gives_up(read.as_ref(), &op) => {
                    let read = read.as_ref().map(|c| c.token.clone());
                    conditional.push((op.claim(), read))
                }
                Ok(read) => {
                    let writer = read.as_ref().and_then(|c| c.owner.as_ref());
                    let note = format!(
                        "shop key `{}` was written for index {} since: left to it",
                        op.key.key,
                        writer.map_or("?".into(), |w| w.to_string())
                    );
                    guard.dropped.push((op.key, note));
                }
            }
        }
        guard
            .refused
            .extend(self.claim_all(own, &claim, deadline).await);
        let conditional = conditional.into_iter();
        for (key, answer) in self.claim_each(conditional, &claim, deadline).await {
            match answer {
                Ok(true) => guard.to_check.push(key),
                Ok(false) => {
                    let reason = format!(
                        "another writer wrote `{}` while this batch read what it depends on",
                        key.key
                    );
                    guard.refused.push((key, PortError::Transient(reason)));
                }
                Err(e) => guard.refused.push((key, e)),
            }
        }
        guard.claim = Some(claim);
        guard
    }

    /// An operator's claims: every key, whoever held it (what it wrote is then checked
    /// against the table, `converge.rs`).
    async fn claim_for_operator(&self, ops: Vec<Planned>, deadline: Instant) -> Guard {
        let claim = new_claim();
        let keys: Vec<KeyClaim> = ops.into_iter().map(Planned::claim).collect();
        Guard {
            refused: self.claim_all(keys, &claim, deadline).await,
            claim: Some(claim),
            ..Guard::default()
        }
    }

    /// Claims every key, whoever held it; answers those not claimed. Keys not claimed by
    /// the deadline are not sent: their records are retried, never held past the timeout.
    async fn claim_all(
        &self,
        keys: Vec<KeyClaim>,
        claim: &Claim,
        deadline: Instant,
    ) -> Vec<(KvKey, PortError)> {
        let claimed = self.ledger.claim_all(&keys, claim);
        let claimed = before_deadline(deadline, "ledger claims", async { Ok(claimed.await) });
        claimed.await.unwrap_or_else(|e| {
            // Some may have landed, as when a KV write fails after its claim: the retry rewrites.
            keys.into_iter().map(|k| (k.key, e.clone())).collect()
        })
    }

    /// Claims each key if its claim is still the one read; one not claimed by the deadline
    /// answers a transient error (its record is retried).
    async fn claim_each(
        &self,
        keys: impl Iterator<Item = (KeyClaim, Option<String>)> + Send,
        claim: &Claim,
        deadline: Instant,
    ) -> Vec<(KvKey, Result<bool, PortError>)> {
        futures::stream::iter(keys)
            .map(|(key, read)| async move {
                let claimed = self.ledger.claim_if(&key, read.as_deref(), claim);
                let answer = before_deadline(deadline, "ledger claim", claimed).await;
                (key.key, answer)
            })
            .buffer_unordered(CONCURRENT_CLAIMS)
            .collect()
            .await
    }

    /// The keys of `guard.to_check` that were sent and are claimed by someone else now: the
    /// other writer may have written before this one's write landed. Unreadable counts as lost.
    pub(super) async fn lost(
        &self,
        guard: &Guard,
        sent: &HashSet<&KvKey>,
        deadline: Instant,
    ) -> Vec<KvKey> {
        let (Some(claim), false) = (&guard.claim, guard.to_check.is_empty()) else {
            return Vec::new();
        };
        let written: Vec<KvKey> = guard
            .to_check
            .iter()
            .filter(|k| sent.contains(k))
            .cloned()
            .collect();
        let read_back = before_deadline(deadline, "ledger claims", self.read_claims(&written));
        match read_back.await {
            Ok(now) => written
                .into_iter()
                .filter(|k| now.get(k).is_none_or(|c| c.token != claim.token))
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "claims not read back after writing; taken as lost");
                written
            }
        }
    }
}
