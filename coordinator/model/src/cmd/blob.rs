//! `BlobStored`: a source blob that a quorum of coordinators stored.

use distbuild_proto::Digest;

use crate::state::Model;

impl Model {
    pub(crate) fn blob_stored(&mut self, digest: Digest, size: u64) {
        if self.blobs.insert(digest, size).is_none() {
            self.dirty.blobs.insert(digest);
        }
    }
}
