//! Micro-benchmarks of the pure core on 1,000 realistic stream records (the `make bench`
//! event): decoding, planning and bulk encoding. `cargo bench --bench pipeline`.

use ecom_settings_exporter::adapters::cloudflare::encode::requests;
use ecom_settings_exporter::domain::ApiKey;
use ecom_settings_exporter::domain::{KvAction, KvKey};
use ecom_settings_exporter::entry::Payload;
use ecom_settings_exporter::pipeline::plan::{needs, plan, Lookups};
use ecom_settings_exporter::pipeline::records::{
    decode_as_written, decode_record, ChangeRecord, Changed,
};

// Counts allocations and bytes per step next to the times.
#[global_allocator]
static ALLOC: divan::AllocProfiler = divan::AllocProfiler::system();

fn main() {
    divan::main();
}

const RECORDS: usize = 1_000;

fn raw_records() -> Vec<String> {
    let event = ecom_emulators::bench::event("acct", RECORDS, ecom_emulators::bench::Kind::Insert);
    event["Records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.to_string())
        .collect()
}

fn decoded(raw: &[String]) -> Vec<ChangeRecord<Changed>> {
    raw.iter()
        .map(|r| decode_record(r, "DEFAULT_CONFIGS"))
        .collect()
}

/// The records as their images say, as if the table held them (the function reads the table).
fn as_written(raw: &[String]) -> Vec<ChangeRecord> {
    raw.iter()
        .map(|r| decode_as_written(r, "DEFAULT_CONFIGS"))
        .collect()
}

fn lookups(records: &[ChangeRecord]) -> Lookups {
    let needs = needs(records, "default");
    Lookups {
        api_keys: needs
            .api_keys
            .into_iter()
            .map(|a| {
                let key = ApiKey::new(format!("key-{}", a.account));
                (a, Ok(key))
            })
            .collect(),
        ..Lookups::default()
    }
}

/// The whole batch read in one pass, as the handler reads it.
#[divan::bench]
fn decode(bencher: divan::Bencher) {
    let event = ecom_emulators::bench::event("acct", RECORDS, ecom_emulators::bench::Kind::Insert)
        .to_string();
    bencher.bench(|| Payload::parse(divan::black_box(event.as_bytes()), "DEFAULT_CONFIGS"));
}

/// Record by record, as a batch with a malformed record is read.
#[divan::bench]
fn decode_each(bencher: divan::Bencher) {
    let raw = raw_records();
    bencher.bench(|| decoded(divan::black_box(&raw)));
}

#[divan::bench]
fn plan_batch(bencher: divan::Bencher) {
    let records = as_written(&raw_records());
    let lookups = lookups(&records);
    bencher.bench(|| plan(divan::black_box(&records), &lookups, "default"));
}

#[divan::bench]
fn bulk_encoding(bencher: divan::Bencher) {
    let records = as_written(&raw_records());
    let planned = plan(&records, &lookups(&records), "default");
    let mut ops: Vec<(&KvKey, &_)> = planned.ops.iter().collect();
    ops.sort_by_key(|(_, op)| op.owner);
    let ops: Vec<(KvKey, KvAction)> = (ops.into_iter())
        .map(|(key, op)| (key.clone(), op.action.clone()))
        .collect();
    // The operations in the batch's order, as the exporter hands them to the store.
    bencher
        .with_inputs(|| ops.clone())
        .bench_values(|ops| requests(divan::black_box(ops)));
}
