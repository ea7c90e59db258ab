//! The tables (column families) the state lives in: their names, keys and
//! encoding (postcard), and the seam the model reads and writes them
//! through ([`ReadTables`], [`Tables`]): the coordinator passes its Raft
//! store's transaction, tests a map.

use std::ops::ControlFlow;

use distbuild_proto::{BlobKey, Digest};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::log::Event;
use crate::records::JobOutput;

/// What can go wrong reading or writing the state's tables.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The store under the tables failed.
    #[error(transparent)]
    Backend(Box<dyn std::error::Error + Send + Sync>),
    #[error("encode {what}: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: postcard::Error,
    },
    #[error("decode {what}: {source}")]
    Decode {
        what: &'static str,
        #[source]
        source: postcard::Error,
    },
    /// A key or record that the model never writes.
    #[error("store is corrupt: {0}")]
    Corrupt(String),
}

/// Reads of the tables.
pub trait ReadTables {
    /// The value of `key` in `table`.
    fn get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError>;

    /// Calls `f` for every key in `table` starting with `prefix`, in key
    /// order, until it returns `Break`.
    fn for_each_prefix(
        &self,
        table: &str,
        prefix: &[u8],
        f: &mut RowVisitor<'_>,
    ) -> Result<(), StorageError>;
}

/// What [`ReadTables::for_each_prefix`] calls for each row (key, value).
pub type RowVisitor<'a> = dyn FnMut(&[u8], &[u8]) -> ControlFlow<()> + 'a;

/// Where `Model::flush` writes: the entry's transaction (reads see its
/// own earlier writes).
pub trait Tables: ReadTables {
    fn put(&mut self, table: &str, key: &[u8], value: &[u8]) -> Result<(), StorageError>;
    fn delete(&mut self, table: &str, key: &[u8]) -> Result<(), StorageError>;
}

/// Column families of the coordinator's state.
pub const TABLES: &[&str] = &[
    T_BUILDS,
    T_JOBS,
    T_EVENTS,
    T_EXECUTIONS,
    T_RESULTS,
    T_WORKERS,
    T_HOLDINGS,
    T_BLOBS,
    T_META,
    T_REQUESTS,
    T_STAGED,
    T_OUTPUTS,
    T_ACTION_RESULTS,
    T_DURATIONS,
];
/// The remembered answers of the exactly-once request table.
pub(crate) const T_REQUESTS: &str = "requests";
/// Parts of submits not yet complete.
pub(crate) const T_STAGED: &str = "staged";
pub(crate) const T_BUILDS: &str = "builds";
pub(crate) const T_JOBS: &str = "jobs";
/// Build events, by (build ID, sequence number): written here, read by
/// watchers straight from the store.
pub const T_EVENTS: &str = "events";
/// Captured job output (`JobOutput`), by the log index of the report
/// that brought it: stored once, named by events and results.
pub const T_OUTPUTS: &str = "outputs";
pub(crate) const T_EXECUTIONS: &str = "executions";
pub(crate) const T_RESULTS: &str = "results";
pub(crate) const T_WORKERS: &str = "workers";
pub(crate) const T_HOLDINGS: &str = "holdings";
pub(crate) const T_BLOBS: &str = "blobs";
/// Remote Execution API action results, by (instance name, action digest)
/// encoded.
pub(crate) const T_ACTION_RESULTS: &str = "action_results";
/// Expected durations (`DurationRecord`), by kind of job.
pub(crate) const T_DURATIONS: &str = "durations";
pub(crate) const T_META: &str = "meta";
pub(crate) const KEY_CLOCK: &[u8] = b"clock";

pub(crate) fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, StorageError> {
    postcard::to_stdvec(value).map_err(|source| StorageError::Encode { what, source })
}

pub(crate) fn decode<T: DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
) -> Result<T, StorageError> {
    postcard::from_bytes(bytes).map_err(|source| StorageError::Decode { what, source })
}

pub(crate) fn build_key(build: u64) -> [u8; 8] {
    build.to_be_bytes()
}

pub(crate) fn job_key(build: u64, job: u32) -> Vec<u8> {
    let mut key = build.to_be_bytes().to_vec();
    key.extend_from_slice(&job.to_be_bytes());
    key
}

/// Key of event `seq` of `build` in the `events` table.
pub fn event_key(build: u64, seq: u64) -> Vec<u8> {
    let mut key = build.to_be_bytes().to_vec();
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// Decodes an `events` table value.
pub fn decode_event(bytes: &[u8]) -> Result<Event, StorageError> {
    decode("build event", bytes)
}

/// A stored event as a watcher reads it: with the output it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub seq: u64,
    pub event: Event,
    pub output: Option<JobOutput>,
}

impl StoredEvent {
    /// Bytes it takes in memory, about.
    pub fn size(&self) -> usize {
        let text = match &self.event {
            Event::JobStarted { worker_id, .. } => worker_id.len(),
            Event::JobFinished { error, .. } => error.as_ref().map_or(0, String::len),
            Event::JobSkipped { reason, .. } => reason.len(),
            Event::BuildFinished { error, .. } => error.as_ref().map_or(0, String::len),
        };
        64 + text + self.output.as_ref().map_or(0, JobOutput::len)
    }
}

/// The stored events of `build` from sequence number `from_seq` on, in
/// order, each with the output it names, all from one view of the tables:
/// at most `max` events and, past the first, at most `max_bytes` (see
/// [`StoredEvent::size`]). Watchers read them here, not from memory.
pub fn read_events(
    tables: &dyn ReadTables,
    build: u64,
    from_seq: u64,
    max: usize,
    max_bytes: usize,
) -> Result<Vec<StoredEvent>, StorageError> {
    let mut events = Vec::new();
    let mut bytes = 0;
    let mut seq = from_seq;
    while events.len() < max {
        let Some(raw) = tables.get(T_EVENTS, &event_key(build, seq))? else {
            break;
        };
        let event = decode_event(&raw)?;
        let output = match &event {
            Event::JobFinished {
                output: Some(output),
                ..
            } => Some(read_output(tables, output.id)?.ok_or_else(|| {
                StorageError::Corrupt(format!(
                    "event {seq} of build {build} names no output {}",
                    output.id
                ))
            })?),
            _ => None,
        };
        let stored = StoredEvent { seq, event, output };
        bytes += stored.size();
        if !events.is_empty() && bytes > max_bytes {
            break;
        }
        events.push(stored);
        seq += 1;
    }
    Ok(events)
}

/// The stored output row `id`.
pub fn read_output(tables: &dyn ReadTables, id: u64) -> Result<Option<JobOutput>, StorageError> {
    tables
        .get(T_OUTPUTS, &id.to_be_bytes())?
        .map(|bytes| decode("job output", &bytes))
        .transpose()
}

pub(crate) fn holding_key(worker: &str, digest: &Digest) -> Vec<u8> {
    let mut key = worker.as_bytes().to_vec();
    key.push(0);
    key.extend_from_slice(digest.as_bytes());
    key
}

pub(crate) fn scan(
    state: &dyn ReadTables,
    table: &str,
    prefix: &[u8],
    mut f: impl FnMut(&[u8], &[u8]) -> Result<(), StorageError>,
) -> Result<(), StorageError> {
    let mut failure = None;
    state.for_each_prefix(table, prefix, &mut |k, v| match f(k, v) {
        Ok(()) => ControlFlow::Continue(()),
        Err(e) => {
            failure = Some(e);
            ControlFlow::Break(())
        }
    })?;
    failure.map_or(Ok(()), Err)
}

/// The digest a table key holds.
pub(crate) fn digest_of_key(what: &'static str, bytes: &[u8]) -> Result<Digest, StorageError> {
    Digest::try_from(bytes).map_err(|e| StorageError::Corrupt(format!("{what} key: {e}")))
}

/// A blob key from a table key (its hash's bytes).
pub(crate) fn blob_key_of_key(bytes: &[u8]) -> Result<BlobKey, StorageError> {
    BlobKey::from_hash_bytes(bytes).map_err(|e| StorageError::Corrupt(format!("blob key: {e}")))
}
