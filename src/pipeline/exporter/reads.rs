//! What the operator modes read through the exporter: table items decoded as the stream's
//! records are, table pages, KV values and key listings, each stopped at the deadline.

use std::collections::{HashMap, HashSet};

use tokio::time::Instant;

use super::Exporter;
use crate::domain::{IndexRef, IndexRefs, Namespace, TableKey, TableRecord};
use crate::pipeline::records::ChangeRecord;
use crate::ports::SettingsTable;
use crate::ports::{before_deadline, KeyPage, KvStore, Page, PortError, Ports};

impl<P: Ports> Exporter<P> {
    /// The records of a run of an account's indexes, `first` to `last` by name, read at once:
    /// each index's settings record (if it has one: the flag) and its overrides.
    pub(super) async fn index_run(
        &self,
        account: &str,
        (first, last): (&str, &str),
        deadline: Instant,
    ) -> Result<HashMap<IndexRef, (bool, Vec<ChangeRecord>)>, PortError> {
        let read = self.table.index_range(account, first, last);
        let found = before_deadline(deadline, "index run", read).await?;
        let mut indexes: HashMap<IndexRef, (bool, Vec<ChangeRecord>)> = HashMap::new();
        for record in found {
            let settings = matches!(record, TableRecord::Settings { .. });
            let record = ChangeRecord::from_table(record, true);
            if let Some(index) = record.index.clone() {
                let entry = indexes.entry(index).or_default();
                entry.0 |= settings;
                entry.1.push(record);
            }
        }
        Ok(indexes)
    }

    /// The index's settings record as a change (`None`: the table has none). With query
    /// configs, it stands for all of them (it needs their filter).
    pub async fn settings_record(
        &self,
        index: &IndexRef,
        include_query_configs: bool,
        deadline: Instant,
    ) -> Result<Option<ChangeRecord>, PortError> {
        let read = before_deadline(deadline, "settings item", self.table.index_settings(index));
        let found = read.await?;
        Ok(found.map(|record| ChangeRecord::from_table(record, include_query_configs)))
    }

    /// The index's query-config records after `start`, `limit` at most, and where the rest
    /// begins.
    pub async fn query_configs(
        &self,
        index: &IndexRef,
        start: Option<TableKey>,
        limit: usize,
        deadline: Instant,
    ) -> Result<(Vec<ChangeRecord>, Option<TableKey>), PortError> {
        let page = self.table.query_configs(index, start, limit);
        let page = before_deadline(deadline, "query configs", page).await?;
        let records =
            (page.records.into_iter()).map(|(_, record)| ChangeRecord::from_table(record, true));
        Ok((records.collect(), page.next))
    }

    /// Which of `indexes` have a settings record, and each one's shop.
    pub async fn index_shops(
        &self,
        indexes: &[IndexRef],
        deadline: Instant,
    ) -> Result<HashMap<IndexRef, Option<String>>, PortError> {
        if indexes.is_empty() {
            return Ok(HashMap::new());
        }
        before_deadline(deadline, "settings items", self.table.index_shops(indexes)).await
    }

    /// Which of these overrides (index, query) the table holds.
    pub async fn overrides_exist(
        &self,
        overrides: &[(IndexRef, String)],
        deadline: Instant,
    ) -> Result<HashSet<(IndexRef, String)>, PortError> {
        if overrides.is_empty() {
            return Ok(HashSet::new());
        }
        let read = self.table.overrides_exist(overrides);
        before_deadline(deadline, "override items", read).await
    }

    /// The KV keys of the index's overrides, from a keys-only Query of the table.
    pub async fn override_keys(
        &self,
        index: &IndexRef,
        deadline: Instant,
    ) -> Result<HashSet<String>, PortError> {
        let queries = self.table.override_queries(index);
        let queries = before_deadline(deadline, "override queries", queries).await?;
        let key = |query: &String| crate::domain::kv::query_config_key(index, query);
        Ok(queries.iter().map(key).collect())
    }

    /// One page of the table (one account's records when given), from `start`.
    pub async fn table_page(
        &self,
        account: Option<&str>,
        start: Option<TableKey>,
        limit: i32,
        deadline: Instant,
    ) -> Result<Page, PortError> {
        let page = self.table.page(account, start, limit);
        before_deadline(deadline, "table page", page).await
    }

    /// Reads many values, 100 keys a request; an absent key reads as `None`.
    pub async fn read_many(
        &self,
        namespace: Namespace,
        keys: &[String],
        deadline: Instant,
    ) -> Result<HashMap<String, Option<String>>, PortError> {
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        self.kv.get_many(namespace, keys, deadline).await
    }

    /// One page of a namespace's keys, with their metadata.
    pub async fn list_page(
        &self,
        namespace: Namespace,
        cursor: Option<&str>,
        limit: u32,
        deadline: Instant,
    ) -> Result<KeyPage, PortError> {
        self.kv
            .list_page(namespace, "", cursor, limit, deadline)
            .await
    }

    /// Every settings record's shop and live alias targets (one consistent scan).
    pub async fn settings_references(
        &self,
        deadline: Instant,
    ) -> Result<Vec<(IndexRef, IndexRefs)>, PortError> {
        let scan = self.table.settings_references();
        before_deadline(deadline, "settings table scan", scan).await
    }

    /// Every key of a namespace that starts with `prefix`.
    pub async fn list_keys(
        &self,
        namespace: Namespace,
        prefix: &str,
        deadline: Instant,
    ) -> Result<Vec<String>, PortError> {
        self.kv.list_keys(namespace, prefix, deadline).await
    }
}
