//! What a batch must settle and look up before it can be planned: each index's previous shop
//! where the stream does not say it, API keys, and who refers to what it removes or gives up.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use crate::domain::validate::shop_id_problem;
use crate::domain::AccountCell;
use crate::domain::{ApiKey, IndexRef, IndexRefs, IndexSettings};
use crate::pipeline::records::{Change, ChangeRecord, PreviousShop};
use crate::ports::{PortError, Referred};
use crate::report::Outcome;

/// Everything the plan reads of the outside, read before it (stage 2, `exporter/snapshot.rs`):
/// the API keys ([`api_keys_wanted`]), who refers to what ([`references_wanted`]), the
/// claimers of the shops given up ([`claimers`]), the overrides of each filter rebuilt
/// ([`filters_wanted`]).
#[derive(Debug, Default)]
pub struct Snapshot {
    pub api_keys: HashMap<AccountCell, Result<ApiKey, PortError>>,
    pub references: Option<Result<Vec<(IndexRef, IndexRefs)>, PortError>>,
    /// The current settings of indexes that claim a shop key another index gave up
    /// (`None`: no such record any more).
    pub claimers: HashMap<IndexRef, Result<Option<Arc<IndexSettings>>, PortError>>,
    /// The queries of every override of each index whose filter the records rebuild.
    pub overrides: HashMap<IndexRef, Result<Vec<String>, PortError>>,
}

/// A settings record's index and previous shop, to settle.
fn previous_of(change: &mut Change) -> Option<(&IndexRef, &mut PreviousShop)> {
    match change {
        Change::UpsertIndex {
            settings,
            previous_shop,
            ..
        } => Some((&settings.index, previous_shop)),
        Change::RemoveIndex {
            index,
            previous_shop,
            keeps_own_key: false,
        } => Some((index, previous_shop)),
        // Its shops were settled by whoever made it: the ledger's may hold the one it keeps.
        _ => None,
    }
}

/// Settles the previous shops of each record: every shop the ledger records the index may be
/// on (`recorded`; `None`: nothing recorded) joins what the index's first record of the batch
/// says (its old image, on a `NEW_AND_OLD_IMAGES` stream), so a shop an earlier batch could not
/// confirm given up is given up again whatever the view type; a record whose stream did not
/// say (a `NEW_IMAGE` stream) takes an earlier record's shop, else what is recorded. Answers the
/// indexes left unsettled (their first record of the batch, nothing recorded): their current
/// KV values tell ([`settle_from_kv`]). An operator's table item takes what is recorded.
pub fn settle_previous_shops(
    records: &mut [ChangeRecord],
    recorded: impl Fn(&IndexRef) -> Option<BTreeSet<String>>,
) -> BTreeSet<IndexRef> {
    let mut last_in_batch: HashMap<IndexRef, BTreeSet<String>> = HashMap::new();
    let mut unsettled = BTreeSet::new();
    for record in records.iter_mut() {
        let Some(change) = &mut record.change else {
            continue;
        };
        let now = match &*change {
            Change::UpsertIndex { settings, .. } => settings.shop_id.iter().cloned().collect(),
            _ => BTreeSet::new(),
        };
        let Some((index, previous)) = previous_of(change) else {
            continue;
        };
        let earlier = last_in_batch.get(index).cloned();
        match (&mut *previous, earlier) {
            (PreviousShop::Unknown, Some(shops)) => *previous = PreviousShop::Known(shops),
            (PreviousShop::Unknown, None) => match recorded(index) {
                Some(shops) => *previous = PreviousShop::Known(shops),
                None => {
                    unsettled.insert(index.clone());
                }
            },
            // A table item (an operator's) as well: it gives up every shop recorded that it no
            // longer names, as the stream's records do, so a rerun clears what an earlier run left.
            (PreviousShop::Known(shops), None) => shops.extend(recorded(index).unwrap_or_default()),
            _ => {}
        }
        last_in_batch.insert(index.clone(), now);
    }
    unsettled
}

/// What [`settle_previous_shops`] left, settled from the indexes' current KV values (`shops`);
/// a record whose value could not be read fails (reported for retry).
pub fn settle_from_kv(
    records: &mut [ChangeRecord],
    shops: &HashMap<IndexRef, Result<Option<String>, PortError>>,
) {
    for record in records.iter_mut() {
        let Some((index, previous)) = record.change.as_mut().and_then(previous_of) else {
            continue;
        };
        if *previous != PreviousShop::Unknown {
            continue;
        }
        match shops.get(index) {
            Some(Ok(shop)) => *previous = PreviousShop::known(shop.clone()),
            Some(Err(e)) => {
                let why = format!("cannot read the current shop id from KV: {e}");
                record.end(Outcome::Failed(why));
            }
            None => {}
        }
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
/// but its own, every previous shop of a remove.
fn given_up(change: &Change) -> Option<(&IndexRef, Vec<&String>)> {
    match change {
        Change::UpsertIndex {
            settings,
            previous_shop: PreviousShop::Known(old),
            ..
        } => {
            let kept = settings.shop_id.as_ref();
            let old = old.iter().filter(|old| kept != Some(*old));
            Some((&settings.index, old.collect()))
        }
        Change::RemoveIndex {
            index,
            previous_shop,
            ..
        } => match previous_shop {
            PreviousShop::Known(old) => Some((index, old.iter().collect())),
            _ => Some((index, Vec::new())),
        },
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
pub fn claimers(
    records: &[ChangeRecord],
    references: &[(IndexRef, IndexRefs)],
) -> BTreeSet<IndexRef> {
    // Who claims each shop as the plan will ask it.
    let by_shop = super::Referrers::of(references).by_shop;
    let mut wanted = BTreeSet::new();
    for change in records.iter().filter_map(|r| r.change.as_ref()) {
        let Some((index, shops)) = given_up(change) else {
            continue;
        };
        // A shop id that is no shop key is never deleted, so never repointed.
        for shop in shops.into_iter().filter(|s| shop_id_problem(s).is_none()) {
            let claimers = by_shop.get(shop.as_str()).into_iter().flatten();
            wanted.extend(claimers.filter(|c| **c != index).map(|c| (*c).clone()));
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
