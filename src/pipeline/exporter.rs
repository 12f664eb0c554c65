//! The exporter core: looks up what a batch needs, plans it, sends the KV requests and decides
//! every record's outcome. The stream handler and the manual re-export both go through here.

use std::collections::HashMap;

use futures::StreamExt as _;
use serde_dynamo::Item;
use tokio::time::Instant;

use crate::adapters::api_keys::ApiKeyCache;
use crate::domain::kv::KvRequest;
use crate::domain::{IndexRef, KvAction, KvKey, Namespace};
use crate::pipeline::bulk;
use crate::pipeline::plan::{self, Lookups};
use crate::pipeline::records::{decode_item, decode_record, ChangeRecord};
use crate::ports::{
    ApiKeySource, KeyFailures, KvCounters, KvStore, LookupCounts, PortError, SettingsTable,
};
use crate::report::{BatchReport, Outcome, RecordReport};

/// How many KV requests (bulk or single reads) are in flight at once.
const CONCURRENT_KV_REQUESTS: usize = 4;

#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub default_cell: String,
    pub default_configs_sk: String,
}

/// The core with its collaborators. The entry and the operator modes call it through its
/// methods only.
pub struct Exporter<K, A, T> {
    kv: K,
    api_keys: ApiKeyCache<A>,
    table: T,
    options: ExportOptions,
}

/// One page of the table, decoded, and where the next one starts.
#[derive(Debug)]
pub struct TablePage {
    pub records: Vec<ChangeRecord>,
    pub next: Option<Item>,
}

/// Records with their lookups done and their KV operations planned, nothing sent yet.
#[derive(Debug)]
pub struct Prepared {
    pub records: Vec<ChangeRecord>,
    pub plan: plan::Plan,
    pub api_keys: LookupCounts,
}

impl<K: KvStore, A: ApiKeySource, T: SettingsTable> Exporter<K, A, T> {
    pub fn new(kv: K, api_keys: ApiKeyCache<A>, table: T, options: ExportOptions) -> Self {
        Self {
            kv,
            api_keys,
            table,
            options,
        }
    }

    /// Exports the raw records of a `{"Records": [...]}` payload, in stream order.
    pub async fn export_stream(
        &self,
        raw: Vec<serde_json::Value>,
        deadline: Instant,
    ) -> BatchReport {
        let records = raw
            .into_iter()
            .map(|r| decode_record(r, &self.options.default_configs_sk))
            .collect();
        self.export(records, deadline).await
    }

    pub async fn export(&self, records: Vec<ChangeRecord>, deadline: Instant) -> BatchReport {
        let prepared = self.prepare(records, deadline).await;
        self.apply(prepared, deadline).await
    }

    /// Everything but the KV writes: lookups and the plan. A dry run stops here.
    pub async fn prepare(&self, records: Vec<ChangeRecord>, deadline: Instant) -> Prepared {
        let cell = &self.options.default_cell;
        let needs = plan::needs(&records, cell);
        let (lookups, api_keys) = self.look_up(needs, deadline).await;
        let plan = plan::plan(&records, &lookups, cell);
        for (owner, note) in &plan.notes {
            let index = records[*owner].index.as_ref();
            tracing::info!(
                account = %index.map(|i| i.account.as_str()).unwrap_or("?"),
                index = %index.map(|i| i.name.as_str()).unwrap_or("?"),
                "{note}"
            );
        }
        Prepared {
            records,
            plan,
            api_keys,
        }
    }

    /// Sends the plan's operations and decides every record's outcome.
    pub async fn apply(&self, prepared: Prepared, deadline: Instant) -> BatchReport {
        let Prepared {
            records,
            plan,
            api_keys,
        } = prepared;
        let mut outcomes = plan.outcomes;
        let requests = bulk::requests(&plan.ops);
        let before = self.kv.counters();
        let failures = self.send_all(&requests, deadline).await;
        let KvCounters { retries, .. } = self.kv.counters();
        let applied_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        let failed_keys: HashMap<(Namespace, &str), &PortError> = failures
            .iter()
            .flat_map(|(namespace, failure)| {
                failure
                    .keys
                    .iter()
                    .map(move |key| ((*namespace, key.as_str()), &failure.error))
            })
            .collect();

        let mut report = BatchReport {
            kv_requests: requests.len(),
            kv_retries: retries - before.retries,
            api_keys,
            ..BatchReport::default()
        };
        for (key, op) in &plan.ops {
            match failed_keys.get(&(key.namespace, key.key.as_str())) {
                Some(reason) => {
                    if outcomes[op.owner] == Outcome::Pending {
                        outcomes[op.owner] =
                            Outcome::Failed(format!("KV key `{}`: {reason}", key.key));
                    }
                }
                None => match op.action {
                    KvAction::Put(_) => report.written.push(key.clone()),
                    KvAction::Delete => report.deleted.push(key.clone()),
                },
            }
        }
        report.keys_written = report.written.len();
        report.keys_deleted = report.deleted.len();
        report.lag_seconds = records
            .iter()
            .zip(&outcomes)
            .filter(|(_, outcome)| **outcome == Outcome::Pending)
            .filter_map(|(record, _)| record.created_at)
            .map(|created| (applied_at - created).max(0.0))
            .collect();
        report.records = records
            .into_iter()
            .zip(outcomes)
            .map(|(record, outcome)| RecordReport {
                sequence_number: record.sequence_number,
                index: record.index,
                // A pending record whose operations were all applied is exported.
                outcome: match outcome {
                    Outcome::Pending => Outcome::Exported,
                    outcome => outcome,
                },
            })
            .collect();
        report
    }

    /// The index's settings record as a change (`None`: the table has no such record) and,
    /// when asked, its query configs.
    pub async fn index_records(
        &self,
        index: &IndexRef,
        include_query_configs: bool,
    ) -> Result<Option<Vec<ChangeRecord>>, PortError> {
        let Some(item) = self.table.index_settings(index).await? else {
            return Ok(None);
        };
        let mut records = vec![self.decode_item(item, true)];
        if include_query_configs {
            let items = self.table.query_configs(index).await?;
            records.extend(items.into_iter().map(|item| self.decode_item(item, true)));
        }
        Ok(Some(records))
    }

    /// One page of the table (one account's records when given), decoded.
    pub async fn table_page(
        &self,
        account: Option<&str>,
        start: Option<Item>,
        limit: i32,
        include_query_configs: bool,
    ) -> Result<TablePage, PortError> {
        let page = self.table.page(account, start, limit).await?;
        Ok(TablePage {
            records: page
                .items
                .into_iter()
                .map(|item| self.decode_item(item, include_query_configs))
                .collect(),
            next: page.next,
        })
    }

    fn decode_item(&self, item: Item, include_query_configs: bool) -> ChangeRecord {
        decode_item(
            item,
            &self.options.default_configs_sk,
            include_query_configs,
        )
    }

    /// Reads KV values, a few at a time, in the order asked.
    pub async fn read_values(
        &self,
        keys: Vec<KvKey>,
        deadline: Instant,
    ) -> Vec<(KvKey, Result<Option<String>, PortError>)> {
        futures::stream::iter(keys)
            .map(|key| async move {
                let value = self.kv.get(key.namespace, &key.key, deadline).await;
                (key, value)
            })
            .buffered(CONCURRENT_KV_REQUESTS)
            .collect()
            .await
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

    /// API keys, the table scan and current shop ids, all at once.
    async fn look_up(&self, needs: plan::Needs, deadline: Instant) -> (Lookups, LookupCounts) {
        let api_keys = self.api_keys.lookup_all(needs.api_keys);
        let references = async {
            if needs.references {
                Some(self.table.settings_references().await)
            } else {
                None
            }
        };
        let current_shops = futures::stream::iter(needs.current_shops)
            .map(|index| async move {
                let key = KvKey::index(&index);
                let value = self.kv.get(key.namespace, &key.key, deadline).await;
                (index, value.map(|v| v.and_then(|v| shop_in_kv_value(&v))))
            })
            .buffer_unordered(CONCURRENT_KV_REQUESTS)
            .collect::<HashMap<_, _>>();
        let ((api_keys, counts), references, current_shops) =
            tokio::join!(api_keys, references, current_shops);
        (
            Lookups {
                api_keys,
                references,
                current_shops,
            },
            counts,
        )
    }

    async fn send_all(
        &self,
        requests: &[KvRequest],
        deadline: Instant,
    ) -> Vec<(Namespace, KeyFailures)> {
        futures::stream::iter(requests)
            .map(|request| async move {
                self.kv
                    .send(request, deadline)
                    .await
                    .err()
                    .map(|failure| (request.namespace(), failure))
            })
            .buffer_unordered(CONCURRENT_KV_REQUESTS)
            .filter_map(|failure| async move { failure })
            .collect()
            .await
    }
}

/// The shop id in a settings value as this function wrote it; anything else claims none.
fn shop_in_kv_value(value: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(value).ok()?;
    value
        .get("shop_id")?
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::memory::{CountingTable, MemoryKv, SameKey};
    use serde_json::json;
    use std::collections::HashSet;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    fn exporter(kv: MemoryKv) -> Exporter<MemoryKv, SameKey, CountingTable> {
        Exporter::new(
            kv,
            ApiKeyCache::new(SameKey, Duration::from_secs(60)),
            CountingTable::default(),
            ExportOptions {
                default_cell: "default".into(),
                default_configs_sk: "DEFAULT_CONFIGS".into(),
            },
        )
    }

    fn record(seq: u32, event: &str, index: &str) -> serde_json::Value {
        let keys = json!({"pk": {"S": "a"}, "sk": {"S": format!("INDEX#{index}")}});
        let mut dynamodb = json!({"Keys": keys, "SequenceNumber": seq.to_string(), "SizeBytes": 1,
                                  "StreamViewType": "NEW_IMAGE"});
        if event != "REMOVE" {
            let mut image = keys.clone();
            image["index_endpoint"] = json!({"S": "https://idx"});
            dynamodb["NewImage"] = image;
        }
        json!({"eventID": "e", "eventName": event, "awsRegion": "r", "dynamodb": dynamodb})
    }

    fn deadline() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    #[tokio::test]
    async fn removes_share_one_table_scan_per_batch() {
        let exporter = exporter(MemoryKv::default());
        let batch = vec![
            record(1, "INSERT", "x"),
            record(2, "REMOVE", "p"),
            record(3, "REMOVE", "q"),
            record(4, "REMOVE", "r"),
        ];
        let report = exporter.export_stream(batch, deadline()).await;
        assert_eq!(exporter.table.scans.load(Ordering::SeqCst), 1);
        assert_eq!(report.count(|o| *o == Outcome::Exported), 4);
    }

    #[tokio::test]
    async fn a_kv_failure_fails_only_the_record_owning_the_key() {
        let kv = MemoryKv {
            failing: HashSet::from(["a-broken".to_string()]),
            ..MemoryKv::default()
        };
        let exporter = exporter(kv);
        let batch = vec![
            record(1, "INSERT", "ok"),
            record(2, "INSERT", "broken"),
            // Supersedes record 1's key: record 1 is done once record 3's write lands.
            record(3, "MODIFY", "ok"),
        ];
        let report = exporter.export_stream(batch, deadline()).await;
        assert_eq!(report.failed_sequence_numbers(), ["2"]);
        assert_eq!(report.records[0].outcome, Outcome::Exported);
        assert!(exporter.kv.values.lock().unwrap().contains_key("a-ok"));
    }
}
