//! `ecom-emulators kv|api-keys`: run one stand-in in the foreground until Ctrl-C.

use std::process::ExitCode;

const USAGE: &str = "\
usage:
  ecom-emulators kv [--port 8787] [--token TOKEN]...
      Cloudflare KV emulator; CLOUDFLARE_API_BASE_URL=http://127.0.0.1:PORT/client/v4
      Inject faults: curl -X POST localhost:PORT/__emulator/faults \\
        -d '{\"kind\":\"status\",\"status\":503,\"times\":2}'
      (kinds: status {status, retry_after}, delay {millis}, unsuccessful_keys {count})
  ecom-emulators api-keys [--port 8788] [--key ACCOUNT=KEY]...
      API keys service; API_KEYS_SERVICE_URL=http://127.0.0.1:PORT/cells/{cell}";

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
    let router = match args.first().map(String::as_str) {
        Some("kv") => parse(&args[1..], 8787, "--token").map(|(port, tokens)| {
            let tokens = if tokens.is_empty() {
                vec!["local-token".to_string()]
            } else {
                tokens
            };
            println!(
                "KV emulator on http://127.0.0.1:{port}/client/v4, tokens: {}",
                tokens.len()
            );
            (
                port,
                ecom_emulators::kv::router(ecom_emulators::kv::new_state(&tokens)),
            )
        }),
        Some("api-keys") => parse(&args[1..], 8788, "--key").and_then(|(port, keys)| {
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
            Ok((
                port,
                ecom_emulators::api_keys::router(ecom_emulators::api_keys::new_state(&keys)),
            ))
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
