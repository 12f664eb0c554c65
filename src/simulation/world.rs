//! The simulation's world: the settings table, KV and the ledger in memory, shared by every
//! writer, and the seeded scheduler every call to them goes through. At each call the
//! scheduler may let other writers run first (yields, or a delay in paused time), or fail the
//! call as the real system can: throttled or unavailable, a bulk write some of whose keys are
//! unsuccessful, a write that lands and then times out.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_dynamo::Item;
use tokio::time::Instant;

use crate::adapters::memory::MemoryLedger;
use crate::domain::{AccountCell, ApiKey, IndexRef, KvAction, KvKey, KvOp, Namespace};
use crate::domain::{TableKey, TableRecord};
use crate::ports::{
    ApiKeySource, IndexRefs, KeyPage, KvStore, Ledger, ListedKey, Page, PortError,
    ReconcileProgress, Referred, RefsChange, SettingsTable,
};

/// SplitMix64: small, seeded, the same numbers on every machine.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number below `n` (0 for 0).
    pub fn below(&mut self, n: u64) -> u64 {
        match n {
            0 => 0,
            n => self.next() % n,
        }
    }

    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, from: &'a [T]) -> &'a T {
        &from[self.below(from.len() as u64) as usize]
    }
}

/// What the scheduler does at one call.
enum Turn {
    Go,
    Fail(PortError),
    /// The invocation stops here (a timeout, a crash): the call never returns.
    Stop,
}

/// How often the scheduler does what, drawn for each seed (swarm testing: a seed that fails
/// every tenth call finds other orders than one that delays every third).
#[derive(Clone, Copy, Debug)]
pub struct Knobs {
    /// A call fails (and a bulk write's key is unsuccessful half as often), in percent.
    fails: u64,
    /// A call waits up to 30 ms first, in percent.
    delays: u64,
    /// A KV read lags, in percent.
    lags: u64,
    /// An invocation stops at a call, in thousandths.
    stops: u64,
}

impl Knobs {
    fn of(rng: &mut Rng) -> Knobs {
        Knobs {
            fails: *rng.pick(&[1, 4, 4, 12]),
            delays: *rng.pick(&[10, 10, 40]),
            lags: *rng.pick(&[0, 5, 20]),
            stops: *rng.pick(&[0, 4, 4, 20]),
        }
    }
}

/// The seeded scheduler and the trace of what it decided.
pub struct Scheduler {
    rng: Rng,
    knobs: Knobs,
    /// Faults are injected only while set (a run settles without them).
    pub faults: bool,
    pub trace: Vec<String>,
}

/// Each key's values, with when each landed (`None`: deleted).
type History = BTreeMap<(Namespace, String), Vec<(Instant, Option<String>)>>;

/// Everything the writers share.
pub struct World {
    pub table: Mutex<BTreeMap<(String, String), Item>>,
    pub kv: Mutex<BTreeMap<(Namespace, String), String>>,
    pub ledger: MemoryLedger,
    pub scheduler: Mutex<Scheduler>,
    /// Every shop an index's settings item has named, at any time (the workload's).
    pub claimed_ever: Mutex<BTreeSet<(IndexRef, String)>>,
    /// Puts that wrote one account's value where it has no business (checked as they land).
    pub trespasses: Mutex<Vec<String>>,
    /// Writers whose invocation stopped, until their caller sees it.
    stopped: Mutex<BTreeSet<String>>,
    /// The keys each writer's invocation wrote or deleted so far.
    landed_by: Mutex<HashMap<String, BTreeSet<(Namespace, String)>>>,
    /// Every value each key has held, from when (a lagging read answers an earlier one).
    kv_history: Mutex<History>,
    /// Keys a stopped invocation left unchecked, not written since (window: "a checked key
    /// between its write landing and its check's write").
    pub unchecked: Mutex<BTreeSet<(Namespace, String)>>,
    stop_signal: tokio::sync::Notify,
}

impl World {
    pub fn new(seed: u64) -> Arc<World> {
        let ledger = MemoryLedger::default();
        // Every index is created through the stream: the references are complete from the
        // start (no migration state).
        ledger
            .complete
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Arc::new(World {
            table: Mutex::default(),
            kv: Mutex::default(),
            ledger,
            scheduler: Mutex::new(Scheduler {
                knobs: Knobs::of(&mut Rng::new(seed ^ 0x0C0B)),
                rng: Rng::new(seed),
                faults: true,
                trace: Vec::new(),
            }),
            claimed_ever: Mutex::default(),
            trespasses: Mutex::default(),
            stopped: Mutex::default(),
            landed_by: Mutex::default(),
            kv_history: Mutex::default(),
            unchecked: Mutex::default(),
            stop_signal: tokio::sync::Notify::new(),
        })
    }

    /// A number below `n` from the run's seed.
    pub fn below(&self, n: u64) -> u64 {
        self.scheduler.lock().unwrap().rng.below(n)
    }

    pub fn note(&self, line: String) {
        self.scheduler.lock().unwrap().trace.push(line);
    }

    /// The scheduler's turn at a call: other writers may run first, or the call fails.
    async fn turn(&self, who: &str, call: &str) -> Turn {
        let (yields, delay, turn) = {
            let mut s = self.scheduler.lock().unwrap();
            let yields = s.rng.below(4);
            let knobs = s.knobs;
            let delay = s.rng.chance(knobs.delays).then(|| s.rng.below(30));
            let turn = match s.faults && s.rng.chance(knobs.fails) {
                true => match s.rng.below(2) {
                    0 => Turn::Fail(PortError::Throttled(format!("simulated: {call} throttled"))),
                    _ => Turn::Fail(PortError::Unavailable(format!("simulated: {call} down"))),
                },
                false if s.faults && s.rng.below(1000) < knobs.stops => Turn::Stop,
                false => Turn::Go,
            };
            let what = match &turn {
                Turn::Go => "go",
                Turn::Fail(_) => "fail",
                Turn::Stop => "stop",
            };
            s.trace.push(format!(
                "{who}: {call}: {what} after {yields} yields, {delay:?} ms"
            ));
            (yields, delay, turn)
        };
        for _ in 0..yields {
            tokio::task::yield_now().await;
        }
        if let Some(ms) = delay {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        turn
    }

    async fn go(&self, who: &str, call: &str) -> Result<(), PortError> {
        match self.turn(who, call).await {
            Turn::Go => Ok(()),
            Turn::Fail(error) => Err(error),
            Turn::Stop => self.stop(who).await,
        }
    }

    /// `who`'s invocation stops at this call: it never returns, and `until_stopped` sees it.
    async fn stop<T>(&self, who: &str) -> T {
        self.stopped.lock().unwrap().insert(who.to_owned());
        self.stop_signal.notify_waiters();
        std::future::pending().await
    }

    /// `work` (one invocation of `who`), or `None` when it stopped between two calls.
    pub async fn until_stopped<T>(&self, who: &str, work: impl Future<Output = T>) -> Option<T> {
        self.landed_by.lock().unwrap().remove(who);
        let stopped = async {
            loop {
                let signal = self.stop_signal.notified();
                tokio::pin!(signal);
                signal.as_mut().enable();
                if self.stopped.lock().unwrap().remove(who) {
                    let landed = self.landed_by.lock().unwrap().remove(who);
                    self.unchecked
                        .lock()
                        .unwrap()
                        .extend(landed.into_iter().flatten());
                    return;
                }
                signal.await;
            }
        };
        tokio::select! {
            done = work => Some(done),
            () = stopped => None,
        }
    }

    /// Account isolation: a value names its index, carries its account's API key and its own
    /// endpoint, and lands on the index's own keys or a shop its item has named.
    fn trespass(&self, key: &KvKey, value: &str) -> Option<String> {
        let value: serde_json::Value = serde_json::from_str(value).ok()?;
        let ids = (value["system_account_id"].as_str()).zip(value["index_name"].as_str());
        let Some((account, name)) = ids else {
            return Some(format!("{key:?} holds {value} naming no index"));
        };
        let index = IndexRef::new(account, name);
        let own = format!("{account}-{name}");
        let ours = match key.namespace {
            Namespace::Settings => {
                let endpoint = value["index_url"].as_str().unwrap_or_default();
                let shop = (self.claimed_ever.lock().unwrap()).contains(&(index, key.key.clone()));
                endpoint.starts_with(&format!("https://{own}."))
                    && value["marqo_api_key"] == format!("key-{account}").as_str()
                    && (key.key == own || shop)
            }
            Namespace::QueryConfigs => {
                key.key == format!("qfilter-{own}") || key.key.starts_with(&format!("qcfg-{own}-"))
            }
        };
        (!ours).then(|| format!("{key:?} holds {value}, not {own}'s to hold"))
    }

    fn records_where(&self, wanted: impl Fn(&str, &str) -> bool) -> Vec<(TableKey, TableRecord)> {
        let table = self.table.lock().unwrap();
        (table.iter())
            .filter(|((pk, sk), _)| wanted(pk, sk))
            .filter_map(|(_, item)| Some((crate::dynamo::table_key(item)?, record(item))))
            .collect()
    }
}

fn record(item: &Item) -> TableRecord {
    crate::dynamo::table_record(item, "DEFAULT_CONFIGS")
}

/// One writer's handle on the world (every port of its exporter), with its name for the trace.
#[derive(Clone)]
pub struct Sim(pub Arc<World>, pub &'static str);

impl Sim {
    /// A bulk write, as the scheduler lets it go.
    async fn write(&self, ops: Vec<KvOp>) -> Vec<(KvKey, PortError)> {
        let keys: Vec<&str> = ops.iter().map(|(key, _)| key.key.as_str()).collect();
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
                    let value = value.text().into_owned();
                    if let Some(trespass) = self.0.trespass(&key, &value) {
                        let who = self.1;
                        let mut trespasses = self.0.trespasses.lock().unwrap();
                        trespasses.push(format!("{who}: {trespass}"));
                    }
                    kv.insert(at.clone(), value.clone());
                    Some(value)
                }
                KvAction::Delete => {
                    kv.remove(&at);
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
        // KV is eventually consistent: a read may answer what a key held some time ago (any
        // time of a run's workload: Cloudflare's lag is up to 60 s).
        let lag = {
            let mut s = self.0.scheduler.lock().unwrap();
            let lags = s.knobs.lags;
            let lag = (s.faults && s.rng.chance(lags)).then(|| s.rng.below(1_000));
            if let Some(ms) = lag {
                s.trace.push(format!("{}: kv read lags {ms} ms", self.1));
            }
            lag
        };
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
        let kv = self.0.kv.lock().unwrap();
        let after = cursor.unwrap_or_default();
        let mut keys = (kv.keys())
            .filter(|(ns, key)| *ns == namespace && key.starts_with(prefix))
            .filter(|(_, key)| cursor.is_none() || key.as_str() > after)
            .map(|(_, name)| ListedKey {
                name: name.clone(),
                metadata: None,
            });
        let page: Vec<ListedKey> = keys.by_ref().take(limit as usize).collect();
        let more = keys.next().is_some();
        let cursor = (more)
            .then(|| page.last().map(|k| k.name.clone()))
            .flatten();
        Ok(KeyPage { keys: page, cursor })
    }
}

impl ApiKeySource for Sim {
    async fn fetch(&self, cell: &AccountCell) -> Result<ApiKey, PortError> {
        self.0.go(self.1, "api key").await?;
        Ok(ApiKey::new(format!("key-{}", cell.account)))
    }
}

impl SettingsTable for Sim {
    async fn settings_references(&self) -> Result<Vec<(IndexRef, IndexRefs)>, PortError> {
        self.0.go(self.1, "table scan").await?;
        let table = self.0.table.lock().unwrap();
        Ok((table.iter())
            .filter_map(|((pk, sk), item)| {
                let name = sk
                    .strip_prefix("INDEX#")
                    .filter(|n| !n.contains("#QUERY#"))?;
                let refs = crate::dynamo::settings_references(item).0;
                Some((IndexRef::new(pk, name), refs))
            })
            .collect())
    }

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
        mut each: impl FnMut(TableKey, TableRecord) + Send,
    ) -> Result<(), PortError> {
        self.0.go(self.1, "table read").await?;
        let found: Vec<(TableKey, TableRecord)> = {
            let table = self.0.table.lock().unwrap();
            (keys.into_iter())
                .filter_map(|key| {
                    let item = table.get(&(key.pk().to_owned(), key.sk().to_owned()))?;
                    Some((key, record(item)))
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
    ) -> Result<Vec<TableRecord>, PortError> {
        self.0.go(self.1, "table query run").await?;
        let (first, last) = (format!("INDEX#{first}"), format!("INDEX#{last}"));
        let within =
            |sk: &str| sk >= first.as_str() && (sk <= last.as_str() || sk.starts_with(&last));
        let records = self.0.records_where(|pk, sk| pk == account && within(sk));
        Ok(records.into_iter().map(|(_, record)| record).collect())
    }

    async fn query_configs(
        &self,
        index: &IndexRef,
        start: Option<TableKey>,
        limit: usize,
    ) -> Result<Page, PortError> {
        self.0.go(self.1, "table query overrides").await?;
        let prefix = format!("INDEX#{}#QUERY#", index.name);
        let after = start.map(|key| key.sk().to_owned());
        let records = self.0.records_where(|pk, sk| {
            pk == index.account
                && sk.starts_with(&prefix)
                && after.as_deref().is_none_or(|after| sk > after)
        });
        Ok(paged(records, limit))
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
        account: Option<&str>,
        start: Option<TableKey>,
        limit: i32,
    ) -> Result<Page, PortError> {
        self.0.go(self.1, "table page").await?;
        let after = start.map(|key| (key.pk().to_owned(), key.sk().to_owned()));
        let records = self.0.records_where(|pk, sk| {
            account.is_none_or(|account| pk == account)
                && after
                    .as_ref()
                    .is_none_or(|(apk, ask)| (pk, sk) > (apk.as_str(), ask.as_str()))
        });
        Ok(paged(records, limit.max(1) as usize))
    }
}

/// The first `limit` records, and where the rest begins.
fn paged(mut records: Vec<(TableKey, TableRecord)>, limit: usize) -> Page {
    let more = records.len() > limit;
    records.truncate(limit);
    let next = more
        .then(|| records.last().map(|(key, _)| key.clone()))
        .flatten();
    Page { records, next }
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
        let mut shown: Vec<String> = refs.iter().map(|(i, r)| format!("{i}: {r:?}")).collect();
        shown.sort();
        self.0
            .note(format!("{}: ledger read refs: {shown:?}", self.1));
        Ok(refs)
    }

    async fn referrers(&self, referred: &[Referred]) -> Result<Vec<IndexRef>, PortError> {
        self.0.go(self.1, "ledger read referrers").await?;
        self.0.ledger.referrers(referred).await
    }

    async fn point_back(&self, items: &[(IndexRef, Referred)]) -> Result<(), PortError> {
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
        let mut shown: Vec<String> = changes.iter().map(|c| format!("{c:?}")).collect();
        shown.sort();
        let call = format!("ledger shrink {shown:?}");
        self.0.go(self.1, &call).await?;
        self.0.ledger.record_refs(changes).await
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
        (self.0.ledger)
            .save_reconcile_progress(progress, expected)
            .await
    }
}
