//! Executions the leader picked for a worker whose assignment is still on
//! its way through the log. The model answers a pick from the state
//! applied so far, so two calls picking at once (two slots of a worker
//! reporting together, a poll beside a report) would both get the head of
//! the queue: the second assignment would find it leased and its slot
//! would go back to polling, one more entry. A pick passes over what is
//! in flight here; each call's picks leave the set when its proposal is
//! answered or dropped. Leader-local and never replicated: the state
//! machine still checks every assignment against the applied state.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use distbuild_proto::Digest;

/// The picks of the calls in progress on this node.
#[derive(Clone, Default)]
pub struct PicksInFlight(Arc<Mutex<BTreeSet<Digest>>>);

/// One call's picks, in flight until dropped.
pub struct Picked {
    keys: Vec<Digest>,
    in_flight: PicksInFlight,
}

impl PicksInFlight {
    /// Runs `pick` with the keys in flight now, and holds what it returns
    /// in flight until the returned [`Picked`] is dropped. Picks are made
    /// one at a time, so two never return the same key.
    pub fn pick(&self, pick: impl FnOnce(&BTreeSet<Digest>) -> Vec<Digest>) -> Picked {
        let mut in_flight = self.0.lock().expect("picks lock poisoned");
        let keys = pick(&in_flight);
        in_flight.extend(keys.iter().copied());
        Picked {
            keys,
            in_flight: self.clone(),
        }
    }

    /// Keys in flight now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.lock().expect("picks lock poisoned").len()
    }
}

impl Picked {
    /// The keys picked.
    pub fn keys(&self) -> &[Digest] {
        &self.keys
    }
}

impl Drop for Picked {
    fn drop(&mut self) {
        let mut in_flight = self.in_flight.0.lock().expect("picks lock poisoned");
        for key in &self.keys {
            in_flight.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> Digest {
        Digest::from_bytes([n; 20])
    }

    /// A pick sees what is in flight and adds to it until it is dropped.
    #[test]
    fn picks_are_held_until_dropped() {
        let picks = PicksInFlight::default();
        let queue = [key(1), key(2), key(3)];
        let head = |in_flight: &BTreeSet<Digest>| {
            queue
                .iter()
                .find(|k| !in_flight.contains(k))
                .map(|k| vec![*k])
                .unwrap_or_default()
        };
        let first = picks.pick(head);
        let second = picks.pick(head);
        assert_eq!(first.keys(), [key(1)]);
        assert_eq!(second.keys(), [key(2)], "the first's pick is passed over");
        drop(first);
        assert_eq!(picks.len(), 1);
        assert_eq!(picks.pick(head).keys(), [key(1)], "free again once dropped");
        drop(second);
        assert_eq!(picks.len(), 0);
    }
}
