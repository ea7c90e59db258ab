//! The workers' process runner in the simulation: `sim-job LABEL DELAY_MS
//! EXIT OUTDIR INPUT...` takes DELAY_MS of simulated time, writes
//! `OUTDIR/result.txt` (a hash of its label and every input file, so
//! outputs derive from inputs), prints `ran LABEL`, and exits with EXIT.
//! Each start and end goes into the trace.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use distbuild_worker::process::{ProcessOutput, ProcessRunner, ProcessSpec};
use futures::future::BoxFuture;
use sha1::{Digest as _, Sha1};

use crate::trace::{Trace, What};

/// The fake runner of worker `worker`.
pub struct FakeRunner {
    pub worker: String,
    pub trace: Trace,
}

/// A parsed `sim-job` command line.
struct SimJob {
    label: String,
    delay: Duration,
    exit_code: i32,
    out_dir: PathBuf,
    inputs: Vec<PathBuf>,
}

fn parse(spec: &ProcessSpec) -> io::Result<SimJob> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("sim-job: {what}"));
    if spec.program != "sim-job" {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "only sim-job runs here",
        ));
    }
    let args: Vec<String> = spec
        .args
        .iter()
        .map(|a| {
            a.to_str()
                .map(str::to_string)
                .ok_or_else(|| bad("non-UTF-8 argument"))
        })
        .collect::<io::Result<_>>()?;
    if args.len() < 4 {
        return Err(bad("too few arguments"));
    }
    Ok(SimJob {
        label: args[0].clone(),
        delay: Duration::from_millis(args[1].parse().map_err(|_| bad("bad delay"))?),
        exit_code: args[2].parse().map_err(|_| bad("bad exit code"))?,
        out_dir: PathBuf::from(&args[3]),
        inputs: args[4..].iter().map(PathBuf::from).collect(),
    })
}

/// Feeds `path` (a file, or every file under a directory in name order)
/// into `sha`.
fn hash_tree(sha: &mut Sha1, path: &Path) -> io::Result<()> {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)?
            .map(|e| e.map(|e| e.path()))
            .collect::<io::Result<_>>()?;
        entries.sort();
        for entry in entries {
            sha.update(
                entry
                    .file_name()
                    .map(|n| n.as_encoded_bytes())
                    .unwrap_or_default(),
            );
            hash_tree(sha, &entry)?;
        }
        Ok(())
    } else {
        sha.update(std::fs::read(path)?);
        Ok(())
    }
}

impl ProcessRunner for FakeRunner {
    fn run(&self, spec: ProcessSpec) -> BoxFuture<'_, io::Result<ProcessOutput>> {
        Box::pin(async move {
            let job = parse(&spec)?;
            self.trace.record(What::RunStarted {
                worker: self.worker.clone(),
                label: job.label.clone(),
            });
            let mut sha = Sha1::new();
            sha.update(job.label.as_bytes());
            for input in &job.inputs {
                // A missing input is the fake's way of failing loudly: the
                // worker staged less than the command names.
                hash_tree(&mut sha, input)?;
            }
            tokio::time::sleep(job.delay).await;
            std::fs::create_dir_all(&job.out_dir)?;
            std::fs::write(
                job.out_dir.join("result.txt"),
                format!("{}\n", hex::encode(sha.finalize())),
            )?;
            self.trace.record(What::RunEnded {
                worker: self.worker.clone(),
                label: job.label.clone(),
                exit_code: job.exit_code,
            });
            Ok(ProcessOutput {
                exit_code: job.exit_code,
                stdout: format!("ran {}\n", job.label).into_bytes(),
                ..ProcessOutput::default()
            })
        })
    }
}
