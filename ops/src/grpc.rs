//! Requests and latency of every gRPC method a server answers, as a tower
//! layer around the whole server (so refusals by authentication count
//! too):
//!
//! - `distbuild_grpc_requests_total{method, code}`: calls ended, by
//!   method (`/package.Service/Method`) and gRPC status name (`OK`,
//!   `UNAVAILABLE`, ...; `CANCELLED` when the caller went away first);
//! - `distbuild_grpc_request_duration_seconds{method}`: from the request's
//!   arrival to the end of the answer (for a stream, the whole stream).
//!
//! Method names come from callers, so their label set is bounded: a path
//! that is not `/service/method` in the characters protobuf names use, or
//! that arrives after [`MAX_METHODS`] others were seen, counts as
//! `other`.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Body, Frame};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Distinct method labels kept; later ones count as `other`.
pub const MAX_METHODS: usize = 256;
/// Longest method path kept as a label.
const MAX_METHOD_CHARS: usize = 160;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    method: String,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

/// The families a server's calls are counted in.
#[derive(Clone)]
pub struct GrpcMetrics {
    inner: Arc<Inner>,
}

struct Inner {
    requests: Family<CallLabels, Counter>,
    seconds: Family<MethodLabels, Histogram, fn() -> Histogram>,
    methods: Mutex<HashSet<String>>,
}

impl GrpcMetrics {
    /// Registers the families in `registry` (which prefixes `distbuild_`).
    pub fn register(registry: &mut Registry) -> Self {
        let requests = Family::<CallLabels, Counter>::default();
        let seconds = Family::<MethodLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(crate::duration_buckets())) as fn() -> Histogram,
        );
        registry.register(
            "grpc_requests",
            "gRPC calls ended, by method and status code",
            requests.clone(),
        );
        registry.register(
            "grpc_request_duration_seconds",
            "gRPC call duration, from the request to the end of the answer",
            seconds.clone(),
        );
        Self {
            inner: Arc::new(Inner {
                requests,
                seconds,
                methods: Mutex::default(),
            }),
        }
    }

    /// The layer a tonic server is built with.
    pub fn layer(&self) -> GrpcMetricsLayer {
        GrpcMetricsLayer {
            metrics: self.clone(),
        }
    }

    /// The label of a request path.
    fn method_label(&self, path: &str) -> String {
        let well_formed = path.len() <= MAX_METHOD_CHARS
            && path
                .strip_prefix('/')
                .and_then(|p| p.split_once('/'))
                .is_some_and(|(service, method)| {
                    let name = |s: &str| {
                        !s.is_empty()
                            && s.bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
                    };
                    name(service) && name(method)
                });
        if !well_formed {
            return "other".into();
        }
        let mut methods = self.inner.methods.lock().expect("methods lock poisoned");
        if methods.contains(path) || methods.len() < MAX_METHODS {
            methods.insert(path.to_string());
            path.to_string()
        } else {
            "other".into()
        }
    }

    fn record(&self, method: &str, code: &'static str, started: Instant) {
        self.inner
            .requests
            .get_or_create(&CallLabels {
                method: method.to_string(),
                code,
            })
            .inc();
        self.inner
            .seconds
            .get_or_create(&MethodLabels {
                method: method.to_string(),
            })
            .observe(started.elapsed().as_secs_f64());
    }
}

/// The conventional name of gRPC status code `code`.
pub fn code_name(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "CANCELLED",
        2 => "UNKNOWN",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        _ => "UNKNOWN",
    }
}

fn status_in(headers: &http::HeaderMap) -> Option<&'static str> {
    let value = headers.get("grpc-status")?;
    let code: i32 = value.to_str().ok()?.trim().parse().ok()?;
    Some(code_name(code))
}

/// See the module's comment.
#[derive(Clone)]
pub struct GrpcMetricsLayer {
    metrics: GrpcMetrics,
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct GrpcMetricsService<S> {
    inner: S,
    metrics: GrpcMetrics,
}

/// Records one call once: when its status is known, or as cancelled if
/// its answer is dropped before.
struct Recorder {
    metrics: GrpcMetrics,
    method: String,
    started: Instant,
    done: bool,
}

impl Recorder {
    fn finish(&mut self, code: &'static str) {
        if !self.done {
            self.done = true;
            self.metrics.record(&self.method, code, self.started);
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.finish("CANCELLED");
    }
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for GrpcMetricsService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body + Send + 'static,
{
    type Response = http::Response<MetricsBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let mut recorder = Recorder {
            method: self.metrics.method_label(request.uri().path()),
            metrics: self.metrics.clone(),
            started: Instant::now(),
            done: false,
        };
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await?;
            // A refusal before any message ("trailers only") has its status
            // in the headers; otherwise it comes in the trailers.
            if let Some(code) = status_in(response.headers()) {
                recorder.finish(code);
            } else if !response.status().is_success() {
                recorder.finish("UNKNOWN");
            }
            Ok(response.map(|body| MetricsBody {
                inner: Box::pin(body),
                recorder: Some(recorder),
            }))
        })
    }
}

/// An answer's body, watched for its trailers.
pub struct MetricsBody<B> {
    inner: Pin<Box<B>>,
    recorder: Option<Recorder>,
}

impl<B: Body> Body for MetricsBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = self.inner.as_mut().poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(mut recorder) = self.recorder.take()
                {
                    recorder.finish(status_in(trailers).unwrap_or("UNKNOWN"));
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(mut recorder) = self.recorder.take() {
                    recorder.finish("UNKNOWN");
                }
            }
            Poll::Ready(None) => {
                if let Some(mut recorder) = self.recorder.take() {
                    recorder.finish("UNKNOWN");
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_labels_are_bounded_and_well_formed() {
        let mut registry = Registry::default();
        let metrics = GrpcMetrics::register(&mut registry);
        assert_eq!(
            metrics.method_label("/distbuild.v1.ClientApi/Submit"),
            "/distbuild.v1.ClientApi/Submit"
        );
        assert_eq!(metrics.method_label("/no-method"), "other");
        assert_eq!(metrics.method_label("/a b/c"), "other");
        assert_eq!(
            metrics.method_label(&format!("/s/{}", "m".repeat(200))),
            "other"
        );
        for i in 0..MAX_METHODS {
            metrics.method_label(&format!("/s/m{i}"));
        }
        assert_eq!(metrics.method_label("/s/one_too_many"), "other");
        assert_eq!(
            metrics.method_label("/distbuild.v1.ClientApi/Submit"),
            "/distbuild.v1.ClientApi/Submit",
            "a method seen before keeps its label"
        );
    }
}
