//! The real `ecom-settings-exporter` binary, run as Lambda runs it: it polls a local runtime
//! API for invocations and posts its answers back.

use std::time::Duration;

use crate::common::*;
use ecom_emulators::runtime_api::RuntimeApi;
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn the_binary_answers_a_stream_batch_through_the_runtime_api() {
    let mut h = Harness::new().await;
    h.keys.set_key("acct-1", "marqo-secret-key");
    h.put(index_item(
        "acct-1",
        "products",
        Some("shop-1.myshopify.com"),
    ))
    .await;
    h.put(json!({"pk": {"S": "acct-1"}, "sk": {"S": "INDEX#broken"}}))
        .await;
    let records = h.stream_records().await;
    let runtime = RuntimeApi::start(0).await.unwrap();
    let function = Function::start(&runtime, &h.lambda_env());

    let answer = runtime.invoke(json!({ "Records": records }), TIMEOUT).await;

    assert_eq!(
        answer,
        Ok(json!({"batchItemFailures": []})),
        "{}",
        function.output()
    );
    assert_eq!(
        h.settings("shop-1.myshopify.com").unwrap()["marqo_api_key"],
        "marqo-secret-key"
    );
    function.wait_for("\"_aws\"").await; // the metrics document comes last
    let lines = function.log_lines();
    let summary = lines
        .iter()
        .find(|l| l["fields"]["message"] == "batch done")
        .unwrap_or_else(|| panic!("a batch line in {}", function.output()));
    assert_eq!(summary["fields"]["exported"], 1);
    assert_eq!(summary["fields"]["rejected"], 1);
    assert_eq!(summary["level"], "INFO");
    let rejected = lines
        .iter()
        .find(|l| l["fields"]["message"] == "record rejected")
        .expect("a rejected line");
    assert_eq!(rejected["fields"]["index"], "broken");
    let output = function.output();
    for line in lines.iter().filter(|l| l.get("level").is_some()) {
        assert_eq!(
            line["span"]["requestId"], "req-000001",
            "request id on every line: {line}"
        );
    }
    let metrics = lines
        .iter()
        .find(|l| l.get("_aws").is_some())
        .unwrap_or_else(|| panic!("an EMF document in {output}"));
    assert_eq!(metrics["RecordsExported"], 1.0);
    assert_eq!(metrics["RecordsRejected"], 1.0);
    assert_eq!(metrics["ApiKeyCalls"], 1.0);
    assert_eq!(metrics["FunctionName"], "ecom-settings-exporter");
    assert!(metrics["PropagationLagMax"].as_f64().unwrap() >= 0.0);
    assert_eq!(
        lines.iter().filter(|l| l.get("_aws").is_some()).count(),
        1,
        "one document per invocation"
    );
    assert!(
        !output.contains("marqo-secret-key"),
        "no API key in the logs"
    );
    assert!(!output.contains(TOKEN), "no token in the logs");
}

#[tokio::test]
async fn unsupported_payloads_fail_with_what_is_accepted() {
    let h = Harness::new().await;
    let runtime = RuntimeApi::start(0).await.unwrap();
    let _function = Function::start(&runtime, &h.lambda_env());

    let error = runtime
        .invoke(json!({"hello": "world"}), TIMEOUT)
        .await
        .unwrap_err();

    assert_eq!(error["errorType"], "InvalidPayload");
    let message = error["errorMessage"].as_str().unwrap();
    assert!(message.contains("{\"Records\": [...]}"), "{message}");
    assert!(message.contains("\"system_account_id\""), "{message}");
}

#[tokio::test]
async fn a_manual_reexport_answers_a_summary_of_the_keys_written() {
    let h = Harness::new().await;
    h.keys.set_key("acct-1", "k");
    h.put(index_item(
        "acct-1",
        "products",
        Some("shop-1.myshopify.com"),
    ))
    .await;
    h.put(
        json!({"pk": {"S": "acct-1"}, "sk": {"S": "INDEX#products#QUERY#red shoes"},
                 "query_config": {"M": {"boost": {"N": "2"}}}}),
    )
    .await;
    let runtime = RuntimeApi::start(0).await.unwrap();
    let function = Function::start(&runtime, &h.lambda_env());

    let answer = runtime
        .invoke(
            json!({"system_account_id": "acct-1", "index_name": "products", "include_query_configs": true}),
            TIMEOUT,
        )
        .await;

    let answer = answer.unwrap_or_else(|e| panic!("{e}\n{}", function.output()));
    assert_eq!(
        answer["written"]["settings"],
        json!(["acct-1-products", "shop-1.myshopify.com"])
    );
    assert_eq!(
        answer["written"]["query_configs"],
        json!([
            qcfg_key("acct-1", "products", "red shoes"),
            "qfilter-acct-1-products"
        ])
    );
    assert_eq!(answer["keys_written"], 4);
    assert_eq!(
        h.settings("shop-1.myshopify.com").unwrap()["index_name"],
        "products"
    );
    assert_eq!(override_keys(&h).len(), 1);

    let missing = runtime
        .invoke(
            json!({"system_account_id": "acct-1", "index_name": "nope"}),
            TIMEOUT,
        )
        .await
        .unwrap_err();
    assert_eq!(
        missing["errorMessage"],
        "no settings record for account acct-1, index nope"
    );
}

#[tokio::test]
async fn a_missing_setting_fails_every_invocation_naming_it() {
    let h = Harness::new().await;
    let env: Vec<_> = h
        .lambda_env()
        .into_iter()
        .filter(|(name, _)| *name != "SETTINGS_TABLE_NAME")
        .collect();
    let runtime = RuntimeApi::start(0).await.unwrap();
    let mut command_env = env;
    command_env.push(("SETTINGS_TABLE_NAME", String::new()));
    let function = Function::start(&runtime, &command_env);

    for _ in 0..2 {
        let error = runtime
            .invoke(json!({"Records": []}), TIMEOUT)
            .await
            .unwrap_err();
        assert_eq!(error["errorType"], "ConfigError");
        assert_eq!(
            error["errorMessage"],
            "missing required environment variable SETTINGS_TABLE_NAME"
        );
    }
    function
        .wait_for("missing required environment variable")
        .await;
    let lines = function.log_lines();
    assert_eq!(
        lines
            .iter()
            .filter(|l| l["fields"]["message"]
                == "missing required environment variable SETTINGS_TABLE_NAME")
            .count(),
        1,
        "one clear line at start: {}",
        function.output()
    );
}
