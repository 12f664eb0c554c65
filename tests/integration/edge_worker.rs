//! The edge reads what the function writes: the values of a real run (stream, re-export,
//! backfill), read out of the KV emulator through Cloudflare's API and served to a Worker in
//! workerd (`proxy/edge/`, Miniflare from npm, installed by `make test` into
//! `proxy/node_modules`) through its `KV` and `KV_QCFG` bindings: parsed with the proxy's
//! settings schema and compared field by field with what this test wrote to the table, a shop
//! resolved to its index, and every override found through the filter with `proxy/qfilter.js`.

use std::path::Path;
use tokio::process::Command;

use crate::common::*;
use serde_json::{json, Map, Value};

/// Queries that are no override, probed against each filter.
const NON_MEMBERS_PER_FILTER: usize = 4000;
/// The contract's "about 0.4%" (BinaryFuse8: 1/256), with room for chance: twice it.
const MAX_FALSE_POSITIVE_RATE: f64 = 0.008;

fn with_aliases(mut item: Value) -> Value {
    item["search_config"] = json!({"M": {"limit": {"N": "20"}, "fields": {"SS": ["title"]}}});
    item["feature_flags"] = json!({"M": {"rerank": {"BOOL": true}}});
    item["pixel_id"] = json!({"S": "px-1"});
    item["index_aliases"] = json!({"M": {
        "doc_reads": {"M": {"enabled": {"BOOL": true}, "targets": {"L": [
            {"M": {"index_id": {"S": "acct-1-products-v2"}, "weight": {"N": "0.5"}}}]}}},
        "analytics": {"M": {"enabled": {"BOOL": true}, "index_id": {"S": "acct-1-analytics"}}}
    }});
    item
}

/// What the edge must read for an index, from what this test wrote (docs/contract.md, "KV
/// values"): every field the contract names, absent ones `null`.
fn expected_settings(account: &str, index: &str, shop: Option<&str>, api_key: &str) -> Value {
    json!({
        "schema_version": 1, "system_account_id": account, "index_name": index,
        "index_id": format!("{account}-{index}"), "shop_id": shop, "marqo_api_key": api_key,
        "index_url": format!("https://{account}-{index}.idx.example"),
        "search_config": null, "collections_config": null, "feature_flags": null,
        "agentic_config": null, "pixel_id": null, "query_override_sharding": null,
        "index_aliases": {"doc_reads": null, "analytics": null},
    })
}

/// The values `with_aliases` adds, as the edge must read them.
fn with_expected_aliases(mut value: Value) -> Value {
    value["search_config"] = json!({"limit": 20, "fields": ["title"]});
    value["feature_flags"] = json!({"rerank": true});
    value["pixel_id"] = json!("px-1");
    value["index_aliases"] = json!({
        "doc_reads": {"enabled": true, "targets": [
            {"index_id": "acct-1-products-v2", "weight": 0.5, "internal": false}]},
        "analytics": {"enabled": true, "index_id": "acct-1-analytics", "internal": false},
    });
    value
}

/// Every settings key KV must hold: an index's own key, and its shop's.
fn settings_keys(values: Vec<Value>) -> Map<String, Value> {
    let mut keys = Map::new();
    for value in values {
        keys.insert(value["index_id"].as_str().unwrap().into(), value.clone());
        if let Some(shop) = value["shop_id"].as_str() {
            keys.insert(shop.into(), value);
        }
    }
    keys
}

/// Runs `proxy/edge/check.mjs` over what `check` expects and answers its report.
async fn read_at_the_edge(h: &Harness, check: &Value) -> Value {
    let proxy = Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy");
    assert!(
        proxy.join("node_modules/miniflare").exists(),
        "Miniflare is not installed: run `make edge` (npm ci in proxy/), as `make test` does"
    );
    let mut check = check.clone();
    check["cloudflare"] = json!({"base_url": h.kv.base_url(), "token": TOKEN, "account": CF_ACCOUNT,
                                 "namespaces": {"KV": SETTINGS_NS, "KV_QCFG": QCFG_NS}});
    check["non_members"] = json!(NON_MEMBERS_PER_FILTER);
    let file = std::env::temp_dir().join(format!("edge-check-{}.json", std::process::id()));
    std::fs::write(&file, check.to_string()).unwrap();
    // Awaited, not waited on: the KV emulator it reads serves on this test's runtime.
    let out = Command::new("node")
        .arg(proxy.join("edge/check.mjs"))
        .arg(&file)
        .output()
        .await
        .expect("node runs (make test needs it)");
    let _ = std::fs::remove_file(&file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the edge check failed: {stderr}");
    serde_json::from_slice(&out.stdout).expect("one JSON report")
}

/// Writes the run's items (stream, re-export, backfill) and exports them.
async fn export_a_run(h: &mut Harness) {
    h.keys.set_key("acct-1", "marqo-key-1");
    h.keys.set_key("acct-2", "marqo-key-2");
    // The stream: an index with a shop, aliases and 301 overrides; a legacy read alias.
    h.put(with_aliases(index_item(
        "acct-1",
        "products",
        Some("shop-1.myshopify.com"),
    )))
    .await;
    let mut legacy = index_item("acct-1", "legacy", Some("shop-legacy.myshopify.com"));
    legacy["read_alias"] = json!({"S": "acct-1-products"});
    h.put(legacy).await;
    for i in 0..301 {
        h.put(query_item(
            "acct-1",
            "products",
            &format!("running shoes {i}"),
        ))
        .await;
    }
    assert_eq!(failures(&h.export_stream().await), Vec::<String>::new());
    // A re-export with query configs: an index of its own, with an override.
    h.put(index_item("acct-1", "reexported", None)).await;
    h.put(query_item("acct-1", "reexported", "ünïcode # query"))
        .await;
    let _ = h.stream_records().await; // not exported by the stream: the re-export writes it
    let reexport = json!({"system_account_id": "acct-1", "index_name": "reexported",
                          "include_query_configs": true});
    assert_eq!(h.invoke(reexport).await["complete"], true);
    // A backfill of another account: a shop, an override, an index without overrides.
    h.put(index_item(
        "acct-2",
        "catalog",
        Some("shop-2.myshopify.com"),
    ))
    .await;
    h.put(query_item("acct-2", "catalog", "sale")).await;
    h.put(index_item("acct-2", "plain", None)).await;
    let _ = h.stream_records().await;
    let backfill = json!({"mode": "backfill", "system_account_id": "acct-2",
                          "include_query_configs": true});
    assert_eq!(h.invoke(backfill).await["complete"], true);
}

/// What the edge must read after `export_a_run`, built from what it wrote, not from KV.
fn expected_at_the_edge() -> Value {
    let mut legacy = expected_settings(
        "acct-1",
        "legacy",
        Some("shop-legacy.myshopify.com"),
        "marqo-key-1",
    );
    legacy["index_aliases"]["doc_reads"] = json!({"enabled": true, "targets": [
        {"index_id": "acct-1-products", "weight": 1.0, "internal": false}]});
    let settings = settings_keys(vec![
        with_expected_aliases(expected_settings(
            "acct-1",
            "products",
            Some("shop-1.myshopify.com"),
            "marqo-key-1",
        )),
        legacy,
        expected_settings("acct-1", "reexported", None, "marqo-key-1"),
        expected_settings(
            "acct-2",
            "catalog",
            Some("shop-2.myshopify.com"),
            "marqo-key-2",
        ),
        expected_settings("acct-2", "plain", None, "marqo-key-2"),
    ]);
    let boost = json!({"boost": 2});
    let mut overrides: Vec<Value> = (0..301)
        .map(|i| {
            json!({"account": "acct-1", "index": "products",
                        "query": format!("running shoes {i}"), "config": boost})
        })
        .collect();
    overrides.push(json!({"account": "acct-1", "index": "reexported",
                          "query": "ünïcode # query", "config": boost}));
    overrides
        .push(json!({"account": "acct-2", "index": "catalog", "query": "sale", "config": boost}));
    let searches = json!([
        {"shop": "shop-1.myshopify.com", "q": "running shoes 7", "index_id": "acct-1-products", "override": boost},
        {"shop": "shop-1.myshopify.com", "q": "no override", "index_id": "acct-1-products", "override": null},
        {"shop": "shop-legacy.myshopify.com", "q": "sale", "index_id": "acct-1-legacy", "override": null},
        {"shop": "shop-2.myshopify.com", "q": "sale", "index_id": "acct-2-catalog", "override": boost},
    ]);
    json!({"settings": settings, "exact": true, "overrides": overrides, "searches": searches})
}

#[tokio::test]
async fn the_edge_reads_every_value_the_function_writes() {
    let mut h = Harness::new().await;
    export_a_run(&mut h).await;
    let expected = expected_at_the_edge();
    let report = read_at_the_edge(&h, &expected).await;

    assert_eq!(report["settings_read"], 8, "{report}"); // 5 indexes' own keys, 3 shops
    assert_eq!(report["schema_errors"], json!([]), "{report}");
    assert_eq!(report["missing"], json!([]), "{report}");
    assert_eq!(report["unexpected"], json!([]), "{report}");
    assert_eq!(report["mismatches"], json!([]), "{report}");
    assert_eq!(report["overrides_read"], 303, "{report}");
    assert_eq!(report["overrides_wrong"], json!([]), "{report}");
    assert_eq!(report["searches_wrong"], json!([]), "{report}");
    assert_eq!(override_keys(&h).len(), 303);
    // Filters of products, reexported and catalog (plain has no overrides, so no filter).
    assert_eq!(report["filters"], 3, "{report}");
    let probes = report["non_members"].as_f64().unwrap();
    let rate = report["false_positives"].as_f64().unwrap() / probes;
    assert!(rate <= MAX_FALSE_POSITIVE_RATE, "{rate} of {probes}");

    // The check itself fails where the edge would read a wrong value: a wrong API key, alias
    // weight, endpoint, a shop on another index, an override's config.
    let mut wrong = expected.clone();
    wrong["settings"]["acct-2-catalog"]["marqo_api_key"] = json!("marqo-key-1");
    wrong["settings"]["shop-1.myshopify.com"]["index_aliases"]["doc_reads"]["targets"][0]
        ["weight"] = json!(1.0);
    wrong["settings"]["acct-1-plain"] = json!({"index_url": "https://acct-1-plain.idx.example"});
    wrong["settings"]["acct-2-plain"]["index_url"] = json!("https://elsewhere.example");
    wrong["searches"][2]["index_id"] = json!("acct-1-products");
    wrong["overrides"][5]["config"] = json!({"boost": 3});
    let report = read_at_the_edge(&h, &wrong).await;
    let fields: Vec<(&str, &str)> = report["mismatches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["key"].as_str().unwrap(), m["field"].as_str().unwrap()))
        .collect();
    assert_eq!(
        fields
            .iter()
            .copied()
            .collect::<std::collections::BTreeSet<_>>(),
        [
            ("acct-2-catalog", "marqo_api_key"),
            ("acct-2-plain", "index_url"),
            ("shop-1.myshopify.com", "index_aliases"),
        ]
        .into_iter()
        .collect(),
        "{report}"
    );
    assert_eq!(report["missing"], json!(["acct-1-plain"]), "{report}");
    assert_eq!(
        report["searches_wrong"].as_array().unwrap().len(),
        1,
        "{report}"
    );
    assert_eq!(
        report["overrides_wrong"][0]["query"], "running shoes 5",
        "{report}"
    );
}
