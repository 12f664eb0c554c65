//! Step 4 of the pipeline, pure: planned operations become as few Cloudflare bulk requests as
//! the limits allow (10,000 items and under 100 MB a request).

use std::collections::BTreeMap;

use crate::domain::kv::{KvPair, KvRequest, MAX_BULK_BYTES, MAX_BULK_ITEMS};
use crate::domain::{KvAction, KvKey, Namespace};
use crate::pipeline::plan::PlannedOp;

/// Splits pairs into bodies of at most [`MAX_BULK_ITEMS`] and under [`MAX_BULK_BYTES`].
pub fn chunk_pairs(pairs: Vec<KvPair>) -> Vec<Vec<KvPair>> {
    let mut chunks = Vec::new();
    let mut current = Vec::new();
    let mut bytes = 2; // the brackets
    for pair in pairs {
        let size = pair.body_bytes();
        if !current.is_empty()
            && (current.len() == MAX_BULK_ITEMS || bytes + size >= MAX_BULK_BYTES)
        {
            chunks.push(std::mem::take(&mut current));
            bytes = 2;
        }
        bytes += size;
        current.push(pair);
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

/// All the requests a plan needs: per namespace, bulk writes and bulk deletes.
pub fn requests<'a>(ops: impl IntoIterator<Item = (&'a KvKey, &'a PlannedOp)>) -> Vec<KvRequest> {
    let mut puts: BTreeMap<Namespace, Vec<KvPair>> = BTreeMap::new();
    let mut deletes: BTreeMap<Namespace, Vec<String>> = BTreeMap::new();
    for (key, op) in ops {
        match &op.action {
            KvAction::Put(value) => puts.entry(key.namespace).or_default().push(KvPair {
                key: key.key.clone(),
                value: value.text.clone(),
                metadata: serde_json::value::RawValue::from_string(value.metadata.clone()).ok(),
            }),
            KvAction::Delete => deletes
                .entry(key.namespace)
                .or_default()
                .push(key.key.clone()),
        }
    }
    let mut requests = Vec::new();
    for (namespace, pairs) in puts {
        requests.extend(
            chunk_pairs(pairs)
                .into_iter()
                .map(|pairs| KvRequest::Put { namespace, pairs }),
        );
    }
    for (namespace, keys) in deletes {
        // Keys are at most 512 bytes, so 10,000 of them stay far under the size limit.
        requests.extend(keys.chunks(MAX_BULK_ITEMS).map(|keys| KvRequest::Delete {
            namespace,
            keys: keys.to_vec(),
        }));
    }
    requests
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(i: usize, value_len: usize) -> KvPair {
        KvPair {
            key: format!("k{i}"),
            value: "v".repeat(value_len),
            metadata: None,
        }
    }

    #[test]
    fn twenty_thousand_small_pairs_make_two_requests() {
        let chunks = chunk_pairs((0..20_000).map(|i| pair(i, 10)).collect());
        assert_eq!(
            chunks.iter().map(Vec::len).collect::<Vec<_>>(),
            [10_000, 10_000]
        );
    }

    #[test]
    fn bodies_stay_under_one_hundred_megabytes() {
        // Five 24 MiB values: four fit under 100 MB (decimal), the fifth opens a new request.
        let chunks = chunk_pairs((0..5).map(|i| pair(i, 24 * 1024 * 1024)).collect());
        assert_eq!(chunks.iter().map(Vec::len).collect::<Vec<_>>(), [3, 2]);
        for chunk in chunks {
            assert!(serde_json::to_vec(&chunk).unwrap().len() < MAX_BULK_BYTES);
        }
    }
}
