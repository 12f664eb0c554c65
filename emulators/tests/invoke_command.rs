//! `ecom-emulators invoke`: the Lambda Invoke API in front of a function binary started with an
//! env file, answering as Lambda does. The function here is a few lines of Python speaking the
//! runtime API, so the test needs no exporter build.

use std::io::Write as _;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};

/// Echoes `{"echo": payload, "GREETING": $GREETING}`; a payload with `"fail"` is a function error.
const FUNCTION: &str = r#"
import json, os, urllib.request
api = "http://" + os.environ["AWS_LAMBDA_RUNTIME_API"] + "/2018-06-01/runtime/invocation/"
while True:
    with urllib.request.urlopen(api + "next") as got:
        request_id = got.headers["Lambda-Runtime-Aws-Request-Id"]
        payload = json.loads(got.read())
    if "fail" in payload:
        url, body = api + request_id + "/error", {"errorType": "NoSuchIndex", "errorMessage": "nope"}
    else:
        url, body = api + request_id + "/response", {"echo": payload, "GREETING": os.environ.get("GREETING")}
    urllib.request.urlopen(urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")).read()
"#;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn invoke_serves_the_function_binary_as_lambda_would() {
    let dir = std::env::temp_dir().join(format!("invoke-command-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let function = dir.join("function");
    let mut script = std::fs::File::create(&function).unwrap();
    write!(script, "#!/usr/bin/env python3\n{FUNCTION}").unwrap();
    drop(script);
    std::process::Command::new("chmod")
        .arg("+x")
        .arg(&function)
        .status()
        .unwrap();
    let env_file = dir.join("local.env");
    std::fs::write(&env_file, "# a comment\nGREETING=hello\n").unwrap();
    let port = free_port();

    let mut invoke = tokio::process::Command::new(env!("CARGO_BIN_EXE_ecom-emulators"))
        .args(["invoke", "--port", &port.to_string()])
        .arg("--function")
        .arg(&function)
        .arg("--env-file")
        .arg(&env_file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/2015-03-31/functions/f/invocations");
    let client = reqwest::Client::new();
    let send = |payload: Value| client.post(&url).json(&payload).send();
    let mut answer = None;
    for _ in 0..100 {
        if let Ok(response) = send(json!({"hi": 1})).await {
            answer = Some(response);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let answer = answer.expect("the Invoke API listens");
    assert_eq!(answer.status().as_u16(), 200);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body, json!({"echo": {"hi": 1}, "GREETING": "hello"}));

    let failed = send(json!({"fail": true})).await.unwrap();
    assert_eq!(
        failed.status().as_u16(),
        200,
        "a function error is a 200, as Lambda answers"
    );
    assert_eq!(failed.headers()["x-amz-function-error"], "Unhandled");
    let error: Value = failed.json().await.unwrap();
    assert_eq!(error["errorType"], "NoSuchIndex");

    invoke.kill().await.ok();
    std::fs::remove_dir_all(&dir).ok();
}
