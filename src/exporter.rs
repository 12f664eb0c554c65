//! The exporter core: looks up what a batch needs, plans it, sends the KV requests and decides
//! every record's outcome. The stream handler and the manual re-export both go through here.

use std::collections::HashMap;

use futures::StreamExt as _;
use tokio::time::Instant;

use crate::api_keys::{ApiKeyCache, ApiKeySource, LookupCounts};
use crate::cloudflare::{KeyFailures, KvStore};
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
    pub keys_written: usize,
    pub keys_deleted: usize,
    pub api_keys: LookupCounts,
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

        let requests = requests::requests(&plan.ops);
        let failures = self.send_all(&requests, deadline).await;
        let failed_keys: HashMap<(Namespace, &str), &str> = failures
            .iter()
            .flat_map(|(namespace, failure)| {
                failure
                    .keys
                    .iter()
                    .map(move |key| ((*namespace, key.as_str()), failure.reason.as_str()))
            })
            .collect();

        let mut outcomes = plan.outcomes.clone();
        let mut report = BatchReport {
            kv_requests: requests.len(),
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
        report.records = records
            .into_iter()
            .zip(outcomes)
            .map(|(record, outcome)| RecordReport {
                sequence_number: record.sequence_number,
                index: record.index,
                outcome: match outcome {
                    Outcome::Pending => RecordOutcome::Exported,
                    Outcome::Skipped(r) => RecordOutcome::Skipped(r),
                    Outcome::Rejected(r) => RecordOutcome::Rejected(r),
                    Outcome::Failed(r) => RecordOutcome::Failed(r),
                    Outcome::Kept { referenced_by } => RecordOutcome::Kept { referenced_by },
                },
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
