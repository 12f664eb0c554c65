//! Micro-benchmarks of the pure core on 1,000 realistic stream records (the `make bench`
//! event): decoding, planning and bulk encoding. `cargo bench --bench pipeline`.

use ecom_settings_exporter::adapters::cloudflare::encode::requests;
use ecom_settings_exporter::domain::ApiKey;
use ecom_settings_exporter::domain::{KvAction, KvKey};
use ecom_settings_exporter::dynamo::table_record;
use ecom_settings_exporter::entry::Payload;
use ecom_settings_exporter::pipeline::desired::desired;
use ecom_settings_exporter::pipeline::records::{decode_as_written, decode_record, ChangeRecord};
use ecom_settings_exporter::pipeline::scope::{states_of, Settings, World};

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

fn decoded(raw: &[String]) -> Vec<ChangeRecord> {
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

/// The records' indexes as the reader would find them, each account's API key looked up.
fn world(records: &[ChangeRecord]) -> World {
    let indexes = states_of(records);
    let api_keys = (indexes.values())
        .filter_map(|state| match &state.settings {
            Some(Settings::Valid(settings)) => Some(settings.account_cell("default")),
            _ => None,
        })
        .map(|a| {
            let key = ApiKey::new(format!("key-{}", a.account));
            (a, Ok(key))
        })
        .collect();
    World {
        indexes,
        api_keys,
        default_cell: "default".into(),
        ..World::default()
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
    bencher
        .with_inputs(|| records.clone())
        .bench_refs(|records| desired(&world(divan::black_box(records))));
}

/// The operations in the batch's order, as the exporter hands them to the store.
fn in_order(records: Vec<ChangeRecord>) -> Vec<(KvKey, KvAction)> {
    let desired = desired(&world(&records));
    let mut ops: Vec<(&KvKey, &_)> = desired.keys.iter().collect();
    ops.sort_by_key(|(key, wanted)| (&wanted.by, *key));
    (ops.into_iter())
        .filter_map(|(key, wanted)| Some((key.clone(), wanted.action()?)))
        .collect()
}

#[divan::bench]
fn bulk_encoding(bencher: divan::Bencher) {
    let ops = in_order(as_written(&raw_records()));
    bencher
        .with_inputs(|| ops.clone())
        .bench_values(|ops| requests(divan::black_box(ops)));
}

/// What `bench/reference.py` does, the function's way and no I/O: the event read, each item
/// decoded (here from a BatchGetItem's items, as the function reads them from the table),
/// planned and written into the bulk body. Beside the reference's CPU on the same event it is
/// the language's share of the gap; the rest of `make bench`'s figure is the work the
/// reference does not do (the table read's answers, the ledger, HTTP).
#[divan::bench]
fn reference_work(bencher: divan::Bencher) {
    let event = ecom_emulators::bench::event("acct", RECORDS, ecom_emulators::bench::Kind::Insert);
    let items: Vec<serde_json::Value> = (event["Records"].as_array().unwrap().iter())
        .map(|record| {
            let mut item = record["dynamodb"]["NewImage"].as_object().unwrap().clone();
            item.extend(record["dynamodb"]["Keys"].as_object().unwrap().clone());
            item.into()
        })
        .collect();
    let items = serde_json::Value::from(items).to_string();
    let event = event.to_string();
    bencher.bench(|| {
        let Ok(Payload::StreamBatch(batch)) = Payload::parse(event.as_bytes(), "DEFAULT_CONFIGS")
        else {
            panic!("the bench's event is a stream batch");
        };
        let images: Vec<serde_dynamo::Item> =
            serde_json::from_str(divan::black_box(&items)).unwrap();
        let records: Vec<ChangeRecord> = (batch.into_iter().zip(&images))
            .map(|(record, image)| {
                let now = table_record(image, "DEFAULT_CONFIGS").0;
                record.as_now(Some(&now))
            })
            .collect();
        requests(in_order(records))
    });
}
