//! The state machine application raft-store drives: applies each committed
//! proposal to the model (through the exactly-once request table) and
//! writes what changed in the entry's own transaction.

use std::sync::{Arc, Mutex, MutexGuard};

use distbuild_model::tables::RowVisitor;
use distbuild_model::{
    Command, MAX_BATCH, Model, Proposal, ReadTables, Requests, Response, StorageError, TABLES,
    Tables,
};
use distbuild_raft_store::{Application, ApplyTxn, ReadState, StateReader, StoreError};
use openraft::LogId;

use super::seams::{ApplyObserver, InjectedBugs};
use super::types::TypeConfig;

/// The model and the request table, shared by the application (which
/// changes them) and the replica (which reads them).
#[derive(Default, Clone)]
pub(super) struct Shared {
    pub model: Arc<Mutex<Model>>,
    pub requests: Arc<Mutex<Requests>>,
}

impl Shared {
    pub fn model(&self) -> MutexGuard<'_, Model> {
        self.model.lock().expect("model lock poisoned")
    }

    pub fn requests(&self) -> MutexGuard<'_, Requests> {
        self.requests.lock().expect("requests lock poisoned")
    }
}

pub(super) struct App {
    pub node_id: u64,
    pub shared: Shared,
    pub observer: Option<Arc<dyn ApplyObserver>>,
    pub metrics: Arc<super::metrics::ReplicaMetrics>,
    pub check_invariants: bool,
    pub bugs: InjectedBugs,
}

/// A consistent view of the state, as the model reads it.
struct View<'a>(&'a dyn ReadState);

/// The applied entry's transaction, as the model reads and writes it.
struct Txn<'a, 'b>(&'a mut ApplyTxn<'b>);

fn from_store(e: StoreError) -> StorageError {
    StorageError::Backend(Box::new(e))
}

/// Back into raft-store's error (an apply that cannot write stops the
/// node; the message is what matters).
fn to_store(e: StorageError) -> StoreError {
    match e {
        StorageError::Backend(inner) => match inner.downcast::<StoreError>() {
            Ok(store) => *store,
            Err(other) => StoreError::Corrupt(other.to_string()),
        },
        StorageError::Encode { what, source } => StoreError::Encode { what, source },
        StorageError::Decode { what, source } => StoreError::Decode { what, source },
        StorageError::Corrupt(problem) => StoreError::Corrupt(problem),
    }
}

impl ReadTables for View<'_> {
    fn get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        self.0.get(table, key).map_err(from_store)
    }

    fn for_each_prefix(
        &self,
        table: &str,
        prefix: &[u8],
        f: &mut RowVisitor<'_>,
    ) -> Result<(), StorageError> {
        self.0.for_each_prefix(table, prefix, f).map_err(from_store)
    }
}

impl ReadTables for Txn<'_, '_> {
    fn get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        View(&*self.0).get(table, key)
    }

    fn for_each_prefix(
        &self,
        table: &str,
        prefix: &[u8],
        f: &mut RowVisitor<'_>,
    ) -> Result<(), StorageError> {
        View(&*self.0).for_each_prefix(table, prefix, f)
    }
}

impl Tables for Txn<'_, '_> {
    fn put(&mut self, table: &str, key: &[u8], value: &[u8]) -> Result<(), StorageError> {
        self.0.put(table, key, value).map_err(from_store)
    }

    fn delete(&mut self, table: &str, key: &[u8]) -> Result<(), StorageError> {
        self.0.delete(table, key).map_err(from_store)
    }
}

/// Reads the model's tables through raft-store.
pub(super) fn read_tables<T>(
    state: &dyn ReadState,
    read: impl FnOnce(&dyn ReadTables) -> Result<T, StorageError>,
) -> Result<T, StoreError> {
    read(&View(state)).map_err(to_store)
}

impl Application<TypeConfig> for App {
    const COLUMN_FAMILIES: &'static [&'static str] = TABLES;

    fn apply(
        &mut self,
        txn: &mut ApplyTxn<'_>,
        log_id: &LogId<u64>,
        proposal: &Proposal,
    ) -> Result<Response, StoreError> {
        let mut model = self.shared.model();
        let mut requests = self.shared.requests();
        model.inject_accept_expired_lease_results(self.bugs.accept_expired_lease_results);
        requests.inject_forget_answers(self.bugs.forget_request_answers);
        let Some(parts) = proposal.parts(log_id.index) else {
            // The leader never builds one; applied as nothing, answered
            // as refused.
            return Ok(Response::Refused {
                reason: format!("a batch of over {MAX_BATCH} proposals"),
                retry: false,
            });
        };
        let mut responses = Vec::with_capacity(parts.len());
        for &(index, part) in &parts {
            let response = requests.apply(&mut model, index, part);
            self.metrics.applied(&model.take_tally(), &response);
            if self.check_invariants
                && let Err(violation) = model.check_invariants()
            {
                panic!(
                    "coordinator {} after applying entry {} (as {index}): {violation}",
                    self.node_id, log_id.index
                );
            }
            responses.push(response);
        }
        // One atomic write for the whole entry, batch or not.
        let mut store = Txn(txn);
        model.flush(&mut store).map_err(to_store)?;
        requests.flush(&mut store).map_err(to_store)?;
        if let Some(observer) = &self.observer {
            for ((index, part), response) in parts.iter().zip(&responses) {
                observer.applied(self.node_id, *index, part, response);
            }
        }
        Ok(match proposal.command {
            Command::Batch { .. } => Response::Batch { responses },
            _ => responses.pop().unwrap_or(Response::None),
        })
    }

    fn empty_response(&self) -> Response {
        Response::None
    }

    fn restore(&mut self, state: &StateReader<'_>) -> Result<(), StoreError> {
        let (model, requests) = read_tables(state, |tables| {
            Ok((Model::load(tables)?, Requests::load(tables)?))
        })?;
        *self.shared.model() = model;
        *self.shared.requests() = requests;
        Ok(())
    }
}
