//! The exporter core: the stages every writer's records go through (docs/contract.md, "The
//! reconciler's stages"), one module each: the one reader (`state.rs`) reads the scope's
//! states, the pure `pipeline::desired` decides its keys (a dry run stops there), then the
//! intents, the write, the check and the stream's shrink. The stream and every operator mode go
//! through here.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use tokio::time::Instant;

use crate::domain::kv::own_key_valid;
use crate::domain::net::{self, Protection};
use crate::domain::{IndexRef, KvKey, TableSpan};
use crate::pipeline::api_key_cache::ApiKeyCache;
use crate::pipeline::desired::{self, Desired, Settings, Want, Wanted, World};
use crate::pipeline::records::{Change, ChangeRecord, Expected};
use crate::ports::{
    before_deadline, ApiKeySource, IndexRefs, KvStore, Ledger, LookupCounts, PortError, Ports,
    ReconcileProgress, SettingsTable,
};
use crate::report::{BatchReport, Outcome};

// The stages (docs/contract.md, "The reconciler's stages"): the reader, then the pure
// `pipeline::desired`, intents, write, check, shrink. `reads` and `references` serve the
// operator modes; `windows` forces each window of "Concurrent writers" in memory.
mod check;
mod intents;
mod reads;
mod references;
mod runs;
mod shrink;
mod state;
mod windows;
mod write;
pub use runs::{AddReferences, Closed, Runs};

/// Why a writer other than the backfill does nothing before the migration: the ledger must name
/// every shop an index's keys may be on, and who aliases or claims what, before any writer
/// relies on it (docs/operations.md).
pub const BEFORE_MIGRATION: &str = "waiting for the migration: the ledger's references are not \
    complete (docs/operations.md, \"Migrating a table that holds indexes\": make migrate)";

/// How many Queries of an index's overrides are in flight at once (keys only, each in its own
/// account's partition): an override batch reads one for each index whose filter it rebuilds.
pub const CONCURRENT_QUERIES: usize = 16;

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
pub struct Exporter<P: Ports> {
    kv: P::Kv,
    api_keys: ApiKeyCache<P::ApiKeys>,
    table: P::Table,
    ledger: P::Ledger,
    options: ExportOptions,
}

/// How a batch is run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// The stream's (or its check's): its records are the newest word on their items, it
    /// reuses an API key fetched a moment ago, and it shrinks the ledger after its check. An
    /// operator's always fetches API keys (a rotated-out key is never written).
    pub stream: bool,
    /// The batch holds every override of its indexes (a re-export or verify with query configs,
    /// a reconcile, a backfill's scan, unless a piece or run is cut: `holding_overrides`): their
    /// filters are built from it, not from a Query of the table per index.
    pub overrides_in_batch: bool,
    /// Keeps each index's references in the ledger (the stream; a backfill fills them in).
    pub records_references: bool,
    /// Its intents own what is recorded already (a re-export, a verify's repair): each counts,
    /// even when it adds nothing, so a stream's shrink that read before it takes none of it out
    /// (a backfill's page step counts every reference its records name before the batch).
    pub owns_recorded: bool,
    /// The reconcile's sweep (a stream batch of removals exported again): its shrink takes a
    /// record out only once the reconcile's mark on it is ripe ([`IndexRefs::ripe`]).
    pub sweep: bool,
}

impl Run {
    pub const STREAM: Run = Run {
        stream: true,
        overrides_in_batch: false,
        records_references: true,
        owns_recorded: false,
        sweep: false,
    };
    /// The reconcile's sweep of removed indexes' records: the stream's, but for its shrink.
    pub const SWEEP: Run = Run {
        sweep: true,
        ..Run::STREAM
    };
    /// Operators always get the current API key, and record the references they write
    /// before writing them (re-export, verify).
    pub const OPERATOR: Run = Run {
        stream: false,
        overrides_in_batch: true,
        records_references: true,
        owns_recorded: true,
        sweep: false,
    };
    /// A backfill's: an operator's whose intents add only what the ledger lacks (its page step
    /// counted every reference its records name: `AddReferences::Counted`).
    pub const BACKFILL: Run = Run {
        owns_recorded: false,
        ..Run::OPERATOR
    };
    /// An operator's run whose references are recorded already: a check of what landed
    /// (it writes what the records it checks referred to), a reconcile (its table step adds
    /// what each page refers to before its repairs).
    pub const CHECK: Run = Run {
        records_references: false,
        ..Run::OPERATOR
    };

    /// The same run, its batch holding every override of its indexes or not (a piece or run
    /// of the table that may not: their filters then come from a Query).
    pub const fn holding_overrides(self, held: bool) -> Run {
        Run {
            overrides_in_batch: held,
            ..self
        }
    }
}

/// Records with their scope read and its keys decided, nothing sent yet.
#[derive(Debug)]
pub struct Prepared {
    pub records: Vec<ChangeRecord>,
    /// The keys the scope implies, and how each index's change ends.
    pub desired: Desired,
    pub api_keys: LookupCounts,
    pub run: Run,
    /// What each index whose change is exported leaves referred to (`None`: removed).
    leaves: BTreeMap<IndexRef, Option<IndexRefs>>,
    /// The shops each index of the scope gave up.
    given_up: Vec<(IndexRef, String)>,
    /// Indexes in scope on behalf of another (its records fail for them).
    because: BTreeMap<IndexRef, IndexRef>,
    /// The batch's indexes' references as the ledger recorded them, when the run keeps them.
    known_refs: Option<HashMap<IndexRef, IndexRefs>>,
    /// Where in the table the records were read (a backfill's pages): the check reads it again.
    span: Option<TableSpan>,
}

impl Prepared {
    /// Records that cannot be prepared: each one not already decided fails for `error`
    /// (reported for retry when it is transient), and nothing is sent.
    fn none_sent(records: Vec<ChangeRecord>, run: Run, error: PortError) -> Self {
        let records = records.into_iter().map(|r| r.unread(&error)).collect();
        Self::of(records, run, World::default(), Desired::default())
    }

    fn of(records: Vec<ChangeRecord>, run: Run, world: World, desired: Desired) -> Self {
        let mut leaves = BTreeMap::new();
        let (mut given_up, mut because) = (Vec::new(), BTreeMap::new());
        for (index, state) in world.indexes {
            let shops = state.given_up().into_iter().cloned();
            given_up.extend(shops.map(|shop| (index.clone(), shop)));
            if let Some(by) = state.because.clone() {
                because.insert(index.clone(), by);
            }
            let leaves_now = match &state.settings {
                Some(Settings::Valid(settings)) => Some(references::refs_of(settings)),
                Some(Settings::Absent) => None,
                _ => continue,
            };
            if desired.outcomes.get(&index) == Some(&Outcome::Exported) {
                leaves.insert(index, leaves_now);
            }
        }
        Prepared {
            records,
            desired,
            api_keys: LookupCounts::default(),
            run,
            leaves,
            given_up,
            because,
            known_refs: None,
            span: None,
        }
    }

    /// The records were read from this stretch of the table: the check reads it again, page by
    /// page, instead of each index on its own.
    pub fn read_from(&mut self, span: TableSpan) {
        self.span = Some(span);
    }

    /// Nothing is sent: the intents could not be recorded (a reader could miss a referrer
    /// whose keys landed, a replay a shop a key was put on), so every record on its way is
    /// retried.
    fn withhold(&mut self, error: &PortError) {
        let why = format!("not sent: its references could not be recorded in the ledger: {error}");
        (self.records.iter_mut()).for_each(|record| fail(&mut record.outcome, &why));
        self.desired.keys.clear();
    }

    /// Keys deleted for the index each was written for (an orphaned key, an override gone
    /// from the table): they fail that index's records, or a record of their own.
    pub fn delete(&mut self, deletes: Vec<(KvKey, IndexRef)>) {
        for (key, index) in deletes {
            let wanted = Wanted {
                want: Want::Delete,
                checked_as: index.clone(),
                by: index,
                derived: true,
            };
            self.desired.keys.insert(key, wanted);
        }
    }

    /// A reconcile's records whose lookups failed (their cell's API keys service down) are left
    /// for the next pass instead of failing this one: logged and skipped (their keys are kept
    /// as they are).
    pub fn leave_failed_unchecked(&mut self) {
        for record in &mut self.records {
            if let Outcome::Failed(reason) = &record.outcome {
                tracing::warn!(index = ?record.index, %reason, "reconcile leaves this index unchecked");
                record.outcome = Outcome::Skipped("left unchecked this pass".into());
            }
        }
    }

    /// Where a failure of a key `by` decided goes: the records of the index it was decided for.
    fn failing(&self, by: &IndexRef) -> IndexRef {
        self.because.get(by).unwrap_or(by).clone()
    }
}

/// A record fails for `why` (a rejected one too: its replay reads its index again); one
/// skipped on purpose stays so.
fn fail(outcome: &mut Outcome, why: &str) {
    match outcome {
        Outcome::Rejected(_) => *outcome = Outcome::Failed(why.to_owned()),
        _ => outcome.fail(why),
    }
}

/// Every record of `index` ends as `outcome` says (failed, or rejected when the key was refused
/// on its own); with none in the batch, a record of its own.
pub(crate) fn fail_index(records: &mut Vec<ChangeRecord>, index: &IndexRef, outcome: Outcome) {
    let mut found = false;
    for record in records.iter_mut().filter(|r| r.index.as_ref() == Some(index)) {
        match &outcome {
            Outcome::Failed(why) => fail(&mut record.outcome, why),
            _ if matches!(record.outcome, Outcome::Exported | Outcome::Kept { .. }) => {
                record.outcome = outcome.clone();
            }
            _ => {}
        }
        found = true;
    }
    if !found {
        records.push(ChangeRecord::of(Some(index.clone()), Err(outcome)));
    }
}

/// Each record ends as its index's change does: a settings record as the index, an override's
/// exported unless Cloudflare would refuse its value; every record of a failed index fails,
/// and the records of an index whose dropped target failed.
fn settle(records: &mut [ChangeRecord], desired: &Desired, because: &BTreeMap<IndexRef, IndexRef>) {
    for record in records.iter_mut() {
        let Some(outcome) = record.index.as_ref().and_then(|i| desired.outcomes.get(i)) else {
            continue;
        };
        match (&record.change, outcome) {
            (_, Outcome::Failed(why)) => fail(&mut record.outcome, why),
            (None, _) | (Some(Change::RemoveQuery { .. }), _) => {}
            (Some(Change::UpsertQuery(config)), _) => {
                let key = KvKey::query_config(&config.index, &config.query);
                if let Some(why) = desired.refused.get(&key) {
                    record.outcome = Outcome::Rejected(why.clone());
                }
            }
            (Some(_), outcome) => record.outcome = outcome.clone(),
        }
    }
    for (index, by) in because {
        if let Some(Outcome::Failed(why)) = desired.outcomes.get(index) {
            let why = format!("the alias target it dropped, {index}: {why}");
            let of_by = |r: &&mut ChangeRecord| r.index.as_ref() == Some(by);
            records.iter_mut().filter(of_by).for_each(|r| fail(&mut r.outcome, &why));
        }
    }
}

impl<K: KvStore, A: ApiKeySource, T: SettingsTable, L: Ledger> Exporter<(K, A, T, L)> {
    pub fn new(
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
}

impl<P: Ports> Exporter<P> {
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
    pub fn default_configs_sk(&self) -> &str {
        &self.options.default_configs_sk
    }

    /// How often a scheduled reconcile starts a new full pass.
    pub fn reconcile_every(&self) -> std::time::Duration {
        self.options.reconcile_every
    }

    /// The KV store, for the operators' reads (values in bulk, key listings): its writes go
    /// through the stages.
    pub fn kv(&self) -> &P::Kv {
        &self.kv
    }

    /// The settings table's adapter (its own counters, for tests).
    pub fn table(&self) -> &P::Table {
        &self.table
    }

    /// What a stream record is checked against while it is decoded.
    pub fn expected(&self) -> Expected<'_> {
        Expected {
            default_configs_sk: &self.options.default_configs_sk,
            stream_arn: self.options.stream_arn.as_deref(),
        }
    }

    /// Exports a stream batch's records, in stream order, each as its item is now.
    pub async fn export_stream(
        &self,
        records: Vec<ChangeRecord>,
        deadline: Instant,
    ) -> BatchReport {
        self.export_read_now(records, Run::STREAM, deadline).await
    }

    /// The reconcile's sweep: these removals exported as the stream exports a REMOVE, each
    /// record taken out only once its mark is ripe ([`Run::SWEEP`]).
    pub async fn export_sweep(
        &self,
        removals: Vec<ChangeRecord>,
        deadline: Instant,
    ) -> BatchReport {
        self.export_read_now(removals, Run::SWEEP, deadline).await
    }

    /// Stream records exported as the table holds their items now.
    async fn export_read_now(
        &self,
        records: Vec<ChangeRecord>,
        run: Run,
        deadline: Instant,
    ) -> BatchReport {
        let (records, known) = self.read_now(records, deadline).await;
        let prepared = self.plan_records(records, known, run, deadline);
        self.apply(prepared.await, deadline).await
    }

    /// Exports decoded records (table items), in their order.
    pub async fn export(
        &self,
        records: Vec<ChangeRecord>,
        run: Run,
        deadline: Instant,
    ) -> BatchReport {
        let prepared = self.prepare(records, run, deadline).await;
        self.apply(prepared, deadline).await
    }

    /// A repair (verify, reconcile): of the keys decided only those in `writes`, and the
    /// `deletes` (each with the index it was written for), checked as every operator's writes
    /// are: a key whose index changed while this one wrote it is decided again from the table
    /// as it is now and written again.
    pub async fn repair(
        &self,
        mut prepared: Prepared,
        writes: &BTreeSet<KvKey>,
        deletes: Vec<(KvKey, IndexRef)>,
        deadline: Instant,
    ) -> BatchReport {
        prepared.desired.keys.retain(|key, _| writes.contains(key));
        // A run that read no references (a reconcile's table step) counts every reference of
        // the indexes it writes as its intent: a stream's shrink that read the ledger before
        // then takes none of them out (a shop it finds recorded may be on its way out).
        if !prepared.run.records_references {
            let writing: BTreeSet<&IndexRef> = prepared.desired.keys.values().map(|w| &w.by).collect();
            let left: Vec<_> = (prepared.leaves.iter())
                .filter(|(index, _)| writing.contains(index))
                .filter_map(|(index, refs)| Some((index.clone(), refs.clone()?)))
                .collect();
            if let Err(error) = self.add_references(&left, true, deadline).await {
                prepared.withhold(&error);
            }
        }
        prepared.delete(deletes);
        self.apply(prepared, deadline).await
    }

    /// Everything but the KV writes: the scope read (with what the ledger recorded, when the
    /// run keeps references) and its keys decided. A dry run stops here.
    pub async fn prepare(
        &self,
        records: Vec<ChangeRecord>,
        run: Run,
        deadline: Instant,
    ) -> Prepared {
        // Rejected records' indexes too (what they no longer claim is given up), but none whose
        // own key is no KV key: it has nothing recorded, and its ledger key could be refused.
        let indexes = records.iter().filter_map(|record| record.index.clone());
        let indexes = indexes.filter(own_key_valid);
        match self.known_refs(indexes.collect(), run, deadline).await {
            Ok(known) => self.plan_records(records, known, run, deadline).await,
            // Nothing could then be recorded: the batch is retried, never exported without.
            Err(error) => Prepared::none_sent(records, run, error),
        }
    }

    /// Every writer's reading and deciding, the check's included: the one reader, then the one
    /// pure decision of the scope's keys; each record ends as its index does.
    pub(super) async fn plan_records(
        &self,
        mut records: Vec<ChangeRecord>,
        known_refs: Option<HashMap<IndexRef, IndexRefs>>,
        run: Run,
        deadline: Instant,
    ) -> Prepared {
        let known = known_refs.as_ref();
        let (world, api_keys) = self.read_world(&mut records, known, run, deadline).await;
        let desired = desired::desired(&world);
        for (index, note) in &desired.notes {
            tracing::info!(account = %index.account, index = %index.name, "{note}");
        }
        let mut prepared = Prepared::of(records, run, world, desired);
        settle(&mut prepared.records, &prepared.desired, &prepared.because);
        prepared.api_keys = api_keys;
        prepared.known_refs = known_refs;
        prepared
    }

    /// Sends the decided keys and decides every record's outcome (docs/contract.md,
    /// "Concurrent writers"): when the run keeps references, what its indexes refer to is
    /// recorded first (the intent); then the KV writes; then the check of what landed; and
    /// only then, for the stream, what the check confirmed given up is taken out of the ledger.
    pub async fn apply(&self, mut prepared: Prepared, deadline: Instant) -> BatchReport {
        let run = prepared.run;
        let span = prepared.span.take();
        let intents = intents::record(&self.ledger, &mut prepared, deadline).await;
        let mut report = write::send(&self.kv, prepared, deadline).await;
        self.check(&mut report, run, span, deadline).await;
        let failed = (report.records.iter()).any(|r| matches!(r.outcome, Outcome::Failed(_)));
        match (intents, run.stream) {
            (Some(mut intents), true) => {
                let handed = std::mem::take(&mut intents.handed);
                shrink::record(&self.ledger, (intents, run.sweep), &report, deadline).await;
                // Its replay, decided from the table as it is then, may no longer hand them
                // over (seed 145927).
                if failed {
                    let why = "the shops a failed batch handed over";
                    intents::add_again(&self.ledger, &handed, why, deadline).await;
                }
            }
            (Some(intents), false)
                if run.owns_recorded && failed && !net::off(Protection::RecordAgain) =>
            {
                intents::record_again(&self.ledger, &intents, deadline).await;
            }
            _ => {}
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::memory::{CountingTable, MemoryKv, MemoryLedger, SameKey};
    use crate::pipeline::records::decode_record;
    use serde_json::json;
    use std::collections::HashSet;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    /// The core over in-memory KV, one API key and an empty table, its ledger's references
    /// complete (the migration of an empty table; shared with `check`).
    pub(super) fn exporter(
        kv: MemoryKv,
    ) -> Exporter<(MemoryKv, SameKey, CountingTable, MemoryLedger)> {
        let ledger = MemoryLedger::default();
        ledger.complete.store(true, Ordering::SeqCst);
        Exporter::new(
            kv,
            ApiKeyCache::new(SameKey, Duration::from_secs(60)),
            CountingTable::default(),
            ledger,
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
        exporter: &Exporter<(MemoryKv, SameKey, CountingTable, MemoryLedger)>,
        batch: Vec<serde_json::Value>,
    ) -> BatchReport {
        table_after(&exporter.table, &batch);
        let records = batch
            .iter()
            .map(|r| decode_record(&r.to_string(), exporter.default_configs_sk()))
            .collect();
        exporter.export_stream(records, deadline()).await
    }

    /// The table as the stream's records leave it: each one's new image, or none after a REMOVE.
    pub(super) fn table_after(table: &CountingTable, batch: &[serde_json::Value]) {
        let mut items = table.items.lock().unwrap();
        for record in batch {
            let change = &record["dynamodb"];
            let key = |name: &str| change["Keys"][name]["S"].as_str().unwrap().to_owned();
            let key = (key("pk"), key("sk"));
            match record["eventName"].as_str() {
                Some("REMOVE") => items.remove(&key),
                _ => {
                    let image = change["NewImage"].clone();
                    let item = crate::dynamo::item_from_dynamodb_json(image).unwrap();
                    items.insert(key, item)
                }
            };
        }
    }

    fn deadline() -> Instant {
        Instant::now() + Duration::from_secs(10)
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
    async fn a_record_exports_its_item_as_the_table_holds_it_now() {
        let exporter = exporter(MemoryKv::default());
        exporter
            .kv
            .values
            .lock()
            .unwrap()
            .insert("a-gone".into(), "{}".into());
        let batch = vec![record(1, "INSERT", "changed"), record(2, "MODIFY", "gone")];
        table_after(&exporter.table, &batch);
        {
            // Since the records: one item changed again, the other was removed.
            let mut items = exporter.table.items.lock().unwrap();
            let changed = ("a".to_owned(), "INDEX#changed".to_owned());
            let item = items.get_mut(&changed).unwrap();
            let endpoint = serde_dynamo::AttributeValue::S("https://newer".into());
            item.insert("index_endpoint".into(), endpoint);
            items.remove(&("a".to_owned(), "INDEX#gone".to_owned()));
        }
        let records = (batch.iter())
            .map(|r| decode_record(&r.to_string(), exporter.default_configs_sk()))
            .collect();

        let report = exporter.export_stream(records, deadline()).await;

        assert_eq!(report.count(|o| *o == Outcome::Exported), 2);
        let values = exporter.kv.values.lock().unwrap();
        assert!(values["a-changed"].contains("https://newer"), "{values:?}");
        assert!(!values.contains_key("a-gone"), "{values:?}");
    }

    #[tokio::test]
    async fn every_index_the_batch_names_is_asked_of_the_ledger() {
        let exporter = exporter(MemoryKv::default());
        let batch = vec![
            record(1, "INSERT", "new"),
            record(2, "MODIFY", "changed"),
            record(3, "INSERT", "again"),
            record(4, "MODIFY", "again"),
        ];

        let report = export(&exporter, batch).await;

        assert_eq!(report.count(|o| *o == Outcome::Exported), 4);
        // Inserted ones too: an earlier life, kept for an alias, may have left a shop key.
        let asked = exporter.ledger.asked.lock().unwrap().clone();
        let names: Vec<&str> = asked.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["again", "changed", "new"]);
        // Its references are recorded all the same.
        let refs = exporter.ledger.refs.lock().unwrap();
        assert!(refs.contains_key(&IndexRef::new("a", "new")), "{refs:?}");
        assert!(exporter.kv.values.lock().unwrap().contains_key("a-new"));
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
