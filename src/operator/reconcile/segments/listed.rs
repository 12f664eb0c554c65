//! Step 1 of a pass: KV against the table. A namespace's listing, page by page, each page's
//! keys classified by the one orphan finder ([`crate::operator::orphans`]): orphans (their table
//! record gone), keys protected by an alias, and foreign keys.

use std::collections::BTreeMap;

use super::{Pass, Position};
use crate::domain::{IndexRef, Namespace};
use crate::operator::orphans::{Found, Orphans};
use crate::operator::reconcile::failed;
use crate::operator::reconcile::NAMESPACES;
use crate::operator::OperatorError;
use crate::ports::{IndexRefs, KvStore as _, ListedKey, Ports};

impl<P: Ports> Pass<'_, P> {
    /// One page of a namespace's listing, compared with the table.
    pub(super) async fn list_page(
        &mut self,
        position: &mut Position,
        size: u32,
    ) -> Result<usize, OperatorError> {
        let (exporter, deadline) = (self.exporter, self.deadline);
        let namespace = NAMESPACES[position.step];
        let cursor = position.cursor.as_deref();
        let page = exporter
            .kv()
            .list_page(namespace, "", cursor, size, deadline);
        let page = page.await.map_err(failed)?;
        self.requests.kv_list += 1;
        let listed = page.keys.len();
        self.compare_listed(namespace, page.keys).await?;
        match page.cursor {
            Some(cursor) => position.cursor = Some(cursor),
            None => {
                position.step += 1;
                position.cursor = None;
            }
        }
        Ok(listed)
    }

    async fn compare_listed(
        &mut self,
        namespace: Namespace,
        keys: Vec<ListedKey>,
    ) -> Result<(), OperatorError> {
        let mut orphans = Orphans::new(self.exporter, self.deadline);
        let found = orphans.classify(namespace, keys, self.account).await;
        self.requests.kv_bulk_get += orphans.bulk_gets;
        let Found { drift, kept_shops } = found.map_err(failed)?;
        self.record_kept_shops(kept_shops).await?;
        self.settle(None, drift).await
    }

    /// A kept index's shop key is recorded for it (a writer whose intent the stream's shrink
    /// took out may have left it): when its alias goes, its removal then finds the key.
    async fn record_kept_shops(
        &mut self,
        shops: Vec<(IndexRef, String)>,
    ) -> Result<(), OperatorError> {
        if shops.is_empty() || !self.request.repair || self.request.dry_run {
            return Ok(());
        }
        let mut refs: BTreeMap<IndexRef, IndexRefs> = BTreeMap::new();
        for (index, shop) in shops {
            refs.entry(index).or_default().shops.insert(shop);
        }
        let lacked = "the ledger lacked shops kept indexes' keys are on: added";
        self.add_lacking_references(refs.into_iter().collect(), lacked)
            .await
    }
}
