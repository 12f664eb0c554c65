//! Step 4 of the pipeline, pure: planned operations become as few Cloudflare bulk requests as
//! the limits allow (10,000 items and under 100 MB a request).

use std::collections::{BTreeMap, HashSet};

use serde::Serialize;

use crate::plan::{KvAction, KvKey, Namespace, PlannedOp};

pub const MAX_BULK_ITEMS: usize = 10_000;
/// Cloudflare: "the entire request size must be less than 100 megabytes".
pub const MAX_BULK_BYTES: usize = 100_000_000;

/// One element of a bulk write body. The value is the JSON text, sent as a string.
#[derive(Clone, PartialEq, Serialize)]
pub struct KvPair {
    pub key: String,
    pub value: String,
}

// Values carry API keys: show only the key and the size.
impl std::fmt::Debug for KvPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KvPair({:?}, {} bytes)", self.key, self.value.len())
    }
}

impl KvPair {
    /// Bytes this pair adds to a bulk body, the separating comma included.
    pub fn body_bytes(&self) -> usize {
        serde_json::to_vec(self)
            .map(|v| v.len())
            .unwrap_or(usize::MAX / 2)
            + 1
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum KvRequest {
    Put {
        namespace: Namespace,
        pairs: Vec<KvPair>,
    },
    Delete {
        namespace: Namespace,
        keys: Vec<String>,
    },
}

impl KvRequest {
    pub fn keys(&self) -> Vec<&str> {
        match self {
            KvRequest::Put { pairs, .. } => pairs.iter().map(|p| p.key.as_str()).collect(),
            KvRequest::Delete { keys, .. } => keys.iter().map(String::as_str).collect(),
        }
    }

    /// The JSON body Cloudflare takes: `[{key, value}]` to write, `[key]` to delete.
    pub fn body(&self) -> Vec<u8> {
        match self {
            KvRequest::Put { pairs, .. } => serde_json::to_vec(pairs),
            KvRequest::Delete { keys, .. } => serde_json::to_vec(keys),
        }
        .expect("strings serialize")
    }

    /// Keeps only the items whose key is in `keys` (to send again what did not make it).
    pub fn retain_keys(&mut self, keys: &[String]) {
        let keep: HashSet<&str> = keys.iter().map(String::as_str).collect();
        match self {
            KvRequest::Put { pairs, .. } => pairs.retain(|p| keep.contains(p.key.as_str())),
            KvRequest::Delete { keys, .. } => keys.retain(|k| keep.contains(k.as_str())),
        }
    }

    pub fn namespace(&self) -> Namespace {
        match self {
            KvRequest::Put { namespace, .. } | KvRequest::Delete { namespace, .. } => *namespace,
        }
    }
}

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
pub fn requests(ops: &BTreeMap<KvKey, PlannedOp>) -> Vec<KvRequest> {
    let mut puts: BTreeMap<Namespace, Vec<KvPair>> = BTreeMap::new();
    let mut deletes: BTreeMap<Namespace, Vec<String>> = BTreeMap::new();
    for (key, op) in ops {
        match &op.action {
            KvAction::Put(value) => puts.entry(key.namespace).or_default().push(KvPair {
                key: key.key.clone(),
                value: value.clone(),
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

    #[test]
    fn debug_never_shows_values() {
        let p = KvPair {
            key: "k".into(),
            value: "{\"marqo_api_key\":\"secret\"}".into(),
        };
        assert!(!format!("{p:?}").contains("secret"));
    }
}
