//! Following a build's event stream to its end. When the stream breaks (a
//! coordinator dies, the leader changes, the network drops it) the client
//! reconnects and resumes from the next sequence number it expects, so each
//! event is handed on exactly once and in order.

use std::time::Duration;

use distbuild_proto::v1::{BuildEvent, WatchBuildRequest, build_event};
use futures::FutureExt;
use tracing::{debug, warn};

use crate::cluster::{Backoff, CallError, Cluster, Disposition, RPC_TIMEOUT, classify, describe};
use crate::connect::client_api;

/// Longest wait for the next event before the stream is presumed stuck and
/// reopened. Events can be minutes apart (long jobs); keepalive pings catch
/// a dead connection much sooner.
pub const WATCH_IDLE_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// What a watcher is handed.
pub enum Watched<'a> {
    /// The next event, each once and in order.
    Event(&'a BuildEvent),
    /// Every event that has arrived was handed on, and the next is not
    /// here yet: the moment to write out what was buffered.
    CaughtUp,
}

/// Streams the events of build `build_id` into `on_event`, from sequence
/// number 0 through build_finished. Fails when the cluster stays
/// unreachable for its patience (each reopening is a [`Cluster::call_at`],
/// which counts from the break), or answers with an error that retrying
/// cannot fix.
pub async fn watch_build(
    cluster: &Cluster,
    build_id: u64,
    on_event: impl FnMut(Watched<'_>),
) -> Result<(), CallError> {
    watch_build_with_idle_timeout(cluster, build_id, WATCH_IDLE_TIMEOUT, on_event).await
}

/// [`watch_build`] with a chosen idle timeout (tests use a short one).
pub async fn watch_build_with_idle_timeout(
    cluster: &Cluster,
    build_id: u64,
    idle_timeout: Duration,
    mut on_event: impl FnMut(Watched<'_>),
) -> Result<(), CallError> {
    let mut next_seq = 0u64;
    // Reset by every event: a stream that keeps opening and breaking without
    // delivering anything is reopened at most about every 250 ms.
    let mut backoff = Backoff::new();
    loop {
        let from_seq = next_seq;
        let (addr, mut stream) = cluster
            .call_at("watch the build", Some(RPC_TIMEOUT), |channel| async move {
                Ok(client_api(channel)
                    .watch_build(WatchBuildRequest { build_id, from_seq })
                    .await?
                    .into_inner())
            })
            .await?;
        let break_reason = loop {
            // `message` can be dropped unfinished: it takes nothing from
            // the stream until it returns a message.
            let next = match stream.message().now_or_never() {
                Some(ready) => Ok(ready),
                None => {
                    on_event(Watched::CaughtUp);
                    tokio::time::timeout(idle_timeout, stream.message()).await
                }
            };
            match next {
                Err(_) => {
                    // Keepalive catches a dead connection; this is a live
                    // one that stopped sending: try another node.
                    cluster.failed(&addr).await;
                    break format!("no event for {idle_timeout:?}");
                }
                Ok(Ok(None)) => {
                    cluster.failed(&addr).await;
                    break "the stream ended before build_finished".to_string();
                }
                Ok(Ok(Some(event))) => {
                    if event.seq < next_seq {
                        continue; // seen before the stream was reopened
                    }
                    if event.seq > next_seq {
                        warn!(
                            build_id,
                            expected = next_seq,
                            got = event.seq,
                            "events missing from the build's stream"
                        );
                    }
                    next_seq = event.seq + 1;
                    backoff.reset();
                    let done = matches!(event.event, Some(build_event::Event::BuildFinished(_)));
                    on_event(Watched::Event(&event));
                    if done {
                        return Ok(());
                    }
                }
                Ok(Err(status)) => match classify(&status) {
                    // The node lost its leadership (or never had it): the
                    // stream resumes at the leader it names.
                    Disposition::Redirect(leader) => {
                        cluster.follow_leader(&addr, &leader).await;
                        break describe(&status);
                    }
                    // An election, a stopping node, a broken or silent
                    // connection (keepalive): the next attempt starts on a
                    // fresh connection, at the next node.
                    Disposition::Retry => {
                        cluster.failed(&addr).await;
                        break describe(&status);
                    }
                    // Too many watchers there for now: the same node,
                    // after the pause it asked for.
                    Disposition::Busy(pause) => {
                        tokio::time::sleep(pause).await;
                        break describe(&status);
                    }
                    Disposition::Fatal => {
                        return Err(CallError::Rejected {
                            what: "watch the build".to_string(),
                            status,
                        });
                    }
                },
            }
        };
        drop(stream);
        debug!(build_id, next_seq, %addr, "build stream broke: {break_reason}; reopening");
        tokio::time::sleep(backoff.next_delay()).await;
    }
}
