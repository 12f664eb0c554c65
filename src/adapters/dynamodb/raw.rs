//! DynamoDB's JSON API without the SDK, for the calls on the stream's path: the settings
//! table's items by key (consistent BatchGetItems, each answer read into the borrowed attribute
//! tree: the records' items, the candidates' and claimers' records, the checks' shops) and the
//! ledger's items (BatchGetItem, TransactWriteItems, Query, GetItem). Requests are signed with SigV4 as the SDK signs them (`aws-sigv4`); the SDK's
//! configuration still decides the region, the credentials and the endpoint. Through the SDK
//! each call cost the function its per-request pipeline and each item a `HashMap` of
//! `AttributeValue`s (docs/performance.md has the figures); `tests/integration/table_items.rs`
//! holds this path equal to the SDK's.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};

use crate::dynamo::Image;
use crate::ports::PortError;

/// DynamoDB's limit per BatchGetItem call, and tries for the keys a call leaves unprocessed.
const GET_BATCH: usize = 100;
const UNPROCESSED_TRIES: u32 = 5;
/// BatchGetItems in flight at once.
const CONCURRENT_GETS: usize = 8;
/// Attempts of one request that failed on the way or was throttled (the SDK's standard three).
const ATTEMPTS: u32 = 3;
/// Credentials are fetched again this long before they expire.
const CREDENTIALS_MARGIN: Duration = Duration::from_secs(300);
/// DynamoDB's limits per TransactWriteItems call: actions, and bytes (4 MB, less a margin).
const TRANSACT_ACTIONS: usize = 100;
const TRANSACT_BYTES: usize = 3_500_000;

pub struct RawDynamo {
    http: reqwest::Client,
    endpoint: String,
    region: String,
    credentials: Option<SharedCredentialsProvider>,
    cached: Mutex<Option<Credentials>>,
}

/// A BatchGetItem's answer: the items found and the keys left for another call.
#[derive(Deserialize)]
struct Answer<'a> {
    #[serde(borrow, rename = "Responses", default)]
    responses: std::collections::HashMap<String, Vec<Image<'a>>>,
    #[serde(borrow, rename = "UnprocessedKeys", default)]
    unprocessed: std::collections::HashMap<String, Unprocessed<'a>>,
}

#[derive(Deserialize)]
struct Unprocessed<'a> {
    #[serde(borrow, rename = "Keys", default)]
    keys: Vec<Image<'a>>,
}

/// How DynamoDB answered a call that reached it: success, or its error's status and text.
enum Answered {
    Ok(String),
    Refused { status: u16, text: String },
}

impl Answered {
    /// The answer's text, or the refusal as the call's error.
    fn text(self, operation: &str, table: &str) -> Result<String, PortError> {
        match self {
            Answered::Ok(text) => Ok(text),
            Answered::Refused { status, text } => Err(PortError::Refused(format!(
                "{operation} of table {table}: HTTP {status}: {}",
                crate::domain::validate::cut(&text)
            ))),
        }
    }
}

impl RawDynamo {
    /// Where and as whom the SDK configured by `aws` would call DynamoDB (`AWS_REGION`, its
    /// credentials chain, `AWS_ENDPOINT_URL_DYNAMODB` or `AWS_ENDPOINT_URL`).
    pub fn new(aws: &aws_config::SdkConfig) -> Self {
        let region = aws
            .region()
            .map_or("us-east-1".to_owned(), |r| r.to_string());
        let endpoint = (std::env::var("AWS_ENDPOINT_URL_DYNAMODB").ok())
            .or_else(|| aws.endpoint_url().map(str::to_owned))
            .unwrap_or_else(|| format!("https://dynamodb.{region}.amazonaws.com"));
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(10))
            .user_agent(user_agent(aws))
            .build()
            .expect("a TLS client");
        RawDynamo {
            http,
            endpoint,
            region,
            credentials: aws.credentials_provider(),
            cached: Mutex::new(None),
        }
    }

    /// The items of `keys` in `table` that exist, each handed to `each` as read: 100 keys a
    /// request, several at once, the keys an answer leaves unprocessed asked again.
    pub async fn get_all(
        &self,
        (table, projection): (&str, Option<&str>),
        mut keys: Vec<(String, String)>,
        each: &mut (impl FnMut(&Image<'_>) + Send),
    ) -> Result<(), PortError> {
        for attempt in 0..UNPROCESSED_TRIES {
            if keys.is_empty() {
                return Ok(());
            }
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
            }
            let requests: Vec<String> = keys
                .chunks(GET_BATCH)
                .map(|c| request(table, c, projection))
                .collect();
            let mut answers = futures::stream::iter(requests)
                .map(|body| self.post("BatchGetItem", table, body))
                .buffer_unordered(CONCURRENT_GETS);
            keys = Vec::new();
            while let Some(answer) = answers.next().await {
                let left = read_answer(&answer?, table, each).ok_or_else(|| {
                    PortError::Unavailable(format!(
                        "BatchGetItem of table {table}: an answer not understood"
                    ))
                })?;
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

    /// Writes (each a TransactWriteItems action as DynamoDB's JSON text, no two on one item),
    /// 100 a TransactWriteItems, several at once. Answers the actions (their positions) whose
    /// condition failed: nothing of theirs is written, every other action is (a cancelled
    /// transaction is sent again without them).
    pub async fn transact_all(
        &self,
        table: &str,
        actions: Vec<String>,
    ) -> Result<BTreeSet<usize>, PortError> {
        let mut chunks: Vec<Vec<(usize, String)>> = Vec::new();
        let mut bytes = 0;
        for (at, action) in actions.into_iter().enumerate() {
            let full = chunks.last().is_none_or(|c| {
                c.len() == TRANSACT_ACTIONS || bytes + action.len() > TRANSACT_BYTES
            });
            if full {
                chunks.push(Vec::new());
                bytes = 0;
            }
            bytes += action.len();
            chunks.last_mut().expect("pushed").push((at, action));
        }
        let answers: Vec<Result<Vec<usize>, PortError>> = futures::stream::iter(chunks)
            .map(|chunk| self.transact(table, chunk))
            .buffer_unordered(CONCURRENT_GETS)
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
        mut actions: Vec<(usize, String)>,
    ) -> Result<Vec<usize>, PortError> {
        let mut refused = Vec::new();
        while !actions.is_empty() {
            let items: Vec<&str> = actions.iter().map(|(_, a)| a.as_str()).collect();
            let body = format!(r#"{{"TransactItems":[{}]}}"#, items.join(","));
            let text = match self.call("TransactWriteItems", table, body).await? {
                Answered::Ok(_) => return Ok(refused),
                Answered::Refused { status: 400, text } => text,
                answered => return answered.text("TransactWriteItems", table).map(|_| refused),
            };
            let failed = failed_conditions(&text).filter(|f| !f.is_empty());
            let Some(failed) = failed else {
                let refusal = Answered::Refused { status: 400, text };
                return refusal.text("TransactWriteItems", table).map(|_| refused);
            };
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

    /// One call that must succeed: its answer's text.
    pub async fn post(
        &self,
        operation: &str,
        table: &str,
        body: String,
    ) -> Result<String, PortError> {
        (self.call(operation, table, body).await?).text(operation, table)
    }

    /// One signed call, tried again when it failed on the way, DynamoDB failed or throttled
    /// it (or a transaction met another): how DynamoDB answered (a refusal it gave is the
    /// caller's to read, a cancelled transaction for one).
    async fn call(
        &self,
        operation: &str,
        table: &str,
        body: String,
    ) -> Result<Answered, PortError> {
        let failed =
            |what: String| PortError::Unavailable(format!("{operation} of table {table}: {what}"));
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                let jitter = fastrand::u64(0..50);
                tokio::time::sleep(Duration::from_millis((50 << attempt) + jitter)).await;
            }
            let request = self.signed(operation, body.clone()).await.map_err(failed)?;
            let answer = match self.http.execute(request).await {
                Ok(answer) => answer,
                Err(e) => {
                    last = e.to_string();
                    continue;
                }
            };
            let status = answer.status();
            let text = answer.text().await.unwrap_or_default();
            if status.is_success() {
                return Ok(Answered::Ok(text));
            }
            if !status.is_server_error() && !super::errors::worth_another_attempt(&text) {
                let status = status.as_u16();
                return Ok(Answered::Refused { status, text });
            }
            last = format!("HTTP {status}: {}", crate::domain::validate::cut(&text));
        }
        Err(failed(last))
    }

    /// The request, signed with SigV4 for `dynamodb` in the configured region.
    async fn signed(&self, operation: &str, body: String) -> Result<reqwest::Request, String> {
        let credentials = self.credentials().await?;
        let identity = credentials.into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("dynamodb")
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| format!("signing: {e}"))?
            .into();
        let mut request = http::Request::post(&self.endpoint)
            .header("content-type", "application/x-amz-json-1.0")
            .header("x-amz-target", format!("DynamoDB_20120810.{operation}"))
            .body(body)
            .map_err(|e| e.to_string())?;
        let headers = request.headers().iter();
        let headers = headers.map(|(name, value)| (name.as_str(), value.to_str().unwrap_or("")));
        let signable = SignableRequest::new(
            "POST",
            &self.endpoint,
            headers,
            SignableBody::Bytes(request.body().as_bytes()),
        )
        .and_then(|signable| sign(signable, &params))
        .map_err(|e| format!("signing: {e}"))?;
        let (instructions, _) = signable.into_parts();
        instructions.apply_to_request_http1x(&mut request);
        reqwest::Request::try_from(request).map_err(|e| e.to_string())
    }

    /// The configured credentials, fetched again shortly before they expire.
    async fn credentials(&self) -> Result<Credentials, String> {
        let fresh = |c: &Credentials| {
            c.expiry()
                .is_none_or(|at| at > SystemTime::now() + CREDENTIALS_MARGIN)
        };
        if let Some(cached) = self.cached.lock().expect("not poisoned").clone() {
            if fresh(&cached) {
                return Ok(cached);
            }
        }
        let provider = (self.credentials.as_ref()).ok_or("no AWS credentials configured")?;
        let credentials =
            (provider.provide_credentials().await).map_err(|e| format!("AWS credentials: {e}"))?;
        *self.cached.lock().expect("not poisoned") = Some(credentials.clone());
        Ok(credentials)
    }
}

/// The SDK's application name in the user agent, as the SDK's own calls carry it (the test
/// suite tells the function's calls by it).
fn user_agent(aws: &aws_config::SdkConfig) -> String {
    let app = aws
        .app_name()
        .map(|app| format!(" app/{app}"))
        .unwrap_or_default();
    format!("ecom-settings-exporter{app}")
}

/// One attribute value as DynamoDB's JSON writes it (`{"S": "..."}`, ...).
#[derive(Serialize)]
pub(crate) enum Attribute {
    S(String),
    N(String),
    #[serde(rename = "SS")]
    Ss(Vec<String>),
    #[serde(rename = "BOOL")]
    Bool(bool),
}

pub(crate) fn n(value: u64) -> Attribute {
    Attribute::N(value.to_string())
}

/// An item or a key to write, its attributes in the order given: written straight to JSON
/// text (a `serde_json::Value` per item cost a batch of 1,000 indexes some 20 MiB).
#[derive(Default)]
pub(crate) struct Item(Vec<(&'static str, Attribute)>);

impl Item {
    pub(crate) fn key(pk: String, sk: &str) -> Self {
        Item(vec![
            ("pk", Attribute::S(pk)),
            ("sk", Attribute::S(sk.to_owned())),
        ])
    }

    pub(crate) fn with(mut self, name: &'static str, value: Attribute) -> Self {
        self.0.push((name, value));
        self
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for Item {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(name, value)| (name, value)))
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct KeysRead<'a> {
    keys: Vec<Item>,
    consistent_read: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    projection_expression: Option<&'a str>,
}

#[derive(Serialize)]
struct BatchGet<'a> {
    #[serde(rename = "RequestItems")]
    request_items: std::collections::HashMap<&'a str, KeysRead<'a>>,
}

/// The request's JSON: the keys, read consistently (only `projection`, when given).
fn request(table: &str, keys: &[(String, String)], projection: Option<&str>) -> String {
    let keys = KeysRead {
        keys: keys
            .iter()
            .map(|(pk, sk)| Item::key(pk.clone(), sk))
            .collect(),
        consistent_read: true,
        projection_expression: projection,
    };
    let request = BatchGet {
        request_items: std::collections::HashMap::from([(table, keys)]),
    };
    serde_json::to_string(&request).expect("keys are JSON")
}

/// Hands each item of an answer to `each` and answers the keys left unprocessed; `None` when
/// the answer is not a BatchGetItem's.
fn read_answer(
    text: &str,
    table: &str,
    each: &mut impl FnMut(&Image<'_>),
) -> Option<Vec<(String, String)>> {
    let answer: Answer = serde_json::from_str(text).ok()?;
    for (_, items) in answer.responses.iter().filter(|(name, _)| *name == table) {
        items.iter().for_each(&mut *each);
    }
    let left = answer
        .unprocessed
        .get(table)
        .map_or(&[][..], |u| &u.keys[..]);
    let key = |image: &Image| {
        Some((
            image.string("pk")?.to_owned(),
            image.string("sk")?.to_owned(),
        ))
    };
    left.iter().map(key).collect()
}

/// A cancelled transaction's answer: why each action was cancelled, in order.
#[derive(Deserialize)]
struct Cancelled {
    #[serde(rename = "CancellationReasons")]
    reasons: Vec<Reason>,
}

#[derive(Deserialize)]
struct Reason {
    #[serde(rename = "Code")]
    code: Option<String>,
}

/// The positions of the actions whose condition failed, when a transaction was cancelled
/// (`None`: another refusal).
fn failed_conditions(answer: &str) -> Option<BTreeSet<usize>> {
    let cancelled: Cancelled = serde_json::from_str(answer).ok()?;
    let failed = cancelled.reasons.iter().enumerate();
    let failed = failed.filter(|(_, r)| r.code.as_deref() == Some("ConditionalCheckFailed"));
    Some(failed.map(|(at, _)| at).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANSWER: &str = r#"{"Responses": {"other": [{"pk": {"S": "x"}, "sk": {"S": "y"}}],
        "settings": [{"pk": {"S": "a"}, "sk": {"S": "INDEX#i"}, "n": {"N": "1E+2"},
                      "m": {"M": {"s": {"S": "\"é\u00e9\n"}, "b": {"B": "AA=="}}}},
                     {"pk": {"S": "a"}, "sk": {"S": "INDEX#j"}, "l": {"L": [{"NULL": true}]}}]},
        "UnprocessedKeys": {"settings": {"Keys": [{"pk": {"S": "a"}, "sk": {"S": "INDEX#k"}}],
                                         "ConsistentRead": true}},
        "ConsumedCapacity": []}"#;

    #[test]
    fn an_answer_hands_over_the_table_s_items_and_its_unprocessed_keys() {
        let mut seen = Vec::new();
        let left = read_answer(ANSWER, "settings", &mut |image: &Image| {
            seen.push(image.string("sk").unwrap().to_owned());
        });
        assert_eq!(seen, ["INDEX#i", "INDEX#j"]);
        assert_eq!(left, Some(vec![("a".into(), "INDEX#k".into())]));
        assert_eq!(read_answer("<html>", "settings", &mut |_: &Image| ()), None);
    }

    #[test]
    fn a_cancelled_transaction_names_the_actions_whose_condition_failed() {
        let answer = r#"{"__type": "com.amazonaws.dynamodb.v20120810#TransactionCanceledException",
            "Message": "Transaction cancelled [None, ConditionalCheckFailed, None]",
            "CancellationReasons": [{"Code": "None"}, {"Code": "ConditionalCheckFailed",
            "Message": "The conditional request failed"}, {"Code": "None"}]}"#;
        assert_eq!(failed_conditions(answer), Some(BTreeSet::from([1])));
        let conflict = r#"{"CancellationReasons": [{"Code": "TransactionConflict"}]}"#;
        assert_eq!(failed_conditions(conflict), Some(BTreeSet::new()));
        let other = r#"{"__type": "ValidationException", "message": "too many"}"#;
        assert_eq!(failed_conditions(other), None);
    }

    #[test]
    fn a_request_asks_for_each_key_consistently() {
        let keys = [("a\"".to_owned(), "INDEX#é".to_owned())];
        let request = request_json(&keys, None);
        let expected = serde_json::json!({"RequestItems": {"t": {"ConsistentRead": true,
            "Keys": [{"pk": {"S": "a\""}, "sk": {"S": "INDEX#é"}}]}}});
        assert_eq!(request, expected);
        let projected = request_json(&keys, Some("pk, sk, shop_id"));
        assert_eq!(
            projected["RequestItems"]["t"]["ProjectionExpression"],
            "pk, sk, shop_id"
        );
    }

    fn request_json(keys: &[(String, String)], projection: Option<&str>) -> serde_json::Value {
        serde_json::from_str(&request("t", keys, projection)).unwrap()
    }
}
