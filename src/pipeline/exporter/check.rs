//! Stage 6, the check: keys decided from items their writer does not own, checked against the
//! table as it is once they landed (docs/contract.md, "Concurrent writers"): every key an
//! operator wrote (it read the table before another writer may have changed it and written
//! KV), and the stream's derived keys (filters built from a Query, shop keys an index gave up,
//! a dropped alias target's keys). Each index is read again by the one reader and its keys
//! decided again, as if it had just changed; a key that differs is written again, until a read
//! finds nothing to change. Nothing is left to another writer on trust.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use tokio::time::Instant;

use super::reads::Recheck;
use super::{fail_index, intents, write, Exporter, Prepared, Run};
use crate::domain::kv::query_config_prefix;
use crate::domain::net::{self, Protection};
use crate::domain::qfilter::filter_key;
use crate::domain::{IndexRef, IndexRefs, KvKey, Namespace, TableSpan};
use crate::pipeline::desired::{Desired, Want, Wanted};
use crate::pipeline::records::{Change, ChangeRecord};
use crate::ports::{Ports, Referred};
use crate::report::{BatchReport, Landed, Outcome};

/// The keys that differ from what landed, each with the indexes whose records fail for it.
type Differ = BTreeMap<KvKey, Vec<IndexRef>>;

/// Rounds that may write again; one more read after them only checks.
const ROUNDS: usize = 3;

impl<P: Ports> Exporter<P> {
    /// Checks the report's landed keys against the table and writes again what differs, round
    /// after round; a key that still differs after the last round, or whose index cannot be
    /// read again, fails its records (the operator runs again, or the next reconcile pass).
    pub(super) async fn check(
        &self,
        report: &mut BatchReport,
        run: Run,
        span: Option<TableSpan>,
        deadline: Instant,
    ) {
        // Read as an operator reads (every override in the batch), its API keys as the run
        // got them (the stream's from the short cache).
        let run = Run {
            stream: run.stream,
            ..Run::CHECK
        };
        let mut landed = std::mem::take(&mut report.landed);
        if net::off(Protection::CheckRounds) {
            landed.clear();
        }
        let mut last: BTreeMap<KvKey, bool> = BTreeMap::new();
        for round in 0..=ROUNDS {
            if landed.is_empty() {
                break;
            }
            let may_write = round < ROUNDS;
            let round = (run, may_write, span.as_ref());
            let again = self.check_round(landed, round, report, deadline).await;
            let Some((again, originals)) = again else {
                break;
            };
            report.kv_requests += again.kv_requests;
            report.claimed_now.extend(again.claimed_now.iter().cloned());
            last.extend(again.written.iter().map(|key| (key.clone(), true)));
            last.extend(again.deleted.iter().map(|key| (key.clone(), false)));
            // Each key's failure is its original index's.
            let by = |landed: Landed| Landed {
                fails: originals[&landed.key].clone(),
                ..landed
            };
            landed = again.landed.into_iter().map(by).collect();
        }
        // A key written again ends as its last write left it.
        report.written.retain(|key| !last.contains_key(key));
        report.deleted.retain(|key| !last.contains_key(key));
        for (key, put) in last {
            match put {
                true => report.written.push(key),
                false => report.deleted.push(key),
            }
        }
    }

    /// One round: the landed keys' indexes read again and decided again; the keys whose want
    /// differs from what landed are written (or, `may_write` false, fail their records).
    /// Answers what the writes did, with each key's original index, when there were any.
    async fn check_round(
        &self,
        landed: Vec<Landed>,
        (run, may_write, span): (Run, bool, Option<&TableSpan>),
        report: &mut BatchReport,
        deadline: Instant,
    ) -> Option<(BatchReport, HashMap<KvKey, Vec<IndexRef>>)> {
        let by_index = by_index(landed);
        let by_index = self.read_again(by_index, span, report, deadline).await;
        let (prepared, landed) = self.plan_again(by_index, run, deadline).await;
        let mut prepared = prepared?;
        for record in &prepared.records {
            if let Some(Change::UpsertIndex { settings, .. }) = &record.change {
                let claimed = settings
                    .shop_id
                    .clone()
                    .map(|s| (settings.index.clone(), s));
                report.claimed_now.extend(claimed);
            }
        }
        let originals: HashMap<KvKey, Vec<IndexRef>> = (landed.iter())
            .map(|landed| (landed.key.clone(), landed.fails.clone()))
            .collect();
        let (differ, stay) = differing(&prepared.desired, &landed, report);
        let what = "shop keys left for rejected or kept indexes";
        intents::add_again(&self.ledger, &stay, what, deadline).await;
        prepared
            .desired
            .keys
            .retain(|key, _| differ.contains_key(key));
        if prepared.desired.keys.is_empty() {
            return None;
        }
        if !may_write {
            let why = |key: &KvKey| {
                format!(
                    "KV key `{}`: other writers kept changing it; run again",
                    key.key
                )
            };
            fail_keys(report, &differ, differ.keys(), why);
            return None;
        }
        // Intent before act, for the check's writes too: what it writes again may be an
        // index's newer value on a shop nothing recorded yet (its own record not read yet).
        let left = prepared.leaves_writing();
        let handed = intents::handed_over(&prepared);
        let none = HashMap::new();
        let recorded = intents::point_back(&self.ledger, &left, &none, &handed, deadline);
        if let Err(error) = recorded.await {
            let why = |_: &KvKey| {
                format!("not written again: its references could not be recorded: {error}")
            };
            fail_keys(report, &differ, differ.keys(), why);
            return None;
        }
        let again = write::send(&self.kv, prepared, deadline).await;
        let landed: BTreeSet<&KvKey> = again.written.iter().chain(&again.deleted).collect();
        let why = |key: &KvKey| {
            format!(
                "KV key `{}`: not written again after the table changed",
                key.key
            )
        };
        let lost = differ.keys().filter(|key| !landed.contains(key));
        fail_keys(report, &differ, lost, why);
        Some((again, originals))
    }

    /// The indexes read again and decided (`None`: nothing to decide), with the landed keys
    /// they decide. The shops each index's landed keys were on stand for what the ledger
    /// records of it: what it no longer claims is given up, as every writer gives up what the
    /// ledger holds (a rejected record's too, its own key left).
    async fn plan_again(
        &self,
        by_index: Vec<(IndexRef, Recheck)>,
        run: Run,
        deadline: Instant,
    ) -> (Option<Prepared>, Vec<Landed>) {
        let (mut records, mut known) = (Vec::new(), HashMap::new());
        let (mut indexes, mut landed) = (Vec::new(), Vec::new());
        for (index, recheck) in by_index {
            let (now, shops) = as_changes(&index, &recheck);
            records.extend(now);
            if !shops.is_empty() {
                let refs = IndexRefs {
                    shops,
                    ..IndexRefs::default()
                };
                known.insert(index.clone(), refs);
            }
            indexes.push(index);
            landed.extend(recheck.keys);
        }
        if records.is_empty() {
            return (None, landed);
        }
        let mut prepared = self.plan_records(records, Some(known), run, deadline).await;
        // An index that could not be decided implies nothing gone: its keys fail instead.
        let outcomes = &prepared.desired.outcomes;
        let decided = |i: &IndexRef| !matches!(outcomes.get(i), Some(Outcome::Failed(_)));
        indexes.retain(decided);
        let deletes = removed_overrides(&prepared.desired.keys, &landed, &indexes);
        prepared.delete(deletes);
        (Some(prepared), landed)
    }
}

/// Each of these keys fails the records `differ` names for it, for `why`.
fn fail_keys<'k>(
    report: &mut BatchReport,
    differ: &Differ,
    keys: impl Iterator<Item = &'k KvKey>,
    why: impl Fn(&KvKey) -> String,
) {
    let failures = keys.map(|key| (&differ[key][..], Outcome::Failed(why(key))));
    fail_index(&mut report.records, failures);
}

/// The landed keys by the index each is checked as; an own key's delete is checked as every
/// index its id can name (an id is ambiguous): one of them may have a settings record now
/// (seed 1479).
fn by_index(landed: Vec<Landed>) -> BTreeMap<IndexRef, Recheck> {
    let mut by_index: BTreeMap<IndexRef, Recheck> = BTreeMap::new();
    for landed in landed {
        let index = landed.index.clone();
        if landed.digest.is_none() && landed.key == KvKey::index(&index) {
            for other in index.id().named().into_iter().filter(|o| *o != index) {
                let landed = Landed {
                    index: other.clone(),
                    ..landed.clone()
                };
                by_index.entry(other).or_default().keys.push(landed);
            }
        }
        by_index.entry(index).or_default().keys.push(landed);
    }
    by_index
}

/// The landed keys whose new want differs from what landed (with their original index); a key
/// no want names stays as it is when its index is rejected now or kept for an alias (then a
/// shop key put there stays recorded for the index, the second answer), and fails its records
/// when its index could not be decided.
fn differing(
    desired: &Desired,
    landed: &[Landed],
    report: &mut BatchReport,
) -> (Differ, Vec<(IndexRef, Referred)>) {
    let (mut differ, mut stay, mut failures) = (BTreeMap::new(), Vec::new(), Vec::new());
    for landed in landed {
        let wanted = desired.keys.get(&landed.key);
        match wanted.filter(|wanted| wanted.want != Want::Keep) {
            Some(wanted) if wanted.digest() != landed.digest => {
                differ.insert(landed.key.clone(), landed.fails.clone());
            }
            Some(_) => {}
            None => match desired.outcomes.get(&landed.index) {
                Some(Outcome::Failed(why)) => {
                    failures.push((&landed.fails[..], Outcome::Failed(why.clone())));
                }
                Some(Outcome::Rejected(_) | Outcome::Kept { .. }) if is_shop_put(landed) => {
                    let shop = Referred::Shop(landed.key.key.clone());
                    stay.push((landed.index.clone(), shop));
                }
                _ => {}
            },
        }
    }
    fail_index(&mut report.records, failures);
    (differ, stay)
}

/// A put of an index's value on a shop key (not its own key).
fn is_shop_put(landed: &Landed) -> bool {
    landed.key.is_shop_of(&landed.index) && landed.digest.is_some()
}

/// The index as the table holds it now, as records that decide each landed key, and the shops
/// its landed keys are on (its own key aside): an index without a settings record is removed
/// (its keys kept while an alias reads it; its filter follows the overrides left of it).
fn as_changes(index: &IndexRef, recheck: &Recheck) -> (Vec<ChangeRecord>, BTreeSet<String>) {
    let settings_keys = (recheck.keys.iter()).filter(|l| l.key.namespace == Namespace::Settings);
    let shops: BTreeSet<String> = (settings_keys.clone())
        .filter(|l| l.key.is_shop_of(index))
        .map(|l| l.key.key.clone())
        .collect();
    let mut records = recheck.records.clone();
    if !recheck.settings && (settings_keys.count() > 0 || records.is_empty()) {
        records.insert(0, ChangeRecord::removal(index.clone()));
    }
    (records, shops)
}

/// Landed override keys and filters no want names: the new read holds every override of the
/// index, so theirs is gone (or, for a filter, the index has none) and the key is deleted
/// (query configs and filters follow the override records, whatever the index's settings
/// record, rejected or not).
fn removed_overrides(
    keys: &BTreeMap<KvKey, Wanted>,
    landed: &[Landed],
    indexes: &[IndexRef],
) -> Vec<(KvKey, IndexRef)> {
    (landed.iter().map(|landed| &landed.key))
        .filter(|key| key.namespace == Namespace::QueryConfigs && !keys.contains_key(*key))
        .filter_map(|key| {
            let index = (indexes.iter()).find(|index| {
                key.key.starts_with(&query_config_prefix(index)) || *key == filter_key(index)
            })?;
            Some((key.clone(), index.clone()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::memory::MemoryKv;
    use crate::pipeline::exporter::tests::exporter;
    use crate::pipeline::records::{decode_as_written, decode_record};
    use serde_json::json;
    use std::time::Duration;

    fn insert(index: &str, shop: Option<&str>) -> ChangeRecord {
        let keys = json!({"pk": {"S": "a"}, "sk": {"S": format!("INDEX#{index}")}});
        let mut image = keys.clone();
        image["index_endpoint"] = json!({"S": "https://idx"});
        if let Some(shop) = shop {
            image["shop_id"] = json!({"S": shop});
        }
        let record = json!({"eventID": "e", "eventName": "INSERT", "awsRegion": "r",
            "dynamodb": {"Keys": keys, "NewImage": image, "SequenceNumber": "1", "SizeBytes": 1,
                         "StreamViewType": "NEW_IMAGE"}});
        decode_as_written(&record.to_string(), "DEFAULT_CONFIGS")
    }

    fn landed(key: KvKey) -> Landed {
        let index = IndexRef::new("a", "i");
        Landed {
            key,
            fails: vec![index.clone()],
            index,
            digest: None,
        }
    }

    #[test]
    fn each_landed_key_is_decided_by_the_index_as_the_table_holds_it_now() {
        let index = IndexRef::new("a", "i");
        const S: &str = "s.myshopify.com";
        const T: &str = "t.myshopify.com";
        let shop = |s: &str| KvKey::settings(s);
        let shops = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        // (the index now, its keys that landed, the shops they are on)
        let cases = [
            // Still at its shop (the plan keeps it), or moved from `s` to `t` (`s` given up).
            (Some(S), vec![KvKey::index(&index), shop(S)], shops(&[S])),
            (Some(T), vec![KvKey::index(&index), shop(S)], shops(&[S])),
            // Gone from the table: removed, giving up the shop key it had.
            (None, vec![KvKey::index(&index), shop(S)], shops(&[S])),
            (None, vec![KvKey::index(&index)], shops(&[])),
        ];
        for (now, keys, expected) in cases {
            let removed = now.is_none();
            let recheck = Recheck {
                keys: keys.into_iter().map(landed).collect(),
                settings: !removed,
                records: now.map(|now| insert("i", Some(now))).into_iter().collect(),
            };
            let (changes, shops) = as_changes(&index, &recheck);
            assert_eq!(changes.len(), 1);
            let is_remove = matches!(changes[0].change, Some(Change::RemoveIndex { .. }));
            assert_eq!(is_remove, removed, "{now:?}");
            // Every shop landed stands for what the ledger records: what it no longer claims
            // is given up.
            assert_eq!(shops, expected, "{now:?}");
        }
    }

    #[test]
    fn an_override_key_or_filter_no_longer_planned_is_deleted_whatever_its_index_s_settings() {
        let index = IndexRef::new("a", "i");
        let qcfg = KvKey::query_config(&index, "shoes");
        let filter = filter_key(&index);
        let delete = Wanted {
            want: Want::Delete,
            checked_as: index.clone(),
            by: index.clone(),
            derived: true,
        };
        let landed = [landed(qcfg.clone()), landed(filter.clone())];
        let indexes = [index.clone()];
        // The index's own key: written, deleted, or kept for an alias (not planned).
        for own in [Some(delete.clone()), None] {
            let ops: BTreeMap<KvKey, Wanted> = (own.into_iter())
                .map(|op| (KvKey::index(&index), op))
                .collect();
            let deletes = removed_overrides(&ops, &landed, &indexes);
            let of = index.clone();
            assert_eq!(deletes, [(qcfg.clone(), of.clone()), (filter.clone(), of)]);
        }
        // Still planned (its override is in the table): not deleted.
        let ops = BTreeMap::from([(qcfg.clone(), delete.clone()), (filter.clone(), delete)]);
        assert!(removed_overrides(&ops, &landed, &indexes).is_empty());
    }

    #[tokio::test]
    async fn an_operator_s_write_of_an_index_the_table_no_longer_holds_is_deleted_again() {
        // The table (empty) no longer holds the index the operator read a moment ago.
        let exporter = exporter(MemoryKv::default());
        let deadline = Instant::now() + Duration::from_secs(10);
        let records = vec![insert("gone", Some("shop-1.myshopify.com"))];

        let report = exporter.export(records, Run::OPERATOR, deadline).await;

        assert!(exporter.kv.values.lock().unwrap().is_empty());
        let mut deleted: Vec<&str> = report.deleted.iter().map(|k| k.key.as_str()).collect();
        deleted.sort();
        assert_eq!(deleted, ["a-gone", "shop-1.myshopify.com"]);
        assert_eq!(report.written.len(), 0);
        assert_eq!(report.records[0].outcome, Outcome::Exported);
    }

    #[tokio::test]
    async fn the_stream_s_own_keys_are_not_checked_against_the_table() {
        // Its record is the newest word on the item: a later change is a later record.
        let exporter = exporter(MemoryKv::default());
        let deadline = Instant::now() + Duration::from_secs(10);
        let raw = json!({"eventID": "1", "eventName": "INSERT", "awsRegion": "r", "dynamodb": {
            "Keys": {"pk": {"S": "a"}, "sk": {"S": "INDEX#new"}}, "SequenceNumber": "1",
            "SizeBytes": 1}});
        let record = decode_record(&raw.to_string(), "DEFAULT_CONFIGS");
        let (key, image) = (
            record.item_key().unwrap(),
            json!({"pk": {"S": "a"},
            "sk": {"S": "INDEX#new"}, "index_endpoint": {"S": "https://idx"}}),
        );
        let item = crate::dynamo::item_from_dynamodb_json(image).unwrap();
        let key = (key.pk().to_owned(), key.sk().to_owned());
        exporter
            .table
            .items
            .lock()
            .unwrap()
            .insert(key, item.clone());

        // The batch's own read finds the item; a read after it finds another endpoint: a
        // check would write it again.
        let other = json!({"pk": {"S": "a"}, "sk": {"S": "INDEX#new"},
            "index_endpoint": {"S": "https://other"}});
        let other = crate::dynamo::item_from_dynamodb_json(other).unwrap();
        (exporter.table.settings_reads.lock().unwrap()).extend([item, other]);
        let report = exporter.export_stream(vec![record], deadline).await;

        let value = exporter.kv.values.lock().unwrap()["a-new"].clone();
        assert!(value.contains("https://idx"), "{value}");
        assert_eq!(report.written.len(), 1);
        assert_eq!(
            exporter.table.settings_reads.lock().unwrap().len(),
            1,
            "not read"
        );
    }
}
