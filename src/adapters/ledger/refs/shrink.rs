//! The stream's shrink of the ledger (`Ledger::record_refs`): what its check confirmed an
//! index gave up taken out, on the condition that no other intent came since the batch read.

use std::collections::{BTreeMap, BTreeSet};

use aws_sdk_dynamodb::types::{AttributeValue, TransactWriteItem};

use super::super::{n, update_action, Condition, DynamoLedger, Item};
use super::{index_key, own_sets, ref_pk, referred_pk, REFERRERS_SK, REF_SK};
use futures::StreamExt;

use crate::adapters::dynamodb::{CONCURRENT_CALLS, TRANSACT_ACTIONS};
use crate::domain::IndexRef;
use crate::ports::{PortError, Referred, RefsChange};

/// One index's shrink: its own item's action (on its intents), the pairs it gave up, and of
/// those the sets that overflowed (where it may have an item of its own).
struct Shrink {
    index: IndexRef,
    own: TransactWriteItem,
    gone: Vec<Referred>,
    past_bound: Vec<Referred>,
}

impl DynamoLedger {
    /// What each change confirmed the index no longer refers to taken out of its own item
    /// (a removed index's item deleted) and, in the same transaction, the index taken out of
    /// those sets (an overflowed set's item of its own deleted): an intent that comes between
    /// finds both or neither. Then each set left empty is deleted.
    pub(super) async fn shrink(&self, changes: &[RefsChange]) -> Result<(), PortError> {
        let mut shrinks: Vec<Shrink> = changes.iter().map(|c| self.of(c)).collect();
        // Only a set that overflowed holds items of their own, and a set never stops being
        // one: an item of its own made since this read came with an intent, which refuses
        // its index's shrink.
        let gone = shrinks.iter().flat_map(|s| s.gone.iter());
        let sets = self.referrer_sets(gone).await?;
        for shrink in &mut shrinks {
            let overflowed = |r: &&Referred| sets.get(*r).is_some_and(|set| set.overflow);
            shrink.past_bound = shrink.gone.iter().filter(overflowed).cloned().collect();
        }
        let groups = packed(shrinks);
        // At once, as every other batch of transactions: two that share a set conflict, and
        // the SDK sends the refused one again.
        let mut shrunk = futures::stream::iter(groups)
            .map(|together| self.shrink_together(together))
            .buffer_unordered(CONCURRENT_CALLS);
        let mut emptied = BTreeSet::new();
        while let Some(group) = shrunk.next().await {
            emptied.extend(group?);
        }
        // A set nobody is left in goes, unless it overflowed: its members' own items stay
        // to be found by a Query.
        let empty = "attribute_not_exists(#set) AND attribute_not_exists(overflow)";
        let deletes = emptied.iter().map(|referred| {
            let key = Item::key(referred_pk(referred), REFERRERS_SK);
            self.delete_action(key, Some((empty.into(), Item::default())))
        });
        self.transact_all(deletes.collect()).await.map(|_| ())
    }

    fn of(&self, change: &RefsChange) -> Shrink {
        let after = change.after();
        let gone: Vec<Referred> = change.pointing.difference(&after).cloned().collect();
        let key = Item::key(ref_pk(&change.index), REF_SK);
        let own = match (&change.new, gone.is_empty()) {
            // Removed: its record goes whole (an intent since keeps it, and, for the sweep, a
            // mark taken off or set again since).
            (None, _) => {
                let (mut condition, mut values) = unchanged_intents(change.intents);
                if let Some(mark) = change.swept {
                    let swept = " AND swept_intents = :swept AND swept_at = :at";
                    condition = format!("{condition}{swept}").into();
                    values = (values.with(":swept", n(mark.intents))).with(":at", n(mark.at));
                }
                self.delete_action(key, Some((condition, values)))
            }
            // Nothing recorded, nothing to take out: an empty record, unless one is there.
            (Some(_), true) => {
                let absent: Condition = ("attribute_not_exists(pk)".into(), Item::default());
                self.put_action(key, Some(absent))
            }
            (Some(_), false) => {
                let sets = own_sets(gone.iter());
                let (condition, values) = unchanged_intents(change.intents);
                let delete = self.own_update(&change.index, sets, values);
                update_action(delete.condition_expression(condition))
            }
        };
        let index = change.index.clone();
        let past_bound = Vec::new();
        Shrink {
            index,
            own,
            gone,
            past_bound,
        }
    }

    /// One transaction for these indexes: their own items' actions first, then the sets.
    /// An index whose intents changed since the batch read keeps everything (its item and
    /// the sets: another writer's intent owns those members), and the rest are sent again.
    /// Answers the sets the applied ones left.
    async fn shrink_together(&self, mut together: Vec<Shrink>) -> Result<Vec<Referred>, PortError> {
        while !together.is_empty() {
            let mut actions: Vec<_> = together.iter().map(|s| s.own.clone()).collect();
            actions.extend(self.take_out(&together));
            // Only an index giving up more than a transaction holds has its sets sent after.
            let rest = actions.split_off(actions.len().min(TRANSACT_ACTIONS));
            let refused = self.dynamo.transact_once(&self.table_name, actions).await?;
            if refused.is_empty() {
                self.transact_all(rest).await?;
                return Ok(together.into_iter().flat_map(|s| s.gone).collect());
            }
            let mut at = 0..;
            together.retain(|_| !refused.contains(&at.next().expect("endless")));
        }
        Ok(Vec::new())
    }

    /// The indexes taken out of each set they gave up, one action per set, and in a set that
    /// overflowed the index's item of its own deleted (none: nothing to do).
    fn take_out(&self, together: &[Shrink]) -> Vec<TransactWriteItem> {
        let mut gone: BTreeMap<&Referred, Vec<&IndexRef>> = BTreeMap::new();
        for shrink in together {
            for referred in &shrink.gone {
                gone.entry(referred).or_default().push(&shrink.index);
            }
        }
        let mut actions = Vec::new();
        for (referred, indexes) in gone {
            let keys = indexes.iter().map(|index| index_key(index)).collect();
            let members = Item::default().with(":gone", AttributeValue::Ss(keys));
            let delete = self.set_update(referred, "DELETE #set :gone", members);
            actions.push(update_action(delete));
        }
        for shrink in together {
            actions.extend(shrink.past_bound.iter().map(|referred| {
                let own = Item::key(referred_pk(referred), &index_key(&shrink.index));
                self.delete_action(own, None)
            }));
        }
        actions
    }
}

/// The shrinks in groups of at most a transaction's actions each (an index's own action, and
/// for each pair it gave up at most a set's action, and a delete where the set overflowed),
/// one index at least.
fn packed(shrinks: Vec<Shrink>) -> Vec<Vec<Shrink>> {
    let mut groups: Vec<Vec<Shrink>> = Vec::new();
    let mut actions = 0;
    for shrink in shrinks {
        let cost = 1 + shrink.gone.len() + shrink.past_bound.len();
        if groups.is_empty() || actions + cost > TRANSACT_ACTIONS {
            groups.push(Vec::new());
            actions = 0;
        }
        actions += cost;
        groups.last_mut().expect("pushed").push(shrink);
    }
    groups
}

/// The condition that the index's intents are still `intents` (none recorded for 0).
pub(super) fn unchanged_intents(intents: u64) -> Condition {
    match intents {
        0 => ("attribute_not_exists(intents)".into(), Item::default()),
        _ => (
            "intents = :intents".into(),
            Item::default().with(":intents", n(intents)),
        ),
    }
}
