//! The outside world as the core sees it: one small trait per system, and one error type that
//! says whether trying again can help. Adapters implement these; tests pass fakes.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;

use tokio::time::Instant;

mod ledger;

pub use ledger::SweepMark;
pub use ledger::{IndexRefs, Ledger, ReconcileProgress, RecordedPage, Referred, RefsChange};

use crate::domain::kv::{KvKey, KvOp};
use crate::domain::{AccountCell, ApiKey, IndexRef, Namespace};
use crate::domain::{ChangeRecord, Scope, TableKey};

/// Why an outside system did not answer as asked: what happened, as the adapter saw it, with
/// the values it names cut to a bound. Whether trying again can help follows from the kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    /// Throttled or rate limited (DynamoDB's throughput, Cloudflare's 429 or its lockout).
    #[error("{0}")]
    Throttled(String),
    /// Not reached, failed (a 5xx), or answered what cannot be read.
    #[error("{0}")]
    Unavailable(String),
    /// Refused as sent by a service whose refusal may pass (DynamoDB's 4xx on a batch's
    /// read): retried, never a batch's records rejected for it.
    #[error("{0}")]
    Refused(String),
    /// Another writer's transaction held an item this one writes, past the retries: the same
    /// write may pass a moment later.
    #[error("{0}")]
    Conflict(String),
    /// The invocation's deadline came first.
    #[error("{0}")]
    PastDeadline(String),
    /// What was asked for is not there (an account without an API key, a secret without a
    /// string): the record is rejected.
    #[error("{0}")]
    NotFound(String),
    /// Never accepted as it is (a key Cloudflare refuses on its own account, a record that
    /// cannot make a request): the record is rejected.
    #[error("{0}")]
    Invalid(String),
}

impl PortError {
    /// Whether a later try may succeed: the record is reported for retry, else rejected.
    pub fn is_transient(&self) -> bool {
        !matches!(self, PortError::NotFound(_) | PortError::Invalid(_))
    }

    /// What happened, in words.
    pub fn reason(&self) -> &str {
        match self {
            PortError::Throttled(reason)
            | PortError::Unavailable(reason)
            | PortError::Refused(reason)
            | PortError::Conflict(reason)
            | PortError::PastDeadline(reason)
            | PortError::NotFound(reason)
            | PortError::Invalid(reason) => reason,
        }
    }

    /// The same kind of error with more said in front.
    pub fn context(self, what: impl std::fmt::Display) -> Self {
        let said = |reason: String| format!("{what}: {reason}");
        match self {
            PortError::Throttled(reason) => PortError::Throttled(said(reason)),
            PortError::Unavailable(reason) => PortError::Unavailable(said(reason)),
            PortError::Refused(reason) => PortError::Refused(said(reason)),
            PortError::Conflict(reason) => PortError::Conflict(said(reason)),
            PortError::PastDeadline(reason) => PortError::PastDeadline(said(reason)),
            PortError::NotFound(reason) => PortError::NotFound(said(reason)),
            PortError::Invalid(reason) => PortError::Invalid(said(reason)),
        }
    }
}

/// Seconds since the epoch: the system's clock, moved on by as much as tokio's runs ahead of
/// it (a test that pauses tokio's time then moves this one too; in the function they agree).
pub fn epoch_seconds() -> u64 {
    let wall = std::time::SystemTime::now();
    let (tokio, system) = (Instant::now().into_std(), std::time::Instant::now());
    let now = match tokio.checked_duration_since(system) {
        Some(ahead) => wall + ahead,
        None => wall - system.duration_since(tokio),
    };
    now.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

/// A lookup that stops at the invocation's deadline: what it did not reach by then is a
/// transient failure (the record is retried), never a wait past the time Lambda gives.
pub async fn before_deadline<T>(
    deadline: Instant,
    what: &str,
    lookup: impl Future<Output = Result<T, PortError>>,
) -> Result<T, PortError> {
    if Instant::now() >= deadline {
        return Err(PortError::PastDeadline(format!(
            "{what}: not read, the invocation deadline is near"
        )));
    }
    tokio::time::timeout_at(deadline, lookup)
        .await
        .unwrap_or_else(|_| {
            Err(PortError::PastDeadline(format!(
                "{what}: stopped at the invocation deadline"
            )))
        })
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

/// The KV operations the exporter needs; the Cloudflare REST API is the real one.
pub trait KvStore: Send + Sync {
    /// Writes and deletes each key as planned (any namespaces), in the order given as far as
    /// its requests allow, retrying as it may until `deadline`. Answers the keys that were not
    /// stored or deleted, and why: `Invalid` only for a key refused on its own account.
    fn apply(
        &self,
        ops: Vec<KvOp>,
        deadline: Instant,
    ) -> impl Future<Output = Vec<(KvKey, PortError)>> + Send;

    /// Reads many values with as few requests as Cloudflare allows (100 keys each); an absent
    /// key reads as `None`.
    fn get_many(
        &self,
        namespace: Namespace,
        keys: &[String],
        deadline: Instant,
    ) -> impl Future<Output = Result<HashMap<String, Option<String>>, PortError>> + Send;

    /// What KV holds under each of `keys` (any namespaces; an absent key is left out): one
    /// bulk read per namespace, 100 keys a request.
    fn values_of<'k>(
        &self,
        keys: impl IntoIterator<Item = &'k KvKey>,
        deadline: Instant,
    ) -> impl Future<Output = Result<HashMap<KvKey, String>, PortError>> + Send {
        let mut by_namespace: BTreeMap<Namespace, Vec<String>> = BTreeMap::new();
        for key in keys {
            by_namespace
                .entry(key.namespace)
                .or_default()
                .push(key.key.clone());
        }
        async move {
            let mut values = HashMap::new();
            for (namespace, keys) in by_namespace {
                let read = self.get_many(namespace, &keys, deadline).await?;
                let held = read
                    .into_iter()
                    .filter_map(|(key, value)| Some((key, value?)));
                values.extend(held.map(|(key, value)| (KvKey { namespace, key }, value)));
            }
            Ok(values)
        }
    }

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

    /// Write requests sent and HTTP retries so far, running totals (a batch's share is the
    /// difference of two readings, for metrics); stores without them count nothing.
    fn requests(&self) -> usize {
        0
    }

    fn retries(&self) -> usize {
        0
    }
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

/// Records of one page, each with its key, what its settings items name of other keys (read
/// fail closed: a rejected record's too), and where the next page starts, when there is more.
#[derive(Debug, Default)]
pub struct Page {
    pub records: Vec<(TableKey, ChangeRecord)>,
    pub references: Vec<(IndexRef, IndexRefs)>,
    pub next: Option<TableKey>,
}

/// The four peers an exporter works with, named as one type so that whatever takes an exporter
/// writes `P: Ports` instead of four bounds. Any four adapters, as a tuple in this order.
pub trait Ports {
    type Kv: KvStore;
    type ApiKeys: ApiKeySource;
    type Table: SettingsTable;
    type Ledger: Ledger;
}

impl<K: KvStore, A: ApiKeySource, T: SettingsTable, L: Ledger> Ports for (K, A, T, L) {
    type Kv = K;
    type ApiKeys = A;
    type Table = T;
    type Ledger = L;
}

/// The settings table, read only.
pub trait SettingsTable: Send + Sync {
    /// What the settings records of `indexes` say about other indexes (their shops and live
    /// aliases), for those that have a record (consistent reads, 100 a call).
    fn index_references(
        &self,
        indexes: &[IndexRef],
    ) -> impl Future<Output = Result<Vec<(IndexRef, IndexRefs)>, PortError>> + Send;

    /// The records with these keys that exist, each handed to `each` as it is read
    /// (consistent reads, 100 a call, several calls at once): what the stream's records are
    /// about, as the table holds it now.
    fn records(
        &self,
        keys: Vec<TableKey>,
        each: impl FnMut(TableKey, ChangeRecord) + Send,
    ) -> impl Future<Output = Result<(), PortError>> + Send;

    /// Every record of `account` from `INDEX#{first}` through the overrides of `INDEX#{last}`,
    /// in sort key order (a consistent, paginated Query): a run of indexes read at once.
    fn index_range(
        &self,
        account: &str,
        first: &str,
        last: &str,
    ) -> impl Future<Output = Result<Vec<(TableKey, ChangeRecord)>, PortError>> + Send;

    /// The normalized queries of every override of the index (a consistent, paginated Query of
    /// `INDEX#{name}#QUERY#`, keys only).
    fn override_queries(
        &self,
        index: &IndexRef,
    ) -> impl Future<Output = Result<Vec<String>, PortError>> + Send;

    /// One page of the records in `scope` after `start` (from the first when `None`), in sort
    /// key order: `limit` items read at most (a consistent Scan or Query; an index's page holds
    /// `limit` records unless it is the last); `next` is where the rest begins.
    fn page(
        &self,
        scope: Scope<'_>,
        start: Option<TableKey>,
        limit: i32,
    ) -> impl Future<Output = Result<Page, PortError>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_happened_decides_whether_a_record_is_retried() {
        let retried = [
            PortError::Throttled("429".into()),
            PortError::Unavailable("503".into()),
            PortError::Refused("HTTP 400".into()),
            PortError::PastDeadline("deadline".into()),
        ];
        let rejected = [
            PortError::NotFound("no key".into()),
            PortError::Invalid("bad key".into()),
        ];
        for error in retried.into_iter().chain(rejected.clone()) {
            let transient = error.is_transient();
            let said = error.clone().context("KV");
            // Context keeps the kind and says more in front.
            assert_eq!(
                std::mem::discriminant(&said),
                std::mem::discriminant(&error)
            );
            assert_eq!(said.reason(), format!("KV: {}", error.reason()));
            assert_eq!(transient, !rejected.contains(&error), "{error:?}");
        }
    }
}
