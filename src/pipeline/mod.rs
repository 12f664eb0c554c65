//! The one routine every writer hands records to: records become changes, then the exporter
//! takes them through its stages (snapshot, plan, intents, write, check, shrink).

pub mod api_key_cache;
pub mod exporter;
pub mod plan;
pub mod records;
