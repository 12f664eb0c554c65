//! The edge reads what the function writes: the values of a real run (stream, re-export,
//! backfill) read back by a Worker in workerd (`proxy/edge/`, Miniflare from npm, installed by
//! `make test` into `proxy/node_modules`) through its `KV` and `KV_QCFG` bindings, parsed with
//! the proxy's settings schema, a shop resolved to its index, and every override found through
//! the filter with `proxy/qfilter.js`.

use std::path::Path;
use std::process::Command;

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

/// Both namespaces as the Worker's bindings: `{"KV": {key: value}, "KV_QCFG": {...}}`.
fn namespaces(h: &Harness) -> Value {
    let dump = |namespace| {
        let keys = h.kv.keys(CF_ACCOUNT, namespace);
        let values = keys.into_iter().map(|key| {
            let value = h.kv.value(CF_ACCOUNT, namespace, &key).expect("listed");
            (key, Value::String(value))
        });
        Value::Object(values.collect::<Map<_, _>>())
    };
    json!({"KV": dump(SETTINGS_NS), "KV_QCFG": dump(QCFG_NS)})
}

/// Runs `proxy/edge/check.mjs` over `namespaces` and answers its report.
fn read_at_the_edge(namespaces: &Value) -> Value {
    let proxy = Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy");
    assert!(
        proxy.join("node_modules/miniflare").exists(),
        "Miniflare is not installed: run `make edge` (npm ci in proxy/), as `make test` does"
    );
    let file = std::env::temp_dir().join(format!("edge-kv-{}.json", std::process::id()));
    std::fs::write(&file, namespaces.to_string()).unwrap();
    let out = Command::new("node")
        .arg(proxy.join("edge/check.mjs"))
        .arg(&file)
        .arg(NON_MEMBERS_PER_FILTER.to_string())
        .output()
        .expect("node runs (make test needs it)");
    let _ = std::fs::remove_file(&file);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the edge check failed: {stderr}");
    serde_json::from_slice(&out.stdout).expect("one JSON report")
}

#[tokio::test]
async fn the_edge_reads_every_value_the_function_writes() {
    let mut h = Harness::new().await;
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

    let kv = namespaces(&h);
    let report = read_at_the_edge(&kv);

    let settings_keys = kv["KV"].as_object().unwrap().len();
    assert_eq!(settings_keys, 8, "{kv}"); // 5 indexes' own keys, 3 shops
    assert_eq!(report["settings_read"], settings_keys);
    assert_eq!(report["schema_errors"], json!([]), "{report}");
    assert_eq!(report["unresolved"], json!([]), "{report}");
    let searches = report["searches"].as_array().unwrap();
    assert_eq!(searches.len(), 3, "{report}");
    for search in searches {
        let expected = match search["shop"].as_str().unwrap() {
            "shop-1.myshopify.com" => ("acct-1-products", json!({"boost": 2})),
            "shop-legacy.myshopify.com" => ("acct-1-legacy", Value::Null),
            "shop-2.myshopify.com" => ("acct-2-catalog", json!({"boost": 2})),
            other => panic!("a shop no index has: {other}"),
        };
        assert_eq!(search["index_id"], expected.0, "{search}");
        assert_eq!(search["override"], expected.1, "{search}");
    }
    let overrides = override_keys(&h).len();
    assert_eq!(overrides, 303);
    assert_eq!(report["false_negatives"], json!([]), "{report}");
    assert_eq!(report["overrides_found"], overrides, "{report}");
    // Filters of products, reexported, catalog and plain (count 0: never a false positive).
    assert_eq!(report["filters"], 4, "{report}");
    let probes = report["non_members"].as_f64().unwrap();
    let rate = report["false_positives"].as_f64().unwrap() / probes;
    assert!(rate <= MAX_FALSE_POSITIVE_RATE, "{rate} of {probes}");
}
