//! Where the settings table's items are (docs/contract.md, "The settings table"): an item's
//! key, where a read goes on, and which items a read covers.

use serde::{Deserialize, Serialize};

use super::IndexRef;

/// An item's key: where a read of the table goes on after it. Opaque outside the adapters;
/// operators hand it out inside continuation tokens and the scheduled reconcile keeps it in
/// the ledger, in DynamoDB's key format (`{"pk": {"S": ...}, "sk": {"S": ...}}`) as before.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TableKey {
    pk: KeyString,
    sk: KeyString,
}

/// Which records a read of the table covers, in the order a scan reads them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scope<'a> {
    /// Every record (a Scan).
    Table,
    /// One account's records (a Query of its partition).
    Account(&'a str),
    /// One index's settings record and its overrides (`INDEX#{name}`, then
    /// `INDEX#{name}#QUERY#...`), none of another index whose name sorts between them.
    Index(&'a IndexRef),
}

impl<'a> Scope<'a> {
    /// The table, or one account's records.
    pub fn of(account: Option<&'a str>) -> Self {
        account.map_or(Scope::Table, Scope::Account)
    }

    /// Whether the item with this key is in scope.
    pub fn holds(&self, pk: &str, sk: &str) -> bool {
        match self {
            Scope::Table => true,
            Scope::Account(account) => pk == *account,
            Scope::Index(index) => {
                let own = settings_sk(&index.name);
                pk == index.account && (sk == own || sk.starts_with(&overrides_sk(&index.name)))
            }
        }
    }
}

/// A stretch of the table in the order a scan reads it: the records after `after` (from the
/// table's beginning when `None`) through `through`, `records` of them when read; of one
/// account's records when given. What a backfill's batch was read from, read again by its check.
#[derive(Debug, Clone, PartialEq)]
pub struct TableSpan {
    pub account: Option<String>,
    pub after: Option<TableKey>,
    pub through: TableKey,
    pub records: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
struct KeyString {
    #[serde(rename = "S")]
    s: String,
}

impl TableKey {
    pub fn new(pk: impl Into<String>, sk: impl Into<String>) -> Self {
        let (pk, sk) = (KeyString { s: pk.into() }, KeyString { s: sk.into() });
        TableKey { pk, sk }
    }

    pub fn pk(&self) -> &str {
        &self.pk.s
    }

    pub fn sk(&self) -> &str {
        &self.sk.s
    }

    /// The key of an index's settings record (`query`: of its override).
    pub fn of(index: &IndexRef, query: Option<&str>) -> Self {
        let sk = match query {
            None => settings_sk(&index.name),
            Some(query) => overrides_sk(&index.name) + query,
        };
        TableKey::new(&index.account, sk)
    }
}

/// The sort key of the settings item of the index named `name` (docs/contract.md, "The
/// settings table"); every sort key of the table is built here.
pub fn settings_sk(name: &str) -> String {
    format!("INDEX#{name}")
}

/// What the sort keys of the index's overrides begin with (the query follows, `#` and all).
pub fn overrides_sk(name: &str) -> String {
    format!("INDEX#{name}#QUERY#")
}
