//! The one routine every writer hands records to: records become changes, then the exporter
//! takes them through its stages (the reader, the desired keys, intents, write, check, shrink).

pub mod api_key_cache;
pub mod desired;
pub mod exporter;
pub mod records;
pub mod scope;
