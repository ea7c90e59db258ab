//! Leaving gracefully, and helping others leave.
//!
//! A worker drains on SIGTERM (`WorkerConfig::drain`) or when a heartbeat
//! answer says an operator drained it (`cluster drain-worker`). Draining,
//! it tells the leader (`Drain`: no new work for it), polls no more, lets
//! its running jobs finish and report, and keeps heartbeating and serving
//! its peers until an answer says it may leave: nothing of it runs and
//! every output only it holds that a build in flight needs was copied to
//! another worker. Then it deregisters and stops. Past the drain timeout
//! it stops its jobs and leaves anyway: deregistering hands their leases
//! back (they run elsewhere, no attempt counted).
//!
//! The copies: a heartbeat answer may list artifacts for this worker to
//! fetch from a draining one; it fetches them (at most
//! [`super::MAX_COPIES_AT_ONCE`] at once, [`MAX_COPIES_PENDING`] known) into its
//! cache and reports them as added in its next heartbeat.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::coordinator::Persistence;
use distbuild_proto::v1::{DepArtifact, LeaveRequest};
use distbuild_proto::wire::digest_from_wire;

use super::Worker;
use crate::fetch::fetch_artifact;

/// Copies known and not yet fetched, at most (more are asked for again).
pub const MAX_COPIES_PENDING: usize = 64;
/// How long a `Drain` or `Deregister` call is retried.
const LEAVE_CALL_WINDOW: Duration = Duration::from_secs(30);
/// How often a draining worker looks whether it may leave.
const CHECK_EVERY: Duration = Duration::from_millis(100);

impl Worker {
    /// Drains (see the module), then stops the worker.
    pub(super) async fn drain_and_leave(self: &Arc<Self>, timeout: Duration) {
        let give_up = tokio::time::Instant::now() + timeout;
        let mut timed_out = false;
        loop {
            let running = self.running();
            if running == 0 && self.may_leave.load(Ordering::Relaxed) {
                break;
            }
            if tokio::time::Instant::now() >= give_up {
                timed_out = true;
                break;
            }
            // A registration since (a coordinator asked for one) ended the
            // drain on its side: say it again.
            if self.drain_forgotten.swap(false, Ordering::Relaxed) {
                self.tell_draining().await;
            }
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                () = tokio::time::sleep(CHECK_EVERY) => {}
            }
        }
        if timed_out {
            tracing::warn!(
                running = self.running(),
                "drain timed out: stopping running jobs and handing them back"
            );
            for job in self.jobs.lock().expect("jobs lock poisoned").values() {
                job.cancel.cancel();
            }
        }
        let request = LeaveRequest {
            worker_id: self.worker_id.clone(),
            request_id: self.request_ids.next("deregister"),
        };
        let window = Persistence::Until(tokio::time::Instant::now() + LEAVE_CALL_WINDOW);
        match self.coordinator.leave(request, true, window).await {
            Ok(_) => tracing::info!("drained and deregistered"),
            Err(e) => tracing::warn!(error = %e, "deregistering failed; leaving anyway"),
        }
        self.shutdown.cancel();
    }

    /// Once the drain starts, tells the leader at once (before the poll in
    /// flight is answered, so that it answers with nothing).
    pub(super) async fn tell_when_draining(self: Arc<Self>) {
        tokio::select! {
            () = self.draining.cancelled() => {}
            () = self.shutdown.cancelled() => return,
        }
        tracing::info!("draining: taking no new work");
        self.tell_draining().await;
    }

    /// Sends `Drain` (retried for a while); notes that the leader knows.
    async fn tell_draining(&self) {
        let request = LeaveRequest {
            worker_id: self.worker_id.clone(),
            request_id: self.request_ids.next("drain"),
        };
        let window = Persistence::Until(tokio::time::Instant::now() + LEAVE_CALL_WINDOW);
        let told = tokio::select! {
            told = self.coordinator.leave(request, false, window) => told,
            () = self.shutdown.cancelled() => return,
        };
        match told {
            Ok(_) => self.told_draining.store(true, Ordering::Relaxed),
            Err(e) => {
                tracing::warn!(error = %e, "telling the coordinators this worker drains failed")
            }
        }
    }

    /// Fetches the copies a heartbeat answer asked for (skipping those
    /// held, being fetched, or past the bound).
    pub(super) fn copy_for_draining(self: &Arc<Self>, copies: Vec<DepArtifact>) {
        for copy in copies {
            let Ok(digest) = digest_from_wire(&copy.digest, "replicate") else {
                continue;
            };
            if self.env.cache.contains(digest) {
                // Held already (a running job fetched it as an input, and
                // reports it only when it ends): say so now.
                self.changes
                    .lock()
                    .expect("changes lock poisoned")
                    .record(digest, true);
                continue;
            }
            {
                let mut pending = self.copies.lock().expect("copies lock poisoned");
                if pending.len() >= MAX_COPIES_PENDING || !pending.insert(digest) {
                    continue;
                }
            }
            let worker = Arc::clone(self);
            self.tracker.spawn(async move {
                let permit = worker.copy_slots.acquire().await;
                let fetched = match permit {
                    Ok(_permit) => tokio::select! {
                        fetched = fetch_artifact(
                            &worker.env.connector,
                            &copy.holders,
                            &worker.env.cache,
                            digest,
                            copy.size,
                        ) => fetched.map_err(|e| e.to_string()),
                        () = worker.shutdown.cancelled() => Err("shutting down".into()),
                    },
                    Err(_) => Err("shutting down".into()),
                };
                match fetched {
                    Ok(()) => {
                        worker
                            .env
                            .peer_bytes_fetched
                            .fetch_add(copy.size, Ordering::Relaxed);
                        worker
                            .changes
                            .lock()
                            .expect("changes lock poisoned")
                            .record(digest, true);
                        tracing::debug!(%digest, "copied an output from a draining worker");
                    }
                    Err(error) => {
                        tracing::info!(%digest, %error, "copying an output from a draining worker failed");
                    }
                }
                worker
                    .copies
                    .lock()
                    .expect("copies lock poisoned")
                    .remove(&digest);
            });
        }
    }
}
