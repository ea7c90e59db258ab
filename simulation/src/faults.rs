//! The fault plan of a seed: what goes wrong during the chaos phase, and
//! when. Every fault starts at a random time and is undone after a random
//! while (or at the heal, whichever comes first): symmetric and one-way
//! partitions (an isolated leader among them), slow and lossy links,
//! coordinator and worker crashes with restarts, workers and clients cut
//! off from the coordinators and reattached, and coordinators' wall clocks
//! jumping an hour forward or back. Every plan also has one straggler: a
//! worker cut off while it holds a lease, just until the lease expires,
//! so that its results arrive late (see [`Fault::Straggle`]).

use rand::Rng;
use rand::rngs::StdRng;

/// How far a clock jump goes, either way.
const HOUR_MS: i64 = 3_600_000;

/// One fault (and, with `undo`, its end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// No traffic between `a` and `b`, either way.
    Partition { a: String, b: String },
    /// No traffic from `from` to `to`; the other way works.
    OneWay { from: String, to: String },
    /// Whoever leads when the fault starts is cut off from every host.
    IsolateLeader,
    /// Every message may take up to `max_ms` to arrive.
    Delay { max_ms: u64 },
    /// Links fail at random (turmoil's fail/repair rates), losing what
    /// is in flight.
    Loss { fail_rate_per_mille: u32 },
    /// The host's software stops (its disk stays) until restarted.
    Crash { host: String },
    /// A worker or client is cut off from every coordinator, then
    /// reattaches (a worker keeps running its jobs meanwhile; a client's
    /// event stream resumes where it broke).
    Disconnect { host: String },
    /// The wall clock of `host` (of whoever leads when the fault starts, if
    /// none) jumps by `by_ms`, until set right at the fault's end.
    ClockJump { host: Option<String>, by_ms: i64 },
    /// At the fault's start (or the first grant after it, until its end),
    /// the worker granted the newest lease is cut off from every
    /// coordinator until one of its leases expires, then reattached at
    /// once. Its jobs finish meanwhile, so
    /// their results arrive just after the expiry, while the jobs wait to
    /// run again or run elsewhere: the moment a coordinator that takes
    /// results from expired leases is caught. Random partitions make that
    /// moment rare (most expiries come long before the results arrive).
    Straggle,
}

/// A fault and its window, in simulated milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub start_ms: u64,
    pub end_ms: u64,
    pub fault: Fault,
}

/// The hosts a plan chooses from.
pub struct Hosts<'a> {
    pub coordinators: &'a [String],
    pub workers: &'a [String],
    pub clients: &'a [String],
}

impl Hosts<'_> {
    pub fn all(&self) -> Vec<String> {
        self.coordinators
            .iter()
            .chain(self.workers)
            .chain(self.clients)
            .cloned()
            .collect()
    }
}

fn one<'a>(rng: &mut StdRng, from: &'a [String]) -> &'a String {
    &from[rng.gen_range(0..from.len())]
}

/// When the straggler is chosen: early, while the first builds run.
const STRAGGLE_START_MS: std::ops::Range<u64> = 100..1_500;
/// How long the straggle waits for a lease to be granted.
const STRAGGLE_WAIT_MS: u64 = 6_000;

/// Between `min` and `max` faults within `0..chaos_ms`, and a straggler,
/// sorted by start.
pub fn plan(
    rng: &mut StdRng,
    hosts: &Hosts<'_>,
    chaos_ms: u64,
    min: usize,
    max: usize,
) -> Vec<Planned> {
    let all = hosts.all();
    let servers: Vec<String> = hosts
        .coordinators
        .iter()
        .chain(hosts.workers)
        .cloned()
        .collect();
    let mut planned = Vec::new();
    for _ in 0..rng.gen_range(min..=max) {
        let start_ms = rng.gen_range(200..chaos_ms.max(201));
        let end_ms = start_ms + rng.gen_range(300..6_000);
        let fault = match rng.gen_range(0..100) {
            0..=14 => {
                let a = one(rng, &servers).clone();
                let b = one(rng, &all).clone();
                if a == b {
                    continue;
                }
                Fault::Partition { a, b }
            }
            15..=24 => {
                let from = one(rng, &servers).clone();
                let to = one(rng, &all).clone();
                if from == to {
                    continue;
                }
                if rng.gen_bool(0.5) {
                    Fault::OneWay { from, to }
                } else {
                    Fault::OneWay { from: to, to: from }
                }
            }
            25..=34 => Fault::IsolateLeader,
            35..=42 => Fault::Delay {
                max_ms: rng.gen_range(20..400),
            },
            43..=49 => Fault::Loss {
                fail_rate_per_mille: rng.gen_range(1..20),
            },
            50..=61 => Fault::Crash {
                host: one(rng, hosts.coordinators).clone(),
            },
            62..=71 => Fault::Crash {
                host: one(rng, hosts.workers).clone(),
            },
            72..=81 => Fault::Disconnect {
                host: one(rng, hosts.workers).clone(),
            },
            82..=89 => Fault::ClockJump {
                host: rng
                    .gen_bool(0.5)
                    .then(|| one(rng, hosts.coordinators).clone()),
                by_ms: if rng.gen_bool(0.5) { HOUR_MS } else { -HOUR_MS },
            },
            _ => Fault::Disconnect {
                host: one(rng, hosts.clients).clone(),
            },
        };
        planned.push(Planned {
            start_ms,
            end_ms,
            fault,
        });
    }
    let start_ms = rng.gen_range(STRAGGLE_START_MS);
    planned.push(Planned {
        start_ms,
        end_ms: start_ms + STRAGGLE_WAIT_MS,
        fault: Fault::Straggle,
    });
    planned.sort_by_key(|p| p.start_ms);
    planned
}
