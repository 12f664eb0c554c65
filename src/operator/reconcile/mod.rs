//! `{"mode": "reconcile", ...}`: proves KV matches what the table implies, across the whole
//! fleet (or one account), and with `repair` makes it so (docs/contract.md, "Reconcile").
//!
//! Here: the request, the answer and its log line. [`segments`] takes the pass in pieces (KV
//! listed against the table, then the table, or the account's partition, read against KV);
//! every key lands in exactly one class ([`crate::operator::classify`]), and a run that stops before the
//! deadline hands out a token: the range it covered is never covered again. [`scheduled`]
//! keeps the schedule's passes.

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

pub mod scheduled;
mod segments;

use super::classify::Class;
pub use super::classify::ClassCounts;

use super::{flag, NonEmpty, OperatorError};
use crate::domain::{KvKey, Namespace};
use crate::pipeline::exporter::Exporter;
use crate::ports::Ports;

/// Sample keys per class in the answer.
const SAMPLES: usize = 100;
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconcileRequest {
    /// Only this account's keys, when given.
    #[serde(default)]
    pub system_account_id: Option<NonEmpty>,
    /// Write missing and stale keys, delete orphaned ones.
    #[serde(default, deserialize_with = "flag")]
    pub repair: bool,
    /// Classify (and with `repair`, say what would be repaired), write nothing.
    #[serde(default, deserialize_with = "flag")]
    pub dry_run: bool,
    /// Accepted and answered back; changes nothing: every pass reads each value the table
    /// implies, so a hand edit that kept the metadata is found without it.
    #[serde(default, deserialize_with = "flag")]
    pub deep: bool,
    #[serde(default)]
    pub continuation_token: Option<NonEmpty>,
    /// Stop after the list page that reaches this many keys, with a token (to split a run).
    #[serde(default, deserialize_with = "crate::operator::fields::max_records")]
    pub max_keys: Option<usize>,
    /// Keys per list request (10 to 1,000, Cloudflare's range; default 1,000).
    #[serde(default = "default_list_page", deserialize_with = "list_page_size")]
    pub page_size: u32,
    /// The schedule's run: full passes kept in the ledger table ([`scheduled`]).
    #[serde(default, deserialize_with = "flag")]
    pub scheduled: bool,
}

fn default_list_page() -> u32 {
    1000
}

fn list_page_size<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<u32, D::Error> {
    Ok(crate::operator::fields::count(deserializer, 10..=1000)?
        .map_or(default_list_page(), |n| n as u32))
}

const NAMESPACES: [Namespace; 2] = [Namespace::Settings, Namespace::QueryConfigs];

#[derive(Debug, Default, Clone, Serialize)]
pub struct Samples {
    pub missing: Vec<String>,
    pub stale: Vec<String>,
    pub orphaned: Vec<String>,
    pub protected: Vec<String>,
    pub foreign: Vec<String>,
}

/// What a run found: each class's count and samples, per namespace.
#[derive(Debug, Default, Clone)]
struct Found {
    counts: PerNamespace<ClassCounts>,
    samples: PerNamespace<Samples>,
}

impl Found {
    fn add(&mut self, key: &KvKey, class: Class) {
        *self.counts.get(key.namespace).slot(class) += 1;
        let samples = self.samples.get(key.namespace);
        let list = match class {
            Class::InSync => None,
            Class::Missing => Some(&mut samples.missing),
            Class::Stale => Some(&mut samples.stale),
            Class::Orphaned => Some(&mut samples.orphaned),
            Class::Protected => Some(&mut samples.protected),
            Class::Foreign => Some(&mut samples.foreign),
        };
        if let Some(list) = list.filter(|l| l.len() < SAMPLES) {
            list.push(key.key.clone());
        }
    }
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct PerNamespace<T> {
    pub settings: T,
    pub query_configs: T,
}

impl<T> PerNamespace<T> {
    fn get(&mut self, namespace: Namespace) -> &mut T {
        match namespace {
            Namespace::Settings => &mut self.settings,
            Namespace::QueryConfigs => &mut self.query_configs,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Repaired {
    pub written: usize,
    pub deleted: usize,
    /// Records of indexes the table no longer has, marked (a whole-fleet pass's ledger step).
    pub ledger_marked: usize,
    /// Records of indexes the table no longer has whose marks were ripe: their removal
    /// exported again (each record taken out unless an alias keeps the index, a writer came
    /// since, or the mark changed since this page read it).
    pub ledger_swept: usize,
}

#[derive(Debug, Default, Serialize)]
pub struct Requests {
    pub table_pages: usize,
    pub kv_list: usize,
    pub kv_bulk_get: usize,
    pub kv_repair: usize,
    pub ledger_pages: usize,
}

#[derive(Debug, Serialize)]
pub struct Answer {
    pub mode: &'static str,
    pub system_account_id: Option<String>,
    pub repair: bool,
    pub dry_run: bool,
    pub deep: bool,
    pub counts: PerNamespace<ClassCounts>,
    pub samples: PerNamespace<Samples>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repaired: Option<Repaired>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub would_repair: Option<Repaired>,
    pub requests: Requests,
    pub complete: bool,
    pub continuation_token: Option<String>,
}

/// Each time a piece runs out of time, the rest of the pass takes pieces half as large (a list
/// page, a table piece), down to 1/2^6 of them: a piece that overruns is made smaller until it
/// fits, so the runs advance (docs/contract.md, "Reconcile").
const MAX_SHRINK: u32 = 6;

/// A piece of `full` (keys or records) made smaller `shrink` times, never below `least`.
fn piece_size(full: usize, shrink: u32, least: usize) -> usize {
    (full >> shrink.min(MAX_SHRINK)).max(least)
}

/// Why a run stops before the end of what it was asked, logged once.
fn log_stop(step: &str, why: &str) {
    tracing::info!(
        step,
        why,
        "reconcile stopped before the end; the next invocation goes on from here"
    );
}

/// A piece that failed once the run's half of the time (`stop_at`) was spent ran out of time:
/// it is handed on (logged, and pieces halved from here on: `shrink`); any other failure stands.
fn hand_on(
    error: OperatorError,
    stop_at: Instant,
    step: &str,
    shrink: &mut u32,
) -> Result<(), OperatorError> {
    if Instant::now() < stop_at {
        return Err(error);
    }
    *shrink = (*shrink + 1).min(MAX_SHRINK);
    let why = format!("time ran out in a piece, taken again smaller next: {error}");
    log_stop(step, &why);
    Ok(())
}

/// A reconcile that cannot go on, and why.
fn failed(reason: impl std::fmt::Display) -> OperatorError {
    OperatorError::ReconcileFailed {
        reason: reason.to_string(),
    }
}

pub async fn run<P: Ports>(
    exporter: &Exporter<P>,
    request: &ReconcileRequest,
    deadline: Instant,
) -> Result<Answer, OperatorError> {
    let answer = Box::pin(segments::run(exporter, request, deadline)).await?;
    report(&answer);
    Ok(answer)
}

/// One log line and one metrics document per invocation.
fn report(answer: &Answer) {
    let (s, q) = (&answer.counts.settings, &answer.counts.query_configs);
    let classes = [
        ("InSync", s.in_sync + q.in_sync),
        ("Missing", s.missing + q.missing),
        ("Stale", s.stale + q.stale),
        ("Orphaned", s.orphaned + q.orphaned),
        ("Protected", s.protected + q.protected),
        ("Foreign", s.foreign + q.foreign),
    ];
    let repaired = answer
        .repaired
        .as_ref()
        .map_or(0, |r| r.written + r.deleted);
    let checked: usize = classes.iter().map(|(_, n)| n).sum();
    tracing::info!(
        complete = answer.complete,
        keys_checked = checked,
        missing = s.missing + q.missing,
        stale = s.stale + q.stale,
        orphaned = s.orphaned + q.orphaned,
        protected = s.protected + q.protected,
        repaired,
        "reconcile done"
    );
    let mut metrics = crate::report::reconcile_metrics(&classes, s.drift() + q.drift(), repaired);
    metrics.push(("ReconcileKeysChecked".into(), checked as f64));
    metrics.push((
        "ReconcileComplete".into(),
        f64::from(u8::from(answer.complete)),
    ));
    crate::report::emit_reconcile(&metrics);
}
