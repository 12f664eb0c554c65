//! The export ledger, the function's own DynamoDB table (`LEDGER_TABLE_NAME`; `pk`, `sk`
//! strings). It holds each index's references ([`refs`]), and where a scheduled reconcile
//! stands (`pk = "reconcile"`, `sk = "progress"`); progress writes are conditional on the
//! version read, so two invocations never both take a pass. Calls go through the SDK client
//! the settings table uses (`dynamodb/client.rs`: its batching and retries). The `Ledger` port
//! is implemented in [`refs`], the progress item's two methods with the rest.

use std::borrow::Cow;
use std::collections::BTreeSet;

use aws_sdk_dynamodb::types::builders::UpdateBuilder;
use aws_sdk_dynamodb::types::{AttributeValue, TransactWriteItem};

use crate::ports::{PortError, ReconcileProgress};

use super::dynamodb::client::{key, SdkItem};
use super::dynamodb::Dynamo;
// An item as read: the same type for the ledger's items as for the settings table's.
use serde_dynamo::Item as Found;

mod refs;

const PROGRESS_PK: &str = "reconcile";
const PROGRESS_SK: &str = "progress";
pub struct DynamoLedger {
    dynamo: Dynamo,
    table_name: String,
    /// The references were seen complete: they stay so (nothing unmarks them while the
    /// function runs), so a warm container reads the mark once.
    complete: std::sync::atomic::AtomicBool,
}

impl DynamoLedger {
    /// The ledger where and as whom the SDK configured by `aws` would call DynamoDB.
    pub fn new(aws: &aws_config::SdkConfig, table_name: String) -> Self {
        let dynamo = Dynamo::new(aws);
        let complete = Default::default();
        Self {
            dynamo,
            table_name,
            complete,
        }
    }
}

/// An attribute of an item, as a number.
fn number(item: &Found, name: &str) -> Option<u64> {
    match item.get(name)? {
        serde_dynamo::AttributeValue::N(n) => n.parse().ok(),
        _ => None,
    }
}

/// An attribute of an item, as a string.
fn text(item: &Found, name: &str) -> Option<String> {
    crate::dynamo::string_attribute(item, name).map(str::to_owned)
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

/// A condition expression and the values it names.
type Condition = (Cow<'static, str>, Item);

/// An update of an item of the ledger's as a TransactWriteItems action. The SDK's builder
/// fails only without a table, a key or an expression, which every update here has.
fn update_action(update: UpdateBuilder) -> TransactWriteItem {
    let update = update.build().expect("a table, a key and an expression");
    TransactWriteItem::builder().update(update).build()
}

fn progress_of(item: &Found) -> ReconcileProgress {
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
    async fn get_one(&self, pk: &str, sk: &str) -> Result<Option<Found>, PortError> {
        let key = key(pk.to_owned(), sk);
        self.dynamo.get_one(&self.table_name, key).await
    }

    /// Puts `item`, on `condition` (an expression and its values) when one is given: `Ok(false)`
    /// when the condition failed and nothing was written.
    async fn put(&self, item: Item, condition: Option<Condition>) -> Result<bool, PortError> {
        let put = self.put_action(item, condition);
        Ok(self.transact_all(vec![put]).await?.is_empty())
    }

    /// A put as a TransactWriteItems action, on a condition when one is given. The SDK's
    /// builder fails only without a table or an item, which it has.
    fn put_action(&self, item: Item, condition: Option<Condition>) -> TransactWriteItem {
        let (condition, values) = condition.unzip();
        let put = aws_sdk_dynamodb::types::Put::builder()
            .table_name(&self.table_name)
            .set_item(Some(item.0))
            .set_condition_expression(condition.map(Cow::into_owned))
            .set_expression_attribute_values(values.and_then(Item::given))
            .build()
            .expect("a table and an item");
        TransactWriteItem::builder().put(put).build()
    }

    /// A delete as a TransactWriteItems action, on a condition when one is given (`#set`
    /// names the set of who refers: DynamoDB refuses a name the expression does not use).
    fn delete_action(&self, key: Item, condition: Option<Condition>) -> TransactWriteItem {
        let (condition, values) = condition.unzip();
        let names_set = condition.as_ref().is_some_and(|c| c.contains("#set"));
        let delete = aws_sdk_dynamodb::types::Delete::builder()
            .table_name(&self.table_name)
            .set_key(Some(key.0))
            .set_condition_expression(condition.map(Cow::into_owned))
            .set_expression_attribute_values(values.and_then(Item::given));
        let delete = match names_set {
            true => delete.expression_attribute_names("#set", refs::SET),
            false => delete,
        };
        let delete = delete.build().expect("a table and a key");
        TransactWriteItem::builder().delete(delete).build()
    }

    /// Any number of consistent reads, 100 keys a call, some calls at once: each item found
    /// handed to `each`.
    async fn get_all(
        &self,
        keys: Vec<(String, String)>,
        mut each: impl FnMut(Found) + Send,
    ) -> Result<(), PortError> {
        self.dynamo
            .get_all((&self.table_name, None), keys, &mut each)
            .await
    }

    /// Any number of actions, no two on one item, 100 a transaction, some at once: the
    /// positions of those whose condition failed (nothing of theirs written).
    async fn transact_all(
        &self,
        actions: Vec<TransactWriteItem>,
    ) -> Result<BTreeSet<usize>, PortError> {
        self.dynamo.transact_all(&self.table_name, actions).await
    }
}
