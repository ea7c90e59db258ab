//! Submits in parts. A build's job list can be far bigger than what one
//! Raft append may carry within openraft's deadline (the heartbeat
//! interval), so the leader proposes it as `StageSubmit` parts followed by
//! the `SubmitBuild` that completes it. Parts wait here, keyed by the
//! submit's request ID, until that final command assembles the build from
//! them; a retried submit (at the same or a new leader) stages its parts
//! again, overwriting identical ones. Staged submits are bounded: beyond
//! [`MAX_STAGED_SUBMITS`] the oldest is dropped, and its final command is
//! refused (the client retries the whole submit).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::log::SubmittedJob;
use crate::records::Staged;
use crate::state::Model;
use crate::tables::{ReadTables, StorageError, T_STAGED, Tables, decode, encode, scan};

/// Submits whose parts may wait at once.
pub const MAX_STAGED_SUBMITS: usize = 16;
/// Parts one submit may have.
pub const MAX_SUBMIT_PARTS: u32 = 4096;

/// A `StageSubmit` whose part number is out of range (refused, nothing
/// staged).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("submit part {part} is beyond the limit of {MAX_SUBMIT_PARTS} parts")]
pub struct PartOutOfRange {
    pub part: u32,
}

#[derive(Serialize, Deserialize)]
struct StagedPart {
    since_ms: u64,
    jobs: Vec<SubmittedJob>,
}

fn part_key(request_id: &str, part: u32) -> Vec<u8> {
    let mut key = request_prefix(request_id);
    key.extend_from_slice(&part.to_be_bytes());
    key
}

/// The request ID, length first, so no ID's prefix is another's.
fn request_prefix(request_id: &str) -> Vec<u8> {
    let bytes = request_id.as_bytes();
    let mut key = (bytes.len() as u32).to_be_bytes().to_vec();
    key.extend_from_slice(bytes);
    key
}

impl Model {
    /// Stages `jobs` as part `part` of submit `request_id`. Refused (with
    /// the reason) when the part number is out of range.
    pub(crate) fn stage(
        &mut self,
        request_id: &str,
        part: u32,
        jobs: &[SubmittedJob],
    ) -> Result<(), PartOutOfRange> {
        if part >= MAX_SUBMIT_PARTS {
            return Err(PartOutOfRange { part });
        }
        if self.requests.contains_key(request_id) {
            // Already submitted: a late retry's part is not needed.
            return Ok(());
        }
        if !self.staged.contains_key(request_id) {
            while self.staged.len() >= MAX_STAGED_SUBMITS {
                let oldest = self
                    .staged
                    .iter()
                    .min_by_key(|(id, s)| (s.since_ms, (*id).clone()))
                    .map(|(id, _)| id.clone())
                    .expect("not empty");
                self.unstage(&oldest);
            }
        }
        let since_ms = self.clock_ms;
        let staged = self
            .staged
            .entry(request_id.to_string())
            .or_insert_with(|| Staged {
                since_ms,
                parts: BTreeMap::new(),
            });
        staged.parts.insert(part, jobs.to_vec());
        self.dirty
            .staged_parts
            .insert((request_id.to_string(), part));
        Ok(())
    }

    /// Takes the staged parts `0..parts` of submit `request_id`, in order,
    /// and forgets the submit's staging either way. Err names the first
    /// part missing.
    pub(crate) fn take_staged(
        &mut self,
        request_id: &str,
        parts: u32,
    ) -> Result<Vec<SubmittedJob>, u32> {
        let staged = self.unstage(request_id).unwrap_or_default();
        let mut jobs = Vec::new();
        for part in 0..parts {
            match staged.parts.get(&part) {
                Some(part_jobs) => jobs.extend_from_slice(part_jobs),
                None => return Err(part),
            }
        }
        Ok(jobs)
    }

    /// Forgets submit `request_id`'s staged parts.
    pub(crate) fn unstage(&mut self, request_id: &str) -> Option<Staged> {
        let staged = self.staged.remove(request_id)?;
        self.dirty.unstaged.push(request_id.to_string());
        Some(staged)
    }

    /// How many submits have parts staged.
    pub fn staged_submits(&self) -> usize {
        self.staged.len()
    }

    pub(crate) fn load_staged(&mut self, state: &dyn ReadTables) -> Result<(), StorageError> {
        scan(state, T_STAGED, &[], |k, v| {
            let bad = || StorageError::Corrupt("staged part key".into());
            let len = k
                .get(..4)
                .map(|b| u32::from_be_bytes(b.try_into().expect("4 bytes")) as usize)
                .ok_or_else(bad)?;
            if k.len() != 4 + len + 4 {
                return Err(bad());
            }
            let request_id = String::from_utf8_lossy(&k[4..4 + len]).into_owned();
            let part = u32::from_be_bytes(k[4 + len..].try_into().expect("4 bytes"));
            let record: StagedPart = decode("staged part", v)?;
            let staged = self.staged.entry(request_id).or_insert_with(|| Staged {
                since_ms: record.since_ms,
                parts: BTreeMap::new(),
            });
            staged.since_ms = staged.since_ms.min(record.since_ms);
            staged.parts.insert(part, record.jobs);
            Ok(())
        })
    }

    pub(crate) fn flush_staged(
        &self,
        txn: &mut dyn Tables,
        unstaged: Vec<String>,
        parts: std::collections::BTreeSet<(String, u32)>,
    ) -> Result<(), StorageError> {
        for request_id in unstaged {
            let mut keys = Vec::new();
            scan(txn, T_STAGED, &request_prefix(&request_id), |k, _| {
                keys.push(k.to_vec());
                Ok(())
            })?;
            for key in keys {
                txn.delete(T_STAGED, &key)?;
            }
        }
        for (request_id, part) in parts {
            let Some(staged) = self.staged.get(&request_id) else {
                continue;
            };
            let Some(jobs) = staged.parts.get(&part) else {
                continue;
            };
            let record = StagedPart {
                since_ms: staged.since_ms,
                jobs: jobs.clone(),
            };
            txn.put(
                T_STAGED,
                &part_key(&request_id, part),
                &encode("staged part", &record)?,
            )?;
        }
        Ok(())
    }
}
