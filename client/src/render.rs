//! What the user sees of a build: JSON lines (`--json`), or human output
//! with a live progress line on a terminal. The renderers are pure
//! functions of the events; [`Reporter`] writes them and keeps the tally.

use std::collections::HashSet;
use std::io::Write;
use std::time::Duration;

use distbuild_proto::v1::{BuildEvent, BuildFinished, JobFinished, JobSkipped, build_event};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

/// How often the progress line redraws on its own (its clock and spinner).
pub const PROGRESS_TICK: Duration = Duration::from_millis(200);

/// One line of `--json` output.
#[derive(Debug, Serialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
#[allow(missing_docs)] // the fields are the documented output format
pub enum JsonEvent<'a> {
    /// The build was submitted.
    BuildStarted { build_id: String },
    /// A job finished (ran or came from the cache); stdout and stderr as
    /// lossy UTF-8, error `null` when empty.
    JobFinished {
        id: &'a str,
        name: &'a str,
        exit_code: i32,
        stdout: String,
        stderr: String,
        cached: bool,
        error: Option<&'a str>,
        /// The job's artifact (a successful job's outputs), else `null`.
        artifact: Option<ArtifactJson>,
    },
    /// A job was not run (a dependency failed).
    JobSkipped {
        id: &'a str,
        name: &'a str,
        reason: &'a str,
    },
    /// The build ended; error `null` when empty.
    BuildFinished { ok: bool, error: Option<&'a str> },
}

/// A job's artifact in `--json` output: the tar of its output directory.
#[derive(Debug, Serialize, PartialEq)]
pub struct ArtifactJson {
    /// SHA-1, 40 hex characters.
    pub digest: String,
    /// Bytes.
    pub size: u64,
}

impl JsonEvent<'_> {
    /// The event as one line of JSON (no newline).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("plain strings, numbers and bools always serialize")
    }
}

fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// The `--json` line for the build's start.
pub fn build_started_line(build_id: u64) -> String {
    JsonEvent::BuildStarted {
        build_id: build_id.to_string(),
    }
    .to_line()
}

/// The `--json` line for an event, or `None` for events not shown in JSON
/// (job_started, and an event with no body).
pub fn json_line(event: &BuildEvent) -> Option<String> {
    let json = match event.event.as_ref()? {
        build_event::Event::JobStarted(_) => return None,
        build_event::Event::JobFinished(f) => JsonEvent::JobFinished {
            id: &f.job_id,
            name: &f.name,
            exit_code: f.exit_code,
            stdout: String::from_utf8_lossy(&f.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&f.stderr).into_owned(),
            cached: f.cached,
            error: non_empty(&f.error),
            artifact: (!f.artifact_digest.is_empty()).then(|| ArtifactJson {
                digest: hex::encode(&f.artifact_digest),
                size: f.artifact_size,
            }),
        },
        build_event::Event::JobSkipped(s) => JsonEvent::JobSkipped {
            id: &s.job_id,
            name: &s.name,
            reason: &s.reason,
        },
        build_event::Event::BuildFinished(b) => JsonEvent::BuildFinished {
            ok: b.ok,
            error: non_empty(&b.error),
        },
    };
    Some(json.to_line())
}

/// Whether a finished job failed (ran and exited non-zero, or could not be
/// run at all).
pub fn job_failed(job: &JobFinished) -> bool {
    job.exit_code != 0 || !job.error.is_empty()
}

/// How a job is named in human output: its name and a short ID, or the
/// full ID when it has no name.
pub fn job_label(id: &str, name: &str) -> String {
    const SHORT_ID_CHARS: usize = 12;
    if name.is_empty() {
        id.to_string()
    } else {
        format!("{name:?} ({})", id.get(..SHORT_ID_CHARS).unwrap_or(id))
    }
}

/// Human output for a finished job: nothing for a quiet success; else a
/// header line, then its stdout and stderr.
pub fn human_job_finished(job: &JobFinished) -> String {
    let failed = job_failed(job);
    if !failed && job.stdout.is_empty() && job.stderr.is_empty() {
        return String::new();
    }
    let label = job_label(&job.job_id, &job.name);
    let cached = if job.cached { " (cached)" } else { "" };
    let mut out = if !job.error.is_empty() {
        format!("FAILED job {label}: {}{cached}\n", job.error.trim_end())
    } else if failed {
        format!("FAILED job {label}: exit code {}{cached}\n", job.exit_code)
    } else {
        format!("job {label}{cached}:\n")
    };
    for stream in [&job.stdout, &job.stderr] {
        if !stream.is_empty() {
            out.push_str(&String::from_utf8_lossy(stream));
            if !stream.ends_with(b"\n") {
                out.push('\n');
            }
        }
    }
    out
}

/// Human output for a skipped job.
pub fn human_job_skipped(job: &JobSkipped) -> String {
    format!(
        "skipped job {}: {}\n",
        job_label(&job.job_id, &job.name),
        job.reason
    )
}

/// Counts of a build's jobs, from its events.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    /// Jobs in the build (from the submit answer).
    pub total: u64,
    /// Jobs started and not yet finished.
    pub running: HashSet<String>,
    /// Jobs that finished by running (successfully or not).
    pub ran: u64,
    /// Jobs that finished from the cache.
    pub cached: u64,
    /// Finished jobs that failed (a subset of ran + cached).
    pub failed: u64,
    /// Jobs skipped (a dependency failed).
    pub skipped: u64,
}

impl Tally {
    /// Counts one event.
    pub fn count(&mut self, event: &BuildEvent) {
        match &event.event {
            Some(build_event::Event::JobStarted(s)) => {
                self.running.insert(s.job_id.clone());
            }
            Some(build_event::Event::JobFinished(f)) => {
                self.running.remove(&f.job_id);
                if f.cached {
                    self.cached += 1;
                } else {
                    self.ran += 1;
                }
                if job_failed(f) {
                    self.failed += 1;
                }
            }
            Some(build_event::Event::JobSkipped(s)) => {
                self.running.remove(&s.job_id);
                self.skipped += 1;
            }
            Some(build_event::Event::BuildFinished(_)) | None => {}
        }
    }

    /// Jobs finished or skipped.
    pub fn done(&self) -> u64 {
        self.ran + self.cached + self.skipped
    }
}

/// The final human line, e.g.
/// `build 7: 12 jobs, 10 ran, 2 cached, 0 failed, 0 skipped in 3.2s`.
pub fn summary_line(build_id: u64, tally: &Tally, elapsed: Duration) -> String {
    format!(
        "build {build_id}: {} jobs, {} ran, {} cached, {} failed, {} skipped in {:.1}s",
        tally.total,
        tally.ran,
        tally.cached,
        tally.failed,
        tally.skipped,
        elapsed.as_secs_f64()
    )
}

/// Where a command writes: its stdout, its stderr, and whether a live
/// progress line may be drawn (stderr is a terminal).
pub struct Console {
    /// Results: JSON lines, job output, the summary.
    pub out: Box<dyn Write + Send>,
    /// `error: ...` lines.
    pub err: Box<dyn Write + Send>,
    /// Whether to draw a live progress line on the process's stderr.
    pub progress: bool,
}

impl Console {
    /// The process's own stdout and stderr.
    pub fn stdio() -> Self {
        use std::io::IsTerminal;
        Self {
            out: Box::new(std::io::stdout()),
            err: Box::new(std::io::stderr()),
            progress: std::io::stderr().is_terminal(),
        }
    }

    /// Prints `error: <message>` as one line on stderr and returns `code`.
    pub fn fail(&mut self, code: i32, message: impl std::fmt::Display) -> i32 {
        print_error(&mut self.err, code, message)
    }
}

/// Prints `error: <message>` as one line on `err` and returns `code`.
pub fn print_error(err: &mut dyn Write, code: i32, message: impl std::fmt::Display) -> i32 {
    let line = distbuild_proto::net::one_line(&message.to_string());
    // stderr gone: the exit code still tells.
    let _ = writeln!(err, "error: {line}");
    let _ = err.flush();
    code
}

/// Bytes of output a [`Reporter`] holds before writing them.
const OUTPUT_BUFFER_BYTES: usize = 64 << 10;

/// Writes a build's output (JSON lines or human text) and keeps its tally.
/// Lines are buffered while events keep coming and written when the
/// stream has caught up ([`Reporter::caught_up`]), when a progress line
/// is drawn, and at the end: a 100,000-job rebuild streams its events in
/// well under a second, and a write per line would double that.
pub struct Reporter {
    json: bool,
    out: std::io::BufWriter<Box<dyn Write + Send>>,
    progress: Option<ProgressBar>,
    /// The counts so far.
    pub tally: Tally,
    /// The build_finished event, once seen.
    pub finished: Option<BuildFinished>,
}

impl Reporter {
    /// A reporter writing to `out`; `progress_bar` draws a live line on
    /// stderr (only for human output; pass whether stderr is a terminal).
    pub fn new(json: bool, out: Box<dyn Write + Send>, progress_bar: bool) -> Self {
        let progress = (progress_bar && !json).then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("{spinner} [{elapsed}] {pos}/{len} jobs done, {msg}")
                    .expect("the template is valid"),
            );
            bar
        });
        Self {
            json,
            out: std::io::BufWriter::with_capacity(OUTPUT_BUFFER_BYTES, out),
            progress,
            tally: Tally::default(),
            finished: None,
        }
    }

    /// Writes `text` (already newline-terminated) around the progress line.
    fn write(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        let out = &mut self.out;
        // stdout closed (a pipe to `head`): nothing useful to do.
        match &self.progress {
            // The line goes out before the bar is drawn again.
            Some(bar) => bar.suspend(|| {
                let _ = out.write_all(text.as_bytes());
                let _ = out.flush();
            }),
            None => {
                let _ = out.write_all(text.as_bytes());
            }
        }
    }

    /// No event is waiting: what was written so far goes out now.
    pub fn caught_up(&mut self) {
        let _ = self.out.flush();
    }

    /// The build was submitted.
    pub fn build_started(&mut self, build_id: u64, job_count: u64) {
        self.tally.total = job_count;
        if self.json {
            let line = build_started_line(build_id);
            self.write(&format!("{line}\n"));
        } else if let Some(bar) = &self.progress {
            bar.set_length(job_count);
            bar.enable_steady_tick(PROGRESS_TICK);
            self.update_progress();
        }
        // Scripts wait for the build's ID before its events.
        self.caught_up();
    }

    fn update_progress(&self) {
        if let Some(bar) = &self.progress {
            bar.set_position(self.tally.done());
            bar.set_message(format!(
                "{} running, {} cached, {} failed",
                self.tally.running.len(),
                self.tally.cached,
                self.tally.failed
            ));
        }
    }

    /// One event from the build's stream (each seen exactly once).
    pub fn event(&mut self, event: &BuildEvent) {
        self.tally.count(event);
        if let Some(build_event::Event::BuildFinished(finished)) = &event.event {
            self.finished = Some(finished.clone());
        }
        if self.json {
            if let Some(line) = json_line(event) {
                self.write(&format!("{line}\n"));
            }
            return;
        }
        let text = match &event.event {
            Some(build_event::Event::JobFinished(f)) => human_job_finished(f),
            Some(build_event::Event::JobSkipped(s)) => human_job_skipped(s),
            Some(build_event::Event::BuildFinished(b)) if !b.error.is_empty() => {
                format!("build failed: {}\n", b.error)
            }
            _ => String::new(),
        };
        self.write(&text);
        self.update_progress();
    }

    /// Prints a plain line in human mode (nothing in JSON mode).
    pub fn note(&mut self, line: &str) {
        if !self.json {
            self.write(&format!("{line}\n"));
        }
    }

    /// Ends the progress line and prints the summary (human mode).
    pub fn finish(&mut self, build_id: u64, elapsed: Duration) {
        if let Some(bar) = self.progress.take() {
            bar.finish_and_clear();
        }
        if !self.json {
            let line = summary_line(build_id, &self.tally, elapsed);
            self.write(&format!("{line}\n"));
        }
        self.caught_up();
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        if let Some(bar) = self.progress.take() {
            bar.finish_and_clear();
        }
        self.caught_up();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use distbuild_proto::v1::JobStarted;

    const ID: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

    fn event(seq: u64, e: build_event::Event) -> BuildEvent {
        BuildEvent {
            seq,
            event: Some(e),
        }
    }

    fn finished(exit_code: i32, stdout: &[u8], cached: bool, error: &str) -> JobFinished {
        JobFinished {
            job_id: ID.into(),
            name: "compile".into(),
            exit_code,
            stdout: stdout.to_vec().into(),
            stderr: b"warn\n".to_vec().into(),
            cached,
            error: error.into(),
            ..Default::default()
        }
    }

    /// Each event and its exact `--json` line.
    #[test]
    fn json_lines_are_exactly_as_specified() {
        let cases: Vec<(BuildEvent, Option<&str>)> = vec![
            (
                event(
                    0,
                    build_event::Event::JobStarted(JobStarted {
                        job_id: ID.into(),
                        name: "compile".into(),
                        worker_id: "w1".into(),
                    }),
                ),
                None,
            ),
            (
                event(
                    1,
                    build_event::Event::JobFinished(finished(0, b"hi\n", false, "")),
                ),
                Some(
                    r#"{"event":"job_finished","id":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","name":"compile","exit_code":0,"stdout":"hi\n","stderr":"warn\n","cached":false,"error":null,"artifact":null}"#,
                ),
            ),
            (
                event(
                    2,
                    build_event::Event::JobFinished(finished(
                        -1,
                        b"\xff\"",
                        true,
                        "no such program",
                    )),
                ),
                // Invalid UTF-8 becomes U+FFFD, written as itself.
                Some(concat!(
                    r#"{"event":"job_finished","id":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","name":"compile","exit_code":-1,"stdout":""#,
                    "\u{fffd}",
                    r#"\"","stderr":"warn\n","cached":true,"error":"no such program","artifact":null}"#
                )),
            ),
            (
                event(
                    3,
                    build_event::Event::JobFinished(JobFinished {
                        artifact_digest: vec![0xab; 20].into(),
                        artifact_size: 10240,
                        ..finished(0, b"", true, "")
                    }),
                ),
                Some(
                    r#"{"event":"job_finished","id":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","name":"compile","exit_code":0,"stdout":"","stderr":"warn\n","cached":true,"error":null,"artifact":{"digest":"abababababababababababababababababababab","size":10240}}"#,
                ),
            ),
            (
                event(
                    3,
                    build_event::Event::JobSkipped(JobSkipped {
                        job_id: ID.into(),
                        name: "link".into(),
                        reason: "dependency failed".into(),
                    }),
                ),
                Some(
                    r#"{"event":"job_skipped","id":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","name":"link","reason":"dependency failed"}"#,
                ),
            ),
            (
                event(
                    4,
                    build_event::Event::BuildFinished(BuildFinished {
                        ok: true,
                        error: String::new(),
                    }),
                ),
                Some(r#"{"event":"build_finished","ok":true,"error":null}"#),
            ),
            (
                event(
                    5,
                    build_event::Event::BuildFinished(BuildFinished {
                        ok: false,
                        error: "1 job failed".into(),
                    }),
                ),
                Some(r#"{"event":"build_finished","ok":false,"error":"1 job failed"}"#),
            ),
            (
                BuildEvent {
                    seq: 6,
                    event: None,
                },
                None,
            ),
        ];
        for (event, expected) in cases {
            let line = json_line(&event);
            assert_eq!(line.as_deref(), expected, "{event:?}");
            if let Some(line) = line {
                assert!(!line.contains('\n'));
                let value: serde_json::Value = serde_json::from_str(&line).expect("valid JSON");
                assert!(value.is_object());
            }
        }
        assert_eq!(
            build_started_line(7),
            r#"{"event":"build_started","build_id":"7"}"#
        );
    }

    #[test]
    fn human_output_shows_failures_and_output_only() {
        assert_eq!(
            human_job_finished(&JobFinished {
                job_id: ID.into(),
                exit_code: 0,
                ..Default::default()
            }),
            ""
        );
        assert_eq!(
            human_job_finished(&finished(2, b"out", false, "")),
            "FAILED job \"compile\" (aaaaaaaaaaaa): exit code 2\nout\nwarn\n"
        );
        assert_eq!(
            human_job_finished(&finished(0, b"", true, "")),
            "job \"compile\" (aaaaaaaaaaaa) (cached):\nwarn\n"
        );
        assert_eq!(
            human_job_finished(&finished(0, b"", false, "exec failed")),
            "FAILED job \"compile\" (aaaaaaaaaaaa): exec failed\nwarn\n"
        );
        assert_eq!(
            human_job_skipped(&JobSkipped {
                job_id: ID.into(),
                name: String::new(),
                reason: "dependency failed".into(),
            }),
            format!("skipped job {ID}: dependency failed\n")
        );
    }

    #[test]
    fn tally_counts_and_summarises() {
        let mut tally = Tally {
            total: 4,
            ..Default::default()
        };
        let start = |seq| {
            event(
                seq,
                build_event::Event::JobStarted(JobStarted {
                    job_id: ID.into(),
                    ..Default::default()
                }),
            )
        };
        tally.count(&start(0));
        // A job restarted after a lost worker still counts as one running.
        tally.count(&start(1));
        assert_eq!(tally.running.len(), 1);
        tally.count(&event(
            2,
            build_event::Event::JobFinished(finished(1, b"", false, "")),
        ));
        tally.count(&event(
            3,
            build_event::Event::JobFinished(finished(0, b"", true, "")),
        ));
        tally.count(&event(
            4,
            build_event::Event::JobSkipped(JobSkipped::default()),
        ));
        assert!(tally.running.is_empty());
        assert_eq!(tally.done(), 3);
        assert_eq!(
            summary_line(7, &tally, Duration::from_millis(3240)),
            "build 7: 4 jobs, 1 ran, 1 cached, 1 failed, 1 skipped in 3.2s"
        );
    }
}
