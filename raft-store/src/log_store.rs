//! openraft's `RaftLogStorage` on RocksDB, with a flusher thread that makes
//! appends durable in groups.

use std::fmt::Debug;
use std::marker::PhantomData;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{LogId, OptionalSend, RaftLogId, RaftLogReader, StorageError, StorageIOError, Vote};
use rocksdb::{DB, Direction, IteratorMode, ReadOptions, WriteBatch, WriteOptions};

use crate::db::{
    self, CF_LOG, CF_META, KEY_APPLIED, KEY_COMMITTED, KEY_LAST_PURGED, KEY_VOTE, LOG_KEY_END,
    log_key,
};
use crate::{StoreError, StoreTypeConfig};

/// Appends waiting for their fsync, at most; beyond it `append` waits.
const MAX_PENDING_FLUSHES: usize = 4096;

/// What `limited_get_log_entries` returns at most (but always one entry):
/// keeps one replication message bounded. openraft 0.9 gives an append
/// the heartbeat interval to be sent, written and fsynced by a follower,
/// so a message stays small enough for that (applications keep single
/// entries smaller still).
pub const MAX_LOG_READ_BYTES: usize = 1 << 20;

/// The log half of the store. openraft owns it; it is not `Clone`.
pub struct LogStore<C: StoreTypeConfig> {
    db: Arc<DB>,
    flusher: Flusher,
    /// Purged as far as openraft knows: entries up to it are hidden. The
    /// durable purge point may lag it (see `purge`), never pass it. Not
    /// persisted: after a restart the durable point is the truth.
    purge_requested: Option<LogId<u64>>,
    /// The last committed index openraft saved, for metrics.
    committed: Arc<std::sync::atomic::AtomicU64>,
    _config: PhantomData<C>,
}

/// A read-only handle on the log for openraft's replication tasks.
pub struct LogReader<C: StoreTypeConfig> {
    db: Arc<DB>,
    _config: PhantomData<C>,
}

/// Called once the entries of one append are durable, or with the error
/// that stopped them from becoming so.
type Completion = Box<dyn FnOnce(std::io::Result<()>) + Send>;

impl<C: StoreTypeConfig> LogStore<C> {
    pub(crate) fn new(db: Arc<DB>, inline_flush: bool) -> Result<Self, StoreError> {
        let flusher = if inline_flush {
            Flusher::inline(db.clone())
        } else {
            Flusher::start(db.clone())?
        };
        Ok(Self {
            db,
            flusher,
            purge_requested: None,
            committed: Arc::default(),
            _config: PhantomData,
        })
    }

    /// The index of the last entry openraft said is committed (0 before
    /// it said any), kept current as it saves more: for metrics.
    pub fn committed_index(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.committed.clone()
    }

    /// Appends `entries` (readable when this returns) and calls `done` once
    /// they are durable. What openraft's `append` does, usable without an
    /// openraft callback (benchmarks pipeline appends through it).
    pub fn append_with_completion(
        &mut self,
        entries: impl IntoIterator<Item = C::Entry>,
        done: impl FnOnce(std::io::Result<()>) + Send + 'static,
    ) -> Result<(), StoreError> {
        let cf = db::cf(&self.db, CF_LOG);
        let mut batch = WriteBatch::default();
        for entry in entries {
            batch.put_cf(
                cf,
                log_key(entry.get_log_id().index),
                db::encode("log entry", &entry)?,
            );
        }
        // Written now, so readable when this returns; durable when the
        // flusher's fsync of the WAL completes, which is when it calls back.
        self.db.write(batch)?;
        self.flusher.submit(Box::new(done));
        Ok(())
    }
}

fn sync_write() -> WriteOptions {
    let mut opts = WriteOptions::default();
    opts.set_sync(true);
    opts
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError<u64> {
    StorageIOError::<u64>::read_logs(&e).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError<u64> {
    StorageIOError::<u64>::write_logs(&e).into()
}

/// Reads entries with index in `range`, stopping early once `max_bytes` are
/// read (always returning at least one entry when there is one). Fails on a
/// hole: the log must be contiguous.
fn read_entries<C: StoreTypeConfig>(
    db: &DB,
    range: impl RangeBounds<u64>,
    max_bytes: usize,
) -> Result<Vec<C::Entry>, StoreError> {
    let start = match range.start_bound() {
        Bound::Included(&i) => i,
        Bound::Excluded(&i) => match i.checked_add(1) {
            Some(i) => i,
            None => return Ok(Vec::new()),
        },
        Bound::Unbounded => 0,
    };
    let mut read_opts = ReadOptions::default();
    match range.end_bound() {
        Bound::Included(&i) => match i.checked_add(1) {
            Some(end) => read_opts.set_iterate_upper_bound(log_key(end)),
            None => read_opts.set_iterate_upper_bound(LOG_KEY_END),
        },
        Bound::Excluded(&i) => read_opts.set_iterate_upper_bound(log_key(i)),
        Bound::Unbounded => read_opts.set_iterate_upper_bound(LOG_KEY_END),
    }
    let first = log_key(start);
    let iter = db.iterator_cf_opt(
        db::cf(db, CF_LOG),
        read_opts,
        IteratorMode::From(&first, Direction::Forward),
    );
    let mut entries: Vec<C::Entry> = Vec::new();
    let mut bytes = 0usize;
    for item in iter {
        let (key, value) = item?;
        let index = db::index_of_log_key(&key)?;
        let entry: C::Entry = db::decode("log entry", &value)?;
        // Paired check: the key we stored it under is the index it carries,
        // and there is no hole between consecutive entries.
        if entry.get_log_id().index != index {
            return Err(StoreError::Corrupt(format!(
                "log entry under key {index} carries index {}",
                entry.get_log_id().index
            )));
        }
        if let Some(prev) = entries.last()
            && prev.get_log_id().index + 1 != index
        {
            return Err(StoreError::Corrupt(format!(
                "hole in the log between {} and {index}",
                prev.get_log_id().index
            )));
        }
        bytes += value.len();
        entries.push(entry);
        if bytes >= max_bytes {
            break;
        }
    }
    Ok(entries)
}

impl<C: StoreTypeConfig> RaftLogReader<C> for LogStore<C> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<C::Entry>, StorageError<u64>> {
        let mut entries = read_entries::<C>(&self.db, range, usize::MAX).map_err(read_err)?;
        if let Some(hidden) = self.purge_requested {
            entries.retain(|e| e.get_log_id().index > hidden.index);
        }
        Ok(entries)
    }

    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<C::Entry>, StorageError<u64>> {
        // Entries up to the requested purge point are hidden, as in
        // `try_get_log_entries`.
        let start = match self.purge_requested {
            Some(hidden) => start.max(hidden.index + 1),
            None => start,
        };
        read_entries::<C>(&self.db, start..end, MAX_LOG_READ_BYTES).map_err(read_err)
    }
}

impl<C: StoreTypeConfig> RaftLogReader<C> for LogReader<C> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<C::Entry>, StorageError<u64>> {
        read_entries::<C>(&self.db, range, usize::MAX).map_err(read_err)
    }

    async fn limited_get_log_entries(
        &mut self,
        start: u64,
        end: u64,
    ) -> Result<Vec<C::Entry>, StorageError<u64>> {
        read_entries::<C>(&self.db, start..end, MAX_LOG_READ_BYTES).map_err(read_err)
    }
}

impl<C: StoreTypeConfig> RaftLogStorage<C> for LogStore<C> {
    type LogReader = LogReader<C>;

    async fn get_log_state(&mut self) -> Result<LogState<C>, StorageError<u64>> {
        let durable_purged: Option<LogId<u64>> =
            db::get_meta(&self.db, KEY_LAST_PURGED, "last purged log id").map_err(read_err)?;
        let last_purged_log_id = durable_purged.max(self.purge_requested);
        let last = self
            .db
            .iterator_cf(db::cf(&self.db, CF_LOG), IteratorMode::End)
            .next()
            .transpose()
            .map_err(read_err)?;
        let last_log_id = match last {
            Some((_, value)) => {
                let entry: C::Entry = db::decode("log entry", &value).map_err(read_err)?;
                Some(*entry.get_log_id()).max(last_purged_log_id)
            }
            None => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        LogReader {
            db: self.db.clone(),
            _config: PhantomData,
        }
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError<u64>> {
        let bytes = db::encode("vote", vote).map_err(|e| StorageIOError::write_vote(&e))?;
        self.db
            .put_cf_opt(db::cf(&self.db, CF_META), KEY_VOTE, bytes, &sync_write())
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError<u64>> {
        db::get_meta(&self.db, KEY_VOTE, "vote").map_err(|e| StorageIOError::read_vote(&e).into())
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<u64>>,
    ) -> Result<(), StorageError<u64>> {
        // Not synced: a committed id that is lost in a crash is learned again
        // from the leader, and the WAL keeps it ordered after the entries it
        // names.
        if let Some(id) = committed {
            self.committed
                .fetch_max(id.index, std::sync::atomic::Ordering::Relaxed);
        }
        let bytes = db::encode("committed", &committed).map_err(write_err)?;
        self.db
            .put_cf(db::cf(&self.db, CF_META), KEY_COMMITTED, bytes)
            .map_err(write_err)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<u64>>, StorageError<u64>> {
        Ok(
            db::get_meta::<Option<LogId<u64>>>(&self.db, KEY_COMMITTED, "committed")
                .map_err(read_err)?
                .flatten(),
        )
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<C>,
    ) -> Result<(), StorageError<u64>>
    where
        I: IntoIterator<Item = C::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        self.append_with_completion(entries, move |result| callback.log_io_completed(result))
            .map_err(write_err)
    }

    async fn truncate(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            db::cf(&self.db, CF_LOG),
            &log_key(log_id.index)[..],
            &LOG_KEY_END[..],
        );
        self.db.write_opt(batch, &sync_write()).map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId<u64>) -> Result<(), StorageError<u64>> {
        // openraft may purge up to a snapshot whose install is still under
        // way. Entries past the state machine's applied index are therefore
        // only hidden (`purge_requested`), never deleted: should the install
        // die, they are still there to re-apply after a restart. They are
        // deleted by a later purge, once the state machine has passed them.
        let requested = self.purge_requested.max(Some(log_id)).expect("just set");
        self.purge_requested = Some(requested);
        let applied =
            db::get_meta::<Option<LogId<u64>>>(&self.db, KEY_APPLIED, "last applied log id")
                .map_err(read_err)?
                .flatten();
        let Some(applied) = applied else {
            return Ok(());
        };
        let physical = if applied.index >= requested.index {
            requested
        } else {
            let at = applied.index;
            match read_entries::<C>(&self.db, at..=at, usize::MAX)
                .map_err(read_err)?
                .first()
            {
                Some(entry) => *entry.get_log_id(),
                None => return Ok(()),
            }
        };
        let mut batch = WriteBatch::default();
        let last_purged = db::encode("last purged log id", &physical).map_err(write_err)?;
        batch.put_cf(db::cf(&self.db, CF_META), KEY_LAST_PURGED, last_purged);
        batch.delete_range_cf(
            db::cf(&self.db, CF_LOG),
            log_key(0),
            log_key(physical.index + 1),
        );
        // Not synced: a purge lost in a crash leaves entries that a snapshot
        // already covers, which is harmless; the marker and the deletion are
        // one batch, so they are lost or kept together.
        self.db.write(batch).map_err(write_err)
    }
}

/// Fsyncs the WAL on its own thread and completes appends' callbacks in
/// order. Appends that queue up during one fsync are completed by the next.
/// (Or, `inline`, fsyncs and completes each append where it is submitted.)
struct Flusher {
    queue: Option<mpsc::SyncSender<Completion>>,
    thread: Option<JoinHandle<()>>,
    /// Set when inline: the database, and the first fsync failure.
    inline: Option<(Arc<DB>, std::sync::Mutex<Option<String>>)>,
}

/// What a completion is told after `failed` (the first fsync failure, if
/// any): after a failed fsync the kernel may have dropped the dirty pages,
/// so a later successful fsync proves nothing about earlier writes.
fn flush_result(failed: &Option<String>) -> std::io::Result<()> {
    match failed {
        None => Ok(()),
        Some(e) => Err(std::io::Error::other(format!(
            "WAL fsync failed earlier: {e}"
        ))),
    }
}

impl Flusher {
    fn inline(db: Arc<DB>) -> Self {
        Self {
            queue: None,
            thread: None,
            inline: Some((db, std::sync::Mutex::new(None))),
        }
    }

    fn start(db: Arc<DB>) -> Result<Self, StoreError> {
        let (tx, rx) = mpsc::sync_channel::<Completion>(MAX_PENDING_FLUSHES);
        let thread = std::thread::Builder::new()
            .name("raft-log-flush".into())
            .spawn(move || {
                let mut group = Vec::new();
                // After a failed fsync the kernel may have dropped the dirty
                // pages, so a later successful fsync proves nothing about
                // earlier writes: the first failure fails everything after.
                let mut failed: Option<String> = None;
                while let Ok(first) = rx.recv() {
                    group.push(first);
                    while group.len() < MAX_PENDING_FLUSHES {
                        match rx.try_recv() {
                            Ok(next) => group.push(next),
                            Err(_) => break,
                        }
                    }
                    if failed.is_none()
                        && let Err(e) = db.flush_wal(true)
                    {
                        failed = Some(e.to_string());
                    }
                    for done in group.drain(..) {
                        done(flush_result(&failed));
                    }
                }
            })
            .map_err(|e| StoreError::io("spawn the log flusher thread", e))?;
        Ok(Self {
            queue: Some(tx),
            thread: Some(thread),
            inline: None,
        })
    }

    fn submit(&self, done: Completion) {
        if let Some((db, failed)) = &self.inline {
            let mut failed = failed.lock().unwrap_or_else(|p| p.into_inner());
            if failed.is_none()
                && let Err(e) = db.flush_wal(true)
            {
                *failed = Some(e.to_string());
            }
            done(flush_result(&failed));
            return;
        }
        let queue = self.queue.as_ref().expect("the queue lives until drop");
        if let Err(mpsc::SendError(done)) = queue.send(done) {
            done(Err(std::io::Error::other("log flusher thread is gone")));
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        // Closing the queue ends the thread after it completes what is queued;
        // joining it releases its handle on the database before we return.
        drop(self.queue.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
