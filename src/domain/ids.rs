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

    /// The indexes this id can name: `{account}-{name}` split at each hyphen (an id is
    /// ambiguous by contract: docs/contract.md, "Decisions").
    pub fn named(&self) -> Vec<IndexRef> {
        let id = self.as_str();
        (id.match_indices('-'))
            .map(|(at, _)| IndexRef::new(&id[..at], &id[at + 1..]))
            .filter(|index| !index.account.is_empty() && !index.name.is_empty())
            .collect()
    }
}

impl fmt::Display for IndexId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
