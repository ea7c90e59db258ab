//! The log's bytes, pinned. Every replica writes `Proposal`s (a `Command`
//! inside) to its Raft log, `Response`s to the remembered-answers table and
//! `Event`s to the events table, all in postcard; the tables hold the other
//! records. Those bytes are an interface between versions: a replica must
//! read what an older one wrote. This test encodes one value of every
//! variant and a whole scripted run's tables, and compares them with the
//! files under `golden/`. A failure means the encoding changed: if that is
//! deliberate, bump raft-store's store format and regenerate the files with
//! `DISTBUILD_UPDATE_GOLDEN=1 cargo test golden`.

use std::fmt::Write as _;

use serde::de::{self, DeserializeOwned, Visitor};
use serde::forward_to_deserialize_any;

use distbuild_proto::{BlobKey, Digest, JobId};
use serde::Serialize;

use super::*;

const LOG_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/golden/log.txt");
const TABLES_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/golden/tables.txt");

/// The names of `T`'s variants, as serde declares them to a deserializer
/// (in declaration order: postcard encodes a variant as its position).
fn variants<T: DeserializeOwned>() -> &'static [&'static str] {
    struct Probe(Option<&'static [&'static str]>);
    #[derive(Debug)]
    struct Stop;
    impl std::fmt::Display for Stop {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("probe stops here")
        }
    }
    impl std::error::Error for Stop {}
    impl de::Error for Stop {
        fn custom<M: std::fmt::Display>(_: M) -> Self {
            Stop
        }
    }
    impl<'de> de::Deserializer<'de> for &mut Probe {
        type Error = Stop;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_enum<V: Visitor<'de>>(
            self,
            _name: &'static str,
            variants: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            self.0 = Some(variants);
            Err(Stop)
        }
        forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map struct identifier ignored_any
        }
    }
    let mut probe = Probe(None);
    let _ = T::deserialize(&mut probe);
    probe.0.expect("an enum")
}

fn hex_of(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

fn digest(n: u8) -> Digest {
    Digest::from_bytes([n; 20])
}

fn spec(n: u8) -> JobSpec {
    JobSpec {
        job_id: JobId::from_bytes([n; 20]),
        name: format!("job é{n}"),
        cmds: vec![
            CmdText::Exec {
                argv: vec!["cc".into(), "-c".into(), "{{.SourceDir}}/a.c".into()],
                environ: vec!["LANG=C".into()],
                working_directory: "{{.OutputDir}}".into(),
            },
            CmdText::Cat {
                template: "x{{.Dep \"a\"}}".into(),
                output: "{{.OutputDir}}/o".into(),
            },
        ],
        inputs: vec![InputRef {
            path: "src/a.c".into(),
            digest: digest(200),
            size: 300,
        }],
        deps: vec![DepRef {
            job_id: JobId::from_bytes([n + 1; 20]),
            cache_key: digest(n + 1),
            artifact: digest(n + 101),
        }],
        action: None,
    }
}

/// A Remote Execution API action's job.
fn action_spec(n: u8) -> JobSpec {
    JobSpec {
        job_id: JobId::from_bytes([n; 20]),
        name: format!("action {n}"),
        cmds: Vec::new(),
        inputs: Vec::new(),
        deps: Vec::new(),
        action: Some(Box::new(RemoteAction {
            instance_name: "main".into(),
            action: BlobKey::Sha256([n; 32]),
            action_size: 140,
            do_not_cache: true,
            platform: vec![("OSFamily".into(), "Linux".into())],
        })),
    }
}

fn submitted(n: u8) -> SubmittedJob {
    SubmittedJob {
        cache_key: digest(n),
        deps: vec![0],
        spec: spec(n),
    }
}

fn commands() -> Vec<Command> {
    vec![
        Command::StageSubmit {
            request_id: "req-1".into(),
            part: 2,
            jobs: vec![submitted(1)],
            total_bytes: 4_000,
            now_ms: 1_700_000_000_123,
        },
        Command::CancelBuild {
            build_id: 77,
            now_ms: 5,
        },
        Command::SubmitBuild {
            job_timeout_ms: 60_000,
            request_id: "req-1".into(),
            now_ms: 6,
            staged_parts: 3,
            jobs: vec![submitted(2)],
        },
        Command::SubmitBuild {
            job_timeout_ms: 1_000,
            request_id: "op-1".into(),
            now_ms: 6,
            staged_parts: 0,
            jobs: vec![SubmittedJob {
                cache_key: digest(30),
                deps: Vec::new(),
                spec: action_spec(30),
            }],
        },
        Command::RegisterWorker {
            worker_id: "w-1".into(),
            addr: "127.0.0.1:4000".into(),
            slots: 8,
            ahead: 1,
            held: vec![digest(3), digest(4)],
            properties: vec![("OSFamily".into(), "Linux".into())],
            now_ms: 7,
        },
        Command::Assign {
            worker_id: "w-1".into(),
            cache_keys: vec![digest(5)],
            lease_timeout_ms: 10_000,
            now_ms: 8,
        },
        Command::Heartbeat {
            worker_id: "w-1".into(),
            tokens: vec![1024 * 9 + 1, u64::MAX],
            added: vec![digest(6)],
            dropped: vec![digest(7)],
            lease_timeout_ms: 10_000,
            now_ms: 9,
        },
        Command::Report {
            worker_id: "w-1".into(),
            token: 4096,
            cache_key: digest(8),
            outcome: Outcome::Success {
                stdout: b"out\n".to_vec(),
                stderr: vec![0xff, 0],
                artifact: digest(9),
                artifact_size: 123_456,
            },
            max_attempts: 3,
            queued_ms: 25,
            now_ms: 10,
        },
        Command::Report {
            worker_id: "w-1".into(),
            token: 4097,
            cache_key: digest(8),
            outcome: Outcome::Failure {
                exit_code: -2,
                stdout: Vec::new(),
                stderr: b"no".to_vec(),
                error: Some("no such program".into()),
            },
            max_attempts: 3,
            queued_ms: 25,
            now_ms: 11,
        },
        Command::Report {
            worker_id: "w-1".into(),
            token: 4098,
            cache_key: digest(8),
            outcome: Outcome::LostInputs {
                lost: vec![(digest(10), vec!["10.0.0.1:1".into(), "10.0.0.2:1".into()])],
            },
            max_attempts: 3,
            queued_ms: 25,
            now_ms: 12,
        },
        Command::Report {
            worker_id: "w-1".into(),
            token: 4099,
            cache_key: digest(30),
            outcome: Outcome::Executed {
                exit_code: 1,
                stdout: b"o".to_vec(),
                stderr: Vec::new(),
                result: vec![0x20, 1],
                blobs: vec![(BlobKey::Sha256([31; 32]), 1)],
            },
            max_attempts: 3,
            queued_ms: 25,
            now_ms: 12,
        },
        Command::ExpireLeases {
            now_ms: 13,
            max_attempts: 3,
            worker_timeout_ms: 40_000,
        },
        Command::ExtendLeases {
            now_ms: 14,
            lease_timeout_ms: 10_000,
        },
        Command::BlobStored {
            digest: digest(11).into(),
            size: 1 << 40,
        },
        Command::BlobStored {
            digest: distbuild_proto::BlobKey::Sha256([12; 32]),
            size: 3,
        },
        Command::ActionResultStored {
            instance_name: "main".into(),
            action: distbuild_proto::BlobKey::Sha256([13; 32]),
            result: vec![1, 2, 3],
            blobs: vec![(distbuild_proto::BlobKey::Sha256([12; 32]), 3)],
            now_ms: 15,
        },
        Command::Used {
            blobs: vec![distbuild_proto::BlobKey::Sha256([12; 32])],
            action_results: vec![("main".into(), distbuild_proto::BlobKey::Sha256([13; 32]))],
            now_ms: 16,
        },
        Command::CollectGarbage {
            now_ms: 1_700_000_000_777,
            limits: GcLimits {
                blob_retention_ms: 259_200_000,
                max_blob_bytes: 20 << 30,
                max_results: 200_000,
                max_result_bytes: 1 << 30,
            },
        },
        Command::Batch {
            proposals: vec![
                Proposal {
                    request_id: Some("report/w-1/7".into()),
                    command: Command::BlobStored {
                        digest: distbuild_proto::BlobKey::Sha1(digest(3)),
                        size: 12,
                    },
                },
                Proposal::once(Command::ExtendLeases {
                    now_ms: 17,
                    lease_timeout_ms: 10_000,
                }),
            ],
        },
        Command::DrainWorker {
            worker_id: "w-1".into(),
            now_ms: 18,
        },
        Command::DeregisterWorker {
            worker_id: "w-1".into(),
            now_ms: 19,
        },
    ]
}

fn responses() -> Vec<Response> {
    vec![
        Response::None,
        Response::BuildSubmitted {
            build_id: 42,
            job_count: 7,
        },
        Response::Cancelled { cancelled: true },
        Response::Refused {
            reason: "part 3 is missing".into(),
            retry: true,
        },
        Response::Busy {
            reason: "staging is full".into(),
        },
        Response::Assigned {
            keys: vec![digest(1), digest(2)],
            tokens: vec![Some(43_008), None],
        },
        Response::Heartbeat {
            revoked: vec![43_008],
            reregister: false,
        },
        Response::Reported { accepted: true },
        Response::Expired {
            tokens: vec![1, 2, 3],
        },
        Response::Collected(Collected {
            blobs: 2,
            blob_bytes: 4096,
            results: 1,
            action_results: 2,
        }),
        Response::Batch {
            responses: vec![Response::None, Response::Reported { accepted: false }],
        },
        Response::Worker { found: true },
    ]
}

fn events() -> Vec<Event> {
    vec![
        Event::JobStarted {
            job: 3,
            worker_id: "w-1".into(),
        },
        Event::JobFinished {
            job: 3,
            exit_code: 0,
            output: Some(OutputRef {
                id: 31_337,
                bytes: 2_000_000,
            }),
            cached: true,
            error: None,
            artifact: Some((digest(12), 99)),
        },
        Event::JobSkipped {
            job: 4,
            reason: "dependency failed".into(),
        },
        Event::BuildFinished {
            ok: false,
            error: Some("1 job failed".into()),
        },
    ]
}

/// `kind variant hex` for each value, after checking that the values
/// cover every variant and decode back to themselves.
fn lines_of<T>(kind: &str, values: &[T], out: &mut String)
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let names = variants::<T>();
    let mut covered = vec![false; names.len()];
    for value in values {
        let bytes = postcard::to_stdvec(value).expect("encode");
        let back: T = postcard::from_bytes(&bytes).expect("decode");
        assert_eq!(&back, value, "{kind} decodes to itself");
        // Fewer than 128 variants: the first byte is the variant's position.
        let position = bytes[0] as usize;
        covered[position] = true;
        writeln!(out, "{kind} {} {}", names[position], hex_of(&bytes)).expect("string");
    }
    let missing: Vec<_> = names
        .iter()
        .zip(&covered)
        .filter(|(_, c)| !**c)
        .map(|(n, _)| *n)
        .collect();
    assert!(
        missing.is_empty(),
        "{kind}: no golden value for {missing:?}"
    );
}

/// Compares `actual` with the checked-in file (or rewrites it, on request).
fn check_golden(path: &str, actual: &str) {
    if std::env::var_os("DISTBUILD_UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(std::path::Path::new(path).parent().expect("a parent"))
            .expect("golden dir");
        std::fs::write(path, actual).expect("write golden file");
        return;
    }
    let expected = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    for (i, (want, got)) in expected.lines().zip(actual.lines()).enumerate() {
        assert_eq!(
            want,
            got,
            "{path} line {}: the encoding changed (bump the store format if that is meant)",
            i + 1
        );
    }
    assert_eq!(
        expected.lines().count(),
        actual.lines().count(),
        "{path}: line count"
    );
}

#[test]
fn every_log_value_encodes_as_pinned() {
    let mut out = String::new();
    lines_of("Command", &commands(), &mut out);
    let proposals = [
        Proposal::once(commands()[1].clone()),
        Proposal {
            request_id: Some("worker-7:poll-3#0".into()),
            command: commands()[4].clone(),
        },
    ];
    for proposal in &proposals {
        let bytes = postcard::to_stdvec(proposal).expect("encode");
        let back: Proposal = postcard::from_bytes(&bytes).expect("decode");
        assert_eq!(&back, proposal);
        writeln!(out, "Proposal - {}", hex_of(&bytes)).expect("string");
    }
    lines_of("Response", &responses(), &mut out);
    lines_of("Event", &events(), &mut out);
    check_golden(LOG_FILE, &out);
}

/// A scripted run through every command, and the tables it leaves, key by
/// key: the storage layout (table names, keys, records) is pinned too.
#[test]
fn a_scripted_run_leaves_the_pinned_tables() {
    let mut model = Model::default();
    let mut requests = Requests::default();
    let mut store = super::MemStore::default();
    let a = |n: u8| SubmittedJob {
        cache_key: digest(n),
        deps: Vec::new(),
        spec: JobSpec {
            deps: Vec::new(),
            ..spec(n)
        },
    };
    let b = SubmittedJob {
        cache_key: digest(2),
        deps: vec![0],
        spec: JobSpec {
            deps: Vec::new(),
            ..spec(2)
        },
    };
    let script = vec![
        Proposal::once(Command::BlobStored {
            digest: digest(200).into(),
            size: 300,
        }),
        Proposal {
            request_id: Some("w1-register".into()),
            command: Command::RegisterWorker {
                worker_id: "w1".into(),
                addr: "127.0.0.1:4001".into(),
                slots: 2,
                ahead: 0,
                held: vec![digest(50)],
                properties: Vec::new(),
                now_ms: 1_000,
            },
        },
        Proposal::once(Command::RegisterWorker {
            worker_id: "w2".into(),
            addr: "127.0.0.1:4002".into(),
            slots: 1,
            ahead: 0,
            held: Vec::new(),
            properties: Vec::new(),
            now_ms: 1_001,
        }),
        // One build staged in two parts (a chain 1 -> 2, and 3 alone) and
        // another staged and never completed.
        Proposal::once(Command::StageSubmit {
            request_id: "build-a".into(),
            part: 0,
            jobs: vec![a(1)],
            total_bytes: 1_000,
            now_ms: 1_002,
        }),
        Proposal::once(Command::StageSubmit {
            request_id: "build-z".into(),
            part: 0,
            jobs: vec![a(9)],
            total_bytes: 1_000,
            now_ms: 1_002,
        }),
        Proposal::once(Command::SubmitBuild {
            job_timeout_ms: 60_000,
            request_id: "build-a".into(),
            now_ms: 1_003,
            staged_parts: 1,
            jobs: vec![b.clone(), a(3)],
        }),
        Proposal {
            request_id: Some("w1-poll#0".into()),
            command: Command::Assign {
                worker_id: "w1".into(),
                cache_keys: vec![digest(1), digest(3)],
                lease_timeout_ms: 1_000,
                now_ms: 1_004,
            },
        },
        Proposal {
            request_id: Some("w1-hb".into()),
            command: Command::Heartbeat {
                worker_id: "w1".into(),
                tokens: vec![7 * MAX_ASSIGN_BATCH, 7 * MAX_ASSIGN_BATCH + 1],
                added: vec![digest(51)],
                dropped: vec![digest(50)],
                lease_timeout_ms: 1_000,
                now_ms: 1_005,
            },
        },
        Proposal {
            request_id: Some("w1-report".into()),
            command: Command::Report {
                worker_id: "w1".into(),
                token: 7 * MAX_ASSIGN_BATCH,
                cache_key: digest(1),
                outcome: Outcome::Success {
                    stdout: b"one\n".to_vec(),
                    stderr: Vec::new(),
                    artifact: digest(101),
                    artifact_size: 10,
                },
                max_attempts: 3,
                queued_ms: 25,
                now_ms: 1_006,
            },
        },
        Proposal::once(Command::Report {
            worker_id: "w1".into(),
            token: 7 * MAX_ASSIGN_BATCH + 1,
            cache_key: digest(3),
            outcome: Outcome::Failure {
                exit_code: 1,
                stdout: Vec::new(),
                stderr: b"bad\n".to_vec(),
                error: None,
            },
            max_attempts: 3,
            queued_ms: 25,
            now_ms: 1_007,
        }),
        // A second build with job 1 (cached) and job 2 (queued again).
        Proposal::once(Command::SubmitBuild {
            job_timeout_ms: 60_000,
            request_id: "build-b".into(),
            now_ms: 1_008,
            staged_parts: 0,
            jobs: vec![a(1), b.clone()],
        }),
        Proposal::once(Command::Assign {
            worker_id: "w2".into(),
            cache_keys: vec![digest(2)],
            lease_timeout_ms: 1_000,
            now_ms: 1_009,
        }),
        Proposal::once(Command::Report {
            worker_id: "w2".into(),
            token: 12 * MAX_ASSIGN_BATCH,
            cache_key: digest(2),
            outcome: Outcome::LostInputs {
                lost: vec![(digest(101), vec!["127.0.0.1:4001".into()])],
            },
            max_attempts: 3,
            queued_ms: 25,
            now_ms: 1_010,
        }),
        Proposal::once(Command::ExtendLeases {
            now_ms: 1_011,
            lease_timeout_ms: 1_000,
        }),
        Proposal::once(Command::ExpireLeases {
            now_ms: 5_000,
            max_attempts: 3,
            worker_timeout_ms: 1_000_000,
        }),
        Proposal::once(Command::CancelBuild {
            build_id: 11,
            now_ms: 5_001,
        }),
        // Leaving: a worker record says it drains.
        Proposal::once(Command::DrainWorker {
            worker_id: "w2".into(),
            now_ms: 5_001,
        }),
        // A retry: answered from memory, nothing applied.
        Proposal {
            request_id: Some("w1-report".into()),
            command: Command::Report {
                worker_id: "w1".into(),
                token: 7 * MAX_ASSIGN_BATCH,
                cache_key: digest(1),
                outcome: Outcome::Success {
                    stdout: b"one\n".to_vec(),
                    stderr: Vec::new(),
                    artifact: digest(101),
                    artifact_size: 10,
                },
                max_attempts: 3,
                queued_ms: 25,
                now_ms: 5_002,
            },
        },
        // Keeps what the builds in flight need; drops the rest.
        Proposal::once(Command::CollectGarbage {
            now_ms: 5_003,
            limits: GcLimits {
                blob_retention_ms: 0,
                max_blob_bytes: 0,
                max_results: 0,
                max_result_bytes: 0,
            },
        }),
    ];
    let mut out = String::new();
    for (i, proposal) in script.iter().enumerate() {
        let index = i as u64 + 1;
        let response = requests.apply(&mut model, index, proposal);
        model.flush(&mut store).expect("flush");
        requests.flush(&mut store).expect("flush requests");
        let bytes = postcard::to_stdvec(&response).expect("encode");
        writeln!(out, "response {index} {}", hex_of(&bytes)).expect("string");
    }
    for (table, rows) in &store.tables {
        for (key, value) in rows {
            writeln!(out, "{table} {} {}", hex_of(key), hex_of(value)).expect("string");
        }
    }
    check_golden(TABLES_FILE, &out);
}
