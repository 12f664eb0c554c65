//! Two writers at once (issue 22): each test runs two function processes (the bootstrap
//! binary behind its own runtime API) on one table and ledger (moto) and one KV emulator, and
//! forces the race by holding one writer's KV request in the emulator while the other writes.
//! What must hold: no writer replaces a value with one computed from an older table state, a
//! new key is never deleted because a snapshot predates it, and a filter never ends without an
//! override the table holds (docs/contract.md, "Concurrent writers").

use std::time::Duration;

use ecom_emulators::runtime_api::RuntimeApi;
use serde_json::{json, Value};

use crate::common::*;

const TIMEOUT: Duration = Duration::from_secs(60);

/// A function process with its own runtime API, sharing the harness's peers.
struct Writer {
    runtime: RuntimeApi,
    function: Function,
}

impl Writer {
    async fn start(h: &Harness) -> Self {
        let runtime = RuntimeApi::start(0).await.unwrap();
        let function = Function::start(&runtime, &h.lambda_env());
        Self { runtime, function }
    }

    async fn invoke(&self, payload: Value) -> Value {
        let answer = self.runtime.invoke(payload, TIMEOUT).await;
        answer.unwrap_or_else(|e| panic!("{e}: {}", self.function.output()))
    }
}

/// Waits until the emulator holds a request.
async fn until_held(h: &Harness) {
    for _ in 0..400 {
        if h.kv.held() > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no request was held");
}

/// Waits until the DynamoDB proxy holds a request.
async fn until_ledger_held(
    ledger: &ecom_emulators::dynamo_proxy::DynamoProxy,
    function: &Function,
) {
    for _ in 0..400 {
        if ledger.held() > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no ledger request was held: {}", function.output());
}

/// `products` of `acct-1` on `shop`, exported and migrated (the ledger's references complete).
async fn products_migrated_on(
    view: aws_sdk_dynamodb::types::StreamViewType,
    shop: &str,
) -> Harness {
    let mut h = Harness::with_view(view).await;
    h.keys.set_key("acct-1", "marqo-key");
    h.put(index_item("acct-1", "products", Some(shop))).await;
    h.export_stream().await;
    h.migrate().await;
    h
}

/// `leaving` of `acct-1` on `shop` and `arriving` of `acct-2` on shop x, exported (and the
/// ledger's references complete when `migrated`).
async fn leaving_and_arriving(
    view: aws_sdk_dynamodb::types::StreamViewType,
    shop: &str,
    migrated: bool,
) -> Harness {
    let mut h = Harness::with_view(view).await;
    for account in ["acct-1", "acct-2"] {
        h.keys.set_key(account, "marqo-key");
    }
    h.put(index_item("acct-1", "leaving", Some(shop))).await;
    h.put(index_item(
        "acct-2",
        "arriving",
        Some("shop-x.myshopify.com"),
    ))
    .await;
    h.export_stream().await;
    if migrated {
        h.migrate().await;
    }
    h
}

/// `products` moves to shop `to`; `writer` exports the stream's records since the last
/// export, and no key of the shops it had (`x`, `y`) still serves it.
async fn moves_off_every_old_shop(
    h: &mut Harness,
    writer: &Writer,
    [x, y, to]: [&str; 3],
    function: &Function,
) {
    h.put(index_item("acct-1", "products", Some(to))).await;
    let records = h.stream_records().await;
    let answer = writer.invoke(json!({ "Records": records })).await;
    assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");
    assert_eq!(h.settings(to).unwrap()["index_name"], "products");
    assert_eq!(h.settings(x), None, "{}", function.output());
    assert_eq!(h.settings(y), None);
}

fn endpoint_of(h: &Harness, key: &str) -> Option<String> {
    h.settings(key)
        .map(|v| v["index_url"].as_str().unwrap_or_default().to_owned())
}

fn changed(account: &str, index: &str) -> Value {
    let mut item = index_item(account, index, None);
    item["index_endpoint"] = json!({"S": "https://changed.idx.example"});
    item
}

fn filter_queries(h: &Harness, account: &str, index: &str) -> usize {
    filter_of(h, account, index).expect("a filter")["count"]
        .as_u64()
        .unwrap_or_default() as usize
}

crate::on_both_views! {
async fn a_reconcile_repair_leaves_what_the_stream_wrote_while_it_ran(view) {
    let mut h = Harness::with_view(view).await;
    h.keys.set_key("acct", "marqo-key");
    for index in ["kept", "changed", "removed"] {
        h.put(index_item("acct", index, None)).await;
    }
    h.export_stream().await;
    let reconcile = Writer::start(&h).await;
    let stream = Writer::start(&h).await;

    // KV lost two keys, so the reconcile reads them from KV once it has read the table: that
    // read is held while the stream writes.
    h.kv.remove(CF_ACCOUNT, SETTINGS_NS, "acct-changed");
    h.kv.remove(CF_ACCOUNT, SETTINGS_NS, "acct-removed");
    h.kv.hold("bulk/get", None);
    let run = reconcile.invoke(json!({"mode": "reconcile", "repair": true}));
    let race = async {
        until_held(&h).await;
        h.put(index_item("acct", "new", None)).await;
        h.put(changed("acct", "changed")).await;
        h.delete("acct", "INDEX#removed").await;
        h.put(query_item("acct", "kept", "shoes")).await;
        let records = h.stream_records().await;
        let answer = stream.invoke(json!({ "Records": records })).await;
        assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");
        h.kv.release();
    };
    let (answer, ()) = tokio::join!(run, race);

    // Both keys, and the filter `kept` had none of, are drift to the reconcile's older
    // snapshot; its repairs landed after the stream's writes, and its check of what it wrote
    // against the table as it is now wrote the stream's values back (deleted the removed one).
    assert_eq!(
        answer["samples"]["settings"]["stale"],
        json!(["acct-changed"])
    );
    assert_eq!(
        answer["samples"]["settings"]["missing"],
        json!(["acct-removed"])
    );
    assert!(
        answer["repaired"].get("left_to_other_writers").is_none(),
        "{answer}"
    );
    assert!(h.settings("acct-new").is_some(), "the new index is kept");
    assert_eq!(
        endpoint_of(&h, "acct-changed").as_deref(),
        Some("https://changed.idx.example")
    );
    assert!(h.settings("acct-removed").is_none(), "never written back");
    assert!(h.query_config(&qcfg_key("acct", "kept", "shoes")).is_some());
    assert_eq!(filter_queries(&h, "acct", "kept"), 1);
    // The next pass finds nothing to do.
    let next = reconcile
        .invoke(json!({"mode": "reconcile", "repair": true}))
        .await;
    assert_eq!(next["repaired"]["written"], 0, "{next}");
    assert_eq!(next["repaired"]["deleted"], 0, "{next}");
}
}

crate::on_both_views! {
async fn a_reconcile_delete_landing_after_the_index_came_back_is_undone(view) {
    let mut h = Harness::with_view(view).await;
    h.keys.set_key("acct", "marqo-key");
    h.put(index_item("acct", "back", None)).await;
    h.export_stream().await;
    // Removed while the stream was down: its key is an orphan to the reconcile.
    h.delete("acct", "INDEX#back").await;
    let _ = h.stream_records().await;
    let reconcile = Writer::start(&h).await;
    let stream = Writer::start(&h).await;

    // The reconcile's delete is held; meanwhile the index comes back and the stream writes it.
    h.kv.hold("bulk/delete", Some("acct-back"));
    let run = reconcile.invoke(json!({"mode": "reconcile", "repair": true}));
    let race = async {
        until_held(&h).await;
        h.put(changed("acct", "back")).await;
        let records = h.stream_records().await;
        let answer = stream.invoke(json!({ "Records": records })).await;
        assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");
        assert!(h.settings("acct-back").is_some());
        h.kv.release();
    };
    let (answer, ()) = tokio::join!(run, race);

    // The delete landed last, lost its claim to the stream's, and the key was written again
    // from the table as it is now.
    assert_eq!(
        answer["samples"]["settings"]["orphaned"],
        json!(["acct-back"]),
        "{answer}"
    );
    assert_eq!(
        endpoint_of(&h, "acct-back").as_deref(),
        Some("https://changed.idx.example"),
        "{answer}"
    );
}
}

crate::on_both_views! {
async fn a_verify_repair_keeps_an_override_added_while_it_ran(view) {
    let mut h = Harness::with_view(view).await;
    h.keys.set_key("acct", "marqo-key");
    h.put(index_item("acct", "shoes", None)).await;
    h.put(query_item("acct", "shoes", "boots")).await;
    h.export_stream().await;
    let verify = Writer::start(&h).await;
    let stream = Writer::start(&h).await;

    // The verify reads the table, then its read of KV is held.
    h.kv.hold("bulk/get", None);
    let run = verify.invoke(json!({"mode": "verify", "system_account_id": "acct",
        "index_name": "shoes", "include_query_configs": true, "repair": true}));
    let race = async {
        until_held(&h).await;
        h.put(query_item("acct", "shoes", "sandals")).await;
        let records = h.stream_records().await;
        let answer = stream.invoke(json!({ "Records": records })).await;
        assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");
        h.kv.release();
    };
    let (answer, ()) = tokio::join!(run, race);

    // Its repair deleted `sandals` as unexpected to its older snapshot (the delete landed
    // after the stream's write), then found the override in the table and wrote it back.
    let sandals = qcfg_key("acct", "shoes", "sandals");
    assert_eq!(answer["in_sync"], false, "{answer}");
    assert!(
        h.query_config(&sandals).is_some(),
        "the new override stays: {answer}"
    );
    assert_eq!(filter_queries(&h, "acct", "shoes"), 2);
}
}

crate::on_both_views! {
async fn a_reexport_that_lands_after_the_stream_writes_the_newer_settings_again(view) {
    let mut h = Harness::with_view(view).await;
    h.keys.set_key("acct", "marqo-key");
    h.put(index_item("acct", "shoes", None)).await;
    h.export_stream().await;
    let reexport = Writer::start(&h).await;
    let stream = Writer::start(&h).await;

    // The re-export reads the table, claims the key, then its write is held.
    h.kv.hold("bulk", Some("acct-shoes"));
    let run = reexport.invoke(json!({"system_account_id": "acct", "index_name": "shoes"}));
    let race = async {
        until_held(&h).await;
        h.put(changed("acct", "shoes")).await;
        let records = h.stream_records().await;
        let answer = stream.invoke(json!({ "Records": records })).await;
        assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");
        assert_eq!(
            endpoint_of(&h, "acct-shoes").as_deref(),
            Some("https://changed.idx.example")
        );
        h.kv.release();
    };
    let (answer, ()) = tokio::join!(run, race);

    // The held write landed last with the old settings; the re-export's check against the
    // table as it is now wrote the newer settings again.
    assert_eq!(answer["keys_written"], 1, "{answer}");
    assert_eq!(
        endpoint_of(&h, "acct-shoes").as_deref(),
        Some("https://changed.idx.example")
    );
}
}

crate::on_both_views! {
async fn two_batches_writing_one_filter_end_with_every_override(view) {
    let mut h = Harness::with_view(view).await;
    h.keys.set_key("acct", "marqo-key");
    h.put(index_item("acct", "shoes", None)).await;
    h.export_stream().await;
    let first = Writer::start(&h).await;
    let second = Writer::start(&h).await;

    // The first batch reads the overrides (one), then its write of the filter is held.
    h.put(query_item("acct", "shoes", "boots")).await;
    let older = h.stream_records().await;
    h.kv.hold("bulk", Some("qfilter-acct-shoes"));
    let run = first.invoke(json!({ "Records": older.clone() }));
    let race = async {
        until_held(&h).await;
        // The second batch adds an override and writes the filter with both.
        h.put(query_item("acct", "shoes", "sandals")).await;
        let newer = h.stream_records().await;
        let answer = second.invoke(json!({ "Records": newer })).await;
        assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");
        assert_eq!(filter_queries(&h, "acct", "shoes"), 2);
        h.kv.release();
    };
    let (answer, ()) = tokio::join!(run, race);

    // The older filter landed last; its batch checked the filter against the overrides the
    // table holds now and wrote it again.
    assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");
    assert_eq!(filter_queries(&h, "acct", "shoes"), 2);
}
}

crate::on_both_views! {
async fn an_old_shop_delete_that_lands_after_another_index_took_the_shop_is_undone(view) {
    const SHOP: &str = "shop-s.myshopify.com";
    let mut h = leaving_and_arriving(view, SHOP, false).await;
    let first = Writer::start(&h).await;
    let second = Writer::start(&h).await;

    // `leaving` gives the shop up; nobody claims it yet, so its delete is sent, and held.
    h.put(index_item(
        "acct-1",
        "leaving",
        Some("shop-t.myshopify.com"),
    ))
    .await;
    let older = h.stream_records().await;
    h.kv.hold("bulk/delete", Some(SHOP));
    let run = first.invoke(json!({ "Records": older.clone() }));
    let race = async {
        until_held(&h).await;
        // Another shard: `arriving` takes the shop and writes its key.
        h.put(index_item("acct-2", "arriving", Some(SHOP))).await;
        let newer = h.stream_records().await;
        let answer = second.invoke(json!({ "Records": newer })).await;
        assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");
        assert_eq!(h.settings(SHOP).unwrap()["index_name"], "arriving");
        h.kv.release();
    };
    let (answer, ()) = tokio::join!(run, race);

    // The delete landed last; the batch checked the shop against the table (`arriving`
    // claims it now) and gave the key its value.
    assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");
    assert_eq!(h.settings(SHOP).unwrap()["index_name"], "arriving");
    assert_eq!(
        h.settings("shop-t.myshopify.com").unwrap()["index_name"],
        "leaving"
    );
}
}

crate::on_both_views! {
async fn a_shop_key_nobody_claims_any_more_is_deleted_by_the_index_that_left(view) {
    const SHOP: &str = "shop-s.myshopify.com";
    let mut h = Harness::with_view(view).await;
    for account in ["acct-1", "acct-2"] {
        h.keys.set_key(account, "marqo-key");
    }
    h.put(index_item("acct-1", "leaving", Some(SHOP))).await;
    h.export_stream().await;
    // `arriving` took the shop and was exported; the record of `leaving` giving it up comes
    // later (another shard, behind), and by then the table says nobody else claims it.
    h.put(index_item("acct-2", "arriving", Some(SHOP))).await;
    h.export_stream().await;
    h.put(index_item(
        "acct-1",
        "leaving",
        Some("shop-t.myshopify.com"),
    ))
    .await;
    let late = h.stream_records().await;
    h.put(index_item("acct-2", "arriving", None)).await;
    h.stream_records().await; // not yet exported

    let answer = h.invoke(json!({ "Records": late })).await;

    assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");
    // `arriving` wrote the key after `leaving` last did, but the table says nobody claims the
    // shop now: deleted (not left to `arriving` on trust of its last write).
    assert_eq!(h.settings(SHOP), None);
}
}

crate::on_both_views! {
async fn a_repoint_that_lands_after_the_claimer_s_own_write_is_written_again(view) {
    const SHOP: &str = "shop-s.myshopify.com";
    let mut h = Harness::with_view(view).await;
    for account in ["acct-1", "acct-2"] {
        h.keys.set_key(account, "marqo-key");
    }
    h.put(index_item("acct-1", "leaving", Some(SHOP))).await;
    h.export_stream().await;
    h.put(index_item("acct-2", "claimer", Some(SHOP))).await;
    h.export_stream().await;
    let first = Writer::start(&h).await;
    let second = Writer::start(&h).await;

    // `leaving` gives the shop up: the key is repointed to `claimer`, read now; held.
    h.put(index_item(
        "acct-1",
        "leaving",
        Some("shop-t.myshopify.com"),
    ))
    .await;
    let older = h.stream_records().await;
    h.kv.hold("bulk", Some(SHOP));
    let run = first.invoke(json!({ "Records": older.clone() }));
    let race = async {
        until_held(&h).await;
        // `claimer` changes, and its own batch writes the shop key with the newer settings.
        let mut newer_item = changed("acct-2", "claimer");
        newer_item["shop_id"] = json!({"S": SHOP});
        h.put(newer_item).await;
        let newer = h.stream_records().await;
        let answer = second.invoke(json!({ "Records": newer })).await;
        assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");
        assert_eq!(
            endpoint_of(&h, SHOP).as_deref(),
            Some("https://changed.idx.example")
        );
        h.kv.release();
    };
    let (answer, ()) = tokio::join!(run, race);

    // The repoint with the older settings landed last; the batch's check read the claimer
    // again and wrote its newer settings.
    assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");
    assert_eq!(
        endpoint_of(&h, SHOP).as_deref(),
        Some("https://changed.idx.example")
    );
}
}

crate::on_both_views! {
async fn a_reexport_that_lands_after_the_index_was_removed_deletes_it_again(view) {
    let mut h = Harness::with_view(view).await;
    h.keys.set_key("acct", "marqo-key");
    h.put(index_item("acct", "gone", None)).await;
    h.export_stream().await;
    let reexport = Writer::start(&h).await;
    let stream = Writer::start(&h).await;

    // The re-export read the index; its write is held while the index is removed and the
    // stream deletes its key.
    h.kv.hold("bulk", Some("acct-gone"));
    let run = reexport.invoke(json!({"system_account_id": "acct", "index_name": "gone"}));
    let race = async {
        until_held(&h).await;
        h.delete("acct", "INDEX#gone").await;
        let records = h.stream_records().await;
        let answer = stream.invoke(json!({ "Records": records })).await;
        assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");
        assert!(h.settings("acct-gone").is_none());
        h.kv.release();
    };
    let (answer, ()) = tokio::join!(run, race);

    // The older write landed last; the check against the table found no index, and deleted
    // the key again: a removed index is not served.
    assert!(h.settings("acct-gone").is_none(), "written back: {answer}");
    assert_eq!(answer["keys_written"], 0, "{answer}");
}
}

crate::on_both_views! {
/// `arriving` takes a shop on one shard while `leaving` gives it up on another, and the
/// ledger is slow to answer `arriving`'s writes. Its keys cannot land before the ledger names
/// it as the shop's claimer, so `leaving`, which finds no claimer, deletes the key before
/// `arriving` writes it, never after (with the references recorded after the KV writes, the
/// delete landed last and the shop was gone for good).
async fn a_shop_taken_while_another_index_gives_it_up_ends_with_its_new_claimer(view) {
    use ecom_emulators::dynamo_proxy::DynamoFault;
    const SHOP: &str = "shop-s.myshopify.com";
    let mut h = leaving_and_arriving(view, SHOP, true).await;
    let ProxiedFunction {
        dynamodb: ledger,
        runtime,
        function,
    } = behind_a_dynamodb_proxy(&h).await;
    let other = Writer::start(&h).await;

    h.put(index_item("acct-2", "arriving", Some(SHOP))).await;
    let taking = h.stream_records().await;
    ledger.inject(
        Some("TransactWriteItems"),
        Some("-ledger"),
        DynamoFault::Hold,
        usize::MAX,
    );
    let run = runtime.invoke(json!({ "Records": taking }), TIMEOUT);
    let race = async {
        until_ledger_held(&ledger, &function).await;
        // Another shard: `leaving` gives the shop up; the ledger names no other claimer yet.
        h.put(index_item(
            "acct-1",
            "leaving",
            Some("shop-t.myshopify.com"),
        ))
        .await;
        let giving = h.stream_records().await;
        let answer = other.invoke(json!({ "Records": giving })).await;
        assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");
        ledger.clear_faults();
        ledger.release();
    };
    let (answer, ()) = tokio::join!(run, race);

    let answer = answer.expect("an answer");
    assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");
    assert_eq!(
        h.settings(SHOP).map(|s| s["index_name"].clone()),
        Some(json!("arriving")),
        "{}",
        function.output()
    );
}
}

/// The records Lambda delivers next after `answer`: from the lowest reported record on, then
/// `newer` (the shard's records written since).
fn replay(records: &[Value], answer: &Value, newer: Vec<Value>) -> Vec<Value> {
    let failed = failures(answer);
    let from = (records.iter())
        .position(|r| {
            failed
                .iter()
                .any(|f| r["dynamodb"]["SequenceNumber"] == json!(f))
        })
        .unwrap_or(records.len());
    records[from..].iter().cloned().chain(newer).collect()
}

fn refused(error_type: &str) -> ecom_emulators::dynamo_proxy::DynamoFault {
    ecom_emulators::dynamo_proxy::DynamoFault::Fail {
        status: 400,
        error_type: error_type.into(),
    }
}

crate::on_both_views! {
/// `leaving` gives a shop up while `arriving` (another account, another shard) takes it:
/// `leaving`'s delete is held until `arriving`'s key landed, and its check cannot read the
/// table (a refused GetItem), so its record is reported. The replay must still hand the shop
/// over: every shop an index may be on stays recorded until a check confirmed it (issue 50,
/// order 1: with the references recorded before the check, the replay took the new shop for
/// the old one and the shop ended missing).
async fn a_replay_after_a_check_that_could_not_read_still_hands_the_shop_over(view) {
    const SHOP: &str = "shop-s.myshopify.com";
    let mut h = leaving_and_arriving(view, SHOP, true).await;
    let ProxiedFunction { dynamodb, runtime, function } = behind_a_dynamodb_proxy(&h).await;
    let other = Writer::start(&h).await;

    h.put(index_item("acct-1", "leaving", Some("shop-t.myshopify.com"))).await;
    let giving = h.stream_records().await;
    h.kv.hold("bulk/delete", Some(SHOP));
    let run = runtime.invoke(json!({ "Records": giving.clone() }), TIMEOUT);
    let race = async {
        until_held(&h).await;
        h.put(index_item("acct-2", "arriving", Some(SHOP))).await;
        let taking = h.stream_records().await;
        let answer = other.invoke(json!({ "Records": taking })).await;
        assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");
        // The check's read of `leaving` after its writes is refused.
        dynamodb.inject(Some("BatchGetItem"), Some(&format!("={}", h.table)), refused("AccessDeniedException"), 1);
        h.kv.release();
    };
    let (answer, ()) = tokio::join!(run, race);
    let answer = answer.expect("an answer");
    assert_eq!(failures(&answer), sequence_numbers(&giving), "{}", function.output());
    assert_eq!(h.settings(SHOP), None, "the delete landed last");
    dynamodb.clear_faults();

    let replayed = replay(&giving, &answer, Vec::new());
    let answer = runtime.invoke(json!({ "Records": replayed }), TIMEOUT).await.unwrap();

    assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");
    assert_eq!(
        h.settings(SHOP).map(|s| s["index_name"].clone()),
        Some(json!("arriving")),
        "{}",
        function.output()
    );
    assert_eq!(h.settings("shop-t.myshopify.com").unwrap()["index_name"], "leaving");
}
}

crate::on_both_views! {
/// An index moves S0 -> S1; its KV writes land, then the ledger refuses the write that follows
/// them. Before Lambda delivers again the index moves to S2. Nothing may keep serving it at S1
/// (issue 50, order 2: the replay took S0, still recorded, for the shop it had, and S1 kept
/// serving an index that no longer owned it).
async fn a_ledger_write_refused_after_the_kv_writes_never_leaves_a_shop_serving(view) {
    let [s0, s1, s2] = ["0", "1", "2"].map(|s| format!("shop-{s}.myshopify.com"));
    let mut h = products_migrated_on(view, &s0).await;
    let ProxiedFunction { dynamodb, runtime, function } = behind_a_dynamodb_proxy(&h).await;

    h.put(index_item("acct-1", "products", Some(&s1))).await;
    let first = h.stream_records().await;
    h.kv.hold("bulk", Some(&s1));
    let run = runtime.invoke(json!({ "Records": first.clone() }), TIMEOUT);
    let race = async {
        until_held(&h).await;
        // Every ledger write from here on is refused.
        let refusal = refused("AccessDeniedException");
        dynamodb.inject(Some("TransactWriteItems"), Some("-ledger"), refusal, usize::MAX);
        h.kv.release();
    };
    let (answer, ()) = tokio::join!(run, race);
    let answer = answer.expect("an answer");
    assert_eq!(h.settings(&s1).unwrap()["index_name"], "products", "{answer}");
    dynamodb.clear_faults();
    h.put(index_item("acct-1", "products", Some(&s2))).await;
    let second = h.stream_records().await;

    let delivered = replay(&first, &answer, second);
    let answer = runtime.invoke(json!({ "Records": delivered }), TIMEOUT).await.unwrap();

    assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");
    assert_eq!(h.settings(&s2).unwrap()["index_name"], "products");
    assert_eq!(h.settings(&s1), None, "{}", function.output());
    assert_eq!(h.settings(&s0), None);
}
}

crate::on_both_views! {
/// A move whose record was lost (its KV writes failed and it was never replayed) leaves the
/// ledger behind the table. A reconcile pass repairs the ledger while the index moves back:
/// its ledger write (if it makes one) is held while the stream moves the index back to the
/// shop the ledger named, then lands. The index's next move must give up every shop it was
/// on (issue 50, order 3: a conditional rewrite of the index's one shop landed after the
/// move back, and the shop it moved back to kept serving it).
async fn a_reconcile_s_repair_of_the_ledger_never_replaces_the_stream_s_newer_word(view) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use ecom_emulators::kv::Fault;
    let [sx, sy, sz] = ["x", "y", "z"].map(|s| format!("shop-{s}.myshopify.com"));
    let mut h = products_migrated_on(view, &sx).await;
    h.put(index_item("acct-1", "products", Some(&sy))).await;
    let unavailable = Fault::status(503);
    h.kv.inject(unavailable, 100);
    let lost = h.export_stream().await;
    assert_eq!(failures(&lost).len(), 1, "the move failed, and is never replayed: {lost}");
    h.kv.clear_faults();
    let ProxiedFunction { dynamodb, runtime, function } = behind_a_dynamodb_proxy(&h).await;
    let stream = Writer::start(&h).await;

    use ecom_emulators::dynamo_proxy::DynamoFault;
    dynamodb.inject(Some("TransactWriteItems"), Some("-ledger"), DynamoFault::Hold, 1);
    let done = AtomicBool::new(false);
    let pass = async {
        let pass = runtime.invoke(json!({"mode": "reconcile", "repair": true}), TIMEOUT).await;
        done.store(true, Ordering::SeqCst);
        pass
    };
    let race = async {
        while dynamodb.held() == 0 && !done.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        h.put(index_item("acct-1", "products", Some(&sx))).await;
        let back = h.stream_records().await;
        let answer = stream.invoke(json!({ "Records": back })).await;
        assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");
        dynamodb.release();
    };
    let (pass, ()) = tokio::join!(pass, race);
    let pass = pass.expect("an answer");
    assert_eq!(pass["complete"], true, "{pass}");
    moves_off_every_old_shop(&mut h, &stream, [&sx, &sy, &sz], &function).await;
}
}

crate::on_both_views! {
/// An index gives a shop up that only a rejected record (an endpoint that is not https) also
/// claims. The contract decides: the key is deleted, never left with the value of the index
/// that left (issue 50: it was kept "as it is", serving the leaving index's endpoint and API
/// key); the claimer's fix writes it again.
async fn a_shop_whose_only_other_claimer_is_rejected_is_deleted(view) {
    const SHOP: &str = "shop-s.myshopify.com";
    let mut h = Harness::with_view(view).await;
    for account in ["acct-1", "acct-2"] {
        h.keys.set_key(account, "marqo-key");
    }
    h.put(index_item("acct-1", "leaving", Some(SHOP))).await;
    h.export_stream().await;
    let mut invalid = index_item("acct-2", "invalid", Some(SHOP));
    invalid["index_endpoint"] = json!({"S": "http://not-https.example"});
    h.put(invalid).await;
    let rejected = h.export_stream().await;
    assert_eq!(failures(&rejected), Vec::<String>::new(), "{rejected}");
    assert_eq!(h.settings(SHOP).unwrap()["index_name"], "leaving");

    h.put(index_item("acct-1", "leaving", Some("shop-t.myshopify.com"))).await;
    let moved = h.export_stream().await;

    assert_eq!(failures(&moved), Vec::<String>::new(), "{moved}");
    assert_eq!(h.settings(SHOP), None, "never the leaving index's value");
    assert!(h.settings("shop-t.myshopify.com").is_some());
    // The claimer fixed: its record writes the key.
    h.put(index_item("acct-2", "invalid", Some(SHOP))).await;
    h.export_stream().await;
    assert_eq!(h.settings(SHOP).unwrap()["index_name"], "invalid");
}
}

/// `products` of `acct-1` migrated on shop x and moved to y: the move's records, its shard
/// behind a DynamoDB proxy, another writer, and x's KV delete held, so the shard's intent is
/// recorded before its first KV write waits.
async fn moving_products(
    view: aws_sdk_dynamodb::types::StreamViewType,
    [sx, sy]: [&str; 2],
) -> (Harness, ProxiedFunction, Writer, Vec<Value>) {
    let mut h = products_migrated_on(view, sx).await;
    let proxied = behind_a_dynamodb_proxy(&h).await;
    let operator = Writer::start(&h).await;
    h.put(index_item("acct-1", "products", Some(sy))).await;
    let moved = h.stream_records().await;
    h.kv.hold("bulk/delete", Some(sx));
    (h, proxied, operator, moved)
}

/// Once the move's KV write is held, its next ledger write (the shrink) is held in its place.
async fn hold_the_shrink(
    h: &Harness,
    dynamodb: &ecom_emulators::dynamo_proxy::DynamoProxy,
    function: &Function,
) {
    use ecom_emulators::dynamo_proxy::DynamoFault;
    until_held(h).await;
    dynamodb.inject(
        Some("TransactWriteItems"),
        Some("-ledger"),
        DynamoFault::Hold,
        1,
    );
    h.kv.release();
    until_ledger_held(dynamodb, function).await;
}

/// A stream batch moves `products` off shop x; its shrink, which read the ledger before, is
/// held while the table moves the index back to x and an operator (`payload`, its answer
/// checked by `answered`) writes x's key, finding x recorded already. Released, the shrink
/// takes nothing out (the operator counted x as an intent), so the index's next move gives x
/// up: its key is deleted, never left serving.
async fn an_operator_s_shop_outlives_a_held_shrink(
    view: aws_sdk_dynamodb::types::StreamViewType,
    payload: Value,
    answered: impl Fn(&Value),
) {
    let [sx, sy, sz] = ["x", "y", "z"].map(|s| format!("shop-{s}.myshopify.com"));
    let (mut h, proxied, operator, moved) = moving_products(view, [&sx, &sy]).await;
    let ProxiedFunction {
        dynamodb,
        runtime,
        function,
    } = proxied;
    let run = runtime.invoke(json!({ "Records": moved }), TIMEOUT);
    let race = async {
        hold_the_shrink(&h, &dynamodb, &function).await;
        h.put(index_item("acct-1", "products", Some(&sx))).await;
        answered(&operator.invoke(payload).await);
        assert_eq!(h.settings(&sx).unwrap()["index_name"], "products");
        dynamodb.release();
    };
    let (answer, ()) = tokio::join!(run, race);
    let answer = answer.expect("an answer");
    assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");

    moves_off_every_old_shop(&mut h, &operator, [&sx, &sy, &sz], &function).await;
}

crate::on_both_views! {
/// A backfill's page counts every reference it names as an intent (the simulation's seed 4628).
async fn a_backfill_s_shop_outlives_a_shrink_that_read_the_ledger_before_it(view) {
    let payload = json!({"mode": "backfill"});
    an_operator_s_shop_outlives_a_held_shrink(view, payload, |answer| {
        assert_eq!(answer["failed"], 0, "{answer}");
    })
    .await;
}
}

crate::on_both_views! {
/// A reconcile's table step finds the shop recorded (the shrink is held) and writes its
/// missing key: its repair counts what the index refers to as its intent (seed 1407).
async fn a_reconcile_s_repaired_shop_outlives_a_shrink_that_read_the_ledger_before_it(view) {
    let payload = json!({"mode": "reconcile", "repair": true});
    an_operator_s_shop_outlives_a_held_shrink(view, payload, |answer| {
        assert_eq!(answer["complete"], true, "{answer}");
        assert_eq!(answer["counts"]["settings"]["missing"], 1, "{answer}");
    })
    .await;
}
}

crate::on_both_views! {
/// `products` moves from shop x to y, and its shrink takes x out of its own item and itself
/// out of x's set in one transaction: a re-export that points `products` back at x just
/// after (its next ledger write held) finds both gone and records both again. Two steps would
/// let the second take `products` out of x's set after the re-export recorded it there, and
/// x's referrers would miss an index the ledger says serves x.
async fn an_intent_right_after_a_shrink_is_found_by_who_refers_to_its_shop(view) {
    use ecom_emulators::dynamo_proxy::{DynamoCall, DynamoFault};
    use ecom_settings_exporter::adapters::ledger::DynamoLedger;
    use ecom_settings_exporter::ports::{Ledger, Referred};
    let [sx, sy] = ["x", "y"].map(|s| format!("shop-{s}.myshopify.com"));
    let (h, proxied, operator, moved) = moving_products(view, [&sx, &sy]).await;
    let ProxiedFunction {
        dynamodb,
        runtime,
        function,
    } = proxied;
    let ledger_write = Some("TransactWriteItems");
    let hold = || dynamodb.inject(ledger_write, Some("-ledger"), DynamoFault::Hold, 1);
    let shrinks = || {
        let calls = dynamodb.calls();
        let ledger = |c: &&DynamoCall| c.tables.iter().any(|t| t.ends_with("-ledger"));
        let writes = calls.iter().filter(|c| Some(c.operation.as_str()) == ledger_write);
        writes.filter(ledger).count()
    };

    let run = runtime.invoke(json!({ "Records": moved }), TIMEOUT);
    let race = async {
        hold_the_shrink(&h, &dynamodb, &function).await;
        // The shrink's first ledger write goes; the next one waits for the re-export.
        hold();
        let before = shrinks();
        dynamodb.release();
        while shrinks() == before {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        until_ledger_held(&dynamodb, &function).await;
        h.put(index_item("acct-1", "products", Some(&sx))).await;
        let (account, index) = ("acct-1", "products");
        let payload = json!({"mode": "reexport", "system_account_id": account, "index_name": index});
        let answer = operator.invoke(payload).await;
        assert_eq!(answer["complete"], true, "{answer}");
        dynamodb.release();
    };
    let (answer, ()) = tokio::join!(run, race);
    let answer = answer.expect("an answer");
    assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");

    let ledger = DynamoLedger::new(&aws().await, h.ledger.clone());
    let products = ecom_settings_exporter::domain::IndexRef::new("acct-1", "products");
    let recorded = ledger.index_refs(std::slice::from_ref(&products)).await.unwrap();
    assert!(recorded[&products].shops.contains(&sx), "{recorded:?}");
    let referrers = ledger.referrers(&[Referred::Shop(sx.clone())]).await.unwrap();
    assert_eq!(referrers, vec![products], "{}", function.output());
}
}

crate::on_both_views! {
/// `target` moves to shop y (recorded already: a backfill wrote it) and its shard's write of
/// y is held while the table removes `target` and `reader` drops its alias to it. The
/// reader's shard removes `target` again on its behalf (its keys deleted, confirmed); that
/// removal takes nothing out of the ledger, so when the held write lands, y serving `target`
/// is still recorded and `target`'s own REMOVE deletes it (seed 15882: the derived removal
/// took y out, and a key served with the ledger not naming it).
async fn a_shop_written_after_an_alias_holder_removed_its_target_stays_recorded(view) {
    use ecom_settings_exporter::adapters::ledger::DynamoLedger;
    use ecom_settings_exporter::ports::Ledger;
    let [sx, sy] = ["x", "y"].map(|s| format!("shop-{s}.myshopify.com"));
    let target = ecom_settings_exporter::domain::IndexRef::new("acct-1", "target");
    let mut h = Harness::with_view(view).await;
    h.keys.set_key("acct-1", "marqo-key");
    h.put(index_item("acct-1", "target", Some(&sx))).await;
    h.put(aliasing("acct-1", "reader", "acct-1-target")).await;
    h.export_stream().await;
    h.migrate().await;
    let (shard, other) = (Writer::start(&h).await, Writer::start(&h).await);

    h.put(index_item("acct-1", "target", Some(&sy))).await;
    let moved = h.stream_records().await;
    let backfill = h.invoke(json!({"mode": "backfill"})).await;
    assert_eq!(backfill["failed"], 0, "{backfill}");
    h.kv.hold("bulk", Some(&sy));
    let run = shard.invoke(json!({ "Records": moved }));
    let race = async {
        until_held(&h).await;
        h.delete("acct-1", "INDEX#target").await;
        h.put(index_item("acct-1", "reader", None)).await;
        let records = h.stream_records().await;
        let (removed, dropped): (Vec<Value>, Vec<Value>) = (records.into_iter())
            .partition(|r| r["dynamodb"]["Keys"]["sk"]["S"] == "INDEX#target");
        let answer = other.invoke(json!({ "Records": dropped })).await;
        assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");
        assert_eq!(h.settings(&sy), None, "the reader's shard removed the target");
        h.kv.release();
        removed
    };
    let (answer, removed) = tokio::join!(run, race);
    assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");
    assert_eq!(h.settings(&sy).unwrap()["index_name"], "target");
    let ledger = DynamoLedger::new(&aws().await, h.ledger.clone());
    let recorded = ledger.index_refs(std::slice::from_ref(&target)).await.unwrap();
    let shops = recorded.get(&target).map(|refs| refs.shops.clone());
    assert!(
        shops.is_some_and(|shops| shops.contains(&sy)),
        "y serves `target`: recorded {recorded:?}\n{}",
        shard.function.output()
    );

    let answer = shard.invoke(json!({ "Records": removed })).await;
    assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");
    assert_eq!(h.settings(&sy), None, "{}", shard.function.output());
    assert_eq!(h.settings("acct-1-target"), None);
}
}

crate::on_both_views! {
/// `giver` and `claimer` claim one shop, `giver`'s value on it. `giver` is removed: its shard
/// hands the shop to `claimer`, and that write is held while `claimer` is removed too, by
/// another shard (which deletes the shop and shrinks it out of `claimer`'s references). The
/// held write lands, `giver`'s check cannot read the table, and its record is reported. By the
/// replay an alias reads `giver` (kept: the shop is left as it is), so the shop serves the
/// removed `claimer`: recorded on it again by the failed batch, it is given up by the next
/// `claimer` (seed 145927: nothing recorded it, and it kept serving).
async fn a_shop_handed_to_a_claimer_removed_before_the_write_landed_is_given_up_by_its_next_record(view) {
    const SHOP: &str = "shop-s.myshopify.com";
    let mut h = Harness::with_view(view).await;
    h.keys.set_key("acct-1", "marqo-key");
    h.put(index_item("acct-1", "claimer", Some(SHOP))).await;
    h.export_stream().await;
    h.put(index_item("acct-1", "giver", Some(SHOP))).await;
    h.export_stream().await;
    h.migrate().await;
    assert_eq!(h.settings(SHOP).unwrap()["index_name"], "giver");
    let ProxiedFunction { dynamodb, runtime, function } = behind_a_dynamodb_proxy(&h).await;
    let other = Writer::start(&h).await;

    h.delete("acct-1", "INDEX#giver").await;
    let giving = h.stream_records().await;
    h.kv.hold("bulk", Some(SHOP));
    let run = runtime.invoke(json!({ "Records": giving.clone() }), TIMEOUT);
    let race = async {
        until_held(&h).await;
        h.delete("acct-1", "INDEX#claimer").await;
        let removing = h.stream_records().await;
        let answer = other.invoke(json!({ "Records": removing })).await;
        assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");
        assert_eq!(h.settings(SHOP), None, "the claimer's removal deleted it");
        // The check's read after the handing write is refused.
        dynamodb.inject(Some("BatchGetItem"), Some(&format!("={}", h.table)), refused("AccessDeniedException"), 1);
        h.kv.release();
    };
    let (handed, ()) = tokio::join!(run, race);
    let handed = handed.expect("an answer");
    assert_eq!(failures(&handed), sequence_numbers(&giving), "{}", function.output());
    assert_eq!(h.settings(SHOP).unwrap()["index_name"], "claimer", "the handing write landed last");
    dynamodb.clear_faults();

    h.put(aliasing("acct-1", "reader", "acct-1-giver")).await;
    let aliased = h.stream_records().await;
    let answer = other.invoke(json!({ "Records": aliased })).await;
    assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");
    let replayed = replay(&giving, &handed, Vec::new());
    let answer = runtime.invoke(json!({ "Records": replayed }), TIMEOUT).await.unwrap();
    assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");
    assert_eq!(h.settings(SHOP).unwrap()["index_name"], "claimer", "kept: left as it is");

    h.put(index_item("acct-1", "claimer", Some("shop-t.myshopify.com"))).await;
    let answer = other.invoke(json!({ "Records": h.stream_records().await })).await;
    assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");
    assert_eq!(h.settings(SHOP), None, "{}", other.function.output());
    assert_eq!(h.settings("shop-t.myshopify.com").unwrap()["index_name"], "claimer");
}
}

crate::on_both_views! {
/// `giver` and `claimer` claim one shop, and a reader aliases `giver`. `giver` is removed: kept
/// for the alias, its shard hands the shop to `claimer`, and that write is held while `claimer`
/// drops the shop on another shard (the shop deleted, and shrunk out of `claimer`'s
/// references). The held write lands last; `giver`'s check reads the shop as `claimer`'s key
/// (the value's index) and deletes it: no index claims it (seed 2177: the check left it
/// serving `claimer`, as if it were the kept index's own shop).
async fn a_shop_handed_to_a_claimer_that_dropped_it_before_the_write_landed_is_deleted(view) {
    const SHOP: &str = "shop-s.myshopify.com";
    let mut h = Harness::with_view(view).await;
    h.keys.set_key("acct-1", "marqo-key");
    h.put(index_item("acct-1", "giver", Some(SHOP))).await;
    h.export_stream().await;
    h.put(index_item("acct-1", "claimer", Some(SHOP))).await;
    h.put(aliasing("acct-1", "reader", "acct-1-giver")).await;
    h.export_stream().await;
    h.migrate().await;
    let (shard, other) = (Writer::start(&h).await, Writer::start(&h).await);

    h.delete("acct-1", "INDEX#giver").await;
    let giving = h.stream_records().await;
    h.kv.hold("bulk", Some(SHOP));
    let run = shard.invoke(json!({ "Records": giving }));
    let race = async {
        until_held(&h).await;
        h.put(index_item("acct-1", "claimer", None)).await;
        let dropping = h.stream_records().await;
        let answer = other.invoke(json!({ "Records": dropping })).await;
        assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");
        assert_eq!(h.settings(SHOP), None, "the claimer's drop deleted it");
        h.kv.release();
    };
    let (answer, ()) = tokio::join!(run, race);
    assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");
    assert_eq!(h.settings(SHOP), None, "{}", shard.function.output());
    assert_eq!(h.settings("acct-1-giver").unwrap()["index_name"], "giver", "kept");
}
}

crate::on_both_views! {
/// `(acct-x, z)` reads `acct-x-x-y`, an id no index has yet (nothing recorded of it). Its drop
/// removes the id's own key on behalf of one index the id can name, `(acct, x-x-y)`, and that
/// delete is held while another shard creates `(acct-x, x-y)`, whose id it is too, and writes
/// its key. The delete lands last; the check reads every index the id can name and writes
/// `(acct-x, x-y)`'s value back (seed 1479 of the wide workload: the check read
/// `(acct, x-x-y)` alone, and the key stayed deleted until the next reconcile pass).
async fn a_dropped_target_s_delete_landing_after_another_index_of_its_id_came_is_undone(view) {
    const KEY: &str = "acct-x-x-y";
    let mut h = Harness::with_view(view).await;
    h.keys.set_key("acct-x", "marqo-key");
    h.put(aliasing("acct-x", "z", KEY)).await;
    h.export_stream().await;
    h.migrate().await;
    let (shard, other) = (Writer::start(&h).await, Writer::start(&h).await);

    h.put(index_item("acct-x", "z", None)).await;
    let dropping = h.stream_records().await;
    h.kv.hold("bulk/delete", Some(KEY));
    let run = shard.invoke(json!({ "Records": dropping }));
    let race = async {
        until_held(&h).await;
        h.put(index_item("acct-x", "x-y", None)).await;
        let creating = h.stream_records().await;
        let answer = other.invoke(json!({ "Records": creating })).await;
        assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");
        assert_eq!(h.settings(KEY).unwrap()["index_name"], "x-y", "written");
        h.kv.release();
    };
    let (answer, ()) = tokio::join!(run, race);
    assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");
    let value = h.settings(KEY);
    assert_eq!(value.map(|v| v["index_name"].clone()), Some(json!("x-y")), "{}", shard.function.output());
}
}

crate::on_both_views! {
/// `i` is aliased by `r`, whose record is rejected (a weight stored as a string: its aliases
/// read fail closed, nothing of its own recorded), and the ledger's set of who aliases `i`
/// names `r` (an extra member, as a shrink that read before a reconcile's add leaves it).
/// `i`'s REMOVE keeps it for `r`, and its intent (recording the alias on `r`) is held while
/// `r` drops the alias on another shard: that batch finds nothing recorded to remove. The
/// intent lands; the check reads `i` again, no alias keeps it, and its key is deleted (seed
/// 8291: it stayed until the next reconcile pass).
async fn an_index_kept_for_an_alias_dropped_before_its_intent_landed_is_deleted_by_its_check(view) {
    use aws_sdk_dynamodb::types::AttributeValue;
    let mut h = Harness::with_view(view).await;
    h.keys.set_key("acct-1", "marqo-key");
    h.put(index_item("acct-1", "i", None)).await;
    h.export_stream().await;
    h.migrate().await;
    let mut reader = aliasing("acct-1", "r", "acct-1-i");
    reader["index_aliases"]["M"]["doc_reads"]["M"]["targets"]["L"][0]["M"]["weight"] = json!({"S": "1"});
    h.put(reader).await;
    let answer = h.export_stream().await;
    assert_eq!(answer["batchItemFailures"], json!([]), "{answer}");
    assert_eq!(h.settings("acct-1-r"), None, "rejected");
    let member = AttributeValue::Ss(vec!["6:acct-1#r".into()]);
    let add = h.ddb.update_item().table_name(&h.ledger).update_expression("ADD referrers :r");
    let add = add.key("pk", AttributeValue::S("alias#acct-1-i".into()));
    let add = add.key("sk", AttributeValue::S("referrers".into()));
    add.expression_attribute_values(":r", member).send().await.unwrap();
    let ProxiedFunction { dynamodb, runtime, function } = behind_a_dynamodb_proxy(&h).await;
    let other = Writer::start(&h).await;

    h.delete("acct-1", "INDEX#i").await;
    let removing = h.stream_records().await;
    use ecom_emulators::dynamo_proxy::DynamoFault;
    dynamodb.inject(Some("TransactWriteItems"), Some("-ledger"), DynamoFault::Hold, 1);
    let run = runtime.invoke(json!({ "Records": removing }), TIMEOUT);
    let race = async {
        until_ledger_held(&dynamodb, &function).await;
        h.put(index_item("acct-1", "r", None)).await;
        let dropping = h.stream_records().await;
        let answer = other.invoke(json!({ "Records": dropping })).await;
        assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");
        assert!(h.settings("acct-1-i").is_some(), "r's batch found nothing to remove");
        dynamodb.release();
    };
    let (answer, ()) = tokio::join!(run, race);
    let answer = answer.expect("an answer");
    assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");
    assert_eq!(h.settings("acct-1-i"), None, "its check deleted it: {}", function.output());
}
}

crate::on_both_views! {
/// A re-export's check reads the table again after each write, and the table changes under
/// every read (each held by the DynamoDB proxy while an operator edits the item): after three
/// writes again the last read still differs, and the re-export fails, naming the key, rather
/// than going on forever. KV holds its last write; the stream's records of the edits write the
/// newest (docs/contract.md, "A writer whose check finds the table changed three rounds running").
async fn a_reexport_whose_index_changes_under_every_check_fails_after_three_writes_again(view) {
    use ecom_emulators::dynamo_proxy::DynamoFault;
    let mut h = Harness::with_view(view).await;
    h.keys.set_key("acct", "marqo-key");
    h.put(index_item("acct", "shoes", None)).await;
    h.export_stream().await;
    let ProxiedFunction { dynamodb, runtime, function } = behind_a_dynamodb_proxy(&h).await;
    let stream = Writer::start(&h).await;
    let endpoint = |n: usize| format!("https://edit-{n}.idx.example");
    let edit = |n: usize| {
        let mut item = index_item("acct", "shoes", None);
        item["index_endpoint"] = json!({"S": endpoint(n)});
        item
    };

    // The check's reads of the index by key (BatchGetItem of the settings table) are held.
    dynamodb.inject(Some("BatchGetItem"), Some(&format!("={}", h.table)), DynamoFault::Hold, 4);
    let payload = json!({"system_account_id": "acct", "index_name": "shoes"});
    let run = runtime.invoke(payload, TIMEOUT);
    let race = async {
        for n in 1..=4 {
            until_ledger_held(&dynamodb, &function).await;
            h.put(edit(n)).await;
            dynamodb.release();
            while dynamodb.held() > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    let (answer, ()) = tokio::join!(run, race);
    let error = answer.expect_err("the re-export fails");
    assert!(
        error.to_string().contains("other writers kept changing it; run again"),
        "{error}\n{}",
        function.output()
    );
    assert_eq!(endpoint_of(&h, "acct-shoes"), Some(endpoint(3)), "its last write");

    let answer = stream.invoke(json!({ "Records": h.stream_records().await })).await;
    assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");
    assert_eq!(endpoint_of(&h, "acct-shoes"), Some(endpoint(4)));
}
}

crate::on_both_views! {
/// A re-export's write is held while the index is removed and the stream deletes its key; the
/// write lands after the delete, and the re-export's check cannot read the table (a refused
/// BatchGetItem): the re-export fails, and the key serves the removed index. Run again, it
/// finds no settings record; the next reconcile pass deletes the key as orphaned (the window
/// row of an operator's write of an index removed meanwhile).
async fn a_reexport_landing_after_the_index_was_removed_unchecked_is_left_to_the_reconcile(view) {
    let mut h = Harness::with_view(view).await;
    h.keys.set_key("acct", "marqo-key");
    h.put(index_item("acct", "shoes", None)).await;
    h.export_stream().await;
    let ProxiedFunction { dynamodb, runtime, function } = behind_a_dynamodb_proxy(&h).await;
    let stream = Writer::start(&h).await;

    h.kv.hold("bulk", Some("acct-shoes"));
    let payload = json!({"system_account_id": "acct", "index_name": "shoes"});
    let run = runtime.invoke(payload.clone(), TIMEOUT);
    let race = async {
        until_held(&h).await;
        h.delete("acct", "INDEX#shoes").await;
        let answer = stream.invoke(json!({ "Records": h.stream_records().await })).await;
        assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");
        assert_eq!(h.settings("acct-shoes"), None, "the stream deleted it");
        let table = format!("={}", h.table);
        dynamodb.inject(Some("BatchGetItem"), Some(&table), refused("AccessDeniedException"), 1);
        h.kv.release();
    };
    let (answer, ()) = tokio::join!(run, race);
    let error = answer.expect_err("its check could not read");
    assert!(error.to_string().contains("could not be read again"), "{error}");
    assert_eq!(endpoint_of(&h, "acct-shoes"), Some("https://acct-shoes.idx.example".into()));

    let again = runtime.invoke(payload, TIMEOUT).await.expect_err("no settings record");
    assert!(again.to_string().contains("no settings record"), "{again}");
    let reconcile = h.invoke(json!({"mode": "reconcile", "repair": true})).await;
    assert_eq!(reconcile["counts"]["settings"]["orphaned"], 1, "{reconcile}");
    assert_eq!(h.settings("acct-shoes"), None, "{}", function.output());
}
}

crate::on_both_views! {
/// A backfill reads `products` on shop x, and its intent is held while `products` moves to y
/// and the stream's batch (another writer) writes y, deletes x and shrinks x out of the ledger.
/// The intent lands (x recorded again), the backfill writes x, and its check cannot read its
/// index again (a refused BatchGetItem): the record fails, and x serves `products`,
/// recorded, until the next reconcile pass deletes it as orphaned (the window row of a
/// backfill's write landing after the stream's shrink, when its check cannot read).
async fn a_backfill_s_old_shop_unchecked_after_the_stream_s_shrink_is_left_to_the_reconcile(view) {
    use ecom_emulators::dynamo_proxy::DynamoFault;
    use ecom_settings_exporter::adapters::ledger::DynamoLedger;
    use ecom_settings_exporter::ports::Ledger;
    let [sx, sy] = ["x", "y"].map(|s| format!("shop-{s}.myshopify.com"));
    let mut h = products_migrated_on(view, &sx).await;
    let ProxiedFunction { dynamodb, runtime, function } = behind_a_dynamodb_proxy(&h).await;
    let stream = Writer::start(&h).await;

    dynamodb.inject(Some("TransactWriteItems"), Some("-ledger"), DynamoFault::Hold, 1);
    let run = runtime.invoke(json!({"mode": "backfill"}), TIMEOUT);
    let race = async {
        until_ledger_held(&dynamodb, &function).await;
        h.put(index_item("acct-1", "products", Some(&sy))).await;
        let answer = stream.invoke(json!({ "Records": h.stream_records().await })).await;
        assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");
        assert_eq!(h.settings(&sx), None, "the stream gave x up");
        let table = format!("={}", h.table);
        dynamodb.inject(Some("BatchGetItem"), Some(&table), refused("AccessDeniedException"), 1);
        dynamodb.release();
    };
    let (answer, ()) = tokio::join!(run, race);
    let answer = answer.expect("an answer");
    assert_eq!(answer["failed"], 1, "{answer}");
    assert_eq!(h.settings(&sx).unwrap()["index_name"], "products", "the window");
    let products = ecom_settings_exporter::domain::IndexRef::new("acct-1", "products");
    let ledger = DynamoLedger::new(&aws().await, h.ledger.clone());
    let recorded = ledger.index_refs(std::slice::from_ref(&products)).await.unwrap();
    assert!(recorded[&products].shops.contains(&sx), "x recorded: {recorded:?}");
    dynamodb.clear_faults();

    let reconcile = h.invoke(json!({"mode": "reconcile", "repair": true})).await;
    assert_eq!(reconcile["counts"]["settings"]["orphaned"], 1, "{reconcile}");
    assert_eq!(h.settings(&sx), None, "{}", function.output());
    assert_eq!(h.settings(&sy).unwrap()["index_name"], "products");
}
}

crate::on_both_views! {
/// An operator's run of an index rejected now gives up the shop it no longer claims: the table
/// moved `leaving` off the shop and made its endpoint plain http, and that batch was lost. The
/// re-export's delete of the shop key is held while the stream (another writer) exports
/// `arriving`, which takes the shop; the delete lands last, and the re-export's check hands the
/// key to `arriving`. The re-export itself is refused, and the rejected index's own key stays
/// as it was.
async fn an_operator_s_give_up_of_a_rejected_index_s_shop_landing_after_its_claimer_is_undone(view) {
    const SHOP: &str = "shop-s.myshopify.com";
    let mut h = leaving_and_arriving(view, SHOP, true).await;
    let operator = Writer::start(&h).await;
    let stream = Writer::start(&h).await;
    let mut rejected = index_item("acct-1", "leaving", Some("shop-t.myshopify.com"));
    rejected["index_endpoint"] = json!({"S": "http://leaving.idx.example"});
    h.put(rejected).await;
    h.stream_records().await; // lost

    h.kv.hold("bulk/delete", Some(SHOP));
    let payload = json!({"system_account_id": "acct-1", "index_name": "leaving"});
    let run = operator.runtime.invoke(payload, TIMEOUT);
    let race = async {
        until_held(&h).await;
        h.put(index_item("acct-2", "arriving", Some(SHOP))).await;
        let answer = stream.invoke(json!({ "Records": h.stream_records().await })).await;
        assert_eq!(failures(&answer), Vec::<String>::new(), "{answer}");
        assert_eq!(h.settings(SHOP).unwrap()["index_name"], "arriving");
        h.kv.release();
    };
    let (answer, ()) = tokio::join!(run, race);

    let error = answer.expect_err("a rejected index is not re-exported");
    assert!(error.to_string().contains("index leaving failed"), "{error}");
    assert_eq!(
        h.settings(SHOP).map(|s| s["index_name"].clone()),
        Some(json!("arriving")),
        "{}",
        operator.function.output()
    );
    let own = endpoint_of(&h, "acct-1-leaving");
    assert_eq!(own.as_deref(), Some("https://acct-1-leaving.idx.example"));
}
}
