//! Every DynamoDB call of the function, the settings table's and the ledger's alike, through
//! `aws-sdk-dynamodb`. Its retry classifier decides what is tried again (three attempts): the
//! SDK's throttling and transient codes (`ProvisionedThroughputExceededException`, ...), 5xx,
//! and here conflicts between transactions too. What this module adds is the batching the
//! stream's path needs: BatchGetItem 100 keys a call, several at once, the keys an answer
//! leaves unprocessed asked again; TransactWriteItems 100 actions (or 3.5 MB) a call, a
//! cancelled one sent again without the actions whose condition failed.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use aws_sdk_dynamodb::config::interceptors::InterceptorContext;
use aws_sdk_dynamodb::config::retry::{ClassifyRetry, RetryAction};
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{AttributeValue, KeysAndAttributes, TransactWriteItem};
use aws_smithy_runtime_api::client::orchestrator::OrchestratorError;
use futures::StreamExt as _;

use crate::domain::validate::cut;
use crate::ports::PortError;

/// DynamoDB's limit per BatchGetItem call, and tries for the keys a call leaves unprocessed.
const GET_BATCH: usize = 100;
const UNPROCESSED_TRIES: u32 = 5;
/// Calls in flight at once.
pub(crate) const CONCURRENT_CALLS: usize = 8;
/// DynamoDB's limits per TransactWriteItems call: actions, and bytes (4 MB, less a margin).
pub(crate) const TRANSACT_ACTIONS: usize = 100;
const TRANSACT_BYTES: usize = 3_500_000;

/// An item or a key as the SDK takes and gives it.
pub(crate) type SdkItem = HashMap<String, AttributeValue>;

/// The DynamoDB client the SDK configured by `aws` would build, with conflicts between
/// transactions retried beside what the SDK retries of its own, and each attempt given 10 s
/// (3 s to connect) in place of the SDK's stalled-stream watch: an answer is at most 16 MB
/// (BatchGetItem's bound), which a slow link still reads in that time, and the watch costs
/// each answer's reads a timer.
pub(crate) fn client(aws: &aws_config::SdkConfig) -> aws_sdk_dynamodb::Client {
    use aws_sdk_dynamodb::config::timeout::TimeoutConfig;
    use aws_sdk_dynamodb::config::StalledStreamProtectionConfig;
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(3))
        .operation_attempt_timeout(Duration::from_secs(10));
    let config = aws_sdk_dynamodb::config::Builder::from(aws)
        .retry_classifier(TransactionConflicts)
        .timeout_config(timeouts.build())
        .stalled_stream_protection(StalledStreamProtectionConfig::disabled())
        .build();
    aws_sdk_dynamodb::Client::from_conf(config)
}

/// A `TransactionConflictException`, or a transaction cancelled because another one held an
/// item it names, is transient: the same transaction may pass a moment later.
#[derive(Debug)]
struct TransactionConflicts;

impl ClassifyRetry for TransactionConflicts {
    fn classify_retry(&self, ctx: &InterceptorContext) -> RetryAction {
        let Some(Err(error)) = ctx.output_or_error() else {
            return RetryAction::NoActionIndicated;
        };
        let error = OrchestratorError::as_operation_error(error)
            .and_then(|e| e.downcast_ref::<TransactWriteItemsError>());
        match error.is_some_and(is_conflict) {
            true => RetryAction::transient_error(),
            false => RetryAction::NoActionIndicated,
        }
    }

    fn name(&self) -> &'static str {
        "transaction conflicts"
    }
}

/// What a call that failed past the SDK's retries says, as a port error: throttled, failed
/// on DynamoDB's side or on the way, or refused as sent.
pub(crate) fn port_error<E>(operation: &str, table: &str, error: SdkError<E>) -> PortError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    use aws_runtime::retries::classifiers::THROTTLING_ERRORS;
    let code = error.code().map(str::to_owned);
    let said = |e: SdkError<E>| {
        let text = DisplayErrorContext(e).to_string();
        format!("{operation} of table {table}: {}", cut(&text))
    };
    match &error {
        SdkError::ServiceError(_) if THROTTLING_ERRORS.contains(&code.as_deref().unwrap_or("")) => {
            PortError::Throttled(said(error))
        }
        SdkError::ServiceError(_) if code.as_deref() == Some("TransactionConflictException") => {
            PortError::Conflict(said(error))
        }
        SdkError::ServiceError(e) if !e.raw().status().is_server_error() => {
            PortError::Refused(said(error))
        }
        _ => PortError::Unavailable(said(error)),
    }
}

/// The settings table's and the ledger's batch calls, over one SDK client.
#[derive(Clone)]
pub(crate) struct Dynamo {
    client: aws_sdk_dynamodb::Client,
}

impl Dynamo {
    pub(crate) fn new(aws: &aws_config::SdkConfig) -> Self {
        Dynamo {
            client: client(aws),
        }
    }

    pub(crate) fn sdk(&self) -> &aws_sdk_dynamodb::Client {
        &self.client
    }

    /// The items of `keys` (`pk`, `sk`) in `table` that exist (only `projection`, when given),
    /// each handed to `each` as read: 100 keys a consistent BatchGetItem, several at once, the
    /// keys an answer leaves unprocessed asked again.
    pub(crate) async fn get_all(
        &self,
        (table, projection): (&str, Option<&str>),
        keys: Vec<(String, String)>,
        each: &mut (impl FnMut(serde_dynamo::Item) + Send),
    ) -> Result<(), PortError> {
        let mut keys: Vec<SdkItem> = keys.into_iter().map(|(pk, sk)| key(pk, sk)).collect();
        for attempt in 0..UNPROCESSED_TRIES {
            if keys.is_empty() {
                return Ok(());
            }
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
            }
            let mut calls = Vec::with_capacity(keys.len().div_ceil(GET_BATCH));
            while !keys.is_empty() {
                let rest = keys.split_off(keys.len().min(GET_BATCH));
                calls.push(std::mem::replace(&mut keys, rest));
            }
            let mut answers = futures::stream::iter(calls)
                .map(|keys| self.get_batch(table, projection, keys))
                .buffer_unordered(CONCURRENT_CALLS);
            keys = Vec::new();
            while let Some(answer) = answers.next().await {
                let (items, left) = answer?;
                items
                    .into_iter()
                    .map(serde_dynamo::Item::from)
                    .for_each(&mut *each);
                keys.extend(left);
            }
        }
        match keys.is_empty() {
            true => Ok(()),
            false => Err(PortError::Throttled(format!(
                "BatchGetItem of table {table}: {} items left unread",
                keys.len()
            ))),
        }
    }

    /// One BatchGetItem: the items found and the keys left unprocessed.
    async fn get_batch(
        &self,
        table: &str,
        projection: Option<&str>,
        keys: Vec<SdkItem>,
    ) -> Result<(Vec<SdkItem>, Vec<SdkItem>), PortError> {
        let read = KeysAndAttributes::builder()
            .set_keys(Some(keys))
            .consistent_read(true)
            .set_projection_expression(projection.map(str::to_owned))
            .build()
            .map_err(|e| PortError::Invalid(format!("BatchGetItem of table {table}: {e}")))?;
        let mut answer = (self.client.batch_get_item())
            .request_items(table, read)
            .send()
            .await
            .map_err(|e| port_error("BatchGetItem", table, e))?;
        let items = (answer.responses.as_mut()).and_then(|r| r.remove(table));
        let left = (answer.unprocessed_keys.as_mut()).and_then(|u| u.remove(table));
        Ok((
            items.unwrap_or_default(),
            left.map(|l| l.keys).unwrap_or_default(),
        ))
    }

    /// Writes `actions` (no two on one item), 100 a TransactWriteItems, several at once.
    /// Answers the actions (their positions) whose condition failed: nothing of theirs is
    /// written, every other action is (a cancelled transaction is sent again without them).
    pub(crate) async fn transact_all(
        &self,
        table: &str,
        actions: Vec<TransactWriteItem>,
    ) -> Result<BTreeSet<usize>, PortError> {
        let mut chunks: Vec<Vec<(usize, TransactWriteItem)>> = Vec::new();
        let mut bytes = 0;
        for (at, action) in actions.into_iter().enumerate() {
            let size = action_size(&action);
            let full = chunks
                .last()
                .is_none_or(|c| c.len() == TRANSACT_ACTIONS || bytes + size > TRANSACT_BYTES);
            if full {
                chunks.push(Vec::new());
                bytes = 0;
            }
            bytes += size;
            chunks.last_mut().expect("pushed").push((at, action));
        }
        let answers: Vec<Result<Vec<usize>, PortError>> = futures::stream::iter(chunks)
            .map(|chunk| self.transact(table, chunk))
            .buffer_unordered(CONCURRENT_CALLS)
            .collect()
            .await;
        let mut refused = BTreeSet::new();
        for answer in answers {
            refused.extend(answer?);
        }
        Ok(refused)
    }

    async fn transact(
        &self,
        table: &str,
        mut actions: Vec<(usize, TransactWriteItem)>,
    ) -> Result<Vec<usize>, PortError> {
        let mut refused = Vec::new();
        while !actions.is_empty() {
            // Only an action with a condition can be refused alone and the rest sent again:
            // without one, the actions go as they are, uncopied.
            let items = match actions.iter().any(|(_, a)| has_condition(a)) {
                true => actions.iter().map(|(_, a)| a.clone()).collect(),
                false => std::mem::take(&mut actions)
                    .into_iter()
                    .map(|(_, a)| a)
                    .collect(),
            };
            let failed = self.transact_once(table, items).await?;
            if failed.is_empty() {
                return Ok(refused);
            }
            let mut at = 0..;
            actions.retain(|(position, _)| {
                let keep = !failed.contains(&at.next().expect("endless"));
                if !keep {
                    refused.push(*position);
                }
                keep
            });
        }
        Ok(refused)
    }

    /// One transaction, applied whole (answers nothing) or refused for the actions whose
    /// conditions failed (answers their positions).
    pub(crate) async fn transact_once(
        &self,
        table: &str,
        actions: Vec<TransactWriteItem>,
    ) -> Result<BTreeSet<usize>, PortError> {
        let sent = (self.client.transact_write_items()).set_transact_items(Some(actions));
        let error = match sent.send().await {
            Ok(_) => return Ok(BTreeSet::new()),
            Err(error) => error,
        };
        match failed_conditions(&error).filter(|f| !f.is_empty()) {
            Some(failed) => Ok(failed),
            None => Err(transact_error(table, error)),
        }
    }

    /// One item, read consistently (`None`: there is none).
    pub(crate) async fn get_one(
        &self,
        table: &str,
        key: SdkItem,
    ) -> Result<Option<serde_dynamo::Item>, PortError> {
        let answer = (self.client.get_item())
            .table_name(table)
            .set_key(Some(key))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| port_error("GetItem", table, e))?;
        Ok(answer.item.map(serde_dynamo::Item::from))
    }

    /// Every item of partition `pk`, read consistently, page after page.
    pub(crate) async fn partition(
        &self,
        table: &str,
        pk: String,
    ) -> Result<Vec<serde_dynamo::Item>, PortError> {
        let items = (self.client.query())
            .table_name(table)
            .key_condition_expression("pk = :pk")
            .expression_attribute_values(":pk", AttributeValue::S(pk))
            .consistent_read(true)
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(|e| port_error("Query", table, e))?;
        Ok(items.into_iter().map(serde_dynamo::Item::from).collect())
    }
}

impl Dynamo {
    /// One consistent Scan request of `table` from after `start` (`pk`, `sk`), reading `limit`
    /// items at most, answering those `filter` keeps and where the next request starts
    /// (`None`: the table's end).
    pub(crate) async fn scan_page(
        &self,
        (table, filter, values): (&str, &str, SdkItem),
        start: Option<(String, String)>,
        limit: usize,
    ) -> Result<(Vec<serde_dynamo::Item>, Option<(String, String)>), PortError> {
        let page = (self.client.scan())
            .table_name(table)
            .filter_expression(filter)
            .set_expression_attribute_values(Some(values))
            .consistent_read(true)
            .set_exclusive_start_key(start.map(|(pk, sk)| key(pk, sk)))
            .limit(i32::try_from(limit).unwrap_or(i32::MAX))
            .send()
            .await
            .map_err(|e| port_error("Scan", table, e))?;
        let next = page.last_evaluated_key.and_then(|last| {
            let string = |name: &str| last.get(name)?.as_s().ok().cloned();
            string("pk").zip(string("sk"))
        });
        let items = page.items.unwrap_or_default().into_iter();
        Ok((items.map(serde_dynamo::Item::from).collect(), next))
    }
}

/// A table key: `pk` and `sk` strings.
pub(crate) fn key(pk: String, sk: impl Into<String>) -> SdkItem {
    HashMap::from([
        ("pk".to_owned(), AttributeValue::S(pk)),
        ("sk".to_owned(), AttributeValue::S(sk.into())),
    ])
}

/// The positions of the actions whose condition failed, when a transaction was cancelled
/// (`None`: another refusal).
fn failed_conditions(error: &SdkError<TransactWriteItemsError>) -> Option<BTreeSet<usize>> {
    let TransactWriteItemsError::TransactionCanceledException(cancelled) =
        error.as_service_error()?
    else {
        return None;
    };
    let reasons = cancelled.cancellation_reasons().iter().enumerate();
    let failed = reasons.filter(|(_, r)| r.code() == Some("ConditionalCheckFailed"));
    Some(failed.map(|(at, _)| at).collect())
}

/// Whether another transaction held an item this one names: a `TransactionConflictException`,
/// or a transaction cancelled for a `TransactionConflict`.
fn is_conflict(error: &TransactWriteItemsError) -> bool {
    match error {
        TransactWriteItemsError::TransactionCanceledException(cancelled) => {
            let reasons = cancelled.cancellation_reasons().iter();
            reasons
                .filter_map(|r| r.code())
                .any(|code| code == "TransactionConflict")
        }
        other => other.code() == Some("TransactionConflictException"),
    }
}

/// A transaction's failure as a port error: a conflict ([`is_conflict`]) says so.
fn transact_error(table: &str, error: SdkError<TransactWriteItemsError>) -> PortError {
    let conflict = error.as_service_error().is_some_and(is_conflict);
    match port_error("TransactWriteItems", table, error) {
        error if conflict => PortError::Conflict(error.reason().to_owned()),
        error => error,
    }
}

fn has_condition(action: &TransactWriteItem) -> bool {
    let put = action.put().and_then(|p| p.condition_expression());
    let update = action.update().and_then(|u| u.condition_expression());
    let delete = action.delete().and_then(|d| d.condition_expression());
    put.or(update).or(delete).is_some()
}

/// About what an action weighs against the transaction's 4 MB: its names and values.
fn action_size(action: &TransactWriteItem) -> usize {
    let items = [
        action.put().map(|p| p.item()),
        action.put().and_then(|p| p.expression_attribute_values()),
        action.update().map(|u| u.key()),
        action
            .update()
            .and_then(|u| u.expression_attribute_values()),
        action.delete().map(|d| d.key()),
        action
            .delete()
            .and_then(|d| d.expression_attribute_values()),
    ];
    let item_size = |item: &SdkItem| -> usize {
        item.iter()
            .map(|(name, value)| name.len() + value_size(value))
            .sum()
    };
    items.into_iter().flatten().map(item_size).sum::<usize>() + 100
}

fn value_size(value: &AttributeValue) -> usize {
    match value {
        AttributeValue::S(s) | AttributeValue::N(s) => s.len(),
        AttributeValue::Ss(set) | AttributeValue::Ns(set) => set.iter().map(|s| s.len() + 4).sum(),
        _ => 8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_dynamodb::error::ErrorMetadata;
    use aws_sdk_dynamodb::operation::get_item::GetItemError;
    use aws_smithy_runtime_api::http::{Response, StatusCode};
    use aws_smithy_types::body::SdkBody;

    /// DynamoDB's answer `status` with error `code`, as the SDK gives it back past its retries.
    fn answered(status: u16, code: &str) -> SdkError<GetItemError> {
        let metadata = ErrorMetadata::builder().code(code).message("m").build();
        let status = StatusCode::try_from(status).unwrap();
        SdkError::service_error(
            GetItemError::generic(metadata),
            Response::new(status, SdkBody::empty()),
        )
    }

    #[test]
    fn an_sdk_error_says_throttled_conflict_refused_or_unavailable() {
        let kind = |error| match port_error("GetItem", "t", error) {
            PortError::Throttled(_) => "throttled",
            PortError::Refused(_) => "refused",
            PortError::Unavailable(_) => "unavailable",
            PortError::Conflict(_) => "conflict",
            other => panic!("{other:?}"),
        };
        assert_eq!(
            kind(answered(400, "TransactionConflictException")),
            "conflict"
        );
        assert_eq!(
            kind(answered(400, "ProvisionedThroughputExceededException")),
            "throttled"
        );
        assert_eq!(kind(answered(400, "ThrottlingException")), "throttled");
        assert_eq!(
            kind(answered(400, "ItemCollectionSizeLimitExceededException")),
            "refused"
        );
        assert_eq!(kind(answered(400, "ValidationException")), "refused");
        assert_eq!(kind(answered(500, "InternalServerError")), "unavailable");
        let error = port_error("GetItem", "settings", answered(400, "ValidationException"));
        assert!(
            error.reason().starts_with("GetItem of table settings: "),
            "{error}"
        );
        assert!(
            error.is_transient(),
            "a refusal leaves the record for Lambda's retry"
        );
    }

    #[test]
    fn a_transaction_cancelled_by_another_is_a_conflict_and_by_a_condition_is_not() {
        use aws_sdk_dynamodb::types::error::TransactionCanceledException;
        use aws_sdk_dynamodb::types::CancellationReason;
        let cancelled = |codes: &[&str]| {
            let reasons = codes
                .iter()
                .map(|c| CancellationReason::builder().code(*c).build());
            let cancelled = TransactionCanceledException::builder()
                .set_cancellation_reasons(Some(reasons.collect()))
                .build();
            SdkError::service_error(
                TransactWriteItemsError::TransactionCanceledException(cancelled),
                Response::new(StatusCode::try_from(400).unwrap(), SdkBody::empty()),
            )
        };
        let error = transact_error("ledger", cancelled(&["None", "TransactionConflict"]));
        assert!(
            matches!(error, PortError::Conflict(_)) && error.is_transient(),
            "{error}"
        );
        let error = transact_error("ledger", cancelled(&["ValidationError"]));
        assert!(matches!(error, PortError::Refused(_)), "{error}");
    }
}
