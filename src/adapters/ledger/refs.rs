//! Each index's references in the ledger (docs/contract.md, "Concurrent writers"): what its
//! last exported record left (`pk = "ref#{index}"`, `sk = "ref"`: `shop`, `targets`, `removed`),
//! and, for lookups by key instead of a table scan, one item per reference the other way round
//! (`pk = "shop#{shop_id}"` or `"alias#{target index id}"`, `sk = "{index}"`). An index is
//! written `{length of account}:{account}#{index}` in keys, so no two indexes share one; items
//! name it in `account` and `index` too.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::{AttributeValue, DeleteRequest, WriteRequest};

use super::{expires_at, number, put_request, table_key, text, DynamoLedger};
use crate::domain::IndexRef;
use crate::ports::{IndexRefs, PortError, Referred, RefsChange};

const REF_SK: &str = "ref";
const META_PK: &str = "meta";
const META_SK: &str = "references";

fn index_key(index: &IndexRef) -> String {
    format!("{}:{}#{}", index.account.len(), index.account, index.name)
}

fn ref_key(index: &IndexRef) -> HashMap<String, AttributeValue> {
    table_key(format!("ref#{}", index_key(index)), REF_SK)
}

fn referred_pk(referred: &Referred) -> String {
    match referred {
        Referred::Alias(id) => format!("alias#{id}"),
        Referred::Shop(shop) => format!("shop#{shop}"),
    }
}

fn named(
    mut item: HashMap<String, AttributeValue>,
    index: &IndexRef,
) -> HashMap<String, AttributeValue> {
    item.insert("account".into(), AttributeValue::S(index.account.clone()));
    item.insert("index".into(), AttributeValue::S(index.name.clone()));
    item
}

fn index_of(item: &HashMap<String, AttributeValue>) -> Option<IndexRef> {
    Some(IndexRef::new(text(item, "account")?, text(item, "index")?))
}

fn ref_item(index: &IndexRef, refs: &IndexRefs) -> HashMap<String, AttributeValue> {
    let mut item = named(ref_key(index), index);
    if let Some(shop) = &refs.shop {
        item.insert("shop".into(), AttributeValue::S(shop.clone()));
    }
    if !refs.targets.is_empty() {
        let targets = refs.targets.iter().cloned().collect();
        item.insert("targets".into(), AttributeValue::Ss(targets));
    }
    if refs.removed {
        item.insert("removed".into(), AttributeValue::Bool(true));
        // A removed index's entry only has to outlive writers that read before the remove.
        item.insert("expires_at".into(), expires_at());
    }
    item
}

fn refs_of(item: &HashMap<String, AttributeValue>) -> IndexRefs {
    IndexRefs {
        shop: text(item, "shop"),
        targets: item
            .get("targets")
            .and_then(|t| t.as_ss().ok())
            .map(|t| t.iter().cloned().collect())
            .unwrap_or_default(),
        removed: item.get("removed").and_then(|r| r.as_bool().ok()).copied() == Some(true),
    }
}

impl DynamoLedger {
    pub(super) async fn get_references_complete(&self) -> Result<bool, PortError> {
        let meta = self.get_one(META_PK, META_SK).await?;
        Ok(meta.as_ref().and_then(|i| number(i, "complete")) == Some(1))
    }

    pub(super) async fn put_references_complete(&self) -> Result<(), PortError> {
        let mut item = table_key(META_PK.into(), META_SK);
        item.insert("complete".into(), AttributeValue::N("1".into()));
        self.client
            .put_item()
            .table_name(&self.table_name)
            .set_item(Some(item))
            .send()
            .await
            .map_err(|e| self.error("PutItem", e))?;
        Ok(())
    }

    pub(super) async fn get_index_refs(
        &self,
        indexes: &[IndexRef],
    ) -> Result<HashMap<IndexRef, IndexRefs>, PortError> {
        let keys = indexes.iter().map(ref_key).collect();
        let items = self.get_all(keys).await?;
        Ok(items
            .iter()
            .filter_map(|item| Some((index_of(item)?, refs_of(item))))
            .collect())
    }

    pub(super) async fn query_referrers(
        &self,
        referred: &Referred,
    ) -> Result<Vec<IndexRef>, PortError> {
        let mut found = Vec::new();
        let mut start = None;
        loop {
            let page = self
                .client
                .query()
                .table_name(&self.table_name)
                .key_condition_expression("pk = :pk")
                .expression_attribute_values(":pk", AttributeValue::S(referred_pk(referred)))
                .consistent_read(true)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| self.error("Query", e))?;
            found.extend(page.items().iter().filter_map(index_of));
            match page.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
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
        let keys = asked
            .keys()
            .map(|(pk, sk)| table_key(pk.clone(), sk))
            .collect();
        let found = self.get_all(keys).await?;
        Ok((found.iter())
            .filter_map(|item| asked.get(&(text(item, "pk")?, text(item, "sk")?)))
            .map(|item| (*item).clone())
            .collect())
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
                    .map(|r| delete_request(r, index)),
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
        let put = self
            .client
            .put_item()
            .table_name(&self.table_name)
            .set_item(Some(ref_item(index, refs)))
            .condition_expression("attribute_not_exists(pk)");
        self.put_if(put).await
    }
}

/// The item naming `index` under what it refers to.
fn back(referred: &Referred, index: &IndexRef) -> HashMap<String, AttributeValue> {
    named(table_key(referred_pk(referred), &index_key(index)), index)
}

fn delete_request(referred: &Referred, index: &IndexRef) -> WriteRequest {
    let key = table_key(referred_pk(referred), &index_key(index));
    let delete = DeleteRequest::builder().set_key(Some(key));
    WriteRequest::builder()
        .delete_request(delete.build().expect("a key is set"))
        .build()
}
