//! `grpc.health.v1` and gRPC reflection, as every distbuild server offers
//! them. Each process decides what it reports per service (see the
//! coordinator's and the worker's `health` modules); this is the shared
//! plumbing.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::codegen::tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthService, WatchStream};

pub use tonic_health::ServingStatus;
pub use tonic_health::server::HealthReporter;

/// Most `Watch` streams one server keeps open at once, all callers
/// together: each holds a task's worth of memory for as long as its
/// caller keeps it, and health checkers use `Check`. One more is refused
/// with RESOURCE_EXHAUSTED until one closes.
pub const MAX_HEALTH_WATCHES: usize = 256;

/// A reporter and the `grpc.health.v1.Health` service it feeds, with at
/// most [`MAX_HEALTH_WATCHES`] watches at once.
pub fn health_reporter() -> (HealthReporter, HealthServer<BoundedHealth>) {
    let reporter = HealthReporter::new();
    let service = BoundedHealth::new(&reporter);
    (reporter, HealthServer::new(service))
}

/// tonic-health's service with a bound on its open watches.
pub struct BoundedHealth {
    inner: HealthService,
    watches: Arc<Semaphore>,
}

impl BoundedHealth {
    /// The service answering with `reporter`'s statuses.
    fn new(reporter: &HealthReporter) -> Self {
        Self {
            inner: HealthService::from_health_reporter(reporter.clone()),
            watches: Arc::new(Semaphore::new(MAX_HEALTH_WATCHES)),
        }
    }
}

#[tonic::async_trait]
impl Health for BoundedHealth {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = HeldWatch;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let permit = self.watches.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "{MAX_HEALTH_WATCHES} health watches are open on this server, the most it keeps; use Check, or watch again later"
            ))
        })?;
        let inner = self.inner.watch(request).await?.into_inner();
        Ok(Response::new(HeldWatch {
            inner,
            _permit: permit,
        }))
    }
}

/// A watch holding its place among the open ones until it ends.
pub struct HeldWatch {
    inner: WatchStream,
    _permit: OwnedSemaphorePermit,
}

impl std::fmt::Debug for HeldWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldWatch").finish_non_exhaustive()
    }
}

impl Stream for HeldWatch {
    type Item = Result<HealthCheckResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

/// The reflection services (v1, and v1alpha for older grpcurl), describing
/// distbuild's own services and health. The Remote Execution API's
/// services are Bazel's published protos and are not described here.
pub fn reflection() -> (
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
) {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(distbuild_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // The descriptor sets are compiled in: one that does not decode is a
    // build defect, caught by every test that starts a server.
    (
        builder()
            .build_v1()
            .expect("compiled-in descriptors decode"),
        builder()
            .build_v1alpha()
            .expect("compiled-in descriptors decode"),
    )
}

/// Sets `service`'s status if it changed since `last` (a reporter notifies
/// watchers on every set).
pub async fn set_status(
    reporter: &HealthReporter,
    last: &mut std::collections::HashMap<String, ServingStatus>,
    service: &str,
    status: ServingStatus,
) {
    if last.get(service) != Some(&status) {
        reporter.set_service_status(service, status).await;
        last.insert(service.to_string(), status);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> Request<HealthCheckRequest> {
        Request::new(HealthCheckRequest {
            service: String::new(),
        })
    }

    /// Watches are bounded across callers: one over the bound is refused
    /// with RESOURCE_EXHAUSTED, one that ends frees its place, and Check
    /// answers throughout.
    #[tokio::test]
    async fn open_watches_are_bounded_and_checks_still_answer() {
        let service = BoundedHealth::new(&HealthReporter::new());
        let mut open = Vec::new();
        for _ in 0..MAX_HEALTH_WATCHES {
            open.push(service.watch(request()).await.expect("within the bound"));
        }
        let refused = service.watch(request()).await.expect_err("over the bound");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused.message().contains("256 health watches are open"),
            "{}",
            refused.message()
        );
        let status = service.check(request()).await.expect("check").into_inner();
        assert_eq!(
            status.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
        open.pop();
        service
            .watch(request())
            .await
            .expect("a place freed by a watch that ended");
    }
}
