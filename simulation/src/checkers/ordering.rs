//! No job runs before its dependencies finished, and no dependent of a
//! failed job runs. Read from the trace: a job's process start (on any
//! worker) must come after the cluster applied a successful result for
//! each of its dependencies.

use std::collections::{BTreeMap, BTreeSet};

use distbuild_model::{Command, Outcome, Response};

use super::{Findings, Violation, label_of};
use crate::cluster::RunResult;
use crate::trace::What;

pub fn check(run: &RunResult) -> Vec<Violation> {
    let mut findings = Findings::new("ordering");
    let deps: BTreeMap<&str, &Vec<String>> = run
        .graphs
        .iter()
        .flat_map(|g| g.jobs.iter().map(|j| (j.label.as_str(), &j.deps)))
        .collect();
    let seen = run.observer.observations();
    let mut succeeded: BTreeSet<String> = BTreeSet::new();
    let mut failed: BTreeSet<String> = BTreeSet::new();
    for record in run.trace.records() {
        match &record.what {
            What::Applied {
                node,
                index,
                digest,
            } => {
                let Some(applied) = seen
                    .applied
                    .get(node)
                    .and_then(|per_index| per_index.get(index))
                    .and_then(|all| all.iter().find(|a| &a.digest == digest))
                else {
                    continue;
                };
                let (Command::Report { outcome, .. }, Response::Reported { accepted: true }) =
                    (&applied.proposal.command, &applied.response)
                else {
                    continue;
                };
                match outcome {
                    Outcome::Success { stdout, .. } => {
                        if let Some(label) = label_of(stdout) {
                            succeeded.insert(label);
                        }
                    }
                    Outcome::Failure { stdout, .. } => {
                        if let Some(label) = label_of(stdout) {
                            failed.insert(label);
                        }
                    }
                    // The simulation runs no Remote Execution API actions.
                    Outcome::LostInputs { .. } | Outcome::Executed { .. } => {}
                }
            }
            What::RunStarted { worker, label } => {
                for dep in deps.get(label.as_str()).into_iter().flat_map(|d| d.iter()) {
                    if failed.contains(dep) && !succeeded.contains(dep) {
                        findings.report(format!(
                            "at {} ms {label} ran on {worker} although its dependency {dep} failed",
                            record.at_ms
                        ));
                    } else if !succeeded.contains(dep) {
                        findings.report(format!(
                            "at {} ms {label} ran on {worker} before its dependency {dep} finished",
                            record.at_ms
                        ));
                    }
                }
            }
            _ => {}
        }
    }
    findings.into_vec()
}
