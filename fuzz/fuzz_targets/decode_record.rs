//! Any JSON (as a stream record or as a whole payload) decodes or is rejected: never a panic.
#![no_main]

use ecom_settings_exporter::entry::Payload;
use ecom_settings_exporter::pipeline::records::decode_record;
use ecom_settings_exporter::report::Outcome;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let record = decode_record(text, "DEFAULT_CONFIGS");
    if let Err(Outcome::Rejected(reason)) = &record.decoded {
        assert!(!reason.is_empty(), "a rejection says why");
    }
    if let Ok(raw) = serde_json::from_str::<Box<serde_json::value::RawValue>>(text) {
        let _ = Payload::parse(&raw, "DEFAULT_CONFIGS");
    }
});
