//! DynamoDB's attribute-value format, read into the domain: sort keys, opaque documents,
//! index settings, query configs and alias references (docs/contract.md, "The settings table").

use std::collections::HashMap;
use std::fmt;

use base64::Engine as _;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_dynamo::{AttributeValue, Item};

use crate::domain::settings::{non_empty, Document, IndexAliases};
use crate::domain::{
    IndexId, IndexRef, IndexSettings, InvalidRecord, QueryConfig, SettingsReference,
};

/// What a sort key says a record is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SortKey {
    Index(String),
    Query { index: String, query: String },
    DefaultConfigs,
    Foreign,
}

impl SortKey {
    pub fn parse(sk: &str, default_configs_sk: &str) -> Self {
        if sk == default_configs_sk {
            return SortKey::DefaultConfigs;
        }
        let Some(rest) = sk.strip_prefix("INDEX#") else {
            return SortKey::Foreign;
        };
        // The normalized query is everything after the first `#QUERY#`: it may hold `#` itself.
        match rest.split_once("#QUERY#") {
            Some((index, query)) => SortKey::Query {
                index: index.to_owned(),
                query: query.to_owned(),
            },
            None => SortKey::Index(rest.to_owned()),
        }
    }
}

/// A string attribute of an item, if it is one.
pub fn string_attribute<'a>(item: &'a Item, name: &str) -> Option<&'a str> {
    match item.get(name) {
        Some(AttributeValue::S(s)) => Some(s),
        _ => None,
    }
}

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

/// The attributes of an index-settings record as stored.
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

/// An `INDEX#{name}` record's attributes as the index's settings.
pub fn index_settings(index: IndexRef, item: Item) -> Result<IndexSettings, InvalidRecord> {
    let attrs: SettingsAttributes = decode(item)?;
    let index_url =
        non_empty(attrs.index_endpoint).ok_or(InvalidRecord::Missing("index_endpoint"))?;
    let aliases = attrs.index_aliases.unwrap_or_default().with_legacy(
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
    Ok(IndexSettings {
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

/// The shop key an index's record claims, read from an old image. Tolerant: anything
/// undecodable simply claims no shop.
pub fn shop_id_of(item: Item) -> Option<String> {
    #[derive(Deserialize)]
    struct Shop {
        shop_id: Option<String>,
    }
    decode::<Shop>(item).ok().and_then(|s| non_empty(s.shop_id))
}

/// What a settings record says about other indexes: its shop and live alias targets.
pub fn settings_reference(index: IndexRef, item: Item) -> Result<SettingsReference, InvalidRecord> {
    let attrs: ReferenceAttributes = decode(item)?;
    let aliases = attrs
        .index_aliases
        .unwrap_or_default()
        .with_legacy(attrs.read_alias, None);
    Ok(SettingsReference {
        index,
        shop_id: non_empty(attrs.shop_id),
        live_targets: aliases.live_targets().cloned().collect(),
    })
}

/// An `INDEX#{name}#QUERY#{query}` record's override.
pub fn query_config(
    index: IndexRef,
    query: String,
    item: Item,
) -> Result<QueryConfig, InvalidRecord> {
    #[derive(Deserialize)]
    struct Attributes {
        query_config: Option<Document>,
    }
    let attrs: Attributes = decode(item)?;
    let config = attrs
        .query_config
        .ok_or(InvalidRecord::Missing("query_config"))?;
    Ok(QueryConfig {
        index,
        query,
        config,
    })
}

/// Convenience for tests and fixtures: an item from JSON in DynamoDB's attribute-value format.
pub fn item_from_dynamodb_json(json: serde_json::Value) -> Result<Item, serde_json::Error> {
    serde_json::from_value::<HashMap<String, AttributeValue>>(json).map(Item::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::settings::DocReadsTarget;
    use crate::domain::ApiKey;
    use serde_json::json;

    fn item(json: serde_json::Value) -> Item {
        item_from_dynamodb_json(json).unwrap()
    }

    fn products() -> IndexRef {
        IndexRef::new("acct-1", "products")
    }

    #[test]
    fn sort_keys_split_at_the_first_query_marker() {
        assert_eq!(
            SortKey::parse("INDEX#p#QUERY#a #QUERY# b", "DEFAULT_CONFIGS"),
            SortKey::Query {
                index: "p".into(),
                query: "a #QUERY# b".into()
            }
        );
        assert_eq!(SortKey::parse("INDEX#p", "D"), SortKey::Index("p".into()));
        assert_eq!(SortKey::parse("D", "D"), SortKey::DefaultConfigs);
        assert_eq!(SortKey::parse("USER#x", "D"), SortKey::Foreign);
    }

    #[test]
    fn full_record_becomes_the_spec_value() {
        let settings = index_settings(
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
        let settings = index_settings(
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
        let settings = index_settings(
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
        let err = index_settings(products(), item(json!({"shop_id": {"S": "s"}}))).unwrap_err();
        assert_eq!(err.to_string(), "attribute `index_endpoint` is required");
    }

    #[test]
    fn wrong_attribute_type_names_the_path() {
        let err = index_settings(
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
        let err = index_settings(
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
        let err = index_settings(
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
        let settings = index_settings(
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
    fn references_apply_legacy_precedence_and_only_count_enabled_targets() {
        let reference = settings_reference(
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
        let settings = index_settings(
            products(),
            item(json!({"index_endpoint": {"S": "https://idx"}})),
        )
        .unwrap();
        let key = ApiKey::new("super-secret-key");
        let debug = format!("{:?}", settings.kv_value(&key));
        assert!(!debug.contains("super-secret-key"), "{debug}");
    }
}
