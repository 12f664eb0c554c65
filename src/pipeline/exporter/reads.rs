//! What the operator modes and the check read of the table through the exporter: items by key,
//! an index's run, settings records and what they name, each stopped at the deadline (KV values
//! and listings they read from the store itself, `Exporter::kv`); the check's read of the
//! indexes whose keys landed (`read_again`).

use std::collections::{BTreeMap, HashMap};

use futures::StreamExt as _;
use tokio::time::Instant;

use super::{fail_index, Exporter};
use crate::domain::TableSpan;
use crate::domain::{IndexRef, IndexRefs, Namespace, TableKey};
use crate::pipeline::records::ChangeRecord;
use crate::ports::SettingsTable;
use crate::ports::{before_deadline, PortError, Ports};
use crate::report::{BatchReport, Landed, Outcome};

/// Each index's records: whether it has a settings record, and its records as changes.
pub(super) type IndexRuns = HashMap<IndexRef, (bool, Vec<ChangeRecord>)>;

/// One index's landed keys, and the index as the table holds it now.
#[derive(Default)]
pub(super) struct Recheck {
    pub keys: Vec<Landed>,
    /// Whether the index has a settings record now.
    pub settings: bool,
    /// Its records now (its overrides too, when they were read).
    pub records: Vec<ChangeRecord>,
}

/// Accounts read again at once.
const CONCURRENT_READS: usize = 8;
/// From this many indexes of one account on, they are read again as one run of the table.
const RUN_OF_INDEXES: usize = 10;

impl<P: Ports> Exporter<P> {
    /// Each index as the table holds it now; an index that cannot be read fails the records of
    /// its keys. An account's indexes are read as one run of the table when there are many (a
    /// backfill's page: one Query reads what many reads by key would, for fewer read units);
    /// of the others, those with an override key (or filter) landed as their own run, with
    /// their overrides, and the rest by key, all at once (100 a call). A backfill's batch reads
    /// its stretch of the table again instead (a page of it holds 1,000 records, a Query one).
    pub(super) async fn read_again(
        &self,
        by_index: BTreeMap<IndexRef, Recheck>,
        span: Option<&TableSpan>,
        report: &mut BatchReport,
        deadline: Instant,
    ) -> Vec<(IndexRef, Recheck)> {
        let mut by_account: BTreeMap<String, Vec<(IndexRef, Recheck)>> = BTreeMap::new();
        for (index, recheck) in by_index {
            let account = by_account.entry(index.account.clone()).or_default();
            account.push((index, recheck));
        }
        let (mut runs, mut by_key) = (Vec::new(), Vec::new());
        for indexes in by_account.into_values() {
            if indexes.len() >= RUN_OF_INDEXES {
                runs.push(indexes);
                continue;
            }
            for (index, recheck) in indexes {
                let overrides = (recheck.keys.iter())
                    .any(|landed| landed.key.namespace == Namespace::QueryConfigs);
                match overrides {
                    true => runs.push(vec![(index, recheck)]),
                    false => by_key.push((index, recheck)),
                }
            }
        }
        let mut found = Vec::new();
        if let Some(span) = span.filter(|_| !runs.is_empty()) {
            match self.span_runs(span, deadline).await {
                Ok(mut seen) => {
                    let mut seen = |group| take_seen(group, &mut seen, &mut found);
                    let left = runs.into_iter().map(&mut seen);
                    runs = left.filter(|group| !group.is_empty()).collect();
                    by_key = seen(by_key);
                }
                Err(e) => {
                    let groups = runs.iter().flatten().chain(&by_key);
                    groups.for_each(|(_, recheck)| fail_all(report, recheck, &e));
                    return found;
                }
            }
        }
        // Each group with what its read found: its indexes' records (an index not found has
        // no settings record and no records), or why it could not be read.
        let runs = (runs.into_iter()).map(|run| async move {
            let (first, last) = (&run[0].0, &run[run.len() - 1].0);
            let names = (first.name.as_str(), last.name.as_str());
            let read = self.index_run(&first.account, names, deadline).await;
            (run, read)
        });
        let runs = futures::stream::iter(runs).buffer_unordered(CONCURRENT_READS);
        let by_key = async {
            let read = self.settings_of(by_key.iter().map(|(index, _)| index), deadline);
            let read = read.await.map(|found| {
                let settings = |record| (true, vec![record]);
                (found
                    .into_iter()
                    .map(|(index, record)| (index, settings(record))))
                .collect()
            });
            (by_key, read)
        };
        let (by_key, runs) = tokio::join!(by_key, runs.collect::<Vec<_>>());
        for (indexes, mut read) in runs.into_iter().chain([by_key]) {
            for (index, mut recheck) in indexes {
                match &mut read {
                    Ok(now) => {
                        let now = now.remove(&index).unwrap_or_default();
                        (recheck.settings, recheck.records) = now;
                        found.push((index, recheck));
                    }
                    Err(e) => fail_all(report, &recheck, e),
                }
            }
        }
        found
    }

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
        for (key, record) in found {
            let settings = record.settings_at(&key);
            let record = record.asked(&key, true);
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
    ) -> Result<Vec<(TableKey, ChangeRecord)>, PortError> {
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
    ) -> Result<HashMap<IndexRef, ChangeRecord>, PortError> {
        let keys = indexes.into_iter().map(|index| TableKey::of(index, None));
        let found = self.records_of(keys.collect(), deadline).await?;
        Ok((found.into_iter())
            .filter(|(key, record)| record.settings_at(key))
            .filter_map(|(_, record)| Some((record.index.clone()?, record)))
            .collect())
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
}

/// The indexes of `group` a stretch read again holds whole go to `found`, with their records;
/// the others are left.
fn take_seen(
    group: Vec<(IndexRef, Recheck)>,
    seen: &mut IndexRuns,
    found: &mut Vec<(IndexRef, Recheck)>,
) -> Vec<(IndexRef, Recheck)> {
    let mut left = Vec::new();
    for (index, mut recheck) in group {
        match seen.remove(&index) {
            Some(now) => {
                (recheck.settings, recheck.records) = now;
                found.push((index, recheck));
            }
            None => left.push((index, recheck)),
        }
    }
    left
}

/// Every key of an index that could not be read again fails its records: retried.
fn fail_all(report: &mut BatchReport, recheck: &Recheck, error: &PortError) {
    let failures = recheck.keys.iter().map(|landed| {
        let key = &landed.key.key;
        let why =
            format!("KV key `{key}`: its index could not be read again after writing: {error}");
        (&landed.fails[..], Outcome::Failed(why))
    });
    fail_index(&mut report.records, failures);
}
