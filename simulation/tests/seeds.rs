//! The simulation in CI: a fixed batch of seeds must keep every promise,
//! one seed must replay exactly, and an injected bug must be caught.
//!
//! `DISTBUILD_SIM_SEEDS=N` changes the batch size (default 50);
//! `DISTBUILD_SIM_SOAK=N` runs N random seeds instead (a long soak).

use std::sync::Mutex;

use distbuild_simulation::{InjectedBugs, SeedReport, bug, run_seed};

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
    )
}

/// Runs `seeds` on two threads (each simulation is single-threaded) until
/// `on_report`, which sees every report, returns false.
fn run_seeds(seeds: Vec<u64>, bugs: InjectedBugs, on_report: impl Fn(&SeedReport) -> bool + Sync) {
    let queue = Mutex::new(Some(seeds.into_iter()));
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| {
                loop {
                    let next = queue
                        .lock()
                        .expect("queue")
                        .as_mut()
                        .and_then(Iterator::next);
                    let Some(seed) = next else { return };
                    if !on_report(&run_seed(seed, bugs)) {
                        *queue.lock().expect("queue") = None;
                    }
                }
            });
        }
    });
}

#[test]
fn every_seed_keeps_every_promise() {
    let seeds: Vec<u64> = match env_u64("DISTBUILD_SIM_SOAK") {
        Some(count) => {
            let start = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_nanos() as u64;
            (0..count)
                .map(|i| start.wrapping_add(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
                .collect()
        }
        None => (0..env_u64("DISTBUILD_SIM_SEEDS").unwrap_or(50)).collect(),
    };
    let failures = Mutex::new(Vec::new());
    run_seeds(seeds, InjectedBugs::default(), |report| {
        eprintln!(
            "seed {}: {} violations, {:.1} s",
            report.seed,
            report.violations.len(),
            report.seconds
        );
        if !report.violations.is_empty() {
            let mut text = format!("seed {} failed:\n", report.seed);
            for violation in &report.violations {
                text.push_str(&format!("  {violation}\n"));
            }
            text.push_str(&format!("  replay: {}\n", report.replay_command()));
            eprint!("{text}");
            failures.lock().expect("failures").push(text);
        }
        true
    });
    let failures = failures.into_inner().expect("failures");
    assert!(
        failures.is_empty(),
        "{} seeds failed:\n{}",
        failures.len(),
        failures.concat()
    );
}

/// The trace hash of one run of `seed`, in a process of its own: the way a
/// failing seed is replayed (`distbuild-sim --seed N`, the line every
/// failure prints). A fresh process, because simulations running on other
/// threads of one process were seen to change a run (see SIMULATION.md,
/// "Known gaps").
fn trace_hash_in_own_process(seed: u64) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_distbuild-sim"))
        .args(["--seed", &seed.to_string()])
        .output()
        .expect("run distbuild-sim");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "seed {seed} failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
        .lines()
        .find_map(|line| {
            let (_, rest) = line.split_once(", trace ")?;
            rest.split(',').next().map(str::to_string)
        })
        .unwrap_or_else(|| panic!("seed {seed}: no trace hash in {stdout}"))
}

#[test]
fn a_seed_replays_exactly() {
    for seed in [3, 11] {
        let hashes: Vec<String> = (0..2).map(|_| trace_hash_in_own_process(seed)).collect();
        assert_eq!(hashes[0], hashes[1], "seed {seed} ran differently twice");
    }
}

/// Each injected bug breaks a promise the `leases` checker holds: results
/// taken from expired leases, and retried requests applied again (a
/// retried report is then refused, not given its first answer).
#[test]
fn each_injected_bug_is_caught_within_twenty_seeds() {
    for name in distbuild_simulation::bug_names() {
        let bugs = bug(name).expect("known bug");
        let caught = Mutex::new(Vec::new());
        run_seeds((0..20).collect(), bugs, |report| {
            let found = report.violations.iter().any(|v| v.checker == "leases");
            if found {
                caught.lock().expect("caught").push(report.seed);
            }
            !found
        });
        let caught = caught.into_inner().expect("caught");
        assert!(
            !caught.is_empty(),
            "no seed of 0..20 caught the injected bug {name}"
        );
        eprintln!("{name}: caught by seed {caught:?}");
    }
}
