//! The one mapping from the coordinator's domain errors to gRPC statuses.
//! Every service answers through it, so a kind of failure means the same
//! code everywhere: not-leader is UNAVAILABLE with the leader's address in
//! `distbuild-leader` metadata (callers follow it), a blob that fails its
//! checks is INVALID_ARGUMENT, a local disk failure INTERNAL.

use std::time::Duration;

use distbuild_proto::wire::{LEADER_METADATA_KEY, RETRY_AFTER_METADATA_KEY};
use tonic::Status;

use distbuild_model::Response;

use crate::blobs::BlobError;
use crate::replica::ReplicaError;

/// The status a caller gets for `error`.
pub fn to_status(error: ReplicaError) -> Status {
    match error {
        ReplicaError::NotLeader { message, leader } => {
            let mut status = Status::unavailable(message);
            if let Some(value) = leader.and_then(|addr| addr.parse().ok()) {
                status.metadata_mut().insert(LEADER_METADATA_KEY, value);
            }
            status
        }
        ReplicaError::Unavailable(message) => Status::unavailable(message),
        ReplicaError::TimedOut(message) => Status::deadline_exceeded(message),
        ReplicaError::Precondition(message) => Status::failed_precondition(message),
        ReplicaError::AlreadyExists(message) => Status::already_exists(message),
        ReplicaError::NotFound(message) => Status::not_found(message),
        ReplicaError::Invalid(message) => Status::invalid_argument(message),
        ReplicaError::Internal(message) => Status::internal(message),
    }
}

impl From<ReplicaError> for Status {
    fn from(error: ReplicaError) -> Self {
        to_status(error)
    }
}

/// RESOURCE_EXHAUSTED for a limit that frees up by itself (streams end,
/// staged submits complete): the caller may try again after `retry_after`,
/// which travels in `distbuild-retry-after-ms` metadata. A refusal without
/// that hint is final.
pub fn busy(message: impl Into<String>, retry_after: Duration) -> Status {
    let mut status = Status::resource_exhausted(message);
    let millis = retry_after.as_millis().to_string();
    if let Ok(value) = millis.parse() {
        status
            .metadata_mut()
            .insert(RETRY_AFTER_METADATA_KEY, value);
    }
    status
}

/// INVALID_ARGUMENT naming what is wrong with a field the caller sent.
pub fn invalid(problem: impl std::fmt::Display) -> Status {
    Status::invalid_argument(problem.to_string())
}

/// What a caller refused as busy by the state machine is told to wait.
const BUSY_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The status for a submit the state machine refused: RESOURCE_EXHAUSTED
/// with a retry hint when it is busy (see [`busy`]), ABORTED when the
/// same submit may succeed if retried from the start, INTERNAL otherwise
/// (the leader built a command the model refuses).
pub fn refusal(response: Response) -> Status {
    match response {
        Response::Busy { reason } => busy(reason, BUSY_RETRY_AFTER),
        Response::Refused {
            reason,
            retry: true,
        } => Status::aborted(reason),
        Response::Refused { reason, .. } => Status::internal(reason),
        other => Status::internal(format!("unexpected answer to a submit: {other:?}")),
    }
}

/// The status a caller gets for a blob it sent that could not be stored.
pub fn blob_status(error: BlobError) -> Status {
    match error {
        BlobError::Io { .. } => Status::internal(error.to_string()),
        _ => Status::invalid_argument(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_leader_carries_the_leaders_address_when_known() {
        let status = to_status(ReplicaError::NotLeader {
            message: "not the leader (coordinator 2 is)".into(),
            leader: Some("127.0.0.1:7002".into()),
        });
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(status.message(), "not the leader (coordinator 2 is)");
        assert_eq!(
            status
                .metadata()
                .get(LEADER_METADATA_KEY)
                .map(|v| v.to_str().ok()),
            Some(Some("127.0.0.1:7002"))
        );
        let status = to_status(ReplicaError::NotLeader {
            message: "not the leader, and no leader is elected yet; retry".into(),
            leader: None,
        });
        assert!(status.metadata().get(LEADER_METADATA_KEY).is_none());
    }
}
