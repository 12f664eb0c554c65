//! `make bench` measures a twin of the function whose DynamoDB answers come from a recording of
//! moto's (the function's wall time, not moto's): held equal to moto here on the bench's own
//! script of changes (INSERT, MODIFY, shop move, override, REMOVE), 150 records each: more keys
//! than one request takes, which the function splits into requests in its hash maps' order (a
//! recording matched request by request fails here). The twin must make the same requests, meet
//! none the recording lacks and leave KV as the run against moto left it (`bench::measure`
//! refuses otherwise), every record exported, and what it reports is what the batches did.

use ecom_emulators::bench::{measure, BenchOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bench_s_twin_answered_from_a_recording_does_what_the_run_on_moto_did() {
    let options = BenchOptions {
        function_binary: env!("CARGO_BIN_EXE_ecom-settings-exporter").into(),
        python: "python3".into(),
        reference: "bench/reference.py".into(),
        sizes: vec![150],
        kv_latency: std::time::Duration::ZERO,
        dynamo_latencies_ms: vec![0],
        runs: 1,
        cpu_share: None,
    };
    let measured = measure(&options, 150)
        .await
        .expect("the twin held equal to moto");

    let (_, twin) = &measured[0];
    let kinds: Vec<&str> = twin.batches.iter().map(|b| b.kind.name()).collect();
    assert_eq!(
        kinds,
        ["INSERT", "MODIFY", "shop move", "override", "REMOVE"]
    );
    assert!(twin.batches.iter().all(|b| b.failed == 0));
    let pairs = |i: usize, operation: &str| -> usize {
        let requests = twin.batches[i].kv.iter();
        requests
            .filter(|r| r.operation == operation)
            .map(|r| r.items)
            .sum()
    };
    assert_eq!(pairs(0, "bulk"), 300, "an index's own key and its shop's");
    assert_eq!(pairs(2, "bulk/delete"), 150, "each moved index's old shop");
    assert!(
        pairs(3, "bulk") >= 20,
        "each override, and its index's filter"
    );
    assert!(pairs(4, "bulk/delete") >= 300, "each removed index's keys");
    assert!(twin.batches.iter().all(|b| !b.calls.is_empty()));
}
