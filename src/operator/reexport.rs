//! `{"system_account_id", "index_name", "include_query_configs", "dry_run"}`: exports one index
//! from what the table holds now, or shows what it would write.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;

use super::{ensure_exported, ensure_ready, flag, masked, rejected, IndexTarget, OperatorError};
use super::{Rejected, Text};
use crate::domain::{KvAction, KvKey, Namespace};
use crate::pipeline::exporter::{Exporter, Run};
use crate::ports::{ApiKeySource, KvStore, Ledger, SettingsTable};
use crate::report::Outcome;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReexportRequest {
    pub system_account_id: Text,
    pub index_name: Text,
    #[serde(default, deserialize_with = "flag")]
    pub include_query_configs: bool,
    #[serde(default, deserialize_with = "flag")]
    pub dry_run: bool,
}

impl ReexportRequest {
    pub fn target(&self) -> IndexTarget {
        IndexTarget::new(
            &self.system_account_id,
            &self.index_name,
            self.include_query_configs,
        )
    }
}

/// What a re-export wrote.
#[derive(Debug, Serialize)]
pub struct Exported {
    pub system_account_id: String,
    pub index_name: String,
    pub written: WrittenKeys,
    pub keys_written: usize,
    /// Keys not written: another writer wrote them during this run (theirs is newer).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub left_to_other_writers: Vec<String>,
    pub query_configs_exported: usize,
    pub rejected: Vec<Rejected>,
}

#[derive(Debug, Serialize)]
pub struct WrittenKeys {
    pub settings: Vec<String>,
    pub query_configs: Vec<String>,
}

/// What a re-export would write and delete; values with the API key masked.
#[derive(Debug, Serialize)]
pub struct Preview {
    pub dry_run: bool,
    pub system_account_id: String,
    pub index_name: String,
    pub would_write: Vec<PreviewWrite>,
    pub would_delete: Vec<PreviewDelete>,
    pub rejected: Vec<Rejected>,
}

#[derive(Debug, Serialize)]
pub struct PreviewWrite {
    pub namespace: &'static str,
    pub key: String,
    pub value: Value,
}

#[derive(Debug, Serialize)]
pub struct PreviewDelete {
    pub namespace: &'static str,
    pub key: String,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Answer {
    Exported(Exported),
    Preview(Preview),
}

fn names_in(keys: &[KvKey], namespace: Namespace) -> Vec<String> {
    keys.iter()
        .filter(|k| k.namespace == namespace)
        .map(|k| k.key.clone())
        .collect()
}

pub async fn run<K: KvStore, A: ApiKeySource, T: SettingsTable, L: Ledger>(
    exporter: &Exporter<K, A, T, L>,
    request: &ReexportRequest,
    deadline: Instant,
) -> Result<Answer, OperatorError> {
    let target = request.target();
    let index = &target.index;
    // Keys another writer claims from now on are left to it (docs/contract.md).
    let read_since = exporter.begin_reading().await;
    let records = target.records(exporter, deadline).await?;
    if request.dry_run {
        let prepared = exporter.prepare(records, Run::OPERATOR, deadline).await;
        ensure_ready(index, &prepared)?;
        let mut would_write = Vec::new();
        let mut would_delete = Vec::new();
        for (key, op) in &prepared.plan.ops {
            let namespace = key.namespace.name();
            match &op.action {
                KvAction::Put(value) => would_write.push(PreviewWrite {
                    namespace,
                    key: key.key.clone(),
                    value: masked(&value.text()),
                }),
                KvAction::Delete => would_delete.push(PreviewDelete {
                    namespace,
                    key: key.key.clone(),
                }),
            }
        }
        return Ok(Answer::Preview(Preview {
            dry_run: true,
            system_account_id: index.account.clone(),
            index_name: index.name.clone(),
            would_write,
            would_delete,
            rejected: rejected(prepared.plan.outcomes.iter()),
        }));
    }
    let report = (exporter.export_read_at(records, Run::OPERATOR, read_since, deadline)).await;
    report.log();
    ensure_exported(index, &report)?;
    Ok(Answer::Exported(Exported {
        system_account_id: index.account.clone(),
        index_name: index.name.clone(),
        written: WrittenKeys {
            settings: names_in(&report.written, Namespace::Settings),
            query_configs: names_in(&report.written, Namespace::QueryConfigs),
        },
        keys_written: report.keys_written,
        left_to_other_writers: report.left.iter().map(|k| k.key.clone()).collect(),
        query_configs_exported: report
            .records
            .iter()
            .skip(1)
            .filter(|r| r.outcome == Outcome::Exported)
            .count(),
        rejected: rejected(report.records.iter().map(|r| &r.outcome)),
    }))
}
