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
#[derive(Debug, Clone, Default)]
pub struct Target {
    pub function_name: String,
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
            endpoint: endpoint.map(str::to_owned),
        }
    }

    /// One synchronous invocation; a function error is an error naming its type.
    pub async fn invoke(&self, payload: &Value) -> Result<Value, CtlError> {
        let answer = self
            .client
            .invoke()
            .function_name(&self.function_name)
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

/// Which long run to follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Backfill,
    Reconcile,
}

impl Mode {
    /// What one answer adds to the totals, by name.
    fn counters(self) -> &'static [&'static str] {
        match self {
            Mode::Backfill => &["exported", "skipped", "rejected", "failed"],
            Mode::Reconcile => &[
                "in_sync",
                "missing",
                "stale",
                "orphaned",
                "protected",
                "foreign",
            ],
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Mode::Backfill => "records",
            Mode::Reconcile => "keys",
        }
    }
}

/// What a run did, over all its invocations.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Totals {
    pub counts: Vec<(&'static str, u64)>,
    pub invocations: usize,
    pub written: u64,
    pub deleted: u64,
    /// A dry run: `written` and `deleted` are what it would have done.
    pub dry_run: bool,
    pub complete: bool,
    /// Where to resume, when the run stopped before the end.
    pub continuation_token: Option<String>,
    pub interrupted: bool,
    /// Keys a reconcile found missing, stale or orphaned (the answers' samples, at most
    /// [`DRIFTED_SHOWN`]), each with its class.
    pub drifted: Vec<(String, &'static str)>,
    /// The drift was repaired (`--repair`, not a dry run).
    pub repaired: bool,
}

/// Drifted keys a reconcile prints at most.
pub const DRIFTED_SHOWN: usize = 20;

impl Totals {
    pub fn get(&self, name: &str) -> u64 {
        self.counts
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |(_, v)| *v)
    }

    fn done(&self) -> u64 {
        self.counts.iter().map(|(_, v)| v).sum()
    }

    /// Records failed or rejected: the run did not export everything.
    pub fn has_problems(&self) -> bool {
        self.get("failed") > 0 || self.get("rejected") > 0
    }

    /// Keys a reconcile found missing, stale or orphaned.
    pub fn drift(&self) -> u64 {
        self.get("missing") + self.get("stale") + self.get("orphaned")
    }

    /// Drift found and not repaired: what the exit code of every mode reports.
    pub fn drift_left(&self) -> bool {
        self.drift() > 0 && !self.repaired
    }

    /// The drifted keys found (up to [`DRIFTED_SHOWN`]) and, when left, how to repair them.
    pub fn drift_report(&self, repair_command: &str) -> String {
        let mut out = String::new();
        for (key, class) in &self.drifted {
            let _ = writeln!(out, "  {class:<8} {key}");
        }
        if self.drift() > self.drifted.len() as u64 {
            let more = self.drift() - self.drifted.len() as u64;
            let _ = writeln!(out, "  ... and {more} more");
        }
        if self.drift_left() {
            let _ = writeln!(out, "repair them with: {repair_command}");
        }
        out
    }

    fn add_drifted(&mut self, answer: &Value) {
        for class in ["missing", "stale", "orphaned"] {
            for ns in ["settings", "query_configs"] {
                let keys = answer["samples"][ns][class]
                    .as_array()
                    .into_iter()
                    .flatten();
                for key in keys.filter_map(Value::as_str) {
                    if self.drifted.len() < DRIFTED_SHOWN {
                        self.drifted.push((key.to_owned(), class));
                    }
                }
            }
        }
    }

    fn add(&mut self, mode: Mode, answer: &Value) {
        for name in mode.counters() {
            let n = match mode {
                // A dry run's answer says what it would export.
                Mode::Backfill if *name == "exported" => ["exported", "would_export"]
                    .iter()
                    .map(|f| answer[f].as_u64().unwrap_or(0))
                    .sum(),
                Mode::Backfill => answer[name].as_u64().unwrap_or(0),
                Mode::Reconcile => ["settings", "query_configs"]
                    .iter()
                    .map(|ns| answer["counts"][ns][name].as_u64().unwrap_or(0))
                    .sum(),
            };
            match self.counts.iter_mut().find(|(c, _)| c == name) {
                Some((_, total)) => *total += n,
                None => self.counts.push((name, n)),
            }
        }
        let changed = |field: &str| {
            ["repaired", "would_repair"]
                .iter()
                .map(|r| answer[r][field].as_u64().unwrap_or(0))
                .sum::<u64>()
        };
        self.written += answer["keys_written"].as_u64().unwrap_or(0)
            + answer["keys_to_write"].as_u64().unwrap_or(0)
            + changed("written");
        self.deleted += changed("deleted");
        self.dry_run |= answer["dry_run"] == Value::Bool(true) || !answer["would_repair"].is_null();
        if mode == Mode::Reconcile {
            self.add_drifted(answer);
            self.repaired |= !answer["repaired"].is_null();
        }
    }

    /// One line: the counts by name, then the writes.
    pub fn summary(&self, mode: Mode) -> String {
        let mut line = format!("{} {}:", self.done(), mode.unit());
        for (name, n) in &self.counts {
            let name = match (*name, self.dry_run) {
                ("exported", true) => "would export",
                (name, _) => name,
            };
            let _ = write!(line, " {name} {n},");
        }
        let (written, deleted) = match self.dry_run {
            true => ("keys to write", "to delete"),
            false => ("keys written", "deleted"),
        };
        let _ = write!(
            line,
            " {written} {}, {deleted} {}; {} invocations",
            self.written, self.deleted, self.invocations
        );
        line
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
    fn totals_add_up_backfill_and_reconcile_answers() {
        let mut backfill = Totals::default();
        for answer in [
            json!({"exported": 3, "skipped": 1, "rejected": 0, "failed": 0, "keys_written": 6}),
            json!({"exported": 2, "skipped": 0, "rejected": 1, "failed": 0, "keys_written": 4}),
        ] {
            backfill.add(Mode::Backfill, &answer);
        }
        assert_eq!(backfill.get("exported"), 5);
        assert_eq!(backfill.written, 10);
        assert!(backfill.has_problems());

        let mut reconcile = Totals::default();
        reconcile.add(
            Mode::Reconcile,
            &json!({"counts": {"settings": {"in_sync": 2, "missing": 1},
                               "query_configs": {"in_sync": 1}},
                    "repaired": {"written": 1, "deleted": 0}}),
        );
        assert_eq!(reconcile.get("in_sync"), 3);
        assert_eq!(reconcile.written, 1);
        assert!(!reconcile.has_problems());
        assert!(reconcile
            .summary(Mode::Reconcile)
            .contains("keys written 1, deleted 0"));
    }

    #[test]
    fn dry_runs_say_what_they_would_do() {
        let mut backfill = Totals::default();
        backfill.add(
            Mode::Backfill,
            &json!({"dry_run": true, "would_export": 1, "keys_to_write": 2}),
        );
        let line = backfill.summary(Mode::Backfill);
        assert!(line.contains("would export 1,"), "{line}");
        assert!(line.contains("keys to write 2, to delete 0"), "{line}");
        let mut reconcile = Totals::default();
        reconcile.add(
            Mode::Reconcile,
            &json!({"counts": {}, "would_repair": {"written": 0, "deleted": 1}}),
        );
        let line = reconcile.summary(Mode::Reconcile);
        assert!(
            line.contains("to delete 1") && !line.contains("deleted"),
            "{line}"
        );
    }

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
