//! Test support shared by raft-store's tests and benchmark: a type config and
//! a small application whose whole state is a function of its applied index,
//! so any recovered state can be checked against the index it claims.
#![allow(dead_code)]

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use distbuild_raft_store::{Application, ApplyTxn, ReadState, StoreError};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
use serde::{Deserialize, Serialize};

openraft::declare_raft_types!(
    pub TestConfig:
        D = Command,
        R = Response,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TestConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

/// A command of the test application.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Record entry `index`: `kv[index % N_KEYS] = index`, `count += 1`,
    /// `sum += index`, all in one entry.
    Record { index: u64 },
    /// Store an opaque value (for the benchmark and large snapshots).
    Put { key: Vec<u8>, value: Vec<u8> },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// `count` after the command.
    pub count: u64,
}

pub const N_KEYS: u64 = 97;
pub const KV: &str = "kv";
pub const COUNTERS: &str = "counters";

/// The test application.
#[derive(Default)]
pub struct TestApp {
    /// How many times `restore` ran, shared so a test can watch it after the
    /// store moved into openraft.
    pub restores: Arc<AtomicU64>,
}

fn read_u64(state: &impl ReadState, table: &str, key: &[u8]) -> Result<u64, StoreError> {
    Ok(state
        .get(table, key)?
        .map(|v| u64::from_be_bytes(v.as_slice().try_into().expect("8-byte counter")))
        .unwrap_or(0))
}

impl Application<TestConfig> for TestApp {
    const COLUMN_FAMILIES: &'static [&'static str] = &[KV, COUNTERS];

    fn apply(
        &mut self,
        txn: &mut ApplyTxn<'_>,
        _log_id: &LogId<u64>,
        command: &Command,
    ) -> Result<Response, StoreError> {
        match command {
            Command::Record { index } => {
                txn.put(KV, &(index % N_KEYS).to_be_bytes(), &index.to_be_bytes())?;
                let count = read_u64(txn, COUNTERS, b"count")? + 1;
                txn.put(COUNTERS, b"count", &count.to_be_bytes())?;
                let sum = read_u64(txn, COUNTERS, b"sum")? + index;
                txn.put(COUNTERS, b"sum", &sum.to_be_bytes())?;
                Ok(Response { count })
            }
            Command::Put { key, value } => {
                txn.put(KV, key, value)?;
                let count = read_u64(txn, COUNTERS, b"count")? + 1;
                txn.put(COUNTERS, b"count", &count.to_be_bytes())?;
                Ok(Response { count })
            }
        }
    }

    fn empty_response(&self) -> Response {
        Response::default()
    }

    fn restore(
        &mut self,
        _state: &distbuild_raft_store::StateReader<'_>,
    ) -> Result<(), StoreError> {
        self.restores.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Checks that `state` is exactly what applying `Record { index: i }` for
/// every i in 1..=applied produces; names the first difference.
pub fn check_record_state(state: &impl ReadState, applied: u64) -> Result<(), String> {
    let count = read_u64(state, COUNTERS, b"count").map_err(|e| e.to_string())?;
    let sum = read_u64(state, COUNTERS, b"sum").map_err(|e| e.to_string())?;
    if count != applied {
        return Err(format!("count is {count}, applied index is {applied}"));
    }
    if sum != applied * (applied + 1) / 2 {
        return Err(format!(
            "sum is {sum}, expected {} for applied index {applied}",
            applied * (applied + 1) / 2
        ));
    }
    let mut n_keys = 0u64;
    let mut problem = None;
    state
        .for_each_prefix(KV, b"", &mut |key, value| {
            n_keys += 1;
            let key = u64::from_be_bytes(key.try_into().expect("8-byte key"));
            let value = u64::from_be_bytes(value.try_into().expect("8-byte value"));
            // The largest i <= applied with i % N_KEYS == key.
            let expected = applied - ((applied + N_KEYS - key) % N_KEYS);
            if value != expected {
                problem = Some(format!(
                    "kv[{key}] = {value}, expected {expected} at applied {applied}"
                ));
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        })
        .map_err(|e| e.to_string())?;
    if let Some(problem) = problem {
        return Err(problem);
    }
    if n_keys != applied.min(N_KEYS) {
        return Err(format!(
            "{n_keys} keys in kv, expected {}",
            applied.min(N_KEYS)
        ));
    }
    Ok(())
}

/// A log id of `term` (leader node 0) at `index`.
pub fn log_id(term: u64, index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(term, 0), index)
}

/// A `Record` entry for `index` in `term`.
pub fn record_entry(term: u64, index: u64) -> Entry<TestConfig> {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(Command::Record { index }),
    }
}

/// Opens a store in `dir` with the test application.
pub fn open(
    dir: &Path,
) -> Result<
    (
        distbuild_raft_store::LogStore<TestConfig>,
        distbuild_raft_store::StateMachineStore<TestConfig, TestApp>,
    ),
    StoreError,
> {
    distbuild_raft_store::open(dir, TestApp::default())
}
