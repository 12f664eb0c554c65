//! Each index's references in the ledger (docs/contract.md, "Concurrent writers"): what its
//! last exported record left (`pk = "ref#{index}"`, `sk = "ref"`: `shop`, `targets`, `removed`),
//! and, for lookups by key instead of a table scan, one item per reference the other way round
//! (`pk = "shop#{shop_id}"` or `"alias#{target index id}"`, `sk = "{index}"`). An index is
//! written `{length of account}:{account}#{index}` in keys, so no two indexes share one; items
//! name it in `account` and `index` too.

use std::collections::HashMap;

use serde_json::{json, Value};

use super::{delete_request, expires_at, number, put_request, text};
use super::{Attribute, DynamoLedger, Item};
use crate::domain::IndexRef;
use crate::dynamo::{Attr, Image};
use crate::ports::{IndexRefs, PortError, Referred, RefsChange};

const REF_SK: &str = "ref";
const META_PK: &str = "meta";
const META_SK: &str = "references";

fn index_key(index: &IndexRef) -> String {
    format!("{}:{}#{}", index.account.len(), index.account, index.name)
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
        .with("account", Attribute::S(index.account.clone()))
        .with("index", Attribute::S(index.name.clone()))
}

fn index_of(item: &Image) -> Option<IndexRef> {
    Some(IndexRef::new(
        item.string("account")?,
        item.string("index")?,
    ))
}

fn ref_item(index: &IndexRef, refs: &IndexRefs) -> Item {
    let mut item = named(ref_pk(index), REF_SK, index);
    if let Some(shop) = &refs.shop {
        item = item.with("shop", Attribute::S(shop.clone()));
    }
    if !refs.targets.is_empty() {
        item = item.with(
            "targets",
            Attribute::Ss(refs.targets.iter().cloned().collect()),
        );
    }
    if refs.removed {
        // A removed index's entry only has to outlive writers that read before the remove.
        item = (item.with("removed", Attribute::Bool(true))).with("expires_at", expires_at());
    }
    item
}

fn refs_of(item: &Image) -> IndexRefs {
    let targets = match item.get("targets") {
        Some(Attr::Ss(targets)) => targets.iter().map(|t| t.to_string()).collect(),
        _ => Default::default(),
    };
    IndexRefs {
        shop: item.string("shop").map(str::to_owned),
        targets,
        removed: matches!(item.get("removed"), Some(Attr::Bool(true))),
    }
}

impl DynamoLedger {
    pub(super) async fn get_references_complete(&self) -> Result<bool, PortError> {
        let meta = self.get_one(META_PK, META_SK).await?;
        Ok(meta.as_ref().and_then(|i| number(i, "complete")) == Some(1))
    }

    pub(super) async fn put_references_complete(&self) -> Result<(), PortError> {
        let item = Item::key(META_PK.to_owned(), META_SK).with("complete", super::n(1));
        self.put(item, None).await.map(|_| ())
    }

    pub(super) async fn get_index_refs(
        &self,
        indexes: &[IndexRef],
    ) -> Result<HashMap<IndexRef, IndexRefs>, PortError> {
        let keys = (indexes.iter())
            .map(|index| (ref_pk(index), REF_SK.to_owned()))
            .collect();
        let mut found = HashMap::with_capacity(indexes.len());
        self.get_all(keys, |item| {
            found.extend(index_of(item).map(|index| (index, refs_of(item))));
        })
        .await?;
        Ok(found)
    }

    pub(super) async fn query_referrers(
        &self,
        referred: &Referred,
    ) -> Result<Vec<IndexRef>, PortError> {
        let table = &self.table_name;
        let not_understood =
            || PortError::Transient(format!("Query of table {table}: an answer not understood"));
        let mut found = Vec::new();
        let mut query = json!({"TableName": table, "KeyConditionExpression": "pk = :pk",
            "ExpressionAttributeValues": {":pk": {"S": referred_pk(referred)}},
            "ConsistentRead": true});
        loop {
            let answer = self.dynamo.post("Query", table, query.to_string()).await?;
            let mut page: Value = serde_json::from_str(&answer).map_err(|_| not_understood())?;
            let items = page
                .get("Items")
                .and_then(Value::as_array)
                .ok_or_else(not_understood)?;
            found.extend(items.iter().filter_map(|item| {
                Some(IndexRef::new(text(item, "account")?, text(item, "index")?))
            }));
            match page.get_mut("LastEvaluatedKey").map(Value::take) {
                Some(key) if key.as_object().is_some_and(|k| !k.is_empty()) => {
                    query["ExclusiveStartKey"] = key;
                }
                _ => return Ok(found),
            }
        }
    }

    /// The items naming each index under what it refers to, 25 a BatchWriteItem.
    pub(super) async fn put_back_items(
        &self,
        items: &[(IndexRef, Referred)],
    ) -> Result<(), PortError> {
        let puts = items.iter().map(|(index, r)| put_request(back(r, index)));
        self.write_all(puts.collect()).await
    }

    /// Which of these items pointing back exist.
    pub(super) async fn get_back_items(
        &self,
        items: &[(IndexRef, Referred)],
    ) -> Result<Vec<(IndexRef, Referred)>, PortError> {
        let key_of = |(index, r): &(IndexRef, Referred)| (referred_pk(r), index_key(index));
        let asked: HashMap<(String, String), &(IndexRef, Referred)> =
            items.iter().map(|item| (key_of(item), item)).collect();
        let mut found = Vec::new();
        self.get_all(asked.keys().cloned().collect(), |item| {
            let key = (item.string("pk"), item.string("sk"));
            let key = key
                .0
                .zip(key.1)
                .map(|(pk, sk)| (pk.to_owned(), sk.to_owned()));
            found.extend(
                key.and_then(|key| asked.get(&key))
                    .map(|item| (*item).clone()),
            );
        })
        .await?;
        Ok(found)
    }

    /// The indexes' own items, then the items pointing back that they no longer name: a
    /// reader that finds an index's references finds every item pointing back (those were
    /// added before the writes). Each step is one BatchWriteItem per 25 items.
    pub(super) async fn put_all_refs(&self, changes: &[RefsChange]) -> Result<(), PortError> {
        let (mut own, mut gone) = (Vec::new(), Vec::new());
        for RefsChange {
            index,
            pointing,
            new,
        } in changes
        {
            own.push(put_request(ref_item(index, new)));
            let after = new.referred();
            gone.extend(
                pointing
                    .difference(&after)
                    .map(|r| delete_request(Item::key(referred_pk(r), &index_key(index)))),
            );
        }
        self.write_all(own).await?;
        self.write_all(gone).await
    }

    /// An index's own item, only if it has none yet.
    pub(super) async fn put_refs_if_absent(
        &self,
        index: &IndexRef,
        refs: &IndexRefs,
    ) -> Result<bool, PortError> {
        let condition = ("attribute_not_exists(pk)", Item::default());
        self.put(ref_item(index, refs), Some(condition)).await
    }
}

/// The item naming `index` under what it refers to.
fn back(referred: &Referred, index: &IndexRef) -> Item {
    named(referred_pk(referred), &index_key(index), index)
}
