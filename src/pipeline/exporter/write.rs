//! Stage 5, the write: a prepared batch sent, old shop keys deleted first, the rest handed to
//! the KV store in the batch's order, and every record's outcome decided from what became of
//! its keys (docs/contract.md, "Nothing is lost").

use std::collections::{BTreeMap, HashMap, HashSet};

use tokio::time::Instant;

use super::{Prepared, Run};
use crate::domain::qfilter::filter_key;
use crate::domain::validate::shop_id_problem;
use crate::domain::{IndexRef, KvAction, KvKey, KvOp};
use crate::pipeline::plan::{Plan, PlannedOp};
use crate::pipeline::records::{Change, ChangeRecord};
use crate::ports::{KvStore, PortError};
use crate::report::{BatchReport, Landed, Outcome};

/// DynamoDB Streams keeps a record this long; no real record is older when it is exported.
const STREAM_RETENTION_SECONDS: f64 = 24.0 * 3600.0;

/// Stage 5: the plan sent once and every record's outcome decided; the check of what landed is
/// the caller's (`check.rs`).
pub(super) async fn send(kv: &impl KvStore, prepared: Prepared, deadline: Instant) -> BatchReport {
    let Prepared {
        mut records,
        plan,
        api_keys,
        run,
        delete_owners,
        ..
    } = prepared;
    // From here on a record is what identifies it and its outcome: its change is let go.
    records.iter_mut().for_each(|record| record.change = None);
    let (requests_before, retries_before) = (kv.requests(), kv.retries());
    let checked = checked(&plan, &records, run, &delete_owners);
    // Each shop key given an index's value (a claimer's, read now, may be newer than its own
    // record in the batch): the stream's shrink keeps the shop recorded for that index.
    let claimed_now = (plan.shop_puts())
        .map(|(key, index, _)| (index.clone(), key.key.clone()))
        .collect();
    let Plan {
        ops,
        old_shops,
        filters,
        ..
    } = plan;
    let (keys, failed) = send_keys(kv, ops, &old_shops, deadline).await;
    let applied_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default();
    let mut report = BatchReport {
        kv_requests: kv.requests() - requests_before,
        kv_retries: kv.retries() - retries_before,
        api_keys,
        claimed_now,
        ..BatchReport::default()
    };
    settle_keys(keys, &failed, &checked, &mut report, &mut records);
    settle_filters(&filters, &failed, &mut records);
    finish(report, records, applied_at)
}

/// Sends the planned keys, old shop keys first: an index whose old shop key was not
/// deleted keeps its own key as it was, so the replay of its record still learns the old
/// shop from it. Answers each planned key with its owner and whether it is a put, and the keys
/// that did not land, and why (a failed request, or an index key held back).
async fn send_keys(
    kv: &impl KvStore,
    ops: BTreeMap<KvKey, PlannedOp>,
    old_shops: &[(KvKey, IndexRef)],
    deadline: Instant,
) -> (Vec<(KvKey, usize, bool)>, HashMap<KvKey, PortError>) {
    let old_shop_keys: HashSet<&KvKey> = old_shops.iter().map(|(key, _)| key).collect();
    let first = (ops.iter())
        .filter(|(key, _)| old_shop_keys.contains(key))
        .map(|(key, op)| (key.clone(), op.action.clone()))
        .collect();
    let mut failed: HashMap<KvKey, PortError> =
        kv.apply(first, deadline).await.into_iter().collect();
    let withheld: HashMap<KvKey, String> = (old_shops.iter())
        .filter(|(shop, _)| failed.contains_key(shop))
        .map(|(shop, index)| (KvKey::index(index), shop.key.clone()))
        .collect();
    let (keys, rest) = in_batch_order(ops, |key| {
        !old_shop_keys.contains(key) && !withheld.contains_key(key)
    });
    failed.extend(kv.apply(rest, deadline).await);
    for (key, shop) in withheld {
        let error = PortError::Refused(format!(
                "not sent: the old shop key `{shop}` was not deleted, and a retry must still find it here"
            ));
        failed.insert(key, error);
    }
    (keys, failed)
}

/// Each planned key's fate, into the report (what landed, and of it what is to be checked
/// against the table: `checked`) and its owner's outcome.
fn settle_keys(
    keys: Vec<(KvKey, usize, bool)>,
    failed: &HashMap<KvKey, PortError>,
    checked: &HashMap<KvKey, (Option<IndexRef>, Option<String>)>,
    report: &mut BatchReport,
    records: &mut [ChangeRecord],
) {
    for (key, owner, put) in keys {
        if let (Some((index, digest)), false) = (checked.get(&key), failed.contains_key(&key)) {
            report.landed.push(Landed {
                key: key.clone(),
                record: owner,
                index: index.clone(),
                digest: digest.clone(),
            });
        }
        match failed.get(&key) {
            Some(error) => {
                let outcome = &mut records[owner].outcome;
                if matches!(outcome, Outcome::Exported | Outcome::Kept { .. }) {
                    *outcome = key_failed(&key.key, error);
                }
            }
            None if put => report.written.push(key),
            None => report.deleted.push(key),
        }
    }
}

/// The keys to check against the table once they landed: all of an operator's (it read the
/// table before another writer may have changed it); of the stream's, those it derived from
/// other items than its records (the old shop keys it deletes, the shop keys it gives another
/// index's value, the filters it built from a Query, the keys of a record it added on behalf of
/// one of its own: a dropped alias target's removal). Each with the index it is checked as and
/// the digest put (`None`: a delete): a put as the index whose value it is (a shop key given to
/// a claimer as that claimer: it may have dropped the shop meanwhile, seed 2177), a delete as
/// the index that gave the key up (a repair's: the index it was written for).
fn checked(
    plan: &Plan,
    records: &[ChangeRecord],
    run: Run,
    delete_owners: &HashMap<KvKey, IndexRef>,
) -> HashMap<KvKey, (Option<IndexRef>, Option<String>)> {
    let old_shops: HashSet<&KvKey> = plan.old_shops.iter().map(|(key, _)| key).collect();
    (plan.ops.iter())
        .filter_map(|(key, op)| {
            let record = &records[op.owner];
            let index = match &op.action {
                KvAction::Put(value) => Some(value.index()),
                KvAction::Delete => delete_owners.get(key).or(record.index.as_ref()),
            };
            let derived = || {
                let filter = |index| plan.filters.contains_key(index) && *key == filter_key(index);
                old_shops.contains(key)
                    || index != record.index.as_ref()
                    || record.sequence_number.is_none()
                    || index.is_some_and(filter)
            };
            if run.stream && !derived() {
                return None;
            }
            // Rendered and hashed only for the keys checked: a stream batch's own keys are not.
            let digest = match &op.action {
                KvAction::Put(value) => Some(value.digest()),
                KvAction::Delete => None,
            };
            Some((key.clone(), (index.cloned(), digest)))
        })
        .collect()
}

/// The keys a stream's removal kept for an alias, its own key and the shops no claimer took,
/// each checked as if left as it was (a digest no value has): the alias's holder may have
/// dropped it before the intent recording the alias on it landed, its batch then finding
/// nothing to remove again; the check, reading after the intent, deletes them.
pub(super) fn kept_keys(records: &[ChangeRecord], plan: &Plan) -> Vec<Landed> {
    let kept = (records.iter().enumerate())
        .filter(|(_, record)| matches!(record.outcome, Outcome::Kept { .. }));
    let mut landed = Vec::new();
    for (record, kept) in kept {
        let Some(Change::RemoveIndex {
            index,
            previous_shops,
            keeps_own_key,
        }) = &kept.change
        else {
            continue;
        };
        // An old shop id that is no shop key is never touched (it may be another's key).
        let shops = (previous_shops.iter())
            .filter(|shop| shop_id_problem(shop).is_none())
            .map(KvKey::settings);
        let own = (!keeps_own_key).then(|| KvKey::index(index));
        let keys = own.into_iter().chain(shops);
        landed.extend(
            keys.filter(|key| !plan.ops.contains_key(key))
                .map(|key| Landed {
                    key,
                    record,
                    index: Some(index.clone()),
                    digest: Some(String::new()),
                }),
        );
    }
    landed
}

/// Each planned key (in key order) with its owner and whether it is a put, and the operations
/// `send` keeps, in the batch's order (a record's keys together, in key order): the decoded
/// records are read as they lie in memory, and a value shared by two keys is copied while
/// still in cache.
fn in_batch_order(
    ops: BTreeMap<KvKey, PlannedOp>,
    send: impl Fn(&KvKey) -> bool,
) -> (Vec<(KvKey, usize, bool)>, Vec<KvOp>) {
    let keys = (ops.iter())
        .map(|(key, op)| (key.clone(), op.owner, matches!(op.action, KvAction::Put(_))))
        .collect();
    let mut ops: Vec<(KvKey, PlannedOp)> = ops.into_iter().collect();
    ops.sort_by_key(|(_, op)| op.owner);
    let sent = (ops.into_iter())
        .filter(|(key, _)| send(key))
        .map(|(key, op)| (key, op.action))
        .collect();
    (keys, sent)
}

/// A filter not written fails every record that needed it: retried, or rejected when
/// Cloudflare refused it.
fn settle_filters(
    filters: &BTreeMap<IndexRef, Vec<usize>>,
    failed: &HashMap<KvKey, PortError>,
    records: &mut [ChangeRecord],
) {
    if failed.is_empty() {
        return;
    }
    for (index, needers) in filters {
        let key = filter_key(index);
        let Some(error) = failed.get(&key) else {
            continue;
        };
        for &needer in needers {
            let outcome = &mut records[needer].outcome;
            if *outcome == Outcome::Exported {
                let what = if error.is_transient() {
                    "not written"
                } else {
                    "refused"
                };
                let what = format!("query filter `{}` {what}: ", key.key);
                *outcome = Outcome::of_port_error(error, what);
            }
        }
    }
}

/// The report's lags and outcomes.
fn finish(mut report: BatchReport, records: Vec<ChangeRecord>, applied_at: f64) -> BatchReport {
    report.lag_seconds = (records.iter())
        .filter(|record| record.outcome == Outcome::Exported)
        .filter_map(|record| record.created_at)
        .map(|created| (applied_at - created).max(0.0))
        // A stream keeps records 24 hours: an older time is a hand-made event's, not a lag.
        .filter(|lag| *lag <= STREAM_RETENTION_SECONDS)
        .collect();
    report.records = records;
    report
}

/// A record whose key did not make it: retried, unless Cloudflare refused that key on its own.
fn key_failed(key: &str, error: &PortError) -> Outcome {
    Outcome::of_port_error(error, format!("KV key `{key}`: "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::kv::KvValue;

    #[test]
    fn operations_go_to_the_store_in_the_batch_order_and_every_key_is_kept_for_its_outcome() {
        let index = IndexRef::new("a", "i");
        let op = |owner: usize, put: bool| PlannedOp {
            action: match put {
                true => KvAction::put(KvValue::new(&index, format!("v{owner}"))),
                false => KvAction::Delete,
            },
            owner,
        };
        let ops = BTreeMap::from([
            (KvKey::settings("a-1"), op(1, true)),
            (KvKey::settings("a-2"), op(0, true)),
            (KvKey::settings("held"), op(0, true)),
            (KvKey::settings("shop-1"), op(1, false)),
            (KvKey::settings("shop-2"), op(0, true)),
        ]);
        let (keys, sent) = in_batch_order(ops, |key| key.key != "held");
        let names = |keys: Vec<&KvKey>| keys.iter().map(|k| k.key.clone()).collect::<Vec<_>>();
        assert_eq!(
            names(sent.iter().map(|(key, _)| key).collect()),
            ["a-2", "shop-2", "a-1", "shop-1"]
        );
        assert_eq!(
            names(keys.iter().map(|(key, _, _)| key).collect()),
            ["a-1", "a-2", "held", "shop-1", "shop-2"]
        );
        let owners_and_puts: Vec<(usize, bool)> = keys.iter().map(|(_, o, p)| (*o, *p)).collect();
        assert_eq!(
            owners_and_puts,
            [(1, true), (0, true), (0, true), (1, false), (0, true)]
        );
    }
}
