//! Crash test: a child process appends, votes, applies, truncates, snapshots,
//! purges and installs snapshots at random on one store; the parent SIGKILLs
//! it at random moments, many times, and after each kill opens the store
//! itself and checks what it acknowledged is there:
//! - the log has no holes, from the last purged id to the last entry;
//! - every append the child acknowledged (and did not later truncate) is
//!   present with the term it was written in;
//! - the vote is at least as new as every vote the child acknowledged;
//! - the state machine's state is exactly the state of its applied index.
//!
//! A plain `main` (harness = false): the same binary is the child when
//! `RAFT_STORE_CRASH_CHILD` names a directory. `CRASH_TEST_SEED` replays a
//! run; `CRASH_TEST_KILLS` sets the number of kills.

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::{RaftLogReader, RaftSnapshotBuilder, Vote};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CHILD_ENV: &str = "RAFT_STORE_CRASH_CHILD";
const CHILD_SEED_ENV: &str = "RAFT_STORE_CRASH_CHILD_SEED";

fn main() {
    match std::env::var_os(CHILD_ENV) {
        Some(dir) => child(Path::new(&dir)),
        None => parent(),
    }
}

/// What the child acknowledged, rebuilt from its output lines.
#[derive(Default)]
struct Acknowledged {
    /// index -> term of every durable append not truncated since.
    log: BTreeMap<u64, u64>,
    /// The newest vote term acknowledged.
    vote_term: u64,
}

impl Acknowledged {
    fn record(&mut self, line: &str) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| -> u64 { words[i].parse().expect("child prints numbers") };
        match words.first().copied() {
            // Acknowledged only after the flush callback reported success.
            Some("LOG") => {
                for index in num(1)..=num(2) {
                    self.log.insert(index, num(3));
                }
            }
            Some("VOTE") => self.vote_term = self.vote_term.max(num(1)),
            // Printed before truncating: from here on, those entries may be
            // gone whether or not the truncation completed.
            Some("TRUNCATING") => {
                self.log.split_off(&num(1));
            }
            _ => {}
        }
    }
}

fn parent() {
    let seed: u64 = std::env::var("CRASH_TEST_SEED")
        .ok()
        .map(|s| s.parse().expect("CRASH_TEST_SEED is a number"))
        .unwrap_or_else(|| rand::thread_rng().r#gen());
    let kills: u32 = std::env::var("CRASH_TEST_KILLS")
        .ok()
        .map(|s| s.parse().expect("CRASH_TEST_KILLS is a number"))
        .unwrap_or(40);
    println!("crash test: seed {seed} ({kills} kills); replay with CRASH_TEST_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::TempDir::new().expect("create a temporary directory");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build a tokio runtime");

    let mut acked = Acknowledged::default();
    let mut max_applied_seen = 0u64;
    let mut max_last_log_seen = 0u64;
    for round in 0..kills {
        let mut child = Command::new(std::env::current_exe().expect("current exe"))
            .env(CHILD_ENV, dir.path())
            .env(CHILD_SEED_ENV, rng.r#gen::<u64>().to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the child");
        let stdout = child.stdout.take().expect("piped stdout");
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<String>>()
        });
        // Kill at a random point of its work, after it had time to open.
        std::thread::sleep(Duration::from_millis(rng.gen_range(50..400)));
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
        let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
        assert_eq!(rc, 0, "kill the child");
        let status = child.wait().expect("reap the child");
        let lines = reader.join().expect("reader thread");
        assert!(
            !status.success(),
            "round {round}: the child exited on its own ({status}); it should run until killed. Output: {lines:?}"
        );
        let n_ops = lines.len();
        for line in &lines {
            acked.record(line);
        }

        let summary = runtime
            .block_on(check_store(dir.path(), &acked))
            .unwrap_or_else(|problem| panic!("round {round} (seed {seed}): {problem}"));
        max_applied_seen = max_applied_seen.max(summary.applied);
        max_last_log_seen = max_last_log_seen.max(summary.last_log);
        println!(
            "round {round}: {n_ops} acknowledged ops; log ({}, {}], applied {}, vote term {}",
            summary.last_purged, summary.last_log, summary.applied, summary.vote_term
        );
    }
    // The test must have exercised something: a run where nothing ever got
    // applied would check nothing.
    assert!(max_applied_seen > 0, "no entry was ever applied");
    assert!(max_last_log_seen > 0, "no entry was ever appended");
    println!("crash test passed: {kills} kills, seed {seed}");
}

struct Summary {
    last_purged: u64,
    last_log: u64,
    applied: u64,
    vote_term: u64,
}

async fn check_store(dir: &Path, acked: &Acknowledged) -> Result<Summary, String> {
    let (mut log, mut sm) = support::open(dir).map_err(|e| format!("reopen: {e}"))?;
    let state = log.get_log_state().await.map_err(|e| e.to_string())?;
    let last_purged = state.last_purged_log_id.map(|l| l.index);
    let last_log = state.last_log_id.map(|l| l.index);
    // The child never writes entry 0 (its records start at index 1), so an
    // unpurged log starts at 1.
    let first = last_purged.map(|i| i + 1).unwrap_or(1);
    let end = last_log.map(|i| i + 1).unwrap_or(0).max(first);
    let entries = log
        .try_get_log_entries(first..end)
        .await
        .map_err(|e| format!("read the log: {e}"))?;
    if entries.len() as u64 != end.saturating_sub(first) {
        return Err(format!(
            "hole: {} entries between {first} and {end}",
            entries.len()
        ));
    }
    for (offset, entry) in entries.iter().enumerate() {
        if entry.log_id.index != first + offset as u64 {
            return Err(format!(
                "entry {} at position of {}",
                entry.log_id.index,
                first + offset as u64
            ));
        }
    }
    for (&index, &term) in &acked.log {
        if Some(index) <= last_purged {
            continue;
        }
        let Some(entry) = entries.get((index - first) as usize) else {
            return Err(format!(
                "acknowledged entry {index} (term {term}) is missing; log ends at {last_log:?}"
            ));
        };
        if entry.log_id.leader_id.term != term {
            return Err(format!(
                "acknowledged entry {index} has term {}, was written in term {term}",
                entry.log_id.leader_id.term
            ));
        }
    }
    let vote = log.read_vote().await.map_err(|e| e.to_string())?;
    let vote_term = vote.map(|v| v.leader_id.term).unwrap_or(0);
    if vote_term < acked.vote_term {
        return Err(format!(
            "vote term {vote_term} is older than the acknowledged {}",
            acked.vote_term
        ));
    }

    let (applied, _) = sm.applied_state().await.map_err(|e| e.to_string())?;
    let applied = applied.map(|l| l.index).unwrap_or(0);
    let handle = sm.state();
    handle
        .read(|reader| {
            let claimed = reader
                .applied()
                .map_err(|e| e.to_string())?
                .map(|l| l.index)
                .unwrap_or(0);
            if claimed != applied {
                return Err(format!("view says applied {claimed}, store says {applied}"));
            }
            support::check_record_state(reader, applied)
        })
        .map_err(|problem| format!("state machine: {problem}"))?;
    if let Some(snapshot) = sm.get_current_snapshot().await.map_err(|e| e.to_string())? {
        let index = snapshot.meta.last_log_id.map(|l| l.index).unwrap_or(0);
        if index > applied {
            return Err(format!(
                "snapshot at {index} is ahead of the applied index {applied}"
            ));
        }
    }
    Ok(Summary {
        last_purged: last_purged.unwrap_or(0),
        last_log: last_log.unwrap_or(0),
        applied,
        vote_term,
    })
}

/// Works on the store until killed, printing each acknowledged operation.
fn child(dir: &Path) {
    let seed: u64 = std::env::var(CHILD_SEED_ENV)
        .expect("seed for the child")
        .parse()
        .expect("numeric seed");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build a tokio runtime");
    runtime.block_on(async move {
        let mut rng = StdRng::seed_from_u64(seed);
        let (mut log, mut sm) = support::open(dir).expect("open the store");
        let state = log.get_log_state().await.expect("log state");
        let mut last = state.last_log_id.map(|l| l.index).unwrap_or(0);
        let mut term = log
            .read_vote()
            .await
            .expect("read vote")
            .map(|v| v.leader_id.term)
            .unwrap_or(1)
            .max(state.last_log_id.map(|l| l.leader_id.term).unwrap_or(1));
        let mut applied = sm
            .applied_state()
            .await
            .expect("applied state")
            .0
            .map(|l| l.index)
            .unwrap_or(0);
        // Entry 0 is never written: Record commands start at index 1.
        loop {
            let op = rng.gen_range(0..100);
            if op < 4 {
                term += 1;
                log.save_vote(&Vote::new(term, 0)).await.expect("save vote");
                println!("VOTE {term}");
            } else if op < 55 {
                let n = rng.gen_range(1..=16);
                let entries: Vec<_> = (last + 1..=last + n)
                    .map(|i| support::record_entry(term, i))
                    .collect();
                log.blocking_append(entries).await.expect("append");
                println!("LOG {} {} {term}", last + 1, last + n);
                last += n;
            } else if op < 85 {
                if applied < last {
                    let end = last.min(applied + rng.gen_range(1..=32));
                    let entries = log
                        .try_get_log_entries(applied + 1..=end)
                        .await
                        .expect("read entries to apply");
                    sm.apply(entries).await.expect("apply");
                    applied = end;
                    println!("APPLIED {applied}");
                }
            } else if op < 90 {
                if last > applied {
                    let from = rng.gen_range(applied + 1..=last);
                    println!("TRUNCATING {from}");
                    log.truncate(support::log_id(term, from))
                        .await
                        .expect("truncate");
                    last = from - 1;
                    term += 1;
                    log.save_vote(&Vote::new(term, 0)).await.expect("save vote");
                    println!("VOTE {term}");
                }
            } else if op < 96 {
                let snapshot = sm
                    .get_snapshot_builder()
                    .await
                    .build_snapshot()
                    .await
                    .expect("build snapshot");
                println!("SNAPSHOT {:?}", snapshot.meta.last_log_id.map(|l| l.index));
                if let Some(upto) = snapshot.meta.last_log_id
                    && upto.index > 0
                {
                    let index = rng.gen_range(1..=upto.index);
                    let entry = log
                        .try_get_log_entries(index..=index)
                        .await
                        .expect("read entry to purge to");
                    if let Some(entry) = entry.first() {
                        log.purge(entry.log_id).await.expect("purge");
                        println!("PURGED {index}");
                    }
                }
            } else if let Some(current) = sm.get_current_snapshot().await.expect("current snapshot")
            {
                // What a lagging follower does: install a snapshot, then
                // re-apply the log after it.
                let mut receiving = sm
                    .begin_receiving_snapshot()
                    .await
                    .expect("begin receiving");
                let mut source = current.snapshot;
                tokio::io::copy(&mut source, &mut *receiving)
                    .await
                    .expect("copy the snapshot");
                sm.install_snapshot(&current.meta, receiving)
                    .await
                    .expect("install snapshot");
                applied = current.meta.last_log_id.map(|l| l.index).unwrap_or(0);
                println!("INSTALLED {applied}");
            }
            // Let the parent's kill land anywhere, including mid-operation.
            tokio::task::yield_now().await;
        }
    });
}
