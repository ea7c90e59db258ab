//! Exactly-once commands under retry: every proposal that a caller may
//! retry (a worker whose answer was lost in a failover) carries a request
//! ID, and the state machine remembers the answer it gave to each ID for a
//! while. A retry then gets the first answer instead of applying twice.
//!
//! The table is part of the replicated state (same apply, same snapshot),
//! bounded by count and by age in leader-stamped time, so every replica
//! forgets the same IDs at the same log index.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::ControlFlow;

use serde::{Deserialize, Serialize};

use crate::log::{Proposal, Response};
use crate::state::Model;
use crate::tables::{ReadTables, StorageError, T_REQUESTS, Tables};

/// Most answers remembered; the oldest are forgotten first.
pub const MAX_REMEMBERED: usize = 100_000;
/// How long (leader time) an answer is remembered: far longer than any
/// caller retries one call.
pub const REMEMBER_MS: u64 = 15 * 60 * 1000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Remembered {
    at_ms: u64,
    response: Response,
}

/// The remembered answers.
#[derive(Default)]
pub struct Requests {
    by_id: BTreeMap<String, Remembered>,
    /// (remembered at, ID), oldest first (derived).
    by_age: BTreeSet<(u64, String)>,
    dirty: BTreeSet<String>,
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
        if let Some(seen) = self.by_id.get(id)
            && !self.forget_answers
        {
            return seen.response.clone();
        }
        let response = model.apply(index, &proposal.command);
        let at_ms = model.clock_ms();
        self.by_id.insert(
            id.clone(),
            Remembered {
                at_ms,
                response: response.clone(),
            },
        );
        self.by_age.insert((at_ms, id.clone()));
        self.dirty.insert(id.clone());
        self.forget_old(at_ms);
        response
    }

    fn forget_old(&mut self, now_ms: u64) {
        while let Some((at_ms, id)) = self.by_age.first().cloned() {
            let too_many = self.by_id.len() > MAX_REMEMBERED;
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
        self.by_id.get(id).map(|seen| seen.response.clone())
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
        state.for_each_prefix(
            T_REQUESTS,
            &[],
            &mut |k, v| match postcard::from_bytes::<Remembered>(v) {
                Ok(seen) => {
                    let id = String::from_utf8_lossy(k).into_owned();
                    requests.by_age.insert((seen.at_ms, id.clone()));
                    requests.by_id.insert(id, seen);
                    ControlFlow::Continue(())
                }
                Err(source) => {
                    failure = Some(StorageError::Decode {
                        what: "remembered answer",
                        source,
                    });
                    ControlFlow::Break(())
                }
            },
        )?;
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
        assert!(!requests.by_id.contains_key("old"));
        assert!(requests.by_id.contains_key("new"));
        for i in 0..MAX_REMEMBERED + 10 {
            requests.apply(
                &mut model,
                4 + i as u64,
                &with_id(&format!("r{i}"), 2 * REMEMBER_MS),
            );
        }
        assert_eq!(requests.len(), MAX_REMEMBERED);
        assert!(!requests.by_id.contains_key("r0"));
        assert!(
            requests
                .by_id
                .contains_key(&format!("r{}", MAX_REMEMBERED + 9))
        );
    }
}
