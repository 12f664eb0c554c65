//! `{"mode": "reconcile", ...}`: proves KV matches what the table implies, across the whole
//! fleet (or one account), and with `repair` makes it so (docs/contract.md, "Reconcile").
//!
//! One scan of the table gives the implied keys and values (through the planner, so they are
//! byte for byte what the stream writes). Then each namespace is listed in key order, 1,000
//! names a request with their metadata, and every key lands in exactly one class. A key's
//! metadata says who wrote it and the digest of its value, so no value is read unless a key
//! has no metadata (written by hand, or before metadata) or `deep` asks for it. A run that stops
//! before the deadline hands out a token: the key range it covered is never covered again.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::ops::Bound;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_dynamo::Item;
use tokio::time::Instant;

mod classify;
pub mod scheduled;
mod segments;

pub use classify::ClassCounts;
use classify::{class_of, live_targets, Class, Implied, Listed};

use super::{decode_token, encode_token, flag, OperatorError, Text};
use crate::domain::kv::KeyMetadata;
use crate::domain::{IndexRef, KvAction, KvKey, Namespace};
use crate::pipeline::exporter::{Exporter, Run};
use crate::ports::{ApiKeySource, KvStore, Ledger, SettingsTable};
use crate::report::Outcome;

/// Sample keys per class in the answer.
const SAMPLES: usize = 100;
/// Items per table page while working out what the table implies.
const TABLE_PAGE: i32 = 1000;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconcileRequest {
    /// Only this account's keys, when given.
    #[serde(default)]
    pub system_account_id: Option<Text>,
    /// Write missing and stale keys, delete orphaned ones.
    #[serde(default, deserialize_with = "flag")]
    pub repair: bool,
    /// Classify (and with `repair`, say what would be repaired), write nothing.
    #[serde(default, deserialize_with = "flag")]
    pub dry_run: bool,
    /// Read every value, to catch hand edits that kept the metadata.
    #[serde(default, deserialize_with = "flag")]
    pub deep: bool,
    #[serde(default)]
    pub continuation_token: Option<Text>,
    /// Stop after the list page that reaches this many keys, with a token (to split a run).
    #[serde(default, deserialize_with = "super::backfill::max_records")]
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
    Ok(super::backfill::count(deserializer, 10..=1000)?.map_or(default_list_page(), |n| n as u32))
}

/// Where a run goes on: the namespace being listed, the last key classified, the cursor.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Position {
    namespace: usize,
    after: Option<String>,
    cursor: Option<String>,
}

const NAMESPACES: [Namespace; 2] = [Namespace::Settings, Namespace::QueryConfigs];

#[derive(Debug, Default, Serialize)]
pub struct Samples {
    pub missing: Vec<String>,
    pub stale: Vec<String>,
    pub orphaned: Vec<String>,
    pub protected: Vec<String>,
    pub foreign: Vec<String>,
}

/// What a run found: each class's count and samples, per namespace.
#[derive(Debug, Default)]
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

#[derive(Debug, Default, Serialize)]
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

#[derive(Debug, Default, Serialize)]
pub struct Repaired {
    pub written: usize,
    pub deleted: usize,
    /// Drift not repaired: another writer wrote the key during this run (checked next pass).
    #[serde(skip_serializing_if = "is_zero")]
    pub left_to_other_writers: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

#[derive(Debug, Default, Serialize)]
pub struct Requests {
    pub table_pages: usize,
    pub kv_list: usize,
    pub kv_bulk_get: usize,
    pub kv_repair: usize,
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

pub async fn run<K: KvStore, A: ApiKeySource, T: SettingsTable, L: Ledger>(
    exporter: &Exporter<K, A, T, L>,
    request: &ReconcileRequest,
    deadline: Instant,
) -> Result<Answer, OperatorError> {
    let account = request.system_account_id.as_ref().map(|a| a.0.as_str());
    if account.is_none() && exporter.keeps_ledger() {
        // Boxed: only one of the two ways is taken, and each future is large.
        let answer = Box::pin(segments::run(exporter, request, deadline)).await?;
        report(&answer);
        return Ok(answer);
    }
    let mut position: Position = match &request.continuation_token {
        Some(token) => decode_token(&token.0)?,
        None => Position::default(),
    };
    let failed = |reason: String| OperatorError::ReconcileFailed { reason };
    let mut requests = Requests::default();
    // Keys another writer claims from now on are left to it (docs/contract.md).
    let read_since = exporter.begin_reading().await;
    let (implied, prepared) = implied(exporter, account, &mut requests, deadline).await?;
    let mut implied = implied;
    if account.is_some() {
        // Aliases in other accounts protect this one's indexes too.
        let references = exporter
            .settings_references(deadline)
            .await
            .map_err(|e| failed(e.to_string()))?;
        implied.aliased.extend(live_targets(&references));
    }

    let mut found = Found::default();
    let mut to_write: BTreeSet<KvKey> = BTreeSet::new();
    let mut to_delete: BTreeMap<KvKey, Option<IndexRef>> = BTreeMap::new();
    let mut classify = |key: &KvKey, class: Class, owner: Option<IndexRef>| {
        found.add(key, class);
        match class {
            Class::Missing | Class::Stale => {
                to_write.insert(key.clone());
            }
            Class::Orphaned => {
                to_delete.insert(key.clone(), owner);
            }
            _ => {}
        }
    };

    // List page by page; leave room for the slowest page, twice over, and for the repair.
    let mut slowest = Duration::from_secs(2);
    let mut listed_keys = 0;
    let complete = loop {
        let Some(&namespace) = NAMESPACES.get(position.namespace) else {
            break true;
        };
        if request.max_keys.is_some_and(|max| listed_keys >= max)
            || Instant::now() + slowest * 2 >= deadline
        {
            break false;
        }
        let started = Instant::now();
        let page = exporter
            .list_page(
                namespace,
                position.cursor.as_deref(),
                request.page_size,
                deadline,
            )
            .await
            .map_err(|e| failed(e.to_string()))?;
        requests.kv_list += 1;
        listed_keys += page.keys.len();
        let mut listed: Vec<Listed> = page
            .keys
            .into_iter()
            .map(|k| Listed {
                key: KvKey {
                    namespace,
                    key: k.name,
                },
                metadata: KeyMetadata::ours(k.metadata.as_ref()),
                value: None,
            })
            .collect();
        // Values are read only where metadata cannot tell (or `deep` asks).
        let unread: Vec<String> = listed
            .iter()
            .filter(|l| request.deep || l.metadata.as_ref().and_then(|m| m.index_ref()).is_none())
            .map(|l| l.key.key.clone())
            .collect();
        if !unread.is_empty() {
            let values = exporter
                .read_many(namespace, &unread, deadline)
                .await
                .map_err(|e| failed(e.to_string()))?;
            requests.kv_bulk_get += unread.len().div_ceil(100);
            for l in &mut listed {
                l.value = values.get(&l.key.key).cloned().flatten();
            }
        }
        // Implied keys in the range this page covers that were not listed are missing.
        let last = listed.last().map(|l| l.key.key.clone());
        let upper = match (&page.cursor, &last) {
            (Some(_), Some(last)) => Bound::Included(last.clone()),
            _ => Bound::Unbounded,
        };
        let lower = match &position.after {
            Some(after) => Bound::Excluded(after.clone()),
            None => Bound::Unbounded,
        };
        let seen: HashSet<&str> = listed.iter().map(|l| l.key.key.as_str()).collect();
        let missing: Vec<KvKey> = implied
            .digests
            .range((
                lower.map(|k| KvKey { namespace, key: k }),
                upper.map(|k| KvKey { namespace, key: k }),
            ))
            .map(|(k, _)| k)
            .filter(|k| k.namespace == namespace && !seen.contains(k.key.as_str()))
            // No filter says what an empty one says: the index has no overrides.
            .filter(|k| !prepared.plan.empty_filters.contains(*k))
            .cloned()
            .collect();
        for key in &missing {
            classify(key, Class::Missing, None);
        }
        for l in &listed {
            if let Some(class) = class_of(l, &implied, account, request.deep) {
                // The index the key was written for: a lost delete is checked against it.
                let owner = l.metadata.as_ref().and_then(|m| m.index_ref());
                classify(&l.key, class, owner);
            }
        }
        slowest = slowest.max(started.elapsed());
        match page.cursor {
            Some(cursor) => {
                position.after = last;
                position.cursor = Some(cursor);
            }
            None => {
                position = Position {
                    namespace: position.namespace + 1,
                    after: None,
                    cursor: None,
                };
            }
        }
    };

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
            left_to_other_writers: 0,
        };
        if request.dry_run {
            answer.would_repair = Some(repair);
        } else if repair.written + repair.deleted > 0 {
            // Through the same planner's values and the same bulk requests as the stream.
            let mut prepared = prepared;
            prepared.read_epoch = Some(read_since);
            // Indexes left unchecked (logged above) are not this repair's to finish.
            for outcome in &mut prepared.plan.outcomes {
                if matches!(outcome, Outcome::Failed(_)) {
                    *outcome = Outcome::Skipped("left unchecked this pass".into());
                }
            }
            let deletes = to_delete.into_iter().collect();
            let report = exporter
                .repair(prepared, &to_write, deletes, deadline)
                .await;
            report.log();
            answer.requests.kv_repair = report.kv_requests;
            if let Some(reason) = report.records.iter().find_map(|r| match &r.outcome {
                Outcome::Failed(reason) => Some(reason.clone()),
                _ => None,
            }) {
                return Err(failed(format!("repair did not finish: {reason}")));
            }
            answer.repaired = Some(Repaired {
                written: report.keys_written,
                deleted: report.keys_deleted,
                left_to_other_writers: report.keys_left,
            });
        } else {
            answer.repaired = Some(repair);
        }
    }
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

/// One scan of the table (or of the account's partition), planned as a re-export would be.
async fn implied<K: KvStore, A: ApiKeySource, T: SettingsTable, L: Ledger>(
    exporter: &Exporter<K, A, T, L>,
    account: Option<&str>,
    requests: &mut Requests,
    deadline: Instant,
) -> Result<(Implied, crate::pipeline::exporter::Prepared), OperatorError> {
    let failed = |reason: String| OperatorError::ReconcileFailed { reason };
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
    let prepared = exporter.prepare(records, Run::OPERATOR, deadline).await;
    let mut unexportable = HashSet::new();
    for (record, outcome) in prepared.records.iter().zip(&prepared.plan.outcomes) {
        match outcome {
            Outcome::Failed(reason) => {
                // One record's outage (its cell's API keys service down) never stops the
                // fleet's reconcile: its keys are kept as they are and checked next pass.
                tracing::warn!(index = ?record.index, %reason, "reconcile leaves this index unchecked");
                if let Some(index) = &record.index {
                    unexportable.insert(index.clone());
                }
            }
            Outcome::Rejected(_) => {
                if let Some(index) = &record.index {
                    unexportable.insert(index.clone());
                }
            }
            _ => {}
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
    let implied = Implied {
        digests,
        aliased: live_targets(&references).collect(),
        unexportable,
    };
    Ok((implied, prepared))
}
