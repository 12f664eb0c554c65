//! DynamoDB's attribute-value format, read into the domain: sort keys, opaque documents,
//! index settings, query configs and alias references (docs/contract.md, "The settings table").

use std::collections::HashMap;

use base64::Engine as _;
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

/// Cloudflare receives numbers exactly as DynamoDB holds them: at most 38 significant digits,
/// magnitudes from 1E-130 to under 1E+126.
const MAX_DIGITS: usize = 38;
const EXPONENTS: std::ops::RangeInclusive<i64> = -130..=125;

/// Checks a DynamoDB number's text: JSON's number grammar, within DynamoDB's range.
fn check_number(n: &str) -> Result<(), String> {
    let invalid = || format!("`{n}` is not a number");
    let unsigned = n.strip_prefix('-').unwrap_or(n);
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(at) => (&unsigned[..at], Some(&unsigned[at + 1..])),
        None => (unsigned, None),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(int) || (int.len() > 1 && int.starts_with('0')) {
        return Err(invalid());
    }
    if mantissa.contains('.') && !digits(frac) {
        return Err(invalid());
    }
    let exponent: i64 = match exponent {
        None => 0,
        Some(e) if digits(e.strip_prefix(['+', '-']).unwrap_or(e)) => {
            e.parse().map_err(|_| invalid())?
        }
        Some(_) => return Err(invalid()),
    };
    let all: Vec<u8> = int.bytes().chain(frac.bytes()).collect();
    let Some(first) = all.iter().position(|&b| b != b'0') else {
        return Ok(()); // zero
    };
    let last = all.iter().rposition(|&b| b != b'0').unwrap_or(first);
    let leading_power = exponent + int.len() as i64 - first as i64 - 1;
    if last - first + 1 > MAX_DIGITS || !EXPONENTS.contains(&leading_power) {
        return Err(format!(
            "number `{n}` is outside DynamoDB's range (38 digits, 1E-130 to 9.99E+125)"
        ));
    }
    Ok(())
}

/// Writes an attribute value as JSON: numbers verbatim, sets as arrays, binary as base64, map
/// keys in order. `path` names the attribute in errors.
fn write_json(value: &AttributeValue, path: &str, out: &mut String) -> Result<(), InvalidRecord> {
    let bad = |message: String| InvalidRecord::BadAttribute {
        path: path.to_owned(),
        message,
    };
    let string = |s: &str, out: &mut String| {
        out.push_str(&serde_json::to_string(s).expect("strings serialize"))
    };
    let base64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    match value {
        AttributeValue::N(n) => {
            check_number(n).map_err(bad)?;
            out.push_str(n);
        }
        AttributeValue::S(s) => string(s, out),
        AttributeValue::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        AttributeValue::Null(_) => out.push_str("null"),
        AttributeValue::B(b) => string(&base64(b), out),
        AttributeValue::M(map) => {
            let mut names: Vec<&String> = map.keys().collect();
            names.sort();
            out.push('{');
            for (i, name) in names.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                string(name, out);
                out.push(':');
                write_json(&map[name], &format!("{path}.{name}"), out)?;
            }
            out.push('}');
        }
        AttributeValue::L(list) => {
            out.push('[');
            for (i, item) in list.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json(item, &format!("{path}[{i}]"), out)?;
            }
            out.push(']');
        }
        AttributeValue::Ss(set) => {
            out.push('[');
            for (i, s) in set.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                string(s, out);
            }
            out.push(']');
        }
        AttributeValue::Ns(set) => {
            out.push('[');
            for (i, n) in set.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                check_number(n).map_err(bad)?;
                out.push_str(n);
            }
            out.push(']');
        }
        AttributeValue::Bs(set) => {
            out.push('[');
            for (i, b) in set.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                string(&base64(b), out);
            }
            out.push(']');
        }
    }
    Ok(())
}

/// Takes an opaque document attribute out of the item; `NULL` or absent is `None`.
fn take_document(
    attributes: &mut HashMap<String, AttributeValue>,
    name: &str,
) -> Result<Option<Document>, InvalidRecord> {
    match attributes.remove(name) {
        None | Some(AttributeValue::Null(_)) => Ok(None),
        Some(value) => {
            let mut text = String::new();
            write_json(&value, name, &mut text)?;
            let document =
                Document::from_json_text(text).map_err(|e| InvalidRecord::BadAttribute {
                    path: name.to_owned(),
                    message: e.to_string(),
                })?;
            Ok(Some(document))
        }
    }
}

/// The typed attributes of an index-settings record as stored (documents are taken first).
#[derive(Deserialize)]
struct SettingsAttributes {
    index_endpoint: Option<String>,
    shop_id: Option<String>,
    cell: Option<String>,
    pixel_id: Option<String>,
    index_aliases: Option<IndexAliases>,
    read_alias: Option<String>,
    add_docs_config: Option<AddDocsConfig>,
}

#[derive(Deserialize)]
struct AddDocsConfig {
    index_write_aliases: Option<Vec<IndexId>>,
}

/// The parts of a settings record that other records' removal depends on: only `enabled` and
/// the target ids, so a hand-edited weight cannot switch the protection off.
#[derive(Deserialize)]
struct ReferenceAttributes {
    index_aliases: Option<ReferenceAliases>,
    read_alias: Option<String>,
}

#[derive(Deserialize)]
struct ReferenceAliases {
    doc_reads: Option<ReferenceReads>,
    analytics: Option<ReferenceAnalytics>,
}

#[derive(Deserialize)]
struct ReferenceReads {
    #[serde(default)]
    enabled: bool,
    #[serde(default)]
    targets: Vec<ReferenceTarget>,
}

#[derive(Deserialize)]
struct ReferenceTarget {
    index_id: IndexId,
}

#[derive(Deserialize)]
struct ReferenceAnalytics {
    #[serde(default)]
    enabled: bool,
    index_id: Option<IndexId>,
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
    let mut attributes = item.into_inner();
    let mut document = |name| take_document(&mut attributes, name);
    let search_config = document("search_config")?;
    let collections_config = document("collections_config")?;
    let feature_flags = document("feature_flags")?;
    let agentic_config = document("agentic_config")?;
    let query_override_sharding = document("query_override_sharding")?;
    let attrs: SettingsAttributes = decode(Item::from(attributes))?;
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
        search_config,
        collections_config,
        feature_flags,
        agentic_config,
        query_override_sharding,
        pixel_id: attrs.pixel_id,
        aliases,
    })
}

/// The shop key an index's record claims, read from an old image. Tolerant: anything
/// undecodable simply claims no shop.
pub fn shop_id_of(item: &Item) -> Option<String> {
    string_attribute(item, "shop_id")
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// What a settings record says about other indexes: its shop and live alias targets. Fails
/// closed: when the aliases cannot be read, every index id the record names protects its index,
/// and the reason comes back for a warning.
pub fn settings_reference(
    index: IndexRef,
    item: Item,
) -> (SettingsReference, Option<InvalidRecord>) {
    let shop_id = shop_id_of(&item);
    let (live_targets, problem) = match decode::<ReferenceAttributes>(item.clone()) {
        Ok(attrs) => (reference_targets(attrs), None),
        Err(problem) => (named_index_ids(&item), Some(problem)),
    };
    let reference = SettingsReference {
        index,
        shop_id,
        live_targets,
    };
    (reference, problem)
}

/// Enabled read targets (the legacy `read_alias` wins) and an enabled analytics target.
fn reference_targets(attrs: ReferenceAttributes) -> Vec<IndexId> {
    let (reads, analytics) = attrs
        .index_aliases
        .map_or((None, None), |a| (a.doc_reads, a.analytics));
    let reads: Vec<IndexId> = match non_empty(attrs.read_alias) {
        Some(legacy) => vec![IndexId(legacy)],
        None => reads
            .filter(|r| r.enabled)
            .map(|r| r.targets.into_iter().map(|t| t.index_id).collect())
            .unwrap_or_default(),
    };
    let analytics = analytics.filter(|a| a.enabled).and_then(|a| a.index_id);
    reads.into_iter().chain(analytics).collect()
}

/// Every string under an `index_id` key in `index_aliases`, and `read_alias`: what an
/// unreadable record might point at.
fn named_index_ids(item: &Item) -> Vec<IndexId> {
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
    if let Some(aliases) = item.get("index_aliases") {
        walk(aliases, false, &mut found);
    }
    if let Some(AttributeValue::S(legacy)) = item.get("read_alias") {
        walk(&AttributeValue::S(legacy.clone()), true, &mut found);
    }
    found.sort();
    found.dedup();
    found
}

/// An `INDEX#{name}#QUERY#{query}` record's override.
pub fn query_config(
    index: IndexRef,
    query: String,
    item: Item,
) -> Result<QueryConfig, InvalidRecord> {
    let config = take_document(&mut item.into_inner(), "query_config")?
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
    fn numbers_reach_kv_with_every_digit_the_table_holds() {
        let settings = index_settings(
            products(),
            item(json!({
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
                item(json!({"index_endpoint": {"S": "https://idx"},
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
        let (reference, problem) = settings_reference(
            IndexRef::new("acct-1", "front"),
            item(json!({
                "read_alias": {"S": "acct-1-legacy"},
                "index_aliases": {"M": {
                    "doc_reads": {"M": {"enabled": {"BOOL": true}, "targets": {"L": [
                        {"M": {"index_id": {"S": "acct-1-shadowed"}, "weight": {"N": "1"}}}]}}},
                    "analytics": {"M": {"enabled": {"BOOL": false}, "index_id": {"S": "acct-1-off"}}}
                }}
            })),
        );
        assert_eq!(problem, None);
        assert_eq!(
            reference.live_targets,
            vec![IndexId("acct-1-legacy".into())]
        );
    }

    #[test]
    fn an_unreadable_alias_protects_every_index_it_names() {
        // A hand edit stored a weight as a string: the targets still protect their indexes.
        let (reference, problem) = settings_reference(
            IndexRef::new("acct-1", "front"),
            item(json!({
                "shop_id": {"S": "shop-1"},
                "index_aliases": {"M": {
                    "doc_reads": {"M": {"enabled": {"BOOL": true}, "targets": {"L": [
                        {"M": {"index_id": {"S": "acct-1-a"}, "weight": {"S": "0.5"}}}]}}}
                }}
            })),
        );
        assert_eq!(problem, None, "the weight is not read for protection");
        assert_eq!(reference.live_targets, vec![IndexId("acct-1-a".into())]);
        assert_eq!(reference.shop_id.as_deref(), Some("shop-1"));

        let (reference, problem) = settings_reference(
            IndexRef::new("acct-1", "front"),
            item(json!({
                "index_aliases": {"M": {
                    "doc_reads": {"M": {"enabled": {"S": "yes"}, "targets": {"L": [
                        {"M": {"index_id": {"S": "acct-1-a"}}}]}}},
                    "analytics": {"M": {"enabled": {"BOOL": false}, "index_id": {"S": "acct-1-b"}}}
                }}
            })),
        );
        assert!(problem.is_some(), "an unreadable `enabled` is reported");
        assert_eq!(
            reference.live_targets,
            vec![IndexId("acct-1-a".into()), IndexId("acct-1-b".into())]
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
