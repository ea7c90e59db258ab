//! The scheduling policy: which queued executions a polling worker gets.
//!
//! Builds share the slots: each free slot goes to the build with the
//! fewest executions leased now (the older build among equals), so a
//! build of ten jobs is not starved by one of 100,000 queued before it.
//! Within a build the longest expected path to the build's end goes
//! first (critical path, weighted by `durations`), ties by the build's
//! own order. Locality can hold an execution back for a while (see
//! [`Model::pick_for`]). A worker is given leases beyond its slots (its
//! `ahead`, started there as its slots free) only while no other live
//! worker has a free slot: a job held ahead waits for that worker, and
//! must not while another could start it now.

use std::collections::{BTreeMap, BTreeSet, btree_set};

use distbuild_proto::Digest;

use crate::records::{ExecState, Execution, Worker};
use crate::state::Model;

/// Queued executions one poll looks at per build, at most (those passed
/// over for locality or platform count too), so that a poll costs the
/// same however long the queue is.
pub const MAX_SCANNED_PER_BUILD: usize = 256;

/// The clock and the waits a pick goes by.
struct PickTime {
    now_ms: u64,
    locality_wait_ms: u64,
    alive_ms: u64,
}

/// One build's queued executions, as a poll walks them.
struct Lane<'a> {
    build: u64,
    running: u32,
    queued: btree_set::Iter<'a, (std::cmp::Reverse<u64>, u32, Digest)>,
    scanned: usize,
}

impl Model {
    /// Queued executions for `worker_id`, up to `max` and its free slots,
    /// shared across builds and most urgent first within each (see the
    /// module), with locality: an execution whose dependency artifacts
    /// another live worker with a free slot holds more of than this one is
    /// left for that worker until it has waited `locality_wait_ms`.
    /// Executions in `in_flight` (picked by a concurrent call whose
    /// assignment is not applied yet) are passed over.
    pub fn pick_for(
        &self,
        worker_id: &str,
        max: usize,
        now_ms: u64,
        locality_wait_ms: u64,
        alive_ms: u64,
        in_flight: &BTreeSet<Digest>,
    ) -> Vec<Digest> {
        let Some(me) = self.workers.get(worker_id) else {
            return Vec::new();
        };
        let free = (self
            .lease_limit(worker_id, me, now_ms, alive_ms)
            .saturating_sub(me.running) as usize)
            .min(max);
        let when = PickTime {
            now_ms,
            locality_wait_ms,
            alive_ms,
        };
        self.pick(worker_id, me, free, &when, in_flight)
    }

    /// What [`Model::pick_for`] would give `worker_id` for one slot once
    /// its report of lease `token` is applied (the report frees the slot
    /// when the lease is still its): the job a report takes next, in the
    /// same entry.
    pub fn pick_after_report(
        &self,
        worker_id: &str,
        token: u64,
        now_ms: u64,
        locality_wait_ms: u64,
        alive_ms: u64,
        in_flight: &BTreeSet<Digest>,
    ) -> Vec<Digest> {
        let Some(me) = self.workers.get(worker_id) else {
            return Vec::new();
        };
        let frees = self
            .leases
            .get(&token)
            .and_then(|key| self.executions.get(key))
            .is_some_and(|exec| {
                matches!(&exec.state, ExecState::Running { worker_id: w, .. } if w == worker_id)
            });
        let limit = self.lease_limit(worker_id, me, now_ms, alive_ms);
        let free = (limit.saturating_sub(me.running) as usize + usize::from(frees)).min(1);
        let when = PickTime {
            now_ms,
            locality_wait_ms,
            alive_ms,
        };
        self.pick(worker_id, me, free, &when, in_flight)
    }

    /// The leases `worker_id` (registered as `me`) may hold now: its
    /// slots, and those it takes ahead while no other live worker has a
    /// free slot.
    fn lease_limit(&self, worker_id: &str, me: &Worker, now_ms: u64, alive_ms: u64) -> u32 {
        if me.ahead == 0 {
            return me.slots;
        }
        let another_is_free = self.workers.iter().any(|(id, other)| {
            id != worker_id
                && !other.draining
                && other.running < other.slots
                && now_ms.saturating_sub(other.last_seen_ms) < alive_ms
        });
        if another_is_free {
            me.slots
        } else {
            me.slots.saturating_add(me.ahead)
        }
    }

    /// Up to `free` queued executions for `worker_id` (registered as
    /// `me`; see the module).
    fn pick(
        &self,
        worker_id: &str,
        me: &Worker,
        free: usize,
        when: &PickTime,
        in_flight: &BTreeSet<Digest>,
    ) -> Vec<Digest> {
        let PickTime {
            now_ms,
            locality_wait_ms,
            alive_ms,
        } = *when;
        // A draining worker is given nothing new.
        if me.draining {
            return Vec::new();
        }
        let mut lanes: Vec<Lane<'_>> = self
            .queue
            .by_build
            .iter()
            .map(|(&build, queued)| Lane {
                build,
                running: self.running_by_build.get(&build).copied().unwrap_or(0),
                queued: queued.iter(),
                scanned: 0,
            })
            .collect();
        let mut picks = Vec::new();
        while picks.len() < free {
            let Some((at, _)) = lanes
                .iter()
                .enumerate()
                .min_by_key(|(_, lane)| (lane.running, lane.build))
            else {
                break;
            };
            let lane = &mut lanes[at];
            let mut pick = None;
            while lane.scanned < MAX_SCANNED_PER_BUILD {
                let Some((_, _, key)) = lane.queued.next() else {
                    break;
                };
                lane.scanned += 1;
                let exec = &self.executions[key];
                let ExecState::Queued { since_ms } = exec.state else {
                    unreachable!("the queue holds queued executions");
                };
                if in_flight.contains(key) || !exec.runs_on(me) {
                    continue;
                }
                if now_ms.saturating_sub(since_ms) >= locality_wait_ms
                    || !self.better_elsewhere(exec, worker_id, now_ms, alive_ms)
                {
                    pick = Some(*key);
                    break;
                }
            }
            match pick {
                Some(key) => {
                    picks.push(key);
                    lane.running += 1;
                }
                None => {
                    lanes.swap_remove(at);
                }
            }
        }
        picks
    }

    /// Whether another live worker with a free slot holds more bytes of
    /// `exec`'s dependency artifacts than `worker_id` does.
    fn better_elsewhere(
        &self,
        exec: &Execution,
        worker_id: &str,
        now_ms: u64,
        alive_ms: u64,
    ) -> bool {
        let mut bytes_by_worker: BTreeMap<&str, u64> = BTreeMap::new();
        for dep in &exec.spec.deps {
            if let Some(result) = self.results.get(&dep.cache_key) {
                for holder in self.held_by.get(&result.artifact).into_iter().flatten() {
                    *bytes_by_worker.entry(holder.as_str()).or_default() +=
                        result.artifact_size.max(1);
                }
            }
        }
        let mine = bytes_by_worker.get(worker_id).copied().unwrap_or(0);
        bytes_by_worker.iter().any(|(w, bytes)| {
            *bytes > mine
                && *w != worker_id
                && self.workers.get(*w).is_some_and(|other| {
                    other.running < other.slots
                        && now_ms.saturating_sub(other.last_seen_ms) < alive_ms
                })
        })
    }

    /// Whether any execution is queued.
    pub fn has_queued(&self) -> bool {
        !self.queue.is_empty()
    }
}
