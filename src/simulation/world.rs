//! The simulation's world: the settings table, KV and the ledger in memory, shared by every
//! writer, and the seeded scheduler every call to them goes through. At each call the
//! scheduler may let other writers run first (yields, or a delay in paused time), fail the
//! call as the real system can (throttled, unavailable, refused, in conflict, past the
//! deadline, a bulk write some of whose keys are unsuccessful, a write that lands and then
//! times out), answer a KV read with what a key held a moment ago, or stop the invocation.
//! Each seed draws how often (`Knobs`).
#![cfg(test)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_dynamo::Item;
use tokio::time::Instant;

use crate::adapters::memory::MemoryLedger;
use crate::domain::{IndexRef, KvKey, Namespace};
use crate::ports::PortError;

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
pub(super) enum Turn {
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
    pub(super) fails: u64,
    /// A call waits up to 30 ms first, in percent.
    pub(super) delays: u64,
    /// A KV read lags, in percent.
    pub(super) lags: u64,
    /// An invocation stops at a call, in thousandths.
    pub(super) stops: u64,
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
    pub(super) rng: Rng,
    pub(super) knobs: Knobs,
    /// Faults are injected only while set (a run settles without them).
    pub faults: bool,
    pub trace: Vec<String>,
}

/// Each key's values, with when each landed (`None`: deleted).
pub(super) type History = BTreeMap<(Namespace, String), Vec<(Instant, Option<String>)>>;

/// Everything the writers share.
pub struct World {
    pub table: Mutex<BTreeMap<(String, String), Item>>,
    pub kv: Mutex<BTreeMap<(Namespace, String), String>>,
    /// Each key's metadata as its last put wrote it, what a listing answers (`None`: listings
    /// carry none, as for keys written by hand: the orphan finder reads their values).
    pub kv_metadata: Option<Mutex<BTreeMap<(Namespace, String), serde_json::Value>>>,
    /// The wide workload's world: listings with metadata, and stream batches of up to ten.
    pub(super) wide: bool,
    /// The eventual workload's world: listings that lag, batches delivered again, cells.
    pub(super) eventual: bool,
    /// The contended workload's world: writes, intents and shrinks that stall.
    contended: bool,
    pub ledger: MemoryLedger,
    pub scheduler: Mutex<Scheduler>,
    /// Every shop an index's settings item has named, at any time (the workload's).
    pub claimed_ever: Mutex<BTreeSet<(IndexRef, String)>>,
    /// Rules broken as they happen: a put that wrote one account's value where it has no
    /// business (checked as it lands), a pass whose progress another invocation moved while
    /// its lease held.
    pub broken: Mutex<Vec<String>>,
    /// The version of the progress each writer's scheduled reconcile leased its pass at.
    pub(super) leases: Mutex<HashMap<String, u64>>,
    /// The sequence numbers of the stream records done (delivered, and not to be again).
    pub(super) drained: Mutex<BTreeSet<String>>,
    /// Writers whose invocation stopped, until their caller sees it.
    pub(super) stopped: Mutex<BTreeSet<String>>,
    /// Writers whose invocation is under way.
    running: Mutex<BTreeSet<String>>,
    /// The keys each writer's invocation wrote or deleted so far.
    pub(super) landed_by: Mutex<HashMap<String, BTreeSet<(Namespace, String)>>>,
    /// Every value each key has held, from when (a lagging read answers an earlier one).
    pub(super) kv_history: Mutex<History>,
    /// Keys a stopped invocation left unchecked, not written since (window: "a checked key
    /// between its write landing and its check's write").
    pub unchecked: Mutex<BTreeSet<(Namespace, String)>>,
    pub(super) stop_signal: tokio::sync::Notify,
}

impl World {
    pub fn new(seed: u64, variety: super::Variety) -> Arc<World> {
        let wide = variety >= super::Variety::Wide;
        let ledger = MemoryLedger::default();
        // Every index is created through the stream: the references are complete from the
        // start (no migration state).
        ledger
            .complete
            .store(true, std::sync::atomic::Ordering::SeqCst);
        Arc::new(World {
            table: Mutex::default(),
            kv: Mutex::default(),
            kv_metadata: wide.then(Mutex::default),
            wide,
            eventual: variety >= super::Variety::Eventual,
            contended: variety >= super::Variety::Contended,
            ledger,
            scheduler: Mutex::new(Scheduler {
                knobs: Knobs::of(&mut Rng::new(seed ^ 0x0C0B)),
                rng: Rng::new(seed),
                faults: true,
                trace: Vec::new(),
            }),
            claimed_ever: Mutex::default(),
            broken: Mutex::default(),
            leases: Mutex::default(),
            drained: Mutex::default(),
            stopped: Mutex::default(),
            running: Mutex::default(),
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
    pub(super) async fn turn(&self, who: &str, call: &str) -> Turn {
        let (yields, delay, turn) = {
            let mut s = self.scheduler.lock().unwrap();
            let yields = s.rng.below(4);
            let knobs = s.knobs;
            let mut delay = s.rng.chance(knobs.delays).then(|| s.rng.below(30));
            let contended = ["kv write", "ledger intent", "ledger shrink"];
            if self.contended && contended.iter().any(|c| call.starts_with(c)) && s.rng.chance(30) {
                delay = Some(100 + s.rng.below(900)); // Stalled: another writer's turn.
            }
            let turn = match s.faults && s.rng.chance(knobs.fails) {
                true => Turn::Fail(match s.rng.below(5) {
                    0 => PortError::Throttled(format!("simulated: {call} throttled")),
                    1 => PortError::Refused(format!("simulated: {call} refused")),
                    2 => PortError::Conflict(format!("simulated: {call} in conflict")),
                    3 => PortError::PastDeadline(format!("simulated: {call} timed out")),
                    _ => PortError::Unavailable(format!("simulated: {call} down")),
                }),
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

    pub(super) async fn go(&self, who: &str, call: &str) -> Result<(), PortError> {
        match self.turn(who, call).await {
            Turn::Go => Ok(()),
            Turn::Fail(error) => Err(error),
            Turn::Stop => self.stop(who).await,
        }
    }

    /// `who`'s invocation stops at this call: it never returns, and `until_stopped` sees it.
    pub(super) async fn stop<T>(&self, who: &str) -> T {
        self.stopped.lock().unwrap().insert(who.to_owned());
        self.stop_signal.notify_waiters();
        std::future::pending().await
    }

    /// What `who`'s last invocation wrote is left unchecked (it stopped, or a backfill whose
    /// check could not confirm it: the contract's windows), until a writer writes it again.
    pub fn leave_unchecked(&self, who: &str) {
        let landed = self.landed_by.lock().unwrap().remove(who);
        self.unchecked
            .lock()
            .unwrap()
            .extend(landed.into_iter().flatten());
    }

    /// `work` (one invocation of `who`), or `None` when it stopped between two calls.
    pub async fn until_stopped<T>(&self, who: &str, work: impl Future<Output = T>) -> Option<T> {
        self.landed_by.lock().unwrap().remove(who);
        self.running.lock().unwrap().insert(who.to_owned());
        let stopped = async {
            loop {
                let signal = self.stop_signal.notified();
                tokio::pin!(signal);
                signal.as_mut().enable();
                if self.stopped.lock().unwrap().remove(who) {
                    self.leave_unchecked(who);
                    return;
                }
                signal.await;
            }
        };
        // Biased: tokio otherwise polls the branches in a random order (not deterministic).
        let done = tokio::select! {
            biased;
            done = work => Some(done),
            () = stopped => None,
        };
        self.running.lock().unwrap().remove(who);
        // Ended before it saw a stop `time_passes` sent: the stop is for no invocation now.
        self.stopped.lock().unwrap().remove(who);
        done
    }

    /// Time passes as it can between two whole-fleet reconcile passes: Lambda's timeout ends
    /// every invocation under way (what it wrote is left unchecked; a write it had not sent is
    /// never sent), then a sweep mark's wait goes by in paused time, so a mark set before is
    /// ripe for the writers that come after.
    pub async fn time_passes(&self) {
        let ended: Vec<String> = self.running.lock().unwrap().iter().cloned().collect();
        self.note(format!("time passes: {ended:?} end"));
        self.stopped.lock().unwrap().extend(ended.iter().cloned());
        self.stop_signal.notify_waiters();
        while ended
            .iter()
            .any(|who| self.stopped.lock().unwrap().contains(who))
        {
            tokio::task::yield_now().await;
        }
        let wait = crate::domain::SWEEP_AFTER_SECONDS;
        tokio::time::advance(Duration::from_secs(wait)).await;
    }

    /// Account isolation: a value names its index, carries its account's API key and its own
    /// endpoint, and lands on the index's own keys or a shop its item has named.
    pub(super) fn trespass(&self, key: &KvKey, value: &str) -> Option<String> {
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
                    && super::ports::api_key_of(value["marqo_api_key"].as_str()) == Some(account)
                    && (key.key == own || shop)
            }
            Namespace::QueryConfigs => {
                key.key == format!("qfilter-{own}")
                    || crate::domain::kv::is_query_config_key_of(&index, &key.key)
            }
        };
        (!ours).then(|| format!("{key:?} holds {value}, not {own}'s to hold"))
    }

    /// The items whose keys pass `wanted`, in key order.
    pub(super) fn items_where(&self, wanted: impl Fn(&str, &str) -> bool) -> Vec<Item> {
        let table = self.table.lock().unwrap();
        (table.iter())
            .filter(|((pk, sk), _)| wanted(pk, sk))
            .map(|(_, item)| item.clone())
            .collect()
    }
}
