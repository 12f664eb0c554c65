//! The one reader, for every writer and the check: a scope's records become each index's state
//! ([`IndexState`]) with what deciding its keys needs of the outside, read at once: the raw
//! references of its rejected records, the alias targets its indexes dropped (each added to the
//! scope), who aliases what it removes and claims what it gives up, the claimers' settings,
//! API keys, and the queries of each filter in scope. A stream batch first reads its items as
//! the table holds them now, and what the ledger recorded of their indexes (`read_now`).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use futures::StreamExt as _;
use tokio::time::Instant;

use super::{Exporter, Run, BEFORE_MIGRATION, CONCURRENT_QUERIES};
use crate::domain::validate::shop_id_problem;
use crate::domain::{AccountCell, ApiKey, IndexId, IndexRef, TableKey};
use crate::pipeline::api_key_cache::ApiKeyCache;
use crate::pipeline::desired::serving;
use crate::pipeline::records::{Change, ChangeRecord};
use crate::pipeline::scope::{states_of, IndexState, Referrers, Settings, World};
use crate::ports::{before_deadline, ApiKeySource, LookupCounts, Ports};
use crate::ports::{IndexRefs, Ledger, PortError, Referred, SettingsTable};
use crate::report::Outcome;

impl<P: Ports> Exporter<P> {
    /// The scope of `records` read: each index's state, and the indexes it draws in. `recorded`:
    /// what the ledger recorded of the records' indexes (`None`: nothing given up). A record
    /// whose index's state cannot be read ends failed (retried).
    pub(super) async fn read_world(
        &self,
        records: &mut [ChangeRecord],
        recorded: Option<&HashMap<IndexRef, IndexRefs>>,
        run: Run,
        deadline: Instant,
    ) -> (World, LookupCounts) {
        let mut indexes = states_of(records);
        for (index, state) in &mut indexes {
            let known = recorded.and_then(|recorded| recorded.get(index));
            state.recorded = known.cloned().unwrap_or_default();
        }
        if let Err((failed, error)) = self.raw_refs(&mut indexes, deadline).await {
            let what = "what its index no longer names could not be read: ";
            fail_records(records, &failed, &Outcome::of_port_error(&error, what));
            indexes.retain(|index, _| !failed.contains(index));
        }
        if let Err((failed, error)) = self.dropped_targets(&mut indexes, deadline).await {
            let what = "its dropped alias targets could not be read: ";
            fail_records(records, &failed, &Outcome::of_port_error(&error, what));
            indexes.retain(|index, _| !failed.contains(index));
        }
        let mut world = World {
            indexes,
            default_cell: self.options.default_cell.clone(),
            ..World::default()
        };
        let fresh = !run.stream;
        let mut api_keys = ApiKeys::default();
        let cells = (world.indexes.values()).filter_map(|state| match &state.settings {
            Some(Settings::Valid(settings)) => Some(settings.account_cell(&world.default_cell)),
            _ => None,
        });
        let cells = cells.collect();
        api_keys.add(&self.api_keys, cells, fresh, deadline).await;
        let referrers = self.referrers(&world.indexes, deadline).await;
        if let Ok(referrers) = &referrers {
            self.claimers(&mut world, referrers, &mut api_keys, fresh, deadline)
                .await;
        }
        world.referrers = referrers.map_err(|error| error.to_string());
        self.filters(records, &mut world.indexes, run, deadline)
            .await;
        world.api_keys = api_keys.keys;
        (world, api_keys.counts)
    }

    /// What the raw items of the scope's rejected records name (fail closed), for those the
    /// ledger records something of: what they no longer name is given up. `Err`: the indexes
    /// that could not be read, and why.
    async fn raw_refs(
        &self,
        indexes: &mut BTreeMap<IndexRef, IndexState>,
        deadline: Instant,
    ) -> Result<(), (BTreeSet<IndexRef>, PortError)> {
        let rejected: Vec<IndexRef> = (indexes.iter())
            .filter(|(_, s)| matches!(s.settings, Some(Settings::Rejected(_))))
            .filter(|(_, s)| s.recorded != IndexRefs::default())
            .map(|(index, _)| index.clone())
            .collect();
        if rejected.is_empty() {
            return Ok(());
        }
        let read = self.table.index_references(&rejected);
        let raw = before_deadline(deadline, "rejected records' references", read).await;
        let raw: HashMap<IndexRef, IndexRefs> = match raw {
            Ok(raw) => raw.into_iter().collect(),
            Err(error) => return Err((rejected.into_iter().collect(), error)),
        };
        for index in rejected {
            let refs = raw.get(&index).cloned().unwrap_or_default();
            indexes.get_mut(&index).expect("in scope").settings = Some(Settings::Rejected(refs));
        }
        Ok(())
    }

    /// An alias record makes the targets it drops as dirty as those it gains: each target the
    /// ledger records for a scope's index that its record no longer names, and that no
    /// settings record has as its own any more (a removed index kept for the alias), joins the
    /// scope as removed, on behalf of that index (docs/contract.md, "Alias deletion safety").
    /// `Err`: the indexes whose targets could not be read, and why.
    async fn dropped_targets(
        &self,
        indexes: &mut BTreeMap<IndexRef, IndexState>,
        deadline: Instant,
    ) -> Result<(), (BTreeSet<IndexRef>, PortError)> {
        let mut dropped: BTreeMap<String, IndexRef> = BTreeMap::new();
        for (index, state) in indexes.iter() {
            let Some(now) = state.names() else { continue };
            for target in state.recorded.targets.difference(&now.targets) {
                dropped.insert(target.clone(), index.clone());
            }
        }
        // A target in scope already is decided by its own state.
        let in_scope = |index: &IndexRef| indexes.get(index).is_some_and(|s| s.settings.is_some());
        dropped.retain(|target, _| !IndexId(target.clone()).named().iter().any(in_scope));
        if dropped.is_empty() {
            return Ok(());
        }
        let candidates: BTreeSet<IndexRef> = dropped
            .keys()
            .flat_map(|t| IndexId(t.clone()).named())
            .collect();
        let candidates: Vec<IndexRef> = candidates.into_iter().collect();
        let live = self.table.index_references(&candidates);
        let live = before_deadline(deadline, "dropped alias targets", live);
        let recorded = self.ledger.index_refs(&candidates);
        let recorded = before_deadline(deadline, "dropped alias targets", recorded);
        let (live, recorded) = match tokio::join!(live, recorded) {
            (Ok(live), Ok(recorded)) => (live, recorded),
            (Err(error), _) | (_, Err(error)) => {
                return Err((dropped.into_values().collect(), error));
            }
        };
        let live: BTreeSet<String> = live.into_iter().map(|(index, _)| index.id().0).collect();
        for (target, because) in dropped {
            if live.contains(&target) {
                continue; // Its key is a live index's own.
            }
            let named = IndexId(target).named();
            let mut removed: Vec<&IndexRef> =
                named.iter().filter(|i| recorded.contains_key(*i)).collect();
            if removed.is_empty() {
                // Nothing recorded of it: its own key alone.
                removed.extend(named.first());
            }
            // One in scope for its overrides keeps them: its settings keys join the scope.
            for index in removed {
                let state = indexes.entry(index.clone()).or_default();
                state.settings = Some(Settings::Absent);
                state.recorded = recorded.get(index).cloned().unwrap_or_default();
                state.because = Some(because.clone());
            }
        }
        Ok(())
    }

    /// Who aliases each removed index and claims each shop given up: the ledger names the
    /// candidates, each one's record in the table decides; the scope's own records are newer.
    async fn referrers(
        &self,
        indexes: &BTreeMap<IndexRef, IndexState>,
        deadline: Instant,
    ) -> Result<Referrers, PortError> {
        let mut asked = BTreeSet::new();
        let mut own = Vec::new();
        for (index, state) in indexes {
            asked.extend(state.given_up().into_iter().cloned().map(Referred::Shop));
            match (&state.settings, state.names()) {
                (Some(Settings::Absent), _) => {
                    asked.insert(Referred::Alias(index.id().0));
                    own.push((index.clone(), IndexRefs::default()));
                }
                // A rejected record: the table's word on it, fail closed.
                (Some(Settings::Valid(_)), Some(now)) => own.push((index.clone(), now)),
                _ => {}
            }
        }
        asked.retain(|r| !matches!(r, Referred::Shop(shop) if shop_id_problem(shop).is_some()));
        let exclude = own.iter().map(|(index, _)| index.clone()).collect();
        let mut references = self
            .referrers_of(asked.into_iter().collect(), &exclude, deadline)
            .await?;
        references.extend(
            own.into_iter()
                .filter(|(_, refs)| *refs != IndexRefs::default()),
        );
        Ok(Referrers::of(references))
    }

    /// The settings (and API keys) of every claimer outside the scope of a shop given up.
    async fn claimers(
        &self,
        world: &mut World,
        referrers: &Referrers,
        api_keys: &mut ApiKeys,
        fresh: bool,
        deadline: Instant,
    ) {
        let mut wanted = BTreeSet::new();
        for (index, state) in &world.indexes {
            for shop in state.given_up() {
                let claimers = referrers.by_shop.get(shop).into_iter().flatten();
                // A claimer in scope with its settings is decided by them.
                let in_scope =
                    |c: &IndexRef| world.indexes.get(c).is_some_and(|s| s.settings.is_some());
                let outside = |c: &&IndexRef| *c != index && !in_scope(c);
                wanted.extend(claimers.filter(outside).cloned());
            }
        }
        self.read_claimers(wanted, world, api_keys, fresh, deadline)
            .await;
    }

    /// Reads these claimers' settings records and the API keys their values need.
    async fn read_claimers(
        &self,
        wanted: BTreeSet<IndexRef>,
        world: &mut World,
        api_keys: &mut ApiKeys,
        fresh: bool,
        deadline: Instant,
    ) {
        if wanted.is_empty() {
            return;
        }
        let found = self.settings_of(&wanted, deadline).await;
        let read: Vec<_> = (wanted.into_iter())
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
        let cell = &world.default_cell;
        let cells: BTreeSet<AccountCell> = (read.iter())
            .filter_map(|(_, settings)| settings.as_ref().ok()?.as_ref())
            .map(|s| s.account_cell(cell))
            .collect();
        api_keys.add(&self.api_keys, cells, fresh, deadline).await;
        world.claimers.extend(read);
    }

    /// Of these shops, each given up by its index, those another index serves now
    /// ([`serving`]; a claimer whose API key cannot be looked up for now counts), for the
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
        let own = BTreeSet::new();
        let references = self.referrers_of(asked.collect(), &own, deadline);
        let referrers = Referrers::of(references.await?);
        let claimers = (given_up.iter()).filter_map(|(shop, _)| referrers.by_shop.get(shop));
        let wanted = claimers.flatten().cloned().collect();
        let mut world = World {
            default_cell: self.options.default_cell.clone(),
            ..World::default()
        };
        let mut api_keys = ApiKeys::default();
        self.read_claimers(wanted, &mut world, &mut api_keys, false, deadline)
            .await;
        if let Some(Err(error)) = world.claimers.values().find(|read| read.is_err()) {
            return Err(error.clone());
        }
        world.api_keys = api_keys.keys;
        world.referrers = Ok(referrers);
        let nobody =
            |(shop, index): &&(String, IndexRef)| matches!(serving(shop, index, &world), Ok(None));
        let served = given_up.iter().filter(|given| !nobody(given));
        Ok(served.map(|(shop, _)| shop.clone()).collect())
    }

    /// The queries of every filter in scope: from the records when they hold all of their
    /// index's overrides (`Run::overrides_in_batch`), else a Query of the table each.
    async fn filters(
        &self,
        records: &[ChangeRecord],
        indexes: &mut BTreeMap<IndexRef, IndexState>,
        run: Run,
        deadline: Instant,
    ) {
        let wanted: Vec<IndexRef> = (indexes.iter())
            .filter(|(_, state)| state.filter.is_some())
            .map(|(index, _)| index.clone())
            .collect();
        let read = match run.overrides_in_batch {
            true => {
                let mut by_index: HashMap<&IndexRef, Vec<String>> = HashMap::new();
                for record in records {
                    if let Some(Change::UpsertQuery(c)) = &record.change {
                        by_index.entry(&c.index).or_default().push(c.query.clone());
                    }
                }
                let queries = |index: IndexRef| {
                    let queries = by_index.remove(&index).unwrap_or_default();
                    (index, Ok(queries))
                };
                wanted.into_iter().map(queries).collect()
            }
            false => self.overrides_of(wanted, deadline).await,
        };
        for (index, queries) in read {
            indexes.get_mut(&index).expect("in scope").filter = Some(queries);
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

    /// What the ledger recorded of these indexes, when the run keeps references.
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
                Some(Change::RemoveIndex { index }) => Some(index.clone()),
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
}

/// Every record of these indexes ends as `outcome` says.
fn fail_records(records: &mut [ChangeRecord], indexes: &BTreeSet<IndexRef>, outcome: &Outcome) {
    let of =
        |record: &&mut ChangeRecord| record.index.as_ref().is_some_and(|i| indexes.contains(i));
    for record in records.iter_mut().filter(of) {
        record.end(outcome.clone());
    }
}

/// The API keys a scope looked up, and what that took.
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
