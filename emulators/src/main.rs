//! `ecom-emulators kv|api-keys`: run one stand-in in the foreground until Ctrl-C.
//! `ecom-emulators invoke`: the Lambda Invoke API in front of the function binary.
//! `ecom-emulators demo`: the whole flow on this machine (what `make demo` runs).

use std::process::ExitCode;

const USAGE: &str = "\
usage:
  ecom-emulators kv [--port 8787] [--token TOKEN]... [--namespace ID]... (default: settings, qcfg)
      Cloudflare KV emulator; CLOUDFLARE_API_BASE_URL=http://127.0.0.1:PORT/client/v4
      Inject faults: curl -s localhost:PORT/__emulator/faults \\
        -d '{\"kind\":\"status\",\"status\":503,\"times\":2}'     (answers what it set)
      (kinds: status {status, retry_after, retry_after_date, retry_after_ms, retry_after_raw,
       location}, delay {millis}, unsuccessful_keys {count}, foreign_unsuccessful_keys {count},
       unsuccessful_keys_starting_with {prefix}, refuse_key {key}; `times`, default 1;
       latency {operation, millis}: every `keys`, `bulk`, ... request waits, until cleared)
  ecom-emulators api-keys [--port 8788] [--key ACCOUNT=KEY]... (ACCOUNT `*`: every other account)
      API keys service; API_KEYS_SERVICE_URL=http://127.0.0.1:PORT/cells/{cell}
  ecom-emulators invoke [--port 9000] [--function target/debug/ecom-settings-exporter]
                        [--env-file .local.env] [--timeout 120]
      The Lambda Invoke API on 127.0.0.1:PORT in front of the function binary (started with the
      env file's settings, its log on this terminal): the target of `ecom-settings-ctl --local`
      and of `aws lambda invoke --endpoint-url http://127.0.0.1:PORT`. Function errors are
      answered as Lambda does (200 with X-Amz-Function-Error).
  ecom-emulators demo [--batching-window 2] [--function target/debug/ecom-settings-exporter]
                      [--moto .venv/bin/moto_server] [--propagation SECONDS [--rate 5]]
      Table, stream, function and KV on this machine: writes a scenario, times each change
      until KV shows it, and exits 0 only when KV holds what the table implies. With
      --propagation: a new index every 1/rate s for that long instead, each timed from its table
      write to KV (p50, p99, largest).
  ecom-emulators bench [--function target/release/ecom-settings-exporter] [--sizes 100,1000,5000]
                       [--dynamo-latencies 0,5,10] [--python .venv/bin/python] [--runs 3]
                       [--cpu-share 0.289|none]
      What `make bench` runs (under moto): the release function as deployed (ledger on); INSERT,
      MODIFY, shop-move, override and REMOVE batches of each size run once against moto (its
      answers recorded), then measured in a twin answered from the recording after each
      DynamoDB latency, its CPU held to the share (default 512 MB's, 0.289 of a core) where the
      machine allows: CPU, wall, peak RSS, DynamoDB requests, units and round trips, KV
      operations, the cost of a million changes beside the seed's design, and the Python
      reference of the same work.";

async fn demo(args: &[String]) -> ExitCode {
    let mut options = ecom_emulators::demo::DemoOptions {
        function_binary: "target/debug/ecom-settings-exporter".into(),
        moto_endpoint: None,
        moto_server: ".venv/bin/moto_server".into(),
        table_name: "demo-EcomIndexSettingsTable".into(),
        batching_window: std::time::Duration::from_secs(2),
        function_log: "target/demo/function.log".into(),
    };
    let (mut propagation, mut rate) = (None, 5.0);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let Some(value) = it.next() else {
            eprintln!("{flag} needs a value\n{USAGE}");
            return ExitCode::from(2);
        };
        match flag.as_str() {
            "--function" => options.function_binary = value.into(),
            "--moto" => options.moto_server = value.into(),
            "--propagation" | "--rate" => match value.parse::<f64>() {
                Ok(v) if v > 0.0 && flag == "--rate" => rate = v,
                Ok(v) if v > 0.0 => propagation = Some(v),
                _ => {
                    eprintln!("{flag} takes a positive number\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            "--batching-window" => match value.parse::<f64>() {
                Ok(s) if s >= 0.0 => {
                    options.batching_window = std::time::Duration::from_secs_f64(s)
                }
                _ => {
                    eprintln!("--batching-window takes seconds\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            other => {
                eprintln!("unknown flag `{other}`\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    if let Some(seconds) = propagation {
        return measure_propagation(&options, seconds, rate).await;
    }
    // Ctrl-C or SIGTERM drops the scenario, and with it every process and server it started.
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(e) => {
                eprintln!("cannot watch for SIGTERM: {e}");
                return ExitCode::FAILURE;
            }
        };
    let report = tokio::select! {
        report = ecom_emulators::demo::run(options) => report,
        _ = terminate.recv() => {
            eprintln!("\nterminated; everything the demo started is stopped");
            return ExitCode::from(143);
        }
        _ = tokio::signal::ctrl_c() => {
            eprintln!("\ninterrupted; everything the demo started is stopped");
            return ExitCode::from(130);
        }
    };
    match report {
        Ok(report) if report.ok() => {
            println!("\nDemo passed: KV holds what the table implies.");
            ExitCode::SUCCESS
        }
        Ok(_) => {
            eprintln!("\nDemo FAILED: see the FAIL lines above and the function log.");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("demo could not run: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `demo --propagation SECONDS [--rate 5] [--batching-window 10]`: time to KV under a steady stream.
async fn measure_propagation(
    options: &ecom_emulators::demo::DemoOptions,
    seconds: f64,
    rate: f64,
) -> ExitCode {
    use ecom_emulators::demo::propagation::{quantile, run};
    let window = options.batching_window.as_secs_f64();
    println!("{rate} changes a second for {seconds} s, batching window {window} s:");
    match run(options, seconds, rate).await {
        Ok(times) => {
            let ms = |q| quantile(&times, q).as_secs_f64() * 1000.0;
            println!(
                "time to KV over {} changes: p50 {:.0} ms, p99 {:.0} ms, largest {:.0} ms",
                times.len(),
                ms(0.5),
                ms(0.99),
                ms(1.0)
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("propagation could not be measured: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse(
    args: &[String],
    default_port: u16,
    list_flag: &str,
) -> Result<(u16, Vec<String>), String> {
    let mut port = default_port;
    let mut values = Vec::new();
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--port" => port = value.parse().map_err(|_| format!("bad port `{value}`"))?,
            f if f == list_flag => values.push(value.clone()),
            other => return Err(format!("unknown flag `{other}`")),
        }
    }
    Ok((port, values))
}

/// `kv [--port 8787] [--token T]... [--namespace ID]...`: defaults `local-token`, and the
/// namespaces `.local.env` names (`settings`, `qcfg`).
fn parse_kv(args: &[String]) -> Result<(u16, Vec<String>, Vec<String>), String> {
    let mut port = 8787;
    let (mut tokens, mut namespaces) = (Vec::new(), Vec::new());
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--port" => port = value.parse().map_err(|_| format!("bad port `{value}`"))?,
            "--token" => tokens.push(value.clone()),
            "--namespace" => namespaces.push(value.clone()),
            other => return Err(format!("unknown flag `{other}`")),
        }
    }
    if tokens.is_empty() {
        tokens.push("local-token".into());
    }
    if namespaces.is_empty() {
        namespaces = vec!["settings".into(), "qcfg".into()];
    }
    Ok((port, tokens, namespaces))
}

/// `bench --function PATH [--python .venv/bin/python] [--sizes 100,1000,10000] [--runs 5]`
async fn bench(args: &[String]) -> ExitCode {
    let mut options = ecom_emulators::bench::BenchOptions {
        function_binary: "target/release/ecom-settings-exporter".into(),
        python: ".venv/bin/python".into(),
        reference: "bench/reference.py".into(),
        sizes: vec![100, 1_000, 5_000],
        kv_latency: std::time::Duration::from_millis(50),
        dynamo_latencies_ms: vec![0, 5, 10],
        runs: 3,
        cpu_share: Some(ecom_emulators::bench::SHARE_512_MB),
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let Some(value) = it.next() else {
            eprintln!("{flag} needs a value\n{USAGE}");
            return ExitCode::from(2);
        };
        match flag.as_str() {
            "--function" => options.function_binary = value.into(),
            "--python" => options.python = value.into(),
            "--cpu-share" => match value.as_str() {
                "none" => options.cpu_share = None,
                share => match share.parse::<f64>() {
                    Ok(share) if share > 0.0 && share <= 1.0 => options.cpu_share = Some(share),
                    _ => {
                        eprintln!(
                            "--cpu-share takes a share of a core in (0, 1], or none\n{USAGE}"
                        );
                        return ExitCode::from(2);
                    }
                },
            },
            "--runs" => match value.parse() {
                Ok(runs) => options.runs = runs,
                Err(_) => {
                    eprintln!("--runs takes a number\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            "--dynamo-latencies" => match value.split(',').map(str::parse).collect() {
                Ok(ms) => options.dynamo_latencies_ms = ms,
                Err(_) => {
                    eprintln!("--dynamo-latencies takes milliseconds like 0,5,10\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            "--sizes" => match value.split(',').map(str::parse).collect() {
                Ok(sizes) => options.sizes = sizes,
                Err(_) => {
                    eprintln!("--sizes takes numbers like 100,1000\n{USAGE}");
                    return ExitCode::from(2);
                }
            },
            other => {
                eprintln!("unknown flag `{other}`\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    match ecom_emulators::bench::run(options).await {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `invoke`: the function binary behind a runtime API, and the Invoke API in front of it.
async fn invoke(args: &[String]) -> ExitCode {
    let mut port = 9000;
    let mut function = "target/debug/ecom-settings-exporter".to_string();
    let mut env_file = ".local.env".to_string();
    let mut timeout = std::time::Duration::from_secs(120);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let Some(value) = it.next() else {
            eprintln!("{flag} needs a value\n{USAGE}");
            return ExitCode::from(2);
        };
        let parsed = match flag.as_str() {
            "--port" => value.parse().map(|p| port = p).is_ok(),
            "--function" => {
                function = value.clone();
                true
            }
            "--env-file" => {
                env_file = value.clone();
                true
            }
            "--timeout" => value
                .parse()
                .map(|s| timeout = std::time::Duration::from_secs(s))
                .is_ok(),
            _ => false,
        };
        if !parsed {
            eprintln!("bad flag or value: {flag} {value}\n{USAGE}");
            return ExitCode::from(2);
        }
    }
    let env = match std::fs::read_to_string(&env_file) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("cannot read {env_file} ({e}): run `make local` first, or give --env-file");
            return ExitCode::from(2);
        }
    };
    let runtime = match ecom_emulators::runtime_api::RuntimeApi::start(0).await {
        Ok(runtime) => std::sync::Arc::new(runtime),
        Err(e) => {
            eprintln!("cannot start the runtime API: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut command = tokio::process::Command::new(&function);
    command
        .env("AWS_LAMBDA_RUNTIME_API", runtime.endpoint())
        .env("AWS_LAMBDA_FUNCTION_NAME", "ecom-settings-exporter")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .kill_on_drop(true);
    for (name, value) in env.lines().filter_map(|l| l.trim().split_once('=')) {
        if !name.starts_with('#') {
            command.env(name.trim(), value.trim());
        }
    }
    let _function = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            eprintln!("cannot start {function} ({e}): build it with `cargo build`");
            return ExitCode::FAILURE;
        }
    };
    let api = ecom_emulators::invoke_api::InvokeApi::start_on(port, runtime, timeout).await;
    let _api = match api {
        Ok(api) => api,
        Err(e) => {
            eprintln!("cannot listen on 127.0.0.1:{port}: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "Lambda Invoke API on http://127.0.0.1:{port} in front of {function} ({env_file}); Ctrl-C stops both"
    );
    let _ = tokio::signal::ctrl_c().await;
    ExitCode::SUCCESS
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if matches!(
        args.first().map(String::as_str),
        Some("--help" | "-h" | "help")
    ) {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    // `ecom-emulators kv --help`: the usage, not "--help needs a value".
    if args.iter().skip(1).any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    if args.first().map(String::as_str) == Some("demo") {
        return demo(&args[1..]).await;
    }
    if args.first().map(String::as_str) == Some("bench") {
        return bench(&args[1..]).await;
    }
    if args.first().map(String::as_str) == Some("invoke") {
        return invoke(&args[1..]).await;
    }
    let router = match args.first().map(String::as_str) {
        Some("kv") => parse_kv(&args[1..]).map(|(port, tokens, namespaces)| {
            println!(
                "KV emulator on http://127.0.0.1:{port}/client/v4, tokens: {}, namespaces: {}",
                tokens.len(),
                namespaces.join(", ")
            );
            let state = ecom_emulators::kv::new_state(&tokens);
            state.lock().unwrap().create_namespaces(&namespaces);
            (port, ecom_emulators::kv::router(state))
        }),
        Some("api-keys") => parse(&args[1..], 8788, "--key").and_then(|(port, keys)| {
            // `--key *=KEY`: every account not named gets KEY (a fleet too large to list).
            let keys = keys
                .iter()
                .map(|k| {
                    k.split_once('=')
                        .map(|(a, k)| (a.to_string(), k.to_string()))
                })
                .collect::<Option<Vec<_>>>()
                .ok_or("--key takes ACCOUNT=KEY")?;
            println!(
                "API keys service on http://127.0.0.1:{port}/cells/{{cell}}, {} accounts",
                keys.len()
            );
            let default = keys.iter().find(|(a, _)| a == "*").map(|(_, k)| k.clone());
            let state = ecom_emulators::api_keys::new_state(&keys);
            ecom_emulators::api_keys::set_default_key(&state, default);
            Ok((port, ecom_emulators::api_keys::router(state)))
        }),
        _ => Err(USAGE.to_string()),
    };
    let (port, router) = match router {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let (_, _server) = match ecom_emulators::serve(port, router).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot listen on 127.0.0.1:{port}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let _ = tokio::signal::ctrl_c().await;
    ExitCode::SUCCESS
}
