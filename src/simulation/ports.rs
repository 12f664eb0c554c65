//! The ports of the simulation's world: each writer's handle (`Sim`) on the shared table, KV
//! and ledger, every call going through the scheduler's turn first (`World::turn`), where it may
//! wait, fail, lag or stop.
#![cfg(test)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::world::{Turn, World};
use crate::adapters::memory::{page_of, records};
use crate::domain::kv::KeyMetadata;
use crate::domain::{AccountCell, ApiKey, IndexRef, KvAction, KvKey, KvOp, Namespace};
use crate::domain::{ChangeRecord, Scope, TableKey};
use crate::ports::{
    ApiKeySource, IndexRefs, KeyPage, KvStore, Ledger, ListedKey, Page, PortError,
    ReconcileProgress, Referred, RefsChange, SettingsTable,
};

/// One writer's handle on the world (every port of its exporter), with its name for the trace.
#[derive(Clone)]
pub struct Sim(pub Arc<World>, pub &'static str);

impl Sim {
    /// A bulk write, as the scheduler lets it go.
    async fn write(&self, ops: Vec<KvOp>) -> Vec<(KvKey, PortError)> {
        // A delete's key is traced with a `-` in front.
        let keys: Vec<String> = (ops.iter())
            .map(|(key, action)| match action {
                KvAction::Delete => format!("-{}", key.key),
                KvAction::Put(_) => key.key.clone(),
            })
            .collect();
        let call = format!("kv write {keys:?}");
        match self.0.turn(self.1, &call).await {
            Turn::Go => {}
            Turn::Fail(error) => {
                return (ops.into_iter())
                    .map(|(key, _)| (key, error.clone()))
                    .collect()
            }
            Turn::Stop => return self.0.stop(self.1).await,
        }
        // A bulk write whose answer is lost after it landed, or with unsuccessful keys, or whose
        // invocation stops once it landed.
        let (lost, unsuccessful, stops) = {
            let mut s = self.0.scheduler.lock().unwrap();
            let (faults, knobs) = (s.faults, s.knobs);
            let lost = faults && s.rng.chance(knobs.fails);
            let unsuccessful: Vec<bool> = (ops.iter())
                .map(|_| faults && s.rng.chance(knobs.fails / 2))
                .collect();
            let stops = faults && s.rng.below(1000) < knobs.stops;
            (lost, unsuccessful, stops)
        };
        if lost || unsuccessful.contains(&true) {
            let what = format!(
                "{}: {call}: lost {lost}, unsuccessful {unsuccessful:?}",
                self.1
            );
            self.0.note(what);
        }
        let failed = self.land(ops, lost, unsuccessful);
        if stops {
            self.0
                .note(format!("{}: stopped once {call} landed", self.1));
            return self.0.stop(self.1).await;
        }
        failed
    }
}

impl Sim {
    /// The puts and deletes of a bulk write that go through, with those that did not.
    fn land(&self, ops: Vec<KvOp>, lost: bool, unsuccessful: Vec<bool>) -> Vec<(KvKey, PortError)> {
        let mut failed = Vec::new();
        let mut kv = self.0.kv.lock().unwrap();
        for ((key, action), unsuccessful) in ops.into_iter().zip(unsuccessful) {
            if unsuccessful {
                failed.push((
                    key,
                    PortError::Unavailable("simulated: unsuccessful".into()),
                ));
                continue;
            }
            let at = (key.namespace, key.key.clone());
            self.0.unchecked.lock().unwrap().remove(&at);
            let mut landed_by = self.0.landed_by.lock().unwrap();
            landed_by
                .entry(self.1.to_owned())
                .or_default()
                .insert(at.clone());
            drop(landed_by);
            let now = match action {
                KvAction::Put(value) => {
                    if let Some(metadata) = &self.0.kv_metadata {
                        let (mut meta, digest) = (Vec::new(), value.digest());
                        KeyMetadata::write_json(value.index(), value.query(), &digest, &mut meta);
                        let meta = serde_json::from_slice(&meta).unwrap();
                        metadata.lock().unwrap().insert(at.clone(), meta);
                    }
                    let value = value.text().into_owned();
                    if let Some(trespass) = self.0.trespass(&key, &value) {
                        let who = self.1;
                        let mut broken = self.0.broken.lock().unwrap();
                        broken.push(format!("{who}: {trespass}"));
                    }
                    kv.insert(at.clone(), value.clone());
                    Some(value)
                }
                KvAction::Delete => {
                    kv.remove(&at);
                    if let Some(metadata) = &self.0.kv_metadata {
                        metadata.lock().unwrap().remove(&at);
                    }
                    None
                }
            };
            let mut history = self.0.kv_history.lock().unwrap();
            history.entry(at).or_default().push((Instant::now(), now));
            if lost {
                failed.push((key, PortError::Unavailable("simulated: timed out".into())));
            }
        }
        failed
    }
}

impl KvStore for Sim {
    async fn apply(&self, ops: Vec<KvOp>, _: Instant) -> Vec<(KvKey, PortError)> {
        self.write(ops).await
    }

    async fn get_many(
        &self,
        namespace: Namespace,
        keys: &[String],
        _: Instant,
    ) -> Result<HashMap<String, Option<String>>, PortError> {
        self.0.go(self.1, "kv read").await?;
        // KV is eventually consistent: a read may answer what a key held some time ago.
        let lag = self.lag("kv read");
        let kv = self.0.kv.lock().unwrap();
        let history = self.0.kv_history.lock().unwrap();
        let read = |key: &String| {
            let at = (namespace, key.clone());
            let Some(ms) = lag else {
                return kv.get(&at).cloned();
            };
            let then = Instant::now().checked_sub(Duration::from_millis(ms));
            let past = (history.get(&at).into_iter().flatten())
                .take_while(|(when, _)| then.is_some_and(|then| *when <= then))
                .last();
            past.and_then(|(_, value)| value.clone())
        };
        Ok((keys.iter()).map(|k| (k.clone(), read(k))).collect())
    }

    async fn list_page(
        &self,
        namespace: Namespace,
        prefix: &str,
        cursor: Option<&str>,
        limit: u32,
        _: Instant,
    ) -> Result<KeyPage, PortError> {
        self.0.go(self.1, "kv list").await?;
        // The eventual workload's listings lag as its reads do: the keys of some time ago.
        let lag = self.0.eventual.then(|| self.lag("kv list")).flatten();
        let kv = self.0.kv.lock().unwrap();
        let history = self.0.kv_history.lock().unwrap();
        let metadata = self.0.kv_metadata.as_ref().map(|m| m.lock().unwrap());
        let then = lag.map(|ms| Instant::now().checked_sub(Duration::from_millis(ms)));
        let held_then = |at: &(Namespace, String)| {
            let values = history.get(at).into_iter().flatten();
            let past = values.take_while(|(when, _)| then.flatten().is_some_and(|t| *when <= t));
            past.last().is_some_and(|(_, value)| value.is_some())
        };
        let listed: Vec<&(Namespace, String)> = match then {
            None => kv.keys().collect(),
            Some(_) => history.keys().filter(|at| held_then(at)).collect(),
        };
        let after = cursor.unwrap_or_default();
        let mut keys = (listed.into_iter())
            .filter(|(ns, key)| *ns == namespace && key.starts_with(prefix))
            .filter(|(_, key)| cursor.is_none() || key.as_str() > after)
            .map(|at| ListedKey {
                name: at.1.clone(),
                metadata: metadata.as_ref().and_then(|m| m.get(at).cloned()),
            });
        let page: Vec<ListedKey> = keys.by_ref().take(limit as usize).collect();
        let more = keys.next().is_some();
        let cursor = (more)
            .then(|| page.last().map(|k| k.name.clone()))
            .flatten();
        Ok(KeyPage { keys: page, cursor })
    }
}

impl Sim {
    /// Whether a KV read or listing lags, and by how many ms (Cloudflare's lag is up to 60 s:
    /// any time of a run's workload).
    fn lag(&self, what: &str) -> Option<u64> {
        let mut s = self.0.scheduler.lock().unwrap();
        let lags = s.knobs.lags;
        let lag = (s.faults && s.rng.chance(lags)).then(|| s.rng.below(1_000));
        if let Some(ms) = lag {
            s.trace.push(format!("{}: {what} lags {ms} ms", self.1));
        }
        lag
    }
}

/// The account an API key of the simulation's is for (`key-{account}`, or `key-{account}@{cell}`
/// for a cell other than the default).
pub fn api_key_of(key: Option<&str>) -> Option<&str> {
    let key = key?.strip_prefix("key-")?;
    Some(key.split_once('@').map_or(key, |(account, _)| account))
}

impl ApiKeySource for Sim {
    async fn fetch(&self, cell: &AccountCell) -> Result<ApiKey, PortError> {
        self.0.go(self.1, "api key").await?;
        Ok(ApiKey::new(match cell.cell.as_str() {
            super::GONE_CELL => {
                let reason = format!("no API key for {} in cell gone", cell.account);
                return Err(PortError::NotFound(reason));
            }
            "default" => format!("key-{}", cell.account),
            other => format!("key-{}@{other}", cell.account),
        }))
    }
}

impl SettingsTable for Sim {
    async fn index_references(
        &self,
        indexes: &[IndexRef],
    ) -> Result<Vec<(IndexRef, IndexRefs)>, PortError> {
        self.0.go(self.1, "table read references").await?;
        let table = self.0.table.lock().unwrap();
        Ok((indexes.iter())
            .filter_map(|index| {
                let key = (index.account.clone(), format!("INDEX#{}", index.name));
                let item = table.get(&key)?;
                Some((index.clone(), crate::dynamo::settings_references(item).0))
            })
            .collect())
    }

    async fn records(
        &self,
        keys: Vec<TableKey>,
        mut each: impl FnMut(TableKey, ChangeRecord) + Send,
    ) -> Result<(), PortError> {
        self.0.go(self.1, "table read").await?;
        let found: Vec<(TableKey, ChangeRecord)> = {
            let table = self.0.table.lock().unwrap();
            (keys.into_iter())
                .filter_map(|key| {
                    let item = table.get(&(key.pk().to_owned(), key.sk().to_owned()))?;
                    Some((key, crate::dynamo::table_record(item, "DEFAULT_CONFIGS").0))
                })
                .collect()
        };
        for (key, record) in found {
            each(key, record);
        }
        Ok(())
    }

    async fn index_range(
        &self,
        account: &str,
        first: &str,
        last: &str,
    ) -> Result<Vec<(TableKey, ChangeRecord)>, PortError> {
        self.0.go(self.1, "table query run").await?;
        let (first, last) = (format!("INDEX#{first}"), format!("INDEX#{last}"));
        let within =
            |sk: &str| sk >= first.as_str() && (sk <= last.as_str() || sk.starts_with(&last));
        let items = self.0.items_where(|pk, sk| pk == account && within(sk));
        Ok(records(&items, None).records)
    }

    async fn override_queries(&self, index: &IndexRef) -> Result<Vec<String>, PortError> {
        self.0.go(self.1, "table query override keys").await?;
        let prefix = format!("INDEX#{}#QUERY#", index.name);
        let table = self.0.table.lock().unwrap();
        Ok((table.keys())
            .filter(|(pk, _)| *pk == index.account)
            .filter_map(|(_, sk)| Some(sk.strip_prefix(&prefix)?.to_owned()))
            .collect())
    }

    async fn page(
        &self,
        scope: Scope<'_>,
        start: Option<TableKey>,
        limit: i32,
    ) -> Result<Page, PortError> {
        self.0.go(self.1, "table page").await?;
        Ok(page_of(
            self.0.items_where(|pk, sk| scope.holds(pk, sk)),
            start,
            limit,
        ))
    }
}

impl Ledger for Sim {
    async fn references_complete(&self) -> Result<bool, PortError> {
        self.0.go(self.1, "ledger complete").await?;
        self.0.ledger.references_complete().await
    }

    async fn mark_references_complete(&self) -> Result<(), PortError> {
        self.0.go(self.1, "ledger mark complete").await?;
        self.0.ledger.mark_references_complete().await
    }

    async fn index_refs(
        &self,
        indexes: &[IndexRef],
    ) -> Result<HashMap<IndexRef, IndexRefs>, PortError> {
        self.0.go(self.1, "ledger read refs").await?;
        let refs = self.0.ledger.index_refs(indexes).await?;
        let shown = refs.iter().map(|(i, r)| {
            let mut r = r.clone();
            timeless(&mut r.sweep);
            format!("{i}: {r:?}")
        });
        let mut shown: Vec<String> = shown.collect();
        shown.sort();
        self.0
            .note(format!("{}: ledger read refs: {shown:?}", self.1));
        Ok(refs)
    }

    async fn referrers(&self, referred: &[Referred]) -> Result<Vec<IndexRef>, PortError> {
        self.0.go(self.1, "ledger read referrers").await?;
        self.0.ledger.referrers(referred).await
    }

    async fn point_back(&self, items: &[(IndexRef, Referred)]) -> Result<u64, PortError> {
        // In a stable order: the caller's may come from a hash map.
        let mut shown: Vec<String> = items.iter().map(|item| format!("{item:?}")).collect();
        shown.sort();
        let call = format!("ledger intent {shown:?}");
        self.0.go(self.1, &call).await?;
        self.0.ledger.point_back(items).await
    }

    async fn pointing(
        &self,
        items: &[(IndexRef, Referred)],
    ) -> Result<Vec<(IndexRef, Referred)>, PortError> {
        self.0.go(self.1, "ledger read pointing").await?;
        self.0.ledger.pointing(items).await
    }

    async fn record_refs(&self, changes: &[RefsChange]) -> Result<(), PortError> {
        let shown = changes.iter().map(|change| {
            let mut change = change.clone();
            timeless(&mut change.swept);
            format!("{change:?}")
        });
        let mut shown: Vec<String> = shown.collect();
        shown.sort();
        let call = format!("ledger shrink {shown:?}");
        self.0.go(self.1, &call).await?;
        self.0.ledger.record_refs(changes).await
    }

    async fn recorded(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<crate::ports::RecordedPage, PortError> {
        self.0.go(self.1, "ledger read recorded").await?;
        self.0.ledger.recorded(after, limit).await
    }

    async fn sweep_marks(
        &self,
        marks: &[(IndexRef, Option<crate::ports::SweepMark>)],
    ) -> Result<(), PortError> {
        // Not the marks' times: the trace is the same on every run.
        let marked: Vec<_> = marks
            .iter()
            .map(|(i, m)| (i, m.map(|m| m.intents)))
            .collect();
        self.0
            .go(self.1, &format!("ledger marks {marked:?}"))
            .await?;
        self.0.ledger.sweep_marks(marks).await
    }

    async fn reconcile_progress(&self) -> Result<Option<ReconcileProgress>, PortError> {
        self.0.go(self.1, "ledger progress").await?;
        self.0.ledger.reconcile_progress().await
    }

    async fn save_reconcile_progress(
        &self,
        progress: &ReconcileProgress,
        expected: Option<u64>,
    ) -> Result<bool, PortError> {
        self.0.go(self.1, "ledger save progress").await?;
        let saved = (self.0.ledger)
            .save_reconcile_progress(progress, expected)
            .await?;
        // A lease keeps two runs off one pass: the save that ends a run's pass never finds its
        // progress moved by another run while the lease held.
        let mut leases = self.0.leases.lock().unwrap();
        let leased = match progress.lease_until {
            Some(_) => saved.then_some(progress.version),
            None => leases
                .remove(self.1)
                .filter(|version| expected == Some(*version)),
        };
        match (progress.lease_until, leased) {
            (Some(_), Some(version)) => drop(leases.insert(self.1.to_owned(), version)),
            (None, Some(version)) if !saved => {
                let moved = format!("{}: its pass's progress (leased at version {version}) was moved by another run while its lease held", self.1);
                self.0.broken.lock().unwrap().push(moved);
            }
            _ => {}
        }
        Ok(saved)
    }
}

/// A sweep mark's time is the clock's (the run's wall time where it started): left out of the
/// trace, which is the same on every run.
fn timeless(mark: &mut Option<crate::ports::SweepMark>) {
    if let Some(mark) = mark {
        mark.at = 0;
    }
}
