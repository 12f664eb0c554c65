//! The outside world as the core sees it: one small trait per system, and one error type that
//! says whether trying again can help. Adapters implement these; tests pass fakes.

use std::collections::{HashMap, HashSet};
use std::future::Future;

use serde_dynamo::Item;
use tokio::time::Instant;

use crate::domain::kv::{KvKey, KvRequest};
use crate::domain::{ApiKey, ApiToken, IndexRef, Namespace, SettingsReference};

/// Why an outside system did not answer as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    /// Might succeed later: the record is reported for retry.
    #[error("{0}")]
    Transient(String),
    /// Retrying cannot help (the account has no API key): the record is rejected.
    #[error("{0}")]
    Permanent(String),
}

impl PortError {
    pub fn is_transient(&self) -> bool {
        matches!(self, PortError::Transient(_))
    }

    /// The same kind of error with more said in front.
    pub fn context(self, what: impl std::fmt::Display) -> Self {
        match self {
            PortError::Transient(reason) => PortError::Transient(format!("{what}: {reason}")),
            PortError::Permanent(reason) => PortError::Permanent(format!("{what}: {reason}")),
        }
    }
}

/// Keys a bulk request did not store or delete, and why.
/// A lookup that stops at the invocation's deadline: what it did not reach by then is a
/// transient failure (the record is retried), never a wait past the time Lambda gives.
pub async fn before_deadline<T>(
    deadline: Instant,
    what: &str,
    lookup: impl Future<Output = Result<T, PortError>>,
) -> Result<T, PortError> {
    if Instant::now() >= deadline {
        return Err(PortError::Transient(format!(
            "{what}: not read, the invocation deadline is near"
        )));
    }
    tokio::time::timeout_at(deadline, lookup)
        .await
        .unwrap_or_else(|_| {
            Err(PortError::Transient(format!(
                "{what}: stopped at the invocation deadline"
            )))
        })
}

#[derive(Debug, Clone, PartialEq)]
pub struct KeyFailures {
    pub keys: Vec<String>,
    pub error: PortError,
}

/// A key as listed: its name and the metadata it was written with.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct ListedKey {
    pub name: String,
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
}

/// One page of a key listing; `cursor` is where the next starts (`None` after the last).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyPage {
    pub keys: Vec<ListedKey>,
    pub cursor: Option<String>,
}

/// Running totals of a KV client; a batch's share is the difference of two readings.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct KvCounters {
    pub attempts: usize,
    pub retries: usize,
}

/// The KV operations the exporter needs; the Cloudflare REST API is the real one.
pub trait KvStore: Send + Sync {
    /// Sends one bulk request, retrying as it may. `Err` lists the keys that did not make it,
    /// with why: `Permanent` only for a key refused on its own account.
    fn send(
        &self,
        request: &KvRequest,
        deadline: Instant,
    ) -> impl Future<Output = Result<(), Vec<KeyFailures>>> + Send;

    /// Reads many values with as few requests as Cloudflare allows (100 keys each); an absent
    /// key reads as `None`.
    fn get_many(
        &self,
        namespace: Namespace,
        keys: &[String],
        deadline: Instant,
    ) -> impl Future<Output = Result<HashMap<String, Option<String>>, PortError>> + Send;

    /// One page (up to `limit` names, 10 to 1,000, in order, with their metadata) of the keys
    /// that start with `prefix`, from `cursor`.
    fn list_page(
        &self,
        namespace: Namespace,
        prefix: &str,
        cursor: Option<&str>,
        limit: u32,
        deadline: Instant,
    ) -> impl Future<Output = Result<KeyPage, PortError>> + Send;

    /// Every key of the namespace that starts with `prefix`.
    fn list_keys(
        &self,
        namespace: Namespace,
        prefix: &str,
        deadline: Instant,
    ) -> impl Future<Output = Result<Vec<String>, PortError>> + Send {
        async move {
            let mut keys = Vec::new();
            let mut cursor = None;
            loop {
                let page = self
                    .list_page(namespace, prefix, cursor.as_deref(), 1000, deadline)
                    .await?;
                keys.extend(page.keys.into_iter().map(|k| k.name));
                match page.cursor {
                    Some(next) => cursor = Some(next),
                    None => return Ok(keys),
                }
            }
        }
    }

    /// HTTP attempts and retries so far (for metrics); stores without them count nothing.
    fn counters(&self) -> KvCounters {
        KvCounters::default()
    }
}

/// The API keys service is asked once per (cell, account).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountCell {
    pub cell: String,
    pub account: String,
}

pub trait ApiKeySource: Send + Sync {
    fn fetch(&self, wanted: &AccountCell)
        -> impl Future<Output = Result<ApiKey, PortError>> + Send;
}

/// What one batch's API-key lookups cost, for the log and metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct LookupCounts {
    pub calls: usize,
    pub cache_hits: usize,
}

/// Where the Cloudflare token comes from; fetched at first use and again after a 401/403.
pub trait TokenSource: Send + Sync {
    fn fetch_token(&self) -> impl Future<Output = Result<ApiToken, PortError>> + Send;
}

/// Items of one page and, when there is more, where the next page starts (the table key).
#[derive(Debug, Default)]
pub struct Page {
    pub items: Vec<Item>,
    pub next: Option<Item>,
}

/// What the settings table was asked so far, for answers, tests and the scale benchmark.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct TableCounters {
    /// Queries of one index's overrides (for its filter, or a re-export).
    pub override_queries: usize,
    /// Scans for alias targets and shop claims.
    pub reference_scans: usize,
}

/// The settings table, read only.
pub trait SettingsTable: Send + Sync {
    fn counters(&self) -> TableCounters {
        TableCounters::default()
    }

    /// Every index-settings record's shop id and live alias targets (one paginated scan).
    fn settings_references(
        &self,
    ) -> impl Future<Output = Result<Vec<SettingsReference>, PortError>> + Send;

    /// The `INDEX#{name}` record of an account, if there is one.
    fn index_settings(
        &self,
        index: &IndexRef,
    ) -> impl Future<Output = Result<Option<Item>, PortError>> + Send;

    /// Which of `indexes` have a settings record, and each one's shop (consistent reads).
    fn index_shops(
        &self,
        indexes: &[IndexRef],
    ) -> impl Future<Output = Result<HashMap<IndexRef, Option<String>>, PortError>> + Send;

    /// Which of these overrides (index, query) have a record (consistent reads).
    fn overrides_exist(
        &self,
        overrides: &[(IndexRef, String)],
    ) -> impl Future<Output = Result<HashSet<(IndexRef, String)>, PortError>> + Send;

    /// The index's `INDEX#{name}#QUERY#...` records after `start`, `limit` at most, in sort key
    /// order (a consistent Query); `next` is where the rest begins.
    fn query_configs(
        &self,
        index: &IndexRef,
        start: Option<Item>,
        limit: usize,
    ) -> impl Future<Output = Result<Page, PortError>> + Send;

    /// The normalized queries of every override of the index (a consistent, paginated Query of
    /// `INDEX#{name}#QUERY#`, keys only).
    fn override_queries(
        &self,
        index: &IndexRef,
    ) -> impl Future<Output = Result<Vec<String>, PortError>> + Send;

    /// One page of the table (of one account's records when `account` is given), from `start`.
    fn page(
        &self,
        account: Option<&str>,
        start: Option<Item>,
        limit: i32,
    ) -> impl Future<Output = Result<Page, PortError>> + Send;
}

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
    /// Unique to one writer's run.
    pub token: String,
    /// The ledger's clock when the writer began reading what it writes (see [`Ledger::tick`]).
    pub epoch: u64,
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

    /// Moves the ledger's clock on and answers the new time: an operator ticks before it reads
    /// the table, so a claim stamped with this time or later was taken by a writer that began
    /// after it (a clock in DynamoDB: no two machines' clocks are compared).
    fn tick(&self) -> impl Future<Output = Result<u64, PortError>> + Send;

    /// The ledger's clock now (consistent read; 0 before the first tick).
    fn time(&self) -> impl Future<Output = Result<u64, PortError>> + Send;

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

    async fn tick(&self) -> Result<u64, PortError> {
        Err(no_ledger())
    }

    async fn time(&self) -> Result<u64, PortError> {
        Err(no_ledger())
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
