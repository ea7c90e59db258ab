//! The run's trace: everything the simulation saw, in the order it
//! happened (one thread runs every host, so the order is total). The
//! checkers read it; its hash is the run's fingerprint (same seed, same
//! hash).

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use sha1::{Digest as _, Sha1};

/// One thing that happened, stamped with simulated milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub at_ms: u64,
    pub what: What,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum What {
    /// The fault injector acted ("partition c1 from c2", "crash w2").
    Fault(String),
    /// A (fake) job process started on a worker.
    RunStarted { worker: String, label: String },
    /// A (fake) job process ended.
    RunEnded {
        worker: String,
        label: String,
        exit_code: i32,
    },
    /// Coordinator `node` applied entry `index`; `digest` is the hash of
    /// the command and its answer.
    Applied {
        node: u64,
        index: u64,
        digest: String,
    },
    /// Coordinator `node` was leader in `term`.
    Leader { node: u64, term: u64 },
    /// A client printed a `--json` line.
    ClientLine { client: String, line: String },
    /// A client's build command ended with `code`.
    ClientExited { client: String, code: i32 },
}

/// The shared, append-only trace.
#[derive(Clone, Default)]
pub struct Trace {
    records: Arc<Mutex<Vec<Record>>>,
}

impl Trace {
    /// Appends `what` at the current simulated time.
    pub fn record(&self, what: What) {
        let at_ms = turmoil::sim_elapsed().map_or(0, |d| d.as_millis() as u64);
        self.lock().push(Record { at_ms, what });
    }

    /// Appends `what` at `at_ms` (for records made outside a host).
    pub fn record_at(&self, at_ms: u64, what: What) {
        self.lock().push(Record { at_ms, what });
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Record>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Everything recorded so far.
    pub fn records(&self) -> Vec<Record> {
        self.lock().clone()
    }

    /// SHA-1 over every record, in order: the run's fingerprint.
    pub fn hash(&self) -> String {
        let mut sha = Sha1::new();
        for record in self.lock().iter() {
            sha.update(format!("{record}\n").as_bytes());
        }
        hex::encode(sha.finalize())
    }
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:>8} ", self.at_ms)?;
        match &self.what {
            What::Fault(text) => write!(f, "fault {text}"),
            What::RunStarted { worker, label } => write!(f, "run {label} on {worker}"),
            What::RunEnded {
                worker,
                label,
                exit_code,
            } => write!(f, "ran {label} on {worker}: exit {exit_code}"),
            What::Applied {
                node,
                index,
                digest,
            } => write!(f, "c{node} applied {index} {digest}"),
            What::Leader { node, term } => write!(f, "c{node} leads term {term}"),
            What::ClientLine { client, line } => write!(f, "{client} | {line}"),
            What::ClientExited { client, code } => write!(f, "{client} exited {code}"),
        }
    }
}
