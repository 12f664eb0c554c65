//! The operator's payloads against moto and the KV emulator: re-export, dry run, verify and
//! repair, backfill with continuation tokens.

use crate::common::*;
use serde_json::{json, Value};

/// acct-1/products with a shop and two query configs, nothing in KV yet.
async fn products() -> Harness {
    let h = Harness::new().await;
    h.keys.set_key("acct-1", "key-1");
    h.put(index_item(
        "acct-1",
        "products",
        Some("shop-1.myshopify.com"),
    ))
    .await;
    h.put(query_item("acct-1", "products", "red shoes")).await;
    h.put(query_item("acct-1", "products", "été")).await;
    h
}

#[tokio::test]
async fn a_reexport_writes_the_index_and_only_asked_for_query_configs() {
    let h = products().await;

    let answer = h
        .invoke(json!({"system_account_id": "acct-1", "index_name": "products"}))
        .await;

    assert_eq!(
        answer["written"]["settings"],
        json!(["acct-1-products", "shop-1.myshopify.com"])
    );
    assert_eq!(answer["written"]["query_configs"], json!([]));
    assert!(h.kv.keys(CF_ACCOUNT, QCFG_NS).is_empty());

    let answer = h
        .invoke(json!({"system_account_id": "acct-1", "index_name": "products", "include_query_configs": true}))
        .await;
    assert_eq!(answer["query_configs_exported"], 2);
    assert_eq!(override_keys(&h).len(), 2);
    assert_eq!(filter_of(&h, "acct-1", "products").unwrap()["count"], 2);
}

#[tokio::test]
async fn bad_manual_payloads_name_what_is_wrong() {
    let h = products().await;
    let logs = Logs::capture();
    let missing = h
        .try_invoke(
            json!({"system_account_id": "acct-1", "index_name": "nope"}),
            std::time::Duration::from_secs(10),
        )
        .await
        .unwrap_err();
    assert_eq!(missing, "no settings record for account acct-1, index nope");
    let failed = logs.matching("invocation failed");
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(failed[0].contains("NoSuchIndex") && failed[0].contains("index nope"));
    let empty = h
        .try_invoke(
            json!({"system_account_id": "", "index_name": "p"}),
            std::time::Duration::from_secs(10),
        )
        .await
        .unwrap_err();
    assert_eq!(
        empty,
        "invalid manual payload: `system_account_id` is empty"
    );
    assert!(h.kv.requests().is_empty());
}

#[tokio::test]
async fn a_dry_run_looks_everything_up_writes_nothing_and_masks_the_api_key() {
    let h = products().await;

    let answer = h
        .invoke(
            json!({"system_account_id": "acct-1", "index_name": "products",
                       "include_query_configs": true, "dry_run": true}),
        )
        .await;

    assert_eq!(answer["dry_run"], true);
    let writes = answer["would_write"].as_array().unwrap();
    let keys: Vec<&str> = writes.iter().map(|w| w["key"].as_str().unwrap()).collect();
    assert_eq!(keys.len(), 5, "{keys:?}");
    assert!(keys.contains(&"qfilter-acct-1-products"), "the filter too");
    assert!(keys.contains(&"shop-1.myshopify.com") && keys.contains(&"acct-1-products"));
    let settings = writes
        .iter()
        .find(|w| w["key"] == "shop-1.myshopify.com")
        .unwrap();
    assert_eq!(settings["value"]["marqo_api_key"], "<masked>");
    assert_eq!(
        settings["value"]["index_url"],
        "https://acct-1-products.idx.example"
    );
    assert!(
        !answer.to_string().contains("key-1"),
        "no API key in the answer"
    );
    assert_eq!(h.keys.calls().len(), 1, "the API key is looked up");
    assert!(h.kv.requests().is_empty(), "nothing is sent to KV");
}

fn statuses(answer: &Value) -> Vec<(String, String)> {
    answer["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["key"].as_str().unwrap().to_owned(),
                k["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn verify_finds_each_drift_kind_and_repair_fixes_it() {
    let h = products().await;
    let index = json!({"system_account_id": "acct-1", "index_name": "products", "include_query_configs": true});
    h.invoke(index.clone()).await;
    // Drift: a stale shop value, a missing index key, a missing and an unexpected query config.
    let mut stale = h.settings("shop-1.myshopify.com").unwrap();
    stale["index_url"] = json!("https://old.example");
    h.kv.insert(
        CF_ACCOUNT,
        SETTINGS_NS,
        "shop-1.myshopify.com",
        &stale.to_string(),
    );
    h.kv.remove(CF_ACCOUNT, SETTINGS_NS, "acct-1-products");
    h.kv.remove(CF_ACCOUNT, QCFG_NS, &qcfg_key("acct-1", "products", "été"));
    let orphan = qcfg_key("acct-1", "products", "deleted query");
    let written_for = |index: &str, query: &str| {
        json!({"schema_version": 1, "system_account_id": "acct-1", "index_name": index,
               "query": query, "config": {}})
        .to_string()
    };
    h.kv.insert(
        CF_ACCOUNT,
        QCFG_NS,
        &orphan,
        &written_for("products", "deleted query"),
    );
    let other_index = qcfg_key("acct-1", "products-v2", "x"); // shares the prefix, not the index
    h.kv.insert(
        CF_ACCOUNT,
        QCFG_NS,
        &other_index,
        &written_for("products-v2", "x"),
    );

    let mut verify = index.clone();
    verify["mode"] = json!("verify");
    let answer = h.invoke(verify.clone()).await;

    assert_eq!(answer["in_sync"], false);
    let found = statuses(&answer);
    let status = |key: &str| {
        found
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, s)| s.as_str())
    };
    assert_eq!(status("shop-1.myshopify.com"), Some("stale"));
    assert_eq!(status("acct-1-products"), Some("missing"));
    assert_eq!(
        status(&qcfg_key("acct-1", "products", "red shoes")),
        Some("in_sync")
    );
    assert_eq!(
        status(&qcfg_key("acct-1", "products", "été")),
        Some("missing")
    );
    assert_eq!(status(&orphan), Some("unexpected"));
    assert_eq!(status(&other_index), None);
    let shop = answer["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key"] == "shop-1.myshopify.com")
        .unwrap();
    assert_eq!(shop["fields"], json!(["index_url"]));
    assert_eq!(
        status("qfilter-acct-1-products"),
        Some("in_sync"),
        "the filter is checked"
    );
    assert_eq!(
        answer["counts"],
        json!({"in_sync": 2, "missing": 2, "stale": 1, "unexpected": 1})
    );
    assert!(
        h.kv.value(CF_ACCOUNT, QCFG_NS, &orphan).is_some(),
        "verify alone changes nothing"
    );

    verify["repair"] = json!(true);
    verify["dry_run"] = json!(true);
    let preview = h.invoke(verify.clone()).await;
    assert_eq!(preview["would_repair"]["deleted"], json!([orphan]));
    assert_eq!(
        preview["would_repair"]["written"].as_array().unwrap().len(),
        3
    );
    assert!(
        h.kv.value(CF_ACCOUNT, QCFG_NS, &orphan).is_some(),
        "a dry run repairs nothing"
    );

    verify["dry_run"] = json!(false);
    let repaired = h.invoke(verify.clone()).await;
    assert_eq!(repaired["repaired"]["deleted"], json!([orphan]));
    assert_eq!(repaired["repaired"]["written"].as_array().unwrap().len(), 3);

    verify["repair"] = json!(false);
    let after = h.invoke(verify).await;
    assert_eq!(after["in_sync"], true, "{after}");
    assert_eq!(
        h.settings("shop-1.myshopify.com").unwrap()["index_url"],
        "https://acct-1-products.idx.example"
    );
    assert!(
        h.kv.value(CF_ACCOUNT, QCFG_NS, &other_index).is_some(),
        "another index's key stays"
    );
}

/// Invokes a backfill until it says it is complete; returns every answer.
async fn backfill_to_the_end(h: &Harness, mut payload: Value) -> Vec<Value> {
    let mut answers = Vec::new();
    loop {
        let answer = h.invoke(payload.clone()).await;
        answers.push(answer.clone());
        if answer["complete"] == true {
            assert_eq!(answer["continuation_token"], Value::Null);
            return answers;
        }
        assert!(
            answers.len() < 20,
            "a backfill that never completes: {answer}"
        );
        payload["continuation_token"] = answer["continuation_token"].clone();
        assert!(payload["continuation_token"].is_string(), "{answer}");
    }
}

fn total(answers: &[Value], field: &str) -> u64 {
    answers.iter().map(|a| a[field].as_u64().unwrap()).sum()
}

#[tokio::test]
async fn a_backfill_resumes_with_its_token_until_the_table_is_exported() {
    let h = Harness::new().await;
    for account in ["acct-a", "acct-b"] {
        h.keys.set_key(account, &format!("key-{account}"));
        for i in 0..6 {
            h.put(index_item(
                account,
                &format!("idx-{i}"),
                Some(&format!("shop-{account}-{i}.myshopify.com")),
            ))
            .await;
        }
        h.put(query_item(account, "idx-0", "q")).await;
    }
    h.put(json!({"pk": {"S": "acct-a"}, "sk": {"S": "DEFAULT_CONFIGS"}}))
        .await;
    h.put(json!({"pk": {"S": "acct-a"}, "sk": {"S": "INDEX#broken"}}))
        .await;

    let answers = backfill_to_the_end(
        &h,
        json!({"mode": "backfill", "page_size": 4, "max_records": 4}),
    )
    .await;

    assert!(
        answers.len() >= 4, // 16 items, 4 a page, one page an invocation
        "more records than one invocation takes: {}",
        answers.len()
    );
    assert_eq!(total(&answers, "exported"), 12);
    assert_eq!(
        total(&answers, "skipped"),
        3,
        "default configs and the query configs not asked for"
    );
    assert_eq!(total(&answers, "rejected"), 1);
    let rejected: Vec<&Value> = answers
        .iter()
        .flat_map(|a| a["rejected_records"].as_array().unwrap())
        .collect();
    assert_eq!(rejected[0]["index_name"], "broken");
    assert_eq!(h.kv.keys(CF_ACCOUNT, SETTINGS_NS).len(), 24);
    assert_eq!(
        h.settings("shop-acct-b-5.myshopify.com").unwrap()["marqo_api_key"],
        "key-acct-b"
    );
    assert!(h.kv.keys(CF_ACCOUNT, QCFG_NS).is_empty());
}

#[tokio::test]
async fn a_backfill_of_one_account_brings_its_query_configs() {
    let h = products().await;
    h.keys.set_key("acct-2", "key-2");
    h.put(index_item("acct-2", "other", None)).await;

    let answers = backfill_to_the_end(
        &h,
        json!({"mode": "backfill", "system_account_id": "acct-1", "include_query_configs": true}),
    )
    .await;

    assert_eq!(answers.len(), 1);
    assert_eq!(answers[0]["exported"], 3);
    assert_eq!(override_keys(&h).len(), 2);
    assert_eq!(filter_of(&h, "acct-1", "products").unwrap()["count"], 2);
    assert_eq!(h.settings("acct-2-other"), None);
}

#[tokio::test]
async fn a_backfill_dry_run_counts_and_writes_nothing() {
    let h = products().await;

    let answers = backfill_to_the_end(&h, json!({"mode": "backfill", "dry_run": true})).await;

    assert_eq!(answers[0]["keys_to_write"], 2);
    assert_eq!(answers[0]["would_export"], 1);
    assert_eq!(
        answers[0].get("exported"),
        None,
        "a dry run exports nothing"
    );
    assert!(h.kv.requests().is_empty());
}

#[tokio::test]
async fn a_backfill_stops_at_a_failing_page_and_resuming_retries_it() {
    let h = products().await;
    h.keys.set_behaviour(
        "acct-1",
        Some(ecom_emulators::api_keys::Behaviour::Status { status: 503 }),
    );

    let first = h.invoke(json!({"mode": "backfill"})).await;

    assert_eq!(first["complete"], false);
    assert_eq!(first["failed"], 1);
    assert!(first["failed_records"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("HTTP 503"));
    assert!(h.kv.keys(CF_ACCOUNT, SETTINGS_NS).is_empty());

    h.keys.set_behaviour("acct-1", None);
    let resumed = h
        .invoke(json!({"mode": "backfill", "continuation_token": first["continuation_token"]}))
        .await;
    assert_eq!(resumed["complete"], true);
    assert_eq!(
        h.kv.keys(CF_ACCOUNT, SETTINGS_NS),
        ["acct-1-products", "shop-1.myshopify.com"]
    );
}

#[tokio::test]
async fn a_foreign_continuation_token_is_refused_by_name() {
    let h = products().await;
    let error = h
        .try_invoke(
            json!({"mode": "backfill", "continuation_token": "abc"}),
            std::time::Duration::from_secs(10),
        )
        .await
        .unwrap_err();
    assert_eq!(
        error,
        "invalid manual payload: `continuation_token` is not a token this function gave out"
    );
}

#[tokio::test]
async fn a_backfill_stops_before_the_deadline_and_resumes_where_it_stopped() {
    let h = Harness::new().await;
    h.keys.set_key("acct-1", "k");
    for i in 0..6 {
        h.put(index_item("acct-1", &format!("idx-{i}"), None)).await;
    }
    h.kv.inject(ecom_emulators::kv::Fault::Delay { millis: 1500 }, 100);
    let timeout = std::time::Duration::from_secs(6);

    let started = std::time::Instant::now();
    let first = h
        .try_invoke(
            json!({"mode": "backfill", "page_size": 1, "batch_records": 1}),
            timeout,
        )
        .await
        .unwrap();

    assert!(started.elapsed() < timeout, "answered before the deadline");
    assert_eq!(first["complete"], false);
    let done_first = first["exported"].as_u64().unwrap();
    assert!((1..6).contains(&done_first), "{first}");
    assert_eq!(h.kv.keys(CF_ACCOUNT, SETTINGS_NS).len() as u64, done_first);

    // Too little time for even one page: it stops at once, and its token starts over.
    let none = h
        .try_invoke(
            json!({"mode": "backfill"}),
            std::time::Duration::from_secs(1),
        )
        .await
        .unwrap();
    assert_eq!(none["exported"], 0);
    assert!(none["continuation_token"].is_string());

    let mut rest = backfill_to_the_end(
        &h,
        json!({"mode": "backfill", "page_size": 100, "continuation_token": first["continuation_token"]}),
    )
    .await;
    rest.push(first);
    assert_eq!(total(&rest, "exported"), 6);
    assert_eq!(h.kv.keys(CF_ACCOUNT, SETTINGS_NS).len(), 6);
}

/// A backfill whose ledger takes each write slowly (a busy table) stops before its deadline
/// with what it read sent and a token after it, never past the function's timeout; resumed
/// when the ledger is quick again, it finishes the table.
#[tokio::test]
async fn a_backfill_whose_ledger_writes_slowly_answers_before_its_deadline_and_resumes() {
    let h = Harness::new().await;
    h.keys.set_key("acct-1", "k");
    let shop = |i: usize| format!("shop-{i}.myshopify.com");
    for i in 0..40 {
        let index = format!("idx-{i}");
        h.put(index_item("acct-1", &index, Some(&shop(i)))).await;
    }
    // The function only reads the settings table: its transactions are the ledger's
    // references (each page's sets and its indexes' own items, one transaction a page of 20),
    // each held five seconds: no time for a second page before the 8 s deadline.
    let lag = std::time::Duration::from_secs(5);
    let (ledger, runtime, function) = behind_a_lagging_ledger(&h, "TransactWriteItems", lag).await;
    let invoke = |payload: Value, seconds: u64| {
        let timeout = std::time::Duration::from_secs(seconds);
        let answer = runtime.invoke(payload, timeout);
        async {
            answer
                .await
                .unwrap_or_else(|e| panic!("{e}\n{}", function.output()))
        }
    };

    let started = std::time::Instant::now();
    let first = invoke(json!({"mode": "backfill", "page_size": 20}), 8).await;

    assert!(
        started.elapsed() < std::time::Duration::from_secs(8),
        "{first}"
    );
    assert_eq!(first["complete"], false, "{first}");
    assert_eq!(
        (first["exported"].as_u64(), first["failed"].as_u64()),
        (Some(20), Some(0)),
        "{first}"
    );
    assert!(first["continuation_token"].is_string(), "{first}");

    ledger.clear_faults();
    let mut payload =
        json!({"mode": "backfill", "continuation_token": first["continuation_token"]});
    let mut answers = vec![invoke(payload.clone(), 60).await];
    while answers.last().unwrap()["complete"] == false {
        payload["continuation_token"] = answers.last().unwrap()["continuation_token"].clone();
        answers.push(invoke(payload.clone(), 60).await);
    }
    assert_eq!(answers.last().unwrap()["failed"], 0, "{answers:?}");
    for i in 0..40 {
        let logs = function.output();
        assert!(
            h.settings(&shop(i)).is_some(),
            "{}: {first} {answers:?}\n{logs}",
            shop(i)
        );
    }
}

/// The real binary behind a runtime API, its DynamoDB requests through the DynamoDB proxy,
/// which holds each call of `operation` for `lag` (the ledger's writes: the function only reads
/// the settings table) until its faults are cleared.
async fn behind_a_lagging_ledger(
    h: &Harness,
    operation: &str,
    lag: std::time::Duration,
) -> (
    ecom_emulators::dynamo_proxy::DynamoProxy,
    ecom_emulators::runtime_api::RuntimeApi,
    Function,
) {
    let ProxiedFunction {
        dynamodb,
        runtime,
        function,
    } = behind_a_dynamodb_proxy(h).await;
    let slow = ecom_emulators::dynamo_proxy::DynamoFault::Delay(lag);
    dynamodb.inject(Some(operation), None, slow, usize::MAX);
    (dynamodb, runtime, function)
}

/// Two accounts of six indexes, index `i` with `i % 4` overrides.
async fn indexes_with_overrides() -> (Harness, Vec<(String, String, usize)>) {
    let h = Harness::new().await;
    let mut expected = Vec::new();
    for account in ["acct-a", "acct-b"] {
        h.keys.set_key(account, "k");
        for i in 0..6 {
            let index = format!("idx-{i}");
            h.put(index_item(account, &index, None)).await;
            for q in 0..i % 4 {
                h.put(query_item(account, &index, &format!("query {q}")))
                    .await;
            }
            expected.push((account.to_owned(), index, i % 4));
        }
    }
    (h, expected)
}

fn filters_hold_every_override(h: &Harness, expected: &[(String, String, usize)]) {
    for (account, index, overrides) in expected {
        if *overrides == 0 {
            // An index without overrides has no filter.
            assert_eq!(filter_of(h, account, index), None, "{account}/{index}");
            continue;
        }
        let filter = filter_of(h, account, index).unwrap_or_else(|| panic!("{account}/{index}"));
        assert_eq!(
            filter["count"], *overrides as u64,
            "{account}/{index}: {filter}"
        );
    }
    let total: usize = expected.iter().map(|(_, _, n)| n).sum();
    assert_eq!(override_keys(h).len(), total);
}

#[tokio::test]
async fn a_backfill_builds_each_filter_from_the_scan_without_a_query_per_index() {
    let (h, expected) = indexes_with_overrides().await;

    // Three items a page: runs of an index and its overrides are cut by page ends.
    let answers = backfill_to_the_end(
        &h,
        json!({"mode": "backfill", "include_query_configs": true, "page_size": 3}),
    )
    .await;

    assert_eq!(answers.len(), 1);
    filters_hold_every_override(&h, &expected);
    // Nor does its check: it reads the pages again, not each index's run.
    let counters = h.exporter.table().counters();
    assert_eq!((counters.override_queries, counters.index_runs), (0, 0));
    for (account, index, _) in &expected {
        let verify = h
            .invoke(
                json!({"mode": "verify", "system_account_id": account, "index_name": index,
                           "include_query_configs": true}),
            )
            .await;
        assert_eq!(verify["in_sync"], true, "{verify}");
    }
}

#[tokio::test]
async fn a_backfill_whose_index_s_records_another_name_sorts_between_keeps_every_override() {
    // `p!x` and `p"y` sort after `INDEX#p` and before `INDEX#p#QUERY#...`: the scan reads
    // `p`'s settings item and its overrides apart, as two runs.
    let h = Harness::new().await;
    h.keys.set_key("acct-a", "k");
    for index in ["p", "p!x", "p\"y"] {
        let mut item = index_item("acct-a", index, None);
        item["index_endpoint"] = json!({"S": "https://acct-a.idx.example"});
        h.put(item).await;
    }
    for query in ["q 1", "q 2"] {
        h.put(query_item("acct-a", "p", query)).await;
    }

    let answers = backfill_to_the_end(
        &h,
        json!({"mode": "backfill", "include_query_configs": true, "page_size": 2}),
    )
    .await;

    assert_eq!(total(&answers, "failed"), 0, "{answers:?}");
    let filter = filter_of(&h, "acct-a", "p").expect("p's filter");
    assert_eq!(filter["count"], 2, "{filter}");
    for index in ["p", "p!x", "p\"y"] {
        let verify = h
            .invoke(
                json!({"mode": "verify", "system_account_id": "acct-a", "index_name": index,
                           "include_query_configs": true}),
            )
            .await;
        assert_eq!(verify["in_sync"], true, "{index}: {verify}");
    }
    // A re-export of `p` reads its run alone: its own key, its two overrides and its filter.
    let preview = h
        .invoke(json!({"system_account_id": "acct-a", "index_name": "p",
                       "include_query_configs": true, "dry_run": true}))
        .await;
    let keys: Vec<&str> = (preview["would_write"].as_array().expect("a preview").iter())
        .map(|w| w["key"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(keys.len(), 4, "{preview}");
    assert!(keys.iter().all(|k| !k.contains(['!', '"'])), "{preview}");
}

#[tokio::test]
async fn a_backfill_resumed_between_pages_still_writes_complete_filters_and_always_advances() {
    let (h, expected) = indexes_with_overrides().await;

    // Two items a page and an invocation: an index's run spans invocations.
    let answers = backfill_to_the_end(
        &h,
        json!({"mode": "backfill", "include_query_configs": true, "page_size": 2, "max_records": 2}),
    )
    .await;

    assert!(answers.len() > 3, "{}", answers.len());
    filters_hold_every_override(&h, &expected);
    assert_eq!(total(&answers, "failed"), 0);
}

#[tokio::test]
async fn a_backfill_gathers_pages_into_bulk_requests_near_cloudflare_s_limit() {
    let (h, expected) = indexes_with_overrides().await;

    let answers = backfill_to_the_end(
        &h,
        json!({"mode": "backfill", "include_query_configs": true, "page_size": 5}),
    )
    .await;

    assert_eq!(answers.len(), 1);
    filters_hold_every_override(&h, &expected);
    // 36 items in 8 pages, one batch: one bulk write per namespace.
    assert_eq!(h.kv_calls("bulk"), 2, "{:?}", h.bulk_write_sizes());
}

/// Follows a re-export or verify's tokens to the end; every answer.
async fn in_pieces(h: &Harness, mut payload: Value) -> Vec<Value> {
    let mut answers = Vec::new();
    loop {
        let answer = h.invoke(payload.clone()).await;
        answers.push(answer.clone());
        match answer["continuation_token"].as_str() {
            Some(token) => payload["continuation_token"] = json!(token),
            None => {
                assert_eq!(answer["complete"], true, "{answer}");
                return answers;
            }
        }
        assert!(answers.len() < 20, "it ends");
    }
}

/// A query-config key whose override record is gone (a write from an older read that landed
/// after the record's delete, its check unconfirmed): a re-export with query configs, the run
/// again an operator's error asks for, deletes it, as verify's repair does (a dry run reads
/// nothing from KV: it names what the table implies).
#[tokio::test]
async fn a_reexport_with_query_configs_deletes_the_index_s_orphaned_query_configs() {
    let h = Harness::new().await;
    h.keys.set_key("acct-1", "k");
    h.put(index_item("acct-1", "p", None)).await;
    for query in ["shoes", "boots"] {
        h.put(query_item("acct-1", "p", query)).await;
    }
    let payload = json!({"system_account_id": "acct-1", "index_name": "p",
                         "include_query_configs": true});
    h.invoke(payload.clone()).await;
    h.delete("acct-1", "INDEX#p#QUERY#boots").await;
    let (boots, shoes) = (
        qcfg_key("acct-1", "p", "boots"),
        qcfg_key("acct-1", "p", "shoes"),
    );
    assert!(h.query_config(&boots).is_some());

    let answer = h.invoke(payload).await;

    assert_eq!(answer["deleted"], json!([boots]), "{answer}");
    assert_eq!(answer["query_configs_exported"], 1, "{answer}");
    assert!(h.query_config(&boots).is_none());
    assert!(h.query_config(&shoes).is_some());
    assert_eq!(filter_of(&h, "acct-1", "p").unwrap()["count"], 1);
}

#[tokio::test]
async fn an_index_with_more_query_configs_than_a_piece_is_reexported_and_verified_in_pieces() {
    let h = Harness::new().await;
    h.keys.set_key("acct-1", "k");
    h.put(index_item("acct-1", "big", None)).await;
    let queries: Vec<String> = (0..12).map(|i| format!("query {i:02}")).collect();
    for query in &queries {
        h.put(query_item("acct-1", "big", query)).await;
    }

    let payload = json!({"system_account_id": "acct-1", "index_name": "big",
                         "include_query_configs": true, "max_records": 5});
    let exported = in_pieces(&h, payload.clone()).await;

    // 12 query configs, 5 a piece: three invocations, each writing its own.
    assert_eq!(exported.len(), 3, "{exported:#?}");
    assert_eq!(total(&exported, "query_configs_exported"), 12);
    for query in &queries {
        assert!(
            h.query_config(&qcfg_key("acct-1", "big", query)).is_some(),
            "{query}"
        );
    }
    // Each piece's filter comes from the table, so it holds every override.
    assert_eq!(filter_of(&h, "acct-1", "big").unwrap()["count"], 12);
    assert_eq!(h.settings("acct-1-big").unwrap()["index_name"], "big");

    // Two query configs lost, one left over from a removed override: found piece by piece.
    h.kv.remove(CF_ACCOUNT, QCFG_NS, &qcfg_key("acct-1", "big", &queries[1]));
    h.kv.remove(CF_ACCOUNT, QCFG_NS, &qcfg_key("acct-1", "big", &queries[9]));
    h.delete("acct-1", &format!("INDEX#big#QUERY#{}", queries[11]))
        .await;
    let mut verify = payload.clone();
    verify["mode"] = json!("verify");
    verify["repair"] = json!(true);
    let answers = in_pieces(&h, verify.clone()).await;
    let counts = |answers: &[Value], class: &str| -> u64 {
        answers
            .iter()
            .map(|a| a["counts"][class].as_u64().unwrap())
            .sum()
    };
    assert_eq!(answers.len(), 3, "{answers:#?}");
    assert_eq!(counts(&answers, "missing"), 2, "{answers:#?}");
    assert_eq!(counts(&answers, "unexpected"), 1, "{answers:#?}");
    assert!(h
        .query_config(&qcfg_key("acct-1", "big", &queries[9]))
        .is_some());
    assert!(h
        .query_config(&qcfg_key("acct-1", "big", &queries[11]))
        .is_none());

    let again = in_pieces(&h, verify).await;
    assert!(again.iter().all(|a| a["in_sync"] == true), "{again:#?}");
    assert_eq!(
        counts(&again, "in_sync"),
        13,
        "11 query configs, the index and its filter"
    );
}

/// An index that dropped an alias target (a removed index the alias kept) and whose override
/// record is gone: the re-export or verify repair with query configs removes the target again
/// (a record of its own, on the index's behalf) and deletes the orphaned query-config key.
/// When that delete fails, the answer says so and names the key, as it does without the alias.
async fn a_dropped_target_and_an_orphaned_query_config() -> (Harness, String) {
    let h = Harness::new().await;
    h.keys.set_key("acct-1", "k");
    h.put(index_item("acct-1", "old", None)).await;
    h.put(aliasing("acct-1", "p", "acct-1-old")).await;
    for query in ["shoes", "boots"] {
        h.put(query_item("acct-1", "p", query)).await;
    }
    h.invoke(json!({"system_account_id": "acct-1", "index_name": "old"}))
        .await;
    let payload = json!({"system_account_id": "acct-1", "index_name": "p",
                         "include_query_configs": true});
    h.invoke(payload).await;
    h.delete("acct-1", "INDEX#old").await;
    h.put(index_item("acct-1", "p", None)).await;
    h.delete("acct-1", "INDEX#p#QUERY#boots").await;
    let boots = qcfg_key("acct-1", "p", "boots");
    assert!(h.query_config(&boots).is_some());
    h.kv.inject(
        ecom_emulators::kv::Fault::UnsuccessfulKeysStartingWith {
            prefix: boots.clone(),
        },
        100,
    );
    (h, boots)
}

/// The run fails naming the orphan whose delete failed, and the key stays in KV.
async fn fails_naming_the_orphan(payload: Value) -> Harness {
    let (h, boots) = a_dropped_target_and_an_orphaned_query_config().await;

    let answer = h
        .try_invoke(payload, std::time::Duration::from_secs(20))
        .await;

    let error = answer.expect_err("the orphan's delete failed");
    assert!(error.contains(&boots), "{error}");
    assert!(h.query_config(&boots).is_some());
    h
}

#[tokio::test]
async fn a_reexport_whose_orphan_delete_fails_after_dropping_an_alias_target_fails() {
    let payload = json!({"system_account_id": "acct-1", "index_name": "p",
                         "include_query_configs": true});
    let h = fails_naming_the_orphan(payload).await;
    assert!(
        h.settings("acct-1-old").is_none(),
        "the dropped target went"
    );
}

#[tokio::test]
async fn a_verify_repair_whose_orphan_delete_fails_after_dropping_an_alias_target_fails() {
    let payload = json!({"mode": "verify", "repair": true, "system_account_id": "acct-1",
                         "index_name": "p", "include_query_configs": true});
    fails_naming_the_orphan(payload).await;
}
