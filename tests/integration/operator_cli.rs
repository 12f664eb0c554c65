//! The operator CLI (`cli/`) against the real function: the Lambda Invoke API stand-in in front
//! of the runtime API, the release-shaped binary behind it, moto and the KV emulator behind that.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use ecom_emulators::invoke_api::InvokeApi;
use ecom_emulators::runtime_api::RuntimeApi;
use ecom_settings_ctl::{follow, verify_table, Exporter, Mode, Progress, Target};
use serde_json::json;

/// The function behind an Invoke API, and the CLI's client pointed at it.
struct Deployed {
    invoke_api: InvokeApi,
    exporter: Exporter,
    _function: Function,
}

async fn deploy(h: &Harness) -> Deployed {
    let runtime = Arc::new(RuntimeApi::start(0).await.unwrap());
    let function = Function::start(&runtime, &h.lambda_env());
    let invoke_api = InvokeApi::start(runtime, Duration::from_secs(30))
        .await
        .unwrap();
    let exporter = Exporter::connect(&Target {
        function_name: "dev-EcomSettingsExporterLambda".into(),
        region: Some(REGION.into()),
        endpoint_url: Some(invoke_api.url()),
        read_timeout: Duration::from_secs(60),
        ..Target::default()
    })
    .await;
    Deployed {
        invoke_api,
        exporter,
        _function: function,
    }
}

async fn indexes(n: usize) -> Harness {
    let h = Harness::new().await;
    h.keys.set_key("acct-1", "k");
    for i in 0..n {
        h.put(index_item("acct-1", &format!("i{i:02}"), None)).await;
    }
    h
}

#[tokio::test]
async fn a_backfill_is_followed_token_by_token_to_the_end() {
    let h = indexes(25).await;
    let d = deploy(&h).await;
    let payload = json!({"mode": "backfill", "page_size": 10, "max_records": 10});

    let totals = follow(
        &d.exporter,
        Mode::Backfill,
        payload,
        &AtomicBool::new(false),
        &Progress::new(false),
    )
    .await
    .unwrap();

    assert!(totals.complete, "{totals:?}");
    assert_eq!(totals.get("exported"), 25);
    assert_eq!(totals.invocations, 3);
    assert_eq!(totals.written, 25);
    assert!(!totals.has_problems());
    assert_eq!(h.kv.keys(CF_ACCOUNT, SETTINGS_NS).len(), 25);
    let sent = d.invoke_api.payloads();
    assert_eq!(d.invoke_api.qualifiers(), vec![Some("live".to_owned()); 3]);
    assert!(sent[0].get("continuation_token").is_none());
    assert!(sent[1]["continuation_token"].is_string() && sent[2]["continuation_token"].is_string());
}

#[tokio::test]
async fn an_interrupted_run_finishes_its_invocation_and_resumes_from_its_token() {
    let h = indexes(25).await;
    let d = deploy(&h).await;
    let payload = json!({"mode": "backfill", "page_size": 10, "max_records": 10});

    let first = follow(
        &d.exporter,
        Mode::Backfill,
        payload.clone(),
        &AtomicBool::new(true),
        &Progress::new(false),
    )
    .await
    .unwrap();

    assert!(first.interrupted && !first.complete);
    assert_eq!((first.invocations, first.get("exported")), (1, 10));
    let mut resumed = payload;
    resumed["continuation_token"] = json!(first.continuation_token.clone().unwrap());
    let rest = follow(
        &d.exporter,
        Mode::Backfill,
        resumed,
        &AtomicBool::new(false),
        &Progress::new(false),
    )
    .await
    .unwrap();
    assert!(rest.complete);
    assert_eq!(
        first.get("exported") + rest.get("exported"),
        25,
        "nothing twice"
    );
}

#[tokio::test]
async fn rejected_records_and_function_errors_are_reported() {
    let h = indexes(2).await;
    h.put(json!({"pk": {"S": "acct-1"}, "sk": {"S": "INDEX#broken"}}))
        .await;
    let d = deploy(&h).await;

    let totals = follow(
        &d.exporter,
        Mode::Backfill,
        json!({"mode": "backfill"}),
        &AtomicBool::new(false),
        &Progress::new(false),
    )
    .await
    .unwrap();
    assert_eq!(totals.get("rejected"), 1);
    assert!(totals.has_problems(), "the CLI exits non-zero");

    let typo = d
        .exporter
        .invoke(&json!({"mode": "backfil"}))
        .await
        .unwrap_err();
    assert!(
        typo.to_string().contains("(InvalidPayload)") && typo.to_string().contains("`mode`"),
        "{typo}"
    );
}

#[tokio::test]
async fn reconcile_and_verify_read_as_an_operator_wants() {
    let h = indexes(3).await;
    let d = deploy(&h).await;

    let reconcile = follow(
        &d.exporter,
        Mode::Reconcile,
        json!({"mode": "reconcile", "repair": true}),
        &AtomicBool::new(false),
        &Progress::new(false),
    )
    .await
    .unwrap();
    assert!(reconcile.complete);
    // An index without overrides needs no filter: only the three keys are missing.
    assert_eq!(reconcile.get("missing"), 3, "three keys");
    assert_eq!(reconcile.written, 3);
    assert!(reconcile
        .summary(Mode::Reconcile)
        .starts_with("3 keys: in_sync 0, missing 3,"));

    let answer = d
        .exporter
        .invoke(&json!({"mode": "verify", "system_account_id": "acct-1", "index_name": "i01"}))
        .await
        .unwrap();
    let table = verify_table(&answer);
    assert!(table.starts_with("acct-1 / i01: in sync\n"), "{table}");
    assert!(
        table.contains("settings       acct-1-i01  in_sync"),
        "{table}"
    );
}
