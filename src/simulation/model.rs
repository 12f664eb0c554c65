//! The reference model: what KV the table implies, written from the contract to be obviously
//! right, not fast. It reads the table's items as DynamoDB JSON (the simulation writes only the
//! attributes below) and shares no code with the plan, the snapshot or the check; the filter's
//! encoding is the domain's (`QueryFilter`).
#![cfg(test)]

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value};

use crate::domain::qfilter::QueryFilter;
use crate::domain::IndexRef;

/// What the table says one key must hold.
#[derive(Debug, Clone, PartialEq)]
pub enum Implied {
    /// Exactly this (the fields the model names, compared one by one).
    Value(Value),
    /// One of these (a shop several indexes claim).
    AnyOf(Vec<Value>),
}

/// The KV the table implies, and what it leaves open.
#[derive(Debug, Default)]
pub struct Model {
    /// (namespace, key) -> what it holds: "settings" or "query_configs".
    pub implied: BTreeMap<(&'static str, String), Implied>,
    /// Indexes whose settings record is rejected ("Validation": a rejected record leaves its
    /// keys as they were): a key naming one is left open.
    pub rejected: BTreeSet<IndexRef>,
    /// Removed indexes an enabled alias of a valid record reads ("Alias deletion safety"): their
    /// own key, and a shop key no valid record claims, may hold them (or be gone).
    pub kept: BTreeSet<IndexRef>,
    /// Removed indexes whose own key must hold them: when each was removed, a valid record whose
    /// alias the ledger recorded read it (and its key was there), and that record still does.
    pub guarded: BTreeSet<IndexRef>,
    /// Shops some valid record claims.
    pub claimed: BTreeSet<String>,
    /// The shop each rejected record's raw item claims (the reconcile counts it a claimer).
    pub rejected_shops: BTreeSet<(IndexRef, String)>,
    /// Indexes each of whose keys is open until the reconcile pass: those an operator's run
    /// again found removed (window: its write landed after the stream's delete, its check could
    /// not read).
    pub open_until_reconcile: BTreeSet<IndexRef>,
}

fn s<'a>(item: &'a Value, name: &str) -> Option<&'a str> {
    item.get(name)?.get("S")?.as_str().filter(|s| !s.is_empty())
}

/// A settings record's read alias as it takes effect ("Aliases": a legacy `read_alias` wins
/// over `index_aliases.doc_reads`): whether it is enabled, its targets, and their weights.
fn reads(item: &Value) -> Option<(bool, Vec<String>, Vec<String>)> {
    if let Some(legacy) = s(item, "read_alias") {
        return Some((true, vec![legacy.to_owned()], vec!["1".into()]));
    }
    let reads = item["index_aliases"]["M"].get("doc_reads")?.get("M")?;
    let enabled = reads["enabled"]["BOOL"].as_bool().unwrap_or(false);
    let targets = reads["targets"]["L"].as_array().into_iter().flatten();
    let (targets, weights) = targets
        .filter_map(|t| {
            let id = t["M"]["index_id"]["S"].as_str()?.to_owned();
            Some((id, t["M"]["weight"]["N"].as_str().unwrap_or("1").to_owned()))
        })
        .unzip();
    Some((enabled, targets, weights))
}

/// Whether a record's aliases cannot be read (a weight that is not a number).
fn unreadable(item: &Value) -> bool {
    let reads = &item["index_aliases"]["M"]["doc_reads"]["M"]["targets"]["L"];
    let weight = |t: &Value| t["M"].get("weight").cloned();
    (reads.as_array().into_iter().flatten())
        .any(|t| weight(t).is_some_and(|weight| weight.get("N").is_none()))
}

/// "Validation": an index whose endpoint is not https, whose shop id is no shop, whose aliases
/// cannot be read or hold a weight that is not a finite number, or whose account has no API key
/// in its cell, is rejected.
pub fn valid(item: &Value) -> bool {
    let weights = reads(item)
        .map(|(_, _, weights)| weights)
        .unwrap_or_default();
    let finite = (weights.iter()).all(|weight| weight.parse::<f64>().is_ok_and(f64::is_finite));
    let endpoint = s(item, "index_endpoint").is_some_and(|e| e.starts_with("https://"));
    let shop = s(item, "shop_id").is_none_or(is_shop);
    // An account has no API key in the hostile workload's `gone` cell.
    let api_key = s(item, "cell") != Some(super::GONE_CELL);
    endpoint && shop && finite && !unreadable(item) && api_key
}

/// A Shopify shop domain ("Validation": `{handle}.myshopify.com`, the handle of lower-case
/// letters, digits and hyphens).
fn is_shop(shop: &str) -> bool {
    let handle = shop.strip_suffix(".myshopify.com").unwrap_or_default();
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    !handle.is_empty() && handle.chars().all(allowed)
}

/// A settings record's analytics alias: whether it is enabled, and its target (if any).
fn analytics(item: &Value) -> Option<(bool, Option<String>)> {
    let analytics = item["index_aliases"]["M"].get("analytics")?.get("M")?;
    let enabled = analytics["enabled"]["BOOL"].as_bool().unwrap_or(false);
    Some((enabled, s(analytics, "index_id").map(str::to_owned)))
}

/// The index ids a settings record routes live traffic to: its enabled read targets and its
/// enabled analytics target ("Alias deletion safety").
pub fn live_targets(item: &Value) -> Vec<String> {
    if unreadable(item) {
        // "Alias safety fails closed".
        return named_targets(item);
    }
    let mut live = Vec::new();
    if let Some((true, targets, _)) = reads(item) {
        live.extend(targets);
    }
    if let Some((true, Some(target))) = analytics(item) {
        live.push(target);
    }
    live
}

/// Every index id a settings record names as an alias target, enabled or not.
pub fn named_targets(item: &Value) -> Vec<String> {
    let aliases = &item["index_aliases"]["M"];
    let reads = aliases["doc_reads"]["M"]["targets"]["L"].as_array();
    let reads = reads.into_iter().flatten().map(|t| &t["M"]);
    let named = reads.chain([&aliases["analytics"]["M"]]);
    let ids = named.filter_map(|alias| s(alias, "index_id"));
    let mut named: Vec<String> = ids.map(str::to_owned).collect();
    named.extend(s(item, "read_alias").map(str::to_owned));
    named
}

/// The fields of a settings value the model checks: whose it is, where it points, its shop,
/// its read and analytics aliases, its cell's API key.
pub fn settings_fields(index: &IndexRef, item: &Value) -> Value {
    let reads = reads(item).map_or(
        Value::Null,
        |(enabled, targets, _)| json!({"enabled": enabled, "targets": targets}),
    );
    let analytics = analytics(item).map_or(
        Value::Null,
        |(enabled, target)| json!({"enabled": enabled, "index_id": target}),
    );
    // Each cell's API key differs (the simulation's API keys service, `ports.rs`).
    let api_key = match s(item, "cell").unwrap_or("default") {
        "default" => format!("key-{}", index.account),
        cell => format!("key-{}@{cell}", index.account),
    };
    json!({
        "system_account_id": index.account, "index_name": index.name,
        "index_url": s(item, "index_endpoint"), "shop_id": s(item, "shop_id"), "reads": reads,
        "analytics": analytics, "api_key": api_key,
    })
}

/// The same fields of a settings value as KV holds it.
pub fn settings_fields_in_kv(value: &Value) -> Value {
    let aliases = &value["index_aliases"];
    let reads = &aliases["doc_reads"];
    let reads = match reads.is_null() {
        true => Value::Null,
        false => {
            let targets: Vec<&Value> = (reads["targets"].as_array().into_iter().flatten())
                .map(|t| &t["index_id"])
                .collect();
            json!({"enabled": reads["enabled"], "targets": targets})
        }
    };
    let analytics = match aliases["analytics"].is_null() {
        true => Value::Null,
        false => json!({"enabled": aliases["analytics"]["enabled"],
                        "index_id": aliases["analytics"]["index_id"]}),
    };
    json!({
        "system_account_id": value["system_account_id"], "index_name": value["index_name"],
        "index_url": value["index_url"], "shop_id": value["shop_id"], "reads": reads,
        "analytics": analytics, "api_key": value["marqo_api_key"],
    })
}

/// The index of the universe an id names (no id names two).
pub fn index_of_id(id: &str) -> IndexRef {
    let accounts = ["a", "b", "a-x"];
    let names = ["x", "x!y", "x-y", "z"];
    let indexes = accounts
        .iter()
        .flat_map(|a| names.iter().map(move |n| (*a, *n)));
    let mut named = indexes.filter(|(a, n)| format!("{a}-{n}") == id);
    let (account, name) = named.next().expect("an index of the universe");
    assert!(named.next().is_none(), "{id} names two indexes");
    IndexRef::new(account, name)
}

/// The lower-case hex SHA-256 of the query ("KV values": the query-config key).
fn query_hash(query: &str) -> String {
    use sha2::Digest;
    let hash = sha2::Sha256::digest(query.as_bytes());
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

impl Model {
    /// What the table (its items, DynamoDB JSON by key) implies.
    pub fn of(table: &BTreeMap<(String, String), Value>) -> Model {
        let mut model = Model::default();
        let mut settings: BTreeMap<IndexRef, &Value> = BTreeMap::new();
        let mut overrides: BTreeMap<IndexRef, Vec<(String, &Value)>> = BTreeMap::new();
        for ((pk, sk), item) in table {
            let Some(rest) = sk.strip_prefix("INDEX#") else {
                continue;
            };
            match rest.split_once("#QUERY#") {
                Some((name, query)) => {
                    let index = IndexRef::new(pk, name);
                    let config = &item["query_config"];
                    overrides
                        .entry(index)
                        .or_default()
                        .push((query.into(), config));
                }
                None => {
                    settings.insert(IndexRef::new(pk, rest), item);
                }
            }
        }
        let mut by_shop: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        let mut read: BTreeSet<String> = BTreeSet::new();
        for (index, item) in &settings {
            // A record's live targets protect them, rejected or not ("Alias safety fails
            // closed": its aliases are read from the raw item).
            let live = live_targets(item).into_iter();
            read.extend(live.filter(|t| *t != index.id().0));
            if !valid(item) {
                model.rejected.insert(index.clone());
                if let Some(shop) = s(item, "shop_id") {
                    model
                        .rejected_shops
                        .insert((index.clone(), shop.to_owned()));
                }
                continue;
            }
            let fields = settings_fields(index, item);
            let own = format!("{}-{}", index.account, index.name);
            model
                .implied
                .insert(("settings", own), Implied::Value(fields.clone()));
            if let Some(shop) = s(item, "shop_id") {
                by_shop.entry(shop.to_owned()).or_default().push(fields);
            }
        }
        for (shop, values) in by_shop {
            model.claimed.insert(shop.clone());
            model
                .implied
                .insert(("settings", shop), Implied::AnyOf(values));
        }
        // A removed index an alias reads (no id names two indexes of the universe).
        for id in read {
            let index = index_of_id(&id);
            if !settings.contains_key(&index) {
                model.kept.insert(index);
            }
        }
        model.add_overrides(overrides);
        model
    }

    /// "Query-override filter": query configs and filters follow the override records.
    fn add_overrides(&mut self, overrides: BTreeMap<IndexRef, Vec<(String, &Value)>>) {
        for (index, configs) in overrides {
            let (account, name) = (&index.account, &index.name);
            for (query, config) in &configs {
                let key = format!("qcfg-{account}-{name}-{}", query_hash(query));
                let boost = config["M"]["boost"]["N"]
                    .as_str()
                    .map(|n| n.parse::<u64>().unwrap());
                let value = json!({"system_account_id": account, "index_name": name,
                                   "query": query, "config": {"boost": boost}});
                let implied = Implied::Value(value);
                self.implied.insert(("query_configs", key), implied);
            }
            let queries: Vec<String> = configs.iter().map(|(q, _)| q.clone()).collect();
            let filter = serde_json::to_value(QueryFilter::build(&index, queries)).unwrap();
            let key = format!("qfilter-{account}-{name}");
            let implied = Implied::Value(filter);
            self.implied.insert(("query_configs", key), implied);
        }
    }
}
