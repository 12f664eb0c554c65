//! The export ledger, the function's own DynamoDB table (`LEDGER_TABLE_NAME`; `pk`, `sk`
//! strings). It holds each index's references ([`refs`]), and where a scheduled reconcile
//! stands (`pk = "reconcile"`, `sk = "progress"`); progress writes are conditional on the
//! version read, so two invocations never both take a pass. Calls go through the SDK client
//! the settings table uses (`dynamodb/client.rs`: its batching and retries).

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};

use aws_sdk_dynamodb::types::{AttributeValue, TransactWriteItem};

use crate::domain::IndexRef;
use crate::ports::{IndexRefs, Ledger, PortError, ReconcileProgress};
use crate::ports::{Referred, RefsChange};

use super::dynamodb::client::{key, SdkItem};
use super::dynamodb::Dynamo;

mod refs;

const PROGRESS_PK: &str = "reconcile";
const PROGRESS_SK: &str = "progress";
pub struct DynamoLedger {
    dynamo: Dynamo,
    table_name: String,
}

impl DynamoLedger {
    /// The ledger where and as whom the SDK configured by `aws` would call DynamoDB.
    pub fn new(aws: &aws_config::SdkConfig, table_name: String) -> Self {
        let dynamo = Dynamo::new(aws);
        Self { dynamo, table_name }
    }
}

/// An attribute of an item, as a number.
fn number(item: &SdkItem, name: &str) -> Option<u64> {
    item.get(name)?.as_n().ok()?.parse().ok()
}

/// An attribute of an item, as a string.
fn text(item: &SdkItem, name: &str) -> Option<String> {
    item.get(name)?.as_s().ok().cloned()
}

fn n(value: u64) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

/// An item, a key or an expression's values, built attribute by attribute.
#[derive(Default)]
struct Item(SdkItem);

impl Item {
    fn key(pk: String, sk: &str) -> Self {
        Item(key(pk, sk))
    }

    fn with(mut self, name: &str, value: AttributeValue) -> Self {
        self.0.insert(name.to_owned(), value);
        self
    }

    /// The attributes, `None` when there are none (DynamoDB refuses an empty map).
    fn given(self) -> Option<SdkItem> {
        (!self.0.is_empty()).then_some(self.0)
    }
}

/// One action of a TransactWriteItems: every write of the ledger is one.
enum Action<'a> {
    Put(Put<'a>),
    Update(Update<'a>),
}

/// A condition expression and the values it names.
type Condition = (Cow<'static, str>, Item);

/// A put, on a condition (an expression and its values) when one is given.
struct Put<'a> {
    table_name: &'a str,
    item: Item,
    condition_expression: Option<Cow<'static, str>>,
    expression_attribute_values: Item,
}

/// An UpdateItem of an item of the ledger's, with the attribute names its expression uses.
struct Update<'a> {
    table_name: &'a str,
    key: Item,
    update_expression: Cow<'static, str>,
    condition_expression: Option<&'static str>,
    expression_attribute_names: Names,
    expression_attribute_values: Item,
}

/// An expression's attribute names (`#set` for `referrers`, ...).
type Names = std::collections::BTreeMap<&'static str, &'static str>;

impl Action<'_> {
    /// The action as the SDK sends it. Its builders fail only without a table, an item or a
    /// key, which every action has.
    fn into_sdk(self) -> TransactWriteItem {
        use aws_sdk_dynamodb::types as sdk;
        let action = TransactWriteItem::builder();
        match self {
            Action::Put(put) => action.put(
                sdk::Put::builder()
                    .table_name(put.table_name)
                    .set_item(Some(put.item.0))
                    .set_condition_expression(put.condition_expression.map(Cow::into_owned))
                    .set_expression_attribute_values(put.expression_attribute_values.given())
                    .build()
                    .expect("a table and an item"),
            ),
            Action::Update(update) => {
                let names = (update.expression_attribute_names.into_iter())
                    .map(|(placeholder, name)| (placeholder.to_owned(), name.to_owned()));
                let names: HashMap<String, String> = names.collect();
                action.update(
                    sdk::Update::builder()
                        .table_name(update.table_name)
                        .set_key(Some(update.key.0))
                        .update_expression(update.update_expression)
                        .set_condition_expression(update.condition_expression.map(str::to_owned))
                        .set_expression_attribute_names((!names.is_empty()).then_some(names))
                        .set_expression_attribute_values(update.expression_attribute_values.given())
                        .build()
                        .expect("a table, a key and an expression"),
                )
            }
        }
        .build()
    }
}

fn progress_of(item: &SdkItem) -> ReconcileProgress {
    ReconcileProgress {
        version: number(item, "version").unwrap_or_default(),
        token: text(item, "token"),
        pass_started_at: number(item, "pass_started_at"),
        pass_drift: number(item, "pass_drift").unwrap_or_default(),
        last_full_pass_at: number(item, "last_full_pass_at"),
        last_pass_drift: number(item, "last_pass_drift").unwrap_or_default(),
        lease_until: number(item, "lease_until"),
    }
}

fn item_of(progress: &ReconcileProgress) -> Item {
    let mut item = Item::key(PROGRESS_PK.to_owned(), PROGRESS_SK)
        .with("version", n(progress.version))
        .with("pass_drift", n(progress.pass_drift))
        .with("last_pass_drift", n(progress.last_pass_drift));
    let optional = [
        ("pass_started_at", progress.pass_started_at),
        ("last_full_pass_at", progress.last_full_pass_at),
        ("lease_until", progress.lease_until),
    ];
    for (name, value) in optional {
        if let Some(value) = value {
            item = item.with(name, n(value));
        }
    }
    if let Some(token) = &progress.token {
        item = item.with("token", AttributeValue::S(token.clone()));
    }
    item
}

impl DynamoLedger {
    /// One item, read consistently (`None`: there is none).
    async fn get_one(&self, pk: &str, sk: &str) -> Result<Option<SdkItem>, PortError> {
        let key = key(pk.to_owned(), sk);
        self.dynamo.get_one(&self.table_name, key).await
    }

    /// Puts `item`, on `condition` (an expression and its values) when one is given: `Ok(false)`
    /// when the condition failed and nothing was written.
    async fn put(&self, item: Item, condition: Option<Condition>) -> Result<bool, PortError> {
        let put = self.put_action(item, condition);
        Ok(self.transact_all(vec![Action::Put(put)]).await?.is_empty())
    }

    fn put_action(&self, item: Item, condition: Option<Condition>) -> Put<'_> {
        let (condition_expression, values) = condition.unzip();
        Put {
            table_name: &self.table_name,
            item,
            condition_expression,
            expression_attribute_values: values.unwrap_or_default(),
        }
    }

    /// Any number of consistent reads, 100 keys a call, some calls at once: each item found
    /// handed to `each`.
    async fn get_all(
        &self,
        keys: Vec<(String, String)>,
        mut each: impl FnMut(serde_dynamo::Item) + Send,
    ) -> Result<(), PortError> {
        self.dynamo
            .get_all((&self.table_name, None), keys, &mut each)
            .await
    }

    /// Any number of actions, no two on one item, 100 a transaction, some at once: the
    /// positions of those whose condition failed (nothing of theirs written).
    async fn transact_all(&self, actions: Vec<Action<'_>>) -> Result<BTreeSet<usize>, PortError> {
        let actions = actions.into_iter().map(Action::into_sdk).collect();
        self.dynamo.transact_all(&self.table_name, actions).await
    }
}

impl Ledger for DynamoLedger {
    async fn references_complete(&self) -> Result<bool, PortError> {
        self.get_references_complete().await
    }

    async fn mark_references_complete(&self) -> Result<(), PortError> {
        self.put_references_complete().await
    }

    async fn index_refs(
        &self,
        indexes: &[IndexRef],
    ) -> Result<HashMap<IndexRef, IndexRefs>, PortError> {
        self.get_index_refs(indexes).await
    }

    async fn referrers(&self, referred: &[Referred]) -> Result<Vec<IndexRef>, PortError> {
        self.get_referrers(referred).await
    }

    async fn pointing(
        &self,
        items: &[(IndexRef, Referred)],
    ) -> Result<Vec<(IndexRef, Referred)>, PortError> {
        self.get_back_items(items).await
    }

    async fn point_back(&self, items: &[(IndexRef, Referred)]) -> Result<(), PortError> {
        self.put_back_items(items).await
    }

    async fn record_refs(&self, changes: &[RefsChange]) -> Result<(), PortError> {
        self.put_all_refs(changes).await
    }

    async fn reconcile_progress(&self) -> Result<Option<ReconcileProgress>, PortError> {
        let item = self.get_one(PROGRESS_PK, PROGRESS_SK).await?;
        Ok(item.as_ref().map(progress_of))
    }

    async fn save_reconcile_progress(
        &self,
        progress: &ReconcileProgress,
        expected: Option<u64>,
    ) -> Result<bool, PortError> {
        let condition = match expected {
            None => ("attribute_not_exists(pk)".into(), Item::default()),
            Some(version) => (
                "version = :read".into(),
                Item::default().with(":read", n(version)),
            ),
        };
        self.put(item_of(progress), Some(condition)).await
    }
}
