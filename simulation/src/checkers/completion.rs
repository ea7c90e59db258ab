//! Every build completes after the heal, with the per-job results of a
//! fault-free run of the same graphs: each job finished with the same exit
//! code, output and artifact, or was skipped in both. Both runs are also
//! held to what the graph itself says (so a mistake both runs make is
//! caught): a job whose dependencies all succeeded ran, printing
//! `ran LABEL` and exiting with the code its definition gives; any other
//! was skipped.

use std::collections::BTreeMap;

use super::{ClientEvent, Findings, Violation, client_events, label_of};
use crate::cluster::RunResult;
use crate::workload::Graph;

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

/// What `graph` says each job ends with, by job ID: the label it prints
/// and its exit code, or `None` for a job that must be skipped.
fn expected_by_graph(graph: &Graph) -> BTreeMap<&str, Option<(&str, i32)>> {
    // label -> whether it succeeded (the graph lists dependencies first)
    let mut succeeded: BTreeMap<&str, bool> = BTreeMap::new();
    let mut expected = BTreeMap::new();
    for job in &graph.jobs {
        let runs = job
            .deps
            .iter()
            .all(|dep| succeeded.get(dep.as_str()) == Some(&true));
        succeeded.insert(&job.label, runs && job.exit_code == 0);
        expected.insert(
            job.id.as_str(),
            runs.then_some((job.label.as_str(), job.exit_code)),
        );
    }
    expected
}

/// Holds `got` (one build's results) to what its graph says.
fn check_against_graph(
    findings: &mut Findings,
    client: &str,
    graph: &Graph,
    got: &BTreeMap<String, JobResult>,
) {
    for (id, expected) in expected_by_graph(graph) {
        let matches = match (got.get(id), expected) {
            (None, _) => continue, // reported against the reference
            (Some(JobResult::Skipped), None) => true,
            (
                Some(JobResult::Finished {
                    exit_code,
                    stdout,
                    error: None,
                    ..
                }),
                Some((label, code)),
            ) => {
                *exit_code == i64::from(code)
                    && label_of(stdout.as_bytes()).as_deref() == Some(label)
            }
            _ => false,
        };
        if !matches {
            findings.report(format!(
                "{client}: job {id} ended {:?}, but its graph says {}",
                got[id],
                match expected {
                    Some((label, code)) => format!("it runs ({label}) and exits {code}"),
                    None => "it is skipped".to_string(),
                }
            ));
        }
    }
}

pub fn check(run: &RunResult, reference: &RunResult) -> Vec<Violation> {
    let mut findings = Findings::new("completion");
    for (client, graph) in run.builds.iter().zip(&run.graphs) {
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
        check_against_graph(&mut findings, client, graph, &got);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::JobDef;

    fn job(label: &str, deps: &[&str], exit_code: i32) -> JobDef {
        JobDef {
            label: label.to_string(),
            id: format!("id-{label}"),
            inputs: vec![],
            deps: deps.iter().map(|d| d.to_string()).collect(),
            delay_ms: 0,
            exit_code,
        }
    }

    fn finished(label: &str, exit_code: i64) -> JobResult {
        JobResult::Finished {
            exit_code,
            stdout: format!("ran {label}\n"),
            error: None,
            artifact: None,
        }
    }

    fn violations(got: &[(&str, JobResult)]) -> usize {
        // a fails; b depends on a, so it is skipped; c runs.
        let graph = Graph {
            sources: BTreeMap::new(),
            jobs: vec![job("a", &[], 2), job("b", &["a"], 0), job("c", &[], 0)],
        };
        let got = got
            .iter()
            .map(|(id, r)| (format!("id-{id}"), r.clone()))
            .collect();
        let mut findings = Findings::new("completion");
        check_against_graph(&mut findings, "u1#0", &graph, &got);
        findings.into_vec().len()
    }

    #[test]
    fn results_are_held_to_what_the_graph_says() {
        let right = [
            ("a", finished("a", 2)),
            ("b", JobResult::Skipped),
            ("c", finished("c", 0)),
        ];
        assert_eq!(violations(&right), 0);
        // A dependent of a failure that ran, a job that exited otherwise,
        // one that printed another label, one skipped without cause.
        assert_eq!(violations(&[("b", finished("b", 0))]), 1);
        assert_eq!(violations(&[("a", finished("a", 0))]), 1);
        assert_eq!(violations(&[("c", finished("a", 0))]), 1);
        assert_eq!(violations(&[("c", JobResult::Skipped)]), 1);
    }
}
