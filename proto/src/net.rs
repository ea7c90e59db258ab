//! The network seam shared by every part that dials: a [`Dialer`] turns a
//! configured tonic [`Endpoint`] (address, connect timeout, keepalive) into
//! a [`Channel`]. Production dials TCP ([`TcpDialer`]); the simulation
//! passes a dialer over its simulated sockets
//! (`Endpoint::connect_with_connector`). Every endpoint is built here
//! ([`endpoint`]), so its timeouts and keepalive are the same whichever
//! dialer opens it and whichever part dials.
//!
//! On top of the dialer, a [`Connector`] opens a channel to an address
//! (`HOST:PORT`) with those settings, bounded in time, and says in one line
//! why it could not; and the API constructors ([`client_api`],
//! [`worker_api`], ...) give every gRPC client the agreed message-size
//! limits.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::v1::admin_api_client::AdminApiClient;
use crate::v1::client_api_client::ClientApiClient;
use crate::v1::peer_api_client::PeerApiClient;
use crate::v1::worker_api_client::WorkerApiClient;
use crate::wire::{CONNECT_TIMEOUT, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, MAX_MESSAGE_BYTES};

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

/// The endpoint for `addr` (`HOST:PORT`, or a URL with a scheme) with the
/// settings every side dials with: [`CONNECT_TIMEOUT`], HTTP/2 keepalive
/// every [`KEEPALIVE_INTERVAL`] (also while idle) declared dead after
/// [`KEEPALIVE_TIMEOUT`], and no Nagle delay; with `tls`, an `https`
/// endpoint that checks the server's certificate and shows this process's.
/// Every channel is built from one, a simulation's included, so no
/// connection can hang silently.
pub fn endpoint(
    addr: &str,
    tls: Option<&ClientTlsConfig>,
) -> Result<Endpoint, tonic::transport::Error> {
    let url = if addr.contains("://") {
        addr.to_string()
    } else if tls.is_some() {
        format!("https://{addr}")
    } else {
        format!("http://{addr}")
    };
    let endpoint = Endpoint::from_shared(url)?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true);
    match tls {
        Some(tls) => endpoint.tls_config(tls.clone()),
        None => Ok(endpoint),
    }
}

/// How long [`connect`] waits for a dialer beyond [`CONNECT_TIMEOUT`]
/// before it gives up on its own: the endpoint's timeout bounds the TCP
/// connect; this bounds a dialer that hangs.
pub const DIALER_GRACE: Duration = Duration::from_secs(1);

/// Why a connection could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("connect to {addr}: {problem}")]
pub struct ConnectError {
    /// The address dialled.
    pub addr: String,
    /// What went wrong, one line.
    pub problem: String,
    /// The TLS handshake was refused over certificates (see
    /// [`crate::tls::refusal`]): trying again cannot help.
    pub denied: bool,
}

impl ConnectError {
    /// A connection to `addr` that failed for another reason than the
    /// transport (a timeout, a bad address).
    pub fn other(addr: &str, problem: String) -> Self {
        Self {
            addr: addr.to_string(),
            problem,
            denied: false,
        }
    }

    /// A connection to `addr` the transport failed to open.
    pub fn transport(addr: &str, error: &tonic::transport::Error) -> Self {
        match crate::tls::refusal(error) {
            Some(refused) => Self {
                addr: addr.to_string(),
                problem: format!("TLS handshake refused: {refused}"),
                denied: true,
            },
            None => Self::other(addr, error_chain(error)),
        }
    }
}

/// Opens gRPC channels to addresses (`HOST:PORT`). The one way any part
/// of distbuild dials another.
pub trait Connector: Send + Sync + 'static {
    /// A connected channel to `addr`, or why there is none.
    fn connect(&self, addr: &str) -> BoxFuture<'static, Result<Channel, ConnectError>>;
}

/// A connector as the parts hold it.
pub type SharedConnector = Arc<dyn Connector>;

/// The production connector: TCP through [`endpoint`], with TLS when the
/// process has its certificates (the default value has none: plain HTTP/2,
/// for `--insecure`).
#[derive(Debug, Clone, Default)]
pub struct TcpConnector {
    tls: Option<ClientTlsConfig>,
}

impl TcpConnector {
    /// Dials as `security` says: TLS with its certificates, or plain.
    pub fn new(security: &crate::tls::Security) -> Self {
        Self {
            tls: security.client_config(),
        }
    }
}

impl Connector for TcpConnector {
    fn connect(&self, addr: &str) -> BoxFuture<'static, Result<Channel, ConnectError>> {
        connect(&TcpDialer, addr, self.tls.as_ref())
    }
}

/// A connector that opens the same endpoints as [`TcpConnector`] through
/// another [`Dialer`] (a simulation's sockets).
#[derive(Clone)]
pub struct DialConnector(pub SharedDialer);

impl Connector for DialConnector {
    fn connect(&self, addr: &str) -> BoxFuture<'static, Result<Channel, ConnectError>> {
        connect(self.0.as_ref(), addr, None)
    }
}

/// Connects to `addr` through `dialer` with the shared [`endpoint`]
/// settings (and `tls`, if given), within [`CONNECT_TIMEOUT`] +
/// [`DIALER_GRACE`].
pub fn connect(
    dialer: &dyn Dialer,
    addr: &str,
    tls: Option<&ClientTlsConfig>,
) -> BoxFuture<'static, Result<Channel, ConnectError>> {
    let addr = addr.to_string();
    let endpoint = match endpoint(&addr, tls) {
        Ok(endpoint) => endpoint,
        Err(e) => {
            let e = ConnectError::other(&addr, format!("not a valid address: {}", error_chain(&e)));
            return Box::pin(async move { Err(e) });
        }
    };
    let connecting = dialer.connect(endpoint);
    Box::pin(async move {
        match tokio::time::timeout(CONNECT_TIMEOUT + DIALER_GRACE, connecting).await {
            Ok(Ok(channel)) => Ok(channel),
            Ok(Err(e)) => Err(ConnectError::transport(&addr, &e)),
            Err(_) => Err(ConnectError::other(&addr, "timed out".to_string())),
        }
    })
}

/// An error and its sources on one line (transport errors hide the useful
/// part, such as "connection refused", in their sources); a source whose
/// text is already there is not repeated.
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
    one_line(&text)
}

/// `text` trimmed, with line breaks replaced, for one-line messages.
pub fn one_line(text: &str) -> String {
    text.trim().replace(['\n', '\r'], " ")
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

/// A `WorkerApi` client on `channel` with the agreed message-size limits.
pub fn worker_api(channel: Channel) -> WorkerApiClient<Channel> {
    WorkerApiClient::new(channel)
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
            endpoint("127.0.0.1:7000", None)
                .expect("valid")
                .uri()
                .to_string(),
            "http://127.0.0.1:7000/"
        );
        assert_eq!(
            endpoint("http://h:1", None)
                .expect("valid")
                .uri()
                .to_string(),
            "http://h:1/"
        );
        assert!(endpoint("bad address", None).is_err());
    }

    #[tokio::test]
    async fn a_refused_connection_names_the_address_and_the_cause() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        drop(listener);
        let error = TcpConnector::default()
            .connect(&addr)
            .await
            .expect_err("refused");
        assert_eq!(error.addr, addr);
        assert!(
            error
                .to_string()
                .starts_with(&format!("connect to {addr}: ")),
            "{error}"
        );
        assert!(!error.problem.contains('\n'), "{error}");
        let error = TcpConnector::default()
            .connect("bad address")
            .await
            .expect_err("bad");
        assert!(error.problem.starts_with("not a valid address"), "{error}");
    }
}
