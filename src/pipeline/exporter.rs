//! The exporter core: the stages every writer's records go through (docs/contract.md, "The
//! reconciler's stages"), one module each: the one reader (`state.rs`) reads the scope's
//! states, the pure `pipeline::desired` decides its keys (a dry run stops there), then the
//! intents, the write, the check and the stream's shrink. The stream and every operator mode go
//! through here.

use std::collections::{BTreeSet, HashMap};

use tokio::time::Instant;

use crate::domain::kv::own_key_valid;
use crate::domain::net::{self, Protection};
use crate::domain::{IndexRef, KvKey};
use crate::pipeline::api_key_cache::ApiKeyCache;
use crate::pipeline::desired;
use crate::pipeline::records::{ChangeRecord, Expected};
use crate::ports::{
    before_deadline, ApiKeySource, IndexRefs, KvStore, Ledger, PortError, Ports, ReconcileProgress,
    SettingsTable,
};
use crate::report::{BatchReport, Outcome};

// The stages (docs/contract.md, "The reconciler's stages"): the reader, then the pure
// `pipeline::desired`, intents, write, check, shrink. `reads` and `references` serve the
// operator modes; `windows` forces each window of "Concurrent writers" in memory.
mod check;
mod intents;
mod prepared;
mod reads;
mod references;
mod runs;
mod shrink;
mod state;
mod windows;
mod write;
pub use prepared::Prepared;
use prepared::{fail_index, settle};
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
            let left: Vec<_> = (prepared.leaves_writing().into_iter())
                .filter_map(|(index, refs)| Some((index, refs?)))
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
