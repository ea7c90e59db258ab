//! `grpc.health.v1` and gRPC reflection, as every distbuild server offers
//! them. Each process decides what it reports per service (see the
//! coordinator's and the worker's `health` modules); this is the shared
//! plumbing.

pub use tonic_health::ServingStatus;
pub use tonic_health::server::{HealthReporter, health_reporter};

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
