//! A job's cache key: what makes two jobs the same job, whatever IDs their
//! graphs give them. It comes in two steps, so that a dependency rebuilt
//! into the same bytes does not rebuild its dependents (early cutoff, as
//! Bazel and Shake do it):
//!
//! - [`job_key`], when the build is planned: SHA-1 over an unambiguous
//!   encoding (every variable-length part is length-prefixed) of
//!   - the commands, with each `{{index .Deps "<id>"}}` replaced by that
//!     dependency's position in the job's `Deps` (so graph IDs never enter
//!     the key);
//!   - the inputs as (relative path, content digest), sorted by path;
//!   - the number of dependencies.
//! - [`resolved_key`], when every dependency has succeeded: the job key and
//!   the digest of each dependency's output artifact, in `Deps` order. A job
//!   without dependencies keeps its job key.
//!
//! The job's name and ID are not part of it. Changing one source byte changes
//! the input's digest, so the job's key; its dependents' keys change only if
//! its output does.

use sha1::{Digest as _, Sha1};

use crate::graph::{Cmd, Job, Segment, Template};
use crate::ids::{Digest, JobId};

/// Bumped when the encoding changes, so old cache entries stop matching.
const CACHE_KEY_VERSION: &[u8] = b"distbuild-cache-key-v2";

/// Tags the second step, so no resolved key can equal a job key.
const RESOLVED_KEY_VERSION: &[u8] = b"distbuild-resolved-key-v1";

struct Encoder(Sha1);

impl Encoder {
    fn bytes(&mut self, tag: u8, bytes: &[u8]) {
        self.0.update([tag]);
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }

    fn template(&mut self, t: &Template, dep_position: &dyn Fn(&JobId) -> u64) {
        self.0.update([b'T']);
        self.0.update((t.segments.len() as u64).to_le_bytes());
        for segment in &t.segments {
            match segment {
                Segment::Literal(bytes) => self.bytes(b'L', t.text[bytes.clone()].as_bytes()),
                Segment::SourceDir => self.0.update([b'S']),
                Segment::OutputDir => self.0.update([b'O']),
                Segment::DepOutput(id) => {
                    self.0.update([b'D']);
                    self.0.update(dep_position(id).to_le_bytes());
                }
            }
        }
    }

    fn templates(&mut self, tag: u8, ts: &[Template], dep_position: &dyn Fn(&JobId) -> u64) {
        self.0.update([tag]);
        self.0.update((ts.len() as u64).to_le_bytes());
        for t in ts {
            self.template(t, dep_position);
        }
    }
}

/// The job key of `job`, given the content digest of each input path (the
/// caller's to know). A template naming a dependency the job does not list
/// cannot pass graph validation; it would be encoded as position `u64::MAX`.
pub fn job_key(job: &Job, input_digest: &dyn Fn(&str) -> Digest) -> Digest {
    let dep_position = |id: &JobId| {
        job.deps
            .iter()
            .position(|d| d == id)
            .map_or(u64::MAX, |p| p as u64)
    };
    let mut e = Encoder(Sha1::new());
    e.bytes(b'V', CACHE_KEY_VERSION);
    e.0.update((job.cmds.len() as u64).to_le_bytes());
    for cmd in &job.cmds {
        match cmd {
            Cmd::Exec {
                argv,
                environ,
                working_directory,
            } => {
                e.0.update([b'E']);
                e.templates(b'a', argv, &dep_position);
                e.templates(b'e', environ, &dep_position);
                e.templates(b'w', working_directory.as_slice(), &dep_position);
            }
            Cmd::Cat { template, output } => {
                e.0.update([b'C']);
                e.template(template, &dep_position);
                e.template(output, &dep_position);
            }
        }
    }
    let mut inputs: Vec<&str> = job.inputs.iter().map(String::as_str).collect();
    inputs.sort_unstable();
    inputs.dedup();
    e.0.update((inputs.len() as u64).to_le_bytes());
    for path in inputs {
        e.bytes(b'p', path.as_bytes());
        e.bytes(b'c', input_digest(path).as_bytes());
    }
    e.0.update([b'd']);
    e.0.update((job.deps.len() as u64).to_le_bytes());
    Digest::from_bytes(e.0.finalize().into())
}

/// The cache key of a job of job key `job_key` whose dependencies (in its
/// `Deps` order) produced `dep_artifacts`.
pub fn resolved_key<'a>(
    job_key: &Digest,
    dep_artifacts: impl ExactSizeIterator<Item = &'a Digest>,
) -> Digest {
    if dep_artifacts.len() == 0 {
        return *job_key;
    }
    let mut e = Encoder(Sha1::new());
    e.bytes(b'V', RESOLVED_KEY_VERSION);
    e.bytes(b'j', job_key.as_bytes());
    e.0.update((dep_artifacts.len() as u64).to_le_bytes());
    for artifact in dep_artifacts {
        e.bytes(b'a', artifact.as_bytes());
    }
    Digest::from_bytes(e.0.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::BuildGraph;

    const F1: &str = "1111111111111111111111111111111111111111";
    const F2: &str = "2222222222222222222222222222222222222222";

    /// A graph of two jobs: `dep` (ID `dep_id`) and `top` depending on it,
    /// reading its output and the two inputs.
    fn graph(dep_id: &str, top_id: &str, top_args: &[&str], inputs: &[&str]) -> BuildGraph {
        let args: Vec<String> = top_args
            .iter()
            .map(|a| {
                format!(
                    "{:?}",
                    a.replace("DEP", &format!("{{{{index .Deps \"{dep_id}\"}}}}"))
                )
            })
            .collect();
        let inputs: Vec<String> = inputs.iter().map(|i| format!("{i:?}")).collect();
        let json = format!(
            r#"{{"SourceFiles": {{"{F1}": "a.c", "{F2}": "b.c"}}, "Jobs": [
              {{"ID": "{dep_id}", "Name": "dep", "Cmds": [{{"Exec": ["true"]}}]}},
              {{"ID": "{top_id}", "Name": "top", "Deps": ["{dep_id}"], "Inputs": [{}],
                "Cmds": [{{"Exec": [{}]}}]}}]}}"#,
            inputs.join(","),
            args.join(",")
        );
        BuildGraph::from_json(json.as_bytes()).expect("valid graph")
    }

    /// The resolved key of `top`, its input `a.c` holding `a_content` and
    /// its dependency having produced `dep_artifact`.
    fn key_of_top(g: &BuildGraph, a_content: &[u8], dep_artifact: &[u8]) -> Digest {
        let digest = |path: &str| match path {
            "a.c" => Digest::of(a_content),
            _ => Digest::of(b"b"),
        };
        let own = job_key(&g.jobs[1], &digest);
        resolved_key(&own, [Digest::of(dep_artifact)].iter())
    }

    const D1: &str = "dddddddddddddddddddddddddddddddddddddddd";
    const D2: &str = "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee";
    const T1: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const T2: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    #[test]
    fn graph_ids_do_not_enter_the_key() {
        let one = graph(D1, T1, &["cat", "DEP/x"], &["a.c"]);
        let two = graph(D2, T2, &["cat", "DEP/x"], &["a.c"]);
        assert_eq!(
            key_of_top(&one, b"a", b"out"),
            key_of_top(&two, b"a", b"out")
        );
    }

    #[test]
    fn what_changes_the_key() {
        let base = key_of_top(&graph(D1, T1, &["cat", "DEP/x"], &["a.c"]), b"a", b"out");
        let cases = [
            (
                "one source byte",
                key_of_top(&graph(D1, T1, &["cat", "DEP/x"], &["a.c"]), b"A", b"out"),
            ),
            (
                "an argument",
                key_of_top(&graph(D1, T1, &["cat", "DEP/y"], &["a.c"]), b"a", b"out"),
            ),
            (
                "argument boundaries",
                key_of_top(&graph(D1, T1, &["ca", "tDEP/x"], &["a.c"]), b"a", b"out"),
            ),
            (
                "the dependency's output",
                key_of_top(&graph(D1, T1, &["cat", "DEP/x"], &["a.c"]), b"a", b"other"),
            ),
            (
                "an input added",
                key_of_top(
                    &graph(D1, T1, &["cat", "DEP/x"], &["a.c", "b.c"]),
                    b"a",
                    b"out",
                ),
            ),
        ];
        for (what, key) in cases {
            assert_ne!(key, base, "changing {what} kept the key");
        }
    }

    #[test]
    fn input_order_does_not_matter() {
        let ab = key_of_top(&graph(D1, T1, &["x"], &["a.c", "b.c"]), b"a", b"out");
        let ba = key_of_top(&graph(D1, T1, &["x"], &["b.c", "a.c"]), b"a", b"out");
        assert_eq!(ab, ba);
    }

    /// Early cutoff: what the dependency ran is not part of its dependent's
    /// key, only what it produced.
    #[test]
    fn a_dependency_s_own_key_does_not_enter_its_dependent_s() {
        let one = graph(D1, T1, &["cat", "DEP/x"], &["a.c"]);
        let mut two = one.clone();
        two.jobs[0].inputs.push("b.c".into());
        let input = |_: &str| Digest::of(b"b");
        assert_ne!(job_key(&one.jobs[0], &input), job_key(&two.jobs[0], &input));
        assert_eq!(
            key_of_top(&one, b"a", b"out"),
            key_of_top(&two, b"a", b"out")
        );
    }

    #[test]
    fn a_job_without_dependencies_keeps_its_job_key_and_no_other_does() {
        let g = graph(D1, T1, &["cat", "DEP/x"], &["a.c"]);
        let dep_key = job_key(&g.jobs[0], &|_| unreachable!("no inputs"));
        assert_eq!(resolved_key(&dep_key, std::iter::empty()), dep_key);
        let own = job_key(&g.jobs[1], &|_| Digest::of(b"a"));
        assert_ne!(resolved_key(&own, [Digest::of(b"out")].iter()), own);
    }

    /// Each dependency's output is tied to where the templates name it.
    #[test]
    fn which_dependency_produced_which_output_matters() {
        let (a, b) = (Digest::of(b"a"), Digest::of(b"b"));
        let own = Digest::of(b"job");
        assert_ne!(
            resolved_key(&own, [a, b].iter()),
            resolved_key(&own, [b, a].iter())
        );
    }
}
