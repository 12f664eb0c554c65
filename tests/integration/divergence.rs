//! KV never silently diverges from the table: each way it once could, closed, one test each
//! (docs/contract.md, "Semantics that must hold").

use std::time::{Duration, Instant};

use crate::common::*;
use aws_sdk_dynamodb::types::StreamViewType;
use ecom_emulators::kv::Fault;
use serde_json::{json, Value};

async fn new_image_harness() -> Harness {
    let h = Harness::with_view(StreamViewType::NewImage).await;
    h.keys.set_key("acct-1", "k");
    h
}

fn modify_of(record: &Value, event: &str, seq: usize) -> Value {
    let mut record = record.clone();
    record["eventName"] = json!(event);
    record["dynamodb"]["SequenceNumber"] = json!(format!("{seq:021}"));
    record
}

#[tokio::test]
async fn a_retry_after_a_failed_old_shop_delete_still_deletes_the_old_shop() {
    let mut h = new_image_harness().await;
    h.put(index_item("acct-1", "p", Some("shop-1.myshopify.com")))
        .await;
    h.export_stream().await;
    // One batch: p changes another field (still shop-1), then moves to shop-2.
    let mut edited = index_item("acct-1", "p", Some("shop-1.myshopify.com"));
    edited["pixel_id"] = json!({"S": "px-2"});
    h.put(edited).await;
    h.put(index_item("acct-1", "p", Some("shop-2.myshopify.com")))
        .await;
    let records = h.stream_records().await;
    assert_eq!(records.len(), 2);
    // The delete of shop-1 (and every write of the batch) fails for good.
    h.kv.inject(Fault::status(503), 100);

    let response = h.invoke(json!({ "Records": records.clone() })).await;

    // A record's outcome is its index's: both are retried, and the ledger still names shop-1.
    let failed = failures(&response);
    assert_eq!(failed, sequence_numbers(&records));

    // Lambda replays from the lowest reported record.
    h.kv.clear_faults();
    let from = records
        .iter()
        .position(|r| r["dynamodb"]["SequenceNumber"] == json!(failed[0]))
        .unwrap();
    let replay = h
        .invoke(json!({ "Records": records[from..].to_vec() }))
        .await;

    assert_eq!(failures(&replay), Vec::<String>::new());
    assert_eq!(
        h.settings("shop-1.myshopify.com"),
        None,
        "the old shop is gone after the retry"
    );
    assert_eq!(
        h.settings("shop-2.myshopify.com").unwrap()["index_name"],
        "p"
    );
    assert_eq!(
        h.settings("acct-1-p").unwrap()["shop_id"],
        "shop-2.myshopify.com"
    );
}

#[tokio::test]
async fn a_shop_that_leaves_an_index_on_a_new_image_stream_loses_its_key() {
    let mut h = new_image_harness().await;
    h.put(index_item("acct-1", "p", Some("shop-1.myshopify.com")))
        .await;
    h.export_stream().await;
    let reads_before = h.kv_calls("bulk/get");

    h.put(index_item("acct-1", "p", Some("shop-2.myshopify.com")))
        .await;
    let response = h.export_stream().await;

    assert_eq!(failures(&response), Vec::<String>::new());
    assert_eq!(h.settings("shop-1.myshopify.com"), None);
    assert_eq!(
        h.settings("shop-2.myshopify.com").unwrap()["shop_id"],
        "shop-2.myshopify.com"
    );
    // The ledger recorded shop 1 when the index was exported: no KV read.
    assert_eq!(h.kv_calls("bulk/get") - reads_before, 0);
    assert_eq!(h.kv_calls("values"), 0, "no read per key");
}

#[tokio::test]
async fn modified_indexes_read_nothing_from_kv() {
    let h = new_image_harness().await;
    // 150 modifies of indexes KV already holds, and 20 inserts: the ledger names their shops.
    let mut records: Vec<Value> = Vec::new();
    for i in 0..170 {
        let mut record = json!({
            "eventID": i.to_string(), "eventName": if i < 150 { "MODIFY" } else { "INSERT" },
            "eventVersion": "1.1", "eventSource": "aws:dynamodb", "awsRegion": REGION,
            "dynamodb": {
                "Keys": {"pk": {"S": "acct-1"}, "sk": {"S": format!("INDEX#i{i}")}},
                "NewImage": index_item("acct-1", &format!("i{i}"), Some(&format!("s{i}.myshopify.com"))),
                "SizeBytes": 100, "StreamViewType": "NEW_IMAGE"
            }
        });
        record = modify_of(&record, record["eventName"].as_str().unwrap(), i);
        records.push(record);
    }
    h.seed_table(&records).await;

    let response = h.invoke(json!({ "Records": records })).await;

    assert_eq!(failures(&response), Vec::<String>::new());
    assert_eq!(h.kv_calls("bulk/get"), 0);
    assert_eq!(h.kv_calls("values"), 0);
}

#[tokio::test]
async fn a_shared_shop_key_moves_to_the_index_that_still_claims_it() {
    let mut h = Harness::new().await;
    h.keys.set_key("acct-1", "k");
    h.put(index_item("acct-1", "b", Some("shop-s.myshopify.com")))
        .await;
    h.export_stream().await;
    h.put(index_item("acct-1", "a", Some("shop-s.myshopify.com")))
        .await;
    h.export_stream().await;
    assert_eq!(
        h.settings("shop-s.myshopify.com").unwrap()["index_name"],
        "a"
    );

    h.delete("acct-1", "INDEX#a").await;
    let response = h.export_stream().await;

    assert_eq!(failures(&response), Vec::<String>::new());
    assert_eq!(h.settings("acct-1-a"), None);
    assert_eq!(
        h.settings("shop-s.myshopify.com").unwrap()["index_name"],
        "b",
        "the shop key now routes to the index that claims it"
    );

    // The same when the claiming index's neighbour moves its shop elsewhere.
    h.put(index_item("acct-1", "c", Some("shop-t.myshopify.com")))
        .await;
    h.put(index_item("acct-1", "d", Some("shop-t.myshopify.com")))
        .await;
    h.export_stream().await;
    assert_eq!(
        h.settings("shop-t.myshopify.com").unwrap()["index_name"],
        "d"
    );
    h.put(index_item("acct-1", "d", Some("shop-u.myshopify.com")))
        .await;
    let response = h.export_stream().await;

    assert_eq!(failures(&response), Vec::<String>::new());
    assert_eq!(
        h.settings("shop-t.myshopify.com").unwrap()["index_name"],
        "c"
    );
    assert_eq!(
        h.settings("shop-u.myshopify.com").unwrap()["index_name"],
        "d"
    );
}

/// Two indexes claim one shop: the one written last keeps its key. A verify repair of the
/// other finds the key in sync (as the reconcile does) and leaves it with the last writer.
#[tokio::test]
async fn a_verify_repair_leaves_a_shared_shop_with_the_index_written_last() {
    let mut h = Harness::new().await;
    h.keys.set_key("acct-1", "k");
    h.put(index_item("acct-1", "b", Some("shop-s.myshopify.com")))
        .await;
    h.put(index_item("acct-1", "a", Some("shop-s.myshopify.com")))
        .await;
    h.export_stream().await;
    assert_eq!(
        h.settings("shop-s.myshopify.com").unwrap()["index_name"],
        "a"
    );

    let answer = h
        .invoke(
            json!({"mode": "verify", "system_account_id": "acct-1", "index_name": "b",
                       "repair": true}),
        )
        .await;

    assert_eq!(answer["in_sync"], true, "{answer}");
    assert_eq!(answer["counts"]["stale"], 0, "{answer}");
    assert_eq!(answer["repaired"]["written"], json!([]), "{answer}");
    assert_eq!(
        h.settings("shop-s.myshopify.com").unwrap()["index_name"],
        "a",
        "the shop stays with the index written last"
    );
}

/// Alias safety is decided by what a value written may route through, recorded in the ledger
/// when it was written: an alias whose record was never valid (a weight stored as a string)
/// was never written, so nothing at the edge reads its target through it, and the target's
/// REMOVE deletes its keys. (One written while valid and rejected since keeps protecting it:
/// `ledger_references::an_alias_rejected_since_its_export_protects_its_target_after_the_migration`.)
#[tokio::test]
async fn an_alias_never_written_protects_nothing() {
    let mut h = Harness::new().await;
    h.keys.set_key("acct-1", "k");
    h.put(index_item("acct-1", "v1", Some("shop-v1.myshopify.com")))
        .await;
    h.export_stream().await;
    // A hand edit stored a target weight as a string.
    let mut front = index_item("acct-1", "front", None);
    front["index_aliases"] = json!({"M": {"doc_reads": {"M": {"enabled": {"BOOL": true},
        "targets": {"L": [{"M": {"index_id": {"S": "acct-1-v1"}, "weight": {"S": "0.5"}}}]}}}}});
    h.put(front).await;
    h.export_stream().await;

    h.delete("acct-1", "INDEX#v1").await;
    let response = h.export_stream().await;

    assert_eq!(failures(&response), Vec::<String>::new());
    assert!(h.settings("acct-1-front").is_none(), "never written");
    assert!(h.settings("acct-1-v1").is_none());
    assert!(h.settings("shop-v1.myshopify.com").is_none());
}

#[tokio::test]
async fn repair_never_deletes_another_index_query_configs() {
    let mut h = Harness::new().await;
    h.keys.set_key("acct-1", "k1");
    // (acct-1, x) and (acct, 1-x): their query-config keys share `qcfg-acct-1-x-`.
    h.put(query_item("acct", "1-x", "boots")).await;
    h.export_stream().await;
    h.put(index_item("acct-1", "x", None)).await;
    h.put(query_item("acct-1", "x", "shoes")).await;
    h.invoke(json!({"system_account_id": "acct-1", "index_name": "x",
                    "include_query_configs": true}))
        .await;
    let before = h.kv.keys(CF_ACCOUNT, QCFG_NS);
    // Two overrides, and one filter key the two indexes share by contract (`qfilter-acct-1-x`).
    assert_eq!(before.len(), 3);

    let answer = h
        .invoke(
            json!({"mode": "verify", "system_account_id": "acct-1", "index_name": "x",
                       "include_query_configs": true, "repair": true}),
        )
        .await;

    assert_eq!(answer["in_sync"], true, "{answer}");
    assert_eq!(answer["counts"]["unexpected"], 0);
    assert_eq!(answer["repaired"]["deleted"], json!([]));
    assert_eq!(h.kv.keys(CF_ACCOUNT, QCFG_NS), before);
}

#[tokio::test]
async fn operators_export_the_current_api_key_after_a_rotation() {
    let mut h = Harness::new().await;
    h.keys.set_key("acct-1", "key-old");
    h.put(index_item("acct-1", "p", None)).await;
    h.export_stream().await; // the old key is now cached for warm invocations
    h.keys.set_key("acct-1", "key-new");

    let index = json!({"system_account_id": "acct-1", "index_name": "p"});
    h.invoke(index.clone()).await;

    assert_eq!(h.settings("acct-1-p").unwrap()["marqo_api_key"], "key-new");
    let mut verify = index;
    verify["mode"] = json!("verify");
    h.keys.set_key("acct-1", "key-newer");
    let answer = h.invoke(verify).await;
    assert_eq!(
        answer["in_sync"], false,
        "verify compares with the current key"
    );
    assert_eq!(answer["keys"][0]["fields"], json!(["marqo_api_key"]));
}

async fn one_pending(h: &mut Harness) -> Vec<Value> {
    h.keys.set_key("acct-1", "k");
    h.put(index_item("acct-1", "p", Some("shop-1.myshopify.com")))
        .await;
    h.stream_records().await
}

#[tokio::test]
async fn retry_after_as_an_http_date_or_in_milliseconds_is_honoured() {
    for (date, millis, at_least) in [(Some(2), None, 1_000), (None, Some(1_500), 1_500)] {
        let mut h = Harness::new().await;
        let records = one_pending(&mut h).await;
        h.kv.inject(
            Fault::Status {
                retry_after_raw: None,
                location: None,
                status: 429,
                retry_after: None,
                retry_after_date: date,
                retry_after_ms: millis,
            },
            1,
        );

        let started = Instant::now();
        let response = h.invoke(json!({ "Records": records })).await;

        assert_eq!(failures(&response), Vec::<String>::new());
        assert!(
            started.elapsed() >= Duration::from_millis(at_least),
            "waited {:?}, told {date:?} s / {millis:?} ms",
            started.elapsed()
        );
        assert!(h.settings("shop-1.myshopify.com").is_some());
    }
}

#[tokio::test]
async fn a_rate_limit_lockout_is_waited_out_until_the_deadline_not_hammered() {
    let mut h = Harness::new().await;
    let records = one_pending(&mut h).await;
    h.kv.inject(
        Fault::Status {
            retry_after_raw: None,
            location: None,
            status: 429,
            retry_after: Some(300),
            retry_after_date: None,
            retry_after_ms: None,
        },
        100,
    );

    let started = Instant::now();
    let response = h
        .try_invoke(
            json!({ "Records": records.clone() }),
            Duration::from_secs(3),
        )
        .await
        .unwrap();

    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(2_900) && waited < Duration::from_secs(5),
        "spent the invocation waiting: {waited:?}"
    );
    assert_eq!(failures(&response), sequence_numbers(&records));
    assert_eq!(
        h.kv.requests().len(),
        1,
        "one request, then no more during the lockout"
    );
}

#[tokio::test]
async fn numbers_reach_kv_exactly_as_the_table_holds_them() {
    let mut h = Harness::new().await;
    h.keys.set_key("acct-1", "k");
    let mut item = index_item("acct-1", "p", None);
    item["search_config"] = json!({"M": {
        "big": {"N": "123456789012345678901234567890"},
        "decimal": {"N": "3.14159265358979323846264338327950288"}
    }});
    h.put(item).await;

    let response = h.export_stream().await;

    assert_eq!(failures(&response), Vec::<String>::new());
    let raw = h.kv.value(CF_ACCOUNT, SETTINGS_NS, "acct-1-p").unwrap();
    assert!(
        raw.contains(r#""big":123456789012345678901234567890"#),
        "{raw}"
    );
    assert!(
        raw.contains(r#""decimal":3.14159265358979323846264338327950288"#),
        "{raw}"
    );
}

#[tokio::test]
async fn unsuccessful_keys_that_were_never_sent_are_not_resent() {
    let mut h = Harness::new().await;
    let records = one_pending(&mut h).await;
    h.kv.inject(Fault::ForeignUnsuccessfulKeys { count: 2 }, 1);
    let logs = Logs::capture();

    let response = h.invoke(json!({ "Records": records })).await;

    assert_eq!(failures(&response), Vec::<String>::new());
    assert_eq!(h.bulk_write_sizes(), [2], "sent once");
    assert!(h.settings("shop-1.myshopify.com").is_some());
    assert_eq!(logs.matching("not in the request").len(), 1);
}
