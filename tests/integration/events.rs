//! Every sample in `events/` is accepted by the handler and does what its name says, so the
//! files stay usable with `cargo lambda invoke --data-file`.

use crate::common::*;
use serde_json::{json, Value};

fn event(name: &str) -> Value {
    let path = format!("{}/events/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).expect(&path)).expect(&path)
}

/// The names of the files in `events/` that start with `prefix`.
fn samples(prefix: &str) -> Vec<String> {
    std::fs::read_dir(format!("{}/events", env!("CARGO_MANIFEST_DIR")))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// The stream every sample names (`make local`'s `.local.env` names it too).
const SAMPLE_STREAM: &str = "arn:aws:dynamodb:eu-west-1:123456789012:table/dev-EcomIndexSettingsTable/stream/2026-11-21T00:00:00.000";

async fn harness() -> Harness {
    let mut h = Harness::new().await;
    h.reconfigure("SETTINGS_TABLE_STREAM_ARN", SAMPLE_STREAM)
        .await;
    h.keys.set_key("acct-1", "sample-key");
    h
}

#[tokio::test]
async fn every_sample_stream_event_is_answered_without_failures() {
    let names = samples("stream-");
    assert!(names.len() >= 8, "{names:?}");
    for name in names {
        let h = harness().await;
        let response = h.invoke(event(&name)).await;
        assert_eq!(response, json!({"batchItemFailures": []}), "{name}");
    }
}

#[tokio::test]
async fn the_insert_then_shop_change_then_remove_samples_tell_a_story() {
    let h = harness().await;
    // Each sample exports its item as the table holds it: the table first, as its change left it.
    let invoke = |name: &'static str| {
        let h = &h;
        async move {
            let sample = event(name);
            h.seed_table(sample["Records"].as_array().unwrap()).await;
            h.invoke(sample).await
        }
    };
    invoke("stream-insert.json").await;
    assert!(h.settings("shop-1.myshopify.com").is_some());

    invoke("stream-modify-shop-change.json").await;
    assert_eq!(h.settings("shop-1.myshopify.com"), None);
    assert_eq!(
        h.settings("acct-1-products").unwrap()["shop_id"],
        "shop-2.myshopify.com"
    );

    invoke("stream-remove-new-and-old-images.json").await;
    assert!(h.kv.keys(CF_ACCOUNT, SETTINGS_NS).is_empty());
}

#[tokio::test]
async fn the_mixed_sample_writes_two_skips_one_and_rejects_one() {
    let h = harness().await;
    let sample = event("stream-mixed-batch.json");
    h.seed_table(sample["Records"].as_array().unwrap()).await;
    let logs = Logs::capture();
    h.invoke(sample).await;

    assert_eq!(
        h.kv.keys(CF_ACCOUNT, SETTINGS_NS),
        ["acct-1-products", "shop-1.myshopify.com"]
    );
    assert_eq!(override_keys(&h).len(), 1);
    // Rebuilt from the table's overrides: the sample's one.
    assert_eq!(filter_of(&h, "acct-1", "products").unwrap()["count"], 1);
    let summary = logs.matching("batch done");
    assert!(
        summary[0].contains("exported=2 skipped=1 rejected=1 failed=0"),
        "{}",
        summary[0]
    );
}

#[tokio::test]
async fn the_manual_sample_reexports_what_the_table_holds() {
    let h = harness().await;
    let insert = event("stream-insert.json");
    h.put(insert["Records"][0]["dynamodb"]["NewImage"].clone())
        .await;

    let summary = h.invoke(event("manual-reexport.json")).await;

    assert_eq!(
        summary["written"]["settings"],
        json!(["acct-1-products", "shop-1.myshopify.com"])
    );
    assert_eq!(
        h.settings("acct-1-products").unwrap()["marqo_api_key"],
        "sample-key"
    );
}

#[tokio::test]
async fn every_sample_manual_payload_is_answered() {
    let names = samples("manual-");
    assert!(names.len() >= 8, "{names:?}");
    for name in names {
        let h = harness().await;
        let insert = event("stream-insert.json");
        h.put(insert["Records"][0]["dynamodb"]["NewImage"].clone())
            .await;
        let answer = h.invoke(event(&name)).await;
        assert!(answer.is_object(), "{name}: {answer}");
        assert!(
            !answer.to_string().contains("sample-key"),
            "{name} shows no API key"
        );
    }
}

#[tokio::test]
async fn the_scheduled_reconcile_sample_is_what_the_template_sends_and_is_answered() {
    let template =
        std::fs::read_to_string(format!("{}/template.yaml", env!("CARGO_MANIFEST_DIR"))).unwrap();
    let input = template
        .lines()
        .find_map(|l| l.trim().strip_prefix("Input: "))
        .expect("the schedule's input");
    let sent: Value = serde_json::from_str(input.trim_matches('\'')).unwrap();
    assert_eq!(sent, event("scheduled-reconcile.json"));

    let h = harness().await;
    let insert = event("stream-insert.json");
    h.put(insert["Records"][0]["dynamodb"]["NewImage"].clone())
        .await;
    let answer = h.invoke(sent).await;
    assert_eq!(answer["complete"], true, "{answer}");
    assert_eq!(
        answer["repaired"]["written"], 2,
        "the index's two keys were missing (no filter says the same as an empty one)"
    );
    assert_eq!(filter_of(&h, "acct-1", "products"), None);
    assert!(!answer.to_string().contains("sample-key"));
}
