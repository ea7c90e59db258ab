//! The leader's clock: what it stamps into commands. A lease's deadline
//! and a worker's last sighting are stamped times, so a stamp that jumped
//! would expire every healthy lease at once (forward) or stop the expiry of
//! dead ones (backward: the state's clock never goes back). So stamps are
//! replicated time carried forward by a monotonic clock: a leader starts
//! its term's time from the state's clock (the last stamp applied) and
//! runs it on tokio's monotonic clock. The wall clock is read once, to
//! start a fresh cluster's time near the date, and never again: a jump of
//! it changes nothing. Time the cluster spends without a leader does not
//! count (the state's time lags dates by it), which only makes lease
//! periods and retention windows longer, never shorter; the new leader's
//! `ExtendLeases` then gives every lease a full period.

use std::sync::Mutex;

use tokio::time::Instant;

/// A term's time base.
#[derive(Debug, Clone, Copy)]
struct Base {
    term: u64,
    ms: u64,
    at: Instant,
}

/// The leader's time since its election (see the module documentation).
#[derive(Debug, Default)]
pub struct LeaderTime {
    base: Mutex<Option<Base>>,
}

impl LeaderTime {
    /// Starts `term`'s time at `ms`, now (once per term: a later call for
    /// the same term keeps the first base).
    pub fn start(&self, term: u64, ms: u64) {
        let mut base = self.base.lock().expect("leader time lock poisoned");
        if base.is_none_or(|b| b.term != term) {
            *base = Some(Base {
                term,
                ms,
                at: Instant::now(),
            });
        }
    }

    /// The time now in `term`, if this node started that term's time.
    pub fn now_ms(&self, term: u64) -> Option<u64> {
        let base = (*self.base.lock().expect("leader time lock poisoned"))?;
        (base.term == term).then(|| base.ms + base.at.elapsed().as_millis() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_term_s_time_runs_from_its_base_on_the_monotonic_clock() {
        let time = LeaderTime::default();
        assert_eq!(time.now_ms(3), None);
        time.start(3, 1_000_000);
        tokio::time::advance(std::time::Duration::from_millis(250)).await;
        assert_eq!(time.now_ms(3), Some(1_000_250));
        // Another term has no time here.
        assert_eq!(time.now_ms(4), None);
        // The same term keeps its base; a new one takes its own.
        time.start(3, 5);
        assert_eq!(time.now_ms(3), Some(1_000_250));
        time.start(4, 2_000_000);
        assert_eq!(time.now_ms(4), Some(2_000_000));
        assert_eq!(time.now_ms(3), None);
    }
}
