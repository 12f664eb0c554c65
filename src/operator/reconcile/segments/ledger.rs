//! Step 3 of a pass that repairs the whole fleet: the ledger against the table. The ledger's
//! records of indexes read page by page; for each index the table no longer has, its removal
//! is exported again as the stream exports a REMOVE record (a replay of one is always safe):
//! the keys the ledger records for it given up, checked, and its record taken out unless a
//! writer recorded it since, or an alias keeps it. So the ledger stays bounded by the live
//! fleet whatever the stream could not settle: a removal whose shrink another writer's intent
//! refused, an index an alias kept until the alias went, an index removed before removals took
//! their records out (docs/contract.md, "References in the ledger").

use std::collections::BTreeSet;

use super::{Pass, Position};
use crate::operator::reconcile::failed;
use crate::operator::OperatorError;
use crate::pipeline::records::ChangeRecord;
use crate::ports::Ports;
use crate::report::Outcome;

impl<P: Ports> Pass<'_, P> {
    /// One page of the ledger's records (about `limit` items), the removed ones settled.
    pub(super) async fn ledger_piece(
        &mut self,
        position: &mut Position,
        limit: usize,
    ) -> Result<usize, OperatorError> {
        let (exporter, deadline) = (self.exporter, self.deadline);
        let at = position.ledger_at.as_deref();
        let page = exporter.recorded_removed(at, limit, deadline);
        let (read, removed, next) = page.await.map_err(failed)?;
        self.requests.ledger_pages += 1;
        let removals: Vec<ChangeRecord> = (removed.into_iter())
            .map(|(index, _)| ChangeRecord::removal(index, BTreeSet::new(), false))
            .collect();
        self.repaired.ledger_records += removals.len();
        if !self.request.dry_run && !removals.is_empty() {
            let report = exporter.export_stream(removals, deadline).await;
            let failed_reason = report.records.iter().find_map(|r| match &r.outcome {
                Outcome::Failed(reason) => Some(reason),
                _ => None,
            });
            if let Some(reason) = failed_reason {
                return Err(failed(format!("a removal did not finish: {reason}")));
            }
        }
        match next {
            Some(next) => position.ledger_at = Some(next),
            None => position.step += 1,
        }
        Ok(read)
    }
}
