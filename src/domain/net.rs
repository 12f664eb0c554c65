//! The protections the simulation must be shown to need (issue 84, "the net first"): in a
//! test build a simulated run can take one of them out alone (`SIMULATION_NET_OFF=<name>`
//! for a sweep), so that a seed shows it missing (`simulation::NET`). In any other build
//! every protection holds and [`off`] is a constant `false`.

/// One rule of "Concurrent writers" (docs/contract.md) that a writer keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protection {
    /// The check's rounds: what landed read again and written again until it holds.
    CheckRounds,
    /// The stream's shrink only while the index's intents are what it read (plus its own);
    /// taken out of the in-memory ledger, which only tests build.
    #[cfg_attr(not(test), allow(dead_code))]
    ShrinkCondition,
    /// A backfill's page counted as intents before its batch is sent.
    BackfillIntents,
    /// The scheduled reconcile's lease on its pass.
    Lease,
    /// An operator whose writes landed unconfirmed records its intents again.
    RecordAgain,
    /// A removed index an enabled alias reads keeps its keys (the stream and the reconcile).
    AliasSafety,
    /// A sweep mark is ripe only once every invocation under way when it was set has ended.
    SweepWait,
    /// Every writer counts an intent on a marked record, the stream too.
    SweepCounts,
}

#[cfg(test)]
impl Protection {
    pub const ALL: [Protection; 8] = [
        Protection::CheckRounds,
        Protection::ShrinkCondition,
        Protection::BackfillIntents,
        Protection::Lease,
        Protection::RecordAgain,
        Protection::AliasSafety,
        Protection::SweepWait,
        Protection::SweepCounts,
    ];

    /// The protection a name (as `Debug` writes it) names.
    pub fn named(name: &str) -> Option<Protection> {
        Self::ALL.into_iter().find(|p| format!("{p:?}") == name)
    }
}

#[cfg(test)]
thread_local! {
    static OFF: std::cell::Cell<Option<Protection>> = const { std::cell::Cell::new(None) };
}

/// Whether `protection` is taken out on this thread (a simulated run's: [`without`]).
#[cfg(test)]
pub fn off(protection: Protection) -> bool {
    OFF.with(|off| off.get() == Some(protection))
}

/// Runs `f` on this thread with `protection` taken out (none: every one holds).
#[cfg(test)]
pub fn without<T>(protection: Option<Protection>, f: impl FnOnce() -> T) -> T {
    struct Restore;
    impl Drop for Restore {
        fn drop(&mut self) {
            OFF.with(|off| off.set(None));
        }
    }
    OFF.with(|off| off.set(protection));
    let _restore = Restore;
    f()
}

/// Every protection holds outside a test build.
#[cfg(not(test))]
pub const fn off(_: Protection) -> bool {
    false
}
