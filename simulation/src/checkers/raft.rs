//! Raft's own safety: elections are safe, and the replicas' state
//! machines agree at every index (same command, same answer).
//!
//! openraft (0.9, default mode) identifies a leadership by its leader ID,
//! (term, node ID), ordered term first: a candidate of the same term with
//! a higher node ID may still win votes that went to a lower one, so one
//! term can see two leaders, the later with the higher ID, never the other
//! way round (a voter never goes back to a lower ID). Within a term,
//! leaders must therefore appear in increasing node ID; the same node
//! leads a term at most once (seen once, as the observer records it).
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
    // term -> the node seen leading it last
    let mut leader_of: BTreeMap<u64, u64> = BTreeMap::new();
    for &(term, node) in &seen.leaders {
        if let Some(earlier) = leader_of.insert(term, node)
            && earlier > node
        {
            findings.report(format!(
                "term {term}: c{node} was elected after c{earlier}, whose leader ID is higher"
            ));
        }
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
