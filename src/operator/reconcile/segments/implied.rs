//! Step 2 of a pass: the table against KV. The table read in pieces (an index's records kept
//! together), each planned as a re-export, and every implied key's digest compared with what
//! KV holds (read in bulk).

use tokio::time::Instant;

use crate::domain::Scope;

use super::{Pass, Position, TABLE_PAGE};
use crate::operator::classify;
use crate::operator::reconcile::failed;
use crate::operator::OperatorError;
use crate::pipeline::exporter::{AddReferences, Run, Runs};
use crate::pipeline::records::ChangeRecord;
use crate::ports::Ports;

impl<P: Ports> Pass<'_, P> {
    /// The table's records after `table_at`, until `limit` records (an index's kept whole) or
    /// the table's end, compared with KV.
    pub(super) async fn table_piece(
        &mut self,
        position: &mut Position,
        limit: usize,
        stop_at: Instant,
    ) -> Result<usize, OperatorError> {
        let mut runs = Runs::new(position.table_at.clone());
        let end = loop {
            let size = TABLE_PAGE.min(limit.max(1)) as i32;
            let add = AddReferences::Lacking;
            let scope = Scope::of(self.account);
            let read = (runs).read(self.exporter, scope, size, true, add, self.deadline);
            let (_, added) = read.await.map_err(failed)?;
            self.requests.table_pages += 1;
            if added > 0 {
                tracing::warn!(added, "the ledger lacked references the table names: added");
            }
            if runs.ended() {
                break true;
            }
            if runs.closed() >= limit || Instant::now() >= stop_at {
                break false;
            }
        };
        // The run still held is read again by the next piece.
        let closed = runs.take_closed();
        let compared = closed.len();
        self.compare_implied(closed.whole, Run::CHECK).await?;
        let run = Run::CHECK.holding_overrides(false);
        self.compare_implied(closed.queried, run).await?;
        if closed.at.is_some() {
            position.table_at = closed.at;
        }
        if end {
            position.step += 1;
        }
        Ok(compared)
    }

    /// Plans the records as a re-export would and compares each implied key with what KV
    /// holds.
    async fn compare_implied(
        &mut self,
        records: Vec<ChangeRecord>,
        run: Run,
    ) -> Result<(), OperatorError> {
        if records.is_empty() {
            return Ok(());
        }
        let (exporter, deadline) = (self.exporter, self.deadline);
        let mut prepared = exporter.prepare(records, run, deadline).await;
        // One cell's outage never stops the fleet's pass: checked next pass.
        prepared.leave_failed_unchecked();
        let drift = classify::drift(self.exporter, &prepared, self.deadline);
        let drift = drift.await.map_err(failed)?;
        self.requests.kv_bulk_get += drift.bulk_gets;
        self.settle(Some(prepared), drift).await
    }
}
