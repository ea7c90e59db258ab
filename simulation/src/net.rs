//! distbuild's network seams over turmoil's simulated TCP: a [`Dialer`]
//! for the coordinators' peer channels, the workers and the clients, and a
//! stream of accepted connections for the gRPC servers; and [`crash`] and
//! [`bounce`], which stop a host closing its connections in the order they
//! were opened.
//!
//! Why the order needs help: turmoil crashes a host by dropping its tokio
//! runtime, and tokio drops a runtime's tasks in an order that follows
//! their task IDs, which one counter numbers for the whole process. Each
//! connection a dropped task held sends its FIN (or RST) into the network
//! as it drops, so without help the order those reach peers in, and so the
//! run, would depend on how many tasks the process spawned before, on any
//! thread. Every connection is a [`SimStream`]: while its host is being
//! crashed, a dropped one is set aside, and once the host's last one is
//! dropped they all close, in the order they were opened.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use distbuild_proto::net::Dialer;
use futures::Stream;
use futures::future::BoxFuture;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint, Uri};

/// Dials turmoil hosts by name (`c1:7000`).
#[derive(Debug, Clone, Copy, Default)]
pub struct SimDialer;

fn connector() -> impl tower::Service<
    Uri,
    Response = TokioIo<SimStream>,
    Error = io::Error,
    Future = BoxFuture<'static, io::Result<TokioIo<SimStream>>>,
> + Clone
+ Send
+ 'static {
    tower::service_fn(|uri: Uri| -> BoxFuture<'static, io::Result<_>> {
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| io::Error::other(format!("no host in {uri}")))?
                .to_string();
            let port = uri
                .port_u16()
                .ok_or_else(|| io::Error::other(format!("no port in {uri}")))?;
            let stream = turmoil::net::TcpStream::connect((host.as_str(), port)).await?;
            Ok(TokioIo::new(SimStream::new(stream)?))
        })
    })
}

impl Dialer for SimDialer {
    fn connect(
        &self,
        endpoint: Endpoint,
    ) -> BoxFuture<'static, Result<Channel, tonic::transport::Error>> {
        Box::pin(async move { endpoint.connect_with_connector(connector()).await })
    }

    fn connect_lazy(&self, endpoint: Endpoint) -> Channel {
        endpoint.connect_with_connector_lazy(connector())
    }
}

/// The connections of one host, for closing them in order at a crash.
#[derive(Default)]
struct HostStreams {
    /// Number for the next connection opened.
    next: u64,
    /// The connections open now.
    open: BTreeSet<u64>,
    /// While the host is being crashed: the connections dropped so far,
    /// not yet closed.
    crashing: Option<BTreeMap<u64, turmoil::net::TcpStream>>,
}

thread_local! {
    // Each simulation runs on one thread; `reset` starts a run afresh.
    static STREAMS: RefCell<HashMap<IpAddr, HostStreams>> = RefCell::new(HashMap::new());
}

/// Forgets every host's connections (at the start of a run on this thread).
pub fn reset() {
    STREAMS.with(|streams| streams.borrow_mut().clear());
}

/// Crashes `host`: its connections close in the order they were opened
/// (see the module documentation).
pub fn crash(sim: &mut turmoil::Sim<'_>, host: &str) {
    while_stopping(sim, host, |sim| sim.crash(host));
}

/// Restarts `host` (stopping it first if it runs), closing its connections
/// in the order they were opened.
pub fn bounce(sim: &mut turmoil::Sim<'_>, host: &str) {
    while_stopping(sim, host, |sim| sim.bounce(host));
}

fn while_stopping(
    sim: &mut turmoil::Sim<'_>,
    host: &str,
    stop: impl FnOnce(&mut turmoil::Sim<'_>),
) {
    let ip = sim.lookup(host);
    STREAMS.with(|streams| {
        streams.borrow_mut().entry(ip).or_default().crashing = Some(BTreeMap::new());
    });
    stop(sim);
    let (set_aside, still_open) = STREAMS.with(|streams| {
        let mut streams = streams.borrow_mut();
        let entry = streams.entry(ip).or_default();
        (
            entry.crashing.take().unwrap_or_default(),
            std::mem::take(&mut entry.open),
        )
    });
    // Every connection lives in one of the host's tasks, so dropping its
    // runtime dropped (and so closed) them all.
    assert!(
        still_open.is_empty() && set_aside.is_empty(),
        "{host}: connections {still_open:?} outlived the host's runtime"
    );
}

/// A simulated connection (dialled or accepted) that closes in order when
/// its host crashes (see the module documentation).
pub struct SimStream {
    /// None once dropped.
    stream: Option<turmoil::net::TcpStream>,
    host: IpAddr,
    number: u64,
    /// The host at the other end, by name.
    peer: SimPeer,
}

/// The connection information a simulated server sees: the name of the
/// host at the other end, which the simulation's authenticator turns into
/// an identity (the stand-in for a verified certificate).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimPeer(pub Option<String>);

impl SimStream {
    /// Registers `stream` with its host (the host that runs this code).
    pub fn new(stream: turmoil::net::TcpStream) -> io::Result<Self> {
        let host = stream.local_addr()?.ip();
        let peer = SimPeer(turmoil::reverse_lookup(stream.peer_addr()?.ip()));
        let number = STREAMS.with(|streams| {
            let mut streams = streams.borrow_mut();
            let entry = streams.entry(host).or_default();
            let number = entry.next;
            entry.next += 1;
            entry.open.insert(number);
            number
        });
        Ok(Self {
            stream: Some(stream),
            host,
            number,
            peer,
        })
    }

    fn stream(&mut self) -> &mut turmoil::net::TcpStream {
        self.stream
            .as_mut()
            .expect("a connection is used until dropped")
    }
}

impl Drop for SimStream {
    fn drop(&mut self) {
        let Some(stream) = self.stream.take() else {
            return;
        };
        // Closed (dropped) outside the borrow: turmoil's drop runs here.
        let to_close: Vec<turmoil::net::TcpStream> = STREAMS.with(|streams| {
            let mut streams = streams.borrow_mut();
            let entry = streams.entry(self.host).or_default();
            entry.open.remove(&self.number);
            match &mut entry.crashing {
                None => vec![stream],
                Some(dropped) => {
                    dropped.insert(self.number, stream);
                    if entry.open.is_empty() {
                        std::mem::take(dropped).into_values().collect()
                    } else {
                        Vec::new()
                    }
                }
            }
        });
        for stream in to_close {
            drop(stream);
        }
    }
}

impl Connected for SimStream {
    type ConnectInfo = SimPeer;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer.clone()
    }
}

impl AsyncRead for SimStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(self.stream()).poll_read(cx, buf)
    }
}

impl AsyncWrite for SimStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.stream()).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.stream()).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.stream()).poll_shutdown(cx)
    }
}

/// The connections accepted by `listener`, as a stream.
pub fn incoming(
    listener: turmoil::net::TcpListener,
) -> impl Stream<Item = io::Result<SimStream>> + Send + 'static {
    futures::stream::unfold(listener, |listener| async move {
        let accepted = listener
            .accept()
            .await
            .and_then(|(stream, _)| SimStream::new(stream));
        Some((accepted, listener))
    })
}
