//! What an index refers to (its shop, its live alias targets) as the ledger records it, and
//! the ledger's operator side: who refers to what, the references a reconcile or backfill adds
//! where the ledger lacks them, and the mark that they are complete
//! (docs/contract.md, "Concurrent writers" and "References in the ledger").

use std::collections::BTreeSet;

use tokio::time::Instant;

use super::{intents, Exporter};
use crate::domain::kv::{check_key, own_key_valid};
use crate::domain::validate::shop_id_problem;
use crate::domain::{IndexId, IndexRef, IndexSettings};
use crate::ports::{before_deadline, IndexRefs, Ledger, Ports, SettingsTable};
use crate::ports::{PortError, Referred, SweepMark};

/// Whether an index's live alias target is recorded as a reference: not when no KV key could
/// be it (empty, over 512 bytes, unprintable: it protects nothing, its `alias#{target}` item
/// could not be written, and one record would fail its whole batch), nor when it is the index's
/// own id (an index protects nothing of its own by aliasing itself: its keys go with its
/// record; recording it would cost a ledger write per such index).
fn recorded_target(own: &IndexId, target: &str) -> bool {
    target != own.0 && check_key(target).is_ok()
}

/// The references a settings record leaves: its shop and its recorded alias targets.
pub(super) fn refs_of(settings: &IndexSettings) -> IndexRefs {
    let mut refs = settings.references();
    let own = settings.index.id();
    refs.targets.retain(|target| recorded_target(&own, target));
    refs
}

/// What a settings item's raw references name that a ledger item can stand for: its shop when
/// it is a shop key, its targets that are KV keys; nothing when its index's own key is not one
/// (no key of it was ever written, and its items could be over DynamoDB's key limits).
fn named_by((index, refs): &(IndexRef, IndexRefs)) -> impl Iterator<Item = Referred> + '_ {
    let valid = own_key_valid(index);
    let own = index.id();
    let shop = (refs.shops.iter())
        .filter(move |shop| valid && shop_id_problem(shop).is_none())
        .map(|shop| Referred::Shop(shop.clone()));
    let targets = (refs.targets.iter())
        .filter(move |target| valid && recorded_target(&own, target))
        .map(|target| Referred::Alias(target.clone()));
    shop.chain(targets)
}

/// A page of the ledger's records: how many it read, those of indexes the table no longer has
/// or that a reconcile marked (each with whether the table has it), the next page's cursor.
pub type Recorded = (usize, Vec<(IndexRef, IndexRefs, bool)>, Option<String>);

impl<P: Ports> Exporter<P> {
    /// A page of the indexes the ledger records from after `after` (about `limit` items read),
    /// with the table asked which it still has: see [`Recorded`].
    pub async fn recorded(
        &self,
        after: Option<&str>,
        limit: usize,
        deadline: Instant,
    ) -> Result<Recorded, PortError> {
        let read = self.ledger.recorded(after, limit);
        let (page, next) = before_deadline(deadline, "ledger records", read).await?;
        let indexes: Vec<IndexRef> = page.iter().map(|(index, _)| index.clone()).collect();
        let read = self.table.index_references(&indexes);
        let live = before_deadline(deadline, "recorded indexes' settings", read).await?;
        let live: BTreeSet<IndexRef> = live.into_iter().map(|(index, _)| index).collect();
        let page = (page.into_iter())
            .map(|(index, refs)| (live.contains(&index), index, refs))
            .filter(|(live, _, refs)| !live || refs.sweep.is_some());
        let page = page.map(|(live, index, refs)| (index, refs, live));
        Ok((indexes.len(), page.collect(), next))
    }

    /// Sets or takes off these sweep marks (none: nothing to do).
    pub async fn sweep_marks(
        &self,
        marks: &[(IndexRef, Option<SweepMark>)],
        deadline: Instant,
    ) -> Result<(), PortError> {
        if marks.is_empty() {
            return Ok(());
        }
        before_deadline(deadline, "ledger marks", self.ledger.sweep_marks(marks)).await
    }

    /// Whether the ledger's references are complete (the migration ran); a mark that cannot be
    /// read counts as not (the writer waits, and is tried again).
    pub async fn migrated(&self, deadline: Instant) -> bool {
        let complete = self.ledger.references_complete();
        let complete = before_deadline(deadline, "ledger references", complete).await;
        complete.unwrap_or_else(|error| {
            tracing::warn!(%error, "the ledger's references mark could not be read");
            false
        })
    }

    /// After a full backfill that recorded every index's references: from now on the stream
    /// and every operator ask the ledger who refers to what.
    pub async fn mark_references_complete(&self, deadline: Instant) -> Result<(), PortError> {
        let mark = self.ledger.mark_references_complete();
        before_deadline(deadline, "ledger references", mark).await
    }

    /// The references of every index that may refer to what is `asked` (an alias target, a
    /// shop), from the ledger: its sets name the candidates, each candidate's own record in the
    /// table deciding; the indexes in `own` are left out (their caller knows them newer).
    pub async fn referrers_of(
        &self,
        asked: Vec<Referred>,
        own: &BTreeSet<IndexRef>,
        deadline: Instant,
    ) -> Result<Vec<(IndexRef, IndexRefs)>, PortError> {
        if asked.is_empty() {
            return Ok(Vec::new());
        }
        let query = self.ledger.referrers(&asked);
        let mut candidates = before_deadline(deadline, "ledger references", query).await?;
        candidates.retain(|candidate| !own.contains(candidate));
        // The ledger names candidates (a superset, possibly stale); each one's settings record
        // in the table decides: an alias dropped, or a record gone, no longer counts.
        let read = self.table.index_references(&candidates);
        before_deadline(deadline, "candidates' settings", read).await
    }

    /// The ledger's own repair (a reconcile's pieces, a backfill's pages): the items for what
    /// each settings item names (`references`, read from the raw items, fail closed: a record
    /// rejected as invalid still names what its KV value, written when it was valid, may route
    /// to) are added where the ledger lacks them on either side, the set of who refers to it
    /// (claimers read it) or the index's own references (its next record gives up what they
    /// hold): a stream record lost, a write that failed between the sides, an index exported
    /// before the ledger. Nothing is deleted or replaced: the table was read before the
    /// stream's newer word may have landed, and an extra item costs a candidate read, never a
    /// wrong answer. `counted`: every one is added (each an intent that counts), with no read
    /// of what the ledger holds. Answers how many were added.
    pub async fn add_references(
        &self,
        references: &[(IndexRef, IndexRefs)],
        counted: bool,
        deadline: Instant,
    ) -> Result<usize, PortError> {
        let named: BTreeSet<(IndexRef, Referred)> = (references.iter())
            .flat_map(|r| named_by(r).map(move |referred| (r.0.clone(), referred)))
            .collect();
        let named: Vec<(IndexRef, Referred)> = named.into_iter().collect();
        if named.is_empty() || counted {
            intents::add_to_ledger(&self.ledger, &named, deadline).await?;
            return Ok(named.len());
        }
        let read = self.ledger.pointing(&named);
        let pointing: BTreeSet<_> = (before_deadline(deadline, "ledger references", read).await?)
            .into_iter()
            .collect();
        let indexes: BTreeSet<&IndexRef> = named.iter().map(|(index, _)| index).collect();
        let indexes: Vec<IndexRef> = indexes.into_iter().cloned().collect();
        let read = self.ledger.index_refs(&indexes);
        let own = before_deadline(deadline, "ledger references", read).await?;
        let recorded = |(index, referred): &(IndexRef, Referred)| {
            (own.get(index)).is_some_and(|refs| match referred {
                Referred::Shop(shop) => refs.shops.contains(shop),
                Referred::Alias(target) => refs.targets.contains(target),
            })
        };
        let missing: Vec<_> = (named.into_iter())
            .filter(|n| !pointing.contains(n) || !recorded(n))
            .collect();
        intents::add_to_ledger(&self.ledger, &missing, deadline).await?;
        Ok(missing.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::memory::MemoryKv;
    use crate::pipeline::exporter::shrink;
    use crate::pipeline::exporter::tests::exporter;
    use crate::pipeline::records::{decode_as_written, Change, ChangeRecord};
    use crate::report::{BatchReport, Outcome};
    use serde_json::json;
    use std::collections::BTreeMap;
    use std::collections::HashMap;
    use std::time::Duration;

    /// A NEW_IMAGE record of index `name` of account `a`, with its shop and an alias target.
    fn upsert(name: &str, shop: Option<&str>, target: Option<&str>) -> ChangeRecord {
        let keys = json!({"pk": {"S": "a"}, "sk": {"S": format!("INDEX#{name}")}});
        let mut image = keys.clone();
        image["index_endpoint"] = json!({"S": "https://idx"});
        if let Some(shop) = shop {
            image["shop_id"] = json!({"S": shop});
        }
        if let Some(target) = target {
            let targets = json!({"L": [{"M": {"index_id": {"S": target}, "weight": {"N": "1"}}}]});
            image["index_aliases"] = json!({"M": {"doc_reads": {"M": {
                "enabled": {"BOOL": true}, "targets": targets}}}});
        }
        let record = json!({"eventID": "e", "eventName": "MODIFY", "awsRegion": "r",
            "dynamodb": {"Keys": keys, "NewImage": image, "SequenceNumber": "1", "SizeBytes": 1,
                         "StreamViewType": "NEW_IMAGE"}});
        decode_as_written(&record.to_string(), "DEFAULT_CONFIGS")
    }

    fn index(name: &str) -> IndexRef {
        IndexRef::new("a", name)
    }

    fn shop(name: &str) -> Referred {
        Referred::Shop(format!("{name}.myshopify.com"))
    }

    fn at_shops(names: &[&str]) -> IndexRefs {
        IndexRefs {
            shops: names.iter().map(|n| format!("{n}.myshopify.com")).collect(),
            ..IndexRefs::default()
        }
    }

    fn at_shop(name: &str) -> IndexRefs {
        at_shops(&[name])
    }

    fn deadline() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    fn without_intents(refs: &IndexRefs) -> IndexRefs {
        IndexRefs {
            intents: 0,
            ..refs.clone()
        }
    }

    /// What each settings record's index leaves referred to.
    fn left_by(records: &[ChangeRecord]) -> BTreeMap<IndexRef, Option<IndexRefs>> {
        (records.iter())
            .filter_map(|record| match &record.change {
                Some(Change::UpsertIndex { settings, .. }) => {
                    Some((settings.index.clone(), Some(refs_of(settings))))
                }
                _ => None,
            })
            .collect()
    }

    /// What the memory ledger holds pointing back, sorted.
    fn back(
        e: &Exporter<impl Ports<Ledger = crate::adapters::memory::MemoryLedger>>,
    ) -> Vec<(Referred, IndexRef)> {
        e.ledger.back.lock().unwrap().iter().cloned().collect()
    }

    #[tokio::test]
    async fn before_its_writes_a_batch_records_every_reference_its_records_leave_on_both_sides() {
        let e = exporter(MemoryKv::default());
        e.ledger
            .refs
            .lock()
            .unwrap()
            .insert(index("p"), at_shop("a"));
        let known = HashMap::from([(index("p"), at_shop("a"))]);
        let records = [
            upsert("p", Some("c.myshopify.com"), Some("a-t")),
            upsert("q", Some("q.myshopify.com"), None),
        ];
        let left = left_by(&records);

        let (added, _) = intents::point_back(&e.ledger, &left, &known, &[], deadline())
            .await
            .unwrap();

        let mut expected = vec![
            (Referred::Alias("a-t".into()), index("p")),
            (shop("c"), index("p")),
            (shop("q"), index("q")),
        ];
        expected.sort();
        assert_eq!(back(&e), expected);
        assert_eq!(added.values().map(BTreeSet::len).sum::<usize>(), 3);
        // Every shop `p`'s keys may be on, the one it had included: a replay gives them up.
        let refs = e.ledger.refs.lock().unwrap().clone();
        let mut p = at_shops(&["a", "c"]);
        p.targets.insert("a-t".into());
        // One intent each: one update of each index's item.
        p.intents = 1;
        let q = IndexRefs {
            intents: 1,
            ..at_shop("q")
        };
        assert_eq!(refs, HashMap::from([(index("p"), p), (index("q"), q)]));
    }

    /// Only an index whose every record lies before the first failed record (where Lambda's
    /// replay starts) and was exported has what it gave up taken out; any other keeps the
    /// superset its intents recorded, for the replay to give up again, and an index in scope
    /// with no record of its own (a dropped alias target) is left to its own records.
    #[tokio::test]
    async fn the_stream_takes_out_only_what_an_index_settled_before_its_first_failed_record() {
        let e = exporter(MemoryKv::default());
        let known = HashMap::from([(index("p"), at_shop("a")), (index("r"), at_shop("r1"))]);
        e.ledger.refs.lock().unwrap().extend(known.clone());
        e.ledger
            .back
            .lock()
            .unwrap()
            .extend([(shop("a"), index("p")), (shop("r1"), index("r"))]);
        let records = [
            upsert("p", Some("c.myshopify.com"), None),
            upsert("r", Some("r2.myshopify.com"), None),
            upsert("q", Some("q.myshopify.com"), None),
            upsert("s", Some("s.myshopify.com"), None),
        ];
        let left = left_by(&records);
        let (added, birth) = intents::point_back(&e.ledger, &left, &known, &[], deadline())
            .await
            .unwrap();
        let outcomes = [
            ("p", Outcome::Exported),
            ("r", Outcome::Exported),
            ("q", Outcome::Failed("KV down".into())),
            ("p", Outcome::Exported),
        ];
        let report = BatchReport {
            records: (outcomes.into_iter())
                .map(|(name, outcome)| ChangeRecord::of(Some(index(name)), Err(outcome)))
                .collect(),
            ..BatchReport::default()
        };

        let intents = intents::Intents {
            left,
            known,
            added,
            birth,
            given_up: Vec::new(),
            handed: Vec::new(),
        };
        shrink::record(&e.ledger, (intents, false), &report, deadline()).await;

        let refs: HashMap<IndexRef, IndexRefs> = (e.ledger.refs.lock().unwrap().iter())
            .map(|(index, refs)| (index.clone(), without_intents(refs)))
            .collect();
        assert_eq!(
            refs[&index("r")],
            at_shop("r2"),
            "`r` settled: `r1` given up"
        );
        assert_eq!(refs[&index("p")], at_shops(&["a", "c"]), "`p` is replayed");
        assert_eq!(refs[&index("s")], at_shop("s"), "`s` has no record: left");
        assert_eq!(
            refs[&index("q")],
            at_shop("q"),
            "`q` failed: its intent stays"
        );
        let mut expected = vec![
            (shop("a"), index("p")),
            (shop("c"), index("p")),
            (shop("q"), index("q")),
            (shop("r2"), index("r")),
            (shop("s"), index("s")),
        ];
        expected.sort();
        assert_eq!(back(&e), expected);
    }

    /// The reconcile's repair of the ledger adds what the table's record refers to where
    /// either side lacks it, and takes nothing out: (own references recorded, the shops whose
    /// sets name the index, in the page, own references after, items added).
    #[tokio::test]
    async fn a_reconcile_adds_what_the_ledger_lacks_and_takes_nothing_out() {
        let cases = [
            // A lost move: its shop added; the one recorded stays for the next record to give up.
            (
                Some(at_shop("a")),
                vec!["a"],
                "b",
                Some(at_shops(&["a", "b"])),
                1,
            ),
            // Never recorded: added.
            (None, vec![], "b", Some(at_shop("b")), 1),
            // In step: nothing to write.
            (Some(at_shop("b")), vec!["b"], "b", Some(at_shop("b")), 0),
            // A write that failed between the sides: the side that lacks it gets it.
            (Some(at_shop("b")), vec![], "b", Some(at_shop("b")), 1),
            (None, vec!["b"], "b", Some(at_shop("b")), 1),
        ];
        for (recorded, sets, page, expected, added) in cases {
            let e = exporter(MemoryKv::default());
            let p = index("p");
            let recorded_now = recorded.clone().map(|r| (p.clone(), r));
            e.ledger.refs.lock().unwrap().extend(recorded_now);
            let sets = sets.iter().map(|name| (shop(name), p.clone()));
            e.ledger.back.lock().unwrap().extend(sets);

            let left = vec![(p.clone(), at_shop(page))];
            let added_now = e.add_references(&left, false, deadline()).await;

            let now = e.ledger.refs.lock().unwrap().get(&p).map(without_intents);
            assert_eq!(now, expected, "{recorded:?} {page}");
            assert!(back(&e).contains(&(shop(page), p.clone())), "{recorded:?}");
            assert_eq!(added_now.unwrap(), added, "{recorded:?} {page}");
        }
    }

    /// Who refers to what: the ledger names candidates, each one's record in the table decides
    /// (name, what its record says, whether the ledger's set names it, counted).
    #[tokio::test]
    async fn a_referrer_counts_only_as_its_table_record_holds_it() {
        let cases = [
            (
                "aliasing",
                Some(("s.myshopify.com", Some("a-t"))),
                true,
                true,
            ),
            ("dropped", Some(("other.myshopify.com", None)), true, false),
            ("gone", None, true, false),
            (
                "unrecorded",
                Some(("s.myshopify.com", Some("a-t"))),
                false,
                false,
            ),
        ];
        let e = exporter(MemoryKv::default());
        e.ledger
            .complete
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let asked = [shop("s"), Referred::Alias("a-t".into())];
        for (name, record, in_set, _) in &cases {
            if *in_set {
                let mut back = e.ledger.back.lock().unwrap();
                back.extend(asked.iter().map(|r| (r.clone(), index(name))));
            }
            if let Some((shop, target)) = record {
                let mut image = json!({"pk": {"S": "a"}, "sk": {"S": format!("INDEX#{name}")},
                    "shop_id": {"S": shop}});
                if let Some(target) = target {
                    let targets = json!({"L": [{"M": {"index_id": {"S": target},
                        "weight": {"N": "1"}}}]});
                    image["index_aliases"] = json!({"M": {"doc_reads": {"M": {
                        "enabled": {"BOOL": true}, "targets": targets}}}});
                }
                let item = crate::dynamo::item_from_dynamodb_json(image).unwrap();
                let key = ("a".to_owned(), format!("INDEX#{name}"));
                e.table.items.lock().unwrap().insert(key, item);
            }
        }

        let found = e
            .referrers_of(asked.to_vec(), &BTreeSet::new(), deadline())
            .await
            .unwrap();

        let claimers: Vec<&str> = (found.iter())
            .filter(|(_, refs)| refs.shops.contains("s.myshopify.com"))
            .map(|(index, _)| index.name.as_str())
            .collect();
        let aliasing: Vec<&str> = (found.iter())
            .filter(|(_, refs)| refs.targets.contains("a-t"))
            .map(|(index, _)| index.name.as_str())
            .collect();
        let expected: Vec<&str> = (cases.iter())
            .filter(|(.., counted)| *counted)
            .map(|(name, ..)| *name)
            .collect();
        assert_eq!(claimers, expected);
        assert_eq!(aliasing, expected);
    }

    #[test]
    fn an_index_aliasing_itself_leaves_no_reference_to_itself() {
        let records = [
            upsert("p", Some("p.myshopify.com"), Some("a-p")),
            upsert("q", None, Some("a-p")),
        ];
        let left: Vec<_> = (left_by(&records).into_iter())
            .map(|(index, refs)| (index, refs.unwrap()))
            .collect();
        let reference = |name: &str, target: &str| {
            let targets = [target.to_owned()].into();
            (
                index(name),
                IndexRefs {
                    targets,
                    ..IndexRefs::default()
                },
            )
        };

        assert_eq!(
            left[0],
            (index("p"), at_shop("p")),
            "no `alias#a-p` for `p`"
        );
        let targets: Vec<_> = left[1].1.targets.iter().cloned().collect();
        assert_eq!(targets, ["a-p"], "`q`'s alias of `p` protects `p`");
        assert_eq!(named_by(&reference("p", "a-p")).count(), 0);
        let named: Vec<_> = named_by(&reference("q", "a-p")).collect();
        assert_eq!(named, [Referred::Alias("a-p".into())]);
    }
}
