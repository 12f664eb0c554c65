//! The exporter core: looks up what a batch needs, plans it, sends the KV requests and decides
//! every record's outcome. The stream handler and the manual re-export both go through here.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use futures::StreamExt as _;
use serde_dynamo::Item;
use tokio::time::Instant;

use crate::adapters::api_keys::ApiKeyCache;
use crate::domain::kv::KvRequest;
use crate::domain::kv::KvValue;
use crate::domain::qfilter::{filter_key, QueryFilter};
use crate::domain::validate;
use crate::domain::{IndexRef, KvAction, KvKey, Namespace, SettingsReference};
use crate::dynamo;
use crate::pipeline::bulk;
use crate::pipeline::plan::{self, Lookups, PlannedOp};
use crate::pipeline::records::Change;
use crate::pipeline::records::{decode_item, ChangeRecord, Expected};
use crate::ports::{
    before_deadline, AccountCell, ApiKeySource, IndexRefs, KeyFailures, KeyPage, KvCounters,
    KvStore, Ledger, LookupCounts, NoLedger, PortError, ReconcileProgress, SettingsTable,
    TableCounters,
};
use crate::report::{BatchReport, Outcome, RecordReport};

mod claims;
mod references;

use claims::{Planned, StreamReads};

/// DynamoDB Streams keeps a record this long; no real record is older when it is exported.
const STREAM_RETENTION_SECONDS: f64 = 24.0 * 3600.0;

/// How many KV requests (bulk or single reads) are in flight at once.
const CONCURRENT_KV_REQUESTS: usize = 4;

#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// How often a scheduled reconcile starts a new full pass.
    pub reconcile_every: std::time::Duration,
    pub default_cell: String,
    pub default_configs_sk: String,
    /// The settings table's stream; records from elsewhere are rejected (`None`: any).
    pub stream_arn: Option<String>,
}

/// The core with its collaborators. The entry and the operator modes call it through its
/// methods only.
pub struct Exporter<K, A, T, L = NoLedger> {
    kv: K,
    api_keys: ApiKeyCache<A>,
    table: T,
    ledger: L,
    options: ExportOptions,
}

/// Whether API keys may come from the short cache across warm invocations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiKeys {
    /// The stream path: a key fetched a moment ago is reused.
    Cached,
    /// The operator modes: always fetched, so a rotated-out key is never written.
    Fresh,
}

/// Where an index's override filter learns the index's overrides from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overrides {
    /// A Query of the table per index (the stream, backfill pages).
    InTable,
    /// The batch holds all of them (a re-export or verify with query configs, a reconcile).
    InBatch,
}

/// How a batch is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub api_keys: ApiKeys,
    pub overrides: Overrides,
    /// Keeps each index's references in the ledger (the stream; a backfill fills them in).
    pub records_references: bool,
}

impl Run {
    /// The stream's run: its records are the newest word on their items.
    pub fn is_stream(self) -> bool {
        self.api_keys == ApiKeys::Cached
    }

    pub const STREAM: Run = Run {
        api_keys: ApiKeys::Cached,
        overrides: Overrides::InTable,
        records_references: true,
    };
    /// Operators always get the current API key.
    pub const OPERATOR: Run = Run {
        api_keys: ApiKeys::Fresh,
        overrides: Overrides::InBatch,
        records_references: false,
    };
    pub const BACKFILL: Run = Run {
        api_keys: ApiKeys::Fresh,
        overrides: Overrides::InTable,
        records_references: true,
    };
    /// A backfill batch that holds every override of its indexes, read by the scan itself.
    pub const BACKFILL_FROM_SCAN: Run = Run {
        api_keys: ApiKeys::Fresh,
        overrides: Overrides::InBatch,
        records_references: true,
    };
}

/// One page of the table, decoded, and where the next one starts.
#[derive(Debug)]
pub struct TablePage {
    pub records: Vec<ChangeRecord>,
    /// Each record's item key (`pk`, `sk`): where a backfill can resume after it.
    pub keys: Vec<Item>,
    /// What the page's settings records say about other indexes (shops, live aliases).
    pub references: Vec<SettingsReference>,
    pub next: Option<Item>,
}

/// Records with their lookups done and their KV operations planned, nothing sent yet.
#[derive(Debug)]
pub struct Prepared {
    pub records: Vec<ChangeRecord>,
    pub plan: plan::Plan,
    pub api_keys: LookupCounts,
    pub run: Run,
    /// An operator's ledger time from before it read the records
    /// ([`Exporter::begin_reading`]): keys claimed since are left to their writers. `None`:
    /// taken when sending (an operator that read the table before should set it).
    pub read_epoch: Option<u64>,
    /// The stream's claims of derived keys, read before what they depend on.
    reads: StreamReads,
    /// Keys a repair deletes, with the index whose key each one was.
    delete_owners: HashMap<KvKey, IndexRef>,
    /// The batch's indexes' references as the ledger recorded them, when the run keeps them.
    known_refs: Option<HashMap<IndexRef, IndexRefs>>,
}

impl<K: KvStore, A: ApiKeySource, T: SettingsTable> Exporter<K, A, T> {
    /// The core without a ledger table (what needs one fails, saying so).
    pub fn new(kv: K, api_keys: ApiKeyCache<A>, table: T, options: ExportOptions) -> Self {
        Self::with_ledger(kv, api_keys, table, NoLedger, options)
    }
}

impl<K: KvStore, A: ApiKeySource, T: SettingsTable, L: Ledger> Exporter<K, A, T, L> {
    pub fn with_ledger(
        kv: K,
        api_keys: ApiKeyCache<A>,
        table: T,
        ledger: L,
        options: ExportOptions,
    ) -> Self {
        Self {
            kv,
            api_keys,
            table,
            ledger,
            options,
        }
    }

    /// Where a scheduled reconcile stands (a consistent read of the ledger).
    pub async fn reconcile_progress(
        &self,
        deadline: Instant,
    ) -> Result<Option<ReconcileProgress>, PortError> {
        let read = self.ledger.reconcile_progress();
        before_deadline(deadline, "reconcile progress", read).await
    }

    /// Saves a scheduled reconcile's progress if nobody saved since `expected`.
    pub async fn save_reconcile_progress(
        &self,
        progress: &ReconcileProgress,
        expected: Option<u64>,
        deadline: Instant,
    ) -> Result<bool, PortError> {
        let save = self.ledger.save_reconcile_progress(progress, expected);
        before_deadline(deadline, "reconcile progress", save).await
    }

    /// The sort key of the table's default configs, which are never exported.
    /// Whether a ledger table is configured (claims, references, segmented reconcile).
    pub fn keeps_ledger(&self) -> bool {
        self.ledger.enabled()
    }

    pub fn default_configs_sk(&self) -> &str {
        &self.options.default_configs_sk
    }

    /// How often a scheduled reconcile starts a new full pass.
    pub fn reconcile_every(&self) -> std::time::Duration {
        self.options.reconcile_every
    }

    /// What the settings table was asked so far.
    pub fn table_counters(&self) -> TableCounters {
        self.table.counters()
    }

    /// What a stream record is checked against while it is decoded.
    pub fn expected(&self) -> Expected<'_> {
        Expected {
            default_configs_sk: &self.options.default_configs_sk,
            stream_arn: self.options.stream_arn.as_deref(),
        }
    }

    /// Exports decoded records, in stream order.
    pub async fn export(
        &self,
        records: Vec<ChangeRecord>,
        run: Run,
        deadline: Instant,
    ) -> BatchReport {
        self.export_reusing(records, run, deadline, Vec::new())
            .await
    }

    /// [`Exporter::export`], writing the first bulk body into `buffer` (the event's memory, no
    /// longer needed: a first large batch then faults in a body's worth less memory).
    pub async fn export_reusing(
        &self,
        records: Vec<ChangeRecord>,
        run: Run,
        deadline: Instant,
        buffer: Vec<u8>,
    ) -> BatchReport {
        let prepared = self.prepare(records, run, deadline).await;
        let mut report = self.apply_reusing(prepared, deadline, buffer).await;
        self.write_lost_again(&mut report, deadline).await;
        report
    }

    /// [`Exporter::export`] for an operator that read `records` from the table at
    /// ledger time `read_epoch` ([`Exporter::begin_reading`]).
    pub async fn export_read_at(
        &self,
        records: Vec<ChangeRecord>,
        run: Run,
        read_epoch: u64,
        deadline: Instant,
    ) -> BatchReport {
        let mut prepared = self.prepare(records, run, deadline).await;
        prepared.read_epoch = Some(read_epoch);
        self.apply(prepared, deadline).await
    }

    /// A repair (verify, reconcile): of the planned operations only the keys in `writes`, and
    /// the `deletes` (each with the index it was written for, when known), under the claims
    /// every operator takes: a key another writer claimed since the table was read is left to
    /// it, and a key claimed while this one wrote it is read again and written once more.
    pub async fn repair(
        &self,
        mut prepared: Prepared,
        writes: &BTreeSet<KvKey>,
        deletes: Vec<(KvKey, Option<IndexRef>)>,
        deadline: Instant,
    ) -> BatchReport {
        prepared.plan.ops.retain(|key, _| writes.contains(key));
        if !deletes.is_empty() {
            // An orphaned key has no table record: the deletes get a record of their own.
            let owner = prepared.records.len();
            prepared.records.push(ChangeRecord {
                sequence_number: None,
                index: None,
                created_at: None,
                decoded: Err(Outcome::Skipped("a repair's deletes".into())),
            });
            prepared.plan.outcomes.push(Outcome::Pending);
            for (key, index) in deletes {
                if let Some(index) = index {
                    prepared.delete_owners.insert(key.clone(), index);
                }
                let delete = PlannedOp {
                    action: KvAction::Delete,
                    owner,
                };
                prepared.plan.ops.insert(key, delete);
            }
        }
        self.apply(prepared, deadline).await
    }

    /// Everything but the KV writes: lookups and the plan. A dry run stops here.
    pub async fn prepare(
        &self,
        records: Vec<ChangeRecord>,
        run: Run,
        deadline: Instant,
    ) -> Prepared {
        let keys = run.api_keys;
        let cell = &self.options.default_cell;
        let recorded = match run.records_references && self.ledger.enabled() {
            true => self.look_up_recorded(&records, run, deadline).await,
            false => None,
        };
        let (mut lookups, mut api_keys, known_refs) = match recorded {
            Some((lookups, counts, known)) => (lookups, counts, Some(known)),
            None => {
                let (lookups, counts) = self.look_up(&records, keys, deadline).await;
                (lookups, counts, None)
            }
        };
        let mut reads = StreamReads::default();
        if run.is_stream() && self.ledger.enabled() {
            // Before the claimers' settings are read (below): see claims.rs.
            reads.shops = self.read_shop_claims(&records, &lookups).await;
        }
        let mut plan = plan::plan(&records, &lookups, cell);
        if !plan.claimers_wanted.is_empty() {
            // A shop key another index claims is repointed: read those indexes, plan again.
            let wanted = std::mem::take(&mut plan.claimers_wanted);
            api_keys = self
                .look_up_claimers(wanted, &mut lookups, keys, api_keys, deadline)
                .await;
            plan = plan::plan(&records, &lookups, cell);
        }
        reads.filters = self.add_filters(&records, &mut plan, run, deadline).await;
        for (owner, note) in &plan.notes {
            let index = records[*owner].index.as_ref();
            tracing::info!(
                account = %index.map(|i| i.account.as_str()).unwrap_or("?"),
                index = %index.map(|i| i.name.as_str()).unwrap_or("?"),
                "{note}"
            );
        }
        Prepared {
            records,
            plan,
            api_keys,
            run,
            read_epoch: None,
            reads,
            delete_owners: HashMap::new(),
            known_refs,
        }
    }

    /// Sends the plan's operations and decides every record's outcome. Old shop keys go first:
    /// an index whose old shop key could not be deleted keeps its own key as it was, so the
    /// replay of its record still learns the old shop from it (docs/contract.md, "Nothing is
    /// lost").
    pub async fn apply(&self, prepared: Prepared, deadline: Instant) -> BatchReport {
        let mut report = self.apply_reusing(prepared, deadline, Vec::new()).await;
        self.write_lost_again(&mut report, deadline).await;
        report
    }

    async fn apply_reusing(
        &self,
        prepared: Prepared,
        deadline: Instant,
        buffer: Vec<u8>,
    ) -> BatchReport {
        let Prepared {
            records,
            plan,
            api_keys,
            run,
            read_epoch,
            reads,
            delete_owners,
            known_refs,
        } = prepared;
        let left_refs = known_refs.as_ref().map(|_| references::left_by(&records));
        let claimed = self.ledger.enabled();
        // A query config's claim names its override's query (a reconcile reads it by key).
        let queries: Vec<Option<String>> = (records.iter())
            .map(|record| match &record.decoded {
                Ok(Change::UpsertQuery(config)) if claimed => Some(config.query.clone()),
                _ => None,
            })
            .collect();
        // From here on a record is only what identifies it: its decoded change is let go.
        let (records, created_at): (Vec<RecordReport>, Vec<Option<f64>>) = records
            .into_iter()
            .map(|record| {
                let report = RecordReport {
                    sequence_number: record.sequence_number,
                    index: record.index,
                    outcome: Outcome::Pending,
                };
                (report, record.created_at)
            })
            .unzip();
        let mut outcomes = plan.outcomes;
        let before = self.kv.counters();
        let planned = (plan.ops.iter())
            .map(|(key, op)| Planned {
                key: key.clone(),
                value_of: match &op.action {
                    KvAction::Put(value) => Some(value.index().clone()),
                    KvAction::Delete => None,
                },
                record_of: records[op.owner].index.clone(),
                digest: match &op.action {
                    KvAction::Put(value) if claimed => Some(value.digest()),
                    _ => None,
                },
                // An override's record plans its own key and its index's filter (`qfilter-`).
                query: (queries[op.owner].clone()).filter(|_| key.key.starts_with("qcfg-")),
            })
            .collect();
        let guard = self.claim(planned, run, read_epoch, &reads).await;
        for (key, note) in &guard.dropped {
            tracing::info!(key = %validate::cut(&key.key), "{note}");
        }
        let dropped: HashSet<&KvKey> = guard.dropped.iter().map(|(k, _)| k).collect();
        // Keys not claimed are not sent: refused ones fail their records, left ones are
        // another writer's, dropped ones another index's now.
        let held_back: HashSet<&KvKey> = (guard.refused.iter().map(|(k, _)| k))
            .chain(&guard.left)
            .chain(dropped.iter().copied())
            .collect();
        let old_shop_keys: HashSet<&KvKey> = plan.old_shops.iter().map(|(key, _)| key).collect();
        let first = bulk::requests(
            plan.ops
                .iter()
                .filter(|(key, _)| old_shop_keys.contains(key) && !held_back.contains(key)),
            Vec::new(),
        );
        let mut failures: Vec<(Namespace, KeyFailures)> = (guard.refused.iter())
            .map(|(key, error)| {
                let failure = KeyFailures {
                    keys: vec![key.key.clone()],
                    error: error.clone(),
                };
                (key.namespace, failure)
            })
            .collect();
        failures.extend(self.send_all(&first, deadline).await);
        let failed_deletes: HashSet<(Namespace, &str)> = failures
            .iter()
            .flat_map(|(ns, f)| f.keys.iter().map(move |k| (*ns, k.as_str())))
            .collect();
        let withheld: HashMap<KvKey, String> = plan
            .old_shops
            .iter()
            .filter(|(shop, _)| failed_deletes.contains(&(shop.namespace, shop.key.as_str())))
            .map(|(shop, index)| (KvKey::index(index), shop.key.clone()))
            .collect();
        let rest = bulk::requests(
            plan.ops
                .iter()
                .filter(|(key, _)| !old_shop_keys.contains(key) && !withheld.contains_key(key))
                .filter(|(key, _)| !held_back.contains(key)),
            buffer,
        );
        // The bodies hold the values now: each key keeps only its owner and whether it is a put.
        let ops: Vec<(KvKey, usize, bool)> = plan
            .ops
            .into_iter()
            .map(|(key, op)| (key, op.owner, matches!(op.action, KvAction::Put(_))))
            .collect();
        failures.extend(self.send_all(&rest, deadline).await);
        let withheld_error = |shop: &str| {
            PortError::Transient(format!(
                "not sent: the old shop key `{shop}` was not deleted, and a retry must still find it here"
            ))
        };
        let withheld_errors: Vec<(KvKey, PortError)> = withheld
            .iter()
            .map(|(key, shop)| (key.clone(), withheld_error(shop)))
            .collect();
        let requests_sent = first.len() + rest.len();
        let not_applied: HashSet<(Namespace, &str)> = (failures.iter())
            .flat_map(|(ns, f)| f.keys.iter().map(move |k| (*ns, k.as_str())))
            .chain(withheld.keys().map(|k| (k.namespace, k.key.as_str())))
            .collect();
        let applied: HashSet<&KvKey> = (ops.iter().map(|(key, _, _)| key))
            .filter(|k| !held_back.contains(k) && !not_applied.contains(&(k.namespace, &k.key)))
            .collect();
        let lost: HashSet<KvKey> = self.lost(&guard, &applied).await.into_iter().collect();
        // The stream's filters: replayed, the record reads the overrides again.
        let lost_error = PortError::Transient(
            "another writer claimed this key while this batch wrote it: retried".into(),
        );
        let stream_lost = lost.iter().filter(|_| run.is_stream());
        let KvCounters { retries, .. } = self.kv.counters();
        let applied_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        let failed_keys: HashMap<(Namespace, &str), &PortError> = failures
            .iter()
            .flat_map(|(namespace, failure)| {
                failure
                    .keys
                    .iter()
                    .map(move |key| ((*namespace, key.as_str()), &failure.error))
            })
            .chain(
                withheld_errors
                    .iter()
                    .map(|(key, error)| ((key.namespace, key.key.as_str()), error)),
            )
            .chain(stream_lost.map(|key| ((key.namespace, key.key.as_str()), &lost_error)))
            .collect();

        let mut report = BatchReport {
            kv_requests: requests_sent,
            kv_retries: retries - before.retries,
            api_keys,
            ..BatchReport::default()
        };
        for (key, owner, put) in ops {
            if dropped.contains(&key) {
                continue;
            }
            if guard.left.contains(&key) {
                if outcomes[owner] == Outcome::Pending {
                    let reason = format!(
                        "KV key `{}`: another writer wrote it during this run; left to it",
                        key.key
                    );
                    outcomes[owner] = Outcome::Skipped(reason);
                }
                report.left.push(key);
                continue;
            }
            if !run.is_stream() && lost.contains(&key) {
                // Perhaps landed after the other writer's: written again from a new read.
                let owner_index = delete_owners.get(&key).cloned();
                report.lost.push((key, owner, owner_index));
                continue;
            }
            match failed_keys.get(&(key.namespace, key.key.as_str())) {
                Some(error) => {
                    if outcomes[owner] == Outcome::Pending {
                        outcomes[owner] = key_failed(&key.key, error);
                    }
                }
                None if put => report.written.push(key),
                None => report.deleted.push(key),
            }
        }
        for (index, needers) in &plan.filters {
            let key = filter_key(index);
            if let Some(error) = failed_keys.get(&(key.namespace, key.key.as_str())) {
                for &needer in needers {
                    if outcomes[needer] == Outcome::Pending {
                        outcomes[needer] = match error {
                            PortError::Permanent(reason) => Outcome::Rejected(format!(
                                "query filter `{}` refused: {reason}",
                                key.key
                            )),
                            PortError::Transient(reason) => Outcome::Failed(format!(
                                "query filter `{}` not written: {reason}",
                                key.key
                            )),
                        };
                    }
                }
            }
        }
        if let (Some(left), Some(known)) = (left_refs, &known_refs) {
            (self.record_references(left, known, &mut outcomes, run.is_stream())).await;
        }
        report.keys_written = report.written.len();
        report.keys_deleted = report.deleted.len();
        report.keys_left = report.left.len();
        report.lag_seconds = created_at
            .into_iter()
            .zip(&outcomes)
            .filter(|(_, outcome)| **outcome == Outcome::Pending)
            .filter_map(|(created, _)| created)
            .map(|created| (applied_at - created).max(0.0))
            // A stream keeps records 24 hours: an older time is a hand-made event's, not a lag.
            .filter(|lag| *lag <= STREAM_RETENTION_SECONDS)
            .collect();
        report.records = records
            .into_iter()
            .zip(outcomes)
            .map(|(record, outcome)| RecordReport {
                // A pending record whose operations were all applied is exported.
                outcome: match outcome {
                    Outcome::Pending => Outcome::Exported,
                    outcome => outcome,
                },
                ..record
            })
            .collect();
        report
    }

    /// The index's settings record as a change (`None`: the table has no such record) and,
    /// when asked, its query configs.
    pub async fn index_records(
        &self,
        index: &IndexRef,
        include_query_configs: bool,
        deadline: Instant,
    ) -> Result<Option<Vec<ChangeRecord>>, PortError> {
        let settings = self.settings_record(index, include_query_configs, deadline);
        let Some(settings) = settings.await? else {
            return Ok(None);
        };
        let mut records = vec![settings];
        if include_query_configs {
            let mut start = None;
            loop {
                let (page, next) = self
                    .query_configs(index, start, usize::MAX, deadline)
                    .await?;
                records.extend(page);
                match next {
                    Some(next) => start = Some(next),
                    None => break,
                }
            }
        }
        Ok(Some(records))
    }

    /// The index's settings record as a change (`None`: the table has none). With query
    /// configs, it stands for all of them (it needs their filter).
    pub async fn settings_record(
        &self,
        index: &IndexRef,
        include_query_configs: bool,
        deadline: Instant,
    ) -> Result<Option<ChangeRecord>, PortError> {
        let item = before_deadline(deadline, "settings item", self.table.index_settings(index));
        let item = item.await?;
        Ok(item.map(|item| self.decode_item(item, include_query_configs)))
    }

    /// The index's query-config records after `start`, `limit` at most, and where the rest
    /// begins.
    pub async fn query_configs(
        &self,
        index: &IndexRef,
        start: Option<Item>,
        limit: usize,
        deadline: Instant,
    ) -> Result<(Vec<ChangeRecord>, Option<Item>), PortError> {
        let page = self.table.query_configs(index, start, limit);
        let page = before_deadline(deadline, "query configs", page).await?;
        let records = page
            .items
            .into_iter()
            .map(|item| self.decode_item(item, true));
        Ok((records.collect(), page.next))
    }

    /// Which of `indexes` have a settings record, and each one's shop.
    pub async fn index_shops(
        &self,
        indexes: &[IndexRef],
        deadline: Instant,
    ) -> Result<HashMap<IndexRef, Option<String>>, PortError> {
        if indexes.is_empty() {
            return Ok(HashMap::new());
        }
        before_deadline(deadline, "settings items", self.table.index_shops(indexes)).await
    }

    /// Which of these overrides (index, query) the table holds.
    pub async fn overrides_exist(
        &self,
        overrides: &[(IndexRef, String)],
        deadline: Instant,
    ) -> Result<HashSet<(IndexRef, String)>, PortError> {
        if overrides.is_empty() {
            return Ok(HashSet::new());
        }
        let read = self.table.overrides_exist(overrides);
        before_deadline(deadline, "override items", read).await
    }

    /// The KV keys of the index's overrides, from a keys-only Query of the table.
    pub async fn override_keys(
        &self,
        index: &IndexRef,
        deadline: Instant,
    ) -> Result<HashSet<String>, PortError> {
        let queries = self.table.override_queries(index);
        let queries = before_deadline(deadline, "override queries", queries).await?;
        let key = |query: &String| crate::domain::kv::query_config_key(index, query);
        Ok(queries.iter().map(key).collect())
    }

    /// One page of the table (one account's records when given), decoded.
    pub async fn table_page(
        &self,
        account: Option<&str>,
        start: Option<Item>,
        limit: i32,
        include_query_configs: bool,
        deadline: Instant,
    ) -> Result<TablePage, PortError> {
        let page = self.table.page(account, start, limit);
        let page = before_deadline(deadline, "table page", page).await?;
        let references = page
            .items
            .iter()
            .filter_map(|item| {
                let image = dynamo::Image::of(item);
                let pk = image.string("pk")?;
                let sk = image.string("sk")?;
                match dynamo::SortKey::parse(sk, &self.options.default_configs_sk) {
                    dynamo::SortKey::Index(name) => {
                        let index = IndexRef::new(pk, name);
                        Some(dynamo::settings_reference(index, &image).0)
                    }
                    _ => None,
                }
            })
            .collect();
        let keys = page.items.iter().map(item_key).collect();
        Ok(TablePage {
            keys,
            records: page
                .items
                .into_iter()
                .map(|item| self.decode_item(item, include_query_configs))
                .collect(),
            references,
            next: page.next,
        })
    }

    fn decode_item(&self, item: Item, include_query_configs: bool) -> ChangeRecord {
        decode_item(
            item,
            &self.options.default_configs_sk,
            include_query_configs,
        )
    }

    /// Reads many values, 100 keys a request; an absent key reads as `None`.
    pub async fn read_many(
        &self,
        namespace: Namespace,
        keys: &[String],
        deadline: Instant,
    ) -> Result<HashMap<String, Option<String>>, PortError> {
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        self.kv.get_many(namespace, keys, deadline).await
    }

    /// One page of a namespace's keys, with their metadata.
    pub async fn list_page(
        &self,
        namespace: Namespace,
        cursor: Option<&str>,
        limit: u32,
        deadline: Instant,
    ) -> Result<KeyPage, PortError> {
        self.kv
            .list_page(namespace, "", cursor, limit, deadline)
            .await
    }

    /// Every settings record's shop and live alias targets (one consistent scan).
    pub async fn settings_references(
        &self,
        deadline: Instant,
    ) -> Result<Vec<SettingsReference>, PortError> {
        let scan = self.table.settings_references();
        before_deadline(deadline, "settings table scan", scan).await
    }

    /// Every key of a namespace that starts with `prefix`.
    pub async fn list_keys(
        &self,
        namespace: Namespace,
        prefix: &str,
        deadline: Instant,
    ) -> Result<Vec<String>, PortError> {
        self.kv.list_keys(namespace, prefix, deadline).await
    }

    /// The override filter of every index that needs one, put into the plan beside the
    /// override keys (so in the same bulk write). Without its overrides, the records that
    /// need a filter are reported for retry.
    async fn add_filters(
        &self,
        records: &[ChangeRecord],
        plan: &mut plan::Plan,
        run: Run,
        deadline: Instant,
    ) -> HashMap<KvKey, Option<String>> {
        let wanted: Vec<IndexRef> = plan.filters.keys().cloned().collect();
        let mut filter_reads = HashMap::new();
        if run.is_stream() && self.ledger.enabled() && !wanted.is_empty() {
            // Read before the overrides: a writer that claims a filter after this read may
            // have seen an override this batch's Query misses, and then this claim fails.
            let keys: Vec<KvKey> = wanted.iter().map(filter_key).collect();
            match self.read_claims(&keys).await {
                Ok(mut read) => {
                    filter_reads = keys
                        .into_iter()
                        .map(|k| {
                            let token = read.remove(&k).map(|c| c.token);
                            (k, token)
                        })
                        .collect();
                }
                Err(e) => {
                    for needer in plan.filters.values().flatten() {
                        if plan.outcomes[*needer] == Outcome::Pending {
                            plan.outcomes[*needer] =
                                Outcome::Failed(format!("cannot read the filter's claim: {e}"));
                        }
                    }
                    return filter_reads;
                }
            }
        }
        let queries: Vec<(IndexRef, Result<Vec<String>, PortError>)> = match run.overrides {
            Overrides::InBatch => {
                // Grouped in one pass: a reconcile's batch is the whole fleet.
                let mut by_index: HashMap<&IndexRef, Vec<String>> = HashMap::new();
                for record in records {
                    if let Ok(Change::UpsertQuery(c)) = &record.decoded {
                        by_index.entry(&c.index).or_default().push(c.query.clone());
                    }
                }
                (wanted.into_iter())
                    .map(|index| {
                        let queries = by_index.remove(&index).unwrap_or_default();
                        (index, Ok(queries))
                    })
                    .collect()
            }
            Overrides::InTable => {
                futures::stream::iter(wanted)
                    .map(|index| async move {
                        let queries = self.table.override_queries(&index);
                        let queries = before_deadline(deadline, "overrides", queries).await;
                        (index, queries)
                    })
                    .buffered(CONCURRENT_KV_REQUESTS)
                    .collect()
                    .await
            }
        };
        for (index, queries) in queries {
            let needers = &plan.filters[&index];
            match queries {
                Ok(queries) => {
                    let filter = QueryFilter::build(&index, queries);
                    if filter.count == 0 {
                        plan.empty_filters.insert(filter_key(&index));
                    }
                    let text = serde_json::to_string(&filter).expect("filters serialize");
                    let op = PlannedOp {
                        action: KvAction::put(KvValue::new(&index, text)),
                        owner: needers[0],
                    };
                    plan.ops.insert(filter_key(&index), op);
                }
                Err(e) => {
                    for &needer in needers {
                        if plan.outcomes[needer] == Outcome::Pending {
                            plan.outcomes[needer] = Outcome::Failed(format!(
                                "cannot read the overrides of index {index} for its filter: {e}"
                            ));
                        }
                    }
                }
            }
        }
        filter_reads
    }

    /// API keys, the table scan and current shop ids, all at once; then the scan, if a shop
    /// read from KV shows that a shop moved.
    async fn look_up(
        &self,
        records: &[ChangeRecord],
        keys: ApiKeys,
        deadline: Instant,
    ) -> (Lookups, LookupCounts) {
        let needs = plan::needs(records, &self.options.default_cell);
        let api_keys = self
            .api_keys
            .lookup_all(needs.api_keys, keys == ApiKeys::Fresh, deadline);
        let references = async {
            if needs.references {
                Some(self.settings_references(deadline).await)
            } else {
                None
            }
        };
        let current_shops = self.current_shops(needs.current_shops, deadline);
        let ((api_keys, counts), references, current_shops) =
            tokio::join!(api_keys, references, current_shops);
        let mut lookups = Lookups {
            api_keys,
            references,
            current_shops,
            claimers: HashMap::new(),
        };
        if lookups.references.is_none() && plan::shop_moves(records, &lookups) {
            lookups.references = Some(self.settings_references(deadline).await);
        }
        (lookups, counts)
    }

    /// The shop ids in the indexes' current KV values, read 100 keys a request.
    async fn current_shops(
        &self,
        indexes: BTreeSet<IndexRef>,
        deadline: Instant,
    ) -> HashMap<IndexRef, Result<Option<String>, PortError>> {
        if indexes.is_empty() {
            return HashMap::new();
        }
        let keys: Vec<String> = indexes.iter().map(|i| KvKey::index(i).key).collect();
        let values = self.kv.get_many(Namespace::Settings, &keys, deadline).await;
        indexes
            .into_iter()
            .zip(keys)
            .map(|(index, key)| {
                let shop = match &values {
                    Ok(values) => Ok(values
                        .get(&key)
                        .cloned()
                        .flatten()
                        .and_then(|v| shop_in_kv_value(&v))),
                    Err(error) => Err(error.clone()),
                };
                (index, shop)
            })
            .collect()
    }

    /// Reads the indexes that claim a shop key, and the API keys their values need.
    async fn look_up_claimers(
        &self,
        claimers: BTreeSet<IndexRef>,
        lookups: &mut Lookups,
        keys: ApiKeys,
        mut counts: LookupCounts,
        deadline: Instant,
    ) -> LookupCounts {
        let read: Vec<_> = futures::stream::iter(claimers)
            .map(|index| async move {
                let item = self.table.index_settings(&index);
                let item = before_deadline(deadline, "claimer's settings", item).await;
                let settings = item.map(|item| {
                    item.and_then(|item| {
                        dynamo::index_settings(index.clone(), &dynamo::Image::of(&item))
                            .ok()
                            .map(Arc::new)
                    })
                });
                (index, settings)
            })
            .buffer_unordered(CONCURRENT_KV_REQUESTS)
            .collect()
            .await;
        let cell = &self.options.default_cell;
        let wanted: BTreeSet<AccountCell> = read
            .iter()
            .filter_map(|(_, settings)| settings.as_ref().ok()?.as_ref())
            .map(|s| plan::account_cell(&s.index.account, s.cell.as_deref(), cell))
            .filter(|ac| !lookups.api_keys.contains_key(ac))
            .collect();
        let (api_keys, more) = self
            .api_keys
            .lookup_all(wanted, keys == ApiKeys::Fresh, deadline)
            .await;
        lookups.api_keys.extend(api_keys);
        lookups.claimers.extend(read);
        counts.calls += more.calls;
        counts.cache_hits += more.cache_hits;
        counts
    }

    async fn send_all(
        &self,
        requests: &[KvRequest],
        deadline: Instant,
    ) -> Vec<(Namespace, KeyFailures)> {
        futures::stream::iter(requests)
            .map(|request| async move {
                let failures = self.kv.send(request, deadline).await.err();
                let namespace = request.namespace();
                futures::stream::iter(failures.into_iter().flatten().map(move |f| (namespace, f)))
            })
            .buffer_unordered(CONCURRENT_KV_REQUESTS)
            .flatten()
            .collect()
            .await
    }
}

/// An item's table key (`pk`, `sk`), as DynamoDB takes it for `ExclusiveStartKey`.
fn item_key(item: &Item) -> Item {
    let mut key = std::collections::HashMap::new();
    for name in ["pk", "sk"] {
        if let Some(value) = item.get(name) {
            key.insert(name.to_owned(), value.clone());
        }
    }
    Item::from(key)
}

/// A record whose key did not make it: retried, unless Cloudflare refused that key on its own.
fn key_failed(key: &str, error: &PortError) -> Outcome {
    match error {
        PortError::Permanent(reason) => Outcome::Rejected(format!("KV key `{key}`: {reason}")),
        PortError::Transient(reason) => Outcome::Failed(format!("KV key `{key}`: {reason}")),
    }
}

/// The shop id in a settings value as this function wrote it; anything else claims none.
fn shop_in_kv_value(value: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(value).ok()?;
    value
        .get("shop_id")?
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::memory::{CountingTable, MemoryKv, SameKey};
    use crate::pipeline::records::decode_record;
    use serde_json::json;
    use std::collections::HashSet;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    fn exporter(kv: MemoryKv) -> Exporter<MemoryKv, SameKey, CountingTable> {
        Exporter::new(
            kv,
            ApiKeyCache::new(SameKey, Duration::from_secs(60)),
            CountingTable::default(),
            ExportOptions {
                reconcile_every: Duration::from_secs(6 * 3600),
                default_cell: "default".into(),
                default_configs_sk: "DEFAULT_CONFIGS".into(),
                stream_arn: None,
            },
        )
    }

    fn record(seq: u32, event: &str, index: &str) -> serde_json::Value {
        let keys = json!({"pk": {"S": "a"}, "sk": {"S": format!("INDEX#{index}")}});
        let mut dynamodb = json!({"Keys": keys, "SequenceNumber": seq.to_string(), "SizeBytes": 1,
                                  "StreamViewType": "NEW_IMAGE"});
        if event != "REMOVE" {
            let mut image = keys.clone();
            image["index_endpoint"] = json!({"S": "https://idx"});
            dynamodb["NewImage"] = image;
        }
        json!({"eventID": "e", "eventName": event, "awsRegion": "r", "dynamodb": dynamodb})
    }

    async fn export(
        exporter: &Exporter<MemoryKv, SameKey, CountingTable>,
        batch: Vec<serde_json::Value>,
    ) -> BatchReport {
        let records = batch
            .iter()
            .map(|r| decode_record(&r.to_string(), exporter.default_configs_sk()))
            .collect();
        exporter.export(records, Run::STREAM, deadline()).await
    }

    fn deadline() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    #[tokio::test]
    async fn removes_share_one_table_scan_per_batch() {
        let exporter = exporter(MemoryKv::default());
        let batch = vec![
            record(1, "INSERT", "x"),
            record(2, "REMOVE", "p"),
            record(3, "REMOVE", "q"),
            record(4, "REMOVE", "r"),
        ];
        let report = export(&exporter, batch).await;
        assert_eq!(exporter.table.scans.load(Ordering::SeqCst), 1);
        assert_eq!(report.count(|o| *o == Outcome::Exported), 4);
    }

    #[tokio::test]
    async fn one_override_query_per_changed_index_per_batch() {
        let exporter = exporter(MemoryKv::default());
        let query = |seq: u32, index: &str, q: &str| {
            let mut r = record(seq, "INSERT", &format!("{index}#QUERY#{q}"));
            r["dynamodb"]["NewImage"]["query_config"] = json!({"M": {}});
            r
        };
        let batch = vec![
            query(1, "p", "a"),
            query(2, "p", "b"),
            query(3, "q", "a"),
            query(4, "p", "c"),
        ];
        let report = export(&exporter, batch).await;
        assert_eq!(exporter.table.override_queries.load(Ordering::SeqCst), 2);
        assert_eq!(report.count(|o| *o == Outcome::Exported), 4);
        let values = exporter.kv.values.lock().unwrap();
        assert!(values.contains_key("qfilter-a-p") && values.contains_key("qfilter-a-q"));
    }

    #[tokio::test]
    async fn a_kv_failure_fails_only_the_record_owning_the_key() {
        let kv = MemoryKv {
            failing: HashSet::from(["a-broken".to_string()]),
            ..MemoryKv::default()
        };
        let exporter = exporter(kv);
        let batch = vec![
            record(1, "INSERT", "ok"),
            record(2, "INSERT", "broken"),
            // Supersedes record 1's key: record 1 is done once record 3's write lands.
            record(3, "MODIFY", "ok"),
        ];
        let report = export(&exporter, batch).await;
        assert_eq!(report.failed_sequence_numbers(), ["2"]);
        assert_eq!(report.records[0].outcome, Outcome::Exported);
        assert!(exporter.kv.values.lock().unwrap().contains_key("a-ok"));
    }

    #[tokio::test]
    async fn lag_counts_only_times_a_stream_could_hold() {
        let exporter = exporter(MemoryKv::default());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let mut recent = record(1, "INSERT", "recent");
        recent["dynamodb"]["ApproximateCreationDateTime"] = json!(now - 5.0);
        let mut sample = record(2, "INSERT", "sample");
        sample["dynamodb"]["ApproximateCreationDateTime"] = json!(1_735_689_600.0); // 2025
        let report = export(&exporter, vec![recent, sample]).await;
        assert_eq!(report.count(|o| *o == Outcome::Exported), 2);
        assert_eq!(report.lag_seconds.len(), 1, "{:?}", report.lag_seconds);
        assert!((4.0..60.0).contains(&report.lag_seconds[0]));
    }
}
