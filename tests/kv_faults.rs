//! Each fault class of the Cloudflare client, against the KV emulator: what KV ends up holding
//! and what the batch response reports.

mod common;

use std::time::{Duration, Instant};

use common::*;
use ecom_emulators::kv::Fault;
use serde_json::{json, Value};

/// A harness with one index record waiting in the stream.
async fn one_pending_record() -> (Harness, Vec<Value>) {
    let mut h = Harness::new().await;
    h.keys.set_key("acct-1", "k");
    h.put(index_item("acct-1", "products", Some("shop-1")))
        .await;
    let records = h.stream_records().await;
    (h, records)
}

fn bulk_statuses(h: &Harness) -> Vec<u16> {
    h.kv.requests()
        .iter()
        .filter(|r| r.operation == "bulk")
        .map(|r| r.status)
        .collect()
}

#[tokio::test]
async fn server_errors_are_retried_until_they_pass() {
    for status in [500, 502, 503, 524] {
        let (h, records) = one_pending_record().await;
        h.kv.inject(
            Fault::Status {
                status,
                retry_after: None,
            },
            2,
        );

        let response = h.invoke(json!({ "Records": records })).await;

        assert_eq!(failures(&response), Vec::<String>::new(), "{status}");
        assert!(h.settings("shop-1").is_some(), "{status}");
        assert_eq!(bulk_statuses(&h), [status, status, 200]);
    }
}

#[tokio::test]
async fn persistent_server_errors_report_the_records_after_the_retries() {
    let (h, records) = one_pending_record().await;
    h.kv.inject(
        Fault::Status {
            status: 503,
            retry_after: None,
        },
        100,
    );

    let response = h.invoke(json!({ "Records": records.clone() })).await;

    assert_eq!(failures(&response), sequence_numbers(&records));
    assert_eq!(
        bulk_statuses(&h).len(),
        1 + fast_retry().max_retries as usize
    );
    assert!(h.kv.keys(CF_ACCOUNT, SETTINGS_NS).is_empty());
}

#[tokio::test]
async fn rate_limits_honour_retry_after() {
    let (h, records) = one_pending_record().await;
    h.kv.inject(
        Fault::Status {
            status: 429,
            retry_after: Some(1),
        },
        1,
    );

    let started = Instant::now();
    let response = h.invoke(json!({ "Records": records })).await;

    assert_eq!(failures(&response), Vec::<String>::new());
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "waited as told"
    );
    assert_eq!(bulk_statuses(&h), [429, 200]);
    assert!(h.settings("shop-1").is_some());
}

#[tokio::test]
async fn rate_limits_without_retry_after_back_off() {
    let (h, records) = one_pending_record().await;
    h.kv.inject(
        Fault::Status {
            status: 429,
            retry_after: None,
        },
        2,
    );

    let response = h.invoke(json!({ "Records": records })).await;

    assert_eq!(failures(&response), Vec::<String>::new());
    assert_eq!(bulk_statuses(&h), [429, 429, 200]);
}

#[tokio::test]
async fn unsuccessful_keys_are_sent_again() {
    let (h, records) = one_pending_record().await;
    h.kv.inject(Fault::UnsuccessfulKeys { count: 1 }, 1);

    let response = h.invoke(json!({ "Records": records })).await;

    assert_eq!(failures(&response), Vec::<String>::new());
    let bulk: Vec<_> =
        h.kv.requests()
            .into_iter()
            .filter(|r| r.operation == "bulk")
            .collect();
    assert_eq!(
        bulk.iter().map(|r| r.items).collect::<Vec<_>>(),
        [2, 1],
        "only the missing key again"
    );
    assert!(h.settings("shop-1").is_some());
    assert!(h.settings("acct-1-products").is_some());
}

#[tokio::test]
async fn keys_that_stay_unsuccessful_report_their_record() {
    let (h, records) = one_pending_record().await;
    h.kv.inject(Fault::UnsuccessfulKeys { count: 1 }, 100);

    let response = h.invoke(json!({ "Records": records.clone() })).await;

    assert_eq!(failures(&response), sequence_numbers(&records));
}

#[tokio::test]
async fn a_client_error_is_not_retried_and_reports_the_records() {
    for status in [400, 413] {
        let (h, records) = one_pending_record().await;
        h.kv.inject(
            Fault::Status {
                status,
                retry_after: None,
            },
            1,
        );

        let logs = Logs::capture();
        let response = h.invoke(json!({ "Records": records.clone() })).await;

        assert_eq!(failures(&response), sequence_numbers(&records), "{status}");
        assert_eq!(bulk_statuses(&h), [status]);
        let failed = logs.matching("record failed");
        assert_eq!(failed.len(), 1);
        assert!(
            failed[0].contains(&format!("HTTP {status} (10999 injected fault)")),
            "{}",
            failed[0]
        );
    }
}

#[tokio::test]
async fn a_slow_answer_times_out_and_is_retried() {
    let (h, records) = one_pending_record().await;
    let timeout = fast_retry().request_timeout;
    h.kv.inject(
        Fault::Delay {
            millis: timeout.as_millis() as u64 + 1000,
        },
        1,
    );

    let response = h.invoke(json!({ "Records": records })).await;

    assert_eq!(failures(&response), Vec::<String>::new());
    assert!(h.settings("shop-1").is_some());
}

#[tokio::test]
async fn connection_refused_reports_the_records() {
    let (mut h, records) = one_pending_record().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    h.reconfigure(
        "CLOUDFLARE_API_BASE_URL",
        &format!("http://{closed}/client/v4"),
    )
    .await;

    let logs = Logs::capture();
    let response = h.invoke(json!({ "Records": records.clone() })).await;

    assert_eq!(failures(&response), sequence_numbers(&records));
    assert!(logs.matching("record failed")[0].contains("cannot connect to Cloudflare"));
}

#[tokio::test]
async fn a_rotated_token_is_fetched_again_once() {
    let (mut h, records) = one_pending_record().await;
    h.invoke(json!({ "Records": records })).await; // the first token is now cached
    h.secrets
        .put_secret_value()
        .secret_id(&h.secret_id)
        .secret_string("cf-token-2")
        .send()
        .await
        .unwrap();
    h.kv.set_tokens(&["cf-token-2"]);
    h.put(index_item("acct-1", "products", Some("shop-2")))
        .await;

    let response = h.export_stream().await;

    assert_eq!(failures(&response), Vec::<String>::new());
    assert_eq!(h.settings("shop-2").unwrap()["shop_id"], "shop-2");
    assert_eq!(bulk_statuses(&h), [200, 401, 200]);
}

#[tokio::test]
async fn a_revoked_token_gives_up_after_one_refetch() {
    let (h, records) = one_pending_record().await;
    h.kv.set_tokens(&["some-other-token"]);

    let response = h.invoke(json!({ "Records": records.clone() })).await;

    assert_eq!(failures(&response), sequence_numbers(&records));
    assert_eq!(bulk_statuses(&h), [401, 401]);
}

#[tokio::test]
async fn retries_stop_before_the_deadline_and_report_what_is_left() {
    let (h, records) = one_pending_record().await;
    h.kv.inject(
        Fault::Status {
            status: 503,
            retry_after: Some(30),
        },
        100,
    );

    let started = Instant::now();
    let response = h
        .try_invoke(
            json!({ "Records": records.clone() }),
            Duration::from_secs(3),
        )
        .await
        .unwrap();

    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answered before the deadline"
    );
    assert_eq!(failures(&response), sequence_numbers(&records));
    assert_eq!(bulk_statuses(&h), [503]);
}

#[tokio::test]
async fn values_over_25_mib_are_rejected_and_never_sent() {
    let h = Harness::new().await;
    h.keys.set_key("acct-1", "k");
    let mut image = index_item("acct-1", "huge", None);
    image["search_config"] = json!({"M": {"blob": {"S": "x".repeat(25 * 1024 * 1024)}}});
    let record = json!({
        "eventID": "1", "eventName": "INSERT", "awsRegion": REGION,
        "dynamodb": {"Keys": {"pk": {"S": "acct-1"}, "sk": {"S": "INDEX#huge"}}, "NewImage": image,
                     "SequenceNumber": "1", "SizeBytes": 1, "StreamViewType": "NEW_IMAGE"}
    });

    let logs = Logs::capture();
    let response = h.invoke(json!({ "Records": [record] })).await;

    assert_eq!(failures(&response), Vec::<String>::new());
    assert!(h.kv.requests().is_empty());
    let rejected = logs.matching("record rejected");
    assert_eq!(rejected.len(), 1);
    assert!(rejected[0].contains("25 MiB"), "{}", rejected[0]);
    assert!(rejected[0].contains("index=huge"), "{}", rejected[0]);
}

#[tokio::test]
async fn keys_over_512_bytes_are_rejected_and_never_sent() {
    let mut h = Harness::new().await;
    h.keys.set_key("acct-1", "k");
    h.put(index_item("acct-1", "products", Some(&"s".repeat(513))))
        .await;
    h.put(index_item("acct-1", "fine", None)).await;

    let response = h.export_stream().await;

    assert_eq!(failures(&response), Vec::<String>::new());
    assert_eq!(h.kv.keys(CF_ACCOUNT, SETTINGS_NS), ["acct-1-fine"]);
}
