//! Captured job output, stored once per run. A run's stdout and stderr (up
//! to `MAX_JOB_OUTPUT_BYTES` each) are written to the `outputs` table once,
//! under the log index of the report that brought them; every job's
//! `JobFinished` event and the cached result name that row. Two hundred
//! jobs sharing one execution therefore cost one copy, not two hundred,
//! whatever the output's size. A row lives while something names it: the
//! reference counts are derived (from the jobs and results that name a
//! row) and kept in memory, and a row no job or result names any more is
//! deleted in the same entry that dropped the last reference.

use crate::log::OutputRef;
use crate::records::JobOutput;
use crate::state::Model;

impl Model {
    /// Records the output of the run reported at log index `index`, if it
    /// has any; the caller then references it once per job or result that
    /// shows it. A row nothing references by the end of the entry is never
    /// written.
    pub(crate) fn new_output(
        &mut self,
        index: u64,
        stdout: &[u8],
        stderr: &[u8],
    ) -> Option<OutputRef> {
        self.new_output_with(
            index,
            JobOutput {
                stdout: stdout.to_vec(),
                stderr: stderr.to_vec(),
                action_result: Vec::new(),
            },
        )
    }

    /// Stores `output` as the row of the entry at `index` (none when it
    /// is empty).
    pub(crate) fn new_output_with(&mut self, index: u64, output: JobOutput) -> Option<OutputRef> {
        if output.is_empty() {
            return None;
        }
        let bytes = output.len() as u64;
        self.dirty.new_outputs.push((index, output));
        Some(OutputRef { id: index, bytes })
    }

    pub(crate) fn ref_output(&mut self, output: Option<OutputRef>) {
        if let Some(output) = output {
            *self.output_refs.entry(output.id).or_default() += 1;
        }
    }

    pub(crate) fn unref_output(&mut self, output: Option<OutputRef>) {
        let Some(OutputRef { id, .. }) = output else {
            return;
        };
        let refs = self
            .output_refs
            .get_mut(&id)
            .expect("an output being released is recorded");
        *refs -= 1;
        if *refs == 0 {
            self.output_refs.remove(&id);
            self.dirty.dropped_outputs.insert(id);
        }
    }
}
