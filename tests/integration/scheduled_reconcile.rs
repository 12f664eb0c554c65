//! The schedule's reconcile keeps its passes in the ledger table (moto): a fleet that does not
//! fit one invocation completes its pass over several runs, a finished pass is not redone until
//! it is due, two runs at once never both work on the pass, and every run says what it did.

use std::time::Duration;

use crate::common::*;
use ecom_emulators::kv::Fault;
use ecom_settings_exporter::build_exporter;
use serde_json::{json, Value};

const SCHEDULED: &str =
    r#"{"mode": "reconcile", "repair": true, "scheduled": true, "max_keys": 20, "page_size": 10}"#;

/// 30 indexes exported with their (empty) override filters: 60 keys.
async fn fleet() -> Harness {
    let h = Harness::new().await;
    h.keys.set_key("acct-1", "k");
    for i in 0..30 {
        h.put(index_item("acct-1", &format!("i{i:02}"), None)).await;
    }
    let backfill = h
        .invoke(json!({"mode": "backfill", "include_query_configs": true}))
        .await;
    assert_eq!(backfill["complete"], true, "{backfill}");
    h
}

async fn scheduled(h: &Harness) -> Value {
    h.invoke(serde_json::from_str(SCHEDULED).unwrap()).await
}

#[tokio::test]
async fn a_pass_too_large_for_one_run_completes_over_scheduled_runs_then_waits_until_due() {
    let h = fleet().await;
    for key in ["acct-1-i03", "acct-1-i17", "acct-1-i29"] {
        h.kv.remove(CF_ACCOUNT, SETTINGS_NS, key);
    }
    let logs = Logs::capture();

    let mut runs = Vec::new();
    loop {
        let answer = scheduled(&h).await;
        assert_eq!(answer["ran"], true, "{answer}");
        runs.push(answer.clone());
        if answer["complete"] == true {
            break;
        }
        assert!(runs.len() < 6, "the pass never completes: {runs:#?}");
    }

    // 57 keys listed (3 were lost), then 30 table records, about 20 a run (a run stops after
    // the piece that reaches 20): the pass resumed from where each run stopped.
    assert_eq!(runs.len(), 4, "{runs:#?}");
    assert!(runs[..3]
        .iter()
        .all(|r| r["complete"] == false && r["last_full_pass_at"].is_null()));
    let done = runs.last().unwrap();
    assert!(done["last_full_pass_at"].as_u64().is_some(), "{done}");
    assert_eq!(done["last_pass_drift"], 3, "{done}");
    for key in ["acct-1-i03", "acct-1-i17", "acct-1-i29"] {
        assert!(h.settings(key).is_some(), "{key} repaired");
    }
    let checked: u64 = runs
        .iter()
        .map(|r| {
            ["settings", "query_configs"]
                .iter()
                .map(|ns| {
                    let c = &r["counts"][ns];
                    [
                        "in_sync",
                        "missing",
                        "stale",
                        "orphaned",
                        "protected",
                        "foreign",
                    ]
                    .iter()
                    .map(|class| c[class].as_u64().unwrap())
                    .sum::<u64>()
                })
                .sum::<u64>()
        })
        .sum();
    assert_eq!(
        checked, 60,
        "every key classified exactly once over the pass"
    );
    assert_eq!(logs.matching("scheduled reconcile").len(), 4);
    assert_eq!(logs.matching("reconcile done").len(), 4);

    // The pass is done: the next run does nothing until RECONCILE_EVERY_HOURS has passed.
    let listed = h.kv_calls("keys");
    let idle = scheduled(&h).await;
    assert_eq!(idle["ran"], false, "{idle}");
    assert!(
        idle["reason"].as_str().unwrap().starts_with("not due"),
        "{idle}"
    );
    assert_eq!(h.kv_calls("keys"), listed, "an idle run lists nothing");
}

#[tokio::test]
async fn two_scheduled_runs_at_once_never_both_work_on_the_pass() {
    let h = fleet().await;
    // A second function instance: its own clients, the same ledger table, table and KV.
    let other = build_exporter(&h.config, fast_retry()).await;
    // Hold the first run's first list request, so the second starts while it works.
    h.kv.inject(Fault::Delay { millis: 1_500 }, 1);
    let payload = serde_json::to_vec(&serde_json::from_str::<Value>(SCHEDULED).unwrap()).unwrap();
    let deadline = || tokio::time::Instant::now() + Duration::from_secs(30);
    let first = ecom_settings_exporter::entry::route(&h.exporter, payload.clone(), deadline());
    let second = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        ecom_settings_exporter::entry::route(&other, payload.clone(), deadline()).await
    };
    let (first, second) = tokio::join!(first, second);
    let (first, second) = (first.unwrap(), second.unwrap());

    assert_eq!(first["ran"], true, "{first}");
    assert_eq!(second["ran"], false, "{second}");
    assert!(
        second["reason"]
            .as_str()
            .unwrap()
            .contains("holds the pass"),
        "{second}"
    );
    // The pass goes on from where the first run stopped.
    let next = scheduled(&h).await;
    assert_eq!(next["ran"], true, "{next}");
    assert_ne!(
        next["continuation_token"], first["continuation_token"],
        "{first} {next}"
    );
    assert!(next["requests"]["kv_list"].as_u64().unwrap() > 0, "{next}");
}

#[tokio::test]
async fn a_scheduled_run_refuses_a_token_or_an_account_of_its_own() {
    let h = fleet().await;
    for extra in [
        json!({"continuation_token": "x"}),
        json!({"system_account_id": "acct-1"}),
    ] {
        let mut payload: Value = serde_json::from_str(SCHEDULED).unwrap();
        payload
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let error = h
            .try_invoke(payload, Duration::from_secs(10))
            .await
            .unwrap_err();
        assert!(
            error.contains("`scheduled` keeps its own progress"),
            "{error}"
        );
    }
}
