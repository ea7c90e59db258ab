//! Workers leaving gracefully, as the leader sees them: which outputs only
//! a draining worker holds that builds in flight still need, which other
//! worker copies each of them (told in its heartbeat answer), and when a
//! draining worker may go (nothing of it runs, nothing it alone holds is
//! needed). The plan is the model's (`Model::drain_plan`); this module
//! assigns the copies and bounds the work: the plan is recomputed at most
//! every [`PLAN_FRESH`], and only while some worker drains.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use distbuild_proto::Digest;
use distbuild_proto::v1::DepArtifact;
use distbuild_proto::wire::digest_to_wire;
use tokio::time::Instant;

use crate::replica::Node;

/// How long a computed plan is used.
pub const PLAN_FRESH: Duration = Duration::from_millis(500);
/// A finished build's outputs stay needed this long (its client may still
/// be downloading them).
pub const RECENT_BUILD_MS: u64 = 60_000;
/// Copies one heartbeat answer asks for.
pub const MAX_REPLICATE_PER_HEARTBEAT: usize = 16;
/// Artifacts planned per draining worker at once (more come as these are
/// copied).
const MAX_PLANNED_PER_WORKER: usize = 1024;

/// What a heartbeat answer says about draining.
#[derive(Debug, Default)]
pub struct Advice {
    pub draining: bool,
    pub may_leave: bool,
    pub replicate: Vec<DepArtifact>,
}

#[derive(Default)]
struct Plan {
    /// Draining worker -> whether it may leave.
    may_leave: BTreeMap<String, bool>,
    /// Worker that is not draining -> the copies it is asked for.
    copies: BTreeMap<String, Vec<DepArtifact>>,
}

/// The leader's current plan, shared by its heartbeat handlers.
#[derive(Default)]
pub struct Drains {
    cached: Mutex<Option<(Instant, Arc<Plan>)>>,
}

impl Drains {
    /// What `worker_id`'s heartbeat answer says about draining.
    pub fn advice(&self, node: &Node, worker_id: &str) -> Advice {
        let plan = self.plan(node);
        Advice {
            draining: plan.may_leave.contains_key(worker_id),
            may_leave: plan.may_leave.get(worker_id).copied().unwrap_or(false),
            replicate: plan.copies.get(worker_id).cloned().unwrap_or_default(),
        }
    }

    fn plan(&self, node: &Node) -> Arc<Plan> {
        let mut cached = self.cached.lock().expect("drain plan lock poisoned");
        if let Some((at, plan)) = &*cached
            && at.elapsed() < PLAN_FRESH
        {
            return plan.clone();
        }
        let plan = Arc::new(compute(node));
        *cached = Some((Instant::now(), plan.clone()));
        plan
    }
}

fn compute(node: &Node) -> Plan {
    let model = node.model();
    if !model.workers().values().any(|w| w.draining) {
        return Plan::default();
    }
    let unique = model.drain_plan(RECENT_BUILD_MS, MAX_PLANNED_PER_WORKER);
    let mut plan = Plan::default();
    let healthy: Vec<&String> = model
        .workers()
        .iter()
        .filter(|(_, w)| !w.draining)
        .map(|(id, _)| id)
        .collect();
    let mut next = 0usize;
    for (worker_id, artifacts) in &unique {
        let Some(worker) = model.workers().get(worker_id) else {
            continue;
        };
        plan.may_leave.insert(
            worker_id.clone(),
            worker.running == 0 && artifacts.is_empty(),
        );
        for (digest, size) in artifacts {
            if healthy.is_empty() {
                break;
            }
            // Spread the copies over the other workers, one each.
            let to = healthy[next % healthy.len()];
            next += 1;
            let copies = plan.copies.entry(to.clone()).or_default();
            if copies.len() < MAX_REPLICATE_PER_HEARTBEAT {
                copies.push(copy_of(&model, digest, *size));
            }
        }
    }
    plan
}

fn copy_of(model: &distbuild_model::Model, digest: &Digest, size: u64) -> DepArtifact {
    DepArtifact {
        // Not a dependency of a job: the copy's name in logs.
        job_id: String::new(),
        digest: digest_to_wire(digest),
        size,
        holders: super::listed_holders(model, digest),
    }
}
