//! Table items, stream events and the services' answers are input: a crafted record or a
//! misbehaving peer never reaches another tenant's keys, another host, or the rest of its shard
//! (docs/contract.md, "Validation").

use std::time::{Duration, Instant};

use crate::common::*;
use ecom_emulators::api_keys::{ApiKeysStandIn, Behaviour};
use ecom_emulators::kv::{Fault, KvEmulator};
use serde_json::{json, Value};

async fn harness() -> Harness {
    let h = Harness::new().await;
    for account in ["acct-1", "acct-2"] {
        h.keys.set_key(account, &format!("key-{account}"));
    }
    h
}

fn with_cell(mut item: Value, cell: &str) -> Value {
    item["cell"] = json!({"S": cell});
    item
}

#[tokio::test]
async fn a_shop_id_naming_another_tenant_s_index_key_never_touches_it() {
    let mut h = harness().await;
    h.put(index_item(
        "acct-2",
        "products",
        Some("shop-2.myshopify.com"),
    ))
    .await;
    h.export_stream().await;
    let theirs = h.settings("acct-2-products").expect("acct-2's key");

    let logs = Logs::capture();
    h.put(index_item("acct-1", "evil", Some("acct-2-products")))
        .await;
    h.put(index_item("acct-1", "fine", None)).await;
    let response = h.export_stream().await;

    assert_eq!(failures(&response), Vec::<String>::new());
    assert_eq!(h.settings("acct-2-products"), Some(theirs.clone()));
    assert!(h.settings("acct-1-fine").is_some(), "the rest of the batch");
    assert_eq!(h.settings("acct-1-evil"), None);
    let rejected = logs.matching("record rejected");
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert!(
        rejected[0].contains("`acct-2-products`") && rejected[0].contains("another index's key"),
        "{}",
        rejected[0]
    );

    // Its REMOVE names the same shop in its old image: acct-2's key stays.
    h.delete("acct-1", "INDEX#evil").await;
    h.export_stream().await;
    assert_eq!(h.settings("acct-2-products"), Some(theirs));
}

#[tokio::test]
async fn the_api_keys_call_takes_the_cell_and_account_as_one_segment_each() {
    let mut h = harness().await;
    let steering = "../../admin/export?all=1#";
    h.put(with_cell(index_item("acct-1", "steered", None), steering))
        .await;
    h.put(with_cell(index_item("acct-2", "dots", None), ".."))
        .await;
    let logs = Logs::capture();
    let response = h.export_stream().await;

    assert_eq!(failures(&response), Vec::<String>::new());
    // The stand-in read the cell back as one path segment: the call went where configured.
    let calls = h.keys.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].cell.as_deref(), Some(steering));
    assert_eq!(calls[0].account, "acct-1");
    assert!(h.settings("acct-1-steered").is_some());
    // `..` would collapse into another path: rejected, never sent.
    let rejected = logs.matching("record rejected");
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert!(rejected[0].contains("path segment"), "{}", rejected[0]);
    assert_eq!(h.settings("acct-2-dots"), None);
}

#[tokio::test]
async fn a_cell_in_the_host_must_be_a_dns_label() {
    let mut h = harness().await;
    let elsewhere = ApiKeysStandIn::start(0).await.unwrap();
    elsewhere.set_key("acct-1", "someone-elses-key");
    h.reconfigure("API_KEYS_SERVICE_URL", "https://{cell}.keys.invalid/v1")
        .await;
    let cell = format!("x@{}/#", elsewhere.addr());
    h.put(with_cell(index_item("acct-1", "products", None), &cell))
        .await;
    let logs = Logs::capture();
    let response = h.export_stream().await;

    assert_eq!(failures(&response), Vec::<String>::new());
    assert!(elsewhere.calls().is_empty(), "{:?}", elsewhere.calls());
    assert_eq!(h.settings("acct-1-products"), None);
    let rejected = logs.matching("record rejected");
    assert!(rejected[0].contains("not a DNS label"), "{}", rejected[0]);
}

#[tokio::test]
async fn a_redirect_from_the_api_keys_service_is_not_followed() {
    let mut h = harness().await;
    let elsewhere = ApiKeysStandIn::start(0).await.unwrap();
    elsewhere.set_key("acct-1", "someone-elses-key");
    let location = format!(
        "{}/accounts/acct-1/api-key",
        elsewhere.url_template().replace("{cell}", "default")
    );
    h.keys
        .set_behaviour("acct-1", Some(Behaviour::Redirect { location }));
    h.put(index_item("acct-1", "products", None)).await;
    let records = h.stream_records().await;
    let logs = Logs::capture();
    let response = h.invoke(json!({ "Records": records.clone() })).await;

    assert_eq!(failures(&response), sequence_numbers(&records));
    assert!(elsewhere.calls().is_empty(), "{:?}", elsewhere.calls());
    assert_eq!(h.settings("acct-1-products"), None);
    let failed = logs.matching("record failed");
    assert!(failed[0].contains("HTTP 302"), "{}", failed[0]);
}

#[tokio::test]
async fn a_redirect_from_cloudflare_is_not_followed() {
    let mut h = harness().await;
    let elsewhere = KvEmulator::start(0, &[TOKEN]).await.unwrap();
    elsewhere.create_namespace(SETTINGS_NS);
    let location = format!(
        "{}/accounts/{CF_ACCOUNT}/storage/kv/namespaces/{SETTINGS_NS}/bulk",
        elsewhere.base_url()
    );
    h.kv.inject(
        Fault::Status {
            retry_after_raw: None,
            status: 307,
            location: Some(location),
            retry_after: None,
            retry_after_date: None,
            retry_after_ms: None,
        },
        100,
    );
    h.put(index_item("acct-1", "products", None)).await;
    let records = h.stream_records().await;
    let logs = Logs::capture();
    let response = h.invoke(json!({ "Records": records.clone() })).await;
    h.kv.clear_faults();

    assert_eq!(failures(&response), sequence_numbers(&records));
    assert!(elsewhere.requests().is_empty(), "the body went elsewhere");
    let failed = logs.matching("record failed");
    assert!(failed[0].contains("HTTP 307"), "{}", failed[0]);
}

#[tokio::test]
async fn a_retry_after_beyond_any_lockout_is_answered_not_a_panic() {
    let mut h = harness().await;
    h.kv.inject(
        Fault::Status {
            retry_after_raw: Some("1e20".into()),
            status: 429,
            location: None,
            retry_after: None,
            retry_after_date: None,
            retry_after_ms: None,
        },
        1,
    );
    h.put(index_item("acct-1", "products", None)).await;
    let records = h.stream_records().await;
    let started = Instant::now();
    let response = h
        .try_invoke(
            json!({ "Records": records.clone() }),
            Duration::from_secs(2),
        )
        .await
        .expect("an answer, not a panic");

    assert_eq!(failures(&response), sequence_numbers(&records));
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn one_key_cloudflare_refuses_fails_only_its_own_record() {
    let mut h = harness().await;
    h.kv.inject(
        Fault::RefuseKey {
            key: "acct-1-b".into(),
        },
        100,
    );
    for name in ["a", "b", "c", "d"] {
        h.put(index_item("acct-1", name, None)).await;
    }
    let logs = Logs::capture();
    let response = h.export_stream().await;

    // Rejected, not retried: a poison key never stalls its shard.
    assert_eq!(failures(&response), Vec::<String>::new());
    for name in ["a", "c", "d"] {
        assert!(h.settings(&format!("acct-1-{name}")).is_some(), "{name}");
    }
    assert_eq!(h.settings("acct-1-b"), None);
    let rejected = logs.matching("record rejected");
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert!(
        rejected[0].contains("index=b ") && rejected[0].contains("refused this key alone"),
        "{}",
        rejected[0]
    );
    // The request, then halves down to the refused key: 1 + 2 + 2.
    assert_eq!(h.kv_calls("bulk"), 5);
}

#[tokio::test]
async fn a_backfill_advances_past_an_index_whose_filter_key_cloudflare_would_refuse() {
    let h = harness().await;
    let long = "p".repeat(500); // acct-1-{long} fits in 512 bytes; qfilter-acct-1-{long} does not
    h.put(index_item("acct-1", &long, None)).await;
    h.put(index_item("acct-1", "products", None)).await;
    h.put(query_item("acct-1", "products", "red shoes")).await;

    let answer = h
        .invoke(json!({"mode": "backfill", "include_query_configs": true}))
        .await;

    assert_eq!(answer["complete"], true, "{answer}");
    assert_eq!(
        (answer["failed"].as_u64(), answer["rejected"].as_u64()),
        (Some(0), Some(1))
    );
    assert!(h.settings("acct-1-products").is_some());
    assert!(filter_of(&h, "acct-1", "products").is_some());
    assert!(h
        .query_config(&qcfg_key("acct-1", "products", "red shoes"))
        .is_some());
    assert_eq!(h.settings(&format!("acct-1-{long}")), None);
}

#[tokio::test]
async fn records_from_another_source_are_rejected() {
    let mut h = harness().await;
    h.put(index_item("acct-1", "products", None)).await;
    let genuine = h.stream_records().await.remove(0);
    let forge = |seq: &str, index: &str| {
        let mut record = genuine.clone();
        record["dynamodb"]["SequenceNumber"] = json!(seq);
        record["dynamodb"]["Keys"]["sk"] = json!({"S": format!("INDEX#{index}")});
        record["dynamodb"]["NewImage"]["sk"] = json!({"S": format!("INDEX#{index}")});
        record
    };
    let mut other_stream = forge("900000000000000000001", "forged");
    other_stream["eventSourceARN"] =
        json!("arn:aws:dynamodb:eu-west-1:666666666666:table/x/stream/2026-01-01T00:00:00.000");
    let mut unsigned = forge("900000000000000000002", "unsigned");
    unsigned.as_object_mut().unwrap().remove("eventSourceARN");

    let logs = Logs::capture();
    let response = h
        .invoke_as_sent(
            json!({"Records": [genuine, other_stream, unsigned]}),
            Duration::from_secs(30),
        )
        .await
        .unwrap();

    assert_eq!(failures(&response), Vec::<String>::new());
    assert!(h.settings("acct-1-products").is_some());
    assert_eq!(h.settings("acct-1-forged"), None);
    assert_eq!(h.settings("acct-1-unsigned"), None);
    let rejected = logs.matching("record rejected");
    assert_eq!(rejected.len(), 2, "{rejected:?}");
    assert!(rejected.iter().all(|l| l.contains("eventSourceARN")));
}

#[tokio::test]
async fn api_key_lookups_stop_at_the_deadline() {
    let mut h = harness().await;
    for i in 0..20 {
        let account = format!("slow-{i}");
        h.keys.set_key(&account, "k");
        h.keys
            .set_behaviour(&account, Some(Behaviour::Delay { millis: 3_000 }));
        h.put(index_item(&account, "products", None)).await;
    }
    let records = h.stream_records().await;
    let started = Instant::now();
    let response = h
        .try_invoke(
            json!({ "Records": records.clone() }),
            Duration::from_secs(2),
        )
        .await
        .unwrap();

    // Three rounds of eight lookups would take 9 s; the batch answers at its deadline.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(failures(&response), sequence_numbers(&records));
}

#[test]
fn the_release_profile_unwinds_so_a_panic_is_answered() {
    // cargo-lambda builds with `panic = "abort"` unless the manifest says otherwise, and the
    // runtime loop's catch_unwind would then never run.
    let manifest = include_str!("../../Cargo.toml");
    let release = manifest
        .split("[profile.release]")
        .nth(1)
        .expect("a release profile");
    let release = release.split("\n[").next().unwrap();
    assert!(
        release.lines().any(|l| l.trim() == r#"panic = "unwind""#),
        "{release}"
    );
}

#[tokio::test]
async fn a_cell_whose_api_keys_service_always_fails_never_stops_the_fleet_s_reconcile() {
    let mut h = harness().await;
    h.put(index_item("acct-1", "products", None)).await;
    h.put(index_item("acct-2", "products", None)).await;
    h.export_stream().await;
    // acct-2's cell goes down for good; acct-1's key is lost from KV meanwhile.
    h.keys
        .set_behaviour("acct-2", Some(Behaviour::Status { status: 503 }));
    h.kv.remove(CF_ACCOUNT, SETTINGS_NS, "acct-1-products");
    let acct_2 = h.settings("acct-2-products");

    let logs = Logs::capture();
    let answer = h.invoke(json!({"mode": "reconcile", "repair": true})).await;

    assert_eq!(answer["complete"], true, "{answer}");
    assert_eq!(answer["counts"]["settings"]["missing"], 1, "{answer}");
    assert_eq!(answer["counts"]["settings"]["protected"], 1, "{answer}");
    assert!(h.settings("acct-1-products").is_some(), "repaired");
    assert_eq!(h.settings("acct-2-products"), acct_2, "kept as it was");
    assert_eq!(logs.matching("leaves this index unchecked").len(), 1);
}

#[test]
fn every_build_tool_the_project_installs_is_pinned_to_a_version() {
    let makefile = include_str!("../../Makefile");
    let fuzz = include_str!("../../scripts/fuzz.sh");
    // A `pip install` goes on over continuation lines; every package it names has `==`.
    let joined = makefile.replace("\\\n", " ");
    let installs: Vec<&str> = joined
        .lines()
        .filter(|l| l.contains("pip install"))
        .collect();
    assert!(installs.len() >= 3, "{installs:?}");
    for line in installs {
        let packages = line
            .split_whitespace()
            .skip_while(|w| *w != "install")
            .skip(1)
            .filter(|w| !w.starts_with('-'));
        for package in packages {
            assert!(package.contains("=="), "unpinned `{package}` in: {line}");
        }
    }
    let cargo_install = fuzz
        .lines()
        .find(|l| l.contains("cargo install"))
        .expect("fuzz.sh installs cargo-fuzz");
    assert!(cargo_install.contains("--version"), "{cargo_install}");
}
