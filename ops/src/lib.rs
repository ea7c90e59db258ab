//! Operating distbuild: what coordinators and workers serve beside their
//! gRPC APIs.
//!
//! - `http`: the metrics and status port (`--metrics-listen`): Prometheus
//!   text on `/metrics`, a process's own pages beside it, behind a token
//!   (or open under `--insecure`), over HTTPS when the process has TLS.
//! - `grpc`: requests and latency of every gRPC method a server answers,
//!   as a tower layer, with a bounded set of method labels.
//! - `health`: `grpc.health.v1` statuses a process sets as it can serve,
//!   and gRPC reflection of distbuild's services.
//!
//! Metrics are `prometheus-client` families registered in a process's
//! `Registry`, named `distbuild_*` by Prometheus conventions (`_total`
//! counters, `_seconds` and `_bytes` units).

pub mod grpc;
pub mod health;
pub mod http;

pub use prometheus_client;

/// Histogram buckets for durations in seconds: 1 ms to about 30 minutes,
/// each twice the last.
pub fn duration_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 22)
}
