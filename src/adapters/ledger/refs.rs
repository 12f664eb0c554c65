//! Each index's references in the ledger (docs/contract.md, "Concurrent writers"): what its
//! last exported record left (`pk = "ref#{index}"`, `sk = "ref"`: `shop`, `targets`, `removed`),
//! and, for lookups by key instead of a table scan, one item per reference the other way round
//! (`pk = "shop#{shop_id}"` or `"alias#{target index id}"`, `sk = "{index}"`). An index is
//! written `{length of account}:{account}#{index}` in keys, so no two indexes share one; items
//! name it in `account` and `index` too.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{delete_request, expires_at, number, put_request};
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
        let pk = Item::default().with(":pk", Attribute::S(referred_pk(referred)));
        let mut query = Query {
            table_name: table,
            key_condition_expression: "pk = :pk",
            expression_attribute_values: pk,
            consistent_read: true,
            exclusive_start_key: None,
        };
        let mut found = Vec::new();
        loop {
            let body = serde_json::to_string(&query).expect("a query is JSON");
            let answer = self.dynamo.post("Query", table, body).await?;
            let page: QueryPage = serde_json::from_str(&answer).map_err(|_| {
                PortError::Transient(format!("Query of table {table}: an answer not understood"))
            })?;
            found.extend(page.items.iter().filter_map(index_of));
            match page.last_evaluated_key {
                Some(key) if key.get() != "{}" => {
                    query.exclusive_start_key = Some(key.to_owned());
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

/// A Query of one partition, read consistently, from `exclusive_start_key` on.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Query<'a> {
    table_name: &'a str,
    key_condition_expression: &'static str,
    expression_attribute_values: Item,
    consistent_read: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    exclusive_start_key: Option<Box<RawValue>>,
}

/// A page of a Query's answer.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct QueryPage<'a> {
    #[serde(borrow, default)]
    items: Vec<Image<'a>>,
    #[serde(borrow)]
    last_evaluated_key: Option<&'a RawValue>,
}

/// The item naming `index` under what it refers to.
fn back(referred: &Referred, index: &IndexRef) -> Item {
    named(referred_pk(referred), &index_key(index), index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_goes_on_from_the_key_its_last_page_ended_at() {
        let answer = r#"{"Items": [{"pk": {"S": "shop#s"}, "sk": {"S": "1:a#i"},
            "account": {"S": "a"}, "index": {"S": "i"}}], "Count": 1,
            "LastEvaluatedKey": {"pk": {"S": "shop#s"}, "sk": {"S": "1:a#i"}}}"#;
        let page: QueryPage = serde_json::from_str(answer).unwrap();
        let found: Vec<IndexRef> = page.items.iter().filter_map(index_of).collect();
        assert_eq!(found, [IndexRef::new("a", "i")]);
        let query = Query {
            table_name: "t",
            key_condition_expression: "pk = :pk",
            expression_attribute_values: Item::default().with(":pk", Attribute::S("shop#s".into())),
            consistent_read: true,
            exclusive_start_key: page.last_evaluated_key.map(ToOwned::to_owned),
        };
        let query: serde_json::Value = serde_json::to_value(&query).unwrap();
        let expected = serde_json::json!({"TableName": "t", "KeyConditionExpression": "pk = :pk",
            "ExpressionAttributeValues": {":pk": {"S": "shop#s"}}, "ConsistentRead": true,
            "ExclusiveStartKey": {"pk": {"S": "shop#s"}, "sk": {"S": "1:a#i"}}});
        assert_eq!(query, expected);
        let last: QueryPage = serde_json::from_str(r#"{"Items": [], "Count": 0}"#).unwrap();
        assert!(
            last.last_evaluated_key.is_none(),
            "the last page names no key"
        );
    }
}
