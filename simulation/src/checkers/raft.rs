//! Raft's own safety: at most one leader per term, and the replicas'
//! state machines agree at every index (same command, same answer).

use std::collections::BTreeMap;

use super::{Findings, Violation};
use crate::cluster::RunResult;

pub fn check(run: &RunResult) -> Vec<Violation> {
    let mut findings = Findings::new("raft");
    let seen = run.observer.observations();
    let mut leader_of: BTreeMap<u64, u64> = BTreeMap::new();
    for &(term, node) in &seen.leaders {
        if let Some(other) = leader_of.insert(term, node) {
            findings.report(format!("term {term} had two leaders: c{other} and c{node}"));
        }
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
