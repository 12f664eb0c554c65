//! The exporter core: looks up what a batch needs, plans it, sends the KV requests and decides
//! every record's outcome. The stream handler and the manual re-export both go through here.

use std::collections::HashMap;

use futures::StreamExt as _;
use tokio::time::Instant;

use crate::api_keys::{ApiKeyCache, ApiKeySource, LookupCounts};
use crate::cloudflare::{KeyFailures, KvCounters, KvStore};
use crate::model::IndexRef;
use crate::plan::{self, KvKey, Lookups, Namespace, Outcome};
use crate::records::{decode_record, ChangeRecord};
use crate::requests::{self, KvRequest};
use crate::table::SettingsTable;

/// How many KV requests (bulk or single reads) are in flight at once.
const CONCURRENT_KV_REQUESTS: usize = 4;

#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub default_cell: String,
    pub default_configs_sk: String,
}

pub struct Exporter<K, A, T> {
    pub kv: K,
    pub api_keys: ApiKeyCache<A>,
    pub table: T,
    pub options: ExportOptions,
}

/// Where one record ended.
#[derive(Debug, Clone, PartialEq)]
pub enum RecordOutcome {
    /// Its KV writes and deletes are applied (or superseded by a later record of the batch).
    Exported,
    Skipped(String),
    Rejected(String),
    /// Reported in `batchItemFailures`: Lambda retries it.
    Failed(String),
    /// A remove whose keys stay because live aliases point at the index.
    Kept {
        referenced_by: Vec<IndexRef>,
    },
}

impl From<Outcome> for RecordOutcome {
    /// A pending record whose operations were all applied is exported.
    fn from(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Pending => RecordOutcome::Exported,
            Outcome::Skipped(r) => RecordOutcome::Skipped(r),
            Outcome::Rejected(r) => RecordOutcome::Rejected(r),
            Outcome::Failed(r) => RecordOutcome::Failed(r),
            Outcome::Kept { referenced_by } => RecordOutcome::Kept { referenced_by },
        }
    }
}

/// Records with their lookups done and their KV operations planned, nothing sent yet.
#[derive(Debug)]
pub struct Prepared {
    pub records: Vec<ChangeRecord>,
    pub plan: plan::Plan,
    pub api_keys: LookupCounts,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RecordReport {
    pub sequence_number: Option<String>,
    pub index: Option<IndexRef>,
    pub outcome: RecordOutcome,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct BatchReport {
    pub records: Vec<RecordReport>,
    pub kv_requests: usize,
    /// HTTP attempts beyond the first, resends of unsuccessful keys included.
    pub kv_retries: usize,
    pub keys_written: usize,
    pub keys_deleted: usize,
    pub api_keys: LookupCounts,
    /// Seconds from each exported record's `ApproximateCreationDateTime` to its KV write.
    pub lag_seconds: Vec<f64>,
    /// The keys applied, per namespace, for the manual re-export's summary.
    pub written: Vec<KvKey>,
    pub deleted: Vec<KvKey>,
}

impl BatchReport {
    pub fn count(&self, kind: fn(&RecordOutcome) -> bool) -> usize {
        self.records.iter().filter(|r| kind(&r.outcome)).count()
    }

    /// Sequence numbers Lambda must retry, in stream order.
    pub fn failed_sequence_numbers(&self) -> Vec<String> {
        self.records
            .iter()
            .filter(|r| matches!(r.outcome, RecordOutcome::Failed(_)))
            .filter_map(|r| r.sequence_number.clone())
            .collect()
    }

    /// One line per rejected, failed or kept record, then one line for the batch.
    pub fn log(&self) {
        for record in &self.records {
            let (account, index) = record
                .index
                .as_ref()
                .map(|i| (i.account.as_str(), i.name.as_str()))
                .unwrap_or(("?", "?"));
            let sequence_number = record.sequence_number.as_deref().unwrap_or("?");
            match &record.outcome {
                RecordOutcome::Rejected(reason) => tracing::error!(
                    %account, %index, %sequence_number, %reason, "record rejected"
                ),
                RecordOutcome::Failed(reason) => tracing::error!(
                    %account, %index, %sequence_number, %reason, "record failed; reported for retry"
                ),
                RecordOutcome::Kept { referenced_by } => {
                    let referenced_by = referenced_by
                        .iter()
                        .map(|i| i.id().0)
                        .collect::<Vec<_>>()
                        .join(", ");
                    tracing::warn!(
                        %account, %index, %sequence_number, %referenced_by,
                        "index removed but its KV keys are kept: live aliases point at it"
                    )
                }
                RecordOutcome::Skipped(reason) => {
                    tracing::debug!(%account, %index, %sequence_number, %reason, "record skipped")
                }
                RecordOutcome::Exported => {}
            }
        }
        tracing::info!(
            records = self.records.len(),
            exported = self.count(|o| matches!(o, RecordOutcome::Exported)),
            skipped = self.count(|o| matches!(o, RecordOutcome::Skipped(_))),
            rejected = self.count(|o| matches!(o, RecordOutcome::Rejected(_))),
            failed = self.count(|o| matches!(o, RecordOutcome::Failed(_))),
            kept = self.count(|o| matches!(o, RecordOutcome::Kept { .. })),
            kv_requests = self.kv_requests,
            kv_retries = self.kv_retries,
            keys_written = self.keys_written,
            keys_deleted = self.keys_deleted,
            api_key_calls = self.api_keys.calls,
            api_key_cache_hits = self.api_keys.cache_hits,
            "batch done"
        );
    }
}

impl<K: KvStore, A: ApiKeySource, T: SettingsTable> Exporter<K, A, T> {
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
        let requests = requests::requests(&plan.ops);
        let before = self.kv.counters();
        let failures = self.send_all(&requests, deadline).await;
        let KvCounters { retries, .. } = self.kv.counters();
        let applied_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        let failed_keys: HashMap<(Namespace, &str), &str> = failures
            .iter()
            .flat_map(|(namespace, failure)| {
                failure
                    .keys
                    .iter()
                    .map(move |key| ((*namespace, key.as_str()), failure.reason.as_str()))
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
                    plan::KvAction::Put(_) => report.written.push(key.clone()),
                    plan::KvAction::Delete => report.deleted.push(key.clone()),
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
                outcome: outcome.into(),
            })
            .collect();
        report
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
                let value = self
                    .kv
                    .get(Namespace::Settings, &index.id().0, deadline)
                    .await;
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
    use crate::model::{ApiKey, SettingsReference};
    use crate::plan::{AccountCell, LookupError};
    use serde_dynamo::Item;
    use serde_json::json;
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use std::time::Duration;

    /// KV in memory; keys in `failing` are never stored.
    #[derive(Default)]
    struct MemoryKv {
        values: Mutex<HashMap<String, String>>,
        failing: HashSet<String>,
    }

    impl KvStore for MemoryKv {
        async fn send(&self, request: &KvRequest, _: Instant) -> Result<(), KeyFailures> {
            let mut values = self.values.lock().unwrap();
            let mut failed = Vec::new();
            for key in request.keys() {
                if self.failing.contains(key) {
                    failed.push(key.to_owned());
                    continue;
                }
                match request {
                    KvRequest::Put { pairs, .. } => {
                        let pair = pairs.iter().find(|p| p.key == key).unwrap();
                        values.insert(pair.key.clone(), pair.value.clone());
                    }
                    KvRequest::Delete { .. } => {
                        values.remove(key);
                    }
                }
            }
            if failed.is_empty() {
                Ok(())
            } else {
                Err(KeyFailures {
                    keys: failed,
                    reason: "down".into(),
                })
            }
        }

        async fn get(&self, _: Namespace, key: &str, _: Instant) -> Result<Option<String>, String> {
            Ok(self.values.lock().unwrap().get(key).cloned())
        }

        async fn list_keys(
            &self,
            _: Namespace,
            prefix: &str,
            _: Instant,
        ) -> Result<Vec<String>, String> {
            let values = self.values.lock().unwrap();
            Ok(values
                .keys()
                .filter(|k| k.starts_with(prefix))
                .cloned()
                .collect())
        }
    }

    struct SameKey;

    impl ApiKeySource for SameKey {
        async fn fetch(&self, _: &AccountCell) -> Result<ApiKey, LookupError> {
            Ok(ApiKey::new("k"))
        }
    }

    #[derive(Default)]
    struct CountingTable {
        scans: AtomicUsize,
    }

    impl SettingsTable for CountingTable {
        async fn settings_references(&self) -> Result<Vec<SettingsReference>, String> {
            self.scans.fetch_add(1, Ordering::SeqCst);
            Ok(vec![])
        }
        async fn index_settings(&self, _: &IndexRef) -> Result<Option<Item>, String> {
            Ok(None)
        }
        async fn query_configs(&self, _: &IndexRef) -> Result<Vec<Item>, String> {
            Ok(vec![])
        }
        async fn page(
            &self,
            _: Option<&str>,
            _: Option<Item>,
            _: i32,
        ) -> Result<crate::table::Page, String> {
            Ok(crate::table::Page::default())
        }
    }

    fn exporter(kv: MemoryKv) -> Exporter<MemoryKv, SameKey, CountingTable> {
        Exporter {
            kv,
            api_keys: ApiKeyCache::new(SameKey, Duration::from_secs(60)),
            table: CountingTable::default(),
            options: ExportOptions {
                default_cell: "default".into(),
                default_configs_sk: "DEFAULT_CONFIGS".into(),
            },
        }
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
        assert_eq!(report.count(|o| *o == RecordOutcome::Exported), 4);
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
        assert_eq!(report.records[0].outcome, RecordOutcome::Exported);
        assert!(exporter.kv.values.lock().unwrap().contains_key("a-ok"));
    }
}
