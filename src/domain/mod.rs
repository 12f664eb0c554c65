//! The vocabulary every room shares: indexes, their settings and overrides, records and how
//! they end, KV keys and limits, and the secrets. Pure data; depends on nothing else in the crate.

pub(crate) mod change;
pub(crate) mod ids;
pub(crate) mod kv;
pub(crate) mod net;
pub mod qfilter;
pub(crate) mod secrets;
pub(crate) mod settings;
pub(crate) mod table;
pub(crate) mod validate;

pub use change::{Change, ChangeRecord, Outcome};
pub use ids::{IndexId, IndexRef};
pub use kv::{KvAction, KvKey, KvOp, Namespace};
pub use secrets::{AccountCell, ApiKey, ApiToken};
pub use settings::{IndexRefs, IndexSettings, InvalidRecord, QueryConfig, Referred};
pub use settings::{SweepMark, SWEEP_AFTER_SECONDS};
pub use table::{Scope, TableKey, TableSpan};
