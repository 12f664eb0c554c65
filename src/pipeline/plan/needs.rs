//! What a batch must look up before it can be planned (API keys, who refers to what it
//! removes or gives up, current shops), and where each index's previous shop comes from when
//! the stream does not say.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use crate::domain::{ApiKey, IndexRef, IndexSettings, SettingsReference};
use crate::pipeline::records::{Change, ChangeRecord, PreviousShop};
use crate::ports::{AccountCell, PortError, Referred};

/// What the records need looked up before they can be planned.
#[derive(Debug, Default, PartialEq)]
pub struct Needs {
    pub api_keys: BTreeSet<AccountCell>,
    /// A scan of the table for alias targets and shop ids (removes, shop changes).
    pub references: bool,
    /// Indexes whose current KV value must tell their shop id (removes and modifies from
    /// `NEW_IMAGE` streams that no earlier record of the batch speaks for).
    pub current_shops: BTreeSet<IndexRef>,
}

/// The answers to [`Needs`], and to what a first plan asked for (claimers of shop keys).
#[derive(Debug, Default)]
pub struct Lookups {
    pub api_keys: HashMap<AccountCell, Result<ApiKey, PortError>>,
    pub references: Option<Result<Vec<SettingsReference>, PortError>>,
    pub current_shops: HashMap<IndexRef, Result<Option<String>, PortError>>,
    /// The current settings of indexes that claim a shop key another index gave up
    /// (`None`: no such record any more).
    pub claimers: HashMap<IndexRef, Result<Option<Arc<IndexSettings>>, PortError>>,
}

/// Where the shop id an index had before a record comes from.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum ShopSource {
    Known(Option<String>),
    /// A `NEW_IMAGE` stream: read it from the index's current KV value.
    CurrentKv,
}

/// Earlier records of the batch stand in for old images that a `NEW_IMAGE` stream lacks.
pub(super) fn previous_shops(records: &[ChangeRecord]) -> Vec<Option<ShopSource>> {
    let mut last_in_batch: HashMap<&IndexRef, Option<&str>> = HashMap::with_capacity(records.len());
    let known = |shop: Option<&str>| ShopSource::Known(shop.map(str::to_owned));
    records
        .iter()
        .map(|record| match &record.decoded {
            Ok(Change::UpsertIndex {
                settings,
                previous_shop,
                ..
            }) => {
                let source = match previous_shop {
                    PreviousShop::Known(shop) => Some(ShopSource::Known(shop.clone())),
                    PreviousShop::Unknown => Some(match last_in_batch.get(&settings.index) {
                        Some(shop) => known(*shop),
                        None => ShopSource::CurrentKv,
                    }),
                    PreviousShop::NotAsked => None,
                };
                last_in_batch.insert(&settings.index, settings.shop_id.as_deref());
                source
            }
            Ok(Change::RemoveIndex {
                index,
                previous_shop,
            }) => {
                let source = match previous_shop {
                    PreviousShop::Known(shop) => ShopSource::Known(shop.clone()),
                    PreviousShop::Unknown | PreviousShop::NotAsked => {
                        match last_in_batch.get(index) {
                            Some(shop) => known(*shop),
                            None => ShopSource::CurrentKv,
                        }
                    }
                };
                last_in_batch.insert(index, None);
                Some(source)
            }
            _ => None,
        })
        .collect()
}

pub fn account_cell(account: &str, cell: Option<&str>, default_cell: &str) -> AccountCell {
    AccountCell {
        cell: cell.unwrap_or(default_cell).to_owned(),
        account: account.to_owned(),
    }
}

/// What must be looked up before [`super::plan`] can run.
pub fn needs(records: &[ChangeRecord], default_cell: &str) -> Needs {
    let mut needs = Needs::default();
    for (record, shop) in records.iter().zip(previous_shops(records)) {
        match (&record.decoded, shop) {
            (Ok(Change::UpsertIndex { settings, .. }), shop) => {
                needs.api_keys.insert(account_cell(
                    &settings.index.account,
                    settings.cell.as_deref(),
                    default_cell,
                ));
                match shop {
                    Some(ShopSource::Known(Some(old))) => {
                        needs.references |= settings.shop_id.as_ref() != Some(&old);
                    }
                    Some(ShopSource::CurrentKv) => {
                        needs.current_shops.insert(settings.index.clone());
                    }
                    _ => {}
                }
            }
            (Ok(Change::RemoveIndex { index, .. }), shop) => {
                needs.references = true;
                if shop == Some(ShopSource::CurrentKv) {
                    needs.current_shops.insert(index.clone());
                }
            }
            _ => {}
        }
    }
    needs
}

/// Whether a shop id read from KV shows a shop change, so the table must be scanned for who
/// else claims the old shop (asked once the current shops are known).
pub fn shop_moves(records: &[ChangeRecord], lookups: &Lookups) -> bool {
    records
        .iter()
        .zip(previous_shops(records))
        .any(|(record, shop)| match (&record.decoded, shop) {
            (Ok(Change::UpsertIndex { settings, .. }), Some(ShopSource::CurrentKv)) => {
                matches!(lookups.current_shops.get(&settings.index),
                    Some(Ok(Some(old))) if settings.shop_id.as_ref() != Some(old))
            }
            _ => false,
        })
}

/// What a batch asks the ledger instead of scanning the table: who aliases each index it
/// removes, and who claims each shop an index gives up (asked once the current shops are known).
pub fn reference_questions(records: &[ChangeRecord], lookups: &Lookups) -> BTreeSet<Referred> {
    let mut asked = BTreeSet::new();
    for (record, shop) in records.iter().zip(previous_shops(records)) {
        let Ok(change) = &record.decoded else {
            continue;
        };
        let index = match change {
            Change::UpsertIndex { settings, .. } => &settings.index,
            Change::RemoveIndex { index, .. } => index,
            _ => continue,
        };
        let old = match shop {
            Some(ShopSource::Known(old)) => old,
            Some(ShopSource::CurrentKv) => match lookups.current_shops.get(index) {
                Some(Ok(old)) => old.clone(),
                _ => None,
            },
            None => None,
        };
        match change {
            Change::UpsertIndex { settings, .. } => {
                if let Some(old) = old.filter(|old| settings.shop_id.as_ref() != Some(old)) {
                    asked.insert(Referred::Shop(old));
                }
            }
            _ => {
                asked.insert(Referred::Alias(index.id().0));
                asked.extend(old.map(Referred::Shop));
            }
        }
    }
    asked
}
