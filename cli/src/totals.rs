//! What a long run did over all its invocations: the counts of each answer added up, the keys
//! a reconcile found drifted, and the one summary line.

use std::fmt::Write as _;

use serde_json::Value;

/// Which long run to follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Backfill,
    Reconcile,
}

impl Mode {
    /// What one answer adds to the totals, by name.
    fn counters(self) -> &'static [&'static str] {
        match self {
            Mode::Backfill => &["exported", "skipped", "rejected", "failed"],
            Mode::Reconcile => &[
                "in_sync",
                "missing",
                "stale",
                "orphaned",
                "protected",
                "foreign",
            ],
        }
    }

    pub(crate) fn unit(self) -> &'static str {
        match self {
            Mode::Backfill => "records",
            Mode::Reconcile => "keys",
        }
    }
}

/// What a run did, over all its invocations.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Totals {
    pub counts: Vec<(&'static str, u64)>,
    pub invocations: usize,
    pub written: u64,
    pub deleted: u64,
    /// A dry run: `written` and `deleted` are what it would have done.
    pub dry_run: bool,
    pub complete: bool,
    /// Where to resume, when the run stopped before the end.
    pub continuation_token: Option<String>,
    pub interrupted: bool,
    /// Keys a reconcile found missing, stale or orphaned (the answers' samples, at most
    /// [`DRIFTED_SHOWN`]), each with its class.
    pub drifted: Vec<(String, &'static str)>,
    /// The drift was repaired (`--repair`, not a dry run).
    pub repaired: bool,
}

/// Drifted keys a reconcile prints at most.
pub const DRIFTED_SHOWN: usize = 20;

impl Totals {
    pub fn get(&self, name: &str) -> u64 {
        self.counts
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |(_, v)| *v)
    }

    pub(crate) fn done(&self) -> u64 {
        self.counts.iter().map(|(_, v)| v).sum()
    }

    /// Records failed or rejected: the run did not export everything.
    pub fn has_problems(&self) -> bool {
        self.get("failed") > 0 || self.get("rejected") > 0
    }

    /// Keys a reconcile found missing, stale or orphaned.
    pub fn drift(&self) -> u64 {
        self.get("missing") + self.get("stale") + self.get("orphaned")
    }

    /// Drift found and not repaired: what the exit code of every mode reports.
    pub fn drift_left(&self) -> bool {
        self.drift() > 0 && !self.repaired
    }

    /// The drifted keys found (up to [`DRIFTED_SHOWN`]) and, when left, how to repair them.
    pub fn drift_report(&self, repair_command: &str) -> String {
        let mut out = String::new();
        if self.repaired && !self.drifted.is_empty() {
            let verb = if self.dry_run {
                "would repair"
            } else {
                "repaired"
            };
            let _ = writeln!(
                out,
                "{verb} (written {}, deleted {}):",
                self.written, self.deleted
            );
        }
        for (key, class) in &self.drifted {
            let _ = writeln!(out, "  {class:<8} {key}");
        }
        if self.drift() > self.drifted.len() as u64 {
            let more = self.drift() - self.drifted.len() as u64;
            let _ = writeln!(out, "  ... and {more} more");
        }
        if self.drift_left() {
            let _ = writeln!(out, "repair them with: {repair_command}");
        }
        out
    }

    fn add_drifted(&mut self, answer: &Value) {
        for class in ["missing", "stale", "orphaned"] {
            for ns in ["settings", "query_configs"] {
                let keys = answer["samples"][ns][class]
                    .as_array()
                    .into_iter()
                    .flatten();
                for key in keys.filter_map(Value::as_str) {
                    if self.drifted.len() < DRIFTED_SHOWN {
                        self.drifted.push((key.to_owned(), class));
                    }
                }
            }
        }
    }

    pub(crate) fn add(&mut self, mode: Mode, answer: &Value) {
        for name in mode.counters() {
            let n = match mode {
                // A dry run's answer says what it would export.
                Mode::Backfill if *name == "exported" => ["exported", "would_export"]
                    .iter()
                    .map(|f| answer[f].as_u64().unwrap_or(0))
                    .sum(),
                Mode::Backfill => answer[name].as_u64().unwrap_or(0),
                Mode::Reconcile => ["settings", "query_configs"]
                    .iter()
                    .map(|ns| answer["counts"][ns][name].as_u64().unwrap_or(0))
                    .sum(),
            };
            match self.counts.iter_mut().find(|(c, _)| c == name) {
                Some((_, total)) => *total += n,
                None => self.counts.push((name, n)),
            }
        }
        let changed = |field: &str| {
            ["repaired", "would_repair"]
                .iter()
                .map(|r| answer[r][field].as_u64().unwrap_or(0))
                .sum::<u64>()
        };
        self.written += answer["keys_written"].as_u64().unwrap_or(0)
            + answer["keys_to_write"].as_u64().unwrap_or(0)
            + changed("written");
        self.deleted += changed("deleted");
        self.dry_run |= answer["dry_run"] == Value::Bool(true) || !answer["would_repair"].is_null();
        if mode == Mode::Reconcile {
            self.add_drifted(answer);
            self.repaired |= !answer["repaired"].is_null();
        }
    }

    /// One line: the counts by name, then the writes.
    pub fn summary(&self, mode: Mode) -> String {
        let mut line = format!("{} {}:", self.done(), mode.unit());
        for (name, n) in &self.counts {
            let name = match (*name, self.dry_run) {
                ("exported", true) => "would export",
                (name, _) => name,
            };
            let _ = write!(line, " {name} {n},");
        }
        let (written, deleted) = match self.dry_run {
            true => ("keys to write", "to delete"),
            false => ("keys written", "deleted"),
        };
        let _ = write!(
            line,
            " {written} {}, {deleted} {}; {} invocations",
            self.written, self.deleted, self.invocations
        );
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn totals_add_up_backfill_and_reconcile_answers() {
        let mut backfill = Totals::default();
        for answer in [
            json!({"exported": 3, "skipped": 1, "rejected": 0, "failed": 0, "keys_written": 6}),
            json!({"exported": 2, "skipped": 0, "rejected": 1, "failed": 0, "keys_written": 4}),
        ] {
            backfill.add(Mode::Backfill, &answer);
        }
        assert_eq!(backfill.get("exported"), 5);
        assert_eq!(backfill.written, 10);
        assert!(backfill.has_problems());

        let mut reconcile = Totals::default();
        reconcile.add(
            Mode::Reconcile,
            &json!({"counts": {"settings": {"in_sync": 2, "missing": 1},
                               "query_configs": {"in_sync": 1}},
                    "repaired": {"written": 1, "deleted": 0}}),
        );
        assert_eq!(reconcile.get("in_sync"), 3);
        assert_eq!(reconcile.written, 1);
        assert!(!reconcile.has_problems());
        assert!(reconcile
            .summary(Mode::Reconcile)
            .contains("keys written 1, deleted 0"));
    }

    #[test]
    fn dry_runs_say_what_they_would_do() {
        let mut backfill = Totals::default();
        backfill.add(
            Mode::Backfill,
            &json!({"dry_run": true, "would_export": 1, "keys_to_write": 2}),
        );
        let line = backfill.summary(Mode::Backfill);
        assert!(line.contains("would export 1,"), "{line}");
        assert!(line.contains("keys to write 2, to delete 0"), "{line}");
        let mut reconcile = Totals::default();
        reconcile.add(
            Mode::Reconcile,
            &json!({"counts": {}, "would_repair": {"written": 0, "deleted": 1}}),
        );
        let line = reconcile.summary(Mode::Reconcile);
        assert!(
            line.contains("to delete 1") && !line.contains("deleted"),
            "{line}"
        );
    }
}
