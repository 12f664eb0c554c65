//! `{"mode": "verify", ...}`: compares what KV holds for one index with what the table implies,
//! and with `repair` writes what is missing or stale and deletes what should not be there.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::time::Instant;

use super::{ensure_exported, ensure_ready, flag, IndexTarget, KeyChanges, OperatorError, Text};
use crate::domain::kv::{is_query_config_key_of, query_config_prefix};
use crate::domain::{IndexRef, KvAction, KvKey, Namespace};
use crate::pipeline::exporter::{Exporter, Run};
use crate::ports::{ApiKeySource, KvStore, Ledger, SettingsTable};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    pub system_account_id: Text,
    pub index_name: Text,
    #[serde(default, deserialize_with = "flag")]
    pub include_query_configs: bool,
    #[serde(default, deserialize_with = "flag")]
    pub repair: bool,
    /// With `repair`: say what would be repaired, write nothing.
    #[serde(default, deserialize_with = "flag")]
    pub dry_run: bool,
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

#[derive(Debug, Serialize)]
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
}

/// Whether a query-config value was written for this index.
fn owned_by(value: &str, index: &IndexRef) -> bool {
    #[derive(Deserialize)]
    struct Owner {
        system_account_id: String,
        index_name: String,
    }
    serde_json::from_str::<Owner>(value)
        .is_ok_and(|o| o.system_account_id == index.account && o.index_name == index.name)
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

pub async fn run<K: KvStore, A: ApiKeySource, T: SettingsTable, L: Ledger>(
    exporter: &Exporter<K, A, T, L>,
    request: &VerifyRequest,
    deadline: Instant,
) -> Result<Answer, OperatorError> {
    let target = IndexTarget::new(
        &request.system_account_id,
        &request.index_name,
        request.include_query_configs,
    );
    let index = &target.index;
    // Keys another writer claims from now on are left to it (docs/contract.md).
    let read_since = exporter.begin_reading().await;
    let records = target.records(exporter, deadline).await?;
    let mut prepared = exporter.prepare(records, Run::OPERATOR, deadline).await;
    ensure_ready(index, &prepared)?;

    let expected: BTreeMap<KvKey, String> = prepared
        .plan
        .ops
        .iter()
        .filter_map(|(key, op)| match &op.action {
            KvAction::Put(value) => Some((key.clone(), value.text().into_owned())),
            KvAction::Delete => None,
        })
        .collect();
    // One bulk read per namespace (100 keys a request), as everywhere values are read.
    let mut actual: HashMap<KvKey, Option<String>> = HashMap::new();
    for namespace in [Namespace::Settings, Namespace::QueryConfigs] {
        let keys: Vec<String> = expected
            .keys()
            .filter(|k| k.namespace == namespace)
            .map(|k| k.key.clone())
            .collect();
        let values = exporter
            .read_many(namespace, &keys, deadline)
            .await
            .map_err(|e| {
                let what = format!("reading the index's {} keys: {e}", namespace.name());
                OperatorError::export_failed(index, what)
            })?;
        actual.extend(
            values
                .into_iter()
                .map(|(key, value)| (KvKey { namespace, key }, value)),
        );
    }
    let mut drift: BTreeMap<KvKey, Drift> = BTreeMap::new();
    for key in expected.keys() {
        let state = match actual.remove(key).flatten() {
            // No filter says what an empty one says: the index has no overrides.
            None if prepared.plan.empty_filters.contains(key) => Drift::InSync,
            None => Drift::Missing,
            Some(actual) => {
                stale_fields(&expected[key], &actual).map_or(Drift::InSync, Drift::Stale)
            }
        };
        drift.insert(key.clone(), state);
    }
    if target.include_query_configs {
        let listed = exporter
            .list_keys(
                Namespace::QueryConfigs,
                &query_config_prefix(index),
                deadline,
            )
            .await
            .map_err(|e| {
                OperatorError::export_failed(index, format!("listing query-config keys: {e}"))
            })?;
        // The prefix is shared with other indexes ((a-1, x) and (a, 1-x)): a key is this
        // index's only when its value says so.
        let candidates: Vec<String> = listed
            .into_iter()
            .filter(|k| is_query_config_key_of(index, k))
            .filter(|k| !expected.contains_key(&KvKey::query_config_named(k)))
            .collect();
        let values = exporter
            .read_many(Namespace::QueryConfigs, &candidates, deadline)
            .await
            .map_err(|e| {
                OperatorError::export_failed(index, format!("reading query-config keys: {e}"))
            })?;
        for key in candidates {
            if values
                .get(&key)
                .cloned()
                .flatten()
                .is_some_and(|v| owned_by(&v, index))
            {
                drift.insert(KvKey::query_config_named(&key), Drift::Unexpected);
            }
        }
    }

    let mut counts = DriftCounts::default();
    let keys = drift
        .iter()
        .map(|(key, state)| {
            *match state {
                Drift::InSync => &mut counts.in_sync,
                Drift::Missing => &mut counts.missing,
                Drift::Stale(_) => &mut counts.stale,
                Drift::Unexpected => &mut counts.unexpected,
            } += 1;
            KeyState {
                namespace: key.namespace.name(),
                key: key.key.clone(),
                status: state.name(),
                fields: match state {
                    Drift::Stale(fields) => Some(fields.clone()),
                    _ => None,
                },
            }
        })
        .collect();
    let mut answer = Answer {
        system_account_id: index.account.clone(),
        index_name: index.name.clone(),
        in_sync: drift.values().all(|d| *d == Drift::InSync),
        counts,
        keys,
        dry_run: None,
        would_repair: None,
        repaired: None,
    };
    if !request.repair {
        return Ok(answer);
    }

    // Only what drifted is sent: missing and stale keys written, unexpected ones deleted.
    let writes: BTreeSet<KvKey> = (drift.iter())
        .filter(|(_, state)| matches!(state, Drift::Missing | Drift::Stale(_)))
        .map(|(key, _)| key.clone())
        .collect();
    let deletes: Vec<(KvKey, Option<IndexRef>)> = (drift.iter())
        .filter(|(_, state)| **state == Drift::Unexpected)
        .map(|(key, _)| (key.clone(), Some(index.clone())))
        .collect();
    if request.dry_run {
        let writes: Vec<KvKey> = writes.into_iter().collect();
        let deletes: Vec<KvKey> = deletes.into_iter().map(|(key, _)| key).collect();
        answer.dry_run = Some(true);
        answer.would_repair = Some(KeyChanges::of(&writes, &deletes));
        return Ok(answer);
    }
    prepared.read_epoch = Some(read_since);
    let report = exporter.repair(prepared, &writes, deletes, deadline).await;
    ensure_exported(index, &report)?;
    let mut repaired = KeyChanges::of(&report.written, &report.deleted);
    repaired.left_to_other_writers = report.left.iter().map(|k| k.key.clone()).collect();
    answer.repaired = Some(repaired);
    Ok(answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_config_belongs_to_the_index_its_value_names() {
        let value = r#"{"schema_version": 1, "system_account_id": "acct", "index_name": "1-x"}"#;
        assert!(owned_by(value, &IndexRef::new("acct", "1-x")));
        assert!(!owned_by(value, &IndexRef::new("acct-1", "x")));
        assert!(!owned_by("not json", &IndexRef::new("acct", "1-x")));
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
}
