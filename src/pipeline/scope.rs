//! A scope as the one reader hands it to the pure decision of its keys (`pipeline::desired`):
//! each index's state (its settings record, its overrides in scope, what the ledger records),
//! who claims and aliases what, the claimers' settings and the API keys.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::domain::net::{self, Protection};
use crate::domain::{AccountCell, ApiKey, IndexRef, IndexRefs, IndexSettings};
use crate::domain::{Change, ChangeRecord, Outcome, QueryConfig};
use crate::ports::PortError;

/// An index's settings record as the table holds it.
#[derive(Debug, Clone)]
pub enum Settings {
    Valid(Arc<IndexSettings>),
    /// Rejected: its keys stay as they are; what its raw item names (read fail closed).
    Rejected(IndexRefs),
    Absent,
}

/// One index as the reader found it: what the table says of it, and what the ledger records.
#[derive(Debug, Default)]
pub struct IndexState {
    /// Its settings record (`None`: its settings keys are not in scope, only overrides are).
    pub settings: Option<Settings>,
    /// What the ledger records of it: every shop its keys may be on, every target it may alias.
    pub recorded: IndexRefs,
    /// Its overrides in scope, each as the table holds it (`None`: gone).
    pub queries: BTreeMap<String, Option<QueryConfig>>,
    /// Every query of its overrides, when its filter is in scope.
    pub filter: Option<Result<Vec<String>, PortError>>,
    /// In scope on behalf of another index (an alias target that index dropped): its failures
    /// are that index's.
    pub because: Option<IndexRef>,
    /// Where its last record lies in the batch: of two indexes that decide a key alike, the one
    /// changed last wins (`None`: no record of its own).
    pub last: Option<usize>,
}

impl IndexState {
    /// What its record names now: its shop and live alias targets (a rejected record's read
    /// fail closed; `None`: its settings are not in scope).
    pub fn names(&self) -> Option<IndexRefs> {
        match self.settings.as_ref()? {
            Settings::Valid(settings) => Some(settings.references()),
            Settings::Rejected(raw) => Some(raw.clone()),
            Settings::Absent => Some(IndexRefs::default()),
        }
    }

    /// The shops it gave up: every one the ledger records that its record no longer claims (the
    /// one rule, for every writer).
    pub fn given_up(&self) -> Vec<&String> {
        let Some(now) = self.names() else {
            return Vec::new();
        };
        let recorded = self.recorded.shops.iter();
        recorded.filter(|shop| !now.shops.contains(*shop)).collect()
    }
}

/// Who claims each shop and who aliases each index id, as the table holds their records now.
#[derive(Debug, Default)]
pub struct Referrers {
    pub by_shop: HashMap<String, Vec<IndexRef>>,
    pub by_target: HashMap<String, Vec<IndexRef>>,
}

impl Referrers {
    pub fn of(references: impl IntoIterator<Item = (IndexRef, IndexRefs)>) -> Self {
        let mut referrers = Referrers::default();
        for (index, refs) in references {
            for shop in refs.shops {
                referrers
                    .by_shop
                    .entry(shop)
                    .or_default()
                    .push(index.clone());
            }
            for target in refs.targets {
                let aliases = referrers.by_target.entry(target).or_default();
                if aliases.last() != Some(&index) {
                    aliases.push(index.clone());
                }
            }
        }
        referrers
    }

    /// Who keeps a removed `index` for an alias: every other index whose record aliases its id
    /// (the one rule of alias deletion safety).
    pub fn keeping(&self, index: &IndexRef) -> Vec<IndexRef> {
        if net::off(Protection::AliasSafety) {
            return Vec::new();
        }
        let aliases = self.by_target.get(&index.id().0).into_iter().flatten();
        aliases.filter(|alias| *alias != index).cloned().collect()
    }
}

/// The scope's indexes and what deciding their keys needs of the outside.
#[derive(Debug)]
pub struct World {
    pub indexes: BTreeMap<IndexRef, IndexState>,
    /// Who claims the shops given up and aliases the indexes removed (`Err`: not read, why).
    pub referrers: Result<Referrers, String>,
    /// The settings of claimers outside the scope (`None`: no record).
    pub claimers: HashMap<IndexRef, Result<Option<Arc<IndexSettings>>, PortError>>,
    pub api_keys: HashMap<AccountCell, Result<ApiKey, PortError>>,
    pub default_cell: String,
}

impl Default for World {
    fn default() -> Self {
        World {
            indexes: BTreeMap::new(),
            referrers: Ok(Referrers::default()),
            claimers: HashMap::new(),
            api_keys: HashMap::new(),
            default_cell: String::new(),
        }
    }
}

/// Each index the records name, as they say it is now; a settings record rejected as read
/// stands for its index only when no other record says more.
pub fn states_of(records: &[ChangeRecord]) -> BTreeMap<IndexRef, IndexState> {
    let mut indexes: BTreeMap<IndexRef, IndexState> = BTreeMap::new();
    for (at, record) in records.iter().enumerate() {
        let Some(index) = &record.index else { continue };
        let state = indexes.entry(index.clone()).or_default();
        state.last = Some(at);
        match &record.change {
            Some(Change::UpsertIndex {
                settings,
                with_overrides,
            }) => {
                state.settings = Some(Settings::Valid(settings.clone()));
                if *with_overrides {
                    state.filter.get_or_insert(Ok(Vec::new()));
                }
            }
            Some(Change::RemoveIndex { .. }) => state.settings = Some(Settings::Absent),
            Some(Change::UpsertQuery(config)) => {
                state
                    .queries
                    .insert(config.query.clone(), Some(config.clone()));
                state.filter.get_or_insert(Ok(Vec::new()));
            }
            Some(Change::RemoveQuery { query, .. }) => {
                state.queries.insert(query.clone(), None);
                state.filter.get_or_insert(Ok(Vec::new()));
            }
            None if matches!(record.outcome, Outcome::Rejected(_)) => {
                let raw = Settings::Rejected(IndexRefs::default());
                state.settings.get_or_insert(raw);
            }
            None => {}
        }
    }
    indexes
}
