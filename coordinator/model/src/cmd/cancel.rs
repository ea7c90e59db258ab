//! `CancelBuild`.

use distbuild_proto::Digest;

use crate::log::Event;
use crate::records::JobState;
use crate::state::Model;

/// The error a cancelled build finishes with.
pub const BUILD_CANCELLED: &str = "the build was cancelled";

impl Model {
    /// Cancels build `build_id`: every job not in a final state is skipped,
    /// leaves the execution of its cache key, and an execution no build
    /// waits for any more (and no other execution is blocked on) is
    /// dropped: its lease, if any, is revoked, so the worker's next
    /// heartbeat stops the job. False if the build was not running.
    pub(crate) fn cancel_build(&mut self, build_id: u64) -> bool {
        let Some(build) = self.builds.get(&build_id) else {
            return false;
        };
        if build.header.finished {
            return false;
        }
        let open: Vec<(u32, JobState, Digest)> = (0u32..)
            .zip(&build.jobs)
            .filter(|(_, j)| matches!(j.state, JobState::Waiting | JobState::Queued))
            .map(|(i, j)| (i, j.state, j.cache_key))
            .collect();
        for (job, state, key) in open {
            if state == JobState::Queued {
                self.leave_execution(key, (build_id, job));
            }
            self.skip_job(build_id, job, "the build was cancelled".to_string());
        }
        let header = &mut self.builds.get_mut(&build_id).expect("live build").header;
        header.finished = true;
        self.dirty.builds.insert(build_id);
        self.push_event(
            build_id,
            Event::BuildFinished {
                ok: false,
                error: Some(BUILD_CANCELLED.to_string()),
            },
        );
        self.finish_retention(build_id);
        true
    }
}
