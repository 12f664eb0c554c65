//! What other indexes a batch must know about (who aliases a removed index, who claims a shop
//! an index gives up), from the ledger's records of each index's references instead of a scan
//! of the whole table once those records are complete; and the records kept up to date
//! (docs/contract.md, "Concurrent writers" and "References in the ledger").

use std::collections::{BTreeMap, BTreeSet, HashMap};

use tokio::time::Instant;

use super::Exporter;
use crate::domain::kv::{check_key, KvKey};
use crate::domain::validate::shop_id_problem;
use crate::domain::{IndexId, IndexRef, IndexSettings, SettingsReference};
use crate::pipeline::plan;
use crate::pipeline::records::{Change, ChangeRecord};
use crate::ports::{before_deadline, IndexRefs, Ledger, Ports, SettingsTable};
use crate::ports::{PortError, Referred, RefsChange, RefsRepair};
use crate::report::Outcome;

/// Whether an index's live alias target is recorded as a reference: not when no KV key could
/// be it (empty, over 512 bytes, unprintable: it protects nothing, its `alias#{target}` item
/// could not be written, and one record would fail its whole batch), nor when it is the index's
/// own id (an index protects nothing of its own by aliasing itself: its keys go with its
/// record; recording it would cost a ledger write per such index).
fn recorded_target(own: &IndexId, target: &IndexId) -> bool {
    target != own && check_key(&target.0).is_ok()
}

/// The references a settings record leaves: its shop and its recorded alias targets.
fn refs_of(settings: &IndexSettings) -> IndexRefs {
    let targets = settings.aliases.live_targets();
    leaves(&settings.index, settings.shop_id.clone(), targets)
}

/// The references of an index with this shop and these live alias targets.
fn leaves<'t>(
    index: &IndexRef,
    shop: Option<String>,
    targets: impl Iterator<Item = &'t IndexId>,
) -> IndexRefs {
    let own = index.id();
    let targets = targets.filter(|t| recorded_target(&own, t));
    IndexRefs {
        shop,
        targets: targets.map(|t| t.0.clone()).collect(),
        removed: false,
    }
}

/// What a settings item's raw reference names that a ledger item can stand for: its shop when
/// it is a shop key, its targets that are KV keys; nothing when its index's own key is not one
/// (no key of it was ever written, and its items could be over DynamoDB's key limits).
fn named_by(reference: &SettingsReference) -> impl Iterator<Item = Referred> + '_ {
    let index_key = KvKey::index(&reference.index).key;
    let valid = check_key(&index_key).is_ok();
    let own = reference.index.id();
    let shop = (reference.shop_id.iter())
        .filter(move |shop| valid && shop_id_problem(shop).is_none())
        .map(|shop| Referred::Shop(shop.clone()));
    let targets = (reference.live_targets.iter())
        .filter(move |target| valid && recorded_target(&own, target))
        .map(|target| Referred::Alias(target.0.clone()));
    shop.chain(targets)
}

fn removed() -> IndexRefs {
    IndexRefs {
        removed: true,
        ..IndexRefs::default()
    }
}

/// Each settings record's index and the references it leaves (`None` for other records).
pub fn left_by(records: &[ChangeRecord]) -> Vec<Option<(IndexRef, IndexRefs)>> {
    (records.iter())
        .map(|record| match &record.decoded {
            Ok(Change::UpsertIndex { settings, .. }) => {
                Some((settings.index.clone(), refs_of(settings)))
            }
            Ok(Change::RemoveIndex { index, .. }) => Some((index.clone(), removed())),
            _ => None,
        })
        .collect()
}

impl<P: Ports> Exporter<P> {
    /// After a full backfill that recorded every index's references: from now on a batch asks
    /// the ledger who refers to what, instead of scanning the table.
    pub async fn mark_references_complete(&self, deadline: Instant) -> Result<(), PortError> {
        let mark = self.ledger.mark_references_complete();
        before_deadline(deadline, "ledger references", mark).await
    }

    /// From the ledger once its records are complete (who aliases each removed index, who
    /// claims each shop given up), else from a scan of the table.
    pub(super) async fn references(
        &self,
        records: &[ChangeRecord],
        deadline: Instant,
    ) -> Result<Vec<SettingsReference>, PortError> {
        let complete = self.ledger.references_complete();
        if !before_deadline(deadline, "ledger references", complete).await? {
            return self.settings_references(deadline).await;
        }
        let asked = plan::reference_questions(records);
        let recorded = self.recorded_referrers(asked.into_iter().collect(), deadline);
        let mut references: BTreeMap<IndexRef, SettingsReference> = (recorded.await?.into_iter())
            .map(|r| (r.index.clone(), r))
            .collect();
        // The batch's own records are newer than what the ledger holds.
        for record in records {
            match &record.decoded {
                Ok(Change::UpsertIndex { settings, .. }) => {
                    let reference = SettingsReference {
                        index: settings.index.clone(),
                        shop_id: settings.shop_id.clone(),
                        live_targets: settings.aliases.live_targets().cloned().collect(),
                    };
                    references.insert(settings.index.clone(), reference);
                }
                Ok(Change::RemoveIndex { index, .. }) => {
                    references.remove(index);
                }
                _ => {}
            }
        }
        Ok(references.into_values().collect())
    }

    /// The references of every index that may refer to what is `asked` (an alias target, a
    /// shop): from the ledger once its records are complete (its sets naming the candidates,
    /// each candidate's own record deciding), else every index's, from a scan of the table.
    pub async fn referrers_of(
        &self,
        asked: Vec<Referred>,
        deadline: Instant,
    ) -> Result<Vec<SettingsReference>, PortError> {
        let complete = self.ledger.references_complete();
        if !before_deadline(deadline, "ledger references", complete).await? {
            return self.settings_references(deadline).await;
        }
        self.recorded_referrers(asked, deadline).await
    }

    async fn recorded_referrers(
        &self,
        asked: Vec<Referred>,
        deadline: Instant,
    ) -> Result<Vec<SettingsReference>, PortError> {
        if asked.is_empty() {
            return Ok(Vec::new());
        }
        let query = self.ledger.referrers(&asked);
        let candidates = before_deadline(deadline, "ledger references", query).await?;
        // The ledger names candidates (a superset, possibly stale); each one's settings record
        // in the table decides: an alias dropped, or a record gone, no longer counts.
        let read = self.table.index_references(&candidates);
        before_deadline(deadline, "candidates' settings", read).await
    }

    /// Before the KV writes: the items pointing back at each index for every reference its
    /// records leave that the ledger does not record yet, so a batch that asks who claims a
    /// shop or aliases an index finds a referrer as soon as its keys can land. The stream adds
    /// what each of its records leaves (a superset of what any replay point leaves); an
    /// operator only for an index with nothing recorded (it only seeds). Answers what was
    /// added, per index.
    pub(super) async fn point_back(
        &self,
        left: &[Option<(IndexRef, IndexRefs)>],
        known: &HashMap<IndexRef, IndexRefs>,
        stream: bool,
        deadline: Instant,
    ) -> Result<HashMap<IndexRef, BTreeSet<Referred>>, PortError> {
        let mut added: HashMap<IndexRef, BTreeSet<Referred>> = HashMap::new();
        for (index, refs) in left.iter().flatten() {
            let recorded = known.get(index);
            if !stream && recorded.is_some() {
                continue;
            }
            let before = recorded.map(IndexRefs::referred).unwrap_or_default();
            let new = refs.referred().into_iter().filter(|r| !before.contains(r));
            added.entry(index.clone()).or_default().extend(new);
        }
        let items: Vec<(IndexRef, Referred)> = (added.iter())
            .flat_map(|(index, referred)| referred.iter().map(|r| (index.clone(), r.clone())))
            .collect();
        if !items.is_empty() {
            let put = self.ledger.point_back(&items);
            before_deadline(deadline, "ledger references", put).await?;
        }
        Ok(added)
    }

    /// The ledger's own repair (a reconcile's table step, a backfill's rejected items): the
    /// items pointing back for what each settings item names (`references`, read from the raw
    /// items, fail closed: a record rejected as invalid still names what its KV value, written
    /// when it was valid, may route to) that the ledger lacks (a stream record lost, a write
    /// that failed, an index exported before the ledger) are added. Nothing is deleted or
    /// replaced: the table was read before the stream's newer word may have landed, and an
    /// extra item costs a candidate read, never a wrong answer. Answers how many were added.
    pub async fn add_missing_references(
        &self,
        references: &[SettingsReference],
        deadline: Instant,
    ) -> Result<usize, PortError> {
        let named: BTreeSet<(IndexRef, Referred)> = (references.iter())
            .flat_map(|r| named_by(r).map(move |referred| (r.index.clone(), referred)))
            .collect();
        if named.is_empty() {
            return Ok(0);
        }
        let named: Vec<(IndexRef, Referred)> = named.into_iter().collect();
        let read = self.ledger.pointing(&named);
        let found: BTreeSet<_> = (before_deadline(deadline, "ledger references", read).await?)
            .into_iter()
            .collect();
        let missing: Vec<_> = named.into_iter().filter(|n| !found.contains(n)).collect();
        if !missing.is_empty() {
            let put = self.ledger.point_back(&missing);
            before_deadline(deadline, "ledger references", put).await?;
        }
        Ok(missing.len())
    }

    /// The ledger's anti-entropy (a reconcile's table step): each index whose recorded
    /// references differ from what its table record `left` (read before the ledger) is
    /// recorded anew where its record, read again after the ledger, still leaves that, and the
    /// ledger still holds what was read: a stream's newer word that landed meanwhile is never
    /// replaced. Answers how many were recorded.
    pub async fn repair_recorded_references(
        &self,
        left: Vec<(IndexRef, IndexRefs)>,
        deadline: Instant,
    ) -> Result<usize, PortError> {
        let indexes: Vec<IndexRef> = left.iter().map(|(index, _)| index.clone()).collect();
        let read = self.ledger.index_refs(&indexes);
        let mut recorded = before_deadline(deadline, "ledger references", read).await?;
        let differ: Vec<_> = (left.into_iter())
            .filter(|(index, refs)| recorded.get(index) != Some(refs))
            .collect();
        if differ.is_empty() {
            return Ok(0);
        }
        let indexes: Vec<IndexRef> = differ.iter().map(|(index, _)| index.clone()).collect();
        let again = self.table.index_references(&indexes);
        let again = before_deadline(deadline, "settings", again).await?;
        let again: HashMap<&IndexRef, IndexRefs> = (again.iter())
            .map(|r| {
                (
                    &r.index,
                    leaves(&r.index, r.shop_id.clone(), r.live_targets.iter()),
                )
            })
            .collect();
        let repairs: Vec<RefsRepair> = (differ.into_iter())
            .filter(|(index, refs)| again.get(index) == Some(refs))
            .map(|(index, new)| RefsRepair {
                read: recorded.remove(&index),
                index,
                new,
            })
            .collect();
        let repair = self.ledger.repair_refs(&repairs);
        before_deadline(deadline, "ledger references", repair).await
    }

    /// After the KV writes: each index's references as its last applied record left them. For
    /// the stream, as of the batch's first failed record, where Lambda's replay starts: what the
    /// records before it left (they are not sent again), never what a record the replay sends
    /// again left, so the replay finds the references it starts from; the items pointing back
    /// that those references no longer name (recorded before, or added before the writes) go.
    /// An operator's index with a failed record is not recorded (its rerun records it). The
    /// stream's records are the newest word and replace what is recorded; an operator's only
    /// fill what is missing. A record whose references could not be recorded (by the
    /// deadline) is retried.
    pub(super) async fn record_references(
        &self,
        left: Vec<Option<(IndexRef, IndexRefs)>>,
        (known, added): (
            &HashMap<IndexRef, IndexRefs>,
            &HashMap<IndexRef, BTreeSet<Referred>>,
        ),
        outcomes: &mut [Outcome],
        stream: bool,
        deadline: Instant,
    ) {
        let mut by_index: BTreeMap<IndexRef, (Vec<usize>, Option<IndexRefs>, bool)> =
            BTreeMap::new();
        let replayed_from = (outcomes.iter())
            .position(|o| matches!(o, Outcome::Failed(_)))
            .filter(|_| stream)
            .unwrap_or(outcomes.len());
        for (at, entry) in left.into_iter().enumerate().take(replayed_from) {
            let Some((index, refs)) = entry else { continue };
            let (positions, last, failed) = by_index.entry(index).or_default();
            positions.push(at);
            match &outcomes[at] {
                Outcome::Failed(_) => *failed = true,
                // Pending: every operation applied (it becomes exported).
                Outcome::Pending | Outcome::Exported | Outcome::Kept { .. } => *last = Some(refs),
                _ => {}
            }
        }
        let changed: Vec<(Vec<usize>, RefsChange)> = (by_index.into_iter())
            .filter_map(|(index, (positions, last, failed))| {
                let new = last.filter(|_| !failed)?;
                let old = known.get(&index);
                let mut pointing = old.map(IndexRefs::referred).unwrap_or_default();
                pointing.extend(added.get(&index).into_iter().flatten().cloned());
                let needed = if stream {
                    old != Some(&new) || pointing != new.referred()
                } else {
                    old.is_none()
                };
                let change = RefsChange {
                    index,
                    pointing,
                    new,
                };
                needed.then_some((positions, change))
            })
            .collect();
        if changed.is_empty() {
            return;
        }
        let (positions, changes): (Vec<Vec<usize>>, Vec<RefsChange>) = changed.into_iter().unzip();
        let answer = if stream {
            let record = self.ledger.record_refs(&changes);
            before_deadline(deadline, "ledger references", record).await
        } else {
            // An operator's read of the table may be older than what the stream recorded: it
            // only fills what is missing.
            let seeds: Vec<RefsRepair> = (changes.into_iter())
                .map(|c| RefsRepair {
                    index: c.index,
                    read: None,
                    new: c.new,
                })
                .collect();
            let seed = self.ledger.repair_refs(&seeds);
            before_deadline(deadline, "ledger references", seed)
                .await
                .map(|_| ())
        };
        // A batch that asks the ledger who refers to what must find these: a record whose
        // references were not recorded is retried (and a backfill does not mark them complete).
        if let Err(e) = answer {
            for at in positions.into_iter().flatten() {
                let reason = format!("its references were not recorded in the ledger: {e}");
                outcomes[at].fail(reason);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::memory::MemoryKv;
    use crate::pipeline::exporter::tests::exporter;
    use crate::pipeline::records::decode_as_written;
    use serde_json::json;
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

    fn at_shop(name: &str) -> IndexRefs {
        IndexRefs {
            shop: Some(format!("{name}.myshopify.com")),
            ..IndexRefs::default()
        }
    }

    fn deadline() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    #[tokio::test]
    async fn before_its_writes_the_stream_points_back_for_every_record_and_an_operator_only_seeds()
    {
        let cases: [(bool, Vec<(Referred, IndexRef)>); 2] = [
            // The stream: every record's references the ledger lacks, `p`'s superset included.
            (
                true,
                vec![
                    (Referred::Alias("a-t".into()), index("p")),
                    (shop("b"), index("p")),
                    (shop("c"), index("p")),
                    (shop("q"), index("q")),
                ],
            ),
            // An operator: only what an index without recorded references leaves.
            (false, vec![(shop("q"), index("q"))]),
        ];
        for (stream, expected) in cases {
            let e = exporter(MemoryKv::default());
            let known = HashMap::from([(index("p"), at_shop("a"))]);
            let records = [
                upsert("p", Some("b.myshopify.com"), None),
                upsert("p", Some("c.myshopify.com"), Some("a-t")),
                upsert("q", Some("q.myshopify.com"), None),
            ];
            let left = left_by(&records);

            let added = e.point_back(&left, &known, stream, deadline()).await;

            let back: Vec<_> = e.ledger.back.lock().unwrap().iter().cloned().collect();
            let mut expected = expected;
            expected.sort();
            assert_eq!(back, expected, "stream: {stream}");
            let added: usize = added.unwrap().values().map(BTreeSet::len).sum();
            assert_eq!(added, expected.len());
        }
    }

    #[tokio::test]
    async fn the_stream_records_what_its_first_failed_record_starts_from_and_drops_what_no_longer_points(
    ) {
        let e = exporter(MemoryKv::default());
        let known = HashMap::from([(index("p"), at_shop("a"))]);
        e.ledger
            .back
            .lock()
            .unwrap()
            .insert((shop("a"), index("p")));
        let records = [
            upsert("p", Some("b.myshopify.com"), None),
            upsert("p", Some("c.myshopify.com"), None),
            upsert("q", Some("q.myshopify.com"), None),
        ];
        let left = left_by(&records);
        let added = e.point_back(&left, &known, true, deadline()).await.unwrap();
        // The second record failed: Lambda replays from it, so `q`'s record is sent again too.
        let mut outcomes = vec![
            Outcome::Pending,
            Outcome::Failed("KV down".into()),
            Outcome::Pending,
        ];

        let refs = (&known, &added);
        (e.record_references(left, refs, &mut outcomes, true, deadline())).await;

        let recorded = e.ledger.refs.lock().unwrap().clone();
        assert_eq!(recorded, HashMap::from([(index("p"), at_shop("b"))]));
        let back: Vec<_> = e.ledger.back.lock().unwrap().iter().cloned().collect();
        // `c` and `q` were added before the writes: `c` goes with `p`'s record, `q` waits for
        // the replay, which adds it again (a superset costs a candidate read, never a miss).
        assert_eq!(
            back,
            [(shop("b"), index("p")), (shop("q"), index("q"))],
            "`a` and `c` no longer point at `p`"
        );
        assert_eq!(outcomes[0], Outcome::Pending);
    }

    /// The reconcile's repair of the ledger: (recorded, in the page, in the table read again
    /// after the ledger, recorded after).
    #[tokio::test]
    async fn a_recorded_reference_is_rewritten_only_where_the_table_still_says_otherwise() {
        let cases = [
            // A lost move: rewritten.
            (Some(at_shop("a")), "b", Some("b"), Some(at_shop("b"))),
            // Never recorded: written.
            (None, "b", Some("b"), Some(at_shop("b"))),
            // Moved again since the page was read: the stream records it, not this.
            (Some(at_shop("a")), "b", Some("c"), Some(at_shop("a"))),
            // Gone since the page was read: left.
            (Some(at_shop("a")), "b", None, Some(at_shop("a"))),
            // In step: nothing to write.
            (Some(at_shop("b")), "b", Some("b"), Some(at_shop("b"))),
        ];
        for (recorded, page, again, expected) in cases {
            let e = exporter(MemoryKv::default());
            let p = index("p");
            e.ledger
                .refs
                .lock()
                .unwrap()
                .extend(recorded.clone().map(|r| (p.clone(), r)));
            if let Some(shop) = again {
                let image = json!({"pk": {"S": "a"}, "sk": {"S": "INDEX#p"},
                    "shop_id": {"S": format!("{shop}.myshopify.com")}});
                let item = crate::dynamo::item_from_dynamodb_json(image).unwrap();
                let key = ("a".to_owned(), "INDEX#p".to_owned());
                e.table.items.lock().unwrap().insert(key, item);
            }

            let left = vec![(p.clone(), at_shop(page))];
            let repaired = e.repair_recorded_references(left, deadline()).await;

            let now = e.ledger.refs.lock().unwrap().get(&p).cloned();
            assert_eq!(now, expected, "{recorded:?} {page} {again:?}");
            let written = usize::from(now != recorded);
            assert_eq!(repaired.unwrap(), written, "{recorded:?} {page} {again:?}");
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

        let found = e.referrers_of(asked.to_vec(), deadline()).await.unwrap();

        let claimers: Vec<&str> = (found.iter())
            .filter(|r| r.shop_id.as_deref() == Some("s.myshopify.com"))
            .map(|r| r.index.name.as_str())
            .collect();
        let aliasing: Vec<&str> = (found.iter())
            .filter(|r| r.live_targets.iter().any(|t| t.0 == "a-t"))
            .map(|r| r.index.name.as_str())
            .collect();
        let expected: Vec<&str> = (cases.iter())
            .filter(|(.., counted)| *counted)
            .map(|(name, ..)| *name)
            .collect();
        assert_eq!(claimers, expected);
        assert_eq!(aliasing, expected);
        assert_eq!(e.table.counters().reference_scans, 0, "asked of the ledger");
    }

    #[test]
    fn an_index_aliasing_itself_leaves_no_reference_to_itself() {
        let records = [
            upsert("p", Some("p.myshopify.com"), Some("a-p")),
            upsert("q", None, Some("a-p")),
        ];
        let left: Vec<_> = left_by(&records).into_iter().flatten().collect();
        let reference = |name: &str, target: &str| SettingsReference {
            index: index(name),
            shop_id: None,
            live_targets: vec![crate::domain::IndexId(target.into())],
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

    #[tokio::test]
    async fn an_operator_seeds_only_an_index_with_nothing_recorded() {
        let e = exporter(MemoryKv::default());
        let known = HashMap::from([(index("p"), at_shop("a"))]);
        let records = [
            upsert("p", Some("b.myshopify.com"), None),
            upsert("q", Some("q.myshopify.com"), None),
        ];
        let left = left_by(&records);
        let added = e
            .point_back(&left, &known, false, deadline())
            .await
            .unwrap();
        let mut outcomes = vec![Outcome::Pending, Outcome::Pending];

        let refs = (&known, &added);
        (e.record_references(left, refs, &mut outcomes, false, deadline())).await;

        let recorded = e.ledger.refs.lock().unwrap().clone();
        assert_eq!(
            recorded,
            HashMap::from([(index("q"), at_shop("q"))]),
            "`p`'s recorded references are the stream's word, newer than the operator's read"
        );
    }
}
