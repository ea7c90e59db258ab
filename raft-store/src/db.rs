//! Opening the RocksDB instance, the store's own column families and keys,
//! and the value encoding.

use std::path::Path;

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DB, DBRecoveryMode, Options,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::StoreError;

/// Log entries, keyed by [`log_key`].
pub(crate) const CF_LOG: &str = "raft.log";
/// Single keys below: the store's own metadata.
pub(crate) const CF_META: &str = "raft.meta";

/// Prefix reserved for the store's own column families.
const RESERVED_PREFIX: &str = "raft.";

pub(crate) const KEY_VOTE: &[u8] = b"vote";
pub(crate) const KEY_COMMITTED: &[u8] = b"committed";
pub(crate) const KEY_LAST_PURGED: &[u8] = b"last_purged";
pub(crate) const KEY_APPLIED: &[u8] = b"sm.applied";
pub(crate) const KEY_MEMBERSHIP: &[u8] = b"sm.membership";
/// Present while a snapshot install is under way; holds the snapshot's meta.
pub(crate) const KEY_INSTALLING: &[u8] = b"sm.installing";
/// The store's format (a postcard `u32`), written when the store is created.
const KEY_FORMAT: &[u8] = b"format";

/// The format this build writes and reads. Format 1 (no `format` key)
/// held openraft's default leader IDs (term and node ID in every log ID);
/// format 2 holds standard Raft's (`single-term-leader`: a log ID names
/// only the term), which format 1's bytes would decode into silently wrong
/// values, so a store of another format is refused, not read. Format 3:
/// the coordinator's log and tables carry job time limits (a submit's
/// `job_timeout_ms`, each build's and execution's limit), which format 2's
/// bytes lack. Format 4: a job's captured output is stored once per run
/// (an `outputs` table), and events and results name it instead of
/// carrying a copy each. Format 5: a stored blob is named by its hash
/// function and hash (`BlobKey`: SHA-1 or SHA-256, for the Remote
/// Execution API's CAS), not by a SHA-1 digest alone. Format 6: a job's
/// spec may carry a Remote Execution API action, a run's output its
/// `ActionResult`. Format 7: executions carry their scheduling rank and
/// lease start, jobs their critical path, and a `durations` table keeps
/// expected durations. Format 8: a worker record says whether it drains.
/// Format 9: cache keys are made of dependencies' outputs, not their keys
/// (early cutoff): a dependency reference carries the artifact, a build's
/// job the artifact it succeeded with, and a submitted job its job key.
/// Format 10: a remembered answer is keyed by its request ID's SHA-1.
/// Format 11: a worker registers (and its record keeps) the leases it may
/// hold ahead of its slots, and a report says how long its job waited for
/// a slot on the worker.
pub(crate) const FORMAT: u32 = 11;

/// Memory all memtables may hold together before RocksDB flushes one:
/// resident beside the model whatever the load, where flushing more often
/// costs a background write of a smaller table file.
pub const MEMTABLE_BUDGET_BYTES: usize = 16 << 20;
/// One column family's memtable size at which it is flushed.
const MEMTABLE_BYTES_PER_FAMILY: usize = 8 << 20;
/// Blocks read from the tables kept in memory, for every column family
/// together, their index blocks included. Left to itself RocksDB gives
/// each family a cache of 32 MiB and keeps every table file's index
/// beside it, so a coordinator's reads (watchers reading events back)
/// grew it by tens of megabytes over a 100,000-job build.
pub const BLOCK_CACHE_BYTES: usize = 8 << 20;

/// Opens the database in `dir` with the store's column families and the
/// application's. Column families found on disk but no longer declared are
/// opened too (RocksDB requires it) and left alone.
pub(crate) fn open(dir: &Path, app_column_families: &[&str]) -> Result<DB, StoreError> {
    for name in app_column_families {
        if name.starts_with(RESERVED_PREFIX) || name.is_empty() || *name == "default" {
            return Err(StoreError::Config(format!(
                "application column family {name:?} is reserved (empty, \"default\" or starting with {RESERVED_PREFIX:?})"
            )));
        }
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| StoreError::io(format!("create {}", dir.display()), e))?;

    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    // Recover the longest consistent prefix of the WAL after a crash: the
    // log, vote and state machine share it, so they recover together.
    opts.set_wal_recovery_mode(DBRecoveryMode::PointInTime);
    opts.set_keep_log_file_num(4);
    opts.set_max_log_file_size(8 << 20);
    // Unflushed writes of all column families together: RocksDB's default
    // is 64 MiB per family (two while one flushes), which over the
    // coordinator's fifteen families lets a busy store hold gigabytes in
    // memory; past this budget the biggest memtable is flushed.
    opts.set_db_write_buffer_size(MEMTABLE_BUDGET_BYTES);
    let cache = Cache::new_lru_cache(BLOCK_CACHE_BYTES);
    let mut tables = BlockBasedOptions::default();
    tables.set_block_cache(&cache);
    tables.set_cache_index_and_filter_blocks(true);
    opts.set_block_based_table_factory(&tables);

    let mut names: Vec<String> = vec![CF_LOG.into(), CF_META.into()];
    names.extend(app_column_families.iter().map(|s| s.to_string()));
    if let Ok(existing) = DB::list_cf(&opts, dir) {
        for name in existing {
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    let descriptors = names.into_iter().map(|name| {
        let mut family = Options::default();
        family.set_write_buffer_size(MEMTABLE_BYTES_PER_FAMILY);
        family.set_block_based_table_factory(&tables);
        ColumnFamilyDescriptor::new(name, family)
    });
    let db = DB::open_cf_descriptors(&opts, dir, descriptors)?;
    check_format(&db, dir)?;
    Ok(db)
}

/// Marks a new store with [`FORMAT`]; refuses one of another format.
fn check_format(db: &DB, dir: &Path) -> Result<(), StoreError> {
    let is_empty = || {
        [CF_LOG, CF_META].iter().all(|name| {
            db.iterator_cf(cf(db, name), rocksdb::IteratorMode::Start)
                .next()
                .is_none()
        })
    };
    let found = match get_meta::<u32>(db, KEY_FORMAT, "store format")? {
        Some(found) => found,
        // Written before the marker existed.
        None if !is_empty() => 1,
        None => {
            let mut sync = rocksdb::WriteOptions::default();
            sync.set_sync(true);
            let format = encode("store format", &FORMAT)?;
            db.put_cf_opt(cf(db, CF_META), KEY_FORMAT, format, &sync)?;
            FORMAT
        }
    };
    if found != FORMAT {
        return Err(StoreError::Format {
            dir: dir.to_path_buf(),
            found,
        });
    }
    Ok(())
}

/// The handle of a column family that [`open`] created.
pub(crate) fn cf<'a>(db: &'a DB, name: &str) -> &'a ColumnFamily {
    db.cf_handle(name)
        .expect("every store column family is created by db::open")
}

/// Log keys sort by index: big-endian u64.
pub(crate) fn log_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

/// Greater than every log key (9 bytes sort after any 8-byte key with the
/// same prefix, and 0xff.. after any other): the end of "to the last entry".
pub(crate) const LOG_KEY_END: [u8; 9] = [0xff; 9];

pub(crate) fn index_of_log_key(key: &[u8]) -> Result<u64, StoreError> {
    let bytes: [u8; 8] = key
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("log key of {} bytes", key.len())))?;
    Ok(u64::from_be_bytes(bytes))
}

pub(crate) fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_stdvec(value).map_err(|source| StoreError::Encode { what, source })
}

pub(crate) fn decode<T: DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|source| StoreError::Decode { what, source })
}

/// Reads and decodes one key of `raft.meta`.
pub(crate) fn get_meta<T: DeserializeOwned>(
    db: &DB,
    key: &'static [u8],
    what: &'static str,
) -> Result<Option<T>, StoreError> {
    match db.get_pinned_cf(cf(db, CF_META), key)? {
        Some(bytes) => Ok(Some(decode(what, &bytes)?)),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reopen(dir: &Path) -> Result<DB, StoreError> {
        open(dir, &["app"])
    }

    #[test]
    fn every_column_family_reads_through_the_bounded_block_cache() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let db = reopen(dir.path()).expect("a new store opens");
        for name in [CF_LOG, CF_META, "app"] {
            let capacity = db
                .property_int_value_cf(cf(&db, name), "rocksdb.block-cache-capacity")
                .expect("read the property");
            assert_eq!(capacity, Some(BLOCK_CACHE_BYTES as u64), "{name}");
        }
    }

    #[test]
    fn a_new_store_is_marked_and_a_store_of_another_format_is_refused() {
        let dir = tempfile::TempDir::new().expect("tempdir");
        let db = reopen(dir.path()).expect("a new store opens");
        assert_eq!(
            get_meta::<u32>(&db, KEY_FORMAT, "format").expect("read"),
            Some(FORMAT)
        );
        // A store written before the marker existed: state, no marker.
        db.put_cf(cf(&db, CF_META), KEY_VOTE, b"old vote")
            .expect("put");
        db.delete_cf(cf(&db, CF_META), KEY_FORMAT).expect("delete");
        drop(db);
        let err = reopen(dir.path()).expect_err("format 1 is refused");
        assert!(matches!(err, StoreError::Format { found: 1, .. }), "{err}");
        assert!(
            err.to_string().contains(&format!(
                "store format 1; this distbuild reads only format {FORMAT}: remove"
            )),
            "{err}"
        );

        let db = DB::open_cf(&Options::default(), dir.path(), [CF_LOG, CF_META, "app"])
            .expect("raw open");
        db.put_cf(
            cf(&db, CF_META),
            KEY_FORMAT,
            encode("format", &(FORMAT + 1)).expect("encode"),
        )
        .expect("put");
        drop(db);
        let err = reopen(dir.path()).expect_err("a newer format is refused");
        assert!(
            matches!(err, StoreError::Format { found, .. } if found == FORMAT + 1),
            "{err}"
        );
        // Refusing changed nothing.
        let db = DB::open_cf(&Options::default(), dir.path(), [CF_LOG, CF_META, "app"])
            .expect("raw open");
        assert_eq!(
            get_meta::<u32>(&db, KEY_FORMAT, "format").expect("read"),
            Some(FORMAT + 1)
        );
        drop(db);

        let fresh = tempfile::TempDir::new().expect("tempdir");
        drop(reopen(fresh.path()).expect("new"));
        reopen(fresh.path()).expect("a store of this format opens again");
    }
}
