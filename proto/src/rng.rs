//! The randomness seam: every random choice distbuild makes (election
//! timeouts, retry jitter, request and worker IDs) draws from [`with_rng`].
//! Production draws from the OS-seeded thread RNG; a deterministic
//! simulation calls [`seed_this_thread`] so one seed gives one run.

use std::cell::RefCell;

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

thread_local! {
    static SEEDED: RefCell<Option<StdRng>> = const { RefCell::new(None) };
}

/// From now on, random draws on this thread come from a generator seeded
/// with `seed`.
pub fn seed_this_thread(seed: u64) {
    SEEDED.with(|rng| *rng.borrow_mut() = Some(StdRng::seed_from_u64(seed)));
}

/// Runs `f` with this thread's generator (seeded, or the OS-seeded one).
pub fn with_rng<R>(f: impl FnOnce(&mut dyn RngCore) -> R) -> R {
    SEEDED.with(|seeded| match seeded.borrow_mut().as_mut() {
        Some(rng) => f(rng),
        None => f(&mut rand::thread_rng()),
    })
}

/// A random `u64`.
pub fn next_u64() -> u64 {
    with_rng(|rng| rng.next_u64())
}

/// A random `u128`.
pub fn next_u128() -> u128 {
    with_rng(|rng| (u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64()))
}

/// A uniformly random duration in `0..=max`.
pub fn duration_up_to(max: std::time::Duration) -> std::time::Duration {
    with_rng(|rng| rng.gen_range(std::time::Duration::ZERO..=max))
}

/// A handle on this thread's generator, for APIs that want an `Rng` value
/// (openraft's election timeouts). Every call draws through [`with_rng`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SeamRng;

impl RngCore for SeamRng {
    fn next_u32(&mut self) -> u32 {
        with_rng(|rng| rng.next_u32())
    }

    fn next_u64(&mut self) -> u64 {
        with_rng(|rng| rng.next_u64())
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        with_rng(|rng| rng.fill_bytes(dest));
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        with_rng(|rng| rng.try_fill_bytes(dest))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_repeats_its_draws() {
        let draws = |seed| {
            std::thread::spawn(move || {
                seed_this_thread(seed);
                (next_u64(), next_u128(), SeamRng.next_u32())
            })
            .join()
            .expect("thread")
        };
        assert_eq!(draws(7), draws(7));
        assert_ne!(draws(7), draws(8));
    }
}
