//! The live status page's data (`/status.json`, drawn by `page.html`): the
//! cluster as `cluster status` shows it, the workers, and the newest
//! builds with their progress, running jobs and failures.
//!
//! Any replica answers from its own applied state (a follower's may lag
//! its leader by its apply lag); heartbeat figures (a worker's cache size)
//! are known only to the leader that received them, `null` elsewhere.
//!
//! Bounded work per request: the members are asked at most once a
//! second however many browsers poll; [`MAX_BUILDS`] builds, each showing
//! at most [`MAX_RUNNING_SHOWN`] running jobs and [`MAX_FAILURES_SHOWN`]
//! failures with [`MAX_STDERR_SHOWN`] bytes of stderr. Cached counts and
//! failures come from each build's events, read incrementally (at most
//! [`MAX_EVENTS_PER_REQUEST`] per build per request) and summarized per
//! build while it is shown.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use distbuild_model::{BUILD_CANCELLED, Event, ExecState};
use distbuild_proto::text::shortened;
use distbuild_proto::v1::ClusterStatusResponse;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::replica::Node;

/// Builds shown, newest first.
pub const MAX_BUILDS: usize = 20;
/// Running jobs shown per build.
pub const MAX_RUNNING_SHOWN: usize = 50;
/// Failures shown per build (the first ones).
pub const MAX_FAILURES_SHOWN: usize = 10;
/// Bytes of a failure's stderr shown (its end, where the error is).
pub const MAX_STDERR_SHOWN: usize = 4096;
/// Events of one build read per request.
pub const MAX_EVENTS_PER_REQUEST: usize = 5000;
/// How long one answer from the members is reused.
const MEMBERS_FRESH: Duration = Duration::from_secs(1);

/// What the events of one build said so far.
#[derive(Default)]
struct Summary {
    next_seq: u64,
    cached: u64,
    failures: Vec<Value>,
    cancelled: bool,
}

/// The page's memory: the members' last answer, the builds' summaries.
pub struct StatusPage {
    node: Arc<Node>,
    members: tokio::sync::Mutex<Option<(Instant, ClusterStatusResponse)>>,
    summaries: Mutex<BTreeMap<u64, Summary>>,
}

impl StatusPage {
    pub fn new(node: Arc<Node>) -> Self {
        Self {
            node,
            members: tokio::sync::Mutex::new(None),
            summaries: Mutex::default(),
        }
    }

    async fn cluster(&self) -> ClusterStatusResponse {
        let mut members = self.members.lock().await;
        match &*members {
            Some((at, status)) if at.elapsed() < MEMBERS_FRESH => status.clone(),
            _ => {
                let status = super::admin::cluster_status(&self.node).await;
                *members = Some((Instant::now(), status.clone()));
                status
            }
        }
    }

    /// The page's data now.
    pub async fn status(&self) -> Value {
        let cluster = self.cluster().await;
        let node = &self.node;
        let now = node.now_ms();
        let stats = node.worker_stats();
        let alive_ms = node.tuning().lease_timeout_ms;
        // One look at the model: everything it says, copied out.
        let (workers, builds) = {
            let model = node.model();
            let workers: Vec<Value> = model
                .workers()
                .iter()
                .map(|(id, w)| {
                    let seen_ago = now.saturating_sub(w.last_seen_ms);
                    json!({
                        "id": id,
                        "addr": w.addr,
                        "slots": w.slots,
                        "running": w.running,
                        "alive": seen_ago < alive_ms,
                        "last_seen_ms_ago": seen_ago,
                        "cache_bytes": stats.get(id).map(|s| s.cache_bytes),
                        "draining": w.draining,
                        "properties": w.properties.iter()
                            .map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
                    })
                })
                .collect();
            let mut builds: Vec<(u64, Value, Vec<Value>)> = Vec::new();
            for (&id, build) in model.builds().rev().take(MAX_BUILDS) {
                let h = &build.header;
                let succeeded = h
                    .job_count
                    .saturating_sub(h.remaining + h.failed + h.skipped);
                let value = json!({
                    "id": id,
                    "submitted_ms_ago": now.saturating_sub(h.created_ms),
                    "finished_ms_ago": h.finished.then(|| now.saturating_sub(h.finished_ms)),
                    "jobs": h.job_count,
                    "succeeded": succeeded,
                    "failed": h.failed,
                    "skipped": h.skipped,
                    "finished": h.finished,
                    "ok": h.failed == 0 && h.skipped == 0,
                });
                builds.push((id, value, Vec::new()));
            }
            // Running jobs, from the leases (as many as slots), not from a
            // walk of every job.
            for exec in model.running_executions() {
                let ExecState::Running {
                    worker_id,
                    started_ms,
                    ..
                } = &exec.state
                else {
                    continue;
                };
                for &(build_id, job) in &exec.waiters {
                    let Some((_, _, running)) = builds.iter_mut().find(|(id, ..)| *id == build_id)
                    else {
                        continue;
                    };
                    if running.len() >= MAX_RUNNING_SHOWN {
                        continue;
                    }
                    let name = model
                        .build(build_id)
                        .map(|b| b.jobs[job as usize].spec.name.clone())
                        .unwrap_or_default();
                    running.push(json!({
                        "job": shortened(&name, 200),
                        "worker": worker_id,
                        "elapsed_ms": now.saturating_sub(*started_ms),
                    }));
                }
            }
            (workers, builds)
        };
        let shown: Vec<u64> = builds.iter().map(|(id, ..)| *id).collect();
        self.read_events(&shown);
        let summaries = self.summaries.lock().expect("summaries lock poisoned");
        let builds: Vec<Value> = builds
            .into_iter()
            .map(|(id, mut value, running)| {
                let summary = summaries.get(&id);
                let cached = summary.map_or(0, |s| s.cached);
                let finished = value["finished"].as_bool().unwrap_or(false);
                let ok = value["ok"].as_bool().unwrap_or(false);
                let state = match (finished, ok, summary.is_some_and(|s| s.cancelled)) {
                    (false, ..) => "running",
                    (true, _, true) => "cancelled",
                    (true, true, _) => "succeeded",
                    (true, false, _) => "failed",
                };
                let map = value.as_object_mut().expect("an object");
                map.remove("finished");
                map.remove("ok");
                map.insert("state".into(), state.into());
                map.insert("cached".into(), cached.into());
                map.insert("running".into(), running.into());
                map.insert(
                    "failures".into(),
                    summary.map_or(Value::Array(Vec::new()), |s| s.failures.clone().into()),
                );
                value
            })
            .collect();
        json!({
            "generated_at_ms": now,
            "answered_by": node.node_id(),
            "cluster": {
                "leader": cluster.leader,
                "members": cluster.members.iter().map(|m| json!({
                    "node_id": m.node_id,
                    "addr": m.addr,
                    "voter": m.voter,
                    "role": m.role,
                    "term": m.term,
                    "last_log_index": m.last_log_index,
                    "applied_index": m.applied_index,
                    "lag": m.lag,
                    "error": m.error,
                })).collect::<Vec<_>>(),
            },
            "workers": workers,
            "builds": builds,
        })
    }

    /// Brings the summaries of the builds `shown` up to date with their
    /// events, and forgets the others'.
    fn read_events(&self, shown: &[u64]) {
        let mut summaries = self.summaries.lock().expect("summaries lock poisoned");
        summaries.retain(|id, _| shown.contains(id));
        for &build in shown {
            let summary = summaries.entry(build).or_default();
            let Ok(events) =
                self.node
                    .read_events(build, summary.next_seq, MAX_EVENTS_PER_REQUEST, 8 << 20)
            else {
                continue;
            };
            for stored in events {
                summary.next_seq = stored.seq + 1;
                match stored.event {
                    Event::JobFinished { cached: true, .. } => summary.cached += 1,
                    Event::JobFinished {
                        job,
                        exit_code,
                        error,
                        ..
                    } if (exit_code != 0 || error.is_some())
                        && summary.failures.len() < MAX_FAILURES_SHOWN =>
                    {
                        let name = self
                            .node
                            .model()
                            .build(build)
                            .map(|b| b.jobs[job as usize].spec.name.clone())
                            .unwrap_or_default();
                        let stderr = stored
                            .output
                            .map(|o| tail(&o.stderr, MAX_STDERR_SHOWN))
                            .unwrap_or_default();
                        summary.failures.push(json!({
                            "job": shortened(&name, 200),
                            "exit_code": exit_code,
                            "error": error.map(|e| shortened(&e, 1000)),
                            "stderr": stderr,
                        }));
                    }
                    Event::BuildFinished {
                        error: Some(error), ..
                    } if error == BUILD_CANCELLED => summary.cancelled = true,
                    _ => {}
                }
            }
        }
    }
}

/// The last `max` bytes of `bytes` as text, starting on a character
/// boundary.
fn tail(bytes: &[u8], max: usize) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_string()
}

#[cfg(test)]
mod tests {
    use super::tail;

    #[test]
    fn tail_cuts_on_a_character_boundary() {
        assert_eq!(tail(b"abcdef", 3), "def");
        assert_eq!(tail(b"ab", 3), "ab");
        // "é" is two bytes: a cut inside it moves past it.
        assert_eq!(tail("aéb".as_bytes(), 2), "b");
    }
}
