//! The function's own table as the core sees it: claims on KV keys, each index's references,
//! and a scheduled reconcile's progress (docs/contract.md, "Concurrent writers").

use std::collections::HashMap;
use std::future::Future;

use super::PortError;
use crate::domain::kv::KvKey;
use crate::domain::{IndexRef, Namespace};

/// Where a scheduled reconcile stands, kept between invocations (times in seconds since the
/// epoch). `version` grows by one with every save: a save names the version it read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReconcileProgress {
    pub version: u64,
    /// Where the pass under way goes on; `None` between passes.
    pub token: Option<String>,
    pub pass_started_at: Option<u64>,
    /// Drift found so far by the pass under way (missing + stale + orphaned).
    pub pass_drift: u64,
    pub last_full_pass_at: Option<u64>,
    /// Drift the last full pass found.
    pub last_pass_drift: u64,
    /// An invocation holds the pass until then; another one leaves it alone.
    pub lease_until: Option<u64>,
}

/// A writer's word that it is about to write a KV key (docs/contract.md, "Concurrent
/// writers"): the last claim of a key names the last writer that may still be writing it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// Unique to one writer's run: a read-back that finds another token finds another writer.
    pub token: String,
    /// The index whose value the writer puts under the key (`None`: it deletes the key).
    pub owner: Option<IndexRef>,
    /// The digest of the value put (the key metadata's); `None` for a delete, or when KV is
    /// not known to hold it (the write failed, or a reconcile found KV differs).
    pub digest: Option<String>,
    /// For a query config's key: the override's query (its table item is
    /// `INDEX#{index}#QUERY#{query}`), so a reconcile checks it with a read by key.
    pub query: Option<String>,
}

/// A key a writer is about to write: whose value goes under it and that value's digest
/// (`None` for both: a delete).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyClaim {
    pub key: KvKey,
    pub owner: Option<IndexRef>,
    pub digest: Option<String>,
    /// A query config's: its override's query.
    pub query: Option<String>,
}

/// What the ledger knows of an index's references to other keys: the shop key its settings
/// hold and the index ids its live aliases point at, as its last exported record left them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IndexRefs {
    pub shop: Option<String>,
    pub targets: std::collections::BTreeSet<String>,
    /// The index's record was removed: it references nothing.
    pub removed: bool,
}

/// An index's references as recorded before (`None`: never) and as they are now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefsChange {
    pub index: IndexRef,
    pub old: Option<IndexRefs>,
    pub new: IndexRefs,
}

/// Who is asked for: the indexes whose live aliases point at an index id, or that claim a shop.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Referred {
    Alias(String),
    Shop(String),
}

/// The function's own table (the export ledger, docs/contract.md): the claims writers take on
/// KV keys, each index's references (and who references an index id or a shop), and where a
/// scheduled reconcile keeps its progress.
pub trait Ledger: Send + Sync {
    /// Whether a ledger table is configured: without one, writers take no claims.
    fn enabled(&self) -> bool {
        true
    }

    /// Whether every index's references were recorded (a full backfill completed): only
    /// then can a missing referrer be taken to mean none.
    fn references_complete(&self) -> impl Future<Output = Result<bool, PortError>> + Send;

    fn mark_references_complete(&self) -> impl Future<Output = Result<(), PortError>> + Send;

    /// The recorded references of these indexes (consistent reads); absent: never recorded.
    fn index_refs(
        &self,
        indexes: &[IndexRef],
    ) -> impl Future<Output = Result<HashMap<IndexRef, IndexRefs>, PortError>> + Send;

    /// The indexes recorded as referring to `referred` (consistent; may hold stale entries,
    /// which a reader checks against [`Ledger::index_refs`]).
    fn referrers(
        &self,
        referred: &Referred,
    ) -> impl Future<Output = Result<Vec<IndexRef>, PortError>> + Send;

    /// Records each index's new references (the stream's, which replace what is recorded;
    /// `old`: what was read before), all indexes at once.
    fn record_refs(
        &self,
        changes: &[RefsChange],
    ) -> impl Future<Output = Result<(), PortError>> + Send;

    /// Records an index's references only if none are recorded yet (`Ok(false)`: some were):
    /// an operator's, read from the table before the stream's newer word may have landed.
    fn seed_refs(
        &self,
        index: &IndexRef,
        refs: &IndexRefs,
    ) -> impl Future<Output = Result<bool, PortError>> + Send;

    /// Claims every key, whoever held it (the stream, whose records are the newest word on
    /// their items). Answers the keys that could not be claimed, with why.
    fn claim_all(
        &self,
        keys: &[KeyClaim],
        claim: &Claim,
    ) -> impl Future<Output = Vec<(KvKey, PortError)>> + Send;

    /// The current claim of each key that has one (consistent reads).
    fn claims(
        &self,
        keys: &[KvKey],
    ) -> impl Future<Output = Result<HashMap<KvKey, Claim>, PortError>> + Send;

    /// Claims a key only if its claim is still the one read (`None`: none). `Ok(false)`:
    /// another writer claimed it since; nothing was written.
    fn claim_if(
        &self,
        key: &KeyClaim,
        read: Option<&str>,
        claim: &Claim,
    ) -> impl Future<Output = Result<bool, PortError>> + Send;

    /// The claims of a namespace's keys after `after` up to `upto` (either end open), in key
    /// order: what the ledger says KV holds there, to compare with a page of KV's listing.
    fn claims_between(
        &self,
        namespace: Namespace,
        after: Option<&str>,
        upto: Option<&str>,
    ) -> impl Future<Output = Result<Vec<(String, Claim)>, PortError>> + Send;

    /// Sets (or, `None`, removes) the digest of a key's claim if the claim is still `token`'s:
    /// KV was found to hold that value (or not to hold the claimed one). `Ok(false)`: claimed
    /// since, nothing written.
    fn set_digest(
        &self,
        key: &KvKey,
        token: &str,
        digest: Option<&str>,
    ) -> impl Future<Output = Result<bool, PortError>> + Send;

    fn reconcile_progress(
        &self,
    ) -> impl Future<Output = Result<Option<ReconcileProgress>, PortError>> + Send;

    /// Saves `progress` if the stored one is still at `expected` (`None`: none stored yet).
    /// `Ok(false)`: another invocation saved first, and nothing was written.
    fn save_reconcile_progress(
        &self,
        progress: &ReconcileProgress,
        expected: Option<u64>,
    ) -> impl Future<Output = Result<bool, PortError>> + Send;
}

/// No ledger table: what needs one fails, saying so.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoLedger;

impl Ledger for NoLedger {
    fn enabled(&self) -> bool {
        false
    }

    async fn references_complete(&self) -> Result<bool, PortError> {
        Ok(false)
    }

    async fn mark_references_complete(&self) -> Result<(), PortError> {
        Err(no_ledger())
    }

    async fn index_refs(&self, _: &[IndexRef]) -> Result<HashMap<IndexRef, IndexRefs>, PortError> {
        Err(no_ledger())
    }

    async fn referrers(&self, _: &Referred) -> Result<Vec<IndexRef>, PortError> {
        Err(no_ledger())
    }

    async fn record_refs(&self, _: &[RefsChange]) -> Result<(), PortError> {
        Err(no_ledger())
    }

    async fn seed_refs(&self, _: &IndexRef, _: &IndexRefs) -> Result<bool, PortError> {
        Err(no_ledger())
    }

    async fn claim_all(&self, keys: &[KeyClaim], _: &Claim) -> Vec<(KvKey, PortError)> {
        keys.iter().map(|k| (k.key.clone(), no_ledger())).collect()
    }

    async fn claims(&self, _: &[KvKey]) -> Result<HashMap<KvKey, Claim>, PortError> {
        Err(no_ledger())
    }

    async fn claim_if(&self, _: &KeyClaim, _: Option<&str>, _: &Claim) -> Result<bool, PortError> {
        Err(no_ledger())
    }

    async fn claims_between(
        &self,
        _: Namespace,
        _: Option<&str>,
        _: Option<&str>,
    ) -> Result<Vec<(String, Claim)>, PortError> {
        Err(no_ledger())
    }

    async fn set_digest(&self, _: &KvKey, _: &str, _: Option<&str>) -> Result<bool, PortError> {
        Err(no_ledger())
    }

    async fn reconcile_progress(&self) -> Result<Option<ReconcileProgress>, PortError> {
        Err(no_ledger())
    }

    async fn save_reconcile_progress(
        &self,
        _: &ReconcileProgress,
        _: Option<u64>,
    ) -> Result<bool, PortError> {
        Err(no_ledger())
    }
}

/// What needs the ledger answers when none is configured.
pub fn no_ledger() -> PortError {
    PortError::Permanent("no ledger table is configured (LEDGER_TABLE_NAME)".into())
}
