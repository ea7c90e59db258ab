//! Submits in parts. A build's job list can be far bigger than what one
//! Raft append may carry within openraft's deadline (the heartbeat
//! interval), so the leader proposes it as `StageSubmit` parts followed by
//! the `SubmitBuild` that completes it. Parts wait here, keyed by the
//! submit's request ID, until that final command assembles the build from
//! them; a retried submit (at the same or a new leader) stages its parts
//! again, overwriting identical ones.
//!
//! Staging is bounded in bytes: every part names the whole submit's staged
//! size, and a submit is admitted whole when its first part arrives, so the
//! submits in progress never evict each other. When a new one does not fit
//! in [`MAX_STAGED_BYTES`], submits whose parts stopped arriving
//! [`STAGED_ABANDONED_MS`] ago make room (oldest first); otherwise it is
//! refused as busy and the caller retries later.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::log::SubmittedJob;
use crate::records::Staged;
use crate::state::Model;
use crate::tables::{ReadTables, StorageError, T_STAGED, Tables, decode, encode, scan};

/// Bytes (encoded job lists) of the submits staged at once.
pub const MAX_STAGED_BYTES: u64 = 256 << 20;
/// Submits staged at once, whatever their size.
pub const MAX_STAGED_SUBMITS: usize = 1024;
/// A staged submit none of whose parts arrived for this long (the state's
/// clock) was abandoned by its leader: it gives its room to a new one.
pub const STAGED_ABANDONED_MS: u64 = 10 * 60 * 1000;
/// Parts one submit may have.
pub const MAX_SUBMIT_PARTS: u32 = 4096;

/// Why a `StageSubmit` staged nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StageRefusal {
    #[error("submit part {part} is beyond the limit of {MAX_SUBMIT_PARTS} parts")]
    PartOutOfRange { part: u32 },
    #[error("the submit's job list is {bytes} bytes, over the staging limit of {MAX_STAGED_BYTES}")]
    TooBig { bytes: u64 },
    /// Full for now: submits in progress hold the room.
    #[error(
        "staging is full: {submits} submits in progress hold {in_use} of its {MAX_STAGED_BYTES} bytes ({MAX_STAGED_SUBMITS} submits at most); retry later"
    )]
    Full { submits: usize, in_use: u64 },
}

impl StageRefusal {
    /// Whether the same submit may be admitted later, as others complete.
    pub fn is_busy(&self) -> bool {
        matches!(self, StageRefusal::Full { .. })
    }
}

#[derive(Serialize, Deserialize)]
struct StagedPart {
    /// When the latest part of its submit was staged, then.
    last_part_ms: u64,
    /// The whole submit's staged size, as its parts named it.
    reserved_bytes: u64,
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
    /// Stages `jobs` as part `part` of submit `request_id`, whose staged
    /// parts take `total_bytes` in all. Refused (with the reason, nothing
    /// staged) when the part number is out of range or the submit is not
    /// admitted.
    pub(crate) fn stage(
        &mut self,
        request_id: &str,
        part: u32,
        jobs: &[SubmittedJob],
        total_bytes: u64,
    ) -> Result<(), StageRefusal> {
        if part >= MAX_SUBMIT_PARTS {
            return Err(StageRefusal::PartOutOfRange { part });
        }
        if self.requests.contains_key(request_id) {
            // Already submitted: a late retry's part is not needed.
            return Ok(());
        }
        if !self.staged.contains_key(request_id) {
            self.admit_staged(total_bytes)?;
        }
        let now = self.clock_ms;
        let staged = self
            .staged
            .entry(request_id.to_string())
            .or_insert_with(|| Staged {
                last_part_ms: now,
                reserved_bytes: total_bytes,
                parts: BTreeMap::new(),
            });
        staged.last_part_ms = now;
        staged.parts.insert(part, jobs.to_vec());
        self.dirty
            .staged_parts
            .insert((request_id.to_string(), part));
        Ok(())
    }

    /// Makes room for a new submit of `total_bytes`, dropping abandoned
    /// ones (oldest first) if need be; Err if the room is held by submits
    /// in progress.
    fn admit_staged(&mut self, total_bytes: u64) -> Result<(), StageRefusal> {
        if total_bytes > MAX_STAGED_BYTES {
            return Err(StageRefusal::TooBig { bytes: total_bytes });
        }
        loop {
            let in_use: u64 = self.staged.values().map(|s| s.reserved_bytes).sum();
            let submits = self.staged.len();
            if in_use + total_bytes <= MAX_STAGED_BYTES && submits < MAX_STAGED_SUBMITS {
                return Ok(());
            }
            let oldest = self
                .staged
                .iter()
                .min_by_key(|(id, s)| (s.last_part_ms, (*id).clone()))
                .map(|(id, s)| (id.clone(), s.last_part_ms));
            match oldest {
                Some((id, last)) if last.saturating_add(STAGED_ABANDONED_MS) <= self.clock_ms => {
                    self.unstage(&id);
                }
                _ => return Err(StageRefusal::Full { submits, in_use }),
            }
        }
    }

    /// Takes the staged parts `0..parts` of submit `request_id`, in order,
    /// and forgets the submit's staging either way. Err names the first
    /// part missing.
    pub(crate) fn take_staged(
        &mut self,
        request_id: &str,
        parts: u32,
    ) -> Result<Vec<SubmittedJob>, u32> {
        let mut staged = self.unstage(request_id).unwrap_or_default();
        // Moved, not copied: a 100,000-job build's parts are a hundred
        // megabytes decoded.
        let mut jobs = Vec::new();
        for part in 0..parts {
            match staged.parts.remove(&part) {
                Some(part_jobs) => jobs.extend(part_jobs),
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
                last_part_ms: record.last_part_ms,
                reserved_bytes: record.reserved_bytes,
                parts: BTreeMap::new(),
            });
            staged.last_part_ms = staged.last_part_ms.max(record.last_part_ms);
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
                last_part_ms: staged.last_part_ms,
                reserved_bytes: staged.reserved_bytes,
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
