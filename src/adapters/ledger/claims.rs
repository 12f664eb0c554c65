//! Claims on KV keys in the ledger (docs/contract.md, "Concurrent writers"): one item per key,
//! `pk = "kv#{namespace}#{bucket}"`, `sk = "{key}"`, holding the last writer's `token`, whose
//! value it put (`owner_account`, `owner_index`; none for a delete) and that value's `digest`. A claim on a live value is kept for good: the
//! claims are the ledger's record of what KV holds, listed in key order beside KV's own listing
//! by a reconcile. A delete's claim is forgotten by the table's TTL two days later. The bucket
//! (the first hex digit of the key's SHA-256) spreads a batch's writes over 16 partitions;
//! within one, keys sort as KV lists them, so a range of keys is 16 Queries.

use std::collections::HashMap;

use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::AttributeValue;
use futures::StreamExt as _;
use sha2::{Digest as _, Sha256};

use super::{expires_at, put_request, table_key, text, DynamoLedger};
use crate::domain::{IndexRef, KvKey, Namespace};
use crate::ports::{Claim, KeyClaim, PortError};

const BUCKETS: u8 = 16;

fn namespace_of(name: &str) -> Option<Namespace> {
    match name {
        "settings" => Some(Namespace::Settings),
        "query_configs" => Some(Namespace::QueryConfigs),
        _ => None,
    }
}

fn bucket_pk(namespace: Namespace, bucket: u8) -> String {
    format!("kv#{}#{bucket:x}", namespace.name())
}

fn claim_pk(key: &KvKey) -> String {
    let bucket = Sha256::digest(key.key.as_bytes())[0] >> 4;
    bucket_pk(key.namespace, bucket)
}

pub(super) fn claim_key(key: &KvKey) -> HashMap<String, AttributeValue> {
    table_key(claim_pk(key), &key.key)
}

pub(super) fn claim_item(write: &KeyClaim, claim: &Claim) -> HashMap<String, AttributeValue> {
    let mut item = claim_key(&write.key);
    let s = |v: &str| AttributeValue::S(v.to_owned());
    if let Some(owner) = &write.owner {
        item.insert("owner_account".into(), s(&owner.account));
        item.insert("owner_index".into(), s(&owner.name));
    }
    if let Some(digest) = &write.digest {
        item.insert("digest".into(), s(digest));
    }
    if let Some(query) = &write.query {
        item.insert("query".into(), s(query));
    }
    item.insert("token".into(), s(&claim.token));
    if write.owner.is_none() {
        // A delete's claim matters while a writer that read before it may still run.
        item.insert("expires_at".into(), expires_at());
    }
    item
}

pub(super) fn claim_of(item: &HashMap<String, AttributeValue>) -> Option<(KvKey, Claim)> {
    let pk = item.get("pk")?.as_s().ok()?;
    let (namespace, _bucket) = pk.strip_prefix("kv#")?.split_once('#')?;
    let key = KvKey {
        namespace: namespace_of(namespace)?,
        key: text(item, "sk")?,
    };
    let claim = Claim {
        token: text(item, "token")?,
        owner: text(item, "owner_account")
            .zip(text(item, "owner_index"))
            .map(|(account, index)| IndexRef::new(account, index)),
        digest: text(item, "digest"),
        query: text(item, "query"),
    };
    Some((key, claim))
}

impl DynamoLedger {
    /// One bucket's claims in `(after, upto]`, every page of them.
    async fn bucket_between(
        &self,
        pk: String,
        after: Option<&str>,
        upto: Option<&str>,
    ) -> Result<Vec<(String, Claim)>, PortError> {
        let s = |v: &str| AttributeValue::S(v.to_owned());
        let (condition, mut values) = match (after, upto) {
            // BETWEEN includes `after`: it is dropped below.
            (Some(a), Some(u)) => (
                "pk = :pk AND sk BETWEEN :a AND :u",
                vec![(":a", a), (":u", u)],
            ),
            (Some(a), None) => ("pk = :pk AND sk > :a", vec![(":a", a)]),
            (None, Some(u)) => ("pk = :pk AND sk <= :u", vec![(":u", u)]),
            (None, None) => ("pk = :pk", vec![]),
        };
        values.push((":pk", &pk));
        let values: HashMap<String, AttributeValue> = values
            .into_iter()
            .map(|(n, v)| (n.to_owned(), s(v)))
            .collect();
        let (mut found, mut start) = (Vec::new(), None);
        loop {
            let page = self
                .client
                .query()
                .table_name(self.table()?)
                .key_condition_expression(condition)
                .set_expression_attribute_values(Some(values.clone()))
                .consistent_read(true)
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| self.error("Query", e))?;
            found.extend(
                (page.items().iter().filter_map(claim_of))
                    .filter(|(key, _)| Some(key.key.as_str()) != after)
                    .map(|(key, claim)| (key.key, claim)),
            );
            match page.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => return Ok(found),
            }
        }
    }

    pub(super) async fn query_claims_between(
        &self,
        namespace: Namespace,
        after: Option<&str>,
        upto: Option<&str>,
    ) -> Result<Vec<(String, Claim)>, PortError> {
        let answers: Vec<Result<Vec<(String, Claim)>, PortError>> =
            futures::stream::iter(0..BUCKETS)
                .map(|b| self.bucket_between(bucket_pk(namespace, b), after, upto))
                .buffer_unordered(super::CONCURRENT_CALLS)
                .collect()
                .await;
        let mut claims = Vec::new();
        for answer in answers {
            claims.extend(answer?);
        }
        claims.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(claims)
    }

    pub(super) async fn update_digest(
        &self,
        key: &KvKey,
        token: &str,
        digest: Option<&str>,
    ) -> Result<bool, PortError> {
        let update = self
            .client
            .update_item()
            .table_name(self.table()?)
            .set_key(Some(claim_key(key)))
            .condition_expression("#token = :token")
            .expression_attribute_names("#token", "token")
            .expression_attribute_values(":token", AttributeValue::S(token.to_owned()));
        let update = match digest {
            Some(digest) => update
                .update_expression("SET digest = :digest")
                .expression_attribute_values(":digest", AttributeValue::S(digest.to_owned())),
            None => update.update_expression("REMOVE digest"),
        };
        match update.send().await {
            Ok(_) => Ok(true),
            Err(SdkError::ServiceError(e))
                if matches!(e.err(), UpdateItemError::ConditionalCheckFailedException(_)) =>
            {
                Ok(false)
            }
            Err(e) => Err(self.error("UpdateItem", e)),
        }
    }

    pub(super) async fn put_claim_if(
        &self,
        write: &KeyClaim,
        read: Option<&str>,
        claim: &Claim,
    ) -> Result<bool, PortError> {
        let put = self
            .client
            .put_item()
            .table_name(self.table()?)
            .set_item(Some(claim_item(write, claim)));
        let put = match read {
            None => put.condition_expression("attribute_not_exists(pk)"),
            Some(token) => put
                .condition_expression("#token = :read")
                .expression_attribute_names("#token", "token")
                .expression_attribute_values(":read", AttributeValue::S(token.to_owned())),
        };
        self.put_if(put).await
    }

    pub(super) async fn put_claims(
        &self,
        keys: &[KeyClaim],
        claim: &Claim,
    ) -> Vec<(KvKey, PortError)> {
        // One failed call fails the keys of every call: the records are retried together.
        let puts = keys
            .iter()
            .map(|k| put_request(claim_item(k, claim)))
            .collect();
        match self.write_all(puts).await {
            Ok(()) => Vec::new(),
            Err(e) => keys.iter().map(|k| (k.key.clone(), e.clone())).collect(),
        }
    }

    pub(super) async fn get_claims(
        &self,
        keys: &[KvKey],
    ) -> Result<HashMap<KvKey, Claim>, PortError> {
        let wanted = keys.iter().map(claim_key).collect();
        let items = self.get_all(wanted).await?;
        Ok(items.iter().filter_map(claim_of).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_s_bucket_is_the_first_hex_digit_of_its_sha256_as_the_runbook_computes_it() {
        // printf %s acct-1-products | sha256sum | cut -c1
        let key = KvKey::settings("acct-1-products".to_owned());
        assert_eq!(claim_pk(&key), "kv#settings#d");
        let item = claim_item(
            &KeyClaim {
                key: key.clone(),
                owner: Some(IndexRef::new("acct-1", "products")),
                digest: Some("0123456789abcdef".into()),
                query: None,
            },
            &Claim {
                token: "t".into(),
                owner: None,
                digest: None,
                query: None,
            },
        );
        assert!(
            !item.contains_key("expires_at"),
            "a live value's claim is kept"
        );
        let (read_key, read) = claim_of(&item).unwrap();
        assert_eq!(read_key, key);
        assert_eq!(read.digest.as_deref(), Some("0123456789abcdef"));
        assert_eq!(read.owner, Some(IndexRef::new("acct-1", "products")));
    }
}
