//! The stream's shrink of the ledger (`Ledger::record_refs`): what its check confirmed an
//! index gave up taken out, on the condition that no other intent came since the batch read.

use std::collections::BTreeMap;

use aws_sdk_dynamodb::types::AttributeValue;

use super::super::{n, update_action, Condition, DynamoLedger, Item};
use super::{index_key, own_sets, ref_pk, referred_pk, REFERRERS_SK, REF_SK};
use crate::domain::IndexRef;
use crate::ports::{PortError, Referred, RefsChange};

impl DynamoLedger {
    /// What each change confirmed the index no longer refers to taken out of its own item
    /// (a removed index's item deleted), then the index taken out of those sets
    /// (an overflowed set's item of its own deleted), then each set left empty deleted: a
    /// reader that finds an index's references finds it in every set (it was added before the
    /// writes). Each step is one transaction per 100 items.
    pub(super) async fn shrink(&self, changes: &[RefsChange]) -> Result<(), PortError> {
        let mut given_up = Vec::with_capacity(changes.len());
        let mut own = Vec::with_capacity(changes.len());
        for change in changes {
            let after = change.after();
            let gone: Vec<&Referred> = (change.pointing.iter())
                .filter(|r| !after.contains(*r))
                .collect();
            let key = Item::key(ref_pk(&change.index), REF_SK);
            own.push(match (&change.new, gone.is_empty()) {
                // Removed: its record goes whole (an intent since keeps it).
                (None, _) => self.delete_action(key, Some(unchanged_intents(change.intents))),
                // Nothing recorded, nothing to take out: an empty record, unless one is there.
                (Some(_), true) => {
                    let absent: Condition = ("attribute_not_exists(pk)".into(), Item::default());
                    self.put_action(key, Some(absent))
                }
                (Some(_), false) => {
                    let sets = own_sets(gone.iter().copied());
                    let (condition, values) = unchanged_intents(change.intents);
                    let delete = self.own_update(&change.index, sets, values);
                    update_action(delete.condition_expression(condition))
                }
            });
            given_up.push((&change.index, gone));
        }
        // An index whose intents changed since the batch read keeps everything (its item and
        // the sets): another writer's intent owns those members.
        let refused = self.transact_all(own).await?;
        let mut gone: BTreeMap<&Referred, Vec<&IndexRef>> = BTreeMap::new();
        for (at, (index, referred)) in given_up.into_iter().enumerate() {
            if refused.contains(&at) {
                continue;
            }
            for referred in referred {
                gone.entry(referred).or_default().push(index);
            }
        }
        let mut actions = Vec::new();
        for (referred, indexes) in &gone {
            let keys = indexes.iter().map(|index| index_key(index)).collect();
            let members = Item::default().with(":gone", AttributeValue::Ss(keys));
            actions.push(update_action(self.set_update(
                referred,
                "DELETE #set :gone",
                members,
            )));
            // Past the set's bound, the index had an item of its own (none: nothing to do).
            actions.extend(indexes.iter().map(|index| {
                let own = Item::key(referred_pk(referred), &index_key(index));
                self.delete_action(own, None)
            }));
        }
        self.transact_all(actions).await?;
        // A set nobody is left in goes, unless it overflowed: its members' own items stay
        // to be found by a Query.
        let empty = "attribute_not_exists(#set) AND attribute_not_exists(overflow)";
        let deletes = gone.keys().map(|referred| {
            let key = Item::key(referred_pk(referred), REFERRERS_SK);
            self.delete_action(key, Some((empty.into(), Item::default())))
        });
        self.transact_all(deletes.collect()).await.map(|_| ())
    }
}

/// The condition that the index's intents are still `intents` (none recorded for 0).
fn unchanged_intents(intents: u64) -> Condition {
    match intents {
        0 => ("attribute_not_exists(intents)".into(), Item::default()),
        _ => (
            "intents = :intents".into(),
            Item::default().with(":intents", n(intents)),
        ),
    }
}
