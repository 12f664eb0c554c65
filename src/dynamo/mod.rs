//! DynamoDB's attribute-value format, read into the domain: sort keys, opaque documents,
//! index settings, query configs and alias references (docs/contract.md, "The settings table").

use std::collections::HashMap;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_dynamo::{AttributeValue, Item};

mod json;
pub(crate) mod stream;

use crate::domain::settings::{non_empty, Document, IndexAliases};
use crate::domain::validate::{endpoint_problem, shown};
use crate::domain::TableKey;
use crate::domain::{Change, ChangeRecord, Outcome};
use crate::domain::{IndexId, IndexRef, IndexRefs, IndexSettings, InvalidRecord, QueryConfig};

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

/// DynamoDB's name of a value's type, for errors.
fn type_name(value: &AttributeValue) -> &'static str {
    match value {
        AttributeValue::S(_) => "S",
        AttributeValue::N(_) => "N",
        AttributeValue::B(_) => "B",
        AttributeValue::Bool(_) => "BOOL",
        AttributeValue::Null(_) => "NULL",
        AttributeValue::M(_) => "M",
        AttributeValue::L(_) => "L",
        AttributeValue::Ss(_) => "SS",
        AttributeValue::Ns(_) => "NS",
        AttributeValue::Bs(_) => "BS",
    }
}

/// A string attribute of an item (a table item, a stream image), if it is one.
pub fn string_attribute<'a>(item: &'a Item, name: &str) -> Option<&'a str> {
    match item.get(name) {
        Some(AttributeValue::S(s)) => Some(s),
        _ => None,
    }
}

/// An opaque document attribute as JSON; `NULL` or absent is `None`.
fn document(image: &Item, name: &str) -> Result<Option<Document>, InvalidRecord> {
    match image.get(name) {
        None | Some(AttributeValue::Null(_)) => Ok(None),
        Some(value) => Ok(Some(Document::from_json_text(json::to_json(value, name)?))),
    }
}

/// A string attribute; `NULL` or absent is `None`, any other type is an error.
fn string_field(image: &Item, name: &str) -> Result<Option<String>, InvalidRecord> {
    match image.get(name) {
        None | Some(AttributeValue::Null(_)) => Ok(None),
        Some(AttributeValue::S(s)) => Ok(Some(s.clone())),
        Some(other) => Err(InvalidRecord::BadAttribute {
            path: name.to_owned(),
            message: format!("expected a string (S), found {}", type_name(other)),
        }),
    }
}

/// A structured attribute read as `T` by `serde_dynamo`; `NULL` or absent is `None`. A value
/// that cannot be read says where, below `name`.
fn typed<T: DeserializeOwned>(image: &Item, name: &str) -> Result<Option<T>, InvalidRecord> {
    let Some(value) = (image.get(name)).filter(|v| !matches!(v, AttributeValue::Null(_))) else {
        return Ok(None);
    };
    let read = || serde_dynamo::Deserializer::from_attribute_value(value.clone());
    if let Ok(value) = T::deserialize(read()) {
        return Ok(Some(value));
    }
    // Only a value that fails is read again, tracking where, to say so.
    serde_path_to_error::deserialize::<_, T>(read())
        .map(Some)
        .map_err(|e| InvalidRecord::BadAttribute {
            path: match e.path().to_string().as_str() {
                "." => name.to_owned(),
                inner => format!("{name}.{inner}"),
            },
            message: e.inner().to_string(),
        })
}

#[derive(Deserialize)]
struct AddDocsConfig {
    index_write_aliases: Option<Vec<IndexId>>,
}

/// An `INDEX#{name}` record's attributes as the index's settings.
pub fn index_settings(index: IndexRef, image: &Item) -> Result<IndexSettings, InvalidRecord> {
    let index_url = non_empty(string_field(image, "index_endpoint")?)
        .ok_or(InvalidRecord::Missing("index_endpoint"))?;
    if let Some(message) = endpoint_problem(&index_url) {
        // The proxy sends searches, with the account's API key, wherever this points.
        let path = "index_endpoint".into();
        return Err(InvalidRecord::BadAttribute { path, message });
    }
    let search_config = document(image, "search_config")?;
    let collections_config = document(image, "collections_config")?;
    let feature_flags = document(image, "feature_flags")?;
    let agentic_config = document(image, "agentic_config")?;
    let query_override_sharding = document(image, "query_override_sharding")?;
    let shop_id = non_empty(string_field(image, "shop_id")?);
    let cell = non_empty(string_field(image, "cell")?);
    let pixel_id = string_field(image, "pixel_id")?;
    let read_alias = string_field(image, "read_alias")?;
    let legacy_writes =
        typed::<AddDocsConfig>(image, "add_docs_config")?.and_then(|c| c.index_write_aliases);
    let aliases = typed::<IndexAliases>(image, "index_aliases")?
        .unwrap_or_default()
        .with_legacy(read_alias, legacy_writes);
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
        shop_id,
        cell,
        search_config,
        collections_config,
        feature_flags,
        agentic_config,
        query_override_sharding,
        pixel_id,
        aliases,
    })
}

/// The shop key an index's item claims, read from its raw attributes. Tolerant: anything
/// undecodable simply claims no shop.
pub fn shop_id_of(image: &Item) -> Option<String> {
    string_attribute(image, "shop_id")
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// What a settings record names of other keys: its shop and live alias targets, read by the
/// rule its value is ([`IndexAliases::live_targets`]). Fails closed: when the aliases cannot be
/// read, every index id the record names protects its index, and the reason comes back for a
/// warning.
pub fn settings_references(image: &Item) -> (IndexRefs, Option<InvalidRecord>) {
    let read = typed::<IndexAliases>(image, "index_aliases")
        .and_then(|aliases| Ok((aliases, string_field(image, "read_alias")?)));
    let (targets, problem): (Vec<IndexId>, _) = match read {
        Ok((aliases, read_alias)) => {
            let aliases = aliases.unwrap_or_default().with_legacy(read_alias, None);
            (aliases.live_targets().cloned().collect(), None)
        }
        Err(problem) => (named_index_ids(image), Some(problem)),
    };
    let references = IndexRefs {
        shops: shop_id_of(image).into_iter().collect(),
        targets: targets.into_iter().map(|target| target.0).collect(),
        ..IndexRefs::default()
    };
    (references, problem)
}

/// Every string under an `index_id` key in `index_aliases`, and `read_alias`: what an
/// unreadable record might point at.
fn named_index_ids(image: &Item) -> Vec<IndexId> {
    fn walk(value: &AttributeValue, under_index_id: bool, found: &mut Vec<IndexId>) {
        match value {
            AttributeValue::S(s) if under_index_id && !s.is_empty() => {
                found.push(IndexId(s.clone()))
            }
            AttributeValue::M(map) => {
                for (name, value) in map {
                    walk(value, name == "index_id", found);
                }
            }
            AttributeValue::L(list) => list.iter().for_each(|v| walk(v, false, found)),
            _ => {}
        }
    }
    let mut found = Vec::new();
    if let Some(aliases) = image.get("index_aliases") {
        walk(aliases, false, &mut found);
    }
    if let Some(legacy) = image.get("read_alias") {
        walk(legacy, true, &mut found);
    }
    found.sort();
    found.dedup();
    found
}

/// An `INDEX#{name}#QUERY#{query}` record's override.
pub fn query_config(
    index: IndexRef,
    query: String,
    image: &Item,
) -> Result<QueryConfig, InvalidRecord> {
    let config = document(image, "query_config")?.ok_or(InvalidRecord::Missing("query_config"))?;
    Ok(QueryConfig {
        index,
        query,
        config,
    })
}

/// A table item read into the domain as a record (its sort key says what it is), with what a
/// settings item names of other keys (read fail closed from an invalid record: its KV value,
/// written when it was valid, may still route there). A settings record stands for none of its
/// overrides ([`ChangeRecord::asked`] says otherwise for a read that holds them).
pub fn table_record(item: &Item, default_configs_sk: &str) -> (ChangeRecord, Option<IndexRefs>) {
    let ended = |outcome| (ChangeRecord::of(None, Err(outcome)), None);
    let (Some(pk), Some(sk)) = (string_attribute(item, "pk"), string_attribute(item, "sk")) else {
        let reason = "the item's keys must hold string `pk` and `sk`";
        return ended(Outcome::Rejected(reason.into()));
    };
    let rejected = |e: InvalidRecord| Outcome::Rejected(e.to_string());
    match SortKey::parse(sk, default_configs_sk) {
        SortKey::DefaultConfigs => ended(Outcome::Skipped(
            "default configs are never exported".into(),
        )),
        SortKey::Foreign => ended(Outcome::Skipped(format!(
            "sort key {} is not an index record",
            shown(sk)
        ))),
        SortKey::Index(name) => {
            let index = IndexRef::new(pk, name);
            let settings = index_settings(index.clone(), item).map(Arc::new);
            let references = match &settings {
                Ok(settings) => settings.references(),
                Err(_) => settings_references(item).0,
            };
            let upsert = |settings| Change::UpsertIndex {
                settings,
                with_overrides: false,
            };
            let decoded = settings.map(upsert).map_err(rejected);
            (ChangeRecord::of(Some(index), decoded), Some(references))
        }
        SortKey::Query { index, query } => {
            let index = IndexRef::new(pk, index);
            let config = query_config(index.clone(), query, item);
            let decoded = config.map(Change::UpsertQuery).map_err(rejected);
            (ChangeRecord::of(Some(index), decoded), None)
        }
    }
}

/// An item's key (`None` without string `pk` and `sk`, which no item of the table lacks).
pub fn table_key(item: &Item) -> Option<TableKey> {
    let key = (string_attribute(item, "pk")?, string_attribute(item, "sk")?);
    Some(TableKey::new(key.0, key.1))
}

/// A key as DynamoDB takes it (`ExclusiveStartKey`, a `GetItem`).
pub fn key_item(key: &TableKey) -> Item {
    let text = |s: &str| AttributeValue::S(s.to_owned());
    let key = [("pk", text(key.pk())), ("sk", text(key.sk()))];
    Item::from(HashMap::from(
        key.map(|(name, value)| (name.to_owned(), value)),
    ))
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

    /// An item from DynamoDB JSON.
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
            &item(json!({
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
            &item(json!({
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
            &item(json!({
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
        let err = index_settings(products(), &item(json!({"shop_id": {"S": "s"}}))).unwrap_err();
        assert_eq!(err.to_string(), "attribute `index_endpoint` is required");
    }

    #[test]
    fn wrong_attribute_type_names_the_path() {
        let err = index_settings(
            products(),
            &item(json!({
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
            &item(json!({
                "index_endpoint": {"S": "https://idx"},
                "search_config": {"M": {"huge": {"N": "1e400"}}}
            })),
        )
        .unwrap_err();
        assert!(err.to_string().contains("search_config"), "{err}");
    }

    #[test]
    fn numbers_reach_kv_with_every_digit_the_table_holds() {
        let settings = index_settings(
            products(),
            &item(json!({
                "index_endpoint": {"S": "https://idx"},
                "search_config": {"M": {
                    "big": {"N": "123456789012345678901234567890"},
                    "precise": {"N": "0.123456789012345678901234567890123456"},
                    "small": {"N": "-1.5E-130"},
                    "set": {"NS": ["1", "99999999999999999999999999999999999999"]}
                }}
            })),
        )
        .unwrap();
        assert_eq!(
            settings.search_config.unwrap().json_text(),
            r#"{"big":123456789012345678901234567890,"precise":0.123456789012345678901234567890123456,"set":[1,99999999999999999999999999999999999999],"small":-1.5E-130}"#
        );
        for outside in [
            "1234567890123456789012345678901234567890",
            "1E+126",
            "1e-131",
            "01",
            "1.",
            "NaN",
        ] {
            let err = index_settings(
                products(),
                &item(json!({"index_endpoint": {"S": "https://idx"},
                    "feature_flags": {"L": [{"N": outside}]}})),
            )
            .unwrap_err();
            assert!(
                err.to_string().contains("feature_flags[0]"),
                "{outside}: {err}"
            );
        }
    }

    #[test]
    fn negative_weights_are_rejected() {
        let err = index_settings(
            products(),
            &item(json!({
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
            &item(json!({
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
        let (reference, problem) = settings_references(&item(json!({
            "read_alias": {"S": "acct-1-legacy"},
            "index_aliases": {"M": {
                "doc_reads": {"M": {"enabled": {"BOOL": true}, "targets": {"L": [
                    {"M": {"index_id": {"S": "acct-1-shadowed"}, "weight": {"N": "1"}}}]}}},
                "analytics": {"M": {"enabled": {"BOOL": false}, "index_id": {"S": "acct-1-off"}}}
            }}
        })));
        assert_eq!(problem, None);
        assert_eq!(reference.targets, ["acct-1-legacy".to_owned()].into());
    }

    #[test]
    fn an_unreadable_alias_protects_every_index_it_names() {
        // A hand edit stored a weight as a string: the targets still protect their indexes.
        let (reference, problem) = settings_references(&item(json!({
            "shop_id": {"S": "shop-1"},
            "index_aliases": {"M": {
                "doc_reads": {"M": {"enabled": {"BOOL": true}, "targets": {"L": [
                    {"M": {"index_id": {"S": "acct-1-a"}, "weight": {"S": "0.5"}}}]}}}
            }}
        })));
        assert!(
            problem.is_some(),
            "the weight is read as the value reads it"
        );
        assert_eq!(reference.targets, ["acct-1-a".to_owned()].into());
        assert_eq!(reference.shops, ["shop-1".to_owned()].into());

        let (reference, problem) = settings_references(&item(json!({
            "index_aliases": {"M": {
                "doc_reads": {"M": {"enabled": {"S": "yes"}, "targets": {"L": [
                    {"M": {"index_id": {"S": "acct-1-a"}}}]}}},
                "analytics": {"M": {"enabled": {"BOOL": false}, "index_id": {"S": "acct-1-b"}}}
            }}
        })));
        assert!(problem.is_some(), "an unreadable `enabled` is reported");
        let targets = ["acct-1-a".to_owned(), "acct-1-b".to_owned()];
        assert_eq!(reference.targets, targets.into());
    }

    #[test]
    fn api_keys_never_show_in_debug() {
        let settings = index_settings(
            products(),
            &item(json!({"index_endpoint": {"S": "https://idx"}})),
        )
        .unwrap();
        let key = ApiKey::new("super-secret-key");
        let debug = format!("{:?}", settings.kv_value(&key));
        assert!(!debug.contains("super-secret-key"), "{debug}");
    }
}
