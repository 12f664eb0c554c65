//! The outside systems, one file each, behind the traits in [`crate::ports`].

pub(crate) mod api_keys;
pub mod cloudflare;
pub(crate) mod dynamodb;
pub mod ledger;
#[cfg(test)]
pub(crate) mod memory;
pub(crate) mod pacing;
pub(crate) mod secrets_manager;
