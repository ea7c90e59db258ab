//! The metrics and status port (`--metrics-listen`): a small HTTP/1.1
//! server for Prometheus scrapes and a process's own pages.
//!
//! Who may read it: with a token file (`--metrics-token-file`), callers
//! show the token as `Authorization: Bearer TOKEN` (Prometheus's
//! `authorization.credentials_file`) or in a cookie a browser gets from
//! `/login?token=TOKEN`; without one (allowed only under `--insecure`)
//! anyone who reaches the port. A process with TLS serves HTTPS with its
//! own certificate.
//!
//! Bounds: at most [`MAX_CONNECTIONS`] connections (more are closed at
//! once), [`HANDSHAKE_TIMEOUT`] for a TLS handshake, [`HEADER_TIMEOUT`] to
//! send a request's headers, and [`MAX_CONNECTION_LIFE`] per connection.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use distbuild_proto::tls::Security;
use distbuild_proto::wire::{
    PrivateFileError, check_cluster_secret, read_owner_only, same_secret as same,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The OpenMetrics text format `prometheus-client` writes.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Time a caller has to finish a TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a caller has to send a request's headers (also while a kept-alive
/// connection is idle).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a connection is kept: a browser polling the page reconnects.
pub const MAX_CONNECTION_LIFE: Duration = Duration::from_secs(300);

/// The cookie a browser keeps the token in (hex: a token may hold
/// characters a cookie value may not).
const TOKEN_COOKIE: &str = "distbuild_token";

/// The flags of the metrics and status port, taken by coordinators and
/// workers.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct HttpFlags {
    /// Serve Prometheus metrics on `/metrics` (and, on a coordinator, the
    /// status page on `/`) on this address (HOST:PORT). Off by default.
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_listen: Option<SocketAddr>,
    /// A file holding the token (16 to 1024 printable ASCII characters,
    /// readable by its owner only) that callers of --metrics-listen must
    /// show: `Authorization: Bearer TOKEN`, or open `/login?token=TOKEN`
    /// in a browser. Required with TLS; under --insecure, without it the
    /// port is open to anyone who reaches it.
    #[arg(long, value_name = "FILE", requires = "metrics_listen")]
    pub metrics_token_file: Option<PathBuf>,
}

/// Why the port's flags were refused.
#[derive(Debug, thiserror::Error)]
pub enum HttpFlagsError {
    #[error(
        "--metrics-listen needs --metrics-token-file with TLS: the metrics and status page would be open to anyone"
    )]
    NoToken,
    #[error("metrics token {path}: {problem}")]
    Read {
        path: PathBuf,
        problem: std::io::Error,
    },
    #[error(
        "metrics token {path} may be read by other users (mode {mode:04o}): make it private, chmod 600 {path}"
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error("metrics token {path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
    #[error("listen on {addr} (--metrics-listen): {problem}")]
    Listen {
        addr: SocketAddr,
        problem: std::io::Error,
    },
    #[error("HTTPS settings for --metrics-listen: {0}")]
    Tls(String),
}

/// Who may read the port.
#[derive(Clone)]
pub enum Access {
    /// Anyone (under `--insecure`, without a token).
    Open,
    /// Callers showing this token.
    Token(Arc<str>),
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Access::Open => f.write_str("Open"),
            Access::Token(_) => f.write_str("Token(..)"),
        }
    }
}

/// The port, bound and configured, not yet serving.
pub struct HttpPort {
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    access: Access,
}

impl HttpPort {
    /// Binds the port the flags ask for, if any.
    pub async fn bind(
        flags: &HttpFlags,
        security: &Security,
    ) -> Result<Option<HttpPort>, HttpFlagsError> {
        let Some(addr) = flags.metrics_listen else {
            return Ok(None);
        };
        let access = match (&flags.metrics_token_file, security) {
            (Some(path), _) => Access::Token(read_token(path)?.into()),
            (None, Security::Tls(_)) => return Err(HttpFlagsError::NoToken),
            (None, Security::Insecure) => {
                if !addr.ip().is_loopback() {
                    tracing::warn!(
                        "no --metrics-token-file: anyone who reaches {addr} can read metrics and build status"
                    );
                }
                Access::Open
            }
        };
        let tls = match security {
            Security::Tls(material) => Some(tokio_rustls::TlsAcceptor::from(
                material
                    .https_server_config()
                    .map_err(HttpFlagsError::Tls)?,
            )),
            Security::Insecure => None,
        };
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|problem| HttpFlagsError::Listen { addr, problem })?;
        Ok(Some(HttpPort {
            listener,
            tls,
            access,
        }))
    }

    /// The address it is bound to.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves `routes` behind the token check, `public` (pages that show
    /// no data) without it, and `/login`, until `shutdown`.
    pub async fn serve(self, routes: Router, public: Router, shutdown: CancellationToken) {
        let secure = self.tls.is_some();
        let app = routes
            .layer(axum::middleware::from_fn_with_state(
                self.access.clone(),
                require_token,
            ))
            .merge(public)
            .route(
                "/login",
                axum::routing::get(login).with_state((self.access.clone(), secure)),
            );
        let scheme = if secure { "https" } else { "http" };
        if let Ok(addr) = self.listener.local_addr() {
            tracing::info!("metrics on {scheme}://{addr}/metrics");
        }
        let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            let (stream, _) = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of descriptors and the like: pause, not spin.
                        tracing::warn!("metrics port: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = connections.clone().try_acquire_owned() else {
                continue;
            };
            let app = app.clone();
            let tls = self.tls.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let served = async {
                    match tls {
                        Some(tls) => {
                            if let Ok(Ok(stream)) =
                                tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)).await
                            {
                                serve_connection(stream, app).await;
                            }
                        }
                        None => serve_connection(stream, app).await,
                    }
                };
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::timeout(MAX_CONNECTION_LIFE, served) => {}
                }
            });
        }
    }
}

async fn serve_connection<IO>(io: IO, app: Router)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper_util::service::TowerToHyperService::new(app);
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(hyper_util::rt::TokioIo::new(io), service)
        .await;
}

/// Reads a token file: private, 16 to 1024 printable ASCII characters
/// once surrounding whitespace is trimmed.
pub fn read_token(path: &std::path::Path) -> Result<String, HttpFlagsError> {
    let bytes = read_owner_only(path).map_err(|problem| match problem {
        PrivateFileError::Read(problem) => HttpFlagsError::Read {
            path: path.to_path_buf(),
            problem,
        },
        PrivateFileError::Exposed(mode) => HttpFlagsError::Exposed {
            path: path.to_path_buf(),
            mode,
        },
    })?;
    let text = String::from_utf8_lossy(&bytes).trim().to_string();
    check_cluster_secret(&text).map_err(|problem| HttpFlagsError::Invalid {
        path: path.to_path_buf(),
        problem: problem.to_string(),
    })?;
    Ok(text)
}

/// The token a request shows, by header or cookie.
fn shown_token(headers: &HeaderMap) -> Option<Vec<u8>> {
    if let Some(value) = headers.get(header::AUTHORIZATION)
        && let Some(token) = value.as_bytes().strip_prefix(b"Bearer ")
    {
        return Some(token.to_vec());
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == TOKEN_COOKIE)
        .and_then(|(_, value)| hex::decode(value).ok())
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "this port needs the metrics token (--metrics-token-file): send `Authorization: Bearer TOKEN`, or open /login?token=TOKEN in a browser\n",
    )
        .into_response()
}

async fn require_token(State(access): State<Access>, request: Request, next: Next) -> Response {
    match &access {
        Access::Open => next.run(request).await,
        Access::Token(token) => match shown_token(request.headers()) {
            Some(shown) if same(&shown, token.as_bytes()) => next.run(request).await,
            _ => unauthorized(),
        },
    }
}

#[derive(serde::Deserialize)]
struct LoginQuery {
    token: Option<String>,
}

/// `/login?token=TOKEN`: a browser's way in; sets the cookie and goes to
/// the page.
async fn login(
    State((access, secure)): State<(Access, bool)>,
    Query(query): Query<LoginQuery>,
) -> Response {
    let Access::Token(token) = &access else {
        return (StatusCode::SEE_OTHER, [(header::LOCATION, "./")]).into_response();
    };
    match &query.token {
        Some(shown) if same(shown.as_bytes(), token.as_bytes()) => {
            let mut cookie = format!(
                "{TOKEN_COOKIE}={}; HttpOnly; SameSite=Strict; Path=/",
                hex::encode(token.as_bytes())
            );
            if secure {
                cookie.push_str("; Secure");
            }
            let mut response = (StatusCode::SEE_OTHER, [(header::LOCATION, "./")]).into_response();
            if let Ok(value) = HeaderValue::from_str(&cookie) {
                response.headers_mut().insert(header::SET_COOKIE, value);
            }
            response
        }
        _ => unauthorized(),
    }
}
