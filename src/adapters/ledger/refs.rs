//! Each index's references in the ledger (docs/contract.md, "Concurrent writers"): every shop
//! its keys may be on and every target its aliases may point at (`pk = "ref#{index}"`,
//! `sk = "refs"`: string sets `shops` and `targets`), added before a write and taken out once
//! the stream's check confirmed them, and, for lookups by key instead of a table scan, who refers to each shop and alias target:
//! one item each (`pk = "shop#{shop_id}"` or `"alias#{target index id}"`, `sk = "referrers"`)
//! whose string set `referrers` names them, read 100 a BatchGetItem and changed by `ADD` and
//! `DELETE` in transactions, so writers of one set never overwrite each other. A set holds
//! [`MAX_REFERRERS`] at most (DynamoDB's 400 KB item); a referrer past that gets an item of its
//! own in the same partition (`sk = "{index}"`, naming it in `account` and `index`) and the set
//! item `overflow`, which makes readers Query the partition. An index is written
//! `{length of account}:{account}#{index}`, so no two indexes share one.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use aws_sdk_dynamodb::types::AttributeValue;

use aws_sdk_dynamodb::types::builders::UpdateBuilder;
use aws_sdk_dynamodb::types::TransactWriteItem;

use super::Found;
use super::{item_of, n, number, progress_of, update_action};
use super::{DynamoLedger, Item};
use super::{PROGRESS_PK, PROGRESS_SK};
use crate::domain::IndexRef;
use crate::dynamo::string_attribute;
use crate::ports::{IndexRefs, Ledger, PortError, ReconcileProgress, Referred, RefsChange};
use crate::ports::{RecordedPage, SweepMark};

mod shrink;
use serde_dynamo::AttributeValue as Value;
use shrink::unchanged_intents;

/// An index's own references.
const REF_SK: &str = "refs";
const META_PK: &str = "meta";
/// The references are complete (set by a full backfill).
const META_SK: &str = "references";
const REFERRERS_SK: &str = "referrers";
/// A reconcile's mark on a removed index's own item: its intents then, and when.
const SWEPT_INTENTS: &str = "swept_intents";
const SWEPT_AT: &str = "swept_at";
pub(super) const SET: &str = "referrers";
/// Members a set item holds at most: 700 of the longest index keys (516 bytes) fit in 400 KB.
const MAX_REFERRERS: usize = 700;

fn index_key(index: &IndexRef) -> String {
    format!("{}:{}#{}", index.account.len(), index.account, index.name)
}

/// The index an index key names (`None`: not one).
fn index_of_key(key: &str) -> Option<IndexRef> {
    let (length, rest) = key.split_once(':')?;
    let account = rest.get(..length.parse().ok()?)?;
    let name = rest.get(account.len()..)?.strip_prefix('#')?;
    Some(IndexRef::new(account, name))
}

fn ref_pk(index: &IndexRef) -> String {
    format!("ref#{}", index_key(index))
}

fn referred_pk(referred: &Referred) -> String {
    match referred {
        Referred::Alias(id) => format!("alias#{id}"),
        Referred::Shop(shop) => format!("shop#{shop}"),
    }
}

/// An item keyed `pk` / `sk` that names `index`.
fn named(pk: String, sk: &str, index: &IndexRef) -> Item {
    Item::key(pk, sk)
        .with("account", AttributeValue::S(index.account.clone()))
        .with("index", AttributeValue::S(index.name.clone()))
}

fn index_of(item: &Found) -> Option<IndexRef> {
    Some(IndexRef::new(
        string_attribute(item, "account")?,
        string_attribute(item, "index")?,
    ))
}

fn refs_of(item: &Found) -> IndexRefs {
    let set = |name: &str| match item.get(name) {
        Some(Value::Ss(members)) => members.iter().cloned().collect(),
        _ => BTreeSet::new(),
    };
    let sweep = number(item, SWEPT_INTENTS).zip(number(item, SWEPT_AT));
    IndexRefs {
        shops: set("shops"),
        targets: set("targets"),
        intents: number(item, "intents").unwrap_or_default(),
        sweep: sweep.map(|(intents, at)| SweepMark { intents, at }),
    }
}

/// The index whose own item this is.
fn index_of_ref(item: &Found) -> Option<IndexRef> {
    index_of_key(string_attribute(item, "pk")?.strip_prefix("ref#")?)
}

/// The string sets of an index's own item that `referred` names (`shops`, `targets`).
fn own_sets<'r>(referred: impl Iterator<Item = &'r Referred>) -> [(&'static str, Vec<String>); 2] {
    let (mut shops, mut targets) = (Vec::new(), Vec::new());
    for referred in referred {
        match referred {
            Referred::Shop(shop) => shops.push(shop.clone()),
            Referred::Alias(target) => targets.push(target.clone()),
        }
    }
    [("shops", shops), ("targets", targets)]
}

impl Ledger for DynamoLedger {
    async fn references_complete(&self) -> Result<bool, PortError> {
        use std::sync::atomic::Ordering;
        if self.complete.load(Ordering::Relaxed) {
            return Ok(true);
        }
        let meta = self.get_one(META_PK, META_SK).await?;
        let complete = meta.as_ref().and_then(|i| number(i, "complete")) == Some(1);
        self.complete.fetch_or(complete, Ordering::Relaxed);
        Ok(complete)
    }

    async fn mark_references_complete(&self) -> Result<(), PortError> {
        let item = Item::key(META_PK.to_owned(), META_SK).with("complete", n(1));
        self.put(item, None).await.map(|_| ())
    }

    async fn index_refs(
        &self,
        indexes: &[IndexRef],
    ) -> Result<HashMap<IndexRef, IndexRefs>, PortError> {
        let keys = (indexes.iter())
            .map(|index| (ref_pk(index), REF_SK.to_owned()))
            .collect();
        let mut found = HashMap::with_capacity(indexes.len());
        self.get_all(keys, |item| {
            found.extend(index_of_ref(&item).map(|index| (index, refs_of(&item))));
        })
        .await?;
        Ok(found)
    }

    /// Who the ledger names as referring to any of `referred` (a superset, possibly stale).
    async fn referrers(&self, referred: &[Referred]) -> Result<Vec<IndexRef>, PortError> {
        let mut found = BTreeSet::new();
        for (referred, set) in self.referrer_sets(referred.iter()).await? {
            if set.overflow {
                found.extend(self.query_referrers(&referred).await?);
            }
            found.extend(set.indexes);
        }
        Ok(found.into_iter().collect())
    }

    /// Each index added to the set of what it refers to, one transaction action per set; a
    /// set that would pass [`MAX_REFERRERS`] is marked `overflow` and those referrers get
    /// items of their own instead.
    async fn point_back(&self, items: &[(IndexRef, Referred)]) -> Result<u64, PortError> {
        let birth = birth();
        let mut sets: BTreeMap<&Referred, BTreeMap<String, &IndexRef>> = BTreeMap::new();
        for (index, referred) in items {
            sets.entry(referred)
                .or_default()
                .insert(index_key(index), index);
        }
        let (fit, mut over): (Vec<_>, Vec<_>) =
            (sets.into_iter()).partition(|(_, indexes)| indexes.len() <= MAX_REFERRERS);
        let adds = fit.iter().map(|(referred, indexes)| {
            let room = (MAX_REFERRERS - indexes.len()) as u64;
            let members = AttributeValue::Ss(indexes.keys().cloned().collect());
            let values = (Item::default().with(":new", members)).with(":room", super::n(room));
            let add = self.set_update(referred, "ADD #set :new", values);
            update_action(
                add.condition_expression("attribute_not_exists(#set) OR size(#set) <= :room"),
            )
        });
        let mut actions: Vec<TransactWriteItem> = adds.collect();
        let sets_added = actions.len();
        let mut own: BTreeMap<&IndexRef, Vec<&Referred>> = BTreeMap::new();
        for (index, referred) in items {
            own.entry(index).or_default().push(referred);
        }
        actions.extend((own.into_iter()).map(|(index, referred)| {
            // Every intent counts, so a shrink that read before it leaves its members alone.
            update_action(self.own_intent(index, own_sets(referred.into_iter()), birth))
        }));
        let full = self.transact_all(actions).await?;
        let full: BTreeSet<usize> = full.into_iter().filter(|at| *at < sets_added).collect();
        over.extend(
            fit.into_iter()
                .enumerate()
                .filter(|(at, _)| full.contains(at))
                .map(|(_, set)| set),
        );
        let mut actions = Vec::new();
        for (referred, indexes) in over {
            let flag = Item::default().with(":yes", AttributeValue::Bool(true));
            // The expression names no set: DynamoDB refuses a name it does not use.
            let overflow = self.set_update(referred, "SET overflow = :yes", flag);
            actions.push(update_action(overflow.set_expression_attribute_names(None)));
            actions.extend(
                indexes
                    .values()
                    .map(|index| self.put_action(back(referred, index), None)),
            );
        }
        self.transact_all(actions).await.map(|_| birth)
    }

    /// Which of these items pointing back exist.
    async fn pointing(
        &self,
        items: &[(IndexRef, Referred)],
    ) -> Result<Vec<(IndexRef, Referred)>, PortError> {
        let sets = self.referrer_sets(items.iter().map(|(_, r)| r)).await?;
        let mut found = Vec::new();
        let mut own_items = HashMap::new();
        for item in items {
            let set = sets.get(&item.1);
            if set.is_some_and(|set| set.indexes.contains(&item.0)) {
                found.push(item.clone());
            } else if set.is_some_and(|set| set.overflow) {
                own_items.insert((referred_pk(&item.1), index_key(&item.0)), item);
            }
        }
        self.get_all(own_items.keys().cloned().collect(), |item| {
            let key = (string_attribute(&item, "pk"), string_attribute(&item, "sk"));
            let key = key
                .0
                .zip(key.1)
                .map(|(pk, sk)| (pk.to_owned(), sk.to_owned()));
            found.extend(
                key.and_then(|key| own_items.get(&key))
                    .map(|item| (*item).clone()),
            );
        })
        .await?;
        Ok(found)
    }

    async fn record_refs(&self, changes: &[RefsChange]) -> Result<(), PortError> {
        self.shrink(changes).await
    }

    /// A Scan page of the table, its `ref#` items kept; the cursor is the next item's key.
    async fn recorded(&self, after: Option<&str>, limit: usize) -> Result<RecordedPage, PortError> {
        let start = after.and_then(|cursor| serde_json::from_str(cursor).ok());
        let values = Item::default()
            .with(":ref", AttributeValue::S("ref#".into()))
            .with(":refs", AttributeValue::S(REF_SK.into()));
        let filter = "begins_with(pk, :ref) AND sk = :refs";
        let scan = (self.table_name.as_str(), filter, values.0);
        let (items, next) = self.dynamo.scan_page(scan, start, limit).await?;
        let page = items
            .iter()
            .filter_map(|item| Some((index_of_ref(item)?, refs_of(item))));
        let next = next.map(|key| serde_json::to_string(&key).expect("two strings"));
        Ok((page.collect(), next))
    }

    /// One conditional update each (in transactions of 100, a refused one alone): a mark only
    /// on the intents it names, and either only on an item that is there.
    async fn sweep_marks(&self, marks: &[(IndexRef, Option<SweepMark>)]) -> Result<(), PortError> {
        let updates = marks.iter().map(|(index, mark)| {
            // Never on an item that is not there (an update would make one).
            let (condition, values) = match mark {
                Some(mark) => {
                    let (intents, values) = unchanged_intents(mark.intents);
                    (format!("attribute_exists(pk) AND {intents}"), values)
                }
                None => ("attribute_exists(pk)".to_owned(), Item::default()),
            };
            let (expression, values) = match mark {
                Some(mark) => (
                    format!("SET {SWEPT_INTENTS} = :swept, {SWEPT_AT} = :at"),
                    (values.with(":swept", n(mark.intents))).with(":at", n(mark.at)),
                ),
                None => (format!("REMOVE {SWEPT_INTENTS}, {SWEPT_AT}"), values),
            };
            let update = self.own_item_update(index, expression, values);
            update_action(update.condition_expression(condition))
        });
        self.transact_all(updates.collect()).await.map(|_| ())
    }

    async fn reconcile_progress(&self) -> Result<Option<ReconcileProgress>, PortError> {
        let item = self.get_one(PROGRESS_PK, PROGRESS_SK).await?;
        Ok(item.as_ref().map(progress_of))
    }

    async fn save_reconcile_progress(
        &self,
        progress: &ReconcileProgress,
        expected: Option<u64>,
    ) -> Result<bool, PortError> {
        let condition = match expected {
            None => ("attribute_not_exists(pk)".into(), Item::default()),
            Some(version) => (
                "version = :read".into(),
                Item::default().with(":read", n(version)),
            ),
        };
        self.put(item_of(progress), Some(condition)).await
    }
}

impl DynamoLedger {
    /// The set items of `referred` (one absent: nobody refers to it).
    async fn referrer_sets(
        &self,
        referred: impl Iterator<Item = &Referred>,
    ) -> Result<HashMap<Referred, ReferrerSet>, PortError> {
        let asked: HashMap<String, &Referred> = referred.map(|r| (referred_pk(r), r)).collect();
        let keys = (asked.keys())
            .map(|pk| (pk.clone(), REFERRERS_SK.to_owned()))
            .collect();
        let mut found = HashMap::with_capacity(asked.len());
        self.get_all(keys, |item| {
            if let Some(referred) = string_attribute(&item, "pk").and_then(|pk| asked.get(pk)) {
                found.insert((*referred).clone(), referrers_of(&item));
            }
        })
        .await?;
        Ok(found)
    }

    /// Every item of an overflowed set's partition that names an index.
    async fn query_referrers(&self, referred: &Referred) -> Result<Vec<IndexRef>, PortError> {
        let items = self
            .dynamo
            .partition(&self.table_name, referred_pk(referred));
        Ok(items.await?.iter().filter_map(index_of).collect())
    }

    /// An intent on an index's own item: the members added to its string sets, its intents
    /// counted one more (from `birth` when this creates the item).
    fn own_intent(
        &self,
        index: &IndexRef,
        sets: [(&'static str, Vec<String>); 2],
        birth: u64,
    ) -> UpdateBuilder {
        let values = Item::default().with(":one", n(1)).with(":birth", n(birth));
        let (clauses, values) = set_clauses(sets, values);
        let expression =
            format!("ADD {clauses} SET intents = if_not_exists(intents, :birth) + :one");
        self.own_item_update(index, expression, values)
    }

    /// The members of an index's own string sets taken out, `values` naming the condition's.
    fn own_update(
        &self,
        index: &IndexRef,
        sets: [(&'static str, Vec<String>); 2],
        values: Item,
    ) -> UpdateBuilder {
        let (clauses, values) = set_clauses(sets, values);
        self.own_item_update(index, format!("DELETE {clauses}"), values)
    }

    /// Only the sets are named: every clause costs DynamoDB's parser (and moto's, a millisecond
    /// each), and the index is in the item's key.
    fn own_item_update(&self, index: &IndexRef, expression: String, values: Item) -> UpdateBuilder {
        aws_sdk_dynamodb::types::Update::builder()
            .table_name(&self.table_name)
            .set_key(Some(Item::key(ref_pk(index), REF_SK).0))
            .update_expression(expression)
            .set_expression_attribute_values(values.given())
    }

    fn set_update(
        &self,
        referred: &Referred,
        expression: &'static str,
        values: Item,
    ) -> UpdateBuilder {
        aws_sdk_dynamodb::types::Update::builder()
            .table_name(&self.table_name)
            .set_key(Some(Item::key(referred_pk(referred), REFERRERS_SK).0))
            .update_expression(expression)
            .expression_attribute_names("#set", SET)
            .set_expression_attribute_values(values.given())
    }
}

/// `shops :shops, targets :targets` for the sets with members, their values added to `values`.
fn set_clauses(sets: [(&'static str, Vec<String>); 2], mut values: Item) -> (String, Item) {
    let mut clauses = Vec::new();
    for (name, members) in sets.into_iter().filter(|(_, members)| !members.is_empty()) {
        let placeholder = if name == "shops" {
            ":shops"
        } else {
            ":targets"
        };
        clauses.push(format!("{name} {placeholder}"));
        values = values.with(placeholder, AttributeValue::Ss(members));
    }
    (clauses.join(", "), values)
}

/// A number no other call starts an index's intents from: random, below 2^62 so that counting
/// on from it never overflows, and far from the small counts of records written before births.
fn birth() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    (random >> 2) | (1 << 40)
}

/// Who a set item names, and whether referrers past its bound have items of their own.
#[derive(Default)]
struct ReferrerSet {
    indexes: BTreeSet<IndexRef>,
    overflow: bool,
}

fn referrers_of(item: &Found) -> ReferrerSet {
    let indexes = match item.get(SET) {
        Some(Value::Ss(keys)) => keys.iter().filter_map(|key| index_of_key(key)).collect(),
        _ => BTreeSet::new(),
    };
    let overflow = matches!(item.get("overflow"), Some(Value::Bool(true)));
    ReferrerSet { indexes, overflow }
}

/// The item of its own naming `index` under what it refers to (past a set's bound).
fn back(referred: &Referred, index: &IndexRef) -> Item {
    named(referred_pk(referred), &index_key(index), index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_key_names_its_index_whatever_its_account_holds() {
        for (account, name) in [("a", "i"), ("a:1#b", "#x:"), ("é", "ü"), ("", "i")] {
            let index = IndexRef::new(account, name);
            assert_eq!(index_of_key(&index_key(&index)), Some(index));
        }
        for key in ["", "x", "2:a#i", "1:a", "1:ai", "9:a#i", "1:é#i"] {
            assert_eq!(index_of_key(key), None, "{key}");
        }
    }
}
