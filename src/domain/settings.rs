//! Index settings and query-config overrides as the table holds them, and the values the edge
//! search proxy reads from KV (docs/contract.md, "The settings table" and "KV values").

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::ids::{IndexId, IndexRef};
use super::net::{self, Protection};
use super::secrets::{AccountCell, ApiKey};

/// Version of the KV value layout; the proxy tolerates unknown fields, so additions keep it.
pub const SCHEMA_VERSION: u32 = 1;

/// An opaque document exported as JSON unchanged, kept as JSON text so that numbers keep
/// every digit the table holds (decoded from DynamoDB by [`crate::dynamo`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Document(Box<str>);

impl Document {
    /// JSON text the decoder wrote, which writes only valid JSON: not parsed again.
    pub(crate) fn from_json_text(text: String) -> Self {
        Document(text.into_boxed_str())
    }

    pub fn json_text(&self) -> &str {
        &self.0
    }
}

/// Written as the JSON text it is.
impl Serialize for Document {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let raw: &serde_json::value::RawValue =
            serde_json::from_str(&self.0).map_err(serde::ser::Error::custom)?;
        raw.serialize(serializer)
    }
}

impl From<serde_json::Value> for Document {
    fn from(value: serde_json::Value) -> Self {
        Document(value.to_string().into_boxed_str())
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

    /// Applies the legacy fields, which win over `index_aliases` when present.
    pub fn with_legacy(
        mut self,
        read_alias: Option<String>,
        legacy_writes: Option<Vec<IndexId>>,
    ) -> Self {
        if let Some(target) = non_empty(read_alias) {
            self.doc_reads = Some(DocReadsAlias {
                enabled: true,
                targets: vec![DocReadsTarget {
                    index_id: IndexId(target),
                    weight: 1.0,
                    internal: false,
                }],
            });
        }
        if let Some(ids) = legacy_writes {
            self.doc_writes = Some(DocWritesAlias {
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
        self
    }
}

/// Empty strings mean "not set" for optional string attributes: an empty shop id or alias
/// cannot name anything.
pub fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.is_empty())
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
    /// Whose API key its values carry: its account's in its cell (`default_cell` when unset).
    pub fn account_cell(&self, default_cell: &str) -> AccountCell {
        AccountCell {
            cell: self.cell.as_deref().unwrap_or(default_cell).to_owned(),
            account: self.index.account.clone(),
        }
    }

    /// Why its shop id cannot be a shop key (the record is then rejected as it is planned).
    pub fn shop_id_problem(&self) -> Option<String> {
        self.shop_id
            .as_deref()
            .and_then(super::validate::shop_id_problem)
    }

    /// What the settings name of other keys: their shop and live alias targets.
    pub fn references(&self) -> IndexRefs {
        IndexRefs {
            shops: self.shop_id.iter().cloned().collect(),
            targets: self.aliases.live_targets().map(|t| t.0.clone()).collect(),
            ..IndexRefs::default()
        }
    }

    /// About how many bytes the KV value takes (documents and strings, and the fixed layout),
    /// without rendering it.
    pub fn size_hint(&self) -> usize {
        let documents = [
            &self.search_config,
            &self.collections_config,
            &self.feature_flags,
            &self.agentic_config,
            &self.query_override_sharding,
        ];
        let documents: usize = documents
            .into_iter()
            .flatten()
            .map(|d| d.json_text().len())
            .sum();
        let strings = [&self.shop_id, &self.cell, &self.pixel_id]
            .into_iter()
            .flatten()
            .map(String::len)
            .sum::<usize>()
            + self.index_url.len()
            + 2 * (self.index.account.len() + self.index.name.len());
        let aliases: usize = (self.aliases.doc_reads.iter())
            .flat_map(|reads| &reads.targets)
            .map(|t| t.index_id.as_str().len() + 64)
            .sum::<usize>()
            + self.aliases.analytics.as_ref().map_or(0, |a| {
                a.index_id.as_ref().map_or(0, |id| id.as_str().len()) + 64
            });
        documents + strings + aliases + 400
    }

    /// The JSON the proxy reads under both of this index's keys.
    pub fn kv_value<'a>(&'a self, api_key: &'a ApiKey) -> KvSettings<'a> {
        KvSettings {
            schema_version: SCHEMA_VERSION,
            system_account_id: &self.index.account,
            index_name: &self.index.name,
            index_id: &self.index,
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

/// An index's references to other keys: the shops its keys are on and the index ids its live
/// aliases point at. Read from its settings record, what the record names (its shop, its live
/// targets, read fail closed from an invalid record); recorded in the ledger, a superset: a
/// writer adds what it is about to write before it writes it (an intent), the stream takes out
/// what its check confirmed the index no longer holds (docs/contract.md, "Concurrent
/// writers"), so what is recorded covers what KV holds for the index, whatever step a writer
/// stopped at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IndexRefs {
    pub shops: BTreeSet<String>,
    pub targets: BTreeSet<String>,
    /// As recorded: how many intents were recorded for the index, each writer's bumping it
    /// (an intent owns its members for its writer even when they were recorded already); the
    /// stream takes members out only if none came since it read (0 in a settings record's).
    pub intents: u64,
    /// The reconcile's mark on the record of an index the table no longer has (`None`: none).
    pub sweep: Option<SweepMark>,
}

/// A whole-fleet reconcile found the table without the index: its record's intents then, and
/// when (seconds since the epoch). The record goes only once the mark is [`IndexRefs::ripe`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SweepMark {
    pub intents: u64,
    pub at: u64,
}

/// How long a mark waits before its record can go: longer than any invocation lasts (Lambda's
/// 900 s at most) and a request it sent takes to land, so every write whose intent came before
/// the mark has landed (docs/contract.md, "The ledger is bounded by the live fleet").
pub const SWEEP_AFTER_SECONDS: u64 = 1_200;

impl IndexRefs {
    /// Whether the reconcile's sweep may take this record out now: marked, long enough ago that
    /// every invocation under way then has ended, with no intent since (every writer that read
    /// the mark counts one). The stream's own removal needs none of this: it follows its
    /// shard's every earlier write.
    pub fn ripe(&self, now: u64) -> bool {
        let waited = |at: u64| now >= at.saturating_add(SWEEP_AFTER_SECONDS);
        self.sweep.is_some_and(|mark| {
            mark.intents == self.intents && (waited(mark.at) || net::off(Protection::SweepWait))
        })
    }

    /// What the index refers to: each is the key of an item pointing back at it.
    pub fn referred(&self) -> BTreeSet<Referred> {
        let shops = self.shops.iter().cloned().map(Referred::Shop);
        let aliases = self.targets.iter().cloned().map(Referred::Alias);
        shops.chain(aliases).collect()
    }
}

/// Who is asked for: the indexes whose live aliases point at an index id, or that claim a shop.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Referred {
    Alias(String),
    Shop(String),
}

/// The value under `{shop_id}` and `{system_account_id}-{index_name}`.
#[derive(Debug, Serialize)]
pub struct KvSettings<'a> {
    pub schema_version: u32,
    pub system_account_id: &'a str,
    pub index_name: &'a str,
    /// `{system_account_id}-{index_name}`, written out where it goes.
    #[serde(serialize_with = "index_id")]
    pub index_id: &'a IndexRef,
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

fn index_id<S: serde::Serializer>(index: &&IndexRef, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(&format_args!("{}-{}", index.account, index.name))
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

#[derive(Debug, Serialize)]
pub struct KvQueryConfig<'a> {
    pub schema_version: u32,
    pub system_account_id: &'a str,
    pub index_name: &'a str,
    pub query: &'a str,
    pub config: &'a Document,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn bare() -> IndexSettings {
        IndexSettings {
            index: IndexRef::new("acct-1", "products"),
            index_url: "https://acct-1-products.example.com".into(),
            shop_id: None,
            cell: None,
            search_config: None,
            collections_config: None,
            feature_flags: None,
            agentic_config: None,
            query_override_sharding: None,
            pixel_id: None,
            aliases: IndexAliases::default(),
        }
    }

    fn full() -> IndexSettings {
        let document = |value: serde_json::Value| Some(Document::from(value));
        IndexSettings {
            index: IndexRef::new("acct \"quoted\"", "caf\u{e9}\nline"),
            index_url: "https://x.example.com/a\\b?q=\u{1}".into(),
            shop_id: Some("shop-1.myshopify.com".into()),
            cell: Some("cell-2".into()),
            search_config: document(json!({"limit": 20, "ratio": 0.75, "s": "\"q\""})),
            collections_config: document(json!([1, "two", null])),
            feature_flags: document(json!({"rerank": true})),
            agentic_config: document(json!("text")),
            query_override_sharding: document(json!({"shards": 4})),
            pixel_id: Some("px-1".into()),
            aliases: IndexAliases {
                doc_writes: None,
                doc_reads: Some(DocReadsAlias {
                    enabled: true,
                    targets: vec![DocReadsTarget {
                        index_id: IndexId("acct-1-other".into()),
                        weight: 0.1,
                        internal: true,
                    }],
                }),
                analytics: Some(AnalyticsAlias {
                    enabled: false,
                    index_id: None,
                    internal: false,
                }),
            },
        }
    }

    /// The 25 MiB check trusts `size_hint`: a value never renders to more than six times it
    /// (every byte escaped as `\u00XX`), whichever rendered field is large (`cell` is not
    /// rendered). A field the hint forgot would break that.
    #[test]
    fn a_value_holds_every_field_in_the_contract_s_order_and_no_write_alias() {
        let key = ApiKey::new("marqo-\"key\"");
        let rendered = serde_json::to_string(&full().kv_value(&key)).unwrap();
        let expected = json!({
            "schema_version": 1,
            "system_account_id": "acct \"quoted\"",
            "index_name": "caf\u{e9}\nline",
            "index_id": "acct \"quoted\"-caf\u{e9}\nline",
            "shop_id": "shop-1.myshopify.com",
            "marqo_api_key": "marqo-\"key\"",
            "index_url": "https://x.example.com/a\\b?q=\u{1}",
            "search_config": {"limit": 20, "ratio": 0.75, "s": "\"q\""},
            "collections_config": [1, "two", null],
            "feature_flags": {"rerank": true},
            "agentic_config": "text",
            "pixel_id": "px-1",
            "index_aliases": {
                "doc_reads": {"enabled": true, "targets": [
                    {"index_id": "acct-1-other", "weight": 0.1, "internal": true}]},
                "analytics": {"enabled": false, "index_id": null, "internal": false}
            },
            "query_override_sharding": {"shards": 4}
        });
        let value: serde_json::Value = serde_json::from_str(&rendered).unwrap();
        assert_eq!(value, expected);
        let mut at = 0;
        for name in [
            "schema_version",
            "system_account_id",
            "index_name",
            "index_id",
            "shop_id",
            "marqo_api_key",
            "index_url",
            "search_config",
            "collections_config",
            "feature_flags",
            "agentic_config",
            "pixel_id",
            "index_aliases",
            "query_override_sharding",
        ] {
            let found = rendered[at..].find(&format!("\"{name}\":")).expect(name);
            at += found;
        }
        let bare = serde_json::to_value(bare().kv_value(&key)).unwrap();
        assert_eq!(
            bare["index_aliases"],
            json!({"doc_reads": null, "analytics": null})
        );
        assert_eq!(bare["shop_id"], json!(null));
    }

    #[test]
    fn the_size_hint_bounds_the_rendered_value_whichever_field_is_large() {
        let huge = "\u{1}".repeat(100_000);
        let document = || Some(Document::from(json!({"k": huge})));
        let id = || IndexId(huge.clone());
        type Grow<'a> = Box<dyn Fn(&mut IndexSettings) + 'a>;
        let fields: Vec<(&str, Grow)> = vec![
            ("account", Box::new(|s| s.index.account = huge.clone())),
            ("name", Box::new(|s| s.index.name = huge.clone())),
            ("index_url", Box::new(|s| s.index_url = huge.clone())),
            ("shop_id", Box::new(|s| s.shop_id = Some(huge.clone()))),
            ("pixel_id", Box::new(|s| s.pixel_id = Some(huge.clone()))),
            (
                "search_config",
                Box::new(move |s| s.search_config = document()),
            ),
            (
                "collections_config",
                Box::new(move |s| s.collections_config = document()),
            ),
            (
                "feature_flags",
                Box::new(move |s| s.feature_flags = document()),
            ),
            (
                "agentic_config",
                Box::new(move |s| s.agentic_config = document()),
            ),
            (
                "query_override_sharding",
                Box::new(move |s| s.query_override_sharding = document()),
            ),
            (
                "doc_reads",
                Box::new(move |s| {
                    let target = DocReadsTarget {
                        index_id: id(),
                        weight: 1.0,
                        internal: false,
                    };
                    s.aliases.doc_reads = Some(DocReadsAlias {
                        enabled: true,
                        targets: vec![target],
                    })
                }),
            ),
            (
                "analytics",
                Box::new(move |s| {
                    s.aliases.analytics = Some(AnalyticsAlias {
                        enabled: true,
                        index_id: Some(id()),
                        internal: false,
                    })
                }),
            ),
        ];
        let key = ApiKey::new("k");
        for (field, grow) in fields {
            let mut settings = bare();
            grow(&mut settings);
            let rendered = serde_json::to_vec(&settings.kv_value(&key)).unwrap();
            assert!(
                rendered.len() > 100_000,
                "{field}: the large field is rendered"
            );
            assert!(
                rendered.len() <= 6 * (settings.size_hint() + key.expose().len()),
                "{field}: {} bytes rendered, hint {}",
                rendered.len(),
                settings.size_hint()
            );
        }
    }
}
