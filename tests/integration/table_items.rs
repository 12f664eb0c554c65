//! The stream reads its records' items without the SDK (`adapters/dynamodb/items.rs`: a signed
//! BatchGetItem read by the stream's own reader). What it exports must be what the SDK's path
//! (a re-export's GetItem and Query) exports from the same items, byte for byte.

use crate::common::*;
use serde_json::json;

#[tokio::test]
async fn the_stream_exports_its_items_as_a_reexport_of_them_does() {
    let mut h = Harness::new().await;
    h.keys.set_key("acct-1", "k");
    let mut rich = index_item("acct-1", "rich", Some("shop-r.myshopify.com"));
    rich["search_config"] = json!({"M": {
        "text": {"S": "quote \" backslash \\ newline \n tab \t control \u{1} emoji 👟 é"},
        "numbers": {"L": [{"N": "12345678901234567890123"}, {"N": "-0.000001"}, {"N": "1E+100"}]},
        "flags": {"M": {"on": {"BOOL": true}, "off": {"BOOL": false}, "nothing": {"NULL": true}}},
        "strings": {"SS": ["b", "a"]}, "nums": {"NS": ["2", "1.5"]},
        "blob": {"B": "AAEC/w=="}, "blobs": {"BS": ["AA==", "/w=="]},
        "empty": {"S": ""}, "list": {"L": []}, "map": {"M": {}}
    }});
    rich["index_aliases"] = json!({"M": {"doc_reads": {"M": {"enabled": {"BOOL": true},
        "targets": {"L": [{"M": {"index_id": {"S": "acct-1-i0"}, "weight": {"N": "2.5"}}}]}}}}});
    h.put(rich).await;
    let mut query = query_item("acct-1", "rich", "chaussures été");
    query["query_config"] = json!({"M": {"boost": {"N": "0.10"}, "terms": {"L": [{"S": "a\"b"}]}}});
    h.put(query).await;
    // More items than one request reads.
    for i in 0..120 {
        h.put(index_item("acct-1", &format!("i{i}"), None)).await;
    }
    let response = h.export_stream().await;
    assert_eq!(response, json!({"batchItemFailures": []}));
    assert_eq!(
        h.kv.keys(CF_ACCOUNT, SETTINGS_NS).len(),
        122,
        "120 + rich and its shop"
    );
    let compared = [
        (SETTINGS_NS, "acct-1-rich".to_owned()),
        (SETTINGS_NS, "shop-r.myshopify.com".to_owned()),
        (QCFG_NS, qcfg_key("acct-1", "rich", "chaussures été")),
    ];
    let streamed: Vec<Option<String>> = (compared.iter())
        .map(|(namespace, key)| h.kv.remove(CF_ACCOUNT, namespace, key))
        .collect();

    let reexport = json!({"system_account_id": "acct-1", "index_name": "rich",
                          "include_query_configs": true});
    h.invoke(reexport).await;

    for ((namespace, key), streamed) in compared.iter().zip(streamed) {
        let reexported = h.kv.value(CF_ACCOUNT, namespace, key);
        assert!(streamed.is_some(), "{key}");
        assert_eq!(streamed, reexported, "{key}");
    }
}
