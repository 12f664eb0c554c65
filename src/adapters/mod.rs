//! The outside systems, one file each, behind the traits in [`crate::ports`].

pub mod api_keys;
pub mod cloudflare;
pub mod dynamodb;
pub mod ledger;
#[cfg(test)]
pub mod memory;
pub mod pacing;
pub mod secrets_manager;
