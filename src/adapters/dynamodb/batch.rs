//! Consistent BatchGetItems through the SDK, for the operators' reads of the settings table (the
//! stream's reads and the ledger's go without the SDK: `raw.rs`).

use std::collections::HashMap;

use aws_sdk_dynamodb::types::{AttributeValue, KeysAndAttributes};
use futures::StreamExt as _;

use crate::ports::PortError;

/// DynamoDB's limit per BatchGetItem call, and tries for the keys a call leaves unprocessed.
pub(super) const GET_BATCH: usize = 100;
pub(crate) const UNPROCESSED_TRIES: u32 = 5;
/// BatchGetItems in flight at once.
pub(super) const CONCURRENT_GETS: usize = 8;

/// One consistent BatchGetItem of at most 100 keys of `table` (its name, and how errors name
/// it), its unprocessed keys tried again: the settings table's and the ledger's.
async fn batch_get(
    client: &aws_sdk_dynamodb::Client,
    (table, named): (&str, &str),
    mut wanted: Vec<HashMap<String, AttributeValue>>,
    projection: Option<&str>,
) -> Result<Vec<HashMap<String, AttributeValue>>, PortError> {
    let mut found = Vec::new();
    for attempt in 0..UNPROCESSED_TRIES {
        if wanted.is_empty() {
            return Ok(found);
        }
        if attempt > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(50 << attempt)).await;
        }
        let request = KeysAndAttributes::builder()
            .set_keys(Some(std::mem::take(&mut wanted)))
            .set_projection_expression(projection.map(str::to_owned))
            .consistent_read(true)
            .build()
            .expect("keys are set");
        let answer = client
            .batch_get_item()
            .request_items(table, request)
            .send()
            .await
            .map_err(|e| {
                let e = aws_sdk_dynamodb::error::DisplayErrorContext(e);
                PortError::Transient(format!("BatchGetItem of {named}: {e}"))
            })?;
        found.extend(
            answer
                .responses
                .and_then(|mut r| r.remove(table))
                .unwrap_or_default(),
        );
        wanted = (answer.unprocessed_keys)
            .and_then(|mut left| left.remove(table))
            .map(|k| k.keys)
            .unwrap_or_default();
    }
    match wanted.is_empty() {
        true => Ok(found),
        false => Err(PortError::Transient(format!(
            "BatchGetItem of {named}: {} items left unread",
            wanted.len()
        ))),
    }
}

/// Any number of consistent reads of `table`, 100 keys a call, some calls at once.
pub(crate) async fn get_all(
    client: &aws_sdk_dynamodb::Client,
    (table, named): (&str, &str),
    keys: Vec<HashMap<String, AttributeValue>>,
    projection: Option<&str>,
) -> Result<Vec<HashMap<String, AttributeValue>>, PortError> {
    let mut chunks = Vec::new();
    let mut keys = keys.into_iter().peekable();
    while keys.peek().is_some() {
        chunks.push(keys.by_ref().take(GET_BATCH).collect::<Vec<_>>());
    }
    let pages: Vec<Result<Vec<_>, PortError>> = futures::stream::iter(chunks)
        .map(|chunk| batch_get(client, (table, named), chunk, projection))
        .buffer_unordered(CONCURRENT_GETS)
        .collect()
        .await;
    let mut items = Vec::new();
    for page in pages {
        items.extend(page?);
    }
    Ok(items)
}
