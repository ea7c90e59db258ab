//! openraft's `RaftStateMachine` on RocksDB, and the seam through which the
//! application supplies its deterministic `apply`.

use std::cell::RefCell;
use std::ops::{ControlFlow, Range};
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use openraft::storage::RaftStateMachine;
use openraft::{
    EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use rocksdb::{
    DB, DBIteratorWithThreadMode, Direction, IteratorMode, ReadOptions, WriteBatch, WriteOptions,
};
use tokio::io::AsyncWriteExt;

use crate::db::{self, CF_META, KEY_APPLIED, KEY_INSTALLING, KEY_LAST_PURGED, KEY_MEMBERSHIP};
use crate::snapshot::{self, Meta, SnapshotDir};
use crate::{StoreError, StoreTypeConfig};

/// Largest write batch used while loading a snapshot: bounds the memory an
/// install takes whatever the snapshot's size.
const MAX_LOAD_BATCH_BYTES: usize = 4 << 20;

/// The application whose state the store keeps: the coordinator implements
/// it. Its state lives in its own column families; `apply` reads and writes
/// them through an [`ApplyTxn`].
pub trait Application<C: StoreTypeConfig>: Send + Sync + 'static {
    /// Names of the column families holding the application's state. They
    /// must not be empty, `"default"`, or start with `raft.`.
    const COLUMN_FAMILIES: &'static [&'static str];

    /// Applies one committed command. Must be deterministic: a function of
    /// the state read through `txn`, the log id and the command only — no
    /// clock, no randomness, no I/O but `txn`. Writes made through `txn` are
    /// committed atomically with the entry's log id once this returns `Ok`.
    ///
    /// An error here is a storage failure and stops the Raft node; a command
    /// the application refuses is a normal response, not an error.
    fn apply(
        &mut self,
        txn: &mut ApplyTxn<'_>,
        log_id: &LogId<u64>,
        command: &C::D,
    ) -> Result<C::R, StoreError>;

    /// The response for entries that carry no command (blank and membership
    /// entries), which openraft still expects one for.
    fn empty_response(&self) -> C::R;

    /// Called once the state was loaded as a whole (on open, after a
    /// snapshot install), so the application can rebuild any in-memory index
    /// it keeps beside its column families.
    fn restore(&mut self, state: &StateReader<'_>) -> Result<(), StoreError> {
        let _ = state;
        Ok(())
    }
}

/// Reads of the application's state.
pub trait ReadState {
    /// The value of `key` in `table`.
    fn get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// Calls `f` for every key in `table` starting with `prefix`, in key
    /// order, until it returns `Break`.
    fn for_each_prefix(
        &self,
        table: &str,
        prefix: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> ControlFlow<()>,
    ) -> Result<(), StoreError>;
}

fn table_index(tables: &[&str], table: &str) -> Result<usize, StoreError> {
    tables
        .iter()
        .position(|t| *t == table)
        .ok_or_else(|| StoreError::UnknownColumnFamily(table.to_string()))
}

/// The smallest key greater than every key starting with `prefix`, if any.
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

fn prefix_read_options(prefix: &[u8]) -> ReadOptions {
    let mut opts = ReadOptions::default();
    if let Some(end) = prefix_end(prefix) {
        opts.set_iterate_upper_bound(end);
    }
    opts
}

/// Walks a RocksDB iterator bounded to a prefix, merged with pending writes
/// (`pending`, already restricted to the prefix), which win on equal keys.
fn merge_scan<'o>(
    iter: DBIteratorWithThreadMode<'_, DB>,
    pending: impl Iterator<Item = (&'o [u8], Option<&'o [u8]>)>,
    f: &mut dyn FnMut(&[u8], &[u8]) -> ControlFlow<()>,
) -> Result<(), StoreError> {
    use std::cmp::Ordering;
    let mut stored = iter.peekable();
    let mut pending = pending.peekable();
    loop {
        // Which side holds the smaller key; `None` once both are done.
        let order = match (stored.peek(), pending.peek()) {
            (None, None) => return Ok(()),
            (Some(Err(_)), _) => None,
            (Some(Ok(_)), None) => Some(Ordering::Less),
            (None, Some(_)) => Some(Ordering::Greater),
            (Some(Ok((s, _))), Some((p, _))) => Some(s.as_ref().cmp(*p)),
        };
        let flow = match order {
            None => {
                let err = stored.next().expect("peeked").expect_err("peeked an error");
                return Err(err.into());
            }
            Some(Ordering::Less) => {
                let (key, value) = stored.next().expect("peeked").expect("peeked ok");
                f(&key, &value)
            }
            Some(order) => {
                if order == Ordering::Equal {
                    // The pending write replaces the stored value.
                    stored.next();
                }
                match pending.next().expect("peeked") {
                    (key, Some(value)) => f(key, value),
                    (_, None) => ControlFlow::Continue(()),
                }
            }
        };
        if flow.is_break() {
            return Ok(());
        }
    }
}

/// The application's view of the state while applying one entry: reads see
/// the state before the entry plus the entry's own writes so far.
///
/// Writes go straight into the entry's write batch, and each is indexed by
/// where its key and value lie in the batch's bytes. A submit of 100,000
/// jobs writes some hundred megabytes: kept as a map of copies until the
/// batch was made of them, they and the batch were the coordinator's peak.
pub struct ApplyTxn<'a> {
    db: &'a DB,
    tables: &'static [&'static str],
    batch: WriteBatch,
    /// The application's writes, in order, as places in `batch`.
    writes: Vec<Written>,
    /// One table's writes (positions in `writes`) sorted by key, each
    /// key's last write only: made by the first read of that table after
    /// a write. Reads are rare (the coordinator's deletes of a prefix, in
    /// tables the same entry seldom writes), writes many.
    sorted: RefCell<Option<(usize, Vec<usize>)>>,
}

/// One write of an [`ApplyTxn`]: byte ranges of `batch.data()`.
struct Written {
    table: usize,
    key: Range<usize>,
    /// `None` for a deletion.
    value: Option<Range<usize>>,
}

/// Bytes of the varint32 RocksDB prefixes a slice of `len` bytes with.
fn varint_len(len: usize) -> usize {
    let mut bytes = 1;
    let mut rest = len >> 7;
    while rest > 0 {
        bytes += 1;
        rest >>= 7;
    }
    bytes
}

impl<'a> ApplyTxn<'a> {
    fn new(db: &'a DB, tables: &'static [&'static str]) -> Self {
        Self {
            db,
            tables,
            batch: WriteBatch::default(),
            writes: Vec::new(),
            sorted: RefCell::new(None),
        }
    }

    /// Sets `key` in `table` to `value`.
    pub fn put(&mut self, table: &str, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let index = table_index(self.tables, table)?;
        self.batch.put_cf(db::cf(self.db, table), key, value);
        // A record ends with its key (a length, the bytes), then its value.
        let end = self.batch.data().len();
        let value_at = end - value.len();
        let key_at = value_at.saturating_sub(varint_len(value.len()) + key.len());
        self.record(
            Written {
                table: index,
                key: key_at..key_at + key.len(),
                value: Some(value_at..end),
            },
            key,
            Some(value),
        )
    }

    /// Removes `key` from `table`.
    pub fn delete(&mut self, table: &str, key: &[u8]) -> Result<(), StoreError> {
        let index = table_index(self.tables, table)?;
        self.batch.delete_cf(db::cf(self.db, table), key);
        let end = self.batch.data().len();
        self.record(
            Written {
                table: index,
                key: end.saturating_sub(key.len())..end,
                value: None,
            },
            key,
            None,
        )
    }

    /// Indexes a write just added to the batch, after checking that its
    /// ranges hold what was written (the record layout is RocksDB's, as
    /// `write_batch.cc` documents it): one comparison of a few hundred
    /// bytes, against a read that would silently see other bytes.
    fn record(
        &mut self,
        written: Written,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        let data = self.batch.data();
        let holds = data.get(written.key.clone()) == Some(key)
            && written.value.clone().map(|range| data.get(range)) == value.map(Some);
        if !holds {
            return Err(StoreError::Corrupt(
                "the write batch's last record is not laid out as expected".into(),
            ));
        }
        self.writes.push(written);
        *self.sorted.get_mut() = None;
        Ok(())
    }

    /// The key and value (None: deleted) of write `i`.
    fn write_at(&self, i: usize) -> (&[u8], Option<&[u8]>) {
        let data = self.batch.data();
        let w = &self.writes[i];
        (
            &data[w.key.clone()],
            w.value.clone().map(|range| &data[range]),
        )
    }

    /// Positions in `writes` of `table`'s writes sorted by key, each
    /// key's last.
    fn sorted_writes(&self, table: usize) -> std::cell::Ref<'_, Vec<usize>> {
        let current = matches!(&*self.sorted.borrow(), Some((t, _)) if *t == table);
        if !current {
            let data = self.batch.data();
            let key = |i: &usize| &data[self.writes[*i].key.clone()];
            let mut order: Vec<usize> = (0..self.writes.len())
                .filter(|&i| self.writes[i].table == table)
                .collect();
            // Stable: a key's writes stay in write order, the last kept.
            order.sort_by(|a, b| key(a).cmp(key(b)));
            let mut last_of_each: Vec<usize> = Vec::with_capacity(order.len());
            for i in order {
                match last_of_each.last_mut() {
                    Some(prev) if key(prev) == key(&i) => *prev = i,
                    _ => last_of_each.push(i),
                }
            }
            *self.sorted.borrow_mut() = Some((table, last_of_each));
        }
        std::cell::Ref::map(self.sorted.borrow(), |s| {
            &s.as_ref().expect("just sorted").1
        })
    }

    /// The entry's writes as one batch, its applied log ID and membership
    /// among them.
    fn into_batch(self) -> WriteBatch {
        self.batch
    }

    fn put_meta<T: serde::Serialize>(
        &mut self,
        key: &'static [u8],
        what: &'static str,
        value: &T,
    ) -> Result<(), StoreError> {
        let value = db::encode(what, value)?;
        self.batch.put_cf(db::cf(self.db, CF_META), key, value);
        Ok(())
    }
}

impl ReadState for ApplyTxn<'_> {
    fn get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let index = table_index(self.tables, table)?;
        let sorted = self.sorted_writes(index);
        let found = sorted.binary_search_by(|&i| self.write_at(i).0.cmp(key));
        if let Ok(at) = found {
            let (_, value) = self.write_at(sorted[at]);
            return Ok(value.map(<[u8]>::to_vec));
        }
        Ok(self.db.get_cf(db::cf(self.db, table), key)?)
    }

    fn for_each_prefix(
        &self,
        table: &str,
        prefix: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> ControlFlow<()>,
    ) -> Result<(), StoreError> {
        let index = table_index(self.tables, table)?;
        let iter = self.db.iterator_cf_opt(
            db::cf(self.db, table),
            prefix_read_options(prefix),
            IteratorMode::From(prefix, Direction::Forward),
        );
        let sorted = self.sorted_writes(index);
        let from = sorted.partition_point(|&i| self.write_at(i).0 < prefix);
        let pending = sorted[from..]
            .iter()
            .map(|&i| self.write_at(i))
            .take_while(|(k, _)| k.starts_with(prefix));
        merge_scan(iter, pending, f)
    }
}

/// A consistent point-in-time view of the application's state.
pub struct StateReader<'a> {
    db: &'a DB,
    view: rocksdb::Snapshot<'a>,
    tables: &'static [&'static str],
}

impl<'a> StateReader<'a> {
    fn new(db: &'a DB, tables: &'static [&'static str]) -> Self {
        Self {
            db,
            view: db.snapshot(),
            tables,
        }
    }

    /// The log id of the last entry the state reflects.
    pub fn applied(&self) -> Result<Option<LogId<u64>>, StoreError> {
        match self.view.get_cf(db::cf(self.db, CF_META), KEY_APPLIED)? {
            Some(bytes) => db::decode("last applied log id", &bytes),
            None => Ok(None),
        }
    }
}

impl ReadState for StateReader<'_> {
    fn get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        table_index(self.tables, table)?;
        Ok(self.view.get_cf(db::cf(self.db, table), key)?)
    }

    fn for_each_prefix(
        &self,
        table: &str,
        prefix: &[u8],
        f: &mut dyn FnMut(&[u8], &[u8]) -> ControlFlow<()>,
    ) -> Result<(), StoreError> {
        table_index(self.tables, table)?;
        let iter = self.view.iterator_cf_opt(
            db::cf(self.db, table),
            prefix_read_options(prefix),
            IteratorMode::From(prefix, Direction::Forward),
        );
        merge_scan(iter, std::iter::empty(), f)
    }
}

/// A cloneable handle for reading the application's state outside `apply`
/// (for queries), always through a consistent view.
#[derive(Clone)]
pub struct StateHandle {
    db: Arc<DB>,
    tables: &'static [&'static str],
    install_lock: Arc<RwLock<()>>,
}

impl StateHandle {
    /// Runs `f` on a point-in-time view of the state (never one taken in the
    /// middle of a snapshot install).
    pub fn read<T>(&self, f: impl FnOnce(&StateReader<'_>) -> T) -> T {
        let reader = {
            let _no_install = self.install_lock.read().expect("install lock poisoned");
            StateReader::new(&self.db, self.tables)
        };
        f(&reader)
    }
}

/// The state-machine half of the store, running application `A`.
pub struct StateMachineStore<C: StoreTypeConfig, A: Application<C>> {
    db: Arc<DB>,
    app: A,
    snapshots: Arc<SnapshotDir<C>>,
    /// Held for writing through a whole snapshot install, and for reading by
    /// anything taking a view of the state (snapshot builds, queries), so no
    /// view ever sees a half-installed state.
    install_lock: Arc<RwLock<()>>,
    last_applied: Option<LogId<u64>>,
}

/// Builds snapshots from a point-in-time view, beside ongoing applies.
#[derive(Clone)]
pub struct SnapshotBuilder<C: StoreTypeConfig> {
    db: Arc<DB>,
    snapshots: Arc<SnapshotDir<C>>,
    install_lock: Arc<RwLock<()>>,
    tables: &'static [&'static str],
}

fn sync_write() -> WriteOptions {
    let mut opts = WriteOptions::default();
    opts.set_sync(true);
    opts
}

fn task_error(e: tokio::task::JoinError) -> StoreError {
    StoreError::Task(e.to_string())
}

/// Our table for each of a snapshot's tables, in its order; fails on a table
/// the application does not declare.
fn map_tables(
    snapshot_tables: &[String],
    tables: &'static [&'static str],
) -> Result<Vec<&'static str>, StoreError> {
    snapshot_tables
        .iter()
        .map(|name| table_index(tables, name).map(|i| tables[i]))
        .collect()
}

/// Replaces the application's state with the current snapshot's, in bounded
/// batches. The caller has written the `installing` marker; the last batch
/// sets the applied id and membership and removes the marker, synced.
fn load_current_snapshot<C: StoreTypeConfig>(
    db: &DB,
    snapshots: &SnapshotDir<C>,
    tables: &'static [&'static str],
    meta: &Meta<C>,
) -> Result<(), StoreError> {
    let path = snapshots.current_path();
    let mut reader = snapshot::open_reader(&path)?;
    let file_meta: Meta<C> = reader.meta()?;
    if file_meta != *meta {
        return Err(StoreError::BadSnapshot {
            path,
            problem: format!("holds snapshot {file_meta}, expected {meta}"),
        });
    }
    // Map the snapshot's tables to ours before touching anything.
    let mapping = map_tables(&reader.tables, tables)?;

    for table in tables {
        let cf = db::cf(db, table);
        // Everything in the table is in [first, last]: one range deletion
        // plus the last key clears it without a tombstone per key.
        let first = db.iterator_cf(cf, IteratorMode::Start).next().transpose()?;
        let last = db.iterator_cf(cf, IteratorMode::End).next().transpose()?;
        if let (Some((first, _)), Some((last, _))) = (first, last) {
            let mut batch = WriteBatch::default();
            batch.delete_range_cf(cf, &first, &last);
            batch.delete_cf(cf, &last);
            db.write(batch)?;
        }
    }

    let mut batch = WriteBatch::default();
    while let Some((table, key, value)) = reader.next_record()? {
        batch.put_cf(db::cf(db, mapping[table]), key, value);
        if batch.size_in_bytes() >= MAX_LOAD_BATCH_BYTES {
            db.write(std::mem::take(&mut batch))?;
        }
    }
    let cf_meta = db::cf(db, CF_META);
    batch.put_cf(
        cf_meta,
        KEY_APPLIED,
        db::encode("last applied log id", &meta.last_log_id)?,
    );
    batch.put_cf(
        cf_meta,
        KEY_MEMBERSHIP,
        db::encode("membership", &meta.last_membership)?,
    );
    batch.delete_cf(cf_meta, KEY_INSTALLING);
    db.write_opt(batch, &sync_write())?;
    Ok(())
}

impl<C: StoreTypeConfig, A: Application<C>> StateMachineStore<C, A> {
    pub(crate) fn open(
        db: Arc<DB>,
        snapshots: SnapshotDir<C>,
        mut app: A,
    ) -> Result<Self, StoreError> {
        let snapshots = Arc::new(snapshots);
        let installing: Option<Meta<C>> = db::get_meta(&db, KEY_INSTALLING, "installing marker")?;
        if let Some(meta) = installing {
            tracing::info!(snapshot = %meta, "finishing a snapshot install interrupted by a crash");
            let received = snapshots.install_path();
            if received.exists() {
                let mut reader = snapshot::open_reader(&received)?;
                reader.verify_to_end()?;
                snapshots.promote_installed(&reader.meta()?)?;
            }
            load_current_snapshot(&db, &snapshots, A::COLUMN_FAMILIES, &meta)?;
        }
        let received = snapshots.install_path();
        if received.exists() {
            std::fs::remove_file(&received)
                .map_err(|e| StoreError::io(format!("remove {}", received.display()), e))?;
        }
        let reader = StateReader::new(&db, A::COLUMN_FAMILIES);
        let last_applied = reader.applied()?;
        let last_purged: Option<LogId<u64>> =
            db::get_meta(&db, KEY_LAST_PURGED, "last purged log id")?;
        if last_purged.map(|p| p.index) > last_applied.map(|a| a.index) {
            // The log was purged past the state (a snapshot install that
            // never completed): replaying the log cannot rebuild it, and
            // serving would apply later entries to an older state.
            return Err(StoreError::Corrupt(format!(
                "the log is purged up to {:?} but the state machine is only at {:?}; \
                 this replica must be wiped and rejoin to receive a snapshot",
                last_purged.map(|p| p.index),
                last_applied.map(|a| a.index)
            )));
        }
        app.restore(&reader)?;
        drop(reader);
        Ok(Self {
            db,
            app,
            snapshots,
            install_lock: Arc::new(RwLock::new(())),
            last_applied,
        })
    }

    /// A handle for reading the application's state from elsewhere.
    pub fn state(&self) -> StateHandle {
        StateHandle {
            db: self.db.clone(),
            tables: A::COLUMN_FAMILIES,
            install_lock: self.install_lock.clone(),
        }
    }

    /// The application, for its in-memory parts.
    pub fn app(&self) -> &A {
        &self.app
    }

    fn apply_one(&mut self, entry: &C::Entry) -> Result<C::R, StoreError> {
        let log_id = entry.log_id;
        assert!(
            Some(log_id) > self.last_applied,
            "apply out of order: {log_id} after {:?}",
            self.last_applied
        );
        let mut txn = ApplyTxn::new(&self.db, A::COLUMN_FAMILIES);
        let response = match &entry.payload {
            EntryPayload::Blank => self.app.empty_response(),
            EntryPayload::Normal(command) => self.app.apply(&mut txn, &log_id, command)?,
            EntryPayload::Membership(membership) => {
                let stored = StoredMembership::new(Some(log_id), membership.clone());
                txn.put_meta(KEY_MEMBERSHIP, "membership", &stored)?;
                self.app.empty_response()
            }
        };
        txn.put_meta(KEY_APPLIED, "last applied log id", &Some(log_id))?;
        self.db.write(txn.into_batch())?;
        self.last_applied = Some(log_id);
        Ok(response)
    }
}

impl<C: StoreTypeConfig, A: Application<C>> RaftStateMachine<C> for StateMachineStore<C, A> {
    type SnapshotBuilder = SnapshotBuilder<C>;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, StoredMembership<u64, C::Node>), StorageError<u64>> {
        let read = || -> Result<_, StoreError> {
            let applied: Option<Option<LogId<u64>>> =
                db::get_meta(&self.db, KEY_APPLIED, "last applied log id")?;
            let membership: Option<StoredMembership<u64, C::Node>> =
                db::get_meta(&self.db, KEY_MEMBERSHIP, "membership")?;
            Ok((applied.flatten(), membership.unwrap_or_default()))
        };
        read().map_err(|e| StorageIOError::read_state_machine(&e).into())
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<C::R>, StorageError<u64>>
    where
        I: IntoIterator<Item = C::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut responses = Vec::new();
        for entry in entries {
            let response = self
                .apply_one(&entry)
                .map_err(|e| StorageIOError::apply(entry.log_id, &e))?;
            responses.push(response);
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            db: self.db.clone(),
            snapshots: self.snapshots.clone(),
            install_lock: self.install_lock.clone(),
            tables: A::COLUMN_FAMILIES,
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<tokio::fs::File>, StorageError<u64>> {
        // An unnamed file: it vanishes when openraft drops it, installed or not.
        let file = tempfile::tempfile_in(self.snapshots.dir())
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        Ok(Box::new(tokio::fs::File::from_std(file)))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, C::Node>,
        snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError<u64>> {
        let signature = meta.signature();
        let io_err = |e: StoreError| {
            StorageError::from(StorageIOError::write_snapshot(Some(signature.clone()), &e))
        };
        let mut file = *snapshot;
        file.flush()
            .await
            .map_err(|e| io_err(StoreError::io("flush received snapshot", e)))?;
        let file = file.into_std().await;

        let db = self.db.clone();
        let snapshots = self.snapshots.clone();
        let install_lock = self.install_lock.clone();
        let meta = meta.clone();
        let installed = tokio::task::spawn_blocking(move || -> Result<Meta<C>, StoreError> {
            let _installing = install_lock.write().expect("install lock poisoned");
            let (received, snapshot_tables) = snapshots.receive(file)?;
            // Everything that can refuse the snapshot is checked before the
            // marker: once it is written, the install must complete.
            map_tables(&snapshot_tables, A::COLUMN_FAMILIES)?;
            if received != meta {
                return Err(StoreError::BadSnapshot {
                    path: snapshots.install_path(),
                    problem: format!("holds snapshot {received}, openraft announced {meta}"),
                });
            }
            db.put_cf_opt(
                db::cf(&db, CF_META),
                KEY_INSTALLING,
                db::encode("installing marker", &meta)?,
                &sync_write(),
            )?;
            snapshots.promote_installed(&meta)?;
            load_current_snapshot(&db, &snapshots, A::COLUMN_FAMILIES, &meta)?;
            Ok(meta)
        })
        .await
        .map_err(task_error)
        .and_then(|r| r)
        .map_err(io_err)?;

        self.last_applied = installed.last_log_id;
        let reader = StateReader::new(&self.db, A::COLUMN_FAMILIES);
        self.app.restore(&reader).map_err(io_err)?;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<C>>, StorageError<u64>> {
        let current = self
            .snapshots
            .open_current()
            .map_err(|e| StorageIOError::read_snapshot(None, &e))?;
        Ok(current.map(|(meta, file)| Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        }))
    }
}

impl<C: StoreTypeConfig> SnapshotBuilder<C> {
    fn build_blocking(self) -> Result<(Meta<C>, std::fs::File), StoreError> {
        let view = {
            let _no_install = self.install_lock.read().expect("install lock poisoned");
            self.db.snapshot()
        };
        // The snapshot will be fsynced and made current: the state it holds
        // must be durable first, or a power loss could leave the current
        // snapshot ahead of the state machine.
        self.db.flush_wal(true)?;
        let cf_meta = db::cf(&self.db, CF_META);
        let applied: Option<LogId<u64>> = match view.get_cf(cf_meta, KEY_APPLIED)? {
            Some(bytes) => db::decode("last applied log id", &bytes)?,
            None => None,
        };
        let membership: StoredMembership<u64, C::Node> =
            match view.get_cf(cf_meta, KEY_MEMBERSHIP)? {
                Some(bytes) => db::decode("membership", &bytes)?,
                None => StoredMembership::default(),
            };
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let meta = SnapshotMeta {
            last_log_id: applied,
            last_membership: membership,
            snapshot_id: format!("{}-{nanos}", applied.map(|l| l.index).unwrap_or(0)),
        };
        let file = self.snapshots.build(&meta, self.tables, |writer| {
            for (index, table) in self.tables.iter().enumerate() {
                for item in view.iterator_cf(db::cf(&self.db, table), IteratorMode::Start) {
                    let (key, value) = item?;
                    writer.record(index, &key, &value)?;
                }
            }
            Ok(())
        })?;
        drop(view);
        Ok((meta, file))
    }
}

impl<C: StoreTypeConfig> RaftSnapshotBuilder<C> for SnapshotBuilder<C> {
    async fn build_snapshot(&mut self) -> Result<Snapshot<C>, StorageError<u64>> {
        let builder = self.clone();
        let (meta, file) = tokio::task::spawn_blocking(move || builder.build_blocking())
            .await
            .map_err(task_error)
            .and_then(|r| r)
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(tokio::fs::File::from_std(file)),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use openraft::{CommittedLeaderId, Entry, RaftSnapshotBuilder};
    use serde::{Deserialize, Serialize};

    use super::*;

    openraft::declare_raft_types!(
        pub Config:
            D = Put,
            R = (),
            NodeId = u64,
            Node = openraft::BasicNode,
            Entry = openraft::Entry<Config>,
            SnapshotData = tokio::fs::File,
            AsyncRuntime = openraft::TokioRuntime,
    );

    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub struct Put(Vec<u8>, Option<Vec<u8>>);

    const T: &str = "t";

    struct KvApp;

    impl Application<Config> for KvApp {
        const COLUMN_FAMILIES: &'static [&'static str] = &[T, "u"];

        fn apply(
            &mut self,
            txn: &mut ApplyTxn<'_>,
            _: &LogId<u64>,
            Put(k, v): &Put,
        ) -> Result<(), StoreError> {
            match v {
                Some(v) => txn.put(T, k, v),
                None => txn.delete(T, k),
            }
        }

        fn empty_response(&self) {}
    }

    fn entry(index: u64, key: &str, value: Option<&str>) -> Entry<Config> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 0), index),
            payload: EntryPayload::Normal(Put(
                key.as_bytes().to_vec(),
                value.map(|v| v.as_bytes().to_vec()),
            )),
        }
    }

    fn contents(state: &StateHandle) -> BTreeMap<Vec<u8>, Vec<u8>> {
        state.read(|r| {
            let mut all = BTreeMap::new();
            r.for_each_prefix(T, b"", &mut |k, v| {
                all.insert(k.to_vec(), v.to_vec());
                ControlFlow::Continue(())
            })
            .expect("scan");
            all
        })
    }

    fn scan(state: &impl ReadState, prefix: &[u8]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        state
            .for_each_prefix(T, prefix, &mut |k, v| {
                out.push((
                    String::from_utf8_lossy(k).into(),
                    String::from_utf8_lossy(v).into(),
                ));
                ControlFlow::Continue(())
            })
            .expect("scan");
        out
    }

    #[test]
    fn prefix_end_is_the_next_prefix() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
        assert_eq!(prefix_end(b""), None);
    }

    /// A new store whose table `T` holds `keys`, each set to "old".
    fn db_holding_old(keys: &[&str]) -> (tempfile::TempDir, DB) {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let db = db::open(dir.path(), KvApp::COLUMN_FAMILIES).expect("open");
        for key in keys {
            db.put_cf(db::cf(&db, T), key, "old").expect("put");
        }
        (dir, db)
    }

    #[test]
    fn apply_txn_reads_its_own_writes_merged_with_stored_state() {
        let (_dir, db) = db_holding_old(&["a1", "a2", "a4", "b1"]);
        let mut txn = ApplyTxn::new(&db, KvApp::COLUMN_FAMILIES);
        txn.put(T, b"a2", b"new").expect("put");
        txn.put(T, b"a3", b"new").expect("put");
        txn.delete(T, b"a4").expect("delete");
        txn.put(T, b"a", b"new").expect("put");

        assert_eq!(txn.get(T, b"a2").expect("get"), Some(b"new".to_vec()));
        assert_eq!(txn.get(T, b"a4").expect("get"), None);
        assert_eq!(txn.get(T, b"a1").expect("get"), Some(b"old".to_vec()));
        let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        assert_eq!(
            scan(&txn, b"a"),
            pairs(&[("a", "new"), ("a1", "old"), ("a2", "new"), ("a3", "new")])
        );
        assert_eq!(scan(&txn, b"b"), pairs(&[("b1", "old")]));
        assert_eq!(scan(&txn, b"c"), pairs(&[]));
        assert!(matches!(
            txn.get("nope", b"x"),
            Err(StoreError::UnknownColumnFamily(_))
        ));
        // Nothing reached the database before the batch is written.
        assert_eq!(db.get_cf(db::cf(&db, T), b"a3").expect("get"), None);
    }

    /// Writes are found again in the batch's bytes whatever their sizes
    /// (RocksDB prefixes each with a varint of one to three bytes here),
    /// per table, with reads between writes seeing each key's last write.
    #[test]
    fn apply_txn_finds_its_writes_in_the_batch_whatever_their_sizes() {
        let (_dir, db) = db_holding_old(&["k0"]);
        let mut txn = ApplyTxn::new(&db, KvApp::COLUMN_FAMILIES);
        let sizes = [0usize, 1, 127, 128, 300, 16_383, 16_384, 70_000];
        for (i, &size) in sizes.iter().enumerate() {
            let key = vec![b'k'; size.max(1)];
            let value: Vec<u8> = (0..size).map(|b| (b + i) as u8).collect();
            txn.put(T, &key, &value).expect("put");
            txn.put("u", &key, b"other table").expect("put");
            // Read back at once (the sorted index is made again).
            assert_eq!(txn.get(T, &key).expect("get"), Some(value), "size {size}");
        }
        txn.put(T, b"k0", b"newer").expect("put");
        assert_eq!(txn.get(T, b"k0").expect("get"), Some(b"newer".to_vec()));
        txn.delete(T, b"k0").expect("delete");
        assert_eq!(txn.get(T, b"k0").expect("get"), None);
        assert_eq!(
            txn.get("u", b"k").expect("get"),
            Some(b"other table".to_vec())
        );
        // A scan sees one row per key, the last write, in key order.
        let mut keys = Vec::new();
        txn.for_each_prefix(T, b"k", &mut |k, v| {
            keys.push((k.len(), v.len()));
            ControlFlow::Continue(())
        })
        .expect("scan");
        let mut expected: Vec<(usize, usize)> = sizes.iter().map(|&n| (n.max(1), n)).collect();
        // Sizes 0 and 1 share the key "k": the later write (1 byte) wins.
        expected.remove(0);
        assert_eq!(keys, expected);
    }

    /// The batch carries each key's last write, and the store's own keys.
    #[test]
    fn apply_txn_commits_each_key_s_last_write() {
        let (_dir, db) = db_holding_old(&["kept", "gone", "back"]);
        let mut txn = ApplyTxn::new(&db, KvApp::COLUMN_FAMILIES);
        txn.put(T, b"twice", b"first").expect("put");
        txn.put(T, b"twice", b"second").expect("put");
        txn.delete(T, b"gone").expect("delete");
        txn.put(T, b"brief", b"new").expect("put");
        txn.delete(T, b"brief").expect("delete");
        txn.delete(T, b"back").expect("delete");
        txn.put(T, b"back", b"new").expect("put");
        txn.put_meta(KEY_APPLIED, "last applied log id", &Some(7u64))
            .expect("meta");
        db.write(txn.into_batch()).expect("write");
        let get = |k: &str| {
            db.get_cf(db::cf(&db, T), k)
                .expect("get")
                .map(|v| String::from_utf8_lossy(&v).into_owned())
        };
        assert_eq!(get("twice").as_deref(), Some("second"));
        assert_eq!(get("kept").as_deref(), Some("old"));
        assert_eq!(get("gone"), None);
        assert_eq!(get("brief"), None);
        assert_eq!(get("back").as_deref(), Some("new"));
        assert!(
            db.get_cf(db::cf(&db, CF_META), KEY_APPLIED)
                .expect("get")
                .is_some()
        );
    }

    #[test]
    fn reserved_column_family_names_are_refused() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        for name in ["raft.log", "default", ""] {
            assert!(
                matches!(db::open(dir.path(), &[name]), Err(StoreError::Config(_))),
                "{name:?}"
            );
        }
    }

    /// Where a crash can interrupt an install, in order.
    #[derive(Clone, Copy, Debug)]
    enum CrashPoint {
        AfterMarker,
        AfterPromote,
        MidLoad,
    }

    /// An install interrupted at each point is finished by the next open, and
    /// the result is exactly the snapshot's state.
    #[tokio::test]
    async fn interrupted_install_is_finished_on_open() {
        for crash in [
            CrashPoint::AfterMarker,
            CrashPoint::AfterPromote,
            CrashPoint::MidLoad,
        ] {
            let source_dir = tempfile::TempDir::new().expect("tempdir");
            let (_log, mut source) =
                crate::open::<Config, _>(source_dir.path(), KvApp).expect("open");
            let entries: Vec<_> = (1..=300)
                .map(|i| entry(i, &format!("k{i:04}"), Some("v")))
                .collect();
            source.apply(entries).await.expect("apply");
            source
                .apply([entry(301, "k0001", None)])
                .await
                .expect("apply");
            let snapshot = source
                .get_snapshot_builder()
                .await
                .build_snapshot()
                .await
                .expect("build");
            let expected = contents(&source.state());
            assert_eq!(expected.len(), 299);

            let target_dir = tempfile::TempDir::new().expect("tempdir");
            {
                let (_log, mut target) =
                    crate::open::<Config, _>(target_dir.path(), KvApp).expect("open");
                target
                    .apply([entry(1, "stale", Some("x")), entry(2, "zzz", Some("y"))])
                    .await
                    .expect("apply");
            }
            {
                // The install's steps by hand, stopping at `crash`.
                let db = db::open(target_dir.path(), KvApp::COLUMN_FAMILIES).expect("open");
                let snapshots =
                    SnapshotDir::<Config>::open(&target_dir.path().join("snapshots")).expect("dir");
                let file = (*snapshot.snapshot).into_std().await;
                let (meta, _) = snapshots.receive(file).expect("receive");
                assert_eq!(meta, snapshot.meta);
                db.put_cf(
                    db::cf(&db, CF_META),
                    KEY_INSTALLING,
                    db::encode("marker", &meta).expect("encode"),
                )
                .expect("marker");
                if !matches!(crash, CrashPoint::AfterMarker) {
                    snapshots.promote_installed(&meta).expect("promote");
                }
                if matches!(crash, CrashPoint::MidLoad) {
                    // Part of the old state cleared, part of the new written.
                    db.delete_cf(db::cf(&db, T), b"stale").expect("delete");
                    db.put_cf(db::cf(&db, T), b"k0002", b"v").expect("put");
                }
            }
            let (_log, target) =
                crate::open::<Config, _>(target_dir.path(), KvApp).expect("reopen");
            assert_eq!(
                contents(&target.state()),
                expected,
                "after a crash {crash:?}"
            );
            assert_eq!(
                target.state().read(|r| r.applied()).expect("applied"),
                snapshot.meta.last_log_id
            );
            let marker: Option<Meta<Config>> =
                db::get_meta(&target.db, KEY_INSTALLING, "marker").expect("read marker");
            assert!(
                marker.is_none(),
                "the marker outlived the install ({crash:?})"
            );
            assert_eq!(target.snapshots.current_meta(), Some(snapshot.meta.clone()));
        }
    }

    /// A snapshot the application cannot hold (a table it does not declare)
    /// is refused before anything changes, and the store still opens.
    #[tokio::test]
    async fn snapshot_with_unknown_table_is_refused_and_changes_nothing() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let (_log, mut sm) = crate::open::<Config, _>(dir.path(), KvApp).expect("open");
        sm.apply([entry(1, "keep", Some("me"))])
            .await
            .expect("apply");
        let before = contents(&sm.state());

        let meta = SnapshotMeta::<u64, openraft::BasicNode> {
            last_log_id: Some(LogId::new(CommittedLeaderId::new(1, 0), 5)),
            last_membership: StoredMembership::default(),
            snapshot_id: "foreign".into(),
        };
        let mut file = tempfile::tempfile().expect("tempfile");
        let mut writer =
            snapshot::SnapshotWriter::new(&mut file, &meta, &[T, "extra"]).expect("header");
        writer.record(1, b"k", b"v").expect("record");
        writer.finish().expect("finish");
        let err = sm
            .install_snapshot(&meta, Box::new(tokio::fs::File::from_std(file)))
            .await
            .expect_err("an unknown table must be refused");
        assert!(err.to_string().contains("extra"), "{err}");
        assert_eq!(contents(&sm.state()), before);
        drop((_log, sm));

        let (_log, sm) =
            crate::open::<Config, _>(dir.path(), KvApp).expect("reopen after a refused install");
        assert_eq!(contents(&sm.state()), before);
        assert_eq!(sm.snapshots.current_meta(), None);
    }
}
