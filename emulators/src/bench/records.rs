//! The bench's batches: INSERT, MODIFY (shop unchanged), shop-move, override (a query config
//! added to each index) and REMOVE records of indexes with a realistic settings image (about
//! 1 KB), and the same change made to the settings table first, as the stream would find it.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::{AttributeValue, DeleteRequest, PutRequest, WriteRequest};
use serde_json::{json, Value};

/// The stream the bench's records come from (the function exports no other).
pub const STREAM_ARN: &str =
    "arn:aws:dynamodb:eu-west-1:123456789012:table/bench-EcomIndexSettingsTable/stream/2026-01-01T00:00:00.000";

/// Accounts a batch's records are spread over.
pub const ACCOUNTS: usize = 5;

/// What a batch's records do to their indexes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Insert,
    /// The settings change, the shop stays.
    Modify,
    /// The index moves to another shop.
    ShopMove,
    /// A query-config override added to the index.
    Override,
    /// The index removed (its overrides stay in the table).
    Remove,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Insert => "INSERT",
            Kind::Modify => "MODIFY",
            Kind::ShopMove => "shop move",
            Kind::Override => "override",
            Kind::Remove => "REMOVE",
        }
    }
}

/// The image of index `i` of the accounts `{tag}-*` as `kind` leaves it.
pub fn image(tag: &str, i: usize, kind: Kind) -> Value {
    let account = format!("{tag}-{}", i % ACCOUNTS);
    let index = format!("index-{i:05}");
    let moved = if kind == Kind::ShopMove { "-moved" } else { "" };
    let limit = if kind == Kind::Insert { "20" } else { "21" };
    json!({
        "pk": {"S": account}, "sk": {"S": format!("INDEX#{index}")},
        "index_endpoint": {"S": format!("https://{account}-{index}.idx.example.com/indexes/{index}")},
        "shop_id": {"S": format!("shop-{tag}-{i:05}{moved}.myshopify.com")},
        "cell": {"S": "default"},
        "pixel_id": {"S": format!("px-{i:08}")},
        "search_config": {"M": {
            "limit": {"N": limit}, "offset": {"N": "0"}, "ratio": {"N": "0.75"},
            "searchable_attributes": {"L": [{"S": "title"}, {"S": "description"}]}
        }},
        "feature_flags": {"M": {"rerank": {"BOOL": true}, "variants": {"SS": ["a", "b"]}}},
        "index_aliases": {"M": {
            "doc_reads": {"M": {"enabled": {"BOOL": true}, "targets": {"L": [
                {"M": {"index_id": {"S": format!("{account}-{index}")}, "weight": {"N": "1"}}}]}}},
            "analytics": {"M": {"enabled": {"BOOL": false}, "index_id": {"NULL": true}}}
        }}
    })
}

/// The override `kind` Override adds to index `i`.
fn override_image(tag: &str, i: usize) -> Value {
    let account = format!("{tag}-{}", i % ACCOUNTS);
    json!({
        "pk": {"S": account}, "sk": {"S": format!("INDEX#index-{i:05}#QUERY#running shoes {i}")},
        "query_config": {"M": {"pinned": {"L": [{"S": format!("sku-{i}")}]}, "boost": {"N": "2"}}}
    })
}

/// The images before and after `kind` changed the table (`None`: no item).
fn images(tag: &str, i: usize, kind: Kind) -> (Option<Value>, Option<Value>) {
    match kind {
        Kind::Insert => (None, Some(image(tag, i, kind))),
        Kind::Modify => (Some(image(tag, i, Kind::Insert)), Some(image(tag, i, kind))),
        Kind::ShopMove => (Some(image(tag, i, Kind::Modify)), Some(image(tag, i, kind))),
        Kind::Override => (None, Some(override_image(tag, i))),
        Kind::Remove => (Some(image(tag, i, Kind::ShopMove)), None),
    }
}

fn record(tag: &str, i: usize, kind: Kind) -> Value {
    let (old, new) = images(tag, i, kind);
    let keys = new.as_ref().or(old.as_ref()).expect("an image");
    let mut dynamodb = json!({
        "ApproximateCreationDateTime": 1.7e9,
        "Keys": {"pk": keys["pk"], "sk": keys["sk"]},
        "SequenceNumber": format!("{:021}", 100_000_000 + i * 8 + kind as usize),
        "SizeBytes": 800, "StreamViewType": "NEW_AND_OLD_IMAGES"
    });
    if let Some(new) = &new {
        dynamodb["NewImage"] = new.clone();
    }
    if let Some(old) = old {
        dynamodb["OldImage"] = old;
    }
    let name = match (kind, new.is_some()) {
        (_, false) => "REMOVE",
        (Kind::Insert | Kind::Override, true) => "INSERT",
        _ => "MODIFY",
    };
    json!({
        "eventID": format!("{i:032x}"), "eventName": name, "eventVersion": "1.1",
        "eventSource": "aws:dynamodb", "awsRegion": "eu-west-1", "eventSourceARN": STREAM_ARN,
        "dynamodb": dynamodb
    })
}

/// A stream batch of `records` records of the accounts `{tag}-*`.
pub fn event(tag: &str, records: usize, kind: Kind) -> Value {
    json!({ "Records": (0..records).map(|i| record(tag, i, kind)).collect::<Vec<_>>() })
}

/// DynamoDB's JSON form of an attribute value as the SDK's type.
fn attribute(value: &Value) -> AttributeValue {
    let (kind, inner) = value
        .as_object()
        .and_then(|o| o.iter().next())
        .expect("a typed attribute value");
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    match kind.as_str() {
        "S" => AttributeValue::S(text(inner)),
        "N" => AttributeValue::N(text(inner)),
        "BOOL" => AttributeValue::Bool(inner.as_bool().unwrap_or_default()),
        "SS" => AttributeValue::Ss(inner.as_array().into_iter().flatten().map(text).collect()),
        "L" => AttributeValue::L(
            inner
                .as_array()
                .into_iter()
                .flatten()
                .map(attribute)
                .collect(),
        ),
        "M" => AttributeValue::M(item(inner)),
        _ => AttributeValue::Null(true),
    }
}

fn item(image: &Value) -> HashMap<String, AttributeValue> {
    let members = image.as_object().into_iter().flatten();
    members.map(|(k, v)| (k.clone(), attribute(v))).collect()
}

/// Changes the settings table as `kind` does: the images it leaves put, the items it removes
/// deleted (straight to moto, not through the proxy the function's calls are counted by), 25
/// items a call, 8 calls in flight.
pub async fn change_table(
    client: &aws_sdk_dynamodb::Client,
    table: &str,
    tag: &str,
    records: usize,
    kind: Kind,
) -> Result<(), String> {
    let mut requests = (0..records).map(|i| match images(tag, i, kind) {
        (_, Some(new)) => {
            let put = PutRequest::builder().set_item(Some(item(&new)));
            let put = put.build().expect("an item");
            WriteRequest::builder().put_request(put).build()
        }
        (old, None) => {
            let old = old.expect("an image");
            let key = item(&json!({"pk": old["pk"], "sk": old["sk"]}));
            let delete = DeleteRequest::builder().set_key(Some(key)).build();
            WriteRequest::builder()
                .delete_request(delete.expect("a key"))
                .build()
        }
    });
    let mut calls = tokio::task::JoinSet::new();
    loop {
        let chunk: Vec<WriteRequest> = requests.by_ref().take(25).collect();
        let last = chunk.is_empty();
        if last && calls.is_empty() {
            return Ok(());
        }
        if !last {
            calls.spawn(write_all(client.clone(), table.to_owned(), chunk));
        }
        if last || calls.len() >= 8 {
            calls
                .join_next()
                .await
                .expect("a call")
                .map_err(|e| e.to_string())??;
        }
    }
}

async fn write_all(
    client: aws_sdk_dynamodb::Client,
    table: String,
    chunk: Vec<WriteRequest>,
) -> Result<(), String> {
    let mut pending = HashMap::from([(table, chunk)]);
    while !pending.is_empty() {
        let answer = client
            .batch_write_item()
            .set_request_items(Some(pending))
            .send()
            .await
            .map_err(|e| format!("BatchWriteItem in moto: {e}"))?;
        pending = answer.unprocessed_items.unwrap_or_default();
    }
    Ok(())
}
