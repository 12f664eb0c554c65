//! Step 2 of the pipeline: DynamoDB stream records become the items that changed (each as the
//! remove of its item, until the batch reads the item as it is now), one per record, in stream
//! order. Nothing here talks to a server.

pub use crate::domain::{Change, ChangeRecord};

use crate::domain::kv::{check_key, KvKey};
use crate::domain::validate::shown;
use crate::domain::{IndexRef, Outcome};
use crate::dynamo::stream::{self, BadRecord, StreamRecord};
use crate::dynamo::{self, string_attribute, SortKey};
use crate::ports::PortError;

/// DynamoDB's limit on a sort key. A partition key (the account) is bounded by the index's own
/// KV key (512 bytes), far below its 2,048.
const MAX_SORT_KEY_BYTES: usize = 1024;

impl ChangeRecord {
    /// The record ends as `error` says when what it needs could not be read (reported for
    /// retry when it is transient), unless it had already ended.
    pub fn unread(mut self, error: &PortError) -> ChangeRecord {
        if self.change.is_some() {
            self.end(Outcome::of_port_error(error, ""));
        }
        self
    }
}

fn skip<C>(reason: impl Into<String>) -> Result<C, Outcome> {
    Err(Outcome::Skipped(reason.into()))
}

fn reject<C>(reason: impl Into<String>) -> Result<C, Outcome> {
    Err(Outcome::Rejected(reason.into()))
}

/// What every record of a batch is checked against while it is decoded.
#[derive(Clone, Copy, Debug)]
pub struct Expected<'s> {
    /// Sort key of the default configs, never exported.
    pub default_configs_sk: &'s str,
    /// The settings table's stream: a record from any other source is rejected. `None`
    /// (tests and tools, never the function) accepts any.
    pub stream_arn: Option<&'s str>,
}

impl<'s> From<&'s str> for Expected<'s> {
    fn from(default_configs_sk: &'s str) -> Self {
        Self {
            default_configs_sk,
            stream_arn: None,
        }
    }
}

/// A stream batch's records, in stream order, each decoded as it is read (`None`: the payload
/// is not a stream batch). How the batch is read is `dynamo::stream`'s business.
pub fn decode_batch<'s>(
    payload: &str,
    expected: impl Into<Expected<'s>>,
) -> Option<Vec<ChangeRecord>> {
    let expected = expected.into();
    stream::read_stream_batch(payload, |record| from_stream(record, expected))
}

/// Decodes one raw record of a `{"Records": [...]}` batch. Never fails: a record that cannot
/// be read is rejected with the reason.
pub fn decode_record<'s>(raw: &str, expected: impl Into<Expected<'s>>) -> ChangeRecord {
    from_stream(stream::read_stream_record(raw), expected.into())
}

/// A stream record exported as its own `NewImage` says (absent: as a remove), for tests, tools
/// and fuzzing without a table; the function reads the item from the table instead.
pub fn decode_as_written<'s>(raw: &str, expected: impl Into<Expected<'s>>) -> ChangeRecord {
    let expected = expected.into();
    let record = decode_record(raw, expected);
    // The item is its image with the record's keys (a stream image holds them too).
    let image = serde_json::from_str::<serde_json::Value>(raw)
        .ok()
        .and_then(|raw| {
            let mut image = raw.get("dynamodb")?.get("NewImage")?.as_object()?.clone();
            image.extend(raw["dynamodb"].get("Keys")?.as_object()?.clone());
            dynamo::item_from_dynamodb_json(image.into()).ok()
        });
    let now = image.map(|item| dynamo::table_record(&item, expected.default_configs_sk).0);
    record.as_now(now.as_ref())
}

fn from_stream(record: Result<StreamRecord, BadRecord>, expected: Expected) -> ChangeRecord {
    match record {
        Ok(record) => change_record(&record, expected),
        Err(bad) => ChangeRecord {
            sequence_number: bad.sequence_number,
            ..ChangeRecord::of(None, reject(bad.reason))
        },
    }
}

fn change_record(record: &StreamRecord, expected: Expected) -> ChangeRecord {
    let change = &record.change;
    let (index, decoded) = match from_elsewhere(record, expected) {
        Some(reason) => (None, reject(reason)),
        None => decode_change(record, expected.default_configs_sk),
    };
    ChangeRecord {
        sequence_number: change.sequence_number.clone(),
        created_at: Some(change.approximate_creation_date_time.timestamp_millis() as f64 / 1000.0)
            .filter(|secs| *secs > 0.0),
        ..ChangeRecord::of(index, decoded)
    }
}

/// Why a record is not from the settings table's stream, if it is not: anyone allowed to
/// invoke the function could otherwise forge changes.
fn from_elsewhere(record: &StreamRecord, expected: Expected) -> Option<String> {
    let wanted = expected.stream_arn?;
    match record.event_source_arn.as_deref() {
        Some(arn) if arn == wanted => None,
        Some(arn) => Some(format!(
            "eventSourceARN {} is not this function's stream ({wanted})",
            shown(arn)
        )),
        None => Some(format!(
            "the record has no eventSourceARN; only records of {wanted} are exported"
        )),
    }
}

/// The index the record is about (when its keys tell) and the change its item makes when the
/// table no longer holds it.
fn decode_change(
    record: &StreamRecord,
    default_configs_sk: &str,
) -> (Option<IndexRef>, Result<Change, Outcome>) {
    let change = &record.change;
    let keys = &change.keys;
    let (Some(pk), Some(sk)) = (string_attribute(keys, "pk"), string_attribute(keys, "sk")) else {
        let reason = "the record's keys must hold string `pk` and `sk`";
        return (None, reject(reason));
    };
    let (index, query) = match SortKey::parse(sk, default_configs_sk) {
        SortKey::DefaultConfigs => return (None, skip("default configs are never exported")),
        SortKey::Foreign => {
            let reason = format!("sort key {} is not an index record", shown(sk));
            return (None, skip(reason));
        }
        SortKey::Index(index) => (index, None),
        SortKey::Query { index, query } => (index, Some(query)),
    };
    if pk.is_empty() || index.is_empty() {
        let reason = format!(
            "empty account or index name in pk {}, sk {}",
            shown(pk),
            shown(sk)
        );
        return (None, reject(reason));
    }
    let index = IndexRef::new(pk, index);
    // An index whose own key Cloudflare would refuse never had anything in KV: its record
    // touches nothing, no ledger item included (its keys there could be over DynamoDB's limits).
    if let Err(why) = check_key(&KvKey::index(&index).key) {
        let reason = format!("the index id is not a KV key Cloudflare accepts ({why})");
        return (None, reject(reason));
    }
    // Nor an item no table could hold (only a forged record names one): the batch's read of its
    // records' items would be refused whole.
    if sk.len() > MAX_SORT_KEY_BYTES {
        let reason = format!(
            "sort key {} is over DynamoDB's 1,024 bytes: no table item has it",
            shown(sk)
        );
        return (None, reject(reason));
    }
    let event_name = record.event_name.as_str();
    if !matches!(event_name, "INSERT" | "MODIFY" | "REMOVE") {
        let reason = format!(
            "unknown eventName {} (expected INSERT, MODIFY or REMOVE)",
            shown(event_name)
        );
        return (Some(index), Err(Outcome::Rejected(reason)));
    }
    let removed = match query {
        None => Change::RemoveIndex {
            index: index.clone(),
        },
        Some(query) => Change::RemoveQuery {
            index: index.clone(),
            query,
        },
    };
    (Some(index), Ok(removed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_item(item: serde_dynamo::Item, sk: &str, include: bool) -> ChangeRecord {
        let key = dynamo::table_key(&item).unwrap();
        dynamo::table_record(&item, sk).0.asked(&key, include)
    }
    use serde_json::json;

    /// Decodes a record given as a JSON value.
    fn decode_record(raw: serde_json::Value, default_configs_sk: &str) -> ChangeRecord {
        super::decode_record(&raw.to_string(), default_configs_sk)
    }

    fn record(event_name: &str, sk: &str, new_image: serde_json::Value) -> serde_json::Value {
        json!({
            "eventID": "1", "eventName": event_name, "eventVersion": "1.1",
            "eventSource": "aws:dynamodb", "awsRegion": "eu-west-1",
            "dynamodb": {
                "ApproximateCreationDateTime": 1700000000.0,
                "Keys": {"pk": {"S": "acct-1"}, "sk": {"S": sk}},
                "NewImage": new_image,
                "SequenceNumber": "100", "SizeBytes": 10, "StreamViewType": "NEW_IMAGE"
            }
        })
    }

    #[test]
    fn default_configs_and_foreign_keys_are_skipped() {
        let skipped = decode_record(
            record("MODIFY", "DEFAULT_CONFIGS", json!({})),
            "DEFAULT_CONFIGS",
        );
        assert!(matches!(skipped.outcome, Outcome::Skipped(_)));
        let foreign = decode_record(record("MODIFY", "OTHER#x", json!({})), "DEFAULT_CONFIGS");
        assert!(matches!(foreign.outcome, Outcome::Skipped(_)));
    }

    /// A settings record decodes as its index's removal whatever its view type: the shops the
    /// index was on come from the ledger, never from an old image.
    #[test]
    fn a_settings_record_decodes_as_its_index_s_removal_whatever_its_images() {
        let removal = Some(Change::RemoveIndex {
            index: IndexRef::new("acct-1", "products"),
        });
        let mut raw = record("REMOVE", "INDEX#products", json!(null));
        raw["dynamodb"].as_object_mut().unwrap().remove("NewImage");
        let decoded = decode_record(raw, "DEFAULT_CONFIGS");
        assert_eq!(decoded.change, removal);
        assert_eq!(decoded.sequence_number.as_deref(), Some("100"));
        let mut raw = record("MODIFY", "INDEX#products", json!({}));
        raw["dynamodb"]["OldImage"] = json!({"shop_id": {"S": "shop-old"}});
        raw["dynamodb"]["StreamViewType"] = json!("NEW_AND_OLD_IMAGES");
        assert_eq!(decode_record(raw, "D").change, removal);
    }

    #[test]
    fn unknown_event_names_and_garbage_are_rejected_with_a_reason() {
        let odd = decode_record(
            record(
                "UPSERT",
                "INDEX#p",
                json!({"index_endpoint": {"S": "https://u"}}),
            ),
            "D",
        );
        assert!(matches!(odd.outcome, Outcome::Rejected(ref r) if r.contains("UPSERT")));
        let garbage = decode_record(
            json!({"dynamodb": {"SequenceNumber": "7"}, "eventName": 3}),
            "D",
        );
        assert!(matches!(garbage.outcome, Outcome::Rejected(_)));
        assert_eq!(garbage.sequence_number.as_deref(), Some("7"));
    }

    #[test]
    fn table_items_decode_like_stream_images() {
        let item = |sk: &str, extra: serde_json::Value| {
            let mut item = json!({"pk": {"S": "acct-1"}, "sk": {"S": sk}});
            item.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            crate::dynamo::item_from_dynamodb_json(item).unwrap()
        };
        let settings = decode_item(
            item("INDEX#p", json!({"index_endpoint": {"S": "https://u"}})),
            "D",
            false,
        );
        assert!(matches!(settings.change, Some(Change::UpsertIndex { .. })));
        let query = item("INDEX#p#QUERY#q", json!({"query_config": {"M": {}}}));
        assert!(matches!(
            decode_item(query.clone(), "D", false).outcome,
            Outcome::Skipped(_)
        ));
        assert!(matches!(
            decode_item(query, "D", true).change,
            Some(Change::UpsertQuery(_))
        ));
        assert!(matches!(
            decode_item(item("D", json!({})), "D", true).outcome,
            Outcome::Skipped(_)
        ));
        let broken = decode_item(item("INDEX#p", json!({})), "D", true);
        assert!(matches!(broken.outcome, Outcome::Rejected(ref r) if r.contains("index_endpoint")));
        assert_eq!(broken.index, Some(IndexRef::new("acct-1", "p")));
    }

    /// A batch read as the handler reads it.
    fn read_batch<'s>(
        payload: &str,
        expected: impl Into<Expected<'s>>,
    ) -> Option<Vec<ChangeRecord>> {
        decode_batch(payload, expected)
    }

    #[test]
    fn every_sample_event_reads_as_a_batch_of_well_formed_records() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/events");
        let mut read = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            let value: serde_json::Value = serde_json::from_str(&text).unwrap();
            let Some(records) = value["Records"].as_array() else {
                continue;
            };
            let batch = read_batch(&text, "DEFAULT_CONFIGS").expect("a stream batch");
            assert_eq!(batch.len(), records.len());
            for record in &batch {
                let malformed = matches!(&record.outcome,
                    Outcome::Rejected(r) if r.contains("not a DynamoDB stream record"));
                assert!(!malformed, "{record:?}");
                assert!(record.sequence_number.is_some(), "{record:?}");
            }
            read += records.len();
        }
        assert!(read >= 10, "{read} sample records");
    }

    #[test]
    fn a_malformed_record_is_rejected_alone_beside_the_good_ones() {
        let mut odd = record(
            "MODIFY",
            "INDEX#p",
            json!({"index_endpoint": {"S": "https://u/\"é"}}),
        );
        odd["eventName"] = json!(null);
        odd["dynamodb"]["ApproximateCreationDateTime"] = json!(null);
        odd["dynamodb"]["OldImage"] = json!({"shop_id": {"S": "old"}, "x": [1, {"y": null}]});
        let good = record(
            "INSERT",
            "INDEX#p",
            json!({"index_endpoint": {"S": "https://u"}}),
        );
        let malformed = [
            r#"{"eventName": "INSERT", "eventName": "MODIFY", "dynamodb": {}}"#,
            r#"{"eventName": "INSERT"}"#,
            r#"{"dynamodb": {"Keys": {}, "Keys": {}}}"#,
            r#"{"dynamodb": {"ApproximateCreationDateTime": "1"}}"#,
            r#"{"dynamodb": {"NewImage": {"a": {"N": 1}}}}"#,
            r#"["INSERT", {}]"#,
        ];
        for bad in malformed {
            let batch = format!("{{\"Records\": [{odd}, {bad}, {good}]}}");
            let read = read_batch(&batch, "D").expect("a stream batch");
            let expected = [&odd.to_string(), bad, &good.to_string()]
                .map(|raw| super::decode_record(raw, "D"));
            assert_eq!(read, expected, "{bad}");
            assert!(matches!(read[1].outcome, Outcome::Rejected(_)), "{bad}");
            assert!(read[2].change.is_some(), "{bad}");
        }
        assert_eq!(read_batch(r#"{"Records": [], "x": 1}"#, "D"), Some(vec![]));
        assert_eq!(read_batch(r#"{"Records": []} x"#, "D"), None);
        assert_eq!(read_batch(r#"{"Records": []}"#, "D"), Some(vec![]));
    }

    #[test]
    fn a_record_s_new_image_is_never_read_its_item_decides() {
        let bad_image = json!({"index_endpoint": {"S": "http://not-https"}});
        let no_image = record("MODIFY", "INDEX#p", json!(null));
        let changed = Change::RemoveIndex {
            index: IndexRef::new("acct-1", "p"),
        };
        for raw in [record("MODIFY", "INDEX#p", bad_image), no_image] {
            let decoded = decode_record(raw, "D");
            assert_eq!(decoded.change, Some(changed.clone()));
            let item = crate::dynamo::item_from_dynamodb_json(json!({"pk": {"S": "acct-1"},
                "sk": {"S": "INDEX#p"}, "index_endpoint": {"S": "https://idx"}}))
            .unwrap();
            let now = dynamo::table_record(&item, "D").0;
            let now = decoded.clone().as_now(Some(&now));
            assert!(
                matches!(&now.change,
                Some(Change::UpsertIndex { settings, .. })
                    if settings.index_url == "https://idx"),
                "{:?}",
                now
            );
            let gone = decoded.as_now(None);
            assert!(matches!(gone.change, Some(Change::RemoveIndex { .. })));
        }
    }

    #[test]
    fn records_from_another_source_are_rejected_when_the_stream_is_known() {
        const OURS: &str = "arn:aws:dynamodb:eu-west-1:1:table/t/stream/1";
        let expected = Expected {
            default_configs_sk: "D",
            stream_arn: Some(OURS),
        };
        let image = json!({"index_endpoint": {"S": "https://idx"}});
        let from = |arn: Option<&str>| {
            let mut raw = record("INSERT", "INDEX#p", image.clone());
            if let Some(arn) = arn {
                raw["eventSourceARN"] = json!(arn);
            }
            raw.to_string()
        };
        let ours = from(Some(OURS));
        let forged = from(Some("arn:aws:dynamodb:eu-west-1:666:table/x/stream/1"));
        let unsigned = from(None);
        for (raw, accepted) in [(&ours, true), (&forged, false), (&unsigned, false)] {
            let batch = format!("{{\"Records\": [{raw}]}}");
            for decoded in [
                super::decode_record(raw, expected),
                read_batch(&batch, expected).unwrap().remove(0),
            ] {
                assert_eq!(
                    decoded.change.is_some(),
                    accepted,
                    "{raw}: {:?}",
                    decoded.outcome
                );
                if !accepted {
                    assert!(
                        matches!(&decoded.outcome, Outcome::Rejected(r) if r.contains("eventSourceARN")),
                        "{:?}",
                        decoded.outcome
                    );
                    assert_eq!(decoded.sequence_number.as_deref(), Some("100"));
                }
            }
        }
        // Tests and tools that name no stream accept any source.
        assert!(super::decode_record(&forged, "D").change.is_some());
    }

    #[test]
    fn an_endpoint_that_is_not_an_https_url_rejects_the_record() {
        for endpoint in [
            "http://idx.example",
            "idx.example",
            "https://user:pw@idx.example",
        ] {
            let raw = record(
                "INSERT",
                "INDEX#p",
                json!({"index_endpoint": {"S": endpoint}}),
            );
            let decoded = decode_as_written(&raw.to_string(), "D");
            assert!(
                matches!(&decoded.outcome, Outcome::Rejected(r)
                    if r.contains("index_endpoint") && r.contains("not an https URL")),
                "{endpoint}: {:?}",
                decoded.outcome
            );
        }
    }

    #[test]
    fn a_huge_field_is_cut_in_the_reason() {
        let huge = "x".repeat(5_000_000);
        let decoded = decode_record(
            record(
                "INSERT",
                &format!("INDEX#{huge}"),
                json!({"index_endpoint": {"S": huge}}),
            ),
            "D",
        );
        let Outcome::Rejected(reason) = decoded.outcome else {
            panic!("rejected")
        };
        assert!(reason.len() < 1_000, "{} bytes", reason.len());
        // The index id (`acct-1-` and the name) is the first thing refused.
        assert!(reason.contains("5000007 bytes"), "{reason}");
    }
}
