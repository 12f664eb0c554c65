//! What operators invoke by hand: re-export one index (or preview it with a dry run), check an
//! index for drift and repair it, and backfill the whole table. Every mode reads the table and
//! goes through the same exporter core as the stream: one planner, one KV client.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use base64::Engine as _;
use futures::StreamExt as _;
use serde_dynamo::Item;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::api_keys::ApiKeySource;
use crate::cloudflare::KvStore;
use crate::exporter::{BatchReport, Exporter, Prepared, RecordOutcome};
use crate::handler::HandlerError;
use crate::model::IndexRef;
use crate::plan::{KvAction, KvKey, Namespace, Outcome, PlannedOp};
use crate::records::{decode_item, ChangeRecord};
use crate::table::SettingsTable;

/// One index, and whether its query-config overrides come along.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexTarget {
    pub index: IndexRef,
    pub include_query_configs: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct BackfillRequest {
    /// Only this account's records, when given.
    pub account: Option<String>,
    pub include_query_configs: bool,
    pub dry_run: bool,
    /// Where a previous invocation stopped.
    pub continuation_token: Option<String>,
    /// Items read from the table per page (and so per export batch).
    pub page_size: i32,
    /// Stop after the page that reaches this many items, with a continuation token.
    pub max_records: Option<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ManualRequest {
    Reexport {
        target: IndexTarget,
        dry_run: bool,
    },
    Verify {
        target: IndexTarget,
        repair: bool,
        dry_run: bool,
    },
    Backfill(BackfillRequest),
}

pub async fn run<K: KvStore, A: ApiKeySource, T: SettingsTable>(
    exporter: &Exporter<K, A, T>,
    request: ManualRequest,
    deadline: Instant,
) -> Result<Value, HandlerError> {
    match request {
        ManualRequest::Reexport { target, dry_run } => {
            let records = index_records(exporter, &target).await?;
            if dry_run {
                let prepared = exporter.prepare(records, deadline).await;
                ensure_ready(&target.index, &prepared)?;
                Ok(dry_run_answer(&target.index, &prepared))
            } else {
                let report = exporter.export(records, deadline).await;
                report.log();
                ensure_exported(&target.index, &report)?;
                Ok(reexport_answer(&target.index, &report))
            }
        }
        ManualRequest::Verify {
            target,
            repair,
            dry_run,
        } => {
            verify(
                exporter,
                &target,
                repair && !dry_run,
                repair && dry_run,
                deadline,
            )
            .await
        }
        ManualRequest::Backfill(request) => backfill(exporter, &request, deadline).await,
    }
}

fn export_failed(index: &IndexRef, reason: impl Into<String>) -> HandlerError {
    HandlerError::ExportFailed {
        account: index.account.clone(),
        index: index.name.clone(),
        reason: reason.into(),
    }
}

/// The index's settings record (it must exist) and, when asked, its query configs.
async fn index_records<K: KvStore, A: ApiKeySource, T: SettingsTable>(
    exporter: &Exporter<K, A, T>,
    target: &IndexTarget,
) -> Result<Vec<ChangeRecord>, HandlerError> {
    let index = &target.index;
    let sk = &exporter.options.default_configs_sk;
    let item = exporter
        .table
        .index_settings(index)
        .await
        .map_err(|e| export_failed(index, e))?
        .ok_or_else(|| HandlerError::NoSuchIndex {
            account: index.account.clone(),
            index: index.name.clone(),
        })?;
    let mut records = vec![decode_item(item, sk, true)];
    if target.include_query_configs {
        let items = exporter
            .table
            .query_configs(index)
            .await
            .map_err(|e| export_failed(index, e))?;
        records.extend(items.into_iter().map(|item| decode_item(item, sk, true)));
    }
    Ok(records)
}

/// The settings record must be exportable, and nothing may be waiting on a failed lookup.
fn ensure_ready(index: &IndexRef, prepared: &Prepared) -> Result<(), HandlerError> {
    if let Some(Outcome::Rejected(reason)) = prepared.plan.outcomes.first() {
        return Err(export_failed(index, reason.clone()));
    }
    match prepared.plan.outcomes.iter().find_map(|o| match o {
        Outcome::Failed(reason) => Some(reason.clone()),
        _ => None,
    }) {
        Some(reason) => Err(export_failed(index, reason)),
        None => Ok(()),
    }
}

fn ensure_exported(index: &IndexRef, report: &BatchReport) -> Result<(), HandlerError> {
    if let Some(RecordOutcome::Rejected(reason)) = report.records.first().map(|r| &r.outcome) {
        return Err(export_failed(index, reason.clone()));
    }
    match report.records.iter().find_map(|r| match &r.outcome {
        RecordOutcome::Failed(reason) => Some(reason.clone()),
        _ => None,
    }) {
        Some(reason) => Err(export_failed(index, reason)),
        None => Ok(()),
    }
}

fn rejected(report_outcomes: impl Iterator<Item = Option<String>>) -> Vec<Value> {
    report_outcomes
        .flatten()
        .map(|reason| json!({ "reason": reason }))
        .collect()
}

fn keys_in(keys: &[KvKey], namespace: Namespace) -> Vec<&str> {
    keys.iter()
        .filter(|k| k.namespace == namespace)
        .map(|k| k.key.as_str())
        .collect()
}

fn reexport_answer(index: &IndexRef, report: &BatchReport) -> Value {
    json!({
        "system_account_id": index.account,
        "index_name": index.name,
        "written": {
            "settings": keys_in(&report.written, Namespace::Settings),
            "query_configs": keys_in(&report.written, Namespace::QueryConfigs),
        },
        "keys_written": report.keys_written,
        "query_configs_exported": report.records.iter().skip(1)
            .filter(|r| r.outcome == RecordOutcome::Exported).count(),
        "rejected": rejected(report.records.iter().map(|r| match &r.outcome {
            RecordOutcome::Rejected(reason) => Some(reason.clone()),
            _ => None,
        })),
    })
}

/// A KV value as an operator may see it: the API key masked.
pub fn masked(value: &str) -> Value {
    let mut value: Value = serde_json::from_str(value).unwrap_or(Value::Null);
    if let Some(key) = value.get_mut("marqo_api_key").filter(|k| k.is_string()) {
        *key = Value::String("<masked>".into());
    }
    value
}

fn dry_run_answer(index: &IndexRef, prepared: &Prepared) -> Value {
    let mut writes = Vec::new();
    let mut deletes = Vec::new();
    for (key, op) in &prepared.plan.ops {
        match &op.action {
            KvAction::Put(value) => writes.push(json!({
                "namespace": key.namespace.name(), "key": key.key, "value": masked(value)
            })),
            KvAction::Delete => {
                deletes.push(json!({"namespace": key.namespace.name(), "key": key.key}))
            }
        }
    }
    json!({
        "dry_run": true,
        "system_account_id": index.account,
        "index_name": index.name,
        "would_write": writes,
        "would_delete": deletes,
        "rejected": rejected(prepared.plan.outcomes.iter().map(|o| match o {
            Outcome::Rejected(reason) => Some(reason.clone()),
            _ => None,
        })),
    })
}

/// `qcfg-{account}-{index}-` followed by exactly 64 lower-case hex digits: an index's own
/// query-config keys, not those of an index whose name merely starts the same.
fn is_query_config_key_of(index: &IndexRef, key: &str) -> bool {
    let prefix = format!("qcfg-{}-{}-", index.account, index.name);
    key.strip_prefix(&prefix).is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// How a KV key compares with what the table implies.
#[derive(Debug, Clone, PartialEq)]
enum Drift {
    InSync,
    Missing,
    Stale(Vec<String>),
    Unexpected,
}

impl Drift {
    fn name(&self) -> &'static str {
        match self {
            Drift::InSync => "in_sync",
            Drift::Missing => "missing",
            Drift::Stale(_) => "stale",
            Drift::Unexpected => "unexpected",
        }
    }
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

async fn verify<K: KvStore, A: ApiKeySource, T: SettingsTable>(
    exporter: &Exporter<K, A, T>,
    target: &IndexTarget,
    repair: bool,
    preview_repair: bool,
    deadline: Instant,
) -> Result<Value, HandlerError> {
    let index = &target.index;
    let records = index_records(exporter, target).await?;
    let mut prepared = exporter.prepare(records, deadline).await;
    ensure_ready(index, &prepared)?;

    let expected: Vec<(KvKey, String)> = prepared
        .plan
        .ops
        .iter()
        .filter_map(|(key, op)| match &op.action {
            KvAction::Put(value) => Some((key.clone(), value.clone())),
            KvAction::Delete => None,
        })
        .collect();
    let reads = futures::stream::iter(expected)
        .map(|(key, value)| async move {
            let actual = exporter.kv.get(key.namespace, &key.key, deadline).await;
            (key, value, actual)
        })
        .buffered(4)
        .collect::<Vec<_>>()
        .await;
    let mut drift: BTreeMap<KvKey, Drift> = BTreeMap::new();
    for (key, value, actual) in reads {
        let state = match actual
            .map_err(|e| export_failed(index, format!("reading KV key `{}`: {e}", key.key)))?
        {
            None => Drift::Missing,
            Some(actual) => stale_fields(&value, &actual).map_or(Drift::InSync, Drift::Stale),
        };
        drift.insert(key, state);
    }
    if target.include_query_configs {
        let prefix = format!("qcfg-{}-{}-", index.account, index.name);
        let listed = exporter
            .kv
            .list_keys(Namespace::QueryConfigs, &prefix, deadline)
            .await
            .map_err(|e| export_failed(index, format!("listing query-config keys: {e}")))?;
        for key in listed
            .into_iter()
            .filter(|k| is_query_config_key_of(index, k))
        {
            drift
                .entry(KvKey {
                    namespace: Namespace::QueryConfigs,
                    key,
                })
                .or_insert(Drift::Unexpected);
        }
    }

    let mut counts: BTreeMap<&str, usize> = ["in_sync", "missing", "stale", "unexpected"]
        .into_iter()
        .map(|name| (name, 0))
        .collect();
    let keys: Vec<Value> = drift
        .iter()
        .map(|(key, state)| {
            *counts.entry(state.name()).or_default() += 1;
            let mut entry =
                json!({"namespace": key.namespace.name(), "key": key.key, "status": state.name()});
            if let Drift::Stale(fields) = state {
                entry["fields"] = json!(fields);
            }
            entry
        })
        .collect();
    let mut answer = json!({
        "system_account_id": index.account,
        "index_name": index.name,
        "in_sync": drift.values().all(|d| *d == Drift::InSync),
        "counts": counts,
        "keys": keys,
    });

    if repair || preview_repair {
        // Only what drifted is sent: missing and stale keys written, unexpected ones deleted.
        prepared
            .plan
            .ops
            .retain(|key, _| matches!(drift.get(key), Some(Drift::Missing | Drift::Stale(_))));
        for (key, state) in &drift {
            if *state == Drift::Unexpected {
                let delete = PlannedOp {
                    action: KvAction::Delete,
                    owner: 0,
                };
                prepared.plan.ops.insert(key.clone(), delete);
            }
        }
        if preview_repair {
            let (writes, deletes): (Vec<_>, Vec<_>) = prepared
                .plan
                .ops
                .iter()
                .partition(|(_, op)| matches!(op.action, KvAction::Put(_)));
            answer["dry_run"] = json!(true);
            answer["would_repair"] = json!({
                "written": writes.iter().map(|(k, _)| &k.key).collect::<Vec<_>>(),
                "deleted": deletes.iter().map(|(k, _)| &k.key).collect::<Vec<_>>(),
            });
            return Ok(answer);
        }
        let report = exporter.apply(prepared, deadline).await;
        ensure_exported(index, &report)?;
        answer["repaired"] = json!({
            "written": report.written.iter().map(|k| &k.key).collect::<Vec<_>>(),
            "deleted": report.deleted.iter().map(|k| &k.key).collect::<Vec<_>>(),
        });
    }
    Ok(answer)
}

/// The table key where a backfill goes on, handed to the operator as an opaque string.
fn encode_token(start: &Item) -> String {
    let json = serde_json::to_vec(start).expect("items serialize");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
}

fn decode_token(token: &str) -> Result<Item, HandlerError> {
    let invalid = || HandlerError::InvalidField {
        field: "continuation_token".into(),
        problem: "is not a token this function gave out".into(),
    };
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| invalid())?;
    serde_json::from_slice(&json).map_err(|_| invalid())
}

#[derive(Default)]
struct BackfillTally {
    items: usize,
    exported: usize,
    skipped: usize,
    rejected: Vec<Value>,
    failed: Vec<Value>,
    keys_written: usize,
}

impl BackfillTally {
    fn count(&mut self, index: Option<&IndexRef>, outcome: &RecordOutcome) {
        let entry = |reason: &str| {
            json!({
                "system_account_id": index.map(|i| i.account.as_str()),
                "index_name": index.map(|i| i.name.as_str()),
                "reason": reason,
            })
        };
        match outcome {
            RecordOutcome::Exported | RecordOutcome::Kept { .. } => self.exported += 1,
            RecordOutcome::Skipped(_) => self.skipped += 1,
            RecordOutcome::Rejected(reason) => self.rejected.push(entry(reason)),
            RecordOutcome::Failed(reason) => self.failed.push(entry(reason)),
        }
    }
}

/// Exports every index-settings record (and query configs when asked), page by page, through
/// the stream path's core. Stops before the deadline, after `max_records`, or at a page with
/// failures (to be retried), and answers a token to resume from.
async fn backfill<K: KvStore, A: ApiKeySource, T: SettingsTable>(
    exporter: &Exporter<K, A, T>,
    request: &BackfillRequest,
    deadline: Instant,
) -> Result<Value, HandlerError> {
    // An empty key stands for "from the beginning" (a stop before the first page).
    let mut start = request
        .continuation_token
        .as_deref()
        .map(decode_token)
        .transpose()?
        .filter(|key| !key.is_empty());
    let mut tally = BackfillTally::default();
    // Leave room for the slowest page seen so far, twice over, before starting another.
    let mut slowest_page = Duration::from_secs(2);
    let complete = loop {
        if request.max_records.is_some_and(|max| tally.items >= max)
            || Instant::now() + slowest_page * 2 >= deadline
        {
            break false;
        }
        let page_started = Instant::now();
        let page = exporter
            .table
            .page(request.account.as_deref(), start.clone(), request.page_size)
            .await
            .map_err(|reason| HandlerError::BackfillFailed { reason })?;
        tally.items += page.items.len();
        let records: Vec<ChangeRecord> = page
            .items
            .into_iter()
            .map(|item| {
                decode_item(
                    item,
                    &exporter.options.default_configs_sk,
                    request.include_query_configs,
                )
            })
            .collect();
        let report = if request.dry_run {
            dry_report(exporter.prepare(records, deadline).await)
        } else {
            exporter.export(records, deadline).await
        };
        report.log();
        tally.keys_written += report.keys_written;
        for record in &report.records {
            tally.count(record.index.as_ref(), &record.outcome);
        }
        slowest_page = slowest_page.max(page_started.elapsed());
        if report
            .records
            .iter()
            .any(|r| matches!(r.outcome, RecordOutcome::Failed(_)))
        {
            break false; // the token still points at this page: resuming retries it
        }
        match page.next {
            Some(next) => start = Some(next),
            None => break true,
        }
    };
    Ok(json!({
        "mode": "backfill",
        "dry_run": request.dry_run,
        "system_account_id": request.account,
        "exported": tally.exported,
        "skipped": tally.skipped,
        "rejected": tally.rejected.len(),
        "failed": tally.failed.len(),
        (if request.dry_run { "keys_to_write" } else { "keys_written" }): tally.keys_written,
        "rejected_records": tally.rejected,
        "failed_records": tally.failed,
        "complete": complete,
        "continuation_token": (!complete).then(|| encode_token(&start.unwrap_or_default())),
    }))
}

/// What a dry run's page would have done, as a report (nothing was sent).
fn dry_report(prepared: Prepared) -> BatchReport {
    let keys_written = prepared
        .plan
        .ops
        .values()
        .filter(|op| matches!(op.action, KvAction::Put(_)))
        .count();
    BatchReport {
        keys_written,
        api_keys: prepared.api_keys,
        records: prepared
            .records
            .into_iter()
            .zip(prepared.plan.outcomes)
            .map(|(record, outcome)| crate::exporter::RecordReport {
                sequence_number: None,
                index: record.index,
                outcome: outcome.into(),
            })
            .collect(),
        ..BatchReport::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_config_keys_belong_to_their_own_index_only() {
        let index = IndexRef::new("a", "p");
        let hash = "0".repeat(64);
        assert!(is_query_config_key_of(&index, &format!("qcfg-a-p-{hash}")));
        assert!(!is_query_config_key_of(
            &index,
            &format!("qcfg-a-p-x-{hash}")
        ));
        assert!(!is_query_config_key_of(&index, "qcfg-a-p-123"));
    }

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

    #[test]
    fn masking_hides_only_the_api_key() {
        let value = masked(r#"{"marqo_api_key": "secret", "index_url": "u"}"#);
        assert_eq!(
            value,
            json!({"marqo_api_key": "<masked>", "index_url": "u"})
        );
    }

    #[test]
    fn tokens_round_trip_and_bad_ones_are_named() {
        let start = crate::model::item_from_dynamodb_json(
            json!({"pk": {"S": "a"}, "sk": {"S": "INDEX#p"}}),
        )
        .unwrap();
        assert_eq!(decode_token(&encode_token(&start)).unwrap(), start);
        let error = decode_token("not-a-token!").unwrap_err();
        assert!(error.to_string().contains("continuation_token"), "{error}");
    }
}
