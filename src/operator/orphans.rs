//! The one orphan finder, of the reconcile's listing and verify's query-config keys: which
//! listed KV keys no table record implies any more, with who each was written for. A key the
//! exporter did not write is foreign; an orphan an alias keeps is protected.

use std::collections::{BTreeSet, HashMap, HashSet};

use tokio::time::Instant;

use super::classify::{could_be_written, Class, Drift};
use crate::domain::kv::{is_query_config_key_of, query_config_key, query_config_prefix};
use crate::domain::kv::{KeyMetadata, Written};
use crate::domain::qfilter::filter_key;
use crate::domain::{IndexRef, KvKey, Namespace, TableKey};
use crate::pipeline::exporter::{Exporter, Prepared};
use crate::pipeline::scope::Referrers;
use crate::ports::Referred;
use crate::ports::{KvStore as _, ListedKey, PortError, Ports};

/// A listed key with who it was written for (and, for an override's, its query when the
/// metadata names it).
struct Listed {
    key: KvKey,
    owner: Option<IndexRef>,
    query: Option<String>,
}

/// What listed keys are: each one's class (a key a record implies is left out: the table's
/// comparison counts it), and the shop keys an alias keeps, with their index.
pub struct Found {
    pub drift: Drift,
    pub kept_shops: Vec<(IndexRef, String)>,
}

/// The index's query-config keys that no override record implies: its keys KV lists (by the
/// prefix it shares with other indexes: `(a-1, x)` and `(a, 1-x)`), those `prepared` does not
/// plan classified as the reconcile's listing classifies them, the orphans written for it kept.
pub async fn of_index<P: Ports>(
    exporter: &Exporter<P>,
    index: &IndexRef,
    prepared: &Prepared,
    deadline: Instant,
) -> Result<Vec<KvKey>, PortError> {
    let (prefix, mut cursor, mut found) = (query_config_prefix(index), None, Vec::new());
    loop {
        let namespace = Namespace::QueryConfigs;
        let list = exporter
            .kv()
            .list_page(namespace, &prefix, cursor.as_deref(), 1000, deadline);
        let mut page = list
            .await
            .map_err(|e| e.context("listing query-config keys"))?;
        page.keys.retain(|k| {
            let key = KvKey::query_config_named(&k.name);
            is_query_config_key_of(index, &k.name) && !prepared.desired.keys.contains_key(&key)
        });
        let mut orphans = Orphans::new(exporter, deadline);
        let classify = orphans.classify(namespace, page.keys, Some(&index.account));
        let drift = classify
            .await
            .map_err(|e| e.context("reading the index's overrides"))?;
        let own = (drift.drift.keys.into_iter())
            .filter(|(_, c)| c.class == Class::Orphaned && c.owner.as_ref() == Some(index));
        found.extend(own.map(|(key, _)| key));
        match page.cursor {
            Some(next) => cursor = Some(next),
            None => return Ok(found),
        }
    }
}

pub struct Orphans<'a, P: Ports> {
    exporter: &'a Exporter<P>,
    deadline: Instant,
    /// Bulk reads of values it took (100 keys a request).
    pub bulk_gets: usize,
}

impl<'a, P: Ports> Orphans<'a, P> {
    pub fn new(exporter: &'a Exporter<P>, deadline: Instant) -> Self {
        Self {
            exporter,
            deadline,
            bulk_gets: 0,
        }
    }

    /// Classifies listed keys of one namespace (of one account's indexes when given: another
    /// account's key, or one whose owner cannot be told, is left out).
    pub async fn classify(
        &mut self,
        namespace: Namespace,
        keys: Vec<ListedKey>,
        account: Option<&str>,
    ) -> Result<Found, PortError> {
        let mut held = self.held(namespace, keys).await?;
        if let Some(account) = account {
            held.retain(|k| k.owner.as_ref().is_some_and(|o| o.account == account));
        }
        let (orphans, live) = self.not_implied(&held).await?;
        // Only settings keys are protected by an alias: query configs follow their records.
        let protected = match namespace {
            Namespace::Settings => self.aliased(orphans.values()).await?,
            Namespace::QueryConfigs => HashSet::new(),
        };
        let (mut drift, mut kept_shops) = (Drift::default(), Vec::new());
        for key in held {
            let (class, owner) = match (key.owner, orphans.get(&key.key)) {
                (None, _) => (Class::Foreign, None),
                // An alias keeps a removed index's settings keys (its shop key only while no
                // other index claims the shop); its query configs follow its override records.
                (Some(owner), Some(_))
                    if protected.contains(&owner)
                        && key.key.namespace == Namespace::Settings
                        && !live.contains(&owner) =>
                {
                    if key.key.is_shop_of(&owner) {
                        kept_shops.push((owner.clone(), key.key.key.clone()));
                    }
                    (Class::Protected, Some(owner))
                }
                (Some(owner), Some(_)) => (Class::Orphaned, Some(owner)),
                (Some(_), None) => continue,
            };
            drift.insert(key.key, class, owner);
        }
        Ok(Found { drift, kept_shops })
    }

    /// Who each listed key was written for: from its metadata, or its value where the
    /// metadata cannot tell (the table step reads every value it compares anyway).
    async fn held(
        &mut self,
        namespace: Namespace,
        keys: Vec<ListedKey>,
    ) -> Result<Vec<Listed>, PortError> {
        let listed: Vec<(String, Option<KeyMetadata>)> = (keys.into_iter())
            .map(|k| (k.name, KeyMetadata::ours(k.metadata.as_ref())))
            .collect();
        let unread: Vec<String> = (listed.iter())
            .filter(|(_, meta)| meta.as_ref().and_then(KeyMetadata::index_ref).is_none())
            .map(|(key, _)| key.clone())
            .collect();
        let mut values = HashMap::new();
        if !unread.is_empty() {
            let read = self
                .exporter
                .kv()
                .get_many(namespace, &unread, self.deadline);
            values = read.await?;
            self.bulk_gets += unread.len().div_ceil(100);
        }
        Ok((listed.into_iter())
            .map(|(key, meta)| {
                let value = values.remove(&key).flatten();
                let named = meta.as_ref().and_then(KeyMetadata::index_ref);
                let written = value.as_deref().and_then(Written::read).map(Written::owner);
                let owner = (named.or(written)).filter(could_be_written);
                let query = meta.and_then(|m| m.query);
                let key = KvKey { namespace, key };
                Listed { key, owner, query }
            })
            .collect())
    }

    /// The listed keys no table record implies any more, with the index each was written for,
    /// and which of those indexes have a settings record.
    async fn not_implied(
        &mut self,
        held: &[Listed],
    ) -> Result<(HashMap<KvKey, IndexRef>, HashSet<IndexRef>), PortError> {
        let (exporter, deadline) = (self.exporter, self.deadline);
        let owners: BTreeSet<IndexRef> = held.iter().filter_map(|k| k.owner.clone()).collect();
        let owners: Vec<IndexRef> = owners.into_iter().collect();
        let refs = exporter.index_references(&owners, deadline);
        let refs = refs.await?;
        let overrides = self.overrides_of(held, &refs).await?;
        let mut gone = HashMap::new();
        let mut shops_asked = Vec::new();
        for key in held {
            let Some(owner) = &key.owner else { continue };
            let exists = refs.contains_key(owner);
            let implied = match key.key.namespace {
                Namespace::Settings if key.key.is_shop_of(owner) => refs
                    .get(owner)
                    .is_some_and(|r| r.shops.contains(&key.key.key)),
                Namespace::Settings => exists,
                // A filter follows its index's override records, whatever its settings record:
                // with one, the table step compares it; without, it is implied by overrides.
                Namespace::QueryConfigs if key.key == filter_key(owner) => {
                    exists || overrides.any_of(owner)
                }
                Namespace::QueryConfigs => overrides.holds(key, owner),
            };
            if implied {
                continue;
            }
            if key.key.is_shop_of(owner) {
                shops_asked.push((key.key.key.clone(), owner.clone()));
            }
            gone.insert(key.key.clone(), owner.clone());
        }
        // A shop key its writer gave up may be another index's now (the table step writes it).
        for shop in exporter.served(&shops_asked, deadline).await? {
            gone.remove(&KvKey::settings(shop));
        }
        Ok((gone, refs.into_keys().collect()))
    }

    /// Which listed query configs' override records exist: a key is a hash of its query, checked
    /// by key when its metadata names the query (and the key is that query's), else against its
    /// owner's overrides listed (a keys-only Query), as is a filter without a settings record.
    async fn overrides_of(
        &mut self,
        held: &[Listed],
        refs: &HashMap<IndexRef, crate::ports::IndexRefs>,
    ) -> Result<Overrides, PortError> {
        let (exporter, deadline) = (self.exporter, self.deadline);
        let (mut named, mut queried) = (HashMap::new(), BTreeSet::new());
        for k in held
            .iter()
            .filter(|k| k.key.namespace == Namespace::QueryConfigs)
        {
            let Some(owner) = &k.owner else { continue };
            match k.query.as_deref() {
                _ if k.key == filter_key(owner) => {
                    if !refs.contains_key(owner) {
                        queried.insert(owner.clone());
                    }
                }
                Some(query) if KvKey::query_config(owner, query) == k.key => {
                    named.insert(k.key.clone(), (owner.clone(), query.to_owned()));
                }
                _ => {
                    queried.insert(owner.clone());
                }
            }
        }
        let asked = (named.values()).map(|(owner, query)| TableKey::of(owner, Some(query)));
        let found = exporter.records_of(asked.collect(), deadline);
        let found: HashSet<TableKey> = (found.await?.into_iter()).map(|(key, _)| key).collect();
        let named = (named.into_iter())
            .map(|(key, (owner, query))| (key, found.contains(&TableKey::of(&owner, Some(&query)))))
            .collect();
        let mut by_owner = HashMap::new();
        for (owner, queries) in exporter.overrides_of(queried, deadline).await {
            let keys = queries?
                .iter()
                .map(|q| query_config_key(&owner, q))
                .collect();
            by_owner.insert(owner, keys);
        }
        Ok(Overrides { named, by_owner })
    }

    /// Of these indexes, those an enabled read or analytics alias points at.
    async fn aliased<'i>(
        &mut self,
        indexes: impl Iterator<Item = &'i IndexRef>,
    ) -> Result<HashSet<IndexRef>, PortError> {
        let indexes: BTreeSet<&IndexRef> = indexes.collect();
        if indexes.is_empty() {
            return Ok(HashSet::new());
        }
        let asked = indexes.iter().map(|i| Referred::Alias(i.id().0)).collect();
        let own = BTreeSet::new();
        let references = self.exporter.referrers_of(asked, &own, self.deadline);
        let referrers = Referrers::of(references.await?);
        let kept = indexes
            .into_iter()
            .filter(|i| !referrers.keeping(i).is_empty());
        Ok(kept.cloned().collect())
    }
}

/// Which override records exist behind listed query-config keys.
struct Overrides {
    /// Keys whose metadata named their query: whether its record exists.
    named: HashMap<KvKey, bool>,
    /// Owners whose overrides were listed: their override keys.
    by_owner: HashMap<IndexRef, HashSet<String>>,
}

impl Overrides {
    fn holds(&self, key: &Listed, owner: &IndexRef) -> bool {
        match self.named.get(&key.key) {
            Some(exists) => *exists,
            None => (self.by_owner.get(owner)).is_some_and(|k| k.contains(&key.key.key)),
        }
    }

    /// Whether the owner has override records (asked only of owners listed).
    fn any_of(&self, owner: &IndexRef) -> bool {
        self.by_owner.get(owner).is_some_and(|k| !k.is_empty())
    }
}
