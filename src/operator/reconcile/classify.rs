//! The classes a key can be in, and how a listed key is put in exactly one of them.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::domain::kv::{digest, KeyMetadata};
use crate::domain::{IndexId, IndexRef, KvKey, SettingsReference};

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

/// What the table implies, and what protects keys it does not imply.
pub struct Implied {
    /// Each implied key and the digest of its value (what its metadata should say).
    pub digests: BTreeMap<KvKey, String>,
    /// Index ids an enabled read or analytics alias points at.
    pub aliased: HashSet<IndexId>,
    /// Indexes with a record that cannot be exported (rejected): their keys are kept.
    pub unexportable: HashSet<IndexRef>,
}

/// A listed key with what is known of it.
pub struct Listed {
    pub key: KvKey,
    pub metadata: Option<KeyMetadata>,
    pub value: Option<String>,
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

/// The class of a listed key; `None` when it belongs to another account than the one asked.
pub fn class_of(
    listed: &Listed,
    implied: &Implied,
    account: Option<&str>,
    deep: bool,
) -> Option<Class> {
    let owner = listed
        .metadata
        .as_ref()
        .and_then(|m| m.index_ref())
        .or_else(|| listed.value.as_deref().and_then(owner_in_value));
    if let Some(expected) = implied.digests.get(&listed.key) {
        let actual = match (&listed.metadata, &listed.value) {
            (_, Some(value)) if deep || listed.metadata.is_none() => digest(value),
            (Some(meta), _) => meta.digest.clone(),
            (None, _) => String::new(),
        };
        return Some(if actual == *expected {
            Class::InSync
        } else {
            Class::Stale
        });
    }
    if let Some(account) = account {
        if owner.as_ref().is_none_or(|o| o.account != account) {
            return None;
        }
    }
    let Some(owner) = owner else {
        return Some(Class::Foreign);
    };
    // An aliased index keeps the keys an alias reads (its own key, overrides and filter: all by
    // index id, never its shop key): never deleted unchecked.
    let aliased = implied.aliased.contains(&owner.id()) && listed.key.read_by_id();
    if aliased || implied.unexportable.contains(&owner) {
        return Some(Class::Protected);
    }
    Some(Class::Orphaned)
}

pub fn live_targets(references: &[SettingsReference]) -> impl Iterator<Item = IndexId> + '_ {
    references
        .iter()
        .flat_map(|r| r.live_targets.iter().filter(move |t| **t != r.index.id()))
        .cloned()
}
