//! An index's records kept together across the table's pages (its settings item, then its
//! overrides, in sort key order), so that its filter is built from the records the read itself
//! holds, with no Query per index. The backfill and the reconcile's table step read the table
//! this way. A run goes with its filter from a Query of the table instead when it cannot be held
//! whole: it outgrew [`MAX_HELD`], it may have begun before where the read resumed, or the read
//! must stop before it ends.

use std::collections::HashSet;

use tokio::time::Instant;

use super::reads::IndexRuns;
use super::Exporter;
use crate::domain::{IndexRef, Scope, TableKey, TableSpan};
use crate::pipeline::records::{Change, ChangeRecord};
use crate::ports::{before_deadline, PortError, Ports, SettingsTable as _};

/// Records of one index held at most; past it, the index's filter comes from a Query.
const MAX_HELD: usize = 5_000;
/// Records a page of a stretch read again holds (a 1 MB answer at the table's 1 KB items).
const SPAN_PAGE: i32 = 1_000;

/// Runs that ended, in the table's order.
#[derive(Debug, Default)]
pub struct Closed {
    /// Runs whose filters are built from their own records.
    pub whole: Vec<ChangeRecord>,
    /// Runs (or the rest of them) whose filters come from a Query of the table.
    pub queried: Vec<ChangeRecord>,
    /// The item key of the last record closed: where the next read starts.
    pub at: Option<TableKey>,
    /// The indexes whose settings item the closed runs hold.
    pub settings: HashSet<IndexRef>,
}

impl Closed {
    pub(crate) fn len(&self) -> usize {
        self.whole.len() + self.queried.len()
    }
}

/// What a page's settings records name (rejected ones too: their KV values, written when they
/// were valid, may still route there) is added to the ledger before any of them is sent: where
/// it lacks it (the reconcile's repair), every reference counted as an intent (a backfill's:
/// read nothing, write everything), or not at all (a check's read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddReferences {
    Lacking,
    Counted,
    None,
}

#[derive(Debug, Default)]
pub struct Runs {
    /// The run being read: it may go on in the next page.
    held: Vec<(ChangeRecord, TableKey)>,
    /// The index whose run could not be held whole: the rest of it is queried too.
    querying: Option<IndexRef>,
    /// The read resumed inside the table: its first run may have begun before.
    resumed: bool,
    closed: Closed,
    /// Where the next page begins (`None`: the table's start, or its end once `ended`).
    scan_at: Option<TableKey>,
    ended: bool,
    /// A key whose run, once closed, ends the read (`through`), and whether it closed.
    through: Option<TableKey>,
    passed: bool,
}

impl Runs {
    /// Runs read from `start` (`None`: the table's beginning).
    pub fn new(start: Option<TableKey>) -> Self {
        Self {
            resumed: start.is_some(),
            scan_at: start,
            ..Self::default()
        }
    }

    /// The next page of `scope` read into the runs. What its
    /// settings records name that the ledger lacks is added to it first, as `add` says: the
    /// ledger's own repair, before any of them is sent. Answers how many records it read and
    /// how many references it added.
    pub async fn read<P: Ports>(
        &mut self,
        exporter: &Exporter<P>,
        scope: Scope<'_>,
        size: i32,
        with_overrides: bool,
        add: AddReferences,
        deadline: Instant,
    ) -> Result<(usize, usize), PortError> {
        let page = exporter.table.page(scope, self.scan_at.take(), size);
        let page = before_deadline(deadline, "table page", page).await?;
        let mut added = 0;
        if add != AddReferences::None {
            let counted = add == AddReferences::Counted;
            let adding = exporter.add_references(&page.references, counted, deadline);
            added = adding.await?;
        }
        let read = page.records.len();
        for (key, record) in page.records {
            self.add(record.asked(&key, with_overrides), key);
        }
        self.ended = page.next.is_none();
        self.scan_at = page.next;
        // Without overrides, no index's run goes on past its settings item.
        if self.ended || !with_overrides {
            self.close();
        }
        Ok((read, added))
    }

    /// Runs read from `start` until the run holding `key` closed (`passed`).
    pub fn through(start: Option<TableKey>, key: TableKey) -> Self {
        let through = Some(key);
        Self {
            through,
            ..Self::new(start)
        }
    }

    /// The table was read to its end.
    pub fn ended(&self) -> bool {
        self.ended
    }

    /// The run holding the key the read goes `through` closed.
    pub fn passed(&self) -> bool {
        self.passed
    }

    /// The next record read; a record of another index (or of none) ends the held run.
    pub fn add(&mut self, record: ChangeRecord, key: TableKey) {
        let held = self.held.first().and_then(|(r, _)| r.index.as_ref());
        if record.index.is_none() || record.index.as_ref() != held {
            self.close();
        }
        self.held.push((record, key));
        if self.held.len() > MAX_HELD {
            self.cut();
        }
    }

    /// The held run is over (another index starts, or the table ended).
    pub fn close(&mut self) {
        let Some((first, _)) = self.held.first() else {
            return;
        };
        // The first run after a resume that does not start with its settings record began
        // before it: without that record in hand, its filter comes from a Query.
        let began_before = std::mem::take(&mut self.resumed)
            && !matches!(first.change, Some(Change::UpsertIndex { .. }));
        if began_before {
            self.querying = first.index.clone();
        }
        let queried = first.index.is_some() && first.index == self.querying;
        let held = std::mem::take(&mut self.held);
        for (record, key) in &held {
            self.passed |= Some(key) == self.through.as_ref();
            let index = record.index.as_ref();
            if let Some(index) = index.filter(|index| *key == TableKey::of(index, None)) {
                self.closed.settings.insert(index.clone());
            }
        }
        self.closed.at = held.last().map(|(_, key)| key.clone());
        let records = held.into_iter().map(|(record, _)| record);
        match queried {
            true => self.closed.queried.extend(records),
            false => self.closed.whole.extend(records),
        }
    }

    /// The held run goes as it is, and the rest of its index with its filter from a Query.
    pub fn cut(&mut self) {
        if let Some((first, _)) = self.held.first() {
            self.querying = first.index.clone();
        }
        self.close();
    }

    pub fn holds_any(&self) -> bool {
        !self.held.is_empty()
    }

    /// How many records the closed runs hold.
    pub fn closed(&self) -> usize {
        self.closed.len()
    }

    /// The runs closed so far; the held one stays (where the next read starts is kept).
    pub fn take_closed(&mut self) -> Closed {
        let at = self.closed.at.clone();
        std::mem::replace(
            &mut self.closed,
            Closed {
                at,
                ..Closed::default()
            },
        )
    }
}

impl<P: Ports> Exporter<P> {
    /// The runs a stretch of the table holds whole now, read again as it was read (`Runs`,
    /// from where it began, a thousand items a page) until the run holding `through` closed,
    /// or twice the records the stretch held. An index seen in two runs is in neither: a name
    /// that sorts between its settings item and its overrides (`a!b` between `a` and
    /// `a#QUERY#...`) split it.
    pub(super) async fn span_runs(
        &self,
        span: &TableSpan,
        deadline: Instant,
    ) -> Result<IndexRuns, PortError> {
        let mut runs = Runs::through(span.after.clone(), span.through.clone());
        let (scope, budget) = (Scope::of(span.account.as_deref()), span.records * 2);
        let mut read = 0;
        while !runs.ended() && !runs.passed() && read <= budget {
            let page = runs.read(self, scope, SPAN_PAGE, true, AddReferences::None, deadline);
            read += page.await?.0;
        }
        let (mut whole, mut split) = (IndexRuns::new(), HashSet::new());
        let (mut last, closed) = (None, runs.take_closed());
        for record in closed.whole {
            let Some(index) = record.index.clone() else {
                last = None;
                continue;
            };
            if last.as_ref() != Some(&index) && whole.contains_key(&index) {
                split.insert(index.clone());
            }
            let run = whole.entry(index.clone()).or_default();
            run.0 = closed.settings.contains(&index);
            run.1.push(record);
            last = Some(index);
        }
        whole.retain(|index, _| !split.contains(index));
        Ok(whole)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dynamo::{item_from_dynamodb_json, table_record};
    use serde_json::json;

    /// A table item of index `name` (its settings item, or with `query` one of its overrides)
    /// and its key.
    fn item(name: &str, query: Option<&str>) -> (ChangeRecord, TableKey) {
        let sk = match query {
            None => format!("INDEX#{name}"),
            Some(query) => format!("INDEX#{name}#QUERY#{query}"),
        };
        let mut item = json!({"pk": {"S": "acct"}, "sk": {"S": sk}});
        match query {
            None => item["index_endpoint"] = json!({"S": "https://idx.example"}),
            Some(_) => item["query_config"] = json!({"S": "{}"}),
        }
        let key = TableKey::new("acct", sk);
        let item = table_record(&item_from_dynamodb_json(item).unwrap(), "DEFAULT").0;
        (item.asked(&key, true), key)
    }

    fn index(name: &str) -> (ChangeRecord, TableKey) {
        item(name, None)
    }

    fn over(name: &str, n: usize) -> (ChangeRecord, TableKey) {
        item(name, Some(&format!("q{n:05}")))
    }

    fn read(runs: &mut Runs, records: impl IntoIterator<Item = (ChangeRecord, TableKey)>) {
        for (record, key) in records {
            runs.add(record, key);
        }
    }

    /// Each closed group as index names, in order (a run's records collapsed into one name).
    fn names(records: &[ChangeRecord]) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for record in records {
            let name = record.index.as_ref().map_or("-".into(), |i| i.name.clone());
            if names.last() != Some(&name) {
                names.push(name);
            }
        }
        names
    }

    fn sk(key: &Option<TableKey>) -> String {
        key.as_ref().map_or("-".into(), |key| key.sk().to_owned())
    }

    #[test]
    fn an_index_s_records_stay_together_across_pages_and_close_when_the_next_index_starts() {
        let mut runs = Runs::new(None);
        read(&mut runs, [index("a"), over("a", 1)]);
        // Page end: `a` may go on.
        assert_eq!(runs.closed(), 0);
        read(&mut runs, [over("a", 2), index("b")]);
        assert_eq!(runs.closed(), 3);
        assert!(runs.holds_any());
        let closed = runs.take_closed();
        assert_eq!(names(&closed.whole), ["a"]);
        assert!(closed.queried.is_empty());
        assert_eq!(sk(&closed.at), "INDEX#a#QUERY#q00002");
        // `b` is still held; at the table's end it closes too.
        runs.close();
        let closed = runs.take_closed();
        assert_eq!(
            (names(&closed.whole), sk(&closed.at)),
            (vec!["b".into()], "INDEX#b".into())
        );
    }

    #[test]
    fn a_run_past_max_held_goes_as_it_is_and_the_rest_of_its_index_is_queried() {
        let mut runs = Runs::new(None);
        read(&mut runs, [index("a"), index("big")]);
        read(&mut runs, (1..=MAX_HELD).map(|n| over("big", n)));
        // The settings item and MAX_HELD overrides: one record past the bound.
        assert_eq!(runs.closed(), 1 + MAX_HELD + 1);
        assert!(!runs.holds_any());
        read(&mut runs, [over("big", MAX_HELD + 1), index("c")]);
        runs.close();
        let closed = runs.take_closed();
        assert_eq!(names(&closed.whole), ["a", "c"]);
        assert_eq!(names(&closed.queried), ["big"]);
        assert_eq!(closed.queried.len(), MAX_HELD + 2);
    }

    #[test]
    fn a_read_resumed_inside_a_run_queries_that_run_only() {
        // Resumed after an override of `a`: the rest of `a` lacks its settings item.
        let mut runs = Runs::new(Some(TableKey::of(&IndexRef::new("a", "x"), None)));
        read(
            &mut runs,
            [over("a", 7), over("a", 8), index("b"), over("b", 1)],
        );
        runs.close();
        let closed = runs.take_closed();
        assert_eq!(names(&closed.queried), ["a"]);
        assert_eq!(names(&closed.whole), ["b"]);
    }

    #[test]
    fn a_read_resumed_at_a_run_s_start_or_from_the_table_s_start_holds_it_whole() {
        let mut resumed = Runs::new(Some(TableKey::of(&IndexRef::new("a", "x"), None)));
        read(&mut resumed, [index("b"), over("b", 1)]);
        resumed.close();
        // From the start, overrides without a settings item are a run of their own.
        let mut from_start = Runs::new(None);
        read(&mut from_start, [over("a", 1), index("b")]);
        from_start.close();
        for mut runs in [resumed, from_start] {
            let closed = runs.take_closed();
            assert!(closed.queried.is_empty(), "{:?}", names(&closed.queried));
            assert!(!closed.whole.is_empty());
        }
    }

    #[test]
    fn a_run_cut_before_its_end_is_queried_with_the_rest_of_its_index() {
        let mut runs = Runs::new(None);
        read(&mut runs, [index("a"), over("a", 1)]);
        runs.cut();
        assert!(!runs.holds_any());
        read(&mut runs, [over("a", 2)]);
        runs.close();
        let closed = runs.take_closed();
        assert_eq!(names(&closed.queried), ["a"]);
        assert_eq!(closed.queried.len(), 3);
        assert_eq!(sk(&closed.at), "INDEX#a#QUERY#q00002");
    }

    #[test]
    fn records_without_an_index_close_alone_and_taking_keeps_where_the_read_is() {
        let (mut junk, key) = index("x");
        junk.index = None;
        let mut runs = Runs::new(None);
        read(
            &mut runs,
            [index("a"), (junk.clone(), key.clone()), (junk, key)],
        );
        assert_eq!(runs.closed(), 2);
        let first = runs.take_closed();
        assert_eq!(names(&first.whole), ["a", "-"]);
        // Nothing closed since: the next read still starts after the last record closed.
        let again = runs.take_closed();
        assert_eq!((again.len(), sk(&again.at)), (0, "INDEX#x".into()));
    }
}
