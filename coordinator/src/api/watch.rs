//! `WatchBuild`'s event stream and its bounds. A stream reads the build's
//! stored events a page at a time (at most `EVENTS_PER_READ` events and
//! `WATCH_PAGE_BYTES` of them, outputs included, past the first), straight
//! from the store, and reads the next page only when the caller has taken
//! the last one: what one watcher holds is one page, whatever the build's
//! size. It ends after the build's last event. Each node serves at most
//! `MAX_WATCHERS_PER_NODE` streams and `MAX_WATCHERS_PER_BUILD` per build;
//! more are refused with RESOURCE_EXHAUSTED and a retry hint.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use distbuild_model::Event;
use distbuild_model::tables::StoredEvent;
use distbuild_proto::v1::{self, BuildEvent, build_event};
use distbuild_proto::wire::digest_to_wire;
use tonic::Status;

use super::ResponseStream;
use super::status::busy;
use crate::replica::Node;

/// Events read per state view while streaming.
const EVENTS_PER_READ: usize = 256;
/// Bytes of events (their outputs included) one read holds past its first
/// event; a single event is at most two job outputs and an error line.
pub const WATCH_PAGE_BYTES: usize = 4 << 20;
/// Concurrent event streams of one build on one node.
pub const MAX_WATCHERS_PER_BUILD: usize = 16;
/// Concurrent event streams on one node.
pub const MAX_WATCHERS_PER_NODE: usize = 1024;
/// What a refused watcher is told to wait before trying again.
const WATCHER_RETRY_AFTER: Duration = Duration::from_millis(500);

/// The streams a node serves now, per build.
#[derive(Default, Clone)]
pub struct Watchers {
    by_build: Arc<Mutex<HashMap<u64, usize>>>,
}

/// One stream's place among a node's watchers, given back when the stream
/// is dropped (it ended, or its caller went away).
pub struct WatcherSlot {
    watchers: Watchers,
    build_id: u64,
}

impl Watchers {
    /// A place for one more stream of `build_id`, or RESOURCE_EXHAUSTED.
    pub fn admit(&self, build_id: u64) -> Result<WatcherSlot, Status> {
        let mut by_build = self.by_build.lock().expect("watchers lock poisoned");
        let total: usize = by_build.values().sum();
        if total >= MAX_WATCHERS_PER_NODE {
            return Err(busy(
                format!(
                    "this coordinator already streams {total} watchers, its limit; retry later"
                ),
                WATCHER_RETRY_AFTER,
            ));
        }
        let of_build = by_build.entry(build_id).or_default();
        if *of_build >= MAX_WATCHERS_PER_BUILD {
            return Err(busy(
                format!(
                    "build {build_id} already has {MAX_WATCHERS_PER_BUILD} watchers on this coordinator, its limit; retry later"
                ),
                WATCHER_RETRY_AFTER,
            ));
        }
        *of_build += 1;
        Ok(WatcherSlot {
            watchers: self.clone(),
            build_id,
        })
    }

    /// Streams served now.
    pub fn count(&self) -> usize {
        self.by_build
            .lock()
            .expect("watchers lock poisoned")
            .values()
            .sum()
    }
}

impl Drop for WatcherSlot {
    fn drop(&mut self) {
        let mut by_build = self
            .watchers
            .by_build
            .lock()
            .expect("watchers lock poisoned");
        if let Some(n) = by_build.get_mut(&self.build_id) {
            *n -= 1;
            if *n == 0 {
                by_build.remove(&self.build_id);
            }
        }
    }
}

/// Where a stream is.
struct Cursor {
    node: Arc<Node>,
    build_id: u64,
    /// The next event to read from the store.
    next_seq: u64,
    last_applied: Option<u64>,
    page: VecDeque<StoredEvent>,
    done: bool,
    _slot: WatcherSlot,
}

/// The events of `build_id` from `from_seq` on, to the last.
pub fn stream_events(
    node: Arc<Node>,
    build_id: u64,
    from_seq: u64,
    slot: WatcherSlot,
) -> ResponseStream<BuildEvent> {
    let cursor = Cursor {
        node,
        build_id,
        next_seq: from_seq,
        last_applied: None,
        page: VecDeque::new(),
        done: false,
        _slot: slot,
    };
    Box::pin(futures::stream::unfold(cursor, |mut cursor| async move {
        if cursor.done {
            return None;
        }
        match cursor.next().await {
            Ok(event) => {
                cursor.done = matches!(event.event, Some(build_event::Event::BuildFinished(_)));
                Some((Ok(event), cursor))
            }
            Err(status) => {
                cursor.done = true;
                Some((Err(status), cursor))
            }
        }
    }))
}

impl Cursor {
    /// The next event, waiting for it to be applied if need be.
    async fn next(&mut self) -> Result<BuildEvent, Status> {
        loop {
            if let Some(stored) = self.page.pop_front() {
                return Ok(event_to_wire(&self.node, self.build_id, stored));
            }
            let page = self.node.read_events(
                self.build_id,
                self.next_seq,
                EVENTS_PER_READ,
                WATCH_PAGE_BYTES,
            )?;
            if let Some(last) = page.last() {
                self.next_seq = last.seq + 1;
                self.page = page.into();
                continue;
            }
            // The caller resumes from `next_seq` at the new leader.
            self.node.check_leader()?;
            if self.node.model().build(self.build_id).is_none() {
                // Retired (it had finished) before this stream read it all.
                return Err(Status::not_found(format!(
                    "build {} was retired before its events from {} were read",
                    self.build_id, self.next_seq
                )));
            }
            if self.node.shutdown_token().is_cancelled() {
                return Err(Status::unavailable(
                    "the coordinator is stopping; reconnect",
                ));
            }
            self.node
                .wait_for_change(&mut self.last_applied, Duration::from_secs(1))
                .await;
        }
    }
}

/// The wire form of a stored event.
fn event_to_wire(node: &Node, build_id: u64, stored: StoredEvent) -> BuildEvent {
    let job_label = |job: u32| {
        node.model()
            .build(build_id)
            .and_then(|b| b.jobs.get(job as usize))
            .map(|j| (j.spec.job_id.to_string(), j.spec.name.clone()))
            .unwrap_or_default()
    };
    let event = match stored.event {
        Event::JobStarted { job, worker_id } => {
            let (job_id, name) = job_label(job);
            build_event::Event::JobStarted(v1::JobStarted {
                job_id,
                name,
                worker_id,
            })
        }
        Event::JobFinished {
            job,
            exit_code,
            output: _,
            cached,
            error,
            artifact,
        } => {
            let (job_id, name) = job_label(job);
            let output = stored.output.unwrap_or_default();
            build_event::Event::JobFinished(v1::JobFinished {
                job_id,
                name,
                exit_code,
                stdout: output.stdout.into(),
                stderr: output.stderr.into(),
                cached,
                error: error.unwrap_or_default(),
                artifact_digest: artifact
                    .map(|(d, _)| digest_to_wire(&d))
                    .unwrap_or_default(),
                artifact_size: artifact.map_or(0, |(_, size)| size),
            })
        }
        Event::JobSkipped { job, reason } => {
            let (job_id, name) = job_label(job);
            build_event::Event::JobSkipped(v1::JobSkipped {
                job_id,
                name,
                reason,
            })
        }
        Event::BuildFinished { ok, error } => {
            build_event::Event::BuildFinished(v1::BuildFinished {
                ok,
                error: error.unwrap_or_default(),
            })
        }
    };
    BuildEvent {
        seq: stored.seq,
        event: Some(event),
    }
}
