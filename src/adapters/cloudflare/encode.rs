//! Planned operations as Cloudflare's bulk requests: as few as its limits allow (10,000 pairs
//! and under 100 MB a request), each pair's JSON written once
//! (`[{"key", "value", "metadata"}]` to write, `[key]` to delete).

use std::collections::{BTreeMap, HashSet};

use bytes::Bytes;

use crate::domain::kv::{digest, KeyMetadata, KvValue};
use crate::domain::{KvAction, KvKey, KvOp, Namespace};

/// Pairs (or keys) in one bulk write (or delete).
pub const MAX_BULK_ITEMS: usize = 10_000;
/// Keys in one bulk read.
pub const MAX_BULK_GET_KEYS: usize = 100;
/// Cloudflare: "the entire request size must be less than 100 megabytes".
pub const MAX_BULK_BYTES: usize = 100_000_000;

/// All the requests `ops` need, in their order: per namespace, bulk writes of at most
/// [`MAX_BULK_ITEMS`] pairs and under [`MAX_BULK_BYTES`]; bulk deletes.
pub fn requests(ops: Vec<KvOp>) -> Vec<KvRequest> {
    let mut puts: BTreeMap<Namespace, Vec<KvRequest>> = BTreeMap::new();
    let mut deletes: BTreeMap<Namespace, Vec<String>> = BTreeMap::new();
    for (KvKey { namespace, key }, action) in ops {
        let KvAction::Put(value) = action else {
            deletes.entry(namespace).or_default().push(key);
            continue;
        };
        let pair = pair_json(&key, &value);
        let requests = puts.entry(namespace).or_default();
        match requests.last_mut() {
            // A pair goes on the last request while both limits hold (`,` and `]` counted).
            Some(KvRequest::Put { pairs, size, .. })
                if pairs.len() < MAX_BULK_ITEMS && *size + pair.len() + 2 < MAX_BULK_BYTES =>
            {
                *size += pair.len() + 1;
                pairs.push((key, pair));
            }
            _ => requests.push(KvRequest::Put {
                namespace,
                size: pair.len() + 2,
                pairs: vec![(key, pair)],
            }),
        }
    }
    let mut requests: Vec<KvRequest> = puts.into_values().flatten().collect();
    for (namespace, keys) in deletes {
        // Keys are at most 512 bytes, so 10,000 of them stay far under the size limit.
        requests.extend(keys.chunks(MAX_BULK_ITEMS).map(|keys| KvRequest::Delete {
            namespace,
            keys: keys.to_vec(),
        }));
    }
    requests
}

/// A pair as a bulk write takes it: `{"key": ..., "value": "<the value's JSON as a string>",
/// "metadata": {...}}`.
fn pair_json(key: &str, value: &KvValue) -> String {
    let mut json = Vec::with_capacity(value.text().len() + key.len() + 200);
    json.extend_from_slice(b"{\"key\":");
    serde_json::to_writer(&mut json, key).expect("a string serializes");
    json.extend_from_slice(b",\"value\":");
    serde_json::to_writer(&mut json, value.text()).expect("a string serializes");
    json.extend_from_slice(b",\"metadata\":");
    let digest = digest(value.text());
    KeyMetadata::write_json(value.index(), value.query(), &digest, &mut json);
    json.push(b'}');
    String::from_utf8(json).expect("JSON text is UTF-8")
}

/// One Cloudflare bulk request.
#[derive(Clone)]
pub enum KvRequest {
    Put {
        namespace: Namespace,
        /// Each pair's key and its JSON.
        pairs: Vec<(String, String)>,
        /// Bytes of the body.
        size: usize,
    },
    Delete {
        namespace: Namespace,
        keys: Vec<String>,
    },
}

// Values carry API keys: `Debug` shows the keys and the size, never the body.
impl std::fmt::Debug for KvRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvRequest::Put {
                namespace, size, ..
            } => write!(f, "Put({namespace:?}, {:?}, {size} bytes)", self.keys()),
            KvRequest::Delete { namespace, keys } => write!(f, "Delete({namespace:?}, {keys:?})"),
        }
    }
}

impl KvRequest {
    pub fn keys(&self) -> Vec<&str> {
        match self {
            KvRequest::Put { pairs, .. } => pairs.iter().map(|(k, _)| k.as_str()).collect(),
            KvRequest::Delete { keys, .. } => keys.iter().map(String::as_str).collect(),
        }
    }

    /// The JSON body Cloudflare takes: `[{key, value, metadata}]` to write, `[key]` to delete.
    pub fn body(&self) -> Bytes {
        match self {
            KvRequest::Put { pairs, size, .. } => {
                let mut body = String::with_capacity(*size);
                body.push('[');
                for (i, (_, pair)) in pairs.iter().enumerate() {
                    body.push_str(if i == 0 { "" } else { "," });
                    body.push_str(pair);
                }
                body.push(']');
                Bytes::from(body)
            }
            KvRequest::Delete { keys, .. } => {
                Bytes::from(serde_json::to_vec(keys).expect("strings serialize"))
            }
        }
    }

    /// The pairs of a bulk write, read back from its body (for tests).
    #[cfg(test)]
    pub fn pairs(&self) -> Vec<(String, String)> {
        #[derive(serde::Deserialize)]
        struct Pair {
            key: String,
            value: String,
        }
        match self {
            KvRequest::Put { .. } => serde_json::from_slice::<Vec<Pair>>(&self.body())
                .expect("bodies this code wrote")
                .into_iter()
                .map(|p| (p.key, p.value))
                .collect(),
            KvRequest::Delete { .. } => Vec::new(),
        }
    }

    /// Keeps only the items whose key is in `keys` (to send again what did not make it).
    pub fn retain_keys(&mut self, keys: &[String]) {
        let keep: HashSet<&str> = keys.iter().map(String::as_str).collect();
        match self {
            KvRequest::Put { pairs, size, .. } => {
                pairs.retain(|(key, _)| keep.contains(key.as_str()));
                *size = 1 + pairs.iter().map(|(_, pair)| pair.len() + 1).sum::<usize>();
            }
            KvRequest::Delete { keys, .. } => keys.retain(|k| keep.contains(k.as_str())),
        }
    }

    pub fn namespace(&self) -> Namespace {
        match self {
            KvRequest::Put { namespace, .. } | KvRequest::Delete { namespace, .. } => *namespace,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use serde_json::json;

    use crate::domain::kv::digest;
    use crate::domain::{ApiKey, IndexRef, KvKey};
    use crate::dynamo::{index_settings, item_from_dynamodb_json};

    fn ops(n: usize, value_len: usize) -> Vec<KvOp> {
        let index = IndexRef::new("a", "i");
        (0..n)
            .map(|i| {
                let action = KvAction::put(KvValue::new(&index, "v".repeat(value_len)));
                (KvKey::settings(format!("k{i:05}")), action)
            })
            .collect()
    }

    fn sizes(requests: &[KvRequest]) -> Vec<usize> {
        requests.iter().map(|r| r.keys().len()).collect()
    }

    #[test]
    fn twenty_thousand_small_pairs_make_two_requests() {
        let requests = requests(ops(20_000, 10));
        assert_eq!(sizes(&requests), [10_000, 10_000]);
        let body: Vec<serde_json::Value> = serde_json::from_slice(&requests[0].body()).unwrap();
        assert_eq!(body[0]["key"], "k00000");
        assert_eq!(body[0]["value"], "vvvvvvvvvv");
        assert_eq!(body[0]["metadata"]["writer"], "ecom-settings-exporter");
    }

    #[test]
    fn pairs_are_written_in_the_order_given_deletes_after_writes() {
        let index = IndexRef::new("a", "i");
        let put = |v: &str| KvAction::put(KvValue::new(&index, v.into()));
        let ops = vec![
            (KvKey::settings("a-2"), put("v0")),
            (KvKey::settings("gone"), KvAction::Delete),
            (KvKey::settings("shop-2"), put("v0")),
            (KvKey::settings("a-1"), put("v1")),
        ];
        let requests = requests(ops);
        assert_eq!(sizes(&requests), [3, 1]);
        let body: Vec<serde_json::Value> = serde_json::from_slice(&requests[0].body()).unwrap();
        let keys: Vec<&str> = body.iter().map(|p| p["key"].as_str().unwrap()).collect();
        assert_eq!(keys, ["a-2", "shop-2", "a-1"]);
        assert_eq!(requests[1].body().as_ref(), br#"["gone"]"#);
    }

    #[test]
    fn keys_sharing_a_value_each_get_the_whole_pair() {
        let index = IndexRef::new("a", "i");
        let shared = KvAction::put(KvValue::new(&index, r#"{"q":"\"x\""}"#.into()));
        let ops: Vec<KvOp> = ["a-i", "shop-1", "shop-2"]
            .into_iter()
            .map(|key| (KvKey::settings(key), shared.clone()))
            .collect();
        let requests = requests(ops);
        assert_eq!(sizes(&requests), [3]);
        let body: Vec<serde_json::Value> = serde_json::from_slice(&requests[0].body()).unwrap();
        for (item, key) in body.iter().zip(["a-i", "shop-1", "shop-2"]) {
            assert_eq!(item["key"], key);
            assert_eq!(item["value"], r#"{"q":"\"x\""}"#);
            assert_eq!(item["metadata"]["index"], "i");
        }
    }

    #[test]
    fn settings_are_rendered_into_the_body_as_the_proxy_reads_them() {
        let image = json!({"index_endpoint": {"S": "https://idx/\"q\""},
            "search_config": {"M": {"limit": {"N": "20"}, "text": {"S": "a\nb"}}}});
        let image = item_from_dynamodb_json(image).unwrap();
        let settings = index_settings(IndexRef::new("a", "i"), &image).unwrap();
        let key = ApiKey::new("k-1");
        let expected = serde_json::to_string(&settings.kv_value(&key)).unwrap();
        let value = KvValue::settings(&settings, &key);
        assert_eq!(value.text(), expected);
        assert_eq!(value.oversize(), None);
        let ops = vec![(KvKey::settings("a-i"), KvAction::put(value))];
        let body: Vec<serde_json::Value> =
            serde_json::from_slice(&requests(ops)[0].body()).unwrap();
        assert_eq!(body[0]["value"], expected.as_str());
        assert_eq!(body[0]["metadata"]["digest"], digest(&expected).as_str());
    }

    #[test]
    fn bodies_stay_under_one_hundred_megabytes() {
        // Five 24 MiB values: three fit under 100 MB (decimal) with their JSON, two go next.
        let requests = requests(ops(5, 24 * 1024 * 1024));
        assert_eq!(sizes(&requests), [3, 2]);
        for request in requests {
            assert!(request.body().len() < MAX_BULK_BYTES);
            assert!(matches!(request, KvRequest::Put { size, .. } if size == request.body().len()));
        }
    }

    #[test]
    fn request_debug_never_shows_values_and_retain_keeps_only_what_is_asked() {
        let index = IndexRef::new("a", "i");
        let value = KvAction::put(KvValue::new(
            &index,
            "{\"marqo_api_key\":\"secret\"}".into(),
        ));
        let ops = ["k1", "k2"].map(|key| (KvKey::settings(key), value.clone()));
        let mut request = requests(ops.into()).remove(0);
        assert!(!format!("{request:?}").contains("secret"));
        request.retain_keys(&["k2".to_string()]);
        assert_eq!(request.keys(), ["k2"]);
        assert!(matches!(request, KvRequest::Put { size, .. } if size == request.body().len()));
        let pairs = request.pairs();
        assert_eq!(
            pairs,
            [(
                "k2".to_string(),
                "{\"marqo_api_key\":\"secret\"}".to_string()
            )]
        );
        let body: serde_json::Value = serde_json::from_slice(&request.body()).unwrap();
        assert_eq!(body[0]["metadata"]["index"], "i");
    }
}
