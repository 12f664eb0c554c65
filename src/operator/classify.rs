//! The one drift vocabulary of every mode (verify and the reconcile): the classes a key can be
//! in, how a plan's keys compare with what KV holds, and what names a key's index in its value
//! or its aliases.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::domain::{IndexId, IndexRef, IndexRefs, KvAction, KvKey};
use crate::pipeline::exporter::Exporter;
use crate::pipeline::plan::PlannedOp;
use crate::ports::{KvStore as _, PortError, Ports};

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

/// A key the plan names, as KV holds it.
pub struct Compared {
    pub class: Class,
    /// What KV holds under the key (`None`: nothing).
    pub held: Option<String>,
}

/// Each key the plan puts or deletes against what KV holds now (one bulk read per namespace,
/// 100 keys a request): a put in sync (the same JSON: key order and number formatting never
/// count), missing or stale; a key planned absent (the filter of an index without overrides)
/// orphaned when KV holds it, else left out.
pub async fn compare<P: Ports>(
    exporter: &Exporter<P>,
    ops: &BTreeMap<KvKey, PlannedOp>,
    deadline: Instant,
) -> Result<BTreeMap<KvKey, Compared>, PortError> {
    let mut in_kv = exporter.kv().values_of(ops.keys(), deadline).await?;
    let compared = ops.iter().filter_map(|(key, op)| {
        let held = in_kv.remove(key);
        let class = match (&op.action, &held) {
            (KvAction::Delete, None) => return None,
            (KvAction::Delete, Some(_)) => Class::Orphaned,
            (KvAction::Put(_), None) => Class::Missing,
            (KvAction::Put(value), Some(held)) if same_json(&value.text(), held) => Class::InSync,
            (KvAction::Put(_), Some(_)) => Class::Stale,
        };
        Some((key.clone(), Compared { class, held }))
    });
    Ok(compared.collect())
}

fn same_json(expected: &str, held: &str) -> bool {
    let json = |text| serde_json::from_str::<serde_json::Value>(text).ok();
    expected == held || json(expected).is_some_and(|value| Some(value) == json(held))
}

/// The value fields that name an index in what this function writes.
#[derive(Deserialize)]
struct Owner {
    #[allow(dead_code)]
    schema_version: u32,
    system_account_id: String,
    index_name: String,
}

pub fn owner_in_value(value: &str) -> Option<IndexRef> {
    let owner: Owner = serde_json::from_str(value).ok()?;
    Some(IndexRef::new(owner.system_account_id, owner.index_name))
}

/// Whether the function could have written a key for this index (metadata and values are
/// input: a name no table item could have would fail a piece's reads by key, every pass).
pub fn could_be_written(index: &IndexRef) -> bool {
    !index.account.is_empty()
        && !index.name.is_empty()
        && crate::domain::kv::check_key(&KvKey::index(index).key).is_ok()
}

pub fn live_targets(references: &[(IndexRef, IndexRefs)]) -> impl Iterator<Item = IndexId> + '_ {
    (references.iter()).flat_map(|(index, refs)| {
        let own = index.id();
        let others = refs.targets.iter().filter(move |target| **target != own.0);
        others.map(|target| IndexId(target.clone()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_belongs_to_the_index_it_names() {
        let value = r#"{"schema_version": 1, "system_account_id": "acct", "index_name": "1-x"}"#;
        assert_eq!(owner_in_value(value), Some(IndexRef::new("acct", "1-x")));
        assert_ne!(owner_in_value(value), Some(IndexRef::new("acct-1", "x")));
        assert_eq!(owner_in_value("not json"), None);
    }

    #[test]
    fn a_value_is_in_sync_when_it_holds_the_same_json() {
        assert!(same_json(r#"{"a":1,"b":[2]}"#, r#"{"b": [2], "a": 1}"#));
        assert!(!same_json(r#"{"a":1}"#, r#"{"a":2}"#));
        assert!(!same_json("{}", "not json"));
    }
}
