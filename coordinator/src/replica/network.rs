//! Traffic between coordinator replicas: openraft's RPCs over the
//! `RaftTransport` gRPC service (`proto/raft.proto`), on the same port as
//! the public APIs.
//!
//! openraft's request and response types travel postcard-encoded inside a
//! `RaftPayload` (with a format number), so the proto does not mirror them.
//! Every call has a deadline (openraft's TTL for the RPC), channels keep
//! HTTP/2 alive so a peer behind a partition is noticed in seconds, and a
//! call the peer's transport refused drops its channel so the next one
//! dials afresh (openraft then backs off from that peer); a call that only
//! ran out of time is retried on the same channel at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use distbuild_proto::net::endpoint;
use distbuild_proto::raft_v1::RaftPayload;
use distbuild_proto::raft_v1::raft_transport_client::RaftTransportClient;
use openraft::BasicNode;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig};

use distbuild_proto::net::SharedDialer;

use super::contact::Contact;
use super::types::TypeConfig;
use crate::secret::{ClusterSecret, ShowSecret};

/// Version of the payload encoding; a replica refuses others. Log entries
/// travel in it, so it changes whenever their encoding does (2: the store
/// format 9 entries, whose dependency references carry artifacts).
pub const PAYLOAD_FORMAT: u32 = 2;
/// Largest Raft message either side accepts (an append batch of big
/// submits, or a snapshot chunk).
pub const MAX_RAFT_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// Encodes a Raft message for the wire.
pub fn encode<T: Serialize>(value: &T) -> Result<RaftPayload, postcard::Error> {
    Ok(RaftPayload {
        format: PAYLOAD_FORMAT,
        payload: postcard::to_stdvec(value)?.into(),
    })
}

/// A Raft message this replica cannot read.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("raft payload format {0} (this replica reads {PAYLOAD_FORMAT})")]
    Format(u32),
    #[error("undecodable raft payload: {0}")]
    Undecodable(#[source] postcard::Error),
}

/// A peer address that is not one.
#[derive(Debug, thiserror::Error)]
#[error("bad peer address {addr:?}: {source}")]
pub struct BadPeerAddress {
    addr: String,
    #[source]
    source: tonic::transport::Error,
}

/// Decodes a Raft message from the wire.
pub fn decode<T: DeserializeOwned>(payload: &RaftPayload) -> Result<T, PayloadError> {
    if payload.format != PAYLOAD_FORMAT {
        return Err(PayloadError::Format(payload.format));
    }
    postcard::from_bytes(&payload.payload).map_err(PayloadError::Undecodable)
}

/// Channels to peer coordinators by address, shared by Raft traffic, blob
/// replication and status queries. Channels connect lazily; a failed call
/// forgets its channel.
#[derive(Clone)]
pub struct Peers {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    /// Per peer address, since when its Raft calls fail, and whether that
    /// was logged.
    health: Arc<Mutex<HashMap<String, Failing>>>,
    /// Shown on every call (peers refuse calls without it when they have
    /// one).
    secret: ShowSecret,
    /// Opens the channels.
    dialer: SharedDialer,
    /// TLS to the peers (this replica's certificate, the cluster CA), if
    /// the cluster runs with it.
    tls: Option<ClientTlsConfig>,
}

/// How long a peer's Raft calls fail before that is logged.
pub const PEER_DOWN_AFTER: Duration = Duration::from_secs(1);

/// A peer whose Raft calls fail.
struct Failing {
    since: tokio::time::Instant,
    logged: bool,
}

/// A `RaftTransport` client of a peer, showing the cluster secret.
pub type PeerClient = RaftTransportClient<InterceptedService<Channel, ShowSecret>>;

impl Peers {
    /// Channels opened by `dialer` (over `tls`, if given) that show
    /// `secret` on every call.
    pub fn new(
        secret: Option<ClusterSecret>,
        dialer: SharedDialer,
        tls: Option<ClientTlsConfig>,
    ) -> Self {
        Self {
            channels: Arc::default(),
            health: Arc::default(),
            secret: ShowSecret(secret),
            dialer,
            tls,
        }
    }

    /// Notes a failed Raft call to peer `target`: logged once it has failed
    /// for [`PEER_DOWN_AFTER`] (openraft's own log of every failed call is
    /// off by default; one slow answer on a busy machine is not news).
    fn note_failure(&self, target: u64, addr: &str, problem: &str) {
        let mut health = self.health.lock().expect("peer health lock poisoned");
        let failing = health.entry(addr.to_string()).or_insert_with(|| Failing {
            since: tokio::time::Instant::now(),
            logged: false,
        });
        if !failing.logged && failing.since.elapsed() >= PEER_DOWN_AFTER {
            failing.logged = true;
            tracing::warn!(
                "coordinator {target} at {addr} has not answered Raft calls for {:.1} s: {problem}",
                failing.since.elapsed().as_secs_f64()
            );
        }
    }

    /// Notes a Raft call peer `target` answered.
    fn note_success(&self, target: u64, addr: &str) {
        let mut health = self.health.lock().expect("peer health lock poisoned");
        if let Some(failing) = health.remove(addr)
            && failing.logged
        {
            tracing::warn!(
                "coordinator {target} at {addr} answers Raft calls again (after {:.1} s)",
                failing.since.elapsed().as_secs_f64()
            );
        }
    }

    /// A channel to `addr` (connecting lazily).
    pub fn channel(&self, addr: &str) -> Result<Channel, BadPeerAddress> {
        let mut channels = self.channels.lock().expect("peer channels lock poisoned");
        if let Some(channel) = channels.get(addr) {
            return Ok(channel.clone());
        }
        let endpoint = endpoint(addr, self.tls.as_ref()).map_err(|source| BadPeerAddress {
            addr: addr.to_string(),
            source,
        })?;
        let channel = self.dialer.connect_lazy(endpoint);
        channels.insert(addr.to_string(), channel.clone());
        Ok(channel)
    }

    /// Forgets the channel to `addr`, so the next call dials again.
    pub fn forget(&self, addr: &str) {
        self.channels
            .lock()
            .expect("peer channels lock poisoned")
            .remove(addr);
    }

    /// A `RaftTransport` client of the peer at `addr`.
    pub fn transport(&self, addr: &str) -> Result<PeerClient, BadPeerAddress> {
        Ok(
            RaftTransportClient::with_interceptor(self.channel(addr)?, self.secret.clone())
                .max_decoding_message_size(MAX_RAFT_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_RAFT_MESSAGE_BYTES),
        )
    }
}

/// Creates a connection per peer for openraft.
pub struct Network {
    pub peers: Peers,
    /// Where vote answers are noted, for the timing of the next election.
    pub contact: Arc<Contact>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Connection {
        Connection {
            target,
            addr: node.addr.clone(),
            peers: self.peers.clone(),
            contact: self.contact.clone(),
        }
    }
}

/// openraft's view of one peer.
pub struct Connection {
    target: u64,
    addr: String,
    peers: Peers,
    contact: Arc<Contact>,
}

type RpcResult<T, E> = Result<T, RPCError<u64, BasicNode, E>>;

fn unreachable<E: std::error::Error>(problem: impl ToString) -> RPCError<u64, BasicNode, E> {
    RPCError::Unreachable(Unreachable::new(&std::io::Error::other(
        problem.to_string(),
    )))
}

fn network<E: std::error::Error>(problem: impl ToString) -> RPCError<u64, BasicNode, E> {
    RPCError::Network(NetworkError::new(&std::io::Error::other(
        problem.to_string(),
    )))
}

impl Connection {
    /// Sends `request` with `call`, bounded by openraft's TTL, and decodes
    /// the peer's `Result<Resp, E>`.
    /// Notes whether peer answered `result` (see [`Peers::note_failure`]).
    fn noted<T, E: std::error::Error>(&self, result: RpcResult<T, E>) -> RpcResult<T, E> {
        match &result {
            Ok(_) | Err(RPCError::RemoteError(_)) => {
                self.peers.note_success(self.target, &self.addr);
            }
            Err(e) => self
                .peers
                .note_failure(self.target, &self.addr, &e.to_string()),
        }
        result
    }

    async fn call<Req, Resp, E, F, Fut>(
        &mut self,
        what: &'static str,
        request: &Req,
        option: &RPCOption,
        call: F,
    ) -> RpcResult<Resp, E>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
        F: FnOnce(PeerClient, tonic::Request<RaftPayload>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<RaftPayload>, tonic::Status>>,
    {
        let payload = encode(request).map_err(|e| {
            network(format!(
                "{what} to coordinator {}: encode: {e}",
                self.target
            ))
        })?;
        let client = self.peers.transport(&self.addr).map_err(unreachable)?;
        // A little under openraft's own deadline, so the answer is ours
        // (and noted) rather than openraft cancelling the call.
        let ttl = option
            .hard_ttl()
            .saturating_sub(Duration::from_millis(5))
            .max(option.hard_ttl() / 2);
        let mut request = tonic::Request::new(payload);
        request.set_timeout(ttl);
        let answer = match tokio::time::timeout(ttl, call(client, request)).await {
            Ok(Ok(answer)) => answer.into_inner(),
            Ok(Err(status)) => {
                let message = format!(
                    "{what} to coordinator {} at {}: {}: {}",
                    self.target,
                    self.addr,
                    status.code(),
                    status.message()
                );
                // A peer that cannot be reached (refused, reset, no route)
                // is backed off from and dialled afresh. A call that only
                // ran out of time keeps its channel (HTTP/2 keepalive finds
                // a dead connection) and is retried without backing off:
                // openraft's deadline is the heartbeat interval, so on a busy
                // machine a live follower can miss it, and backing off from
                // it would starve it of heartbeats until it stood for
                // election.
                return Err(match status.code() {
                    // A peer refusing this node's secret is misconfigured:
                    // backed off from too.
                    tonic::Code::Unavailable | tonic::Code::Unauthenticated => {
                        self.peers.forget(&self.addr);
                        unreachable(message)
                    }
                    _ => network(message),
                });
            }
            Err(_) => {
                return Err(network(format!(
                    "{what} to coordinator {} at {}: no answer in {ttl:?}",
                    self.target, self.addr
                )));
            }
        };
        let result: Result<Resp, E> = decode(&answer).map_err(network)?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<u64>, RaftError<u64>> {
        let result = self
            .call("append entries", &rpc, &option, |mut c, r| async move {
                c.append_entries(r).await
            })
            .await;
        self.noted(result)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>> {
        let result = self
            .call("install snapshot", &rpc, &option, |mut c, r| async move {
                c.install_snapshot(r).await
            })
            .await;
        self.noted(result)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<u64>, RaftError<u64>> {
        let result = self
            .call(
                "vote",
                &rpc,
                &option,
                |mut c, r| async move { c.vote(r).await },
            )
            .await;
        if let Ok(answer) = &result {
            self.contact.vote_answered(&rpc, answer);
        }
        self.noted(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::error::{Fatal, SnapshotMismatch};
    use openraft::{CommittedLeaderId, LogId, SnapshotSegmentId, Vote};

    fn roundtrip<T: Serialize + DeserializeOwned + std::fmt::Debug + PartialEq>(value: T) {
        let wire = encode(&value).expect("encode");
        let back: T = decode(&wire).expect("decode");
        assert_eq!(back, value);
    }

    #[test]
    fn raft_answers_and_errors_survive_the_wire() {
        let vote: Result<VoteResponse<u64>, RaftError<u64>> = Ok(VoteResponse {
            vote: Vote::new(3, 2),
            vote_granted: true,
            last_log_id: Some(LogId::new(CommittedLeaderId::new(3, 2), 17)),
        });
        roundtrip(vote);
        let stopped: Result<VoteResponse<u64>, RaftError<u64>> =
            Err(RaftError::Fatal(Fatal::Stopped));
        roundtrip(stopped);
        let append: Result<AppendEntriesResponse<u64>, RaftError<u64>> =
            Ok(AppendEntriesResponse::HigherVote(Vote::new(9, 1)));
        roundtrip(append);
        let mismatch: Result<InstallSnapshotResponse<u64>, RaftError<u64, InstallSnapshotError>> =
            Err(RaftError::APIError(InstallSnapshotError::SnapshotMismatch(
                SnapshotMismatch {
                    expect: SnapshotSegmentId {
                        id: "a".into(),
                        offset: 0,
                    },
                    got: SnapshotSegmentId {
                        id: "b".into(),
                        offset: 10,
                    },
                },
            )));
        roundtrip(mismatch);
    }

    #[test]
    fn another_format_or_garbage_is_refused_with_one_line() {
        let mut wire = encode(&7u64).expect("encode");
        let other = PAYLOAD_FORMAT + 1;
        wire.format = other;
        let err = decode::<u64>(&wire).expect_err("another format");
        assert!(
            err.to_string().contains(&format!("format {other}")),
            "{err}"
        );
        let garbage = RaftPayload {
            format: PAYLOAD_FORMAT,
            payload: vec![0xff; 3].into(),
        };
        assert!(decode::<VoteRequest<u64>>(&garbage).is_err());
    }
}
