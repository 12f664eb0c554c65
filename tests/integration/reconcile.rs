//! The scheduled reconcile against moto and the KV emulator: every key in exactly one class,
//! repair through the stream's planner, dry runs, tokens, and its cost in requests.

use crate::common::*;
use serde_json::{json, Value};

/// Exports the whole table with metadata (and filters), following tokens to the end.
async fn backfill(h: &Harness) {
    let mut payload = json!({"mode": "backfill", "include_query_configs": true, "page_size": 1000});
    loop {
        let answer = h.invoke(payload.clone()).await;
        // A busy machine may stop a batch at the deadline: its token retries it.
        let problems = answer["failed_records"].as_array().unwrap();
        let at_deadline = |p: &Value| p["reason"].as_str().unwrap().contains("deadline");
        assert!(problems.iter().all(at_deadline), "{answer}");
        if answer["complete"] == true {
            return;
        }
        payload["continuation_token"] = answer["continuation_token"].clone();
    }
}

async fn reconcile(h: &Harness, fields: Value) -> Value {
    let mut payload = json!({"mode": "reconcile"});
    payload
        .as_object_mut()
        .unwrap()
        .extend(fields.as_object().unwrap().clone());
    h.invoke(payload).await
}

fn data_writes(h: &Harness) -> usize {
    h.kv_calls("bulk") + h.kv_calls("bulk/delete")
}

/// A fleet exported with metadata, then drifted once in every way.
async fn drifted() -> Harness {
    let h = Harness::new().await;
    h.keys.set_key("acct-1", "k");
    h.put(index_item("acct-1", "a", Some("shop-a.myshopify.com")))
        .await;
    h.put(index_item("acct-1", "b", None)).await;
    h.put(index_item(
        "acct-1",
        "gone",
        Some("shop-gone.myshopify.com"),
    ))
    .await;
    h.put(index_item("acct-1", "v1", None)).await;
    let mut front = index_item("acct-1", "front", None);
    front["read_alias"] = json!({"S": "acct-1-v1"});
    h.put(front).await;
    h.put(query_item("acct-1", "a", "shoes")).await;
    h.put(query_item("acct-1", "a", "boots")).await;
    backfill(&h).await;

    // missing: a key KV lost, and a query config.
    h.kv.remove(CF_ACCOUNT, SETTINGS_NS, "acct-1-b");
    h.kv.remove(CF_ACCOUNT, QCFG_NS, &qcfg_key("acct-1", "a", "boots"));
    // stale: the table changed and no stream record reached KV (two keys: shop and id).
    let mut changed = index_item("acct-1", "a", Some("shop-a.myshopify.com"));
    changed["pixel_id"] = json!({"S": "px-new"});
    h.put(changed).await;
    // orphaned: records removed while the stream was down (two keys).
    h.delete("acct-1", "INDEX#gone").await;
    // protected: removed, but `front` still reads from it.
    h.delete("acct-1", "INDEX#v1").await;
    // foreign: another system's key.
    h.kv.insert(CF_ACCOUNT, SETTINGS_NS, "feature-toggle", "on");
    h
}

#[tokio::test]
async fn each_class_is_found_and_a_dry_run_writes_nothing() {
    let h = drifted().await;
    let writes_before = data_writes(&h);

    let answer = reconcile(&h, json!({"repair": true, "dry_run": true})).await;

    assert_eq!(
        answer["counts"]["settings"],
        json!({"in_sync": 1, "missing": 1, "stale": 2, "orphaned": 2, "protected": 1, "foreign": 1}),
        "{answer}"
    );
    assert_eq!(
        answer["counts"]["query_configs"],
        json!({"in_sync": 2, "missing": 1, "stale": 0, "orphaned": 0, "protected": 0, "foreign": 0})
    );
    // Indexes without overrides have no filter; `a`'s is in sync.
    let samples = &answer["samples"]["query_configs"];
    assert_eq!(samples["orphaned"], json!([]));
    assert_eq!(samples["protected"], json!([]));
    let samples = &answer["samples"]["settings"];
    assert_eq!(samples["missing"], json!(["acct-1-b"]));
    assert_eq!(
        samples["stale"],
        json!(["acct-1-a", "shop-a.myshopify.com"])
    );
    assert_eq!(
        samples["orphaned"],
        json!(["acct-1-gone", "shop-gone.myshopify.com"])
    );
    assert_eq!(samples["protected"], json!(["acct-1-v1"]));
    assert_eq!(samples["foreign"], json!(["feature-toggle"]));
    // The ledger still records `gone` (it claimed a shop), removed while the stream was down.
    let would = json!({"written": 4, "deleted": 2, "ledger_marked": 1, "ledger_swept": 0});
    assert_eq!(answer["would_repair"], would);
    assert_eq!(answer["complete"], true);
    assert_eq!(data_writes(&h), writes_before, "a dry run writes nothing");
}

#[tokio::test]
async fn repair_fixes_drift_keeps_foreign_and_protected_keys_and_a_second_run_is_clean() {
    let h = drifted().await;

    let answer = reconcile(&h, json!({"repair": true})).await;

    assert_eq!(
        answer["repaired"],
        json!({"written": 4, "deleted": 2, "ledger_marked": 1, "ledger_swept": 0}),
        "{answer}"
    );
    assert_eq!(h.settings("acct-1-b").unwrap()["index_name"], "b");
    assert_eq!(
        h.settings("shop-a.myshopify.com").unwrap()["pixel_id"],
        "px-new"
    );
    assert!(h.query_config(&qcfg_key("acct-1", "a", "boots")).is_some());
    assert_eq!(h.settings("acct-1-gone"), None);
    assert_eq!(h.settings("shop-gone.myshopify.com"), None);
    assert!(h.settings("acct-1-v1").is_some(), "protected by an alias");
    assert_eq!(filter_of(&h, "acct-1", "gone"), None);
    assert_eq!(filter_of(&h, "acct-1", "v1"), None, "it has no overrides");
    assert_eq!(
        h.kv.value(CF_ACCOUNT, SETTINGS_NS, "feature-toggle")
            .as_deref(),
        Some("on"),
        "foreign keys are never touched"
    );
    let meta =
        h.kv.metadata(CF_ACCOUNT, SETTINGS_NS, "shop-a.myshopify.com")
            .unwrap();
    assert_eq!(meta["writer"], "ecom-settings-exporter");
    assert_eq!(meta["index"], "a");

    let again = reconcile(&h, json!({"repair": true})).await;
    for namespace in ["settings", "query_configs"] {
        let counts = &again["counts"][namespace];
        assert_eq!(
            (&counts["missing"], &counts["stale"], &counts["orphaned"]),
            (&json!(0), &json!(0), &json!(0)),
            "{again}"
        );
    }
    // `gone`'s mark waits: the same intents, not yet ripe.
    let nothing = json!({"written": 0, "deleted": 0, "ledger_marked": 0, "ledger_swept": 0});
    assert_eq!(again["repaired"], nothing);
}

#[tokio::test]
async fn keys_without_metadata_are_read_and_edits_that_kept_it_are_found() {
    let h = Harness::new().await;
    h.keys.set_key("acct-1", "k");
    h.put(index_item("acct-1", "a", None)).await;
    h.put(index_item("acct-1", "b", None)).await;
    backfill(&h).await;
    // `a` rewritten by hand with the same value but no metadata; `b` edited, metadata kept.
    let a = h.kv.value(CF_ACCOUNT, SETTINGS_NS, "acct-1-a").unwrap();
    h.kv.insert(CF_ACCOUNT, SETTINGS_NS, "acct-1-a", &a);
    let b_meta = h.kv.metadata(CF_ACCOUNT, SETTINGS_NS, "acct-1-b");
    let mut b = h.settings("acct-1-b").unwrap();
    b["index_url"] = json!("https://edited.example");
    h.kv.insert_with_metadata(CF_ACCOUNT, SETTINGS_NS, "acct-1-b", &b.to_string(), b_meta);

    // Every pass reads the values the table implies: `b` is found, `deep` or not, and `a`
    // (whose owner the listing could only learn from its value) is in sync.
    for scope in [
        json!({}),
        json!({"system_account_id": "acct-1"}),
        json!({"system_account_id": "acct-1", "deep": true}),
    ] {
        let answer = reconcile(&h, scope.clone()).await;
        assert_eq!(
            answer["counts"]["settings"]["stale"], 1,
            "{scope}: {answer}"
        );
        assert_eq!(answer["samples"]["settings"]["stale"], json!(["acct-1-b"]));
        assert_eq!(
            answer["counts"]["settings"]["in_sync"], 1,
            "{scope}: {answer}"
        );
    }
}

#[tokio::test]
async fn a_run_resumed_by_its_token_counts_every_key_once() {
    let h = drifted().await;
    for i in 0..25 {
        h.kv.insert(CF_ACCOUNT, SETTINGS_NS, &format!("foreign-{i:02}"), "x");
    }
    let whole = reconcile(&h, json!({})).await;

    let mut totals = json!({});
    let mut payload = json!({"max_keys": 10, "page_size": 10});
    let mut invocations = 0;
    loop {
        let answer = reconcile(&h, payload.clone()).await;
        invocations += 1;
        for namespace in ["settings", "query_configs"] {
            for (class, n) in answer["counts"][namespace].as_object().unwrap() {
                let total = &mut totals[namespace][class];
                *total = json!(total.as_u64().unwrap_or(0) + n.as_u64().unwrap());
            }
        }
        if answer["complete"] == true {
            assert_eq!(answer["continuation_token"], Value::Null);
            break;
        }
        payload["continuation_token"] = answer["continuation_token"].clone();
        assert!(invocations < 20, "a run ends");
    }

    assert!(invocations > 2, "the run was split: {invocations}");
    assert_eq!(totals, whole["counts"]);
}

#[tokio::test]
async fn an_account_of_a_thousand_indexes_is_reconciled_with_list_pages_and_bulk_reads() {
    let _turn = heavy_or_timed().await;
    let h = Harness::new().await;
    h.keys.set_key("acct-big", "k");
    h.keys.set_key("acct-other", "k2");
    for i in 0..1000 {
        h.put(index_item("acct-big", &format!("i{i:04}"), None))
            .await;
    }
    h.put(index_item(
        "acct-other",
        "x",
        Some("shop-other.myshopify.com"),
    ))
    .await;
    backfill(&h).await;
    let calls = |op: &str| h.kv_calls(op);
    let (lists, reads, values) = (calls("keys"), calls("bulk/get"), calls("values"));
    let api_key_calls = h.keys.calls().len();

    let answer = reconcile(&h, json!({"system_account_id": "acct-big"})).await;

    assert_eq!(answer["counts"]["settings"]["in_sync"], 1000, "{answer}");
    assert_eq!(
        answer["counts"]["settings"]["foreign"], 0,
        "other accounts are not counted"
    );
    assert_eq!(answer["complete"], true);
    // 1,002 settings keys: two pages; no overrides, so no filters: one empty page.
    assert_eq!(calls("keys") - lists, 3);
    assert_eq!(answer["requests"]["kv_list"], 3);
    assert_eq!(
        answer["counts"]["query_configs"]["in_sync"], 0,
        "no overrides, no filters"
    );
    // 1,000 index keys implied (and 1,000 filters implied absent): read 100 a request.
    assert_eq!(
        calls("bulk/get") - reads,
        20,
        "each implied value read once"
    );
    assert_eq!(calls("values") - values, 0);
    assert_eq!(h.keys.calls().len() - api_key_calls, 1, "one API-keys call");
}

#[tokio::test]
async fn reconcile_payloads_are_checked_like_every_operator_payload() {
    let h = Harness::new().await;
    let error = h
        .try_invoke(
            json!({"mode": "reconcile", "repiar": true}),
            std::time::Duration::from_secs(10),
        )
        .await
        .unwrap_err();
    assert!(
        error.starts_with("invalid manual payload: `repiar` is not a field"),
        "{error}"
    );
}

#[tokio::test]
async fn a_fleet_the_stream_exported_is_not_drift() {
    let mut h = Harness::new().await;
    h.keys.set_key("acct-1", "k");
    // One index never had an override (the stream writes it no filter), one has one.
    h.put(index_item("acct-1", "plain", Some("shop-1.myshopify.com")))
        .await;
    h.put(index_item("acct-1", "tuned", None)).await;
    h.put(query_item("acct-1", "tuned", "shoes")).await;
    h.export_stream().await;
    assert_eq!(filter_of(&h, "acct-1", "plain"), None);

    let answer = reconcile(&h, json!({})).await;

    for namespace in ["settings", "query_configs"] {
        let counts = &answer["counts"][namespace];
        for class in ["missing", "stale", "orphaned"] {
            assert_eq!(counts[class], 0, "{namespace} {class}: {answer}");
        }
    }
    let verify = h
        .invoke(
            json!({"mode": "verify", "system_account_id": "acct-1", "index_name": "plain",
                       "include_query_configs": true}),
        )
        .await;
    assert_eq!(verify["in_sync"], true, "{verify}");
}

#[tokio::test]
async fn a_write_kv_refused_is_stale_to_the_next_pass() {
    let h = Harness::new().await;
    h.keys.set_key("acct-1", "k");
    h.put(index_item("acct-1", "a", None)).await;
    backfill(&h).await;
    // The table changes and a re-export writes the key's new value, but KV refuses it.
    let mut changed = index_item("acct-1", "a", None);
    changed["pixel_id"] = json!({"S": "px-new"});
    h.put(changed).await;
    h.kv.inject(
        ecom_emulators::kv::Fault::RefuseKey {
            key: "acct-1-a".into(),
        },
        1,
    );
    let refused = h
        .try_invoke(
            json!({"mode": "reexport", "system_account_id": "acct-1", "index_name": "a"}),
            std::time::Duration::from_secs(10),
        )
        .await;
    assert!(refused.is_err(), "{refused:?}");
    assert_ne!(h.settings("acct-1-a").unwrap()["pixel_id"], "px-new");

    let answer = reconcile(&h, json!({})).await;

    assert_eq!(
        answer["samples"]["settings"]["stale"],
        json!(["acct-1-a"]),
        "{answer}"
    );
}

#[tokio::test]
async fn a_healthy_fleet_s_pass_reads_each_implied_value_once_and_each_table_record_about_once() {
    let h = Harness::new().await;
    h.keys.set_key("acct-1", "k");
    for i in 0..30 {
        let index = format!("i{i:02}");
        h.put(index_item("acct-1", &index, None)).await;
        h.put(query_item("acct-1", &index, "shoes")).await;
    }
    backfill(&h).await;
    let keys_read = |h: &Harness| -> usize {
        let requests = h.kv.requests();
        let reads = requests.iter().filter(|r| r.operation == "bulk/get");
        reads.map(|r| r.items).sum()
    };
    let (read, writes, lists) = (keys_read(&h), data_writes(&h), h.kv_calls("keys"));

    let mut payload = json!({"max_keys": 20, "page_size": 10});
    let (mut in_sync, mut pages, mut invocations) = (0, 0, 0);
    loop {
        let answer = reconcile(&h, payload.clone()).await;
        invocations += 1;
        for namespace in ["settings", "query_configs"] {
            let counts = &answer["counts"][namespace];
            in_sync += counts["in_sync"].as_u64().unwrap();
            for class in ["missing", "stale", "orphaned", "protected", "foreign"] {
                assert_eq!(counts[class], 0, "{namespace} {class}: {answer}");
            }
        }
        pages += answer["requests"]["table_pages"].as_u64().unwrap();
        if answer["complete"] == true {
            break;
        }
        payload["continuation_token"] = answer["continuation_token"].clone();
        assert!(invocations < 30, "a pass ends");
    }

    // 30 index keys, 30 filters, 30 query configs: each checked once, its value read once.
    assert_eq!(in_sync, 90);
    assert!(invocations > 4, "the pass was split: {invocations}");
    assert_eq!(keys_read(&h) - read, 90, "each implied key read once");
    assert_eq!(data_writes(&h) - writes, 0, "nothing written");
    assert_eq!(
        h.kv_calls("keys") - lists,
        9,
        "90 keys listed once, 10 a page"
    );
    // 60 table records in pieces of about 20: a handful of pages, not a scan per invocation.
    assert!(
        pages <= 6,
        "{pages} table pages over {invocations} invocations"
    );
}

#[tokio::test]
async fn metadata_naming_an_index_no_table_could_hold_is_foreign_and_stalls_nothing() {
    let h = Harness::new().await;
    h.keys.set_key("acct-1", "k");
    h.put(index_item("acct-1", "a", None)).await;
    h.put(index_item("acct-1", "gone", None)).await;
    backfill(&h).await;
    h.delete("acct-1", "INDEX#gone").await;
    // Hand-written metadata: an empty account (no DynamoDB key can be empty), and a name of
    // 3,000 bytes (over DynamoDB's key limits), beside an orphan of a real index.
    for (key, account, index) in [
        ("hand-1", "", "a"),
        ("hand-2", "acct-1", &*"x".repeat(3000)),
    ] {
        let meta = json!({"writer": "ecom-settings-exporter", "v": 1, "account": account,
                          "index": index, "digest": "0000000000000000"});
        h.kv.insert_with_metadata(CF_ACCOUNT, SETTINGS_NS, key, "{}", Some(meta));
    }

    let answer = reconcile(&h, json!({"repair": true})).await;

    assert_eq!(answer["complete"], true, "{answer}");
    assert_eq!(
        answer["samples"]["settings"]["foreign"],
        json!(["hand-1", "hand-2"]),
        "{answer}"
    );
    assert_eq!(
        answer["samples"]["settings"]["orphaned"],
        json!(["acct-1-gone"])
    );
    assert_eq!(
        h.kv.value(CF_ACCOUNT, SETTINGS_NS, "hand-1").as_deref(),
        Some("{}")
    );
}

/// A shop key whose value was rewritten by hand to name an index no table item could have (an
/// account of 3,000 bytes, over DynamoDB's key limits: the DynamoDB proxy refuses it as
/// DynamoDB does) is stale to the table step, like any other edit: the value is input, and a
/// read by that name would fail the piece on every pass.
#[tokio::test]
async fn a_shop_value_naming_an_index_no_table_could_hold_is_stale_and_stalls_nothing() {
    let h = Harness::new().await;
    h.keys.set_key("acct-1", "k");
    let shop = "shop-a.myshopify.com";
    h.put(index_item("acct-1", "a", Some(shop))).await;
    backfill(&h).await;
    let meta = h.kv.metadata(CF_ACCOUNT, SETTINGS_NS, shop);
    let account = "x".repeat(3000);
    let hostile = json!({"schema_version": 1, "system_account_id": account, "index_name": "a"});
    h.kv.insert_with_metadata(CF_ACCOUNT, SETTINGS_NS, shop, &hostile.to_string(), meta);
    let proxied = behind_a_dynamodb_proxy(&h).await;
    let pass = json!({"mode": "reconcile", "repair": true});

    let answer = proxied
        .runtime
        .invoke(pass, std::time::Duration::from_secs(60));
    let answer = answer.await;

    let answer = answer.unwrap_or_else(|e| panic!("{e}\n{}", proxied.function.output()));
    assert_eq!(answer["complete"], true, "{answer}");
    assert_eq!(
        answer["samples"]["settings"]["stale"],
        json!([shop]),
        "{answer}"
    );
    assert_eq!(h.settings(shop).unwrap()["index_name"], "a");
}

/// A removed index an alias reads keeps its own key, and its shop key while no other index
/// claims the shop (the stream keeps both): the reconcile agrees, whole fleet and one account
/// alike.
#[tokio::test]
async fn an_aliased_removed_index_keeps_its_own_key_and_its_unclaimed_shop_key() {
    for scope in [json!({}), json!({"system_account_id": "acct-1"})] {
        let mut h = Harness::new().await;
        h.keys.set_key("acct-1", "k");
        h.put(index_item("acct-1", "old", Some("shop-old.myshopify.com")))
            .await;
        let mut reader = index_item("acct-1", "front", None);
        reader["index_aliases"] = json!({"M": {"doc_reads": {"M": {"enabled": {"BOOL": true},
            "targets": {"L": [{"M": {"index_id": {"S": "acct-1-old"}}}]}}}}});
        h.put(reader).await;
        h.export_stream().await;
        backfill(&h).await;
        h.delete("acct-1", "INDEX#old").await;
        h.export_stream().await;
        assert!(
            h.settings("shop-old.myshopify.com").is_some(),
            "the stream kept it"
        );

        let mut fields = json!({"repair": true});
        fields
            .as_object_mut()
            .unwrap()
            .extend(scope.as_object().unwrap().clone());
        let answer = reconcile(&h, fields).await;

        let samples = &answer["samples"]["settings"];
        assert_eq!(samples["orphaned"], json!([]), "{answer}");
        assert_eq!(
            samples["protected"],
            json!(["acct-1-old", "shop-old.myshopify.com"]),
            "{answer}"
        );
        assert!(
            h.settings("shop-old.myshopify.com").is_some(),
            "{scope}: kept while nobody else claims the shop"
        );
        assert!(
            h.settings("acct-1-old").is_some(),
            "{scope}: the alias reads it"
        );
    }
}

/// A shop key whose index moved away, that only an index whose account has no API key claims
/// (its record rejected as it is planned): the pass finds it orphaned and deletes it, as the
/// stream would; it never keeps serving the index that left. Fails when a claimer counts as
/// one that writes the shop because its record decodes (seed 846 of the hostile workload).
#[tokio::test]
async fn a_shop_key_only_an_index_without_an_api_key_claims_is_orphaned() {
    const SHOP: &str = "shop-s.myshopify.com";
    let mut h = Harness::new().await;
    h.keys.set_key("acct-1", "k");
    h.put(index_item("acct-1", "leaving", Some(SHOP))).await;
    h.export_stream().await;
    h.put(index_item("acct-2", "keyless", Some(SHOP))).await;
    let rejected = h.export_stream().await;
    assert_eq!(rejected["batchItemFailures"], json!([]), "{rejected}");
    // The move's stream record lost: the shop key still serves the index that left.
    h.put(index_item(
        "acct-1",
        "leaving",
        Some("shop-t.myshopify.com"),
    ))
    .await;
    h.stream_records().await;
    assert_eq!(h.settings(SHOP).unwrap()["index_name"], "leaving");

    let answer = reconcile(&h, json!({"repair": true})).await;

    let samples = &answer["samples"]["settings"];
    assert_eq!(samples["orphaned"], json!([SHOP]), "{answer}");
    assert_eq!(h.settings(SHOP), None, "{answer}");
    assert_eq!(
        h.settings("shop-t.myshopify.com").unwrap()["index_name"],
        "leaving"
    );
    let again = reconcile(&h, json!({})).await;
    assert_eq!(again["counts"]["settings"]["orphaned"], 0, "{again}");
}
