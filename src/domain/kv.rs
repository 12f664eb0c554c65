//! Cloudflare Workers KV as the proxy reads it: the two namespaces, the keys this function
//! writes, what it does to a key, and the limits Cloudflare enforces (docs/contract.md, "KV").

use std::collections::HashSet;

use bytes::Bytes;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::ids::IndexRef;

/// Cloudflare rejects keys over 512 bytes and the names `.` and `..`.
pub const MAX_KEY_BYTES: usize = 512;
/// Cloudflare's value limit, 25 MiB.
pub const MAX_VALUE_BYTES: usize = 25 * 1024 * 1024;
/// Pairs (or keys) in one bulk write (or delete).
pub const MAX_BULK_ITEMS: usize = 10_000;
/// Keys in one bulk read.
pub const MAX_BULK_GET_KEYS: usize = 100;
/// Cloudflare: "the entire request size must be less than 100 megabytes".
pub const MAX_BULK_BYTES: usize = 100_000_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Namespace {
    /// Index settings, the proxy's `KV` binding.
    Settings,
    /// Query-config overrides, the proxy's `KV_QCFG` binding.
    QueryConfigs,
}

impl Namespace {
    /// How answers and logs name the namespace.
    pub fn name(self) -> &'static str {
        match self {
            Namespace::Settings => "settings",
            Namespace::QueryConfigs => "query_configs",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KvKey {
    pub namespace: Namespace,
    pub key: String,
}

impl KvKey {
    pub fn settings(key: impl Into<String>) -> Self {
        Self {
            namespace: Namespace::Settings,
            key: key.into(),
        }
    }

    /// An index's own settings key, `{system_account_id}-{index_name}`.
    pub fn index(index: &IndexRef) -> Self {
        Self::settings(index.id().0)
    }

    /// A key of the query-config namespace, by name.
    pub fn query_config_named(key: &str) -> Self {
        Self {
            namespace: Namespace::QueryConfigs,
            key: key.to_owned(),
        }
    }

    /// `qcfg-{system_account_id}-{index_name}-{sha256(normalized query) as lower hex}`.
    pub fn query_config(index: &IndexRef, query: &str) -> Self {
        Self {
            namespace: Namespace::QueryConfigs,
            key: query_config_key(index, query),
        }
    }
}

/// `qcfg-{system_account_id}-{index_name}-{sha256(normalized_query) as lower hex}`.
pub fn query_config_key(index: &IndexRef, query: &str) -> String {
    let mut key = query_config_prefix(index);
    push_hex(&mut key, &Sha256::digest(query.as_bytes()));
    key
}

/// What every query-config key of the index starts with. Not unique to the index:
/// `(a-1, x)` and `(a, 1-x)` share it.
pub fn query_config_prefix(index: &IndexRef) -> String {
    format!("qcfg-{}-{}-", index.account, index.name)
}

/// `qcfg-{account}-{index}-` followed by exactly 64 lower-case hex digits.
pub fn is_query_config_key_of(index: &IndexRef, key: &str) -> bool {
    key.strip_prefix(&query_config_prefix(index))
        .is_some_and(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

/// Who wrote a key and what, in Cloudflare's key metadata (at most 1,024 bytes, listed with the
/// key's name): drift shows by listing keys, without reading values.
pub const WRITER: &str = "ecom-settings-exporter";
pub const MAX_METADATA_BYTES: usize = 1024;

/// Appends bytes as lower-case hex.
fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    out.reserve(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 0xf) as usize] as char);
    }
}

/// The first 16 hex digits of the SHA-256 of a value.
pub fn digest(value: &str) -> String {
    let mut hex = String::with_capacity(16);
    push_hex(&mut hex, &Sha256::digest(value.as_bytes())[..8]);
    hex
}

/// What the exporter says about a key it wrote (docs/contract.md, "Key metadata").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct KeyMetadata {
    pub writer: String,
    pub v: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<String>,
    pub digest: String,
}

impl KeyMetadata {
    pub fn for_value(index: &IndexRef, value: &str) -> Self {
        Self {
            writer: WRITER.into(),
            v: 1,
            account: Some(index.account.clone()),
            index: Some(index.name.clone()),
            digest: digest(value),
        }
    }

    /// The JSON sent with the key; names too long for the limit are left out (the value says).
    pub fn to_json(&self) -> String {
        let json = serde_json::to_string(self).expect("metadata serializes");
        if json.len() <= MAX_METADATA_BYTES {
            return json;
        }
        let short = KeyMetadata {
            account: None,
            index: None,
            ..self.clone()
        };
        serde_json::to_string(&short).expect("metadata serializes")
    }

    /// Metadata as listed, if this function wrote it.
    pub fn ours(listed: Option<&serde_json::Value>) -> Option<Self> {
        let meta: Self = serde_json::from_value(listed?.clone()).ok()?;
        (meta.writer == WRITER).then_some(meta)
    }

    /// The index the key was written for, when the metadata names it.
    pub fn index_ref(&self) -> Option<IndexRef> {
        Some(IndexRef::new(self.account.clone()?, self.index.clone()?))
    }
}

/// A value to write, and the metadata that goes with it.
#[derive(Clone, PartialEq)]
pub struct KvValue {
    pub text: String,
    pub metadata: String,
}

impl KvValue {
    pub fn new(index: &IndexRef, text: String) -> Self {
        let metadata = KeyMetadata::for_value(index, &text).to_json();
        Self { text, metadata }
    }
}

impl std::ops::Deref for KvValue {
    type Target = str;
    fn deref(&self) -> &str {
        &self.text
    }
}

#[derive(Clone, PartialEq)]
pub enum KvAction {
    Put(KvValue),
    Delete,
}

// Settings values carry API keys: `Debug` shows only their size.
impl std::fmt::Debug for KvAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvAction::Put(value) => write!(f, "Put({} bytes)", value.len()),
            KvAction::Delete => f.write_str("Delete"),
        }
    }
}

/// A bulk write body being built: each pair written once, straight into the body, as
/// `{"key": ..., "value": "<the value's JSON as a string>", "metadata": {...}}`.
#[derive(Default)]
pub struct PutBody {
    bytes: Vec<u8>,
    /// Each pair's key and where its JSON is in `bytes`.
    items: Vec<(String, std::ops::Range<usize>)>,
}

impl PutBody {
    /// One pair's JSON, to size it before it joins a body.
    pub fn item(key: &str, value: &KvValue) -> Vec<u8> {
        let mut item = Vec::with_capacity(value.text.len() + value.metadata.len() + key.len() + 64);
        item.extend_from_slice(b"{\"key\":");
        serde_json::to_writer(&mut item, key).expect("strings serialize");
        item.extend_from_slice(b",\"value\":");
        serde_json::to_writer(&mut item, &value.text).expect("strings serialize");
        item.extend_from_slice(b",\"metadata\":");
        item.extend_from_slice(value.metadata.as_bytes());
        item.push(b'}');
        item
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Bytes of the body with this item added (brackets and commas included).
    pub fn size_with(&self, item: &[u8]) -> usize {
        self.bytes.len() + item.len() + 3
    }

    pub fn push(&mut self, key: String, item: &[u8]) {
        if !self.bytes.is_empty() {
            self.bytes.push(b',');
        }
        let start = self.bytes.len();
        self.bytes.extend_from_slice(item);
        self.items.push((key, start..self.bytes.len()));
    }

    fn finish(self) -> (Bytes, Vec<(String, std::ops::Range<usize>)>) {
        let mut body = Vec::with_capacity(self.bytes.len() + 2);
        body.push(b'[');
        body.extend_from_slice(&self.bytes);
        body.push(b']');
        // Spans shift by the opening bracket.
        let items = self
            .items
            .into_iter()
            .map(|(k, r)| (k, r.start + 1..r.end + 1))
            .collect();
        (Bytes::from(body), items)
    }
}

/// One Cloudflare bulk request, its body built once: a retry sends the same bytes.
#[derive(Clone)]
pub enum KvRequest {
    Put {
        namespace: Namespace,
        body: Bytes,
        /// Each pair's key and where its JSON is in `body`.
        items: Vec<(String, std::ops::Range<usize>)>,
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

    /// The pairs of a bulk write, read back from its body (for in-memory stores and tests).
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
                    kept.push(key.clone(), &body[span.clone()]);
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

/// A key Cloudflare would refuse, and why.
pub fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key == "." || key == ".." {
        return Err(format!("`{key}` is not a valid Cloudflare KV key"));
    }
    if key.len() > MAX_KEY_BYTES {
        let shown: String = key.chars().take(40).collect();
        return Err(format!(
            "key `{shown}...` is {} bytes, over Cloudflare KV's {MAX_KEY_BYTES}-byte limit",
            key.len()
        ));
    }
    Ok(())
}

/// A write Cloudflare would refuse, and why.
pub fn check_put(key: &str, value: &str) -> Result<(), String> {
    check_key(key)?;
    if value.len() > MAX_VALUE_BYTES {
        return Err(format!(
            "value for key `{key}` is {} bytes, over Cloudflare KV's 25 MiB limit",
            value.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_config_key_is_sha256_of_the_normalized_query() {
        // sha256("") is well known; the key must use lower-case hex.
        assert_eq!(
            query_config_key(&IndexRef::new("acct-1", "products"), ""),
            "qcfg-acct-1-products-e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn metadata_names_the_writer_the_index_and_the_value_digest() {
        let index = IndexRef::new("acct-1", "products");
        let value = KvValue::new(&index, "{}".into());
        let meta: serde_json::Value = serde_json::from_str(&value.metadata).unwrap();
        assert_eq!(
            meta,
            serde_json::json!({"writer": "ecom-settings-exporter", "v": 1, "account": "acct-1",
                               "index": "products", "digest": "44136fa355b3678a"})
        );
        let long = IndexRef::new("a".repeat(600), "b".repeat(600));
        let short = KvValue::new(&long, "{}".into());
        assert!(short.metadata.len() <= MAX_METADATA_BYTES);
        assert!(
            KeyMetadata::ours(Some(&serde_json::from_str(&short.metadata).unwrap()))
                .unwrap()
                .index_ref()
                .is_none()
        );
    }

    #[test]
    fn request_debug_never_shows_values_and_retain_keeps_only_what_is_asked() {
        let index = IndexRef::new("a", "i");
        let mut body = PutBody::default();
        for key in ["k1", "k2"] {
            let value = KvValue::new(&index, "{\"marqo_api_key\":\"secret\"}".into());
            body.push(key.into(), &PutBody::item(key, &value));
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

    #[test]
    fn query_config_keys_belong_to_their_own_index_only() {
        let index = IndexRef::new("a", "p");
        let hash = "0".repeat(64);
        assert!(is_query_config_key_of(&index, &format!("qcfg-a-p-{hash}")));
        assert!(!is_query_config_key_of(
            &index,
            &format!("qcfg-a-p-x-{hash}")
        ));
        assert!(!is_query_config_key_of(&index, "qcfg-a-p-123"));
    }
}
