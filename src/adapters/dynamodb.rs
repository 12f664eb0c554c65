//! The settings table in DynamoDB: the stream's items, what records say of other indexes,
//! manual re-exports and backfills. Every failure here is transient: the SDK has already
//! retried, and a record that needs the table is reported for retry.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use aws_sdk_dynamodb::types::AttributeValue;
use serde_dynamo::Item;

use crate::domain::table::{overrides_sk, settings_sk};
use crate::domain::{ChangeRecord, IndexRef, IndexRefs, Scope, TableKey};
use crate::dynamo::{key_item, settings_references, string_attribute};
use crate::dynamo::{table_key, table_record};
use crate::ports::{Page, PortError, SettingsTable};

pub struct DynamoSettingsTable {
    dynamo: Dynamo,
    table_name: String,
    default_configs_sk: String,
    override_queries: AtomicUsize,
    index_runs: AtomicUsize,
}

impl DynamoSettingsTable {
    pub fn new(
        aws: &aws_config::SdkConfig,
        table_name: impl Into<String>,
        default_configs_sk: impl Into<String>,
    ) -> Self {
        Self {
            dynamo: Dynamo::new(aws),
            table_name: table_name.into(),
            default_configs_sk: default_configs_sk.into(),
            override_queries: AtomicUsize::new(0),
            index_runs: AtomicUsize::new(0),
        }
    }
}

/// What the settings table was asked so far, for tests and the scale benchmark.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct TableCounters {
    /// Queries of one index's overrides (for its filter, or a re-export).
    pub override_queries: usize,
    /// Queries of a run of an account's indexes (a check reading them again).
    pub index_runs: usize,
}

impl DynamoSettingsTable {
    /// What the table was asked so far.
    pub fn counters(&self) -> TableCounters {
        TableCounters {
            override_queries: self.override_queries.load(Ordering::Relaxed),
            index_runs: self.index_runs.load(Ordering::Relaxed),
        }
    }

    fn error<E>(&self, operation: &str, e: aws_sdk_dynamodb::error::SdkError<E>) -> PortError
    where
        E: aws_sdk_dynamodb::error::ProvideErrorMetadata
            + std::error::Error
            + Send
            + Sync
            + 'static,
    {
        client::port_error(operation, &self.table_name, e)
    }

    fn client(&self) -> &aws_sdk_dynamodb::Client {
        self.dynamo.sdk()
    }

    /// Items read as a page of records, each with its key.
    fn page_of(&self, items: Vec<Item>, next: Option<Item>) -> Page {
        let next = next.as_ref().and_then(table_key);
        table_page(&items, &self.default_configs_sk, next)
    }
}

/// Items read as a page of records, each with its key, and what their settings items name;
/// `next`: where the rest begins.
pub(crate) fn table_page(items: &[Item], default_configs_sk: &str, next: Option<TableKey>) -> Page {
    let mut page = Page {
        next,
        ..Page::default()
    };
    for item in items {
        let Some(key) = table_key(item) else { continue };
        let (record, named) = table_record(item, default_configs_sk);
        page.references.extend(record.index.clone().zip(named));
        page.records.push((key, record));
    }
    page
}

pub(crate) mod client;

pub(crate) use client::{Dynamo, CONCURRENT_CALLS, TRANSACT_ACTIONS};

/// The least string above every string that begins with `prefix`, in DynamoDB's order (UTF-8
/// bytes, which keeps the order of code points): its last character made the next one.
/// `None` when there is none (only `char::MAX` left).
fn after_prefix(prefix: &str) -> Option<String> {
    let mut chars: Vec<char> = prefix.chars().collect();
    while let Some(last) = chars.pop() {
        let next = (last as u32 + 1..=char::MAX as u32).find_map(char::from_u32);
        if let Some(next) = next {
            chars.push(next);
            return Some(chars.into_iter().collect());
        }
    }
    None
}

/// The index a settings item's key names (`None`: not a settings item's).
fn index_of(item: &Item) -> Option<IndexRef> {
    let name = string_attribute(item, "sk")?.strip_prefix("INDEX#")?;
    Some(IndexRef::new(string_attribute(item, "pk")?, name))
}

/// What a settings record names of other keys; a record whose aliases cannot be read names
/// every index id it holds (fail closed), with a warning.
fn references_of(index: IndexRef, image: &Item) -> (IndexRef, IndexRefs) {
    let (references, problem) = settings_references(image);
    if let Some(problem) = problem {
        tracing::warn!(account = %index.account, index = %index.name, reason = %problem,
            "settings record's aliases cannot be read; every index id it names stays protected");
    }
    (index, references)
}

impl DynamoSettingsTable {
    /// The items of these keys (`pk`, `sk`) that exist, only `projection`, each handed to
    /// `each` (consistent reads).
    async fn read_keys(
        &self,
        keys: Vec<(String, String)>,
        projection: &str,
        mut each: impl FnMut(Item) + Send,
    ) -> Result<(), PortError> {
        let table = (self.table_name.as_str(), Some(projection));
        self.dynamo.get_all(table, keys, &mut each).await
    }

    /// The index's items after `start`, `limit` at most (only `projection`, when given): its
    /// `INDEX#{name}#QUERY#...` items, after its `INDEX#{name}` item `with_settings`. A
    /// consistent Query, page after page; another index whose name sorts between them
    /// (`INDEX#{name}!x`) is filtered out.
    async fn index_items(
        &self,
        index: &IndexRef,
        with_settings: bool,
        projection: Option<&str>,
        start: Option<&TableKey>,
        limit: usize,
    ) -> Result<(Vec<Item>, Option<Item>), PortError> {
        let (own, prefix) = (settings_sk(&index.name), overrides_sk(&index.name));
        let query = (self.client().query())
            .table_name(&self.table_name)
            .expression_attribute_values(":pk", AttributeValue::S(index.account.clone()))
            .expression_attribute_values(":prefix", AttributeValue::S(prefix.clone()));
        let query = match (with_settings, after_prefix(&prefix)) {
            (true, Some(upper)) => query
                .key_condition_expression("pk = :pk AND sk BETWEEN :own AND :upper")
                .filter_expression("sk = :own OR begins_with(sk, :prefix)")
                .expression_attribute_values(":own", AttributeValue::S(own))
                .expression_attribute_values(":upper", AttributeValue::S(upper)),
            _ => query.key_condition_expression("pk = :pk AND begins_with(sk, :prefix)"),
        };
        let query =
            (query.set_projection_expression(projection.map(str::to_owned))).consistent_read(true);
        let (mut items, mut start_key) = (Vec::new(), start.map(|key| key_item(key).into()));
        loop {
            let left = i32::try_from(limit - items.len()).unwrap_or(i32::MAX);
            let page = (query.clone())
                .set_exclusive_start_key(start_key)
                .set_limit((limit != usize::MAX).then_some(left))
                .send()
                .await
                .map_err(|e| self.error("Query", e))?;
            items.extend(page.items.unwrap_or_default().into_iter().map(Item::from));
            match page.last_evaluated_key.filter(|key| !key.is_empty()) {
                Some(key) if items.len() < limit => start_key = Some(key),
                next => return Ok((items, next.map(Item::from))),
            }
        }
    }
}

impl SettingsTable for DynamoSettingsTable {
    async fn index_references(
        &self,
        indexes: &[IndexRef],
    ) -> Result<Vec<(IndexRef, IndexRefs)>, PortError> {
        let keys = indexes
            .iter()
            .map(|i| (i.account.clone(), settings_sk(&i.name)));
        let projection = "pk, sk, shop_id, read_alias, index_aliases";
        let mut found = HashMap::with_capacity(indexes.len());
        self.read_keys(keys.collect(), projection, |item| {
            if let Some(index) = index_of(&item) {
                found.insert(index.clone(), references_of(index, &item));
            }
        })
        .await?;
        Ok((indexes.iter()).filter_map(|i| found.remove(i)).collect())
    }

    async fn records(
        &self,
        keys: Vec<TableKey>,
        mut each: impl FnMut(TableKey, ChangeRecord) + Send,
    ) -> Result<(), PortError> {
        let keys = (keys.iter()).map(|key| (key.pk().to_owned(), key.sk().to_owned()));
        let mut each = |item: Item| {
            if let Some(key) = table_key(&item) {
                each(key, table_record(&item, &self.default_configs_sk).0);
            }
        };
        let table = (self.table_name.as_str(), None);
        self.dynamo.get_all(table, keys.collect(), &mut each).await
    }

    async fn index_range(
        &self,
        account: &str,
        first: &str,
        last: &str,
    ) -> Result<Vec<(TableKey, ChangeRecord)>, PortError> {
        self.index_runs.fetch_add(1, Ordering::Relaxed);
        // Every sort key that begins with `INDEX#{last}` follows it in one run, and sorts
        // before `after_prefix` of it: past that run (or past the account), the range is read.
        let last = settings_sk(last);
        let upper = after_prefix(&last);
        let query = (self.client().query())
            .table_name(&self.table_name)
            .expression_attribute_values(":pk", AttributeValue::S(account.to_owned()))
            .expression_attribute_values(":first", AttributeValue::S(settings_sk(first)));
        let query = match &upper {
            Some(upper) => query
                .key_condition_expression("pk = :pk AND sk BETWEEN :first AND :upper")
                .expression_attribute_values(":upper", AttributeValue::S(upper.clone())),
            None => query.key_condition_expression("pk = :pk AND sk >= :first"),
        };
        let mut pages = query.consistent_read(true).into_paginator().items().send();
        let mut items = Vec::new();
        while let Some(item) = pages.try_next().await.map_err(|e| self.error("Query", e))? {
            let item = Item::from(item);
            let sk = string_attribute(&item, "sk").unwrap_or_default();
            if sk > last.as_str() && !sk.starts_with(&last) {
                break;
            }
            items.push(item);
        }
        Ok(table_page(&items, &self.default_configs_sk, None).records)
    }

    async fn override_queries(&self, index: &IndexRef) -> Result<Vec<String>, PortError> {
        self.override_queries.fetch_add(1, Ordering::Relaxed);
        let prefix = overrides_sk(&index.name);
        let (items, _) = (self.index_items(index, false, Some("sk"), None, usize::MAX)).await?;
        Ok(items
            .iter()
            // Everything after the first `#QUERY#` is the query, `#` and all.
            .filter_map(|item| string_attribute(item, "sk")?.strip_prefix(&prefix))
            .map(str::to_owned)
            .collect())
    }

    async fn page(
        &self,
        scope: Scope<'_>,
        start: Option<TableKey>,
        limit: i32,
    ) -> Result<Page, PortError> {
        if let Scope::Index(index) = scope {
            let limit = usize::try_from(limit.max(1)).unwrap_or(1);
            let read = self.index_items(index, true, None, start.as_ref(), limit);
            let (items, next) = read.await?;
            return Ok(self.page_of(items, next));
        }
        let start = start.map(|key| key_item(&key).into());
        let (items, next) = match scope {
            Scope::Account(account) => {
                let page = self
                    .client()
                    .query()
                    .table_name(&self.table_name)
                    .key_condition_expression("pk = :pk")
                    .expression_attribute_values(":pk", AttributeValue::S(account.to_owned()))
                    // Operators' claims assume the table read is at least as new as the
                    // ledger time they took before it (docs/contract.md).
                    .consistent_read(true)
                    .set_exclusive_start_key(start)
                    .limit(limit)
                    .send()
                    .await
                    .map_err(|e| self.error("Query", e))?;
                (page.items, page.last_evaluated_key)
            }
            _ => {
                let page = self
                    .client()
                    .scan()
                    .table_name(&self.table_name)
                    .consistent_read(true)
                    .set_exclusive_start_key(start)
                    .limit(limit)
                    .send()
                    .await
                    .map_err(|e| self.error("Scan", e))?;
                (page.items, page.last_evaluated_key)
            }
        };
        let items = items.unwrap_or_default().into_iter().map(Item::from);
        let next = next.filter(|key| !key.is_empty()).map(Item::from);
        Ok(self.page_of(items.collect(), next))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bound_after_a_prefix_is_above_every_key_that_begins_with_it() {
        let cases = [
            ("INDEX#products", Some("INDEX#productt")),
            ("INDEX#caf\u{e9}", Some("INDEX#caf\u{ea}")),
            ("INDEX#a\u{d7ff}", Some("INDEX#a\u{e000}")),
            ("INDEX#a\u{10ffff}", Some("INDEX#b")),
            ("\u{10ffff}", None),
        ];
        for (prefix, bound) in cases {
            let after = after_prefix(prefix);
            assert_eq!(after.as_deref(), bound, "{prefix:?}");
            if let Some(after) = after {
                for key in [prefix.to_owned(), format!("{prefix}#QUERY#\u{10ffff}z")] {
                    assert!(key.as_bytes() < after.as_bytes(), "{key:?} < {after:?}");
                }
            }
        }
    }
}
