//! Any batch of records decides its keys without a panic, and the decision keeps its promises:
//! one operation per key, decided for an index whose change did not fail, and bulk requests
//! within Cloudflare's limits.
#![no_main]

use ecom_settings_exporter::adapters::cloudflare::encode::{
    requests, KvRequest, MAX_BULK_BYTES, MAX_BULK_ITEMS,
};
use ecom_settings_exporter::domain::{ApiKey, KvOp};
use ecom_settings_exporter::pipeline::desired::desired;
use ecom_settings_exporter::pipeline::scope::{states_of, Settings, World};
use ecom_settings_exporter::pipeline::records::decode_as_written;
use ecom_settings_exporter::report::Outcome;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(serde_json::Value::Array(raw)) = serde_json::from_slice(data) else {
        return;
    };
    let records: Vec<_> = raw.into_iter().map(|r| decode_as_written(&r.to_string(), "DEFAULT_CONFIGS")).collect();
    let mut indexes = states_of(&records);
    // Every index recorded on one shop, as the ledger may have it.
    for state in indexes.values_mut() {
        state.recorded.shops.insert("fuzz-shop".to_owned());
    }
    let api_keys = (indexes.values())
        .filter_map(|state| match &state.settings {
            Some(Settings::Valid(settings)) => Some(settings.account_cell("default")),
            _ => None,
        })
        .map(|cell| (cell, Ok(ApiKey::new("fuzz-key"))))
        .collect();
    let world = World { indexes, api_keys, default_cell: "default".into(), ..World::default() };
    let desired = desired(&world);
    for wanted in desired.keys.values() {
        let outcome = &desired.outcomes[&wanted.by];
        assert!(!matches!(outcome, Outcome::Failed(_)), "decided for an index that did not fail");
    }
    let ops: Vec<KvOp> = (desired.keys.iter()).filter_map(|(key, w)| Some((key.clone(), w.action()?))).collect();
    let count = ops.len();
    let requests = requests(ops);
    let sent: usize = requests.iter().map(|r| r.keys().len()).sum();
    assert_eq!(sent, count, "every operation is sent once");
    for request in &requests {
        assert!(request.keys().len() <= MAX_BULK_ITEMS);
        if let KvRequest::Put { .. } = request {
            assert!(request.body().len() < MAX_BULK_BYTES);
            let pairs: Vec<serde_json::Value> =
                serde_json::from_slice(&request.body()).expect("a bulk body is a JSON array");
            assert_eq!(pairs.len(), request.keys().len(), "the body holds every key");
        }
    }
});
