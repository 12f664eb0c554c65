//! The stream path, one file per step: records -> plan -> the KV store, run by the exporter.

pub mod api_key_cache;
pub mod exporter;
pub mod plan;
pub mod records;
