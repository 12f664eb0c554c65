//! `ecom-settings-ctl`: runs the exporter's backfill and reconcile to completion, and verifies
//! one index, through the Lambda Invoke API (docs/operations.md, "The operator CLI").

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ecom_settings_ctl::{follow, verify_table, CtlError, Exporter, Mode, Progress, Target};
use serde_json::{json, Value};

/// Exit codes, one meaning each (listed in `--help`).
const DRIFT_OR_PROBLEMS: u8 = 1;
const FUNCTION_FAILED: u8 = 3;
const INTERRUPTED: u8 = 130;

const EXIT_CODES: &str = "Exit codes:
  0    done: every record exported, no drift left
  1    done with findings: records rejected or failed, drift found and not repaired, or the
       run stopped before the end
  2    usage error (a flag missing or not understood)
  3    the function could not be invoked, or answered an error
  130  interrupted (Ctrl-C): the invocation under way finished; resume with the token printed";

#[derive(Parser)]
#[command(
    version,
    about = "Operate ecom-settings-exporter: backfill, reconcile, verify",
    after_help = EXIT_CODES
)]
struct Cli {
    /// The function, e.g. dev-EcomSettingsExporterLambda.
    #[arg(long, env = "ECOM_EXPORTER_FUNCTION")]
    function_name: String,
    /// The alias or version to invoke: `live`, the code the stream and the schedule run (a
    /// rollback moves it back); `""` for the function unqualified ($LATEST).
    #[arg(long, env = "ECOM_EXPORTER_QUALIFIER", default_value = ecom_settings_ctl::LIVE)]
    qualifier: String,
    /// The function's region (else AWS_REGION, the profile's, or the SDK's default chain).
    #[arg(long)]
    region: Option<String>,
    /// The AWS profile whose credentials invoke the function (else the SDK's default chain).
    #[arg(long)]
    profile: Option<String>,
    /// The Invoke API to call instead of AWS's (with --local: http://127.0.0.1:9000).
    #[arg(long)]
    endpoint_url: Option<String>,
    /// The local stack (`make local`, then `cargo lambda watch` or `ecom-emulators invoke`):
    /// fake credentials, the region of ./.local.env, http://127.0.0.1:9000.
    #[arg(long)]
    local: bool,
    /// Seconds one invocation may take to answer; keep it above the function's timeout (120).
    #[arg(long, default_value_t = ecom_settings_ctl::READ_TIMEOUT_SECONDS)]
    read_timeout: u64,
    /// On an error invoking the function, also print the AWS SDK's own account of it.
    #[arg(long)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Export the whole table (or one account) to KV, following continuation tokens.
    Backfill(Backfill),
    /// Classify every KV key against the table, and repair drift with --repair.
    Reconcile(Reconcile),
    /// Compare one index's keys with the table; --repair fixes them.
    Verify(Verify),
}

#[derive(Args)]
struct Common {
    /// Only this system account.
    #[arg(long)]
    account: Option<String>,
    /// Look everything up, write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Resume where an earlier run stopped.
    #[arg(long)]
    continuation_token: Option<String>,
}

#[derive(Args)]
struct Backfill {
    #[command(flatten)]
    common: Common,
    /// Export each index's query overrides too (and rebuild its query filter).
    #[arg(long)]
    include_query_configs: bool,
    /// Table items per page (1 to 1000).
    #[arg(long)]
    page_size: Option<u32>,
}

#[derive(Args)]
struct Reconcile {
    #[command(flatten)]
    common: Common,
    /// Write what is missing or stale and delete what is orphaned (checked against the table).
    #[arg(long)]
    repair: bool,
    /// Accepted, changes nothing: every pass reads each value the table implies (a hand edit
    /// that kept its metadata is found without it).
    #[arg(long)]
    deep: bool,
}

#[derive(Args)]
struct Verify {
    /// The index's system account (its item's `pk`).
    #[arg(long)]
    account: String,
    /// The index's name (its item's `sk` is `INDEX#{name}`).
    #[arg(long)]
    index: String,
    /// Compare its query overrides and query filter too.
    #[arg(long)]
    include_query_configs: bool,
    /// Write the keys that differ from the table (checked against it once written).
    #[arg(long)]
    repair: bool,
    /// With --repair: say what would be written, write nothing.
    #[arg(long)]
    dry_run: bool,
}

/// The payload fields that are set.
fn payload(fields: &[(&str, Value)]) -> Value {
    Value::Object(
        fields
            .iter()
            .filter(|(_, v)| !v.is_null() && *v != Value::Bool(false))
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
    )
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let verbose = cli.verbose;
    let exporter = Exporter::connect(&Target {
        function_name: cli.function_name.clone(),
        qualifier: cli.qualifier,
        region: cli.region,
        profile: cli.profile,
        endpoint_url: cli.endpoint_url,
        read_timeout: Duration::from_secs(cli.read_timeout),
        local: cli.local,
    })
    .await;
    let (mode, request) = match cli.command {
        Command::Verify(v) => return verify(&exporter, &v, verbose).await,
        Command::Backfill(b) => (
            Mode::Backfill,
            payload(&[
                ("mode", json!("backfill")),
                ("system_account_id", json!(b.common.account)),
                ("include_query_configs", json!(b.include_query_configs)),
                ("page_size", json!(b.page_size)),
                ("dry_run", json!(b.common.dry_run)),
                ("continuation_token", json!(b.common.continuation_token)),
            ]),
        ),
        Command::Reconcile(r) => (
            Mode::Reconcile,
            payload(&[
                ("mode", json!("reconcile")),
                ("system_account_id", json!(r.common.account)),
                ("repair", json!(r.repair)),
                ("deep", json!(r.deep)),
                ("dry_run", json!(r.common.dry_run)),
                ("continuation_token", json!(r.common.continuation_token)),
            ]),
        ),
    };
    let interrupted = stop_on_ctrl_c();
    let progress = Progress::new(true);
    match follow(&exporter, mode, request, &interrupted, &progress).await {
        Ok(totals) => {
            println!("{}", totals.summary(mode));
            let args: Vec<String> = std::env::args().skip(1).collect();
            print!("{}", totals.drift_report(&repair_command(&args)));
            if let Some(token) = totals
                .continuation_token
                .as_deref()
                .filter(|_| !totals.complete)
            {
                println!("not complete; resume with --continuation-token {token}");
            }
            if totals.interrupted {
                ExitCode::from(INTERRUPTED)
            } else if totals.has_problems() || totals.drift_left() || !totals.complete {
                ExitCode::from(DRIFT_OR_PROBLEMS)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            report(&e, verbose);
            ExitCode::from(FUNCTION_FAILED)
        }
    }
}

/// The error in one line; with `--verbose`, the SDK's own account of it too.
fn report(error: &CtlError, verbose: bool) {
    eprintln!("{error}");
    if let (CtlError::Invoke { detail, .. }, true) = (error, verbose) {
        eprintln!("{detail}");
    }
}

/// This command (its arguments `args`) again, runnable as printed: with `--repair`, without
/// `--dry-run`, and from the start (a `--continuation-token` would repair only what is after it).
fn repair_command(args: &[String]) -> String {
    let mut command = vec!["ecom-settings-ctl".to_owned()];
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--dry-run" | "--repair" => {}
            "--continuation-token" => {
                args.next();
            }
            _ if arg.starts_with("--continuation-token=") => {}
            _ => command.push(arg.clone()),
        }
    }
    command.push("--repair".into());
    command.join(" ")
}

/// Verifies one index, printing each answer's table. An index with many query configs is
/// verified in pieces: each answer's token asks for the next. Drift left behind is a finding:
/// the exit code says so.
async fn verify(exporter: &Exporter, v: &Verify, verbose: bool) -> ExitCode {
    let mut request = payload(&[
        ("mode", json!("verify")),
        ("system_account_id", json!(v.account)),
        ("index_name", json!(v.index)),
        ("include_query_configs", json!(v.include_query_configs)),
        ("repair", json!(v.repair)),
        ("dry_run", json!(v.dry_run)),
    ]);
    let mut in_sync = true;
    loop {
        let answer = match exporter.invoke(&request).await {
            Ok(answer) => answer,
            Err(e) => {
                report(&e, verbose);
                return ExitCode::from(FUNCTION_FAILED);
            }
        };
        print!("{}", verify_table(&answer));
        in_sync &= answer["in_sync"] == json!(true);
        match answer["continuation_token"].as_str() {
            Some(token) => request["continuation_token"] = json!(token),
            None => break,
        }
    }
    match in_sync || (v.repair && !v.dry_run) {
        true => ExitCode::SUCCESS,
        false => ExitCode::from(DRIFT_OR_PROBLEMS),
    }
}

/// Ctrl-C lets the invocation under way finish, then stops with the token to resume with; a
/// second one aborts.
fn stop_on_ctrl_c() -> Arc<AtomicBool> {
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("\ninterrupted: finishing the invocation under way (Ctrl-C again to abort)");
            flag.store(true, Ordering::SeqCst);
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(INTERRUPTED.into());
            }
        }
    });
    interrupted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_repair_command_starts_from_the_beginning_and_writes() {
        let args = |line: &str| line.split(' ').map(str::to_owned).collect::<Vec<_>>();
        let cases = [
            (
                "--function-name f reconcile --dry-run",
                "ecom-settings-ctl --function-name f reconcile --repair",
            ),
            (
                "--function-name f reconcile --account a --continuation-token tok --deep",
                "ecom-settings-ctl --function-name f reconcile --account a --deep --repair",
            ),
            (
                "--function-name f reconcile --continuation-token=tok",
                "ecom-settings-ctl --function-name f reconcile --repair",
            ),
        ];
        for (line, expected) in cases {
            assert_eq!(repair_command(&args(line)), expected, "{line}");
        }
    }
}
