//! How the table names an index, and the id aliases point at.

use std::fmt;

use serde::{Deserialize, Serialize};

/// An index as the table names it: the system account it belongs to and its name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IndexRef {
    pub account: String,
    pub name: String,
}

impl IndexRef {
    pub fn new(account: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            account: account.into(),
            name: name.into(),
        }
    }

    /// `{system_account_id}-{index_name}`: the id aliases point at and the index's own KV key.
    pub fn id(&self) -> IndexId {
        IndexId(format!("{}-{}", self.account, self.name))
    }
}

impl fmt::Display for IndexRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.account, self.name)
    }
}

/// `{system_account_id}-{index_name}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct IndexId(pub String);

impl IndexId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IndexId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
