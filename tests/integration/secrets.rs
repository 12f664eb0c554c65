//! The Cloudflare token and the API keys never show: not in a log line (at debug level, all
//! crates), not in an error, not in an answer, not in `Debug` output.

use std::time::Duration;

use crate::common::*;
use ecom_emulators::kv::Fault;
use ecom_settings_exporter::domain::{ApiKey, ApiToken};
use ecom_settings_exporter::pipeline::records::decode_as_written;
use serde_json::json;

const API_KEY: &str = "marqo-api-key-7d1f0c";

fn assert_hidden(what: &str, text: &str) {
    assert!(!text.contains(API_KEY), "API key in {what}: {text}");
    assert!(!text.contains(TOKEN), "token in {what}: {text}");
}

#[tokio::test]
async fn neither_token_nor_api_key_appears_anywhere_but_kv() {
    let logs = Logs::capture();
    let mut h = Harness::new().await;
    h.keys.set_key("acct-1", API_KEY);
    h.put(index_item(
        "acct-1",
        "products",
        Some("shop-1.myshopify.com"),
    ))
    .await;
    h.put(json!({"pk": {"S": "acct-1"}, "sk": {"S": "INDEX#broken"}}))
        .await;
    h.put(json!({"pk": {"S": "acct-1"}, "sk": {"S": "INDEX#products#QUERY#q"}, "query_config": {"M": {}}}))
        .await;

    // The stream path, with a retry and a permanent KV error on the way.
    let records = h.stream_records().await;
    h.kv.inject(Fault::status(503), 1);
    h.kv.inject(Fault::status(400), 1);
    let first = h.invoke(json!({ "Records": records.clone() })).await;
    let second = h.invoke(json!({ "Records": records.clone() })).await;
    h.kv.set_tokens(&["rotated-elsewhere"]);
    let third = h.invoke(json!({ "Records": records.clone() })).await;
    h.kv.set_tokens(&[TOKEN]);
    for answer in [&first, &second, &third] {
        assert_hidden("a batch response", &answer.to_string());
    }
    assert!(
        h.settings("shop-1.myshopify.com").is_some(),
        "the key does reach KV"
    );
    assert_eq!(
        h.settings("shop-1.myshopify.com").unwrap()["marqo_api_key"],
        API_KEY
    );

    // Every manual mode, and their errors.
    let index = json!({"system_account_id": "acct-1", "index_name": "products", "include_query_configs": true});
    let mut payloads = vec![index.clone()];
    for extra in [
        json!({"dry_run": true}),
        json!({"mode": "verify"}),
        json!({"mode": "verify", "repair": true}),
    ] {
        let mut payload = index.clone();
        payload
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        payloads.push(payload);
    }
    payloads.push(json!({"mode": "backfill", "include_query_configs": true}));
    payloads.push(json!({"mode": "backfill", "dry_run": true}));
    payloads.push(json!({"system_account_id": "acct-1", "index_name": "nope"}));
    for payload in payloads {
        let answer = h.try_invoke(payload.clone(), Duration::from_secs(30)).await;
        let text = match answer {
            Ok(answer) => answer.to_string(),
            Err(error) => error,
        };
        assert_hidden(&format!("the answer to {payload}"), &text);
    }
    // A failing re-export's error message.
    h.kv.inject(Fault::status(400), 10);
    let error = h
        .try_invoke(index.clone(), Duration::from_secs(30))
        .await
        .unwrap_err();
    assert!(
        error.starts_with("re-export of account acct-1, index products failed"),
        "{error}"
    );
    assert_hidden("an error", &error);

    // Debug output of everything that carries them.
    let decoded: Vec<_> = records
        .iter()
        .map(|r| decode_as_written(&r.to_string(), "DEFAULT_CONFIGS"))
        .collect();
    let prepared = h
        .exporter
        .prepare(
            decoded,
            ecom_settings_exporter::pipeline::exporter::Run::STREAM,
            tokio::time::Instant::now() + Duration::from_secs(10),
        )
        .await;
    assert!(!prepared.desired.keys.is_empty());
    assert_hidden("Debug of a prepared plan", &format!("{prepared:?}"));
    let ops = (prepared.desired.keys.iter())
        .filter_map(|(key, wanted)| Some((key.clone(), wanted.action()?)))
        .collect();
    let requests = ecom_settings_exporter::adapters::cloudflare::encode::requests(ops);
    assert_hidden("Debug of KV requests", &format!("{requests:?}"));
    let report = h
        .exporter
        .apply(
            prepared,
            tokio::time::Instant::now() + Duration::from_secs(10),
        )
        .await;
    assert_hidden("Debug of a batch report", &format!("{report:?}"));
    assert_hidden(
        "Debug of the API key type",
        &format!("{:?}", ApiKey::new(API_KEY)),
    );
    assert_hidden(
        "Debug of the token type",
        &format!("{:?}", ApiToken::new(TOKEN)),
    );
    assert_hidden("Debug of the configuration", &format!("{:?}", h.config));

    let lines = logs.lines();
    assert!(
        lines.len() > 20,
        "debug logging was on: {} lines",
        lines.len()
    );
    for line in lines {
        assert_hidden("a log line", &line);
    }
}
