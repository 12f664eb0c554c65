//! What the table and the ledger imply for a scope of indexes: one pure function from their
//! states to the keys ([`desired`]), the only place the contract's rules about keys live
//! (docs/contract.md, "Where each rule lives"): shop claimers, removed indexes kept for an
//! alias, filters following overrides, rejected records, key limits. Every writer sends what it
//! implies; the check and the comparing modes compare against it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::domain::kv::{check_key, check_put, KvValue};
use crate::domain::qfilter::{filter_key, QueryFilter};
use crate::domain::validate::{index_key_problem, shop_id_problem, shown, SHOP_DOMAIN};
use crate::domain::Outcome;
use crate::domain::{IndexRef, IndexSettings, KvAction, KvKey};

use super::scope::{IndexState, Referrers, Settings, World};

/// What one key must hold.
#[derive(Debug, Clone, PartialEq)]
pub enum Want {
    Put(Arc<KvValue>),
    Delete,
    /// Left as it is: a removed index an alias keeps.
    Keep,
}

/// A key's want, with the index it is checked as (a put's: whose value it is) and the index
/// whose change decided it (`by`: its records fail when the key does not land).
#[derive(Debug, Clone, PartialEq)]
pub struct Wanted {
    pub want: Want,
    pub checked_as: IndexRef,
    pub by: IndexRef,
    /// Decided from other items than `by`'s own records: a shop given up, a filter, a key of an
    /// index in scope for another (the stream checks these against the table).
    pub derived: bool,
}

impl Wanted {
    /// The KV operation it sends (`None`: nothing, the key is kept).
    pub fn action(&self) -> Option<KvAction> {
        match &self.want {
            Want::Put(value) => Some(KvAction::Put(value.clone())),
            Want::Delete => Some(KvAction::Delete),
            Want::Keep => None,
        }
    }

    /// The digest of what it puts (`None`: a delete; empty: kept as it was).
    pub fn digest(&self) -> Option<String> {
        match &self.want {
            Want::Put(value) => Some(value.digest()),
            Want::Delete => None,
            Want::Keep => Some(String::new()),
        }
    }

    /// Which want wins a key several indexes decide: an index's own value, then a claimer's
    /// value on a shop given up, then a delete; a key kept loses to any. Of two as strong, the
    /// one decided later (`desired` decides the indexes in the order of their last records:
    /// of two indexes that claim one shop, the one changed last keeps it).
    fn rank(&self) -> u8 {
        match &self.want {
            Want::Put(_) if self.checked_as == self.by => 3,
            Want::Put(_) => 2,
            Want::Delete => 1,
            Want::Keep => 0,
        }
    }
}

/// The keys a scope implies, and how each index's change ends.
#[derive(Debug, Default)]
pub struct Desired {
    pub keys: BTreeMap<KvKey, Wanted>,
    /// Each index's: exported, rejected (its keys as they were), kept for an alias, or failed
    /// (nothing of it decided: retried).
    pub outcomes: BTreeMap<IndexRef, Outcome>,
    /// Override keys whose value Cloudflare would refuse, and why (their records are rejected).
    pub refused: BTreeMap<KvKey, String>,
    /// Remarks for the log.
    pub notes: Vec<(IndexRef, String)>,
}

impl Desired {
    /// The shop keys given a claimer's value, with that claimer.
    pub fn handed(&self) -> impl Iterator<Item = (&KvKey, &IndexRef)> {
        let handed = self.keys.iter().filter(|(_, w)| w.rank() == 2);
        handed.map(|(key, wanted)| (key, &wanted.checked_as))
    }

    fn want(&mut self, key: KvKey, wanted: Wanted) {
        if matches!(wanted.want, Want::Delete) && check_key(&key.key).is_err() {
            return; // Cloudflare never stored such a key: nothing to delete.
        }
        let as_strong = |held: &Wanted| wanted.rank() >= held.rank();
        if self.keys.get(&key).is_none_or(as_strong) {
            self.keys.insert(key, wanted);
        }
    }
}

/// The keys the scope's states imply, and each index's outcome.
pub fn desired(world: &World) -> Desired {
    let mut desired = Desired::default();
    let mut indexes: Vec<_> = world.indexes.iter().collect();
    indexes.sort_by_key(|(_, state)| state.last);
    for (index, state) in indexes {
        let mut plan = IndexPlan {
            index,
            state,
            world,
            keys: Vec::new(),
            notes: Vec::new(),
        };
        // An index that cannot be decided whole writes nothing.
        let decided = plan
            .settings()
            .and_then(|o| plan.overrides(&mut desired).map(|_| o));
        desired
            .notes
            .extend(plan.notes.drain(..).map(|n| (index.clone(), n)));
        let outcome = match decided {
            Ok(outcome) => {
                for (key, wanted) in plan.keys {
                    desired.want(key, wanted);
                }
                outcome
            }
            Err(outcome) => outcome,
        };
        desired.outcomes.insert(index.clone(), outcome);
    }
    desired
}

/// One index's keys, worked out.
struct IndexPlan<'w> {
    index: &'w IndexRef,
    state: &'w IndexState,
    world: &'w World,
    keys: Vec<(KvKey, Wanted)>,
    notes: Vec<String>,
}

impl IndexPlan<'_> {
    fn push(&mut self, key: KvKey, want: Want, checked_as: Option<&IndexRef>, derived: bool) {
        let wanted = Wanted {
            want,
            checked_as: checked_as.unwrap_or(self.index).clone(),
            by: self.index.clone(),
            derived: derived || self.state.because.is_some(),
        };
        self.keys.push((key, wanted));
    }

    /// Its settings keys and the shops it gave up; the index's outcome.
    fn settings(&mut self) -> Result<Outcome, Outcome> {
        let index = self.index;
        let (outcome, kept) = match &self.state.settings {
            None => return Ok(Outcome::Exported),
            Some(Settings::Valid(settings)) => match self.valid(settings) {
                Ok(()) => (Outcome::Exported, false),
                Err(Outcome::Rejected(why)) => (Outcome::Rejected(why), false),
                Err(failed) => return Err(failed),
            },
            // Why is its record's own.
            Some(Settings::Rejected(_)) => (Outcome::Rejected(String::new()), false),
            Some(Settings::Absent) => {
                check_own_key(index)?;
                let referenced_by = self.referrers()?.keeping(index);
                match referenced_by.is_empty() {
                    // Its filter and query configs follow its override records.
                    true => {
                        self.push(KvKey::index(index), Want::Delete, None, false);
                        (Outcome::Exported, false)
                    }
                    false => {
                        self.push(KvKey::index(index), Want::Keep, None, true);
                        (Outcome::Kept { referenced_by }, true)
                    }
                }
            }
        };
        for shop in self.state.given_up() {
            self.give_up(shop, kept)?;
        }
        Ok(outcome)
    }

    /// A valid record's own key and shop key, with its account's API key.
    fn valid(&mut self, settings: &Arc<IndexSettings>) -> Result<(), Outcome> {
        check_own_key(self.index)?;
        if let Some(reason) = settings.shop_id_problem() {
            return Err(Outcome::Rejected(reason));
        }
        let value = Arc::new(settings_value(self.world, settings)?);
        let own = KvKey::index(self.index);
        let shop = settings.shop_id.as_ref().map(KvKey::settings);
        for key in shop.iter().chain([&own]) {
            check_put(&key.key, &value).map_err(Outcome::Rejected)?;
        }
        for key in shop.into_iter().chain([own]) {
            self.push(key, Want::Put(value.clone()), None, false);
        }
        Ok(())
    }

    /// The index gave up `shop`: it takes the value of whoever serves it now ([`serving`]);
    /// with nobody, it is deleted, or kept while the index is removed but `kept` for an alias.
    fn give_up(&mut self, shop: &str, kept: bool) -> Result<(), Outcome> {
        if shop_id_problem(shop).is_some() {
            // Never written as a shop key: it may be another index's key. Left to reconcile.
            let note = format!("old shop id {} is not a shop key: not deleted", shown(shop));
            self.notes.push(note);
            return Ok(());
        }
        let key = KvKey::settings(shop);
        if let Some((claimer, value)) = serving(shop, self.index, self.world)? {
            self.notes.push(format!(
                "shop key `{shop}` now serves index {claimer}, which claims it"
            ));
            self.push(key, Want::Put(Arc::new(value)), Some(&claimer), true);
            return Ok(());
        }
        if kept {
            self.push(key, Want::Keep, None, true);
            return Ok(());
        }
        let claimers = self.referrers()?.by_shop.get(shop).into_iter().flatten();
        if claimers.filter(|c| *c != self.index).count() > 0 {
            let note =
                format!("shop key `{shop}` deleted: no index that claims it can be exported");
            self.notes.push(note);
        }
        self.push(key, Want::Delete, None, true);
        Ok(())
    }

    fn referrers(&self) -> Result<&Referrers, Outcome> {
        (self.world.referrers.as_ref()).map_err(|why| {
            Outcome::Failed(format!(
                "cannot read who aliases what the batch removes or claims what it gives up: {why}"
            ))
        })
    }

    /// Its overrides' query configs and its filter, which follow its override records alone
    /// (docs/contract.md, "Query-override filter").
    fn overrides(&mut self, desired: &mut Desired) -> Result<(), Outcome> {
        let index = self.index;
        for (query, config) in &self.state.queries {
            let key = KvKey::query_config(index, query);
            let Some(config) = config else {
                self.push(key, Want::Delete, None, false);
                continue;
            };
            let text = serde_json::to_string(&config.kv_value()).expect("configs serialize");
            let value = KvValue::query_config(index, query, text);
            match check_put(&key.key, &value) {
                Ok(()) => self.push(key, Want::Put(Arc::new(value)), None, false),
                Err(why) => {
                    desired.refused.insert(key, why);
                }
            }
        }
        let Some(queries) = &self.state.filter else {
            return Ok(());
        };
        // Every record that needs a filter Cloudflare would refuse is rejected.
        let key = filter_key(index);
        let mut refuse = |why: String| {
            let why = format!("its query filter: {why}");
            desired.refused.insert(filter_key(index), why.clone());
            Outcome::Rejected(why)
        };
        check_key(&key.key).map_err(&mut refuse)?;
        let queries = queries.as_ref().map_err(|e| {
            Outcome::Failed(format!(
                "cannot read the overrides of index {index} for its filter: {e}"
            ))
        })?;
        let filter = QueryFilter::build(index, queries.clone());
        if filter.count == 0 {
            self.push(key, Want::Delete, None, true);
            return Ok(());
        }
        let text = serde_json::to_string(&filter).expect("filters serialize");
        let value = KvValue::new(index, text);
        check_put(&key.key, &value).map_err(refuse)?;
        self.push(key, Want::Put(Arc::new(value)), None, true);
        Ok(())
    }
}

/// An index's own key may be written or deleted only when it cannot be a shop's key.
fn check_own_key(index: &IndexRef) -> Result<(), Outcome> {
    // `{account}-{name}` can end with the shop suffix only if the name ends with it, or is a
    // tail of it: anything else needs no key built.
    let name = index.name.as_str();
    if !name.ends_with(SHOP_DOMAIN) && !SHOP_DOMAIN.ends_with(name) {
        return Ok(());
    }
    match index_key_problem(&KvKey::index(index).key) {
        Some(reason) => Err(Outcome::Rejected(reason)),
        None => Ok(()),
    }
}

/// The value under an index's keys, with its account's API key as it was looked up.
fn settings_value(world: &World, settings: &Arc<IndexSettings>) -> Result<KvValue, Outcome> {
    let wanted = settings.account_cell(&world.default_cell);
    let api_key = match world.api_keys.get(&wanted) {
        Some(Ok(key)) => key,
        Some(Err(error)) => return Err(Outcome::of_port_error(error, "")),
        None => return Err(Outcome::Failed("API key was not looked up".into())),
    };
    Ok(KvValue::settings(settings.clone(), api_key.clone()))
}

/// Who serves `shop` once `index` gave it up (the one rule, for every writer and the orphan
/// finder): the first other index, by id, whose record as the table holds it now claims the
/// shop and whose account's API key was found, with its value; `None`: nobody. A claimer that
/// could not be read or looked up is an error: retried, never passed over.
pub fn serving(
    shop: &str,
    index: &IndexRef,
    world: &World,
) -> Result<Option<(IndexRef, KvValue)>, Outcome> {
    let Ok(referrers) = &world.referrers else {
        return Err(Outcome::Failed("who claims the shop was not read".into()));
    };
    let claimers = referrers.by_shop.get(shop).into_iter().flatten();
    let claimers: BTreeSet<&IndexRef> = claimers.filter(|c| *c != index).collect();
    for claimer in claimers {
        let in_scope = world.indexes.get(claimer).and_then(|s| s.settings.as_ref());
        let settings = match (in_scope, world.claimers.get(claimer)) {
            (Some(Settings::Valid(settings)), _) => Some(settings),
            (Some(_), _) => None,
            (None, Some(Ok(settings))) => settings.as_ref(),
            (None, Some(Err(reason))) => {
                let why = format!("index {claimer} claims shop key `{shop}`: its settings could not be read: {reason}");
                return Err(Outcome::Failed(why));
            }
            (None, None) => {
                let why =
                    format!("index {claimer} claims shop key `{shop}`: its settings were not read");
                return Err(Outcome::Failed(why));
            }
        };
        // Its record no longer claims the shop, or is rejected: the next claimer.
        let Some(settings) = settings.filter(|s| s.shop_id.as_deref() == Some(shop)) else {
            continue;
        };
        match settings_value(world, settings) {
            Ok(value) => return Ok(Some((claimer.clone(), value))),
            Err(Outcome::Rejected(_)) => {}
            Err(outcome) => return Err(outcome),
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{ApiKey, IndexRefs};
    use crate::ports::PortError;
    use serde_json::json;

    const SHOP: &str = "s1.myshopify.com";

    fn index(name: &str) -> IndexRef {
        IndexRef::new("a", name)
    }

    /// A valid settings record of `name`, on `shop`, aliasing `target`.
    fn valid(name: &str, shop: Option<&str>, target: Option<&str>) -> Settings {
        let mut item = json!({"pk": {"S": "a"}, "sk": {"S": format!("INDEX#{name}")},
            "index_endpoint": {"S": format!("https://idx/{name}")}});
        if let Some(shop) = shop {
            item["shop_id"] = json!({"S": shop});
        }
        if let Some(target) = target {
            let targets = json!({"L": [{"M": {"index_id": {"S": target}, "weight": {"N": "1"}}}]});
            item["index_aliases"] = json!({"M": {"doc_reads": {"M": {
                "enabled": {"BOOL": true}, "targets": targets}}}});
        }
        let item = crate::dynamo::item_from_dynamodb_json(item).unwrap();
        match crate::dynamo::table_record(&item, "D").0.change {
            Some(crate::domain::Change::UpsertIndex { settings, .. }) => Settings::Valid(settings),
            other => panic!("{other:?}"),
        }
    }

    fn state(settings: Settings, recorded: &[&str]) -> IndexState {
        IndexState {
            settings: Some(settings),
            recorded: IndexRefs {
                shops: recorded.iter().map(|s| s.to_string()).collect(),
                ..IndexRefs::default()
            },
            ..IndexState::default()
        }
    }

    /// A world of these indexes, account `a`'s API key found, who claims and aliases what
    /// as their states say.
    fn world(indexes: Vec<(&str, IndexState)>) -> World {
        let indexes: BTreeMap<IndexRef, IndexState> = (indexes.into_iter())
            .map(|(name, s)| (index(name), s))
            .collect();
        let refs = (indexes.iter()).filter_map(|(i, s)| match &s.settings {
            Some(Settings::Valid(_) | Settings::Rejected(_)) => Some((i.clone(), s.names()?)),
            _ => None,
        });
        let referrers = Referrers::of(refs.collect::<Vec<_>>());
        let cell = crate::domain::AccountCell {
            cell: "default".into(),
            account: "a".into(),
        };
        World {
            indexes,
            referrers: Ok(referrers),
            api_keys: [(cell, Ok(ApiKey::new("key-a")))].into(),
            default_cell: "default".into(),
            ..World::default()
        }
    }

    /// Each key with what it holds: the index whose value it is, `-` deleted, `=` kept.
    fn keys(desired: &Desired) -> Vec<(String, String)> {
        (desired.keys.iter())
            .map(|(key, wanted)| {
                let held = match &wanted.want {
                    Want::Put(value) => value.index().name.clone(),
                    Want::Delete => "-".into(),
                    Want::Keep => "=".into(),
                };
                (key.key.clone(), held)
            })
            .collect()
    }

    fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
        (expected.iter())
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn an_index_is_written_under_its_shop_and_its_id_with_its_account_s_api_key() {
        let decided = desired(&world(vec![(
            "p",
            state(valid("p", Some(SHOP), None), &[]),
        )]));
        assert_eq!(keys(&decided), pairs(&[("a-p", "p"), (SHOP, "p")]));
        let Want::Put(value) = &decided.keys[&KvKey::index(&index("p"))].want else {
            panic!("a put")
        };
        assert!(value.text().contains("key-a"));
        assert!(
            !format!("{decided:?}").contains("key-a"),
            "Debug hides API keys"
        );
        assert_eq!(decided.outcomes[&index("p")], Outcome::Exported);
    }

    /// A shop the ledger records that the record no longer claims goes to the first other
    /// index that claims it, else it is deleted.
    #[test]
    fn a_shop_given_up_goes_to_its_claimer_or_is_deleted() {
        const OLD: &str = "old.myshopify.com";
        let moved = state(valid("p", Some(SHOP), None), &[OLD, SHOP]);
        let alone = desired(&world(vec![("p", moved)]));
        assert_eq!(
            keys(&alone),
            pairs(&[("a-p", "p"), (OLD, "-"), (SHOP, "p")])
        );
        assert!(alone.keys[&KvKey::settings(OLD)].derived);

        let moved = state(valid("p", Some(SHOP), None), &[OLD]);
        let claimer = state(valid("q", Some(OLD), None), &[OLD]);
        let served = desired(&world(vec![("p", moved), ("q", claimer)]));
        assert_eq!(
            keys(&served),
            pairs(&[("a-p", "p"), ("a-q", "q"), (OLD, "q"), (SHOP, "p")])
        );
        assert_eq!(served.handed().count(), 0, "q's own value is no hand-over");
    }

    /// A removed index an alias reads keeps its own key and the shops nobody claims; one
    /// nobody reads loses them. Who aliases it not read: it fails, writing nothing.
    #[test]
    fn a_removal_is_kept_while_an_alias_reads_it() {
        let removed = || state(Settings::Absent, &[SHOP]);
        let reader = state(valid("r", None, Some("a-p")), &[]);
        let kept = desired(&world(vec![("p", removed()), ("r", reader)]));
        assert_eq!(
            keys(&kept),
            pairs(&[("a-p", "="), ("a-r", "r"), (SHOP, "=")])
        );
        let by = vec![index("r")];
        assert_eq!(
            kept.outcomes[&index("p")],
            Outcome::Kept { referenced_by: by }
        );

        let gone = desired(&world(vec![("p", removed())]));
        assert_eq!(keys(&gone), pairs(&[("a-p", "-"), (SHOP, "-")]));

        let mut unread = world(vec![("p", removed())]);
        unread.referrers = Err("ledger down".into());
        let failed = desired(&unread);
        assert!(failed.keys.is_empty());
        assert!(
            matches!(failed.outcomes[&index("p")], Outcome::Failed(ref r) if r.contains("ledger down"))
        );
    }

    /// A rejected record leaves its keys as they are, and gives up what it no longer claims.
    #[test]
    fn a_rejected_record_gives_up_only_what_it_no_longer_claims() {
        let raw = IndexRefs {
            shops: [SHOP.to_string()].into(),
            ..IndexRefs::default()
        };
        let rejected = state(Settings::Rejected(raw), &[SHOP, "old.myshopify.com"]);
        let decided = desired(&world(vec![("p", rejected)]));
        assert_eq!(keys(&decided), pairs(&[("old.myshopify.com", "-")]));
        assert!(matches!(
            decided.outcomes[&index("p")],
            Outcome::Rejected(_)
        ));
    }

    /// The API key decides between reject (none in its cell) and retry (the service down).
    #[test]
    fn api_key_lookups_decide_between_reject_and_retry() {
        for (error, rejected) in [
            (PortError::NotFound("no key".into()), true),
            (PortError::Unavailable("down".into()), false),
        ] {
            let mut w = world(vec![("p", state(valid("p", Some(SHOP), None), &[]))]);
            w.api_keys
                .values_mut()
                .for_each(|key| *key = Err(error.clone()));
            let decided = desired(&w);
            assert!(decided.keys.is_empty());
            let outcome = &decided.outcomes[&index("p")];
            assert_eq!(
                matches!(outcome, Outcome::Rejected(_)),
                rejected,
                "{outcome:?}"
            );
            assert_eq!(
                matches!(outcome, Outcome::Failed(_)),
                !rejected,
                "{outcome:?}"
            );
        }
    }

    #[test]
    fn keys_that_could_be_another_s_are_never_written() {
        // A shop id that is no shop key, and an index key in the form of a shop key.
        let bad_shop = state(valid("p", Some("a-q"), None), &[]);
        let shop_like = state(valid("x.myshopify.com", None, None), &[]);
        let decided = desired(&world(vec![
            ("p", bad_shop),
            ("x.myshopify.com", shop_like),
        ]));
        assert!(decided.keys.is_empty(), "{:?}", keys(&decided));
        for outcome in decided.outcomes.values() {
            assert!(matches!(outcome, Outcome::Rejected(_)), "{outcome:?}");
        }
    }

    /// Query configs and the filter follow the override records; a filter Cloudflare would
    /// refuse rejects the index, writing nothing of it.
    #[test]
    fn overrides_write_their_configs_and_the_filter() {
        let config = |q: &str| {
            let config = crate::domain::settings::Document::from(json!({"boost": 1}));
            Some(crate::domain::QueryConfig {
                index: index("p"),
                query: q.into(),
                config,
            })
        };
        let mut p = IndexState::default();
        p.queries.insert("red".into(), config("red"));
        p.queries.insert("gone".into(), None);
        p.filter = Some(Ok(vec!["red".into()]));
        let decided = desired(&world(vec![("p", p)]));
        let held = |key: KvKey| keys(&decided).into_iter().find(|(k, _)| *k == key.key);
        let p = index("p");
        let red = held(KvKey::query_config(&p, "red")).map(|(_, h)| h);
        let gone = held(KvKey::query_config(&p, "gone")).map(|(_, h)| h);
        let filter = held(filter_key(&p)).map(|(_, h)| h);
        assert_eq!(
            (red, gone, filter),
            (Some("p".into()), Some("-".into()), Some("p".into()))
        );
        assert_eq!(decided.keys.len(), 3);

        // `a-{long}` fits in 512 bytes; `qfilter-a-{long}` does not.
        let long = "p".repeat(505);
        let refused = IndexState {
            filter: Some(Ok(Vec::new())),
            ..IndexState::default()
        };
        let decided = desired(&world(vec![(long.as_str(), refused)]));
        assert!(decided.keys.is_empty());
        assert!(
            matches!(decided.outcomes[&index(&long)], Outcome::Rejected(ref r) if r.contains("query filter"))
        );
    }

    /// Two indexes that claim one shop in one batch: the one changed last keeps it.
    #[test]
    fn of_two_claimers_decided_together_the_one_changed_last_keeps_the_shop() {
        for (first, last) in [("b", "c"), ("c", "b")] {
            let at = |name: &'static str, position| {
                let mut s = state(valid(name, Some(SHOP), None), &[]);
                s.last = Some(position);
                (name, s)
            };
            let (a, b) = (at(first, 0), at(last, 1));
            let decided = desired(&world(vec![a, b]));
            let held = &keys(&decided)[2];
            assert_eq!(held, &(SHOP.to_string(), last.to_string()));
        }
    }
}
