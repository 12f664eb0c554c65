//! Workers KV as the proxy reads it: the two namespaces, the keys this function writes, what it
//! does to a key, the values and their metadata, and what KV accepts of a key and a value
//! (docs/contract.md, "KV"). How operations travel (Cloudflare's bulk requests and their
//! limits) is the store adapter's: `adapters/cloudflare/encode.rs`.

use std::borrow::Cow;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::ids::IndexRef;
use super::secrets::ApiKey;
use super::settings::IndexSettings;
use super::validate::shown;

/// Cloudflare rejects keys over 512 bytes and the names `.` and `..`.
pub const MAX_KEY_BYTES: usize = 512;
/// Cloudflare's value limit, 25 MiB.
pub const MAX_VALUE_BYTES: usize = 25 * 1024 * 1024;

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

    /// Whether this is a shop key the index's value may be on: a settings key not its own (the
    /// one test of a shop key, docs/contract.md "Where each rule lives").
    pub fn is_shop_of(&self, index: &IndexRef) -> bool {
        self.namespace == Namespace::Settings && *self != KvKey::index(index)
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

/// The digest of a value already rendered as bytes.
pub fn digest_bytes(value: &[u8]) -> String {
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
    /// An override's query (its table item is `INDEX#{index}#QUERY#{query}`), when it fits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    pub digest: String,
}

impl KeyMetadata {
    /// The metadata JSON for a value of `digest` written for `index`; names too long for the
    /// limit are left out (the value says). For tests: the function writes it with
    /// [`KeyMetadata::write_json`], straight into a body.
    #[cfg(test)]
    pub fn json(index: &IndexRef, digest: &str) -> String {
        let mut out = Vec::new();
        Self::write_json(index, None, digest, &mut out);
        String::from_utf8(out).expect("JSON text is UTF-8")
    }

    /// Appends [`KeyMetadata::json`]: the [`KeyMetadata`] as serde_json writes it, within
    /// Cloudflare's limit. (Written by hand it saved nothing measurable as deployed:
    /// docs/performance.md.)
    pub fn write_json(index: &IndexRef, query: Option<&str>, digest: &str, out: &mut Vec<u8>) {
        let mut meta = KeyMetadata {
            writer: WRITER.to_owned(),
            v: 1,
            account: Some(index.account.clone()),
            index: Some(index.name.clone()),
            query: query.map(str::to_owned),
            digest: digest.to_owned(),
        };
        // Over the limit: the query goes first, then the names (the value names its index).
        loop {
            let text = serde_json::to_vec(&meta).expect("metadata is JSON");
            if text.len() <= MAX_METADATA_BYTES || meta.account.is_none() {
                out.extend_from_slice(&text);
                return;
            }
            if meta.query.take().is_none() {
                (meta.account, meta.index) = (None, None);
            }
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

/// What a value this function wrote says of itself (both kinds name the index they were written
/// for); anything else says nothing.
#[derive(Deserialize)]
pub struct Written {
    #[allow(dead_code)]
    schema_version: u32,
    system_account_id: String,
    index_name: String,
}

impl Written {
    pub fn read(value: &str) -> Option<Self> {
        serde_json::from_str(value).ok()
    }

    /// The index the value was written for.
    pub fn owner(self) -> IndexRef {
        IndexRef::new(self.system_account_id, self.index_name)
    }
}

/// A value to write. An index's settings are kept as the decoded record and its account's API
/// key, and rendered only where they go: straight into a request body, with no copy in between.
#[derive(Clone, PartialEq)]
pub enum KvValue {
    /// JSON text written as given, for `index` (an override's: `query`, named in the key's
    /// metadata so a reconcile checks the override by key).
    Text {
        index: IndexRef,
        text: String,
        query: Option<String>,
    },
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
            query: None,
        }
    }

    /// An override's value: its query goes into the key's metadata when it fits.
    pub fn query_config(index: &IndexRef, query: &str, text: String) -> Self {
        KvValue::Text {
            index: index.clone(),
            text,
            query: Some(query.to_owned()),
        }
    }

    /// The override's query, for an override's value.
    pub fn query(&self) -> Option<&str> {
        match self {
            KvValue::Text { query, .. } => query.as_deref(),
            KvValue::Settings { .. } => None,
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
            KvValue::Settings { settings, api_key } => {
                serde_json::to_writer(&mut *out, &settings.kv_value(api_key))
                    .expect("settings values serialize")
            }
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

/// A key and what to do with it: what the exporter hands the KV store.
pub type KvOp = (KvKey, KvAction);

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

/// Whether an index's own key is one Cloudflare accepts: only then was any key of it ever
/// written, and only then are its ledger items within DynamoDB's key limits.
pub fn own_key_valid(index: &IndexRef) -> bool {
    check_key(&KvKey::index(index).key).is_ok()
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
    if key.chars().any(|c| c.is_whitespace() || c.is_control()) {
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
    fn a_written_value_names_its_index() {
        let value = r#"{"schema_version": 1, "system_account_id": "acct", "index_name": "1-x",
            "shop_id": "s.myshopify.com"}"#;
        let owner = Written::read(value).map(Written::owner);
        assert_eq!(owner, Some(IndexRef::new("acct", "1-x")));
        assert_ne!(owner, Some(IndexRef::new("acct-1", "x")));
        // A query config's value names its index too.
        let config = r#"{"schema_version": 1, "system_account_id": "a", "index_name": "i"}"#;
        let config = Written::read(config).expect("a written value");
        assert_eq!(config.owner(), IndexRef::new("a", "i"));
        // Not what this function writes: says nothing.
        for other in ["not json", r#"{"shop_id": "s.myshopify.com"}"#] {
            assert!(Written::read(other).is_none(), "{other}");
        }
    }

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
    fn metadata_leaves_out_the_query_then_the_names_to_fit_the_limit() {
        let names = [
            ("acct-1", "products"),
            ("a\"q\"", "caf\u{e9}\n"),
            ("a", &*"b".repeat(1_000)),
        ];
        let long_query = "q".repeat(950);
        for (account, name) in names {
            for query in [None, Some("running \"shoes\""), Some(long_query.as_str())] {
                let index = IndexRef::new(account, name);
                let fits = account.len() + name.len() < 900;
                let query_fits = fits && query.is_some_and(|q| q.len() < 900);
                let expected = KeyMetadata {
                    writer: WRITER.into(),
                    v: 1,
                    account: fits.then(|| account.into()),
                    index: fits.then(|| name.into()),
                    query: query.filter(|_| query_fits).map(str::to_owned),
                    digest: "0123456789abcdef".into(),
                };
                let mut written = Vec::new();
                KeyMetadata::write_json(&index, query, "0123456789abcdef", &mut written);
                let written = String::from_utf8(written).unwrap();
                assert_eq!(written, serde_json::to_string(&expected).unwrap());
                assert!(written.len() <= MAX_METADATA_BYTES);
            }
        }
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
