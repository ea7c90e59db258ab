//! A job's cache key: what makes two jobs the same job, whatever IDs their
//! graphs give them. SHA-1 over an unambiguous encoding (every variable-length
//! part is length-prefixed) of:
//! - the commands, with each `{{index .Deps "<id>"}}` replaced by that
//!   dependency's own cache key (so graph IDs never enter the key);
//! - the inputs as (relative path, content digest), sorted by path;
//! - the dependencies' cache keys, sorted.
//!
//! The job's name and ID are not part of it. Changing one source byte changes
//! the input's digest, so the job's key, so every dependent's key.

use sha1::{Digest as _, Sha1};

use crate::graph::{Cmd, Job, Segment, Template};
use crate::ids::{Digest, JobId};

/// Bumped when the encoding changes, so old cache entries stop matching.
const CACHE_KEY_VERSION: &[u8] = b"distbuild-cache-key-v1";

struct Encoder(Sha1);

impl Encoder {
    fn bytes(&mut self, tag: u8, bytes: &[u8]) {
        self.0.update([tag]);
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }

    fn template(&mut self, t: &Template, dep_key: &dyn Fn(&JobId) -> Digest) {
        self.0.update([b'T']);
        self.0.update((t.segments.len() as u64).to_le_bytes());
        for segment in &t.segments {
            match segment {
                Segment::Literal(s) => self.bytes(b'L', s.as_bytes()),
                Segment::SourceDir => self.0.update([b'S']),
                Segment::OutputDir => self.0.update([b'O']),
                Segment::DepOutput(id) => self.bytes(b'D', dep_key(id).as_bytes()),
            }
        }
    }

    fn templates(&mut self, tag: u8, ts: &[Template], dep_key: &dyn Fn(&JobId) -> Digest) {
        self.0.update([tag]);
        self.0.update((ts.len() as u64).to_le_bytes());
        for t in ts {
            self.template(t, dep_key);
        }
    }
}

/// The cache key of `job`, given the content digest of each input path and
/// the cache key of each dependency (both are the caller's to know).
pub fn cache_key(
    job: &Job,
    input_digest: &dyn Fn(&str) -> Digest,
    dep_key: &dyn Fn(&JobId) -> Digest,
) -> Digest {
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
                e.templates(b'a', argv, dep_key);
                e.templates(b'e', environ, dep_key);
                e.templates(b'w', working_directory.as_slice(), dep_key);
            }
            Cmd::Cat { template, output } => {
                e.0.update([b'C']);
                e.template(template, dep_key);
                e.template(output, dep_key);
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
    let mut deps: Vec<Digest> = job.deps.iter().map(dep_key).collect();
    deps.sort_unstable();
    e.0.update((deps.len() as u64).to_le_bytes());
    for dep in deps {
        e.bytes(b'd', dep.as_bytes());
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

    fn key_of_top(g: &BuildGraph, a_content: &[u8]) -> Digest {
        let dep = &g.jobs[0];
        let dep_key = cache_key(dep, &|_| unreachable!("dep has no inputs"), &|_| {
            unreachable!("no deps")
        });
        let digest = |path: &str| match path {
            "a.c" => Digest::of(a_content),
            _ => Digest::of(b"b"),
        };
        cache_key(&g.jobs[1], &digest, &|id| {
            assert_eq!(*id, dep.id);
            dep_key
        })
    }

    const D1: &str = "dddddddddddddddddddddddddddddddddddddddd";
    const D2: &str = "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee";
    const T1: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const T2: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    #[test]
    fn graph_ids_do_not_enter_the_key() {
        let one = graph(D1, T1, &["cat", "DEP/x"], &["a.c"]);
        let two = graph(D2, T2, &["cat", "DEP/x"], &["a.c"]);
        assert_eq!(key_of_top(&one, b"a"), key_of_top(&two, b"a"));
    }

    #[test]
    fn what_changes_the_key() {
        let base = key_of_top(&graph(D1, T1, &["cat", "DEP/x"], &["a.c"]), b"a");
        let cases = [
            (
                "one source byte",
                key_of_top(&graph(D1, T1, &["cat", "DEP/x"], &["a.c"]), b"A"),
            ),
            (
                "an argument",
                key_of_top(&graph(D1, T1, &["cat", "DEP/y"], &["a.c"]), b"a"),
            ),
            (
                "argument boundaries",
                key_of_top(&graph(D1, T1, &["ca", "tDEP/x"], &["a.c"]), b"a"),
            ),
            (
                "an input added",
                key_of_top(&graph(D1, T1, &["cat", "DEP/x"], &["a.c", "b.c"]), b"a"),
            ),
        ];
        for (what, key) in cases {
            assert_ne!(key, base, "changing {what} kept the key");
        }
    }

    #[test]
    fn input_order_does_not_matter() {
        let ab = key_of_top(&graph(D1, T1, &["x"], &["a.c", "b.c"]), b"a");
        let ba = key_of_top(&graph(D1, T1, &["x"], &["b.c", "a.c"]), b"a");
        assert_eq!(ab, ba);
    }
}
