//! Every build completes after the heal, with the per-job results of a
//! fault-free run of the same graphs: each job finished with the same exit
//! code, output and artifact, or was skipped in both.

use std::collections::BTreeMap;

use super::{ClientEvent, Findings, Violation, client_events};
use crate::cluster::RunResult;

/// A job's result as a client saw it, without what timing decides
/// (whether it came from the cache).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobResult {
    Finished {
        exit_code: i64,
        stdout: String,
        error: Option<String>,
        artifact: Option<String>,
    },
    Skipped,
}

/// Per job ID, the last result a client printed (the `events` checker
/// holds that there is only one).
pub fn results(lines: &[String]) -> BTreeMap<String, JobResult> {
    let mut results = BTreeMap::new();
    for event in client_events(lines) {
        match event {
            ClientEvent::Finished {
                id,
                exit_code,
                stdout,
                error,
                artifact,
            } => {
                results.insert(
                    id,
                    JobResult::Finished {
                        exit_code,
                        stdout,
                        error,
                        artifact,
                    },
                );
            }
            ClientEvent::Skipped { id } => {
                results.insert(id, JobResult::Skipped);
            }
            _ => {}
        }
    }
    results
}

pub fn check(run: &RunResult, reference: &RunResult) -> Vec<Violation> {
    let mut findings = Findings::new("completion");
    for client in &run.builds {
        let Some(seen) = run.client_runs.get(client) else {
            findings.report(format!("{client} printed nothing"));
            continue;
        };
        match seen.exit_code {
            None => findings.report(format!("{client}'s build never ended")),
            Some(code) => {
                let expected = reference.client_runs.get(client).and_then(|r| r.exit_code);
                if Some(code) != expected {
                    findings.report(format!(
                        "{client} exited {code}, the fault-free run {expected:?} (stderr: {:?})",
                        seen.errors.last()
                    ));
                }
            }
        }
        let got = results(&seen.lines);
        let want = reference
            .client_runs
            .get(client)
            .map(|r| results(&r.lines))
            .unwrap_or_default();
        for (id, expected) in &want {
            match got.get(id) {
                None => findings.report(format!("{client}: job {id} has no result")),
                Some(actual) if actual != expected => findings.report(format!(
                    "{client}: job {id} ended {actual:?}, in the fault-free run {expected:?}"
                )),
                Some(_) => {}
            }
        }
        for id in got.keys().filter(|id| !want.contains_key(*id)) {
            findings.report(format!(
                "{client}: job {id} has a result the fault-free run lacks"
            ));
        }
    }
    findings.into_vec()
}
