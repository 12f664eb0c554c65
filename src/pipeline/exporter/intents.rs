//! Stage 4, the intents: before any KV write, every reference the batch's records leave that
//! the ledger does not record yet is added on both sides (docs/contract.md, "Concurrent
//! writers", rule 3; "References in the ledger").

use std::collections::{BTreeSet, HashMap};

use tokio::time::Instant;

use super::Exporter;
use crate::domain::IndexRef;
use crate::ports::{before_deadline, IndexRefs, Ledger, PortError, Ports, Referred};

impl<P: Ports> Exporter<P> {
    /// Before the KV writes, the intent: every reference the batch's records leave that the
    /// ledger does not record yet (every record's, a superset of what any replay point
    /// leaves) is added on both sides, so a batch that asks who claims a shop or aliases an
    /// index finds a referrer as soon as its keys can land, and a replay finds every shop the
    /// index's keys may be on. Answers what was added, per index.
    pub(super) async fn point_back(
        &self,
        left: &[Option<(IndexRef, IndexRefs)>],
        known: &HashMap<IndexRef, IndexRefs>,
        deadline: Instant,
    ) -> Result<HashMap<IndexRef, BTreeSet<Referred>>, PortError> {
        let mut added: HashMap<IndexRef, BTreeSet<Referred>> = HashMap::new();
        for (index, refs) in left.iter().flatten() {
            let before = known
                .get(index)
                .map(IndexRefs::referred)
                .unwrap_or_default();
            let new = refs.referred().into_iter().filter(|r| !before.contains(r));
            added.entry(index.clone()).or_default().extend(new);
        }
        let items: Vec<(IndexRef, Referred)> = (added.iter())
            .flat_map(|(index, referred)| referred.iter().map(|r| (index.clone(), r.clone())))
            .collect();
        self.add_to_ledger(&items, deadline).await?;
        Ok(added)
    }

    /// Adds these items to the ledger, on both sides (nothing to do for none).
    pub(super) async fn add_to_ledger(
        &self,
        items: &[(IndexRef, Referred)],
        deadline: Instant,
    ) -> Result<(), PortError> {
        if items.is_empty() {
            return Ok(());
        }
        let put = self.ledger.point_back(items);
        before_deadline(deadline, "ledger references", put).await
    }
}
