//! Exactly-once commands under retry: every proposal that a caller may
//! retry (a worker whose answer was lost in a failover) carries a request
//! ID, and the state machine remembers the answer it gave to each ID for a
//! while. A retry then gets the first answer instead of applying twice.
//!
//! The table is part of the replicated state (same apply, same snapshot),
//! bounded by count and by age in leader-stamped time, so every replica
//! forgets the same IDs at the same log index. An ID is remembered by its
//! SHA-1 ([`RequestKey`]), not as text: a worker's IDs are some seventy
//! characters, and a build of 100,000 jobs leaves two answers per job.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::ControlFlow;

use distbuild_proto::Digest;
use serde::{Deserialize, Serialize};

use crate::log::{Proposal, Response};
use crate::state::Model;
use crate::tables::{ReadTables, StorageError, T_REQUESTS, Tables};

/// Most answers remembered; the oldest are forgotten first.
pub const MAX_REMEMBERED: usize = 100_000;
/// How long (leader time) an answer is remembered: far longer than any
/// caller retries one call.
pub const REMEMBER_MS: u64 = 15 * 60 * 1000;

/// A request ID as remembered: its SHA-1 (two IDs that differ share it
/// with a chance of 2^-160).
pub type RequestKey = Digest;

/// The key `id` is remembered by.
pub fn request_key(id: &str) -> RequestKey {
    Digest::of(id.as_bytes())
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Remembered {
    at_ms: u64,
    /// The index it was applied at ([`crate::command_index`]): the order
    /// answers are forgotten in.
    index: u64,
    response: Response,
}

/// The remembered answers.
#[derive(Default)]
pub struct Requests {
    by_id: BTreeMap<RequestKey, Remembered>,
    /// (index applied at, ID), oldest first (derived).
    by_age: BTreeSet<(u64, RequestKey)>,
    dirty: BTreeSet<RequestKey>,
    /// Injected bug (simulation only), never persisted: see
    /// [`Requests::inject_forget_answers`].
    forget_answers: bool,
}

impl Requests {
    /// Injected bug, for a simulation to prove its checkers catch it: apply
    /// a retried request again instead of answering it with the first
    /// answer. Never set in production; not persisted.
    pub fn inject_forget_answers(&mut self, on: bool) {
        self.forget_answers = on;
    }

    /// Applies `proposal` to `model` unless its request was applied before,
    /// in which case the first answer is returned and nothing changes.
    pub fn apply(&mut self, model: &mut Model, index: u64, proposal: &Proposal) -> Response {
        let Some(id) = &proposal.request_id else {
            return model.apply(index, &proposal.command);
        };
        let id = request_key(id);
        if let Some(seen) = self.by_id.get(&id)
            && !self.forget_answers
        {
            return seen.response.clone();
        }
        let response = model.apply(index, &proposal.command);
        let at_ms = model.clock_ms();
        let remembered = Remembered {
            at_ms,
            index,
            response: response.clone(),
        };
        if let Some(replaced) = self.by_id.insert(id, remembered) {
            // Only with the injected bug: an ID applied twice.
            self.by_age.remove(&(replaced.index, id));
        }
        self.by_age.insert((index, id));
        self.dirty.insert(id);
        self.forget_old(at_ms);
        response
    }

    fn forget_old(&mut self, now_ms: u64) {
        while let Some(&(_, id)) = self.by_age.first() {
            let too_many = self.by_id.len() > MAX_REMEMBERED;
            let at_ms = self.by_id.get(&id).map_or(0, |seen| seen.at_ms);
            if !too_many && at_ms + REMEMBER_MS > now_ms {
                return;
            }
            self.by_age.pop_first();
            self.by_id.remove(&id);
            self.dirty.insert(id);
        }
    }

    /// The answer given to request `id`, if remembered.
    pub fn answer(&self, id: &str) -> Option<Response> {
        self.by_id
            .get(&request_key(id))
            .map(|seen| seen.response.clone())
    }

    /// How many answers are remembered.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether no answer is remembered.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Writes the changes of the entry just applied.
    pub fn flush(&mut self, txn: &mut dyn Tables) -> Result<(), StorageError> {
        for id in std::mem::take(&mut self.dirty) {
            match self.by_id.get(&id) {
                Some(seen) => {
                    let bytes =
                        postcard::to_stdvec(seen).map_err(|source| StorageError::Encode {
                            what: "remembered answer",
                            source,
                        })?;
                    txn.put(T_REQUESTS, id.as_bytes(), &bytes)?;
                }
                None => txn.delete(T_REQUESTS, id.as_bytes())?,
            }
        }
        Ok(())
    }

    /// Reads the table back after a restart or a snapshot install.
    pub fn load(state: &dyn ReadTables) -> Result<Self, StorageError> {
        let mut requests = Requests::default();
        let mut failure = None;
        state.for_each_prefix(T_REQUESTS, &[], &mut |k, v| match (
            <[u8; 20]>::try_from(k),
            postcard::from_bytes::<Remembered>(v),
        ) {
            (Ok(id), Ok(seen)) => {
                let id = Digest::from_bytes(id);
                requests.by_age.insert((seen.index, id));
                requests.by_id.insert(id, seen);
                ControlFlow::Continue(())
            }
            (Err(_), _) => {
                failure = Some(StorageError::Corrupt(format!(
                    "a remembered answer's key is {} bytes, not a request ID's 20",
                    k.len()
                )));
                ControlFlow::Break(())
            }
            (_, Err(source)) => {
                failure = Some(StorageError::Decode {
                    what: "remembered answer",
                    source,
                });
                ControlFlow::Break(())
            }
        })?;
        failure.map_or(Ok(requests), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::Command;

    /// A command that only moves the state's clock (a heartbeat of an
    /// unknown worker).
    fn tick_at(now_ms: u64) -> Command {
        Command::Heartbeat {
            worker_id: "w0".to_string(),
            tokens: vec![],
            added: vec![],
            dropped: vec![],
            lease_timeout_ms: 1000,
            now_ms,
        }
    }

    #[test]
    fn a_retried_request_gets_the_first_answer_and_applies_once() {
        let mut model = Model::default();
        let mut requests = Requests::default();
        let submit = |id: &str| Proposal {
            request_id: Some(id.to_string()),
            command: Command::SubmitBuild {
                job_timeout_ms: 60_000,
                request_id: format!("submit-{id}"),
                now_ms: 5,
                staged_parts: 0,
                jobs: vec![],
            },
        };
        let first = requests.apply(&mut model, 10, &submit("a"));
        // The same request again, at a later index: same answer, no build.
        let again = requests.apply(&mut model, 11, &submit("a"));
        assert_eq!(first, again);
        assert!(model.build(11).is_none());
        // Another request ID applies.
        let other = requests.apply(&mut model, 12, &submit("b"));
        assert_ne!(first, other);
        assert!(model.build(12).is_some());
    }

    #[test]
    fn answers_are_forgotten_after_the_retention_period_and_beyond_the_bound() {
        let mut model = Model::default();
        let mut requests = Requests::default();
        let with_id = |id: &str, now_ms| Proposal {
            request_id: Some(id.to_string()),
            command: tick_at(now_ms),
        };
        requests.apply(&mut model, 1, &with_id("old", 1_000));
        requests.apply(&mut model, 2, &with_id("new", 1_000 + REMEMBER_MS - 1));
        assert_eq!(requests.len(), 2);
        requests.apply(&mut model, 3, &with_id("newer", 1_000 + REMEMBER_MS));
        assert!(requests.answer("old").is_none());
        assert!(requests.answer("new").is_some());
        for i in 0..MAX_REMEMBERED + 10 {
            requests.apply(
                &mut model,
                4 + i as u64,
                &with_id(&format!("r{i}"), 2 * REMEMBER_MS),
            );
        }
        assert_eq!(requests.len(), MAX_REMEMBERED);
        assert!(requests.answer("r0").is_none());
        assert!(
            requests
                .answer(&format!("r{}", MAX_REMEMBERED + 9))
                .is_some()
        );
    }
}
