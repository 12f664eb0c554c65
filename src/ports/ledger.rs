//! The function's own table as the core sees it: each index's references
//! and a scheduled reconcile's progress (docs/contract.md, "Concurrent writers").

use std::collections::{BTreeSet, HashMap};
use std::future::Future;

use super::PortError;
use crate::domain::IndexRef;

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

/// What the ledger knows of an index's references to other keys: the shop key its settings
/// hold and the index ids its live aliases point at, as its last exported record left them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IndexRefs {
    pub shop: Option<String>,
    pub targets: BTreeSet<String>,
    /// The index's record was removed: it references nothing.
    pub removed: bool,
}

impl IndexRefs {
    /// What the index refers to: each is the key of an item pointing back at it.
    pub fn referred(&self) -> BTreeSet<Referred> {
        let shops = self.shop.iter().cloned().map(Referred::Shop);
        let aliases = self.targets.iter().cloned().map(Referred::Alias);
        shops.chain(aliases).collect()
    }
}

/// An index's references to record, and every item that may point back at it now (what was
/// recorded before, and what its batch added before its writes): those `new` does not name
/// are deleted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefsChange {
    pub index: IndexRef,
    pub pointing: BTreeSet<Referred>,
    pub new: IndexRefs,
}

/// An index's references to record only where the ledger still holds `read` (`None`: nothing
/// recorded): a writer whose read of the table may be older than the stream's word (an
/// operator's seed, a reconcile's repair) never replaces it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefsRepair {
    pub index: IndexRef,
    pub read: Option<IndexRefs>,
    pub new: IndexRefs,
}

/// Who is asked for: the indexes whose live aliases point at an index id, or that claim a shop.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Referred {
    Alias(String),
    Shop(String),
}

/// The function's own table (the export ledger, docs/contract.md): each index's references
/// (and who references an index id or a shop), and where a scheduled reconcile keeps its
/// progress.
pub trait Ledger: Send + Sync {
    /// Whether every index's references were recorded (a full backfill completed): only
    /// then can a missing referrer be taken to mean none.
    fn references_complete(&self) -> impl Future<Output = Result<bool, PortError>> + Send;

    fn mark_references_complete(&self) -> impl Future<Output = Result<(), PortError>> + Send;

    /// The recorded references of these indexes (consistent reads); absent: never recorded.
    fn index_refs(
        &self,
        indexes: &[IndexRef],
    ) -> impl Future<Output = Result<HashMap<IndexRef, IndexRefs>, PortError>> + Send;

    /// The indexes recorded as referring to any of `referred` (consistent; may hold stale
    /// entries, which a reader checks against the table).
    fn referrers(
        &self,
        referred: &[Referred],
    ) -> impl Future<Output = Result<Vec<IndexRef>, PortError>> + Send;

    /// Adds the items naming each index under what it refers to (before the KV writes that
    /// make it a referrer: a reader may find a referrer too many, never one too few).
    fn point_back(
        &self,
        items: &[(IndexRef, Referred)],
    ) -> impl Future<Output = Result<(), PortError>> + Send;

    /// Which of these items pointing back exist (consistent reads).
    fn pointing(
        &self,
        items: &[(IndexRef, Referred)],
    ) -> impl Future<Output = Result<Vec<(IndexRef, Referred)>, PortError>> + Send;

    /// Records each index's new references (the stream's, which replace what is recorded),
    /// then deletes the items pointing back that they no longer name, all indexes at once.
    fn record_refs(
        &self,
        changes: &[RefsChange],
    ) -> impl Future<Output = Result<(), PortError>> + Send;

    /// Records each index's references where what is recorded is still what was read (items
    /// pointing back are neither added nor deleted). Answers how many were recorded.
    fn repair_refs(
        &self,
        repairs: &[RefsRepair],
    ) -> impl Future<Output = Result<usize, PortError>> + Send;

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
