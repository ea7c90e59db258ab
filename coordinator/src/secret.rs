//! The cluster secret: what coordinators show each other on their Raft
//! transport, and operators show on membership changes. Without one (the
//! default, for a single machine or a trusted network) anyone who reaches a
//! coordinator's port may speak Raft to it; with `--cluster-secret-file`
//! every Raft call and every add-node/remove-node must carry the secret,
//! or it is refused UNAUTHENTICATED.

use std::path::Path;
use std::sync::Arc;

use distbuild_proto::wire::{
    SECRET_METADATA_KEY, SecretFileError, SecretProblem, check_cluster_secret, read_cluster_secret,
    same_secret,
};
use tonic::metadata::{AsciiMetadataValue, MetadataMap};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// A cluster secret (never printed).
#[derive(Clone)]
pub struct ClusterSecret(Arc<AsciiMetadataValue>);

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(..)")
    }
}

impl ClusterSecret {
    /// Reads a secret file (see [`read_cluster_secret`]).
    pub fn from_file(path: &Path) -> Result<Self, SecretFileError> {
        let text = read_cluster_secret(path)?;
        Self::new(&text).map_err(|problem| SecretFileError::Invalid {
            path: path.to_path_buf(),
            problem,
        })
    }

    /// A secret from its text.
    pub fn new(text: &str) -> Result<Self, SecretProblem> {
        check_cluster_secret(text)?;
        let value = AsciiMetadataValue::try_from(text).map_err(|_| SecretProblem::NotPrintable)?;
        Ok(Self(Arc::new(value)))
    }

    /// Whether `metadata` carries this secret (compared in constant time).
    fn shown_in(&self, metadata: &MetadataMap) -> Result<(), Status> {
        let Some(shown) = metadata.get(SECRET_METADATA_KEY) else {
            return Err(Status::unauthenticated(
                "this coordinator requires the cluster secret (--cluster-secret-file)",
            ));
        };
        if !same_secret(shown.as_bytes(), self.0.as_bytes()) {
            return Err(Status::unauthenticated(
                "wrong cluster secret (--cluster-secret-file differs from this coordinator's)",
            ));
        }
        Ok(())
    }
}

/// Checks `metadata` against the secret, if one is configured.
pub fn check(secret: Option<&ClusterSecret>, metadata: &MetadataMap) -> Result<(), Status> {
    secret.map_or(Ok(()), |secret| secret.shown_in(metadata))
}

/// Adds the secret (if any) to outgoing calls.
#[derive(Clone, Debug, Default)]
pub struct ShowSecret(pub Option<ClusterSecret>);

impl Interceptor for ShowSecret {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(secret) = &self.0 {
            request
                .metadata_mut()
                .insert(SECRET_METADATA_KEY, (*secret.0).clone());
        }
        Ok(request)
    }
}

/// Refuses incoming calls without the secret (when one is configured).
#[derive(Clone, Debug, Default)]
pub struct RequireSecret(pub Option<ClusterSecret>);

impl Interceptor for RequireSecret {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        check(self.0.as_ref(), request.metadata())?;
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use distbuild_proto::wire::{MAX_SECRET_BYTES, MIN_SECRET_BYTES};

    fn with(value: Option<&str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(value) = value {
            request
                .metadata_mut()
                .insert(SECRET_METADATA_KEY, value.parse().expect("ascii"));
        }
        request
    }

    #[test]
    fn only_the_configured_secret_passes() {
        let secret = ClusterSecret::new("0123456789abcdef-secret").expect("valid");
        let mut require = RequireSecret(Some(secret.clone()));
        assert!(require.call(with(Some("0123456789abcdef-secret"))).is_ok());
        let wrong = require
            .call(with(Some("0123456789abcdef-other!")))
            .expect_err("wrong");
        assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
        assert!(wrong.message().contains("wrong cluster secret"));
        let missing = require.call(with(None)).expect_err("missing");
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
        // What ShowSecret adds is what RequireSecret wants.
        let shown = ShowSecret(Some(secret)).call(with(None)).expect("adds");
        assert!(require.call(shown).is_ok());
        // No secret configured: everything passes, nothing is added.
        assert!(RequireSecret(None).call(with(None)).is_ok());
        let plain = ShowSecret(None).call(with(None)).expect("adds nothing");
        assert!(plain.metadata().get(SECRET_METADATA_KEY).is_none());
    }

    #[test]
    fn a_secret_is_long_printable_ascii() {
        assert!(ClusterSecret::new("short").is_err());
        assert!(ClusterSecret::new("has a space in it, long enough").is_err());
        assert!(ClusterSecret::new("nön-ascii-but-long-enough").is_err());
        assert!(ClusterSecret::new(&"x".repeat(MAX_SECRET_BYTES + 1)).is_err());
        assert!(ClusterSecret::new(&"x".repeat(MIN_SECRET_BYTES)).is_ok());
    }
}
