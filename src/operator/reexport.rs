//! `{"system_account_id", "index_name", "include_query_configs", "dry_run"}`: exports one index
//! from what the table holds now, or shows what it would write.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;

use super::{ensure_done, flag, masked, rejected, IndexTarget, OperatorError};
use super::{orphans, NonEmpty, PieceAt, Pieces, Rejected};
use crate::domain::{KvKey, Namespace};
use crate::pipeline::desired::Want;
use crate::pipeline::exporter::{Exporter, Prepared};
use crate::ports::Ports;
use crate::report::BatchReport;
use crate::report::Outcome;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReexportRequest {
    pub system_account_id: NonEmpty,
    pub index_name: NonEmpty,
    #[serde(default, deserialize_with = "flag")]
    pub include_query_configs: bool,
    #[serde(default, deserialize_with = "flag")]
    pub dry_run: bool,
    /// Where a re-export of many query configs goes on.
    #[serde(default)]
    pub continuation_token: Option<NonEmpty>,
    /// Query configs per invocation: it stops after one piece of this many, with a token.
    #[serde(default, deserialize_with = "super::fields::max_records")]
    pub max_records: Option<usize>,
}

impl ReexportRequest {
    pub fn target(&self) -> IndexTarget {
        IndexTarget::new(
            "re-export",
            &self.system_account_id,
            &self.index_name,
            self.include_query_configs,
        )
    }
}

/// What a re-export wrote.
#[derive(Debug, Default, Serialize)]
pub struct Exported {
    pub system_account_id: String,
    pub index_name: String,
    pub written: WrittenKeys,
    /// Keys deleted: the index's orphaned query configs, its filter when it has no overrides.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deleted: Vec<String>,
    pub keys_written: usize,
    pub query_configs_exported: usize,
    pub rejected: Vec<Rejected>,
    /// `false`: the index's query configs go on with the token (each invocation a piece).
    pub complete: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub continuation_token: Option<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct WrittenKeys {
    pub settings: Vec<String>,
    pub query_configs: Vec<String>,
}

/// What a re-export would write and delete; values with the API key masked.
#[derive(Debug, Default, Serialize)]
pub struct Preview {
    pub dry_run: bool,
    pub system_account_id: String,
    pub index_name: String,
    pub would_write: Vec<PreviewWrite>,
    pub would_delete: Vec<PreviewDelete>,
    pub rejected: Vec<Rejected>,
    pub complete: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub continuation_token: Option<String>,
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

pub async fn run<P: Ports>(
    exporter: &Exporter<P>,
    request: &ReexportRequest,
    deadline: Instant,
) -> Result<Answer, OperatorError> {
    let target = request.target();
    let token = request.continuation_token.as_ref();
    let mut pieces = Pieces::new(exporter, &target, token, request.max_records, deadline)?;
    let mut answer = Answer::new(request);
    while let Some(PieceAt {
        mut prepared,
        first,
        last,
    }) = pieces.next().await?
    {
        // The index's query-config keys no override record implies (an earlier write from an
        // older read, its check unconfirmed) are deleted, as verify's repair deletes them: a
        // run again leaves the index's keys as the table implies them. A dry run reads nothing
        // from KV.
        if last && target.include_query_configs && !request.dry_run {
            let orphans = orphans::of_index(exporter, &target.index, &prepared, deadline);
            let orphans = (orphans.await).map_err(|e| {
                OperatorError::export_failed(&target, format!("finding orphans: {e}"))
            })?;
            let deletes = orphans.into_iter().map(|key| (key, target.index.clone()));
            prepared.delete(deletes.collect());
        }
        if request.dry_run {
            ensure_done(&target, &prepared.records)?;
            answer.preview(&prepared);
        } else {
            let report = exporter.apply(prepared, deadline).await;
            report.log();
            ensure_done(&target, &report.records)?;
            answer.exported(&report, first);
        }
    }
    Ok(answer.finish(pieces.token()))
}

impl Answer {
    fn new(request: &ReexportRequest) -> Self {
        let (account, name) = (&request.system_account_id.0, &request.index_name.0);
        match request.dry_run {
            true => Answer::Preview(Preview {
                dry_run: true,
                system_account_id: account.clone(),
                index_name: name.clone(),
                ..Preview::default()
            }),
            false => Answer::Exported(Exported {
                system_account_id: account.clone(),
                index_name: name.clone(),
                ..Exported::default()
            }),
        }
    }

    fn preview(&mut self, prepared: &Prepared) {
        let Answer::Preview(preview) = self else {
            return;
        };
        for (key, wanted) in &prepared.desired.keys {
            let namespace = key.namespace.name();
            match &wanted.want {
                Want::Put(value) => preview.would_write.push(PreviewWrite {
                    namespace,
                    key: key.key.clone(),
                    value: masked(&value.text()),
                }),
                Want::Delete => preview.would_delete.push(PreviewDelete {
                    namespace,
                    key: key.key.clone(),
                }),
                Want::Keep => {}
            }
        }
        preview.rejected.extend(rejected(&prepared.records));
    }

    fn exported(&mut self, report: &BatchReport, first: bool) {
        let Answer::Exported(exported) = self else {
            return;
        };
        let written = &mut exported.written;
        written
            .settings
            .extend(names_in(&report.written, Namespace::Settings));
        written
            .query_configs
            .extend(names_in(&report.written, Namespace::QueryConfigs));
        exported.keys_written += report.written.len();
        exported
            .deleted
            .extend(report.deleted.iter().map(|k| k.key.clone()));
        // The first piece begins with the settings record; a record of deletes names no index.
        let configs = report.records.iter().skip(usize::from(first));
        let configs = configs.filter(|r| r.index.is_some() && r.outcome == Outcome::Exported);
        exported.query_configs_exported += configs.count();
        exported.rejected.extend(rejected(&report.records));
    }

    fn finish(mut self, token: Option<String>) -> Self {
        let (complete, continuation_token) = match &mut self {
            Answer::Exported(e) => (&mut e.complete, &mut e.continuation_token),
            Answer::Preview(p) => (&mut p.complete, &mut p.continuation_token),
        };
        *complete = token.is_none();
        *continuation_token = token;
        self
    }
}
