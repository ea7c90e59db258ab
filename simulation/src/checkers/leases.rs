//! Per cache key at most one result is accepted (per run the coordinators
//! start), and never a result from a lease that expired, was revoked, or
//! was superseded by a newer lease on the same key. Read from the
//! committed log, independently of the coordinator's own bookkeeping: the
//! checker follows grants (`Assign` answers), revocations (`Heartbeat`
//! answers), expiries (`ExpireLeases` answers), re-registrations and
//! accepted reports. A retried request (same request ID) applies nothing:
//! it is held to the first answer and otherwise skipped. Every expiry is
//! held to deadlines derived from the commands' own stamps (grant and
//! renewal times, lease periods, worker sightings): no lease expires
//! before its deadline while its worker is still seen.

use std::collections::BTreeMap;

use distbuild_model::{Command, Outcome, Response};
use distbuild_proto::Digest;

use super::{Findings, Violation, canonical_log, retries};
use crate::cluster::RunResult;

pub fn check(run: &RunResult) -> Vec<Violation> {
    let mut findings = Findings::new("leases");
    // token -> (cache key, worker)
    let mut granted: BTreeMap<u64, (Digest, String)> = BTreeMap::new();
    // cache key -> (newest token, index of its grant)
    let mut latest: BTreeMap<Digest, (u64, u64)> = BTreeMap::new();
    // token -> why it ended
    let mut ended: BTreeMap<u64, &'static str> = BTreeMap::new();
    // cache key -> index of its last accepted result
    let mut accepted_at: BTreeMap<Digest, u64> = BTreeMap::new();

    let mut timing = Timing::default();
    let log = canonical_log(run);
    let retried = retries(&log);
    for (index, applied) in &log {
        let index = *index;
        if let Some(first) = retried.get(&index) {
            // A retry changes nothing, so it must get the first answer.
            let answer = &log[first].response;
            if applied.response != *answer {
                findings.report(format!(
                    "entry {index}: a retry of entry {first}'s request was answered {:?}, the first time {answer:?}",
                    applied.response
                ));
            }
            continue;
        }
        timing.follow(
            index,
            &applied.proposal.command,
            &applied.response,
            &mut findings,
        );
        match (&applied.proposal.command, &applied.response) {
            (Command::Assign { worker_id, .. }, Response::Assigned { keys, tokens }) => {
                for (key, token) in keys.iter().zip(tokens) {
                    if let Some(token) = token {
                        granted.insert(*token, (*key, worker_id.clone()));
                        latest.insert(*key, (*token, index));
                    }
                }
            }
            (Command::Heartbeat { .. }, Response::Heartbeat { revoked, .. }) => {
                for token in revoked {
                    ended.entry(*token).or_insert("been revoked");
                }
            }
            (Command::ExpireLeases { .. }, Response::Expired { tokens }) => {
                for token in tokens {
                    ended.entry(*token).or_insert("expired");
                }
            }
            (Command::RegisterWorker { worker_id, .. }, _) => {
                for (token, (_, holder)) in &granted {
                    if holder == worker_id {
                        ended
                            .entry(*token)
                            .or_insert("been dropped when its worker registered again");
                    }
                }
            }
            (
                Command::Report {
                    worker_id,
                    token,
                    cache_key,
                    outcome,
                    ..
                },
                Response::Reported { accepted: true },
            ) => {
                let what = format!(
                    "entry {index}: result for {cache_key} from {worker_id} under lease {token}"
                );
                match granted.get(token) {
                    None => {
                        findings.report(format!("{what} accepted, but no such lease was granted"))
                    }
                    Some((key, _)) if key != cache_key => {
                        findings.report(format!("{what} accepted, but that lease was for {key}"))
                    }
                    Some(_) => {}
                }
                if let Some(why) = ended.get(token) {
                    findings.report(format!("{what} accepted after the lease had {why}"));
                } else if let Some((newest, _)) = latest.get(cache_key)
                    && newest != token
                {
                    findings.report(format!(
                        "{what} accepted after lease {newest} superseded it"
                    ));
                }
                if matches!(outcome, Outcome::LostInputs { .. }) {
                    ended.entry(*token).or_insert("reported lost inputs");
                    continue;
                }
                let granted_at = latest.get(cache_key).map_or(0, |(_, at)| *at);
                if let Some(previous) = accepted_at.get(cache_key)
                    && *previous > granted_at
                {
                    findings.report(format!(
                        "{what} accepted, but entry {previous} already accepted a result for it and nothing ran it again since"
                    ));
                }
                accepted_at.insert(*cache_key, index);
                ended.entry(*token).or_insert("delivered its result");
            }
            _ => {}
        }
    }
    findings.into_vec()
}

/// Lease deadlines and worker sightings, derived from the commands' own
/// stamps (leader time, lease periods) rather than read from the
/// coordinator's answers, to hold every expiry to them: a lease expires
/// only once its deadline passed or its worker was not seen for the worker
/// timeout.
#[derive(Default)]
struct Timing {
    /// The state's clock: the largest `now_ms` applied so far.
    clock_ms: u64,
    /// Lease token -> (holder, deadline), while it runs.
    leases: BTreeMap<u64, (String, u64)>,
    /// Worker -> when it was last seen (registered, heartbeat, report).
    seen_ms: BTreeMap<String, u64>,
}

impl Timing {
    fn follow(
        &mut self,
        index: u64,
        command: &Command,
        response: &Response,
        findings: &mut Findings,
    ) {
        if let Some(now_ms) = command.now_ms() {
            self.clock_ms = self.clock_ms.max(now_ms);
        }
        let clock = self.clock_ms;
        match (command, response) {
            (Command::RegisterWorker { worker_id, .. }, _) => {
                self.leases.retain(|_, (holder, _)| holder != worker_id);
                self.seen_ms.insert(worker_id.clone(), clock);
            }
            (
                Command::Assign {
                    worker_id,
                    lease_timeout_ms,
                    ..
                },
                Response::Assigned { tokens, .. },
            ) => {
                for token in tokens.iter().flatten() {
                    self.leases
                        .insert(*token, (worker_id.clone(), clock + lease_timeout_ms));
                }
            }
            (
                Command::Heartbeat {
                    worker_id,
                    tokens,
                    lease_timeout_ms,
                    ..
                },
                Response::Heartbeat {
                    revoked,
                    reregister,
                },
            ) => {
                if !reregister {
                    self.seen_ms.insert(worker_id.clone(), clock);
                }
                for token in tokens {
                    if revoked.contains(token) {
                        self.leases.remove(token);
                    } else if let Some((holder, deadline)) = self.leases.get_mut(token)
                        && holder == worker_id
                    {
                        *deadline = clock + lease_timeout_ms;
                    }
                }
            }
            (
                Command::ExtendLeases {
                    lease_timeout_ms, ..
                },
                _,
            ) => {
                for seen in self.seen_ms.values_mut() {
                    *seen = (*seen).max(clock);
                }
                for (_, deadline) in self.leases.values_mut() {
                    *deadline = (*deadline).max(clock + lease_timeout_ms);
                }
            }
            (
                Command::Report {
                    worker_id, token, ..
                },
                Response::Reported { accepted: true },
            ) => {
                self.leases.remove(token);
                if let Some(seen) = self.seen_ms.get_mut(worker_id) {
                    *seen = clock;
                }
            }
            (
                Command::ExpireLeases {
                    worker_timeout_ms, ..
                },
                Response::Expired { tokens },
            ) => {
                let gone = |seen: Option<&u64>| {
                    seen.is_none_or(|seen| seen.saturating_add(*worker_timeout_ms) <= clock)
                };
                for token in tokens {
                    let Some((holder, deadline)) = self.leases.remove(token) else {
                        continue;
                    };
                    let seen = self.seen_ms.get(&holder);
                    if deadline > clock && !gone(seen) {
                        findings.report(format!(
                            "entry {index}: lease {token} of {holder} expired at {clock} ms, but it ran until {deadline} ms and its worker was seen at {} ms",
                            seen.copied().unwrap_or_default()
                        ));
                    }
                }
                self.seen_ms.retain(|_, seen| !gone(Some(seen)));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Registers w1 at 0 and leases it one job for 1000 ms at 100 (token
    /// 7), renews it at 600 (until 1600), then applies an expiry of token 7
    /// at `expire_at_ms` (worker timeout 5000); returns the violations.
    fn expire_at(expire_at_ms: u64) -> usize {
        let key = Digest::of(b"job");
        let worker = "w1".to_string();
        let mut timing = Timing::default();
        let mut findings = Findings::new("leases");
        let entries = [
            (
                Command::RegisterWorker {
                    worker_id: worker.clone(),
                    addr: "w1:1".into(),
                    slots: 1,
                    ahead: 0,
                    held: vec![],
                    properties: Vec::new(),
                    now_ms: 0,
                },
                Response::None,
            ),
            (
                Command::Assign {
                    worker_id: worker.clone(),
                    cache_keys: vec![key],
                    lease_timeout_ms: 1000,
                    now_ms: 100,
                },
                Response::Assigned {
                    keys: vec![key],
                    tokens: vec![Some(7)],
                },
            ),
            (
                Command::Heartbeat {
                    worker_id: worker.clone(),
                    tokens: vec![7],
                    added: vec![],
                    dropped: vec![],
                    lease_timeout_ms: 1000,
                    now_ms: 600,
                },
                Response::Heartbeat {
                    revoked: vec![],
                    reregister: false,
                },
            ),
            (
                Command::ExpireLeases {
                    now_ms: expire_at_ms,
                    max_attempts: 3,
                    worker_timeout_ms: 5000,
                },
                Response::Expired { tokens: vec![7] },
            ),
        ];
        for (index, (command, response)) in entries.iter().enumerate() {
            timing.follow(index as u64, command, response, &mut findings);
        }
        findings.into_vec().len()
    }

    #[test]
    fn a_lease_expires_only_after_its_renewed_deadline() {
        assert_eq!(expire_at(1100), 1, "the renewal ran it until 1600");
        assert_eq!(expire_at(1599), 1);
        assert_eq!(expire_at(1600), 0);
    }
}
