//! `ecom-emulators bench` (what `make bench` runs): the release function binary end to end,
//! configured as the template deploys it (the ledger table set, its references complete after
//! the migration's backfill), behind the runtime API, with its DynamoDB calls through a proxy
//! in front of moto that adds a chosen latency and counts them, KV answering after 50 ms. For
//! each batch size it sends an INSERT batch, a MODIFY batch (shop unchanged) and a shop-move
//! batch to one process and measures the process: CPU of all its threads (from /proc
//! schedstat), wall time, peak RSS, DynamoDB requests by operation, their estimated read and
//! write units and the round trips in sequence; then the Python reference
//! (`bench/reference.py`) on the same event. The function refuses to start without its
//! ledger, so there is no other configuration to measure.

mod function;
mod records;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

pub use function::Setup;
use function::{Function, Measured};
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
}

const KINDS: [Kind; 3] = [Kind::Insert, Kind::Modify, Kind::ShopMove];

/// One process's batches, and how many round trips one MODIFY waits for before its KV write.
struct Process {
    batches: Vec<Measured>,
    one_modify_round_trips: usize,
}

async fn measure(options: &BenchOptions, setup: Setup, records: usize) -> Result<Process, String> {
    let function = Function::start(options, setup).await?;
    let mut batches = Vec::new();
    for kind in KINDS {
        let batch = function.batch(records, kind).await?;
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
    // Each index's own key and its shop key; a moved shop's old key is deleted.
    let expected = 2 * (records + records::ACCOUNTS);
    let all_exported = batches.iter().all(|b| b.failed == 0);
    if all_exported && function.settings_keys() != expected {
        let held = function.settings_keys();
        return Err(format!(
            "{held} keys in KV after the batches, expected {expected}"
        ));
    }
    let one_modify_round_trips = function.one_modify_round_trips().await?;
    Ok(Process {
        batches,
        one_modify_round_trips,
    })
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
            for setup in setups(&options) {
                let process = measure(&options, setup, records).await?;
                runs.entry((setup, records)).or_default().push(process);
            }
            for kind in KINDS {
                let cpu = python_cpu_ms(&options, records, kind)?;
                python.entry((records, kind)).or_default().push(cpu);
            }
        }
    }
    let python = python
        .into_iter()
        .map(|(k, mut v)| (k, median(&mut v)))
        .collect();
    for (setup, sizes) in group(runs) {
        print_setup(&options, setup, sizes, &python);
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

fn print_setup(
    options: &BenchOptions,
    setup: Setup,
    sizes: Vec<(usize, Vec<Process>)>,
    python: &BTreeMap<(usize, Kind), f64>,
) {
    println!(
        "\nAs deployed (ledger on, references complete), DynamoDB at +{} ms a request (through the proxy, on moto), KV at {} ms, median of {} runs by CPU:\n",
        setup.dynamo_latency_ms,
        options.kv_latency.as_millis(),
        options.runs.max(1)
    );
    println!("| records | batch | event MB | CPU ms | wall ms | peak RSS MiB | DynamoDB requests | read units | write units | round trips in sequence | busiest ledger partition, writes/s | KV requests | reported for retry | Python CPU ms | Python / Rust CPU |");
    println!("|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (records, processes) in sizes {
        for kind in KINDS {
            let mut batches: Vec<&Measured> = (processes.iter())
                .flat_map(|p| p.batches.iter().filter(|b| b.kind == kind))
                .collect();
            batches.sort_by(|a, b| a.cpu_ms.total_cmp(&b.cpu_ms));
            let m = batches[batches.len() / 2];
            let py = python.get(&(records, kind)).copied().unwrap_or(f64::NAN);
            print_row(m, py);
        }
        let mut one: Vec<usize> = processes.iter().map(|p| p.one_modify_round_trips).collect();
        one.sort();
        println!(
            "| {records} | one MODIFY: {} DynamoDB round trips before its KV write |||||||||||||",
            one[one.len() / 2]
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
        "| {} | {} | {:.2} | {:.1} | {:.0} | {:.1} | {} | {:.0} | {:.0} | {} | {:.0} | {} | {} | {:.1} | {:.1}x |",
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
        m.kv_requests,
        m.failed,
        python_cpu_ms,
        python_cpu_ms / m.cpu_ms,
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
