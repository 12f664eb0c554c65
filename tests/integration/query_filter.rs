//! The query-override filter per index in `KV_QCFG`, against moto and the KV emulator, and the
//! proxy's JavaScript reader against filters this code wrote.

use std::process::Command;

use crate::common::*;
use ecom_emulators::kv::Fault;
use ecom_settings_exporter::domain::qfilter::QueryFilter;
use ecom_settings_exporter::domain::IndexRef;
use serde_json::{json, Value};

fn filter(h: &Harness, index: &str) -> QueryFilter {
    serde_json::from_value(filter_of(h, "acct-1", index).expect("a filter in KV")).unwrap()
}

async fn with_overrides(queries: &[&str]) -> Harness {
    let h = Harness::new().await;
    h.keys.set_key("acct-1", "k");
    h.put(index_item("acct-1", "p", None)).await;
    for q in queries {
        h.put(query_item("acct-1", "p", q)).await;
    }
    h
}

#[tokio::test]
async fn members_after_inserts_and_after_removes_and_adds_in_one_batch() {
    let mut h = with_overrides(&["red shoes", "blue shoes", "chaussures été #1"]).await;
    h.export_stream().await;

    let first = filter(&h, "p");
    assert_eq!(first.count, 3);
    for q in ["red shoes", "blue shoes", "chaussures été #1"] {
        assert!(first.may_contain(q), "{q}");
    }
    assert!(!first.may_contain("green shoes"));

    h.delete("acct-1", "INDEX#p#QUERY#blue shoes").await;
    h.put(query_item("acct-1", "p", "green shoes")).await;
    let response = h.export_stream().await;

    assert_eq!(failures(&response), Vec::<String>::new());
    let second = filter(&h, "p");
    assert_eq!(second.count, 3);
    for q in ["red shoes", "green shoes", "chaussures été #1"] {
        assert!(second.may_contain(q), "{q}");
    }
    assert!(
        !second.may_contain("blue shoes"),
        "a removed override is gone"
    );
}

#[tokio::test]
async fn the_filter_goes_in_the_same_bulk_write_as_the_overrides() {
    let mut h = with_overrides(&["a", "b"]).await;
    h.export_stream().await;

    let writes: Vec<usize> =
        h.kv.requests()
            .iter()
            .filter(|r| r.operation == "bulk" && r.namespace == QCFG_NS)
            .map(|r| r.items)
            .collect();
    assert_eq!(writes, [3], "two overrides and the filter, one request");
}

#[tokio::test]
async fn an_index_without_overrides_has_no_filter_after_a_reexport_with_query_configs() {
    let h = with_overrides(&[]).await;
    // A filter an earlier version wrote with `count` 0.
    let empty = r#"{"schema_version":1,"system_account_id":"acct-1","index_name":"p","filter":"binary_fuse8","count":0}"#;
    h.kv.insert(CF_ACCOUNT, QCFG_NS, "qfilter-acct-1-p", empty);

    let answer = h
        .invoke(json!({"system_account_id": "acct-1", "index_name": "p",
                       "include_query_configs": true}))
        .await;

    assert_eq!(answer["written"]["query_configs"], json!([]), "{answer}");
    assert_eq!(
        filter_of(&h, "acct-1", "p"),
        None,
        "deleted, never written empty"
    );
}

#[tokio::test]
async fn a_removed_index_s_filter_follows_its_override_records() {
    let mut h = with_overrides(&["a"]).await;
    h.put(index_item("acct-1", "kept", None)).await;
    h.put(query_item("acct-1", "kept", "b")).await;
    let mut front = index_item("acct-1", "front", None);
    front["read_alias"] = json!({"S": "acct-1-kept"});
    h.put(front).await;
    h.export_stream().await;
    assert!(filter_of(&h, "acct-1", "p").is_some());

    h.delete("acct-1", "INDEX#p").await;
    h.delete("acct-1", "INDEX#kept").await;
    let response = h.export_stream().await;

    assert_eq!(failures(&response), Vec::<String>::new());
    assert_eq!(
        filter(&h, "p").count,
        1,
        "its override record is still in the table"
    );
    assert_eq!(filter(&h, "kept").count, 1);

    h.delete("acct-1", "INDEX#p#QUERY#a").await;
    let response = h.export_stream().await;
    assert_eq!(failures(&response), Vec::<String>::new());
    assert_eq!(
        filter_of(&h, "acct-1", "p"),
        None,
        "no override record left"
    );
    assert_eq!(h.query_config(&qcfg_key("acct-1", "p", "a")), None);
}

#[tokio::test]
async fn a_filter_that_is_not_written_reports_every_record_that_needed_it() {
    let h = with_overrides(&["a", "b"]).await;
    let mut h = h;
    let records = h.stream_records().await;
    let overrides: Vec<Value> = records
        .iter()
        .filter(|r| {
            r["dynamodb"]["Keys"]["sk"]["S"]
                .as_str()
                .unwrap()
                .contains("#QUERY#")
        })
        .cloned()
        .collect();
    h.kv.inject(
        Fault::UnsuccessfulKeysStartingWith {
            prefix: "qfilter-".into(),
        },
        100,
    );

    let response = h.invoke(json!({ "Records": records.clone() })).await;

    // A record's outcome is its index's: the settings record is retried with its overrides.
    assert_eq!(failures(&response), sequence_numbers(&records));
    assert_eq!(
        override_keys(&h).len(),
        2,
        "the overrides themselves landed"
    );
    assert_eq!(filter_of(&h, "acct-1", "p"), None);

    h.kv.clear_faults();
    let from = records.iter().position(|r| r == &overrides[0]).unwrap();
    let replay = h
        .invoke(json!({ "Records": records[from..].to_vec() }))
        .await;
    assert_eq!(failures(&replay), Vec::<String>::new());
    assert_eq!(filter(&h, "p").count, 2);
}

#[tokio::test]
async fn verify_and_reconcile_find_a_filter_that_lost_a_member() {
    let mut h = with_overrides(&["a", "b"]).await;
    h.export_stream().await;
    // The filter in KV forgets `b`, as a lost write would leave it.
    let stale = QueryFilter::build(&IndexRef::new("acct-1", "p"), ["a"]);
    let meta = h.kv.metadata(CF_ACCOUNT, QCFG_NS, "qfilter-acct-1-p");
    let stale = serde_json::to_string(&stale).unwrap();
    h.kv.insert_with_metadata(CF_ACCOUNT, QCFG_NS, "qfilter-acct-1-p", &stale, meta);

    let verify = h
        .invoke(
            json!({"mode": "verify", "system_account_id": "acct-1", "index_name": "p",
                       "include_query_configs": true}),
        )
        .await;
    let status = verify["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key"] == "qfilter-acct-1-p")
        .unwrap();
    assert_eq!(status["status"], "stale", "{verify}");

    let reconcile = h
        .invoke(json!({"mode": "reconcile", "deep": true, "repair": true}))
        .await;
    assert_eq!(
        reconcile["samples"]["query_configs"]["stale"],
        json!(["qfilter-acct-1-p"]),
        "{reconcile}"
    );
    assert!(filter(&h, "p").may_contain("b"), "repaired");
}

#[test]
fn the_proxy_reader_in_javascript_reads_filters_this_code_writes() {
    if Command::new("node").arg("--version").output().is_err() {
        println!("node is not installed here: the JavaScript reader's test is skipped");
        return;
    }
    let fixtures: Vec<Value> = [0usize, 1, 10, 1000]
        .into_iter()
        .map(|n| {
            let index = IndexRef::new("acct-1", format!("p{n}"));
            let members: Vec<String> = (0..n).map(|i| format!("query {i} ✓ #{n}")).collect();
            let non_members: Vec<String> = (0..2000).map(|i| format!("other {i}")).collect();
            json!({
                "filter": QueryFilter::build(&index, &members),
                "members": members,
                "non_members": non_members,
            })
        })
        .collect();
    let path = std::env::temp_dir().join(format!("qfilter-fixtures-{}.json", std::process::id()));
    std::fs::write(&path, serde_json::to_vec(&fixtures).unwrap()).unwrap();
    let script = format!("{}/proxy/qfilter.test.mjs", env!("CARGO_MANIFEST_DIR"));

    let output = Command::new("node")
        .arg(&script)
        .arg(&path)
        .output()
        .unwrap();

    let _ = std::fs::remove_file(&path);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("1011 members found"), "{stdout}");
}
