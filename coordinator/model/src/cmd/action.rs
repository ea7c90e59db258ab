//! `ActionResultStored`: a Remote Execution API action's result, kept
//! under (instance name, action digest) until collection drops it; and
//! `Used`: blobs and results a client found or was served.

use distbuild_proto::BlobKey;

use crate::records::ActionResultRecord;
use crate::state::Model;

impl Model {
    pub(crate) fn action_result_stored(
        &mut self,
        instance_name: &str,
        action: BlobKey,
        result: &[u8],
        blobs: &[(BlobKey, u64)],
    ) {
        let key = (instance_name.to_string(), action);
        self.action_results.insert(
            key.clone(),
            ActionResultRecord {
                result: result.to_vec(),
                blobs: blobs.to_vec(),
                last_used_ms: self.clock_ms,
            },
        );
        self.dirty.action_results.insert(key);
    }

    pub(crate) fn used(&mut self, blobs: &[BlobKey], action_results: &[(String, BlobKey)]) {
        for key in blobs {
            if let Some(blob) = self.blobs.get_mut(key)
                && blob.last_used_ms != self.clock_ms
            {
                blob.last_used_ms = self.clock_ms;
                self.dirty.blobs.insert(*key);
            }
        }
        for key in action_results {
            if let Some(record) = self.action_results.get_mut(key)
                && record.last_used_ms != self.clock_ms
            {
                record.last_used_ms = self.clock_ms;
                self.dirty.action_results.insert(key.clone());
            }
        }
    }
}
