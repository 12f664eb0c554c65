//! CloudWatch metrics in the Embedded Metric Format: one JSON document per stream invocation,
//! printed to stdout, where Lambda's log pipeline turns it into metrics. No client, no calls.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::exporter::{BatchReport, RecordOutcome};

pub const NAMESPACE: &str = "EcomSettingsExporter";

/// The metrics of one batch, named as the template's alarms and dashboards use them.
pub fn emf_document(
    report: &BatchReport,
    duration: Duration,
    function_name: &str,
    now: SystemTime,
) -> Value {
    let count = |kind: fn(&RecordOutcome) -> bool| report.count(kind) as f64;
    let mut values: Vec<(&str, &str, f64)> = vec![
        (
            "RecordsExported",
            "Count",
            count(|o| *o == RecordOutcome::Exported),
        ),
        (
            "RecordsSkipped",
            "Count",
            count(|o| matches!(o, RecordOutcome::Skipped(_))),
        ),
        (
            "RecordsRejected",
            "Count",
            count(|o| matches!(o, RecordOutcome::Rejected(_))),
        ),
        (
            "RecordsFailed",
            "Count",
            count(|o| matches!(o, RecordOutcome::Failed(_))),
        ),
        (
            "ProtectedRemoves",
            "Count",
            count(|o| matches!(o, RecordOutcome::Kept { .. })),
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
        document.insert(name.into(), json!(value));
    }
    Value::Object(document)
}

/// Prints the batch's metrics document as one stdout line.
pub fn emit(report: &BatchReport, duration: Duration) {
    let function_name =
        std::env::var("AWS_LAMBDA_FUNCTION_NAME").unwrap_or_else(|_| "local".into());
    println!(
        "{}",
        emf_document(report, duration, &function_name, SystemTime::now())
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exporter::RecordReport;

    fn record(outcome: RecordOutcome) -> RecordReport {
        RecordReport {
            sequence_number: Some("1".into()),
            index: None,
            outcome,
        }
    }

    #[test]
    fn one_document_declares_and_holds_every_metric() {
        let report = BatchReport {
            records: vec![
                record(RecordOutcome::Exported),
                record(RecordOutcome::Exported),
                record(RecordOutcome::Failed("x".into())),
                record(RecordOutcome::Kept {
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
            "dev-fn",
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
    }

    #[test]
    fn lag_is_left_out_when_no_record_has_a_creation_time() {
        let doc = emf_document(
            &BatchReport::default(),
            Duration::ZERO,
            "f",
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
