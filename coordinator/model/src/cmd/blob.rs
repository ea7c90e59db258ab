//! `BlobStored`: a blob (a source, or a Remote Execution API client's) that a quorum of coordinators stored (or
//! stored again: it counts as used now).

use distbuild_proto::BlobKey;

use crate::records::BlobRecord;
use crate::state::Model;

impl Model {
    pub(crate) fn blob_stored(&mut self, digest: BlobKey, size: u64) {
        self.blobs.insert(
            digest,
            BlobRecord {
                size,
                last_used_ms: self.clock_ms,
            },
        );
        self.dirty.blobs.insert(digest);
    }
}
