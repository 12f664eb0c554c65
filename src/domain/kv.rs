//! Cloudflare Workers KV as the proxy reads it: the two namespaces, the keys this function
//! writes, what it does to a key, and the limits Cloudflare enforces (docs/contract.md, "KV").

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::ids::IndexRef;
use super::json_text::{push_json_string, push_str};
use super::secrets::ApiKey;
use super::settings::IndexSettings;
use super::validate::shown;

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
    digest_bytes(value.as_bytes())
}

fn digest_bytes(value: &[u8]) -> String {
    let mut hex = String::with_capacity(16);
    push_hex(&mut hex, &Sha256::digest(value)[..8]);
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
    /// The metadata JSON for a value of `digest` written for `index`; names too long for the
    /// limit are left out (the value says).
    pub fn json(index: &IndexRef, digest: &str) -> String {
        let mut out = Vec::new();
        Self::write_json(index, digest, &mut out);
        String::from_utf8(out).expect("JSON text is UTF-8")
    }

    /// Appends [`KeyMetadata::json`], written by hand as serde_json would write the
    /// [`KeyMetadata`] (a test holds them equal): it is written for every value of a batch.
    pub fn write_json(index: &IndexRef, digest: &str, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(b"{\"writer\":");
        push_str(out, WRITER);
        out.extend_from_slice(b",\"v\":1");
        let names = out.len();
        out.extend_from_slice(b",\"account\":");
        push_str(out, &index.account);
        out.extend_from_slice(b",\"index\":");
        push_str(out, &index.name);
        let end = |out: &mut Vec<u8>| {
            out.extend_from_slice(b",\"digest\":");
            push_str(out, digest);
            out.push(b'}');
        };
        end(out);
        if out.len() - start > MAX_METADATA_BYTES {
            out.truncate(names);
            end(out);
        }
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

/// A value to write. An index's settings are kept as the decoded record and its account's API
/// key, and rendered only where they go: straight into a request body, with no copy in between.
#[derive(Clone, PartialEq)]
pub enum KvValue {
    /// JSON text written as given, for `index`.
    Text { index: IndexRef, text: String },
    Settings {
        settings: Arc<IndexSettings>,
        api_key: ApiKey,
    },
}

impl KvValue {
    pub fn new(index: &IndexRef, text: String) -> Self {
        KvValue::Text {
            index: index.clone(),
            text,
        }
    }

    pub fn settings(settings: Arc<IndexSettings>, api_key: ApiKey) -> Self {
        KvValue::Settings { settings, api_key }
    }

    /// The index the value was written for (named in the key's metadata).
    pub fn index(&self) -> &IndexRef {
        match self {
            KvValue::Text { index, .. } => index,
            KvValue::Settings { settings, .. } => &settings.index,
        }
    }

    /// Appends the value's JSON text.
    pub fn render(&self, out: &mut Vec<u8>) {
        match self {
            KvValue::Text { text, .. } => out.extend_from_slice(text.as_bytes()),
            KvValue::Settings { settings, api_key } => settings.kv_value(api_key).write_json(out),
        }
    }

    /// The value's JSON text (rendered, for settings).
    pub fn text(&self) -> Cow<'_, str> {
        match self {
            KvValue::Text { text, .. } => Cow::Borrowed(text),
            KvValue::Settings { .. } => {
                let mut out = Vec::with_capacity(self.size_hint());
                self.render(&mut out);
                Cow::Owned(String::from_utf8(out).expect("JSON text is UTF-8"))
            }
        }
    }

    /// About how many bytes the value takes, without rendering it.
    pub fn size_hint(&self) -> usize {
        match self {
            KvValue::Text { text, .. } => text.len(),
            KvValue::Settings { settings, api_key } => {
                settings.size_hint() + api_key.expose().len()
            }
        }
    }

    /// The value's size when it is over Cloudflare's limit. Settings render only when even a
    /// pessimistic bound (every string escaped six times over) does not fit.
    pub fn oversize(&self) -> Option<usize> {
        let bound = match self {
            KvValue::Text { text, .. } => text.len(),
            KvValue::Settings { .. } => 6 * self.size_hint(),
        };
        if bound <= MAX_VALUE_BYTES {
            return None;
        }
        Some(self.text().len()).filter(|&size| size > MAX_VALUE_BYTES)
    }

    pub fn digest(&self) -> String {
        digest(&self.text())
    }
}

#[derive(Clone, PartialEq)]
pub enum KvAction {
    /// Shared: the same value goes under an index's own key and its shop key.
    Put(Arc<KvValue>),
    Delete,
}

impl KvAction {
    pub fn put(value: KvValue) -> Self {
        KvAction::Put(Arc::new(value))
    }
}

// Settings values carry API keys: `Debug` shows only their index and size.
impl std::fmt::Debug for KvValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KvValue({}, {} bytes)", self.index(), self.text().len())
    }
}

impl std::fmt::Debug for KvAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KvAction::Put(value) => write!(f, "Put({} bytes)", value.text().len()),
            KvAction::Delete => f.write_str("Delete"),
        }
    }
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
    /// Where a value is rendered, then escaped, before it is copied into `bytes`: reused.
    scratch: Vec<u8>,
    escaped: Vec<u8>,
}

impl Default for PutBody {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

impl PutBody {
    /// A body expected to grow to about `bytes`: reserved once, not doubled as it grows.
    pub fn with_capacity(bytes: usize) -> Self {
        Self::in_buffer(Vec::with_capacity(bytes.max(2)))
    }

    /// A body written into `buffer` (memory already faulted in, such as the event's) when it
    /// holds at least the unescaped half of `bytes`; otherwise as [`PutBody::with_capacity`].
    pub fn reusing(buffer: Vec<u8>, bytes: usize) -> Self {
        if buffer.capacity() < bytes / 2 {
            return Self::with_capacity(bytes);
        }
        Self::in_buffer(buffer)
    }

    fn in_buffer(mut buffer: Vec<u8>) -> Self {
        buffer.clear();
        buffer.push(b'[');
        Self {
            bytes: buffer,
            items: Vec::new(),
            written: HashMap::new(),
            scratch: Vec::new(),
            escaped: Vec::new(),
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
        push_str(&mut self.bytes, key);
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
                self.escaped.clear();
                push_json_string(&mut self.escaped, text);
                self.bytes.extend_from_slice(&self.escaped);
                self.bytes.extend_from_slice(b",\"metadata\":");
                let digest = digest_bytes(&self.scratch);
                KeyMetadata::write_json(value.index(), &digest, &mut self.bytes);
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

/// A key Cloudflare would refuse, and why. Its schema: "at most 512 bytes. All printable,
/// non-whitespace characters are valid"; `.` and `..` cannot be named in a URL.
pub fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key == "." || key == ".." {
        return Err(format!("{} is not a valid Cloudflare KV key", shown(key)));
    }
    if key.len() > MAX_KEY_BYTES {
        let start: String = key.chars().take(40).collect();
        return Err(format!(
            "key `{start}...` is {} bytes, over Cloudflare KV's {MAX_KEY_BYTES}-byte limit",
            key.len()
        ));
    }
    // Checked for every key of a batch: ASCII keys (nearly all) byte by byte.
    let unprintable = match key.is_ascii() {
        true => key.bytes().any(|b| b <= b' ' || b == 0x7f),
        false => key.chars().any(|c| c.is_whitespace() || c.is_control()),
    };
    if unprintable {
        return Err(format!(
            "key {} holds whitespace or an unprintable character, which Cloudflare KV refuses",
            shown(key)
        ));
    }
    Ok(())
}

/// A write Cloudflare would refuse, and why.
pub fn check_put(key: &str, value: &KvValue) -> Result<(), String> {
    check_key(key)?;
    if let Some(size) = value.oversize() {
        return Err(format!(
            "value for key `{key}` is {size} bytes, over Cloudflare KV's 25 MiB limit"
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
        let metadata = |value: &KvValue| KeyMetadata::json(value.index(), &value.digest());
        let meta: serde_json::Value = serde_json::from_str(&metadata(&value)).unwrap();
        assert_eq!(
            meta,
            serde_json::json!({"writer": "ecom-settings-exporter", "v": 1, "account": "acct-1",
                               "index": "products", "digest": "44136fa355b3678a"})
        );
        let long = IndexRef::new("a".repeat(600), "b".repeat(600));
        let short = KvValue::new(&long, "{}".into());
        assert!(metadata(&short).len() <= MAX_METADATA_BYTES);
        assert!(
            KeyMetadata::ours(Some(&serde_json::from_str(&metadata(&short)).unwrap()))
                .unwrap()
                .index_ref()
                .is_none()
        );
    }

    #[test]
    fn metadata_is_written_as_serde_json_writes_it() {
        let names = [
            ("acct-1", "products"),
            ("a\"q\"", "caf\u{e9}\n"),
            ("a", &*"b".repeat(1_000)),
        ];
        for (account, name) in names {
            let index = IndexRef::new(account, name);
            let fits = account.len() + name.len() < 900;
            let expected = KeyMetadata {
                writer: WRITER.into(),
                v: 1,
                account: fits.then(|| account.into()),
                index: fits.then(|| name.into()),
                digest: "0123456789abcdef".into(),
            };
            let written = KeyMetadata::json(&index, "0123456789abcdef");
            assert_eq!(written, serde_json::to_string(&expected).unwrap());
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

    #[test]
    fn keys_are_checked_as_cloudflare_schema_states() {
        for good in [
            "acct-1-products",
            "shop-1.myshopify.com",
            "é/?#%",
            &"k".repeat(512),
        ] {
            assert_eq!(check_key(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a b",
            "a\tb",
            "a\nb",
            "a\u{0}b",
            "a\u{7f}",
            "a\u{a0}b",
            &"k".repeat(513),
        ] {
            assert!(check_key(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn settings_over_the_value_limit_are_measured_and_refused() {
        let huge = serde_json::json!({"synonyms": "w".repeat(MAX_VALUE_BYTES)});
        let settings = IndexSettings {
            index: IndexRef::new("a", "i"),
            index_url: "https://idx".into(),
            shop_id: None,
            cell: None,
            search_config: Some(huge.into()),
            collections_config: None,
            feature_flags: None,
            agentic_config: None,
            query_override_sharding: None,
            pixel_id: None,
            aliases: Default::default(),
        };
        let value = KvValue::settings(Arc::new(settings), ApiKey::new("k"));
        let size = value.oversize().expect("over the limit");
        assert_eq!(size, value.text().len());
        let error = check_put("a-i", &value).unwrap_err();
        assert!(
            error.contains("over Cloudflare KV's 25 MiB limit"),
            "{error}"
        );
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
