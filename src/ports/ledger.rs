//! The function's own table as the core sees it: each index's references
//! and a scheduled reconcile's progress (docs/contract.md, "Concurrent writers").

use std::collections::{BTreeSet, HashMap};
use std::future::Future;

use super::PortError;
use crate::domain::IndexRef;
pub use crate::domain::{IndexRefs, Referred, SweepMark};

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

/// A page of the ledger's records of indexes, and the cursor of the next page (`None`: none).
pub type RecordedPage = (Vec<(IndexRef, IndexRefs)>, Option<String>);

/// An index's references confirmed by the stream's check: what `pointing` names (every item
/// that may point back at the index, and every reference of its own, as read before the batch
/// and added by it) that `new` does not name is taken out, on both sides (`new` is `None` for
/// an index removed: its record goes whole), only if the index's intents still number
/// `intents` (what the batch read, and its own intent): an intent another writer recorded
/// meanwhile owns its members, and the index keeps them all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefsChange {
    pub index: IndexRef,
    pub pointing: BTreeSet<Referred>,
    pub new: Option<IndexRefs>,
    pub intents: u64,
    /// The reconcile's sweep: the mark it read ripe, which must still be on the record.
    pub swept: Option<SweepMark>,
}

impl RefsChange {
    /// What the index refers to after the change (nothing once removed).
    pub fn after(&self) -> BTreeSet<Referred> {
        self.new
            .as_ref()
            .map(IndexRefs::referred)
            .unwrap_or_default()
    }
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

    /// Records intents (before the KV writes that make each index a referrer): each index is
    /// added to the set of what it refers to, and what it refers to to the index's own
    /// references, whose intents grow by one (members recorded already included). Only adds: a
    /// reader may find a reference too many, never one too few. Answers the call's birth: an
    /// index's references with no count yet (this call creates them) count `birth + 1`
    /// intents, a number no other call starts from, so a shrink that read an earlier life of
    /// them (since taken out whole) never finds its count again.
    fn point_back(
        &self,
        items: &[(IndexRef, Referred)],
    ) -> impl Future<Output = Result<u64, PortError>> + Send;

    /// Which of these items pointing back exist (consistent reads).
    fn pointing(
        &self,
        items: &[(IndexRef, Referred)],
    ) -> impl Future<Output = Result<Vec<(IndexRef, Referred)>, PortError>> + Send;

    /// Takes out what each change confirmed the index no longer refers to, from its own
    /// references (an index with none recorded gets an empty record; a removed one loses its
    /// record whole) and then from the sets (a set left empty goes), all
    /// indexes at once, for each index whose intents are still those the change names (the
    /// others keep everything). Only members named are taken out: what another writer added
    /// meanwhile stays.
    fn record_refs(
        &self,
        changes: &[RefsChange],
    ) -> impl Future<Output = Result<(), PortError>> + Send;

    /// A page of the indexes whose references the ledger records (consistent reads), from
    /// after `after` (a cursor this answered before; `None`: the first page), about `limit`
    /// items read, and the cursor of the next page (`None`: this was the last).
    fn recorded(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> impl Future<Output = Result<RecordedPage, PortError>> + Send;

    /// Marks each index's record (`Some`, only while its intents are still the mark's) or takes
    /// its mark off (`None`); a record that is not there stays so.
    fn sweep_marks(
        &self,
        marks: &[(IndexRef, Option<SweepMark>)],
    ) -> impl Future<Output = Result<(), PortError>> + Send;

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
