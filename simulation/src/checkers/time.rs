//! The leader's stamps never run ahead of real time. Every command's time
//! is replicated time carried forward by the leader's monotonic clock, so a
//! stamp is at most the (simulated) real time at which any replica applied
//! it, however the leaders' wall clocks jump (the fault plan jumps them by
//! an hour either way). A stamp ahead of real time would make lease
//! deadlines pass early: every healthy lease expiring at once.

use super::{Findings, Violation};
use crate::cluster::RunResult;

/// Rounding slack: stamps and the simulation's clock count whole
/// milliseconds.
const SLACK_MS: u64 = 2;

pub fn check(run: &RunResult) -> Vec<Violation> {
    let mut findings = Findings::new("time");
    let seen = run.observer.observations();
    for (node, entries) in &seen.applied {
        for (index, applied) in entries {
            for applied in applied {
                let Some(stamp) = applied.proposal.command.now_ms() else {
                    continue;
                };
                if stamp > applied.real_ms + SLACK_MS {
                    findings.report(format!(
                        "entry {index} (applied by coordinator {node}) is stamped {stamp} ms, {} ms ahead of the real time it was applied at",
                        stamp - applied.real_ms
                    ));
                }
            }
        }
    }
    findings.into_vec()
}
