//! In-memory stand-ins for the unit tests: KV in a map (with keys that always fail), one API
//! key for every account, a table that counts its scans, and the ledger.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use serde_dynamo::Item;
use tokio::time::Instant;

use crate::domain::{ApiKey, IndexRef, KvAction, KvOp, Namespace, SettingsReference};
use crate::ports::{
    AccountCell, ApiKeySource, Applied, IndexRefs, KeyPage, KvStore, Ledger, ListedKey, Page,
    PortError, ReconcileProgress, Referred, RefsChange, SettingsTable,
};

/// KV in memory; keys in `failing` are never stored.
#[derive(Default)]
pub struct MemoryKv {
    pub values: Mutex<HashMap<String, String>>,
    pub failing: HashSet<String>,
}

impl KvStore for MemoryKv {
    async fn apply(&self, ops: Vec<KvOp>, _: Instant) -> Applied {
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
        Applied {
            requests: requests.len(),
            failed,
        }
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

/// Every account has the key `k`.
pub struct SameKey;

impl ApiKeySource for SameKey {
    async fn fetch(&self, _: &AccountCell) -> Result<ApiKey, PortError> {
        Ok(ApiKey::new("k"))
    }
}

/// A table that counts its reference scans and holds only the items given (the ones the
/// stream's records are about).
#[derive(Default)]
pub struct CountingTable {
    pub scans: AtomicUsize,
    pub override_queries: AtomicUsize,
    /// The items `items` finds, by (`pk`, `sk`).
    pub items: Mutex<HashMap<(String, String), Item>>,
    /// What `index_settings` answers, one read after another (then nothing): another writer
    /// changing the index between two reads.
    pub settings_reads: Mutex<std::collections::VecDeque<Item>>,
}

impl SettingsTable for CountingTable {
    async fn settings_references(&self) -> Result<Vec<SettingsReference>, PortError> {
        self.scans.fetch_add(1, Ordering::SeqCst);
        Ok(vec![])
    }
    async fn index_references(
        &self,
        indexes: &[IndexRef],
    ) -> Result<Vec<SettingsReference>, PortError> {
        let items = self.items.lock().unwrap();
        Ok((indexes.iter())
            .filter_map(|index| {
                let key = (index.account.clone(), format!("INDEX#{}", index.name));
                let item = items.get(&key)?;
                Some(crate::dynamo::settings_reference(index.clone(), item).0)
            })
            .collect())
    }
    async fn items(
        &self,
        keys: Vec<(String, String)>,
        mut each: impl FnMut(Item) + Send,
    ) -> Result<(), PortError> {
        let items = self.items.lock().unwrap().clone();
        for item in keys.iter().filter_map(|key| items.get(key)) {
            each(item.clone());
        }
        Ok(())
    }
    async fn index_settings(&self, _: &IndexRef) -> Result<Option<Item>, PortError> {
        Ok(self.settings_reads.lock().unwrap().pop_front())
    }
    async fn index_range(&self, _: &str, _: &str, _: &str) -> Result<Vec<Item>, PortError> {
        Ok(vec![])
    }
    async fn index_shops(
        &self,
        _: &[IndexRef],
    ) -> Result<std::collections::HashMap<IndexRef, Option<String>>, PortError> {
        Ok(Default::default())
    }
    async fn overrides_exist(
        &self,
        _: &[(IndexRef, String)],
    ) -> Result<std::collections::HashSet<(IndexRef, String)>, PortError> {
        Ok(Default::default())
    }
    async fn query_configs(
        &self,
        _: &IndexRef,
        _: Option<Item>,
        _: usize,
    ) -> Result<Page, PortError> {
        Ok(Page::default())
    }
    async fn override_queries(&self, _: &IndexRef) -> Result<Vec<String>, PortError> {
        self.override_queries.fetch_add(1, Ordering::SeqCst);
        Ok(vec![])
    }
    async fn page(&self, _: Option<&str>, _: Option<Item>, _: i32) -> Result<Page, PortError> {
        Ok(Page::default())
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

    async fn point_back(&self, items: &[(IndexRef, Referred)]) -> Result<(), PortError> {
        let (mut refs, mut back) = (self.refs.lock().unwrap(), self.back.lock().unwrap());
        for (index, referred) in items {
            back.insert((referred.clone(), index.clone()));
            let own = refs.entry(index.clone()).or_default();
            match referred {
                Referred::Shop(shop) => own.shops.insert(shop.clone()),
                Referred::Alias(target) => own.targets.insert(target.clone()),
            };
        }
        Ok(())
    }

    async fn record_refs(&self, changes: &[RefsChange]) -> Result<(), PortError> {
        let (mut refs, mut back) = (self.refs.lock().unwrap(), self.back.lock().unwrap());
        for change in changes {
            let own = refs.entry(change.index.clone()).or_default();
            for gone in change.pointing.difference(&change.new.referred()) {
                back.remove(&(gone.clone(), change.index.clone()));
                match gone {
                    Referred::Shop(shop) => own.shops.remove(shop),
                    Referred::Alias(target) => own.targets.remove(target),
                };
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
