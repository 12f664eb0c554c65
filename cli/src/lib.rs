//! The operator CLI's core: invoke the exporter through the Lambda Invoke API, follow
//! continuation tokens to the end, keep totals, show progress, stop cleanly on Ctrl-C.
//! `main.rs` is the argument parsing around it.

use std::fmt::Write as _;
use std::io::IsTerminal as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_lambda::config::Credentials;
use aws_sdk_lambda::primitives::Blob;
use serde_json::Value;

mod totals;

pub use totals::{Mode, Totals, DRIFTED_SHOWN};

/// Why a run could not go on.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// `reason` says in one line what is wrong and what to do; `detail` is the SDK's own account
    /// (printed with `--verbose`).
    #[error("cannot invoke {function}: {reason}")]
    Invoke {
        function: String,
        reason: String,
        detail: String,
    },
    #[error("{function} failed ({error_type}): {message}")]
    Function {
        function: String,
        error_type: String,
        message: String,
    },
    #[error("{function} answered something that is not JSON: {reason}")]
    Answer { function: String, reason: String },
}

/// Where to reach the function.
#[derive(Debug, Clone)]
pub struct Target {
    pub function_name: String,
    /// The alias or version invoked: `live` (the code the stream and the schedule run) unless
    /// told otherwise; empty: the function unqualified (`$LATEST`).
    pub qualifier: String,
    pub region: Option<String>,
    pub profile: Option<String>,
    /// `http://localhost:9000` for `cargo lambda watch`, or a stand-in.
    pub endpoint_url: Option<String>,
    /// How long one invocation may take to answer: more than the function's timeout, or the
    /// client gives up (and the AWS CLI's retry re-invokes a long backfill).
    pub read_timeout: Duration,
    /// The local stack (`make local`): fake credentials, the region of `.local.env` (or
    /// eu-west-1), and `http://127.0.0.1:9000` unless `endpoint_url` says otherwise.
    pub local: bool,
}

impl Default for Target {
    fn default() -> Self {
        Self {
            function_name: String::new(),
            qualifier: LIVE.into(),
            region: None,
            profile: None,
            endpoint_url: None,
            read_timeout: Duration::from_secs(READ_TIMEOUT_SECONDS),
            local: false,
        }
    }
}

/// What a target invokes unless told otherwise: the code the stream and the schedule run.
pub const LIVE: &str = "live";

/// How long one invocation may take to answer unless told otherwise (the function's 120 s, and
/// more: an invocation is never sent twice).
pub const READ_TIMEOUT_SECONDS: u64 = 960;

/// Where `cargo lambda watch` and `ecom-emulators invoke` listen by default.
pub const LOCAL_ENDPOINT: &str = "http://127.0.0.1:9000";

/// `AWS_REGION` from `.local.env` in the working directory, if it has one.
fn local_region() -> Option<String> {
    let env = std::fs::read_to_string(".local.env").ok()?;
    env.lines()
        .find_map(|line| line.trim().strip_prefix("AWS_REGION="))
        .map(|region| region.trim().to_owned())
        .filter(|region| !region.is_empty())
}

/// The exporter, reached through the Lambda Invoke API.
pub struct Exporter {
    client: aws_sdk_lambda::Client,
    function_name: String,
    qualifier: Option<String>,
    /// The Invoke API called instead of AWS's, if any.
    endpoint: Option<String>,
}

impl Exporter {
    pub async fn connect(target: &Target) -> Self {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        let mut region = target.region.clone();
        if target.local {
            // The local Invoke API checks no signature; the SDK still wants something to sign.
            let credentials = Credentials::new("testing", "testing", None, None, "local stack");
            loader = loader.credentials_provider(credentials);
            region = region.or_else(local_region).or(Some("eu-west-1".into()));
        }
        if let Some(region) = region {
            loader = loader.region(aws_config::Region::new(region));
        }
        if let Some(profile) = &target.profile {
            loader = loader.profile_name(profile);
        }
        let timeouts = aws_config::timeout::TimeoutConfig::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(target.read_timeout)
            .operation_attempt_timeout(target.read_timeout)
            .operation_timeout(target.read_timeout)
            .build();
        let sdk = loader.timeout_config(timeouts).load().await;
        // An invocation is never sent twice: a retry would run a page or a repair again.
        let mut config = aws_sdk_lambda::config::Builder::from(&sdk)
            .retry_config(aws_config::retry::RetryConfig::disabled());
        let endpoint = match (&target.endpoint_url, target.local) {
            (Some(url), _) => Some(url.as_str()),
            (None, true) => Some(LOCAL_ENDPOINT),
            (None, false) => None,
        };
        if let Some(url) = endpoint {
            config = config.endpoint_url(url);
        }
        Self {
            client: aws_sdk_lambda::Client::from_conf(config.build()),
            function_name: target.function_name.clone(),
            qualifier: Some(target.qualifier.clone()).filter(|q| !q.is_empty()),
            endpoint: endpoint.map(str::to_owned),
        }
    }

    /// One synchronous invocation; a function error is an error naming its type.
    pub async fn invoke(&self, payload: &Value) -> Result<Value, CtlError> {
        let answer = self
            .client
            .invoke()
            .function_name(&self.function_name)
            .set_qualifier(self.qualifier.clone())
            .payload(Blob::new(payload.to_string()))
            .send()
            .await
            .map_err(|e| {
                // `cargo lambda watch` answers a function error as a bare HTTP 500 whose body is
                // the error document: it is still the function's error, with its type.
                let document = e.raw_response().and_then(|r| r.body().bytes());
                match document.and_then(|body| self.function_error(body)) {
                    Some(error) => error,
                    None => {
                        let detail = aws_sdk_lambda::error::DisplayErrorContext(&e).to_string();
                        CtlError::Invoke {
                            function: self.function_name.clone(),
                            reason: self.what_to_do(&e, &detail),
                            detail,
                        }
                    }
                }
            })?;
        let body = answer.payload.map(Blob::into_inner).unwrap_or_default();
        let value: Value = serde_json::from_slice(&body).map_err(|e| CtlError::Answer {
            function: self.function_name.clone(),
            reason: e.to_string(),
        })?;
        if answer.function_error.is_some() {
            return Err(self.function_error(&body).unwrap_or(CtlError::Function {
                function: self.function_name.clone(),
                error_type: "?".into(),
                message: "?".into(),
            }));
        }
        Ok(value)
    }

    /// What went wrong in one line, and what to do about it.
    fn what_to_do<E, R>(
        &self,
        error: &aws_sdk_lambda::error::SdkError<E, R>,
        detail: &str,
    ) -> String {
        let endpoint = self.endpoint.as_deref().unwrap_or("AWS Lambda");
        match error {
            _ if detail.contains("credential") => "no AWS credentials were found: set a profile \
                (--profile or AWS_PROFILE) or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or use \
                --local for the local stack"
                .into(),
            aws_sdk_lambda::error::SdkError::DispatchFailure(_) => format!(
                "nothing answers at {endpoint}: start the local stack (`make local`, then \
                 `cargo lambda watch` or `ecom-emulators invoke`), or check --endpoint-url, \
                 --region and the network (--verbose shows the SDK's error)"
            ),
            aws_sdk_lambda::error::SdkError::TimeoutError(_) => format!(
                "{endpoint} did not answer within --read-timeout (--verbose shows the SDK's error)"
            ),
            _ => format!("{} (--verbose shows the SDK's error)", first_line(detail)),
        }
    }

    /// A function's error document (`{"errorType", "errorMessage"}`), if `body` is one.
    fn function_error(&self, body: &[u8]) -> Option<CtlError> {
        let value: Value = serde_json::from_slice(body).ok()?;
        let text = |name: &str| value[name].as_str().map(str::to_owned);
        Some(CtlError::Function {
            function: self.function_name.clone(),
            error_type: text("errorType")?,
            message: text("errorMessage").unwrap_or_default(),
        })
    }
}

/// Shows progress: a live line on a terminal, a plain line per invocation otherwise.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    started: Instant,
}

impl Progress {
    /// On a terminal, indicatif's spinner with its own count, rate and elapsed time (ticking
    /// while an invocation runs); elsewhere one line per invocation.
    pub fn new(show_bar: bool) -> Self {
        let bar = (show_bar && std::io::stderr().is_terminal()).then(|| {
            let style = indicatif::ProgressStyle::with_template(
                "{spinner} {human_pos} {msg} done ({per_sec}), {elapsed} elapsed, invocation under way",
            )
            .expect("a valid template");
            let bar = indicatif::ProgressBar::new_spinner().with_style(style);
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Self {
            bar,
            started: Instant::now(),
        }
    }

    fn update(&self, mode: Mode, totals: &Totals) {
        match &self.bar {
            Some(bar) => {
                bar.set_message(mode.unit());
                bar.set_position(totals.done());
            }
            // Off a terminal: progress only; the totals are printed once, at the end.
            None => {
                let elapsed = self.started.elapsed().as_secs_f64();
                let rate = totals.done() as f64 / elapsed.max(0.001);
                eprintln!(
                    "invocation {}: {} {} done, {rate:.0}/s, {elapsed:.1} s elapsed",
                    totals.invocations,
                    totals.done(),
                    mode.unit()
                );
            }
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Invokes `payload` again and again, each time with the last answer's token, until the run
/// is complete or `interrupted` is set (the invocation under way finishes first).
pub async fn follow(
    exporter: &Exporter,
    mode: Mode,
    mut payload: Value,
    interrupted: &AtomicBool,
    progress: &Progress,
) -> Result<Totals, CtlError> {
    let mut totals = Totals::default();
    loop {
        let answer = exporter.invoke(&payload).await?;
        totals.invocations += 1;
        totals.add(mode, &answer);
        progress.update(mode, &totals);
        totals.complete = answer["complete"] == Value::Bool(true);
        totals.continuation_token = answer["continuation_token"].as_str().map(str::to_owned);
        // A backfill stops at a failing page; going on would only fail it again.
        let stuck = mode == Mode::Backfill && answer["failed"].as_u64().unwrap_or(0) > 0;
        if totals.complete || totals.continuation_token.is_none() || stuck {
            break;
        }
        if interrupted.load(Ordering::SeqCst) {
            totals.interrupted = true;
            break;
        }
        payload["continuation_token"] = Value::String(totals.continuation_token.clone().unwrap());
    }
    progress.finish();
    Ok(totals)
}

/// A verify answer as a table an operator reads.
pub fn verify_table(answer: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} / {}: {}",
        answer["system_account_id"].as_str().unwrap_or("?"),
        answer["index_name"].as_str().unwrap_or("?"),
        if answer["in_sync"] == Value::Bool(true) {
            "in sync"
        } else {
            "DRIFT"
        }
    );
    let keys = answer["keys"].as_array().cloned().unwrap_or_default();
    let width = keys
        .iter()
        .map(|k| k["key"].as_str().unwrap_or("").len())
        .max()
        .unwrap_or(3)
        .max(3);
    let _ = writeln!(
        out,
        "{:<13}  {:<width$}  {:<10}  fields",
        "namespace", "key", "status"
    );
    for key in keys {
        let fields = key["fields"]
            .as_array()
            .map(|f| {
                f.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<13}  {:<width$}  {:<10}  {fields}",
            key["namespace"].as_str().unwrap_or(""),
            key["key"].as_str().unwrap_or(""),
            key["status"].as_str().unwrap_or(""),
        );
    }
    for (label, field) in [("repaired", "repaired"), ("would repair", "would_repair")] {
        if let Some(changes) = answer.get(field) {
            let _ = writeln!(
                out,
                "{label}: written {}, deleted {}",
                changes["written"].as_array().map_or(0, Vec::len),
                changes["deleted"].as_array().map_or(0, Vec::len)
            );
        }
    }
    out
}

/// The SDK's message up to its first parenthesis or line end: its own words, not its `Debug`.
fn first_line(detail: &str) -> &str {
    let end = detail.find(['(', '\n']).unwrap_or(detail.len());
    detail[..end].trim_end_matches([' ', ':'])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_verify_answer_reads_as_a_table() {
        let table = verify_table(&json!({
            "system_account_id": "acct-1", "index_name": "p", "in_sync": false,
            "keys": [{"namespace": "settings", "key": "shop-1", "status": "stale",
                      "fields": ["index_url"]}],
            "repaired": {"written": ["shop-1"], "deleted": []}
        }));
        assert!(table.starts_with("acct-1 / p: DRIFT\n"), "{table}");
        assert!(
            table.contains("settings       shop-1  stale       index_url"),
            "{table}"
        );
        assert!(
            table.ends_with("repaired: written 1, deleted 0\n"),
            "{table}"
        );
    }
}
