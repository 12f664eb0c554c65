//! Reconcile by listing: one account's keys listed page by page against what one scan of its
//! partition implies, each key classified once, and the drift repaired through the exporter
//! (docs/contract.md, "Reconcile").

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::ops::Bound;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_dynamo::Item;
use tokio::time::Instant;

use super::classify::{class_of, live_targets, Class, Implied, Listed};
use super::{failed, hand_on, log_stop, piece_size, Answer, Found, ReconcileRequest};
use super::{Repaired, Requests, NAMESPACES};
use crate::domain::kv::KeyMetadata;
use crate::domain::{IndexRef, KvAction, KvKey, Namespace};
use crate::operator::{decode_token, encode_token, OperatorError};
use crate::pipeline::exporter::{Exporter, Prepared, Run};
use crate::ports::Ports;
use crate::report::Outcome;

/// Items per table page while working out what the table implies.
const TABLE_PAGE: i32 = 1000;

/// Where a run goes on: the namespace being listed, the last key classified, the cursor.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Position {
    namespace: usize,
    after: Option<String>,
    cursor: Option<String>,
    /// How many times pages were halved because a run ran out of time (kept for the rest of
    /// the run's tokens).
    #[serde(default)]
    shrink: u32,
}

/// What a run found so far, and what its repair would do.
#[derive(Default, Clone)]
struct Sweep {
    found: Found,
    to_write: BTreeSet<KvKey>,
    to_delete: BTreeMap<KvKey, Option<IndexRef>>,
}

impl Sweep {
    fn classify(&mut self, key: &KvKey, class: Class, owner: Option<IndexRef>) {
        self.found.add(key, class);
        match class {
            Class::Missing | Class::Stale => {
                self.to_write.insert(key.clone());
            }
            Class::Orphaned => {
                self.to_delete.insert(key.clone(), owner);
            }
            _ => {}
        }
    }
}

pub(super) async fn run<P: Ports>(
    exporter: &Exporter<P>,
    request: &ReconcileRequest,
    account: Option<&str>,
    deadline: Instant,
) -> Result<Answer, OperatorError> {
    let mut position: Position = match &request.continuation_token {
        Some(token) => decode_token(&token.0)?,
        None => Position::default(),
    };
    let started_at = position.clone();
    let mut requests = Requests::default();
    // The listing takes half the time at most: the rest is the repair's.
    let started = Instant::now();
    let stop_at = started + deadline.saturating_duration_since(started) / 2;
    let (implied, prepared) = implied(exporter, account, &mut requests, deadline).await?;
    let listing = Listing {
        exporter,
        request,
        account,
        implied: &implied,
        empty_filters: &prepared.plan.empty_filters,
        deadline,
        stop_at,
    };
    let (sweep, complete) = listing.sweep(&mut position, &mut requests).await?;
    let Sweep {
        found,
        to_write,
        to_delete,
    } = sweep;
    let mut answer = Answer {
        mode: "reconcile",
        system_account_id: account.map(str::to_owned),
        repair: request.repair,
        dry_run: request.dry_run,
        deep: request.deep,
        counts: found.counts,
        samples: found.samples,
        repaired: None,
        would_repair: None,
        requests,
        complete,
        continuation_token: (!complete).then(|| encode_token(&position)),
    };
    if request.repair {
        let repair = Repaired {
            written: to_write.len(),
            deleted: to_delete.len(),
        };
        if request.dry_run {
            answer.would_repair = Some(repair);
        } else if repair.written + repair.deleted > 0 {
            let deletes = to_delete.into_iter().collect();
            let repair = repair_drift(exporter, prepared, to_write, deletes, deadline).await;
            let again = Position {
                shrink: position.shrink,
                ..started_at
            };
            put_repair(&mut answer, repair, again, stop_at)?;
        } else {
            answer.repaired = Some(repair);
        }
    }
    Ok(answer)
}

/// The repair's outcome in the answer; a repair the deadline cut once the listing's half of the
/// time was spent answers `again` (where the run started, pages halved): the next run finds
/// that drift again.
fn put_repair(
    answer: &mut Answer,
    repair: Result<(Repaired, usize), OperatorError>,
    mut again: Position,
    stop_at: Instant,
) -> Result<(), OperatorError> {
    match repair {
        Ok((repaired, requests)) => {
            answer.repaired = Some(repaired);
            answer.requests.kv_repair = requests;
        }
        Err(error) => {
            hand_on(error, stop_at, "repair", &mut again.shrink)?;
            answer.complete = false;
            answer.continuation_token = Some(encode_token(&again));
        }
    }
    Ok(())
}

/// Writes the missing and stale keys and deletes the orphans, through the same planner's
/// values and the same bulk requests as the stream; answers what it did and its requests.
async fn repair_drift<P: Ports>(
    exporter: &Exporter<P>,
    prepared: Prepared,
    to_write: BTreeSet<KvKey>,
    deletes: Vec<(KvKey, Option<IndexRef>)>,
    deadline: Instant,
) -> Result<(Repaired, usize), OperatorError> {
    let report = exporter
        .repair(prepared, &to_write, deletes, deadline)
        .await;
    report.log();
    if let Some(reason) = report.records.iter().find_map(|r| match &r.outcome {
        Outcome::Failed(reason) => Some(reason.clone()),
        _ => None,
    }) {
        return Err(failed(format!("repair did not finish: {reason}")));
    }
    let repaired = Repaired {
        written: report.keys_written,
        deleted: report.keys_deleted,
    };
    Ok((repaired, report.kv_requests))
}

/// One account's keys listed against what the table implies.
struct Listing<'a, P: Ports> {
    exporter: &'a Exporter<P>,
    request: &'a ReconcileRequest,
    account: Option<&'a str>,
    implied: &'a Implied,
    /// No filter says what an empty one says: the index has no overrides.
    empty_filters: &'a HashSet<KvKey>,
    deadline: Instant,
    /// No page is started after this (the rest of the time is the repair's).
    stop_at: Instant,
}

impl<P: Ports> Listing<'_, P> {
    /// Lists page by page from `position`, leaving room for the slowest page, twice over, and
    /// for the repair; what was found, and whether the listing reached its end.
    async fn sweep(
        &self,
        position: &mut Position,
        requests: &mut Requests,
    ) -> Result<(Sweep, bool), OperatorError> {
        let mut sweep = Sweep::default();
        let (mut slowest, mut pages, mut listed_keys) = (Duration::ZERO, 0, 0);
        loop {
            let Some(&namespace) = NAMESPACES.get(position.namespace) else {
                return Ok((sweep, true));
            };
            if (self.request.max_keys).is_some_and(|max| listed_keys >= max) {
                log_stop("listing", "max_keys reached");
                return Ok((sweep, false));
            }
            // Every run takes one page at least (so each advances), then none it cannot finish.
            if pages > 0 && Instant::now() + slowest * 2 >= self.stop_at {
                log_stop("listing", "the next page would not fit in the time left");
                return Ok((sweep, false));
            }
            let (started, before) = (Instant::now(), sweep.clone());
            pages += 1;
            match self.page(namespace, position, &mut sweep, requests).await {
                Ok(listed) => listed_keys += listed,
                Err(error) => {
                    hand_on(error, self.stop_at, "listing", &mut position.shrink)?;
                    return Ok((before, false));
                }
            }
            slowest = slowest.max(started.elapsed());
        }
    }

    /// Lists and classifies one page of `namespace` from `position`, moves `position` past
    /// it, and answers how many keys it listed.
    async fn page(
        &self,
        namespace: Namespace,
        position: &mut Position,
        sweep: &mut Sweep,
        requests: &mut Requests,
    ) -> Result<usize, OperatorError> {
        let (request, deadline) = (self.request, self.deadline);
        let cursor = position.cursor.as_deref();
        let size = piece_size(request.page_size as usize, position.shrink, 10) as u32;
        let page = (self.exporter).list_page(namespace, cursor, size, deadline);
        let page = page.await.map_err(failed)?;
        requests.kv_list += 1;
        let listed_keys = page.keys.len();
        let listed: Vec<Listed> = (page.keys.into_iter())
            .map(|k| Listed {
                key: KvKey {
                    namespace,
                    key: k.name,
                },
                metadata: KeyMetadata::ours(k.metadata.as_ref()),
                value: None,
            })
            .collect();
        let listed = self.read_values(namespace, listed, requests).await?;
        // Implied keys in the range this page covers that were not listed are missing.
        let last = listed.last().map(|l| l.key.key.clone());
        let upper = match (&page.cursor, &last) {
            (Some(_), Some(last)) => Bound::Included(last.clone()),
            _ => Bound::Unbounded,
        };
        for key in self.missing(namespace, &position.after, upper, &listed) {
            sweep.classify(&key, Class::Missing, None);
        }
        for l in &listed {
            if let Some(class) = class_of(l, self.implied, self.account, request.deep) {
                // The index the key was written for: a lost delete is checked against it.
                let owner = l.metadata.as_ref().and_then(|m| m.index_ref());
                sweep.classify(&l.key, class, owner);
            }
        }
        *position = match page.cursor {
            Some(cursor) => Position {
                namespace: position.namespace,
                after: last,
                cursor: Some(cursor),
                shrink: position.shrink,
            },
            None => Position {
                namespace: position.namespace + 1,
                after: None,
                cursor: None,
                shrink: position.shrink,
            },
        };
        Ok(listed_keys)
    }

    /// Values are read only where metadata cannot tell (or `deep` asks).
    async fn read_values(
        &self,
        namespace: Namespace,
        mut listed: Vec<Listed>,
        requests: &mut Requests,
    ) -> Result<Vec<Listed>, OperatorError> {
        let deep = self.request.deep;
        let unread: Vec<String> = (listed.iter())
            .filter(|l| deep || l.metadata.as_ref().and_then(|m| m.index_ref()).is_none())
            .map(|l| l.key.key.clone())
            .collect();
        if unread.is_empty() {
            return Ok(listed);
        }
        let values = self.exporter.read_many(namespace, &unread, self.deadline);
        let values = values.await.map_err(failed)?;
        requests.kv_bulk_get += unread.len().div_ceil(100);
        for l in &mut listed {
            l.value = values.get(&l.key.key).cloned().flatten();
        }
        Ok(listed)
    }

    /// The implied keys between `after` and `upper` that the listing did not show.
    fn missing(
        &self,
        namespace: Namespace,
        after: &Option<String>,
        upper: Bound<String>,
        listed: &[Listed],
    ) -> Vec<KvKey> {
        let lower = match after {
            Some(after) => Bound::Excluded(after.clone()),
            None => Bound::Unbounded,
        };
        let seen: HashSet<&str> = listed.iter().map(|l| l.key.key.as_str()).collect();
        let range = (
            lower.map(|k| KvKey { namespace, key: k }),
            upper.map(|k| KvKey { namespace, key: k }),
        );
        (self.implied.digests.range(range).map(|(k, _)| k))
            .filter(|k| k.namespace == namespace && !seen.contains(k.key.as_str()))
            .filter(|k| !self.empty_filters.contains(*k))
            .cloned()
            .collect()
    }
}

/// One scan of the table (or of the account's partition), planned as a re-export would be.
async fn implied<P: Ports>(
    exporter: &Exporter<P>,
    account: Option<&str>,
    requests: &mut Requests,
    deadline: Instant,
) -> Result<(Implied, Prepared), OperatorError> {
    let mut records = Vec::new();
    let mut references = Vec::new();
    let mut start: Option<Item> = None;
    loop {
        let page = exporter
            .table_page(account, start, TABLE_PAGE, true, deadline)
            .await
            .map_err(|e| failed(e.to_string()))?;
        requests.table_pages += 1;
        records.extend(page.records);
        references.extend(page.references);
        match page.next {
            Some(next) => start = Some(next),
            None => break,
        }
    }
    let mut prepared = exporter.prepare(records, Run::OPERATOR, deadline).await;
    // One record's outage (its cell's API keys service down) never stops the fleet's
    // reconcile: its keys are kept as they are and checked next pass.
    let mut unexportable: HashSet<IndexRef> =
        prepared.leave_failed_unchecked().into_iter().collect();
    for (record, outcome) in prepared.records.iter().zip(&prepared.plan.outcomes) {
        if let (Outcome::Rejected(_), Some(index)) = (outcome, &record.index) {
            unexportable.insert(index.clone());
        }
    }
    // Digests only: the values themselves stay in the plan, for the repair.
    let digests = prepared
        .plan
        .ops
        .iter()
        .filter_map(|(key, op)| match &op.action {
            KvAction::Put(value) => Some((key.clone(), value.digest())),
            KvAction::Delete => None,
        })
        .collect();
    let mut implied = Implied {
        digests,
        aliased: live_targets(&references).collect(),
        unexportable,
    };
    if account.is_some() {
        // Aliases in other accounts protect this one's indexes too.
        let references = exporter.settings_references(deadline).await;
        implied
            .aliased
            .extend(live_targets(&references.map_err(failed)?));
    }
    Ok((implied, prepared))
}
