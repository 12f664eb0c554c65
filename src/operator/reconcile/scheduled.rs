//! `{"mode": "reconcile", "repair": true, "scheduled": true}`: what the schedule sends, every 15
//! minutes. Full passes are kept in the ledger table (docs/contract.md, "Reconcile"): a run
//! resumes the pass under way from its stored token, or starts a new one once the last full
//! pass is `RECONCILE_EVERY_HOURS` old, or does nothing. A lease (a conditional write) keeps two
//! runs off one pass. Every run logs one line and emits the pass's metrics, so a fleet that
//! does not fit one invocation still completes passes, and an overdue pass alarms.

use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use super::{Answer, ReconcileRequest};
use crate::domain::net::{self, Protection};
use crate::operator::{NonEmpty, OperatorError};
use crate::pipeline::exporter::Exporter;
use crate::ports::{epoch_seconds as now, Ports, ReconcileProgress};

/// Kept for saving the progress after the pass's work: the run itself stops this much earlier.
const SAVE_MARGIN: Duration = Duration::from_secs(3);

#[derive(Debug, Serialize)]
pub struct ScheduledAnswer {
    pub scheduled: bool,
    /// Whether this run worked on a pass (not: not due, or another run holds it).
    pub ran: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Seconds since the epoch; `null` before the first full pass.
    pub last_full_pass_at: Option<u64>,
    /// Drift the last full pass found (missing + stale + orphaned), before repair.
    pub last_pass_drift: u64,
    #[serde(flatten)]
    pub reconcile: Option<Answer>,
}

pub async fn run<P: Ports>(
    exporter: &Exporter<P>,
    request: &ReconcileRequest,
    deadline: Instant,
) -> Result<ScheduledAnswer, OperatorError> {
    if request.continuation_token.is_some() || request.system_account_id.is_some() {
        return Err(OperatorError::invalid(
            "scheduled",
            "keeps its own progress: give neither continuation_token nor system_account_id",
        ));
    }
    let failed = |e: crate::ports::PortError| OperatorError::ReconcileFailed {
        reason: format!("scheduled reconcile: {e}"),
    };
    let stored = exporter
        .reconcile_progress(deadline)
        .await
        .map_err(failed)?;
    let read = stored.as_ref().map(|p| p.version);
    let mut progress = stored.unwrap_or_default();
    let started = now();
    if let Some(reason) = not_now(&progress, started, exporter.reconcile_every()) {
        return Ok(skipped(progress, reason));
    }
    let resumed = progress.token.is_some();
    if !resumed {
        progress.pass_started_at = Some(started);
        progress.pass_drift = 0;
    }
    // Take the pass until this invocation's deadline (and a minute): a run that dies leaves it
    // to the next once the lease is over.
    let left = deadline.saturating_duration_since(Instant::now()).as_secs();
    progress.lease_until = Some(started + left + 60);
    progress.version = read.map_or(1, |v| v + 1);
    let leased = progress.version;
    let lease_started = Instant::now();
    if !exporter
        .save_reconcile_progress(&progress, read, deadline)
        .await
        .map_err(failed)?
    {
        return Ok(skipped(progress, "another invocation took the pass".into()));
    }

    let mut pass = request.clone();
    pass.scheduled = false;
    pass.continuation_token = progress.token.clone().map(NonEmpty);
    // The last save is given what the lease's save took, twice over (a slow ledger), or more.
    let save = SAVE_MARGIN.max(lease_started.elapsed() * 2);
    let work_until = deadline.checked_sub(save).unwrap_or(deadline);
    let answer = match super::run(exporter, &pass, work_until).await {
        Ok(answer) => answer,
        Err(error) => {
            // The pass stays where it was; the next run resumes it at once.
            progress.lease_until = None;
            progress.version = leased + 1;
            let _ = exporter
                .save_reconcile_progress(&progress, Some(leased), deadline)
                .await;
            return Err(error);
        }
    };
    advance(&mut progress, &answer);
    progress.lease_until = None;
    progress.version = leased + 1;
    let saved = exporter
        .save_reconcile_progress(&progress, Some(leased), deadline)
        .await
        .map_err(failed)?;
    let reason = (!saved).then(|| "progress not saved: another invocation moved it".to_owned());
    report(&progress, Some(&answer), resumed);
    Ok(ScheduledAnswer {
        scheduled: true,
        ran: true,
        reason,
        last_full_pass_at: progress.last_full_pass_at,
        last_pass_drift: progress.last_pass_drift,
        reconcile: Some(answer),
    })
}

/// The pass moved on by what this run covered: its drift added, and either its token kept or,
/// when complete, the pass closed.
fn advance(progress: &mut ReconcileProgress, answer: &super::Answer) {
    let drift = (answer.counts.settings.drift() + answer.counts.query_configs.drift()) as u64;
    progress.pass_drift += drift;
    if answer.complete {
        progress.last_full_pass_at = Some(now());
        progress.last_pass_drift = progress.pass_drift;
        progress.token = None;
        progress.pass_started_at = None;
        progress.pass_drift = 0;
    } else {
        progress.token = answer.continuation_token.clone();
    }
}

/// Why this run leaves the pass alone, if it does.
fn not_now(progress: &ReconcileProgress, now: u64, every: Duration) -> Option<String> {
    let leased = progress
        .lease_until
        .filter(|_| !net::off(Protection::Lease));
    if let Some(until) = leased.filter(|until| *until > now) {
        return Some(format!(
            "another invocation holds the pass for {} s more",
            until - now
        ));
    }
    let due_at = progress.last_full_pass_at.map(|at| at + every.as_secs());
    match due_at {
        Some(due_at) if progress.token.is_none() && now < due_at => Some(format!(
            "not due: the next full pass starts in {} s (RECONCILE_EVERY_HOURS {})",
            due_at - now,
            every.as_secs() / 3600
        )),
        _ => None,
    }
}

fn skipped(progress: ReconcileProgress, reason: String) -> ScheduledAnswer {
    report(&progress, None, false);
    ScheduledAnswer {
        scheduled: true,
        ran: false,
        reason: Some(reason),
        last_full_pass_at: progress.last_full_pass_at,
        last_pass_drift: progress.last_pass_drift,
        reconcile: None,
    }
}

/// One log line and one metrics document per scheduled run, whatever it did.
fn report(progress: &ReconcileProgress, answer: Option<&Answer>, resumed: bool) {
    let now = now();
    // Never a full pass: as old as the pass under way (or this moment).
    let since = progress
        .last_full_pass_at
        .or(progress.pass_started_at)
        .unwrap_or(now);
    let age_hours = now.saturating_sub(since) as f64 / 3600.0;
    let complete = answer.is_some_and(|a| a.complete);
    tracing::info!(
        ran = answer.is_some(),
        resumed,
        complete,
        pass_drift = progress.pass_drift,
        last_pass_drift = progress.last_pass_drift,
        last_full_pass_age_hours = age_hours,
        "scheduled reconcile"
    );
    let mut values = vec![("ReconcileLastFullPassAge".to_owned(), age_hours)];
    if complete {
        values.push(("ReconcilePassDrift".into(), progress.last_pass_drift as f64));
    }
    crate::report::emit_reconcile(&values);
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: u64 = 3600;

    #[test]
    fn a_pass_is_due_once_the_last_is_old_enough_and_a_lease_keeps_others_off() {
        let every = Duration::from_secs(6 * HOUR);
        let fresh = ReconcileProgress::default();
        assert_eq!(
            not_now(&fresh, 100 * HOUR, every),
            None,
            "never passed: due"
        );
        let recent = ReconcileProgress {
            last_full_pass_at: Some(100 * HOUR),
            ..ReconcileProgress::default()
        };
        assert!(not_now(&recent, 105 * HOUR, every).is_some_and(|r| r.starts_with("not due")));
        assert_eq!(not_now(&recent, 106 * HOUR, every), None);
        let under_way = ReconcileProgress {
            token: Some("t".into()),
            ..recent.clone()
        };
        assert_eq!(
            not_now(&under_way, 101 * HOUR, every),
            None,
            "a pass under way goes on"
        );
        let leased = ReconcileProgress {
            lease_until: Some(101 * HOUR),
            ..under_way
        };
        assert!(not_now(&leased, 101 * HOUR - 1, every).is_some_and(|r| r.contains("holds")));
        assert_eq!(
            not_now(&leased, 101 * HOUR, every),
            None,
            "an expired lease is free"
        );
    }
}
