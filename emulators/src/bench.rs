//! `ecom-emulators bench` (what `make bench` runs): the release function binary end to end,
//! configured as the template deploys it (the ledger table set, its references complete after
//! the migration's backfill), behind the runtime API, KV answering after 50 ms. For each batch
//! size one process runs an INSERT, a MODIFY (shop unchanged), a shop-move, an override and a
//! REMOVE batch against moto through a proxy that records moto's answers; then, for each
//! DynamoDB latency, a twin process runs the same batches with DynamoDB answered from that
//! recording after the latency, its CPU held to the template's share where the machine allows,
//! and is measured: CPU of all its threads (from /proc schedstat), wall time, peak RSS,
//! DynamoDB requests by operation, their estimated read and write units, the round trips in
//! sequence, KV operations, and what a million such changes cost (`cost.rs`) beside the seed's
//! design; then the Python reference (`bench/reference.py`) on the same event. The twin must
//! meet no request the recording lacks and leave KV as the recorded run did. Without its
//! ledger every invocation fails (`ConfigError`), so there is no other configuration to measure.

mod cost;
mod cpu_share;
mod function;
mod records;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use function::Function;
pub use function::{Measured, OneModify, Setup};
pub use records::{event, Kind};

pub struct BenchOptions {
    pub function_binary: PathBuf,
    pub python: PathBuf,
    pub reference: PathBuf,
    pub sizes: Vec<usize>,
    pub kv_latency: Duration,
    /// Latencies DynamoDB is measured at.
    pub dynamo_latencies_ms: Vec<u64>,
    /// Runs of each setup and size (a fresh function process each), alternated: the table
    /// shows the run with the median CPU.
    pub runs: usize,
    /// The share of a core the measured process runs with (`None`: unheld).
    pub cpu_share: Option<f64>,
}

pub use cpu_share::SHARE_512_MB;

const KINDS: [Kind; 5] = [
    Kind::Insert,
    Kind::Modify,
    Kind::ShopMove,
    Kind::Override,
    Kind::Remove,
];
/// The kinds the Python reference does (it decodes a `NewImage` into a settings value).
const REFERENCE_KINDS: [Kind; 3] = [Kind::Insert, Kind::Modify, Kind::ShopMove];

/// One process's batches, and how many round trips one MODIFY waits for before its KV write.
pub struct Process {
    pub batches: Vec<Measured>,
    pub one_modify: OneModify,
    /// The custom metrics its batches published (`name by [dimensions]`).
    pub metrics: std::collections::BTreeSet<String>,
}

/// A batch's DynamoDB requests, by operation and tables, in no particular order.
fn operations(batch: &Measured) -> Vec<(String, Vec<String>)> {
    let mut each: Vec<(String, Vec<String>)> = (batch.calls.iter())
        .map(|c| (c.operation.clone(), c.tables.clone()))
        .collect();
    each.sort();
    each
}

/// How many requests of each operation (an error quotes these, not every request).
fn by_operation(requests: &[(String, Vec<String>)]) -> std::collections::BTreeMap<&str, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for (operation, _) in requests {
        *counts.entry(operation.as_str()).or_default() += 1;
    }
    counts
}

/// The recorded run of `records` records, then a measured twin for each setup; `Err` where a
/// twin met a request the recording lacks, made other requests than the recorded run, or left
/// KV unlike it.
pub async fn measure(
    options: &BenchOptions,
    records: usize,
) -> Result<Vec<(Setup, Process)>, String> {
    let recorded = Function::start(options).await?;
    let mut requests = Vec::new();
    for kind in KINDS {
        let batch = recorded.batch(records, kind).await?;
        eprintln!(
            "  recorded against moto, {records} records, {}: {:.0} ms wall, {} DynamoDB requests, {} reported for retry",
            kind.name(),
            batch.wall_ms,
            batch.calls.len(),
            batch.failed
        );
        requests.push(operations(&batch));
        if kind == Kind::ShopMove {
            // Each index's own key and its shop key; a moved shop's old key is deleted.
            let expected = 2 * (records + records::ACCOUNTS);
            if recorded.settings_keys() != expected {
                let held = recorded.settings_keys();
                return Err(format!(
                    "{held} keys in KV after the shop moves, expected {expected}"
                ));
            }
        }
    }
    recorded.one_modify(options.kv_latency).await?;
    let mut measured = Vec::new();
    for setup in setups(options) {
        let twin = recorded.twin(options, setup).await?;
        let mut batches = Vec::new();
        for (kind, recorded_requests) in KINDS.into_iter().zip(&requests) {
            let batch = twin.batch(records, kind).await?;
            if operations(&batch) != *recorded_requests {
                return Err(format!(
                    "the twin's {} requests differ from the recorded run's ({} misses): {:?} against {:?}",
                    kind.name(),
                    twin.misses(),
                    by_operation(&operations(&batch)),
                    by_operation(recorded_requests)
                ));
            }
            eprintln!(
                "  {setup:?}, {records} records, {}: {:.1} ms CPU, {:.0} ms wall, {} DynamoDB requests, {} reported for retry",
                kind.name(),
                batch.cpu_ms,
                batch.wall_ms,
                batch.calls.len(),
                batch.failed
            );
            batches.push(batch);
        }
        let one_modify = twin.one_modify(options.kv_latency).await?;
        if twin.misses() > 0 {
            return Err(format!(
                "the twin met {} requests the recording lacks",
                twin.misses()
            ));
        }
        if twin.kv_held() != recorded.kv_held() {
            return Err("the twin left KV unlike the recorded run".into());
        }
        let process = Process {
            batches,
            one_modify,
            metrics: twin.printed.metrics(),
        };
        measured.push((setup, process));
    }
    Ok(measured)
}

fn python_cpu_ms(options: &BenchOptions, records: usize, kind: Kind) -> Result<f64, String> {
    let path =
        std::env::temp_dir().join(format!("bench-event-{}-{records}.json", std::process::id()));
    let payload = event("acct-python", records, kind).to_string();
    std::fs::write(&path, payload).map_err(|e| e.to_string())?;
    let output = Command::new(&options.python)
        .arg(&options.reference)
        .arg(&path)
        .output()
        .map_err(|e| format!("{}: {e}", options.python.display()));
    let _ = std::fs::remove_file(&path);
    let output = output?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    let figures: Value = serde_json::from_slice(&output.stdout).map_err(|e| e.to_string())?;
    figures["cpu_ms"]
        .as_f64()
        .ok_or_else(|| format!("the reference said {figures}"))
}

fn setups(options: &BenchOptions) -> Vec<Setup> {
    (options.dynamo_latencies_ms.iter())
        .map(|&ms| Setup {
            dynamo_latency_ms: ms,
        })
        .collect()
}

/// The measured processes of every setup and size, runs alternated between setups.
type Runs = BTreeMap<(Setup, usize), Vec<Process>>;

/// Runs every setup and size and prints the tables; `Err` names what went wrong.
pub async fn run(options: BenchOptions) -> Result<(), String> {
    let mut runs = Runs::new();
    let mut python: BTreeMap<(usize, Kind), Vec<f64>> = BTreeMap::new();
    for _ in 0..options.runs.max(1) {
        for &records in &options.sizes {
            for (setup, process) in measure(&options, records).await? {
                runs.entry((setup, records)).or_default().push(process);
            }
            for kind in REFERENCE_KINDS {
                let cpu = python_cpu_ms(&options, records, kind)?;
                python.entry((records, kind)).or_default().push(cpu);
            }
        }
    }
    let python = python
        .into_iter()
        .map(|(k, mut v)| (k, median(&mut v)))
        .collect();
    println!("\n{}.", cpu_share::describe(options.cpu_share));
    for (setup, sizes) in group(runs) {
        print_setup(&options, setup, &sizes, &python);
        print_costs(&options, setup, &sizes, &python);
    }
    Ok(())
}

fn group(runs: Runs) -> BTreeMap<Setup, Vec<(usize, Vec<Process>)>> {
    let mut grouped: BTreeMap<Setup, Vec<(usize, Vec<Process>)>> = BTreeMap::new();
    for ((setup, records), processes) in runs {
        grouped.entry(setup).or_default().push((records, processes));
    }
    grouped
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The run of each kind with the median CPU.
fn median_batch(processes: &[Process], kind: Kind) -> &Measured {
    let mut batches: Vec<&Measured> = (processes.iter())
        .flat_map(|p| p.batches.iter().filter(|b| b.kind == kind))
        .collect();
    batches.sort_by(|a, b| a.cpu_ms.total_cmp(&b.cpu_ms));
    batches[batches.len() / 2]
}

fn print_setup(
    options: &BenchOptions,
    setup: Setup,
    sizes: &[(usize, Vec<Process>)],
    python: &BTreeMap<(usize, Kind), f64>,
) {
    println!(
        "\nAs deployed (ledger on, references complete), DynamoDB answering after {} ms (moto's answers, recorded), KV at {} ms, median of {} runs by CPU:\n",
        setup.dynamo_latency_ms,
        options.kv_latency.as_millis(),
        options.runs.max(1)
    );
    println!("| records | batch | event MB | CPU ms | wall ms | peak RSS MiB | DynamoDB requests | read units | write units | round trips in sequence | busiest ledger partition, writes/s | KV requests | reported for retry | Python CPU ms | Python / Rust CPU |");
    println!("|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (records, processes) in sizes {
        let records = *records;
        for kind in KINDS {
            let py = python.get(&(records, kind)).copied().unwrap_or(f64::NAN);
            print_row(median_batch(processes, kind), py);
        }
        let mut one: Vec<OneModify> = processes.iter().map(|p| p.one_modify).collect();
        one.sort_by(|a, b| a.landed_ms.total_cmp(&b.landed_ms));
        let median = one[one.len() / 2];
        println!(
            "| {records} | one MODIFY: {} DynamoDB round trips before its KV write, which landed {:.0} ms after the invocation began |||||||||||||",
            median.round_trips, median.landed_ms
        );
    }
}

fn print_row(m: &Measured, python_cpu_ms: f64) {
    let mut by_operation: BTreeMap<&str, usize> = BTreeMap::new();
    for call in &m.calls {
        *by_operation.entry(call.operation.as_str()).or_default() += 1;
    }
    let requests = if m.calls.is_empty() {
        "0".to_string()
    } else {
        let each: Vec<String> = by_operation
            .iter()
            .map(|(op, n)| format!("{n} {op}"))
            .collect();
        format!("{} ({})", m.calls.len(), each.join(", "))
    };
    // Plus 0.0: an empty sum of floats is -0.0.
    let read_units = m.calls.iter().map(|c| c.read_units).sum::<f64>() + 0.0;
    let write_units = m.calls.iter().map(|c| c.write_units).sum::<f64>() + 0.0;
    println!(
        "| {} | {} | {:.2} | {:.1} | {:.0} | {:.1} | {} | {:.0} | {:.0} | {} | {:.0} | {} | {} | {} |",
        m.records,
        m.kind.name(),
        m.event_bytes as f64 / 1e6,
        m.cpu_ms,
        m.wall_ms,
        m.peak_rss_mib,
        requests,
        read_units,
        write_units,
        m.round_trips,
        busiest_partition_rate(m),
        m.kv.len(),
        m.failed,
        if python_cpu_ms.is_nan() {
            "- | -".to_string()
        } else {
            format!("{python_cpu_ms:.1} | {:.1}x", python_cpu_ms / m.cpu_ms)
        },
    );
}

/// The most writes any one partition key took, per second of the batch's wall time.
fn busiest_partition_rate(m: &Measured) -> f64 {
    let mut writes: BTreeMap<&str, usize> = BTreeMap::new();
    for pk in m.calls.iter().flat_map(|c| &c.partitions_written) {
        *writes.entry(pk.as_str()).or_default() += 1;
    }
    let most = writes.values().copied().max().unwrap_or(0);
    most as f64 / (m.wall_ms / 1000.0).max(1e-3)
}

/// What a million changes of each kind cost, as measured, beside the seed's design.
fn print_costs(
    options: &BenchOptions,
    setup: Setup,
    sizes: &[(usize, Vec<Process>)],
    python: &BTreeMap<(usize, Kind), f64>,
) {
    println!(
        "\nCost of a million changes, DynamoDB at +{} ms ({}):\n",
        setup.dynamo_latency_ms,
        cost::PRICES_DATED
    );
    println!("| records a batch | change | KV writes / deletes / reads / lists a change | KV $ | settings table $ | ledger $ | Lambda $ (wall ms a batch) | CloudWatch $ (log bytes a batch) | total $ | ledger's share | seed's design $ (KV + Lambda) | more than the seed |");
    println!("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let share = options.cpu_share.unwrap_or(1.0);
    let kv_ms = options.kv_latency.as_secs_f64() * 1000.0;
    for (records, processes) in sizes {
        for kind in KINDS {
            let m = median_batch(processes, kind);
            let bill = cost::bill(m).per_million(*records);
            let py = python.get(&(*records, kind)).copied();
            let seed = cost::seed_bill(kind, *records, py, share, kv_ms).per_million(*records);
            let (w, d, r, l) = cost::kv_operations(m);
            let per = |n: usize| n as f64 / *records as f64;
            println!(
                "| {records} | {} | {:.2} / {:.2} / {:.2} / {:.3} | {:.2} | {:.3} | {:.3} | {:.3} ({:.0}) | {:.4} ({}) | {:.2} | {:.1}% | {:.2}{} | {:+.1}% |",
                kind.name(),
                per(w),
                per(d),
                per(r),
                per(l),
                bill.kv,
                bill.settings_table,
                bill.ledger,
                bill.lambda,
                m.wall_ms,
                bill.cloudwatch,
                m.log_bytes,
                bill.total(),
                100.0 * bill.ledger / bill.total(),
                seed.total(),
                if py.is_none() { " (Lambda CPU not counted)" } else { "" },
                100.0 * (bill.total() - seed.total()) / seed.total(),
            );
        }
    }
    let metrics: std::collections::BTreeSet<&String> = (sizes.iter())
        .flat_map(|(_, processes)| processes.iter().flat_map(|p| &p.metrics))
        .collect();
    println!(
        "\nCustom metrics the stream published: {} (${:.2} a month, whatever the traffic; each version `live` ran adds one, RecordsFailed by ExecutedVersion, billed while it reports): {}",
        metrics.len(),
        cost::metrics_month(metrics.len()),
        metrics.into_iter().cloned().collect::<Vec<_>>().join(", ")
    );
}
