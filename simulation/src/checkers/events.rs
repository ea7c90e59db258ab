//! Every client receives every event of its build exactly once, in an
//! order consistent with the graph: `build_started` first, one result per
//! job (finished or skipped), a finished job after each of its
//! dependencies finished successfully, a skipped job after some
//! dependency failed or was skipped, and `build_finished` last.

use std::collections::{BTreeMap, BTreeSet};

use super::{ClientEvent, Findings, Violation, client_events};
use crate::cluster::RunResult;

pub fn check(run: &RunResult) -> Vec<Violation> {
    let mut findings = Findings::new("events");
    for (client, graph) in run.builds.iter().zip(&run.graphs) {
        let Some(seen) = run.client_runs.get(client) else {
            continue;
        };
        let label_of: BTreeMap<&str, &str> = graph
            .jobs
            .iter()
            .map(|j| (j.id.as_str(), j.label.as_str()))
            .collect();
        let mut ok: BTreeSet<&str> = BTreeSet::new();
        let mut not_ok: BTreeSet<&str> = BTreeSet::new();
        let mut started = false;
        let mut finished = false;
        for (n, event) in client_events(&seen.lines).iter().enumerate() {
            if finished {
                findings.report(format!(
                    "{client}: event {n} after build_finished: {event:?}"
                ));
                continue;
            }
            let (id, succeeded) = match event {
                ClientEvent::Started => {
                    if started || n != 0 {
                        findings.report(format!("{client}: build_started at position {n}"));
                    }
                    started = true;
                    continue;
                }
                ClientEvent::BuildFinished { ok: build_ok } => {
                    finished = true;
                    let missing = graph.jobs.len() - ok.len() - not_ok.len();
                    if missing > 0 {
                        findings.report(format!(
                            "{client}: build_finished with {missing} jobs never reported"
                        ));
                    }
                    if *build_ok != not_ok.is_empty() {
                        findings.report(format!(
                            "{client}: build_finished ok={build_ok} with {} jobs failed or skipped",
                            not_ok.len()
                        ));
                    }
                    continue;
                }
                ClientEvent::Unknown(line) => {
                    findings.report(format!("{client}: unexpected line {line:?}"));
                    continue;
                }
                ClientEvent::Finished {
                    id,
                    exit_code,
                    error,
                    ..
                } => (id, *exit_code == 0 && error.is_none()),
                ClientEvent::Skipped { id } => (id, false),
            };
            if !started {
                findings.report(format!("{client}: event {n} before build_started"));
            }
            let Some(&label) = label_of.get(id.as_str()) else {
                findings.report(format!("{client}: event for unknown job {id}"));
                continue;
            };
            if ok.contains(label) || not_ok.contains(label) {
                findings.report(format!("{client}: job {label} reported twice"));
                continue;
            }
            let job = graph.job(label).expect("labels come from the graph");
            match event {
                ClientEvent::Finished { .. } => {
                    for dep in &job.deps {
                        if !ok.contains(dep.as_str()) {
                            findings.report(format!(
                                "{client}: {label} finished before its dependency {dep} succeeded"
                            ));
                        }
                    }
                }
                _ => {
                    if !job.deps.iter().any(|d| not_ok.contains(d.as_str())) {
                        findings.report(format!(
                            "{client}: {label} skipped before any dependency failed"
                        ));
                    }
                }
            }
            if succeeded {
                ok.insert(label);
            } else {
                not_ok.insert(label);
            }
        }
        if seen.exit_code.is_some() && started && !finished {
            findings.report(format!("{client}: the build ended without build_finished"));
        }
    }
    findings.into_vec()
}
