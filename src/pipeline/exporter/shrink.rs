//! Stage 7, the stream's shrink: once its KV writes are checked, what its records confirmed
//! given up is taken out of the ledger (docs/contract.md, "References in the ledger").

use std::collections::BTreeMap;

use tokio::time::Instant;

use super::intents::Intents;
use crate::domain::IndexRef;
use crate::ports::{before_deadline, epoch_seconds, IndexRefs, Ledger, RefsChange};
use crate::report::{BatchReport, Outcome};

/// After the stream's KV writes and their check: what each index's records confirmed it no
/// longer refers to is taken out (of its own references and of the sets), for the indexes the
/// batch settled: every record of theirs lies before the batch's first failed record (Lambda
/// replays from there) and was exported. Any other index keeps everything recorded: its replay,
/// or its next record, gives up what it no longer holds. When this fails, the superset stays (a
/// warning): nothing is lost, and the index's next record gives the same shops up again.
pub(super) async fn record(
    ledger: &impl Ledger,
    (intents, sweep): (Intents, bool),
    report: &BatchReport,
    deadline: Instant,
) {
    let changes: Vec<RefsChange> = (settled(&intents, report).into_iter())
        .filter_map(|(index, last)| change(index, last, (&intents, sweep), report))
        .collect();
    if changes.is_empty() {
        return;
    }
    let record = ledger.record_refs(&changes);
    if let Err(error) = before_deadline(deadline, "ledger references", record).await {
        tracing::warn!(
            indexes = changes.len(),
            %error,
            "the ledger keeps references these indexes gave up: their next record gives them up again"
        );
    }
}

/// Each index the batch settled, with what it leaves (`None`: removed): its change exported,
/// and every record of it before the batch's first failed record (Lambda replays from there).
/// An index in scope with no record of its own (a dropped alias target) is not this batch's:
/// its own records, concurrently, take out what it gave up.
fn settled(intents: &Intents, report: &BatchReport) -> BTreeMap<IndexRef, Option<IndexRefs>> {
    let outcomes: Vec<&Outcome> = report.records.iter().map(|r| &r.outcome).collect();
    let replayed_from = (outcomes.iter())
        .position(|o| matches!(o, Outcome::Failed(_)))
        .unwrap_or(outcomes.len());
    let mut settled: BTreeMap<IndexRef, bool> = BTreeMap::new();
    for (at, record) in report.records.iter().enumerate() {
        let Some(index) = &record.index else { continue };
        let ok = at < replayed_from && !matches!(record.outcome, Outcome::Kept { .. });
        *settled.entry(index.clone()).or_insert(true) &= ok;
    }
    (intents.left.iter())
        .filter(|(index, _)| settled.get(*index) == Some(&true))
        .map(|(index, left)| (index.clone(), left.clone()))
        .collect()
}

/// What a settled index's records confirmed: what it no longer refers to, or, removed, its
/// whole record (`None`: nothing to change).
fn change(
    index: IndexRef,
    last: Option<IndexRefs>,
    (intents, sweep): (&Intents, bool),
    report: &BatchReport,
) -> Option<RefsChange> {
    let mut new = last.clone().unwrap_or_default();
    // A shop the check found the index claiming now stays (it may have written there).
    let now = report.claimed_now.iter().filter(|(i, _)| *i == index);
    new.shops.extend(now.map(|(_, shop)| shop.clone()));
    // Removed, and made again by nobody the check saw: its record goes whole (the sweep's
    // only once the reconcile's mark on it is ripe: a write in flight may still land).
    let removed = last.is_none() && new.shops.is_empty();
    let old = intents.known.get(&index);
    if removed && sweep && !old.is_some_and(|old| old.ripe(epoch_seconds())) {
        return None;
    }
    let added = intents.added.get(&index);
    let mut pointing = old.map(IndexRefs::referred).unwrap_or_default();
    pointing.extend(added.into_iter().flatten().cloned());
    // An index no intent wrote and nothing recorded (it refers to nothing) gets its item all
    // the same: its next record then needs no KV read for its shop.
    let unrecorded = !removed && old.is_none() && pointing.is_empty();
    let after = new.referred();
    let needed =
        unrecorded || (removed && old.is_some()) || pointing.iter().any(|r| !after.contains(r));
    // What the batch read, and its own intent (which created the item when the batch read
    // none): any other writer's since keeps all.
    let own = added.is_some_and(|added| !added.is_empty());
    let intents = match old.map_or(0, |old| old.intents) {
        0 if own => intents.birth + 1,
        read => read + u64::from(own),
    };
    needed.then_some(RefsChange {
        index,
        pointing,
        new: (!removed).then_some(new),
        intents,
        swept: old.and_then(|old| old.sweep).filter(|_| removed && sweep),
    })
}
