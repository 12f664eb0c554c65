//! `{"mode": "backfill", ...}`: exports every index-settings record (and query configs when
//! asked), page by page, through the stream path's core. Stops before the deadline, after
//! `max_records`, or at a page with failures (to be retried), and answers a token to resume from.

use std::time::Duration;

use crate::domain::net::{self, Protection};
use crate::domain::{Scope, TableKey, TableSpan};
use serde::{Deserialize, Deserializer, Serialize};
use tokio::time::Instant;

use super::fields::{count, decode_token, encode_token, flag, max_records};
use super::{NonEmpty, OperatorError};
use crate::domain::IndexRef;
use crate::pipeline::desired::Want;
use crate::pipeline::exporter::{AddReferences, Exporter, Prepared, Run, Runs};
use crate::pipeline::records::ChangeRecord;
use crate::ports::{PortError, Ports};
use crate::report::{BatchReport, Outcome};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackfillRequest {
    /// Only this account's records, when given.
    #[serde(default)]
    pub system_account_id: Option<NonEmpty>,
    #[serde(default, deserialize_with = "flag")]
    pub include_query_configs: bool,
    #[serde(default, deserialize_with = "flag")]
    pub dry_run: bool,
    /// Where a previous invocation stopped.
    #[serde(default)]
    pub continuation_token: Option<NonEmpty>,
    /// Items read from the table per page.
    #[serde(default = "default_page_size", deserialize_with = "page_size")]
    pub page_size: i32,
    /// Records sent per export batch (pages are gathered until then): bulk requests close to
    /// Cloudflare's 10,000 pairs spend the shared request budget sparingly.
    #[serde(default = "default_batch_records", deserialize_with = "batch_records")]
    pub batch_records: usize,
    /// Stop after the page that reaches this many items, with a continuation token.
    #[serde(default, deserialize_with = "max_records")]
    pub max_records: Option<usize>,
}

fn default_page_size() -> i32 {
    100
}

/// About 8,000 pairs: an index's two keys, or an override's one, each.
fn default_batch_records() -> usize {
    4_000
}

fn batch_records<'de, D: Deserializer<'de>>(deserializer: D) -> Result<usize, D::Error> {
    Ok(count(deserializer, 1..=5_000)?.map_or(default_batch_records(), |n| n as usize))
}

fn page_size<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i32, D::Error> {
    Ok(count(deserializer, 1..=1000)?.map_or(default_page_size(), |n| n as i32))
}

/// A record that did not make it, and why.
#[derive(Debug, Serialize)]
pub struct RecordProblem {
    pub system_account_id: Option<String>,
    pub index_name: Option<String>,
    pub reason: String,
}

#[derive(Debug, Serialize)]
pub struct Answer {
    pub mode: &'static str,
    pub dry_run: bool,
    pub system_account_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exported: Option<usize>,
    /// A dry run counts what it would export.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub would_export: Option<usize>,
    pub skipped: usize,
    pub rejected: usize,
    pub failed: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keys_written: Option<usize>,
    /// A dry run counts what it would write.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keys_to_write: Option<usize>,
    pub rejected_records: Vec<RecordProblem>,
    pub failed_records: Vec<RecordProblem>,
    pub complete: bool,
    pub continuation_token: Option<String>,
}

#[derive(Default)]
struct Tally {
    items: usize,
    exported: usize,
    skipped: usize,
    rejected: Vec<RecordProblem>,
    failed: Vec<RecordProblem>,
    keys_written: usize,
}

impl Tally {
    /// Counts a batch's records; whether any failed (the backfill then stops).
    fn add(&mut self, report: &BatchReport) -> bool {
        self.keys_written += report.written.len();
        for record in &report.records {
            self.count(record.index.as_ref(), &record.outcome);
        }
        report
            .records
            .iter()
            .any(|r| matches!(r.outcome, Outcome::Failed(_)))
    }

    fn count(&mut self, index: Option<&IndexRef>, outcome: &Outcome) {
        let problem = |reason: &str| RecordProblem {
            system_account_id: index.map(|i| i.account.clone()),
            index_name: index.map(|i| i.name.clone()),
            reason: reason.to_owned(),
        };
        match outcome {
            Outcome::Exported | Outcome::Kept { .. } => self.exported += 1,
            Outcome::Skipped(_) => self.skipped += 1,
            Outcome::Rejected(reason) => self.rejected.push(problem(reason)),
            Outcome::Failed(reason) => self.failed.push(problem(reason)),
        }
    }
}

/// Exports (or, in a dry run, plans) one batch, and logs it; its check reads `span` again when
/// the batch was read from it whole.
async fn send<P: Ports>(
    exporter: &Exporter<P>,
    dry_run: bool,
    (records, span): (Vec<ChangeRecord>, Option<TableSpan>),
    run: Run,
    deadline: Instant,
) -> BatchReport {
    let mut prepared = exporter.prepare(records, run, deadline).await;
    let report = match dry_run {
        true => dry_report(prepared),
        false => {
            if let Some(span) = span {
                prepared.read_from(span);
            }
            exporter.apply(prepared, deadline).await
        }
    };
    match dry_run {
        true => report.log_dry_run(),
        false => report.log(),
    }
    report
}

fn backfill_failed(error: PortError) -> OperatorError {
    OperatorError::BackfillFailed {
        reason: error.to_string(),
    }
}

/// Where a backfill's token says it goes on: after a key, or from the beginning (an empty key,
/// the token of a stop before the first page).
fn resume_at(token: &str) -> Result<Option<TableKey>, OperatorError> {
    let key: serde_json::Map<String, serde_json::Value> = decode_token(token)?;
    match key.is_empty() {
        true => Ok(None),
        false => decode_token(token).map(Some),
    }
}

pub async fn run<P: Ports>(
    exporter: &Exporter<P>,
    request: &BackfillRequest,
    deadline: Instant,
) -> Result<Answer, OperatorError> {
    let start = match &request.continuation_token {
        Some(token) => resume_at(&token.0)?,
        None => None,
    };
    let account = request.system_account_id.as_ref().map(|a| a.0.as_str());
    let mut pass = Pass {
        exporter,
        request,
        deadline,
        tally: Tally::default(),
        runs: Runs::new(start.clone()),
        resume: start,
        sent_any: false,
    };
    // No invocation works past half the time it has (the rest goes on with a token): another
    // page is read only with room for it and the slowest send (closed runs go out before a
    // stop) in that half, and for the slowest page twice over before the deadline.
    let began = Instant::now();
    let stop_at = began + deadline.saturating_duration_since(began) / 2;
    let (mut slowest_page, mut slowest_send) = (Duration::from_secs(2), Duration::ZERO);
    let complete = loop {
        let now = Instant::now();
        let out_of_time = now + slowest_page * 2 + slowest_send >= deadline
            || now + slowest_page + slowest_send >= stop_at;
        if out_of_time
            || request
                .max_records
                .is_some_and(|max| pass.tally.items >= max)
        {
            pass.stop().await;
            break false;
        }
        let page_started = Instant::now();
        pass.read(account).await?;
        let last_page = pass.runs.ended();
        slowest_page = slowest_page.max(page_started.elapsed());
        if pass.runs.closed() >= request.batch_records || last_page {
            let send_started = Instant::now();
            // A failure stops here: the token still points before this batch.
            if !pass.flush().await {
                break false;
            }
            slowest_send = slowest_send.max(send_started.elapsed());
        }
        if last_page {
            break true;
        }
    };
    // Every index's references are in the ledger now: batches stop scanning the table.
    let full = complete && account.is_none() && !request.dry_run && pass.tally.failed.is_empty();
    if full {
        if let Err(e) = exporter.mark_references_complete(deadline).await {
            tracing::warn!(error = %e, "references not marked complete; batches still scan");
        }
    }
    Ok(pass.answer(account, complete))
}

/// One invocation's backfill: what it sent, and the runs it read and holds.
struct Pass<'a, P: Ports> {
    exporter: &'a Exporter<P>,
    request: &'a BackfillRequest,
    deadline: Instant,
    tally: Tally,
    runs: Runs,
    /// The key of the last record sent: where a resumed backfill starts.
    resume: Option<TableKey>,
    /// Whether this invocation sent anything.
    sent_any: bool,
}

impl<P: Ports> Pass<'_, P> {
    /// Reads the table's next page into the runs, what its settings items name added to the
    /// ledger first, each counted as an intent (the migration to sets of referrers, and the
    /// ledger's own repair): a stream's shrink that read the ledger before leaves it, and one
    /// that read after read the table after this page too.
    async fn read(&mut self, account: Option<&str>) -> Result<(), OperatorError> {
        let request = self.request;
        let (size, overrides) = (request.page_size, request.include_query_configs);
        let add = match request.dry_run {
            true => AddReferences::None,
            false if net::off(Protection::BackfillIntents) => AddReferences::Lacking,
            false => AddReferences::Counted,
        };
        let scope = Scope::of(account);
        let read = (self.runs).read(self.exporter, scope, size, overrides, add, self.deadline);
        let (records, _) = read.await.map_err(backfill_failed)?;
        self.tally.items += records;
        Ok(())
    }

    /// Sends the runs closed so far; whether every record went through (the backfill goes
    /// on). Runs held whole build their filters from their own records (with query configs).
    async fn flush(&mut self) -> bool {
        let closed = self.runs.take_closed();
        if closed.len() == 0 {
            return true;
        }
        let request = self.request;
        let whole = Run::BACKFILL.holding_overrides(request.include_query_configs);
        let queried = Run::BACKFILL.holding_overrides(false);
        // Read again by the check as it was read (the queried runs: each on its own).
        let span = closed.at.clone().map(|through| TableSpan {
            account: request.system_account_id.as_ref().map(|a| a.0.clone()),
            after: self.resume.clone(),
            through,
            records: closed.len(),
        });
        let batches = [
            ((closed.whole, span), whole),
            ((closed.queried, None), queried),
        ];
        for (batch, run) in batches {
            if batch.0.is_empty() {
                continue;
            }
            let report = send(self.exporter, request.dry_run, batch, run, self.deadline).await;
            if self.tally.add(&report) {
                return false;
            }
        }
        self.sent_any = true;
        self.resume = closed.at;
        true
    }

    /// Before stopping: the closed runs go out and, when nothing was sent yet, the run still
    /// held too (its filter from a Query): every invocation advances the backfill.
    async fn stop(&mut self) {
        if self.flush().await && !self.sent_any && self.runs.holds_any() {
            self.runs.cut();
            self.flush().await;
        }
    }

    fn answer(self, account: Option<&str>, complete: bool) -> Answer {
        let (tally, dry_run) = (self.tally, self.request.dry_run);
        Answer {
            mode: "backfill",
            dry_run,
            system_account_id: account.map(str::to_owned),
            exported: (!dry_run).then_some(tally.exported),
            would_export: dry_run.then_some(tally.exported),
            skipped: tally.skipped,
            rejected: tally.rejected.len(),
            failed: tally.failed.len(),
            keys_written: (!dry_run).then_some(tally.keys_written),
            keys_to_write: dry_run.then_some(tally.keys_written),
            rejected_records: tally.rejected,
            failed_records: tally.failed,
            complete,
            continuation_token: (!complete).then(|| match &self.resume {
                Some(key) => encode_token(key),
                None => encode_token(&serde_json::Map::new()),
            }),
        }
    }
}

/// What a dry run's page would have done, as a report (nothing was sent).
fn dry_report(prepared: Prepared) -> BatchReport {
    let keys = prepared.desired.keys.into_iter();
    let written = keys.filter(|(_, wanted)| matches!(wanted.want, Want::Put(_)));
    BatchReport {
        written: written.map(|(key, _)| key).collect(),
        api_keys: prepared.api_keys,
        records: prepared.records,
        ..BatchReport::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tokens_round_trip_and_bad_ones_are_named() {
        let start = TableKey::new("a", "INDEX#p");
        assert_eq!(
            resume_at(&encode_token(&start)).unwrap(),
            Some(start.clone())
        );
        // Tokens given out in DynamoDB's key format, as before, go on where they say.
        let given = json!({"pk": {"S": "a"}, "sk": {"S": "INDEX#p"}});
        assert_eq!(resume_at(&encode_token(&given)).unwrap(), Some(start));
        let before_the_first_page = encode_token(&serde_json::Map::new());
        assert_eq!(resume_at(&before_the_first_page).unwrap(), None);
        for bad in ["not-a-token!".into(), encode_token(&json!({"pk": "a"}))] {
            let error = resume_at(&bad).unwrap_err();
            assert!(error.to_string().contains("continuation_token"), "{error}");
        }
    }
}
