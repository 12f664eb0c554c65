//! What the operator modes and the check read of the table through the exporter: items by key,
//! an index's run, its overrides, references, each stopped at the deadline (KV values
//! and listings they read from the store itself, `Exporter::kv`).

use std::collections::{HashMap, HashSet};

use tokio::time::Instant;

use super::Exporter;
use crate::domain::{IndexRef, IndexRefs, TableKey, TableRecord};
use crate::pipeline::records::ChangeRecord;
use crate::ports::SettingsTable;
use crate::ports::{before_deadline, PortError, Ports};

/// Each index's records: whether it has a settings record, and its records as changes.
pub(super) type IndexRuns = HashMap<IndexRef, (bool, Vec<ChangeRecord>)>;

impl<P: Ports> Exporter<P> {
    /// The records of a run of an account's indexes, `first` to `last` by name, read at once:
    /// each index's settings record (if it has one: the flag) and its overrides.
    pub(super) async fn index_run(
        &self,
        account: &str,
        (first, last): (&str, &str),
        deadline: Instant,
    ) -> Result<IndexRuns, PortError> {
        let read = self.table.index_range(account, first, last);
        let found = before_deadline(deadline, "index run", read).await?;
        let mut indexes = IndexRuns::new();
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

    /// The records with these keys that the table holds (consistent reads, 100 a call).
    pub async fn records_of(
        &self,
        keys: Vec<TableKey>,
        deadline: Instant,
    ) -> Result<Vec<(TableKey, TableRecord)>, PortError> {
        let mut found = Vec::with_capacity(keys.len());
        if !keys.is_empty() {
            let read = self
                .table
                .records(keys, |key, record| found.push((key, record)));
            before_deadline(deadline, "table items", read).await?;
        }
        Ok(found)
    }

    /// The settings records of these indexes that the table holds, by index (one read by key,
    /// 100 a call).
    pub async fn settings_of(
        &self,
        indexes: impl IntoIterator<Item = &IndexRef>,
        deadline: Instant,
    ) -> Result<HashMap<IndexRef, TableRecord>, PortError> {
        let keys = indexes.into_iter().map(|index| TableKey::of(index, None));
        let found = self.records_of(keys.collect(), deadline).await?;
        Ok((found.into_iter())
            .filter_map(|(_, record)| match &record {
                TableRecord::Settings { index, .. } => Some((index.clone(), record)),
                _ => None,
            })
            .collect())
    }

    /// The index's settings record as a change (`None`: the table has none). With query
    /// configs, it stands for all of them (it needs their filter).
    pub async fn settings_record(
        &self,
        index: &IndexRef,
        include_query_configs: bool,
        deadline: Instant,
    ) -> Result<Option<ChangeRecord>, PortError> {
        let record = self.settings_of([index], deadline).await?.remove(index);
        Ok(record.map(|record| ChangeRecord::from_table(record, include_query_configs)))
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

    /// What the settings records of `indexes` name (their shops and live aliases), for those
    /// that have one.
    pub async fn index_references(
        &self,
        indexes: &[IndexRef],
        deadline: Instant,
    ) -> Result<HashMap<IndexRef, IndexRefs>, PortError> {
        if indexes.is_empty() {
            return Ok(HashMap::new());
        }
        let read = self.table.index_references(indexes);
        Ok(before_deadline(deadline, "settings items", read)
            .await?
            .into_iter()
            .collect())
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

    /// Every settings record's shop and live alias targets (one consistent scan).
    pub async fn settings_references(
        &self,
        deadline: Instant,
    ) -> Result<Vec<(IndexRef, IndexRefs)>, PortError> {
        let scan = self.table.settings_references();
        before_deadline(deadline, "settings table scan", scan).await
    }
}
