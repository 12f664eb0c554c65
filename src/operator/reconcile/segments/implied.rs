//! Step 2 of a pass: the table against KV. The table read in pieces (an index's records kept
//! together), each planned as a re-export, and every implied key's digest compared with what
//! KV holds (read in bulk).

use std::collections::{BTreeMap, BTreeSet, HashSet};

use tokio::time::Instant;

use super::{Pass, Position, TABLE_PAGE};
use crate::domain::qfilter::filter_key;
use crate::domain::{IndexRef, KvAction, KvKey, Namespace};
use crate::operator::classify::{self, could_be_written, owner_in_value, Class, Compared};
use crate::operator::reconcile::failed;
use crate::operator::reconcile::NAMESPACES;
use crate::operator::OperatorError;
use crate::pipeline::exporter::{left_by, AddReferences, Prepared, Run, Runs};
use crate::pipeline::records::{Change, ChangeRecord};
use crate::ports::{KvStore as _, Ports};
use crate::report::Outcome;

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
            let read = (runs).read(self.exporter, self.account, size, true, add, self.deadline);
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
        self.repair_references(&prepared).await?;
        let mut kept = Vec::new();
        for (record, outcome) in prepared.records.iter().zip(&prepared.plan.outcomes) {
            if matches!(outcome, Outcome::Skipped(_) | Outcome::Rejected(_)) {
                kept.extend(keys_of(record));
            }
        }
        // A key another record of the index implies is compared below, not kept.
        kept.retain(|key| !prepared.plan.ops.contains_key(key));
        self.count_kept(kept).await?;
        let ops = &prepared.plan.ops;
        self.count_bulk_gets(ops.keys());
        let compared = classify::compare(self.exporter, ops, self.deadline);
        let compared = compared.await.map_err(failed)?;
        let shared = self.shared_shops(&prepared, &compared).await?;
        let (mut to_write, mut deletes) = (BTreeSet::new(), Vec::new());
        for (key, Compared { class, .. }) in compared {
            let class = match class {
                Class::Stale if shared.contains(&key) => Class::InSync,
                class => class,
            };
            self.found.add(&key, class);
            match class {
                Class::Missing | Class::Stale => {
                    to_write.insert(key);
                }
                // Planned absent: the filter of an index without overrides.
                Class::Orphaned => {
                    let index = prepared.records[ops[&key].owner].index.clone();
                    deletes.push((key, index));
                }
                _ => {}
            }
        }
        self.repair(Some(prepared), to_write, deletes).await
    }

    /// The ledger's record of each index this pass can export given what the table names
    /// that it lacks (dry run or not: the ledger is the function's own).
    async fn repair_references(&self, prepared: &Prepared) -> Result<(), OperatorError> {
        let outcomes = &prepared.plan.outcomes;
        let left = (left_by(&prepared.records).into_iter().zip(outcomes))
            .filter(|(_, outcome)| matches!(outcome, Outcome::Pending | Outcome::Kept { .. }))
            .filter_map(|(left, _)| left)
            .collect();
        let lacked = "the ledger's references of indexes lacked what the table names: added";
        self.add_lacking_references(left, lacked).await
    }

    /// The keys of indexes this pass cannot export (rejected, or left unchecked) are kept as
    /// they are: those KV holds count as protected.
    async fn count_kept(&mut self, keys: Vec<KvKey>) -> Result<(), OperatorError> {
        self.count_bulk_gets(keys.iter());
        let held = self.exporter.kv().values_of(&keys, self.deadline);
        let held = held.await.map_err(failed)?;
        for key in keys.iter().filter(|key| held.contains_key(key)) {
            self.found.add(key, Class::Protected);
        }
        Ok(())
    }

    /// The bulk reads of these keys' values (100 keys a request, per namespace), counted.
    fn count_bulk_gets<'k>(&mut self, keys: impl Iterator<Item = &'k KvKey> + Clone) {
        for namespace in NAMESPACES {
            let asked = keys.clone().filter(|k| k.namespace == namespace).count();
            self.requests.kv_bulk_get += asked.div_ceil(100);
        }
    }

    /// Shop keys that hold the value of another index whose table record claims the shop
    /// too: several indexes claim it, and the one written last keeps it (not drift; that
    /// index's own piece compares the value).
    async fn shared_shops(
        &mut self,
        prepared: &Prepared,
        compared: &BTreeMap<KvKey, Compared>,
    ) -> Result<HashSet<KvKey>, OperatorError> {
        let others: Vec<(&KvKey, IndexRef)> = (compared.iter())
            .filter(|(key, compared)| {
                key.namespace == Namespace::Settings && compared.class == Class::Stale
            })
            .filter_map(|(key, compared)| {
                let KvAction::Put(value) = &prepared.plan.ops[key].action else {
                    return None;
                };
                let owner = value.index();
                let held = owner_in_value(compared.held.as_deref()?).filter(could_be_written);
                let other = held.filter(|o| o != owner && *key != KvKey::index(owner))?;
                Some((key, other))
            })
            .collect();
        if others.is_empty() {
            return Ok(HashSet::new());
        }
        let indexes: Vec<IndexRef> = others.iter().map(|(_, o)| o.clone()).collect();
        let refs = self.exporter.index_references(&indexes, self.deadline);
        let refs = refs.await.map_err(failed)?;
        Ok((others.into_iter())
            .filter(|(key, other)| refs.get(other).is_some_and(|r| r.shops.contains(&key.key)))
            .map(|(key, _)| key.clone())
            .collect())
    }
}

/// The keys a settings record's index has whatever its values: its own, its filter's, and
/// its shop's when the record could be read.
fn keys_of(record: &ChangeRecord) -> Vec<KvKey> {
    let Some(index) = &record.index else {
        return Vec::new();
    };
    let mut keys = vec![KvKey::index(index), filter_key(index)];
    match &record.decoded {
        Ok(Change::UpsertIndex { settings, .. }) => {
            keys.extend(settings.shop_id.clone().map(KvKey::settings))
        }
        Ok(_) => return Vec::new(),
        Err(_) => {}
    }
    keys
}
