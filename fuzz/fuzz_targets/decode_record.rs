//! Any JSON (as a stream record or as a whole payload) decodes or is rejected: never a panic.
//! A one-record batch decodes its record as the record read alone does.
#![no_main]

use ecom_settings_exporter::entry::Payload;
use ecom_settings_exporter::pipeline::records::{decode_as_written, decode_record, Change};
use ecom_settings_exporter::report::Outcome;
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The record's image read as the table's item would be.
    let record = decode_as_written(text, "DEFAULT_CONFIGS");
    match (&record.change, &record.outcome) {
        (None, Outcome::Rejected(reason)) => assert!(!reason.is_empty(), "a rejection says why"),
        // Documents are kept as the decoder wrote them, unparsed: it must write valid JSON.
        (Some(Change::UpsertIndex { settings, .. }), _) => {
            let documents = [
                &settings.search_config,
                &settings.collections_config,
                &settings.feature_flags,
                &settings.agentic_config,
                &settings.query_override_sharding,
            ];
            for document in documents.into_iter().flatten() {
                let text = document.json_text();
                assert!(serde_json::from_str::<&RawValue>(text).is_ok(), "{text}");
            }
        }
        (Some(Change::UpsertQuery(config)), _) => {
            let text = config.config.json_text();
            assert!(serde_json::from_str::<&RawValue>(text).is_ok(), "{text}");
        }
        _ => {}
    }
    let _ = Payload::parse(data, "DEFAULT_CONFIGS");
    if let Ok(raw) = serde_json::from_str::<Box<RawValue>>(text) {
        // A batch decodes a record exactly as the record read alone does.
        let batch = format!("{{\"Records\":[{}]}}", raw.get());
        let alone = decode_record(raw.get(), "DEFAULT_CONFIGS");
        match Payload::parse(batch.as_bytes(), "DEFAULT_CONFIGS") {
            Ok(Payload::StreamBatch(records)) => assert_eq!(records, [alone]),
            other => panic!("a one-record batch is a stream batch: {other:?}"),
        }
    }
});
