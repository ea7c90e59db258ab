//! Accepting connections: TLS handshakes run off the accept loop, each in
//! its own task with a deadline and a bound on how many run at once, so a
//! caller that stalls its handshake delays nobody else. What comes out is
//! a stream of established TLS connections for tonic's
//! `serve_with_incoming`, whose connection information carries the
//! caller's certificates (`Request::peer_certs`).

use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

/// How long a caller may take over its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; a connection beyond it is closed.
pub const MAX_HANDSHAKES: usize = 256;
/// Pause after an accept error (out of file descriptors, say) before the
/// next accept, so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// The connections of `incoming` once `acceptor`'s handshake completed.
/// Failed and timed-out handshakes concern only their caller: they are
/// dropped (logged at debug level). The accepting task ends when the
/// returned stream is dropped or `incoming` ends.
pub fn tls<S, IO>(
    incoming: S,
    acceptor: TlsAcceptor,
) -> impl Stream<Item = std::io::Result<TlsStream<IO>>> + Send + 'static
where
    S: Stream<Item = std::io::Result<IO>> + Send + 'static,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel(MAX_HANDSHAKES);
    tokio::spawn(async move {
        let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        let mut incoming = std::pin::pin!(incoming);
        loop {
            let next = tokio::select! {
                () = tx.closed() => return,
                next = incoming.next() => next,
            };
            let io = match next {
                None => return,
                Some(Ok(io)) => io,
                Some(Err(error)) => {
                    tracing::debug!(%error, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            };
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                tracing::debug!("{MAX_HANDSHAKES} handshakes in progress: connection closed");
                continue;
            };
            let (tx, acceptor) = (tx.clone(), acceptor.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(error)) => tracing::debug!(%error, "TLS handshake failed"),
                    Err(_) => tracing::debug!("TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
