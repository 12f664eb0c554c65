//! In-memory stand-ins for the unit tests: KV in a map (with keys that always fail, and a write
//! that can be held while another writer runs), one API key for every account, a table that
//! counts its scans, and the ledger.

// Declared `#[cfg(test)]` in `adapters`; said here too, so line counts read it as tests.
#![cfg(test)]

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_dynamo::Item;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::domain::net::{self, Protection};
use crate::domain::table::{overrides_sk, settings_sk};
use crate::domain::{AccountCell, ApiKey, IndexRef, KvAction, KvKey, KvOp, Namespace};
use crate::domain::{ChangeRecord, Scope, TableKey};
use crate::ports::{
    ApiKeySource, IndexRefs, KeyPage, KvStore, Ledger, ListedKey, Page, PortError,
    ReconcileProgress, RecordedPage, Referred, RefsChange, SettingsTable, SweepMark,
};

/// KV in memory; keys in `failing` are never stored.
#[derive(Default)]
pub struct MemoryKv {
    pub values: Mutex<HashMap<String, String>>,
    pub failing: HashSet<String>,
    /// The next write of this key waits, before anything of its request lands, until
    /// released: the window between a writer's read and its write landing, forced.
    pub hold: Mutex<Option<Hold>>,
    pub requests: std::sync::atomic::AtomicUsize,
}

/// A held write: `held` is notified once it waits, `release` lets it go on.
pub struct Hold {
    pub key: String,
    pub held: std::sync::Arc<tokio::sync::Notify>,
    pub release: std::sync::Arc<tokio::sync::Notify>,
}

impl MemoryKv {
    /// Holds the next write of `key`; answers (held, release).
    pub fn hold(
        &self,
        key: &str,
    ) -> (
        std::sync::Arc<tokio::sync::Notify>,
        std::sync::Arc<tokio::sync::Notify>,
    ) {
        let hold = Hold {
            key: key.to_owned(),
            held: Default::default(),
            release: Default::default(),
        };
        let notifies = (hold.held.clone(), hold.release.clone());
        *self.hold.lock().unwrap() = Some(hold);
        notifies
    }

    pub fn value(&self, key: &str) -> Option<String> {
        self.values.lock().unwrap().get(key).cloned()
    }
}

impl KvStore for MemoryKv {
    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    async fn apply(&self, ops: Vec<KvOp>, _: Instant) -> Vec<(KvKey, PortError)> {
        let hold = {
            let mut hold = self.hold.lock().unwrap();
            hold.take_if(|h| ops.iter().any(|(key, _)| key.key == h.key))
        };
        if let Some(hold) = hold {
            hold.held.notify_one();
            hold.release.notified().await;
        }
        let mut values = self.values.lock().unwrap();
        let mut failed = Vec::new();
        // As a bulk store would send them: one request per namespace and kind.
        let requests: HashSet<(Namespace, bool)> = (ops.iter())
            .map(|(key, action)| (key.namespace, matches!(action, KvAction::Put(_))))
            .collect();
        for (key, action) in ops {
            if self.failing.contains(&key.key) {
                failed.push((key, PortError::Unavailable("down".into())));
                continue;
            }
            match action {
                KvAction::Put(value) => values.insert(key.key, value.text().into_owned()),
                KvAction::Delete => values.remove(&key.key),
            };
        }
        self.requests.fetch_add(requests.len(), Ordering::SeqCst);
        failed
    }

    async fn get_many(
        &self,
        _: Namespace,
        keys: &[String],
        _: Instant,
    ) -> Result<HashMap<String, Option<String>>, PortError> {
        let values = self.values.lock().unwrap();
        Ok(keys
            .iter()
            .map(|k| (k.clone(), values.get(k).cloned()))
            .collect())
    }

    async fn list_page(
        &self,
        _: Namespace,
        prefix: &str,
        _: Option<&str>,
        _: u32,
        _: Instant,
    ) -> Result<KeyPage, PortError> {
        let values = self.values.lock().unwrap();
        let mut keys: Vec<ListedKey> = values
            .keys()
            .filter(|k| k.starts_with(prefix))
            .map(|name| ListedKey {
                name: name.clone(),
                metadata: None,
            })
            .collect();
        keys.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(KeyPage { keys, cursor: None })
    }
}

/// Every account has the key `k`, but in the cell `gone`, where none has a key.
pub struct SameKey;

impl ApiKeySource for SameKey {
    async fn fetch(&self, wanted: &AccountCell) -> Result<ApiKey, PortError> {
        match wanted.cell.as_str() {
            "gone" => Err(PortError::NotFound("no API key in cell gone".into())),
            _ => Ok(ApiKey::new("k")),
        }
    }
}

/// A table that answers from the items given (by key, by an index's run of sort keys, by its
/// overrides) and counts its override Queries; its pages find nothing.
#[derive(Default)]
pub struct CountingTable {
    pub override_queries: AtomicUsize,
    /// The items `items` finds, by (`pk`, `sk`).
    pub items: Mutex<HashMap<(String, String), Item>>,
    /// What a read of a settings record answers, one read after another (then nothing): another writer
    /// changing the index between two reads.
    pub settings_reads: Mutex<std::collections::VecDeque<Item>>,
    /// While set, every read by key, by run or of overrides fails (transient).
    pub unreadable: AtomicBool,
}

impl CountingTable {
    fn readable(&self) -> Result<(), PortError> {
        match self.unreadable.load(Ordering::SeqCst) {
            true => Err(PortError::Unavailable("the table cannot be read".into())),
            false => Ok(()),
        }
    }

    /// The items whose keys pass `wanted`, in key order.
    fn sorted(&self, wanted: impl Fn(&str, &str) -> bool) -> Vec<Item> {
        let items = self.items.lock().unwrap();
        let mut found: Vec<(&(String, String), &Item)> = (items.iter())
            .filter(|((pk, sk), _)| wanted(pk, sk))
            .collect();
        found.sort_by(|a, b| a.0.cmp(b.0));
        found.into_iter().map(|(_, item)| item.clone()).collect()
    }
}

/// Of items in key order, those after `start`: the first `limit` (one at least) as records, and
/// where the rest begins. The in-memory tables' `page` (these tests' and the simulation's).
pub(crate) fn page_of(items: Vec<Item>, start: Option<TableKey>, limit: i32) -> Page {
    let limit = usize::try_from(limit.max(1)).unwrap_or(1);
    let after = (items.into_iter()).filter(|item| start < crate::dynamo::table_key(item));
    let mut items: Vec<Item> = after.take(limit + 1).collect();
    let more = items.len() > limit;
    items.truncate(limit);
    let next = (items.last())
        .and_then(crate::dynamo::table_key)
        .filter(|_| more);
    records(&items, next)
}

/// Items as the DynamoDB table decodes them (the default configs' sort key the tests use).
pub(crate) fn records(items: &[Item], next: Option<TableKey>) -> Page {
    super::dynamodb::table_page(items, "DEFAULT_CONFIGS", next)
}

impl SettingsTable for CountingTable {
    async fn index_references(
        &self,
        indexes: &[IndexRef],
    ) -> Result<Vec<(IndexRef, IndexRefs)>, PortError> {
        self.readable()?;
        let items = self.items.lock().unwrap();
        Ok((indexes.iter())
            .filter_map(|index| {
                let key = (index.account.clone(), settings_sk(&index.name));
                let item = items.get(&key)?;
                Some((index.clone(), crate::dynamo::settings_references(item).0))
            })
            .collect())
    }
    async fn records(
        &self,
        keys: Vec<TableKey>,
        mut each: impl FnMut(TableKey, ChangeRecord) + Send,
    ) -> Result<(), PortError> {
        self.readable()?;
        let items = self.items.lock().unwrap().clone();
        for key in keys {
            // A settings read answers what `settings_reads` holds first.
            let queued = match key.sk().contains("#QUERY#") {
                true => None,
                false => self.settings_reads.lock().unwrap().pop_front(),
            };
            let item = queued.or_else(|| {
                items
                    .get(&(key.pk().to_owned(), key.sk().to_owned()))
                    .cloned()
            });
            if let Some(item) = item {
                each(key, crate::dynamo::table_record(&item, "DEFAULT_CONFIGS").0);
            }
        }
        Ok(())
    }
    async fn index_range(
        &self,
        account: &str,
        first: &str,
        last: &str,
    ) -> Result<Vec<(TableKey, ChangeRecord)>, PortError> {
        self.readable()?;
        let (first, last) = (settings_sk(first), settings_sk(last));
        let within =
            |sk: &str| sk >= first.as_str() && (sk <= last.as_str() || sk.starts_with(&last));
        let items = self.sorted(|pk, sk| pk == account && within(sk));
        Ok(records(&items, None).records)
    }
    async fn override_queries(&self, index: &IndexRef) -> Result<Vec<String>, PortError> {
        self.readable()?;
        self.override_queries.fetch_add(1, Ordering::SeqCst);
        let prefix = overrides_sk(&index.name);
        let items = self.sorted(|pk, sk| pk == index.account && sk.starts_with(&prefix));
        let query = |item: &Item| {
            Some(
                crate::dynamo::string_attribute(item, "sk")?
                    .strip_prefix(&prefix)?
                    .to_owned(),
            )
        };
        Ok(items.iter().filter_map(query).collect())
    }
    async fn page(
        &self,
        scope: Scope<'_>,
        start: Option<TableKey>,
        limit: i32,
    ) -> Result<Page, PortError> {
        self.readable()?;
        let items = self.sorted(|pk, sk| scope.holds(pk, sk));
        Ok(page_of(items, start, limit))
    }
}

/// The ledger in memory, kept as the DynamoDB one keeps it: each index's references, the items
/// pointing back (referred, referrer), whether the references are complete, and a reconcile's
/// progress.
#[derive(Default)]
pub struct MemoryLedger {
    pub refs: Mutex<HashMap<IndexRef, IndexRefs>>,
    pub back: Mutex<BTreeSet<(Referred, IndexRef)>>,
    pub complete: AtomicBool,
    pub progress: Mutex<Option<ReconcileProgress>>,
    /// Every index whose references were asked for, in order.
    pub asked: Mutex<Vec<IndexRef>>,
    /// While set, the stream's shrink (`record_refs`) is refused and nothing is taken out.
    pub refuse_shrinks: AtomicBool,
    /// While set, intents (`point_back`) are refused and nothing is added.
    pub refuse_intents: AtomicBool,
    /// Reads of these indexes' references fail.
    pub unreadable: Mutex<BTreeSet<IndexRef>>,
    /// The next intent waits, before anything of it lands, until released (`held`, `release`).
    pub hold_intent: Mutex<Option<(Arc<Notify>, Arc<Notify>)>>,
    /// Intents recorded so far: each call's birth is a multiple of 2^32 no other call has.
    pub calls: AtomicU64,
}

impl MemoryLedger {
    /// Holds the next intent; answers (held, release).
    pub fn hold_intent(&self) -> (Arc<Notify>, Arc<Notify>) {
        let notifies = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        *self.hold_intent.lock().unwrap() = Some(notifies.clone());
        notifies
    }
}

impl Ledger for MemoryLedger {
    async fn references_complete(&self) -> Result<bool, PortError> {
        Ok(self.complete.load(Ordering::SeqCst))
    }

    async fn mark_references_complete(&self) -> Result<(), PortError> {
        self.complete.store(true, Ordering::SeqCst);
        Ok(())
    }

    async fn index_refs(
        &self,
        indexes: &[IndexRef],
    ) -> Result<HashMap<IndexRef, IndexRefs>, PortError> {
        self.asked.lock().unwrap().extend_from_slice(indexes);
        let unreadable = self.unreadable.lock().unwrap();
        if indexes.iter().any(|index| unreadable.contains(index)) {
            return Err(PortError::Unavailable(
                "memory ledger: refs unreadable".into(),
            ));
        }
        let refs = self.refs.lock().unwrap();
        Ok((indexes.iter())
            .filter_map(|index| Some((index.clone(), refs.get(index)?.clone())))
            .collect())
    }

    async fn referrers(&self, referred: &[Referred]) -> Result<Vec<IndexRef>, PortError> {
        let back = self.back.lock().unwrap();
        let named: BTreeSet<IndexRef> = (back.iter())
            .filter(|(r, _)| referred.contains(r))
            .map(|(_, index)| index.clone())
            .collect();
        Ok(named.into_iter().collect())
    }

    async fn pointing(
        &self,
        items: &[(IndexRef, Referred)],
    ) -> Result<Vec<(IndexRef, Referred)>, PortError> {
        let back = self.back.lock().unwrap();
        Ok((items.iter())
            .filter(|(index, r)| back.contains(&(r.clone(), index.clone())))
            .cloned()
            .collect())
    }

    async fn point_back(&self, items: &[(IndexRef, Referred)]) -> Result<u64, PortError> {
        let hold = self.hold_intent.lock().unwrap().take();
        if let Some((held, release)) = hold {
            held.notify_one();
            release.notified().await;
        }
        if self.refuse_intents.load(Ordering::SeqCst) {
            return Err(PortError::Refused("the ledger refused the intent".into()));
        }
        let birth = self.calls.fetch_add(1, Ordering::SeqCst) << 32;
        let (mut refs, mut back) = (self.refs.lock().unwrap(), self.back.lock().unwrap());
        for (index, referred) in items {
            back.insert((referred.clone(), index.clone()));
            let own = refs.entry(index.clone()).or_default();
            match referred {
                Referred::Shop(shop) => own.shops.insert(shop.clone()),
                Referred::Alias(target) => own.targets.insert(target.clone()),
            };
        }
        // One intent per index a call names, as one update of its item counts it, from the
        // call's birth where none was counted yet (DynamoDB's `if_not_exists`).
        let indexes: BTreeSet<&IndexRef> = items.iter().map(|(index, _)| index).collect();
        for index in indexes {
            let own = refs.entry(index.clone()).or_default();
            own.intents = match own.intents {
                0 => birth + 1,
                counted => counted + 1,
            };
        }
        Ok(birth)
    }

    async fn record_refs(&self, changes: &[RefsChange]) -> Result<(), PortError> {
        if self.refuse_shrinks.load(Ordering::SeqCst) {
            return Err(PortError::Refused("the ledger refused the shrink".into()));
        }
        let (mut refs, mut back) = (self.refs.lock().unwrap(), self.back.lock().unwrap());
        for change in changes {
            let counted = refs.get(&change.index).map_or(0, |own| own.intents);
            if counted != change.intents && !net::off(Protection::ShrinkCondition) {
                continue; // Another writer's intent since: it owns what it recorded.
            }
            let marked = refs.get(&change.index).and_then(|own| own.sweep);
            if change.swept.is_some() && marked != change.swept {
                continue; // The sweep's mark taken off or set again since.
            }
            let own = refs.entry(change.index.clone()).or_default();
            let after = change.after();
            let gone: Vec<&Referred> = change.pointing.difference(&after).collect();
            for gone in &gone {
                back.remove(&((*gone).clone(), change.index.clone()));
                match gone {
                    Referred::Shop(shop) => own.shops.remove(shop),
                    Referred::Alias(target) => own.targets.remove(target),
                };
            }
            if change.new.is_none() {
                refs.remove(&change.index); // Removed: its record goes whole.
            }
        }
        Ok(())
    }

    async fn recorded(&self, after: Option<&str>, limit: usize) -> Result<RecordedPage, PortError> {
        let refs = self.refs.lock().unwrap();
        let cursor =
            |index: &IndexRef| format!("{}:{}#{}", index.account.len(), index.account, index.name);
        let mut page: Vec<(IndexRef, IndexRefs)> = (refs.iter())
            .filter(|(index, _)| after.is_none_or(|after| cursor(index).as_str() > after))
            .map(|(index, refs)| (index.clone(), refs.clone()))
            .collect();
        page.sort_by_key(|(index, _)| cursor(index));
        let more = page.len() > limit;
        page.truncate(limit);
        let next = page.last().filter(|_| more).map(|(index, _)| cursor(index));
        Ok((page, next))
    }

    async fn sweep_marks(&self, marks: &[(IndexRef, Option<SweepMark>)]) -> Result<(), PortError> {
        let mut refs = self.refs.lock().unwrap();
        for (index, mark) in marks {
            let Some(own) = refs.get_mut(index) else {
                continue;
            };
            if mark.is_none_or(|mark| mark.intents == own.intents) {
                own.sweep = *mark;
            }
        }
        Ok(())
    }

    async fn reconcile_progress(&self) -> Result<Option<ReconcileProgress>, PortError> {
        Ok(self.progress.lock().unwrap().clone())
    }

    async fn save_reconcile_progress(
        &self,
        progress: &ReconcileProgress,
        expected: Option<u64>,
    ) -> Result<bool, PortError> {
        let mut saved = self.progress.lock().unwrap();
        if saved.as_ref().map(|p| p.version) != expected {
            return Ok(false);
        }
        *saved = Some(progress.clone());
        Ok(true)
    }
}
