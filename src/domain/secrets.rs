//! The two secrets the function handles. Only `expose` gives them out: never `Debug` or
//! `Display`, so no log line, error or answer can carry one by accident.

use std::fmt;
use std::sync::Arc;

use serde::Serialize;

/// Whose API key: the API keys service is asked once per (cell, account).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountCell {
    pub cell: String,
    pub account: String,
}

/// A Marqo API key. Serializes as itself (it goes into KV) but never shows in `Debug`. Shared,
/// not copied, by every value of its account in a batch.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(Arc<str>);

impl ApiKey {
    pub fn new(key: impl Into<String>) -> Self {
        Self(Arc::from(key.into()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl Serialize for ApiKey {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// The Cloudflare API token, kept in Secrets Manager as a bare string.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken(String);

impl ApiToken {
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiToken(<redacted>)")
    }
}
