//! `distbuild`: the one binary users run. Its subcommands (coordinator,
//! worker, build, cluster) arrive with the end-to-end issue; today it only
//! answers `--help` and `--version`.

use clap::Parser;

/// Distributed build execution: a Raft-replicated coordinator schedules a
/// build graph's jobs onto workers, caching results by content.
#[derive(Parser, Debug)]
#[command(name = "distbuild", version, about)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
    println!(
        "distbuild {}: no subcommands yet; see README.md",
        env!("CARGO_PKG_VERSION")
    );
}
