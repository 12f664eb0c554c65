//! The classes a key can be in, and what names a key's index in its value or its aliases.

use serde::{Deserialize, Serialize};

use crate::domain::{IndexId, IndexRef, IndexRefs, KvKey};

/// The class of one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    InSync,
    /// Implied by the table, absent from KV.
    Missing,
    /// Present, but its value differs from what the table implies.
    Stale,
    /// Written by the exporter, with no record behind it.
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
