//! The network seam: the one place the client opens a connection. The
//! endpoint settings (connect timeout, keepalive) and the message-size
//! limits are the ones every side shares (`distbuild_proto::net`).
//! Production uses [`Connector::tcp`]; a network simulator passes
//! [`Connector::dialing`] with its own dialer, and the rest of the client
//! does not know the difference.

use std::fmt;
use std::sync::Arc;

use distbuild_proto::net::{ConnectError, DialConnector, SharedConnector, TcpConnector};
use distbuild_proto::tls::Security;
use futures::future::BoxFuture;
use tonic::transport::Channel;

pub use distbuild_proto::net::{admin_api, client_api, endpoint, peer_api};

/// Opens a channel to an address. Cheap to clone.
#[derive(Clone)]
pub struct Connector {
    inner: SharedConnector,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Connector")
    }
}

/// A connector made of a function (see [`Connector::new`]).
struct FnConnector<F>(F);

impl<F> distbuild_proto::net::Connector for FnConnector<F>
where
    F: Fn(String) -> BoxFuture<'static, Result<Channel, tonic::transport::Error>>
        + Send
        + Sync
        + 'static,
{
    fn connect(&self, addr: &str) -> BoxFuture<'static, Result<Channel, ConnectError>> {
        let connecting = (self.0)(addr.to_string());
        let addr = addr.to_string();
        Box::pin(async move {
            connecting
                .await
                .map_err(|e| ConnectError::transport(&addr, &e))
        })
    }
}

impl Connector {
    /// Real TCP connections through [`endpoint`], without TLS.
    pub fn tcp() -> Self {
        Self {
            inner: Arc::new(TcpConnector::default()),
        }
    }

    /// Real TCP connections as `security` says: TLS with its certificates,
    /// or plain.
    pub fn secure(security: &Security) -> Self {
        Self {
            inner: Arc::new(TcpConnector::new(security)),
        }
    }

    /// Connections to [`endpoint`]s opened by `dialer` (a simulation's
    /// sockets).
    pub fn dialing(dialer: distbuild_proto::net::SharedDialer) -> Self {
        Self {
            inner: Arc::new(DialConnector(dialer)),
        }
    }

    /// A connector from a function (a simulator's, a test's).
    pub fn new(
        connect: impl Fn(String) -> BoxFuture<'static, Result<Channel, tonic::transport::Error>>
        + Send
        + Sync
        + 'static,
    ) -> Self {
        Self {
            inner: Arc::new(FnConnector(connect)),
        }
    }

    /// Opens a channel to `addr` (`HOST:PORT`).
    pub async fn connect(&self, addr: &str) -> Result<Channel, ConnectError> {
        self.inner.connect(addr).await
    }

    /// The connector as the shared leader-following client holds it.
    pub fn shared(&self) -> SharedConnector {
        self.inner.clone()
    }
}
