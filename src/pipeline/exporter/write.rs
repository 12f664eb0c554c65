//! Stage 5, the write: a prepared batch's decided keys sent, and every record's outcome decided
//! from what became of its index's keys (docs/contract.md, "Nothing is lost").

use std::collections::HashMap;

use tokio::time::Instant;

use super::{fail_index, Prepared};
use crate::domain::{IndexRef, KvKey, KvOp};
use crate::pipeline::desired::Want;
use crate::pipeline::records::ChangeRecord;
use crate::ports::{KvStore, PortError};
use crate::report::{BatchReport, Landed, Outcome};

/// DynamoDB Streams keeps a record this long; no real record is older when it is exported.
const STREAM_RETENTION_SECONDS: f64 = 24.0 * 3600.0;

/// Stage 5: the keys sent once and every record's outcome decided; the check of what landed is
/// the caller's (`check.rs`). What is checked: every key an operator sends (it read the table
/// before another writer may have changed it), and of the stream's, those decided from other
/// items than its records (a shop given up, a filter, a dropped alias target's keys), each as
/// the index it is checked as, with the digest put (`None`: deleted; empty: kept as it was).
pub(super) async fn send(kv: &impl KvStore, prepared: Prepared, deadline: Instant) -> BatchReport {
    let (requests_before, retries_before) = (kv.requests(), kv.retries());
    let (stream, keys) = (prepared.run.stream, &prepared.desired.keys);
    // An index's keys together, in key order: a value shared by two keys is copied while
    // still in cache.
    let mut ops: Vec<(&IndexRef, KvOp)> = (keys.iter())
        .filter_map(|(key, wanted)| Some((&wanted.by, (key.clone(), wanted.action()?))))
        .collect();
    ops.sort_by(|(a, (x, _)), (b, (y, _))| (a, x).cmp(&(b, y)));
    let ops = ops.into_iter().map(|(_, op)| op).collect();
    let failed: HashMap<KvKey, PortError> = kv.apply(ops, deadline).await.into_iter().collect();
    let applied_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default();
    let mut report = BatchReport {
        kv_requests: kv.requests() - requests_before,
        kv_retries: kv.retries() - retries_before,
        api_keys: prepared.api_keys,
        ..BatchReport::default()
    };
    let mut records = Vec::new();
    for (key, wanted) in keys {
        let by = prepared.failing(&wanted.by);
        if let Some(error) = failed.get(key) {
            let outcome = Outcome::of_port_error(error, format!("KV key `{}`: ", key.key));
            records.push((by, outcome));
            continue;
        }
        match &wanted.want {
            Want::Put(value) => {
                if key.is_shop_of(value.index()) {
                    report
                        .claimed_now
                        .push((value.index().clone(), key.key.clone()));
                }
                report.written.push(key.clone());
            }
            Want::Delete => report.deleted.push(key.clone()),
            Want::Keep => {}
        }
        if !stream || wanted.derived {
            report.landed.push(Landed {
                key: key.clone(),
                fails: by,
                index: wanted.checked_as.clone(),
                digest: wanted.digest(),
            });
        }
    }
    let failures = records;
    let mut records = prepared.records;
    // From here on a record is what identifies it and its outcome: its change is let go.
    records.iter_mut().for_each(|record| record.change = None);
    let failures = failures
        .iter()
        .map(|(by, outcome)| (&by[..], outcome.clone()));
    fail_index(&mut records, failures);
    finish(report, records, applied_at)
}

/// The report's lags and outcomes.
fn finish(mut report: BatchReport, records: Vec<ChangeRecord>, applied_at: f64) -> BatchReport {
    report.lag_seconds = (records.iter())
        .filter(|record| record.outcome == Outcome::Exported)
        .filter_map(|record| record.created_at)
        .map(|created| (applied_at - created).max(0.0))
        // A stream keeps records 24 hours: an older time is a hand-made event's, not a lag.
        .filter(|lag| *lag <= STREAM_RETENTION_SECONDS)
        .collect();
    report.records = records;
    report
}
