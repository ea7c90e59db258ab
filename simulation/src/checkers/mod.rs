//! The checkers: each module holds one promise over a finished run and
//! reports every breach as a named [`Violation`]. See `SIMULATION.md` for
//! what each would catch.

pub mod completion;
pub mod durability;
pub mod events;
pub mod leases;
pub mod ordering;
pub mod raft;
pub mod time;

use std::collections::BTreeMap;
use std::fmt;

use crate::cluster::RunResult;
use crate::observe::Applied;

/// A broken promise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The checker that found it (its module name).
    pub checker: &'static str,
    /// What happened, one line.
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] {}", self.checker, self.message)
    }
}

/// Collects violations of one checker.
pub struct Findings {
    checker: &'static str,
    found: Vec<Violation>,
}

impl Findings {
    pub fn new(checker: &'static str) -> Self {
        Self {
            checker,
            found: Vec::new(),
        }
    }

    pub fn report(&mut self, message: impl Into<String>) {
        // A broken invariant tends to break many times; the first few say it.
        if self.found.len() < 20 {
            self.found.push(Violation {
                checker: self.checker,
                message: message.into(),
            });
        }
    }

    pub fn into_vec(self) -> Vec<Violation> {
        self.found
    }
}

/// Runs every checker over `run`; `reference` is the fault-free run of the
/// same seed (the expected results).
pub fn check(run: &RunResult, reference: &RunResult) -> Vec<Violation> {
    let mut all = Vec::new();
    if let Some(error) = &run.sim_error {
        all.push(Violation {
            checker: "simulation",
            message: format!("the simulation stopped: {error}"),
        });
    }
    all.extend(completion::check(run, reference));
    all.extend(ordering::check(run));
    all.extend(leases::check(run));
    all.extend(durability::check(run));
    all.extend(events::check(run));
    all.extend(raft::check(run));
    all.extend(time::check(run));
    all
}

/// The committed log as the replicas applied it (see
/// [`crate::observe::Observations::committed`]).
pub fn canonical_log(run: &RunResult) -> BTreeMap<u64, Applied> {
    let seen = run.observer.observations();
    seen.committed()
        .into_iter()
        .map(|(index, applied)| (index, applied.clone()))
        .collect()
}

/// The retried requests of a committed log: index -> the earlier index
/// that carried the same request ID. The state machine answers a retry with
/// the first answer and applies nothing (`distbuild_model::requests`),
/// so a retry is no event of its own. (It remembers answers for 15 minutes
/// of leader time, far longer than a simulated run.)
pub fn retries(log: &BTreeMap<u64, Applied>) -> BTreeMap<u64, u64> {
    let mut first: BTreeMap<&str, u64> = BTreeMap::new();
    let mut retries = BTreeMap::new();
    for (index, applied) in log {
        if let Some(id) = &applied.proposal.request_id {
            match first.get(id.as_str()) {
                Some(earlier) => {
                    retries.insert(*index, *earlier);
                }
                None => {
                    first.insert(id, *index);
                }
            }
        }
    }
    retries
}

/// The job label a worker's output names (`ran LABEL`), if any.
pub fn label_of(stdout: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(stdout).ok()?;
    text.strip_prefix("ran ")
        .map(|rest| rest.trim_end().to_string())
}

/// One client's `--json` events, parsed.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    Started,
    Finished {
        id: String,
        exit_code: i64,
        stdout: String,
        error: Option<String>,
        artifact: Option<String>,
    },
    Skipped {
        id: String,
    },
    BuildFinished {
        ok: bool,
    },
    /// A line that is not one of the above.
    Unknown(String),
}

/// Parses a client's `--json` lines.
pub fn client_events(lines: &[String]) -> Vec<ClientEvent> {
    lines
        .iter()
        .map(|line| {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                return ClientEvent::Unknown(line.clone());
            };
            let text = |key: &str| v[key].as_str().map(str::to_string);
            match v["event"].as_str() {
                Some("build_started") => ClientEvent::Started,
                Some("job_finished") => ClientEvent::Finished {
                    id: text("id").unwrap_or_default(),
                    exit_code: v["exit_code"].as_i64().unwrap_or(i64::MIN),
                    stdout: text("stdout").unwrap_or_default(),
                    error: text("error"),
                    artifact: v["artifact"]["digest"].as_str().map(str::to_string),
                },
                Some("job_skipped") => ClientEvent::Skipped {
                    id: text("id").unwrap_or_default(),
                },
                Some("build_finished") => ClientEvent::BuildFinished {
                    ok: v["ok"].as_bool().unwrap_or(false),
                },
                _ => ClientEvent::Unknown(line.clone()),
            }
        })
        .collect()
}

/// What a run exercised, counted from its committed log and trace (to see
/// that faults bit: elections, expiries, refused reports).
pub fn exercised(run: &RunResult) -> String {
    use distbuild_model::{Command, Response};
    let log = canonical_log(run);
    let retried = retries(&log);
    let (mut accepted, mut refused, mut expired, mut revoked) = (0, 0, 0, 0);
    for (index, applied) in &log {
        if retried.contains_key(index) {
            continue;
        }
        match (&applied.proposal.command, &applied.response) {
            (Command::Report { .. }, Response::Reported { accepted: true }) => accepted += 1,
            (Command::Report { .. }, Response::Reported { accepted: false }) => refused += 1,
            (_, Response::Expired { tokens }) => expired += tokens.len(),
            (_, Response::Heartbeat { revoked: r, .. }) => revoked += r.len(),
            _ => {}
        }
    }
    // A command applied at a position past the first of its entry was
    // batched with others (see `distbuild_model::command_index`).
    let per_entry = distbuild_model::MAX_BATCH as u64;
    let entries: std::collections::BTreeSet<u64> = log.keys().map(|i| i / per_entry).collect();
    let batches: std::collections::BTreeSet<u64> = log
        .keys()
        .filter(|i| *i % per_entry != 0)
        .map(|i| i / per_entry)
        .collect();
    let records = run.trace.records();
    let count =
        |f: &dyn Fn(&crate::trace::What) -> bool| records.iter().filter(|r| f(&r.what)).count();
    format!(
        "{} commands ({} retries) in {} entries, {} batched entries, {} terms led, {} faults, {} job runs, reports {accepted} accepted / {refused} refused, {expired} leases expired, {revoked} revoked",
        log.len(),
        retried.len(),
        entries.len(),
        batches.len(),
        run.observer.observations().leaders.len(),
        count(&|w| matches!(w, crate::trace::What::Fault(_))),
        count(&|w| matches!(w, crate::trace::What::RunStarted { .. })),
    )
}
