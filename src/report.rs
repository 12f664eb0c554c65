//! What a batch did, told three ways: the record outcomes the answer is built from, one log
//! line per record that needs a look (and one per batch), and a CloudWatch metrics document
//! in the Embedded Metric Format, printed to stdout where Lambda's log pipeline turns it into
//! metrics (no client, no calls).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::domain::validate::cut;
use crate::domain::{ChangeRecord, IndexRef, KvKey};
use crate::ports::{LookupCounts, PortError};

pub const NAMESPACE: &str = "EcomSettingsExporter";

pub use crate::domain::Outcome;

impl Outcome {
    /// What a port's error makes of a record: reported for retry when a later try may
    /// succeed, else rejected; `what` goes in front of the error's reason.
    pub fn of_port_error(error: &PortError, what: impl std::fmt::Display) -> Self {
        let reason = format!("{what}{}", error.reason());
        match error.is_transient() {
            true => Outcome::Failed(reason),
            false => Outcome::Rejected(reason),
        }
    }
}

/// A key a writer wrote or deleted, to check: the index it is checked as (a put's: whose value
/// it is; a delete's: the index that gave it up, or for a repair's, the index it was written
/// for), the indexes whose records fail when it cannot be confirmed (`fails`), and the digest
/// of the value put (`None`: deleted; empty: left as it was, a value no decision's digest
/// equals).
#[derive(Debug, Clone, PartialEq)]
pub struct Landed {
    pub key: KvKey,
    pub fails: Vec<IndexRef>,
    pub index: IndexRef,
    pub digest: Option<String>,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct BatchReport {
    /// Each record as it ended (its change let go).
    pub records: Vec<ChangeRecord>,
    pub kv_requests: usize,
    /// HTTP attempts beyond the first, resends of unsuccessful keys included.
    pub kv_retries: usize,
    pub api_keys: LookupCounts,
    /// Seconds from each exported record's `ApproximateCreationDateTime` to its KV write.
    pub lag_seconds: Vec<f64>,
    /// The keys applied, per namespace, for the manual re-export's summary.
    pub written: Vec<KvKey>,
    pub deleted: Vec<KvKey>,
    /// An operator's keys that landed, checked against the table as it is after the write
    /// before the report is final (docs/contract.md, "Concurrent writers").
    pub landed: Vec<Landed>,
    /// The shop each index read again by the check claims in the table now, and each shop key
    /// a write gave an index's value: the stream's shrink never takes it out of the index's
    /// references (the index's value may be there).
    pub claimed_now: Vec<(IndexRef, String)>,
}

impl BatchReport {
    pub fn count(&self, kind: fn(&Outcome) -> bool) -> usize {
        self.records.iter().filter(|r| kind(&r.outcome)).count()
    }

    /// Why the first failed record failed (`None`: none failed).
    pub fn first_failure(&self) -> Option<&str> {
        self.records.iter().find_map(|r| match &r.outcome {
            Outcome::Failed(reason) => Some(reason.as_str()),
            _ => None,
        })
    }

    /// Sequence numbers Lambda must retry, in stream order.
    pub fn failed_sequence_numbers(&self) -> Vec<String> {
        self.records
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Failed(_)))
            .filter_map(|r| r.sequence_number.clone())
            .collect()
    }

    /// One line per rejected, failed or kept record, then one line for the batch.
    pub fn log(&self) {
        self.log_records();
        tracing::info!(
            records = self.records.len(),
            exported = self.count(|o| matches!(o, Outcome::Exported)),
            skipped = self.count(|o| matches!(o, Outcome::Skipped(_))),
            rejected = self.count(|o| matches!(o, Outcome::Rejected(_))),
            failed = self.count(|o| matches!(o, Outcome::Failed(_))),
            kept = self.count(|o| matches!(o, Outcome::Kept { .. })),
            kv_requests = self.kv_requests,
            kv_retries = self.kv_retries,
            keys_written = self.written.len(),
            keys_deleted = self.deleted.len(),
            api_key_calls = self.api_keys.calls,
            api_key_cache_hits = self.api_keys.cache_hits,
            "batch done"
        );
    }

    /// A dry run's lines: nothing was sent, so the batch line says what would have been.
    pub fn log_dry_run(&self) {
        self.log_records();
        tracing::info!(
            records = self.records.len(),
            would_export = self.count(|o| matches!(o, Outcome::Exported)),
            skipped = self.count(|o| matches!(o, Outcome::Skipped(_))),
            rejected = self.count(|o| matches!(o, Outcome::Rejected(_))),
            failed = self.count(|o| matches!(o, Outcome::Failed(_))),
            keys_to_write = self.written.len(),
            api_key_calls = self.api_keys.calls,
            "dry run done: nothing written"
        );
    }

    fn log_records(&self) {
        for record in &self.records {
            // Names come from the record: a multi-megabyte one is cut, not logged whole.
            let (account, index) = record
                .index
                .as_ref()
                .map(|i| (cut(&i.account), cut(&i.name)))
                .unwrap_or(("?".into(), "?".into()));
            let sequence_number = cut(record.sequence_number.as_deref().unwrap_or("?"));
            match &record.outcome {
                Outcome::Rejected(reason) => tracing::error!(
                    %account, %index, %sequence_number, %reason, "record rejected"
                ),
                Outcome::Failed(reason) => tracing::error!(
                    %account, %index, %sequence_number, %reason, "record failed; reported for retry"
                ),
                Outcome::Kept { referenced_by } => {
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
                Outcome::Skipped(reason) => {
                    tracing::debug!(%account, %index, %sequence_number, %reason, "record skipped")
                }
                Outcome::Exported => {}
            }
        }
    }
}

/// The metrics a rollout is judged by: also published under the version that ran, so the
/// canary's alarms watch the new version alone (Lambda's own metrics carry `ExecutedVersion`).
const BY_VERSION: &[&str] = &["RecordsFailed"];

/// The metrics of one batch, named as the template's alarms and dashboards use them.
pub fn emf_document(
    report: &BatchReport,
    duration: Duration,
    (function_name, version): (&str, &str),
    now: SystemTime,
) -> Value {
    let count = |kind: fn(&Outcome) -> bool| report.count(kind) as f64;
    let mut values: Vec<(&str, &str, f64)> = vec![
        (
            "RecordsExported",
            "Count",
            count(|o| *o == Outcome::Exported),
        ),
        (
            "RecordsSkipped",
            "Count",
            count(|o| matches!(o, Outcome::Skipped(_))),
        ),
        (
            "RecordsRejected",
            "Count",
            count(|o| matches!(o, Outcome::Rejected(_))),
        ),
        (
            "RecordsFailed",
            "Count",
            count(|o| matches!(o, Outcome::Failed(_))),
        ),
        (
            "ProtectedRemoves",
            "Count",
            count(|o| matches!(o, Outcome::Kept { .. })),
        ),
        ("KvRequests", "Count", report.kv_requests as f64),
        ("KvRetries", "Count", report.kv_retries as f64),
        ("ApiKeyCalls", "Count", report.api_keys.calls as f64),
        (
            "ApiKeyCacheHits",
            "Count",
            report.api_keys.cache_hits as f64,
        ),
        (
            "BatchDuration",
            "Milliseconds",
            duration.as_secs_f64() * 1000.0,
        ),
    ];
    // Lag only exists for exported records that carry a creation time.
    if !report.lag_seconds.is_empty() {
        let max = report.lag_seconds.iter().cloned().fold(0.0, f64::max);
        let mean = report.lag_seconds.iter().sum::<f64>() / report.lag_seconds.len() as f64;
        values.push(("PropagationLagMax", "Milliseconds", max * 1000.0));
        values.push(("PropagationLagMean", "Milliseconds", mean * 1000.0));
    }
    let mut document = metrics_document(&values, function_name, now);
    let by_version = json!({
        "Namespace": NAMESPACE,
        "Dimensions": [["FunctionName", "ExecutedVersion"]],
        "Metrics": BY_VERSION.iter().map(|name| json!({"Name": name, "Unit": "Count"})).collect::<Vec<_>>(),
    });
    if let Some(directives) = document["_aws"]["CloudWatchMetrics"].as_array_mut() {
        directives.push(by_version);
    }
    document["ExecutedVersion"] = version.into();
    document
}

/// An EMF document holding `values` (name, unit, value), in the namespace the template's
/// alarms and dashboard read.
pub fn metrics_document(
    values: &[(&str, &str, f64)],
    function_name: &str,
    now: SystemTime,
) -> Value {
    let mut document = Map::new();
    document.insert(
        "_aws".into(),
        json!({
            "Timestamp": now.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
            "CloudWatchMetrics": [{
                "Namespace": NAMESPACE,
                "Dimensions": [["FunctionName"]],
                "Metrics": values.iter().map(|(name, unit, _)| json!({"Name": name, "Unit": unit})).collect::<Vec<_>>(),
            }],
        }),
    );
    document.insert("FunctionName".into(), function_name.into());
    for (name, _, value) in values {
        document.insert((*name).into(), json!(value));
    }
    Value::Object(document)
}

fn function_name() -> String {
    std::env::var("AWS_LAMBDA_FUNCTION_NAME").unwrap_or_else(|_| "local".into())
}

/// The version that runs (Lambda sets it: a number, or `$LATEST` for an unqualified call).
fn function_version() -> String {
    std::env::var("AWS_LAMBDA_FUNCTION_VERSION").unwrap_or_else(|_| "$LATEST".into())
}

/// A reconcile's findings, per class over both namespaces, and what it repaired.
pub fn reconcile_metrics(
    classes: &[(&str, usize)],
    drift: usize,
    repaired: usize,
) -> Vec<(String, f64)> {
    let mut values: Vec<(String, f64)> = classes
        .iter()
        .map(|(class, n)| (format!("Reconcile{class}"), *n as f64))
        .collect();
    values.push(("ReconcileDriftFound".into(), drift as f64));
    values.push(("ReconcileRepaired".into(), repaired as f64));
    values
}

/// Prints a reconcile's metrics document as one stdout line.
pub fn emit_reconcile(values: &[(String, f64)]) {
    let values: Vec<(&str, &str, f64)> = values
        .iter()
        .map(|(name, value)| (name.as_str(), "Count", *value))
        .collect();
    println!(
        "{}",
        metrics_document(&values, &function_name(), SystemTime::now())
    );
}

/// Prints the batch's metrics document as one stdout line.
pub fn emit(report: &BatchReport, duration: Duration) {
    println!(
        "{}",
        emf_document(
            report,
            duration,
            (&function_name(), &function_version()),
            SystemTime::now()
        )
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(outcome: Outcome) -> ChangeRecord {
        ChangeRecord {
            sequence_number: Some("1".into()),
            ..ChangeRecord::of(None, Err(outcome))
        }
    }

    #[test]
    fn one_document_declares_and_holds_every_metric() {
        let report = BatchReport {
            records: vec![
                record(Outcome::Exported),
                record(Outcome::Exported),
                record(Outcome::Failed("x".into())),
                record(Outcome::Kept {
                    referenced_by: vec![],
                }),
            ],
            kv_requests: 2,
            kv_retries: 3,
            lag_seconds: vec![1.0, 3.0],
            ..BatchReport::default()
        };
        let doc = emf_document(
            &report,
            Duration::from_millis(250),
            ("dev-fn", "7"),
            UNIX_EPOCH + Duration::from_secs(10),
        );
        assert_eq!(doc["_aws"]["Timestamp"], 10_000);
        assert_eq!(doc["_aws"]["CloudWatchMetrics"][0]["Namespace"], NAMESPACE);
        assert_eq!(doc["FunctionName"], "dev-fn");
        assert_eq!(doc["RecordsExported"], 2.0);
        assert_eq!(doc["RecordsFailed"], 1.0);
        assert_eq!(doc["ProtectedRemoves"], 1.0);
        assert_eq!(doc["KvRetries"], 3.0);
        assert_eq!(doc["BatchDuration"], 250.0);
        assert_eq!(doc["PropagationLagMax"], 3000.0);
        assert_eq!(doc["PropagationLagMean"], 2000.0);
        let declared: Vec<&str> = doc["_aws"]["CloudWatchMetrics"][0]["Metrics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["Name"].as_str().unwrap())
            .collect();
        for name in &declared {
            assert!(doc.get(*name).is_some(), "{name} declared and present");
        }
        assert_eq!(declared.len(), 12);
        // RecordsFailed again under the version that ran, for the canary's alarm.
        let by_version = &doc["_aws"]["CloudWatchMetrics"][1];
        assert_eq!(
            by_version["Dimensions"],
            json!([["FunctionName", "ExecutedVersion"]])
        );
        assert_eq!(
            by_version["Metrics"],
            json!([{"Name": "RecordsFailed", "Unit": "Count"}])
        );
        assert_eq!(doc["ExecutedVersion"], "7");
    }

    #[test]
    fn reconcile_metrics_name_each_class_the_drift_and_the_repairs() {
        let values = reconcile_metrics(&[("Missing", 2), ("Stale", 1)], 3, 3);
        let names: Vec<&str> = values.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "ReconcileMissing",
                "ReconcileStale",
                "ReconcileDriftFound",
                "ReconcileRepaired"
            ]
        );
        let document = metrics_document(
            &values
                .iter()
                .map(|(n, v)| (n.as_str(), "Count", *v))
                .collect::<Vec<_>>(),
            "f",
            UNIX_EPOCH,
        );
        assert_eq!(document["ReconcileDriftFound"], 3.0);
        assert_eq!(
            document["_aws"]["CloudWatchMetrics"][0]["Metrics"][0]["Name"],
            "ReconcileMissing"
        );
    }

    #[test]
    fn lag_is_left_out_when_no_record_has_a_creation_time() {
        let doc = emf_document(
            &BatchReport::default(),
            Duration::ZERO,
            ("f", "$LATEST"),
            SystemTime::now(),
        );
        assert!(doc.get("PropagationLagMax").is_none());
        assert_eq!(
            doc["_aws"]["CloudWatchMetrics"][0]["Metrics"]
                .as_array()
                .unwrap()
                .len(),
            10
        );
    }
}
