//! The query-override membership filter the search proxy reads before `KV_QCFG`
//! (docs/contract.md, "Query-override filter"): one BinaryFuse8 filter per index, under
//! `qfilter-{system_account_id}-{index_name}`, over the first 8 bytes of each override's
//! SHA-256 (the first 16 hex digits of its `qcfg-` key), so the proxy hashes once.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use xorf::{BinaryFuse8, Filter as _};

use super::ids::IndexRef;
use super::kv::{KvKey, Namespace};

/// The filter's key, in the query-config namespace.
pub fn filter_key(index: &IndexRef) -> KvKey {
    KvKey {
        namespace: Namespace::QueryConfigs,
        key: format!("qfilter-{}-{}", index.account, index.name),
    }
}

/// A normalized query as a filter member: SHA-256's first 8 bytes, big-endian.
pub fn member(query: &str) -> u64 {
    let hash = Sha256::digest(query.as_bytes());
    u64::from_be_bytes(hash[..8].try_into().expect("8 bytes"))
}

/// The value under `qfilter-...`: what the proxy's reader depends on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryFilter {
    pub schema_version: u32,
    pub system_account_id: String,
    pub index_name: String,
    pub filter: String,
    /// Overrides in the filter; 0 means none (the proxy skips the probe).
    pub count: usize,
    /// A u64 as a decimal string: JSON numbers lose digits past 2^53 in JavaScript.
    pub seed: String,
    pub segment_length: u32,
    pub segment_length_mask: u32,
    pub segment_count_length: u32,
    /// Standard base64 of the fingerprint bytes.
    pub fingerprints: String,
}

impl QueryFilter {
    /// Builds the filter of an index from its normalized queries. Order and duplicates do not
    /// matter: the same set always gives the same value.
    pub fn build(index: &IndexRef, queries: impl IntoIterator<Item = impl AsRef<str>>) -> Self {
        let mut members: Vec<u64> = queries.into_iter().map(|q| member(q.as_ref())).collect();
        members.sort_unstable();
        members.dedup();
        let mut value = QueryFilter {
            schema_version: 1,
            system_account_id: index.account.clone(),
            index_name: index.name.clone(),
            filter: "binary_fuse8".into(),
            count: members.len(),
            seed: "0".into(),
            segment_length: 0,
            segment_length_mask: 0,
            segment_count_length: 0,
            fingerprints: String::new(),
        };
        if members.is_empty() {
            return value;
        }
        // Construction fails only on duplicate keys, removed above.
        let filter = BinaryFuse8::try_from(&members).expect("distinct keys build a filter");
        let d = &filter.descriptor;
        value.seed = d.seed.to_string();
        value.segment_length = d.segment_length;
        value.segment_length_mask = d.segment_length_mask;
        value.segment_count_length = d.segment_count_length;
        value.fingerprints = base64::engine::general_purpose::STANDARD.encode(&filter.fingerprints);
        value
    }

    /// The probe the proxy runs, written out (not through `xorf`) so tests check the contract.
    pub fn may_contain(&self, query: &str) -> bool {
        if self.count == 0 {
            return false;
        }
        let Ok(seed) = self.seed.parse::<u64>() else {
            return true;
        };
        let Ok(fp) = base64::engine::general_purpose::STANDARD.decode(&self.fingerprints) else {
            return true;
        };
        let h = fmix64(member(query).wrapping_add(seed));
        let f = ((h ^ (h >> 32)) & 0xff) as u8;
        let h0 = ((h as u128 * self.segment_count_length as u128) >> 64) as u32;
        let h1 = (h0 + self.segment_length) ^ ((h >> 18) as u32 & self.segment_length_mask);
        let h2 = (h0 + 2 * self.segment_length) ^ (h as u32 & self.segment_length_mask);
        let at = |i: u32| fp.get(i as usize).copied().unwrap_or(0);
        f ^ at(h0) ^ at(h1) ^ at(h2) == 0
    }

    /// Whether `xorf` agrees (for tests of the written-out probe).
    pub fn xorf_contains(&self, query: &str) -> bool {
        let filter = BinaryFuse8 {
            descriptor: xorf::Descriptor {
                seed: self.seed.parse().unwrap_or_default(),
                segment_length: self.segment_length,
                segment_length_mask: self.segment_length_mask,
                segment_count_length: self.segment_count_length,
            },
            fingerprints: base64::engine::general_purpose::STANDARD
                .decode(&self.fingerprints)
                .unwrap_or_default()
                .into_boxed_slice(),
        };
        self.count > 0 && filter.contains(&member(query))
    }
}

/// MurmurHash3's 64-bit finalizer.
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index() -> IndexRef {
        IndexRef::new("acct-1", "products")
    }

    #[test]
    fn members_are_found_and_the_written_out_probe_agrees_with_xorf() {
        let queries: Vec<String> = (0..1000).map(|i| format!("query {i}")).collect();
        let filter = QueryFilter::build(&index(), &queries);
        assert_eq!(filter.count, 1000);
        for q in &queries {
            assert!(filter.may_contain(q), "no false negative: {q}");
            assert!(filter.xorf_contains(q));
        }
        let others = (0..10_000).map(|i| format!("other {i}"));
        let mut false_positives = 0;
        for q in others {
            assert_eq!(filter.may_contain(&q), filter.xorf_contains(&q), "{q}");
            false_positives += filter.may_contain(&q) as usize;
        }
        assert!(
            false_positives < 100,
            "about 0.4%: {false_positives} of 10,000"
        );
    }

    #[test]
    fn the_same_set_gives_the_same_value_and_none_gives_count_zero() {
        let a = QueryFilter::build(&index(), ["b", "a", "a"]);
        let b = QueryFilter::build(&index(), ["a", "b"]);
        assert_eq!(a, b);
        assert_eq!(a.count, 2);
        let empty = QueryFilter::build(&index(), Vec::<String>::new());
        assert_eq!(empty.count, 0);
        assert!(!empty.may_contain("a"));
        assert_eq!(filter_key(&index()).key, "qfilter-acct-1-products");
    }

    #[test]
    fn members_are_the_first_sixteen_hex_digits_of_the_query_config_key_hash() {
        let key = super::super::kv::query_config_key(&index(), "red shoes");
        let hex = &key["qcfg-acct-1-products-".len()..][..16];
        assert_eq!(format!("{:016x}", member("red shoes")), hex);
    }
}
