//! Per cache key at most one result is accepted (per run the coordinators
//! start), and never a result from a lease that expired, was revoked, or
//! was superseded by a newer lease on the same key. Read from the
//! committed log, independently of the coordinator's own bookkeeping: the
//! checker follows grants (`Assign` answers), revocations (`Heartbeat`
//! answers), expiries (`ExpireLeases` answers), re-registrations and
//! accepted reports. A retried request (same request ID) applies nothing:
//! it is held to the first answer and otherwise skipped.

use std::collections::BTreeMap;

use distbuild_coordinator::state::{Command, Outcome, Response};
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
