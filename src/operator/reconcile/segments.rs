//! The reconcile of the whole fleet, or of one account, in pieces that each fit well inside
//! one invocation, whatever the fleet's size (docs/contract.md, "Reconcile"). A pass goes over everything twice,
//! holding one page at a time:
//! 1. **KV against the table.** Each namespace is listed in key order, 1,000 keys a request.
//!    A key whose table record is gone is orphaned (or protected by an alias); a key the
//!    exporter did not write is foreign.
//! 2. **The table against KV.** The table is read page by page (an index's records kept
//!    together), planned as a re-export, and each implied key's digest compared with what KV
//!    holds (read in bulk, 100 keys a request): in sync, missing or stale.
//! 3. **The ledger against the table**, in a whole-fleet repair: the record of each index the
//!    table no longer has is marked, and taken out as the stream removes an index once the
//!    mark is ripe.
//!
//! Each key is counted once: implied keys by the table step, the others by the listing.
//!
//! Here: the pass's position and token, one invocation's share of it, the repair and the
//! answer; step 1 in `segments/listed.rs`, step 2 in `segments/implied.rs`, step 3 in
//! `segments/ledger.rs`.

use std::time::Duration;

use crate::domain::TableKey;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::{failed, hand_on, log_stop, piece_size, Answer, Found, ReconcileRequest};
use super::{Repaired, Requests, NAMESPACES};
use crate::domain::{IndexRef, IndexRefs};
use crate::operator::classify::{self, Drift};
use crate::operator::{decode_token, encode_token, OperatorError};
use crate::pipeline::exporter::{Exporter, Prepared};
use crate::ports::Ports;

mod implied;
mod ledger;
mod listed;

/// Table records compared at once; an index's records are kept together (`pipeline/exporter/runs.rs`).
const CHUNK_RECORDS: usize = 2_000;
const TABLE_PAGE: usize = 1_000;
/// The table step.
const TABLE_STEP: usize = NAMESPACES.len();
/// The ledger step, and the ledger's records it reads a piece.
const LEDGER_STEP: usize = TABLE_STEP + 1;
const LEDGER_PAGE: usize = 1_000;

/// Where a pass goes on: listing namespace `step` (from `cursor`), or, at
/// [`TABLE_STEP`], reading the table after `table_at`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Position {
    step: usize,
    #[serde(default)]
    cursor: Option<String>,
    #[serde(default)]
    table_at: Option<TableKey>,
    /// Where the ledger step goes on (the ledger's cursor).
    #[serde(default)]
    ledger_at: Option<String>,
    /// How many times pieces were halved because one ran out of time (for the rest of the
    /// pass: a piece size that fits is kept).
    #[serde(default)]
    shrink: u32,
}

impl Position {
    fn step_name(&self) -> &'static str {
        match self.step {
            TABLE_STEP => "table",
            LEDGER_STEP => "ledger",
            0 => "listing settings",
            _ => "listing query configs",
        }
    }
}

pub(super) async fn run<P: Ports>(
    exporter: &Exporter<P>,
    request: &ReconcileRequest,
    deadline: Instant,
) -> Result<Answer, OperatorError> {
    let mut position: Position = match &request.continuation_token {
        Some(token) => decode_token(&token.0)?,
        None => Position::default(),
    };
    // No invocation works past half the time it has: the rest is the next one's.
    let started = Instant::now();
    let stop_at = started + deadline.saturating_duration_since(started) / 2;
    let mut pass = Pass {
        exporter,
        request,
        account: request.system_account_id.as_ref().map(|a| a.0.as_str()),
        deadline,
        found: Found::default(),
        requests: Requests::default(),
        repaired: Repaired::default(),
    };
    let (mut slowest, mut checked, mut pieces) = (Duration::ZERO, 0, 0);
    // Only a whole-fleet repair knows every index the ledger may record.
    let last_step = match request.repair && pass.account.is_none() {
        true => LEDGER_STEP,
        false => TABLE_STEP,
    };
    let complete = loop {
        if position.step > last_step {
            break true;
        }
        let max = request.max_keys.unwrap_or(usize::MAX);
        if checked >= max {
            log_stop(position.step_name(), "max_keys reached");
            break false;
        }
        // Every run takes one piece at least (so each advances), then none it cannot finish.
        if pieces > 0 && Instant::now() + slowest * 2 >= stop_at {
            log_stop(
                position.step_name(),
                "the next piece would not fit in the time left",
            );
            break false;
        }
        let piece_started = Instant::now();
        pieces += 1;
        match pass.piece(&mut position, max - checked, stop_at).await {
            Ok(done) => checked += done,
            Err(error) => {
                let step = position.step_name();
                hand_on(error, stop_at, step, &mut position.shrink)?;
                break false;
            }
        }
        slowest = slowest.max(piece_started.elapsed());
    };
    Ok(pass.answer(complete, (!complete).then(|| encode_token(&position))))
}

/// One invocation's share of a pass.
struct Pass<'a, P: Ports> {
    exporter: &'a Exporter<P>,
    request: &'a ReconcileRequest,
    /// One account's keys only (its partition read, other accounts' keys not counted).
    account: Option<&'a str>,
    deadline: Instant,
    found: Found,
    requests: Requests,
    repaired: Repaired,
}

impl<P: Ports> Pass<'_, P> {
    /// One piece from `position` (a list page, or up to `max` table records), moving
    /// `position` past it; what it found is kept only if it finished.
    async fn piece(
        &mut self,
        position: &mut Position,
        max: usize,
        stop_at: Instant,
    ) -> Result<usize, OperatorError> {
        let found = self.found.clone();
        let done = match position.step {
            TABLE_STEP => {
                let limit = piece_size(CHUNK_RECORDS, position.shrink, 1).min(max);
                self.table_piece(position, limit, stop_at).await
            }
            LEDGER_STEP => {
                let limit = piece_size(LEDGER_PAGE, position.shrink, 10);
                self.ledger_piece(position, limit).await
            }
            _ => {
                let size = piece_size(self.request.page_size as usize, position.shrink, 10);
                self.list_page(position, size as u32).await
            }
        };
        if done.is_err() {
            self.found = found;
        }
        done
    }

    /// Adds to the ledger what these indexes' references lack; `lacked` is the warning's line
    /// when something was.
    async fn add_lacking_references(
        &self,
        refs: Vec<(IndexRef, IndexRefs)>,
        lacked: &str,
    ) -> Result<(), OperatorError> {
        let added = self.exporter.add_references(&refs, false, self.deadline);
        let added = added.await.map_err(failed)?;
        if added > 0 {
            tracing::warn!(added, "{lacked}");
        }
        Ok(())
    }

    /// Counts what a piece found and repairs it (in a dry run, counts what it would repair).
    async fn settle(
        &mut self,
        prepared: Option<Prepared>,
        drift: Drift,
    ) -> Result<(), OperatorError> {
        for (key, compared) in &drift.keys {
            self.found.add(key, compared.class);
        }
        if !self.request.repair {
            return Ok(());
        }
        let repair = classify::repair(
            self.exporter,
            prepared,
            &drift,
            self.request.dry_run,
            self.deadline,
        );
        let Some(report) = repair.await else {
            return Ok(());
        };
        self.requests.kv_repair += report.kv_requests;
        self.repaired.written += report.written.len();
        self.repaired.deleted += report.deleted.len();
        match report.first_failure() {
            Some(reason) => Err(failed(format!("repair did not finish: {reason}"))),
            None => Ok(()),
        }
    }

    fn answer(self, complete: bool, continuation_token: Option<String>) -> Answer {
        let request = self.request;
        let repaired = request.repair.then_some(self.repaired);
        Answer {
            mode: "reconcile",
            system_account_id: self.account.map(str::to_owned),
            repair: request.repair,
            dry_run: request.dry_run,
            deep: request.deep,
            counts: self.found.counts,
            samples: self.found.samples,
            would_repair: repaired.filter(|_| request.dry_run),
            repaired: repaired.filter(|_| !request.dry_run),
            requests: self.requests,
            complete,
            continuation_token,
        }
    }
}
