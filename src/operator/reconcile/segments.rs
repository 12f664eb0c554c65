//! The whole fleet's reconcile with the ledger, in pieces that each fit well inside one
//! invocation, whatever the fleet's size (docs/contract.md, "Reconcile"). A pass goes over
//! everything twice, holding one page at a time:
//! 1. **KV against the ledger.** Each namespace is listed in key order, 1,000 keys a request,
//!    beside the ledger's claims of the same key range. A key whose table record is gone is
//!    orphaned (or protected by an alias); a key the exporter did not write is foreign; where
//!    KV and the claim disagree (a key lost or edited behind the function's back, a write that
//!    failed), the claim stops naming a value.
//! 2. **The table against the ledger.** The table is read page by page (an index's records
//!    kept together), planned as a re-export, and each implied key's digest compared with its
//!    claim. Only a key whose claim does not name the implied value is read from KV: in sync,
//!    missing or stale.
//!
//! So a healthy fleet costs list requests and DynamoDB reads, no KV value reads, and each
//! key is counted once: implied keys by the table step, the others by the listing.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use serde_dynamo::Item;
use tokio::time::Instant;

use super::classify::{live_targets, owner_in_value, Class};
use super::{Answer, Found, ReconcileRequest, Repaired, Requests, NAMESPACES};
use crate::domain::kv::{digest, KeyMetadata};
use crate::domain::qfilter::filter_key;
use crate::domain::{IndexRef, KvAction, KvKey, Namespace};
use crate::operator::{decode_token, encode_token, OperatorError};
use crate::pipeline::exporter::{Exporter, Overrides, Run};
use crate::pipeline::records::{Change, ChangeRecord};
use crate::ports::{ApiKeySource, Claim, KvStore, Ledger, ListedKey, Referred, SettingsTable};
use crate::report::Outcome;

/// Table records compared at once; an index's records are kept together up to [`MAX_HELD`].
const CHUNK_RECORDS: usize = 2_000;
/// Records of one index held at most; past it, its filter comes from a keys-only Query.
const MAX_HELD: usize = 5_000;
const TABLE_PAGE: usize = 1_000;
/// Table Queries (an owner's overrides) in flight at once.
const CONCURRENT_QUERIES: usize = 8;
/// Ledger writes (claims learning or forgetting a digest) in flight at once.
const CONCURRENT_WRITES: usize = 16;
/// The table step.
const TABLE_STEP: usize = NAMESPACES.len();

/// Where a pass goes on: listing namespace `step` (after `after`, from `cursor`), or, at
/// [`TABLE_STEP`], reading the table after `table_at`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Position {
    step: usize,
    #[serde(default)]
    after: Option<String>,
    #[serde(default)]
    cursor: Option<String>,
    #[serde(default)]
    table_at: Option<Item>,
    /// An index (account, name) whose records outgrew [`MAX_HELD`]: its filter comes from a
    /// Query.
    #[serde(default)]
    querying: Option<(String, String)>,
}

pub(super) async fn run<K: KvStore, A: ApiKeySource, T: SettingsTable, L: Ledger>(
    exporter: &Exporter<K, A, T, L>,
    request: &ReconcileRequest,
    deadline: Instant,
) -> Result<Answer, OperatorError> {
    let mut position: Position = match &request.continuation_token {
        Some(token) => decode_token(&token.0)?,
        None => Position::default(),
    };
    // No invocation works past half the time it has: the rest is the next one's.
    let started = Instant::now();
    let stop_at = started + deadline.saturating_duration_since(started) / 2;
    let mut pass = Pass {
        exporter,
        request,
        read_since: exporter.begin_reading().await,
        deadline,
        found: Found::default(),
        requests: Requests::default(),
        repaired: Repaired::default(),
    };
    let (mut slowest, mut checked) = (Duration::from_secs(2), 0);
    let complete = loop {
        if position.step > TABLE_STEP {
            break true;
        }
        let max = request.max_keys.unwrap_or(usize::MAX);
        if checked >= max || Instant::now() + slowest * 2 >= stop_at {
            break false;
        }
        let piece_started = Instant::now();
        checked += match position.step {
            TABLE_STEP => {
                let limit = CHUNK_RECORDS.min(max - checked);
                pass.table_piece(&mut position, limit, stop_at).await?
            }
            _ => pass.list_page(&mut position).await?,
        };
        slowest = slowest.max(piece_started.elapsed());
    };
    Ok(pass.answer(complete, (!complete).then(|| encode_token(&position))))
}

/// One invocation's share of a pass.
struct Pass<'a, K, A, T, L> {
    exporter: &'a Exporter<K, A, T, L>,
    request: &'a ReconcileRequest,
    /// The ledger time taken before anything was read: keys claimed since are left alone.
    read_since: u64,
    deadline: Instant,
    found: Found,
    requests: Requests,
    repaired: Repaired,
}

/// Whether the function could have written a key for this index (metadata and values are
/// input: a name no table item could have would fail the page's reads by key, every pass).
fn could_be_written(index: &IndexRef) -> bool {
    !index.account.is_empty()
        && !index.name.is_empty()
        && crate::domain::kv::check_key(&KvKey::index(index).key).is_ok()
}

/// A listed key with who it was written for and the digest of what it holds.
struct Held {
    key: KvKey,
    owner: Option<IndexRef>,
    digest: String,
}

fn failed(reason: impl std::fmt::Display) -> OperatorError {
    OperatorError::ReconcileFailed {
        reason: reason.to_string(),
    }
}

impl<K: KvStore, A: ApiKeySource, T: SettingsTable, L: Ledger> Pass<'_, K, A, T, L> {
    /// One page of a namespace's listing, compared with the ledger's claims of its range.
    async fn list_page(&mut self, position: &mut Position) -> Result<usize, OperatorError> {
        let (exporter, deadline) = (self.exporter, self.deadline);
        let namespace = NAMESPACES[position.step];
        let (cursor, size) = (position.cursor.as_deref(), self.request.page_size);
        let page = exporter.list_page(namespace, cursor, size, deadline);
        let page = page.await.map_err(failed)?;
        self.requests.kv_list += 1;
        let last = page.keys.last().map(|k| k.name.clone());
        let claims = match (&page.cursor, &last) {
            (Some(_), None) => Vec::new(),
            // The last page's range is open: claims past KV's last key name lost keys too.
            (Some(_), Some(last)) => {
                let after = position.after.as_deref();
                let claims = exporter.claims_between(namespace, after, Some(last), deadline);
                claims.await.map_err(failed)?
            }
            (None, _) => {
                let after = position.after.as_deref();
                let claims = exporter.claims_between(namespace, after, None, deadline);
                claims.await.map_err(failed)?
            }
        };
        let listed = page.keys.len();
        self.compare_listed(namespace, page.keys, claims).await?;
        match page.cursor {
            Some(cursor) => {
                position.after = last;
                position.cursor = Some(cursor);
            }
            None => {
                position.step += 1;
                position.after = None;
                position.cursor = None;
            }
        }
        Ok(listed)
    }

    /// What each listed key holds and for whom: from its metadata, or its value where the
    /// metadata cannot tell (or `deep` asks).
    async fn held(
        &mut self,
        namespace: Namespace,
        keys: Vec<ListedKey>,
    ) -> Result<Vec<Held>, OperatorError> {
        let deep = self.request.deep;
        let listed: Vec<(String, Option<KeyMetadata>)> = (keys.into_iter())
            .map(|k| (k.name, KeyMetadata::ours(k.metadata.as_ref())))
            .collect();
        let unread: Vec<String> = (listed.iter())
            .filter(|(_, meta)| deep || meta.as_ref().and_then(|m| m.index_ref()).is_none())
            .map(|(key, _)| key.clone())
            .collect();
        let mut values = HashMap::new();
        if !unread.is_empty() {
            let read = self.exporter.read_many(namespace, &unread, self.deadline);
            values = read.await.map_err(failed)?;
            self.requests.kv_bulk_get += unread.len().div_ceil(100);
        }
        Ok((listed.into_iter())
            .map(|(key, meta)| {
                let value = values.remove(&key).flatten();
                let owner = (meta.as_ref().and_then(|m| m.index_ref()))
                    .or_else(|| value.as_deref().and_then(owner_in_value))
                    .filter(could_be_written);
                let digest = match (value, meta) {
                    (Some(value), _) => digest(&value),
                    (None, Some(meta)) => meta.digest,
                    (None, None) => String::new(),
                };
                let key = KvKey { namespace, key };
                Held { key, owner, digest }
            })
            .collect())
    }

    async fn compare_listed(
        &mut self,
        namespace: Namespace,
        keys: Vec<ListedKey>,
        claims: Vec<(String, Claim)>,
    ) -> Result<(), OperatorError> {
        let mut claims: HashMap<String, Claim> = claims.into_iter().collect();
        let held = self.held(namespace, keys).await?;
        // A query config's claim names its override's query: checked with a read by key.
        let queries: HashMap<&KvKey, &str> = (held.iter())
            .filter_map(|k| {
                let claim = claims.get(&k.key.key)?;
                let query = claim.query.as_deref().filter(|_| claim.owner == k.owner)?;
                Some((&k.key, query))
            })
            .collect();
        let orphans = self.not_implied(&held, &queries).await?;
        let protected = self.aliased(orphans.values()).await?;
        let (mut deletes, mut forget) = (Vec::new(), Vec::new());
        for key in &held {
            let claim = claims.remove(&key.key.key);
            match (&key.owner, orphans.get(&key.key)) {
                (None, _) => self.found.add(&key.key, Class::Foreign),
                (Some(owner), Some(_)) if protected.contains(owner) => {
                    self.found.add(&key.key, Class::Protected)
                }
                (Some(owner), Some(_)) => {
                    self.found.add(&key.key, Class::Orphaned);
                    deletes.push((key.key.clone(), Some(owner.clone())));
                }
                (Some(_), None) => {}
            }
            // The table step trusts a claim that names a value only if KV holds it.
            if let Some(claim) = claim.filter(|c| c.digest.as_ref() != Some(&key.digest)) {
                if claim.digest.is_some() {
                    forget.push((key.key.clone(), claim.token));
                }
            }
        }
        // Claims naming a value KV does not hold at all: lost behind the function's back.
        for (key, claim) in claims.into_iter().filter(|(_, c)| c.digest.is_some()) {
            forget.push((KvKey { namespace, key }, claim.token));
        }
        let exporter = self.exporter;
        futures::stream::iter(&forget)
            .for_each_concurrent(CONCURRENT_WRITES, |(key, token)| {
                exporter.forget_value(key, token)
            })
            .await;
        self.repair(None, BTreeSet::new(), deletes).await
    }

    /// The listed keys no table record implies any more, with the index each was written for.
    async fn not_implied(
        &mut self,
        held: &[Held],
        queries: &HashMap<&KvKey, &str>,
    ) -> Result<HashMap<KvKey, IndexRef>, OperatorError> {
        let (exporter, deadline) = (self.exporter, self.deadline);
        let owners: BTreeSet<IndexRef> = held.iter().filter_map(|k| k.owner.clone()).collect();
        let owners: Vec<IndexRef> = owners.into_iter().collect();
        let shops = exporter
            .index_shops(&owners, deadline)
            .await
            .map_err(failed)?;
        let config_keys = (held.iter())
            .filter(|k| k.key.namespace == Namespace::QueryConfigs)
            .filter_map(|k| Some((k, k.owner.as_ref().filter(|o| k.key != filter_key(o))?)));
        let (by_query, by_owner): (Vec<_>, Vec<_>) =
            config_keys.partition(|(k, _)| queries.contains_key(&k.key));
        let asked: Vec<(IndexRef, String)> = (by_query.iter())
            .map(|(k, owner)| ((*owner).clone(), queries[&k.key].to_owned()))
            .collect();
        let found = exporter
            .overrides_exist(&asked, deadline)
            .await
            .map_err(failed)?;
        // A key whose claim names no query (written before claims did): its owner's overrides.
        let queried: BTreeSet<&IndexRef> = by_owner.into_iter().map(|(_, owner)| owner).collect();
        let overrides: Vec<Result<(IndexRef, HashSet<String>), _>> = futures::stream::iter(queried)
            .map(|owner| async move {
                let keys = exporter.override_keys(owner, deadline).await?;
                Ok::<_, crate::ports::PortError>((owner.clone(), keys))
            })
            .buffer_unordered(CONCURRENT_QUERIES)
            .collect()
            .await;
        let mut override_keys = HashMap::new();
        for answer in overrides {
            let (owner, keys) = answer.map_err(failed)?;
            override_keys.insert(owner, keys);
        }
        let mut gone = HashMap::new();
        let mut shops_asked = Vec::new();
        for key in held {
            let Some(owner) = &key.owner else { continue };
            let exists = shops.contains_key(owner);
            let implied = match key.key.namespace {
                Namespace::Settings if key.key == KvKey::index(owner) => exists,
                Namespace::Settings => shops.get(owner) == Some(&Some(key.key.key.clone())),
                Namespace::QueryConfigs if key.key == filter_key(owner) => exists,
                Namespace::QueryConfigs => match queries.get(&key.key) {
                    Some(query) => found.contains(&(owner.clone(), (*query).to_owned())),
                    None => (override_keys.get(owner)).is_some_and(|k| k.contains(&key.key.key)),
                },
            };
            if implied {
                continue;
            }
            if key.key.namespace == Namespace::Settings && key.key != KvKey::index(owner) {
                shops_asked.push(key.key.key.clone());
            }
            gone.insert(key.key.clone(), owner.clone());
        }
        // A shop key its writer gave up may be another index's now (the table step writes it).
        for shop in self.claimed_shops(shops_asked).await? {
            gone.remove(&KvKey::settings(shop));
        }
        Ok(gone)
    }

    /// Of these shops, those some index's settings record claims now.
    async fn claimed_shops(&mut self, shops: Vec<String>) -> Result<Vec<String>, OperatorError> {
        if shops.is_empty() {
            return Ok(Vec::new());
        }
        let (exporter, deadline) = (self.exporter, self.deadline);
        let asked = shops.iter().cloned().map(Referred::Shop).collect();
        let references = exporter
            .referrers_of(asked, deadline)
            .await
            .map_err(failed)?;
        let wanted: HashSet<&String> = shops.iter().collect();
        let candidates: Vec<IndexRef> = (references.iter())
            .filter(|r| r.shop_id.as_ref().is_some_and(|s| wanted.contains(s)))
            .map(|r| r.index.clone())
            .collect();
        // The ledger's references may lag the table: the table's records decide.
        let current = exporter.index_shops(&candidates, deadline);
        let current = current.await.map_err(failed)?;
        Ok(current
            .into_values()
            .flatten()
            .filter(|s| wanted.contains(s))
            .collect())
    }

    /// Of these indexes, those an enabled read or analytics alias points at.
    async fn aliased<'i>(
        &mut self,
        indexes: impl Iterator<Item = &'i IndexRef>,
    ) -> Result<HashSet<IndexRef>, OperatorError> {
        let indexes: BTreeSet<&IndexRef> = indexes.collect();
        if indexes.is_empty() {
            return Ok(HashSet::new());
        }
        let asked = indexes.iter().map(|i| Referred::Alias(i.id().0)).collect();
        let references = self.exporter.referrers_of(asked, self.deadline);
        let references = references.await.map_err(failed)?;
        let targets: HashSet<_> = live_targets(&references).collect();
        Ok((indexes.into_iter())
            .filter(|i| targets.contains(&i.id()))
            .cloned()
            .collect())
    }

    /// The table's records after `table_at`, until `limit` records (an index's kept whole) or
    /// the table's end, compared with the ledger.
    async fn table_piece(
        &mut self,
        position: &mut Position,
        limit: usize,
        stop_at: Instant,
    ) -> Result<usize, OperatorError> {
        let querying =
            (position.querying.clone()).map(|(account, name)| IndexRef::new(account, name));
        let mut pieces = Pieces::new(querying);
        let mut scan_at = position.table_at.clone();
        let end = loop {
            let size = TABLE_PAGE.min(limit.max(1)) as i32;
            let page = self
                .exporter
                .table_page(None, scan_at, size, true, self.deadline);
            let page = page.await.map_err(failed)?;
            self.requests.table_pages += 1;
            for (record, key) in page.records.into_iter().zip(page.keys) {
                pieces.add(record, key);
            }
            scan_at = page.next;
            if scan_at.is_none() {
                pieces.close();
                break true;
            }
            if pieces.held.len() > MAX_HELD {
                pieces.outgrown();
            }
            if pieces.closed() >= limit || Instant::now() >= stop_at {
                break false;
            }
        };
        let compared = pieces.closed();
        let Pieces {
            whole,
            queried,
            closed_at,
            querying,
            ..
        } = pieces;
        self.compare_implied(whole, Run::OPERATOR).await?;
        let run = Run {
            overrides: Overrides::InTable,
            ..Run::OPERATOR
        };
        self.compare_implied(queried, run).await?;
        if closed_at.is_some() {
            position.table_at = closed_at;
        }
        position.querying = querying.map(|i| (i.account, i.name));
        if end {
            position.step += 1;
        }
        Ok(compared)
    }

    /// Plans the records as a re-export would and compares each implied key with its claim;
    /// keys whose claim does not name the implied value are read from KV.
    async fn compare_implied(
        &mut self,
        records: Vec<ChangeRecord>,
        run: Run,
    ) -> Result<(), OperatorError> {
        if records.is_empty() {
            return Ok(());
        }
        let (exporter, deadline) = (self.exporter, self.deadline);
        let mut prepared = exporter.prepare(records, run, deadline).await;
        // One cell's outage never stops the fleet's pass: checked next pass.
        prepared.leave_failed_unchecked();
        let mut kept = Vec::new();
        for (record, outcome) in prepared.records.iter().zip(&prepared.plan.outcomes) {
            if matches!(outcome, Outcome::Skipped(_) | Outcome::Rejected(_)) {
                kept.extend(keys_of(record));
            }
        }
        // A key another record of the index implies is compared below, not kept.
        kept.retain(|key| !prepared.plan.ops.contains_key(key));
        self.count_kept(kept).await?;
        let implied: Vec<(KvKey, String, IndexRef)> = (prepared.plan.ops.iter())
            .filter_map(|(key, op)| match &op.action {
                KvAction::Put(value) => Some((key.clone(), value.digest(), value.index().clone())),
                KvAction::Delete => None,
            })
            .collect();
        // Each query config's query, for its claim.
        let queries: HashMap<String, String> = (prepared.records.iter())
            .filter_map(ChangeRecord::query_config)
            .collect();
        let keys: Vec<KvKey> = implied.iter().map(|(k, _, _)| k.clone()).collect();
        let claims = exporter.read_claims(&keys).await.map_err(failed)?;
        let mut suspects = Vec::new();
        for (key, digest, owner) in implied {
            match claims.get(&key) {
                Some(claim) if claim.digest.as_ref() == Some(&digest) => {
                    self.found.add(&key, Class::InSync)
                }
                claim => suspects.push((key, digest, owner, claim.cloned())),
            }
        }
        let in_kv = self.read_suspects(&suspects).await?;
        let contested = self.contested_shops(&suspects, &in_kv).await?;
        let mut confirm = Vec::new();
        let mut to_write = BTreeSet::new();
        for (key, digest, owner, claim) in suspects {
            let class = match in_kv.get(&key) {
                Some(held) if *held == digest => {
                    let query = queries.get(&key.key).cloned();
                    confirm.push((
                        key.clone(),
                        claim.clone(),
                        owner.clone(),
                        query,
                        digest.clone(),
                    ));
                    Class::InSync
                }
                Some(_) if contested.contains(&key) => Class::InSync,
                // No filter says what an empty one says: the index has no overrides.
                None if prepared.plan.empty_filters.contains(&key) => continue,
                None => Class::Missing,
                Some(_) => Class::Stale,
            };
            self.found.add(&key, class);
            if class != Class::InSync {
                to_write.insert(key);
            }
        }
        let since = self.read_since;
        futures::stream::iter(&confirm)
            .for_each_concurrent(CONCURRENT_WRITES, |(key, read, owner, query, digest)| {
                let owner = (owner, query.as_deref());
                exporter.confirm_value(key, read.as_ref(), owner, digest, since)
            })
            .await;
        self.repair(Some(prepared), to_write, Vec::new()).await
    }

    /// The keys of indexes this pass cannot export (rejected, or left unchecked) are kept as
    /// they are: those the ledger says KV holds count as protected.
    async fn count_kept(&mut self, keys: Vec<KvKey>) -> Result<(), OperatorError> {
        if keys.is_empty() {
            return Ok(());
        }
        let claims = self.exporter.read_claims(&keys).await.map_err(failed)?;
        for key in keys {
            if claims.get(&key).is_some_and(|c| c.digest.is_some()) {
                self.found.add(&key, Class::Protected);
            }
        }
        Ok(())
    }

    /// The digest of what KV holds under each suspect key (absent: not there).
    async fn read_suspects(
        &mut self,
        suspects: &[(KvKey, String, IndexRef, Option<Claim>)],
    ) -> Result<HashMap<KvKey, String>, OperatorError> {
        let mut held = HashMap::new();
        for namespace in NAMESPACES {
            let keys: Vec<String> = (suspects.iter())
                .filter(|(k, ..)| k.namespace == namespace)
                .map(|(k, ..)| k.key.clone())
                .collect();
            if keys.is_empty() {
                continue;
            }
            let values = self.exporter.read_many(namespace, &keys, self.deadline);
            let values = values.await.map_err(failed)?;
            self.requests.kv_bulk_get += keys.len().div_ceil(100);
            for (key, value) in values {
                if let Some(value) = value {
                    held.insert(KvKey { namespace, key }, digest(&value));
                }
            }
        }
        Ok(held)
    }

    /// Shop keys that hold, as claimed, the value of another index that claims the shop too:
    /// several indexes claim it, and the one written last keeps it (not drift).
    async fn contested_shops(
        &mut self,
        suspects: &[(KvKey, String, IndexRef, Option<Claim>)],
        in_kv: &HashMap<KvKey, String>,
    ) -> Result<HashSet<KvKey>, OperatorError> {
        let others: Vec<(&KvKey, &IndexRef)> = (suspects.iter())
            .filter(|(key, _, owner, _)| {
                key.namespace == Namespace::Settings && *key != KvKey::index(owner)
            })
            .filter_map(|(key, _, owner, claim)| {
                let claim = claim.as_ref()?;
                let other = claim.owner.as_ref().filter(|o| *o != owner)?;
                (claim.digest.is_some() && claim.digest.as_ref() == in_kv.get(key))
                    .then_some((key, other))
            })
            .collect();
        if others.is_empty() {
            return Ok(HashSet::new());
        }
        let indexes: Vec<IndexRef> = others.iter().map(|(_, o)| (*o).clone()).collect();
        let shops = self.exporter.index_shops(&indexes, self.deadline);
        let shops = shops.await.map_err(failed)?;
        Ok((others.into_iter())
            .filter(|(key, other)| shops.get(*other) == Some(&Some(key.key.clone())))
            .map(|(key, _)| key.clone())
            .collect())
    }

    /// Writes `writes` of the prepared plan and makes `deletes` (or, in a dry run, counts them).
    async fn repair(
        &mut self,
        prepared: Option<crate::pipeline::exporter::Prepared>,
        writes: BTreeSet<KvKey>,
        deletes: Vec<(KvKey, Option<IndexRef>)>,
    ) -> Result<(), OperatorError> {
        if !self.request.repair || writes.len() + deletes.len() == 0 {
            return Ok(());
        }
        if self.request.dry_run {
            self.repaired.written += writes.len();
            self.repaired.deleted += deletes.len();
            return Ok(());
        }
        let (exporter, deadline) = (self.exporter, self.deadline);
        let mut prepared = match prepared {
            Some(prepared) => prepared,
            None => exporter.prepare(Vec::new(), Run::OPERATOR, deadline).await,
        };
        prepared.read_epoch = Some(self.read_since);
        let report = exporter.repair(prepared, &writes, deletes, deadline).await;
        report.log();
        self.requests.kv_repair += report.kv_requests;
        self.repaired.written += report.keys_written;
        self.repaired.deleted += report.keys_deleted;
        self.repaired.left_to_other_writers += report.keys_left;
        match report.records.iter().find_map(|r| match &r.outcome {
            Outcome::Failed(reason) => Some(reason.clone()),
            _ => None,
        }) {
            Some(reason) => Err(failed(format!("repair did not finish: {reason}"))),
            None => Ok(()),
        }
    }

    fn answer(self, complete: bool, continuation_token: Option<String>) -> Answer {
        let request = self.request;
        let repaired = request.repair.then_some(self.repaired);
        Answer {
            mode: "reconcile",
            system_account_id: None,
            repair: request.repair,
            dry_run: request.dry_run,
            deep: request.deep,
            counts: self.found.counts,
            samples: self.found.samples,
            would_repair: repaired
                .as_ref()
                .filter(|_| request.dry_run)
                .map(|r| Repaired {
                    written: r.written,
                    deleted: r.deleted,
                    left_to_other_writers: 0,
                }),
            repaired: repaired.filter(|_| !request.dry_run),
            requests: self.requests,
            complete,
            continuation_token,
        }
    }
}

/// The keys a settings record's index has whatever its values: its own, its filter's, and
/// its shop's when the record could be read.
fn keys_of(record: &ChangeRecord) -> Vec<KvKey> {
    let Some(index) = &record.index else {
        return Vec::new();
    };
    let mut keys = vec![KvKey::index(index), filter_key(index)];
    match &record.decoded {
        Ok(Change::UpsertIndex { settings, .. }) => {
            keys.extend(settings.shop_id.clone().map(KvKey::settings))
        }
        Ok(_) => return Vec::new(),
        Err(_) => {}
    }
    keys
}

/// The table's records as read, gathered into whole runs of one index each.
struct Pieces {
    /// The run being read: it may go on in the next page.
    held: Vec<(ChangeRecord, Item)>,
    /// Closed runs, compared with their filters built from the records themselves.
    whole: Vec<ChangeRecord>,
    /// Runs of the index in `querying`, compared with its filter from a Query.
    queried: Vec<ChangeRecord>,
    querying: Option<IndexRef>,
    /// The key of the last record closed: where the next piece starts.
    closed_at: Option<Item>,
}

impl Pieces {
    fn new(querying: Option<IndexRef>) -> Self {
        Self {
            held: Vec::new(),
            whole: Vec::new(),
            queried: Vec::new(),
            querying,
            closed_at: None,
        }
    }

    fn add(&mut self, record: ChangeRecord, key: Item) {
        let held_index = self.held.first().and_then(|(r, _)| r.index.as_ref());
        if record.index.is_none() || record.index.as_ref() != held_index {
            self.close();
        }
        self.held.push((record, key));
    }

    /// The held run is over (or must go as it is).
    fn close(&mut self) {
        let Some((_, last)) = self.held.last() else {
            return;
        };
        self.closed_at = Some(last.clone());
        let records: Vec<ChangeRecord> = (std::mem::take(&mut self.held).into_iter())
            .map(|(record, _)| record)
            .collect();
        if records
            .first()
            .is_some_and(|r| r.index.is_some() && r.index == self.querying)
        {
            self.queried.extend(records);
        } else {
            self.whole.extend(records);
        }
    }

    /// The held run outgrew [`MAX_HELD`]: it goes now, and the rest of its index's records
    /// go with a filter from a Query.
    fn outgrown(&mut self) {
        self.querying = self.held.first().and_then(|(r, _)| r.index.clone());
        self.close();
    }

    fn closed(&self) -> usize {
        self.whole.len() + self.queried.len()
    }
}
