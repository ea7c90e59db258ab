//! REAPI clients know nothing of distbuild's leader hints: a follower
//! passes each of their calls, as it came (headers, body streamed both
//! ways), to the leader, and answers with the leader's answer. The one
//! place REAPI calls are routed; it wraps every REAPI service inside its
//! authorization, so the follower admits the client and the leader admits
//! the follower (a coordinator).
//!
//! A call in flight when the leader fails ends UNAVAILABLE; REAPI clients
//! retry such calls (Bazel's `--remote_retries`), and the retry finds the
//! new leader: a node waits for an election to settle before routing
//! (`Node::ready_leader`).

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::Status;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::codegen::{BoxFuture, Service};
use tonic::server::NamedService;

use crate::api::status::to_status;
use crate::replica::{Node, ReplicaError};

/// Marks a call a follower passed on.
const FORWARDED_HEADER: &str = "x-distbuild-forwarded";

/// A service served here when this node leads, else by the leader.
#[derive(Clone)]
pub struct Forward<S> {
    inner: S,
    node: Arc<Node>,
}

impl<S> Forward<S> {
    pub fn new(node: Arc<Node>, inner: S) -> Self {
        Self { inner, node }
    }
}

impl<S: NamedService> NamedService for Forward<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for Forward<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Tonic's generated servers are always ready; readiness of the
        // leader's channel is awaited per call.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let mut inner = self.inner.clone();
        let node = self.node.clone();
        Box::pin(async move {
            // Passed on once at most: two nodes that each take the other
            // for the leader (views about to converge) must not bounce a
            // call between them.
            let forwarded = request.headers().contains_key(FORWARDED_HEADER);
            match node.ready_leader().await {
                Ok(()) => inner.call(request).await,
                Err(ReplicaError::NotLeader {
                    leader: Some(leader),
                    ..
                }) if !forwarded => Ok(forward(&node, &leader, request).await),
                Err(e) => Ok(to_status(e).into_http()),
            }
        })
    }
}

/// The leader's answer to `request`, or UNAVAILABLE naming why it could
/// not be had.
async fn forward(
    node: &Node,
    leader: &str,
    mut request: http::Request<Body>,
) -> http::Response<Body> {
    request
        .headers_mut()
        .insert(FORWARDED_HEADER, http::HeaderValue::from_static("1"));
    let unavailable = |why: String| {
        Status::unavailable(format!(
            "this coordinator passes Remote Execution API calls to the leader at {leader}: {why}; retry"
        ))
        .into_http()
    };
    let mut channel = match node.peer_channel(leader) {
        Ok(channel) => channel,
        Err(e) => return unavailable(e.to_string()),
    };
    if let Err(e) = std::future::poll_fn(|cx| channel.poll_ready(cx)).await {
        node.forget_peer_channel(leader);
        return unavailable(e.to_string());
    }
    match channel.call(request).await {
        Ok(response) => response,
        Err(e) => {
            node.forget_peer_channel(leader);
            unavailable(e.to_string())
        }
    }
}
