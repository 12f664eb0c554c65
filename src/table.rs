//! The settings table in DynamoDB: read for alias-deletion safety (and manual re-exports).

use std::future::Future;

use aws_sdk_dynamodb::types::AttributeValue;
use serde_dynamo::Item;

use crate::model::{IndexRef, SettingsReference};
use crate::records::SortKey;

pub trait SettingsTable: Send + Sync {
    /// Every index-settings record's shop id and live alias targets (one paginated scan).
    fn settings_references(
        &self,
    ) -> impl Future<Output = Result<Vec<SettingsReference>, String>> + Send;

    /// The `INDEX#{name}` record of an account, if there is one.
    fn index_settings(
        &self,
        index: &IndexRef,
    ) -> impl Future<Output = Result<Option<Item>, String>> + Send;

    /// Every `INDEX#{name}#QUERY#...` record of the index.
    fn query_configs(
        &self,
        index: &IndexRef,
    ) -> impl Future<Output = Result<Vec<Item>, String>> + Send;

    /// One page of the table (of one account's records when `account` is given), from `start`.
    fn page(
        &self,
        account: Option<&str>,
        start: Option<Item>,
        limit: i32,
    ) -> impl Future<Output = Result<Page, String>> + Send;
}

/// Items of one page and, when there is more, where the next page starts (the table key).
#[derive(Debug, Default)]
pub struct Page {
    pub items: Vec<Item>,
    pub next: Option<Item>,
}

pub struct DynamoSettingsTable {
    client: aws_sdk_dynamodb::Client,
    table_name: String,
    default_configs_sk: String,
}

impl DynamoSettingsTable {
    pub fn new(
        client: aws_sdk_dynamodb::Client,
        table_name: impl Into<String>,
        default_configs_sk: impl Into<String>,
    ) -> Self {
        Self {
            client,
            table_name: table_name.into(),
            default_configs_sk: default_configs_sk.into(),
        }
    }
}

impl DynamoSettingsTable {
    fn error(&self, operation: &str, e: impl std::error::Error) -> String {
        format!(
            "{operation} of table {}: {}",
            self.table_name,
            aws_sdk_dynamodb::error::DisplayErrorContext(e)
        )
    }
}

fn string_attribute(item: &Item, name: &str) -> Option<String> {
    match item.get(name) {
        Some(serde_dynamo::AttributeValue::S(s)) => Some(s.clone()),
        _ => None,
    }
}

impl SettingsTable for DynamoSettingsTable {
    async fn settings_references(&self) -> Result<Vec<SettingsReference>, String> {
        let mut references = Vec::new();
        let mut start_key = None;
        loop {
            let page = self
                .client
                .scan()
                .table_name(&self.table_name)
                .filter_expression("begins_with(sk, :index) AND NOT contains(sk, :query)")
                .projection_expression("pk, sk, shop_id, read_alias, index_aliases")
                .expression_attribute_values(":index", AttributeValue::S("INDEX#".into()))
                .expression_attribute_values(":query", AttributeValue::S("#QUERY#".into()))
                .set_exclusive_start_key(start_key)
                .send()
                .await
                .map_err(|e| self.error("scan", e))?;
            for item in page.items.unwrap_or_default() {
                let item = Item::from(item);
                let (Some(pk), Some(sk)) =
                    (string_attribute(&item, "pk"), string_attribute(&item, "sk"))
                else {
                    continue;
                };
                let SortKey::Index(name) = SortKey::parse(&sk, &self.default_configs_sk) else {
                    continue;
                };
                let index = IndexRef::new(pk, name);
                match SettingsReference::from_item(index.clone(), item) {
                    Ok(reference) => references.push(reference),
                    Err(e) => {
                        tracing::warn!(account = %index.account, index = %index.name, reason = %e,
                        "settings record cannot be read for alias safety; it protects nothing")
                    }
                }
            }
            match page.last_evaluated_key {
                Some(key) if !key.is_empty() => start_key = Some(key),
                _ => return Ok(references),
            }
        }
    }

    async fn index_settings(&self, index: &IndexRef) -> Result<Option<Item>, String> {
        let answer = self
            .client
            .get_item()
            .table_name(&self.table_name)
            .key("pk", AttributeValue::S(index.account.clone()))
            .key("sk", AttributeValue::S(format!("INDEX#{}", index.name)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| self.error("GetItem", e))?;
        Ok(answer.item.map(Item::from))
    }

    async fn query_configs(&self, index: &IndexRef) -> Result<Vec<Item>, String> {
        let prefix = format!("INDEX#{}#QUERY#", index.name);
        let mut configs = Vec::new();
        let mut start_key = None;
        loop {
            let page = self
                .client
                .query()
                .table_name(&self.table_name)
                .key_condition_expression("pk = :pk AND begins_with(sk, :prefix)")
                .expression_attribute_values(":pk", AttributeValue::S(index.account.clone()))
                .expression_attribute_values(":prefix", AttributeValue::S(prefix.clone()))
                .consistent_read(true)
                .set_exclusive_start_key(start_key)
                .send()
                .await
                .map_err(|e| self.error("Query", e))?;
            configs.extend(page.items.unwrap_or_default().into_iter().map(Item::from));
            match page.last_evaluated_key {
                Some(key) if !key.is_empty() => start_key = Some(key),
                _ => return Ok(configs),
            }
        }
    }

    async fn page(
        &self,
        account: Option<&str>,
        start: Option<Item>,
        limit: i32,
    ) -> Result<Page, String> {
        let start = start.map(|key| key.into());
        let (items, next) = match account {
            Some(account) => {
                let page = self
                    .client
                    .query()
                    .table_name(&self.table_name)
                    .key_condition_expression("pk = :pk")
                    .expression_attribute_values(":pk", AttributeValue::S(account.to_owned()))
                    .set_exclusive_start_key(start)
                    .limit(limit)
                    .send()
                    .await
                    .map_err(|e| self.error("Query", e))?;
                (page.items, page.last_evaluated_key)
            }
            None => {
                let page = self
                    .client
                    .scan()
                    .table_name(&self.table_name)
                    .set_exclusive_start_key(start)
                    .limit(limit)
                    .send()
                    .await
                    .map_err(|e| self.error("Scan", e))?;
                (page.items, page.last_evaluated_key)
            }
        };
        Ok(Page {
            items: items
                .unwrap_or_default()
                .into_iter()
                .map(Item::from)
                .collect(),
            next: next.filter(|key| !key.is_empty()).map(Item::from),
        })
    }
}
