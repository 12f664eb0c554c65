//! Stage 4, the intents: before any KV write, every reference the scope's indexes leave that
//! the ledger does not record yet is added on both sides (docs/contract.md, "Concurrent
//! writers", rule 3; "References in the ledger").

use std::collections::{BTreeMap, BTreeSet, HashMap};

use tokio::time::Instant;

use super::Prepared;
use crate::domain::net::{self, Protection};
use crate::domain::validate::shop_id_problem;
use crate::domain::{IndexRef, Outcome};
use crate::ports::{before_deadline, IndexRefs, Ledger, PortError, Referred};

/// What a batch's intents recorded, for the stream's shrink (stage 7): what each index whose
/// change is exported leaves (`None`: removed), what the ledger held of the batch's indexes
/// before, and what the intents added to it (from `birth` where they created an index's
/// references).
pub(super) struct Intents {
    pub left: BTreeMap<IndexRef, Option<IndexRefs>>,
    pub known: HashMap<IndexRef, IndexRefs>,
    pub added: HashMap<IndexRef, BTreeSet<Referred>>,
    pub birth: u64,
    /// The shops the scope's indexes give up (deleted, given to a claimer, or kept for an
    /// alias), with the index giving each up: what an operator whose check could not confirm
    /// them records again.
    pub given_up: Vec<(IndexRef, Referred)>,
    /// The shops the batch gives other indexes' values, with that index: what a stream batch
    /// with a failed record records again (another shard's shrink may have taken one out
    /// before the write landed, and the replay may no longer hand it over).
    pub handed: Vec<(IndexRef, Referred)>,
}

/// Stage 4, when the run keeps references: what the indexes that will write refer to is
/// recorded before any of their keys is sent. When it cannot be, nothing of the batch is sent
/// (every record on its way is retried: [`Prepared::withhold`]).
pub(super) async fn record(
    ledger: &impl Ledger,
    prepared: &mut Prepared,
    deadline: Instant,
) -> Option<Intents> {
    let known = prepared.known_refs.take()?;
    let left = prepared.leaves.clone();
    // An operator's intent owns its members even when they are recorded already (each counts):
    // a stream's shrink that read before it then takes none of them out.
    let before = match prepared.run.owns_recorded {
        true => &HashMap::new(),
        false => &known,
    };
    // Only an operator records them again (`record_again`): the stream's replay gives them up.
    let given_up = match prepared.run.owns_recorded {
        true => (prepared.given_up.iter())
            .filter(|(_, shop)| shop_id_problem(shop).is_none())
            .map(|(index, shop)| (index.clone(), Referred::Shop(shop.clone())))
            .collect(),
        false => Vec::new(),
    };
    let handed = handed_over(prepared);
    let also = [handed.as_slice(), &kept_for(prepared)].concat();
    match point_back(ledger, &left, before, &also, deadline).await {
        Ok((added, birth)) => Some(Intents {
            left,
            known,
            added,
            birth,
            given_up,
            handed,
        }),
        Err(error) => {
            prepared.withhold(&error);
            None
        }
    }
}

/// Before the KV writes, the intent: every reference the scope's indexes leave that the ledger
/// does not record yet is added on both sides, so a batch that asks who claims a shop or
/// aliases an index finds a referrer as soon as its keys can land, and a replay finds every
/// shop the index's keys may be on. Answers what was added, per index, and the call's birth
/// ([`Ledger::point_back`]). `handed`: the shops the batch gives other indexes' values, each
/// recorded for that index too (its own records may be behind the table the value is from).
pub(super) async fn point_back(
    ledger: &impl Ledger,
    left: &BTreeMap<IndexRef, Option<IndexRefs>>,
    known: &HashMap<IndexRef, IndexRefs>,
    handed: &[(IndexRef, Referred)],
    deadline: Instant,
) -> Result<(HashMap<IndexRef, BTreeSet<Referred>>, u64), PortError> {
    let mut added: HashMap<IndexRef, BTreeSet<Referred>> = HashMap::new();
    for (index, refs) in left {
        // A record the reconcile marked counts every intent, so its mark tells whether any
        // writer came since ([`IndexRefs::ripe`]).
        let before = (known.get(index))
            .filter(|known| known.sweep.is_none() || net::off(Protection::SweepCounts))
            .map(IndexRefs::referred)
            .unwrap_or_default();
        let refs = refs.as_ref().map(IndexRefs::referred).unwrap_or_default();
        let new = refs.into_iter().filter(|r| !before.contains(r));
        added.entry(index.clone()).or_default().extend(new);
    }
    let mut items: Vec<(IndexRef, Referred)> = (added.iter())
        .flat_map(|(index, referred)| referred.iter().map(|r| (index.clone(), r.clone())))
        .collect();
    items.extend(handed.iter().cloned());
    let birth = add_to_ledger(ledger, &items, deadline).await?;
    Ok((added, birth))
}

/// An operator whose writes landed but whose check could not confirm them (the table could not
/// be read, or it kept changing) records its intents again: a stream's shrink that ran since
/// its first intent may have taken out a shop its write then landed on, and a rerun gives up
/// every shop recorded. A failure here leaves that to the next reconcile pass (a warning).
pub(super) async fn record_again(ledger: &impl Ledger, intents: &Intents, deadline: Instant) {
    let again = point_back(ledger, &intents.left, &HashMap::new(), &[], deadline).await;
    let again = match again {
        Ok(_) => add_to_ledger(ledger, &intents.given_up, deadline)
            .await
            .map(|_| ()),
        Err(error) => Err(error),
    };
    if let Err(error) = again {
        tracing::warn!(%error, "the intents of writes not confirmed could not be recorded again");
    }
}

/// References recorded again after their writes: another writer's shrink may have taken one
/// out before a write landed (its intent counted before that shrink read), as for a stream
/// batch with a failed record the shops it handed over, or for a check the shop keys it leaves
/// for a rejected or kept index. A failure here leaves that to the next reconcile pass (a
/// warning naming `what`).
pub(super) async fn add_again(
    ledger: &impl Ledger,
    items: &[(IndexRef, Referred)],
    what: &str,
    deadline: Instant,
) {
    if let Err(error) = add_to_ledger(ledger, items, deadline).await {
        tracing::warn!(%error, "{what} could not be recorded again");
    }
}

/// Each index a removal keeps for an alias, as an alias target of each index that reads it: when
/// that index drops the alias, its batch finds the target recorded and removes it (seed 8291: a
/// rejected record's alias, read fail closed, kept an index that nothing recorded it reads).
fn kept_for(prepared: &Prepared) -> Vec<(IndexRef, Referred)> {
    let kept = (prepared.desired.outcomes.iter()).filter_map(|(index, outcome)| match outcome {
        Outcome::Kept { referenced_by } => Some((index, referenced_by)),
        _ => None,
    });
    kept.flat_map(|(index, holders)| {
        let target = Referred::Alias(index.id().0);
        holders
            .iter()
            .map(move |holder| (holder.clone(), target.clone()))
    })
    .collect()
}

/// Each shop key the scope gives another index's value (a claimer's), with that index.
pub(super) fn handed_over(prepared: &Prepared) -> Vec<(IndexRef, Referred)> {
    (prepared.desired.handed())
        .map(|(key, index)| (index.clone(), Referred::Shop(key.key.clone())))
        .collect()
}

/// Adds these items to the ledger, on both sides (nothing to do for none): the call's birth.
pub(super) async fn add_to_ledger(
    ledger: &impl Ledger,
    items: &[(IndexRef, Referred)],
    deadline: Instant,
) -> Result<u64, PortError> {
    if items.is_empty() {
        return Ok(0);
    }
    before_deadline(deadline, "ledger references", ledger.point_back(items)).await
}
