//! A DynamoDB stream batch (`{"Records": [...]}`, as Lambda hands it over) read into
//! `aws_lambda_events`' stream records through serde, record by record, so that a malformed
//! one is refused alone, saying where it went wrong. Each record goes to the caller as soon as
//! it is read: the batch is only ever held as what the caller makes of it.

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::domain::validate::cut;
pub use aws_lambda_events::event::dynamodb::EventRecord as StreamRecord;

/// A record that is not a DynamoDB stream record: why, and its sequence number if it has one.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRecord {
    pub sequence_number: Option<String>,
    pub reason: String,
}

/// A stream batch's records, each handed to `each` as it is read, in stream order. `None`:
/// the payload is not a stream batch (no `Records` array). Each record is read from its own
/// text, so that a malformed one is refused alone.
pub fn read_stream_batch<T>(
    payload: &str,
    each: impl Fn(Result<StreamRecord, BadRecord>) -> T,
) -> Option<Vec<T>> {
    let batch = serde_json::from_str::<Batch>(payload).ok()?;
    let records = batch.records?.into_iter();
    Some(
        records
            .map(|raw| each(read_stream_record(raw.get())))
            .collect(),
    )
}

/// One record read through serde. Never panics: a record that cannot be read says where.
pub fn read_stream_record(raw: &str) -> Result<StreamRecord, BadRecord> {
    // The fast path tracks no path; only a record that fails is read again, to say where.
    let tracked = || {
        let mut json = serde_json::Deserializer::from_str(raw);
        serde_path_to_error::deserialize::<_, StreamRecord>(&mut json)
    };
    serde_json::from_str(raw)
        .or_else(|_| tracked())
        .map_err(|e| {
            // Only a bad record pays for a JSON tree: its sequence number, if it has one.
            let sequence_number =
                (serde_json::from_str::<serde_json::Value>(raw).ok()).and_then(|v| {
                    Some(cut(v.pointer("/dynamodb/SequenceNumber")?.as_str()?).into_owned())
                });
            let reason = format!(
                "not a DynamoDB stream record: `{}`: {}",
                cut(&e.path().to_string()),
                cut(&e.inner().to_string())
            );
            BadRecord {
                sequence_number,
                reason,
            }
        })
}

/// A stream batch's records, borrowed from the payload without building a JSON tree.
#[derive(Deserialize)]
struct Batch<'a> {
    #[serde(borrow, rename = "Records")]
    records: Option<Vec<&'a RawValue>>,
}
