//! Malformed stream records are decoded or rejected with one clear log line each, never a
//! panic, and never at the cost of the good records beside them.

use crate::common::*;
use serde_json::{json, Value};

fn record(seq: u32, event: &str, keys: Value, image: Option<Value>) -> Value {
    let mut dynamodb = json!({"Keys": keys, "SequenceNumber": seq.to_string(), "SizeBytes": 1,
                              "StreamViewType": "NEW_IMAGE"});
    if let Some(image) = image {
        dynamodb["NewImage"] = image;
    }
    json!({"eventID": seq.to_string(), "eventName": event, "awsRegion": REGION, "dynamodb": dynamodb})
}

fn keys(sk: &str) -> Value {
    json!({"pk": {"S": "acct-1"}, "sk": {"S": sk}})
}

fn image(sk: &str, extra: Value) -> Value {
    let mut image = keys(sk);
    image["index_endpoint"] = json!({"S": "https://idx.example"});
    image
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    image
}

#[tokio::test]
async fn a_batch_of_malformed_records_rejects_each_with_a_reason_and_keeps_the_good_one() {
    let h = Harness::new().await;
    h.keys.set_key("acct-1", "k");
    let batch = vec![
        // Missing keys, keys of the wrong type.
        record(1, "MODIFY", json!({}), Some(json!({}))),
        record(
            2,
            "MODIFY",
            json!({"pk": {"N": "1"}, "sk": {"S": "INDEX#a"}}),
            Some(json!({})),
        ),
        // Wrong attribute types.
        record(
            3,
            "MODIFY",
            keys("INDEX#b"),
            Some(image("INDEX#b", json!({"index_endpoint": {"N": "7"}}))),
        ),
        record(
            4,
            "MODIFY",
            keys("INDEX#c"),
            Some(image("INDEX#c", json!({"index_aliases": {"S": "x"}}))),
        ),
        // Unknown event name; not even a record.
        record(
            5,
            "TRUNCATE",
            keys("INDEX#d"),
            Some(image("INDEX#d", json!({}))),
        ),
        json!({"dynamodb": {"SequenceNumber": "6"}, "eventName": ["not", "a", "string"]}),
        // A number outside f64 (and DynamoDB's range): no table holds its item.
        record(
            7,
            "MODIFY",
            keys("INDEX#e"),
            Some(image(
                "INDEX#e",
                json!({"search_config": {"M": {"n": {"N": "9e999"}}}}),
            )),
        ),
        // Empty strings: an empty index name is invalid, an empty shop id is not set.
        record(
            8,
            "MODIFY",
            keys("INDEX#"),
            Some(image("INDEX#", json!({}))),
        ),
        record(
            9,
            "MODIFY",
            keys("INDEX#empty-shop"),
            Some(image("INDEX#empty-shop", json!({"shop_id": {"S": ""}}))),
        ),
        // Binary and set attributes, and an image near DynamoDB's 400 KB item limit: decoded
        // and exported.
        record(
            10,
            "MODIFY",
            keys("INDEX#typed"),
            Some(image(
                "INDEX#typed",
                json!({"feature_flags": {"M": {
            "blob": {"B": "AAEC"}, "tags": {"SS": ["a", "b"]}, "sizes": {"NS": ["1", "2.5"]},
            "bins": {"BS": ["AA=="]}, "nothing": {"NULL": true}}}}),
            )),
        ),
        record(
            11,
            "MODIFY",
            keys("INDEX#big"),
            Some(image(
                "INDEX#big",
                json!({"search_config": {"M": {
            "synonyms": {"S": "w ".repeat(150_000)}}}}),
            )),
        ),
    ];

    // A record exports its item as the table holds it: the table holds the records' images
    // (the hostile ones are rejected for what the table holds, not for what a record says),
    // except record 7's, whose number no table accepts.
    h.seed_table(&[&batch[2..4], &batch[8..]].concat()).await;
    let logs = Logs::capture();
    let response = h.invoke(json!({ "Records": batch })).await;

    assert_eq!(
        failures(&response),
        Vec::<String>::new(),
        "nothing to retry: all permanent"
    );
    let rejected = logs.matching("record rejected");
    assert_eq!(rejected.len(), 7, "{rejected:#?}");
    for (seq, reason) in [
        ("1", "`pk` and `sk`"),
        ("2", "`pk` and `sk`"),
        ("3", "index_endpoint"),
        ("4", "index_aliases"),
        ("5", "unknown eventName `TRUNCATE`"),
        ("6", "not a DynamoDB stream record"),
        ("8", "empty account or index name"),
    ] {
        let line = rejected
            .iter()
            .find(|l| l.contains(&format!("sequence_number={seq} ")))
            .unwrap_or_else(|| panic!("a line for {seq} in {rejected:#?}"));
        assert!(line.contains(reason), "{seq}: {line}");
    }
    // Its image is never read: the table holds no such item, so nothing of it is in KV.
    assert!(!rejected.iter().any(|l| l.contains("sequence_number=7 ")));
    assert!(h.settings("acct-1-e").is_none());
    assert!(h.settings("acct-1-empty-shop").is_some());
    assert_eq!(
        h.settings("acct-1-empty-shop").unwrap()["shop_id"],
        Value::Null
    );
    assert_eq!(
        h.settings("acct-1-typed").unwrap()["feature_flags"],
        json!({"blob": "AAEC", "tags": ["a", "b"], "sizes": [1, 2.5], "bins": ["AA=="], "nothing": null})
    );
    assert!(
        h.settings("acct-1-big").unwrap()["search_config"]["synonyms"]
            .as_str()
            .unwrap()
            .len()
            > 250_000
    );
}
