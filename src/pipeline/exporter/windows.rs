//! The windows of docs/contract.md ("Concurrent writers"), each forced in memory: two writers
//! share one exporter's KV, table and ledger (as two invocations share the real ones), and one
//! of them is held at the step the window opens at while the other runs.
#![cfg(test)]

use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use super::tests::{exporter, table_after};
use super::{Exporter, Run};
use crate::adapters::memory::{CountingTable, MemoryKv, MemoryLedger, SameKey};
use crate::domain::kv::KvKey;
use crate::domain::IndexRef;
use crate::pipeline::records::decode_record;
use crate::ports::Referred;
use crate::report::{BatchReport, Outcome};

type MemoryExporter = Exporter<(MemoryKv, SameKey, CountingTable, MemoryLedger)>;

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(10)
}

/// A stream record of index `name` of account `a` as `event` leaves it (`NEW_IMAGE`).
fn record(event: &str, name: &str, endpoint: &str, shop: Option<&str>) -> Value {
    let keys = json!({"pk": {"S": "a"}, "sk": {"S": format!("INDEX#{name}")}});
    let mut image = keys.clone();
    image["index_endpoint"] = json!({ "S": endpoint });
    if let Some(shop) = shop {
        image["shop_id"] = json!({ "S": shop });
    }
    json!({"eventID": "e", "eventName": event, "awsRegion": "r",
        "dynamodb": {"Keys": keys, "NewImage": image, "SequenceNumber": "1", "SizeBytes": 1,
                     "StreamViewType": "NEW_IMAGE"}})
}

/// The stream's batch: the table changed as its records say, then exported.
async fn stream(exporter: &MemoryExporter, batch: Vec<Value>) -> BatchReport {
    table_after(&exporter.table, &batch);
    let records = (batch.iter())
        .map(|r| decode_record(&r.to_string(), "DEFAULT_CONFIGS"))
        .collect();
    exporter.export_stream(records, deadline()).await
}

/// The stream's batch, every record of it exported.
async fn exported(exporter: &MemoryExporter, batch: Vec<Value>) {
    let report = stream(exporter, batch).await;
    assert!(failures(&report).is_empty(), "{:?}", failures(&report));
}

/// An operator's re-export of the index as the table holds it when asked.
async fn reexport(exporter: &MemoryExporter, index: &IndexRef) -> BatchReport {
    let record = exporter.settings_of([index], deadline()).await.unwrap();
    let record = record
        .get(index)
        .cloned()
        .expect("the index is in the table");
    exporter
        .export(vec![record], Run::OPERATOR, deadline())
        .await
}

/// An INSERT of index `name`, whose enabled read alias reads `target` (an index id).
fn aliasing(name: &str, target: &str) -> Value {
    let mut reader = record("INSERT", name, &format!("https://{name}"), None);
    reader["dynamodb"]["NewImage"]["index_aliases"] = json!({"M": {"doc_reads": {"M": {
        "enabled": {"BOOL": true},
        "targets": {"L": [{"M": {"index_id": {"S": target}, "weight": {"N": "1"}}}]}}}}});
    reader
}

/// The records not exported.
fn failures(report: &BatchReport) -> Vec<&Outcome> {
    let outcomes = report.records.iter().map(|r| &r.outcome);
    outcomes.filter(|o| **o != Outcome::Exported).collect()
}

/// Row "a checked key between its write landing and its check's write": an operator's write
/// computed from the table before the stream's newer word lands after it; its check reads the
/// table again and writes the newer value back.
#[tokio::test]
async fn an_operator_s_older_write_landing_last_is_written_again_by_its_check() {
    let exporter = exporter(MemoryKv::default());
    let index = IndexRef::new("a", "i");
    let old = record("INSERT", "i", "https://old", None);
    exported(&exporter, vec![old]).await;

    let (held, release) = exporter.kv.hold(&KvKey::index(&index).key);
    let operator = reexport(&exporter, &index);
    let newer = async {
        held.notified().await;
        let modify = record("MODIFY", "i", "https://new", None);
        let report = stream(&exporter, vec![modify]).await;
        let after_stream = exporter.kv.value("a-i").unwrap();
        release.notify_one();
        (report, after_stream)
    };
    let (operator, (streamed, after_stream)) = tokio::join!(operator, newer);

    assert!(failures(&streamed).is_empty());
    assert!(after_stream.contains("https://new"), "{after_stream}");
    assert!(failures(&operator).is_empty(), "{:?}", failures(&operator));
    let last = exporter.kv.value("a-i").unwrap();
    assert!(
        last.contains("https://new"),
        "the older write stayed: {last}"
    );
}

/// Row "a shop recorded for an index that its keys are no longer on": the ledger refused the
/// stream's shrink after a shop move, so the old shop stays recorded; another index takes the
/// shop; the first index's next record gives the shop up again, to its claimer, never deleting
/// the claimer's key, and the ledger forgets it.
#[tokio::test]
async fn a_shop_left_recorded_by_a_refused_shrink_is_given_up_by_the_next_record() {
    let exporter = exporter(MemoryKv::default());
    let (i, s1) = (IndexRef::new("a", "i"), "s1.myshopify.com");
    let insert = record("INSERT", "i", "https://i", Some(s1));
    exported(&exporter, vec![insert]).await;

    exporter.ledger.refuse_shrinks.store(true, Ordering::SeqCst);
    let moved = record("MODIFY", "i", "https://i", Some("s2.myshopify.com"));
    exported(&exporter, vec![moved]).await;
    exporter
        .ledger
        .refuse_shrinks
        .store(false, Ordering::SeqCst);
    let recorded = exporter.ledger.refs.lock().unwrap()[&i].shops.clone();
    assert!(
        recorded.contains(s1),
        "the refused shrink left {recorded:?}"
    );
    assert_eq!(
        exporter.kv.value(s1),
        None,
        "the move deleted the old shop key"
    );

    let taken = record("INSERT", "j", "https://j", Some(s1));
    exported(&exporter, vec![taken]).await;
    let next = record("MODIFY", "i", "https://i2", Some("s2.myshopify.com"));
    exported(&exporter, vec![next]).await;

    let shop = exporter.kv.value(s1).expect("the claimer's key stays");
    assert!(shop.contains("https://j"), "{shop}");
    let recorded = exporter.ledger.refs.lock().unwrap()[&i].shops.clone();
    assert!(!recorded.contains(s1), "still recorded: {recorded:?}");
    let back = exporter.ledger.back.lock().unwrap().clone();
    assert!(!back.contains(&(Referred::Shop(s1.into()), i.clone())));
}

/// Row "a check that cannot read the table after the writes landed": a shop move's delete of
/// the old shop key lands after another index took the shop, and the check that would hand the
/// key over cannot read; the record is reported, the shop stays recorded, and Lambda's replay of
/// the record gives it up again, to its claimer.
#[tokio::test]
async fn a_replay_hands_over_a_shop_key_whose_check_could_not_read() {
    let exporter = exporter(MemoryKv::default());
    let s1 = "s1.myshopify.com";
    let insert = record("INSERT", "i", "https://i", Some(s1));
    exported(&exporter, vec![insert]).await;

    let moved = record("MODIFY", "i", "https://i", Some("s2.myshopify.com"));
    let (held, release) = exporter.kv.hold(s1);
    let leaving = stream(&exporter, vec![moved.clone()]);
    let taking = async {
        held.notified().await;
        let taken = record("INSERT", "j", "https://j", Some(s1));
        let report = stream(&exporter, vec![taken]).await;
        exporter.table.unreadable.store(true, Ordering::SeqCst);
        release.notify_one();
        report
    };
    let (left, taken) = tokio::join!(leaving, taking);
    exporter.table.unreadable.store(false, Ordering::SeqCst);
    assert!(failures(&taken).is_empty());
    assert_eq!(failures(&left).len(), 1, "the move's record is reported");
    assert_eq!(
        exporter.kv.value(s1),
        None,
        "the delete landed after the claimer's write"
    );

    // Lambda's replay of the reported record.
    let replay = stream(&exporter, vec![moved]).await;
    assert!(failures(&replay).is_empty(), "{:?}", failures(&replay));
    let shop = exporter.kv.value(s1).expect("handed to its claimer");
    assert!(shop.contains("https://j"), "{shop}");
}

/// Index `i` moved off `s1` and rejected: its endpoint not https, (rejected only as its API
/// key is looked up) its cell without an API key, or (only as it is planned) its shop id no
/// shop key.
fn moved_and_rejected() -> [Value; 3] {
    let no_https = record("MODIFY", "i", "http://i", Some("s2.myshopify.com"));
    let mut no_api_key = record("MODIFY", "i", "https://i", Some("s2.myshopify.com"));
    no_api_key["dynamodb"]["NewImage"]["cell"] = json!({"S": "gone"});
    let no_shop_key = record("MODIFY", "i", "https://i", Some("Shop-2.myshopify.com"));
    [no_https, no_api_key, no_shop_key]
}

/// Row "a checked key between its write landing and its check's write", the giving index's
/// record rejected by the time its check reads: a shop move's delete of the old shop key lands
/// after another index took the shop; the check gives the shop up all the same (to its
/// claimer), and leaves the index's own key as its rejected record does (seed 28675). So when
/// it is rejected only as it is planned: its account has no API key in its cell now (seed
/// 11460 of the hostile workload).
#[tokio::test]
async fn a_shop_given_up_by_an_index_rejected_since_goes_to_its_claimer() {
    let s1 = "s1.myshopify.com";
    for invalid in moved_and_rejected() {
        let exporter = exporter(MemoryKv::default());
        exported(
            &exporter,
            vec![record("INSERT", "i", "https://i", Some(s1))],
        )
        .await;

        let moved = record("MODIFY", "i", "https://i", Some("s2.myshopify.com"));
        let (held, release) = exporter.kv.hold(s1);
        let leaving = stream(&exporter, vec![moved]);
        let taking = async {
            held.notified().await;
            exported(
                &exporter,
                vec![record("INSERT", "j", "https://j", Some(s1))],
            )
            .await;
            // `i` is rejected by the time its check reads it.
            table_after(&exporter.table, std::slice::from_ref(&invalid));
            release.notify_one();
        };
        let (left, ()) = tokio::join!(leaving, taking);

        assert!(failures(&left).is_empty(), "{:?}", failures(&left));
        let shop = exporter.kv.value(s1).expect("handed to its claimer");
        assert!(shop.contains("https://j"), "{invalid}: {shop}");
        let own = exporter
            .kv
            .value("a-i")
            .expect("the rejected index's own key stays");
        assert!(own.contains("https://i"), "{own}");
    }
}

/// An operator's run of an index rejected now gives up what it no longer claims, as the
/// stream's record does: the table moved the index off `s1` and made it invalid (no https, or
/// no API key in its cell) before any record of it was exported (a batch that failed, a
/// record lost); the re-export is refused, but `s1`, which no one claims now, is deleted, and
/// the index's own key stays as it was.
#[tokio::test]
async fn an_operator_s_run_of_a_rejected_index_gives_up_what_it_no_longer_claims() {
    let s1 = "s1.myshopify.com";
    for invalid in moved_and_rejected() {
        let exporter = exporter(MemoryKv::default());
        let first = vec![record("INSERT", "i", "https://i", Some(s1))];
        exported(&exporter, first).await;
        table_after(&exporter.table, std::slice::from_ref(&invalid));

        let report = reexport(&exporter, &IndexRef::new("a", "i")).await;

        let outcome = &report.records[0].outcome;
        assert!(matches!(outcome, Outcome::Rejected(_)), "{outcome:?}");
        assert_eq!(exporter.kv.value(s1), None, "{invalid}");
        let own = exporter.kv.value("a-i").expect("the index's own key stays");
        assert!(own.contains("https://i"), "{own}");
    }
}

/// Row "a writer whose check finds the table changed three rounds running": the index changes
/// under every read; after three writes again the record fails ("run again").
#[tokio::test]
async fn a_key_the_table_changes_under_every_round_fails_its_record_after_three() {
    let exporter = exporter(MemoryKv::default());
    let item = |endpoint: &str| {
        let image = json!({"pk": {"S": "a"}, "sk": {"S": "INDEX#flapping"},
            "index_endpoint": {"S": format!("https://{endpoint}.example")}});
        crate::dynamo::item_from_dynamodb_json(image).unwrap()
    };
    let reads = ["a", "b", "c", "d", "e"].map(item);
    exporter.table.settings_reads.lock().unwrap().extend(reads);
    let index = IndexRef::new("a", "flapping");

    let report = reexport(&exporter, &index).await;

    let outcome = &report.records[0].outcome;
    assert!(
        matches!(outcome, Outcome::Failed(why) if why.contains("run again")),
        "{outcome:?}"
    );
    let value = exporter.kv.value("a-flapping").unwrap();
    assert!(value.contains("https://d.example"), "{value}");
    assert!(
        exporter.table.settings_reads.lock().unwrap().is_empty(),
        "five reads: the operator's, then four checks"
    );
}

/// Row "the ledger cannot be read or written": an intent the ledger refuses leaves the record
/// reported for retry and nothing of it in KV; the replay exports it.
#[tokio::test]
async fn a_record_whose_intent_cannot_be_recorded_is_retried_never_exported_without() {
    let exporter = exporter(MemoryKv::default());
    let s1 = "s1.myshopify.com";
    let insert = record("INSERT", "i", "https://i", Some(s1));

    exporter.ledger.refuse_intents.store(true, Ordering::SeqCst);
    let refused = stream(&exporter, vec![insert.clone()]).await;
    exporter
        .ledger
        .refuse_intents
        .store(false, Ordering::SeqCst);
    assert!(matches!(failures(&refused)[..], [Outcome::Failed(_)]));
    assert_eq!(
        (exporter.kv.value("a-i"), exporter.kv.value(s1)),
        (None, None)
    );

    let replay = stream(&exporter, vec![insert]).await;
    assert!(failures(&replay).is_empty(), "{:?}", failures(&replay));
    assert!(exporter.kv.value(s1).is_some());
    let recorded = exporter.ledger.refs.lock().unwrap()[&IndexRef::new("a", "i")].clone();
    assert!(recorded.shops.contains(s1), "{recorded:?}");
}

/// Before the migration marked the ledger's references complete, a stream batch is exported
/// with no guess: every record is reported for retry, naming the procedure, and nothing is
/// written; once they are, the same batch is exported.
#[tokio::test]
async fn a_stream_batch_before_the_migration_is_retried_whole_naming_it() {
    let exporter = exporter(MemoryKv::default());
    exporter.ledger.complete.store(false, Ordering::SeqCst);
    let batch = vec![record("INSERT", "p", "https://i", Some("s.myshopify.com"))];

    let report = stream(&exporter, batch.clone()).await;

    let failed = failures(&report);
    assert_eq!(failed.len(), 1, "{:?}", report.records);
    assert!(
        matches!(&report.records[0].outcome, Outcome::Failed(why) if why.contains("make migrate")),
        "{:?}",
        report.records[0].outcome
    );
    assert_eq!(report.kv_requests, 0);
    assert!(exporter.kv.value("a-p").is_none());
    exporter.ledger.complete.store(true, Ordering::SeqCst);
    exported(&exporter, batch).await;
    assert!(exporter.kv.value("a-p").is_some());
}

/// The record `record` makes, as a `NEW_AND_OLD_IMAGES` stream carries it: with the index's
/// old image (its shop `old_shop`), which the function does not read.
fn with_old_image(mut record: Value, old_shop: Option<&str>) -> Value {
    let change = &mut record["dynamodb"];
    let mut old = change["Keys"].clone();
    old["index_endpoint"] = json!({"S": "https://old.example"});
    if let Some(shop) = old_shop {
        old["shop_id"] = json!({ "S": shop });
    }
    change["OldImage"] = old;
    change["StreamViewType"] = json!("NEW_AND_OLD_IMAGES");
    record
}

/// Intents never lose to a shrink (issue 62, 5): an operator's write of the index's old shop key
/// (its intent found the shop recorded already) is held while the stream moves the index away
/// and shrinks; the write lands last and the operator's check cannot read. Its error names the
/// key; its intent is recorded again; and a rerun gives the old shop up, on either view type.
#[tokio::test]
async fn an_operator_s_write_that_lands_after_the_stream_s_shrink_is_cleared_by_its_rerun() {
    for old_image in [false, true] {
        let exporter = exporter(MemoryKv::default());
        let (i, s1, s2) = (
            IndexRef::new("a", "i"),
            "s1.myshopify.com",
            "s2.myshopify.com",
        );
        exported(
            &exporter,
            vec![record("INSERT", "i", "https://i", Some(s1))],
        )
        .await;

        let (held, release) = exporter.kv.hold(s1);
        let operator = reexport(&exporter, &i);
        let moving = async {
            held.notified().await;
            let mut moved = record("MODIFY", "i", "https://i", Some(s2));
            if old_image {
                moved = with_old_image(moved, Some(s1));
            }
            exported(&exporter, vec![moved]).await;
            assert_eq!(exporter.kv.value(s1), None, "the move gave the shop up");
            exporter.table.unreadable.store(true, Ordering::SeqCst);
            release.notify_one();
        };
        let (operator, ()) = tokio::join!(operator, moving);
        exporter.table.unreadable.store(false, Ordering::SeqCst);

        let outcome = &operator.records[0].outcome;
        assert!(
            matches!(outcome, Outcome::Failed(why) if why.contains(&format!("`{s1}`"))),
            "the error names the old shop key: {outcome:?}"
        );
        assert!(
            exporter.kv.value(s1).is_some(),
            "the window: the write landed last"
        );
        let recorded = exporter.ledger.refs.lock().unwrap()[&i].shops.clone();
        assert!(
            recorded.contains(s1),
            "{old_image}: its intent is recorded: {recorded:?}"
        );

        let rerun = reexport(&exporter, &i).await;
        assert!(failures(&rerun).is_empty(), "{:?}", failures(&rerun));
        assert_eq!(
            exporter.kv.value(s1),
            None,
            "{old_image}: the rerun gave the shop up"
        );
        assert!(exporter.kv.value(s2).is_some() && exporter.kv.value("a-i").is_some());
    }
}

/// A dropped alias target whose removal fails (docs/contract.md, "Alias deletion safety"): an
/// index's two records in one batch both drop an alias to a removed target (kept for it); the
/// removal, on the index's behalf, cannot read the target's references, and the index's records
/// are reported (a record's outcome is its index's). The ledger keeps the alias (the replay
/// settles the index), so the replay removes the target (seed 50153: the shrink took the alias
/// out and the target's keys stayed).
#[tokio::test]
async fn a_replay_removes_a_dropped_alias_target_whose_removal_failed() {
    let exporter = exporter(MemoryKv::default());
    let s1 = "s1.myshopify.com";
    let reader = aliasing("reader", "a-target");
    let target = record("INSERT", "target", "https://t", Some(s1));
    exported(&exporter, vec![target.clone(), reader]).await;
    let mut removed = target;
    removed["eventName"] = json!("REMOVE");
    let kept = stream(&exporter, vec![removed]).await;
    assert!(matches!(kept.records[0].outcome, Outcome::Kept { .. }));
    assert!(
        exporter.kv.value("a-target").is_some(),
        "kept: an alias reads it"
    );

    let target = IndexRef::new("a", "target");
    exporter.ledger.unreadable.lock().unwrap().insert(target);
    let dropping = vec![
        record("MODIFY", "reader", "https://r2", None),
        record("MODIFY", "reader", "https://r3", None),
    ];
    let report = stream(&exporter, dropping.clone()).await;
    let outcomes: Vec<&Outcome> = report.records.iter().map(|r| &r.outcome).collect();
    assert!(
        matches!(outcomes[..], [Outcome::Failed(_), Outcome::Failed(_)]),
        "{outcomes:?}"
    );
    let holder = exporter.ledger.refs.lock().unwrap()[&IndexRef::new("a", "reader")].clone();
    assert!(holder.targets.contains("a-target"), "{holder:?}");

    exporter.ledger.unreadable.lock().unwrap().clear();
    let replay = stream(&exporter, dropping[1..].to_vec()).await;
    assert!(failures(&replay).is_empty(), "{:?}", failures(&replay));
    assert_eq!(
        (exporter.kv.value("a-target"), exporter.kv.value(s1)),
        (None, None)
    );
}

/// A shop handed to a claimer whose own removal runs before the handing write lands (seed
/// 145927): the claimer's shard deletes the shop and shrinks it out of the claimer's record;
/// the handing write lands after, and its check cannot read, so its record is reported. By the
/// replay an alias reads the removed index: kept, it leaves the shop as it is. The batch
/// recorded the handed shop on the claimer again, so a new index of the claimer's name gives
/// it up, on either view type.
#[tokio::test]
async fn a_shop_handed_to_a_claimer_removed_before_the_write_lands_stays_recorded() {
    for old_image in [false, true] {
        let exporter = exporter(MemoryKv::default());
        let (j, s1) = (IndexRef::new("a", "j"), "s1.myshopify.com");
        let claimer = record("INSERT", "j", "https://j", Some(s1));
        let giver = record("INSERT", "i", "https://i", Some(s1));
        exported(&exporter, vec![claimer.clone(), giver.clone()]).await;
        assert!(exporter.kv.value(s1).unwrap().contains("https://i"));

        let removal = |mut removed: Value| {
            removed["eventName"] = json!("REMOVE");
            match old_image {
                true => with_old_image(removed, Some(s1)),
                false => removed,
            }
        };
        let (held, release) = exporter.kv.hold(s1);
        let handing = stream(&exporter, vec![removal(giver.clone())]);
        let removing = async {
            held.notified().await;
            exported(&exporter, vec![removal(claimer)]).await;
            assert_eq!(
                exporter.kv.value(s1),
                None,
                "the claimer's removal deleted it"
            );
            exporter.table.unreadable.store(true, Ordering::SeqCst);
            release.notify_one();
        };
        let (handed, ()) = tokio::join!(handing, removing);
        exporter.table.unreadable.store(false, Ordering::SeqCst);
        assert_eq!(failures(&handed).len(), 1, "the check could not read");
        let shop = exporter
            .kv
            .value(s1)
            .expect("the window: the handing write landed last");
        assert!(shop.contains("https://j"), "{shop}");
        let recorded = exporter.ledger.refs.lock().unwrap().get(&j).cloned();
        assert!(
            recorded.is_some_and(|r| r.shops.contains(s1)),
            "{old_image}: the handed shop is recorded on its claimer again"
        );

        let reader = aliasing("reader", "a-i");
        exported(&exporter, vec![reader]).await;
        let replay = stream(&exporter, vec![removal(giver)]).await;
        assert!(matches!(replay.records[0].outcome, Outcome::Kept { .. }));
        assert!(exporter.kv.value(s1).unwrap().contains("https://j"));

        let new = record("INSERT", "j", "https://j2", Some("s2.myshopify.com"));
        exported(&exporter, vec![new]).await;
        assert_eq!(
            exporter.kv.value(s1),
            None,
            "{old_image}: the new index gave it up"
        );
    }
}

/// A verify repair's shop put landing after the index's removal (seed 6590): the repair
/// records its intent and puts the shop, held; the stream removes the index (its shop deleted
/// and shrunk out of its references), and an alias to it is made; the put lands. Its check
/// finds the index kept for the alias and leaves the shop as it is, recorded for the index
/// again, so the alias's drop removes the index and gives the shop up.
#[tokio::test]
async fn a_repair_s_shop_put_left_for_an_index_kept_since_stays_recorded_for_it() {
    let exporter = exporter(MemoryKv::default());
    let (i, s3) = (IndexRef::new("a", "i"), "s3.myshopify.com");
    let index = record("INSERT", "i", "https://i", Some(s3));
    exported(&exporter, vec![index.clone()]).await;
    exporter.kv.values.lock().unwrap().remove(s3);

    let (held, release) = exporter.kv.hold(s3);
    let verify = json!({"mode": "verify", "system_account_id": "a", "index_name": "i",
                        "repair": true});
    let repair = crate::entry::route(&exporter, verify.to_string(), deadline());
    let removing = async {
        held.notified().await;
        let mut removed = index;
        removed["eventName"] = json!("REMOVE");
        exported(&exporter, vec![removed]).await;
        assert_eq!(exporter.kv.value(s3), None, "the removal deleted it");
        let reader = aliasing("reader", "a-i");
        exported(&exporter, vec![reader]).await;
        release.notify_one();
    };
    let (repaired, ()) = tokio::join!(repair, removing);
    assert!(repaired.is_ok(), "{repaired:?}");
    let shop = exporter
        .kv
        .value(s3)
        .expect("the window: the put landed last");
    assert!(shop.contains("https://i"), "{shop}");
    let recorded = exporter.ledger.refs.lock().unwrap().get(&i).cloned();
    assert!(
        recorded.is_some_and(|r| r.shops.contains(s3)),
        "the shop left for the kept index is recorded for it"
    );

    exported(
        &exporter,
        vec![record("MODIFY", "reader", "https://r2", None)],
    )
    .await;
    assert_eq!(
        exporter.kv.value("a-i"),
        None,
        "the alias's drop removed the index"
    );
    assert_eq!(exporter.kv.value(s3), None, "and gave its shop up");
}

/// A shop handed to a claimer that gives it up before the write lands (seed 2177 of the varied
/// workload, on three shards): `i` and `j` claim s3; a reader aliases `i`, and `i`'s removal,
/// kept for it, hands s3 to `j`, held. `j` drops its shop meanwhile (s3 deleted, shrunk out of
/// its references), then the write lands. Its check reads s3 as `j`'s key (the value's index,
/// not the kept index that handed it over) and deletes it: no index claims it.
#[tokio::test]
async fn a_shop_handed_to_a_claimer_that_drops_it_before_the_write_lands_is_deleted() {
    for old_image in [false, true] {
        let exporter = exporter(MemoryKv::default());
        let (j, s3) = (IndexRef::new("a", "j"), "s3.myshopify.com");
        let giver = record("INSERT", "i", "https://i", Some(s3));
        let claimer = record("INSERT", "j", "https://j", Some(s3));
        exported(&exporter, vec![giver.clone(), claimer]).await;
        exported(&exporter, vec![aliasing("reader", "a-i")]).await;

        let mut removal = giver;
        removal["eventName"] = json!("REMOVE");
        let mut dropping = record("MODIFY", "j", "https://j2", None);
        if old_image {
            removal = with_old_image(removal, Some(s3));
            dropping = with_old_image(dropping, Some(s3));
        }
        let (held, release) = exporter.kv.hold(s3);
        let handing = stream(&exporter, vec![removal]);
        let dropping = async {
            held.notified().await;
            exported(&exporter, vec![dropping]).await;
            assert_eq!(exporter.kv.value(s3), None, "the claimer's drop deleted it");
            let recorded = exporter.ledger.refs.lock().unwrap().get(&j).cloned();
            assert!(
                recorded.is_some_and(|r| r.shops.is_empty()),
                "and shrank it"
            );
            release.notify_one();
        };
        let (handed, ()) = tokio::join!(handing, dropping);
        assert!(matches!(handed.records[0].outcome, Outcome::Kept { .. }));
        assert_eq!(
            exporter.kv.value(s3),
            None,
            "{old_image}: the handing write's check deleted what landed last"
        );
        assert!(
            exporter.kv.value("a-i").is_some(),
            "the kept index's own key stays"
        );
    }
}

/// A dropped alias target whose id names more than one index (seed 1479 of the wide workload):
/// `(a-x, z)` reads `a-x-x-y`, which no index is yet and nothing recorded; its drop removes the
/// id's own key on behalf of one index the id can name, `(a, x-x-y)`, and that delete is held
/// while `(a-x, x-y)`, whose id it is too, is created and written. The delete lands last; the
/// check reads every index the id can name and writes `(a-x, x-y)`'s value back.
#[tokio::test]
async fn a_dropped_target_s_delete_landing_after_another_index_of_its_id_came_is_undone() {
    let at = |account: &str, name: &str, event: &str, alias: Option<&str>| {
        let mut record = record(event, name, &format!("https://{account}-{name}"), None);
        record["dynamodb"]["Keys"]["pk"] = json!({ "S": account });
        record["dynamodb"]["NewImage"]["pk"] = json!({ "S": account });
        if let Some(target) = alias {
            record["dynamodb"]["NewImage"]["index_aliases"] =
                aliasing(name, target)["dynamodb"]["NewImage"]["index_aliases"].clone();
        }
        record
    };
    let exporter = exporter(MemoryKv::default());
    exported(&exporter, vec![at("a-x", "z", "INSERT", Some("a-x-x-y"))]).await;

    let (held, release) = exporter.kv.hold("a-x-x-y");
    let dropping = stream(&exporter, vec![at("a-x", "z", "MODIFY", None)]);
    let creating = async {
        held.notified().await;
        exported(&exporter, vec![at("a-x", "x-y", "INSERT", None)]).await;
        assert!(exporter.kv.value("a-x-x-y").is_some(), "written");
        release.notify_one();
    };
    let (dropped, ()) = tokio::join!(dropping, creating);
    assert!(failures(&dropped).is_empty(), "{:?}", failures(&dropped));
    let value = exporter.kv.value("a-x-x-y");
    assert!(
        value.is_some_and(|v| v.contains(r#""index_name":"x-y""#)),
        "the check wrote the index's value back"
    );
}

/// An index kept for a rejected record's alias, read fail closed (seed 8291 of the wide
/// workload): `r`'s record names `a-i` with a weight stored as a string, so it is rejected and
/// records nothing of its own; the ledger's set of `a-i` names `r` all the same (an extra
/// member, as a shrink that read before a reconcile's add leaves it). `i`'s removal finds `r`
/// reading `i` and keeps `i`; it records the alias on `r`, so `r`'s next record, which drops
/// it, removes `i` again.
#[tokio::test]
async fn an_index_kept_for_a_rejected_record_s_alias_goes_when_the_alias_does() {
    let exporter = exporter(MemoryKv::default());
    let r = IndexRef::new("a", "r");
    let removal = aliased_by_a_rejected_reader(&exporter, &r).await;

    let removed = stream(&exporter, vec![removal]).await;
    assert!(matches!(removed.records[0].outcome, Outcome::Kept { .. }));
    assert!(exporter.kv.value("a-i").is_some(), "kept for the alias");
    let recorded = exporter.ledger.refs.lock().unwrap().get(&r).cloned();
    assert!(
        recorded.is_some_and(|refs| refs.targets.contains("a-i")),
        "recorded on r"
    );

    exported(&exporter, vec![record("MODIFY", "r", "https://r2", None)]).await;
    assert_eq!(
        exporter.kv.value("a-i"),
        None,
        "the alias's drop removed it"
    );
}

/// Row "a removed index kept for an alias whose holder dropped it ...", the stream's side
/// (seed 8291's window): `i`'s removal keeps `i` for rejected `r`, whose own item records
/// nothing; while its intent recording the alias on `r` is held, `r` drops the alias and its
/// batch, reading `r`'s item before the intent, finds nothing to remove again. The removal's
/// check, reading after its intent, finds no alias left and deletes `i`'s key.
#[tokio::test]
async fn an_index_kept_for_an_alias_dropped_before_its_intent_landed_is_deleted_by_its_check() {
    let exporter = std::sync::Arc::new(exporter(MemoryKv::default()));
    let removal = aliased_by_a_rejected_reader(&exporter, &IndexRef::new("a", "r")).await;

    let (held, release) = exporter.ledger.hold_intent();
    let remover = exporter.clone();
    let removing = tokio::spawn(async move { stream(&remover, vec![removal]).await });
    held.notified().await;
    exported(&exporter, vec![record("MODIFY", "r", "https://r2", None)]).await;
    assert!(
        exporter.kv.value("a-i").is_some(),
        "r's batch found nothing"
    );
    release.notify_one();
    let removed = removing.await.unwrap();

    assert!(
        matches!(removed.records[0].outcome, Outcome::Kept { .. }),
        "{:?}",
        removed.records[0].outcome
    );
    assert_eq!(exporter.kv.value("a-i"), None, "its check deleted it");
}

/// Index `i` exported, and `r`'s record reading it rejected (a weight stored as a string: its
/// aliases read fail closed, nothing of its own recorded), named in the ledger's set of who
/// aliases `i` (an extra member, as a shrink that read before a reconcile's add leaves it).
/// Answers `i`'s REMOVE.
async fn aliased_by_a_rejected_reader(exporter: &MemoryExporter, r: &IndexRef) -> Value {
    let set = (Referred::Alias("a-i".into()), r.clone());
    exporter.ledger.back.lock().unwrap().insert(set);
    let index = record("INSERT", "i", "https://i", None);
    exported(exporter, vec![index.clone()]).await;
    let mut reader = aliasing(&r.name, "a-i");
    let aliases = &mut reader["dynamodb"]["NewImage"]["index_aliases"];
    aliases["M"]["doc_reads"]["M"]["targets"]["L"][0]["M"]["weight"] = json!({"S": "1"});
    let rejected = stream(exporter, vec![reader]).await;
    assert!(matches!(rejected.records[0].outcome, Outcome::Rejected(_)));
    let mut removal = index;
    removal["eventName"] = json!("REMOVE");
    removal
}

/// Index `a/i` exported with shop `shop`, then removed with the ledger refusing the shrink, so
/// its record stays (what the reconcile's sweep is for): the shop key's value before.
async fn removed_with_its_record_left(exporter: &MemoryExporter, shop: &str) -> String {
    exported(
        exporter,
        vec![record("INSERT", "i", "https://i", Some(shop))],
    )
    .await;
    let value = exporter.kv.value(shop).expect("the shop key");
    exporter.ledger.refuse_shrinks.store(true, Ordering::SeqCst);
    exported(
        exporter,
        vec![record("REMOVE", "i", "https://i", Some(shop))],
    )
    .await;
    exporter
        .ledger
        .refuse_shrinks
        .store(false, Ordering::SeqCst);
    value
}

/// A whole-fleet reconcile repair, as an operator invokes it: its answer.
async fn reconcile(exporter: &MemoryExporter) -> Value {
    let payload = json!({"mode": "reconcile", "repair": true}).to_string();
    let answer = crate::entry::route(exporter, payload, deadline()).await;
    answer.expect("the pass completes")
}

/// Row "a removed index's record the stream could not take out" (the ledger's bound): a
/// REMOVE whose shrink the ledger refused leaves the record; a reconcile pass marks it, a pass
/// before the wait keeps it, an intent after the mark keeps it (the next pass marks it again),
/// and a pass once the mark is ripe takes the record out, on both sides.
#[tokio::test(start_paused = true)]
async fn a_removed_index_s_record_goes_once_its_mark_is_ripe_and_no_intent_came_since() {
    let exporter = exporter(MemoryKv::default());
    let (i, s1) = (IndexRef::new("a", "i"), "s1.myshopify.com");
    let value = removed_with_its_record_left(&exporter, s1).await;
    let recorded = || exporter.ledger.refs.lock().unwrap().get(&i).cloned();
    assert!(recorded().is_some(), "the refused shrink left the record");
    let wait = Duration::from_secs(crate::domain::SWEEP_AFTER_SECONDS);

    let first = reconcile(&exporter).await;
    assert_eq!(first["repaired"]["ledger_marked"], 1, "{first}");
    assert!(
        recorded().and_then(|r| r.sweep).is_some(),
        "{:?}",
        recorded()
    );
    let soon = reconcile(&exporter).await;
    assert_eq!(
        soon["repaired"]["ledger_swept"], 0,
        "before the wait: {soon}"
    );
    // A writer that read the index before its removal records its intent after the mark,
    // and its write of the shop lands only after the ripe mark's pass would have run.
    let intent = [(i.clone(), Referred::Shop(s1.into()))];
    crate::ports::Ledger::point_back(&exporter.ledger, &intent)
        .await
        .unwrap();
    tokio::time::sleep(wait).await;
    let second = reconcile(&exporter).await;
    assert_eq!(second["repaired"]["ledger_swept"], 0, "{second}");
    assert_eq!(
        second["repaired"]["ledger_marked"], 1,
        "marked again: {second}"
    );
    exporter.kv.values.lock().unwrap().insert(s1.into(), value);

    tokio::time::sleep(wait).await;
    let third = reconcile(&exporter).await;
    assert_eq!(third["repaired"]["ledger_swept"], 1, "{third}");
    assert_eq!(recorded(), None, "the record stayed");
    assert_eq!(exporter.kv.value(s1), None, "the late write stayed");
    let back = exporter.ledger.back.lock().unwrap().clone();
    assert!(!back.iter().any(|(_, index)| *index == i), "{back:?}");
}

/// Why a mark waits: a stream batch that read an index live has its shop key's write in flight
/// while the table removes the index, and reconcile passes run before the stream delivers the
/// REMOVE: the first marks the record, the next leaves it (not ripe), so the stream's own
/// REMOVE, after the write landed, finds the shop recorded and gives it up. Swept at once, the
/// record would be gone and the shop left serving the removed index (Session 51's seed 988).
#[tokio::test(start_paused = true)]
async fn a_write_in_flight_when_a_record_is_marked_lands_before_the_record_can_go() {
    let exporter = exporter(MemoryKv::default());
    let s1 = "s1.myshopify.com";
    exported(&exporter, vec![record("INSERT", "i", "https://i", None)]).await;
    let (held, release) = exporter.kv.hold(s1);
    let moving = stream(
        &exporter,
        vec![record("MODIFY", "i", "https://i", Some(s1))],
    );
    let removal = record("REMOVE", "i", "https://i", Some(s1));
    let meanwhile = async {
        held.notified().await;
        table_after(&exporter.table, std::slice::from_ref(&removal));
        let marked = reconcile(&exporter).await;
        let next = reconcile(&exporter).await;
        release.notify_one();
        (marked, next)
    };
    let (moved, (marked, next)) = tokio::join!(moving, meanwhile);
    assert!(failures(&moved).is_empty(), "{:?}", failures(&moved));
    assert_eq!(marked["repaired"]["ledger_marked"], 1, "{marked}");
    assert_eq!(next["repaired"]["ledger_swept"], 0, "{next}");
    assert!(
        exporter.kv.value(s1).is_some(),
        "the write landed after the passes"
    );

    exported(&exporter, vec![removal]).await;
    assert_eq!(
        exporter.kv.value(s1),
        None,
        "the shop serves the removed index"
    );
}

/// Why every writer counts an intent on a marked record: an index removed with its record left
/// (a refused shrink) comes back with the same shop once the mark is ripe, and its batch's write
/// is in flight while the table removes it again and a reconcile pass runs. The batch counted
/// its intent (its shop was recorded already), so the pass marks the record again instead of
/// sweeping it, and the stream's own REMOVE gives the shop up.
#[tokio::test(start_paused = true)]
async fn an_index_made_again_after_its_record_was_marked_keeps_it_from_the_sweep() {
    let exporter = exporter(MemoryKv::default());
    let s1 = "s1.myshopify.com";
    removed_with_its_record_left(&exporter, s1).await;
    let removal = record("REMOVE", "i", "https://i", Some(s1));
    let marked = reconcile(&exporter).await;
    assert_eq!(marked["repaired"]["ledger_marked"], 1, "{marked}");
    tokio::time::sleep(Duration::from_secs(crate::domain::SWEEP_AFTER_SECONDS)).await;

    let (held, release) = exporter.kv.hold(s1);
    let again = stream(
        &exporter,
        vec![record("INSERT", "i", "https://i2", Some(s1))],
    );
    let meanwhile = async {
        held.notified().await;
        table_after(&exporter.table, std::slice::from_ref(&removal));
        let pass = reconcile(&exporter).await;
        release.notify_one();
        pass
    };
    let (again, pass) = tokio::join!(again, meanwhile);
    assert!(failures(&again).is_empty(), "{:?}", failures(&again));
    assert_eq!(pass["repaired"]["ledger_swept"], 0, "{pass}");
    assert!(
        exporter.kv.value(s1).is_some(),
        "the write landed after the pass"
    );

    exported(&exporter, vec![removal]).await;
    assert_eq!(
        exporter.kv.value(s1),
        None,
        "the shop serves the removed index"
    );
}

/// The sweep takes a record out only once the mark on it, as its own batch reads it, is ripe:
/// a record it reads unmarked (a pass that found the index live took the mark off meanwhile,
/// or the item is a new life) or marked too recently stays, whatever the ledger step judged.
#[tokio::test(start_paused = true)]
async fn the_sweep_takes_out_only_a_record_it_reads_marked_and_ripe() {
    let exporter = exporter(MemoryKv::default());
    let (i, s1) = (IndexRef::new("a", "i"), "s1.myshopify.com");
    removed_with_its_record_left(&exporter, s1).await;
    let removal = || {
        let removal = crate::domain::ChangeRecord::removal(i.clone());
        vec![removal]
    };
    let recorded = || exporter.ledger.refs.lock().unwrap().contains_key(&i);

    exporter.export_sweep(removal(), deadline()).await;
    assert!(recorded(), "an unmarked record was swept");
    reconcile(&exporter).await;
    exporter.export_sweep(removal(), deadline()).await;
    assert!(recorded(), "a record marked a moment ago was swept");
    tokio::time::sleep(Duration::from_secs(crate::domain::SWEEP_AFTER_SECONDS)).await;
    exporter.export_sweep(removal(), deadline()).await;
    assert!(!recorded(), "a ripe record stayed");
}

/// A verify repair of an index rejected now gives up what it no longer claims, as a re-export
/// does, before it fails naming the reason (the simulation, hostile seed 100857 on three shards:
/// two verify repairs' writes of `s1` landed after the table moved the index off it, their
/// checks could not read, and their runs again failed on the rejected record, leaving `s1`).
#[tokio::test]
async fn a_verify_repair_of_a_rejected_index_gives_up_what_it_no_longer_claims() {
    let s1 = "s1.myshopify.com";
    for invalid in moved_and_rejected() {
        let exporter = exporter(MemoryKv::default());
        let first = vec![record("INSERT", "i", "https://i", Some(s1))];
        exported(&exporter, first).await;
        table_after(&exporter.table, std::slice::from_ref(&invalid));

        let verify = json!({"mode": "verify", "repair": true, "system_account_id": "a",
                            "index_name": "i", "include_query_configs": false});
        let answer = crate::entry::route(&exporter, verify.to_string(), deadline()).await;

        assert!(
            answer.is_err(),
            "the rejected record fails the run: {answer:?}"
        );
        assert_eq!(exporter.kv.value(s1), None, "{invalid}");
        let own = exporter.kv.value("a-i").expect("the index's own key stays");
        assert!(own.contains("https://i"), "{own}");
    }
}

/// The sweep's shrink is conditional on the mark it read ripe, not only on the count: a pass
/// that found the index live again takes the mark off after the sweep's batch read the record
/// (and a writer whose shops were recorded already then counts no intent), so the record stays.
#[tokio::test(start_paused = true)]
async fn a_mark_taken_off_after_the_sweep_read_it_keeps_the_record() {
    let exporter = exporter(MemoryKv::default());
    let (i, s1) = (IndexRef::new("a", "i"), "s1.myshopify.com");
    removed_with_its_record_left(&exporter, s1).await;
    reconcile(&exporter).await;
    tokio::time::sleep(Duration::from_secs(crate::domain::SWEEP_AFTER_SECONDS)).await;

    let (held, release) = exporter.kv.hold("a-i");
    let removal = crate::domain::ChangeRecord::removal(i.clone());
    let sweep = exporter.export_sweep(vec![removal], deadline());
    let meanwhile = async {
        held.notified().await;
        let unmarked = [(i.clone(), None)];
        crate::ports::Ledger::sweep_marks(&exporter.ledger, &unmarked)
            .await
            .unwrap();
        release.notify_one();
    };
    tokio::join!(sweep, meanwhile);
    assert!(
        exporter.ledger.refs.lock().unwrap().contains_key(&i),
        "the sweep took out a record whose mark went after it read it"
    );
}
