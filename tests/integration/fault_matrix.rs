//! The fault matrix: one test per fault, each asserting what KV holds and what the batch
//! response says (nothing lost: written, rejected with a log line, or reported for retry), and
//! that the function serves the next invocation once the fault is gone. The README lists it.

use std::time::{Duration, Instant};

use crate::common::*;
use aws_sdk_dynamodb::types::StreamViewType;
use ecom_emulators::api_keys::Behaviour;
use ecom_emulators::kv::Fault;
use ecom_emulators::runtime_api::RuntimeApi;
use serde_json::{json, Value};

/// A harness with one index record waiting in the stream.
async fn one_pending_record(view: StreamViewType) -> (Harness, Vec<Value>) {
    let mut h = Harness::with_view(view).await;
    h.keys.set_key("acct-1", "k");
    h.put(index_item(
        "acct-1",
        "products",
        Some("shop-1.myshopify.com"),
    ))
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

/// With the fault gone, a new change goes through: the function keeps serving.
async fn serves_the_next_invocation(h: &mut Harness) {
    h.kv.clear_faults();
    h.put(index_item("acct-1", "after-the-fault", None)).await;
    let records = h.stream_records().await;
    let response = h.invoke(json!({ "Records": records })).await;
    assert_eq!(failures(&response), Vec::<String>::new());
    assert!(h.settings("acct-1-after-the-fault").is_some());
}

async fn a_transient_status_is_retried_until_it_passes(view: StreamViewType, status: u16) {
    let (mut h, records) = one_pending_record(view).await;
    h.kv.inject(Fault::status(status), 2);

    let response = h.invoke(json!({ "Records": records })).await;

    assert_eq!(failures(&response), Vec::<String>::new(), "{status}");
    assert!(h.settings("shop-1.myshopify.com").is_some(), "{status}");
    assert_eq!(bulk_statuses(&h), [status, status, 200]);
    serves_the_next_invocation(&mut h).await;
}

crate::on_both_views! {
async fn kv_500_is_retried(view) {
    a_transient_status_is_retried_until_it_passes(view, 500).await;
}
}

crate::on_both_views! {
async fn kv_502_is_retried(view) {
    a_transient_status_is_retried_until_it_passes(view, 502).await;
}
}

crate::on_both_views! {
async fn kv_503_is_retried(view) {
    a_transient_status_is_retried_until_it_passes(view, 503).await;
}
}

crate::on_both_views! {
async fn kv_524_is_retried(view) {
    a_transient_status_is_retried_until_it_passes(view, 524).await;
}
}

crate::on_both_views! {
async fn kv_errors_that_outlast_the_retries_report_the_records(view) {
    let (mut h, records) = one_pending_record(view).await;
    h.kv.inject(
        Fault::status(503),
        100,
    );

    let response = h.invoke(json!({ "Records": records.clone() })).await;

    assert_eq!(failures(&response), sequence_numbers(&records));
    assert_eq!(
        bulk_statuses(&h).len(),
        1 + fast_retry().max_retries as usize
    );
    assert!(h.kv.keys(CF_ACCOUNT, SETTINGS_NS).is_empty());
    serves_the_next_invocation(&mut h).await;
}
}

crate::on_both_views! {
async fn kv_429_waits_as_retry_after_says(view) {
    let (mut h, records) = one_pending_record(view).await;
    h.kv.inject(
        Fault::Status {
            retry_after_raw: None,
            location: None,
            status: 429,
            retry_after: Some(1),
            retry_after_date: None,
            retry_after_ms: None,
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
    assert!(h.settings("shop-1.myshopify.com").is_some());
    serves_the_next_invocation(&mut h).await;
}
}

crate::on_both_views! {
async fn kv_429_without_retry_after_backs_off(view) {
    let (mut h, records) = one_pending_record(view).await;
    h.kv.inject(
        Fault::status(429),
        2,
    );

    let response = h.invoke(json!({ "Records": records })).await;

    assert_eq!(failures(&response), Vec::<String>::new());
    assert_eq!(bulk_statuses(&h), [429, 429, 200]);
    serves_the_next_invocation(&mut h).await;
}
}

crate::on_both_views! {
async fn kv_unsuccessful_keys_are_sent_again(view) {
    let (mut h, records) = one_pending_record(view).await;
    h.kv.inject(Fault::UnsuccessfulKeys { count: 1 }, 1);

    let response = h.invoke(json!({ "Records": records })).await;

    assert_eq!(failures(&response), Vec::<String>::new());
    assert_eq!(h.bulk_write_sizes(), [2, 1], "only the missing key again");
    assert!(h.settings("shop-1.myshopify.com").is_some());
    assert!(h.settings("acct-1-products").is_some());
    serves_the_next_invocation(&mut h).await;
}
}

crate::on_both_views! {
async fn kv_keys_that_stay_unsuccessful_report_their_record(view) {
    let (mut h, records) = one_pending_record(view).await;
    h.kv.inject(Fault::UnsuccessfulKeys { count: 1 }, 100);

    let response = h.invoke(json!({ "Records": records.clone() })).await;

    assert_eq!(failures(&response), sequence_numbers(&records));
    serves_the_next_invocation(&mut h).await;
}
}

/// A refused request is never sent again as it was: it is split in two (one of its keys may
/// be the cause); when every part is refused too, nothing is a single key's fault and the
/// records are reported for retry.
async fn a_client_error_is_not_retried(view: StreamViewType, status: u16) {
    let (mut h, records) = one_pending_record(view).await;
    h.kv.inject(Fault::status(status), 100);

    let logs = Logs::capture();
    let response = h.invoke(json!({ "Records": records.clone() })).await;
    h.kv.clear_faults();

    assert_eq!(failures(&response), sequence_numbers(&records), "{status}");
    // The record's two keys: the request, then each half alone.
    assert_eq!(bulk_statuses(&h), [status, status, status]);
    let failed = logs.matching("record failed");
    assert_eq!(failed.len(), 1, "{failed:?}");
    // The reason quotes Cloudflare's error envelope: its code and message.
    assert!(
        failed[0].contains(&format!("HTTP {status} (10999 injected fault)")),
        "{}",
        failed[0]
    );
    serves_the_next_invocation(&mut h).await;
}

crate::on_both_views! {
async fn kv_400_with_an_error_envelope_is_not_retried(view) {
    a_client_error_is_not_retried(view, 400).await;
}
}

crate::on_both_views! {
async fn kv_413_is_not_retried(view) {
    a_client_error_is_not_retried(view, 413).await;
}
}

crate::on_both_views! {
async fn kv_422_is_not_retried(view) {
    a_client_error_is_not_retried(view, 422).await;
}
}

crate::on_both_views! {
async fn kv_slower_than_the_client_timeout_is_retried(view) {
    let (mut h, records) = one_pending_record(view).await;
    let timeout = fast_retry().request_timeout;
    h.kv.inject(
        Fault::Delay {
            millis: timeout.as_millis() as u64 + 1000,
        },
        1,
    );

    let response = h.invoke(json!({ "Records": records })).await;

    assert_eq!(failures(&response), Vec::<String>::new());
    assert!(h.settings("shop-1.myshopify.com").is_some());
    serves_the_next_invocation(&mut h).await;
}
}

crate::on_both_views! {
async fn kv_connection_refused_reports_the_records(view) {
    let (mut h, records) = one_pending_record(view).await;
    let kv_url = h.kv.base_url();
    // Bound but not listening: every connection is refused, and no other test's server can
    // take the port meanwhile (a listener bound and dropped would free it for one).
    let reserved = tokio::net::TcpSocket::new_v4().unwrap();
    reserved.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let closed = reserved.local_addr().unwrap();
    h.reconfigure(
        "CLOUDFLARE_API_BASE_URL",
        &format!("http://{closed}/client/v4"),
    )
    .await;

    let logs = Logs::capture();
    let response = h.invoke(json!({ "Records": records.clone() })).await;

    assert_eq!(failures(&response), sequence_numbers(&records));
    let failed = logs.matching("record failed");
    assert!(
        failed[0].contains("cannot connect to Cloudflare"),
        "{failed:?}"
    );
    h.reconfigure("CLOUDFLARE_API_BASE_URL", &kv_url).await;
    serves_the_next_invocation(&mut h).await;
}
}

crate::on_both_views! {
async fn kv_401_after_a_token_rotation_refetches_the_token_once(view) {
    let (mut h, records) = one_pending_record(view).await;
    h.invoke(json!({ "Records": records })).await; // the first token is now cached
    h.secrets
        .put_secret_value()
        .secret_id(&h.secret_id)
        .secret_string("cf-token-2")
        .send()
        .await
        .unwrap();
    h.kv.set_tokens(&["cf-token-2"]);
    h.put(index_item(
        "acct-1",
        "products",
        Some("shop-2.myshopify.com"),
    ))
    .await;

    let response = h.export_stream().await;

    assert_eq!(failures(&response), Vec::<String>::new());
    assert_eq!(
        h.settings("shop-2.myshopify.com").unwrap()["shop_id"],
        "shop-2.myshopify.com"
    );
    // The shop move's put and the old shop key's delete meet the rotation, refetch, and go
    // through: each is sent again once.
    let calls: Vec<(String, u16)> =
        h.kv.requests()
            .iter()
            .filter(|r| r.operation.starts_with("bulk"))
            .map(|r| (r.operation.clone(), r.status))
            .collect();
    assert_eq!(calls[0], ("bulk".to_string(), 200), "{calls:?}");
    for op in ["bulk", "bulk/delete"] {
        let statuses: Vec<u16> = (calls[1..].iter())
            .filter(|(o, _)| o == op)
            .map(|(_, status)| *status)
            .collect();
        assert!(statuses == [200] || statuses == [401, 200], "{op}: {calls:?}");
    }
    assert!(calls.iter().any(|(_, status)| *status == 401), "{calls:?}");
    serves_the_next_invocation(&mut h).await;
}
}

crate::on_both_views! {
async fn kv_401_with_a_revoked_token_gives_up_after_one_refetch(view) {
    let (mut h, records) = one_pending_record(view).await;
    h.kv.set_tokens(&["some-other-token"]);

    let response = h.invoke(json!({ "Records": records.clone() })).await;

    assert_eq!(failures(&response), sequence_numbers(&records));
    assert_eq!(bulk_statuses(&h), [401, 401]);
    h.kv.set_tokens(&[TOKEN]);
    serves_the_next_invocation(&mut h).await;
}
}

crate::on_both_views! {
async fn retries_that_would_outlast_the_deadline_stop_and_report_what_is_left(view) {
    let (mut h, records) = one_pending_record(view).await;
    h.kv.inject(
        Fault::Status {
            retry_after_raw: None,
            location: None,
            status: 503,
            retry_after: Some(30),
            retry_after_date: None,
            retry_after_ms: None,
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
    serves_the_next_invocation(&mut h).await;
}
}

async fn an_api_keys_fault_reports_the_record(
    view: StreamViewType,
    behaviour: Behaviour,
    reason: &str,
) {
    let (mut h, records) = one_pending_record(view).await;
    h.reconfigure("API_KEYS_TIMEOUT_SECONDS", "1").await;
    h.keys.set_behaviour("acct-1", Some(behaviour));

    let logs = Logs::capture();
    let response = h.invoke(json!({ "Records": records.clone() })).await;

    assert_eq!(failures(&response), sequence_numbers(&records));
    assert!(h.kv.requests().is_empty(), "never written without its key");
    let failed = logs.matching("record failed");
    assert!(failed[0].contains(reason), "{}", failed[0]);
    h.keys.set_behaviour("acct-1", None);
    serves_the_next_invocation(&mut h).await;
}

crate::on_both_views! {
async fn api_keys_500_reports_the_record(view) {
    an_api_keys_fault_reports_the_record(view, Behaviour::Status { status: 500 }, "HTTP 500").await;
}
}

crate::on_both_views! {
async fn api_keys_timeout_reports_the_record(view) {
    an_api_keys_fault_reports_the_record(view, Behaviour::Delay { millis: 3000 }, "no answer in time")
        .await;
}
}

crate::on_both_views! {
async fn api_keys_malformed_json_reports_the_record(view) {
    an_api_keys_fault_reports_the_record(view, Behaviour::Malformed, "answer is not").await;
}
}

crate::on_both_views! {
async fn api_keys_404_rejects_the_record_with_a_log_line(view) {
    let (mut h, records) = one_pending_record(view).await;
    h.keys
        .set_behaviour("acct-1", Some(Behaviour::Status { status: 404 }));

    let logs = Logs::capture();
    let response = h.invoke(json!({ "Records": records })).await;

    assert_eq!(
        failures(&response),
        Vec::<String>::new(),
        "permanent: not retried"
    );
    assert!(h.kv.requests().is_empty());
    assert_eq!(logs.matching("record rejected").len(), 1);
    h.keys.set_behaviour("acct-1", None);
    serves_the_next_invocation(&mut h).await;
}
}

const INVOKE: Duration = Duration::from_secs(30);

/// The binary with one AWS service (`AWS_ENDPOINT_URL_<SERVICE>`) behind a proxy that starts
/// down; the SDK tries once, so the outage shows at once.
async fn function_with_an_outage(
    h: &Harness,
    service_endpoint: &'static str,
) -> (RuntimeApi, Function, Proxy) {
    let proxy = Proxy::to_moto(false).await;
    let runtime = RuntimeApi::start(0).await.unwrap();
    let mut env = h.lambda_env();
    env.push((service_endpoint, proxy.url()));
    env.push(("AWS_MAX_ATTEMPTS", "1".into()));
    let function = Function::start(&runtime, &env);
    (runtime, function, proxy)
}

crate::on_both_views! {
async fn secrets_manager_unreachable_at_cold_start_reports_the_batch_then_recovers(view) {
    let (mut h, records) = one_pending_record(view).await;
    let (runtime, function, secrets) =
        function_with_an_outage(&h, "AWS_ENDPOINT_URL_SECRETS_MANAGER").await;

    let answer = runtime
        .invoke(json!({ "Records": records.clone() }), INVOKE)
        .await;

    let response = answer.unwrap_or_else(|e| panic!("{e}\n{}", function.output()));
    assert_eq!(failures(&response), sequence_numbers(&records));
    assert!(h.kv.keys(CF_ACCOUNT, SETTINGS_NS).is_empty());
    function
        .wait_for("cannot fetch the Cloudflare API token")
        .await;

    secrets.set_up(true);
    let retried = runtime
        .invoke(json!({ "Records": records }), INVOKE)
        .await
        .unwrap();
    assert_eq!(
        failures(&retried),
        Vec::<String>::new(),
        "{}",
        function.output()
    );
    assert!(h.settings("shop-1.myshopify.com").is_some());
    h.stream_records().await;
}
}

crate::on_both_views! {
async fn dynamodb_unreachable_during_a_remove_retries_it_never_deletes_unchecked(view) {
    let (mut h, records) = one_pending_record(view).await;
    h.invoke(json!({ "Records": records })).await;
    h.delete("acct-1", "INDEX#products").await;
    let remove = h.stream_records().await;
    let (runtime, function, table) = function_with_an_outage(&h, "AWS_ENDPOINT_URL_DYNAMODB").await;

    let response = runtime
        .invoke(json!({ "Records": remove.clone() }), INVOKE)
        .await
        .unwrap();

    assert_eq!(failures(&response), sequence_numbers(&remove));
    assert!(
        h.settings("acct-1-products").is_some(),
        "not deleted unchecked"
    );
    assert!(h.settings("shop-1.myshopify.com").is_some());
    // Neither its item nor its references (the ledger) can be read: the record says so, and
    // is retried.
    let log = function.wait_for("record failed; reported for retry").await;
    assert!(log.contains("BatchGetItem of"), "{log}");

    table.set_up(true);
    let retried = runtime
        .invoke(json!({ "Records": remove }), INVOKE)
        .await
        .unwrap();
    assert_eq!(
        failures(&retried),
        Vec::<String>::new(),
        "{}",
        function.output()
    );
    assert_eq!(h.settings("acct-1-products"), None);
    assert_eq!(h.settings("shop-1.myshopify.com"), None);
}
}

crate::on_both_views! {
/// No table item can hold 25 MiB (DynamoDB's limit is 400 KB): only a forged record can, and
/// what a record exports is its item as the table holds it (the check of the value's size
/// itself is `domain::kv`'s unit test).
async fn a_record_carrying_25_mib_exports_its_item_as_the_table_holds_it(view) {
    let h = Harness::with_view(view).await;
    h.keys.set_key("acct-1", "k");
    h.put(index_item("acct-1", "huge", None)).await;
    let mut image = index_item("acct-1", "huge", None);
    image["search_config"] = json!({"M": {"blob": {"S": "x".repeat(25 * 1024 * 1024)}}});
    let record = json!({
        "eventID": "1", "eventName": "INSERT", "awsRegion": REGION,
        "dynamodb": {"Keys": {"pk": {"S": "acct-1"}, "sk": {"S": "INDEX#huge"}}, "NewImage": image,
                     "SequenceNumber": "1", "SizeBytes": 1, "StreamViewType": "NEW_IMAGE"}
    });

    let response = h.invoke(json!({ "Records": [record] })).await;

    assert_eq!(failures(&response), Vec::<String>::new());
    let value = h
        .settings("acct-1-huge")
        .expect("the table's item is exported");
    assert!(!value.to_string().contains("xxxx"), "{value}");
    let sizes = h.bulk_write_sizes();
    assert_eq!(sizes, [1], "one key, the table's value");
}
}

crate::on_both_views! {
async fn keys_over_512_bytes_are_rejected_and_never_sent(view) {
    let mut h = Harness::with_view(view).await;
    h.keys.set_key("acct-1", "k");
    h.put(index_item("acct-1", "products", Some(&"s".repeat(513))))
        .await;
    h.put(index_item("acct-1", "fine", None)).await;

    let response = h.export_stream().await;

    assert_eq!(failures(&response), Vec::<String>::new());
    assert_eq!(h.kv.keys(CF_ACCOUNT, SETTINGS_NS), ["acct-1-fine"]);
}
}

/// Every kind of DynamoDB call the function makes, in one run through a DynamoDB proxy: a
/// backfill (the table's Scan, the ledger's reads and writes), a shop move (the
/// records' items, the ledger, the check's read of the index) and a re-export with its
/// overrides (GetItem and Query of the table). Answers the calls the proxy saw, after
/// checking that every invocation succeeded and KV ended as the table says.
async fn every_kind_of_dynamodb_call(
    view: StreamViewType,
    fault: Option<(&str, bool, &str)>,
) -> (Vec<ecom_emulators::dynamo_proxy::DynamoCall>, String) {
    use ecom_emulators::dynamo_proxy::DynamoFault;
    let mut h = Harness::with_view(view).await;
    h.keys.set_key("acct-1", "k");
    h.put(index_item(
        "acct-1",
        "products",
        Some("shop-1.myshopify.com"),
    ))
    .await;
    h.put(query_item("acct-1", "products", "shoes")).await;
    h.stream_records().await;
    let ProxiedFunction {
        dynamodb,
        runtime,
        function,
    } = behind_a_dynamodb_proxy(&h).await;
    if let Some((operation, ledger, error_type)) = fault {
        // The settings table by its exact name: it is the start of its ledger's.
        let table = if ledger {
            "-ledger".to_owned()
        } else {
            format!("={}", h.table)
        };
        let fault = DynamoFault::Fail {
            status: 400,
            error_type: error_type.into(),
        };
        dynamodb.inject(Some(operation), Some(&table), fault, 1);
    }
    // An invocation that fails answers its error.
    let invoke = |payload: Value| async {
        let answer = runtime.invoke(payload, INVOKE).await;
        answer.unwrap_or_else(|e| json!({ "error": e.to_string() }))
    };

    let backfill = invoke(json!({"mode": "backfill"})).await;
    h.put(index_item(
        "acct-1",
        "products",
        Some("shop-2.myshopify.com"),
    ))
    .await;
    let moved = invoke(json!({ "Records": h.stream_records().await })).await;
    let reexport = invoke(
        json!({"system_account_id": "acct-1", "index_name": "products",
                                 "include_query_configs": true}),
    )
    .await;

    let answers = format!("{backfill}\n{moved}\n{reexport}\n{}", function.output());
    let ok = backfill["complete"] == true
        && failures(&moved).is_empty()
        && reexport["complete"] == true
        && h.settings("shop-2.myshopify.com").is_some()
        && h.settings("shop-1.myshopify.com").is_none();
    (dynamodb.calls(), if ok { String::new() } else { answers })
}

crate::on_both_views! {
/// DynamoDB's throttling error on any kind of call the function makes, on either table, is
/// tried again as the SDK's retry classifier decides (the function's own client included);
/// a permanent error is not.
async fn a_throttled_dynamodb_call_of_any_kind_is_tried_again_and_a_permanent_one_is_not(view) {
    let (calls, failed) = every_kind_of_dynamodb_call(view.clone(), None).await;
    assert_eq!(failed, "");
    let kinds: std::collections::BTreeSet<(String, bool)> = (calls.iter())
        .flat_map(|c| {
            c.tables
                .iter()
                .map(|t| (c.operation.clone(), t.ends_with("-ledger")))
        })
        .collect();
    for kind in [
        "BatchGetItem",
        "GetItem",
        "Query",
        "Scan",
        "TransactWriteItems",
    ] {
        assert!(
            kinds.iter().any(|(op, _)| op == kind),
            "{kind} not made: {kinds:?}"
        );
    }
    const THROTTLED: &str = "ProvisionedThroughputExceededException";
    for (operation, ledger) in &kinds {
        let (calls, failed) =
            every_kind_of_dynamodb_call(view.clone(), Some((operation, *ledger, THROTTLED))).await;
        assert_eq!(failed, "", "{operation} (ledger: {ledger}) throttled");
        let throttled = (calls.iter()).filter(|c| c.operation == *operation && c.status == 400);
        assert_eq!(throttled.count(), 1, "{operation} (ledger: {ledger})");
    }

    let permanent = Some((
        "TransactWriteItems",
        true,
        "ItemCollectionSizeLimitExceededException",
    ));
    let (calls, failed) = every_kind_of_dynamodb_call(view.clone(), permanent).await;
    // Tried once: the backfill that needed it stops, naming the refusal.
    assert!(
        failed.contains("ItemCollectionSizeLimitExceeded"),
        "{failed}"
    );
    let refused = (calls.iter()).filter(|c| c.operation == "TransactWriteItems" && c.status == 400);
    assert_eq!(refused.count(), 1);
}
}

crate::on_both_views! {
/// A rejected record whose raw item cannot be read (what its index no longer claims) is
/// reported for retry, never counted done with its old shop still serving it; its retry gives
/// the shop up (seed 1436 of the simulation's plain workload).
async fn a_rejected_record_whose_raw_item_cannot_be_read_is_retried(view) {
    use ecom_emulators::dynamo_proxy::DynamoFault;
    const SHOP: &str = "shop-s.myshopify.com";
    let mut h = Harness::with_view(view).await;
    h.keys.set_key("acct-1", "k");
    h.put(index_item("acct-1", "products", Some(SHOP))).await;
    h.export_stream().await;
    let mut invalid = index_item("acct-1", "products", Some("shop-t.myshopify.com"));
    invalid["index_endpoint"] = json!({ "S": "http://acct-1.idx.example" });
    h.put(invalid).await;
    let records = h.stream_records().await;
    let ProxiedFunction {
        dynamodb,
        runtime,
        function,
    } = behind_a_dynamodb_proxy(&h).await;
    // The records' items are read; every later read of the settings table's items fails.
    let table = format!("={}", h.table);
    let read = Some("BatchGetItem");
    dynamodb.inject(read, Some(&table), DynamoFault::Delay(Duration::ZERO), 1);
    let down = DynamoFault::Fail {
        status: 500,
        error_type: "InternalServerError".into(),
    };
    dynamodb.inject(read, Some(&table), down, usize::MAX);

    let answer = runtime.invoke(json!({ "Records": records }), INVOKE).await;
    let answer = answer.unwrap_or_else(|e| panic!("{e}: {}", function.output()));
    let sequence = records[0]["dynamodb"]["SequenceNumber"].as_str().unwrap();
    assert_eq!(failures(&answer), [sequence], "{}", function.output());
    let shop = h.settings(SHOP).expect("not given up yet");
    assert_eq!(shop["index_name"], "products");

    dynamodb.clear_faults();
    let answer = runtime.invoke(json!({ "Records": records }), INVOKE).await;
    let answer = answer.unwrap_or_else(|e| panic!("{e}: {}", function.output()));
    assert_eq!(failures(&answer), Vec::<String>::new(), "{}", function.output());
    assert_eq!(h.settings(SHOP), None, "given up: nobody else claims it");
    let own = h.settings("acct-1-products").expect("its own key stays");
    assert_eq!(own["shop_id"], SHOP, "its last good value");
}
}
