//! The storage layout in motion: [`Model::load`] reads every table back
//! into memory (derived indexes included) after a restart or a snapshot
//! install, and [`Model::flush`] writes exactly the records the applied
//! entry changed, so each log entry is one atomic batch.

use serde::{Deserialize, Serialize};

use crate::records::{Build, BuildHeader, ExecState, Execution, Worker};
use crate::state::Model;
use crate::tables::{
    KEY_CLOCK, ReadTables, StorageError, T_ACTION_RESULTS, T_BLOBS, T_BUILDS, T_DURATIONS,
    T_EVENTS, T_EXECUTIONS, T_HOLDINGS, T_JOBS, T_META, T_OUTPUTS, T_RESULTS, T_WORKERS, Tables,
    blob_key_of_key, build_key, decode, digest_of_key, encode, event_key, holding_key, job_key,
    scan,
};

/// A worker's record (its held artifacts are rows of `holdings`).

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct WorkerRecord {
    addr: String,
    slots: u32,
    ahead: u32,
    last_seen_ms: u64,
    properties: Vec<(String, String)>,
    draining: bool,
}

impl Model {
    /// Rebuilds the model from the column families.
    pub fn load(state: &dyn ReadTables) -> Result<Self, StorageError> {
        let mut model = Model::default();
        if let Some(bytes) = state.get(T_META, KEY_CLOCK)? {
            model.clock_ms = decode("clock", &bytes)?;
        }
        scan(state, T_BUILDS, &[], |k, v| {
            let id = u64::from_be_bytes(
                k.try_into()
                    .map_err(|_| StorageError::Corrupt("build key length".into()))?,
            );
            let header: BuildHeader = decode("build header", v)?;
            model.requests.insert(header.request_id.clone(), id);
            model.builds.insert(
                id,
                Build {
                    header,
                    jobs: Vec::new(),
                },
            );
            Ok(())
        })?;
        for (id, build) in model.builds.iter_mut() {
            scan(state, T_JOBS, &build_key(*id), |_, v| {
                build.jobs.push(decode("build job", v)?);
                Ok(())
            })?;
            assert_eq!(
                build.jobs.len(),
                build.header.job_count as usize,
                "build {id}: stored jobs match its header"
            );
        }
        scan(state, T_EXECUTIONS, &[], |k, v| {
            let key = digest_of_key("execution", k)?;
            let exec: Execution = decode("execution", v)?;
            model.executions.insert(key, exec);
            Ok(())
        })?;
        scan(state, T_RESULTS, &[], |k, v| {
            model
                .results
                .insert(digest_of_key("result", k)?, decode("result", v)?);
            Ok(())
        })?;
        scan(state, T_WORKERS, &[], |k, v| {
            let id = String::from_utf8_lossy(k).into_owned();
            let record: WorkerRecord = decode("worker", v)?;
            model.workers.insert(
                id,
                Worker {
                    addr: record.addr,
                    slots: record.slots,
                    ahead: record.ahead,
                    last_seen_ms: record.last_seen_ms,
                    properties: record.properties,
                    draining: record.draining,
                    ..Worker::default()
                },
            );
            Ok(())
        })?;
        scan(state, T_HOLDINGS, &[], |k, _| {
            let split = k
                .iter()
                .position(|b| *b == 0)
                .ok_or_else(|| StorageError::Corrupt("holding key without separator".into()))?;
            let worker = String::from_utf8_lossy(&k[..split]).into_owned();
            let digest = digest_of_key("holding", &k[split + 1..])?;
            if let Some(w) = model.workers.get_mut(&worker) {
                w.held.insert(digest);
            }
            model.held_by.entry(digest).or_default().insert(&worker);
            Ok(())
        })?;
        scan(state, T_BLOBS, &[], |k, v| {
            model.blobs.insert(blob_key_of_key(k)?, decode("blob", v)?);
            Ok(())
        })?;
        scan(state, T_ACTION_RESULTS, &[], |k, v| {
            let key = decode("action result key", k)?;
            model
                .action_results
                .insert(key, decode("action result", v)?);
            Ok(())
        })?;
        scan(state, T_DURATIONS, &[], |k, v| {
            let key = digest_of_key("expected duration", k)?;
            let record: crate::records::DurationRecord = decode("expected duration", v)?;
            model.durations_by_age.insert((record.last_run_ms, key));
            model.durations.insert(key, record);
            Ok(())
        })?;
        model.load_staged(state)?;
        // Derived indexes.
        model.output_refs = model.derived_output_refs();
        for (key, exec) in &model.executions {
            match &exec.state {
                ExecState::Queued { .. } => {
                    model.queue.insert(exec.rank, *key);
                }
                ExecState::Running {
                    worker_id, token, ..
                } => {
                    model.leases.insert(*token, *key);
                    if let Some(w) = model.workers.get_mut(worker_id) {
                        w.running += 1;
                    }
                    *model.running_by_build.entry(exec.rank.build).or_default() += 1;
                }
                ExecState::Blocked { on } => {
                    assert!(!on.is_empty(), "execution {key} is blocked on something");
                    for dep in on {
                        model.blocked_on.entry(*dep).or_default().insert(*key);
                    }
                }
            }
        }
        for (dep, blocked) in &model.blocked_on {
            assert!(
                model.executions.contains_key(dep),
                "{dep}, which blocks {blocked:?}, is being rebuilt"
            );
        }
        Ok(model)
    }

    /// Writes every record the applied entry changed, and forgets the marks.
    pub fn flush(&mut self, txn: &mut dyn Tables) -> Result<(), StorageError> {
        let dirty = std::mem::take(&mut self.dirty);
        if dirty.clock {
            txn.put(T_META, KEY_CLOCK, &encode("clock", &self.clock_ms)?)?;
        }
        for build_id in dirty.removed_builds {
            txn.delete(T_BUILDS, &build_key(build_id))?;
            for table in [T_JOBS, T_EVENTS] {
                let mut keys = Vec::new();
                scan(txn, table, &build_key(build_id), |k, _| {
                    keys.push(k.to_vec());
                    Ok(())
                })?;
                for key in keys {
                    txn.delete(table, &key)?;
                }
            }
        }
        for build_id in dirty.builds {
            if let Some(build) = self.builds.get(&build_id) {
                txn.put(
                    T_BUILDS,
                    &build_key(build_id),
                    &encode("build header", &build.header)?,
                )?;
            }
        }
        for (build_id, job) in dirty.jobs {
            if let Some(build) = self.builds.get(&build_id) {
                txn.put(
                    T_JOBS,
                    &job_key(build_id, job),
                    &encode("build job", &build.jobs[job as usize])?,
                )?;
            }
        }
        for (build_id, seq, event) in dirty.events {
            if self.builds.contains_key(&build_id) {
                txn.put(
                    T_EVENTS,
                    &event_key(build_id, seq),
                    &encode("build event", &event)?,
                )?;
            }
        }
        for key in dirty.executions {
            match self.executions.get(&key) {
                Some(exec) => txn.put(T_EXECUTIONS, key.as_bytes(), &encode("execution", exec)?)?,
                None => txn.delete(T_EXECUTIONS, key.as_bytes())?,
            }
        }
        for key in dirty.durations {
            match self.durations.get(&key) {
                Some(d) => txn.put(
                    T_DURATIONS,
                    key.as_bytes(),
                    &encode("expected duration", d)?,
                )?,
                None => txn.delete(T_DURATIONS, key.as_bytes())?,
            }
        }
        for key in dirty.results {
            match self.results.get(&key) {
                Some(result) => txn.put(T_RESULTS, key.as_bytes(), &encode("result", result)?)?,
                None => txn.delete(T_RESULTS, key.as_bytes())?,
            }
        }
        for id in dirty.workers {
            match self.workers.get(&id) {
                Some(w) => txn.put(
                    T_WORKERS,
                    id.as_bytes(),
                    &encode(
                        "worker",
                        &WorkerRecord {
                            addr: w.addr.clone(),
                            slots: w.slots,
                            ahead: w.ahead,
                            last_seen_ms: w.last_seen_ms,
                            properties: w.properties.clone(),
                            draining: w.draining,
                        },
                    )?,
                )?,
                None => txn.delete(T_WORKERS, id.as_bytes())?,
            }
        }
        for (worker, digest) in dirty.holdings {
            let key = holding_key(&worker, &digest);
            let held = self
                .workers
                .get(&worker)
                .is_some_and(|w| w.held.contains(&digest));
            if held {
                txn.put(T_HOLDINGS, &key, &[])?;
            } else {
                txn.delete(T_HOLDINGS, &key)?;
            }
        }
        for digest in dirty.blobs {
            match self.blobs.get(&digest) {
                Some(blob) => txn.put(T_BLOBS, digest.hash_bytes(), &encode("blob", blob)?)?,
                None => txn.delete(T_BLOBS, digest.hash_bytes())?,
            }
        }
        for key in dirty.action_results {
            let row = encode("action result key", &key)?;
            match self.action_results.get(&key) {
                Some(record) => {
                    txn.put(T_ACTION_RESULTS, &row, &encode("action result", record)?)?
                }
                None => txn.delete(T_ACTION_RESULTS, &row)?,
            }
        }
        for (id, output) in dirty.new_outputs {
            if self.output_refs.contains_key(&id) {
                txn.put(
                    T_OUTPUTS,
                    &id.to_be_bytes(),
                    &encode("job output", &output)?,
                )?;
            }
        }
        for id in dirty.dropped_outputs {
            txn.delete(T_OUTPUTS, &id.to_be_bytes())?;
        }
        self.flush_staged(txn, dirty.unstaged, dirty.staged_parts)?;
        Ok(())
    }
}
