//! Reads a DynamoDB stream (moto's, locally) the way Lambda's event source mapping does and
//! hands out the records in Lambda's `{"Records": [...]}` format.

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
    StreamSpecification, StreamViewType,
};
use aws_sdk_dynamodbstreams::types::{Record, ShardIteratorType};
use aws_sdk_dynamodbstreams::Client;
use serde_json::{json, Value};

pub struct StreamReader {
    client: Client,
    stream_arn: String,
    region: String,
    /// One iterator per shard, advanced by every read.
    iterators: Vec<String>,
}

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Creates a settings table as the spec lays it out (`pk`, `sk`, both strings) with a stream
/// of the given view type, and answers the stream's ARN.
pub async fn create_settings_table(
    client: &aws_sdk_dynamodb::Client,
    name: &str,
    view: StreamViewType,
) -> Result<String, String> {
    let stream = StreamSpecification::builder()
        .stream_enabled(true)
        .stream_view_type(view)
        .build()
        .expect("complete");
    create_table(client, name, Some(stream))
        .await?
        .and_then(|t| t.latest_stream_arn)
        .ok_or_else(|| format!("table {name} has no stream"))
}

/// The exporter's own ledger table as the template declares it: `pk`, `sk` strings,
/// on demand, no stream.
pub async fn create_ledger_table(
    client: &aws_sdk_dynamodb::Client,
    name: &str,
) -> Result<(), String> {
    create_table(client, name, None).await.map(drop)
}

/// A table keyed by `pk` and `sk` (strings), on demand, with a stream when asked.
async fn create_table(
    client: &aws_sdk_dynamodb::Client,
    name: &str,
    stream: Option<StreamSpecification>,
) -> Result<Option<aws_sdk_dynamodb::types::TableDescription>, String> {
    let key = |name: &str, kind| {
        KeySchemaElement::builder()
            .attribute_name(name)
            .key_type(kind)
            .build()
            .expect("complete")
    };
    let attr = |name: &str| {
        AttributeDefinition::builder()
            .attribute_name(name)
            .attribute_type(ScalarAttributeType::S)
            .build()
            .expect("complete")
    };
    let created = client
        .create_table()
        .table_name(name)
        .key_schema(key("pk", KeyType::Hash))
        .key_schema(key("sk", KeyType::Range))
        .attribute_definitions(attr("pk"))
        .attribute_definitions(attr("sk"))
        .billing_mode(BillingMode::PayPerRequest)
        .set_stream_specification(stream)
        .send()
        .await
        .map_err(|e| {
            format!(
                "create table {name}: {}",
                aws_sdk_dynamodb::error::DisplayErrorContext(e)
            )
        })?;
    Ok(created.table_description)
}

impl StreamReader {
    /// Starts at the beginning of every shard of the stream.
    pub async fn open(client: Client, stream_arn: &str, region: &str) -> Result<Self, Error> {
        let stream = client
            .describe_stream()
            .stream_arn(stream_arn)
            .send()
            .await?
            .stream_description
            .ok_or("no stream description")?;
        let mut iterators = Vec::new();
        for shard in stream.shards.unwrap_or_default() {
            let iterator = client
                .get_shard_iterator()
                .stream_arn(stream_arn)
                .shard_id(shard.shard_id.unwrap_or_default())
                .shard_iterator_type(ShardIteratorType::TrimHorizon)
                .send()
                .await?
                .shard_iterator
                .ok_or("no shard iterator")?;
            iterators.push(iterator);
        }
        Ok(Self {
            client,
            stream_arn: stream_arn.to_owned(),
            region: region.to_owned(),
            iterators,
        })
    }

    /// Every record written since the last read, in stream order, as Lambda delivers them.
    pub async fn read(&mut self) -> Result<Vec<Value>, Error> {
        let mut records = Vec::new();
        for iterator in &mut self.iterators {
            loop {
                let page = self
                    .client
                    .get_records()
                    .shard_iterator(iterator.as_str())
                    .limit(1000)
                    .send()
                    .await?;
                let got = page.records.unwrap_or_default();
                let empty = got.is_empty();
                records.extend(
                    got.into_iter()
                        .map(|r| lambda_record(r, &self.stream_arn, &self.region)),
                );
                if let Some(next) = page.next_shard_iterator {
                    *iterator = next;
                }
                if empty {
                    break;
                }
            }
        }
        Ok(records)
    }
}

fn image(
    item: Option<std::collections::HashMap<String, aws_sdk_dynamodbstreams::types::AttributeValue>>,
) -> Option<Value> {
    item.map(|item| serde_json::to_value(serde_dynamo::Item::from(item)).expect("items serialize"))
}

/// One stream record in the shape of a Lambda DynamoDB event record.
pub fn lambda_record(record: Record, stream_arn: &str, region: &str) -> Value {
    let change = record
        .dynamodb
        .unwrap_or_else(|| aws_sdk_dynamodbstreams::types::StreamRecord::builder().build());
    let mut dynamodb = json!({
        "ApproximateCreationDateTime": change.approximate_creation_date_time.map(|t| t.as_secs_f64()),
        "Keys": image(change.keys),
        "SequenceNumber": change.sequence_number,
        "SizeBytes": change.size_bytes.unwrap_or(0),
        "StreamViewType": change.stream_view_type.map(|v| v.as_str().to_owned()),
    });
    if let Some(new) = image(change.new_image) {
        dynamodb["NewImage"] = new;
    }
    if let Some(old) = image(change.old_image) {
        dynamodb["OldImage"] = old;
    }
    json!({
        "eventID": record.event_id,
        "eventName": record.event_name.map(|n| n.as_str().to_owned()),
        "eventVersion": record.event_version.unwrap_or_else(|| "1.1".into()),
        "eventSource": "aws:dynamodb",
        "awsRegion": region,
        "eventSourceARN": stream_arn,
        "dynamodb": dynamodb,
    })
}
