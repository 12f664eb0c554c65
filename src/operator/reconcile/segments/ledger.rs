//! Step 3 of a pass that repairs the whole fleet: the ledger against the table, so that it
//! stays bounded by the live fleet whatever the stream could not settle (a removal whose shrink
//! another writer's intent refused, an index an alias kept until the alias went, an index
//! removed before removals took their records out). Two phases, a pass or more apart
//! (docs/contract.md, "The ledger is bounded by the live fleet"):
//! 1. the record of an index the table no longer has is marked with its intents and the time;
//! 2. once the mark is ripe (older than any invocation lasts, and no intent since: every writer
//!    counts one on a marked record), the index's removal is exported again as the stream
//!    exports a REMOVE: what the ledger records for it given up, checked, and its record taken
//!    out on the same condition (an alias keeps it, as it keeps a REMOVE's).
//!
//! A mark on an index the table has again is taken off.

use super::{Pass, Position};
use crate::domain::{ChangeRecord, SweepMark};
use crate::operator::reconcile::failed;
use crate::operator::OperatorError;
use crate::ports::{epoch_seconds, Ports};

impl<P: Ports> Pass<'_, P> {
    /// One page of the ledger's records (about `limit` items): marks set or taken off, and the
    /// removals whose marks are ripe exported again.
    pub(super) async fn ledger_piece(
        &mut self,
        position: &mut Position,
        limit: usize,
    ) -> Result<usize, OperatorError> {
        let (exporter, deadline) = (self.exporter, self.deadline);
        let page = exporter.recorded(position.ledger_at.as_deref(), limit, deadline);
        let (read, found, next) = page.await.map_err(failed)?;
        self.requests.ledger_pages += 1;
        let now = epoch_seconds();
        let mut marks = Vec::new();
        let mut removals = Vec::new();
        for (index, refs, live) in found {
            match refs.sweep {
                Some(_) if live => marks.push((index, None)),
                Some(_) if refs.ripe(now) => {
                    removals.push(ChangeRecord::removal(index));
                }
                // A mark stays while no intent came since: its wait goes on (one dated ahead
                // of the clock is set again).
                Some(mark) if mark.intents == refs.intents && mark.at <= now => {}
                _ => marks.push((
                    index,
                    Some(SweepMark {
                        intents: refs.intents,
                        at: now,
                    }),
                )),
            }
        }
        self.repaired.ledger_marked += marks.iter().filter(|(_, m)| m.is_some()).count();
        self.repaired.ledger_swept += removals.len();
        if !self.request.dry_run {
            let marked = exporter.sweep_marks(&marks, deadline);
            marked.await.map_err(failed)?;
            self.sweep(removals).await?;
        }
        match next {
            Some(next) => position.ledger_at = Some(next),
            None => position.step += 1,
        }
        Ok(read)
    }

    /// The removals exported again as a stream batch; one that fails fails the piece.
    async fn sweep(&mut self, removals: Vec<ChangeRecord>) -> Result<(), OperatorError> {
        if removals.is_empty() {
            return Ok(());
        }
        let report = self.exporter.export_sweep(removals, self.deadline).await;
        self.requests.kv_repair += report.kv_requests;
        match report.first_failure() {
            Some(reason) => Err(failed(format!("a removal did not finish: {reason}"))),
            None => Ok(()),
        }
    }
}
