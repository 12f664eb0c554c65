//! Two ways of reading the settings table meet in KV: the stream's (its items by key, in
//! BatchGetItems of 100) and a re-export's (GetItem and Query). What the stream exports must be
//! what a re-export exports from the same items, byte for byte, on every attribute type; and
//! the ledger's items must keep their format: read as written before, written as read.

use std::collections::{BTreeSet, HashMap};

use crate::common::*;
use aws_sdk_dynamodb::types::AttributeValue as Av;
use ecom_settings_exporter::adapters::ledger::DynamoLedger;
use ecom_settings_exporter::domain::IndexRef;
use ecom_settings_exporter::ports::{IndexRefs, Ledger, ReconcileProgress, Referred, RefsChange};
use serde_json::json;

#[tokio::test]
async fn the_stream_exports_its_items_as_a_reexport_of_them_does() {
    let mut h = Harness::new().await;
    h.keys.set_key("acct-1", "k");
    let mut rich = index_item("acct-1", "rich", Some("shop-r.myshopify.com"));
    rich["search_config"] = json!({"M": {
        "text": {"S": "quote \" backslash \\ newline \n tab \t control \u{1} emoji 👟 é"},
        "numbers": {"L": [{"N": "12345678901234567890123"}, {"N": "-0.000001"}, {"N": "1E+100"}]},
        "flags": {"M": {"on": {"BOOL": true}, "off": {"BOOL": false}, "nothing": {"NULL": true}}},
        "strings": {"SS": ["b", "a"]}, "nums": {"NS": ["2", "1.5"]},
        "blob": {"B": "AAEC/w=="}, "blobs": {"BS": ["AA==", "/w=="]},
        "empty": {"S": ""}, "list": {"L": []}, "map": {"M": {}}
    }});
    rich["index_aliases"] = json!({"M": {"doc_reads": {"M": {"enabled": {"BOOL": true},
        "targets": {"L": [{"M": {"index_id": {"S": "acct-1-i0"}, "weight": {"N": "2.5"}}}]}}}}});
    h.put(rich).await;
    let mut query = query_item("acct-1", "rich", "chaussures été");
    query["query_config"] = json!({"M": {"boost": {"N": "0.10"}, "terms": {"L": [{"S": "a\"b"}]}}});
    h.put(query).await;
    // More items than one request reads.
    for i in 0..120 {
        h.put(index_item("acct-1", &format!("i{i}"), None)).await;
    }
    let response = h.export_stream().await;
    assert_eq!(response, json!({"batchItemFailures": []}));
    assert_eq!(
        h.kv.keys(CF_ACCOUNT, SETTINGS_NS).len(),
        122,
        "120 + rich and its shop"
    );
    let compared = [
        (SETTINGS_NS, "acct-1-rich".to_owned()),
        (SETTINGS_NS, "shop-r.myshopify.com".to_owned()),
        (QCFG_NS, qcfg_key("acct-1", "rich", "chaussures été")),
    ];
    let streamed: Vec<Option<String>> = (compared.iter())
        .map(|(namespace, key)| h.kv.remove(CF_ACCOUNT, namespace, key))
        .collect();

    let reexport = json!({"system_account_id": "acct-1", "index_name": "rich",
                          "include_query_configs": true});
    h.invoke(reexport).await;

    for ((namespace, key), streamed) in compared.iter().zip(streamed) {
        let reexported = h.kv.value(CF_ACCOUNT, namespace, key);
        assert!(streamed.is_some(), "{key}");
        assert_eq!(streamed, reexported, "{key}");
    }
}

/// A ledger item as the SDK writes and reads it.
fn sdk_item(attributes: &[(&str, Av)]) -> HashMap<String, Av> {
    (attributes.iter())
        .map(|(name, value)| (name.to_string(), value.clone()))
        .collect()
}

#[tokio::test]
async fn the_ledger_s_items_are_the_sdk_s_both_ways() {
    let h = Harness::before_migration(aws_sdk_dynamodb::types::StreamViewType::NewImage).await;
    let ledger = DynamoLedger::new(&aws().await, h.ledger.clone());
    let s = |text: &str| Av::S(text.to_owned());
    let get = |pk: &str, sk: &str| {
        let get = h.ddb.get_item().table_name(&h.ledger).consistent_read(true);
        get.key("pk", s(pk)).key("sk", s(sk)).send()
    };
    // An item the SDK wrote is read.
    let old = IndexRef::new("acct-é", "old\"one");
    let old_item = sdk_item(&[
        ("pk", s("ref#7:acct-é#old\"one")),
        ("sk", s("refs")),
        ("shops", Av::Ss(vec!["old.myshopify.com".into()])),
        (
            "targets",
            Av::Ss(vec!["acct-é-a".into(), "acct-é-b".into()]),
        ),
    ]);
    let put = h
        .ddb
        .put_item()
        .table_name(&h.ledger)
        .set_item(Some(old_item));
    put.send().await.unwrap();
    let recorded = ledger.index_refs(std::slice::from_ref(&old)).await.unwrap();
    let counted = |shops: &[&str], targets: &[&str], intents: u64| IndexRefs {
        shops: shops.iter().map(|s| s.to_string()).collect(),
        targets: targets.iter().map(|s| s.to_string()).collect(),
        intents,
        sweep: None,
    };
    let at = |shops: &[&str], targets: &[&str]| counted(shops, targets, 0);
    let old_refs = at(&["old.myshopify.com"], &["acct-é-a", "acct-é-b"]);
    assert_eq!(recorded, HashMap::from([(old.clone(), old_refs.clone())]));

    // An intent adds, on both sides, to what is there: `old` moves to `new.myshopify.com`
    // and `new` is recorded for the first time.
    let new = IndexRef::new("acct-é", "new");
    let shop = Referred::Shop("new.myshopify.com".into());
    let intents = [(new.clone(), shop.clone()), (old.clone(), shop.clone())];
    let birth = ledger.point_back(&intents).await.unwrap();
    assert!(
        birth > 1 << 32,
        "a birth far from a count of records written before: {birth}"
    );
    let set = get("shop#new.myshopify.com", "referrers")
        .await
        .unwrap()
        .item;
    let mut expected = sdk_item(&[("pk", s("shop#new.myshopify.com")), ("sk", s("referrers"))]);
    let members = vec!["7:acct-é#new".into(), "7:acct-é#old\"one".into()];
    expected.insert("referrers".into(), Av::Ss(members));
    assert_eq!(set, Some(expected));
    let new_item = get("ref#7:acct-é#new", "refs").await.unwrap().item;
    let mut expected = sdk_item(&[("pk", s("ref#7:acct-é#new")), ("sk", s("refs"))]);
    expected.insert("shops".into(), Av::Ss(vec!["new.myshopify.com".into()]));
    expected.insert("intents".into(), Av::N((birth + 1).to_string()));
    assert_eq!(new_item, Some(expected));
    let both = [old.clone(), new.clone()];
    let moving = counted(
        &["new.myshopify.com", "old.myshopify.com"],
        &["acct-é-a", "acct-é-b"],
        birth + 1,
    );
    let expected = HashMap::from([
        (old.clone(), moving),
        (new.clone(), counted(&["new.myshopify.com"], &[], birth + 1)),
    ]);
    assert_eq!(ledger.index_refs(&both).await.unwrap(), expected);
    let asked = [shop.clone(), Referred::Alias("acct-é-none".into())];
    assert_eq!(
        ledger.referrers(&asked).await.unwrap(),
        [new.clone(), old.clone()]
    );

    // The check confirmed: `old` gave up its old shop and one target; `new` was removed (its
    // record goes whole); a third index, which refers to nothing, is recorded as such; a fourth, whose intents changed since the batch read
    // them (another writer's), keeps everything.
    let pointing = |refs: &IndexRefs| refs.referred().into_iter().chain([shop.clone()]);
    let plain = IndexRef::new("acct-é", "plain");
    let owned = IndexRef::new("acct-é", "owned");
    let owned_birth = ledger
        .point_back(&[(owned.clone(), shop.clone())])
        .await
        .unwrap();
    ledger
        .point_back(&[(owned.clone(), shop.clone())])
        .await
        .unwrap();
    let changes = [
        RefsChange {
            index: old.clone(),
            pointing: pointing(&old_refs).collect(),
            new: Some(at(&["new.myshopify.com"], &["acct-é-b"])),
            intents: birth + 1,
            swept: None,
        },
        RefsChange {
            index: new.clone(),
            pointing: BTreeSet::from([shop.clone()]),
            new: None,
            intents: birth + 1,
            swept: None,
        },
        RefsChange {
            index: plain.clone(),
            pointing: BTreeSet::new(),
            new: Some(IndexRefs::default()),
            intents: 0,
            swept: None,
        },
        RefsChange {
            index: owned.clone(),
            pointing: BTreeSet::from([shop.clone()]),
            new: Some(IndexRefs::default()),
            intents: owned_birth + 1,
            swept: None,
        },
    ];
    ledger.record_refs(&changes).await.unwrap();
    let all = [old.clone(), new.clone(), plain.clone(), owned.clone()];
    let expected = HashMap::from([
        (
            old.clone(),
            counted(&["new.myshopify.com"], &["acct-é-b"], birth + 1),
        ),
        (plain.clone(), IndexRefs::default()),
        (
            owned.clone(),
            counted(&["new.myshopify.com"], &[], owned_birth + 2),
        ),
    ]);
    assert_eq!(ledger.index_refs(&all).await.unwrap(), expected);
    assert_eq!(get("ref#7:acct-é#new", "refs").await.unwrap().item, None);
    let still = get("shop#new.myshopify.com", "referrers")
        .await
        .unwrap()
        .item;
    assert!(still.is_some(), "a set with members left stays");
    assert_eq!(
        ledger.referrers(&asked).await.unwrap(),
        vec![old.clone(), owned.clone()],
        "an index that kept everything stays in the sets"
    );
    let owned_pair = [(owned.clone(), shop.clone())];
    assert_eq!(
        ledger.pointing(&owned_pair).await.unwrap(),
        owned_pair.to_vec()
    );
    ledger
        .record_refs(&[RefsChange {
            intents: owned_birth + 2,
            ..changes[3].clone()
        }])
        .await
        .unwrap();
    assert_eq!(ledger.referrers(&asked).await.unwrap(), vec![old.clone()]);
    let owned_now = ledger.index_refs(std::slice::from_ref(&owned)).await;
    let nothing = counted(&[], &[], owned_birth + 2);
    assert_eq!(
        owned_now.unwrap(),
        HashMap::from([(owned.clone(), nothing)]),
        "it refers to nothing now, and is not removed: its item stays"
    );

    let pair = [(new.clone(), shop.clone())];
    assert_eq!(ledger.pointing(&pair).await.unwrap(), vec![]);

    // A shrink that read an earlier life of an index's record (taken out whole since, and
    // made again by an intent) is refused: the new life counts from its own birth.
    let reborn = ledger.point_back(&[(new.clone(), shop.clone())]).await;
    let reborn = reborn.unwrap();
    let stale = RefsChange {
        intents: birth + 1,
        ..changes[1].clone()
    };
    ledger.record_refs(&[stale]).await.unwrap();
    let expected = HashMap::from([(
        new.clone(),
        counted(&["new.myshopify.com"], &[], reborn + 1),
    )]);
    let now = ledger.index_refs(std::slice::from_ref(&new)).await.unwrap();
    assert_eq!(now, expected);
    assert_eq!(ledger.pointing(&pair).await.unwrap(), pair.to_vec());
    // An empty record is never put over one an intent wrote meanwhile.
    let plain_birth = ledger
        .point_back(&[(plain.clone(), shop.clone())])
        .await
        .unwrap();
    let again = RefsChange {
        index: plain.clone(),
        pointing: BTreeSet::new(),
        new: Some(IndexRefs::default()),
        intents: 0,
        swept: None,
    };
    ledger.record_refs(&[again]).await.unwrap();
    let plain_now = counted(&["new.myshopify.com"], &[], plain_birth + 1);
    let expected = HashMap::from([(plain.clone(), plain_now)]);
    assert_eq!(ledger.index_refs(&[plain]).await.unwrap(), expected);

    // The reconcile's progress, saved on the version read.
    let progress = ReconcileProgress {
        version: 1,
        token: Some("tok\"en".into()),
        lease_until: Some(1_800_000_000),
        ..ReconcileProgress::default()
    };
    assert!(ledger
        .save_reconcile_progress(&progress, None)
        .await
        .unwrap());
    assert!(!ledger
        .save_reconcile_progress(&progress, None)
        .await
        .unwrap());
    let next = ReconcileProgress {
        version: 2,
        ..progress.clone()
    };
    assert!(!ledger
        .save_reconcile_progress(&next, Some(0))
        .await
        .unwrap());
    assert!(ledger
        .save_reconcile_progress(&next, Some(1))
        .await
        .unwrap());
    assert_eq!(ledger.reconcile_progress().await.unwrap(), Some(next));
    let saved = get("reconcile", "progress").await.unwrap().item.unwrap();
    assert_eq!(saved.get("token"), Some(&s("tok\"en")));
    assert_eq!(saved.get("version"), Some(&Av::N("2".into())));
    assert!(!ledger.references_complete().await.unwrap());
    ledger.mark_references_complete().await.unwrap();
    assert!(ledger.references_complete().await.unwrap());
}

/// A shop that more indexes claim than one item holds (hostile input): the set takes 700, the
/// rest get items of their own and the set says so; every reader still finds every referrer,
/// and the set's neighbours in the same transaction are written all the same.
#[tokio::test]
async fn referrers_past_a_set_s_bound_get_items_of_their_own() {
    let h = Harness::new().await;
    let ledger = DynamoLedger::new(&function_aws().await, h.ledger.clone());
    let shop = Referred::Shop("crowded.myshopify.com".into());
    let index = |i: usize| IndexRef::new("acct", format!("i{i:04}"));
    let first: Vec<_> = (0..700).map(|i| (index(i), shop.clone())).collect();
    ledger.point_back(&first).await.unwrap();
    let other = Referred::Shop("other.myshopify.com".into());
    let more = [(index(700), shop.clone()), (index(701), other.clone())];
    ledger.point_back(&more).await.unwrap();
    let beyond: Vec<_> = (702..1500).map(|i| (index(i), shop.clone())).collect();
    ledger.point_back(&beyond).await.unwrap();

    let found = ledger.referrers(std::slice::from_ref(&shop)).await.unwrap();
    assert_eq!(
        found,
        (0..1500)
            .filter(|i| *i != 701)
            .map(index)
            .collect::<Vec<_>>()
    );
    assert_eq!(ledger.referrers(&[other]).await.unwrap(), vec![index(701)]);
    let asked = [
        (index(0), shop.clone()),
        (index(700), shop.clone()),
        (index(1499), shop.clone()),
    ];
    let mut pointing = ledger.pointing(&asked).await.unwrap();
    pointing.sort();
    assert_eq!(pointing, asked);
    let set = h.ddb.get_item().table_name(&h.ledger).consistent_read(true);
    let set = set.key("pk", Av::S("shop#crowded.myshopify.com".into()));
    let set = set
        .key("sk", Av::S("referrers".into()))
        .send()
        .await
        .unwrap()
        .item
        .unwrap();
    assert_eq!(set.get("overflow"), Some(&Av::Bool(true)));
    assert!(matches!(set.get("referrers"), Some(Av::Ss(members)) if members.len() == 700));

    // Removed, an index past the bound leaves no item of its own, and a set it alone was in
    // goes; the overflowed set stays for the Query that finds the others.
    let item = |pk: &str, sk: &str| {
        let get = h.ddb.get_item().table_name(&h.ledger).consistent_read(true);
        get.key("pk", Av::S(pk.into()))
            .key("sk", Av::S(sk.into()))
            .send()
    };
    let own_item = "4:acct#i1499";
    assert!(item("shop#crowded.myshopify.com", own_item)
        .await
        .unwrap()
        .item
        .is_some());
    let recorded = ledger.index_refs(&[index(1499), index(701)]).await.unwrap();
    let removed = [1499, 701].map(|i| RefsChange {
        index: index(i),
        pointing: recorded[&index(i)].referred(),
        new: None,
        intents: recorded[&index(i)].intents,
        swept: None,
    });
    ledger.record_refs(&removed).await.unwrap();
    assert_eq!(
        item("shop#crowded.myshopify.com", own_item)
            .await
            .unwrap()
            .item,
        None
    );
    assert_eq!(
        item("shop#other.myshopify.com", "referrers")
            .await
            .unwrap()
            .item,
        None
    );
    assert_eq!(item("ref#4:acct#i1499", "refs").await.unwrap().item, None);
    let found = ledger.referrers(std::slice::from_ref(&shop)).await.unwrap();
    assert_eq!(found.len(), 1498);
    let set = item("shop#crowded.myshopify.com", "referrers")
        .await
        .unwrap()
        .item;
    assert_eq!(set.unwrap().get("overflow"), Some(&Av::Bool(true)));
}

/// The sweep's marks and its conditional delete, on DynamoDB: a mark is set only on an item
/// that is there with the count it names (none is made, a count of 0 included), read back as
/// written, taken off; the sweep's delete goes only with the mark it read still there.
#[tokio::test]
async fn a_sweep_mark_is_set_read_and_conditions_the_sweep_s_delete() {
    use ecom_settings_exporter::ports::SweepMark;
    let h = Harness::before_migration(aws_sdk_dynamodb::types::StreamViewType::NewImage).await;
    let ledger = DynamoLedger::new(&aws().await, h.ledger.clone());
    let (index, ghost) = (
        IndexRef::new("acct-1", "gone"),
        IndexRef::new("acct-1", "none"),
    );
    let shop = Referred::Shop("s1.myshopify.com".into());
    let birth = ledger
        .point_back(&[(index.clone(), shop.clone())])
        .await
        .unwrap();
    let mark = |intents, at| Some(SweepMark { intents, at });
    let marks = [
        (index.clone(), mark(birth + 1, 100)),
        (ghost.clone(), mark(0, 100)),
    ];
    ledger.sweep_marks(&marks).await.unwrap();
    let read = ledger
        .index_refs(&[index.clone(), ghost.clone()])
        .await
        .unwrap();
    assert_eq!(read.len(), 1, "no item made for a mark: {read:?}");
    assert_eq!(read[&index].sweep, mark(birth + 1, 100));

    let removal = |swept| RefsChange {
        index: index.clone(),
        pointing: BTreeSet::from([shop.clone()]),
        new: None,
        intents: birth + 1,
        swept,
    };
    ledger
        .record_refs(&[removal(mark(birth + 1, 99))])
        .await
        .unwrap();
    let read = ledger
        .index_refs(std::slice::from_ref(&index))
        .await
        .unwrap();
    assert!(read.contains_key(&index), "deleted under another mark");
    ledger.sweep_marks(&[(index.clone(), None)]).await.unwrap();
    ledger
        .record_refs(&[removal(mark(birth + 1, 100))])
        .await
        .unwrap();
    let read = ledger
        .index_refs(std::slice::from_ref(&index))
        .await
        .unwrap();
    assert_eq!(read[&index].sweep, None, "the mark was taken off");
    ledger.sweep_marks(&marks[..1]).await.unwrap();
    ledger
        .record_refs(&[removal(mark(birth + 1, 100))])
        .await
        .unwrap();
    let read = ledger
        .index_refs(std::slice::from_ref(&index))
        .await
        .unwrap();
    assert!(read.is_empty(), "the ripe mark's delete stayed: {read:?}");
}
