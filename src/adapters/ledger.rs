//! The export ledger, the function's own DynamoDB table (`LEDGER_TABLE_NAME`; `pk`, `sk`
//! strings). For now it holds one item, where a scheduled reconcile stands
//! (`pk = "reconcile"`, `sk = "progress"`); every write is conditional on the version read, so
//! two invocations never both take a pass.

use std::collections::HashMap;

use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::put_item::PutItemError;
use aws_sdk_dynamodb::types::AttributeValue;

use crate::ports::{no_ledger, Ledger, PortError, ReconcileProgress};

const PROGRESS_PK: &str = "reconcile";
const PROGRESS_SK: &str = "progress";

pub struct DynamoLedger {
    client: aws_sdk_dynamodb::Client,
    /// `None`: not configured; what needs the ledger fails, saying so.
    table_name: Option<String>,
}

impl DynamoLedger {
    pub fn new(client: aws_sdk_dynamodb::Client, table_name: Option<String>) -> Self {
        Self { client, table_name }
    }

    fn table(&self) -> Result<&str, PortError> {
        self.table_name.as_deref().ok_or_else(no_ledger)
    }

    fn error(&self, operation: &str, e: impl std::error::Error) -> PortError {
        PortError::Transient(format!(
            "{operation} of the ledger table {}: {}",
            self.table_name.as_deref().unwrap_or("?"),
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

impl Ledger for DynamoLedger {
    async fn reconcile_progress(&self) -> Result<Option<ReconcileProgress>, PortError> {
        let answer = self
            .client
            .get_item()
            .table_name(self.table()?)
            .key("pk", AttributeValue::S(PROGRESS_PK.into()))
            .key("sk", AttributeValue::S(PROGRESS_SK.into()))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| self.error("GetItem", e))?;
        Ok(answer.item.as_ref().map(progress_of))
    }

    async fn save_reconcile_progress(
        &self,
        progress: &ReconcileProgress,
        expected: Option<u64>,
    ) -> Result<bool, PortError> {
        let put = self
            .client
            .put_item()
            .table_name(self.table()?)
            .set_item(Some(item_of(progress)));
        let put = match expected {
            None => put.condition_expression("attribute_not_exists(pk)"),
            Some(version) => put
                .condition_expression("version = :read")
                .expression_attribute_values(":read", AttributeValue::N(version.to_string())),
        };
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
}
