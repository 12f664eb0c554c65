//! Step 3 of the pipeline, pure: decoded records plus what was looked up for them (API keys,
//! the table's alias references, current KV shop ids) become one KV operation per key. What
//! must be looked up first is asked in `plan/needs.rs`.
//!
//! Records are applied in stream order, so the last operation on a key wins and earlier ones
//! are never sent. Each surviving operation is owned by the record that planned it: a record
//! is exported once every operation it owns has been applied.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::domain::kv::{check_key, check_put, KvValue};
use crate::domain::qfilter::filter_key;
use crate::domain::qfilter::QueryFilter;
use crate::domain::validate::{index_key_problem, shop_id_problem, shown, SHOP_DOMAIN};
use crate::domain::{IndexRef, IndexSettings, KvAction, KvKey};
use crate::pipeline::records::{Change, ChangeRecord};
use crate::ports::PortError;
use crate::report::Outcome;

mod needs;

pub use needs::{api_keys_wanted, claimers, filters_wanted, given_up, references_wanted};
pub use needs::{reference_questions, settle_previous_shops, Referrers, Snapshot};

#[derive(Clone, Debug, PartialEq)]
pub struct PlannedOp {
    pub action: KvAction,
    /// Index of the record (in stream order) whose outcome depends on this operation.
    pub owner: usize,
}

#[derive(Debug, Default)]
pub struct Plan {
    pub ops: BTreeMap<KvKey, PlannedOp>,
    /// Informational remarks per record, for the log.
    pub notes: Vec<(usize, String)>,
    /// Old shop keys deleted, with the index that gave each up. Until such a delete lands, the
    /// index's own key keeps its old value: a replay reads the old shop from it.
    pub old_shops: Vec<(KvKey, IndexRef)>,
    /// Indexes whose override filter is rebuilt, with the records (in stream order) that need
    /// it: if the filter is not written, they are reported for retry.
    pub filters: BTreeMap<IndexRef, Vec<usize>>,
}

impl Plan {
    /// Each shop key the plan puts an index's value on (a settings key not that index's own),
    /// with the index and the record owning the put.
    pub fn shop_puts(&self) -> impl Iterator<Item = (&KvKey, &IndexRef, usize)> {
        (self.ops.iter()).filter_map(|(key, op)| match &op.action {
            KvAction::Put(value) if key.is_shop_of(value.index()) => {
                Some((key, value.index(), op.owner))
            }
            _ => None,
        })
    }
}

/// Turns records and their snapshot into one operation per KV key, and decides the outcome of
/// each record not yet ended: exported as planned, rejected, or kept for an alias.
pub fn plan(records: &mut [ChangeRecord], snapshot: &Snapshot, default_cell: &str) -> Plan {
    let mut plan = Plan::default();
    let referrers = match &snapshot.references {
        Some(Ok(referrers)) => Ok(referrers),
        Some(Err(reason)) => Err(format!(
            "cannot read who aliases what the batch removes or claims what it gives up: {reason}"
        )),
        None => Err("who refers to what the batch gives up was not read".into()),
    };
    for (owner, record) in records.iter_mut().enumerate() {
        let mut planner = RecordPlanner {
            owner,
            snapshot,
            referrers: &referrers,
            default_cell,
            notes: &mut plan.notes,
            ops: Vec::new(),
            old_shops: Vec::new(),
        };
        let outcome = match &record.change {
            None => record.outcome.clone(),
            Some(change) => match planner.change(change) {
                Ok(()) => Outcome::Exported,
                Err(outcome) => outcome,
            },
        };
        let RecordPlanner { ops, old_shops, .. } = planner;
        let filter = record.change.as_ref().and_then(rebuilt_filter);
        // Every key the record writes is checked before anything is sent, its filter's too:
        // one key Cloudflare refuses would fail every pair of its request.
        let limits = check_limits(&ops).and_then(|()| filter.map_or(Ok(()), check_filter_key));
        let outcome = match (outcome, limits) {
            (Outcome::Exported, Err(reason)) => Outcome::Rejected(reason),
            (outcome, _) => outcome,
        };
        // A remove kept for an alias still hands its shops to their claimers.
        if matches!(outcome, Outcome::Exported | Outcome::Kept { .. }) {
            for (key, action) in ops {
                if action == KvAction::Delete && check_key(&key.key).is_err() {
                    continue; // Cloudflare never stored such a key: nothing to delete.
                }
                // A later record's operation on the same key replaces this one.
                plan.ops.insert(key, PlannedOp { action, owner });
            }
            plan.old_shops.extend(old_shops);
            if let Some(index) = filter {
                plan.filters.entry(index.clone()).or_default().push(owner);
            }
        }
        record.outcome = outcome;
    }
    // Each filter from its index's overrides as the snapshot read them.
    let filters: Vec<IndexRef> = plan.filters.keys().cloned().collect();
    for index in filters {
        let not_read = || Err(PortError::Unavailable("not read".into()));
        let queries = snapshot.overrides.get(&index).cloned();
        let queries = queries.unwrap_or_else(not_read);
        plan_filter(&mut plan, records, index, queries);
    }
    plan
}

/// The index's filter planned from its overrides' queries, owned by its first needer: it holds
/// exactly them, whatever the index's settings record says, and an index without overrides has
/// none (docs/contract.md, "Query-override filter"); without them, every record that needed it
/// is reported for retry.
fn plan_filter(
    plan: &mut Plan,
    records: &mut [ChangeRecord],
    index: IndexRef,
    queries: Result<Vec<String>, PortError>,
) {
    let needers = &plan.filters[&index];
    match queries {
        Ok(queries) => {
            let filter = QueryFilter::build(&index, queries);
            let action = match filter.count {
                0 => KvAction::Delete,
                _ => {
                    let text = serde_json::to_string(&filter).expect("filters serialize");
                    KvAction::put(KvValue::new(&index, text))
                }
            };
            let op = PlannedOp {
                action,
                owner: needers[0],
            };
            plan.ops.insert(filter_key(&index), op);
        }
        Err(e) => {
            let reason = format!("cannot read the overrides of index {index} for its filter: {e}");
            for &needer in needers {
                records[needer].outcome.fail(&reason);
            }
        }
    }
}

/// The index whose override filter a change rebuilds.
fn rebuilt_filter(change: &Change) -> Option<&IndexRef> {
    match change {
        Change::UpsertQuery(config) => Some(&config.index),
        Change::RemoveQuery { index, .. } => Some(index),
        Change::UpsertIndex {
            settings,
            with_overrides: true,
            ..
        } => Some(&settings.index),
        _ => None,
    }
}

fn check_filter_key(index: &IndexRef) -> Result<(), String> {
    check_key(&filter_key(index).key).map_err(|reason| format!("its query filter: {reason}"))
}

/// An index's own key may be written or deleted only when it cannot be a shop's key.
fn check_own_key(index: &IndexRef) -> Result<(), Outcome> {
    // `{account}-{name}` can end with the shop suffix only if the name ends with it, or is a
    // tail of it: anything else needs no key built (this runs for every settings record).
    let name = index.name.as_str();
    if !name.ends_with(SHOP_DOMAIN) && !SHOP_DOMAIN.ends_with(name) {
        return Ok(());
    }
    match index_key_problem(&KvKey::index(index).key) {
        Some(reason) => Err(Outcome::Rejected(reason)),
        None => Ok(()),
    }
}

struct RecordPlanner<'a> {
    owner: usize,
    snapshot: &'a Snapshot,
    referrers: &'a Result<&'a Referrers, String>,
    default_cell: &'a str,
    notes: &'a mut Vec<(usize, String)>,
    ops: Vec<(KvKey, KvAction)>,
    old_shops: Vec<(KvKey, IndexRef)>,
}

impl<'a> RecordPlanner<'a> {
    /// The change's own keys, then the shops it gives up; kept for an alias, it writes nothing
    /// of its own and keeps what no claimer takes.
    fn change(&mut self, change: &Change) -> Result<(), Outcome> {
        let kept = self.own_keys(change)?;
        if let Some((index, shops)) = given_up(change) {
            for shop in shops {
                self.give_up_shop(index, shop, kept.is_some())?;
            }
        }
        match kept {
            Some(referenced_by) => Err(Outcome::Kept { referenced_by }),
            None => Ok(()),
        }
    }

    /// The keys a change writes or deletes of its own; `Some`: a removal an alias keeps, with
    /// who aliases it.
    fn own_keys(&mut self, change: &Change) -> Result<Option<Vec<IndexRef>>, Outcome> {
        match change {
            Change::UpsertIndex { settings, .. } => {
                check_own_key(&settings.index)?;
                if let Some(reason) = settings.shop_id_problem() {
                    return Err(Outcome::Rejected(reason));
                }
                let value = Arc::new(self.settings_value(settings)?);
                if let Some(shop_id) = &settings.shop_id {
                    self.ops
                        .push((KvKey::settings(shop_id), KvAction::Put(value.clone())));
                }
                self.ops
                    .push((KvKey::index(&settings.index), KvAction::Put(value)));
                Ok(None)
            }
            Change::RemoveIndex {
                index,
                keeps_own_key,
                ..
            } => {
                check_own_key(index)?;
                let referenced_by = self.referrers()?.keeping(index);
                // An alias keeps a removed index, not a rejected one's shops it no longer holds
                // (the reconcile protects no key of an index with a settings record either).
                let kept = !referenced_by.is_empty() && !keeps_own_key;
                if !kept && !keeps_own_key {
                    // Its filter and query configs follow its override records, not this one.
                    self.ops.push((KvKey::index(index), KvAction::Delete));
                }
                Ok(kept.then_some(referenced_by))
            }
            Change::UpsertQuery(config) => {
                let value = serde_json::to_string(&config.kv_value())
                    .map(|text| KvValue::query_config(&config.index, &config.query, text))
                    .map_err(|e| {
                        Outcome::Rejected(format!("cannot serialize query config: {e}"))
                    })?;
                self.ops.push((
                    KvKey::query_config(&config.index, &config.query),
                    KvAction::put(value),
                ));
                Ok(None)
            }
            Change::RemoveQuery { index, query } => {
                self.ops
                    .push((KvKey::query_config(index, query), KvAction::Delete));
                Ok(None)
            }
        }
    }

    /// The value under an index's keys, with its account's API key.
    fn settings_value(&self, settings: &Arc<IndexSettings>) -> Result<KvValue, Outcome> {
        settings_value(self.snapshot, settings, self.default_cell)
    }

    fn referrers(&self) -> Result<&'a Referrers, Outcome> {
        (self.referrers.as_ref().copied()).map_err(|reason| Outcome::Failed(reason.clone()))
    }

    /// The index gave up `shop`: it takes the value of the first index (by id) that claims it
    /// and can be exported, as the table holds it now; with none (nobody claims it, or every
    /// claimer's record is rejected), it is deleted, unless the index is removed but `kept` for
    /// an alias (its shop key then stays while no other index claims the shop). It never routes
    /// to the index that left while another index claims it.
    fn give_up_shop(&mut self, index: &IndexRef, shop: &str, kept: bool) -> Result<(), Outcome> {
        if shop_id_problem(shop).is_some() {
            // Never written as a shop key: it may be another index's key. Left to reconcile.
            let note = format!("old shop id {} is not a shop key: not deleted", shown(shop));
            self.notes.push((self.owner, note));
            return Ok(());
        }
        let referrers = self.referrers()?;
        let serving = serving(shop, index, self.snapshot, referrers, self.default_cell)?;
        if let Some((claimer, value)) = serving {
            self.ops.push((KvKey::settings(shop), KvAction::put(value)));
            let note = format!("shop key `{shop}` now serves index {claimer}, which claims it");
            self.notes.push((self.owner, note));
            return Ok(());
        }
        if kept {
            return Ok(());
        }
        let claimers = referrers.by_shop.get(shop).into_iter().flatten();
        if claimers.filter(|c| *c != index).count() > 0 {
            let note =
                format!("shop key `{shop}` deleted: no index that claims it can be exported");
            self.notes.push((self.owner, note));
        }
        let key = KvKey::settings(shop);
        self.ops.push((key.clone(), KvAction::Delete));
        self.old_shops.push((key, index.clone()));
        Ok(())
    }
}

/// The value under an index's keys, with its account's API key as the snapshot looked it up.
fn settings_value(
    snapshot: &Snapshot,
    settings: &Arc<IndexSettings>,
    default_cell: &str,
) -> Result<KvValue, Outcome> {
    let wanted = settings.account_cell(default_cell);
    let api_key = match snapshot.api_keys.get(&wanted) {
        Some(Ok(key)) => key,
        Some(Err(error)) => return Err(Outcome::of_port_error(error, "")),
        None => return Err(Outcome::Failed("API key was not looked up".into())),
    };
    Ok(KvValue::settings(settings.clone(), api_key.clone()))
}

/// Who serves `shop` once `index` gave it up (the one rule, for every writer and the orphan
/// finder): the first other index, by id, whose record as the table holds it now claims the
/// shop and whose account's API key was found, with its value; `None`: nobody (no claimer, or each one's record
/// no longer claims it or is rejected). A claimer that could not be read or looked up is an
/// error: retried, never passed over.
pub fn serving<'s>(
    shop: &str,
    index: &IndexRef,
    snapshot: &'s Snapshot,
    referrers: &'s Referrers,
    default_cell: &str,
) -> Result<Option<(&'s IndexRef, KvValue)>, Outcome> {
    let claimers = referrers.by_shop.get(shop).into_iter().flatten();
    let claimers: BTreeSet<&IndexRef> = claimers.filter(|c| *c != index).collect();
    for claimer in claimers {
        let settings = match snapshot.claimers.get(claimer) {
            None => Err("its settings were not read".to_owned()),
            Some(Err(reason)) => Err(format!("its settings could not be read: {reason}")),
            Some(Ok(settings)) => Ok(settings),
        };
        let settings = settings.map_err(|why| {
            Outcome::Failed(format!("index {claimer} claims shop key `{shop}`: {why}"))
        })?;
        // Its record no longer claims the shop, or is rejected: the next claimer.
        let Some(settings) = settings
            .as_ref()
            .filter(|s| s.shop_id.as_deref() == Some(shop))
        else {
            continue;
        };
        match settings_value(snapshot, settings, default_cell) {
            Ok(value) => return Ok(Some((claimer, value))),
            Err(Outcome::Rejected(_)) => {}
            Err(outcome) => return Err(outcome),
        }
    }
    Ok(None)
}

/// Keys and values Cloudflare would refuse are never sent: the record is rejected instead.
fn check_limits(ops: &[(KvKey, KvAction)]) -> Result<(), String> {
    for (key, action) in ops {
        if let KvAction::Put(value) = action {
            check_put(&key.key, value)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::PortError;
    use std::collections::{BTreeSet, HashMap};

    use crate::domain::kv::{query_config_key, MAX_KEY_BYTES};
    use crate::domain::settings::Document;
    use crate::domain::AccountCell;
    use crate::domain::ApiKey;
    use crate::domain::{IndexRefs, IndexSettings, Namespace, QueryConfig};
    use crate::pipeline::records::decode_as_written;
    use serde_json::json;

    /// A plan with the outcomes it decided, one per record.
    #[derive(Debug)]
    struct Planned {
        plan: Plan,
        outcomes: Vec<Outcome>,
    }

    impl std::ops::Deref for Planned {
        type Target = Plan;
        fn deref(&self) -> &Plan {
            &self.plan
        }
    }

    fn plan(records: &[ChangeRecord], snapshot: &Snapshot, default_cell: &str) -> Planned {
        let mut records = records.to_vec();
        let plan = super::plan(&mut records, snapshot, default_cell);
        let outcomes = records.into_iter().map(|record| record.outcome).collect();
        Planned { plan, outcomes }
    }

    const CELL: &str = "default";

    fn index_image(name: &str, shop: Option<&str>) -> serde_json::Value {
        let mut image = json!({
            "pk": {"S": "acct-1"}, "sk": {"S": format!("INDEX#{name}")},
            "index_endpoint": {"S": format!("https://idx/{name}")},
        });
        if let Some(shop) = shop {
            image["shop_id"] = json!({"S": shop});
        }
        image
    }

    fn stream_record(
        seq: u32,
        event: &str,
        sk: &str,
        new: Option<serde_json::Value>,
        old: Option<serde_json::Value>,
    ) -> ChangeRecord {
        let mut dynamodb = json!({
            "Keys": {"pk": {"S": "acct-1"}, "sk": {"S": sk}},
            "SequenceNumber": seq.to_string(), "SizeBytes": 1,
            "StreamViewType": if old.is_some() { "NEW_AND_OLD_IMAGES" } else { "NEW_IMAGE" },
        });
        if let Some(new) = new {
            dynamodb["NewImage"] = new;
        }
        if let Some(old) = old {
            dynamodb["OldImage"] = old;
        }
        decode_as_written(
            &json!({"eventID": seq.to_string(), "eventName": event, "awsRegion": "eu-west-1", "dynamodb": dynamodb})
                .to_string(),
            "DEFAULT_CONFIGS",
        )
    }

    /// A `NEW_IMAGE` MODIFY: its previous shop is to be settled.
    fn new_image_upsert(seq: u32, name: &str, shop: Option<&str>) -> ChangeRecord {
        stream_record(
            seq,
            "MODIFY",
            &format!("INDEX#{name}"),
            Some(index_image(name, shop)),
            None,
        )
    }

    /// A MODIFY whose index had no shop before.
    fn upsert(seq: u32, name: &str, shop: Option<&str>) -> ChangeRecord {
        let mut records = [new_image_upsert(seq, name, shop)];
        settle_previous_shops(&mut records, |_| BTreeSet::new());
        let [record] = records;
        record
    }

    fn remove(seq: u32, name: &str) -> ChangeRecord {
        stream_record(seq, "REMOVE", &format!("INDEX#{name}"), None, None)
    }

    fn key_snapshot(records: &[ChangeRecord]) -> Snapshot {
        Snapshot {
            api_keys: api_keys_wanted(records, CELL)
                .into_iter()
                .map(|ac| {
                    let key = ApiKey::new(format!("key-{}", ac.account));
                    (ac, Ok(key))
                })
                .collect(),
            references: references_wanted(records).then(|| Ok(Referrers::default())),
            claimers: HashMap::new(),
            overrides: (filters_wanted(records).into_iter())
                .map(|index| (index, Ok(vec![])))
                .collect(),
        }
    }

    fn put_value(plan: &Plan, key: &str) -> serde_json::Value {
        match &plan.ops[&KvKey::settings(key)].action {
            KvAction::Put(value) => serde_json::from_str(&value.text()).unwrap(),
            KvAction::Delete => panic!("{key} is deleted"),
        }
    }

    fn keys(plan: &Plan) -> Vec<(&str, bool)> {
        plan.ops
            .iter()
            .map(|(k, op)| (k.key.as_str(), matches!(op.action, KvAction::Put(_))))
            .collect()
    }

    #[test]
    fn an_index_is_written_under_its_shop_and_its_id() {
        let records = vec![upsert(1, "products", Some("shop-1.myshopify.com"))];
        let plan = plan(&records, &key_snapshot(&records), CELL);
        assert_eq!(
            keys(&plan),
            [("acct-1-products", true), ("shop-1.myshopify.com", true)]
        );
        assert_eq!(
            put_value(&plan, "shop-1.myshopify.com"),
            put_value(&plan, "acct-1-products")
        );
        assert_eq!(
            put_value(&plan, "shop-1.myshopify.com")["marqo_api_key"],
            "key-acct-1"
        );
        assert_eq!(plan.outcomes, [Outcome::Exported]);
    }

    #[test]
    fn the_last_record_on_a_key_wins_and_owns_it() {
        let records = vec![
            upsert(1, "products", None),
            upsert(2, "products", None),
            upsert(3, "other", None),
        ];
        let mut records = records;
        if let Some(Change::UpsertIndex { settings, .. }) = &mut records[1].change {
            Arc::make_mut(settings).index_url = "https://idx/second".into();
        }
        let plan = plan(&records, &key_snapshot(&records), CELL);
        let op = &plan.ops[&KvKey::settings("acct-1-products")];
        assert_eq!(op.owner, 1);
        assert_eq!(
            put_value(&plan, "acct-1-products")["index_url"],
            "https://idx/second"
        );
        assert_eq!(plan.ops.len(), 2);
    }

    #[test]
    fn a_remove_after_an_upsert_in_the_batch_deletes_both_keys() {
        let mut records = vec![
            upsert(1, "products", Some("shop-1.myshopify.com")),
            remove(2, "products"),
        ];
        records[0] = stream_record(
            1,
            "INSERT",
            "INDEX#products",
            Some(index_image("products", Some("shop-1.myshopify.com"))),
            None,
        );
        // Nothing recorded: the batch itself knows the shop.
        settle_previous_shops(&mut records, |_| BTreeSet::new());
        let plan = plan(&records, &key_snapshot(&records), CELL);
        assert_eq!(
            keys(&plan),
            [("acct-1-products", false), ("shop-1.myshopify.com", false),]
        );
        assert!(plan.ops.values().all(|op| op.owner == 1));
    }

    #[test]
    fn previous_shops_are_settled_by_the_batch_then_the_ledger() {
        let shop = |s: &str| BTreeSet::from([s.to_owned()]);
        let none = BTreeSet::new;
        // (the records, what the ledger recorded of `products`, the previous shops each record
        // is planned with)
        let cases = [
            // Recorded: the ledger tells.
            (
                vec![new_image_upsert(1, "products", None)],
                shop("s1"),
                vec![shop("s1")],
            ),
            // Nothing recorded (the references are complete): no shop.
            (
                vec![new_image_upsert(1, "products", None)],
                none(),
                vec![none()],
            ),
            // Recorded on two shops (a move not yet confirmed): both are given up.
            (
                vec![new_image_upsert(1, "products", None)],
                BTreeSet::from(["s1".to_owned(), "s2".to_owned()]),
                vec![BTreeSet::from(["s1".to_owned(), "s2".to_owned()])],
            ),
            // An earlier record of the batch tells the next one.
            (
                vec![
                    new_image_upsert(1, "products", Some("s2")),
                    new_image_upsert(2, "products", None),
                ],
                shop("s1"),
                vec![shop("s1"), shop("s2")],
            ),
        ];
        for (mut records, recorded, planned) in cases {
            settle_previous_shops(&mut records, |_| recorded.clone());
            let settled: Vec<BTreeSet<String>> = (records.iter())
                .map(|r| match &r.change {
                    Some(Change::UpsertIndex { previous_shops, .. }) => previous_shops.clone(),
                    other => panic!("not settled: {other:?}"),
                })
                .collect();
            assert_eq!(settled, planned);
        }
    }

    #[test]
    fn a_remove_is_kept_while_an_enabled_alias_points_at_it() {
        let shop = "shop-1.myshopify.com";
        let mut records = vec![remove(1, "products-v1")];
        settle_previous_shops(&mut records, |_| BTreeSet::from([shop.to_owned()]));
        let mut snapshot = key_snapshot(&records);
        let aliasing = IndexRefs {
            targets: ["acct-1-products-v1".to_owned()].into(),
            ..IndexRefs::default()
        };
        let aliasing = (IndexRef::new("acct-1", "products"), aliasing);
        snapshot.references = Some(Ok(Referrers::of(vec![aliasing.clone()])));
        let kept = plan(&records, &snapshot, CELL);
        assert!(
            kept.ops.is_empty(),
            "its own key and its unclaimed shop key stay"
        );
        let referenced_by = vec![IndexRef::new("acct-1", "products")];
        assert_eq!(
            kept.outcomes,
            [Outcome::Kept {
                referenced_by: referenced_by.clone()
            }]
        );

        // Another index claims its shop: the shop key is handed over, the rest kept.
        let claimer = upsert(2, "other", Some(shop));
        let Some(Change::UpsertIndex { settings, .. }) = &claimer.change else {
            panic!("an index")
        };
        let claiming = (settings.index.clone(), settings.references());
        snapshot.references = Some(Ok(Referrers::of(vec![aliasing, claiming])));
        let wanted = AccountCell {
            cell: CELL.into(),
            account: "acct-1".into(),
        };
        snapshot.api_keys.insert(wanted, Ok(ApiKey::new("k")));
        (snapshot.claimers).insert(settings.index.clone(), Ok(Some(settings.clone())));
        let handed = plan(&records, &snapshot, CELL);
        assert_eq!(keys(&handed), [(shop, true)]);
        assert_eq!(put_value(&handed, shop)["index_name"], "other");
        assert_eq!(handed.outcomes, [Outcome::Kept { referenced_by }]);
    }

    #[test]
    fn a_failed_scan_fails_the_remove_instead_of_deleting_unchecked() {
        let records = vec![remove(1, "products")];
        let mut snapshot = key_snapshot(&records);
        snapshot.references = Some(Err(PortError::Unavailable("connection refused".into())));
        let plan = plan(&records, &snapshot, CELL);
        assert!(plan.ops.is_empty());
        assert!(
            matches!(&plan.outcomes[0], Outcome::Failed(r) if r.contains("connection refused"))
        );
    }

    #[test]
    fn a_shop_change_deletes_the_old_shop_key_unless_another_index_claims_it() {
        let mut records = vec![new_image_upsert(
            1,
            "products",
            Some("shop-new.myshopify.com"),
        )];
        let recorded = BTreeSet::from(["shop-old.myshopify.com".to_owned()]);
        settle_previous_shops(&mut records, |_| recorded.clone());
        assert!(references_wanted(&records));
        let snapshot = key_snapshot(&records);
        let freed = plan(&records, &snapshot, CELL);
        assert_eq!(
            keys(&freed),
            [
                ("acct-1-products", true),
                ("shop-new.myshopify.com", true),
                ("shop-old.myshopify.com", false)
            ]
        );

        let mut snapshot = key_snapshot(&records);
        let claiming = IndexRefs {
            shops: ["shop-old.myshopify.com".to_owned()].into(),
            ..IndexRefs::default()
        };
        let claiming = (IndexRef::new("acct-1", "products-v2"), claiming);
        snapshot.references = Some(Ok(Referrers::of(vec![claiming])));
        let Some(Ok(referrers)) = &snapshot.references else {
            unreachable!()
        };
        assert_eq!(
            claimers(&records, referrers).iter().collect::<Vec<_>>(),
            [&IndexRef::new("acct-1", "products-v2")],
            "the claimer's settings are read before the plan"
        );
        let unread = plan(&records, &snapshot, CELL);
        assert!(matches!(unread.outcomes[0], Outcome::Failed(_)));

        let claimer = stream_record(
            2,
            "INSERT",
            "INDEX#products-v2",
            Some(index_image("products-v2", Some("shop-old.myshopify.com"))),
            None,
        );
        let Some(Change::UpsertIndex { settings, .. }) = claimer.change else {
            panic!("an index")
        };
        snapshot
            .claimers
            .insert(settings.index.clone(), Ok(Some(settings)));
        let claimed = plan(&records, &snapshot, CELL);
        assert_eq!(
            keys(&claimed),
            [
                ("acct-1-products", true),
                ("shop-new.myshopify.com", true),
                ("shop-old.myshopify.com", true)
            ]
        );
        assert_eq!(
            put_value(&claimed, "shop-old.myshopify.com")["index_name"],
            "products-v2"
        );
        assert_eq!(claimed.notes.len(), 1);
        assert_eq!(claimed.outcomes, [Outcome::Exported]);
    }

    #[test]
    fn a_shop_id_naming_another_index_key_rejects_the_record_alone() {
        // acct-1's item claims acct-2's index key as its shop.
        let mut records = vec![
            upsert(1, "evil", Some("acct-2-products")),
            upsert(2, "fine", Some("shop-1.myshopify.com")),
            remove(3, "gone"),
        ];
        let recorded = |index: &IndexRef| match index.name.as_str() {
            "gone" => BTreeSet::from(["acct-2-products".to_owned()]),
            _ => BTreeSet::new(),
        };
        settle_previous_shops(&mut records, recorded);
        let mut snapshot = key_snapshot(&records);
        snapshot.references = Some(Ok(Referrers::of(vec![])));
        let plan = plan(&records, &snapshot, CELL);
        assert!(
            matches!(&plan.outcomes[0], Outcome::Rejected(r) if r.contains("`acct-2-products`")
                && r.contains("another index's key")),
            "{:?}",
            plan.outcomes[0]
        );
        assert_eq!(plan.outcomes[1..], [Outcome::Exported, Outcome::Exported]);
        assert_eq!(
            keys(&plan),
            [
                ("acct-1-fine", true),
                ("acct-1-gone", false),
                ("shop-1.myshopify.com", true),
            ],
            "acct-2-products is neither written nor deleted"
        );
        assert!(plan.notes.iter().any(
            |(owner, note)| *owner == 2 && note.contains("`acct-2-products` is not a shop key")
        ));
    }

    #[test]
    fn an_index_key_in_the_form_of_a_shop_key_is_never_written_or_deleted() {
        let records = vec![
            upsert(1, "x.myshopify.com", None),
            remove(2, "y.myshopify.com"),
        ];
        let mut snapshot = key_snapshot(&records);
        snapshot.references = Some(Ok(Referrers::of(vec![])));
        let plan = plan(&records, &snapshot, CELL);
        assert!(plan.ops.is_empty(), "{:?}", plan.ops);
        assert!(plan
            .outcomes
            .iter()
            .all(|o| matches!(o, Outcome::Rejected(r) if r.contains("form of a shop key"))));
    }

    #[test]
    fn a_filter_key_cloudflare_would_refuse_rejects_its_record_before_sending() {
        // The index key fits in 512 bytes; `qfilter-acct-1-{name}` does not.
        let name = "p".repeat(500);
        let upsert = |seq: u32, name: &str| {
            let Some(Change::UpsertIndex { settings, .. }) = upsert(seq, name, None).change else {
                panic!("an index")
            };
            let index = Some(settings.index.clone());
            let change = Change::UpsertIndex {
                settings,
                previous_shops: BTreeSet::new(),
                with_overrides: true,
            };
            ChangeRecord {
                sequence_number: Some(seq.to_string()),
                ..ChangeRecord::of(index, Ok(change))
            }
        };
        let records = vec![upsert(1, &name), upsert(2, "products")];
        let plan = plan(&records, &key_snapshot(&records), CELL);
        assert!(
            matches!(&plan.outcomes[0], Outcome::Rejected(r) if r.contains("query filter") && r.contains("512")),
            "{:?}",
            plan.outcomes[0]
        );
        assert_eq!(plan.outcomes[1], Outcome::Exported);
        // No overrides: the index has no filter.
        let filter = "qfilter-acct-1-products";
        assert_eq!(keys(&plan), [("acct-1-products", true), (filter, false)]);
        assert_eq!(
            plan.filters.keys().collect::<Vec<_>>(),
            [&IndexRef::new("acct-1", "products")]
        );
    }

    /// Every shop the ledger records (an earlier batch could not confirm one given up) is
    /// given up; an old image says nothing more (a `NEW_AND_OLD_IMAGES` stream's is not read).
    #[test]
    fn every_shop_recorded_is_given_up_whatever_the_old_image() {
        let s =
            |names: &[&str]| -> BTreeSet<String> { names.iter().map(|n| n.to_string()).collect() };
        let old = Some(index_image("products", Some("s9")));
        let new = Some(index_image("products", Some("s2")));
        let mut records = vec![
            stream_record(1, "MODIFY", "INDEX#products", new.clone(), old),
            stream_record(
                2,
                "MODIFY",
                "INDEX#products",
                new,
                Some(index_image("products", Some("s2"))),
            ),
        ];

        settle_previous_shops(&mut records, |_| s(&["s0", "s1"]));

        let previous: Vec<BTreeSet<String>> = (records.iter())
            .map(|r| match &r.change {
                Some(Change::UpsertIndex { previous_shops, .. }) => previous_shops.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        // The second record is on what the first one left.
        let expected = [s(&["s0", "s1"]), s(&["s2"])];
        assert_eq!(previous, expected);
    }

    #[test]
    fn a_modify_gives_up_the_shop_the_ledger_recorded() {
        let mut records = vec![
            new_image_upsert(1, "products", Some("shop-new.myshopify.com")),
            new_image_upsert(2, "other", None),
        ];
        let recorded = |index: &IndexRef| match index.name.as_str() {
            "products" => BTreeSet::from(["shop-old.myshopify.com".to_owned()]),
            _ => BTreeSet::new(),
        };
        settle_previous_shops(&mut records, recorded);
        let snapshot = key_snapshot(&records);
        assert!(
            snapshot.references.is_some(),
            "the shop moved: who else claims it"
        );
        let plan = plan(&records, &snapshot, CELL);
        assert_eq!(
            keys(&plan),
            [
                ("acct-1-other", true),
                ("acct-1-products", true),
                ("shop-new.myshopify.com", true),
                ("shop-old.myshopify.com", false)
            ]
        );
        assert_eq!(
            plan.old_shops,
            [(
                KvKey::settings("shop-old.myshopify.com"),
                IndexRef::new("acct-1", "products")
            )]
        );
    }

    #[test]
    fn api_key_lookups_decide_between_reject_and_retry() {
        let records = vec![upsert(1, "products", None)];
        let wanted = AccountCell {
            cell: CELL.into(),
            account: "acct-1".into(),
        };
        for (error, rejected) in [
            (PortError::NotFound("no key".into()), true),
            (PortError::Unavailable("503".into()), false),
        ] {
            let snapshot = Snapshot {
                api_keys: HashMap::from([(wanted.clone(), Err(error))]),
                ..Snapshot::default()
            };
            let plan = plan(&records, &snapshot, CELL);
            assert!(
                plan.ops.is_empty(),
                "settings are never written without a key"
            );
            assert_eq!(matches!(plan.outcomes[0], Outcome::Rejected(_)), rejected);
            assert_eq!(matches!(plan.outcomes[0], Outcome::Failed(_)), !rejected);
        }
    }

    #[test]
    fn one_api_key_lookup_per_cell_and_account() {
        let mut records: Vec<_> = (0..50).map(|i| upsert(i, &format!("i{i}"), None)).collect();
        let mut celled = index_image("celled", None);
        celled["cell"] = json!({"S": "eu-2"});
        records.push(stream_record(
            99,
            "INSERT",
            "INDEX#celled",
            Some(celled),
            None,
        ));
        let wanted = api_keys_wanted(&records, CELL);
        let cells: Vec<_> = wanted.iter().map(|a| a.cell.as_str()).collect();
        assert_eq!(cells, ["default", "eu-2"]);
    }

    #[test]
    fn oversized_keys_reject_the_record_and_send_nothing() {
        let long_name = "p".repeat(MAX_KEY_BYTES);
        let records = vec![upsert(1, &long_name, None), upsert(2, "ok", Some("."))];
        let plan = plan(&records, &key_snapshot(&records), CELL);
        assert!(plan.ops.is_empty());
        assert!(matches!(&plan.outcomes[0], Outcome::Rejected(r) if r.contains("512")));
        assert!(matches!(&plan.outcomes[1], Outcome::Rejected(r) if r.contains("`.`")));
    }

    #[test]
    fn query_configs_go_to_their_own_namespace() {
        let config = QueryConfig {
            index: IndexRef::new("acct-1", "products"),
            query: "chaussures #été".into(),
            config: Document::from(json!({"boost": 2})),
        };
        let records = vec![ChangeRecord {
            sequence_number: Some("1".into()),
            ..ChangeRecord::of(Some(config.index.clone()), Ok(Change::UpsertQuery(config)))
        }];
        let plan = plan(&records, &Snapshot::default(), CELL);
        let (key, op) = plan.ops.iter().next().unwrap();
        assert_eq!(key.namespace, Namespace::QueryConfigs);
        assert_eq!(
            key.key,
            query_config_key(&IndexRef::new("acct-1", "products"), "chaussures #été")
        );
        let KvAction::Put(value) = &op.action else {
            panic!()
        };
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&value.text()).unwrap(),
            json!({"schema_version": 1, "system_account_id": "acct-1", "index_name": "products",
                   "query": "chaussures #été", "config": {"boost": 2}})
        );
    }

    #[test]
    fn plans_never_show_api_keys_in_debug() {
        let records = vec![upsert(1, "products", Some("shop-1.myshopify.com"))];
        let plan = plan(&records, &key_snapshot(&records), CELL);
        let debug = format!("{plan:?}");
        assert!(debug.contains("Put("), "{debug}");
        assert!(!debug.contains("key-acct-1"), "{debug}");
    }

    #[test]
    fn skipped_and_rejected_records_cost_nothing() {
        let records = vec![
            stream_record(
                1,
                "MODIFY",
                "DEFAULT_CONFIGS",
                Some(json!({"pk": {"S": "acct-1"}})),
                None,
            ),
            stream_record(
                2,
                "MODIFY",
                "INDEX#broken",
                Some(json!({"pk": {"S": "acct-1"}})),
                None,
            ),
        ];
        assert!(!references_wanted(&records));
        let plan = plan(&records, &Snapshot::default(), CELL);
        assert!(plan.ops.is_empty());
        assert!(matches!(plan.outcomes[0], Outcome::Skipped(_)));
        assert!(matches!(&plan.outcomes[1], Outcome::Rejected(r) if r.contains("index_endpoint")));
    }

    #[test]
    fn settings_values_match_the_decoded_record() {
        let records = vec![upsert(1, "products", Some("shop-1.myshopify.com"))];
        let plan = plan(&records, &key_snapshot(&records), CELL);
        let Some(Change::UpsertIndex { settings, .. }) = &records[0].change else {
            panic!()
        };
        let expected: &IndexSettings = settings;
        assert_eq!(
            put_value(&plan, "shop-1.myshopify.com"),
            serde_json::to_value(expected.kv_value(&ApiKey::new("key-acct-1"))).unwrap()
        );
    }
}
