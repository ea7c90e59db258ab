//! The network seam on the client side: every outgoing gRPC connection the
//! worker makes (to coordinators and to peers) goes through one
//! [`Connector`]. Production dials TCP ([`TcpConnector`]); a simulation
//! passes a [`DialConnector`] over its own sockets. The connector, its
//! endpoint settings (connect timeout, keepalive) and the message-size
//! limits are the ones every side shares, from `distbuild_proto::net`.

pub use distbuild_proto::net::{
    ConnectError, Connector, DialConnector, SharedConnector, TcpConnector, error_chain,
};
pub use distbuild_proto::net::{peer_api as peer_api_client, worker_api as worker_api_client};
