//! A prepared batch: its records with their scope read and its keys decided, nothing sent
//! yet; and how a record ends as its index does.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::{references, Run};
use crate::domain::{IndexRef, KvKey, TableSpan};
use crate::pipeline::desired::{Desired, Want, Wanted};
use crate::pipeline::records::{Change, ChangeRecord};
use crate::pipeline::scope::{Settings, World};
use crate::ports::{IndexRefs, LookupCounts, PortError};
use crate::report::Outcome;

/// Records with their scope read and its keys decided, nothing sent yet.
#[derive(Debug)]
pub struct Prepared {
    pub records: Vec<ChangeRecord>,
    /// The keys the scope implies, and how each index's change ends.
    pub desired: Desired,
    pub api_keys: LookupCounts,
    pub run: Run,
    /// What each index whose change is exported leaves referred to (`None`: removed).
    pub(super) leaves: BTreeMap<IndexRef, Option<IndexRefs>>,
    /// The shops each index of the scope gave up.
    pub(super) given_up: Vec<(IndexRef, String)>,
    /// Indexes in scope on behalf of another (its records fail for them).
    pub(super) because: BTreeMap<IndexRef, IndexRef>,
    /// The batch's indexes' references as the ledger recorded them, when the run keeps them.
    pub(super) known_refs: Option<HashMap<IndexRef, IndexRefs>>,
    /// Where in the table the records were read (a backfill's pages): the check reads it again.
    pub(super) span: Option<TableSpan>,
}

impl Prepared {
    /// Records that cannot be prepared: each one not already decided fails for `error`
    /// (reported for retry when it is transient), and nothing is sent.
    pub(super) fn none_sent(records: Vec<ChangeRecord>, run: Run, error: PortError) -> Self {
        let records = records.into_iter().map(|r| r.unread(&error)).collect();
        Self::of(records, run, World::default(), Desired::default())
    }

    pub(super) fn of(records: Vec<ChangeRecord>, run: Run, world: World, desired: Desired) -> Self {
        let mut leaves = BTreeMap::new();
        let (mut given_up, mut because) = (Vec::new(), BTreeMap::new());
        for (index, state) in world.indexes {
            let shops = state.given_up().into_iter().cloned();
            given_up.extend(shops.map(|shop| (index.clone(), shop)));
            if let Some(by) = state.because.clone() {
                because.insert(index.clone(), by);
            }
            let leaves_now = match &state.settings {
                Some(Settings::Valid(settings)) => Some(references::refs_of(settings)),
                Some(Settings::Absent) => None,
                _ => continue,
            };
            if desired.outcomes.get(&index) == Some(&Outcome::Exported) {
                leaves.insert(index, leaves_now);
            }
        }
        Prepared {
            records,
            desired,
            api_keys: LookupCounts::default(),
            run,
            leaves,
            given_up,
            because,
            known_refs: None,
            span: None,
        }
    }

    /// The records were read from this stretch of the table: the check reads it again, page by
    /// page, instead of each index on its own.
    pub fn read_from(&mut self, span: TableSpan) {
        self.span = Some(span);
    }

    /// Nothing is sent: the intents could not be recorded (a reader could miss a referrer
    /// whose keys landed, a replay a shop a key was put on), so every record on its way is
    /// retried.
    pub(super) fn withhold(&mut self, error: &PortError) {
        let why = format!("not sent: its references could not be recorded in the ledger: {error}");
        (self.records.iter_mut()).for_each(|record| fail(&mut record.outcome, &why));
        self.desired.keys.clear();
    }

    /// Keys deleted for the index each was written for (an orphaned key, an override gone
    /// from the table): they fail that index's records, or a record of their own.
    pub fn delete(&mut self, deletes: Vec<(KvKey, IndexRef)>) {
        for (key, index) in deletes {
            let wanted = Wanted {
                want: Want::Delete,
                checked_as: index.clone(),
                by: index,
                derived: true,
            };
            self.desired.keys.insert(key, wanted);
        }
    }

    /// A reconcile's records whose lookups failed (their cell's API keys service down) are left
    /// for the next pass instead of failing this one: logged and skipped (their keys are kept
    /// as they are).
    pub fn leave_failed_unchecked(&mut self) {
        for record in &mut self.records {
            if let Outcome::Failed(reason) = &record.outcome {
                tracing::warn!(index = ?record.index, %reason, "reconcile leaves this index unchecked");
                record.outcome = Outcome::Skipped("left unchecked this pass".into());
            }
        }
    }

    /// What each index that writes a key leaves referred to (its intent).
    pub(super) fn leaves_writing(&self) -> BTreeMap<IndexRef, Option<IndexRefs>> {
        let writing: BTreeSet<&IndexRef> = self.desired.keys.values().map(|w| &w.by).collect();
        (self.leaves.iter())
            .filter(|(index, _)| writing.contains(index))
            .map(|(index, refs)| (index.clone(), refs.clone()))
            .collect()
    }

    /// The indexes whose records fail when a key `by` decided does not land: its own, and the
    /// index it is in scope for (an alias target that index dropped).
    pub(super) fn failing(&self, by: &IndexRef) -> Vec<IndexRef> {
        let because = self.because.get(by).cloned();
        [by.clone()].into_iter().chain(because).collect()
    }
}

/// A record fails for `why` (a rejected one too: its replay reads its index again); one
/// skipped on purpose stays so.
fn fail(outcome: &mut Outcome, why: &str) {
    match outcome {
        Outcome::Rejected(_) => *outcome = Outcome::Failed(why.to_owned()),
        _ => outcome.fail(why),
    }
}

/// Each failure's records end as its outcome says (failed, or rejected when a key was refused
/// on its own): every record of its indexes, found in one pass over the batch; with none in
/// the batch, a record of the first index's own.
pub(crate) fn fail_index<'f>(
    records: &mut Vec<ChangeRecord>,
    failures: impl IntoIterator<Item = (&'f [IndexRef], Outcome)>,
) {
    let failures: Vec<(&[IndexRef], Outcome)> = failures.into_iter().collect();
    let mut by_index: HashMap<&IndexRef, Vec<usize>> = HashMap::new();
    for (at, (indexes, _)) in failures.iter().enumerate() {
        indexes
            .iter()
            .for_each(|i| by_index.entry(i).or_default().push(at));
    }
    let mut found = vec![false; failures.len()];
    for record in records.iter_mut() {
        let Some(ats) = record.index.as_ref().and_then(|i| by_index.get(i)) else {
            continue;
        };
        for &at in ats {
            end_as(&mut record.outcome, &failures[at].1);
            found[at] = true;
        }
    }
    let mut own: HashMap<IndexRef, usize> = HashMap::new();
    for ((indexes, outcome), found) in failures.into_iter().zip(found) {
        let Some(index) = indexes.first().filter(|_| !found) else {
            continue;
        };
        match own.get(index) {
            Some(&at) => end_as(&mut records[at].outcome, &outcome),
            None => {
                own.insert(index.clone(), records.len());
                records.push(ChangeRecord::of(Some(index.clone()), Err(outcome)));
            }
        }
    }
}

/// A record on its way ends as `outcome` says; a failure adds its reason to one failed already.
fn end_as(outcome: &mut Outcome, ended: &Outcome) {
    match ended {
        Outcome::Failed(why) => fail(outcome, why),
        _ if matches!(outcome, Outcome::Exported | Outcome::Kept { .. }) => {
            *outcome = ended.clone()
        }
        _ => {}
    }
}

/// Each record ends as its index's change does: a settings record as the index, an override's
/// exported unless Cloudflare would refuse its value; every record of a failed index fails,
/// and the records of an index whose dropped target failed.
pub(super) fn settle(
    records: &mut [ChangeRecord],
    desired: &Desired,
    because: &BTreeMap<IndexRef, IndexRef>,
) {
    for record in records.iter_mut() {
        let Some(outcome) = record.index.as_ref().and_then(|i| desired.outcomes.get(i)) else {
            continue;
        };
        match (&record.change, outcome) {
            (_, Outcome::Failed(why)) => fail(&mut record.outcome, why),
            (None, _) | (Some(Change::RemoveQuery { .. }), _) => {}
            (Some(Change::UpsertQuery(config)), _) => {
                let key = KvKey::query_config(&config.index, &config.query);
                let filter = crate::domain::qfilter::filter_key(&config.index);
                if let Some(why) = desired.refused.get(&key).or(desired.refused.get(&filter)) {
                    record.outcome = Outcome::Rejected(why.clone());
                }
            }
            (Some(_), outcome) => record.outcome = outcome.clone(),
        }
    }
    for (index, by) in because {
        if let Some(Outcome::Failed(why)) = desired.outcomes.get(index) {
            let why = format!("the alias target it dropped, {index}: {why}");
            let of_by = |r: &&mut ChangeRecord| r.index.as_ref() == Some(by);
            records
                .iter_mut()
                .filter(of_by)
                .for_each(|r| fail(&mut r.outcome, &why));
        }
    }
}
