//! Step 1 and step 5 of the pipeline: the payload decides the route, and the exporter's report
//! becomes the answer (the partial-batch response, or a re-export summary).

use std::time::{Duration, SystemTime};

use aws_lambda_events::streams::{DynamoDbBatchItemFailure, DynamoDbEventResponse};
use lambda_runtime::{Diagnostic, LambdaEvent};
use serde_json::Value;
use tokio::time::Instant;

use crate::api_keys::ApiKeySource;
use crate::cloudflare::KvStore;
use crate::exporter::{BatchReport, Exporter, RecordOutcome};
use crate::manual::{self, BackfillRequest, IndexTarget, ManualRequest};
use crate::model::IndexRef;
use crate::table::SettingsTable;

const ACCEPTED: &str =
    "expected a DynamoDB stream batch {\"Records\": [...]} or a manual re-export \
{\"system_account_id\": \"...\", \"index_name\": \"...\", \"include_query_configs\": false}";

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HandlerError {
    #[error("unsupported payload: {ACCEPTED}")]
    UnsupportedPayload,
    #[error("invalid manual payload: `{field}` {problem}")]
    InvalidField { field: String, problem: String },
    #[error("no settings record for account {account}, index {index}")]
    NoSuchIndex { account: String, index: String },
    #[error("re-export of account {account}, index {index} failed: {reason}")]
    ExportFailed {
        account: String,
        index: String,
        reason: String,
    },
    #[error("backfill stopped: {reason}")]
    BackfillFailed { reason: String },
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
            HandlerError::ExportFailed { .. }
            | HandlerError::BackfillFailed { .. }
            | HandlerError::UnreportableFailure => "ExportFailed",
            HandlerError::Config(_) => "ConfigError",
        };
        Diagnostic {
            error_type: error_type.into(),
            error_message: error.to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    StreamBatch(Vec<Value>),
    Manual(ManualRequest),
}

/// The fields of a manual payload, checked one by one; each error names its field.
struct Fields(serde_json::Map<String, Value>);

impl Fields {
    fn invalid(field: &str, problem: &str) -> HandlerError {
        HandlerError::InvalidField {
            field: field.into(),
            problem: problem.into(),
        }
    }

    fn only(&self, allowed: &[&str]) -> Result<(), HandlerError> {
        match self.0.keys().find(|k| !allowed.contains(&k.as_str())) {
            Some(unknown) => Err(Self::invalid(
                unknown,
                &format!(
                    "is not a field of this mode (fields: {})",
                    allowed.join(", ")
                ),
            )),
            None => Ok(()),
        }
    }

    fn text(&self, field: &str) -> Result<Option<String>, HandlerError> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Err(Self::invalid(field, "is empty")),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(Self::invalid(field, "must be a string")),
        }
    }

    fn required_text(&self, field: &str) -> Result<String, HandlerError> {
        self.text(field)?
            .ok_or_else(|| Self::invalid(field, "is required"))
    }

    fn flag(&self, field: &str) -> Result<bool, HandlerError> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(Self::invalid(field, "must be true or false")),
        }
    }

    fn count(
        &self,
        field: &str,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<Option<u64>, HandlerError> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => value
                .as_u64()
                .filter(|n| range.contains(n))
                .map(Some)
                .ok_or_else(|| {
                    let problem = format!(
                        "must be a whole number from {} to {}",
                        range.start(),
                        range.end()
                    );
                    Self::invalid(field, &problem)
                }),
        }
    }

    fn target(&self) -> Result<IndexTarget, HandlerError> {
        Ok(IndexTarget {
            index: IndexRef::new(
                self.required_text("system_account_id")?,
                self.required_text("index_name")?,
            ),
            include_query_configs: self.flag("include_query_configs")?,
        })
    }
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
        let fields = Fields(fields);
        let mode = match fields.text("mode")? {
            Some(mode) => mode,
            None if fields.0.contains_key("system_account_id")
                || fields.0.contains_key("index_name") =>
            {
                "reexport".into()
            }
            None => return Err(HandlerError::UnsupportedPayload),
        };
        let request = match mode.as_str() {
            "reexport" => {
                fields.only(&[
                    "mode",
                    "system_account_id",
                    "index_name",
                    "include_query_configs",
                    "dry_run",
                ])?;
                ManualRequest::Reexport {
                    target: fields.target()?,
                    dry_run: fields.flag("dry_run")?,
                }
            }
            "verify" => {
                fields.only(&[
                    "mode",
                    "system_account_id",
                    "index_name",
                    "include_query_configs",
                    "repair",
                    "dry_run",
                ])?;
                ManualRequest::Verify {
                    target: fields.target()?,
                    repair: fields.flag("repair")?,
                    dry_run: fields.flag("dry_run")?,
                }
            }
            "backfill" => {
                fields.only(&[
                    "mode",
                    "system_account_id",
                    "include_query_configs",
                    "dry_run",
                    "continuation_token",
                    "page_size",
                    "max_records",
                ])?;
                ManualRequest::Backfill(BackfillRequest {
                    account: fields.text("system_account_id")?,
                    include_query_configs: fields.flag("include_query_configs")?,
                    dry_run: fields.flag("dry_run")?,
                    continuation_token: fields.text("continuation_token")?,
                    page_size: fields.count("page_size", 1..=1000)?.unwrap_or(100) as i32,
                    max_records: fields
                        .count("max_records", 1..=u32::MAX as u64)?
                        .map(|n| n as usize),
                })
            }
            _ => {
                return Err(Fields::invalid(
                    "mode",
                    "must be reexport, verify or backfill",
                ))
            }
        };
        Ok(Payload::Manual(request))
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
            let started = Instant::now();
            let report = exporter.export_stream(records, deadline).await;
            report.log();
            crate::metrics::emit(&report, started.elapsed());
            batch_response(&report).map(|r| serde_json::to_value(r).expect("serializable"))
        }
        Payload::Manual(request) => manual::run(exporter, request, deadline).await,
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
            Payload::Manual(ManualRequest::Reexport {
                target: IndexTarget {
                    index: IndexRef::new("a", "i"),
                    include_query_configs: false
                },
                dry_run: false
            })
        );
        let err = Payload::try_from(json!({"system_account_id": "a"})).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid manual payload: `index_name` is required"
        );
        let err =
            Payload::try_from(json!({"system_account_id": 3, "index_name": "i"})).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid manual payload: `system_account_id` must be a string"
        );
        let err = Payload::try_from(
            json!({"system_account_id": "a", "index_name": "i", "include_query_configs": "yes"}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("include_query_configs"));
    }

    #[test]
    fn operator_modes_are_parsed_and_typos_are_named() {
        let verify = Payload::try_from(json!({"mode": "verify", "system_account_id": "a",
            "index_name": "i", "repair": true}))
        .unwrap();
        assert!(matches!(
            verify,
            Payload::Manual(ManualRequest::Verify { repair: true, .. })
        ));
        let backfill = Payload::try_from(json!({"mode": "backfill", "page_size": 5})).unwrap();
        assert!(matches!(
            backfill,
            Payload::Manual(ManualRequest::Backfill(BackfillRequest {
                page_size: 5,
                account: None,
                ..
            }))
        ));
        let typo = Payload::try_from(json!({"system_account_id": "a", "index_name": "i",
            "include_query_config": true}))
        .unwrap_err();
        assert!(
            typo.to_string()
                .starts_with("invalid manual payload: `include_query_config` is not a field"),
            "{typo}"
        );
        let mode = Payload::try_from(json!({"mode": "sync"})).unwrap_err();
        assert_eq!(
            mode.to_string(),
            "invalid manual payload: `mode` must be reexport, verify or backfill"
        );
        let size = Payload::try_from(json!({"mode": "backfill", "page_size": 0})).unwrap_err();
        assert!(
            size.to_string()
                .contains("`page_size` must be a whole number from 1 to 1000"),
            "{size}"
        );
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
