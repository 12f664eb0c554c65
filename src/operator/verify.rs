//! `{"mode": "verify", ...}`: compares what KV holds for one index with what the table implies,
//! and with `repair` writes what is missing or stale and deletes what should not be there.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;

use super::classify::{self, Class, Drift};
use super::orphans;
use super::{ensure_done, flag, IndexTarget, KeyChanges, NonEmpty};
use super::{OperatorError, PieceAt, Pieces};
use crate::domain::{ChangeRecord, IndexRef, Outcome};
use crate::pipeline::desired::Want;
use crate::pipeline::exporter::{Exporter, Prepared};
use crate::ports::Ports;
use crate::report::BatchReport;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    pub system_account_id: NonEmpty,
    pub index_name: NonEmpty,
    #[serde(default, deserialize_with = "flag")]
    pub include_query_configs: bool,
    #[serde(default, deserialize_with = "flag")]
    pub repair: bool,
    /// With `repair`: say what would be repaired, write nothing.
    #[serde(default, deserialize_with = "flag")]
    pub dry_run: bool,
    /// Where a verify of many query configs goes on.
    #[serde(default)]
    pub continuation_token: Option<NonEmpty>,
    /// Query configs per invocation: it stops after one piece of this many, with a token.
    #[serde(default, deserialize_with = "super::fields::max_records")]
    pub max_records: Option<usize>,
}

/// Verify's name of a class: an orphaned key is `unexpected` in its answer.
fn status(class: Class) -> &'static str {
    match class {
        Class::InSync => "in_sync",
        Class::Missing => "missing",
        Class::Stale => "stale",
        Class::Orphaned | Class::Protected | Class::Foreign => "unexpected",
    }
}

#[derive(Debug, Default, Serialize)]
pub struct DriftCounts {
    pub in_sync: usize,
    pub missing: usize,
    pub stale: usize,
    pub unexpected: usize,
}

#[derive(Debug, Serialize)]
pub struct KeyState {
    pub namespace: &'static str,
    pub key: String,
    pub status: &'static str,
    /// For a stale key: the top-level fields that differ.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fields: Option<Vec<String>>,
}

#[derive(Debug, Default, Serialize)]
pub struct Answer {
    pub system_account_id: String,
    pub index_name: String,
    pub in_sync: bool,
    pub counts: DriftCounts,
    pub keys: Vec<KeyState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub would_repair: Option<KeyChanges>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repaired: Option<KeyChanges>,
    /// `false`: the index's query configs go on with the token (each invocation a piece).
    pub complete: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub continuation_token: Option<String>,
}

/// The top-level fields whose values differ (the API key counts as a field, never shown).
fn stale_fields(expected: &str, actual: &str) -> Option<Vec<String>> {
    let expected: Value = serde_json::from_str(expected).unwrap_or(Value::Null);
    let actual: Value = match serde_json::from_str(actual) {
        Ok(value) => value,
        Err(_) => return Some(vec!["<not JSON>".into()]),
    };
    if expected == actual {
        return None;
    }
    let (Some(e), Some(a)) = (expected.as_object(), actual.as_object()) else {
        return Some(vec!["<not an object>".into()]);
    };
    let names: BTreeSet<&String> = e.keys().chain(a.keys()).collect();
    Some(
        names
            .into_iter()
            .filter(|name| e.get(*name) != a.get(*name))
            .cloned()
            .collect(),
    )
}

pub async fn run<P: Ports>(
    exporter: &Exporter<P>,
    request: &VerifyRequest,
    deadline: Instant,
) -> Result<Answer, OperatorError> {
    let mode = match request.repair && !request.dry_run {
        true => "verify repair",
        false => "verify",
    };
    let target = IndexTarget::new(
        mode,
        &request.system_account_id,
        &request.index_name,
        request.include_query_configs,
    );
    let token = request.continuation_token.as_ref();
    let mut pieces = Pieces::new(exporter, &target, token, request.max_records, deadline)?;
    let mut answer = Answer::new(&target.index);
    let failed = |what: &str, e| OperatorError::export_failed(&target, format!("{what}: {e}"));
    while let Some(PieceAt { prepared, last, .. }) = pieces.next().await? {
        // A rejected index's repair still gives up what it no longer claims (planned as a
        // re-export's is: `Exporter::plan_records`), and fails after.
        let rejected = matches!(
            prepared.records[..],
            [
                ChangeRecord {
                    outcome: Outcome::Rejected(_),
                    ..
                },
                ..
            ]
        );
        let done = ensure_done(&target, &prepared.records);
        let (done, after) = match request.repair && !request.dry_run && rejected {
            true => (Ok(()), Some(done)),
            false => (done, None),
        };
        done?;
        let drift = classify::drift(exporter, &prepared, deadline).await;
        let mut drift = drift.map_err(|e| failed("reading the index's keys", e))?;
        if last && target.include_query_configs {
            let unexpected = orphans::of_index(exporter, &target.index, &prepared, deadline);
            let unexpected = unexpected.await.map_err(|e| failed("finding orphans", e))?;
            for key in unexpected {
                drift.insert(key, Class::Orphaned, Some(target.index.clone()));
            }
        }
        answer.add(&drift, &prepared);
        if request.repair {
            let repair =
                classify::repair(exporter, Some(prepared), &drift, request.dry_run, deadline);
            let report = repair.await.unwrap_or_default();
            ensure_done(&target, &report.records)?;
            answer.repaired(request.dry_run, &report);
        }
        after.unwrap_or(Ok(()))?;
    }
    Ok(answer.finish(pieces.token()))
}

impl Answer {
    fn new(index: &IndexRef) -> Self {
        Answer {
            system_account_id: index.account.clone(),
            index_name: index.name.clone(),
            in_sync: true,
            ..Answer::default()
        }
    }

    fn add(&mut self, drift: &Drift, prepared: &Prepared) {
        for (key, compared) in &drift.keys {
            let class = compared.class;
            let counts = &mut self.counts;
            *match class {
                Class::InSync => &mut counts.in_sync,
                Class::Missing => &mut counts.missing,
                Class::Stale => &mut counts.stale,
                _ => &mut counts.unexpected,
            } += 1;
            self.in_sync &= class == Class::InSync;
            let fields = (class == Class::Stale).then(|| match &prepared.desired.keys[key].want {
                Want::Put(value) => {
                    stale_fields(&value.text(), compared.held.as_deref().unwrap_or_default())
                }
                Want::Delete | Want::Keep => None,
            });
            self.keys.push(KeyState {
                namespace: key.namespace.name(),
                key: key.key.clone(),
                status: status(class),
                fields: fields.map(Option::unwrap_or_default),
            });
        }
    }

    /// What a repair wrote and deleted, or (a dry run) would.
    fn repaired(&mut self, dry_run: bool, report: &BatchReport) {
        let changes = match dry_run {
            true => {
                self.dry_run = Some(true);
                &mut self.would_repair
            }
            false => &mut self.repaired,
        };
        let changes = changes.get_or_insert_with(KeyChanges::default);
        changes.add(KeyChanges::of(&report.written, &report.deleted));
    }

    fn finish(mut self, token: Option<String>) -> Self {
        self.complete = token.is_none();
        self.continuation_token = token;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_values_name_the_fields_that_differ() {
        let fields = stale_fields(
            r#"{"a": 1, "b": {"c": 2}, "marqo_api_key": "k1"}"#,
            r#"{"a": 1, "b": {"c": 3}, "marqo_api_key": "k2", "extra": true}"#,
        );
        assert_eq!(
            fields,
            Some(vec!["b".into(), "extra".into(), "marqo_api_key".into()])
        );
        assert_eq!(stale_fields(r#"{"a": 1}"#, r#"{"a": 1}"#), None);
    }
}
