//! Stage 2, the snapshot: what a batch must know before it is planned, read at once: a stream
//! batch's items as the table holds them now and what the ledger recorded of their indexes,
//! each record's previous shop, API keys, other indexes' references, the settings of the
//! indexes that claim a shop given up, and the overrides of each filter rebuilt.

use std::collections::{BTreeSet, HashMap};

use futures::StreamExt as _;
use tokio::time::Instant;

use super::{Exporter, Prepared, Run, BEFORE_MIGRATION, CONCURRENT_QUERIES};
use crate::domain::{AccountCell, ApiKey};
use crate::domain::{IndexRef, TableKey};
use crate::pipeline::api_key_cache::ApiKeyCache;
use crate::pipeline::plan::{self, Snapshot};
use crate::pipeline::records::{Change, ChangeRecord};
use crate::ports::{before_deadline, ApiKeySource, LookupCounts, Ports};
use crate::ports::{IndexRefs, Ledger, PortError, Referred, SettingsTable};
use crate::report::Outcome;

impl<P: Ports> Exporter<P> {
    /// The queries of each index's overrides: from the batch when it holds them all, else a
    /// Query of the table per index.
    async fn override_queries(
        &self,
        records: &[ChangeRecord],
        wanted: Vec<IndexRef>,
        run: Run,
        deadline: Instant,
    ) -> Vec<(IndexRef, Result<Vec<String>, PortError>)> {
        match run.overrides_in_batch {
            true => {
                // Grouped in one pass: a reconcile's batch is the whole fleet.
                let mut by_index: HashMap<&IndexRef, Vec<String>> = HashMap::new();
                for record in records {
                    if let Some(Change::UpsertQuery(c)) = &record.change {
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
            false => self.overrides_of(wanted, deadline).await,
        }
    }

    /// The queries of each index's overrides, a keys-only Query of the table each, in order
    /// ([`CONCURRENT_QUERIES`] at once).
    pub async fn overrides_of(
        &self,
        indexes: impl IntoIterator<Item = IndexRef>,
        deadline: Instant,
    ) -> Vec<(IndexRef, Result<Vec<String>, PortError>)> {
        futures::stream::iter(indexes)
            .map(|index| async move {
                let queries = self.table.override_queries(&index);
                let queries = before_deadline(deadline, "overrides", queries).await;
                (index, queries)
            })
            .buffered(CONCURRENT_QUERIES)
            .collect()
            .await
    }

    /// What the ledger recorded of the records' indexes (their old shops without a KV read,
    /// and what to record), when the run keeps references.
    pub(super) async fn known_refs(
        &self,
        indexes: BTreeSet<IndexRef>,
        run: Run,
        deadline: Instant,
    ) -> Result<Option<HashMap<IndexRef, IndexRefs>>, PortError> {
        if !run.records_references {
            return Ok(None);
        }
        let indexes: Vec<IndexRef> = indexes.into_iter().collect();
        let read = self.ledger.index_refs(&indexes);
        before_deadline(deadline, "recorded references", read)
            .await
            .map(Some)
    }

    /// A stream batch's first reads, together: its records' items as the table holds them now
    /// (`ChangeRecord::as_now`), what the ledger recorded of their indexes, and whether its
    /// references are complete. When one could not be read, or they are not complete, every
    /// record not already ended fails (nothing of the batch is then sent).
    pub(super) async fn read_now(
        &self,
        records: Vec<ChangeRecord>,
        deadline: Instant,
    ) -> (Vec<ChangeRecord>, Option<HashMap<IndexRef, IndexRefs>>) {
        // Each record's item, once: asked for, then looked up.
        let item_keys: Vec<Option<TableKey>> = records.iter().map(ChangeRecord::item_key).collect();
        let now = async {
            let keys: BTreeSet<&TableKey> = item_keys.iter().flatten().collect();
            let keys: Vec<TableKey> = keys.into_iter().cloned().collect();
            let mut now = HashMap::with_capacity(keys.len());
            let read = self.table.records(keys, |key, record| {
                now.insert(key, record);
            });
            before_deadline(deadline, "the records' items", read).await?;
            Ok(now)
        };
        // Every index a settings record names, inserted ones too: an earlier life of it, removed
        // while an alias kept it, may have left a shop key that is its to give up.
        let indexes = (records.iter())
            .filter_map(|record| match &record.change {
                Some(Change::RemoveIndex { index, .. }) => Some(index.clone()),
                _ => None,
            })
            .collect();
        let known = self.known_refs(indexes, Run::STREAM, deadline);
        let complete = before_deadline(deadline, "ledger", self.ledger.references_complete());
        let error = match tokio::join!(now, known, complete) {
            (Ok(now), Ok(known), Ok(true)) => {
                let records = (records.into_iter().zip(item_keys))
                    .map(|(record, key)| record.as_now(key.and_then(|key| now.get(&key))))
                    .collect();
                return (records, known);
            }
            (_, _, Ok(false)) => {
                tracing::error!("{BEFORE_MIGRATION}");
                PortError::Refused(BEFORE_MIGRATION.into())
            }
            (Err(error), _, _) | (_, Err(error), _) | (_, _, Err(error)) => error,
        };
        (
            records.into_iter().map(|r| r.unread(&error)).collect(),
            None,
        )
    }

    /// Stage 2, the snapshot: everything the plan needs of the outside, read before it: each
    /// record's previous shops settled from the ledger, the API keys, who refers to what the records remove or
    /// give up, the claimers' settings, the overrides of each filter rebuilt.
    pub(super) async fn snapshot(
        &self,
        records: &mut [ChangeRecord],
        known: Option<&HashMap<IndexRef, IndexRefs>>,
        api_keys: ApiKeys,
        run: Run,
        deadline: Instant,
    ) -> (Snapshot, LookupCounts) {
        let recorded = |index: &IndexRef| {
            let refs = known.and_then(|known| known.get(index));
            refs.map(|refs| refs.shops.clone()).unwrap_or_default()
        };
        plan::settle_previous_shops(records, recorded);
        self.look_up(records, api_keys, run, deadline).await
    }

    /// Every writer's stages 2 and 3, the check's included, beside what the ledger recorded of
    /// the records' indexes (`known_refs`, when the run keeps references): the API keys looked
    /// up first (a record whose account has none is rejected then), what the records' indexes
    /// no longer name given up (dropped alias targets, a rejected record's shops), then the
    /// snapshot and the plan.
    pub(super) async fn plan_records(
        &self,
        mut records: Vec<ChangeRecord>,
        mut known_refs: Option<HashMap<IndexRef, IndexRefs>>,
        run: Run,
        deadline: Instant,
    ) -> Prepared {
        let fresh = !run.stream;
        let api_keys = self.api_keys_first(&mut records, fresh, deadline).await;
        let derived = match known_refs.as_mut() {
            Some(known) => self.dropped_targets(&mut records, known, deadline).await,
            None => Vec::new(),
        };
        let known = known_refs.as_ref();
        let snapshot = self.snapshot(&mut records, known, api_keys, run, deadline);
        let (snapshot, api_keys) = snapshot.await;
        let plan = plan::plan(&mut records, &snapshot, &self.options.default_cell);
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
            delete_owners: HashMap::new(),
            known_refs,
            derived,
            span: None,
        }
    }

    /// API keys looked up before what a batch gives up is worked out (fresh for an operator's):
    /// a record whose account has no API key in its cell is rejected then, as the plan would
    /// reject it, so that its index gives up the shops it no longer claims as every rejected
    /// record's does. A lookup that fails for now rejects nothing. Answers the keys looked up.
    pub(crate) async fn api_keys_first<'r>(
        &self,
        records: impl IntoIterator<Item = &'r mut ChangeRecord>,
        fresh: bool,
        deadline: Instant,
    ) -> ApiKeys {
        let cell = &self.options.default_cell;
        let records: Vec<(&mut ChangeRecord, AccountCell)> = (records.into_iter())
            .filter_map(|record| {
                let Some(Change::UpsertIndex { settings, .. }) = &record.change else {
                    return None;
                };
                let wanted = settings.account_cell(cell);
                Some((record, wanted))
            })
            .collect();
        let wanted = records.iter().map(|(_, wanted)| wanted.clone()).collect();
        let mut api_keys = ApiKeys::default();
        api_keys.add(&self.api_keys, wanted, fresh, deadline).await;
        for (record, wanted) in records {
            if let Some(Err(error)) = api_keys.keys.get(&wanted) {
                if !error.is_transient() {
                    record.end(Outcome::of_port_error(error, ""));
                }
            }
        }
        api_keys
    }

    /// What a batch needs before planning besides its API keys (looked up first): who else
    /// refers to what the batch removes or gives up, and the settings (and API keys) of who
    /// claims a shop it gives up.
    async fn look_up(
        &self,
        records: &[ChangeRecord],
        mut api_keys: ApiKeys,
        run: Run,
        deadline: Instant,
    ) -> (Snapshot, LookupCounts) {
        let fresh = !run.stream;
        let mut snapshot = Snapshot::default();
        // Who aliases what is removed, who claims a shop given up: the ledger's candidates,
        // each checked against its record in the table.
        if plan::references_wanted(records) {
            let asked = plan::reference_questions(records).into_iter().collect();
            let references = self.referrers_of(asked, records, deadline).await;
            let references = references.map(plan::Referrers::of);
            let wanted = (references.as_ref().ok()).map(|refs| plan::claimers(records, refs));
            snapshot.references = Some(references);
            if let Some(wanted) = wanted.filter(|wanted| !wanted.is_empty()) {
                let keys = &mut api_keys;
                let claimers = self.look_up_claimers(wanted, &mut snapshot, keys, fresh, deadline);
                claimers.await;
            }
        }
        // The overrides of each index whose filter the records rebuild.
        let wanted = plan::filters_wanted(records).into_iter().collect();
        let overrides = self.override_queries(records, wanted, run, deadline).await;
        snapshot.overrides = overrides.into_iter().collect();
        snapshot.api_keys = api_keys.keys;
        (snapshot, api_keys.counts)
    }

    /// Of these shops, each given up by its index, those another index serves now
    /// ([`plan::serving`]; a claimer whose API key cannot be looked up for now counts), for the
    /// orphan finder: such a key is no orphan, the table step writes it. A claimer whose
    /// settings could not be read fails the read.
    pub async fn served(
        &self,
        given_up: &[(String, IndexRef)],
        deadline: Instant,
    ) -> Result<Vec<String>, PortError> {
        if given_up.is_empty() {
            return Ok(Vec::new());
        }
        let asked = (given_up.iter()).map(|(shop, _)| Referred::Shop(shop.clone()));
        let referrers = self.referrers_of(asked.collect(), &[], deadline).await?;
        let referrers = plan::Referrers::of(referrers);
        let claimers = given_up
            .iter()
            .filter_map(|(shop, _)| referrers.by_shop.get(shop));
        let wanted = claimers.flatten().cloned().collect();
        let (mut snapshot, mut api_keys) = (Snapshot::default(), ApiKeys::default());
        self.look_up_claimers(wanted, &mut snapshot, &mut api_keys, false, deadline)
            .await;
        if let Some(Err(error)) = snapshot.claimers.values().find(|read| read.is_err()) {
            return Err(error.clone());
        }
        snapshot.api_keys = api_keys.keys;
        let cell = &self.options.default_cell;
        let nobody = |(shop, index): &&(String, IndexRef)| {
            matches!(
                plan::serving(shop, index, &snapshot, &referrers, cell),
                Ok(None)
            )
        };
        let served = given_up.iter().filter(|given| !nobody(given));
        Ok(served.map(|(shop, _)| shop.clone()).collect())
    }

    /// Reads the indexes that claim a shop key, and the API keys their values need.
    async fn look_up_claimers(
        &self,
        claimers: BTreeSet<IndexRef>,
        snapshot: &mut Snapshot,
        api_keys: &mut ApiKeys,
        fresh: bool,
        deadline: Instant,
    ) {
        // Every claimer's settings record in one read (100 keys a call).
        let found = self.settings_of(&claimers, deadline).await;
        let read: Vec<_> = (claimers.into_iter())
            .map(|index| {
                let settings = found.as_ref().map(|found| match found.get(&index) {
                    Some(ChangeRecord {
                        change: Some(Change::UpsertIndex { settings, .. }),
                        ..
                    }) => Some(settings.clone()),
                    _ => None,
                });
                (index, settings.map_err(Clone::clone))
            })
            .collect();
        let cell = &self.options.default_cell;
        let wanted: BTreeSet<AccountCell> = read
            .iter()
            .filter_map(|(_, settings)| settings.as_ref().ok()?.as_ref())
            .map(|s| s.account_cell(cell))
            .collect();
        api_keys.add(&self.api_keys, wanted, fresh, deadline).await;
        snapshot.claimers.extend(read);
    }
}

/// The API keys a batch looked up (first, before what it gives up is worked out, then those
/// of the claimers its snapshot found), and what that took.
#[derive(Default)]
pub struct ApiKeys {
    keys: HashMap<AccountCell, Result<ApiKey, PortError>>,
    counts: LookupCounts,
}

impl ApiKeys {
    /// Those of `wanted` not looked up yet, looked up (one call per account and cell).
    async fn add<S: ApiKeySource>(
        &mut self,
        cache: &ApiKeyCache<S>,
        wanted: BTreeSet<AccountCell>,
        fresh: bool,
        deadline: Instant,
    ) {
        let wanted = wanted.into_iter().filter(|w| !self.keys.contains_key(w));
        let (keys, counts) = cache.lookup_all(wanted.collect(), fresh, deadline).await;
        self.keys.extend(keys);
        self.counts.calls += counts.calls;
        self.counts.cache_hits += counts.cache_hits;
    }
}
