//! Any JSON (as a stream record or as a whole payload) decodes or is rejected: never a panic.
#![no_main]

use ecom_settings_exporter::entry::Payload;
use ecom_settings_exporter::pipeline::records::decode_record;
use ecom_settings_exporter::report::Outcome;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let record = decode_record(value.clone(), "DEFAULT_CONFIGS");
    if let Err(Outcome::Rejected(reason)) = &record.decoded {
        assert!(!reason.is_empty(), "a rejection says why");
    }
    let _ = Payload::try_from(value);
});
