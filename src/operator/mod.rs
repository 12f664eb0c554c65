//! What operators invoke by hand (docs/operations.md, "Manual modes"): re-export one index or
//! preview it ([`reexport`]), check an index for drift and repair it ([`verify`]), and export
//! the whole table page by page ([`backfill`]). Every mode reads the table and goes through
//! the exporter core's methods: one planner, one KV client.
//!
//! Requests are typed: unknown fields are refused, and every error names its field.

pub mod backfill;
mod classify;
mod fields;
mod orphans;
pub mod reconcile;
pub mod reexport;
pub mod verify;

use crate::domain::TableKey;
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::time::Instant;

use crate::domain::validate::cut;
use crate::domain::Scope;
use crate::domain::{ChangeRecord, IndexRef, KvKey};
use crate::pipeline::exporter::{AddReferences, Exporter, Prepared, Run, Runs, BEFORE_MIGRATION};
use crate::ports::Ports;
use crate::report::Outcome;

pub use backfill::BackfillRequest;
pub use fields::NonEmpty;
use fields::{decode_token, encode_token, flag, typed};
pub use reconcile::ReconcileRequest;
pub use reexport::ReexportRequest;
pub use verify::VerifyRequest;

/// Why an operator request was refused or did not finish.
#[derive(Clone, PartialEq, thiserror::Error)]
pub enum OperatorError {
    #[error("invalid manual payload: `{field}` {problem}")]
    InvalidField { field: String, problem: String },
    // The payload's names are quoted cut: a 5 MB `system_account_id` is not echoed whole.
    #[error("no settings record for account {}, index {}", cut(.account), cut(.index))]
    NoSuchIndex { account: String, index: String },
    #[error("{mode} of account {}, index {} failed: {reason}", cut(.account), cut(.index))]
    ExportFailed {
        /// The operator that failed: `re-export`, `verify` or `verify repair`.
        mode: &'static str,
        account: String,
        index: String,
        reason: String,
    },
    #[error("backfill stopped: {reason}")]
    BackfillFailed { reason: String },
    #[error("reconcile stopped: {reason}")]
    ReconcileFailed { reason: String },
    /// Every mode but the migration's backfill asks the ledger who refers to what.
    #[error("{0}")]
    BeforeMigration(&'static str),
}

/// As its message, cut: lambda_runtime logs a handler's error with `{:?}`, and a payload's
/// names may be megabytes.
impl std::fmt::Debug for OperatorError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OperatorError({self})")
    }
}

impl OperatorError {
    /// Names and messages quote the payload: a huge field is cut, not echoed whole.
    pub(crate) fn invalid(field: impl AsRef<str>, problem: impl AsRef<str>) -> Self {
        OperatorError::InvalidField {
            field: cut(field.as_ref()).into_owned(),
            problem: cut(problem.as_ref()).into_owned(),
        }
    }

    fn export_failed(target: &IndexTarget, reason: impl ToString) -> Self {
        let index = &target.index;
        OperatorError::ExportFailed {
            mode: target.mode,
            account: index.account.clone(),
            index: index.name.clone(),
            reason: reason.to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum OperatorRequest {
    Reexport(ReexportRequest),
    Verify(VerifyRequest),
    Backfill(BackfillRequest),
    Reconcile(ReconcileRequest),
}

impl OperatorRequest {
    /// A payload without `mode` but naming an index is a re-export (the original contract).
    pub fn is_operator_payload(fields: &Map<String, Value>) -> bool {
        ["mode", "system_account_id", "index_name"]
            .iter()
            .any(|name| fields.contains_key(*name))
    }

    pub fn parse(mut fields: Map<String, Value>) -> Result<Self, OperatorError> {
        let mode = match fields.remove("mode") {
            None | Some(Value::Null) => "reexport".to_owned(),
            Some(Value::String(mode)) => mode,
            Some(_) => return Err(OperatorError::invalid("mode", "must be a string")),
        };
        let fields = Value::Object(fields);
        match mode.as_str() {
            "reexport" => typed(fields).map(OperatorRequest::Reexport),
            "verify" => typed(fields).map(OperatorRequest::Verify),
            "backfill" => typed(fields).map(OperatorRequest::Backfill),
            "reconcile" => typed(fields).map(OperatorRequest::Reconcile),
            _ => Err(OperatorError::invalid(
                "mode",
                "must be reexport, verify, backfill or reconcile",
            )),
        }
    }

    pub async fn run<P: Ports>(
        self,
        exporter: &Exporter<P>,
        deadline: Instant,
    ) -> Result<Value, OperatorError> {
        // Every mode but the backfill (the migration's first step) asks the ledger who aliases
        // or claims what: before the migration it would not know (a protected key orphaned).
        if !matches!(self, OperatorRequest::Backfill(_)) && !exporter.migrated(deadline).await {
            return Err(OperatorError::BeforeMigration(BEFORE_MIGRATION));
        }
        // Each mode's future is boxed: they are large (the whole-fleet modes most), and a
        // stream batch's future, which holds this one's place, should not carry them.
        let answer = match self {
            OperatorRequest::Reexport(request) => {
                to_value(Box::pin(reexport::run(exporter, &request, deadline)).await?)
            }
            OperatorRequest::Verify(request) => {
                to_value(Box::pin(verify::run(exporter, &request, deadline)).await?)
            }
            OperatorRequest::Backfill(request) => {
                to_value(Box::pin(backfill::run(exporter, &request, deadline)).await?)
            }
            OperatorRequest::Reconcile(request) if request.scheduled => {
                let run = reconcile::scheduled::run(exporter, &request, deadline);
                to_value(Box::pin(run).await?)
            }
            OperatorRequest::Reconcile(request) => {
                to_value(Box::pin(reconcile::run(exporter, &request, deadline)).await?)
            }
        };
        Ok(answer)
    }
}

fn to_value(answer: impl Serialize) -> Value {
    serde_json::to_value(answer).expect("answers serialize")
}

/// One index, and whether its query-config overrides come along.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexTarget {
    /// What is done to it, as errors name it: `re-export`, `verify` or `verify repair`.
    pub mode: &'static str,
    pub index: IndexRef,
    pub include_query_configs: bool,
}

impl IndexTarget {
    fn new(
        mode: &'static str,
        account: &NonEmpty,
        name: &NonEmpty,
        include_query_configs: bool,
    ) -> Self {
        Self {
            mode,
            index: IndexRef::new(&account.0, &name.0),
            include_query_configs,
        }
    }
}

/// Query configs in one piece of a re-export or verify: an index with more goes on in pieces,
/// each within an invocation, with a token.
pub const PIECE_RECORDS: usize = 5_000;

/// One index's records in pieces, each prepared (planned, nothing sent): its settings record
/// and a run of its query configs first, then the rest of them. A re-export and a verify walk
/// it the same way; they differ in what they do with a piece.
struct Pieces<'a, P: Ports> {
    exporter: &'a Exporter<P>,
    target: &'a IndexTarget,
    /// Where the next piece begins (`None`: with the settings record).
    start: Option<TableKey>,
    /// Whether a piece was taken: the next one is taken only when there is more, in time.
    taken: bool,
    limit: usize,
    /// One piece per invocation (the request said how large), else none begun past this.
    one_piece: bool,
    stop_at: Instant,
    deadline: Instant,
}

/// A piece, and where it stands in the index's records.
struct PieceAt {
    prepared: Prepared,
    /// It holds the settings record.
    first: bool,
    /// It holds the last query config.
    last: bool,
}

impl<'a, P: Ports> Pieces<'a, P> {
    fn new(
        exporter: &'a Exporter<P>,
        target: &'a IndexTarget,
        token: Option<&NonEmpty>,
        max_records: Option<usize>,
        deadline: Instant,
    ) -> Result<Self, OperatorError> {
        let start = token.map(|token| decode_token(&token.0)).transpose()?;
        // No invocation works past half the time it has: the rest goes on with a token.
        let began = Instant::now();
        Ok(Self {
            exporter,
            target,
            start,
            taken: false,
            limit: max_records.unwrap_or(PIECE_RECORDS).max(1),
            one_piece: max_records.is_some(),
            stop_at: began + deadline.saturating_duration_since(began) / 2,
            deadline,
        })
    }

    /// The next piece, read and prepared (`None`: the walk ended, or stops here): the index's
    /// records as a run of the table (`Runs`, the index's scope), its settings record alone or
    /// with a page of its query configs.
    async fn next(&mut self) -> Result<Option<PieceAt>, OperatorError> {
        let stop = self.one_piece || Instant::now() >= self.stop_at;
        if self.taken && (self.start.is_none() || stop) {
            return Ok(None);
        }
        self.taken = true;
        let (exporter, target, deadline) = (self.exporter, self.target, self.deadline);
        let (index, with_configs) = (&target.index, target.include_query_configs);
        let first = self.start.is_none();
        let size = match with_configs {
            true => self.limit + usize::from(first),
            false => 1,
        };
        let mut runs = Runs::new(self.start.take());
        let add = AddReferences::None;
        let scope = Scope::Index(index);
        let read = runs.read(exporter, scope, size as i32, with_configs, add, deadline);
        read.await
            .map_err(|e| OperatorError::export_failed(target, e))?;
        let last = !with_configs || runs.ended();
        runs.cut();
        let closed = runs.take_closed();
        if first && !closed.settings.contains(index) {
            let (account, index) = (index.account.clone(), index.name.clone());
            return Err(OperatorError::NoSuchIndex { account, index });
        }
        let records = closed.whole.into_iter().chain(closed.queried).collect();
        // A piece without every query config gets its filter from a Query of the table.
        let run = Run::OPERATOR.holding_overrides(first && last);
        let mut prepared = exporter.prepare(records, run, deadline).await;
        // The first piece, which has the settings record, owns the index's filter.
        if !first {
            let filter = crate::domain::qfilter::filter_key(index);
            prepared.desired.keys.remove(&filter);
        }
        self.start = closed.at.filter(|_| !last);
        Ok(Some(PieceAt {
            prepared,
            first,
            last,
        }))
    }

    /// Where the walk goes on (`None`: it reached the last piece).
    fn token(&self) -> Option<String> {
        self.start.as_ref().map(encode_token)
    }
}

/// The settings record (the first) must be exportable, and nothing may be waiting on a failed
/// lookup or write: the error names every reason (each key that could not be written or
/// checked). Asked of a prepared batch, and of its report once sent.
fn ensure_done(target: &IndexTarget, records: &[ChangeRecord]) -> Result<(), OperatorError> {
    let mut outcomes = records.iter().map(|record| &record.outcome);
    let first = outcomes.next();
    if let Some(Outcome::Rejected(reason)) = first {
        return Err(OperatorError::export_failed(target, reason));
    }
    let mut reasons: Vec<&str> = Vec::new();
    for outcome in first.into_iter().chain(outcomes) {
        if let Outcome::Failed(reason) = outcome {
            for reason in reason.split("; ") {
                if !reasons.contains(&reason) {
                    reasons.push(reason);
                }
            }
        }
    }
    match reasons.is_empty() {
        true => Ok(()),
        false => Err(OperatorError::export_failed(target, reasons.join("; "))),
    }
}

/// A rejected record, as answers list it.
#[derive(Debug, Serialize)]
pub struct Rejected {
    pub reason: String,
}

fn rejected(records: &[ChangeRecord]) -> Vec<Rejected> {
    (records.iter())
        .filter_map(|record| match &record.outcome {
            Outcome::Rejected(reason) => Some(Rejected {
                reason: reason.clone(),
            }),
            _ => None,
        })
        .collect()
}

/// Keys written and deleted, by name.
#[derive(Debug, Default, Serialize)]
pub struct KeyChanges {
    pub written: Vec<String>,
    pub deleted: Vec<String>,
}

impl KeyChanges {
    fn add(&mut self, more: KeyChanges) {
        self.written.extend(more.written);
        self.deleted.extend(more.deleted);
    }

    fn of(written: &[KvKey], deleted: &[KvKey]) -> Self {
        let names = |keys: &[KvKey]| keys.iter().map(|k| k.key.clone()).collect();
        Self {
            written: names(written),
            deleted: names(deleted),
        }
    }
}

/// A KV value as an operator may see it: the API key masked.
pub fn masked(value: &str) -> Value {
    let mut value: Value = serde_json::from_str(value).unwrap_or(Value::Null);
    if let Some(key) = value.get_mut("marqo_api_key").filter(|k| k.is_string()) {
        *key = Value::String("<masked>".into());
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(payload: Value) -> Result<OperatorRequest, OperatorError> {
        let Value::Object(fields) = payload else {
            panic!("an object")
        };
        OperatorRequest::parse(fields)
    }

    #[test]
    fn manual_payloads_are_checked_field_by_field() {
        let ok = parse(json!({"system_account_id": "a", "index_name": "i"})).unwrap();
        let OperatorRequest::Reexport(request) = ok else {
            panic!("a re-export")
        };
        assert_eq!(request.target().index, IndexRef::new("a", "i"));
        assert!(!request.target().include_query_configs && !request.dry_run);
        let err = parse(json!({"system_account_id": "a"})).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid manual payload: `index_name` is required"
        );
        let err = parse(json!({"system_account_id": 3, "index_name": "i"})).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid manual payload: `system_account_id` must be a string"
        );
        let err = parse(
            json!({"system_account_id": "a", "index_name": "i", "include_query_configs": "yes"}),
        )
        .unwrap_err();
        assert!(err.to_string().contains("include_query_configs"));
    }

    #[test]
    fn operator_modes_are_parsed_and_typos_are_named() {
        let verify = parse(json!({"mode": "verify", "system_account_id": "a",
            "index_name": "i", "repair": true}))
        .unwrap();
        assert!(matches!(
            verify,
            OperatorRequest::Verify(VerifyRequest { repair: true, .. })
        ));
        let backfill = parse(json!({"mode": "backfill", "page_size": 5})).unwrap();
        assert!(matches!(
            backfill,
            OperatorRequest::Backfill(BackfillRequest {
                page_size: 5,
                system_account_id: None,
                ..
            })
        ));
        let typo = parse(json!({"system_account_id": "a", "index_name": "i",
            "include_query_config": true}))
        .unwrap_err();
        assert!(
            typo.to_string()
                .starts_with("invalid manual payload: `include_query_config` is not a field"),
            "{typo}"
        );
        let mode = parse(json!({"mode": "sync"})).unwrap_err();
        assert_eq!(
            mode.to_string(),
            "invalid manual payload: `mode` must be reexport, verify, backfill or reconcile"
        );
        let size = parse(json!({"mode": "backfill", "page_size": 0})).unwrap_err();
        assert!(
            size.to_string()
                .contains("`page_size` must be a whole number from 1 to 1000"),
            "{size}"
        );
    }

    #[test]
    fn a_huge_field_is_cut_in_the_error() {
        let huge = "x".repeat(5_000_000);
        for payload in [
            json!({"system_account_id": "a", "index_name": "i", "include_query_configs": huge}),
            json!({"system_account_id": "a", "index_name": "i", huge.clone(): true}),
            json!({"mode": "verify", "system_account_id": "a", "index_name": 1, "x": huge}),
        ] {
            let error = parse(payload).unwrap_err().to_string();
            assert!(
                error.len() < 1_000,
                "{} bytes: {}",
                error.len(),
                &error[..300]
            );
        }
        let named = parse(json!({"system_account_id": "a", "index_name": "i", huge: 1}));
        assert!(named.unwrap_err().to_string().contains("(5000000 bytes)"));
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
    fn an_error_about_a_huge_name_quotes_it_cut() {
        let huge = "a".repeat(5_000_000);
        let errors = [
            OperatorError::NoSuchIndex {
                account: huge.clone(),
                index: huge.clone(),
            },
            OperatorError::ExportFailed {
                mode: "re-export",
                account: huge.clone(),
                index: huge.clone(),
                reason: "KV down".into(),
            },
        ];
        for error in errors {
            let message = error.to_string();
            assert!(message.len() < 1_000, "{} bytes", message.len());
            assert!(format!("{error:?}").len() < 1_100, "logged as Debug");
            assert!(
                message.contains("5000000 bytes") || message.contains("5,000,000"),
                "{message}"
            );
        }
    }
}
