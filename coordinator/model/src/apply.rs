//! The transition function: [`Model::apply`] stamps the command's time
//! and dispatches to the command's own module (`cmd`, `staging`).

use crate::cmd::Reported;
use crate::log::{Command, Response};
use crate::state::Model;

impl Model {
    /// Applies one committed command; `index` is its log index.
    pub fn apply(&mut self, index: u64, command: &Command) -> Response {
        self.tally = Default::default();
        if let Some(now_ms) = command.now_ms() {
            self.tick(now_ms);
        }
        match command {
            Command::StageSubmit {
                request_id,
                part,
                jobs,
                total_bytes,
                ..
            } => match self.stage(request_id, *part, jobs, *total_bytes) {
                Ok(()) => Response::None,
                Err(busy) if busy.is_busy() => Response::Busy {
                    reason: busy.to_string(),
                },
                Err(refused) => Response::Refused {
                    reason: refused.to_string(),
                    retry: false,
                },
            },
            Command::CancelBuild { build_id, .. } => Response::Cancelled {
                cancelled: self.cancel_build(*build_id),
            },
            Command::SubmitBuild {
                request_id,
                staged_parts,
                jobs,
                job_timeout_ms,
                ..
            } => self.submit(index, request_id, *staged_parts, jobs, *job_timeout_ms),
            Command::RegisterWorker {
                worker_id,
                addr,
                slots,
                ahead,
                held,
                properties,
                ..
            } => {
                self.register(worker_id, addr, *slots, *ahead, held, properties);
                Response::None
            }
            Command::Assign {
                worker_id,
                cache_keys,
                lease_timeout_ms,
                ..
            } => self.assign(index, worker_id, cache_keys, *lease_timeout_ms),
            Command::Heartbeat {
                worker_id,
                tokens,
                added,
                dropped,
                lease_timeout_ms,
                ..
            } => self.heartbeat(worker_id, tokens, added, dropped, *lease_timeout_ms),
            Command::Report {
                worker_id,
                token,
                cache_key,
                outcome,
                max_attempts,
                queued_ms,
                ..
            } => Response::Reported {
                accepted: self.report(
                    index,
                    &Reported {
                        worker_id,
                        token: *token,
                        key: cache_key,
                        outcome,
                        max_attempts: *max_attempts,
                        queued_ms: *queued_ms,
                    },
                ),
            },
            Command::ExpireLeases {
                max_attempts,
                worker_timeout_ms,
                ..
            } => Response::Expired {
                tokens: self.expire_leases(*max_attempts, *worker_timeout_ms),
            },
            Command::ExtendLeases {
                lease_timeout_ms, ..
            } => {
                self.extend_leases(*lease_timeout_ms);
                Response::None
            }
            Command::BlobStored { digest, size } => {
                self.blob_stored(*digest, *size);
                Response::None
            }
            Command::ActionResultStored {
                instance_name,
                action,
                result,
                blobs,
                ..
            } => {
                self.action_result_stored(instance_name, *action, result, blobs);
                Response::None
            }
            Command::Used {
                blobs,
                action_results,
                ..
            } => {
                self.used(blobs, action_results);
                Response::None
            }
            Command::CollectGarbage { limits, .. } => {
                Response::Collected(self.collect_garbage(limits))
            }
            Command::DrainWorker { worker_id, .. } => Response::Worker {
                found: self.drain_worker(worker_id),
            },
            Command::DeregisterWorker { worker_id, .. } => Response::Worker {
                found: self.deregister_worker(worker_id),
            },
            // A batch's parts are applied one by one (`Proposal::parts`);
            // one reaching here is inside another.
            Command::Batch { .. } => Response::Refused {
                reason: "a batch inside a batch".into(),
                retry: false,
            },
        }
    }
}
