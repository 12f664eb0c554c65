//! The domain: index settings and query-config overrides as the table holds them, and the
//! values the edge search proxy reads from KV (SPEC sections 3 and 4).

use std::collections::HashMap;
use std::fmt;

use base64::Engine as _;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_dynamo::{AttributeValue, Item};
use sha2::{Digest, Sha256};

/// Version of the KV value layout; the proxy tolerates unknown fields, so additions keep it.
pub const SCHEMA_VERSION: u32 = 1;

/// An index as the table names it: the system account it belongs to and its name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IndexRef {
    pub account: String,
    pub name: String,
}

impl IndexRef {
    pub fn new(account: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            account: account.into(),
            name: name.into(),
        }
    }

    /// `{system_account_id}-{index_name}`: the id aliases point at and the index's own KV key.
    pub fn id(&self) -> IndexId {
        IndexId(format!("{}-{}", self.account, self.name))
    }
}

impl fmt::Display for IndexRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.account, self.name)
    }
}

/// `{system_account_id}-{index_name}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct IndexId(pub String);

impl IndexId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IndexId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A Marqo API key. Serializes as itself (it goes into KV) but never shows in `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct ApiKey(String);

impl ApiKey {
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// An opaque document exported as JSON unchanged. DynamoDB numbers become JSON numbers,
/// string and number sets become arrays and binary becomes base64.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(transparent)]
pub struct Document(pub serde_json::Value);

impl<'de> Deserialize<'de> for Document {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(DocumentVisitor).map(Document)
    }
}

struct DocumentVisitor;

impl<'de> Visitor<'de> for DocumentVisitor {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any DynamoDB attribute value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        serde_json::Number::from_f64(v)
            .map(serde_json::Value::Number)
            .ok_or_else(|| E::custom("number outside the range of a 64-bit float"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_bytes<E>(self, v: &[u8]) -> Result<Self::Value, E> {
        Ok(base64::engine::general_purpose::STANDARD.encode(v).into())
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(Document(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(serde_json::Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some((key, Document(value))) = map.next_entry::<String, Document>()? {
            object.insert(key, value);
        }
        Ok(serde_json::Value::Object(object))
    }
}

/// `index_aliases.doc_reads`: where the proxy sends search and collection reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DocReadsAlias {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default)]
    pub targets: Vec<DocReadsTarget>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DocReadsTarget {
    pub index_id: IndexId,
    /// Relative to the other enabled targets; a target without one counts as 1.0.
    #[serde(default = "unit_weight")]
    pub weight: f64,
    #[serde(default)]
    pub internal: bool,
}

fn unit_weight() -> f64 {
    1.0
}

/// `index_aliases.doc_writes`: resolved at write time by the sync service, never sent to KV.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DocWritesAlias {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default)]
    pub targets: Vec<WriteTarget>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WriteTarget {
    pub index_id: IndexId,
    #[serde(default)]
    pub internal: bool,
}

/// `index_aliases.analytics`: a single alternate index for analytics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AnalyticsAlias {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default)]
    pub index_id: Option<IndexId>,
    #[serde(default)]
    pub internal: bool,
}

/// The effective aliases of an index, legacy fields already applied.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct IndexAliases {
    #[serde(default)]
    pub doc_writes: Option<DocWritesAlias>,
    #[serde(default)]
    pub doc_reads: Option<DocReadsAlias>,
    #[serde(default)]
    pub analytics: Option<AnalyticsAlias>,
}

impl IndexAliases {
    /// The index ids this index routes live traffic to: enabled read targets and an enabled
    /// analytics target. These are what protect another index's KV keys from deletion.
    pub fn live_targets(&self) -> impl Iterator<Item = &IndexId> {
        let reads = self
            .doc_reads
            .iter()
            .filter(|reads| reads.enabled)
            .flat_map(|reads| reads.targets.iter().map(|t| &t.index_id));
        let analytics = self
            .analytics
            .iter()
            .filter(|a| a.enabled)
            .filter_map(|a| a.index_id.as_ref());
        reads.chain(analytics)
    }
}

/// Why a table record cannot be exported. Permanent: the record itself must be fixed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidRecord {
    #[error("attribute `{0}` is required")]
    Missing(&'static str),
    #[error("attribute `{path}`: {message}")]
    BadAttribute { path: String, message: String },
    #[error("read alias target `{0}` has a negative or non-finite weight")]
    BadWeight(IndexId),
    #[error("{0}")]
    Other(String),
}

/// The attributes of an index-settings record as stored; decoded by serde_dynamo.
#[derive(Deserialize)]
struct SettingsAttributes {
    index_endpoint: Option<String>,
    shop_id: Option<String>,
    cell: Option<String>,
    search_config: Option<Document>,
    collections_config: Option<Document>,
    feature_flags: Option<Document>,
    agentic_config: Option<Document>,
    query_override_sharding: Option<Document>,
    pixel_id: Option<String>,
    index_aliases: Option<IndexAliases>,
    read_alias: Option<String>,
    add_docs_config: Option<AddDocsConfig>,
}

#[derive(Deserialize)]
struct AddDocsConfig {
    index_write_aliases: Option<Vec<IndexId>>,
}

/// The parts of a settings record that other records' removal depends on.
#[derive(Deserialize)]
struct ReferenceAttributes {
    shop_id: Option<String>,
    index_aliases: Option<IndexAliases>,
    read_alias: Option<String>,
}

fn decode<T: for<'de> Deserialize<'de>>(item: Item) -> Result<T, InvalidRecord> {
    let deserializer =
        serde_dynamo::Deserializer::from_attribute_value(AttributeValue::M(item.into_inner()));
    serde_path_to_error::deserialize(deserializer).map_err(|e| InvalidRecord::BadAttribute {
        path: e.path().to_string(),
        message: e.inner().to_string(),
    })
}

/// Empty strings mean "not set" for optional string attributes: an empty shop id or alias
/// cannot name anything.
fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.is_empty())
}

/// Applies the legacy fields, which win over `index_aliases` when present.
fn effective_aliases(
    aliases: Option<IndexAliases>,
    read_alias: Option<String>,
    legacy_writes: Option<Vec<IndexId>>,
) -> IndexAliases {
    let mut aliases = aliases.unwrap_or_default();
    if let Some(target) = non_empty(read_alias) {
        aliases.doc_reads = Some(DocReadsAlias {
            enabled: true,
            targets: vec![DocReadsTarget {
                index_id: IndexId(target),
                weight: 1.0,
                internal: false,
            }],
        });
    }
    if let Some(ids) = legacy_writes {
        aliases.doc_writes = Some(DocWritesAlias {
            enabled: true,
            targets: ids
                .into_iter()
                .map(|index_id| WriteTarget {
                    index_id,
                    internal: false,
                })
                .collect(),
        });
    }
    aliases
}

/// One index's settings, decoded and with legacy aliases applied.
#[derive(Clone, Debug, PartialEq)]
pub struct IndexSettings {
    pub index: IndexRef,
    pub index_url: String,
    pub shop_id: Option<String>,
    pub cell: Option<String>,
    pub search_config: Option<Document>,
    pub collections_config: Option<Document>,
    pub feature_flags: Option<Document>,
    pub agentic_config: Option<Document>,
    pub query_override_sharding: Option<Document>,
    pub pixel_id: Option<String>,
    pub aliases: IndexAliases,
}

impl IndexSettings {
    pub fn from_item(index: IndexRef, item: Item) -> Result<Self, InvalidRecord> {
        let attrs: SettingsAttributes = decode(item)?;
        let index_url =
            non_empty(attrs.index_endpoint).ok_or(InvalidRecord::Missing("index_endpoint"))?;
        let aliases = effective_aliases(
            attrs.index_aliases,
            attrs.read_alias,
            attrs.add_docs_config.and_then(|c| c.index_write_aliases),
        );
        if let Some(reads) = &aliases.doc_reads {
            if let Some(bad) = reads
                .targets
                .iter()
                .find(|t| !t.weight.is_finite() || t.weight < 0.0)
            {
                return Err(InvalidRecord::BadWeight(bad.index_id.clone()));
            }
        }
        Ok(Self {
            index,
            index_url,
            shop_id: non_empty(attrs.shop_id),
            cell: non_empty(attrs.cell),
            search_config: attrs.search_config,
            collections_config: attrs.collections_config,
            feature_flags: attrs.feature_flags,
            agentic_config: attrs.agentic_config,
            query_override_sharding: attrs.query_override_sharding,
            pixel_id: attrs.pixel_id,
            aliases,
        })
    }

    /// The JSON the proxy reads under both of this index's keys.
    pub fn kv_value<'a>(&'a self, api_key: &'a ApiKey) -> KvSettings<'a> {
        KvSettings {
            schema_version: SCHEMA_VERSION,
            system_account_id: &self.index.account,
            index_name: &self.index.name,
            index_id: self.index.id(),
            shop_id: self.shop_id.as_deref(),
            marqo_api_key: api_key,
            index_url: &self.index_url,
            search_config: self.search_config.as_ref(),
            collections_config: self.collections_config.as_ref(),
            feature_flags: self.feature_flags.as_ref(),
            agentic_config: self.agentic_config.as_ref(),
            pixel_id: self.pixel_id.as_deref(),
            index_aliases: KvAliases {
                doc_reads: self.aliases.doc_reads.as_ref(),
                analytics: self.aliases.analytics.as_ref(),
            },
            query_override_sharding: self.query_override_sharding.as_ref(),
        }
    }
}

/// The shop key an index's record claims, read from an old image or a KV value. Tolerant:
/// anything undecodable simply claims no shop.
pub fn shop_id_of(item: Item) -> Option<String> {
    #[derive(Deserialize)]
    struct Shop {
        shop_id: Option<String>,
    }
    decode::<Shop>(item).ok().and_then(|s| non_empty(s.shop_id))
}

/// What one settings record in the table says about other indexes, for removal safety.
#[derive(Clone, Debug, PartialEq)]
pub struct SettingsReference {
    pub index: IndexRef,
    pub shop_id: Option<String>,
    pub live_targets: Vec<IndexId>,
}

impl SettingsReference {
    pub fn from_item(index: IndexRef, item: Item) -> Result<Self, InvalidRecord> {
        let attrs: ReferenceAttributes = decode(item)?;
        let aliases = effective_aliases(attrs.index_aliases, attrs.read_alias, None);
        Ok(Self {
            index,
            shop_id: non_empty(attrs.shop_id),
            live_targets: aliases.live_targets().cloned().collect(),
        })
    }
}

/// The value under `{shop_id}` and `{system_account_id}-{index_name}` (SPEC section 4).
#[derive(Debug, Serialize)]
pub struct KvSettings<'a> {
    pub schema_version: u32,
    pub system_account_id: &'a str,
    pub index_name: &'a str,
    pub index_id: IndexId,
    pub shop_id: Option<&'a str>,
    pub marqo_api_key: &'a ApiKey,
    pub index_url: &'a str,
    pub search_config: Option<&'a Document>,
    pub collections_config: Option<&'a Document>,
    pub feature_flags: Option<&'a Document>,
    pub agentic_config: Option<&'a Document>,
    pub pixel_id: Option<&'a str>,
    pub index_aliases: KvAliases<'a>,
    pub query_override_sharding: Option<&'a Document>,
}

/// What the edge needs of the aliases: never `doc_writes`.
#[derive(Debug, Serialize)]
pub struct KvAliases<'a> {
    pub doc_reads: Option<&'a DocReadsAlias>,
    pub analytics: Option<&'a AnalyticsAlias>,
}

/// A per-query override: `INDEX#{index}#QUERY#{normalized_query}`.
#[derive(Clone, Debug, PartialEq)]
pub struct QueryConfig {
    pub index: IndexRef,
    pub query: String,
    pub config: Document,
}

impl QueryConfig {
    pub fn from_item(index: IndexRef, query: String, item: Item) -> Result<Self, InvalidRecord> {
        #[derive(Deserialize)]
        struct Attributes {
            query_config: Option<Document>,
        }
        let attrs: Attributes = decode(item)?;
        let config = attrs
            .query_config
            .ok_or(InvalidRecord::Missing("query_config"))?;
        Ok(Self {
            index,
            query,
            config,
        })
    }

    pub fn kv_value(&self) -> KvQueryConfig<'_> {
        KvQueryConfig {
            schema_version: SCHEMA_VERSION,
            system_account_id: &self.index.account,
            index_name: &self.index.name,
            query: &self.query,
            config: &self.config,
        }
    }
}

/// `qcfg-{system_account_id}-{index_name}-{sha256(normalized_query) as lower hex}`.
pub fn query_config_key(index: &IndexRef, query: &str) -> String {
    let digest = Sha256::digest(query.as_bytes());
    format!("qcfg-{}-{}-{:x}", index.account, index.name, digest)
}

#[derive(Debug, Serialize)]
pub struct KvQueryConfig<'a> {
    pub schema_version: u32,
    pub system_account_id: &'a str,
    pub index_name: &'a str,
    pub query: &'a str,
    pub config: &'a Document,
}

/// Convenience for tests and fixtures: an item from JSON in DynamoDB's attribute-value format.
pub fn item_from_dynamodb_json(json: serde_json::Value) -> Result<Item, serde_json::Error> {
    serde_json::from_value::<HashMap<String, AttributeValue>>(json).map(Item::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn item(json: serde_json::Value) -> Item {
        item_from_dynamodb_json(json).unwrap()
    }

    fn products() -> IndexRef {
        IndexRef::new("acct-1", "products")
    }

    #[test]
    fn full_record_becomes_the_spec_value() {
        let settings = IndexSettings::from_item(
            products(),
            item(json!({
                "pk": {"S": "acct-1"}, "sk": {"S": "INDEX#products"},
                "index_endpoint": {"S": "https://idx.example/products"},
                "shop_id": {"S": "shop-1.myshopify.com"},
                "search_config": {"M": {"limit": {"N": "20"}, "ratio": {"N": "0.5"}}},
                "feature_flags": {"M": {"tags": {"SS": ["a", "b"]}, "blob": {"B": "aGk="}}},
                "pixel_id": {"S": "px-1"},
                "index_aliases": {"M": {
                    "doc_reads": {"M": {"enabled": {"BOOL": true}, "targets": {"L": [
                        {"M": {"index_id": {"S": "acct-1-products-v2"}, "weight": {"N": "1"}}}]}}},
                    "doc_writes": {"M": {"enabled": {"BOOL": true}, "targets": {"L": []}}},
                    "analytics": {"M": {"enabled": {"BOOL": false}, "index_id": {"NULL": true}}}
                }},
                "some_future_attribute": {"S": "ignored"}
            })),
        )
        .unwrap();
        let value = serde_json::to_value(settings.kv_value(&ApiKey::new("k-1"))).unwrap();
        assert_eq!(
            value,
            json!({
                "schema_version": 1,
                "system_account_id": "acct-1",
                "index_name": "products",
                "index_id": "acct-1-products",
                "shop_id": "shop-1.myshopify.com",
                "marqo_api_key": "k-1",
                "index_url": "https://idx.example/products",
                "search_config": {"limit": 20, "ratio": 0.5},
                "collections_config": null,
                "feature_flags": {"tags": ["a", "b"], "blob": "aGk="},
                "agentic_config": null,
                "pixel_id": "px-1",
                "index_aliases": {
                    "doc_reads": {"enabled": true, "targets": [
                        {"index_id": "acct-1-products-v2", "weight": 1.0, "internal": false}]},
                    "analytics": {"enabled": false, "index_id": null, "internal": false}
                },
                "query_override_sharding": null
            })
        );
    }

    #[test]
    fn legacy_read_alias_replaces_doc_reads() {
        let settings = IndexSettings::from_item(
            products(),
            item(json!({
                "index_endpoint": {"S": "https://idx"},
                "read_alias": {"S": "acct-1-legacy"},
                "index_aliases": {"M": {"doc_reads": {"M": {"enabled": {"BOOL": false},
                    "targets": {"L": [{"M": {"index_id": {"S": "acct-1-new"}, "weight": {"N": "0.3"}}}]}}}}}
            })),
        )
        .unwrap();
        let reads = settings.aliases.doc_reads.unwrap();
        assert!(reads.enabled);
        assert_eq!(
            reads.targets,
            vec![DocReadsTarget {
                index_id: IndexId("acct-1-legacy".into()),
                weight: 1.0,
                internal: false
            }]
        );
    }

    #[test]
    fn legacy_write_aliases_replace_doc_writes_but_never_reach_kv() {
        let settings = IndexSettings::from_item(
            products(),
            item(json!({
                "index_endpoint": {"S": "https://idx"},
                "add_docs_config": {"M": {"index_write_aliases": {"L": [{"S": "acct-1-a"}, {"S": "acct-1-b"}]}}},
                "index_aliases": {"M": {"doc_writes": {"M": {"enabled": {"BOOL": false}, "targets": {"L": []}}}}}
            })),
        )
        .unwrap();
        let writes = settings.aliases.doc_writes.clone().unwrap();
        assert!(writes.enabled);
        let ids: Vec<_> = writes.targets.iter().map(|t| t.index_id.as_str()).collect();
        assert_eq!(ids, ["acct-1-a", "acct-1-b"]);
        let value = serde_json::to_value(settings.kv_value(&ApiKey::new("k"))).unwrap();
        assert_eq!(
            value["index_aliases"],
            json!({"doc_reads": null, "analytics": null})
        );
    }

    #[test]
    fn missing_endpoint_is_named() {
        let err =
            IndexSettings::from_item(products(), item(json!({"shop_id": {"S": "s"}}))).unwrap_err();
        assert_eq!(err.to_string(), "attribute `index_endpoint` is required");
    }

    #[test]
    fn wrong_attribute_type_names_the_path() {
        let err = IndexSettings::from_item(
            products(),
            item(json!({
                "index_endpoint": {"S": "https://idx"},
                "index_aliases": {"M": {"doc_reads": {"M": {"enabled": {"S": "yes"}}}}}
            })),
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("index_aliases.doc_reads.enabled"),
            "unexpected: {text}"
        );
    }

    #[test]
    fn numbers_outside_f64_are_rejected() {
        let err = IndexSettings::from_item(
            products(),
            item(json!({
                "index_endpoint": {"S": "https://idx"},
                "search_config": {"M": {"huge": {"N": "1e400"}}}
            })),
        )
        .unwrap_err();
        assert!(err.to_string().contains("search_config"), "{err}");
    }

    #[test]
    fn negative_weights_are_rejected() {
        let err = IndexSettings::from_item(
            products(),
            item(json!({
                "index_endpoint": {"S": "https://idx"},
                "index_aliases": {"M": {"doc_reads": {"M": {"enabled": {"BOOL": true},
                    "targets": {"L": [{"M": {"index_id": {"S": "x"}, "weight": {"N": "-1"}}}]}}}}}
            })),
        )
        .unwrap_err();
        assert_eq!(err, InvalidRecord::BadWeight(IndexId("x".into())));
    }

    #[test]
    fn empty_strings_mean_not_set() {
        let settings = IndexSettings::from_item(
            products(),
            item(json!({
                "index_endpoint": {"S": "https://idx"},
                "shop_id": {"S": ""}, "read_alias": {"S": ""}, "cell": {"S": ""}
            })),
        )
        .unwrap();
        assert_eq!(settings.shop_id, None);
        assert_eq!(settings.cell, None);
        assert_eq!(settings.aliases.doc_reads, None);
    }

    #[test]
    fn query_config_key_is_sha256_of_the_normalized_query() {
        // sha256("") is well known; the key must use lower-case hex.
        assert_eq!(
            query_config_key(&products(), ""),
            "qcfg-acct-1-products-e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn references_apply_legacy_precedence_and_only_count_enabled_targets() {
        let reference = SettingsReference::from_item(
            IndexRef::new("acct-1", "front"),
            item(json!({
                "read_alias": {"S": "acct-1-legacy"},
                "index_aliases": {"M": {
                    "doc_reads": {"M": {"enabled": {"BOOL": true}, "targets": {"L": [
                        {"M": {"index_id": {"S": "acct-1-shadowed"}, "weight": {"N": "1"}}}]}}},
                    "analytics": {"M": {"enabled": {"BOOL": false}, "index_id": {"S": "acct-1-off"}}}
                }}
            })),
        )
        .unwrap();
        assert_eq!(
            reference.live_targets,
            vec![IndexId("acct-1-legacy".into())]
        );
    }

    #[test]
    fn api_keys_never_show_in_debug() {
        let settings = IndexSettings::from_item(
            products(),
            item(json!({"index_endpoint": {"S": "https://idx"}})),
        )
        .unwrap();
        let key = ApiKey::new("super-secret-key");
        let debug = format!("{:?}", settings.kv_value(&key));
        assert!(!debug.contains("super-secret-key"), "{debug}");
    }
}
