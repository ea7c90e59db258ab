//! `distbuild cluster add-node` and `distbuild cluster remove-node`:
//! changing which coordinators are Raft voters.
//!
//! Both are the leader's to do; a follower's "not the leader" answer is
//! followed like any other (see [`crate::cluster`]). A change whose answer
//! was lost (a broken connection, a failover) is retried; when the retry is
//! then refused because the change is already made (ALREADY_EXISTS for an
//! add, NOT_FOUND for a remove), the command reads the membership back and
//! reports success if the cluster now is what was asked.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use distbuild_proto::v1::{AddNodeRequest, ChangeMembershipResponse, Member, RemoveNodeRequest};
use distbuild_proto::wire::{SECRET_METADATA_KEY, SecretFileError, read_cluster_secret};
use tonic::metadata::AsciiMetadataValue;
use tonic::{Code, Status};

use crate::args::{AddNodeArgs, FlagError, RemoveNodeArgs, check_host_port, parse_node_id};
use crate::cluster::{CallError, Cluster, Disposition, classify, one_line};
use crate::connect::{Connector, admin_api};
use crate::exit_code;
use crate::render::Console;
use distbuild_proto::tls::Role;

/// Deadline of one AddNode attempt: the leader answers once the new node
/// has caught up as a learner and been made a voter, which takes as long as
/// copying the log (or a snapshot) to it. Longer than the coordinator's own
/// bounds (60 s to catch up, 20 s to commit), so that its answer saying
/// which step ran out of time arrives first.
pub const ADD_NODE_TIMEOUT: Duration = Duration::from_secs(90);

/// Deadline of one RemoveNode attempt (asking the members whether they are
/// up, then a joint-consensus change), above the coordinator's own 20 s.
pub const REMOVE_NODE_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `distbuild cluster add-node` over real TCP connections; returns the
/// process exit code.
pub async fn add_node_cli(args: AddNodeArgs) -> i32 {
    let mut console = Console::stdio();
    match args.connection.connector(&[Role::Admin]) {
        Ok(connector) => run_add_node(args, connector, console).await,
        Err(e) => console.fail(exit_code::BAD_INPUT, e),
    }
}

/// Runs `distbuild cluster remove-node` over real TCP connections; returns
/// the process exit code.
pub async fn remove_node_cli(args: RemoveNodeArgs) -> i32 {
    let mut console = Console::stdio();
    match args.connection.connector(&[Role::Admin]) {
        Ok(connector) => run_remove_node(args, connector, console).await,
        Err(e) => console.fail(exit_code::BAD_INPUT, e),
    }
}

/// Counts the attempts of one change that may have taken effect without
/// the client hearing so: every attempt counts except those a follower
/// turned away ("not the leader, ask X").
#[derive(Clone, Default)]
struct Doubt(Arc<AtomicU32>);

impl Doubt {
    /// Wraps one attempt's answer.
    fn note<T>(&self, result: Result<T, Status>) -> Result<T, Status> {
        if let Err(status) = &result
            && matches!(classify(status), Disposition::Redirect(_))
        {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
        result
    }

    /// Marks the start of an attempt.
    fn start(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether an attempt before the last one may have made the change.
    fn earlier_attempt_in_doubt(&self) -> bool {
        self.0.load(Ordering::SeqCst) > 1
    }
}

/// A change the leader gave up on within its own deadline (the new node did
/// not catch up, the change did not commit) is reported (exit 1), not
/// retried: the cluster answered, and running the command again continues
/// where it stopped. Deadlines of the client's own (no answer at all) are
/// not affected: they are set around this, by [`Cluster::call`].
fn gave_up_is_final(status: Status) -> Status {
    if status.code() == Code::DeadlineExceeded {
        Status::internal(status.message())
    } else {
        status
    }
}

/// Codes with which the cluster refuses a membership change as asked (exit
/// code 2, its message shown as is).
fn is_refusal(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::AlreadyExists
            | Code::NotFound
            | Code::Unauthenticated
    )
}

/// Why a membership command cannot start: bad input, each message one
/// line.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// A flag is wrong.
    #[error(transparent)]
    Flags(#[from] FlagError),
    /// The cluster secret's file cannot be used.
    #[error(transparent)]
    SecretFile(#[from] SecretFileError),
    /// The secret cannot travel as metadata.
    #[error("cluster secret {}: not printable ASCII", .0.display())]
    SecretNotAscii(PathBuf),
}

/// The cluster to change and the secret to show it, from the flags.
fn connect_with_secret(
    connection: &crate::args::ConnectionArgs,
    secret_file: Option<&Path>,
    connector: Connector,
) -> Result<(Cluster, Option<AsciiMetadataValue>), SetupError> {
    let addrs = connection.addresses()?;
    let secret = secret_of(secret_file)?;
    Ok((
        Cluster::new(connector, addrs, connection.patience()),
        secret,
    ))
}

/// The cluster secret from `--cluster-secret-file`, as metadata.
fn secret_of(path: Option<&Path>) -> Result<Option<AsciiMetadataValue>, SetupError> {
    let Some(path) = path else { return Ok(None) };
    let text = read_cluster_secret(path)?;
    AsciiMetadataValue::try_from(text.as_str())
        .map(Some)
        .map_err(|_| SetupError::SecretNotAscii(path.to_path_buf()))
}

/// `message` as a request showing `secret` (if any).
fn with_secret<T>(message: T, secret: &Option<AsciiMetadataValue>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(secret) = secret {
        request
            .metadata_mut()
            .insert(SECRET_METADATA_KEY, secret.clone());
    }
    request
}

/// `1 (10.0.0.1:7000), 2 (10.0.0.2:7000)`, by node ID.
fn describe_members<'a>(members: impl IntoIterator<Item = &'a Member>) -> String {
    let mut members: Vec<&Member> = members.into_iter().collect();
    members.sort_by_key(|m| m.node_id);
    if members.is_empty() {
        return "none".to_string();
    }
    members
        .iter()
        .map(|m| format!("{} ({})", m.node_id, m.addr))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The members as the cluster reports them now, or `None` if it cannot be
/// asked.
async fn current_members(cluster: &Cluster) -> Option<Vec<Member>> {
    crate::status::fetch_status(cluster)
        .await
        .ok()
        .map(|status| status.members)
}

/// Sends one membership change (`request()` through `send`, its RPC),
/// retrying through failovers. A retry refused with `already` after an
/// earlier attempt whose answer was lost counts as done when the members
/// read back satisfy `is_done`. Returns the voters after the change.
async fn change_membership<Req, F, Fut>(
    cluster: &Cluster,
    what: &str,
    timeout: Duration,
    request: impl Fn() -> tonic::Request<Req>,
    send: F,
    already: Code,
    is_done: impl Fn(&[Member]) -> bool,
) -> Result<Vec<Member>, CallError>
where
    F: Fn(tonic::transport::Channel, tonic::Request<Req>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<ChangeMembershipResponse>, Status>>,
{
    let doubt = Doubt::default();
    let result = cluster
        .call(what, Some(timeout), |channel| {
            let call = send(channel, request());
            let doubt = doubt.clone();
            doubt.start();
            async move {
                doubt
                    .note(call.await)
                    .map(|r| r.into_inner())
                    .map_err(gave_up_is_final)
            }
        })
        .await;
    match result {
        Ok(response) => Ok(response.members),
        Err(CallError::Rejected { what, status })
            if status.code() == already && doubt.earlier_attempt_in_doubt() =>
        {
            // An earlier attempt may have made the change: see whether it did.
            match current_members(cluster).await {
                Some(members) if is_done(&members) => {
                    Ok(members.into_iter().filter(|m| m.voter).collect())
                }
                _ => Err(CallError::Rejected { what, status }),
            }
        }
        Err(e) => Err(e),
    }
}

/// Prints the success line; returns the exit code.
fn succeed(console: &mut Console, line: String) -> i32 {
    if let Err(e) = writeln!(console.out, "{line}").and_then(|()| console.out.flush()) {
        return console.fail(exit_code::BUILD_FAILED, format!("write the result: {e}"));
    }
    exit_code::OK
}

/// Runs `distbuild cluster add-node` through `connector`, writing to
/// `console`; returns the process exit code: 0 added, 2 bad flags or
/// refused by the cluster, 3 cluster unreachable for `--timeout`, 1 other
/// failures.
pub async fn run_add_node(args: AddNodeArgs, connector: Connector, mut console: Console) -> i32 {
    let node_id = match parse_node_id(&args.node_id) {
        Ok(id) => id,
        Err(message) => return console.fail(exit_code::BAD_INPUT, message),
    };
    if let Err(message) = check_host_port(&args.addr) {
        return console.fail(exit_code::BAD_INPUT, message);
    }
    let (cluster, secret) = match connect_with_secret(
        &args.connection,
        args.cluster_secret_file.as_deref(),
        connector,
    ) {
        Ok(found) => found,
        Err(message) => return console.fail(exit_code::BAD_INPUT, message),
    };
    let request = AddNodeRequest {
        node_id,
        addr: args.addr.clone(),
    };
    let addr = args.addr.clone();
    let result = change_membership(
        &cluster,
        &format!("add node {node_id}"),
        ADD_NODE_TIMEOUT,
        || with_secret(request.clone(), &secret),
        |channel, request| async move { admin_api(channel).add_node(request).await },
        Code::AlreadyExists,
        |members| {
            members
                .iter()
                .any(|m| m.node_id == node_id && m.voter && m.addr == addr)
        },
    )
    .await;
    let voters = match result {
        Ok(voters) => voters,
        Err(CallError::Rejected { status, .. }) if is_refusal(status.code()) => {
            return console.fail(exit_code::BAD_INPUT, status.message());
        }
        Err(e) => return console.fail(e.exit_code(), e),
    };
    succeed(
        &mut console,
        format!(
            "added node {node_id} ({}); voters: {}",
            args.addr,
            describe_members(&voters)
        ),
    )
}

/// The hint added to a refusal to remove a node without `--force`.
pub const FORCE_HINT: &str = "pass --force to remove it anyway";

/// Runs `distbuild cluster remove-node` through `connector`, writing to
/// `console`; returns the process exit code: 0 removed, 2 bad flags or
/// refused by the cluster (without `--force`, when the voters left that are
/// up would not be a quorum), 3 cluster unreachable for `--timeout`, 1
/// other failures.
pub async fn run_remove_node(
    args: RemoveNodeArgs,
    connector: Connector,
    mut console: Console,
) -> i32 {
    let node_id = match parse_node_id(&args.node_id) {
        Ok(id) => id,
        Err(message) => return console.fail(exit_code::BAD_INPUT, message),
    };
    let (cluster, secret) = match connect_with_secret(
        &args.connection,
        args.cluster_secret_file.as_deref(),
        connector,
    ) {
        Ok(found) => found,
        Err(message) => return console.fail(exit_code::BAD_INPUT, message),
    };
    let request = RemoveNodeRequest {
        node_id,
        force: args.force,
    };
    let result = change_membership(
        &cluster,
        &format!("remove node {node_id}"),
        REMOVE_NODE_TIMEOUT,
        || with_secret(request, &secret),
        |channel, request| async move { admin_api(channel).remove_node(request).await },
        Code::NotFound,
        |members| !members.iter().any(|m| m.node_id == node_id && m.voter),
    )
    .await;
    let voters = match result {
        Ok(voters) => voters,
        Err(CallError::Rejected { status, .. }) if status.code() == Code::FailedPrecondition => {
            // The quorum refusal is the one --force overrides; other
            // preconditions (the last voter, a change in progress) are not.
            let message = one_line(status.message());
            let message = if message.contains("quorum") && !message.contains("--force") {
                format!("{message} ({FORCE_HINT})")
            } else {
                message
            };
            return console.fail(exit_code::BAD_INPUT, message);
        }
        Err(CallError::Rejected { status, .. }) if is_refusal(status.code()) => {
            return console.fail(exit_code::BAD_INPUT, status.message());
        }
        Err(e) => return console.fail(e.exit_code(), e),
    };
    succeed(
        &mut console,
        format!(
            "removed node {node_id}; voters: {}",
            describe_members(&voters)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use distbuild_proto::wire::LEADER_METADATA_KEY;
    use tonic::metadata::MetadataValue;

    #[test]
    fn voters_are_listed_by_id() {
        let member = |node_id: u64| Member {
            node_id,
            addr: format!("h{node_id}:7000"),
            voter: true,
            ..Default::default()
        };
        assert_eq!(
            describe_members(&[member(3), member(1)]),
            "1 (h1:7000), 3 (h3:7000)"
        );
        assert_eq!(describe_members(&[]), "none");
    }

    #[test]
    fn only_a_followers_redirect_clears_an_attempt_of_doubt() {
        let mut redirect = Status::unavailable("not the leader");
        redirect
            .metadata_mut()
            .insert(LEADER_METADATA_KEY, MetadataValue::from_static("h2:7000"));
        let refused = || Err::<(), _>(Status::already_exists("node 4 is a member"));

        // Turned away by a follower, then refused by the leader: the
        // refusal stands.
        let doubt = Doubt::default();
        doubt.start();
        let _ = doubt.note::<()>(Err(redirect.clone()));
        doubt.start();
        let _ = doubt.note(refused());
        assert!(!doubt.earlier_attempt_in_doubt());

        // An attempt whose answer never came (its deadline dropped it), or
        // that met an election, then the refusal: it may have been made.
        for first in [None, Some(Status::unavailable("no leader"))] {
            let doubt = Doubt::default();
            doubt.start();
            if let Some(status) = first {
                let _ = doubt.note::<()>(Err(status));
            }
            doubt.start();
            let _ = doubt.note(refused());
            assert!(doubt.earlier_attempt_in_doubt());
        }
    }
}
