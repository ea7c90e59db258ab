//! Random build graphs, one per client, all decided by the seed: chains,
//! fans, diamonds, a subgraph shared by every build (same jobs, same
//! sources: one cache key each), and jobs that fail (their dependents are
//! skipped). Every command is a `sim-job` the fake process runner
//! understands (see `runner`).

use std::collections::BTreeMap;
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use sha1::{Digest as _, Sha1};

/// One job of a graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobDef {
    /// Unique per job definition; equal labels are the same job.
    pub label: String,
    /// 40 hex characters, derived from the label.
    pub id: String,
    /// Source paths it reads.
    pub inputs: Vec<String>,
    /// Labels of the jobs whose outputs it reads.
    pub deps: Vec<String>,
    /// Simulated time the process takes.
    pub delay_ms: u64,
    /// What the process exits with.
    pub exit_code: i32,
}

/// One client's build graph and its source files.
#[derive(Debug, Clone)]
pub struct Graph {
    pub sources: BTreeMap<String, Vec<u8>>,
    /// In dependency order (every job after its dependencies).
    pub jobs: Vec<JobDef>,
}

fn sha1_hex(text: &str) -> String {
    hex::encode(Sha1::digest(text.as_bytes()))
}

impl JobDef {
    fn new(
        label: String,
        inputs: Vec<String>,
        deps: Vec<String>,
        rng: &mut StdRng,
        fail_per_mille: u32,
    ) -> Self {
        let exit_code = if rng.gen_range(0..1000) < fail_per_mille {
            rng.gen_range(1..4)
        } else {
            0
        };
        Self {
            id: sha1_hex(&format!("job:{label}")),
            label,
            inputs,
            deps,
            delay_ms: rng.gen_range(50..1_500),
            exit_code,
        }
    }
}

impl Graph {
    /// The job labelled `label`.
    pub fn job(&self, label: &str) -> Option<&JobDef> {
        self.jobs.iter().find(|j| j.label == label)
    }

    /// The graph in distbuild's JSON format.
    pub fn to_json(&self) -> String {
        let ids: BTreeMap<&str, &str> = self
            .jobs
            .iter()
            .map(|j| (j.label.as_str(), j.id.as_str()))
            .collect();
        let sources: serde_json::Map<String, serde_json::Value> = self
            .sources
            .keys()
            .map(|path| (sha1_hex(&format!("src:{path}")), json!(path)))
            .collect();
        let jobs: Vec<serde_json::Value> = self
            .jobs
            .iter()
            .map(|job| {
                let mut exec = vec![
                    "sim-job".to_string(),
                    job.label.clone(),
                    job.delay_ms.to_string(),
                    job.exit_code.to_string(),
                    "{{.OutputDir}}".to_string(),
                ];
                exec.extend(job.inputs.iter().map(|p| format!("{{{{.SourceDir}}}}/{p}")));
                exec.extend(
                    job.deps
                        .iter()
                        .map(|d| format!("{{{{index .Deps \"{}\"}}}}", ids[d.as_str()])),
                );
                json!({
                    "ID": job.id,
                    "Name": job.label,
                    "Inputs": job.inputs,
                    "Deps": job.deps.iter().map(|d| ids[d.as_str()]).collect::<Vec<_>>(),
                    "Cmds": [{ "Exec": exec }],
                })
            })
            .collect();
        serde_json::to_string_pretty(&json!({ "SourceFiles": sources, "Jobs": jobs }))
            .expect("plain JSON")
    }

    /// Writes `graph.json` and the sources under `dir/src`.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir.join("src"))?;
        std::fs::write(dir.join("graph.json"), self.to_json())?;
        for (path, content) in &self.sources {
            let file = dir.join("src").join(path);
            if let Some(parent) = file.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(file, content)?;
        }
        Ok(())
    }
}

/// The graphs of `builds` builds for `seed`.
pub fn generate(seed: u64, builds: usize) -> Vec<Graph> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x005e_ed0f_9a4b);
    // Shared sources and a shared subgraph every build includes.
    let mut shared_sources = BTreeMap::new();
    for i in 0..rng.gen_range(2..5) {
        shared_sources.insert(
            format!("shared/s{i}.txt"),
            format!("shared source {i} of seed {seed}\n").into_bytes(),
        );
    }
    let shared_paths: Vec<String> = shared_sources.keys().cloned().collect();
    let mut shared_jobs: Vec<JobDef> = Vec::new();
    for i in 0..rng.gen_range(2..6) {
        let inputs = pick(&mut rng, &shared_paths, 1, 2);
        let deps = pick(
            &mut rng,
            &shared_jobs
                .iter()
                .map(|j| j.label.clone())
                .collect::<Vec<_>>(),
            0,
            2,
        );
        shared_jobs.push(JobDef::new(
            format!("shared-{i}"),
            inputs,
            deps,
            &mut rng,
            60,
        ));
    }

    (0..builds)
        .map(|k| {
            let mut sources = shared_sources.clone();
            for i in 0..rng.gen_range(1..4) {
                sources.insert(
                    format!("b{k}/f{i}.txt"),
                    format!("build {k} source {i} of seed {seed}\n").into_bytes(),
                );
            }
            let paths: Vec<String> = sources.keys().cloned().collect();
            let mut jobs = shared_jobs.clone();
            let mut next = 0;
            let label = |next: &mut usize| {
                *next += 1;
                format!("b{k}-{}", *next - 1)
            };
            for _ in 0..rng.gen_range(1..4) {
                let known: Vec<String> = jobs.iter().map(|j| j.label.clone()).collect();
                match rng.gen_range(0..3) {
                    // A chain on top of something already there.
                    0 => {
                        let mut prev = pick(&mut rng, &known, 0, 1);
                        for _ in 0..rng.gen_range(2..6) {
                            let inputs = pick(&mut rng, &paths, 0, 1);
                            let job = JobDef::new(label(&mut next), inputs, prev, &mut rng, 40);
                            prev = vec![job.label.clone()];
                            jobs.push(job);
                        }
                    }
                    // A fan out then in.
                    1 => {
                        let root_deps = pick(&mut rng, &known, 0, 2);
                        let root_inputs = pick(&mut rng, &paths, 1, 2);
                        let root =
                            JobDef::new(label(&mut next), root_inputs, root_deps, &mut rng, 40);
                        let root_label = root.label.clone();
                        jobs.push(root);
                        let mut leaves = Vec::new();
                        for _ in 0..rng.gen_range(2..6) {
                            let inputs = pick(&mut rng, &paths, 0, 1);
                            let job = JobDef::new(
                                label(&mut next),
                                inputs,
                                vec![root_label.clone()],
                                &mut rng,
                                40,
                            );
                            leaves.push(job.label.clone());
                            jobs.push(job);
                        }
                        if rng.gen_bool(0.5) {
                            let join = JobDef::new(label(&mut next), vec![], leaves, &mut rng, 40);
                            jobs.push(join);
                        }
                    }
                    // A diamond.
                    _ => {
                        let top_deps = pick(&mut rng, &known, 0, 1);
                        let top_inputs = pick(&mut rng, &paths, 1, 1);
                        let top = JobDef::new(label(&mut next), top_inputs, top_deps, &mut rng, 40);
                        let top_label = top.label.clone();
                        jobs.push(top);
                        let left = JobDef::new(
                            label(&mut next),
                            vec![],
                            vec![top_label.clone()],
                            &mut rng,
                            40,
                        );
                        let right = JobDef::new(
                            label(&mut next),
                            pick(&mut rng, &paths, 0, 1),
                            vec![top_label],
                            &mut rng,
                            40,
                        );
                        let bottom = JobDef::new(
                            label(&mut next),
                            vec![],
                            vec![left.label.clone(), right.label.clone()],
                            &mut rng,
                            40,
                        );
                        jobs.extend([left, right, bottom]);
                    }
                }
            }
            // Only sources some job reads are listed.
            sources.retain(|path, _| jobs.iter().any(|j| j.inputs.contains(path)));
            Graph { sources, jobs }
        })
        .collect()
}

/// Between `min` and `max` distinct items of `from` (fewer if it is
/// shorter), in their original order.
fn pick(rng: &mut StdRng, from: &[String], min: usize, max: usize) -> Vec<String> {
    let want = rng.gen_range(min..=max).min(from.len());
    let mut chosen: Vec<usize> = rand::seq::index::sample(rng, from.len(), want).into_vec();
    chosen.sort_unstable();
    chosen.into_iter().map(|i| from[i].clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graphs_are_valid_and_depend_only_on_the_seed() {
        for seed in 0..40 {
            let graphs = generate(seed, 3);
            assert_eq!(graphs.len(), 3);
            for graph in &graphs {
                let json = graph.to_json();
                distbuild_proto::graph::BuildGraph::from_json(json.as_bytes())
                    .unwrap_or_else(|e| panic!("seed {seed}: {e}\n{json}"));
                for (i, job) in graph.jobs.iter().enumerate() {
                    for dep in &job.deps {
                        assert!(graph.jobs[..i].iter().any(|j| &j.label == dep));
                    }
                }
            }
            assert_eq!(
                generate(seed, 3)
                    .iter()
                    .map(Graph::to_json)
                    .collect::<Vec<_>>(),
                graphs.iter().map(Graph::to_json).collect::<Vec<_>>()
            );
        }
    }
}
