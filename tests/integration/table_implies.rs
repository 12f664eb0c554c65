//! What the table implies, decided once (issue 62): each case a randomized workload found,
//! reproduced alone, on both stream view types (docs/contract.md, "Alias deletion safety",
//! "The old shop key", "Query-override filter").

use ecom_emulators::kv::Fault;
use serde_json::{json, Value};

use crate::common::*;

const SHOP: &str = "shop-s.myshopify.com";

/// The index a settings key serves, by the name its value gives.
fn serves(h: &Harness, key: &str) -> Option<String> {
    h.settings(key)
        .map(|v| v["index_name"].as_str().unwrap_or_default().to_owned())
}

fn exported(answer: &Value) {
    assert_eq!(failures(answer), Vec::<String>::new(), "{answer}");
}

crate::on_both_views! {
/// 1. A batch holding a change of an override of T and, later, a REMOVE of T, which an alias
/// keeps: the override's filter is built (T's overrides are read), and the shard goes on.
async fn an_override_and_the_remove_of_its_aliased_index_in_one_batch_never_stall(view) {
    let mut h = Harness::with_view(view).await;
    h.keys.set_key("acct-1", "k");
    h.put(index_item("acct-1", "t", None)).await;
    h.put(aliasing("acct-1", "r", "acct-1-t")).await;
    h.put(query_item("acct-1", "t", "shoes")).await;
    exported(&h.export_stream().await);

    h.put(query_item("acct-1", "t", "boots")).await;
    h.delete("acct-1", "INDEX#t").await;
    let answer = h.export_stream().await;

    exported(&answer);
    assert_eq!(serves(&h, "acct-1-t").as_deref(), Some("t"), "the alias keeps it");
    assert!(h.query_config(&qcfg_key("acct-1", "t", "boots")).is_some());
    let filter = filter_of(&h, "acct-1", "t").expect("its overrides have a filter");
    assert_eq!(filter["count"], 2, "{filter}");
}
}

crate::on_both_views! {
/// 2. T removed while R reads it (kept), then R drops the alias: T's own key and its shop key
/// go in that batch.
async fn a_kept_index_s_keys_go_with_the_alias_that_kept_them(view) {
    let mut h = Harness::with_view(view).await;
    h.keys.set_key("acct-1", "k");
    h.put(index_item("acct-1", "t", Some(SHOP))).await;
    h.put(aliasing("acct-1", "r", "acct-1-t")).await;
    exported(&h.export_stream().await);
    h.delete("acct-1", "INDEX#t").await;
    exported(&h.export_stream().await);
    assert_eq!(serves(&h, "acct-1-t").as_deref(), Some("t"), "kept for the alias");
    assert_eq!(serves(&h, SHOP).as_deref(), Some("t"), "nobody else claims its shop");

    h.put(index_item("acct-1", "r", None)).await;
    let answer = h.export_stream().await;

    exported(&answer);
    assert_eq!(h.settings("acct-1-t"), None, "no alias reads it any more");
    assert_eq!(h.settings(SHOP), None);
    assert_eq!(serves(&h, "acct-1-r").as_deref(), Some("r"));
}
}

crate::on_both_views! {
/// 2. The same when the alias goes with its holder's REMOVE.
async fn a_kept_index_s_keys_go_with_the_index_whose_alias_kept_them(view) {
    let mut h = Harness::with_view(view).await;
    h.keys.set_key("acct-1", "k");
    h.put(index_item("acct-1", "t", Some(SHOP))).await;
    h.put(aliasing("acct-1", "r", "acct-1-t")).await;
    exported(&h.export_stream().await);
    h.delete("acct-1", "INDEX#t").await;
    exported(&h.export_stream().await);

    h.delete("acct-1", "INDEX#r").await;
    let answer = h.export_stream().await;

    exported(&answer);
    for key in ["acct-1-t", SHOP, "acct-1-r"] {
        assert_eq!(h.settings(key), None, "{key}");
    }
}
}

crate::on_both_views! {
/// 3. T, kept for an alias, gives its shop key to U, which claims the shop too, across
/// batches: the shop never routes to the removed index while another claims it.
async fn a_kept_index_gives_its_shop_to_another_claimer(view) {
    let mut h = Harness::with_view(view).await;
    h.keys.set_key("acct-1", "k");
    h.put(index_item("acct-1", "t", Some(SHOP))).await;
    h.put(aliasing("acct-1", "r", "acct-1-t")).await;
    exported(&h.export_stream().await);
    h.put(index_item("acct-1", "u", Some(SHOP))).await;
    exported(&h.export_stream().await);
    // T written last: the shop serves it while both claim it.
    h.put(changed_endpoint(index_item("acct-1", "t", Some(SHOP)))).await;
    exported(&h.export_stream().await);
    assert_eq!(serves(&h, SHOP).as_deref(), Some("t"));

    h.delete("acct-1", "INDEX#t").await;
    let answer = h.export_stream().await;

    exported(&answer);
    assert_eq!(serves(&h, SHOP).as_deref(), Some("u"), "{answer}");
    assert_eq!(serves(&h, "acct-1-t").as_deref(), Some("t"), "the alias still reads it");
}
}

fn changed_endpoint(mut item: Value) -> Value {
    item["index_endpoint"] = json!({"S": "https://changed.idx.example"});
    item
}

/// 4. An index with override records and no settings record: its filter is implied (by its
/// overrides), so a reconcile finds no drift, pass after pass.
#[tokio::test]
async fn overrides_without_a_settings_record_are_no_drift() {
    let mut h = Harness::new().await;
    h.keys.set_key("acct-1", "k");
    h.put(query_item("acct-1", "x", "shoes")).await;
    exported(&h.export_stream().await);
    assert_eq!(filter_of(&h, "acct-1", "x").expect("a filter")["count"], 1);

    for pass in 0..2 {
        let answer = h.invoke(json!({"mode": "reconcile", "repair": true})).await;
        for namespace in ["settings", "query_configs"] {
            let counts = &answer["counts"][namespace];
            assert_eq!(
                (&counts["missing"], &counts["stale"], &counts["orphaned"]),
                (&json!(0), &json!(0), &json!(0)),
                "pass {pass}: {answer}"
            );
        }
        assert_eq!(
            answer["repaired"],
            json!({"written": 0, "deleted": 0, "ledger_marked": 0, "ledger_swept": 0}),
            "{answer}"
        );
    }
    assert_eq!(filter_of(&h, "acct-1", "x").expect("a filter")["count"], 1);
}

/// 4. An index without overrides has no filter: a count-0 filter (an earlier version wrote
/// one on a re-export) is drift, deleted by verify's repair and by the reconcile's.
#[tokio::test]
async fn an_index_without_overrides_has_no_filter() {
    let mut h = Harness::new().await;
    h.keys.set_key("acct-1", "k");
    h.put(index_item("acct-1", "a", None)).await;
    h.put(index_item("acct-1", "b", None)).await;
    exported(&h.export_stream().await);
    let reexport = json!({"system_account_id": "acct-1", "index_name": "a",
                          "include_query_configs": true});
    h.invoke(reexport).await;
    assert_eq!(
        filter_of(&h, "acct-1", "a"),
        None,
        "never written with count 0"
    );
    let empty = r#"{"schema_version":1,"system_account_id":"acct-1","index_name":"a","filter":"binary_fuse8","count":0}"#;
    for index in ["a", "b"] {
        let empty = empty.replace("\"a\"", &format!("\"{index}\""));
        h.kv.insert(
            CF_ACCOUNT,
            QCFG_NS,
            &format!("qfilter-acct-1-{index}"),
            &empty,
        );
    }

    let verify = json!({"mode": "verify", "system_account_id": "acct-1", "index_name": "a",
                        "include_query_configs": true, "repair": true});
    let answer = h.invoke(verify).await;
    assert_eq!(answer["counts"]["unexpected"], 1, "{answer}");
    assert_eq!(filter_of(&h, "acct-1", "a"), None);

    let answer = h.invoke(json!({"mode": "reconcile", "repair": true})).await;
    assert_eq!(answer["counts"]["query_configs"]["orphaned"], 1, "{answer}");
    assert_eq!(filter_of(&h, "acct-1", "b"), None);
}

/// 7. A verify with repair that fails says so, not "re-export".
#[tokio::test]
async fn a_failed_verify_repair_says_it_was_a_verify_repair() {
    let mut h = Harness::new().await;
    h.keys.set_key("acct-1", "k");
    h.put(index_item("acct-1", "a", None)).await;
    exported(&h.export_stream().await);
    h.kv.remove(CF_ACCOUNT, SETTINGS_NS, "acct-1-a");
    let refused = Fault::RefuseKey {
        key: "acct-1-a".into(),
    };
    h.kv.inject(refused, 10);

    let verify = json!({"mode": "verify", "system_account_id": "acct-1", "index_name": "a",
                        "repair": true});
    let error = h
        .try_invoke(verify, std::time::Duration::from_secs(20))
        .await
        .expect_err("the repair cannot write");

    assert!(
        error.starts_with("verify repair of account acct-1, index a failed:"),
        "{error}"
    );
    assert!(error.contains("acct-1-a"), "names the key: {error}");
}
