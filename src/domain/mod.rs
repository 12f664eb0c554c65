//! The vocabulary every room shares: indexes, their settings and overrides, KV keys and
//! limits, and the secrets. Pure data; depends on nothing else in the crate.

pub mod ids;
pub mod json_text;
pub mod kv;
pub mod qfilter;
pub mod secrets;
pub mod settings;
pub mod validate;

pub use ids::{IndexId, IndexRef};
pub use kv::{KvAction, KvKey, KvOp, Namespace};
pub use secrets::{ApiKey, ApiToken};
pub use settings::{IndexSettings, InvalidRecord, QueryConfig, SettingsReference};
