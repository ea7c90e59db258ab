//! `distbuild reapi-proxy`: lets a Remote Execution API client that cannot
//! speak TLS use a cluster that requires it. Debian's Bazel 4.2.3 is one:
//! its JDK gives netty no ALPN ("JDK provider does not support ALPN
//! protocol"), and its netty has no native transport, so no Unix socket
//! (`--remote_proxy=unix:` fails "Unix domain sockets are unsupported").
//!
//! The proxy listens on a loopback address and admits a connection only
//! when the socket at its other end belongs to the proxy's own user (the
//! kernel's socket table, `/proc/net/tcp` and `tcp6`, names each socket's
//! owner): other users of the machine cannot borrow its certificate. Every
//! call of the Remote Execution API's services is passed on unchanged,
//! streams included, to a coordinator over mutual TLS with the user's
//! client certificate; the coordinator passes it to the leader. A
//! coordinator that cannot be reached is left for the next one, and the
//! call answers UNAVAILABLE, which REAPI clients retry.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use distbuild_proto::tls::Role;
use futures::future::BoxFuture;
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::transport::Channel;

use crate::args::ConnectionArgs;
use crate::connect::Connector;
use crate::exit_code;

/// Flags of `distbuild reapi-proxy`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReapiProxyArgs {
    /// Where the REAPI client connects (a loopback HOST:PORT; port 0 picks
    /// one, printed as "reapi-proxy listening on ADDR").
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:0")]
    pub listen: String,

    /// The cluster, and this user's client certificate for it.
    #[command(flatten)]
    pub connection: ConnectionArgs,
}

/// The coordinators and the channel to the one in use.
struct Upstream {
    coordinators: Vec<String>,
    connector: Connector,
    /// The coordinator in use (an index into `coordinators`) and its
    /// channel, once connected.
    current: Mutex<(usize, Option<Channel>)>,
}

impl Upstream {
    /// A channel to the coordinator in use, connecting (to the next one
    /// when that fails) if there is none.
    async fn channel(&self) -> Result<Channel, String> {
        let (mut index, channel) = self.current.lock().expect("upstream lock").clone();
        if let Some(channel) = channel {
            return Ok(channel);
        }
        let mut last_error = String::new();
        for _ in 0..self.coordinators.len() {
            let addr = &self.coordinators[index];
            match self.connector.connect(addr).await {
                Ok(channel) => {
                    *self.current.lock().expect("upstream lock") = (index, Some(channel.clone()));
                    return Ok(channel);
                }
                Err(e) => last_error = format!("{addr}: {e}"),
            }
            index = (index + 1) % self.coordinators.len();
        }
        *self.current.lock().expect("upstream lock") = (index, None);
        Err(last_error)
    }

    /// Drops the channel in use and moves on to the next coordinator.
    fn failed(&self) {
        let mut current = self.current.lock().expect("upstream lock");
        current.0 = (current.0 + 1) % self.coordinators.len();
        current.1 = None;
    }
}

/// Passes each call on to the coordinator in use.
#[derive(Clone)]
struct Forwarder {
    upstream: Arc<Upstream>,
}

impl Forwarder {
    fn forward(
        &self,
        request: http::Request<Body>,
    ) -> BoxFuture<'static, Result<http::Response<Body>, Infallible>> {
        let upstream = self.upstream.clone();
        Box::pin(async move {
            let unavailable = |why: String| {
                Ok(tonic::Status::unavailable(format!(
                    "the proxy cannot reach a coordinator: {why}; retry"
                ))
                .into_http())
            };
            let mut channel = match upstream.channel().await {
                Ok(channel) => channel,
                Err(why) => return unavailable(why),
            };
            if let Err(e) = std::future::poll_fn(|cx| channel.poll_ready(cx)).await {
                upstream.failed();
                return unavailable(e.to_string());
            }
            match channel.call(request).await {
                Ok(response) => Ok(response.map(Body::new)),
                Err(e) => {
                    upstream.failed();
                    unavailable(e.to_string())
                }
            }
        })
    }
}

/// A service of the Remote Execution API, passed on whole.
macro_rules! proxied {
    ($($service:ident => $name:literal),* $(,)?) => {$(
        #[derive(Clone)]
        struct $service(Forwarder);

        impl NamedService for $service {
            const NAME: &'static str = $name;
        }

        impl Service<http::Request<Body>> for $service {
            type Response = http::Response<Body>;
            type Error = Infallible;
            type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

            fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
                Poll::Ready(Ok(()))
            }

            fn call(&mut self, request: http::Request<Body>) -> Self::Future {
                self.0.forward(request)
            }
        }
    )*};
}

proxied! {
    CapabilitiesProxy => "build.bazel.remote.execution.v2.Capabilities",
    CasProxy => "build.bazel.remote.execution.v2.ContentAddressableStorage",
    ActionCacheProxy => "build.bazel.remote.execution.v2.ActionCache",
    ExecutionProxy => "build.bazel.remote.execution.v2.Execution",
    ByteStreamProxy => "google.bytestream.ByteStream",
}

/// One address of the kernel's socket table (`0100007F:1F90`, or 32 hex
/// digits for IPv6): each 32-bit word is printed as the host reads it.
fn parse_table_addr(text: &str) -> Option<SocketAddr> {
    let (host, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |hex: &str| u32::from_str_radix(hex, 16).ok().map(u32::to_be);
    let ip = match host.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(host)?.to_be_bytes())),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                chunk.copy_from_slice(&word(host.get(i * 8..i * 8 + 8)?)?.to_be_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The same address, an IPv4-mapped IPv6 one taken as its IPv4 self.
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

/// The owner of the socket at `peer` connected to `local`, found in a
/// socket table's text (`/proc/net/tcp` or `tcp6`).
fn owner_in_table(table: &str, peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    let (peer, local) = (canonical(peer), canonical(local));
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let at = canonical(parse_table_addr(fields.get(1)?)?);
        let to = canonical(parse_table_addr(fields.get(2)?)?);
        (at == peer && to == local)
            .then(|| fields.get(7)?.parse().ok())
            .flatten()
    })
}

/// The user owning the socket at the other end of a loopback connection.
fn peer_owner(peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().find_map(|path| {
        let table = std::fs::read_to_string(path).ok()?;
        owner_in_table(&table, peer, local)
    })
}

/// Runs `distbuild reapi-proxy`; returns the process exit code.
pub async fn reapi_proxy_cli(args: ReapiProxyArgs) -> i32 {
    let fail = |code: i32, message: String| {
        eprintln!("error: {message}");
        code
    };
    let listen: SocketAddr = match args.listen.parse() {
        Ok(addr) => addr,
        Err(_) => {
            return fail(
                exit_code::BAD_INPUT,
                format!(
                    "--listen {:?} is not HOST:PORT with an IP address",
                    args.listen
                ),
            );
        }
    };
    if !listen.ip().is_loopback() {
        return fail(
            exit_code::BAD_INPUT,
            format!(
                "--listen {listen} is not a loopback address: the proxy checks who connects only on this machine"
            ),
        );
    }
    let coordinators = match args.connection.addresses() {
        Ok(addrs) => addrs,
        Err(e) => return fail(exit_code::BAD_INPUT, e.to_string()),
    };
    let connector = match args.connection.connector(&[Role::Client]) {
        Ok(connector) => connector,
        Err(e) => return fail(exit_code::BAD_INPUT, e.to_string()),
    };
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(e) => return fail(1, format!("listen on {listen}: {e}")),
    };
    match listener.local_addr() {
        Ok(addr) => eprintln!("reapi-proxy listening on {addr}"),
        Err(e) => return fail(1, format!("listen on {listen}: {e}")),
    }
    let forwarder = Forwarder {
        upstream: Arc::new(Upstream {
            coordinators,
            connector,
            current: Mutex::new((0, None)),
        }),
    };
    // SAFETY: geteuid cannot fail and touches no memory.
    let me = unsafe { libc::geteuid() };
    let incoming = futures::stream::unfold(listener, move |listener| async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors, most likely: it passes.
                    tracing::warn!(error = %e, "accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let owner = stream
                .local_addr()
                .ok()
                .and_then(|local| peer_owner(peer, local));
            if owner == Some(me) {
                return Some((Ok::<_, std::io::Error>(stream), listener));
            }
            eprintln!(
                "reapi-proxy: refused a connection from {peer}: {}",
                match owner {
                    Some(uid) => format!("its socket belongs to user {uid}, not {me}"),
                    None => "its socket's owner is not known".to_string(),
                }
            );
        }
    });
    let served = tonic::transport::Server::builder()
        .add_service(CapabilitiesProxy(forwarder.clone()))
        .add_service(CasProxy(forwarder.clone()))
        .add_service(ActionCacheProxy(forwarder.clone()))
        .add_service(ExecutionProxy(forwarder.clone()))
        .add_service(ByteStreamProxy(forwarder))
        .serve_with_incoming(incoming)
        .await;
    match served {
        Ok(()) => 0,
        Err(e) => fail(1, format!("serve: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_table_names_each_connection_s_owner() {
        // Two lines of a real /proc/net/tcp and one of tcp6: a client at
        // 127.0.0.1:54321 (uid 1000) connected to 127.0.0.1:8080, the
        // other direction (uid 0), and a v4-mapped client (uid 1001).
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:D431 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  1000        0 123 1 0 20 4 30 10 -1\n\
   1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 124 1 0 20 4 30 10 -1\n";
        let tcp6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0000000000000000FFFF00000100007F:D432 0000000000000000FFFF00000100007F:1F90 01 00000000:00000000 00:00000000 00000000  1001        0 125 1 0 20 4 30 10 -1\n";
        let server: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let client: SocketAddr = "127.0.0.1:54321".parse().unwrap();
        assert_eq!(owner_in_table(tcp, client, server), Some(1000));
        assert_eq!(owner_in_table(tcp, server, client), Some(0));
        let mapped: SocketAddr = "127.0.0.1:54322".parse().unwrap();
        assert_eq!(owner_in_table(tcp6, mapped, server), Some(1001));
        assert_eq!(owner_in_table(tcp, mapped, server), None, "no such socket");
        assert_eq!(parse_table_addr("nonsense"), None);
        assert_eq!(parse_table_addr("0100007F:XYZ"), None);
    }

    #[test]
    fn this_process_s_own_loopback_connection_is_its_user_s() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let server = listener.local_addr().expect("addr");
        let client = std::net::TcpStream::connect(server).expect("connect");
        let (_accepted, peer) = listener.accept().expect("accept");
        assert_eq!(peer, client.local_addr().expect("addr"));
        // SAFETY: geteuid cannot fail and touches no memory.
        let me = unsafe { libc::geteuid() };
        assert_eq!(peer_owner(peer, server), Some(me));
    }
}
