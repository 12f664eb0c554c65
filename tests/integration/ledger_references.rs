//! Each index's references in the ledger (docs/contract.md, "References in the ledger"): the
//! stream learns an index's old shops from them (never from an old image or a KV read), and a
//! batch that removes an index or moves a shop asks the ledger who refers to it. Before the
//! migration completed them, the stream waits.

use aws_sdk_dynamodb::types::StreamViewType;
use serde_json::{json, Value};

use crate::common::*;

const SHOP_A: &str = "shop-a.myshopify.com";
const SHOP_B: &str = "shop-b.myshopify.com";

#[tokio::test]
async fn a_new_image_remove_deletes_the_old_shop_key_while_kv_reads_are_stale() {
    let mut h = Harness::with_view(StreamViewType::NewImage).await;
    h.keys.set_key("acct-1", "k");
    h.put(index_item("acct-1", "products", Some(SHOP_A))).await;
    h.export_stream().await;
    // From here reads answer what KV held before the move: the index under shop A.
    h.kv.stale_reads();
    h.put(index_item("acct-1", "products", Some(SHOP_B))).await;
    let moved = h.export_stream().await;
    assert_eq!(failures(&moved), Vec::<String>::new(), "{moved}");
    assert!(h.settings(SHOP_B).is_some() && h.settings(SHOP_A).is_none());

    h.delete("acct-1", "INDEX#products").await;
    let removed = h.export_stream().await;

    assert_eq!(failures(&removed), Vec::<String>::new(), "{removed}");
    assert_eq!(h.settings(SHOP_B), None, "the shop it had last is gone");
    assert_eq!(h.settings("acct-1-products"), None);
    assert_eq!(h.kv_calls("bulk/get"), 0, "no shop read from KV");
}

crate::on_both_views! {
/// A table exported before the ledger (an upgrade, or a stack made again with a new ledger):
/// until the migration marks its references complete, a stream batch is retried whole, naming
/// the procedure, and nothing is written (a reconcile refuses as well); the procedure's backfill and reconcile pass then
/// leave KV as the table implies (the removed index's old shop key is orphaned), and the
/// batch's retry finds nothing more to do.
async fn a_stream_batch_before_the_migration_waits_for_it(view) {
    let mut h = Harness::with_view(view).await;
    h.keys.set_key("acct-1", "k");
    h.put(index_item("acct-1", "products", Some(SHOP_A))).await;
    exported(&h.export_stream().await);
    let fresh = format!("{}-upgraded-ledger", h.table);
    ecom_emulators::streams::create_ledger_table(&h.ddb, &fresh)
        .await
        .expect("create the ledger table in moto");
    h.reconfigure("LEDGER_TABLE_NAME", &fresh).await;
    h.delete("acct-1", "INDEX#products").await;
    let records = h.stream_records().await;
    let logs = Logs::capture();

    let waiting = h.invoke(json!({ "Records": records.clone() })).await;

    assert_eq!(failures(&waiting), sequence_numbers(&records), "{waiting}");
    let said = logs.matching("waiting for the migration");
    assert!(said.iter().any(|l| l.contains("make migrate")), "{said:?}");
    assert!(h.settings("acct-1-products").is_some(), "nothing written");
    // Nor does a reconcile run before it: it would take the shop key for no one's.
    let repair = json!({"mode": "reconcile", "repair": true});
    let early = h.try_invoke(repair, std::time::Duration::from_secs(20)).await;
    let early = early.expect_err("the reconcile waits for the migration too");
    assert!(early.contains("waiting for the migration"), "{early}");
    assert!(h.settings(SHOP_A).is_some());
    h.migrate().await;
    let pass = h.invoke(json!({"mode": "reconcile", "repair": true})).await;
    assert_eq!(pass["complete"], true, "{pass}");
    assert_eq!(h.settings(SHOP_A), None);
    assert_eq!(h.settings("acct-1-products"), None);
    exported(&h.invoke(json!({ "Records": records })).await);
}
}

#[tokio::test]
async fn after_a_full_backfill_removes_and_shop_moves_ask_the_ledger_not_the_table() {
    let mut h = Harness::new().await;
    h.keys.set_key("acct-1", "k");
    h.keys.set_key("acct-2", "k");
    // Written before any export: only the backfill records their references.
    h.put(index_item("acct-1", "target", None)).await;
    h.put(aliasing("acct-2", "front", "acct-1-target")).await;
    h.put(index_item("acct-1", "plain", None)).await;
    h.put(index_item("acct-1", "leaving", Some(SHOP_A))).await;
    h.put(index_item("acct-2", "staying", Some(SHOP_A))).await;
    h.stream_records().await;
    let backfill = h.invoke(json!({"mode": "backfill"})).await;
    assert_eq!(backfill["complete"], true, "{backfill}");

    // Before the backfill completed nothing was known; now a remove needs no scan.
    h.delete("acct-1", "INDEX#target").await;
    h.delete("acct-1", "INDEX#plain").await;
    let removed = h.export_stream().await;
    assert_eq!(failures(&removed), Vec::<String>::new(), "{removed}");
    assert!(
        h.settings("acct-1-target").is_some(),
        "aliased by acct-2-front: kept"
    );
    assert_eq!(h.settings("acct-1-plain"), None);

    // `leaving` gives shop A up; `staying` claims it, so the key now serves `staying`.
    h.put(index_item("acct-1", "leaving", Some(SHOP_B))).await;
    let moved = h.export_stream().await;
    assert_eq!(failures(&moved), Vec::<String>::new(), "{moved}");
    assert_eq!(h.settings(SHOP_A).unwrap()["index_name"], "staying");
    assert_eq!(h.settings(SHOP_B).unwrap()["index_name"], "leaving");

    // The alias goes away (the stream records that): the target can be removed now.
    h.put(index_item("acct-2", "front", None)).await;
    h.export_stream().await;
    h.put(index_item("acct-1", "target", None)).await;
    h.delete("acct-1", "INDEX#target").await;
    h.export_stream().await;
    assert_eq!(h.settings("acct-1-target"), None);
}

#[tokio::test]
async fn an_alias_target_no_key_could_have_is_not_recorded_and_stalls_nothing() {
    let mut h = Harness::new().await;
    h.keys.set_key("acct-1", "k");
    // DynamoDB refuses a partition key over 2,048 bytes: `alias#{target}` could not be written.
    h.put(aliasing("acct-1", "front", &"x".repeat(3_000))).await;
    h.put(index_item("acct-1", "plain", None)).await;

    let answer = h.export_stream().await;

    assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");
    assert!(h.settings("acct-1-front").is_some() && h.settings("acct-1-plain").is_some());
}

crate::on_both_views! {
/// The ledger's first read of a batch (the indexes' recorded references) fails past its three
/// attempts: the batch is reported for retry, never exported without its references. So an alias
/// added in that batch is recorded on the replay, and a later REMOVE of its target keeps the
/// keys the edge reads through it.
async fn a_batch_whose_references_cannot_be_read_is_retried_and_its_alias_still_protects(view) {
    use ecom_emulators::dynamo_proxy::DynamoFault;
    let mut h = Harness::with_view(view).await;
    h.keys.set_key("acct-1", "k");
    h.put(index_item("acct-1", "products", Some(SHOP_A))).await;
    h.export_stream().await;
    // The alias will come with a change of an index the ledger knows (an index a batch only
    // inserts is not asked of it).
    h.keys.set_key("acct-2", "k2");
    h.put(index_item("acct-2", "storefront", None)).await;
    h.export_stream().await;
    h.migrate().await;
    let ProxiedFunction {
        dynamodb: ledger,
        runtime,
        function,
    } = behind_a_dynamodb_proxy(&h).await;
    let invoke = |records: Vec<Value>| {
        let batch = json!({"Records": records});
        runtime.invoke(batch, std::time::Duration::from_secs(30))
    };

    // The alias is added while the ledger answers its reads with errors; the batch is sent
    // as Lambda sends it, again from the lowest record reported.
    h.put(aliasing("acct-2", "storefront", "acct-1-products"))
        .await;
    let records = h.stream_records().await;
    let failing = DynamoFault::Fail {
        status: 500,
        error_type: "InternalServerError".into(),
    };
    ledger.inject(Some("BatchGetItem"), Some("-ledger"), failing, 3);
    let mut answers = vec![invoke(records.clone()).await.expect("an answer")];
    while let Some(lowest) = failures(answers.last().unwrap()).first().cloned() {
        assert!(answers.len() < 3, "{answers:?}");
        let at = sequence_numbers(&records).iter().position(|s| *s == lowest);
        let replay = records[at.expect("a record of the batch")..].to_vec();
        answers.push(invoke(replay).await.expect("an answer"));
    }

    // The target is removed: the alias keeps its keys.
    h.delete("acct-1", "INDEX#products").await;
    let removed = invoke(h.stream_records().await).await.expect("an answer");
    assert_eq!(failures(&removed), Vec::<String>::new(), "{removed}");
    assert!(
        h.settings("acct-1-products").is_some(),
        "an alias reads it: kept\n{}",
        function.output()
    );
    assert_eq!(
        failures(&answers[0]),
        sequence_numbers(&records),
        "the batch was retried: {answers:?}"
    );
}
}

crate::on_both_views! {
/// Two writers changing one set at once: DynamoDB refuses one's transaction with a
/// `TransactionConflictException`, or cancels it for a `TransactionConflict`, both transient.
/// The function sends it again and the batch is exported whole, its index in its shop's set (a
/// shop move then finds it as the claimer).
async fn a_transaction_cancelled_by_a_conflict_is_sent_again(view) {
    use ecom_emulators::dynamo_proxy::DynamoFault;
    let mut h = Harness::with_view(view).await;
    h.keys.set_key("acct-1", "k");
    h.keys.set_key("acct-2", "k");
    h.put(index_item("acct-1", "leaving", Some(SHOP_A))).await;
    h.stream_records().await;
    h.migrate().await;
    let ProxiedFunction {
        dynamodb: ledger,
        runtime,
        function,
    } = behind_a_dynamodb_proxy(&h).await;

    h.put(index_item("acct-2", "arriving", Some(SHOP_A))).await;
    let records = h.stream_records().await;
    let conflict = DynamoFault::Fail {
        status: 400,
        error_type: "TransactionConflictException".into(),
    };
    ledger.inject(Some("TransactWriteItems"), Some("-ledger"), conflict, 1);
    let cancelled = DynamoFault::Cancel("TransactionConflict".into());
    ledger.inject(Some("TransactWriteItems"), Some("-ledger"), cancelled, 1);
    let batch = json!({"Records": records});
    let answer = runtime.invoke(batch, std::time::Duration::from_secs(30));
    let answer = answer.await.expect("an answer");

    assert_eq!(
        failures(&answer),
        Vec::<String>::new(),
        "{}",
        function.output()
    );
    let conflicts = (ledger.calls().into_iter())
        .filter(|c| c.operation == "TransactWriteItems" && c.status == 400)
        .count();
    assert_eq!(conflicts, 2, "both conflicts met");
    // `leaving` gives the shop up: the ledger names `arriving`, which now serves it.
    h.put(index_item("acct-1", "leaving", Some(SHOP_B))).await;
    let moved = h.export_stream().await;
    assert_eq!(failures(&moved), Vec::<String>::new(), "{moved}");
    assert_eq!(h.settings(SHOP_A).unwrap()["index_name"], "arriving");
}
}

/// The calls DynamoDB (the proxy) refused, as it refuses a key over its limits.
fn refused(dynamodb: &ecom_emulators::dynamo_proxy::DynamoProxy) -> usize {
    (dynamodb.calls().into_iter())
        .filter(|c| c.status == 400)
        .count()
}

/// A stream record is input: a REMOVE naming an account of 2,040 bytes (no KV key could be its
/// index's, and `ref#{index}` is over DynamoDB's 2,048-byte partition key) is rejected alone,
/// touching no ledger item; the batch's other records are exported and nothing is reported for
/// retry, so the shard never stalls on it (the DynamoDB proxy refuses oversized keys, as
/// DynamoDB does and moto does not).
#[tokio::test]
async fn a_remove_whose_index_no_key_could_have_is_rejected_alone() {
    let mut h = Harness::new().await;
    h.keys.set_key("acct-1", "k");
    h.migrate().await;
    let ProxiedFunction {
        dynamodb,
        runtime,
        function,
    } = behind_a_dynamodb_proxy(&h).await;

    h.put(index_item("acct-1", "plain", None)).await;
    let mut records = h.stream_records().await;
    let account = json!({"S": "a".repeat(2_040)});
    let mut hostile = records[0].clone();
    hostile["eventName"] = json!("REMOVE");
    let change = hostile["dynamodb"].as_object_mut().unwrap();
    change.remove("NewImage");
    change.insert(
        "Keys".into(),
        json!({"pk": account, "sk": {"S": "INDEX#x"}}),
    );
    change.insert("SequenceNumber".into(), json!("99999999999999999999"));
    records.push(hostile);
    let batch = json!({"Records": records});

    let answer = runtime
        .invoke(batch, std::time::Duration::from_secs(30))
        .await;

    let answer = answer.expect("an answer");
    assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");
    assert!(h.settings("acct-1-plain").is_some());
    let log = function.wait_for("record rejected").await;
    assert!(log.contains("not a KV key"), "{log}");
    assert_eq!(refused(&dynamodb), 0, "no call named the hostile index");
}

/// A table item is input too: an index of an account of 2,040 bytes (no KV key could be its
/// own, and `ref#{index}` is over DynamoDB's 2,048-byte partition key), valid or not otherwise,
/// is rejected alone by a backfill; no call names it (the DynamoDB proxy refuses oversized
/// keys, as DynamoDB does and moto does not), and the other index is exported.
#[tokio::test]
async fn a_table_item_whose_index_no_key_could_have_is_rejected_alone_by_a_backfill() {
    for endpoint in ["http://not-https", "https://idx.example"] {
        let h = Harness::new().await;
        h.keys.set_key("acct-1", "k");
        let ProxiedFunction {
            dynamodb,
            runtime,
            function,
        } = behind_a_dynamodb_proxy(&h).await;
        h.put(index_item("acct-1", "plain", None)).await;
        let mut hostile = index_item("acct-1", "x", None);
        hostile["pk"] = json!({"S": "a".repeat(2_040)});
        hostile["index_endpoint"] = json!({ "S": endpoint });
        h.put(hostile).await;

        let payload = json!({"mode": "backfill"});
        let answer = runtime.invoke(payload, std::time::Duration::from_secs(60));
        let answer = answer.await;

        let answer = answer.unwrap_or_else(|e| panic!("{e}\n{}", function.output()));
        assert_eq!(answer["complete"], true, "{endpoint}: {answer}");
        assert_eq!(answer["failed"], 0, "{endpoint}: {answer}");
        assert_eq!(answer["rejected"], 1, "{endpoint}: {answer}");
        assert!(h.settings("acct-1-plain").is_some(), "{endpoint}: {answer}");
        assert_eq!(
            refused(&dynamodb),
            0,
            "{endpoint}: no call named the hostile index"
        );
    }
}

/// A `NEW_IMAGE` batch writes an index with a shop, then removes it, and the ledger cannot be
/// read (past its three attempts); Lambda replays from the first failed record.
/// Both records export the item as the table holds it after them (gone), so neither writes the
/// shop key. (When records exported their own images, the write landed and the replayed remove
/// had to learn the old shop from what the applied record left in the ledger.)
#[tokio::test]
async fn a_batch_that_writes_a_shop_and_removes_its_index_leaves_no_shop_key() {
    use ecom_emulators::dynamo_proxy::DynamoFault;
    let mut h = Harness::with_view(StreamViewType::NewImage).await;
    h.keys.set_key("acct-1", "k");
    h.put(index_item("acct-1", "products", None)).await;
    h.export_stream().await;
    let ProxiedFunction {
        dynamodb,
        runtime,
        function,
    } = behind_a_dynamodb_proxy(&h).await;
    let invoke = |records: Vec<Value>| {
        let batch = json!({"Records": records});
        runtime.invoke(batch, std::time::Duration::from_secs(30))
    };

    h.put(index_item("acct-1", "products", Some(SHOP_A))).await;
    h.delete("acct-1", "INDEX#products").await;
    let records = h.stream_records().await;
    assert_eq!(records.len(), 2);
    let failing = DynamoFault::Fail {
        status: 500,
        error_type: "InternalServerError".into(),
    };
    dynamodb.inject(Some("BatchGetItem"), Some("-ledger"), failing, 3);
    let mut answers = vec![invoke(records.clone()).await.expect("an answer")];
    while let Some(lowest) = failures(answers.last().unwrap()).first().cloned() {
        assert!(answers.len() < 3, "{answers:?}");
        let at = sequence_numbers(&records).iter().position(|s| *s == lowest);
        let replay = records[at.expect("a record of the batch")..].to_vec();
        answers.push(invoke(replay).await.expect("an answer"));
    }

    assert_eq!(answers.len(), 2, "the batch failed once: {answers:?}");
    assert_eq!(
        failures(&answers[0]),
        sequence_numbers(&records),
        "both are removes"
    );
    assert!(h.settings("acct-1-products").is_none());
    assert!(
        h.settings(SHOP_A).is_none(),
        "the shop key of a removed index\n{}",
        function.output()
    );
}

/// The ledger's references are candidates, and the table decides: an alias dropped while its
/// stream record was lost (given up after its maximum age) no longer protects its old target,
/// whose keys a remove then deletes (before, the stale reference protected them for good).
#[tokio::test]
async fn an_alias_dropped_without_its_record_no_longer_protects_its_target() {
    let mut h = Harness::new().await;
    h.keys.set_key("acct-1", "k");
    h.put(index_item("acct-1", "target", Some(SHOP_A))).await;
    h.put(aliasing("acct-1", "reader", "acct-1-target")).await;
    h.export_stream().await;
    h.migrate().await;
    // The alias goes; its stream record never reaches the function.
    h.put(index_item("acct-1", "reader", None)).await;
    let _lost = h.stream_records().await;

    h.delete("acct-1", "INDEX#target").await;
    let removed = h.export_stream().await;

    assert_eq!(failures(&removed), Vec::<String>::new(), "{removed}");
    assert!(
        h.settings("acct-1-target").is_none(),
        "no alias reads it now"
    );
    assert!(h.settings(SHOP_A).is_none());
}

crate::on_both_views! {
/// The stream records its indexes' references in the ledger (TransactWriteItems): writes that
/// do not answer are given up at the deadline like every other ledger call, never waited on
/// past it, and the batch's records are reported for retry, exported on the replay.
async fn a_batch_whose_reference_writes_hang_answers_before_its_deadline(view) {
    use ecom_emulators::dynamo_proxy::DynamoFault;
    let mut h = Harness::with_view(view).await;
    h.keys.set_key("acct-1", "k");
    h.put(index_item("acct-1", "products", Some(SHOP_A))).await;
    let records = h.stream_records().await;
    let ProxiedFunction {
        dynamodb: ledger,
        runtime,
        function,
    } = behind_a_dynamodb_proxy(&h).await;
    let hang = DynamoFault::Delay(std::time::Duration::from_secs(30));
    ledger.inject(
        Some("TransactWriteItems"),
        Some("-ledger"),
        hang,
        usize::MAX,
    );
    let batch = json!({"Records": records});

    let started = std::time::Instant::now();
    let first = runtime.invoke(batch.clone(), std::time::Duration::from_secs(8));
    let first = first.await.expect("the function's own answer");

    assert!(started.elapsed() < std::time::Duration::from_secs(8));
    assert_eq!(failures(&first), sequence_numbers(&records), "{first}");
    // The line is written before the answer; its pipe may be read a moment after it.
    function
        .wait_for("ledger references: stopped at the invocation deadline")
        .await;

    ledger.clear_faults();
    let replay = runtime.invoke(batch, std::time::Duration::from_secs(30));
    let replay = replay.await.expect("an answer");
    assert_eq!(failures(&replay), Vec::<String>::new(), "{replay}");
    assert!(h.settings(SHOP_A).is_some(), "{}", function.output());
}
}

/// Class 2, the other direction: an alias added while its stream record was lost (given up
/// after its maximum age) is missing from the ledger. The next reconcile pass adds what the
/// table names, so a later REMOVE of its target keeps the keys the edge reads through it
/// (before, the target's keys were deleted: no referrer recorded, the references complete).
#[tokio::test]
async fn an_alias_whose_record_was_lost_protects_its_target_after_the_next_reconcile() {
    let mut h = Harness::new().await;
    h.keys.set_key("acct-1", "k");
    h.keys.set_key("acct-2", "k2");
    h.put(index_item("acct-1", "products", Some(SHOP_A))).await;
    h.export_stream().await;
    h.migrate().await;
    h.put(aliasing("acct-2", "storefront", "acct-1-products"))
        .await;
    let lost = h.stream_records().await;
    assert_eq!(lost.len(), 1);

    let pass = h.invoke(json!({"mode": "reconcile", "repair": true})).await;
    assert_eq!(pass["complete"], true, "{pass}");
    assert!(h.settings("acct-2-storefront").is_some(), "{pass}");

    h.delete("acct-1", "INDEX#products").await;
    let removed = h.export_stream().await;
    assert_eq!(failures(&removed), Vec::<String>::new(), "{removed}");
    assert!(
        h.settings("acct-1-products").is_some(),
        "an alias reads it: kept"
    );
}

/// An alias exported before the ledger existed, its record invalid since (rejected, so its KV
/// value still routes through the alias): the migration's backfill records what its raw item
/// names, so a later REMOVE of the target keeps the keys the edge reads through it (before, the
/// backfill recorded only the indexes it exported, and the target's keys were deleted).
#[tokio::test]
async fn an_alias_rejected_since_its_export_protects_its_target_after_the_migration() {
    let mut h = Harness::new().await;
    h.keys.set_key("acct-1", "k");
    h.keys.set_key("acct-2", "k2");
    h.put(index_item("acct-1", "products", None)).await;
    h.put(aliasing("acct-2", "storefront", "acct-1-products"))
        .await;
    h.export_stream().await;
    forget_the_ledger(&h).await;
    let mut invalid = aliasing("acct-2", "storefront", "acct-1-products");
    invalid["index_endpoint"] = json!({"S": "http://not-https.example"});
    h.put(invalid).await;
    // Its record went by before the ledger (a rejected record leaves its keys as they were).
    h.stream_records().await;
    assert!(h.settings("acct-2-storefront").is_some(), "left as it was");

    h.migrate().await;
    h.delete("acct-1", "INDEX#products").await;
    let removed = h.export_stream().await;

    assert_eq!(failures(&removed), Vec::<String>::new(), "{removed}");
    assert!(
        h.settings("acct-1-products").is_some(),
        "the rejected alias's KV value reads it: kept"
    );
}

/// Every item of the ledger deleted: the table as it was before the ledger existed.
async fn forget_the_ledger(h: &Harness) {
    let items = h.ddb.scan().table_name(&h.ledger).send().await.unwrap();
    for item in items.items.unwrap_or_default() {
        let key = [("pk", &item["pk"]), ("sk", &item["sk"])];
        let key = key.map(|(name, value)| (name.to_owned(), value.clone()));
        (h.ddb.delete_item().table_name(&h.ledger))
            .set_key(Some(key.into_iter().collect()))
            .send()
            .await
            .unwrap();
    }
}

/// A record naming an override whose sort key no table item could have (over DynamoDB's 1,024
/// bytes: only a forged record can) is rejected as it is read: the batch's read of its records'
/// items never names it, so the other records are exported and the shard never stalls (the
/// DynamoDB proxy refuses oversized keys, as DynamoDB does).
#[tokio::test]
async fn a_record_whose_item_no_table_could_hold_is_rejected_alone() {
    let mut h = Harness::new().await;
    h.keys.set_key("acct-1", "k");
    let ProxiedFunction {
        dynamodb,
        runtime,
        function,
    } = behind_a_dynamodb_proxy(&h).await;
    h.put(index_item("acct-1", "plain", None)).await;
    let mut records = h.stream_records().await;
    let mut hostile = records[0].clone();
    let sk = json!({"S": format!("INDEX#plain#QUERY#{}", "q".repeat(1_100))});
    hostile["dynamodb"]["Keys"]["sk"] = sk.clone();
    hostile["dynamodb"]["NewImage"]["sk"] = sk;
    hostile["dynamodb"]["NewImage"]["query_config"] = json!({"M": {}});
    hostile["dynamodb"]["SequenceNumber"] = json!("99999999999999999999");
    records.push(hostile);

    let answer = runtime
        .invoke(
            json!({"Records": records}),
            std::time::Duration::from_secs(30),
        )
        .await;

    let answer = answer.expect("an answer");
    assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");
    assert!(h.settings("acct-1-plain").is_some());
    let log = function.wait_for("record rejected").await;
    assert!(log.contains("1,024 bytes"), "{log}");
    assert_eq!(refused(&dynamodb), 0, "no call named the hostile item");
}

/// The ledger's anti-entropy: a shop move whose stream record was lost leaves the ledger
/// without the shop the index is on. The next reconcile pass adds it from the table, so a
/// later `NEW_IMAGE` move deletes the shop key the index really had, and the one the ledger
/// named before (without the pass, the key of the shop it had kept serving it).
#[tokio::test]
async fn a_shop_recorded_stale_by_a_lost_record_is_rewritten_by_the_next_reconcile() {
    const SHOP_C: &str = "shop-c.myshopify.com";
    let mut h = Harness::with_view(StreamViewType::NewImage).await;
    h.keys.set_key("acct-1", "k");
    h.put(index_item("acct-1", "products", Some(SHOP_A))).await;
    h.export_stream().await;
    h.migrate().await;
    h.put(index_item("acct-1", "products", Some(SHOP_B))).await;
    assert_eq!(h.stream_records().await.len(), 1, "the move's record, lost");

    let logs = Logs::capture();
    let pass = h.invoke(json!({"mode": "reconcile", "repair": true})).await;
    assert_eq!(pass["complete"], true, "{pass}");
    assert!(h.settings(SHOP_B).is_some(), "{pass}");
    h.put(index_item("acct-1", "products", Some(SHOP_C))).await;
    let moved = h.export_stream().await;

    assert_eq!(failures(&moved), Vec::<String>::new(), "{moved}");
    assert!(h.settings(SHOP_C).is_some());
    assert_eq!(h.settings(SHOP_B), None, "the shop it had is given up");
    assert_eq!(h.settings(SHOP_A), None);
    let added = logs.matching("the ledger lacked references the table names: added");
    assert_eq!(added.len(), 1, "{:?}", logs.matching("WARN"));
}

crate::on_both_views! {
/// A settings item whose `shop_id` is 3,000 bytes (no shop key could be it, and its set's
/// `shop#{shop}` would pass DynamoDB's 2,048-byte partition key) is rejected alone: the
/// batch's intent names only what the records that will write refer to, so the other record is
/// exported and nothing is reported for retry (the shard never stalls on it).
async fn a_record_with_a_shop_no_key_could_be_is_rejected_alone_and_stalls_nothing(view) {
    let mut h = Harness::with_view(view).await;
    h.keys.set_key("acct-1", "k");
    let ProxiedFunction {
        dynamodb: _dynamodb,
        runtime,
        function,
    } = behind_a_dynamodb_proxy(&h).await;
    h.put(index_item("acct-1", "good", Some(SHOP_A))).await;
    let mut hostile = index_item("acct-1", "hostile", None);
    hostile["shop_id"] = json!({"S": "x".repeat(3_000)});
    h.put(hostile).await;
    let records = h.stream_records().await;

    let answer = runtime.invoke(json!({ "Records": records }), std::time::Duration::from_secs(30));
    let answer = answer.await.expect("an answer");

    assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");
    assert!(h.settings(SHOP_A).is_some(), "{}", function.output());
    assert!(h.settings("acct-1-hostile").is_none());
    let log = function.wait_for("record rejected").await;
    assert!(log.contains("hostile") && log.contains("not a Shopify shop domain"), "{log}");
}
}

fn exported(answer: &Value) {
    assert_eq!(failures(answer), Vec::<String>::new(), "{answer}");
}

/// An index kept for a rejected record's alias (seed 8291 of the simulation's wide workload):
/// `reader`'s record names `acct-1-old` with a weight stored as a string, so it is rejected and
/// records nothing of its own, while the ledger's set of `acct-1-old` names it all the same (an
/// extra member, as a shrink that read before a reconcile's add leaves it). `old`'s removal
/// keeps `old` for it and records the alias on `reader`, so `reader`'s next record, which drops
/// the alias, removes `old` (before, its key kept serving until the next reconcile pass).
#[tokio::test]
async fn an_index_kept_for_a_rejected_record_s_alias_goes_when_the_alias_does() {
    use aws_sdk_dynamodb::types::AttributeValue;
    let mut h = Harness::with_view(StreamViewType::NewImage).await;
    h.keys.set_key("acct-1", "k");
    h.put(index_item("acct-1", "old", None)).await;
    h.export_stream().await;
    h.migrate().await;
    let mut reader = aliasing("acct-1", "reader", "acct-1-old");
    let target = &mut reader["index_aliases"]["M"]["doc_reads"]["M"]["targets"]["L"][0];
    target["M"]["weight"] = json!({"S": "1"});
    h.put(reader).await;
    let rejected = h.export_stream().await;
    assert_eq!(rejected["batchItemFailures"], json!([]), "{rejected}");
    let member = AttributeValue::Ss(vec!["6:acct-1#reader".into()]);
    (h.ddb.update_item().table_name(&h.ledger))
        .key("pk", AttributeValue::S("alias#acct-1-old".into()))
        .key("sk", AttributeValue::S("referrers".into()))
        .update_expression("ADD referrers :m")
        .expression_attribute_values(":m", member)
        .send()
        .await
        .expect("the extra member");

    h.delete("acct-1", "INDEX#old").await;
    let kept = h.export_stream().await;
    assert_eq!(failures(&kept), Vec::<String>::new(), "{kept}");
    assert!(h.settings("acct-1-old").is_some(), "kept for the alias");

    h.put(index_item("acct-1", "reader", None)).await;
    let dropped = h.export_stream().await;
    assert_eq!(failures(&dropped), Vec::<String>::new(), "{dropped}");
    assert_eq!(
        h.settings("acct-1-old"),
        None,
        "the alias's drop removed it"
    );
}

/// Each DynamoDB operation's calls an invocation of `runtime` made with `records`.
async fn calls_of(
    dynamodb: &ecom_emulators::dynamo_proxy::DynamoProxy,
    runtime: &ecom_emulators::runtime_api::RuntimeApi,
    records: Vec<Value>,
) -> std::collections::BTreeMap<String, usize> {
    let before = dynamodb.calls().len();
    let answer = runtime.invoke(
        json!({ "Records": records }),
        std::time::Duration::from_secs(60),
    );
    let answer = answer.await.expect("an answer");
    assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");
    let mut by_operation = std::collections::BTreeMap::new();
    for call in &dynamodb.calls()[before..] {
        *by_operation.entry(call.operation.clone()).or_default() += 1;
    }
    by_operation
}

/// What a REMOVE kept for an alias costs beside one that is not, each alone in its batch with
/// the references complete (the one not kept deletes its index's record): the kept one's check
/// reads again what keeps the index once its intent landed (who aliases it, their settings
/// items), and its intent records the alias on its holder (docs/contract.md, "Alias deletion
/// safety").
#[tokio::test]
async fn a_kept_remove_costs_the_reads_of_what_keeps_it_and_one_intent() {
    let mut h = Harness::new().await;
    h.keys.set_key("acct-1", "marqo-key");
    h.put(index_item("acct-1", "plain", None)).await;
    h.put(index_item("acct-1", "kept", None)).await;
    h.put(aliasing("acct-1", "reader", "acct-1-kept")).await;
    h.export_stream().await;
    h.migrate().await;
    let ProxiedFunction {
        dynamodb,
        runtime,
        function,
    } = behind_a_dynamodb_proxy(&h).await;

    h.delete("acct-1", "INDEX#plain").await;
    let plain = calls_of(&dynamodb, &runtime, h.stream_records().await).await;
    assert_eq!(h.settings("acct-1-plain"), None);
    h.delete("acct-1", "INDEX#kept").await;
    let kept = calls_of(&dynamodb, &runtime, h.stream_records().await).await;
    assert!(h.settings("acct-1-kept").is_some(), "kept for the reader");
    let calls = |pairs: &[(&str, usize)]| {
        let calls = pairs
            .iter()
            .map(|(operation, n)| (operation.to_string(), *n));
        calls.collect::<std::collections::BTreeMap<_, _>>()
    };
    // The ledger's `references` mark (once a container), the item as it is now, the index's
    // recorded references and the set of who aliases the index (empty); then the index's own
    // record deleted.
    let shrink = ("TransactWriteItems", 1);
    assert_eq!(plain, calls(&[("BatchGetItem", 3), ("GetItem", 1), shrink]));
    // Besides: the set's member's settings item, the intent, and the check's reads once the
    // intent landed: the index again, the set and its member's item again.
    let expected = calls(&[("BatchGetItem", 7), ("TransactWriteItems", 1)]);
    assert_eq!(kept, expected, "{}", function.output());
}

/// Every item of the ledger, as `pk / sk`, in order.
async fn ledger_items(h: &Harness) -> Vec<String> {
    let scan = h.ddb.scan().table_name(&h.ledger).consistent_read(true);
    let items = scan.send().await.unwrap().items.unwrap_or_default();
    let key =
        |item: &std::collections::HashMap<String, aws_sdk_dynamodb::types::AttributeValue>| {
            let s = |name: &str| item[name].as_s().unwrap().clone();
            format!("{} / {}", s("pk"), s("sk"))
        };
    let mut keys: Vec<String> = items.iter().map(key).collect();
    keys.sort();
    keys
}

crate::on_both_views! {
/// The ledger is bounded by the live fleet: an index the stream removed leaves no item behind,
/// neither its own nor a set it alone was in, whether it claimed a shop, aliased an index or was
/// one an alias read; an index that only gave its references up keeps its own.
async fn an_index_the_stream_removed_leaves_no_item_in_the_ledger(view) {
    let mut h = Harness::with_view(view).await;
    h.keys.set_key("acct-1", "k");
    h.put(index_item("acct-1", "target", Some(SHOP_A))).await;
    h.put(aliasing("acct-1", "front", "acct-1-target")).await;
    h.put(index_item("acct-1", "plain", None)).await;
    h.put(index_item("acct-1", "moving", Some(SHOP_B))).await;
    h.stream_records().await;
    let backfill = h.invoke(json!({"mode": "backfill"})).await;
    assert_eq!(backfill["complete"], true, "{backfill}");
    let before = ledger_items(&h).await;
    assert!(before.contains(&"alias#acct-1-target / referrers".to_owned()), "{before:?}");

    h.delete("acct-1", "INDEX#front").await;
    h.delete("acct-1", "INDEX#plain").await;
    h.put(index_item("acct-1", "moving", None)).await;
    let first = h.export_stream().await;
    assert_eq!(failures(&first), Vec::<String>::new(), "{first}");
    h.delete("acct-1", "INDEX#target").await;
    let second = h.export_stream().await;
    assert_eq!(failures(&second), Vec::<String>::new(), "{second}");

    assert_eq!(h.settings("acct-1-target"), None);
    assert_eq!(
        ledger_items(&h).await,
        ["meta / references", "ref#6:acct-1#moving / refs"],
        "only what the live fleet refers to (`moving`, now to nothing) and the mark"
    );
}
}

/// Moves every sweep mark of the ledger back by the wait (as if that long had passed): the
/// function's clock is the system's, and no test waits twenty minutes.
async fn age_sweep_marks(h: &Harness) {
    use aws_sdk_dynamodb::types::AttributeValue;
    let scan = h.ddb.scan().table_name(&h.ledger).consistent_read(true);
    let items = scan.send().await.unwrap().items.unwrap_or_default();
    for item in items.iter().filter(|item| item.contains_key("swept_at")) {
        let at: u64 = item["swept_at"].as_n().unwrap().parse().unwrap();
        let aged = at - ecom_settings_exporter::domain::SWEEP_AFTER_SECONDS;
        let update = (h.ddb.update_item())
            .table_name(&h.ledger)
            .key("pk", item["pk"].clone())
            .key("sk", item["sk"].clone())
            .update_expression("SET swept_at = :aged")
            .expression_attribute_values(":aged", AttributeValue::N(aged.to_string()));
        update.send().await.unwrap();
    }
}

crate::on_both_views! {
/// What the stream cannot settle, whole-fleet reconcile repairs do, two phases apart: the first
/// pass marks the records of indexes the table no longer has (here removed while the stream
/// was not exporting, as before removals took their records out), a pass once the mark is ripe
/// takes them out, on both sides, but keeps one a live alias reads until the alias goes (its
/// drop deletes the kept index's keys and leaves its record to the passes). A dry run counts
/// and writes nothing.
async fn reconcile_passes_take_out_the_records_of_indexes_the_table_no_longer_has(view) {
    let mut h = Harness::with_view(view).await;
    h.keys.set_key("acct-1", "k");
    h.put(index_item("acct-1", "target", Some(SHOP_A))).await;
    h.put(aliasing("acct-1", "front", "acct-1-target")).await;
    h.put(index_item("acct-1", "plain", Some(SHOP_B))).await;
    h.export_stream().await;
    h.migrate().await;
    h.delete("acct-1", "INDEX#plain").await;
    h.delete("acct-1", "INDEX#target").await;
    h.stream_records().await;
    let recorded = |items: &[String], index: &str| {
        let own = format!("ref#6:acct-1#{index} / refs");
        items.contains(&own)
    };
    let repair = json!({"mode": "reconcile", "repair": true});

    let dry = json!({"mode": "reconcile", "repair": true, "dry_run": true});
    let answer = h.invoke(dry).await;
    assert_eq!(answer["would_repair"]["ledger_marked"], 2, "{answer}");
    let answer = h.invoke(repair.clone()).await;
    assert_eq!(answer["complete"], true, "{answer}");
    assert_eq!(answer["repaired"]["ledger_marked"], 2, "{answer}");
    let answer = h.invoke(repair.clone()).await;
    assert_eq!(answer["repaired"]["ledger_swept"], 0, "not ripe yet: {answer}");
    assert!(recorded(&ledger_items(&h).await, "plain"));

    age_sweep_marks(&h).await;
    let answer = h.invoke(repair.clone()).await;
    assert_eq!(answer["repaired"]["ledger_swept"], 2, "{answer}");
    assert_eq!(h.settings("acct-1-target").unwrap()["index_name"], "target");
    let items = ledger_items(&h).await;
    assert!(!recorded(&items, "plain"), "{items:?}");
    assert!(!items.contains(&format!("shop#{SHOP_B} / referrers")), "{items:?}");
    assert!(recorded(&items, "target"), "kept for `front`'s alias: {items:?}");

    h.put(index_item("acct-1", "front", None)).await;
    let dropped = h.export_stream().await;
    assert_eq!(failures(&dropped), Vec::<String>::new(), "{dropped}");
    assert_eq!(h.settings("acct-1-target"), None);
    // Its kept removal counted an intent since the mark: marked again, and the wait starts over.
    let answer = h.invoke(repair.clone()).await;
    assert_eq!(answer["repaired"]["ledger_marked"], 1, "{answer}");
    assert_eq!(answer["repaired"]["ledger_swept"], 0, "{answer}");
    age_sweep_marks(&h).await;
    let answer = h.invoke(repair.clone()).await;
    assert_eq!(answer["repaired"]["ledger_swept"], 1, "{answer}");
    let items = ledger_items(&h).await;
    assert!(!recorded(&items, "target"), "{items:?}");
    assert!(!items.contains(&format!("shop#{SHOP_A} / referrers")), "{items:?}");
}
}
