//! A worker's Prometheus metrics: its slots, its cache, the bytes it
//! fetched, the jobs it ran, and (through `distbuild_ops::grpc`) the calls
//! its peer server answered. Sizes are read at each scrape from the
//! running worker (`WorkerMetrics::attach`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use distbuild_ops::grpc::GrpcMetrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::cache::Cache;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Source {
    source: &'static str,
}

/// What the running worker exposes to a scrape.
pub(crate) struct Live {
    pub(crate) cache: Cache,
    pub(crate) slots: usize,
    /// Jobs running now.
    pub(crate) running: Box<dyn Fn() -> usize + Send + Sync>,
    pub(crate) peer_bytes: Arc<AtomicU64>,
    pub(crate) coordinator_bytes: Arc<AtomicU64>,
}

/// Every family a worker serves on `/metrics`.
pub struct WorkerMetrics {
    registry: Registry,
    /// The calls its peer server answered.
    pub grpc: GrpcMetrics,
    live: OnceLock<Live>,
    slots: Gauge,
    busy_slots: Gauge,
    cache_bytes: Gauge,
    cache_max_bytes: Gauge,
    cache_entries: Gauge,
    cache_evictions: Counter,
    fetched_bytes: Family<Source, Counter>,
    jobs: Family<Outcome, Counter>,
    job_seconds: Histogram,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        // The gRPC families share the coordinator's `distbuild_grpc_*`
        // names; the worker's own are `distbuild_worker_*`.
        let mut registry = Registry::with_prefix("distbuild");
        let grpc = GrpcMetrics::register(&mut registry);
        let m = Self {
            registry: Registry::default(),
            grpc,
            live: OnceLock::new(),
            slots: Gauge::default(),
            busy_slots: Gauge::default(),
            cache_bytes: Gauge::default(),
            cache_max_bytes: Gauge::default(),
            cache_entries: Gauge::default(),
            cache_evictions: Counter::default(),
            fetched_bytes: Family::default(),
            jobs: Family::default(),
            job_seconds: Histogram::new(distbuild_ops::duration_buckets()),
        };
        let r = registry.sub_registry_with_prefix("worker");
        r.register("slots", "Jobs this worker runs at once", m.slots.clone());
        r.register(
            "busy_slots",
            "Slots running a job now",
            m.busy_slots.clone(),
        );
        r.register(
            "cache_bytes",
            "Bytes held in the content-addressed cache",
            m.cache_bytes.clone(),
        );
        r.register(
            "cache_max_bytes",
            "The cache's bound (--cache-max-bytes)",
            m.cache_max_bytes.clone(),
        );
        r.register(
            "cache_entries",
            "Blobs and artifacts held in the cache",
            m.cache_entries.clone(),
        );
        r.register(
            "cache_evictions",
            "Cache entries evicted to stay within the bound",
            m.cache_evictions.clone(),
        );
        r.register(
            "fetched_bytes",
            "Bytes fetched into the cache, by source: peer (dependency artifacts from other workers) or coordinator (sources and CAS blobs)",
            m.fetched_bytes.clone(),
        );
        r.register(
            "jobs",
            "Jobs and actions this worker ran and reported, by outcome",
            m.jobs.clone(),
        );
        r.register(
            "job_duration_seconds",
            "Time from a job's assignment here to its report",
            m.job_seconds.clone(),
        );
        Self { registry, ..m }
    }
}

impl WorkerMetrics {
    /// Connects the scrape-time sizes to the running worker (once).
    pub(crate) fn attach(&self, live: Live) {
        self.slots.set(live.slots as i64);
        self.cache_max_bytes.set(live.cache.max_bytes() as i64);
        let _ = self.live.set(live);
    }

    /// A job or action reported, `elapsed` after it was assigned.
    pub(crate) fn job_reported(&self, outcome: &'static str, elapsed: Duration) {
        self.jobs.get_or_create(&Outcome { outcome }).inc();
        self.job_seconds.observe(elapsed.as_secs_f64());
    }

    /// The metrics in Prometheus's text format.
    pub fn encode(&self) -> String {
        if let Some(live) = self.live.get() {
            let as_i64 = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            self.busy_slots.set((live.running)() as i64);
            let (bytes, entries, evictions) = live.cache.stats();
            self.cache_bytes.set(as_i64(bytes));
            self.cache_entries.set(as_i64(entries));
            catch_up(&self.cache_evictions, evictions);
            for (source, total) in [
                ("peer", &live.peer_bytes),
                ("coordinator", &live.coordinator_bytes),
            ] {
                catch_up(
                    &self.fetched_bytes.get_or_create(&Source { source }),
                    total.load(Ordering::Relaxed),
                );
            }
        }
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// Brings `counter` up to `total`, a count kept elsewhere that only grows.
fn catch_up(counter: &Counter, total: u64) {
    let seen = counter.get();
    if total > seen {
        counter.inc_by(total - seen);
    }
}
