//! Per-caller rate bounds on the calls that append to the Raft log. Every
//! state-changing call becomes an entry every replica writes and applies,
//! so one caller sending them as fast as it can would crowd out everyone
//! else's. Each caller (a worker by its ID, a client by its address) has a
//! token bucket: `MAX_CALLS_PER_SEC` on average, bursts of
//! `MAX_CALLS_BURST`; past it a call is refused with RESOURCE_EXHAUSTED and
//! a retry hint, which the callers' leader client honours by waiting. The
//! bound is far above what a well-behaved caller sends (a worker
//! heartbeats every few seconds and reports once per job).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tonic::Status;

use super::status::busy;

/// State-changing calls one caller may make per second, on average.
pub const MAX_CALLS_PER_SEC: f64 = 1_000.0;
/// How many it may make at once after being idle.
pub const MAX_CALLS_BURST: f64 = 2_000.0;
/// Callers tracked at once; past it the idle ones (full buckets) are
/// forgotten, and while none is idle a new caller is refused.
const MAX_CALLERS: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The buckets of every caller, shared by the services.
#[derive(Debug, Clone)]
pub struct CallerRates {
    per_sec: f64,
    burst: f64,
    buckets: Arc<Mutex<HashMap<String, Bucket>>>,
}

/// The name a client's calls are counted under: its address (a
/// follower passing calls on counts as one client).
pub fn client_name<T>(request: &tonic::Request<T>) -> String {
    request
        .remote_addr()
        .map_or_else(|| "a client".to_string(), |a| format!("client {}", a.ip()))
}

impl Default for CallerRates {
    fn default() -> Self {
        Self::new(MAX_CALLS_PER_SEC, MAX_CALLS_BURST)
    }
}

impl CallerRates {
    pub fn new(per_sec: f64, burst: f64) -> Self {
        Self {
            per_sec,
            burst,
            buckets: Arc::default(),
        }
    }

    /// Takes one call from `caller`'s bucket, or refuses it.
    pub fn admit(&self, caller: &str) -> Result<(), Status> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().expect("rate lock poisoned");
        if buckets.len() >= MAX_CALLERS && !buckets.contains_key(caller) {
            let (per_sec, burst) = (self.per_sec, self.burst);
            buckets.retain(|_, b| refilled(b, now, per_sec, burst) < burst);
            if buckets.len() >= MAX_CALLERS {
                // Every tracked caller is busy: a new one waits its turn.
                return Err(busy(
                    format!("{MAX_CALLERS} callers are sending state-changing calls; retry later"),
                    Duration::from_secs(1),
                ));
            }
        }
        let bucket = buckets.entry(caller.to_string()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        bucket.tokens = refilled(bucket, now, self.per_sec, self.burst);
        bucket.at = now;
        if bucket.tokens < 1.0 {
            let wait = Duration::from_secs_f64((1.0 - bucket.tokens) / self.per_sec);
            return Err(busy(
                format!(
                    "{caller} sends more than {} state-changing calls a second; slow down",
                    self.per_sec
                ),
                wait.max(Duration::from_millis(10)),
            ));
        }
        bucket.tokens -= 1.0;
        Ok(())
    }
}

fn refilled(bucket: &Bucket, now: Instant, per_sec: f64, burst: f64) -> f64 {
    let elapsed = now.duration_since(bucket.at).as_secs_f64();
    (bucket.tokens + elapsed * per_sec).min(burst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_caller_past_its_rate_is_refused_until_its_bucket_refills_and_others_are_not() {
        let rates = CallerRates::new(10.0, 5.0);
        for _ in 0..5 {
            rates.admit("worker a").expect("within the burst");
        }
        let refused = rates.admit("worker a").expect_err("past the burst");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(
            refused.metadata().get("distbuild-retry-after-ms").is_some(),
            "{refused:?}"
        );
        rates
            .admit("worker b")
            .expect("another caller is not held back");
        tokio::time::advance(Duration::from_millis(100)).await;
        rates.admit("worker a").expect("one call refilled");
        assert!(rates.admit("worker a").is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn the_callers_tracked_are_bounded_and_idle_ones_make_room() {
        let rates = CallerRates::new(10.0, 5.0);
        for n in 0..MAX_CALLERS {
            rates.admit(&format!("client {n}")).expect("admitted");
        }
        // Every one is busy (its bucket not full): a newcomer waits.
        let refused = rates.admit("newcomer").expect_err("no room");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        // Once they are idle (full again), they make room.
        tokio::time::advance(Duration::from_secs(1)).await;
        rates.admit("newcomer").expect("room made");
        assert_eq!(rates.buckets.lock().expect("lock").len(), 1);
    }
}
