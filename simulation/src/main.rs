//! `distbuild-sim`: runs simulation seeds and reports what the checkers
//! found. `--seed N` replays one seed (a failing run prints this command);
//! `--seeds N` runs N seeds from `--first`, each in a child process of its
//! own; `--trace` prints a seed's trace.

use std::process::ExitCode;

use clap::Parser;
use distbuild_simulation::{InjectedBugs, bug_names, run_seed, with_bug};

#[derive(Debug, Parser)]
#[command(about = "Run distbuild's deterministic simulation")]
struct Args {
    /// Run this one seed.
    #[arg(long, conflicts_with_all = ["seeds", "first"])]
    seed: Option<u64>,
    /// How many seeds to run (from --first).
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// The first seed of --seeds.
    #[arg(long, default_value_t = 0)]
    first: u64,
    /// Switch on an injected bug (to see the checkers catch it).
    #[arg(long = "bug", value_parser = clap::builder::PossibleValuesParser::new(bug_names()))]
    bugs: Vec<String>,
    /// Print the trace of each seed run.
    #[arg(long)]
    trace: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if std::env::var_os("DISTBUILD_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_env("DISTBUILD_LOG"))
            .with_writer(std::io::stderr)
            .init();
    }
    let mut bugs = InjectedBugs::default();
    for name in &args.bugs {
        bugs = with_bug(bugs, name).expect("clap checked the name");
    }
    let Some(seed) = args.seed else {
        return run_each_in_own_process(&args);
    };
    let report = run_seed(seed, bugs);
    if args.trace {
        for record in report.run.trace.records() {
            println!("{record}");
        }
    }
    println!(
        "seed {seed}: {} violations, trace {}, {:.1} s ({})",
        report.violations.len(),
        report.trace_hash,
        report.seconds,
        distbuild_simulation::checkers::exercised(&report.run)
    );
    if report.violations.is_empty() {
        return ExitCode::SUCCESS;
    }
    for violation in &report.violations {
        println!("  {violation}");
    }
    println!("  replay: {}", report.replay_command());
    ExitCode::FAILURE
}

/// Runs each seed of `--seeds` as `--seed N` in a child process of this
/// binary, one after another: what each prints is exactly what its replay
/// command prints, and a seed that panics stops only its own run.
fn run_each_in_own_process(args: &Args) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("distbuild-sim: cannot find its own executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut failed = 0u64;
    for seed in args.first..args.first.saturating_add(args.seeds) {
        let mut child = std::process::Command::new(&exe);
        child.args(["--seed", &seed.to_string()]);
        for name in &args.bugs {
            child.args(["--bug", name]);
        }
        if args.trace {
            child.arg("--trace");
        }
        match child.status() {
            Ok(status) if status.success() => {}
            Ok(status) => {
                failed += 1;
                if status.code() != Some(1) {
                    // A panic or a signal: the child printed no report.
                    println!("seed {seed}: the run died ({status})");
                }
            }
            Err(e) => {
                eprintln!("distbuild-sim: cannot run seed {seed}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if failed > 0 {
        println!("{failed} of {} seeds failed", args.seeds);
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
