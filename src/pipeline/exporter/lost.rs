//! An operator's lost keys (another writer claimed them while this one wrote them: docs/contract.md,
//! "Concurrent writers"), read again from the table and written once more; one lost again, or
//! whose index cannot be read again, fails its record.

use std::collections::{BTreeSet, HashSet};

use tokio::time::Instant;

use super::{Exporter, Run};
use crate::domain::{IndexRef, KvAction, KvKey};
use crate::ports::Ports;
use crate::report::{BatchReport, Outcome};

/// Lost keys written once more: those the new read planned, and what became of them.
struct WrittenAgain {
    planned: HashSet<KvKey>,
    report: BatchReport,
}

impl<P: Ports> Exporter<P> {
    /// An operator's lost keys, written once more from a new read of their indexes. A key
    /// the new read does not imply, or that another writer claimed since, is theirs; one
    /// lost again, or whose index could not be read again, fails its record (the operator
    /// runs again, or the next reconcile pass).
    pub(super) async fn write_lost_again(&self, report: &mut BatchReport, deadline: Instant) {
        let lost = std::mem::take(&mut report.lost);
        if lost.is_empty() {
            return;
        }
        let owners: BTreeSet<IndexRef> = (lost.iter())
            .filter_map(|(_, at, owner)| {
                owner.clone().or_else(|| report.records[*at].index.clone())
            })
            .collect();
        let (again, unread) = self.read_and_write_again(owners, &lost, deadline).await;
        report.kv_requests += again.report.kv_requests;
        for (key, at, owner) in lost {
            let owner = owner.or_else(|| report.records[at].index.clone());
            let outcome = &mut report.records[at].outcome;
            let unread = owner.is_none_or(|owner| unread.contains(&owner));
            if again.report.written.contains(&key) {
                report.written.push(key);
            } else if !unread && (!again.planned.contains(&key) || again.report.left.contains(&key))
            {
                if *outcome == Outcome::Exported {
                    let reason = format!(
                        "KV key `{}`: another writer wrote it during this run; left to it",
                        key.key
                    );
                    *outcome = Outcome::Skipped(reason);
                }
                report.left.push(key);
            } else if !matches!(outcome, Outcome::Failed(_) | Outcome::Rejected(_)) {
                let why = match unread {
                    true => "its index could not be read again after another writer claimed it",
                    false => "other writers kept claiming it while this run wrote it",
                };
                *outcome = Outcome::Failed(format!("KV key `{}`: {why}; run again", key.key));
            }
        }
        report.keys_written = report.written.len();
        report.keys_left = report.left.len();
    }

    /// Reads `owners` again and writes the `lost` keys their new read implies; answers what
    /// was written and the indexes not read (or not prepared) again.
    async fn read_and_write_again(
        &self,
        owners: BTreeSet<IndexRef>,
        lost: &[(KvKey, usize, Option<IndexRef>)],
        deadline: Instant,
    ) -> (WrittenAgain, HashSet<IndexRef>) {
        // One line for them all, rather than a failed read per index.
        if Instant::now() >= deadline {
            tracing::warn!("lost keys not written again: the invocation deadline is near");
            let nothing = WrittenAgain {
                planned: HashSet::new(),
                report: BatchReport::default(),
            };
            return (nothing, owners.into_iter().collect());
        }
        let since = self.begin_reading(deadline).await;
        let (mut records, mut unread) = (Vec::new(), HashSet::new());
        for index in owners {
            match self.index_records(&index, true, deadline).await {
                Ok(found) => records.extend(found.into_iter().flatten()),
                Err(e) => {
                    tracing::warn!(%index, error = %e, "index not read again after a lost race");
                    unread.insert(index);
                }
            }
        }
        let mut prepared = self.prepare(records, Run::OPERATOR, deadline).await;
        prepared.read_epoch = Some(since);
        let failed = (prepared.records.iter().zip(&prepared.plan.outcomes))
            .filter(|(_, outcome)| matches!(outcome, Outcome::Failed(_)))
            .filter_map(|(record, _)| record.index.clone());
        unread.extend(failed);
        let wanted: HashSet<&KvKey> = lost.iter().map(|(key, _, _)| key).collect();
        (prepared.plan.ops)
            .retain(|key, op| wanted.contains(key) && matches!(op.action, KvAction::Put(_)));
        let planned: HashSet<KvKey> = prepared.plan.ops.keys().cloned().collect();
        let report = self.apply_reusing(prepared, deadline, Vec::new()).await;
        (WrittenAgain { planned, report }, unread)
    }
}
