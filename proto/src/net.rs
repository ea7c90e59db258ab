//! The network seam shared by every part that dials: a [`Dialer`] turns a
//! configured tonic [`Endpoint`] (address, connect timeout, keepalive) into
//! a [`Channel`]. Production dials TCP ([`TcpDialer`]); the simulation
//! passes a dialer over its simulated sockets
//! (`Endpoint::connect_with_connector`). Callers build the endpoint, so its
//! timeouts and keepalive are the same whichever dialer opens it.

use std::sync::Arc;

use futures::future::BoxFuture;
use tonic::transport::{Channel, Endpoint};

/// Opens channels for configured endpoints.
pub trait Dialer: Send + Sync + 'static {
    /// Connects now; fails if the endpoint cannot be reached.
    fn connect(
        &self,
        endpoint: Endpoint,
    ) -> BoxFuture<'static, Result<Channel, tonic::transport::Error>>;
    /// A channel that connects on first use (and reconnects after a
    /// failure).
    fn connect_lazy(&self, endpoint: Endpoint) -> Channel;
}

/// A dialer as the parts hold it.
pub type SharedDialer = Arc<dyn Dialer>;

/// Real TCP connections.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpDialer;

impl Dialer for TcpDialer {
    fn connect(
        &self,
        endpoint: Endpoint,
    ) -> BoxFuture<'static, Result<Channel, tonic::transport::Error>> {
        Box::pin(async move { endpoint.connect().await })
    }

    fn connect_lazy(&self, endpoint: Endpoint) -> Channel {
        endpoint.connect_lazy()
    }
}

/// The production dialer, shared.
pub fn tcp() -> SharedDialer {
    Arc::new(TcpDialer)
}
