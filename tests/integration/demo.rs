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

/// `make demo`, `make test` and `make local` first check the machine: on one without a C
/// compiler or curl, each is named on its own line with how to get it, and the make stops.
#[test]
fn a_machine_without_a_c_compiler_is_told_what_to_install() {
    let bin = std::env::temp_dir().join(format!("ecom-prereq-{}", std::process::id()));
    std::fs::create_dir_all(&bin).unwrap();
    let python = std::process::Command::new("python3")
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .unwrap();
    let python = String::from_utf8(python.stdout).unwrap();
    let which = |tool: &str| {
        let found = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .unwrap();
        String::from_utf8(found.stdout).unwrap().trim().to_owned()
    };
    // Only what the check itself runs with, rustup and Python: no cc, gcc or curl.
    for (name, path) in [
        ("python3", python.trim().to_owned()),
        ("cargo", which("cargo")),
        ("rustup", which("rustup")),
        ("bash", which("bash")),
        ("env", which("env")),
        ("sed", which("sed")),
        ("grep", which("grep")),
        ("dirname", which("dirname")),
    ] {
        let _ = std::os::unix::fs::symlink(path, bin.join(name));
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/prerequisites.sh");
    let checked = std::process::Command::new(bin.join("bash"))
        .arg(script)
        .env("PATH", &bin)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&bin);

    let said = String::from_utf8_lossy(&checked.stderr);
    assert_eq!(checked.status.code(), Some(1), "{said}");
    let lines: Vec<&str> = said.lines().collect();
    assert_eq!(lines.len(), 2, "one line each: {said}");
    assert!(lines[0].contains("a C compiler") && lines[0].contains("apt-get install gcc"));
    assert!(lines[1].contains("curl") && lines[1].contains("apt-get install curl"));
}
