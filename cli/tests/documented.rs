//! Every `ecom-settings-ctl` command the README and `docs/operations.md` show is one the CLI
//! accepts: each runs, its optional `[--flags]` included, against a scripted function behind the
//! Lambda Invoke API, and must send the payload of the mode it names and end in 0 (nothing to
//! do) or 1 (drift found), never in a usage error.

use std::sync::Arc;
use std::time::Duration;

use ecom_emulators::invoke_api::{InvokeApi, Script};
use serde_json::{json, Value};

const MODES: [&str; 3] = ["backfill", "reconcile", "verify"];

const PAGES: [(&str, &str); 2] = [
    ("README.md", include_str!("../../README.md")),
    (
        "docs/operations.md",
        include_str!("../../docs/operations.md"),
    ),
];

/// Each documented command's arguments, after `ecom-settings-ctl`, with the page it is on.
fn documented() -> Vec<(&'static str, Vec<String>)> {
    let mut found = Vec::new();
    for (page, text) in PAGES {
        for line in text.lines() {
            for command in line.split("ecom-settings-ctl ").skip(1) {
                // Up to the end of the inline code, or a shell comment.
                let command = command.split(['`', '#']).next().unwrap_or_default().trim();
                let words: Vec<String> = (command.split_whitespace())
                    .map(|w| w.trim_matches(|c| c == '[' || c == ']').to_owned())
                    .collect();
                // `...` stands for arguments shown elsewhere; a flag named in prose, or a word
                // of prose, is not a command.
                let shown = words.first().is_some_and(|w| w.starts_with("--"))
                    && words.iter().any(|w| MODES.contains(&w.as_str()));
                if shown && !words.iter().any(|w| w.contains("...")) {
                    found.push((page, words));
                }
            }
        }
    }
    found
}

/// A complete answer to whatever mode is asked, with nothing to report.
fn answers() -> Script {
    Arc::new(|payload: Value| {
        Ok(match payload["mode"].as_str() {
            Some("verify") => json!({"system_account_id": payload["system_account_id"],
                "index_name": payload["index_name"], "in_sync": true, "keys": [],
                "complete": true}),
            mode => json!({"mode": mode, "exported": 0, "skipped": 0, "rejected": 0,
                "failed": 0, "keys_written": 0, "complete": true, "continuation_token": null,
                "counts": {"settings": {}, "query_configs": {}}}),
        })
    })
}

#[tokio::test]
async fn every_documented_command_is_accepted_and_sends_its_mode() {
    let commands = documented();
    assert!(commands.len() >= 5, "{commands:?}");
    for (page, words) in commands {
        let api = InvokeApi::scripted(answers(), Duration::ZERO)
            .await
            .unwrap();
        // The documented target is AWS (or --local's :9000): here, the scripted function.
        let mut args = Vec::new();
        let mut words = words.iter();
        while let Some(word) = words.next() {
            match word.as_str() {
                "--local" => {}
                "--profile" | "--endpoint-url" | "--region" => drop(words.next()),
                _ => args.push(word.clone()),
            }
        }
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_ecom-settings-ctl"))
            .args(["--region", "eu-west-1", "--endpoint-url", &api.url()])
            .args(&args)
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .output()
            .await
            .unwrap();
        let said = String::from_utf8_lossy(&output.stderr);
        let code = output.status.code();
        assert!(
            matches!(code, Some(0 | 1)),
            "{page}: {args:?} -> {code:?}: {said}"
        );
        let mode = MODES
            .into_iter()
            .find(|mode| args.iter().any(|a| a == mode));
        let sent = api.payloads();
        assert_eq!(sent[0]["mode"].as_str(), mode, "{page}: {args:?}");
        // The code the stream runs, unless the command says otherwise.
        if !args.iter().any(|a| a.starts_with("--qualifier")) {
            let qualifiers = api.qualifiers();
            assert!(
                qualifiers.iter().all(|q| q.as_deref() == Some("live")),
                "{page}: {args:?} invoked {qualifiers:?}"
            );
        }
    }
}
