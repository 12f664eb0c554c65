//! The schedule's reconcile keeps its passes in the ledger table (moto): a fleet that does not
//! fit one invocation completes its pass over several runs, a finished pass is not redone until
//! it is due, two runs at once never both work on the pass, and every run says what it did.

use std::time::Duration;

use crate::common::*;
use ecom_emulators::dynamo_proxy::DynamoFault;
use ecom_emulators::kv::Fault;
use ecom_emulators::runtime_api::RuntimeApi;
use ecom_settings_exporter::build_exporter;
use serde_json::{json, Value};

const SCHEDULED: &str =
    r#"{"mode": "reconcile", "repair": true, "scheduled": true, "max_keys": 20, "page_size": 10}"#;

/// 30 indexes exported (without overrides, so without filters): 30 keys.
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

    // 27 keys listed (3 were lost), then 30 table records, about 20 a run (a run stops after
    // the piece that reaches 20): the pass resumed from where each run stopped.
    assert_eq!(runs.len(), 3, "{runs:#?}");
    assert!(runs[..2]
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
        checked, 30,
        "every key classified exactly once over the pass"
    );
    assert_eq!(logs.matching("scheduled reconcile").len(), 3);
    assert_eq!(logs.matching("reconcile done").len(), 3);

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

/// What the schedule sends, run after run.
const SCHEDULE: &str = r#"{"mode": "reconcile", "repair": true, "scheduled": true}"#;

/// A few hundred indexes (a fifth with an override), exported, and one key lost from KV.
async fn fleet_with_a_lost_key() -> Harness {
    let h = Harness::new().await;
    h.keys.set_key("acct-1", "k");
    for i in 0..300 {
        let index = format!("i{i:03}");
        h.put(index_item("acct-1", &index, None)).await;
        if i % 5 == 0 {
            h.put(query_item("acct-1", &index, "running shoes")).await;
        }
    }
    let backfill = h
        .invoke(json!({"mode": "backfill", "include_query_configs": true}))
        .await;
    assert_eq!(backfill["complete"], true, "{backfill}");
    h.kv.remove(CF_ACCOUNT, SETTINGS_NS, "acct-1-i123");
    h
}

/// Sends the schedule's payload to the real binary, each run with 12 s (a short deadline:
/// 9.6 s to work once the margin is taken), until a run completes the pass; every run must
/// answer.
async fn scheduled_until_complete(runtime: &RuntimeApi, function: &Function) -> Vec<Value> {
    let mut runs = Vec::new();
    loop {
        let payload = serde_json::from_str(SCHEDULE).unwrap();
        let answer = runtime.invoke(payload, Duration::from_secs(12)).await;
        let answer = answer.unwrap_or_else(|error| {
            panic!(
                "run {} failed: {error}\n{}",
                runs.len() + 1,
                function.output()
            )
        });
        assert_eq!(answer["ran"], true, "{answer}");
        runs.push(answer.clone());
        if answer["complete"] == true {
            return runs;
        }
        // Alone, 2 or 3 runs; beside the suite's heavy tests on 2 cores each run gets less
        // done. A pass that never advances (the failure this guards) never completes at all.
        assert!(runs.len() < 16, "the pass never completes: {runs:#?}");
    }
}

/// The pass found and repaired the lost key, and each run that stopped early said why.
fn the_pass_repaired_the_lost_key(h: &Harness, runs: &[Value], function: &Function) {
    let done = runs.last().unwrap();
    assert_eq!(done["last_pass_drift"], 1, "{done}");
    assert!(h.settings("acct-1-i123").is_some(), "the lost key repaired");
    let stops = function
        .output()
        .matches("reconcile stopped before the end")
        .count();
    assert_eq!(
        stops,
        runs.len() - 1,
        "one line for each run that stopped early"
    );
}

#[tokio::test]
async fn a_pass_whose_kv_listing_is_slow_hands_on_its_place_and_completes() {
    let _turn = heavy_or_timed().await;
    let h = fleet_with_a_lost_key().await;
    // A large or slow namespace: every listing page answers after 5 s.
    let slow = Fault::Latency {
        operation: "keys".into(),
        millis: 5_000,
    };
    h.kv.inject(slow, 1);
    let runtime = RuntimeApi::start(0).await.unwrap();
    let function = Function::start(&runtime, &h.lambda_env());

    let runs = scheduled_until_complete(&runtime, &function).await;

    assert!(
        runs.len() > 1,
        "the pass needs several runs here: {runs:#?}"
    );
    the_pass_repaired_the_lost_key(&h, &runs, &function);
}

#[tokio::test]
async fn a_pass_whose_ledger_is_slow_hands_on_its_place_and_completes() {
    let _turn = heavy_or_timed().await;
    let h = fleet_with_a_lost_key().await;
    let ProxiedFunction {
        dynamodb: ledger,
        runtime,
        function,
    } = behind_a_dynamodb_proxy(&h).await;
    // Every call to the ledger table answers after 0.5 s.
    let slow = DynamoFault::Delay(Duration::from_millis(500));
    ledger.inject(None, Some("-ledger"), slow, usize::MAX);

    let runs = scheduled_until_complete(&runtime, &function).await;

    the_pass_repaired_the_lost_key(&h, &runs, &function);
    let ledger_calls = ledger.calls().into_iter();
    assert!(
        ledger_calls
            .filter(|c| c.tables.iter().any(|t| t.ends_with("-ledger")))
            .count()
            > 0
    );
}
