//! What a replica answers when it cannot do what was asked. The API layer
//! turns each kind into a gRPC status in one place (`api::status`).

/// Why a replica could not serve a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplicaError {
    /// This node does not serve now: another node leads (`leader`, its
    /// address, when known), an election is running, or this leader lost
    /// its quorum. The caller retries, at `leader` if given.
    #[error("{message}")]
    NotLeader {
        message: String,
        leader: Option<String>,
    },
    /// The request could not finish now (a commit or a copy failed or
    /// timed out, Raft stopped); the same request may succeed on retry.
    #[error("{0}")]
    Unavailable(String),
    /// The request ran out of its time (it may go on in the background).
    #[error("{0}")]
    TimedOut(String),
    /// The request contradicts the cluster as it is.
    #[error("{0}")]
    Precondition(String),
    /// What the request would create exists already, differently.
    #[error("{0}")]
    AlreadyExists(String),
    /// What the request names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// A request that no valid caller sends (it was checked at the API).
    #[error("{0}")]
    Invalid(String),
    /// This replica failed (its disk, a task).
    #[error("{0}")]
    Internal(String),
}

/// The result of a replica operation.
pub type Result<T, E = ReplicaError> = std::result::Result<T, E>;
