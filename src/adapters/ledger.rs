//! The export ledger, the function's own DynamoDB table (`LEDGER_TABLE_NAME`; `pk`, `sk`
//! strings). It holds each index's references ([`refs`]), and where a scheduled reconcile stands (`pk = "reconcile"`, `sk = "progress"`); progress writes
//! are conditional on the version read, so two invocations never both take a pass.

use std::collections::HashMap;

use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::put_item::builders::PutItemFluentBuilder;
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::types::AttributeValue;

use aws_sdk_dynamodb::types::{PutRequest, WriteRequest};
use futures::StreamExt as _;

use crate::domain::IndexRef;
use crate::ports::{IndexRefs, Ledger, PortError, ReconcileProgress};
use crate::ports::{Referred, RefsChange};

use super::dynamodb::UNPROCESSED_TRIES;

mod refs;

const PROGRESS_PK: &str = "reconcile";
const PROGRESS_SK: &str = "progress";
/// A removed index's references matter while a writer that read before the remove may still
/// be running (one invocation, 15 minutes at most); the table's TTL forgets them two days later.
const REMOVED_KEPT_SECONDS: u64 = 2 * 24 * 3600;
/// DynamoDB's limit per BatchWriteItem call.
const WRITE_BATCH: usize = 25;
/// Batch calls in flight at once.
const CONCURRENT_CALLS: usize = 8;

pub struct DynamoLedger {
    client: aws_sdk_dynamodb::Client,
    table_name: String,
}

impl DynamoLedger {
    pub fn new(client: aws_sdk_dynamodb::Client, table_name: String) -> Self {
        Self { client, table_name }
    }

    fn error(&self, operation: &str, e: impl std::error::Error) -> PortError {
        PortError::Transient(format!(
            "{operation} of the ledger table {}: {}",
            self.table_name,
            aws_sdk_dynamodb::error::DisplayErrorContext(e)
        ))
    }
}

fn number(item: &HashMap<String, AttributeValue>, name: &str) -> Option<u64> {
    item.get(name)?.as_n().ok()?.parse().ok()
}

fn text(item: &HashMap<String, AttributeValue>, name: &str) -> Option<String> {
    item.get(name)?.as_s().ok().cloned()
}

fn progress_of(item: &HashMap<String, AttributeValue>) -> ReconcileProgress {
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

fn item_of(progress: &ReconcileProgress) -> HashMap<String, AttributeValue> {
    let n = |v: u64| AttributeValue::N(v.to_string());
    let mut item = HashMap::from([
        ("pk".to_owned(), AttributeValue::S(PROGRESS_PK.into())),
        ("sk".to_owned(), AttributeValue::S(PROGRESS_SK.into())),
        ("version".to_owned(), n(progress.version)),
        ("pass_drift".to_owned(), n(progress.pass_drift)),
        ("last_pass_drift".to_owned(), n(progress.last_pass_drift)),
    ]);
    let optional = [
        ("pass_started_at", progress.pass_started_at),
        ("last_full_pass_at", progress.last_full_pass_at),
        ("lease_until", progress.lease_until),
    ];
    for (name, value) in optional {
        if let Some(value) = value {
            item.insert(name.to_owned(), n(value));
        }
    }
    if let Some(token) = &progress.token {
        item.insert("token".to_owned(), AttributeValue::S(token.clone()));
    }
    item
}

fn table_key(pk: String, sk: &str) -> HashMap<String, AttributeValue> {
    HashMap::from([
        ("pk".to_owned(), AttributeValue::S(pk)),
        ("sk".to_owned(), AttributeValue::S(sk.to_owned())),
    ])
}

/// When the table's TTL may forget an item written now: [`REMOVED_KEPT_SECONDS`] later.
fn expires_at() -> AttributeValue {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    AttributeValue::N((now + REMOVED_KEPT_SECONDS).to_string())
}

impl DynamoLedger {
    /// One item, read consistently (`None`: there is none).
    async fn get_one(
        &self,
        pk: &str,
        sk: &str,
    ) -> Result<Option<HashMap<String, AttributeValue>>, PortError> {
        let answer = self
            .client
            .get_item()
            .table_name(&self.table_name)
            .set_key(Some(table_key(pk.to_owned(), sk)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| self.error("GetItem", e))?;
        Ok(answer.item)
    }

    /// Sends a conditional put: `Ok(false)` when its condition failed and nothing was written.
    async fn put_if(&self, put: PutItemFluentBuilder) -> Result<bool, PortError> {
        match put.send().await {
            Ok(_) => Ok(true),
            Err(SdkError::ServiceError(e))
                if matches!(e.err(), PutItemError::ConditionalCheckFailedException(_)) =>
            {
                Ok(false)
            }
            Err(e) => Err(self.error("PutItem", e)),
        }
    }

    /// One BatchWriteItem of at most 25 requests, its unprocessed items tried again.
    async fn write_batch(
        &self,
        table: &str,
        mut requests: Vec<WriteRequest>,
    ) -> Result<(), PortError> {
        for attempt in 0..UNPROCESSED_TRIES {
            if attempt > 0 {
                tokio::time::sleep(std::time::Duration::from_millis(50 << attempt)).await;
            }
            let answer = self
                .client
                .batch_write_item()
                .request_items(table, std::mem::take(&mut requests))
                .send()
                .await
                .map_err(|e| self.error("BatchWriteItem", e))?;
            requests = answer
                .unprocessed_items
                .and_then(|mut left| left.remove(table))
                .unwrap_or_default();
            if requests.is_empty() {
                return Ok(());
            }
        }
        Err(PortError::Transient(format!(
            "BatchWriteItem of the ledger table {table}: {} items left unprocessed",
            requests.len()
        )))
    }

    /// Any number of writes, 25 a call, some calls at once.
    async fn write_all(&self, requests: Vec<WriteRequest>) -> Result<(), PortError> {
        let table = &self.table_name;
        let mut chunks = Vec::new();
        let mut requests = requests.into_iter().peekable();
        while requests.peek().is_some() {
            chunks.push(requests.by_ref().take(WRITE_BATCH).collect::<Vec<_>>());
        }
        let answers: Vec<Result<(), PortError>> = futures::stream::iter(chunks)
            .map(|chunk| self.write_batch(table, chunk))
            .buffer_unordered(CONCURRENT_CALLS)
            .collect()
            .await;
        answers.into_iter().collect()
    }

    /// Any number of consistent reads, 100 keys a call, some calls at once.
    async fn get_all(
        &self,
        keys: Vec<HashMap<String, AttributeValue>>,
    ) -> Result<Vec<HashMap<String, AttributeValue>>, PortError> {
        let table = &self.table_name;
        let named = format!("the ledger table {table}");
        super::dynamodb::get_all(&self.client, (table, &named), keys, None).await
    }
}

fn put_request(item: HashMap<String, AttributeValue>) -> WriteRequest {
    let put = PutRequest::builder().set_item(Some(item));
    WriteRequest::builder()
        .put_request(put.build().expect("an item is set"))
        .build()
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

    async fn referrers(&self, referred: &Referred) -> Result<Vec<IndexRef>, PortError> {
        self.query_referrers(referred).await
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

    async fn seed_refs(&self, index: &IndexRef, refs: &IndexRefs) -> Result<bool, PortError> {
        self.put_refs_if_absent(index, refs).await
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
        let put = self
            .client
            .put_item()
            .table_name(&self.table_name)
            .set_item(Some(item_of(progress)));
        let put = match expected {
            None => put.condition_expression("attribute_not_exists(pk)"),
            Some(version) => put
                .condition_expression("version = :read")
                .expression_attribute_values(":read", AttributeValue::N(version.to_string())),
        };
        self.put_if(put).await
    }
}
