//! What the replicated state holds per job: a build of trivial jobs (the
//! shape of `benches/build.rs`'s) submitted in parts, run by one worker
//! the way workers report (each report leasing the next job in the same
//! entry, both remembered by request ID), with the heap counted by this
//! binary's allocator. The bounds are the model's share of the issue's 2
//! KiB per job in flight; RocksDB's memtables (capped), the gRPC buffers
//! and the allocator's own overhead come on top of it in the coordinator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use distbuild_model::tables::RowVisitor;
use distbuild_model::{
    CmdText, Command, JobSpec, Model, Outcome, Proposal, ReadTables, Requests, Response,
    StorageError, SubmittedJob, Tables,
};
use distbuild_proto::graph::BuildGraph;
use distbuild_proto::{Digest, JobId};

/// Counts the bytes allocated and not yet freed.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged; the
// counter is only arithmetic beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's layout, as given.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Writes nothing: the model's own memory is what is measured.
struct NoTables;

impl ReadTables for NoTables {
    fn get(&self, _: &str, _: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        Ok(None)
    }

    fn for_each_prefix(
        &self,
        _: &str,
        _: &[u8],
        _: &mut RowVisitor<'_>,
    ) -> Result<(), StorageError> {
        Ok(())
    }
}

impl Tables for NoTables {
    fn put(&mut self, _: &str, _: &[u8], _: &[u8]) -> Result<(), StorageError> {
        Ok(())
    }

    fn delete(&mut self, _: &str, _: &[u8]) -> Result<(), StorageError> {
        Ok(())
    }
}

const JOBS: usize = 20_000;
/// Bytes per job the state may hold once the build is submitted (it held
/// 1,186 before the job list's allocation was sized to the jobs and a
/// spec's rare action was boxed).
const AFTER_SUBMIT_BYTES: f64 = 1024.0;
/// Bytes per job once every job ran: results, holdings, expected
/// durations and the answers remembered for the workers' calls (2,132
/// while those answers were keyed by their ID's text).
const FINISHED_BYTES: f64 = 1536.0;
/// Jobs per staged part (about the 256 KiB a coordinator's part carries).
const PART: usize = 2_000;
const WORKER: &str = "0123456789abcdef";
/// What a worker's request IDs look like (`RequestIds`).
const PREFIX: &str = "0123456789abcdef-fedcba9876543210";

fn bytes(tag: u8, n: usize) -> [u8; 20] {
    let mut bytes = [tag; 20];
    bytes[..8].copy_from_slice(&(n as u64).to_be_bytes());
    bytes
}

fn digest(tag: u8, n: usize) -> Digest {
    Digest::from_bytes(bytes(tag, n))
}

/// The build's jobs as a coordinator plans them: parsed from the graph's
/// JSON, their commands' texts moved into the specs.
fn jobs() -> Vec<SubmittedJob> {
    let graph: Vec<String> = (0..JOBS)
        .map(|n| {
            format!(
                r#"{{"ID": "{}", "Name": "job {n}", "Cmds": [{{"Exec": ["/bin/sh", "-c", "echo {n} > out"], "WorkingDirectory": "{{{{.OutputDir}}}}"}}]}}"#,
                JobId::from_bytes(bytes(2, n))
            )
        })
        .collect();
    let graph = BuildGraph::from_json(format!(r#"{{"Jobs": [{}]}}"#, graph.join(",")).as_bytes())
        .expect("a valid graph");
    graph
        .jobs
        .into_iter()
        .enumerate()
        .map(|(n, job)| SubmittedJob {
            cache_key: digest(1, n),
            deps: Vec::new(),
            spec: JobSpec {
                job_id: job.id,
                name: job.name,
                cmds: job.cmds.into_iter().map(CmdText::from_graph).collect(),
                inputs: Vec::new(),
                deps: Vec::new(),
                action: None,
            },
        })
        .collect()
}

/// Applies proposals as the coordinator does: through the remembered
/// answers, each entry flushed.
struct Replica {
    model: Model,
    requests: Requests,
    index: u64,
}

impl Replica {
    fn apply(&mut self, proposals: Vec<Proposal>) -> Vec<Response> {
        self.index += 1;
        let entry = if proposals.len() == 1 {
            proposals.into_iter().next().expect("one")
        } else {
            Proposal::once(Command::Batch { proposals })
        };
        let mut responses = Vec::new();
        for (index, proposal) in entry.parts(self.index).expect("a valid entry") {
            responses.push(self.requests.apply(&mut self.model, index, proposal));
        }
        self.model.flush(&mut NoTables).expect("flushed");
        self.requests.flush(&mut NoTables).expect("flushed");
        responses
    }
}

fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

#[test]
fn the_state_holds_little_per_job_in_flight() {
    let mut replica = Replica {
        model: Model::default(),
        requests: Requests::default(),
        index: 0,
    };
    let mut now_ms = 1_000;
    replica.apply(vec![Proposal {
        request_id: Some(format!("register/{WORKER}/{PREFIX}-register1")),
        command: Command::RegisterWorker {
            worker_id: WORKER.into(),
            addr: "127.0.0.1:1".into(),
            slots: 2,
            ahead: 0,
            held: Vec::new(),
            properties: Vec::new(),
            now_ms,
        },
    }]);
    let idle = live();

    let mut jobs = jobs();
    let mut parts = Vec::new();
    while jobs.len() > PART {
        let rest = jobs.split_off(PART);
        parts.push(std::mem::replace(&mut jobs, rest));
    }
    let staged_parts = parts.len() as u32;
    for (part, jobs) in parts.into_iter().enumerate() {
        let response = replica.apply(vec![Proposal::once(Command::StageSubmit {
            request_id: "submit".into(),
            part: part as u32,
            jobs,
            total_bytes: 4 << 20,
            now_ms,
        })]);
        assert_eq!(response, vec![Response::None]);
    }
    let response = replica.apply(vec![Proposal::once(Command::SubmitBuild {
        request_id: "submit".into(),
        now_ms,
        staged_parts,
        jobs,
        job_timeout_ms: 60_000,
    })]);
    assert!(
        matches!(response[..], [Response::BuildSubmitted { job_count, .. }] if job_count as usize == JOBS),
        "{response:?}"
    );
    let submitted = live() - idle;

    // The worker's first poll, then a report per job that leases the next.
    let mut calls = 0;
    let mut next_id = || {
        calls += 1;
        format!("report/{WORKER}/{PREFIX}-report{calls}")
    };
    let first = replica
        .model
        .pick_for(WORKER, 2, now_ms, 0, 60_000, &Default::default());
    let mut leased: Vec<(u64, Digest)> = match &replica.apply(vec![Proposal {
        request_id: Some(format!("poll/{WORKER}/{PREFIX}-poll0")),
        command: Command::Assign {
            worker_id: WORKER.into(),
            cache_keys: first,
            lease_timeout_ms: 60_000,
            now_ms,
        },
    }])[..]
    {
        [Response::Assigned { keys, tokens }] => keys
            .iter()
            .zip(tokens)
            .map(|(key, token)| (token.expect("leased"), *key))
            .collect(),
        other => panic!("{other:?}"),
    };
    let mut done = 0;
    while let Some((token, key)) = leased.pop() {
        now_ms += 2;
        let next =
            replica
                .model
                .pick_after_report(WORKER, token, now_ms, 0, 60_000, &Default::default());
        let request = next_id();
        let mut proposals = vec![Proposal {
            request_id: Some(request.clone()),
            command: Command::Report {
                worker_id: WORKER.into(),
                token,
                cache_key: key,
                outcome: Outcome::Success {
                    stdout: Vec::new(),
                    stderr: Vec::new(),
                    artifact: digest(3, done),
                    artifact_size: 6,
                },
                max_attempts: 3,
                queued_ms: 0,
                now_ms,
            },
        }];
        if !next.is_empty() {
            proposals.push(Proposal {
                request_id: Some(format!("{request}#next")),
                command: Command::Assign {
                    worker_id: WORKER.into(),
                    cache_keys: next,
                    lease_timeout_ms: 60_000,
                    now_ms,
                },
            });
        }
        let responses = replica.apply(proposals);
        assert_eq!(responses[0], Response::Reported { accepted: true });
        if let Some(Response::Assigned { keys, tokens }) = responses.get(1) {
            leased.insert(0, (tokens[0].expect("leased"), keys[0]));
        }
        done += 1;
    }
    assert_eq!(done, JOBS);
    let finished = live() - idle;

    let with_answers = live();
    drop(std::mem::take(&mut replica.requests));
    let answers = with_answers - live();

    let per_job = |bytes: usize| bytes as f64 / JOBS as f64;
    println!(
        "state per job: {:.0} bytes after the submit, {:.0} bytes once every job ran \
         ({:.0} of them remembered answers)",
        per_job(submitted),
        per_job(finished),
        per_job(answers),
    );
    assert!(
        per_job(submitted) <= AFTER_SUBMIT_BYTES,
        "{:.0} bytes per job after the submit",
        per_job(submitted)
    );
    assert!(
        per_job(finished) <= FINISHED_BYTES,
        "{:.0} bytes per job once every job ran",
        per_job(finished)
    );
}
