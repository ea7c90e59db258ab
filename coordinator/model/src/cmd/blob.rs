//! `BlobStored`: a source blob that a quorum of coordinators stored (or
//! stored again: it counts as used now).

use distbuild_proto::Digest;

use crate::records::BlobRecord;
use crate::state::Model;

impl Model {
    pub(crate) fn blob_stored(&mut self, digest: Digest, size: u64) {
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
