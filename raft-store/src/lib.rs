//! raft-store: openraft's log storage and state machine on one RocksDB
//! instance, generic over the application that the state machine runs.
//!
//! What lives where (column families of one database):
//! - `raft.log`: log entries, keyed by big-endian index.
//! - `raft.meta`: the vote, the committed log id, the last purged log id, the
//!   state machine's last applied log id and membership, and the marker of a
//!   snapshot install in progress.
//! - the application's own column families, named by [`Application::COLUMN_FAMILIES`].
//!
//! Snapshots are files in `<dir>/snapshots/`, written by streaming a RocksDB
//! point-in-time view of the application's column families, and installed by
//! streaming them back in bounded batches.
//!
//! Durability: `append` writes entries at once (so they are readable) and
//! reports completion from a flusher thread after an fsync of the WAL; appends
//! that arrive while an fsync runs share the next one (group commit).
//! `save_vote` and `truncate` are synced before they return. State-machine
//! writes are not synced on their own: each applied entry is one atomic write
//! batch with its last-applied id, and the WAL is shared with the log, so a
//! crash leaves the state machine at some applied index with exactly that
//! index's state, and openraft re-applies the rest from the log.
//!
//! This crate knows nothing of gRPC, of builds, or of the coordinator's
//! commands: the coordinator supplies them through [`Application`].

mod db;
mod error;
mod log_store;
mod snapshot;
mod state_machine;

use std::path::Path;
use std::sync::Arc;

pub use error::StoreError;
pub use log_store::{LogReader, LogStore};
pub use state_machine::{
    Application, ApplyTxn, ReadState, SnapshotBuilder, StateHandle, StateMachineStore, StateReader,
};

/// The openraft type configurations raft-store can store: node IDs are `u64`,
/// entries are openraft's own, and snapshots are files.
///
/// Declare one with `openraft::declare_raft_types!` and
/// `SnapshotData = tokio::fs::File`.
pub trait StoreTypeConfig:
    openraft::RaftTypeConfig<
        NodeId = u64,
        Entry = openraft::Entry<Self>,
        SnapshotData = tokio::fs::File,
    >
{
}

impl<T> StoreTypeConfig for T where
    T: openraft::RaftTypeConfig<
            NodeId = u64,
            Entry = openraft::Entry<T>,
            SnapshotData = tokio::fs::File,
        >
{
}

/// Opens (or creates) the store in `dir` and returns its two halves, which
/// share one RocksDB instance.
///
/// If a crash interrupted a snapshot install, the install is finished here,
/// before anything is returned. The application's
/// [`Application::restore`] is called once with the state as found.
pub fn open<C, A>(dir: &Path, app: A) -> Result<(LogStore<C>, StateMachineStore<C, A>), StoreError>
where
    C: StoreTypeConfig,
    A: Application<C>,
{
    open_with(dir, app, Options::default())
}

/// How the store does its work.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// Fsync the WAL inside `append` and complete it there, instead of on
    /// the flusher thread. For a deterministic simulation, where no other
    /// thread may decide when an append completes; slower (no group
    /// commit, and the caller's thread waits for the fsync).
    pub inline_flush: bool,
}

/// [`open`] with `options`.
pub fn open_with<C, A>(
    dir: &Path,
    app: A,
    options: Options,
) -> Result<(LogStore<C>, StateMachineStore<C, A>), StoreError>
where
    C: StoreTypeConfig,
    A: Application<C>,
{
    let db = Arc::new(db::open(dir, A::COLUMN_FAMILIES)?);
    let snapshots = snapshot::SnapshotDir::<C>::open(&dir.join("snapshots"))?;
    let state_machine = StateMachineStore::open(db.clone(), snapshots, app)?;
    let log_store = LogStore::new(db, options.inline_flush)?;
    Ok((log_store, state_machine))
}
