//! The one drift vocabulary of every mode that compares (verify and the reconcile): the classes
//! a key can be in, the one comparison of a piece's keys with what KV holds ([`drift`]), the one
//! repair of what drifted ([`repair`]), and what names a key's index in its value.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use tokio::time::Instant;

use crate::domain::kv::Written;
use crate::domain::qfilter::filter_key;
use crate::domain::{IndexRef, KvKey, Namespace};
use crate::pipeline::desired::Want;
use crate::pipeline::exporter::{Exporter, Prepared, Run};
use crate::pipeline::records::{Change, ChangeRecord};
use crate::ports::{KvStore as _, PortError, Ports};
use crate::report::{BatchReport, Outcome};

/// The class of one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    InSync,
    /// Implied by the table, absent from KV.
    Missing,
    /// Present, but its value differs from what the table implies.
    Stale,
    /// Written by the exporter, with no record behind it (verify's `unexpected`).
    Orphaned,
    /// Orphaned, but kept: a live alias points at its index, or its record exists and cannot
    /// be exported (rejected, logged).
    Protected,
    /// Not written by the exporter: never touched.
    Foreign,
}

#[derive(Debug, Default, Clone, Serialize, PartialEq)]
pub struct ClassCounts {
    pub in_sync: usize,
    pub missing: usize,
    pub stale: usize,
    pub orphaned: usize,
    pub protected: usize,
    pub foreign: usize,
}

impl ClassCounts {
    pub fn slot(&mut self, class: Class) -> &mut usize {
        match class {
            Class::InSync => &mut self.in_sync,
            Class::Missing => &mut self.missing,
            Class::Stale => &mut self.stale,
            Class::Orphaned => &mut self.orphaned,
            Class::Protected => &mut self.protected,
            Class::Foreign => &mut self.foreign,
        }
    }

    /// What repair is for: keys that differ from the table.
    pub fn drift(&self) -> usize {
        self.missing + self.stale + self.orphaned
    }
}

/// A key as KV holds it, against what the table implies.
pub struct Compared {
    pub class: Class,
    /// What KV holds under the key (`None`: nothing).
    pub held: Option<String>,
    /// The index the key is (or was) written for, when known: a repair's delete names it.
    pub owner: Option<IndexRef>,
}

/// What one piece of a scope found: each key's class. Every mode that compares (verify, the
/// reconcile) fills it and repairs from it.
#[derive(Default)]
pub struct Drift {
    pub keys: BTreeMap<KvKey, Compared>,
    /// Bulk reads of values it took (100 keys a request, per namespace).
    pub bulk_gets: usize,
}

impl Drift {
    /// A key found without a table record implying it (an orphan the listing found).
    pub fn insert(&mut self, key: KvKey, class: Class, owner: Option<IndexRef>) {
        let held = None;
        self.keys.insert(key, Compared { class, held, owner });
    }

    /// What a repair sends: missing and stale keys written, orphaned ones deleted.
    fn repairs(&self) -> (BTreeSet<KvKey>, Vec<(KvKey, IndexRef)>) {
        let (mut writes, mut deletes) = (BTreeSet::new(), Vec::new());
        for (key, compared) in &self.keys {
            match compared.class {
                Class::Missing | Class::Stale => {
                    writes.insert(key.clone());
                }
                Class::Orphaned => deletes.extend(compared.owner.clone().map(|o| (key.clone(), o))),
                _ => {}
            }
        }
        (writes, deletes)
    }
}

/// A prepared piece's keys against what KV holds now (one bulk read): each key the plan puts in
/// sync (the same JSON: key order and number formatting never count), missing or stale; a key
/// planned absent (the filter of an index without overrides) orphaned when KV holds it. The keys
/// of records that cannot be exported (rejected, skipped) that KV holds are protected, and a
/// shop key holding the value of another index that claims the shop too is in sync (the one
/// written last keeps it; that index's own piece compares the value).
pub async fn drift<P: Ports>(
    exporter: &Exporter<P>,
    prepared: &Prepared,
    deadline: Instant,
) -> Result<Drift, PortError> {
    let keys = &prepared.desired.keys;
    let kept = kept_keys(prepared);
    let read: BTreeSet<&KvKey> = keys.keys().chain(&kept).collect();
    let mut in_kv = exporter
        .kv()
        .values_of(read.iter().copied(), deadline)
        .await?;
    let mut drift = Drift::default();
    for namespace in [Namespace::Settings, Namespace::QueryConfigs] {
        let asked = read.iter().filter(|k| k.namespace == namespace).count();
        drift.bulk_gets += asked.div_ceil(100);
    }
    for (key, wanted) in keys {
        let held = in_kv.remove(key);
        let class = match (&wanted.want, &held) {
            (Want::Delete | Want::Keep, None) => continue,
            (Want::Keep, Some(_)) => Class::Protected,
            (Want::Delete, Some(_)) => Class::Orphaned,
            (Want::Put(_), None) => Class::Missing,
            (Want::Put(value), Some(held)) if same_json(&value.text(), held) => Class::InSync,
            (Want::Put(_), Some(_)) => Class::Stale,
        };
        let owner = Some(wanted.by.clone());
        drift
            .keys
            .insert(key.clone(), Compared { class, held, owner });
    }
    for key in kept.into_iter().filter(|key| in_kv.contains_key(key)) {
        drift.insert(key, Class::Protected, None);
    }
    for key in shared_shops(exporter, prepared, &drift, deadline).await? {
        drift.keys.get_mut(&key).expect("compared").class = Class::InSync;
    }
    Ok(drift)
}

/// The keys of the records that cannot be exported (rejected, or left unchecked), which stay as
/// they are; a key another record of the piece implies is compared, not kept.
fn kept_keys(prepared: &Prepared) -> Vec<KvKey> {
    let kept = (prepared.records.iter())
        .filter(|record| matches!(record.outcome, Outcome::Skipped(_) | Outcome::Rejected(_)));
    let keys = kept.flat_map(keys_of);
    keys.filter(|key| !prepared.desired.keys.contains_key(key))
        .collect()
}

/// The keys a settings record's index has whatever its values: its own, its filter's, and
/// its shop's when the record could be read.
fn keys_of(record: &ChangeRecord) -> Vec<KvKey> {
    let Some(index) = &record.index else {
        return Vec::new();
    };
    let mut keys = vec![KvKey::index(index), filter_key(index)];
    match &record.change {
        Some(Change::UpsertIndex { settings, .. }) => {
            keys.extend(settings.shop_id.clone().map(KvKey::settings))
        }
        Some(_) => return Vec::new(),
        None => {}
    }
    keys
}

/// Stale shop keys that hold the value of another index whose table record claims the shop too.
async fn shared_shops<P: Ports>(
    exporter: &Exporter<P>,
    prepared: &Prepared,
    drift: &Drift,
    deadline: Instant,
) -> Result<Vec<KvKey>, PortError> {
    let others: Vec<(&KvKey, IndexRef)> = (drift.keys.iter())
        .filter(|(key, c)| key.namespace == Namespace::Settings && c.class == Class::Stale)
        .filter_map(|(key, compared)| {
            let Want::Put(value) = &prepared.desired.keys[key].want else {
                return None;
            };
            let owner = value.index();
            let held = Written::read(compared.held.as_deref()?).map(Written::owner);
            let held = held.filter(could_be_written);
            let other = held.filter(|o| o != owner && key.is_shop_of(owner))?;
            Some((key, other))
        })
        .collect();
    if others.is_empty() {
        return Ok(Vec::new());
    }
    let indexes: Vec<IndexRef> = others.iter().map(|(_, o)| o.clone()).collect();
    let refs = exporter.index_references(&indexes, deadline).await?;
    Ok((others.into_iter())
        .filter(|(key, other)| refs.get(other).is_some_and(|r| r.shops.contains(&key.key)))
        .map(|(key, _)| key.clone())
        .collect())
}

/// Repairs what drifted: of the plan, the missing and stale keys written, and the orphaned keys
/// deleted, checked as every operator's writes are. A dry run sends nothing: its report names
/// the keys it would write and delete. `None`: nothing to repair.
pub async fn repair<P: Ports>(
    exporter: &Exporter<P>,
    prepared: Option<Prepared>,
    drift: &Drift,
    dry_run: bool,
    deadline: Instant,
) -> Option<BatchReport> {
    let (writes, deletes) = drift.repairs();
    if writes.len() + deletes.len() == 0 {
        return None;
    }
    if dry_run {
        return Some(BatchReport {
            written: writes.into_iter().collect(),
            deleted: deletes.into_iter().map(|(key, _)| key).collect(),
            ..BatchReport::default()
        });
    }
    let prepared = match prepared {
        Some(prepared) => prepared,
        None => exporter.prepare(Vec::new(), Run::CHECK, deadline).await,
    };
    let report = exporter.repair(prepared, &writes, deletes, deadline).await;
    report.log();
    Some(report)
}

fn same_json(expected: &str, held: &str) -> bool {
    let json = |text| serde_json::from_str::<serde_json::Value>(text).ok();
    expected == held || json(expected).is_some_and(|value| Some(value) == json(held))
}

/// Whether the function could have written a key for this index (metadata and values are
/// input: a name no table item could have would fail a piece's reads by key, every pass).
pub fn could_be_written(index: &IndexRef) -> bool {
    !index.account.is_empty() && !index.name.is_empty() && crate::domain::kv::own_key_valid(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_is_in_sync_when_it_holds_the_same_json() {
        assert!(same_json(r#"{"a":1,"b":[2]}"#, r#"{"b": [2], "a": 1}"#));
        assert!(!same_json(r#"{"a":1}"#, r#"{"a":2}"#));
        assert!(!same_json("{}", "not json"));
    }
}
