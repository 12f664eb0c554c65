//! A DynamoDB stream batch (`{"Records": [...]}`, as Lambda hands it over) read into
//! `aws_lambda_events`' stream records, every way it can be read, in this one room: serde in
//! one pass; then, when a record is malformed, record by record, so that it is refused alone,
//! saying where it went wrong. Each record goes to the caller as soon as it is read: the batch
//! is only ever held as what the caller makes of it.

use std::borrow::Cow;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::domain::validate::cut;
pub use aws_lambda_events::event::dynamodb::EventRecord as StreamRecord;

/// What the record's old image says of the shop: `None` without an old image, `Some(None)` for
/// one without a shop (an empty shop id is none).
pub fn old_shop(record: &StreamRecord) -> Option<Option<&str>> {
    let old = &record.change.old_image;
    (!old.is_empty())
        .then(|| super::string_attribute(old, "shop_id").filter(|shop| !shop.is_empty()))
}

/// Whether the record's stream carries old images: one without had no previous item.
pub fn carries_old_images(record: &StreamRecord) -> bool {
    use aws_lambda_events::event::dynamodb::StreamViewType;
    matches!(
        record.change.stream_view_type,
        Some(StreamViewType::NewAndOldImages | StreamViewType::OldImage)
    )
}

/// A record that is not a DynamoDB stream record: why, and its sequence number if it has one.
#[derive(Debug, Clone, PartialEq)]
pub struct BadRecord {
    pub sequence_number: Option<String>,
    pub reason: String,
}

/// A stream batch's records, each handed to `each` as it is read, in stream order. `None`:
/// the payload is not a stream batch (no `Records` array).
pub fn read_stream_batch<T>(
    payload: &str,
    each: impl Fn(Result<StreamRecord, BadRecord>) -> T,
) -> Option<Vec<T>> {
    let mut json = serde_json::Deserializer::from_str(payload);
    let read = Route(RecordsSeed { each: &each }).deserialize(&mut json);
    if let (Ok(Some(records)), Ok(())) = (read, json.end()) {
        return Some(records);
    }
    // A batch with a malformed record: read again record by record, each with its reason.
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

/// Routes on the top-level `Records` key, reading a batch's records as they come.
struct Route<'e, F>(RecordsSeed<'e, F>);

impl<'de, T, F: Fn(Result<StreamRecord, BadRecord>) -> T> DeserializeSeed<'de> for Route<'_, F> {
    type Value = Option<Vec<T>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de, T, F: Fn(Result<StreamRecord, BadRecord>) -> T> Visitor<'de> for Route<'_, F> {
    type Value = Option<Vec<T>>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut records = None;
        let mut seed = Some(self.0);
        while let Some(key) = map.next_key::<Cow<str>>()? {
            match seed.take_if(|_| key == "Records") {
                Some(seed) => records = Some(map.next_value_seed(seed)?),
                None => map.next_value::<IgnoredAny>().map(drop)?,
            }
        }
        Ok(records)
    }
}

/// A batch's `Records` array, each record handed on as it is read: one pass over the payload.
/// A malformed record fails the whole read; [`read_stream_batch`] then reads record by record.
struct RecordsSeed<'e, F> {
    each: &'e F,
}

impl<'de, T, F: Fn(Result<StreamRecord, BadRecord>) -> T> DeserializeSeed<'de>
    for RecordsSeed<'_, F>
{
    type Value = Vec<T>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de, T, F: Fn(Result<StreamRecord, BadRecord>) -> T> Visitor<'de> for RecordsSeed<'_, F> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an array of DynamoDB stream records")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut records = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(record) = seq.next_element::<StreamRecord>()? {
            records.push((self.each)(Ok(record)));
        }
        Ok(records)
    }
}
