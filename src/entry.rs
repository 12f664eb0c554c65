//! The thin entry (steps 1 and 5 of the pipeline): the payload decides the route, and the
//! exporter's report becomes the answer (the partial-batch response, or an operator answer).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lambda_events::event::streams::{DynamoDbBatchItemFailure, DynamoDbEventResponse};
use bytes::Bytes;
use lambda_runtime::{Diagnostic, LambdaEvent};
use serde_json::value::RawValue;
use serde_json::Value;
use tokio::time::Instant;

use crate::operator::{OperatorError, OperatorRequest};
use crate::pipeline::exporter::Exporter;
use crate::pipeline::records::{decode_batch, ChangeRecord, Expected};
use crate::ports::Ports;
use crate::report::{BatchReport, Outcome};

const ACCEPTED: &str = "expected a DynamoDB stream batch {\"Records\": [...]}, or an operator \
payload: a re-export {\"system_account_id\": \"...\", \"index_name\": \"...\"}, or \
{\"mode\": \"reexport\" | \"verify\" | \"backfill\" | \"reconcile\", ...} (docs/operations.md, \"Manual modes\")";

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HandlerError {
    #[error("unsupported payload: {ACCEPTED}")]
    UnsupportedPayload,
    #[error(transparent)]
    Operator(#[from] OperatorError),
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    /// A failed stream record without a sequence number cannot be reported alone.
    #[error("a failed record has no SequenceNumber; failing the whole batch so Lambda retries it")]
    UnreportableFailure,
}

impl From<HandlerError> for Diagnostic {
    fn from(error: HandlerError) -> Self {
        let error_type = match &error {
            HandlerError::UnsupportedPayload
            | HandlerError::Operator(OperatorError::InvalidField { .. }) => "InvalidPayload",
            HandlerError::Operator(OperatorError::NoSuchIndex { .. }) => "NoSuchIndex",
            HandlerError::Operator(OperatorError::BeforeMigration(_)) => "BeforeMigration",
            HandlerError::Operator(
                OperatorError::ExportFailed { .. }
                | OperatorError::BackfillFailed { .. }
                | OperatorError::ReconcileFailed { .. },
            )
            | HandlerError::UnreportableFailure => "ExportFailed",
            HandlerError::Config(_) => "ConfigError",
        };
        Diagnostic {
            error_type: error_type.into(),
            error_message: error.to_string(),
        }
    }
}

#[derive(Debug)]
pub enum Payload {
    StreamBatch(Vec<ChangeRecord>),
    Operator(OperatorRequest),
}

impl Payload {
    pub fn parse<'s>(
        payload: &[u8],
        expected: impl Into<Expected<'s>>,
    ) -> Result<Self, HandlerError> {
        let expected = expected.into();
        let payload = std::str::from_utf8(payload).map_err(|_| HandlerError::UnsupportedPayload)?;
        if let Some(records) = decode_batch(payload, expected) {
            return Ok(Payload::StreamBatch(records));
        }
        // Operator payloads are small: a JSON tree is fine.
        let value: Value =
            serde_json::from_str(payload).map_err(|_| HandlerError::UnsupportedPayload)?;
        Self::from_value(value)
    }

    fn from_value(payload: Value) -> Result<Self, HandlerError> {
        let Value::Object(mut fields) = payload else {
            return Err(HandlerError::UnsupportedPayload);
        };
        if let Some(records) = fields.remove("Records") {
            // An array was taken above: anything else under `Records` is not a batch.
            let _ = records;
            return Err(HandlerError::UnsupportedPayload);
        }
        if !OperatorRequest::is_operator_payload(&fields) {
            return Err(HandlerError::UnsupportedPayload);
        }
        Ok(Payload::Operator(OperatorRequest::parse(fields)?))
    }
}

/// Retry budget when the runtime's deadline is unusable.
const UNKNOWN_DEADLINE_BUDGET: Duration = Duration::from_secs(60);

/// Deadlines before this (2001) are not times: `cargo lambda watch` sends the function's
/// timeout in milliseconds (600000) where Lambda sends the epoch milliseconds of the deadline.
const EARLIEST_DEADLINE: Duration = Duration::from_secs(978_307_200);

/// The instant to stop retrying: the invocation's deadline less a margin to answer in. Short
/// timeouts keep most of their time: the margin is at most a fifth of what is left.
pub fn retry_deadline(deadline: SystemTime, margin: Duration) -> Instant {
    let since_epoch = deadline.duration_since(UNIX_EPOCH).unwrap_or_default();
    let left = match deadline.duration_since(SystemTime::now()) {
        Ok(left) if !left.is_zero() => left,
        _ if !since_epoch.is_zero() && since_epoch < EARLIEST_DEADLINE => {
            tracing::debug!(
                timeout_ms = since_epoch.as_millis() as u64,
                "the runtime sent a timeout, not a deadline (a local runtime): using it as one"
            );
            since_epoch
        }
        // Lambda never hands out an invocation that is already late.
        _ => {
            tracing::warn!(
                budget_s = UNKNOWN_DEADLINE_BUDGET.as_secs(),
                "the invocation deadline is already past; retrying within a fixed budget"
            );
            return Instant::now() + UNKNOWN_DEADLINE_BUDGET;
        }
    };
    Instant::now() + left.saturating_sub(margin.min(left / 5))
}

/// One invocation: its payload, read by `lambda_runtime` as JSON text (checked, not parsed
/// into a tree), routed with its retry deadline.
pub async fn handle<P: Ports>(
    exporter: &Exporter<P>,
    margin: Duration,
    event: LambdaEvent<Box<RawValue>>,
) -> Result<Value, HandlerError> {
    let deadline = retry_deadline(event.context.deadline(), margin);
    let retry_budget_ms = deadline
        .saturating_duration_since(Instant::now())
        .as_millis() as u64;
    tracing::debug!(retry_budget_ms, "invocation received");
    let text: Box<str> = event.payload.into();
    route(exporter, Bytes::from(text.into_boxed_bytes()), deadline).await
}

/// Routes a payload (its JSON text); retrying stops at `deadline`. An invocation that fails as
/// a whole says so in one line, which the `FunctionErrors` alarm's runbook starts from.
pub async fn route<P: Ports>(
    exporter: &Exporter<P>,
    payload: impl Into<Bytes>,
    deadline: Instant,
) -> Result<Value, HandlerError> {
    let answer = answer(exporter, payload.into(), deadline).await;
    if let Err(error) = &answer {
        log_failure(error);
    }
    answer
}

/// The one line an invocation that fails as a whole logs, with its error type.
pub fn log_failure(error: &HandlerError) {
    let Diagnostic { error_type, .. } = Diagnostic::from(error.clone());
    tracing::error!(%error_type, "invocation failed: {error}");
}

async fn answer<P: Ports>(
    exporter: &Exporter<P>,
    payload: Bytes,
    deadline: Instant,
) -> Result<Value, HandlerError> {
    let parsed = Payload::parse(&payload, exporter.expected())?;
    match parsed {
        Payload::StreamBatch(records) => {
            // Decoded records own what they need: the event's memory goes now.
            drop(payload);
            let started = Instant::now();
            let report = exporter.export_stream(records, deadline).await;
            report.log();
            crate::report::emit(&report, started.elapsed());
            batch_response(&report).map(|r| serde_json::to_value(r).expect("serializable"))
        }
        Payload::Operator(request) => {
            let answer = request.run(exporter, deadline).await;
            release_freed_memory();
            Ok(answer?)
        }
    }
}

/// An operator's invocation gives the memory it freed back to the kernel as it ends: it held a
/// piece of the fleet, and a chained backfill or reconcile would otherwise pile up pages that
/// the next piece does not fill again the same way. A stream batch keeps it for the next batch
/// (docs/contract.md, "Memory is kept between stream batches").
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // Every arena (`MALLCTL_ARENAS_ALL`); a purge takes and answers nothing.
        let name = c"arena.4096.purge";
        let (none, no_len) = (std::ptr::null_mut(), std::ptr::null_mut());
        // SAFETY: a NUL-terminated name jemalloc knows, and no values to read or write.
        let status = unsafe { tikv_jemalloc_sys::mallctl(name.as_ptr(), none, no_len, none, 0) };
        if status != 0 {
            tracing::debug!(status, "jemalloc did not purge");
        }
    }
}

/// The partial-batch response: Lambda replays the stream from the lowest sequence number listed.
pub fn batch_response(report: &BatchReport) -> Result<DynamoDbEventResponse, HandlerError> {
    let unreportable = report
        .records
        .iter()
        .any(|r| matches!(r.outcome, Outcome::Failed(_)) && r.sequence_number.is_none());
    if unreportable {
        return Err(HandlerError::UnreportableFailure);
    }
    let mut response = DynamoDbEventResponse::default();
    for sequence_number in report.failed_sequence_numbers() {
        let mut failure = DynamoDbBatchItemFailure::default();
        failure.item_identifier = Some(sequence_number);
        response.batch_item_failures.push(failure);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn raw(value: Value) -> Vec<u8> {
        serde_json::to_vec(&value).unwrap()
    }

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
    fn a_local_runtime_s_timeout_is_taken_as_the_time_left() {
        // `cargo lambda watch` sends 600000: ten minutes, not a time in 1970.
        let local = UNIX_EPOCH + Duration::from_millis(600_000);
        let budget = retry_deadline(local, Duration::from_secs(5)).duration_since(Instant::now());
        assert!(budget > Duration::from_secs(594) && budget <= Duration::from_secs(595));
    }

    #[test]
    fn a_deadline_in_the_past_gets_a_fixed_budget() {
        let late = SystemTime::now() - Duration::from_secs(1);
        let budget = retry_deadline(late, Duration::from_secs(5)).duration_since(Instant::now());
        assert!(budget > Duration::from_secs(59) && budget <= UNKNOWN_DEADLINE_BUDGET);
    }

    #[test]
    fn records_route_to_the_stream_path() {
        let parse = |payload: Value| Payload::parse(&raw(payload), "D").unwrap();
        assert!(matches!(parse(json!({"Records": []})), Payload::StreamBatch(r) if r.is_empty()));
        let record = |seq: &str| {
            json!({"eventID": seq, "eventName": "REMOVE", "awsRegion": "r", "dynamodb": {
                "SequenceNumber": seq, "SizeBytes": 1, "Keys": {"pk": {"S": "a"}, "sk": {"S": "INDEX#i"}}}})
        };
        let Payload::StreamBatch(records) =
            parse(json!({"other": [1], "Records": [record("1"), record("2")]}))
        else {
            panic!("a stream batch")
        };
        let seqs: Vec<_> = records
            .iter()
            .map(|r| r.sequence_number.as_deref())
            .collect();
        assert_eq!(seqs, [Some("1"), Some("2")]);
        assert!(records.iter().all(|r| r.change.is_some()));
    }

    #[test]
    fn a_malformed_record_is_rejected_alone() {
        let payload = json!({"Records": [
            {"eventID": "1", "eventName": "REMOVE", "awsRegion": "r", "dynamodb": {
                "SequenceNumber": "1", "SizeBytes": 1, "Keys": {"pk": {"S": "a"}, "sk": {"S": "INDEX#i"}}}},
            {"eventID": "2", "eventName": 7, "awsRegion": "r", "dynamodb": {"SequenceNumber": "2",
                "SizeBytes": 1}}
        ]});
        let Payload::StreamBatch(records) = Payload::parse(&raw(payload), "D").unwrap() else {
            panic!("a stream batch")
        };
        assert!(records[0].change.is_some());
        assert!(
            matches!(&records[1].outcome, Outcome::Rejected(r) if r.contains("eventName")),
            "{:?}",
            records[1].outcome
        );
        assert_eq!(records[1].sequence_number.as_deref(), Some("2"));
    }

    #[test]
    fn anything_else_says_what_is_accepted() {
        for payload in [
            json!([]),
            json!({"hello": 1}),
            json!({"Records": 5}),
            json!("x"),
        ] {
            let err = Payload::parse(&raw(payload), "D").unwrap_err().to_string();
            assert!(err.contains("{\"Records\": [...]}"), "{err}");
            assert!(err.contains("system_account_id"), "{err}");
            for mode in ["reexport", "verify", "backfill", "reconcile"] {
                assert!(err.contains(&format!("\"{mode}\"")), "{mode}: {err}");
            }
        }
    }
}
