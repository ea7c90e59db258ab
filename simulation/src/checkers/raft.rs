//! Raft's own safety: at most one leader per term, and the replicas' state
//! machines agree at every index (same command, same answer).
//!
//! The coordinators run openraft in its standard-Raft mode (a voter grants
//! one vote per term), so two nodes seen leading one term is a violation.
//! The observer records each (term, node) leadership once.
//!
//! It also reports a snapshot: openraft's snapshot files are written outside
//! the blocking seam, so runs stay below the snapshot threshold to remain
//! deterministic.

use std::collections::BTreeMap;

use super::{Findings, Violation};
use crate::cluster::RunResult;

pub fn check(run: &RunResult) -> Vec<Violation> {
    let mut findings = Findings::new("raft");
    let seen = run.observer.observations();
    for problem in shared_terms(&seen.leaders) {
        findings.report(problem);
    }
    for &(node, index) in &seen.snapshots {
        findings.report(format!(
            "c{node} holds a snapshot at index {index}: snapshot files are written outside the \
             blocking seam, so the run may not replay (keep runs below the snapshot threshold)"
        ));
    }
    // index -> (node, digest) of the first application seen
    let mut first: BTreeMap<u64, (u64, &str)> = BTreeMap::new();
    for (node, per_index) in &seen.applied {
        for (index, applied) in per_index {
            for entry in applied {
                match first.get(index) {
                    None => {
                        first.insert(*index, (*node, &entry.digest));
                    }
                    Some((other, digest)) if *digest != entry.digest => findings.report(format!(
                        "index {index}: c{other} applied {digest}, c{node} applied {} ({:?} -> {:?})",
                        entry.digest, entry.proposal.command, entry.response
                    )),
                    Some(_) => {}
                }
            }
        }
    }
    findings.into_vec()
}

/// Every term that more than one node was seen leading, given (term, node)
/// leaderships.
fn shared_terms(leaders: &[(u64, u64)]) -> Vec<String> {
    // term -> the first node seen leading it
    let mut leader_of: BTreeMap<u64, u64> = BTreeMap::new();
    let mut problems = Vec::new();
    for &(term, node) in leaders {
        match leader_of.get(&term) {
            None => {
                leader_of.insert(term, node);
            }
            Some(&first) if first != node => {
                problems.push(format!("term {term} had two leaders: c{first} and c{node}"))
            }
            Some(_) => {}
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_term_with_two_leaders_is_reported_and_successive_terms_are_not() {
        assert!(shared_terms(&[(1, 1), (2, 3), (3, 1), (3, 1)]).is_empty());
        assert_eq!(
            shared_terms(&[(1, 2), (4, 1), (4, 3)]),
            vec!["term 4 had two leaders: c1 and c3".to_string()]
        );
    }
}
