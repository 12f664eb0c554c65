//! Any batch of records plans without a panic, and the plan keeps its promises: one operation
//! per key, owned by a record that is pending, and bulk requests within Cloudflare's limits.
#![no_main]

use ecom_settings_exporter::adapters::cloudflare::encode::{
    requests, KvRequest, MAX_BULK_BYTES, MAX_BULK_ITEMS,
};
use ecom_settings_exporter::domain::{ApiKey, KvOp};
use ecom_settings_exporter::pipeline::plan::{api_keys_wanted, plan, references_wanted, settle_previous_shops, Referrers, Snapshot};
use ecom_settings_exporter::pipeline::records::decode_as_written;
use ecom_settings_exporter::report::Outcome;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(serde_json::Value::Array(raw)) = serde_json::from_slice(data) else {
        return;
    };
    let mut records: Vec<_> = raw.into_iter().map(|r| decode_as_written(&r.to_string(), "DEFAULT_CONFIGS")).collect();
    // Every index recorded on one shop, as the ledger may have it.
    settle_previous_shops(&mut records, |_| ["fuzz-shop".to_owned()].into());
    let snapshot = Snapshot {
        api_keys: api_keys_wanted(&records, "default").into_iter().map(|a| (a, Ok(ApiKey::new("fuzz-key")))).collect(),
        references: references_wanted(&records).then(|| Ok(Referrers::default())),
        ..Snapshot::default()
    };
    let plan = plan(&mut records, &snapshot, "default");
    for op in plan.ops.values() {
        assert_eq!(records[op.owner].outcome, Outcome::Exported, "owned by a record planned to be exported");
    }
    let ops: Vec<KvOp> = (plan.ops.iter()).map(|(key, op)| (key.clone(), op.action.clone())).collect();
    let requests = requests(ops);
    let sent: usize = requests.iter().map(|r| r.keys().len()).sum();
    assert_eq!(sent, plan.ops.len(), "every operation is sent once");
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
