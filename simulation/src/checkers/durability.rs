//! No acknowledged source blob and no accepted artifact is unavailable
//! once the network heals: after every build ended, an auditor (the real
//! client library) asks the cluster for every source blob of every
//! acknowledged build and downloads every artifact a client was told of;
//! and every such source blob is intact on a majority of the
//! coordinators' disks (read directly, so a record without the bytes
//! behind it is caught).

use super::{Findings, Violation};
use crate::cluster::RunResult;

pub fn check(run: &RunResult) -> Vec<Violation> {
    let mut findings = Findings::new("durability");
    if run.sim_error.is_some() {
        // The audit did not run; the simulation error says why.
        return findings.into_vec();
    }
    let audit = &run.audit;
    if !audit.done {
        findings.report("the audit did not finish");
    }
    for error in &audit.errors {
        findings.report(format!("audit call failed: {error}"));
    }
    for digest in &audit.missing_sources {
        findings.report(format!("acknowledged source blob {digest} is missing"));
    }
    for digest in &audit.unreplicated_sources {
        findings.report(format!("acknowledged source blob {digest}"));
    }
    for lost in &audit.lost_artifacts {
        findings.report(format!("accepted {lost}"));
    }
    findings.into_vec()
}
