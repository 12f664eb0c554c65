//! A record as the core plans it: the change its item makes (`Change`), or where it already
//! ended (`Outcome`), whether it came from the stream or from a read of the table.

use std::sync::Arc;

use super::{IndexRef, IndexSettings, QueryConfig, TableKey};

/// Reasons a failed record names at most (each key it could not write or check).
const MAX_REASONS: usize = 8;

/// Where one record ends. Every record ends in exactly one of these (docs/contract.md,
/// "Nothing is lost").
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// Its KV writes and deletes are applied (or superseded by a later record of the batch);
    /// until the batch is sent, planned to be (a failed operation makes it `Failed`).
    Exported,
    /// Not for KV, on purpose: default configs and foreign sort keys.
    Skipped(String),
    /// Permanently invalid: retrying cannot help, a fix of the item emits a new record.
    Rejected(String),
    /// Reported in `batchItemFailures`: Lambda retries it.
    Failed(String),
    /// A remove whose keys stay because live aliases point at the index.
    Kept { referenced_by: Vec<IndexRef> },
}

impl Outcome {
    /// A record on its way to KV (exported or planned to be, kept for an alias) fails for `why`
    /// and is reported for retry; one already failed adds `why` to its reasons (each key it
    /// could not write or check named, up to [`MAX_REASONS`]); one rejected or skipped keeps
    /// its outcome.
    pub fn fail(&mut self, why: impl Into<String>) {
        let why = why.into();
        match self {
            Outcome::Exported | Outcome::Kept { .. } => *self = Outcome::Failed(why),
            Outcome::Failed(reasons) => {
                let told = reasons.split("; ").count();
                if told < MAX_REASONS && !reasons.split("; ").any(|r| r == why) {
                    reasons.push_str("; ");
                    reasons.push_str(&why);
                }
            }
            Outcome::Skipped(_) | Outcome::Rejected(_) => {}
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    UpsertIndex {
        settings: Arc<IndexSettings>,
        /// The batch stands for all of the index's overrides (a re-export or backfill with
        /// query configs): its override filter is written, even when it has none.
        with_overrides: bool,
    },
    RemoveIndex {
        index: IndexRef,
    },
    UpsertQuery(QueryConfig),
    RemoveQuery {
        index: IndexRef,
        query: String,
    },
}

/// One record, with what identifies it in logs and in the batch response, and where it ends.
/// A stream record decodes as the change its item makes when the table no longer holds it (a
/// remove): it says which item changed, never its new values,
/// which come from the table when the batch reads it ([`ChangeRecord::as_now`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeRecord {
    pub sequence_number: Option<String>,
    pub index: Option<IndexRef>,
    /// `ApproximateCreationDateTime`, seconds since the epoch, for propagation lag.
    pub created_at: Option<f64>,
    /// What the record changes: `None` once it ended before its plan (skipped on purpose,
    /// rejected as permanently invalid, or not read), and once it is reported.
    pub change: Option<Change>,
    /// Where the record ends; `Exported` while it is on its way.
    pub outcome: Outcome,
}

impl ChangeRecord {
    /// A record no stream record stands behind (a table item, or one the batch derives).
    pub fn of(index: Option<IndexRef>, decoded: Result<Change, Outcome>) -> Self {
        let (change, outcome) = match decoded {
            Ok(change) => (Some(change), Outcome::Exported),
            Err(ended) => (None, ended),
        };
        ChangeRecord {
            sequence_number: None,
            index,
            created_at: None,
            change,
            outcome,
        }
    }

    /// The record ends before its plan, as `outcome` says.
    pub fn end(&mut self, outcome: Outcome) {
        self.change = None;
        self.outcome = outcome;
    }

    /// The removal of an index (the check's of an index gone from the table).
    pub fn removal(index: IndexRef) -> Self {
        let remove = Change::RemoveIndex {
            index: index.clone(),
        };
        ChangeRecord::of(Some(index), Ok(remove))
    }

    /// A table item's record as a read takes it (`key`: the item's): an override skipped when
    /// query configs were not asked for; a settings record standing for all of its index's
    /// overrides when they were (its filter written, even with none).
    pub fn asked(mut self, key: &TableKey, include_query_configs: bool) -> Self {
        let an_override = self.index.is_some() && !self.settings_at(key);
        match &mut self.change {
            Some(Change::UpsertIndex { with_overrides, .. }) => {
                *with_overrides = include_query_configs;
            }
            _ if include_query_configs => {}
            _ if an_override => {
                let skipped = Outcome::Skipped("query configs were not asked for".into());
                return ChangeRecord::of(None, Err(skipped));
            }
            _ => {}
        }
        self
    }

    /// Whether the record, read at `key`, is its index's settings record.
    pub fn settings_at(&self, key: &TableKey) -> bool {
        (self.index.as_ref()).is_some_and(|index| *key == TableKey::of(index, None))
    }

    /// The item the record is about.
    pub fn item_key(&self) -> Option<TableKey> {
        Some(match self.change.as_ref()? {
            Change::UpsertIndex { settings, .. } => TableKey::of(&settings.index, None),
            Change::RemoveIndex { index, .. } => TableKey::of(index, None),
            Change::UpsertQuery(config) => TableKey::of(&config.index, Some(&config.query)),
            Change::RemoveQuery { index, query } => TableKey::of(index, Some(query)),
        })
    }

    /// A stream record as its item is now (`now`: the item's record as the table holds it,
    /// `dynamo::table_record`; `None`: the table no longer holds it, the record stays the
    /// remove it decoded as). The stream says which item changed and which shop its index
    /// had; what is exported comes from the table, so a record read late (a replay, an old
    /// payload sent by hand) never writes old values.
    pub fn as_now(mut self, now: Option<&ChangeRecord>) -> ChangeRecord {
        let (Some(removed), Some(now)) = (&mut self.change, now) else {
            return self;
        };
        match (&now.change, removed) {
            (Some(Change::UpsertIndex { settings, .. }), Change::RemoveIndex { .. }) => {
                self.change = Some(Change::UpsertIndex {
                    settings: settings.clone(),
                    with_overrides: false,
                })
            }
            (Some(change), _) => self.change = Some(change.clone()),
            // Why the item is rejected.
            (None, _) => self.end(now.outcome.clone()),
        }
        self
    }
}
