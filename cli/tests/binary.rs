//! The `ecom-settings-ctl` binary against a scripted function behind the Lambda Invoke API:
//! tokens followed, totals, exit codes, and Ctrl-C finishing the invocation under way.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use ecom_emulators::invoke_api::{InvokeApi, Script};
use serde_json::{json, Value};

/// A backfill of three pages: tokens `p2` and `p3`, then complete.
fn three_pages() -> Script {
    Arc::new(|payload: Value| {
        let (exported, next) = match payload["continuation_token"].as_str() {
            None => (10, Some("p2")),
            Some("p2") => (10, Some("p3")),
            Some(_) => (5, None),
        };
        Ok(
            json!({"mode": "backfill", "exported": exported, "skipped": 0, "rejected": 0,
                  "failed": 0, "keys_written": exported * 2, "complete": next.is_none(),
                  "continuation_token": next}),
        )
    })
}

fn ctl(api: &InvokeApi, args: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_ecom-settings-ctl"));
    command
        .args([
            "--function-name",
            "dev-EcomSettingsExporterLambda",
            "--region",
            "eu-west-1",
        ])
        .args(["--endpoint-url", &api.url()])
        .args(args)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

#[tokio::test]
async fn a_backfill_runs_to_completion_and_prints_its_totals() {
    let api = InvokeApi::scripted(three_pages(), Duration::ZERO)
        .await
        .unwrap();

    let output = ctl(&api, &["backfill", "--include-query-configs"])
        .output()
        .await
        .unwrap();

    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.starts_with("25 records: exported 25, skipped 0, rejected 0, failed 0, keys written 50, deleted 0; 3 invocations"),
        "{stdout}"
    );
    let sent = api.payloads();
    assert_eq!(
        sent[0],
        json!({"mode": "backfill", "include_query_configs": true})
    );
    assert_eq!(sent[2]["continuation_token"], "p3");
    // The code the stream runs, which a rollback moves back.
    assert_eq!(api.qualifiers(), vec![Some("live".to_owned()); 3]);
    let progress = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        progress.lines().count(),
        3,
        "a plain line per invocation off a terminal: {progress}"
    );
    assert!(
        progress
            .lines()
            .nth(2)
            .unwrap()
            .starts_with("invocation 3: 25 records done, "),
        "{progress}"
    );
    assert!(
        !progress.contains("exported"),
        "the totals once, at the end: {progress}"
    );
}

#[tokio::test]
async fn ctrl_c_finishes_the_invocation_under_way_and_prints_the_token() {
    let api = InvokeApi::scripted(three_pages(), Duration::from_millis(1500))
        .await
        .unwrap();
    let child = ctl(&api, &["backfill"]).spawn().unwrap();
    let pid = child.id().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(700)).await;
    std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();

    let output = child.wait_with_output().await.unwrap();

    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(130), "{stdout}");
    assert!(
        stdout.starts_with("10 records: exported 10,"),
        "the first page finished: {stdout}"
    );
    assert!(
        stdout.contains("resume with --continuation-token p2"),
        "{stdout}"
    );
    assert_eq!(api.payloads().len(), 1, "no new invocation after Ctrl-C");
}

#[tokio::test]
async fn failures_and_function_errors_exit_non_zero() {
    let rejecting: Script = Arc::new(|_| {
        Ok(
            json!({"exported": 1, "skipped": 0, "rejected": 1, "failed": 0, "complete": true,
                  "continuation_token": null}),
        )
    });
    let api = InvokeApi::scripted(rejecting, Duration::ZERO)
        .await
        .unwrap();
    let output = ctl(&api, &["backfill"]).output().await.unwrap();
    assert_eq!(output.status.code(), Some(1));

    let failing: Script = Arc::new(|_| {
        Err(
            json!({"errorType": "InvalidPayload", "errorMessage": "invalid manual payload: `mode` ..."}),
        )
    });
    let api = InvokeApi::scripted(failing, Duration::ZERO).await.unwrap();
    let output = ctl(&api, &["reconcile", "--repair"])
        .output()
        .await
        .unwrap();
    assert_eq!(
        output.status.code(),
        Some(3),
        "a failed function is not a usage error"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("failed (InvalidPayload): invalid manual payload"),
        "{stderr}"
    );
}

#[tokio::test]
async fn verify_prints_a_table_and_exits_one_on_drift() {
    let drift: Script = Arc::new(|payload: Value| {
        assert_eq!(payload["mode"], "verify");
        Ok(
            json!({"system_account_id": "acct-1", "index_name": "p", "in_sync": false,
                  "keys": [{"namespace": "settings", "key": "acct-1-p", "status": "missing"}]}),
        )
    });
    let api = InvokeApi::scripted(drift, Duration::ZERO).await.unwrap();
    let output = ctl(&api, &["verify", "--account", "acct-1", "--index", "p"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("acct-1 / p: DRIFT"), "{stdout}");
    assert!(
        stdout.contains("settings       acct-1-p  missing"),
        "{stdout}"
    );
}

#[tokio::test]
async fn a_function_error_shows_its_type_however_the_invoke_api_answered_it() {
    let no_index: Script = Arc::new(|_| {
        Err(json!({"errorType": "NoSuchIndex",
                   "errorMessage": "no settings record for account acct-1, index nope"}))
    });
    for cargo_lambda in [false, true] {
        let api = InvokeApi::scripted(no_index.clone(), Duration::ZERO)
            .await
            .unwrap();
        if cargo_lambda {
            api.errors_as_cargo_lambda(); // HTTP 500, no X-Amz-Function-Error
        }
        let output = ctl(&api, &["verify", "--account", "acct-1", "--index", "nope"])
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(3), "{cargo_lambda}: {stderr}");
        assert!(
            stderr.contains("failed (NoSuchIndex): no settings record for account acct-1"),
            "{cargo_lambda}: {stderr}"
        );
        assert_eq!(api.payloads().len(), 1, "invoked once, never retried");
    }
}

#[tokio::test]
async fn local_needs_no_credentials_or_region_from_the_shell() {
    let api = InvokeApi::scripted(three_pages(), Duration::ZERO)
        .await
        .unwrap();
    let dir = std::env::temp_dir().join(format!("ctl-local-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(".local.env"), "AWS_REGION=eu-west-1\n").unwrap();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_ecom-settings-ctl"))
        .args(["--function-name", "ecom-settings-exporter", "--local"])
        .args(["--endpoint-url", &api.url(), "backfill"])
        .current_dir(&dir)
        .env_clear()
        .env("HOME", &dir)
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .output()
        .await
        .unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.starts_with("25 records"), "{stdout}");
}

/// A reconcile's answer finding two keys missing, repaired when asked.
fn drift_of_two() -> Script {
    Arc::new(|payload: Value| {
        assert_eq!(payload["mode"], "reconcile");
        let repaired = payload["repair"] == true;
        let mut answer = json!({"mode": "reconcile", "repair": repaired, "complete": true,
            "counts": {"settings": {"in_sync": 8, "missing": 2, "stale": 0, "orphaned": 0,
                                    "protected": 0, "foreign": 0}, "query_configs": {}},
            "samples": {"settings": {"missing": ["acct-1-a", "shop-a.myshopify.com"]},
                        "query_configs": {}},
            "continuation_token": null});
        if repaired {
            answer["repaired"] = json!({"written": 2, "deleted": 0});
        }
        Ok(answer)
    })
}

#[tokio::test]
async fn a_reconcile_that_finds_drift_names_the_keys_and_the_repair_and_exits_one() {
    let api = InvokeApi::scripted(drift_of_two(), Duration::ZERO)
        .await
        .unwrap();

    let found = ctl(&api, &["reconcile"]).output().await.unwrap();
    let stdout = String::from_utf8_lossy(&found.stdout);
    assert_eq!(found.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("  missing  acct-1-a\n"), "{stdout}");
    assert!(
        stdout.contains("  missing  shop-a.myshopify.com\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "repair them with: ecom-settings-ctl --function-name dev-EcomSettingsExporterLambda"
        ) && stdout.trim_end().ends_with("reconcile --repair"),
        "{stdout}"
    );

    let repaired = ctl(&api, &["reconcile", "--repair"])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&repaired.stdout);
    assert_eq!(repaired.status.code(), Some(0), "{stdout}");
    assert!(!stdout.contains("repair them with"), "{stdout}");
    assert!(
        stdout.contains("repaired (written 2, deleted 0):\n  missing  acct-1-a\n"),
        "{stdout}"
    );
}

#[tokio::test]
async fn nothing_listening_says_what_to_do_in_one_line_and_the_sdk_only_when_verbose() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let run = |verbose: bool| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_ecom-settings-ctl"));
        command
            .args(["--function-name", "f", "--local", "--endpoint-url", &url])
            .args(verbose.then_some("--verbose"))
            .args(["backfill"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    };

    let output = run(false).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!("nothing answers at {url}")),
        "{stderr}"
    );
    assert!(stderr.contains("make local"), "{stderr}");
    assert!(!stderr.contains("DispatchFailure"), "{stderr}");

    let verbose = run(true).output().await.unwrap();
    let stderr = String::from_utf8_lossy(&verbose.stderr);
    assert!(
        stderr.lines().count() > 1,
        "the SDK's account follows: {stderr}"
    );
}

/// `--help` of every command gives each flag a line of help and lists the exit codes; a usage
/// error exits 2, which no other outcome uses.
#[tokio::test]
async fn every_flag_has_help_and_the_exit_codes_are_listed_and_distinct() {
    let help = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_ecom-settings-ctl"))
            .args(args)
            .arg("--help")
            .env_remove("ECOM_EXPORTER_FUNCTION")
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let top = help(&[]);
    for code in ["  0 ", "  1 ", "  2 ", "  3 ", "  130 "] {
        assert!(top.contains(code), "exit code {code} in --help: {top}");
    }
    for command in [&[][..], &["backfill"], &["reconcile"], &["verify"]] {
        let text = help(command);
        let options = text.split("Options:").nth(1).expect("an Options section");
        let options = options.split("Exit codes:").next().unwrap();
        // A flag's help is on its line, or on the next one (clap's long help).
        let lines: Vec<&str> = options.lines().collect();
        for (at, line) in lines.iter().enumerate() {
            let flag = line.trim_start();
            if !flag.starts_with('-') {
                continue;
            }
            let same = flag.split_once("  ").map(|(_, d)| d.trim());
            let next = (lines.get(at + 1).map(|l| l.trim())).filter(|l| !l.starts_with('-'));
            let described = same.filter(|d| !d.is_empty()).or(next);
            assert!(
                described.is_some_and(|d| !d.is_empty()),
                "no help for `{line}` in {command:?}"
            );
        }
    }

    let usage = std::process::Command::new(env!("CARGO_BIN_EXE_ecom-settings-ctl"))
        .args(["--function-name", "f", "reconcile", "--no-such-flag"])
        .output()
        .unwrap();
    assert_eq!(usage.status.code(), Some(2));
}
