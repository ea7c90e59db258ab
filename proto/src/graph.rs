//! The build graph: parsed from the original Go distbuild's JSON format and
//! validated once, here. A [`BuildGraph`] value is always well-formed: IDs
//! are valid and unique, dependencies exist and form no cycle, every input
//! is a listed source file, paths are relative and stay inside their
//! directory, and every template is parsed.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use serde::Deserialize;

use crate::ids::JobId;

/// Why a graph is refused. Each message is one line naming the job, path or
/// text involved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GraphError {
    #[error("malformed graph JSON: {0}")]
    Json(String),
    #[error("source file ID {id:?}: not 40 lowercase hex characters")]
    BadFileId { id: String },
    #[error("job {name:?}: ID {id:?} is not 40 lowercase hex characters")]
    BadJobId { name: String, id: String },
    #[error("job {job}: dependency ID {id:?} is not 40 lowercase hex characters")]
    BadDepId { job: String, id: String },
    #[error("duplicate job ID {id} ({first:?} and {second:?})")]
    DuplicateJob {
        id: String,
        first: String,
        second: String,
    },
    #[error("job {job}: depends on unknown job {dep}")]
    UnknownDep { job: String, dep: String },
    #[error("job {job}: depends on itself")]
    SelfDep { job: String },
    #[error("dependency cycle: {0}")]
    Cycle(String),
    #[error("source file {id}: path {path:?} {problem}")]
    BadSourcePath {
        id: String,
        path: String,
        problem: &'static str,
    },
    #[error("source files {first} and {second} have the same path {path:?}")]
    DuplicateSourcePath {
        path: String,
        first: String,
        second: String,
    },
    #[error("job {job}: input {path:?} is not listed in SourceFiles")]
    UnlistedInput { job: String, path: String },
    #[error("job {job}: command {index}: {problem}")]
    BadCommand {
        job: String,
        index: usize,
        problem: String,
    },
    #[error("job {job}: template error in {text:?}: {problem}")]
    Template {
        job: String,
        text: String,
        problem: String,
    },
}

/// One piece of a template string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Text as it is: these bytes of the template's text (not a copy).
    Literal(std::ops::Range<usize>),
    /// `{{.SourceDir}}`: the job's source directory.
    SourceDir,
    /// `{{.OutputDir}}`: the job's output directory.
    OutputDir,
    /// `{{index .Deps "<id>"}}`: the output directory of dependency `id`.
    DepOutput(JobId),
}

/// A parsed template string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// The text as the graph wrote it (part of the job's cache key).
    pub text: String,
    pub segments: Vec<Segment>,
}

/// Directories a template is expanded against.
pub struct TemplateDirs<'a> {
    pub source_dir: &'a str,
    pub output_dir: &'a str,
    /// Output directory of each dependency.
    pub dep_output: &'a dyn Fn(&JobId) -> Option<String>,
}

impl Template {
    /// Parses `text`; `deps` are the job's declared dependencies, the only
    /// IDs `{{index .Deps ...}}` may name. `job` labels the error.
    pub fn parse(
        job: &(impl fmt::Display + ?Sized),
        text: &str,
        deps: &HashSet<JobId>,
    ) -> Result<Self, GraphError> {
        let err = |problem: String| GraphError::Template {
            job: job.to_string(),
            text: text.to_string(),
            problem,
        };
        let mut segments = Vec::new();
        let mut rest = text;
        let at = |rest: &str| text.len() - rest.len();
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                segments.push(Segment::Literal(at(rest)..at(rest) + open));
            }
            let after = &rest[open + 2..];
            let close = after
                .find("}}")
                .ok_or_else(|| err("unclosed {{".to_string()))?;
            let action = after[..close].trim();
            segments.push(match action {
                ".SourceDir" => Segment::SourceDir,
                ".OutputDir" => Segment::OutputDir,
                _ => {
                    let id = action
                        .strip_prefix("index .Deps ")
                        .map(str::trim)
                        .and_then(|quoted| quoted.strip_prefix('"')?.strip_suffix('"'))
                        .ok_or_else(|| {
                            err(format!(
                                "unknown action {{{{{action}}}}}; expected {{{{.SourceDir}}}}, {{{{.OutputDir}}}} or {{{{index .Deps \"<job ID>\"}}}}"
                            ))
                        })?;
                    let id: JobId = id
                        .parse()
                        .map_err(|_| err(format!("{id:?} is not a job ID")))?;
                    if !deps.contains(&id) {
                        return Err(err(format!("job {id} is not among this job's Deps")));
                    }
                    Segment::DepOutput(id)
                }
            });
            rest = &after[close + 2..];
        }
        if !rest.is_empty() {
            segments.push(Segment::Literal(at(rest)..text.len()));
        }
        // A graph holds a template per argument: no spare room each.
        segments.shrink_to_fit();
        Ok(Self {
            text: text.to_string(),
            segments,
        })
    }

    /// The string with every action replaced by its directory.
    pub fn expand(&self, dirs: &TemplateDirs<'_>) -> Result<String, NoDepOutput> {
        let mut out = String::new();
        for segment in &self.segments {
            match segment {
                Segment::Literal(bytes) => out.push_str(&self.text[bytes.clone()]),
                Segment::SourceDir => out.push_str(dirs.source_dir),
                Segment::OutputDir => out.push_str(dirs.output_dir),
                Segment::DepOutput(id) => match (dirs.dep_output)(id) {
                    Some(dir) => out.push_str(&dir),
                    None => return Err(NoDepOutput(*id)),
                },
            }
        }
        Ok(out)
    }
}

/// A template names a dependency whose output directory the expansion was
/// not given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no output directory for dependency {0}")]
pub struct NoDepOutput(pub JobId);

/// One command of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cmd {
    /// Run `argv[0]` with the rest as arguments. An empty `environ` means
    /// the worker's environment; an empty `working_directory` the job's
    /// scratch directory.
    Exec {
        argv: Vec<Template>,
        environ: Vec<Template>,
        working_directory: Option<Template>,
    },
    /// Write `template` to the file `output`.
    Cat {
        template: Template,
        output: Template,
    },
}

/// A validated job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: JobId,
    pub name: String,
    /// Relative paths of its inputs, each a listed source file.
    pub inputs: Vec<String>,
    pub deps: Vec<JobId>,
    pub cmds: Vec<Cmd>,
}

impl fmt::Display for Job {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        JobLabel {
            name: &self.name,
            id: self.id,
        }
        .fmt(f)
    }
}

/// How errors name a job: its name quoted, then its ID.
struct JobLabel<'a> {
    name: &'a str,
    id: JobId,
}

impl fmt::Display for JobLabel<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} ({})", self.name, self.id)
    }
}

/// A validated build graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildGraph {
    /// File ID -> relative path.
    pub source_files: BTreeMap<String, String>,
    /// In the graph's order.
    pub jobs: Vec<Job>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGraph<'a> {
    #[serde(rename = "SourceFiles", default)]
    source_files: Option<BTreeMap<String, String>>,
    #[serde(rename = "Jobs", default, borrow)]
    jobs: Option<Vec<RawJob<'a>>>,
}

/// A job as the JSON has it. What validation copies anyway (IDs become
/// `JobId`s, command texts become templates) is borrowed from the JSON.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob<'a> {
    #[serde(rename = "ID", borrow)]
    id: Text<'a>,
    #[serde(rename = "Name", default)]
    name: Option<String>,
    #[serde(rename = "Inputs", default)]
    inputs: Option<Vec<String>>,
    #[serde(rename = "Deps", default, borrow)]
    deps: Option<Vec<Text<'a>>>,
    #[serde(rename = "Cmds", default, borrow)]
    cmds: Option<Vec<RawCmd<'a>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCmd<'a> {
    #[serde(rename = "Exec", default, borrow)]
    exec: Option<Vec<Text<'a>>>,
    #[serde(rename = "Environ", default, borrow)]
    environ: Option<Vec<Text<'a>>>,
    #[serde(rename = "WorkingDirectory", default, borrow)]
    working_directory: Option<Text<'a>>,
    #[serde(rename = "CatTemplate", default, borrow)]
    cat_template: Option<Text<'a>>,
    #[serde(rename = "CatOutput", default, borrow)]
    cat_output: Option<Text<'a>>,
}

/// A string of the JSON: borrowed from it, or unescaped into a copy when
/// it has escapes.
struct Text<'a>(Cow<'a, str>);

impl std::ops::Deref for Text<'_> {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;

        impl<'de> serde::de::Visitor<'de> for TextVisitor {
            type Value = Text<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_borrowed_str<E: serde::de::Error>(
                self,
                text: &'de str,
            ) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(text)))
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(text.to_owned())))
            }

            fn visit_string<E: serde::de::Error>(self, text: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(text)))
            }
        }

        deserializer.deserialize_str(TextVisitor)
    }
}

/// Checks that `path` is relative, non-empty, and never leaves its
/// directory; returns the problem otherwise.
pub fn check_relative_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Err("is empty");
    }
    if path.contains('\0') {
        return Err("contains a NUL byte");
    }
    if path.starts_with('/') {
        return Err("is absolute");
    }
    if path.split('/').any(|part| part == "..") {
        return Err("climbs out with ..");
    }
    if path.split('/').all(|part| part.is_empty() || part == ".") {
        return Err("names no file");
    }
    Ok(())
}

impl BuildGraph {
    /// Parses and validates a graph in the Go distbuild JSON format.
    pub fn from_json(bytes: &[u8]) -> Result<Self, GraphError> {
        let raw: RawGraph =
            serde_json::from_slice(bytes).map_err(|e| GraphError::Json(e.to_string()))?;
        Self::validate(raw)
    }

    fn validate(raw: RawGraph<'_>) -> Result<Self, GraphError> {
        let source_files = raw.source_files.unwrap_or_default();
        let mut by_path: HashMap<&str, &str> = HashMap::new();
        for (id, path) in &source_files {
            id.parse::<JobId>()
                .map_err(|_| GraphError::BadFileId { id: id.clone() })?;
            check_relative_path(path).map_err(|problem| GraphError::BadSourcePath {
                id: id.clone(),
                path: path.clone(),
                problem,
            })?;
            if let Some(first) = by_path.insert(path, id) {
                return Err(GraphError::DuplicateSourcePath {
                    path: path.clone(),
                    first: first.to_string(),
                    second: id.clone(),
                });
            }
        }

        let raw_jobs = raw.jobs.unwrap_or_default();
        // Each ID's job, by position.
        let mut ids: HashMap<JobId, usize> = HashMap::with_capacity(raw_jobs.len());
        let mut parsed_ids = Vec::with_capacity(raw_jobs.len());
        for (position, job) in raw_jobs.iter().enumerate() {
            let name = || job.name.clone().unwrap_or_default();
            let id: JobId = job.id.parse().map_err(|_| GraphError::BadJobId {
                name: name(),
                id: job.id.to_string(),
            })?;
            if let Some(first) = ids.insert(id, position) {
                return Err(GraphError::DuplicateJob {
                    id: id.to_string(),
                    first: raw_jobs[first].name.clone().unwrap_or_default(),
                    second: name(),
                });
            }
            parsed_ids.push(id);
        }

        let mut jobs = Vec::with_capacity(raw_jobs.len());
        for (raw_job, id) in raw_jobs.into_iter().zip(parsed_ids) {
            let name = raw_job.name.unwrap_or_default();
            // Written out only for an error.
            let label = JobLabel { name: &name, id };
            let mut deps = Vec::new();
            for dep in raw_job.deps.unwrap_or_default() {
                let dep_id: JobId = dep.parse().map_err(|_| GraphError::BadDepId {
                    job: label.to_string(),
                    id: dep.to_string(),
                })?;
                if dep_id == id {
                    return Err(GraphError::SelfDep {
                        job: label.to_string(),
                    });
                }
                if !ids.contains_key(&dep_id) {
                    return Err(GraphError::UnknownDep {
                        job: label.to_string(),
                        dep: dep_id.to_string(),
                    });
                }
                if !deps.contains(&dep_id) {
                    deps.push(dep_id);
                }
            }
            let inputs = raw_job.inputs.unwrap_or_default();
            for path in &inputs {
                if !by_path.contains_key(path.as_str()) {
                    return Err(GraphError::UnlistedInput {
                        job: label.to_string(),
                        path: path.clone(),
                    });
                }
            }
            let dep_set: HashSet<JobId> = deps.iter().copied().collect();
            let template = |text: &str| Template::parse(&label, text, &dep_set);
            let raw_cmds = raw_job.cmds.unwrap_or_default();
            let mut cmds = Vec::with_capacity(raw_cmds.len());
            for (index, cmd) in raw_cmds.into_iter().enumerate() {
                let bad = |problem: &str| GraphError::BadCommand {
                    job: label.to_string(),
                    index,
                    problem: problem.to_string(),
                };
                let exec = cmd.exec.unwrap_or_default();
                let is_cat = cmd.cat_output.as_deref().is_some_and(|s| !s.is_empty());
                cmds.push(match (exec.is_empty(), is_cat) {
                    (false, false) => Cmd::Exec {
                        argv: exec.iter().map(|a| template(a)).collect::<Result<_, _>>()?,
                        environ: cmd
                            .environ
                            .unwrap_or_default()
                            .iter()
                            .map(|e| template(e))
                            .collect::<Result<_, _>>()?,
                        working_directory: match cmd.working_directory.as_deref() {
                            None | Some("") => None,
                            Some(dir) => Some(template(dir)?),
                        },
                    },
                    (true, true) => Cmd::Cat {
                        template: template(cmd.cat_template.as_deref().unwrap_or(""))?,
                        output: template(cmd.cat_output.as_deref().unwrap_or(""))?,
                    },
                    (false, true) => return Err(bad("has both Exec and CatOutput")),
                    (true, false) => return Err(bad("has neither Exec nor CatOutput")),
                });
            }
            jobs.push(Job {
                id,
                name,
                inputs,
                deps,
                cmds,
            });
        }
        let graph = BuildGraph { source_files, jobs };
        graph.check_acyclic()?;
        Ok(graph)
    }

    /// Fails with the cycle spelled out when the dependencies form one.
    fn check_acyclic(&self) -> Result<(), GraphError> {
        #[derive(Clone, Copy, PartialEq)]
        enum Mark {
            New,
            OnStack,
            Done,
        }
        let index: HashMap<JobId, usize> = self
            .jobs
            .iter()
            .enumerate()
            .map(|(i, j)| (j.id, i))
            .collect();
        let mut mark = vec![Mark::New; self.jobs.len()];
        // Iterative DFS (graphs can be deep chains): (job, next dep to visit).
        for root in 0..self.jobs.len() {
            if mark[root] != Mark::New {
                continue;
            }
            let mut stack: Vec<(usize, usize)> = vec![(root, 0)];
            mark[root] = Mark::OnStack;
            while let Some(&mut (job, ref mut next)) = stack.last_mut() {
                if let Some(dep) = self.jobs[job].deps.get(*next) {
                    *next += 1;
                    let dep = index[dep];
                    match mark[dep] {
                        Mark::New => {
                            mark[dep] = Mark::OnStack;
                            stack.push((dep, 0));
                        }
                        Mark::OnStack => {
                            let start = stack
                                .iter()
                                .position(|&(j, _)| j == dep)
                                .expect("on the stack");
                            let mut cycle: Vec<String> = stack[start..]
                                .iter()
                                .map(|&(j, _)| self.jobs[j].to_string())
                                .collect();
                            cycle.push(self.jobs[dep].to_string());
                            return Err(GraphError::Cycle(cycle.join(" -> ")));
                        }
                        Mark::Done => {}
                    }
                } else {
                    mark[job] = Mark::Done;
                    stack.pop();
                }
            }
        }
        Ok(())
    }

    /// The jobs no other job depends on: their outputs are the build's.
    pub fn leaves(&self) -> Vec<&Job> {
        let depended: HashSet<JobId> = self
            .jobs
            .iter()
            .flat_map(|j| j.deps.iter().copied())
            .collect();
        self.jobs
            .iter()
            .filter(|j| !depended.contains(&j.id))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    const C: &str = "cccccccccccccccccccccccccccccccccccccccc";
    const F: &str = "ffffffffffffffffffffffffffffffffffffffff";

    fn echo(id: &str, deps: &[&str], arg: &str) -> String {
        let deps: Vec<String> = deps.iter().map(|d| format!("{d:?}")).collect();
        format!(
            r#"{{"ID": "{id}", "Name": "job {id:.1}", "Deps": [{}], "Cmds": [{{"Exec": ["echo", {arg:?}]}}]}}"#,
            deps.join(",")
        )
    }

    fn graph(jobs: &[String]) -> String {
        format!(
            r#"{{"SourceFiles": {{"{F}": "src/a.c"}}, "Jobs": [{}]}}"#,
            jobs.join(",")
        )
    }

    /// Each bad graph and a fragment its one-line error must contain.
    #[test]
    fn bad_graphs_are_refused_with_a_message_naming_the_problem() {
        let cases: Vec<(String, &str)> = vec![
            ("{".into(), "malformed graph JSON"),
            (r#"{"Jobs": 3}"#.into(), "malformed graph JSON"),
            (r#"{"Jobz": []}"#.into(), "unknown field"),
            (graph(&[echo("xyz", &[], "hi")]), "ID \"xyz\" is not 40"),
            (
                graph(&[echo(A, &[], "1"), echo(A, &[], "2")]),
                "duplicate job ID aaaa",
            ),
            (graph(&[echo(A, &[B], "1")]), "depends on unknown job bbbb"),
            (graph(&[echo(A, &[A], "1")]), "depends on itself"),
            (
                graph(&[echo(A, &["nothex"], "1")]),
                "dependency ID \"nothex\"",
            ),
            (
                graph(&[echo(A, &[C], "1"), echo(B, &[A], "1"), echo(C, &[B], "1")]),
                "dependency cycle: \"job a\"",
            ),
            (
                format!(r#"{{"SourceFiles": {{"{F}": "/etc/passwd"}}}}"#),
                "\"/etc/passwd\" is absolute",
            ),
            (
                format!(r#"{{"SourceFiles": {{"{F}": "a/../../x"}}}}"#),
                "climbs out with ..",
            ),
            (
                r#"{"SourceFiles": {"xx": "a"}}"#.to_string(),
                "source file ID \"xx\"",
            ),
            (
                format!(r#"{{"SourceFiles": {{"{F}": "a", "{A}": "a"}}}}"#),
                "have the same path \"a\"",
            ),
            (
                graph(&[format!(
                    r#"{{"ID": "{A}", "Inputs": ["src/b.c"], "Cmds": []}}"#
                )]),
                "input \"src/b.c\" is not listed",
            ),
            (
                graph(&[echo(A, &[], "{{.Foo}}")]),
                "unknown action {{.Foo}}",
            ),
            (graph(&[echo(A, &[], "{{.SourceDir")]), "unclosed {{"),
            (
                graph(&[
                    echo(A, &[], &format!("{{{{index .Deps \"{B}\"}}}}")),
                    echo(B, &[], "x"),
                ]),
                "is not among this job's Deps",
            ),
            (
                graph(&[format!(
                    r#"{{"ID": "{A}", "Cmds": [{{"Exec": ["x"], "CatOutput": "y"}}]}}"#
                )]),
                "has both Exec and CatOutput",
            ),
            (
                graph(&[format!(r#"{{"ID": "{A}", "Cmds": [{{}}]}}"#)]),
                "has neither Exec nor CatOutput",
            ),
        ];
        for (input, expected) in cases {
            let err = BuildGraph::from_json(input.as_bytes())
                .expect_err(&input)
                .to_string();
            assert!(
                err.contains(expected),
                "for {input}\n  got: {err}\n  want: {expected}"
            );
            assert!(!err.contains('\n'), "error spans lines: {err}");
        }
    }

    #[test]
    fn nulls_and_missing_fields_mean_empty() {
        let g = BuildGraph::from_json(format!(r#"{{"SourceFiles": null, "Jobs": [{{"ID": "{A}", "Inputs": null, "Deps": null, "Cmds": null}}]}}"#).as_bytes())
            .expect("valid");
        assert!(g.source_files.is_empty());
        assert_eq!(g.jobs[0].cmds, vec![]);
        assert_eq!(
            BuildGraph::from_json(b"{}").expect("empty graph").jobs,
            vec![]
        );
    }

    /// Strings are borrowed from the JSON unless they have escapes; both
    /// kinds parse to the same graph.
    #[test]
    fn escaped_strings_parse_like_plain_ones() {
        let escaped_a = format!("\\u0061{}", &A[1..]);
        let plain = graph(&[echo(A, &[], "x\ny"), echo(B, &[A], "z")]);
        let escaped = plain
            .replace(
                &format!("\"ID\": \"{A}\""),
                &format!("\"ID\": \"{escaped_a}\""),
            )
            .replace(
                &format!("\"Deps\": [\"{A}\"]"),
                &format!("\"Deps\": [\"{escaped_a}\"]"),
            )
            .replace("\"echo\"", "\"\\u0065cho\"");
        assert_eq!(escaped.matches("\\u0061").count(), 2, "the ID and the dep");
        assert!(escaped.contains("\\u0065cho"), "a command text");
        let plain = BuildGraph::from_json(plain.as_bytes()).expect("plain graph");
        assert_eq!(
            BuildGraph::from_json(escaped.as_bytes()).expect("escaped graph"),
            plain
        );
        let Cmd::Exec { argv, .. } = &plain.jobs[0].cmds[0] else {
            panic!("exec")
        };
        assert_eq!(argv[0].text, "echo");
        assert_eq!(argv[1].text, "x\ny");
        assert_eq!(plain.jobs[1].deps, vec![A.parse::<JobId>().expect("id")]);
    }

    #[test]
    fn templates_parse_and_expand() {
        let json = format!(
            r#"{{"SourceFiles": {{"{F}": "src/a.c"}}, "Jobs": [
                {{"ID": "{A}", "Inputs": ["src/a.c"], "Cmds": [{{"Exec": ["cc", "{{{{.SourceDir}}}}/src/a.c", "-o", "{{{{.OutputDir}}}}/a.o"]}}]}},
                {{"ID": "{B}", "Deps": ["{A}"], "Cmds": [{{"CatTemplate": "from {{{{ index .Deps \"{A}\" }}}}!", "CatOutput": "{{{{.OutputDir}}}}/out"}}]}}]}}"#
        );
        let g = BuildGraph::from_json(json.as_bytes()).expect("valid");
        let a: JobId = A.parse().expect("id");
        let dep_output = |id: &JobId| (*id == a).then(|| "/out/a".to_string());
        let dirs = TemplateDirs {
            source_dir: "/src",
            output_dir: "/out/b",
            dep_output: &dep_output,
        };
        let Cmd::Exec { argv, .. } = &g.jobs[0].cmds[0] else {
            panic!("exec")
        };
        let argv: Vec<String> = argv
            .iter()
            .map(|t| t.expand(&dirs).expect("expand"))
            .collect();
        assert_eq!(argv, ["cc", "/src/src/a.c", "-o", "/out/b/a.o"]);
        let Cmd::Cat { template, output } = &g.jobs[1].cmds[0] else {
            panic!("cat")
        };
        assert_eq!(template.expand(&dirs).expect("expand"), "from /out/a!");
        assert_eq!(output.expand(&dirs).expect("expand"), "/out/b/out");
        assert_eq!(
            g.leaves().iter().map(|j| j.id).collect::<Vec<_>>(),
            vec![B.parse::<JobId>().expect("id")]
        );
    }

    #[test]
    fn a_long_chain_is_not_a_cycle_and_does_not_overflow() {
        let ids: Vec<String> = (0..20_000u32).map(|i| format!("{i:040x}")).collect();
        let jobs: Vec<String> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                echo(
                    id,
                    if i == 0 {
                        &[]
                    } else {
                        std::slice::from_ref(&ids[i - 1])
                    }
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .as_slice(),
                    "x",
                )
            })
            .collect();
        let g = BuildGraph::from_json(graph(&jobs).as_bytes()).expect("a chain is valid");
        assert_eq!(g.jobs.len(), 20_000);
    }
}
