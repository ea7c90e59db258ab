//! `Heartbeat`: a worker renews its leases and reports what its cache
//! gained and lost.

use distbuild_proto::Digest;

use crate::log::Response;
use crate::records::ExecState;
use crate::state::Model;

impl Model {
    pub(crate) fn heartbeat(
        &mut self,
        worker_id: &str,
        tokens: &[u64],
        added: &[Digest],
        dropped: &[Digest],
        lease_timeout_ms: u64,
    ) -> Response {
        let Some(worker) = self.workers.get_mut(worker_id) else {
            return Response::Heartbeat {
                revoked: tokens.to_vec(),
                reregister: true,
            };
        };
        worker.last_seen_ms = self.clock_ms;
        self.dirty.workers.insert(worker_id.to_string());
        let mut revoked = Vec::new();
        for token in tokens {
            let current = self.leases.get(token).and_then(|key| {
                let exec = self.executions.get_mut(key)?;
                match &mut exec.state {
                    ExecState::Running {
                        worker_id: w,
                        expires_ms,
                        ..
                    } if w == worker_id => {
                        *expires_ms = self.clock_ms + lease_timeout_ms;
                        Some(*key)
                    }
                    _ => None,
                }
            });
            match current {
                Some(key) => {
                    self.dirty.executions.insert(key);
                }
                None => revoked.push(*token),
            }
        }
        for digest in added {
            self.add_listed_holding(worker_id, *digest);
        }
        for digest in dropped {
            self.drop_holding(worker_id, *digest);
        }
        Response::Heartbeat {
            revoked,
            reregister: false,
        }
    }
}
