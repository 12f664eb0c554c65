//! What a batch must settle and look up before it can be planned: each index's previous shops,
//! API keys, and who refers to what it removes or gives up.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use crate::domain::net::{self, Protection};
use crate::domain::validate::shop_id_problem;
use crate::domain::AccountCell;
use crate::domain::{ApiKey, IndexRef, IndexRefs, IndexSettings};
use crate::pipeline::records::{Change, ChangeRecord};
use crate::ports::{PortError, Referred};

/// Everything the plan reads of the outside, read before it (stage 2, `exporter/snapshot.rs`):
/// the API keys ([`api_keys_wanted`]), who refers to what ([`references_wanted`]), the
/// claimers of the shops given up ([`claimers`]), the overrides of each filter rebuilt
/// ([`filters_wanted`]).
#[derive(Debug, Default)]
pub struct Snapshot {
    pub api_keys: HashMap<AccountCell, Result<ApiKey, PortError>>,
    pub references: Option<Result<Referrers, PortError>>,
    /// The current settings of indexes that claim a shop key another index gave up
    /// (`None`: no such record any more).
    pub claimers: HashMap<IndexRef, Result<Option<Arc<IndexSettings>>, PortError>>,
    /// The queries of every override of each index whose filter the records rebuild.
    pub overrides: HashMap<IndexRef, Result<Vec<String>, PortError>>,
}

/// Who claims each shop and who aliases each index id, from the references looked up: built
/// once a batch, asked by every record that removes an index or gives a shop up.
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
                // An index named twice (two reads of it) aliases the target once.
                if aliases.last() != Some(&index) {
                    aliases.push(index.clone());
                }
            }
        }
        referrers
    }

    /// Who keeps a removed `index` for an alias: every other index whose record aliases its id
    /// (the one rule of alias deletion safety, for the plan and the orphan finder).
    pub fn keeping(&self, index: &IndexRef) -> Vec<IndexRef> {
        if net::off(Protection::AliasSafety) {
            return Vec::new();
        }
        let aliases = self.by_target.get(&index.id().0).into_iter().flatten();
        aliases.filter(|alias| *alias != index).cloned().collect()
    }
}

/// A settings record's index and previous shops, to settle.
fn previous_of(change: &mut Change) -> Option<(&IndexRef, &mut BTreeSet<String>)> {
    match change {
        Change::UpsertIndex {
            settings,
            previous_shops,
            ..
        } => Some((&settings.index, previous_shops)),
        Change::RemoveIndex {
            index,
            previous_shops,
            keeps_own_key: false,
        } => Some((index, previous_shops)),
        // Its shops were settled by whoever made it: the ledger's may hold the one it keeps.
        _ => None,
    }
}

/// Settles the previous shops of each settings record: an index's first record of the batch
/// may be on every shop the ledger records for it (`recorded`; the references are complete
/// before any writer plans, so nothing recorded is no shop), a later one on its earlier
/// record's shop. A table item (an operator's) gives up every shop recorded that it no longer
/// names, as the stream's records do, so a rerun clears what an earlier run left.
pub fn settle_previous_shops(
    records: &mut [ChangeRecord],
    recorded: impl Fn(&IndexRef) -> BTreeSet<String>,
) {
    let mut last_in_batch: HashMap<IndexRef, BTreeSet<String>> = HashMap::new();
    for change in records.iter_mut().filter_map(|r| r.change.as_mut()) {
        let now = match &*change {
            Change::UpsertIndex { settings, .. } => settings.shop_id.iter().cloned().collect(),
            _ => BTreeSet::new(),
        };
        let Some((index, previous)) = previous_of(change) else {
            continue;
        };
        let earlier = last_in_batch.insert(index.clone(), now);
        previous.extend(earlier.unwrap_or_else(|| recorded(index)));
    }
}

/// The (cell, account) of every API key the records' values need.
pub fn api_keys_wanted(records: &[ChangeRecord], default_cell: &str) -> BTreeSet<AccountCell> {
    let settings = records.iter().filter_map(|r| match &r.change {
        Some(Change::UpsertIndex { settings, .. }) => Some(settings.account_cell(default_cell)),
        _ => None,
    });
    settings.collect()
}

/// Whether the plan needs to know who refers to what: a record removes an index or gives a
/// shop up (previous shops settled).
pub fn references_wanted(records: &[ChangeRecord]) -> bool {
    let mut changes = records.iter().filter_map(|r| r.change.as_ref());
    changes.any(|change| {
        let gives_up = given_up(change).is_some_and(|(_, shops)| !shops.is_empty());
        gives_up || matches!(change, Change::RemoveIndex { .. })
    })
}

/// The shops a change gives up, with the index giving them up: an upsert's previous shops
/// but its own, every previous shop of a remove (the one rule, docs/contract.md "Where each
/// rule lives").
pub fn given_up(change: &Change) -> Option<(&IndexRef, Vec<&String>)> {
    match change {
        Change::UpsertIndex {
            settings,
            previous_shops,
            ..
        } => {
            let kept = settings.shop_id.as_ref();
            let old = previous_shops.iter().filter(|old| kept != Some(*old));
            Some((&settings.index, old.collect()))
        }
        Change::RemoveIndex {
            index,
            previous_shops,
            ..
        } => Some((index, previous_shops.iter().collect())),
        _ => None,
    }
}

/// What a batch asks the ledger instead of scanning the table: who aliases each index it
/// removes, and who claims each shop an index gives up.
pub fn reference_questions(records: &[ChangeRecord]) -> BTreeSet<Referred> {
    let mut asked = BTreeSet::new();
    for change in records.iter().filter_map(|r| r.change.as_ref()) {
        if let Change::RemoveIndex { index, .. } = change {
            asked.insert(Referred::Alias(index.id().0));
        }
        let shops = given_up(change).into_iter().flat_map(|(_, shops)| shops);
        asked.extend(shops.cloned().map(Referred::Shop));
    }
    asked
}

/// The indexes whose settings the plan needs besides the records': every other claimer of a
/// shop a record gives up (its key is repointed to the first that can be exported), read
/// before the one plan.
pub fn claimers(records: &[ChangeRecord], referrers: &Referrers) -> BTreeSet<IndexRef> {
    let by_shop = &referrers.by_shop;
    let mut wanted = BTreeSet::new();
    for change in records.iter().filter_map(|r| r.change.as_ref()) {
        let Some((index, shops)) = given_up(change) else {
            continue;
        };
        // A shop id that is no shop key is never deleted, so never repointed.
        for shop in shops.into_iter().filter(|s| shop_id_problem(s).is_none()) {
            let claimers = by_shop.get(shop.as_str()).into_iter().flatten();
            wanted.extend(claimers.filter(|c| *c != index).cloned());
        }
    }
    wanted
}

/// The indexes whose override filter the records rebuild, as the plan decides them
/// ([`super::rebuilt_filter`]: a filter follows its index's override records alone).
pub fn filters_wanted(records: &[ChangeRecord]) -> BTreeSet<IndexRef> {
    let changes = records.iter().filter_map(|r| r.change.as_ref());
    changes.filter_map(super::rebuilt_filter).cloned().collect()
}
