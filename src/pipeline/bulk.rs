//! Step 4 of the pipeline, pure: planned operations become as few Cloudflare bulk requests as
//! the limits allow (10,000 items and under 100 MB a request).

use std::collections::BTreeMap;

use crate::domain::kv::{KvRequest, PutBody, MAX_BULK_BYTES, MAX_BULK_ITEMS};
use crate::domain::{KvAction, KvKey, Namespace};
use crate::pipeline::plan::PlannedOp;

/// The room to reserve for the next body of a namespace, out of what its pairs not yet in a
/// body are expected to take (bytes, pairs).
fn take_room(left: &mut (usize, usize)) -> usize {
    let (bytes, pairs) = left;
    let share = (*pairs).clamp(1, MAX_BULK_ITEMS);
    let room = (*bytes / (*pairs).max(1) * share).min(*bytes);
    (*bytes, *pairs) = (*bytes - room, pairs.saturating_sub(share));
    room.min(MAX_BULK_BYTES)
}

/// All the requests a plan needs: per namespace, bulk writes of at most [`MAX_BULK_ITEMS`]
/// pairs and under [`MAX_BULK_BYTES`], each pair written once into its body; bulk deletes. The
/// first body is written into `spare` when it is large enough (an empty one never is).
pub fn requests<'a>(
    ops: impl IntoIterator<Item = (&'a KvKey, &'a PlannedOp)>,
    spare: Vec<u8>,
) -> Vec<KvRequest> {
    let mut spare = Some(spare);
    // In the batch's order (a record's keys together, in key order): the decoded records are
    // read as they lie in memory, and a value shared by two keys is copied while still in cache.
    let mut ops: Vec<_> = ops.into_iter().collect();
    ops.sort_by_key(|(_, op)| op.owner);
    // What each body will take, reserved up front (escaping at most doubles a value): growing
    // by doubling would copy and fault in twice the memory. A body holds at most
    // MAX_BULK_ITEMS pairs, so it reserves for its own pairs, not for its whole namespace.
    let mut expected: BTreeMap<Namespace, (usize, usize)> = BTreeMap::new();
    for (key, op) in &ops {
        if let KvAction::Put(value) = &op.action {
            let index = value.index();
            let names = index.account.len() + index.name.len();
            let size = key.key.len() + 2 * value.size_hint() + names + 120;
            let (bytes, pairs) = expected.entry(key.namespace).or_default();
            (*bytes, *pairs) = (*bytes + size, *pairs + 1);
        }
    }
    let mut puts: BTreeMap<Namespace, (Vec<KvRequest>, PutBody)> = BTreeMap::new();
    let mut deletes: BTreeMap<Namespace, Vec<String>> = BTreeMap::new();
    for (key, op) in ops {
        match &op.action {
            KvAction::Put(value) => {
                let left = expected.get_mut(&key.namespace).expect("counted above");
                let (full, body) = puts.entry(key.namespace).or_insert_with(|| {
                    let room = take_room(left);
                    let body = match spare.take() {
                        Some(buffer) => PutBody::reusing(buffer, room),
                        None => PutBody::with_capacity(room),
                    };
                    (Vec::new(), body)
                });
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
            KvAction::Delete => deletes
                .entry(key.namespace)
                .or_default()
                .push(key.key.clone()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use serde_json::json;

    use crate::domain::kv::{digest, KvValue};
    use crate::domain::{ApiKey, IndexRef};
    use crate::dynamo::{index_settings, Image};

    fn ops(n: usize, value_len: usize) -> BTreeMap<KvKey, PlannedOp> {
        let index = IndexRef::new("a", "i");
        (0..n)
            .map(|i| {
                let op = PlannedOp {
                    action: KvAction::put(KvValue::new(&index, "v".repeat(value_len))),
                    owner: i,
                };
                (KvKey::settings(format!("k{i:05}")), op)
            })
            .collect()
    }

    fn sizes(requests: &[KvRequest]) -> Vec<usize> {
        requests.iter().map(|r| r.keys().len()).collect()
    }

    #[test]
    fn twenty_thousand_small_pairs_make_two_requests() {
        let requests = requests(&ops(20_000, 10), Vec::new());
        assert_eq!(sizes(&requests), [10_000, 10_000]);
        let body: Vec<serde_json::Value> = serde_json::from_slice(&requests[0].body()).unwrap();
        assert_eq!(body[0]["key"], "k00000");
        assert_eq!(body[0]["value"], "vvvvvvvvvv");
        assert_eq!(body[0]["metadata"]["writer"], "ecom-settings-exporter");
    }

    #[test]
    fn pairs_are_written_in_the_batch_order_a_records_keys_together() {
        let index = IndexRef::new("a", "i");
        let op = |owner: usize| PlannedOp {
            action: KvAction::put(KvValue::new(&index, format!("v{owner}"))),
            owner,
        };
        let ops = BTreeMap::from([
            (KvKey::settings("a-1"), op(1)),
            (KvKey::settings("a-2"), op(0)),
            (KvKey::settings("shop-1"), op(1)),
            (KvKey::settings("shop-2"), op(0)),
        ]);
        let requests = requests(&ops, Vec::new());
        let body: Vec<serde_json::Value> = serde_json::from_slice(&requests[0].body()).unwrap();
        let keys: Vec<&str> = body.iter().map(|p| p["key"].as_str().unwrap()).collect();
        assert_eq!(keys, ["a-2", "shop-2", "a-1", "shop-1"]);
    }

    #[test]
    fn the_first_body_is_written_into_a_spare_buffer_large_enough() {
        let ops = ops(3, 100);
        let expected = requests(&ops, Vec::new())[0].body();
        let spare = Vec::with_capacity(4096);
        let at = spare.as_ptr();
        let body = requests(&ops, spare)[0].body();
        assert_eq!(body, expected);
        assert_eq!(body.as_ptr(), at, "written where the spare buffer was");
        let small = Vec::with_capacity(16);
        let at = small.as_ptr();
        let body = requests(&ops, small)[0].body();
        assert_eq!(body, expected);
        assert_ne!(body.as_ptr(), at, "too small to hold the body");
    }

    #[test]
    fn keys_sharing_a_value_each_get_the_whole_pair() {
        let index = IndexRef::new("a", "i");
        let shared = KvAction::put(KvValue::new(&index, r#"{"q":"\"x\""}"#.into()));
        let ops: BTreeMap<KvKey, PlannedOp> = ["a-i", "shop-1", "shop-2"]
            .into_iter()
            .enumerate()
            .map(|(owner, key)| {
                let action = shared.clone();
                (KvKey::settings(key), PlannedOp { action, owner })
            })
            .collect();
        let requests = requests(&ops, Vec::new());
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
        let image: Image = serde_json::from_str(String::leak(image.to_string())).unwrap();
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
        let op = PlannedOp {
            action: KvAction::put(value),
            owner: 0,
        };
        let ops = BTreeMap::from([(KvKey::settings("a-i"), op)]);
        let body: Vec<serde_json::Value> =
            serde_json::from_slice(&requests(&ops, Vec::new())[0].body()).unwrap();
        assert_eq!(body[0]["value"], expected.as_str());
        assert_eq!(body[0]["metadata"]["digest"], digest(&expected).as_str());
    }

    #[test]
    fn bodies_stay_under_one_hundred_megabytes() {
        // Five 24 MiB values: three fit under 100 MB (decimal) with their JSON, two go next.
        let requests = requests(&ops(5, 24 * 1024 * 1024), Vec::new());
        assert_eq!(sizes(&requests), [3, 2]);
        for request in requests {
            assert!(request.body().len() < MAX_BULK_BYTES);
        }
    }
}
