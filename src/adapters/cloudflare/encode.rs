//! Planned operations as Cloudflare's bulk requests: as few as its limits allow (10,000 pairs
//! and under 100 MB a request), each pair's JSON written once, straight into its body
//! (`[{"key", "value", "metadata"}]` to write, `[key]` to delete).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;

use crate::domain::kv::{digest_bytes, KeyMetadata, KvValue};
use crate::domain::{KvAction, KvOp, Namespace};

/// Pairs (or keys) in one bulk write (or delete).
pub const MAX_BULK_ITEMS: usize = 10_000;
/// Keys in one bulk read.
pub const MAX_BULK_GET_KEYS: usize = 100;
/// Cloudflare: "the entire request size must be less than 100 megabytes".
pub const MAX_BULK_BYTES: usize = 100_000_000;

/// The room to reserve for the next body of a namespace, out of what its pairs not yet in a
/// body are expected to take (bytes, pairs).
fn take_room(left: &mut (usize, usize)) -> usize {
    let (bytes, pairs) = left;
    let share = (*pairs).clamp(1, MAX_BULK_ITEMS);
    let room = (*bytes / (*pairs).max(1) * share).min(*bytes);
    (*bytes, *pairs) = (*bytes - room, pairs.saturating_sub(share));
    room.min(MAX_BULK_BYTES)
}

/// All the requests `ops` need, in their order: per namespace, bulk writes of at most
/// [`MAX_BULK_ITEMS`] pairs and under [`MAX_BULK_BYTES`], each pair written once into its body;
/// bulk deletes. The values are dropped once the bodies hold them.
pub fn requests(ops: Vec<KvOp>) -> Vec<KvRequest> {
    // What each body will take, reserved up front (escaping at most doubles a value): growing
    // by doubling would copy and fault in twice the memory. A body holds at most
    // MAX_BULK_ITEMS pairs, so it reserves for its own pairs, not for its whole namespace.
    let mut expected: BTreeMap<Namespace, (usize, usize)> = BTreeMap::new();
    for (key, action) in &ops {
        if let KvAction::Put(value) = action {
            let index = value.index();
            let names = index.account.len() + index.name.len();
            let size = key.key.len() + 2 * value.size_hint() + names + 120;
            let (bytes, pairs) = expected.entry(key.namespace).or_default();
            (*bytes, *pairs) = (*bytes + size, *pairs + 1);
        }
    }
    let mut puts: BTreeMap<Namespace, (Vec<KvRequest>, PutBody)> = BTreeMap::new();
    let mut deletes: BTreeMap<Namespace, Vec<String>> = BTreeMap::new();
    // Borrowed, not taken: a value shared by two keys is known as shared while both hold it.
    for (key, action) in &ops {
        match action {
            KvAction::Put(value) => {
                let left = expected.get_mut(&key.namespace).expect("counted above");
                let (full, body) = puts
                    .entry(key.namespace)
                    .or_insert_with(|| (Vec::new(), PutBody::with_capacity(take_room(left))));
                let mut next = |body: &mut PutBody| {
                    std::mem::replace(body, PutBody::with_capacity(take_room(left)))
                };
                if body.len() == MAX_BULK_ITEMS {
                    full.push(KvRequest::put(key.namespace, next(body)));
                }
                body.push(&key.key, value);
                if body.size() >= MAX_BULK_BYTES && body.len() > 1 {
                    // Too big with this pair: it starts the next request.
                    body.pop();
                    full.push(KvRequest::put(key.namespace, next(body)));
                    body.push(&key.key, value);
                }
            }
            KvAction::Delete => (deletes.entry(key.namespace).or_default()).push(key.key.clone()),
        }
    }
    let mut requests = Vec::new();
    for (namespace, (full, last)) in puts {
        requests.extend(full);
        if !last.is_empty() {
            requests.push(KvRequest::put(namespace, last));
        }
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

/// A bulk write body being built, `[{"key": ..., "value": "<the value's JSON as a string>",
/// "metadata": {...}}, ...]`: each pair written straight into it, and a value that several keys
/// share (an index's own key and its shop key) escaped only once.
pub struct PutBody {
    bytes: Vec<u8>,
    /// Each pair's key and where its JSON is in `bytes`.
    items: Vec<(String, Range<usize>)>,
    /// Where a shared value's `,"value":...,"metadata":...}` already is in `bytes`, by the
    /// value's address (the values outlive the body being built).
    written: HashMap<usize, Range<usize>>,
    /// Where a value is rendered before it is written into `bytes` as a string: reused.
    scratch: Vec<u8>,
}

impl Default for PutBody {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

impl PutBody {
    /// A body expected to grow to about `bytes`: reserved once, not doubled as it grows.
    pub fn with_capacity(bytes: usize) -> Self {
        let mut buffer = Vec::with_capacity(bytes.max(2));
        buffer.push(b'[');
        Self {
            bytes: buffer,
            items: Vec::new(),
            written: HashMap::new(),
            scratch: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Bytes of the finished body.
    pub fn size(&self) -> usize {
        self.bytes.len() + 1
    }

    fn start_item(&mut self) -> usize {
        if !self.items.is_empty() {
            self.bytes.push(b',');
        }
        self.bytes.len()
    }

    /// Writes a pair.
    pub fn push(&mut self, key: &str, value: &Arc<KvValue>) {
        let start = self.start_item();
        self.bytes.extend_from_slice(b"{\"key\":");
        serde_json::to_writer(&mut self.bytes, key).expect("a string serializes");
        // Only a value another key also holds can come again: the others skip the map.
        let shared = Arc::strong_count(value) > 1;
        let id = Arc::as_ptr(value) as usize;
        match shared.then(|| self.written.get(&id)).flatten() {
            Some(tail) => self.bytes.extend_from_within(tail.clone()),
            None => {
                let tail = self.bytes.len();
                self.scratch.clear();
                value.render(&mut self.scratch);
                let text = std::str::from_utf8(&self.scratch).expect("JSON text is UTF-8");
                self.bytes.extend_from_slice(b",\"value\":");
                serde_json::to_writer(&mut self.bytes, text).expect("a string serializes");
                self.bytes.extend_from_slice(b",\"metadata\":");
                let digest = digest_bytes(&self.scratch);
                KeyMetadata::write_json(value.index(), value.query(), &digest, &mut self.bytes);
                self.bytes.push(b'}');
                if shared {
                    self.written.insert(id, tail..self.bytes.len());
                }
            }
        }
        self.items.push((key.to_owned(), start..self.bytes.len()));
    }

    /// Copies a pair already written in another body.
    fn push_written(&mut self, key: &str, item: &[u8]) {
        let start = self.start_item();
        self.bytes.extend_from_slice(item);
        self.items.push((key.to_owned(), start..self.bytes.len()));
    }

    /// Takes the last pair back out (it made the body too big).
    pub fn pop(&mut self) {
        let Some((_, span)) = self.items.pop() else {
            return;
        };
        let cut = if self.items.is_empty() {
            span.start
        } else {
            span.start - 1
        };
        self.bytes.truncate(cut);
        self.written.retain(|_, tail| tail.end <= cut);
    }

    fn finish(mut self) -> (Bytes, Vec<(String, Range<usize>)>) {
        self.bytes.push(b']');
        (Bytes::from(self.bytes), self.items)
    }
}

/// One Cloudflare bulk request, its body built once: a retry sends the same bytes.
#[derive(Clone)]
pub enum KvRequest {
    Put {
        namespace: Namespace,
        body: Bytes,
        /// Each pair's key and where its JSON is in `body`.
        items: Vec<(String, Range<usize>)>,
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
                namespace,
                body,
                items,
            } => write!(
                f,
                "Put({namespace:?}, {:?}, {} bytes)",
                items.iter().map(|(k, _)| k).collect::<Vec<_>>(),
                body.len()
            ),
            KvRequest::Delete { namespace, keys } => write!(f, "Delete({namespace:?}, {keys:?})"),
        }
    }
}

impl KvRequest {
    pub fn put(namespace: Namespace, body: PutBody) -> Self {
        let (body, items) = body.finish();
        KvRequest::Put {
            namespace,
            body,
            items,
        }
    }

    pub fn keys(&self) -> Vec<&str> {
        match self {
            KvRequest::Put { items, .. } => items.iter().map(|(k, _)| k.as_str()).collect(),
            KvRequest::Delete { keys, .. } => keys.iter().map(String::as_str).collect(),
        }
    }

    /// The JSON body Cloudflare takes: `[{key, value, metadata}]` to write, `[key]` to delete.
    pub fn body(&self) -> Bytes {
        match self {
            KvRequest::Put { body, .. } => body.clone(),
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
            KvRequest::Put { body, .. } => serde_json::from_slice::<Vec<Pair>>(body)
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
            KvRequest::Put {
                namespace,
                body,
                items,
            } => {
                let mut kept = PutBody::default();
                for (key, span) in items.iter().filter(|(k, _)| keep.contains(k.as_str())) {
                    kept.push_written(key, &body[span.clone()]);
                }
                *self = KvRequest::put(*namespace, kept);
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
        let settings = Arc::new(index_settings(IndexRef::new("a", "i"), &image).unwrap());
        let key = ApiKey::new("k-1");
        let expected = serde_json::to_string(&settings.kv_value(&key)).unwrap();
        let value = KvValue::settings(settings, key);
        assert_eq!(value.text(), expected);
        assert!(
            value.size_hint() >= expected.len(),
            "the hint is a bound here"
        );
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
        }
    }

    #[test]
    fn request_debug_never_shows_values_and_retain_keeps_only_what_is_asked() {
        let index = IndexRef::new("a", "i");
        let mut body = PutBody::default();
        let value = Arc::new(KvValue::new(
            &index,
            "{\"marqo_api_key\":\"secret\"}".into(),
        ));
        for key in ["k1", "k2"] {
            body.push(key, &value);
        }
        let mut request = KvRequest::put(Namespace::Settings, body);
        assert!(!format!("{request:?}").contains("secret"));
        request.retain_keys(&["k2".to_string()]);
        assert_eq!(request.keys(), ["k2"]);
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
