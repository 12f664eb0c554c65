//! A deterministic simulation of the writers over the in-memory world (issue 63), checked
//! against a reference model of what KV the table implies (docs/contract.md, "The simulation").
//!
//! A seeded run makes a workload over a small universe (two accounts, three indexes each,
//! moving between three shops, two of them claiming one shop at times, read aliases made and
//! dropped, overrides added and removed, records rejected as invalid), applies each change to
//! the table and delivers its stream record as Lambda would: one item's records in order on one
//! of the run's shards (two; a sweep of its own on three), batches of random size, each shard's
//! failed batch replayed from its lowest reported record, on the run's view type. Two operators
//! run re-exports, verify repairs, backfills, manual and scheduled reconciles between and during
//! batches. At every call to an outside system the scheduler (`world.rs`) may let another writer
//! go first, delay the call, fail it, answer a lagging KV read, or stop the invocation there;
//! every put is checked for account isolation as it lands. Wider workloads ([`Variety`]) add
//! the rest of what items and operators can say. Once the workload is done the faults stop,
//! every shard drains, every operator that failed is run again (as its error says), and KV must
//! equal the model, but what the contract leaves open; a reconcile pass then changes nothing
//! the model holds, and the next finds no drift.
//!
//! One seed: `SIMULATION_SEED=N SIMULATION_SHARDS=S SIMULATION_VARIETY=V cargo test --lib
//! simulation::one_seed -- --ignored --nocapture`. A sweep: `make simulate SEEDS=N FIRST=M
//! SHARDS=S VARIETY=V`.
#![cfg(test)]

mod model;
mod ports;
mod world;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use crate::domain::net::{self, Protection};
use crate::domain::table::settings_sk;
use crate::domain::{IndexRef, Namespace};
use crate::pipeline::api_key_cache::ApiKeyCache;
use crate::pipeline::exporter::{ExportOptions, Exporter};
use model::{settings_fields_in_kv, Implied, Model};
use ports::Sim;
use world::{Rng, World};

type SimExporter = Exporter<(Sim, Sim, Sim, Sim)>;

const STREAM_ARN: &str = "arn:aws:dynamodb:r:1:table/settings/stream/sim";
const ACCOUNTS: [&str; 2] = ["a", "b"];
// `x!y` sorts between `INDEX#x` and `INDEX#x#QUERY#...`: a scan reads `x`'s items apart.
const NAMES: [&str; 3] = ["x", "x!y", "z"];
const SHOPS: [&str; 3] = ["s1.myshopify.com", "s2.myshopify.com", "s3.myshopify.com"];
const QUERIES: [&str; 2] = ["shoes", "red # boots"];
/// The wide universe's accounts and names: ids that share prefixes and split at more than one
/// hyphen (`a-x-x-y` is `(a-x, x-y)`), none of them the id of two indexes.
const WIDE_ACCOUNTS: [&str; 2] = ["a", "a-x"];
const WIDE_NAMES: [&str; 3] = ["x", "x-y", "z"];
/// The cells an index of the eventual workload moves between (`default`: as with no `cell`).
const CELLS: [&str; 3] = ["default", "c1", "c2"];
/// The cell of the hostile workload where no account has an API key.
const GONE_CELL: &str = "gone";
/// The stream's shards a run delivers on: 2 (`make test`), or up to this many.
const MAX_SHARDS: usize = 3;

/// The part of the universe a seed's workload uses, and how busy its operators are (swarm
/// testing: a seed with one index and busy operators races where one with six rarely does).
#[derive(Clone, Copy)]
struct Universe {
    accounts: &'static [&'static str],
    names: &'static [&'static str],
    /// An operator waits up to this long between two runs, in ms.
    operator_pause: u64,
    variety: Variety,
    /// Whether operators run reconciles (all but half the contended seeds).
    reconciles: bool,
}

/// How much of what items and operators can say a run's workload uses. Each level's draws come
/// after the level below's, so a seed of a lower level runs as it always did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Variety {
    /// Read aliases of one target, re-exports and verify repairs with query configs, whole
    /// reconciles and backfills.
    Plain,
    /// Also analytics, legacy (`read_alias`) and two-target aliases, and every operator's
    /// options: pieces, dry runs, reports without repair, one account's or a deep reconcile.
    Varied,
    /// Also index ids that share prefixes and split at more than one hyphen, aliases that
    /// cannot be read (fail closed), shop ids that are no shop, KV listings that carry the
    /// metadata each put wrote (as Cloudflare's do; below, a listing has none, as for a key
    /// written by hand), and stream batches of up to ten records.
    Wide,
    /// Also what the outside gives only loosely: KV listings that lag as Cloudflare's do (its
    /// listing is eventually consistent too), stream batches delivered again after they
    /// succeeded (Lambda delivers at least once), and indexes that move between cells (each
    /// cell's API key differs).
    Eventual,
    /// Also records rejected only as they are planned: an index moved to a cell where its
    /// account has no API key (`gone`: the API keys service answers not found).
    Hostile,
    /// Also writers that stall where another's word can slip in (a KV write, an intent, the
    /// stream's shrink held 100 ms to a second), and half the seeds with no operator's
    /// reconcile (whose ledger repair would hide a reference lost meanwhile).
    Contended,
}

/// The workloads by their number (`SIMULATION_VARIETY`).
const VARIETIES: [Variety; 6] = [
    Variety::Plain,
    Variety::Varied,
    Variety::Wide,
    Variety::Eventual,
    Variety::Hostile,
    Variety::Contended,
];

impl Universe {
    fn of(rng: &mut Rng, variety: Variety) -> Universe {
        let (accounts, names) = match variety >= Variety::Wide {
            true => (&WIDE_ACCOUNTS, &WIDE_NAMES),
            false => (&ACCOUNTS, &NAMES),
        };
        let accounts = &accounts[..1 + rng.below(2) as usize];
        let names = &names[..1 + rng.below(3) as usize];
        let operator_pause = *rng.pick(&[15, 70, 70]);
        Universe {
            accounts,
            names,
            operator_pause,
            variety,
            reconciles: variety < Variety::Contended || rng.chance(50),
        }
    }

    /// An index id of the universe.
    fn id(&self, rng: &mut Rng) -> String {
        let (account, name) = self.index(rng);
        format!("{account}-{name}")
    }

    fn index(&self, rng: &mut Rng) -> (&'static str, &'static str) {
        (*rng.pick(self.accounts), *rng.pick(self.names))
    }
}

fn exporter(world: &Arc<World>, who: &'static str) -> SimExporter {
    let sim = Sim(world.clone(), who);
    Exporter::new(
        sim.clone(),
        ApiKeyCache::new(sim.clone(), Duration::from_secs(60)),
        sim.clone(),
        sim,
        ExportOptions {
            // A new scheduled pass every 300 ms: several during a run's workload.
            reconcile_every: Duration::from_millis(300),
            default_cell: "default".into(),
            default_configs_sk: "DEFAULT_CONFIGS".into(),
            stream_arn: Some(STREAM_ARN.into()),
        },
    )
}

/// The table as DynamoDB JSON, by key (what the model reads).
type Items = BTreeMap<(String, String), Value>;

/// What a run did: its trace, and what it found wrong.
pub struct Run {
    pub trace: Vec<String>,
    pub violations: Vec<String>,
}

/// The workload's side: the table's items as JSON, and each shard's undelivered records.
struct Workload {
    items: Items,
    shards: Vec<VecDeque<Value>>,
    sequence: u64,
    new_image_only: bool,
    /// The index the last change was to (operators run on it half the time: races are where
    /// the stream is busy).
    hot: Option<(&'static str, &'static str)>,
    /// Each removed index an alias must keep, with the indexes whose alias keeps it (`guard`).
    guarded: BTreeMap<IndexRef, BTreeSet<IndexRef>>,
    /// The sequence number of each item's last record.
    last: BTreeMap<(String, String), String>,
}

impl Workload {
    /// Changes one item (`None`: removes it), in the table and on its shard.
    fn change(&mut self, world: &World, pk: &str, sk: &str, new: Option<Value>) {
        let key = (pk.to_owned(), sk.to_owned());
        let old = self.items.get(&key).cloned();
        if old.is_none() && new.is_none() {
            return;
        }
        let event = match (&old, &new) {
            (None, _) => "INSERT",
            (_, None) => "REMOVE",
            _ => "MODIFY",
        };
        match &new {
            Some(item) => {
                let shop = item["shop_id"]["S"].as_str().map(str::to_owned);
                if let Some((name, shop)) = settings_name(sk).zip(shop) {
                    let claim = (IndexRef::new(pk, name), shop);
                    world.claimed_ever.lock().unwrap().insert(claim);
                }
                self.items.insert(key.clone(), item.clone());
                let item = crate::dynamo::item_from_dynamodb_json(item.clone()).unwrap();
                world.table.lock().unwrap().insert(key.clone(), item);
            }
            None => {
                self.items.remove(&key);
                world.table.lock().unwrap().remove(&key);
            }
        }
        if let Some(name) = settings_name(sk) {
            self.guard(world, IndexRef::new(pk, name), new.as_ref());
        }
        self.sequence += 1;
        let sequence = format!("{:020}", self.sequence);
        self.last.insert(key, sequence.clone());
        let view = match self.new_image_only {
            true => "NEW_IMAGE",
            false => "NEW_AND_OLD_IMAGES",
        };
        let mut change = json!({"Keys": {"pk": {"S": pk}, "sk": {"S": sk}},
            "SequenceNumber": sequence, "SizeBytes": 1,
            "StreamViewType": view});
        if let Some(new) = new {
            change["NewImage"] = new;
        }
        if let (Some(old), false) = (old, self.new_image_only) {
            change["OldImage"] = old;
        }
        let record = json!({"eventID": self.sequence.to_string(), "eventName": event,
            "awsRegion": "r", "eventSourceARN": STREAM_ARN, "dynamodb": change});
        let shown = (record["dynamodb"]["NewImage"].as_object())
            .map(|image| {
                let shop = image.get("shop_id").map(|s| s["S"].to_string());
                let reads = &image
                    .get("index_aliases")
                    .map(|a| a["M"]["doc_reads"]["M"].clone());
                let reads = reads.as_ref().map(|r| {
                    format!(
                        "{} {}",
                        r["enabled"]["BOOL"], r["targets"]["L"][0]["M"]["index_id"]["S"]
                    )
                });
                let endpoint = image.get("index_endpoint").map(|e| e["S"].to_string());
                format!("endpoint {endpoint:?} shop {shop:?} reads {reads:?}")
            })
            .unwrap_or_default();
        world.note(format!("table: {event} {pk} {sk} {shown}"));
        let shard = shard_of(pk, sk, self.shards.len());
        self.shards[shard].push_back(record);
    }

    /// "Alias deletion safety", as the table moves: an index removed while a valid record
    /// whose alias the ledger records reads it (the stream done with both items' records so far,
    /// the index's own key there) is guarded by that record until the record no longer reads
    /// it (or can no longer be exported), or the index comes back.
    fn guard(&mut self, world: &World, changed: IndexRef, new: Option<&Value>) {
        let reads = |item: &Value, target: &IndexRef| {
            model::valid(item) && model::live_targets(item).contains(&target.id().0)
        };
        for (target, holders) in self.guarded.iter_mut() {
            if !new.is_some_and(|item| reads(item, target)) {
                holders.remove(&changed);
            }
        }
        let drained = world.drained.lock().unwrap();
        let done = |key: &(String, String)| self.last.get(key).is_some_and(|s| drained.contains(s));
        let own = (Namespace::Settings, changed.id().0);
        let held = world.kv.lock().unwrap().contains_key(&own);
        let key = (changed.account.clone(), settings_sk(&changed.name));
        if new.is_some() {
            self.guarded.remove(&changed);
        } else if held && done(&key) {
            let recorded = world.ledger.refs.lock().unwrap();
            let holders = (self.items.iter()).filter_map(|(key, item)| {
                let name = settings_name(&key.1)?;
                let holder = IndexRef::new(&key.0, name);
                let targets = recorded.get(&holder).map(|refs| &refs.targets);
                let recorded = targets.is_some_and(|t| t.contains(&changed.id().0));
                let read = holder != changed && recorded && reads(item, &changed);
                (read && done(key)).then_some(holder)
            });
            let holders = holders.collect();
            self.guarded.insert(changed, holders);
        }
        self.guarded.retain(|_, holders| !holders.is_empty());
    }
}

/// The index name of a settings item's sort key (`None`: an override's, or another item's).
fn settings_name(sk: &str) -> Option<&str> {
    sk.strip_prefix("INDEX#").filter(|name| !name.contains('#'))
}

/// An item's shard, the same in every run (FNV-1a).
fn shard_of(pk: &str, sk: &str, shards: usize) -> usize {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in pk.bytes().chain([0]).chain(sk.bytes()) {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
    }
    (hash % shards as u64) as usize
}

/// One random change of the universe, to `(account, name)`'s items.
fn random_change(
    rng: &mut Rng,
    version: u64,
    universe: &Universe,
    (account, name): (&str, &str),
) -> (String, String, Option<Value>) {
    let index_sk = format!("INDEX#{name}");
    match rng.below(10) {
        // Settings: a new endpoint, a shop or none, a read alias or none, now and then invalid.
        0..=4 => {
            let scheme = if rng.chance(8) { "http" } else { "https" };
            let mut item = json!({"pk": {"S": account}, "sk": {"S": index_sk},
                "index_endpoint": {"S": format!("{scheme}://{account}-{name}.v{version}")}});
            if rng.chance(70) {
                item["shop_id"] = json!({"S": *rng.pick(&SHOPS)});
            }
            if rng.chance(40) {
                let (account, name) = universe.index(rng);
                let target = format!("{account}-{name}");
                // Now and then a weight no float holds: the record is rejected for it.
                let weight = if rng.chance(5) { "1e400" } else { "1" };
                item["index_aliases"] = json!({"M": {"doc_reads": {"M": {
                    "enabled": {"BOOL": rng.chance(80)},
                    "targets": {"L": [{"M": {"index_id": {"S": target}, "weight": {"N": weight}}}]}}}}});
                if universe.variety >= Variety::Varied {
                    vary_aliases(rng, universe, &mut item);
                }
            }
            if universe.variety >= Variety::Wide && rng.chance(5) {
                item["shop_id"] = json!({"S": "Shop-4.myshopify.com"});
            }
            if universe.variety >= Variety::Eventual && rng.chance(60) {
                item["cell"] = json!({"S": *rng.pick(&CELLS)});
            }
            if universe.variety >= Variety::Hostile && rng.chance(8) {
                item["cell"] = json!({"S": GONE_CELL});
            }
            (account.into(), index_sk, Some(item))
        }
        5 | 6 => (account.into(), index_sk, None),
        7 | 8 => {
            let sk = format!("INDEX#{name}#QUERY#{}", rng.pick(&QUERIES));
            let item = json!({"pk": {"S": account}, "sk": {"S": sk},
                "query_config": {"M": {"boost": {"N": (version % 7).to_string()}}}});
            (account.into(), sk, Some(item))
        }
        _ => {
            let sk = format!("INDEX#{name}#QUERY#{}", rng.pick(&QUERIES));
            (account.into(), sk, None)
        }
    }
}

/// The varied workload's aliases: an analytics alias beside or instead of the read alias, a
/// legacy `read_alias` (it wins over `doc_reads`), or a second read target; the wide one's also
/// a weight stored as a string (the aliases cannot be read).
fn vary_aliases(rng: &mut Rng, universe: &Universe, item: &mut Value) {
    let kinds = if universe.variety >= Variety::Wide {
        5
    } else {
        4
    };
    match rng.below(kinds) {
        0 => {}
        1 => {
            let target = match rng.chance(15) {
                true => json!({"NULL": true}),
                false => json!({"S": universe.id(rng)}),
            };
            let analytics = json!({"M": {"enabled": {"BOOL": rng.chance(70)}, "index_id": target,
                                         "internal": {"BOOL": rng.chance(50)}}});
            let aliases = item["index_aliases"]["M"].as_object_mut().unwrap();
            if rng.chance(50) {
                aliases.remove("doc_reads");
            }
            aliases.insert("analytics".into(), analytics);
        }
        2 => item["read_alias"] = json!({"S": universe.id(rng)}),
        3 => {
            let second =
                json!({"M": {"index_id": {"S": universe.id(rng)}, "weight": {"N": "0.5"}}});
            let reads = &mut item["index_aliases"]["M"]["doc_reads"]["M"]["targets"]["L"];
            reads.as_array_mut().unwrap().push(second);
        }
        _ => {
            let reads = &mut item["index_aliases"]["M"]["doc_reads"]["M"]["targets"]["L"];
            reads[0]["M"]["weight"] = json!({"S": "1"});
        }
    }
}

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(60)
}

/// The sequence numbers a stream answer reports for retry.
fn reported(answer: &Value) -> Vec<String> {
    (answer["batchItemFailures"].as_array().into_iter().flatten())
        .filter_map(|f| f["itemIdentifier"].as_str().map(str::to_owned))
        .collect()
}

/// One shard's next batch delivered, as Lambda does: on a partial failure the records from the
/// lowest reported one stay, to be delivered again. Answers whether the batch was reported.
async fn deliver(world: &World, (who, exporter): Writer<'_>, shard: &mut VecDeque<Value>) -> bool {
    // The wide workload's batches are larger: an index's records meet in one more often.
    let size = 1 + world.below(if world.wide { 10 } else { 4 }) as usize;
    let batch: Vec<Value> = shard.iter().take(size).cloned().collect();
    if batch.is_empty() {
        return false;
    }
    let answer = invoke(world, (who, exporter), &json!({ "Records": batch })).await;
    let failed = match answer {
        Ok(answer) => reported(&answer),
        // The whole invocation failed or stopped: Lambda retries the batch.
        Err(_) => vec![batch[0]["dynamodb"]["SequenceNumber"]
            .as_str()
            .unwrap()
            .into()],
    };
    let sequence = |r: &Value| r["dynamodb"]["SequenceNumber"].as_str().unwrap().to_owned();
    let done = match failed.iter().min() {
        Some(lowest) => batch.iter().take_while(|r| sequence(r) < *lowest).count(),
        None => batch.len(),
    };
    let keys: Vec<String> = (batch.iter())
        .map(|r| {
            format!(
                "{} {}",
                r["dynamodb"]["SequenceNumber"].as_str().unwrap(),
                r["dynamodb"]["Keys"]["sk"]["S"]
            )
        })
        .collect();
    // At least once: now and then a batch that succeeded is delivered again.
    let again = world.eventual && failed.is_empty() && world.below(100) < 10;
    let done = if again { 0 } else { done };
    world.note(format!("batch {keys:?}: {done} done, {failed:?} reported"));
    let mut drained = world.drained.lock().unwrap();
    drained.extend(shard.drain(..done).map(|record| sequence(&record)));
    !failed.is_empty()
}

/// An operator's run on an index (re-export or verify repair, with query configs): the hot one
/// half the time, else any.
fn operator_payload(rng: &mut Rng, universe: &Universe, hot: Option<(&str, &str)>) -> Value {
    let any = universe.index(rng);
    let (account, name) = hot.filter(|_| rng.chance(50)).unwrap_or(any);
    match rng.below(2) {
        0 => json!({"system_account_id": account, "index_name": name,
                    "include_query_configs": true}),
        _ => json!({"mode": "verify", "system_account_id": account, "index_name": name,
                    "include_query_configs": true, "repair": true}),
    }
}

/// The varied workload's operator options: an index's query configs left out or taken in
/// pieces, a report without repair, a dry run, one account's reconcile, a deep one, in pieces.
fn vary_operator(rng: &mut Rng, universe: &Universe, payload: &mut Value) {
    let mode = payload["mode"].as_str().unwrap_or("reexport").to_owned();
    let scheduled = payload["scheduled"].as_bool() == Some(true);
    if rng.chance(10) && !scheduled {
        payload["dry_run"] = json!(true);
    }
    match mode.as_str() {
        "reexport" | "verify" => {
            payload["include_query_configs"] = json!(rng.chance(70));
            if rng.chance(30) {
                payload["max_records"] = json!(1 + rng.below(3));
            }
            if mode == "verify" && rng.chance(20) {
                payload["repair"] = json!(false);
            }
        }
        "reconcile" if !scheduled => {
            if rng.chance(30) {
                payload["system_account_id"] = json!(universe.index(rng).0);
            }
            if rng.chance(30) {
                payload["deep"] = json!(true);
            }
            if rng.chance(20) {
                payload["max_keys"] = json!(3 + rng.below(8));
            }
        }
        _ => {}
    }
}

/// A writer: its name in the trace, and its exporter.
type Writer<'a> = (&'static str, &'a SimExporter);

/// One invocation through the handler; one the scheduler stopped between two calls fails.
async fn invoke(
    world: &World,
    (who, exporter): Writer<'_>,
    payload: &Value,
) -> Result<Value, String> {
    let payload = serde_json::to_vec(payload).unwrap();
    let answer = crate::entry::route(exporter, payload, deadline());
    match world.until_stopped(who, answer).await {
        Some(answer) => answer.map_err(|e| e.to_string()),
        None => Err("stopped between two calls".into()),
    }
}

/// An operator's run to its end: a run answering a continuation token is invoked again with it
/// (as `ecom-settings-ctl` does), a few times at most. A failure answers the payload that failed.
async fn run_operator(
    world: &World,
    writer: Writer<'_>,
    mut payload: Value,
) -> Result<Value, (Value, String)> {
    for _ in 0..60 {
        let answer = invoke(world, writer, &payload).await;
        // Window: a backfill's write its check could not confirm (it adds to the ledger only
        // what is missing, so a stream's shrink may have taken the shop out under it); and a
        // scheduled reconcile's that failed (a write whose answer was lost): the next pass
        // redoes it, not its run again, which finds the pass leased or done (seed 616, hostile).
        let failed = answer
            .as_ref()
            .map_or(true, |a| a["failed"].as_u64() > Some(0));
        let left = payload["mode"] == "backfill" || payload["scheduled"] == true;
        if left && failed {
            world.leave_unchecked(writer.0);
        }
        let answer = answer.map_err(|error| (payload.clone(), error))?;
        match answer["continuation_token"].as_str() {
            Some(token) if payload["scheduled"].is_null() => {
                payload["continuation_token"] = json!(token);
            }
            _ => return Ok(answer),
        }
    }
    Err((payload, "still not complete after 60 runs".into()))
}

/// What an operator runs: a manual or scheduled reconcile repair, a backfill in small pages, or
/// a re-export or verify repair of one index.
fn operator_run(rng: &mut Rng, universe: &Universe, hot: Option<(&str, &str)>) -> Value {
    let mut payload = match rng.below(20) {
        0..=4 if !universe.reconciles => operator_payload(rng, universe, hot),
        0..=2 => json!({"mode": "reconcile", "repair": true}),
        3 | 4 => json!({"mode": "reconcile", "repair": true, "scheduled": true}),
        5 | 6 => {
            let mut backfill = json!({"mode": "backfill", "include_query_configs": true,
                                      "page_size": 1 + rng.below(4), "batch_records": 1 + rng.below(8)});
            if rng.chance(30) {
                backfill["system_account_id"] = json!(universe.index(rng).0);
            }
            backfill
        }
        _ => operator_payload(rng, universe, hot),
    };
    if universe.variety >= Variety::Varied {
        vary_operator(rng, universe, &mut payload);
    }
    payload
}

/// How a seed runs: on how many of the stream's shards, and on which workload.
#[derive(Clone, Copy, Debug)]
pub struct Setup {
    pub shards: usize,
    pub variety: Variety,
    /// A protection the writers run without (the net's proof that a seed finds it missing).
    pub off: Option<Protection>,
}

impl Setup {
    /// `make test`'s plain run, on two shards: every seed of `FOUND` replays its own run.
    const PLAIN: Setup = Setup {
        shards: 2,
        variety: Variety::Plain,
        off: None,
    };

    /// How a sweep or one seed runs: `SIMULATION_SHARDS` (2 unless said), `SIMULATION_VARIETY`
    /// (0 plain, unless said; 1 varied; 2 wide; 3 eventual; 4 hostile; 5 contended),
    /// `SIMULATION_NET_OFF`
    /// (a protection to take out, as [`Protection`] names it; none unless said).
    fn from_env() -> Setup {
        let variety = env("SIMULATION_VARIETY", 0) as usize;
        let off = std::env::var("SIMULATION_NET_OFF").ok().map(|name| {
            Protection::named(&name).unwrap_or_else(|| panic!("no protection is named {name}"))
        });
        Setup {
            shards: env("SIMULATION_SHARDS", 2) as usize,
            variety: VARIETIES[variety.min(VARIETIES.len() - 1)],
            off,
        }
    }
}

impl std::fmt::Display for Setup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let variety = format!("{:?}", self.variety).to_lowercase();
        write!(f, "{} shards, {variety} workload", self.shards)?;
        match self.off {
            Some(protection) => write!(f, ", without {protection:?}"),
            None => Ok(()),
        }
    }
}

/// Runs one seed as `setup` says to the end and checks it.
pub fn run(seed: u64, setup: Setup) -> Run {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let shards = setup.shards.clamp(1, MAX_SHARDS);
    let setup = Setup { shards, ..setup };
    net::without(setup.off, || runtime.block_on(run_seed(seed, setup)))
}

async fn run_seed(
    seed: u64,
    Setup {
        shards, variety, ..
    }: Setup,
) -> Run {
    let world = World::new(seed, variety);
    let mut rng = Rng::new(seed ^ 0x5EED);
    let workload = std::sync::Mutex::new(Workload {
        items: Items::new(),
        shards: vec![VecDeque::new(); shards],
        sequence: 0,
        new_image_only: seed.is_multiple_of(2),
        hot: None,
        guarded: BTreeMap::new(),
        last: BTreeMap::new(),
    });
    let changes = 10 + rng.below(30);
    let universe = Universe::of(&mut rng, variety);
    let done = std::sync::atomic::AtomicBool::new(false);
    let failed_operators = std::sync::Mutex::new(Vec::new());
    let stalled = std::sync::Mutex::new(Vec::new());

    // Half the seeds let a sweep's wait pass once, at a change of their own (a rng apart, so
    // the other half run as before).
    let mut jump = Rng::new(seed ^ 0x5EE9);
    let time_passes_at = jump.chance(50).then(|| jump.below(changes));
    let driver = async {
        for version in 0..changes {
            if time_passes_at == Some(version) {
                world.time_passes().await;
            }
            let index = universe.index(&mut rng);
            let (pk, sk, item) = random_change(&mut rng, version, &universe, index);
            {
                let mut workload = workload.lock().unwrap();
                workload.change(&world, &pk, &sk, item);
                workload.hot = Some(index);
            }
            tokio::time::sleep(Duration::from_millis(world.below(40))).await;
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
    };
    let shard = |at: usize| {
        let (world, workload, done, stalled) = (&world, &workload, &done, &stalled);
        async move {
            let who = ["shard 0", "shard 1", "shard 2"][at];
            let exporter = exporter(world, who);
            let mut reported_without_faults = 0;
            loop {
                tokio::time::sleep(Duration::from_millis(world.below(50))).await;
                let mut queue = std::mem::take(&mut workload.lock().unwrap().shards[at]);
                let ended = queue.is_empty() && done.load(std::sync::atomic::Ordering::SeqCst);
                if ended {
                    return;
                }
                let faults = world.scheduler.lock().unwrap().faults;
                if deliver(world, (who, &exporter), &mut queue).await && !faults {
                    reported_without_faults += 1;
                }
                if reported_without_faults > 10 {
                    let next = queue.front().map(|r| r["dynamodb"]["Keys"].to_string());
                    let stall = format!("shard {at} stalls with no fault at {next:?}");
                    stalled.lock().unwrap().push(stall);
                    return;
                }
                // Records the workload added meanwhile go after the undelivered ones.
                let mut shards = workload.lock().unwrap();
                queue.extend(shards.shards[at].drain(..));
                shards.shards[at] = queue;
            }
        }
    };
    let operator = |who: &'static str, salt: u64| {
        let (world, done, failed_operators) = (&world, &done, &failed_operators);
        let workload = &workload;
        async move {
            let exporter = exporter(world, who);
            let mut rng = Rng::new(seed ^ salt);
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let pause = universe.operator_pause;
                tokio::time::sleep(Duration::from_millis(1 + world.below(pause))).await;
                let hot = workload.lock().unwrap().hot;
                let payload = operator_run(&mut rng, &universe, hot);
                world.note(format!("{who}: {payload}"));
                if let Err((payload, error)) = run_operator(world, (who, &exporter), payload).await
                {
                    world.note(format!("{who} failed: {error}"));
                    if !error.starts_with("no settings record") {
                        failed_operators.lock().unwrap().push(payload);
                    }
                }
            }
        }
    };
    let operators = futures::future::join(
        operator("operator 1", 0x0BE7),
        operator("operator 2", 0x0BE8),
    );
    let shards = futures::future::join_all((0..shards).map(shard));
    // The faults stop once the workload is done: every shard drains.
    let stop_faults = async {
        while !done.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        world.scheduler.lock().unwrap().faults = false;
    };
    tokio::join!(driver, shards, operators, stop_faults);

    let mut violations = stalled.into_inner().unwrap();
    violations.extend(std::mem::take(&mut *world.broken.lock().unwrap()));
    let exporter = exporter(&world, "settle");
    let Workload { items, guarded, .. } = workload.into_inner().unwrap();
    let guarded: BTreeSet<IndexRef> = guarded.into_keys().collect();
    let mut model = Model::of(&items);
    // Every operator that failed, run again as its error says (one whose record is rejected
    // fails again, on purpose).
    for payload in failed_operators.into_inner().unwrap() {
        world.note(format!("operator again: {payload}"));
        let index = IndexRef::new(
            payload["system_account_id"].as_str().unwrap_or_default(),
            payload["index_name"].as_str().unwrap_or_default(),
        );
        match run_operator(&world, ("settle", &exporter), payload.clone()).await {
            // Window "an operator's write of an index removed meanwhile, whose check could not
            // read": its run again finds no record; the next reconcile pass deletes its keys.
            Err((_, error)) if error.starts_with("no settings record") => {
                model.rejected.insert(index);
            }
            Err((_, error)) if !model.rejected.contains(&index) => {
                violations.push(format!("{payload} failed again without faults: {error}"));
            }
            _ => {}
        }
    }
    let mut settled = Model::of(&items);
    let removed_under_operators: Vec<IndexRef> = (model.rejected)
        .difference(&settled.rejected)
        .cloned()
        .collect();
    settled
        .rejected
        .extend(removed_under_operators.iter().cloned());
    settled.open_until_reconcile.extend(removed_under_operators);
    settled
        .kept
        .extend(aliased_in_the_ledger_only(&world, &items));
    settled.guarded.clone_from(&guarded);
    let unchecked: BTreeSet<(&str, String)> = (world.unchecked.lock().unwrap().iter())
        .map(|(namespace, key)| (namespace.name(), key.clone()))
        .collect();
    let when = "once the writers settled";
    violations.extend(check(&world, &settled, when, Some(&unchecked)));
    // A reconcile pass changes nothing the model holds, and the next finds no drift.
    let mut model = Model::of(&items);
    model.guarded = guarded;
    for pass in ["first", "second"] {
        let reconcile = json!({"mode": "reconcile", "repair": true});
        match invoke(&world, ("settle", &exporter), &reconcile).await {
            Ok(answer) if pass == "second" => {
                for ns in ["settings", "query_configs"] {
                    let counts = &answer["counts"][ns];
                    let drift: u64 = (["missing", "stale", "orphaned"].iter())
                        .map(|class| counts[class].as_u64().unwrap_or_default())
                        .sum();
                    if drift > 0 {
                        violations.push(format!("the second reconcile pass found drift: {answer}"));
                    }
                }
            }
            Ok(_) => {}
            Err(error) => violations.push(format!("the {pass} reconcile pass failed: {error}")),
        }
        let when = format!("after the {pass} reconcile pass");
        violations.extend(check(&world, &model, &when, None));
        // The first pass's marks are ripe for the second (every write has landed).
        tokio::time::sleep(Duration::from_secs(crate::domain::SWEEP_AFTER_SECONDS)).await;
    }
    violations.extend(beyond_the_fleet(&world, &items));
    violations.extend(std::mem::take(&mut *world.broken.lock().unwrap()));
    let trace = std::mem::take(&mut world.scheduler.lock().unwrap().trace);
    Run { trace, violations }
}

/// "The ledger is bounded by the live fleet": after the reconcile passes, it records no index
/// the table has no settings item of and no settings item names as an alias target.
fn beyond_the_fleet(world: &World, items: &Items) -> Vec<String> {
    let named: BTreeSet<String> = items.values().flat_map(model::named_targets).collect();
    let live = |index: &IndexRef| {
        let key = (index.account.clone(), format!("INDEX#{}", index.name));
        items.contains_key(&key) || named.contains(&index.id().0)
    };
    let refs = world.ledger.refs.lock().unwrap();
    let back = world.ledger.back.lock().unwrap();
    let recorded: BTreeSet<&IndexRef> = refs.keys().chain(back.iter().map(|(_, i)| i)).collect();
    (recorded.into_iter())
        .filter(|index| !live(index))
        .map(|index| format!("the ledger still records {index}, removed and aliased by nobody, after the reconcile passes"))
        .collect()
}

/// Removed indexes the ledger records an alias of that its holder's item no longer has (window:
/// a reconcile's add of an alias from an older read of its holder, landing after the stream read
/// the holder's newer record; the target stays kept until the holder's next record or the next
/// reconcile pass).
fn aliased_in_the_ledger_only(world: &World, items: &Items) -> Vec<IndexRef> {
    let refs = world.ledger.refs.lock().unwrap();
    let mut kept = Vec::new();
    for (holder, refs) in refs.iter() {
        let item = items.get(&(holder.account.clone(), format!("INDEX#{}", holder.name)));
        let live = item.map(model::live_targets).unwrap_or_default();
        for target in &refs.targets {
            let (account, name) = target.split_once('-').expect("a-n");
            let removed = !items.contains_key(&(account.into(), format!("INDEX#{name}")));
            if removed && !live.contains(target) {
                kept.push(IndexRef::new(account, name));
            }
        }
    }
    kept
}

/// KV against the model: every key the model implies holds it; every other key is one the
/// contract leaves open (a rejected record's, a kept index's); every shop key serving an index
/// is in that index's recorded references. Until a reconcile pass (`unchecked`: the keys a
/// stopped invocation left unchecked, open until then), a key naming an index whose record is
/// rejected is open (window: a rejected record leaves its keys as they were), but for a shop
/// its raw item no longer claims (the stream gives it up, but for the indexes
/// `open_until_reconcile`); after, only where the model implies
/// nothing (its own key, a shop its raw item claims), or a shop its raw item claims too.
fn check(
    world: &World,
    model: &Model,
    when: &str,
    unchecked: Option<&BTreeSet<(&str, String)>>,
) -> Vec<String> {
    let reconciled = unchecked.is_none();
    let unchecked = unchecked.cloned().unwrap_or_default();
    let kv = world.kv.lock().unwrap().clone();
    let mut violations = Vec::new();
    let mut held = BTreeMap::new();
    for ((namespace, key), value) in &kv {
        held.insert((namespace.name(), key.clone()), value.clone());
    }
    for (at, implied) in &model.implied {
        if unchecked.contains(&(at.0, at.1.clone())) {
            continue;
        }
        // Window "an operator's write of an index removed meanwhile": until the reconcile pass,
        // a key of the index may hold what its stale write left, or be gone.
        let of = |value: &Value| {
            let ids = value["system_account_id"]
                .as_str()
                .zip(value["index_name"].as_str());
            ids.map(|(account, name)| IndexRef::new(account, name))
        };
        let index = match implied {
            Implied::Value(value) => of(value),
            Implied::AnyOf(_) => None,
        };
        if !reconciled && index.is_some_and(|i| model.open_until_reconcile.contains(&i)) {
            continue;
        }
        let Some(value) = held.get(at) else {
            violations.push(format!(
                "{when}: {at:?} missing, the table implies {implied:?}"
            ));
            continue;
        };
        let value: Value = serde_json::from_str(value).unwrap();
        let owner = (value["system_account_id"].as_str()).zip(value["index_name"].as_str());
        let owner = owner.map(|(a, n)| IndexRef::new(a, n));
        let rejected = owner.filter(|owner| model.rejected.contains(owner));
        let claims = |owner: &IndexRef| {
            model
                .rejected_shops
                .contains(&(owner.clone(), at.1.clone()))
        };
        // Until the reconcile pass, a rejected index's keys are left as they were, but for a
        // shop its raw item no longer claims: the stream gives that up.
        let left = |owner: &IndexRef| {
            let own = at.1 == format!("{}-{}", owner.account, owner.name);
            at.0 != "settings" || own || model.open_until_reconcile.contains(owner)
        };
        if rejected.is_some_and(|owner| claims(&owner) || (!reconciled && left(&owner))) {
            continue;
        }
        // Window: a shop a rejected record's raw item claims is left as it was until the
        // reconcile pass, whoever's value it holds (seed 18413 of the wide workload: a claimer's
        // older value, whose check's write again failed, the replayed record rejected since).
        let rejected_claim = (model.rejected_shops.iter()).any(|(_, shop)| *shop == at.1);
        if !reconciled && at.0 == "settings" && rejected_claim {
            continue;
        }
        let holds = |expected: &Value| match at.0 {
            "settings" => settings_fields_in_kv(&value) == *expected,
            _ if at.1.starts_with("qfilter-") => value == *expected,
            _ => {
                let fields = ["system_account_id", "index_name", "query", "config"];
                fields.iter().all(|f| value[f] == expected[f])
            }
        };
        let right = match implied {
            Implied::Value(expected) => holds(expected),
            Implied::AnyOf(expected) => expected.iter().any(holds),
        };
        if !right {
            violations.push(format!(
                "{when}: {at:?} holds {value}, the table implies {implied:?}"
            ));
        }
    }
    for (at, value) in &held {
        if model.implied.contains_key(at) || unchecked.contains(&(at.0, at.1.clone())) {
            continue;
        }
        let value: Value = serde_json::from_str(value).unwrap_or_default();
        let owner = (value["system_account_id"].as_str()).zip(value["index_name"].as_str());
        let owner = owner.map(|(a, n)| IndexRef::new(a, n));
        let open = owner.as_ref().is_some_and(|owner| {
            let own = at.1 == format!("{}-{}", owner.account, owner.name);
            let shop = at.0 == "settings" && !own;
            // A rejected index's shop its raw item no longer claims is given up (recorded).
            let rejected_keeps = !shop
                || model
                    .rejected_shops
                    .contains(&(owner.clone(), at.1.clone()))
                || (!reconciled && model.open_until_reconcile.contains(owner));
            (model.rejected.contains(owner) && rejected_keeps)
                || (model.kept.contains(owner) && (own || (shop && !model.claimed.contains(&at.1))))
        });
        if !open {
            violations.push(format!(
                "{when}: {at:?} holds {value}, the table implies no such key"
            ));
        }
    }
    // "Alias deletion safety": a removed index an alias keeps holds its own key.
    for target in &model.guarded {
        if !held.contains_key(&("settings", target.id().0)) {
            violations.push(format!(
                "{when}: {target}'s own key is gone while an alias recorded before its removal reads it"
            ));
        }
    }
    // Every shop key serving an index is recorded for it (but where a window leaves it).
    let refs = world.ledger.refs.lock().unwrap();
    for ((namespace, key), value) in &held {
        let open = unchecked.contains(&(*namespace, key.clone()));
        if *namespace != "settings" || !key.ends_with(".myshopify.com") || open {
            continue;
        }
        let value: Value = serde_json::from_str(value).unwrap_or_default();
        let owner = (value["system_account_id"].as_str()).zip(value["index_name"].as_str());
        let Some(owner) = owner.map(|(a, n)| IndexRef::new(a, n)) else {
            continue;
        };
        let recorded = refs.get(&owner).is_some_and(|r| r.shops.contains(key));
        if !recorded {
            violations.push(format!(
                "{when}: shop key {key} serves {owner}, which the ledger does not record on it"
            ));
        }
    }
    violations
}

/// A failed seed: what differed, and the steps of its trace.
fn report(seed: u64, setup: Setup, run: &Run) -> String {
    let tail: Vec<&String> = run.trace.iter().rev().take(400).collect();
    let tail: Vec<&String> = tail.into_iter().rev().collect();
    format!(
        "seed {seed} on {setup} (rerun: SIMULATION_SEED={seed} SIMULATION_SHARDS={} SIMULATION_VARIETY={} cargo test --lib simulation::one_seed -- --ignored --nocapture):\n{}\ntrace (last {} of {} steps):\n{}",
        setup.shards,
        setup.variety as u8,
        run.violations.join("\n"),
        tail.len(),
        run.trace.len(),
        tail.iter().map(|s| s.as_str()).collect::<Vec<_>>().join("\n")
    )
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Seeds `make test` runs (`SIMULATION_SEEDS` to change), from `SIMULATION_FIRST_SEED`.
fn seeds() -> std::ops::Range<u64> {
    let first = env("SIMULATION_FIRST_SEED", 0);
    first..first + env("SIMULATION_SEEDS", 2_000)
}

/// Runs `seeds` as `setup` says, one thread a core (a run is one current-thread runtime),
/// and fails with the lowest seed that found something.
fn sweep(seeds: std::ops::Range<u64>, setup: Setup) {
    let started = std::time::Instant::now();
    let count = seeds.end - seeds.start;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let first_failed = std::sync::Mutex::new(None::<(u64, String)>);
    std::thread::scope(|scope| {
        for thread in 0..threads {
            let (seeds, first_failed) = (seeds.clone(), &first_failed);
            scope.spawn(move || {
                for seed in seeds.filter(|seed| seed % threads == thread) {
                    let found = first_failed.lock().unwrap().as_ref().map(|(at, _)| *at);
                    if found.is_some_and(|at| at < seed) {
                        return;
                    }
                    let run = run(seed, setup);
                    if !run.violations.is_empty() {
                        let mut first = first_failed.lock().unwrap();
                        if first.as_ref().is_none_or(|(at, _)| seed < *at) {
                            *first = Some((seed, report(seed, setup, &run)));
                        }
                        return;
                    }
                }
            });
        }
    });
    let failed = first_failed.into_inner().unwrap().map(|(_, r)| r);
    let elapsed = started.elapsed().as_secs_f64();
    // Straight to stderr, past the test harness's capture: every run shows its pace.
    let pace = format!(
        "simulation: {count} seeds on {setup} in {elapsed:.1} s ({:.0} seeds a second)\n",
        count as f64 / elapsed
    );
    let _ = std::io::Write::write_all(&mut std::io::stderr(), pace.as_bytes());
    assert!(failed.is_none(), "{}", failed.unwrap_or_default());
}

#[test]
fn every_seed_ends_with_kv_as_the_table_implies() {
    sweep(seeds(), Setup::from_env());
}

/// Three shards race where two rarely do (three of an index's items delivered apart); a
/// sweep of its own: `make simulate SHARDS=3`.
#[test]
fn every_seed_on_three_shards_ends_with_kv_as_the_table_implies() {
    let setup = Setup {
        shards: 3,
        ..Setup::PLAIN
    };
    sweep(0..500, setup);
}

/// The hostile workload, all of what items, operators and the outside can say ([`Variety`]);
/// a sweep of its own: `make simulate VARIETY=4`.
#[test]
fn every_seed_of_the_hostile_workload_ends_with_kv_as_the_table_implies() {
    let setup = Setup {
        variety: Variety::Hostile,
        ..Setup::PLAIN
    };
    sweep(0..500, setup);
}

/// The seeds that found a bug, each fixed, or a window the checker now names (the closing
/// notes of issues 63 and 64 say what each left in KV), and 6098, the first seed that finds the
/// lost intent of issue 62 when its fix is taken out (a re-export's counted intents). Issue 64
/// added 4628 (a backfill's write of a recorded shop that a stream's shrink read before took
/// out: each backfill page counts its references as intents now) and 28675 (a shop key an index
/// gave up landing after its claimer's write while the index's record turned rejected: its
/// check gives the shop up all the same now) and 1407 (a reconcile's repair of a recorded shop
/// that a stream's shrink read before took out: its repair counts its intents now) and 29616 (a
/// re-export's override key from an older read, its check unconfirmed, left by its run again:
/// the run again deletes the index's orphaned query configs now) and 15882 (a removal of a
/// dropped alias target shrank that index's shops while its own shard's write of one landed
/// after: a derived record takes nothing out of the ledger now) and 145927 (a shop handed to a
/// claimer whose write landed after the claimer's own shard shrank it, the batch's check unable
/// to take it back, its replay no longer handing it over: a failed stream batch records the
/// shops it handed over again now) and 6590 (a verify repair's shop put landing after the
/// index's removal shrank it, the check leaving it for the alias that now keeps the index: a
/// shop key a check leaves for a kept index stays recorded for it now). Kept as they are,
/// whatever range `make test` runs.
const FOUND: [u64; 23] = [
    302, 523, 677, 1261, 1407, 1714, 1842, 2719, 2965, 4026, 4628, 4786, 5643, 6098, 6590, 7650,
    9337, 15882, 19686, 28675, 29616, 50153, 145927,
];

/// The seeds of the wider workloads that found a bug, with their shards and workload: 2177,
/// varied, on three (a shop handed to a claimer that dropped it before the write landed, the
/// check leaving it as a kept index's own shop: a landed put is checked as the index whose value
/// it is now); 1479, wide, on three (a dropped alias target's delete of an id's own key landing
/// after another index of that id was created: the check reads every index the id can name);
/// 8291, wide, on three (an index kept for a rejected record's alias, read fail closed, that
/// nothing recorded the record reads: the removal records the alias on its holder now); 18413,
/// wide, on two (a window the checker now names: a shop a rejected record's raw item claims,
/// left holding another claimer's older value until the reconcile pass); 16683, eventual, on
/// two (a removal's check that could not read after handing a shop to a claimer that moved
/// away meanwhile, replayed once the index came back with a shop id that is no shop key: the
/// rejected replay gave nothing up; now a rejected index gives up what it no longer claims);
/// 203, hostile, on two (a rejected record's index with an override record in its batch gave
/// nothing up: an override's record no longer counts); 846, hostile, on two (a shop key only an
/// index without an API key claims kept the value of the index that left through every
/// reconcile pass: such a claimer cannot be exported, so the key is orphaned); 804, wide, on
/// two, and 901, hostile, on three (a rejected index an alias reads kept the shops it no longer
/// claims, its give-up kept for the alias: an alias keeps a removed index's keys only; the
/// settled check that found them had never run until this issue's model exemption was fixed);
/// 579, eventual, on three (a backfill's check could not plan the give-up of an index rejected
/// since, and the rejected record's outcome hid the failure: the shop stayed, the run reported
/// nothing; a failure now decides over a rejected record of the same index); 1436, plain, on
/// three (a rejected record's raw item could not be read and its give-up was dropped silently,
/// the batch done: the record is now reported for retry); 100857, hostile, on three (a verify
/// repair run again on an index rejected since failed before giving up the shop its earlier
/// run wrote: it now gives it up first, as a re-export does); 100774, contended, on two (the
/// desired state's first version: a dropped alias target already in the batch's scope for
/// its override records lost them, its query configs and filter never written: it now joins
/// the scope as removed with its overrides kept); 1248, contended, on three (the same: a check
/// whose read of an index could not look its API key up deleted the filter it had written, as
/// if the index had no overrides: an index not decided now implies nothing gone).
const FOUND_WIDER: [(u64, usize, Variety); 16] = [
    (2177, 3, Variety::Varied),
    (1479, 3, Variety::Wide),
    (8291, 3, Variety::Wide),
    (18413, 2, Variety::Wide),
    (16683, 2, Variety::Eventual),
    (203, 2, Variety::Hostile),
    (846, 2, Variety::Hostile),
    (804, 2, Variety::Wide),
    (901, 3, Variety::Hostile),
    (579, 3, Variety::Eventual),
    (1436, 3, Variety::Plain),
    (143, 2, Variety::Hostile),
    (616, 3, Variety::Hostile),
    (100857, 3, Variety::Hostile),
    (100774, 2, Variety::Contended),
    (1248, 3, Variety::Contended),
];

#[test]
fn the_seeds_that_found_a_bug_stay_green() {
    let plain = FOUND.map(|seed| (seed, Setup::PLAIN));
    let wider = FOUND_WIDER.map(|(seed, shards, variety)| {
        let off = None;
        (
            seed,
            Setup {
                shards,
                variety,
                off,
            },
        )
    });
    for (seed, setup) in plain.into_iter().chain(wider) {
        let run = run(seed, setup);
        assert!(run.violations.is_empty(), "{}", report(seed, setup, &run));
    }
}

#[test]
fn every_seed_runs_the_same_twice() {
    // Fifty seeds: a nondeterminism (a hash map's order, an unbiased select) shows in some.
    for seed in 0..50 {
        let setup = Setup {
            shards: 2 + seed as usize % 2,
            variety: VARIETIES[seed as usize % VARIETIES.len()],
            off: None,
        };
        let (first, again) = (run(seed, setup), run(seed, setup));
        let differs = (first.trace.iter().zip(&again.trace)).position(|(a, b)| a != b);
        assert!(
            first.trace.len() == again.trace.len() && differs.is_none(),
            "seed {seed} is not deterministic: from step {differs:?}: {:?}",
            differs.map(|at| (&first.trace[at], &again.trace[at]))
        );
        assert!(
            first.trace.len() > 50,
            "a run does something: {:?}",
            first.trace
        );
    }
}

/// The net (issue 84, "the net first"): for each protection of "Concurrent writers" a seed,
/// with its shards and workload, that ends green with every protection and finds something
/// wrong with that one taken out alone ([`Protection`]; a sweep without one: `make simulate
/// NET_OFF=<name> ...`). A change that drops one of these fails `make test` here. The sweep's
/// wait and counted intents on a marked record have no seed: each needs a write in flight
/// across two reconcile passes, which the workloads seldom make; a test in
/// `pipeline/exporter/windows.rs` forces each.
const NET: [(Protection, u64, usize, Variety); 6] = [
    (Protection::CheckRounds, 334, 2, Variety::Plain),
    (Protection::ShrinkCondition, 15, 2, Variety::Contended),
    (Protection::Lease, 2, 2, Variety::Plain),
    (Protection::RecordAgain, 199, 2, Variety::Contended),
    (Protection::AliasSafety, 74, 2, Variety::Plain),
    (Protection::BackfillIntents, 5302, 2, Variety::Contended),
];

#[test]
fn each_protection_taken_out_alone_is_found_by_its_seed() {
    for (protection, seed, shards, variety) in NET {
        let setup = Setup {
            shards,
            variety,
            off: None,
        };
        let green = run(seed, setup);
        assert!(
            green.violations.is_empty(),
            "{}",
            report(seed, setup, &green)
        );
        let without = Setup {
            off: Some(protection),
            ..setup
        };
        let found = run(seed, without).violations;
        assert!(
            !found.is_empty(),
            "seed {seed} on {without} finds nothing wrong"
        );
    }
}

/// `SIMULATION_SEED=N`: that seed alone, its trace printed.
#[test]
#[ignore = "one seed, named by SIMULATION_SEED, with its trace"]
fn one_seed() {
    let seed = std::env::var("SIMULATION_SEED")
        .ok()
        .and_then(|v| v.parse().ok());
    let seed = seed.expect("SIMULATION_SEED=N");
    // The function's own log lines, between the trace's steps.
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let run = run(seed, Setup::from_env());
    eprintln!("{}", run.trace.join("\n"));
    assert!(
        run.violations.is_empty(),
        "{}",
        report(seed, Setup::from_env(), &run)
    );
}
