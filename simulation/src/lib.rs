//! distbuild under turmoil: the real coordinators (RocksDB on a per-host
//! directory), workers (with a fake process runner) and clients (the real
//! client library), on a simulated network that partitions, delays, loses
//! and crashes as one seed decides; then checkers that fail the run when a
//! promise breaks. `SIMULATION.md` describes the fault model and checkers.
//!
//! A seed is run twice: once without faults (the reference: what every
//! build must produce) and once with them.

// Without it tokio's `select!` draws from an unseeded RNG and a seed no
// longer gives one run (`.cargo/config.toml` sets it; an exported RUSTFLAGS
// replaces that setting).
#[cfg(not(tokio_unstable))]
compile_error!("the simulation must be built with --cfg tokio_unstable (see .cargo/config.toml)");

pub mod checkers;
pub mod cluster;
pub mod faults;
pub mod net;
pub mod observe;
pub mod runner;
pub mod trace;
pub mod workload;

use std::time::Instant;

pub use checkers::Violation;
pub use cluster::{RunConfig, RunResult};
pub use distbuild_coordinator::InjectedBugs;

/// The outcome of one seed.
pub struct SeedReport {
    pub seed: u64,
    pub bugs: InjectedBugs,
    /// Every broken promise (empty: the seed passed).
    pub violations: Vec<Violation>,
    /// Fingerprint of the run with faults.
    pub trace_hash: String,
    /// The run with faults, for a closer look.
    pub run: RunResult,
    /// Real seconds both runs took.
    pub seconds: f64,
}

/// Where an injected bug's flag lives in [`InjectedBugs`].
type BugSwitch = fn(&mut InjectedBugs) -> &mut bool;

/// The injected bugs by the name `--bug` takes, each with its switch.
const BUGS: &[(&str, BugSwitch)] = &[
    ("accept-expired-lease-results", |b| {
        &mut b.accept_expired_lease_results
    }),
    ("forget-request-answers", |b| &mut b.forget_request_answers),
    ("leases-timed-by-wall-clock", |b| {
        &mut b.leases_timed_by_wall_clock
    }),
];

/// The names `--bug` accepts.
pub fn bug_names() -> impl Iterator<Item = &'static str> {
    BUGS.iter().map(|(name, _)| *name)
}

/// `bugs` with the injected bug called `name` switched on as well (see
/// [`bug_names`]); `None` for an unknown name.
pub fn with_bug(mut bugs: InjectedBugs, name: &str) -> Option<InjectedBugs> {
    let (_, switch) = BUGS.iter().find(|(known, _)| *known == name)?;
    *switch(&mut bugs) = true;
    Some(bugs)
}

/// The injected bug called `name` alone.
pub fn bug(name: &str) -> Option<InjectedBugs> {
    with_bug(InjectedBugs::default(), name)
}

fn bug_flags(mut bugs: InjectedBugs) -> String {
    BUGS.iter()
        .filter(|(_, switch)| *switch(&mut bugs))
        .map(|(name, _)| format!(" --bug {name}"))
        .collect()
}

/// The command that runs `seed` with `bugs` (in a process of its own).
pub fn replay_command(seed: u64, bugs: InjectedBugs) -> String {
    format!(
        "cargo run -p distbuild-simulation --bin distbuild-sim -- --seed {seed}{}",
        bug_flags(bugs)
    )
}

impl SeedReport {
    /// The command that runs this seed again, the same way.
    pub fn replay_command(&self) -> String {
        replay_command(self.seed, self.bugs)
    }
}

/// Runs `seed` without faults, then with them (and `bugs`), and checks the
/// second run against the first.
pub fn run_seed(seed: u64, bugs: InjectedBugs) -> SeedReport {
    let started = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix(&format!("distbuild-sim-{seed}-"))
        .tempdir()
        .expect("create a temporary directory");
    let reference = cluster::run(
        RunConfig {
            seed,
            faults: false,
            bugs: InjectedBugs::default(),
        },
        &dir.path().join("reference"),
    );
    let run = cluster::run(
        RunConfig {
            seed,
            faults: true,
            bugs,
        },
        &dir.path().join("chaos"),
    );
    let mut violations: Vec<Violation> = checkers::check(&reference, &reference)
        .into_iter()
        .map(|v| Violation {
            checker: v.checker,
            message: format!("(fault-free run) {}", v.message),
        })
        .collect();
    violations.extend(checkers::check(&run, &reference));
    SeedReport {
        seed,
        bugs,
        violations,
        trace_hash: run.trace.hash(),
        run,
        seconds: started.elapsed().as_secs_f64(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_bug_name_switches_its_bug_and_replays_with_its_flag() {
        for name in bug_names() {
            let bugs = bug(name).expect("a known name");
            assert_ne!(bugs, InjectedBugs::default(), "{name} switches something");
            assert_eq!(bug_flags(bugs), format!(" --bug {name}"));
        }
        assert!(bug("no-such-bug").is_none());
    }
}
