//! An alias record makes the targets it drops as dirty as those it gains (docs/contract.md,
//! "Alias deletion safety"): each target a batch's index drops that no settings record has as
//! its own any more is removed again, as a record of its own after the batch's, on behalf of
//! the record that dropped it. So is what a rejected record's index no longer holds: the shops
//! the ledger records for it that its raw item no longer claims are given up.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use tokio::time::Instant;

use super::Exporter;
use crate::domain::{IndexId, IndexRef};
use crate::pipeline::records::{Change, ChangeRecord};
use crate::ports::{before_deadline, IndexRefs, Ledger, PortError, Ports, SettingsTable};
use crate::report::Outcome;

impl<P: Ports> Exporter<P> {
    /// Each alias target the records' indexes drop (recorded, and no longer named by the
    /// record as the table holds it now), with the last record that drops it; and what the raw
    /// items of rejected records name (read fail closed).
    async fn dropped_by(
        &self,
        records: &[ChangeRecord],
        known: &HashMap<IndexRef, IndexRefs>,
        deadline: Instant,
    ) -> Result<(BTreeMap<String, usize>, HashMap<IndexRef, IndexRefs>), PortError> {
        // A rejected record's index refers to what its raw item names (fail closed), as the
        // reconcile and every alias check read it.
        let rejected: Vec<IndexRef> = (records.iter())
            .filter(|record| is_rejected(record, known))
            .filter_map(|record| record.index.clone())
            .collect();
        let raw: HashMap<IndexRef, IndexRefs> = match rejected.is_empty() {
            true => HashMap::new(),
            false => {
                let read = self.table.index_references(&rejected);
                let raw = before_deadline(deadline, "dropped alias targets", read).await?;
                raw.into_iter().collect()
            }
        };
        // Each dropped target with the last record of the index that dropped it.
        let mut dropped: BTreeMap<String, usize> = BTreeMap::new();
        for (at, record) in records.iter().enumerate() {
            let (index, now) = match (&record.change, &record.index) {
                (Some(Change::UpsertIndex { settings, .. }), _) => {
                    (&settings.index, settings.references())
                }
                (Some(Change::RemoveIndex { index, .. }), _) => (index, IndexRefs::default()),
                (None, Some(index)) if is_rejected(record, known) => {
                    (index, raw.get(index).cloned().unwrap_or_default())
                }
                _ => continue,
            };
            let Some(recorded) = known.get(index) else {
                continue;
            };
            for target in recorded.targets.difference(&now.targets) {
                dropped.insert(target.clone(), at);
            }
        }
        Ok((dropped, raw))
    }

    /// An alias record makes the targets it drops as dirty as those it gains: each alias
    /// target the ledger records for a batch's index that its record (as the table holds it
    /// now) no longer names, and that no index's settings record names as its own any more
    /// (a removed index kept for the alias), is removed again, as a record of its own after the
    /// batch's, on behalf of the index's last record ([`Derived`]): kept if another alias still
    /// reads it, else its own key deleted and its recorded shops given up
    /// (docs/contract.md, "Alias deletion safety").
    pub(super) async fn dropped_targets(
        &self,
        records: &mut Vec<ChangeRecord>,
        known: &mut HashMap<IndexRef, IndexRefs>,
        deadline: Instant,
    ) -> Vec<Derived> {
        let (dropped, raw) = match self.dropped_by(records, known, deadline).await {
            Ok(found) => found,
            Err(error) => {
                // Retried, never given up silently: the replay reads them again (seed 1436).
                let what = "what its index no longer names could not be read: ";
                for record in records.iter_mut().filter(|r| is_rejected(r, known)) {
                    record.end(Outcome::of_port_error(&error, what));
                }
                return Vec::new();
            }
        };
        let mut derived = self
            .targets_removed(records, known, dropped, deadline)
            .await;
        derived.extend(shops_given_up(records, known, &raw));
        derived
    }

    /// Each dropped target no live index has as its own, removed again ([`Derived`]).
    async fn targets_removed(
        &self,
        records: &mut Vec<ChangeRecord>,
        known: &mut HashMap<IndexRef, IndexRefs>,
        dropped: BTreeMap<String, usize>,
        deadline: Instant,
    ) -> Vec<Derived> {
        if dropped.is_empty() {
            return Vec::new();
        }
        let candidates: BTreeSet<IndexRef> = dropped
            .keys()
            .flat_map(|t| IndexId(t.clone()).named())
            .collect();
        let candidates: Vec<IndexRef> = candidates.into_iter().collect();
        let settings = self.table.index_references(&candidates);
        let settings = before_deadline(deadline, "dropped alias targets", settings);
        let recorded = self.ledger.index_refs(&candidates);
        let recorded = before_deadline(deadline, "dropped alias targets", recorded);
        let (live, recorded) = match tokio::join!(settings, recorded) {
            (Ok(live), Ok(recorded)) => (live, recorded),
            (Err(error), _) | (_, Err(error)) => {
                let what = "its dropped alias targets could not be read: ";
                for &at in dropped.values() {
                    records[at].end(Outcome::of_port_error(&error, what));
                }
                return Vec::new();
            }
        };
        let live: BTreeSet<String> = live.into_iter().map(|(index, _)| index.id().0).collect();
        let mut derived = Vec::new();
        for (target, on_behalf_of) in dropped {
            if live.contains(&target) {
                continue; // Its key is a live index's own.
            }
            let named = IndexId(target).named();
            let mut removed: Vec<IndexRef> = (named.iter())
                .filter(|index| recorded.contains_key(*index))
                .cloned()
                .collect();
            if removed.is_empty() {
                // Nothing recorded of it: its own key alone.
                removed.extend(named.into_iter().take(1));
            }
            for index in removed {
                let refs = recorded.get(&index).cloned().unwrap_or_default();
                let remove = ChangeRecord::removal(index.clone(), refs.shops.clone(), false);
                known.entry(index).or_insert(refs);
                derived.push(Derived {
                    at: records.len(),
                    on_behalf_of,
                });
                records.push(remove);
            }
        }
        derived
    }
}

/// The shops each index whose records in the batch are all rejected no longer holds (recorded in
/// the ledger, not claimed by its raw item) are given up on behalf of its last record, as the
/// check gives them up (docs/contract.md, "Checking what landed"): handed to whoever claims
/// each, or deleted; its own key and the shop its raw item claims stay as they are. A replay of
/// a record whose check failed, rejected since, so gives up what it handed over (seed 16683).
fn shops_given_up(
    records: &mut Vec<ChangeRecord>,
    known: &HashMap<IndexRef, IndexRefs>,
    raw: &HashMap<IndexRef, IndexRefs>,
) -> Vec<Derived> {
    let claimed = |record: &ChangeRecord| {
        let raw = record.index.as_ref().and_then(|index| raw.get(index));
        claimed_if_rejected(record, raw)
    };
    if !records.iter().any(|record| claimed(record).is_some()) {
        return Vec::new();
    }
    // Each index's last record and the shops its item claims, while every record is rejected.
    let mut last: BTreeMap<IndexRef, Option<(usize, BTreeSet<String>)>> = BTreeMap::new();
    for (at, record) in records.iter().enumerate() {
        // An override's record says nothing of its index's shops (seed 203, hostile).
        let Some(index) = record.index.as_ref().filter(|_| !is_override(record)) else {
            continue;
        };
        let claimed = claimed(record);
        let last = last
            .entry(index.clone())
            .or_insert(Some((at, BTreeSet::new())));
        *last = last.take().and(claimed.map(|claimed| (at, claimed)));
    }
    let mut derived = Vec::new();
    for (index, last) in last {
        let (Some((at, claimed)), Some(recorded)) = (last, known.get(&index)) else {
            continue;
        };
        let shops: BTreeSet<String> = recorded.shops.difference(&claimed).cloned().collect();
        if shops.is_empty() {
            continue;
        }
        derived.push(Derived {
            at: records.len(),
            on_behalf_of: at,
        });
        records.push(ChangeRecord::removal(index, shops, true));
    }
    derived
}

/// A rejected record of an index the ledger records: what it no longer names may be given up.
fn is_rejected(record: &ChangeRecord, known: &HashMap<IndexRef, IndexRefs>) -> bool {
    let recorded = record.index.as_ref().is_some_and(|i| known.contains_key(i));
    recorded && matches!(record.outcome, Outcome::Rejected(_))
}

/// A record of an override, as its item is now.
fn is_override(record: &ChangeRecord) -> bool {
    matches!(
        record.change,
        Some(Change::UpsertQuery(_) | Change::RemoveQuery { .. })
    )
}

/// The shops a record's item claims when the record is rejected (as read, or, its shop id no
/// shop key, as it will be planned); `None` when it may be exported or its item is not read.
fn claimed_if_rejected(record: &ChangeRecord, raw: Option<&IndexRefs>) -> Option<BTreeSet<String>> {
    match (&record.change, &record.outcome) {
        (None, Outcome::Rejected(_)) => raw.map(|raw| raw.shops.clone()),
        (Some(Change::UpsertIndex { settings, .. }), _) => {
            settings.shop_id_problem()?;
            Some(settings.shop_id.iter().cloned().collect())
        }
        _ => None,
    }
}

/// A record a batch adds on behalf of one of its own (`on_behalf_of`), at `at`: it fails that
/// record when it fails, and leaves the report once the batch is done.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Derived {
    pub at: usize,
    pub on_behalf_of: usize,
}

/// A derived record that failed fails the record it was added for (Lambda replays from there,
/// and that index's shrink keeps what it recorded).
pub(super) fn settle_derived(report: &mut crate::report::BatchReport, derived: &[Derived]) {
    for &Derived { at, on_behalf_of } in derived {
        if let Outcome::Failed(why) = &report.records[at].outcome {
            let index = report.records[at].index.as_ref().map(ToString::to_string);
            let why = format!(
                "the alias target it dropped, {}: {why}",
                index.unwrap_or_default()
            );
            // A rejected record too: its replay drops the target again.
            let parent = &mut report.records[on_behalf_of].outcome;
            match parent {
                Outcome::Rejected(_) => *parent = Outcome::Failed(why),
                _ => parent.fail(why),
            }
        }
    }
}
