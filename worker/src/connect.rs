//! The network seam on the client side: every outgoing gRPC connection the
//! worker makes (to coordinators and to peers) goes through one
//! [`Connector`]. Production dials TCP; a simulation passes its own.

use std::sync::Arc;
use std::time::Duration;

use distbuild_proto::net::{Dialer, SharedDialer, TcpDialer};
use distbuild_proto::v1::peer_api_client::PeerApiClient;
use distbuild_proto::v1::worker_api_client::WorkerApiClient;
use distbuild_proto::wire::MAX_MESSAGE_BYTES;
use futures::future::BoxFuture;
use tonic::transport::{Channel, Endpoint};

/// How long establishing a connection may take: short, so an address that
/// drops packets (a partitioned coordinator or peer) costs about a second
/// before the next one is tried.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Interval of HTTP/2 keepalive pings on every connection, idle or not: a
/// peer that stopped answering (partitioned away, packets dropped) is
/// noticed within interval + timeout, also while a call waits on it.
pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a keepalive ping may go unanswered before the connection is
/// considered dead (and every call on it fails).
pub const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a connection could not be made.
#[derive(Debug, thiserror::Error)]
#[error("connect to {addr}: {problem}")]
pub struct ConnectError {
    /// The address dialled.
    pub addr: String,
    /// What went wrong, one line.
    pub problem: String,
}

/// Opens gRPC channels to `HOST:PORT` addresses. The one place where the
/// worker dials anything.
pub trait Connector: Send + Sync + 'static {
    /// A connected channel to `addr` (`HOST:PORT`), or why there is none.
    fn connect(&self, addr: &str) -> BoxFuture<'static, Result<Channel, ConnectError>>;
}

/// The production connector: plain TCP (HTTP/2 without TLS), with a
/// connect timeout and HTTP/2 keepalive.
#[derive(Debug, Clone, Default)]
pub struct TcpConnector;

impl Connector for TcpConnector {
    fn connect(&self, addr: &str) -> BoxFuture<'static, Result<Channel, ConnectError>> {
        connect_with(&TcpDialer, addr)
    }
}

/// A connector that opens the same endpoints as [`TcpConnector`] through
/// another [`Dialer`] (a simulation's sockets).
#[derive(Clone)]
pub struct DialConnector(pub SharedDialer);

impl Connector for DialConnector {
    fn connect(&self, addr: &str) -> BoxFuture<'static, Result<Channel, ConnectError>> {
        connect_with(self.0.as_ref(), addr)
    }
}

/// Connects to `addr` through `dialer`, with the worker's endpoint settings.
fn connect_with(
    dialer: &dyn Dialer,
    addr: &str,
) -> BoxFuture<'static, Result<Channel, ConnectError>> {
    let url = format!("http://{addr}");
    let addr = addr.to_string();
    let error = move |problem: String| ConnectError {
        addr: addr.clone(),
        problem,
    };
    let endpoint = match Endpoint::from_shared(url) {
        Ok(endpoint) => endpoint
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(HTTP2_KEEPALIVE_INTERVAL)
            .keep_alive_timeout(HTTP2_KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true),
        Err(e) => {
            let e = error(format!("not a valid address: {e}"));
            return Box::pin(async move { Err(e) });
        }
    };
    let connecting = dialer.connect(endpoint);
    Box::pin(async move {
        // Bounded independently of the dialer's own timeout, so a dialer
        // that hangs cannot stall the caller.
        match tokio::time::timeout(CONNECT_TIMEOUT + Duration::from_secs(1), connecting).await {
            Ok(Ok(channel)) => Ok(channel),
            Ok(Err(e)) => Err(error(error_chain(&e))),
            Err(_) => Err(error("timed out".to_string())),
        }
    })
}

/// A shared connector, as the worker's parts hold it.
pub type SharedConnector = Arc<dyn Connector>;

/// A `WorkerApi` client on `channel` with our message limits.
pub fn worker_api_client(channel: Channel) -> WorkerApiClient<Channel> {
    WorkerApiClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// A `PeerApi` client on `channel` with our message limits.
pub fn peer_api_client(channel: Channel) -> PeerApiClient<Channel> {
    PeerApiClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// An error and its sources on one line (transport errors hide the useful
/// part, such as "connection refused", in their sources).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
