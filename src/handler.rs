//! Step 1 and step 5 of the pipeline: the payload decides the route, and the exporter's report
//! becomes the answer (the partial-batch response, or a re-export summary).

use std::time::{Duration, SystemTime};

use aws_lambda_events::streams::{DynamoDbBatchItemFailure, DynamoDbEventResponse};
use lambda_runtime::{Diagnostic, LambdaEvent};
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::api_keys::ApiKeySource;
use crate::cloudflare::KvStore;
use crate::exporter::{BatchReport, Exporter, RecordOutcome};
use crate::model::{IndexRef, IndexSettings, QueryConfig};
use crate::plan::Namespace;
use crate::records::{Change, ChangeRecord, Decoded, PreviousShop};
use crate::table::SettingsTable;

const ACCEPTED: &str =
    "expected a DynamoDB stream batch {\"Records\": [...]} or a manual re-export \
{\"system_account_id\": \"...\", \"index_name\": \"...\", \"include_query_configs\": false}";

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HandlerError {
    #[error("unsupported payload: {ACCEPTED}")]
    UnsupportedPayload,
    #[error("invalid manual re-export: `{field}` {problem}")]
    InvalidField {
        field: &'static str,
        problem: &'static str,
    },
    #[error("no settings record for account {account}, index {index}")]
    NoSuchIndex { account: String, index: String },
    #[error("re-export of account {account}, index {index} failed: {reason}")]
    ExportFailed {
        account: String,
        index: String,
        reason: String,
    },
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    /// A failed stream record without a sequence number cannot be reported alone.
    #[error("a failed record has no SequenceNumber; failing the whole batch so Lambda retries it")]
    UnreportableFailure,
}

impl From<HandlerError> for Diagnostic {
    fn from(error: HandlerError) -> Self {
        let error_type = match &error {
            HandlerError::UnsupportedPayload | HandlerError::InvalidField { .. } => {
                "InvalidPayload"
            }
            HandlerError::NoSuchIndex { .. } => "NoSuchIndex",
            HandlerError::ExportFailed { .. } | HandlerError::UnreportableFailure => "ExportFailed",
            HandlerError::Config(_) => "ConfigError",
        };
        Diagnostic {
            error_type: error_type.into(),
            error_message: error.to_string(),
        }
    }
}

/// `{"system_account_id", "index_name", "include_query_configs"}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ReexportRequest {
    pub index: IndexRef,
    pub include_query_configs: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    StreamBatch(Vec<Value>),
    Reexport(ReexportRequest),
}

impl TryFrom<Value> for Payload {
    type Error = HandlerError;

    fn try_from(payload: Value) -> Result<Self, HandlerError> {
        let Value::Object(mut fields) = payload else {
            return Err(HandlerError::UnsupportedPayload);
        };
        if let Some(records) = fields.remove("Records") {
            return match records {
                Value::Array(records) => Ok(Payload::StreamBatch(records)),
                _ => Err(HandlerError::UnsupportedPayload),
            };
        }
        if !fields.contains_key("system_account_id") && !fields.contains_key("index_name") {
            return Err(HandlerError::UnsupportedPayload);
        }
        let text = |field: &'static str| match fields.get(field) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(Value::String(_)) => Err(HandlerError::InvalidField {
                field,
                problem: "is empty",
            }),
            Some(_) => Err(HandlerError::InvalidField {
                field,
                problem: "must be a string",
            }),
            None => Err(HandlerError::InvalidField {
                field,
                problem: "is required",
            }),
        };
        let include_query_configs = match fields.get("include_query_configs") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(HandlerError::InvalidField {
                    field: "include_query_configs",
                    problem: "must be true or false",
                })
            }
        };
        Ok(Payload::Reexport(ReexportRequest {
            index: IndexRef::new(text("system_account_id")?, text("index_name")?),
            include_query_configs,
        }))
    }
}

/// Retry budget when the runtime's deadline is unusable.
const UNKNOWN_DEADLINE_BUDGET: Duration = Duration::from_secs(60);

/// The instant to stop retrying: the invocation's deadline less a margin to answer in. Short
/// timeouts keep most of their time: the margin is at most a fifth of what is left.
pub fn retry_deadline(deadline: SystemTime, margin: Duration) -> Instant {
    match deadline.duration_since(SystemTime::now()) {
        Ok(left) if !left.is_zero() => Instant::now() + left.saturating_sub(margin.min(left / 5)),
        // Lambda never hands out an invocation that is already late; local runtimes may send a
        // duration instead of a time (`cargo lambda watch` sends 600000).
        _ => {
            tracing::warn!(
                budget_s = UNKNOWN_DEADLINE_BUDGET.as_secs(),
                "the invocation deadline is already past: a local runtime? retrying within a fixed budget"
            );
            Instant::now() + UNKNOWN_DEADLINE_BUDGET
        }
    }
}

pub async fn handle<K: KvStore, A: ApiKeySource, T: SettingsTable>(
    exporter: &Exporter<K, A, T>,
    margin: Duration,
    event: LambdaEvent<Value>,
) -> Result<Value, HandlerError> {
    let deadline = retry_deadline(event.context.deadline(), margin);
    let retry_budget_ms = deadline
        .saturating_duration_since(Instant::now())
        .as_millis() as u64;
    tracing::debug!(retry_budget_ms, "invocation received");
    route(exporter, event.payload, deadline).await
}

/// Routes a payload; retrying stops at `deadline`.
pub async fn route<K: KvStore, A: ApiKeySource, T: SettingsTable>(
    exporter: &Exporter<K, A, T>,
    payload: Value,
    deadline: Instant,
) -> Result<Value, HandlerError> {
    match Payload::try_from(payload)? {
        Payload::StreamBatch(records) => {
            let report = exporter.export_stream(records, deadline).await;
            report.log();
            batch_response(&report).map(|r| serde_json::to_value(r).expect("serializable"))
        }
        Payload::Reexport(request) => reexport(exporter, &request, deadline).await,
    }
}

pub fn batch_response(report: &BatchReport) -> Result<DynamoDbEventResponse, HandlerError> {
    let unreportable = report
        .records
        .iter()
        .any(|r| matches!(r.outcome, RecordOutcome::Failed(_)) && r.sequence_number.is_none());
    if unreportable {
        return Err(HandlerError::UnreportableFailure);
    }
    let mut response = DynamoDbEventResponse::default();
    response.batch_item_failures = report
        .failed_sequence_numbers()
        .into_iter()
        .map(|seq| {
            let mut failure = DynamoDbBatchItemFailure::default();
            failure.item_identifier = Some(seq);
            failure
        })
        .collect();
    Ok(response)
}

/// Reads the index's record (and its query configs when asked) and exports them like a batch.
pub async fn reexport<K: KvStore, A: ApiKeySource, T: SettingsTable>(
    exporter: &Exporter<K, A, T>,
    request: &ReexportRequest,
    deadline: Instant,
) -> Result<Value, HandlerError> {
    let index = &request.index;
    let failed = |reason: String| HandlerError::ExportFailed {
        account: index.account.clone(),
        index: index.name.clone(),
        reason,
    };
    let item = exporter
        .table
        .index_settings(index)
        .await
        .map_err(failed)?
        .ok_or_else(|| HandlerError::NoSuchIndex {
            account: index.account.clone(),
            index: index.name.clone(),
        })?;
    let mut records = vec![manual_record(
        index,
        IndexSettings::from_item(index.clone(), item).map(|settings| Change::UpsertIndex {
            settings: Box::new(settings),
            previous_shop: PreviousShop::Unknown,
        }),
    )];
    if request.include_query_configs {
        for (query, item) in exporter.table.query_configs(index).await.map_err(failed)? {
            records.push(manual_record(
                index,
                QueryConfig::from_item(index.clone(), query, item).map(Change::UpsertQuery),
            ));
        }
    }
    let report = exporter.export(records, deadline).await;
    report.log();
    if let Some(reason) = report.records.iter().find_map(|r| match &r.outcome {
        RecordOutcome::Failed(reason) => Some(reason.clone()),
        _ => None,
    }) {
        return Err(failed(reason));
    }
    if let RecordOutcome::Rejected(reason) = &report.records[0].outcome {
        return Err(failed(reason.clone()));
    }
    Ok(reexport_summary(request, &report))
}

fn manual_record(
    index: &IndexRef,
    change: Result<Change, crate::model::InvalidRecord>,
) -> ChangeRecord {
    ChangeRecord {
        sequence_number: None,
        index: Some(index.clone()),
        created_at: None,
        decoded: match change {
            Ok(change) => Decoded::Change(change),
            Err(e) => Decoded::Reject(e.to_string()),
        },
    }
}

fn reexport_summary(request: &ReexportRequest, report: &BatchReport) -> Value {
    let keys = |namespace: Namespace| -> Vec<&str> {
        report
            .written
            .iter()
            .filter(|k| k.namespace == namespace)
            .map(|k| k.key.as_str())
            .collect()
    };
    let rejected: Vec<Value> = report
        .records
        .iter()
        .filter_map(|r| match &r.outcome {
            RecordOutcome::Rejected(reason) => Some(json!({ "reason": reason })),
            _ => None,
        })
        .collect();
    json!({
        "system_account_id": request.index.account,
        "index_name": request.index.name,
        "written": {
            "settings": keys(Namespace::Settings),
            "query_configs": keys(Namespace::QueryConfigs),
        },
        "keys_written": report.keys_written,
        "query_configs_exported": report.records.iter().skip(1)
            .filter(|r| r.outcome == RecordOutcome::Exported).count(),
        "rejected": rejected,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_margin_shrinks_for_short_timeouts() {
        let margin = Duration::from_secs(5);
        let stop = |timeout: Duration| {
            retry_deadline(SystemTime::now() + timeout, margin).duration_since(Instant::now())
        };
        let long = stop(Duration::from_secs(120));
        assert!(long > Duration::from_millis(114_900) && long <= Duration::from_secs(115));
        let short = stop(Duration::from_secs(3));
        assert!(short > Duration::from_millis(2_300) && short <= Duration::from_millis(2_400));
    }

    #[test]
    fn a_deadline_in_the_past_gets_a_fixed_budget() {
        let local = std::time::UNIX_EPOCH + Duration::from_millis(600_000);
        let budget = retry_deadline(local, Duration::from_secs(5)).duration_since(Instant::now());
        assert!(budget > Duration::from_secs(59) && budget <= UNKNOWN_DEADLINE_BUDGET);
    }

    #[test]
    fn records_route_to_the_stream_path() {
        let payload = Payload::try_from(json!({"Records": []})).unwrap();
        assert_eq!(payload, Payload::StreamBatch(vec![]));
    }

    #[test]
    fn manual_payloads_are_checked_field_by_field() {
        let ok = Payload::try_from(json!({"system_account_id": "a", "index_name": "i"})).unwrap();
        assert_eq!(
            ok,
            Payload::Reexport(ReexportRequest {
                index: IndexRef::new("a", "i"),
                include_query_configs: false
            })
        );
        let err = Payload::try_from(json!({"system_account_id": "a"})).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid manual re-export: `index_name` is required"
        );
        let err =
            Payload::try_from(json!({"system_account_id": 3, "index_name": "i"})).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid manual re-export: `system_account_id` must be a string"
        );
        let err = Payload::try_from(
            json!({"system_account_id": "a", "index_name": "i", "include_query_configs": "yes"}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("include_query_configs"));
    }

    #[test]
    fn anything_else_says_what_is_accepted() {
        for payload in [
            json!([]),
            json!({"hello": 1}),
            json!({"Records": 5}),
            json!("x"),
        ] {
            let err = Payload::try_from(payload).unwrap_err();
            assert!(err.to_string().contains("{\"Records\": [...]}"), "{err}");
            assert!(err.to_string().contains("system_account_id"), "{err}");
        }
    }
}
