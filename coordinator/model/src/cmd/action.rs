//! `ActionResultStored`: a Remote Execution API action's result, kept
//! under (instance name, action digest) until collection drops it.

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
                stored_ms: self.clock_ms,
            },
        );
        self.dirty.action_results.insert(key);
    }
}
