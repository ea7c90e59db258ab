//! The network seam: the one place the client opens a connection, and the
//! one place gRPC clients get their message-size limits. Production uses
//! [`Connector::tcp`]; a network simulator passes its own [`Connector`]
//! (built with `Endpoint::connect_with_connector` over its sockets) and the
//! rest of the client does not know the difference.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use distbuild_proto::v1::admin_api_client::AdminApiClient;
use distbuild_proto::v1::client_api_client::ClientApiClient;
use distbuild_proto::v1::peer_api_client::PeerApiClient;
use distbuild_proto::wire::MAX_MESSAGE_BYTES;
use futures::future::BoxFuture;
use tonic::transport::{Channel, Endpoint};

/// How long opening one TCP connection may take. A node cut off by a
/// partition drops the SYN instead of refusing it: without this bound the
/// client would wait for the kernel's own timeout (minutes) before trying
/// another coordinator.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Interval of HTTP/2 keepalive pings, sent even while no call is open: a
/// silently dead connection (a node lost in a partition, its packets
/// dropped) is noticed within interval + timeout, also while a WatchBuild
/// stream waits minutes between events.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);

/// How long a keepalive ping may go unanswered before the connection (and
/// every call on it) is declared dead (UNAVAILABLE).
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// The endpoint for `addr` (`HOST:PORT`, or a URL with a scheme), with the
/// client's connect timeout and keepalive set. Every channel the client
/// opens is built from it, a simulator's [`Connector`] included (through
/// `Endpoint::connect_with_connector`), so no connection can hang silently.
pub fn endpoint(addr: &str) -> Result<Endpoint, tonic::transport::Error> {
    let url = if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    };
    Ok(Endpoint::from_shared(url)?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true))
}

type ConnectFn =
    dyn Fn(String) -> BoxFuture<'static, Result<Channel, tonic::transport::Error>> + Send + Sync;

/// Opens a channel to an address. Cheap to clone.
#[derive(Clone)]
pub struct Connector {
    connect: Arc<ConnectFn>,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Connector")
    }
}

impl Connector {
    /// Real TCP connections through [`endpoint`].
    pub fn tcp() -> Self {
        Self::dialing(distbuild_proto::net::tcp())
    }

    /// Connections to [`endpoint`]s opened by `dialer` (a simulation's
    /// sockets).
    pub fn dialing(dialer: distbuild_proto::net::SharedDialer) -> Self {
        Self::new(move |addr| {
            let dialer = dialer.clone();
            Box::pin(async move { dialer.connect(endpoint(&addr)?).await })
        })
    }

    /// A connector from a function (a simulator's, a test's).
    pub fn new(
        connect: impl Fn(String) -> BoxFuture<'static, Result<Channel, tonic::transport::Error>>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        Self {
            connect: Arc::new(connect),
        }
    }

    /// Opens a channel to `addr` (`HOST:PORT`).
    pub async fn connect(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        (self.connect)(addr.to_string()).await
    }
}

/// A `ClientApi` client on `channel` with the agreed message-size limits.
pub fn client_api(channel: Channel) -> ClientApiClient<Channel> {
    ClientApiClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// An `AdminApi` client on `channel` with the agreed message-size limits.
pub fn admin_api(channel: Channel) -> AdminApiClient<Channel> {
    AdminApiClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// A `PeerApi` (worker) client on `channel` with the agreed message-size
/// limits.
pub fn peer_api(channel: Channel) -> PeerApiClient<Channel> {
    PeerApiClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_become_http_urls() {
        assert_eq!(
            endpoint("127.0.0.1:7000").expect("valid").uri().to_string(),
            "http://127.0.0.1:7000/"
        );
        assert_eq!(
            endpoint("http://h:1").expect("valid").uri().to_string(),
            "http://h:1/"
        );
        assert!(endpoint("bad address").is_err());
    }
}
