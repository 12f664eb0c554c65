//! `make demo`'s scenario, run as a test: table writes travel the real stream, a local
//! event-source poller and the real binary behind the runtime API, and end in KV.

use std::time::Duration;

use ecom_emulators::demo::{run, DemoOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_scenario_reaches_kv_and_verifies_in_sync() {
    let log = std::env::temp_dir().join(format!("ecom-demo-{}.log", std::process::id()));
    let report = run(DemoOptions {
        function_binary: env!("CARGO_BIN_EXE_ecom-settings-exporter").into(),
        moto_endpoint: Some(crate::common::moto_endpoint()),
        moto_server: "unused".into(),
        table_name: format!("demo-{}", std::process::id()),
        batching_window: Duration::from_millis(300),
        function_log: log.clone(),
    })
    .await
    .expect("the demo runs");

    assert!(report.ok(), "{report:#?}");
    assert_eq!(report.steps.len(), 6);
    assert!(report.retried_invocations >= 1, "{report:#?}");
    let _ = std::fs::remove_file(log);
}
