//! In-memory stand-ins for the unit tests: KV in a map (with keys that always fail), one API
//! key for every account, and a table that counts its scans.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use serde_dynamo::Item;
use tokio::time::Instant;

use crate::domain::{ApiKey, IndexRef, KvAction, KvOp, Namespace, SettingsReference};
use crate::ports::{
    AccountCell, ApiKeySource, Applied, KeyPage, KvStore, ListedKey, Page, PortError, SettingsTable,
};

/// KV in memory; keys in `failing` are never stored.
#[derive(Default)]
pub struct MemoryKv {
    pub values: Mutex<HashMap<String, String>>,
    pub failing: HashSet<String>,
}

impl KvStore for MemoryKv {
    async fn apply(&self, ops: Vec<KvOp>, _: Vec<u8>, _: Instant) -> Applied {
        let mut values = self.values.lock().unwrap();
        let mut failed = Vec::new();
        // As a bulk store would send them: one request per namespace and kind.
        let requests: HashSet<(Namespace, bool)> = (ops.iter())
            .map(|(key, action)| (key.namespace, matches!(action, KvAction::Put(_))))
            .collect();
        for (key, action) in ops {
            if self.failing.contains(&key.key) {
                failed.push((key, PortError::Transient("down".into())));
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

/// An empty table that counts its reference scans.
#[derive(Default)]
pub struct CountingTable {
    pub scans: AtomicUsize,
    pub override_queries: AtomicUsize,
}

impl SettingsTable for CountingTable {
    async fn settings_references(&self) -> Result<Vec<SettingsReference>, PortError> {
        self.scans.fetch_add(1, Ordering::SeqCst);
        Ok(vec![])
    }
    async fn index_references(&self, _: &[IndexRef]) -> Result<Vec<SettingsReference>, PortError> {
        Ok(vec![])
    }
    async fn index_settings(&self, _: &IndexRef) -> Result<Option<Item>, PortError> {
        Ok(None)
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
