//! Snapshot files: their format, streaming writer and reader, and the
//! directory that holds the current one.
//!
//! Layout (integers little-endian):
//! ```text
//! magic "DBSNAP01"
//! u32 meta length, meta (postcard SnapshotMeta)
//! u16 table count, per table: u16 name length, name
//! records: u8 1, u16 table, u32 key length, key, u32 value length, value
//! end:     u8 0, u64 record count, u32 crc32 of every byte before it
//! ```
//! Records of one table come in key order, tables in the order listed.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use openraft::SnapshotMeta;
use tempfile::NamedTempFile;

use crate::db;
use crate::{StoreError, StoreTypeConfig};

const MAGIC: &[u8; 8] = b"DBSNAP01";
const TAG_RECORD: u8 = 1;
const TAG_END: u8 = 0;
/// Largest key or value a record may carry; a longer length is corruption.
pub(crate) const MAX_RECORD_PART_BYTES: usize = 64 << 20;
/// Largest encoded snapshot meta (it holds the membership).
const MAX_META_BYTES: usize = 1 << 20;
const IO_BUFFER_BYTES: usize = 1 << 20;

pub(crate) type Meta<C> = SnapshotMeta<u64, <C as openraft::RaftTypeConfig>::Node>;

/// Writes a snapshot file, record by record.
pub(crate) struct SnapshotWriter<W: Write> {
    out: W,
    crc: crc32fast::Hasher,
    n_tables: usize,
    n_records: u64,
}

impl<W: Write> SnapshotWriter<W> {
    pub(crate) fn new<N: serde::Serialize>(
        out: W,
        meta: &N,
        tables: &[&str],
    ) -> Result<Self, StoreError> {
        let mut w = Self {
            out,
            crc: crc32fast::Hasher::new(),
            n_tables: tables.len(),
            n_records: 0,
        };
        let meta = db::encode("snapshot meta", meta)?;
        w.put(MAGIC)?;
        w.put(&(meta.len() as u32).to_le_bytes())?;
        w.put(&meta)?;
        let n_tables = u16::try_from(tables.len())
            .map_err(|_| StoreError::Config("more than 65535 column families".into()))?;
        w.put(&n_tables.to_le_bytes())?;
        for name in tables {
            w.put(&(name.len() as u16).to_le_bytes())?;
            w.put(name.as_bytes())?;
        }
        Ok(w)
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        self.crc.update(bytes);
        self.out
            .write_all(bytes)
            .map_err(|e| StoreError::io("write snapshot", e))
    }

    pub(crate) fn record(
        &mut self,
        table: usize,
        key: &[u8],
        value: &[u8],
    ) -> Result<(), StoreError> {
        assert!(table < self.n_tables, "record for an undeclared table");
        if key.len() > MAX_RECORD_PART_BYTES || value.len() > MAX_RECORD_PART_BYTES {
            return Err(StoreError::Config(format!(
                "a key or value of {} bytes exceeds the {MAX_RECORD_PART_BYTES}-byte limit",
                key.len().max(value.len())
            )));
        }
        self.put(&[TAG_RECORD])?;
        self.put(&(table as u16).to_le_bytes())?;
        self.put(&(key.len() as u32).to_le_bytes())?;
        self.put(key)?;
        self.put(&(value.len() as u32).to_le_bytes())?;
        self.put(value)?;
        self.n_records += 1;
        Ok(())
    }

    /// Writes the end marker and checksum; returns the output, flushed.
    pub(crate) fn finish(mut self) -> Result<W, StoreError> {
        self.put(&[TAG_END])?;
        let n_records = self.n_records.to_le_bytes();
        self.put(&n_records)?;
        let crc = self.crc.clone().finalize();
        self.out
            .write_all(&crc.to_le_bytes())
            .and_then(|_| self.out.flush())
            .map_err(|e| StoreError::io("write snapshot", e))?;
        Ok(self.out)
    }
}

/// Reads a snapshot file as a stream of records, checking its structure as
/// it goes and its checksum at the end.
pub(crate) struct SnapshotReader<R: Read> {
    input: R,
    crc: crc32fast::Hasher,
    path: PathBuf,
    meta: Vec<u8>,
    pub(crate) tables: Vec<String>,
    n_records: u64,
    finished: bool,
}

impl<R: Read> SnapshotReader<R> {
    pub(crate) fn new(input: R, path: &Path) -> Result<Self, StoreError> {
        let mut r = Self {
            input,
            crc: crc32fast::Hasher::new(),
            path: path.to_path_buf(),
            meta: Vec::new(),
            tables: Vec::new(),
            n_records: 0,
            finished: false,
        };
        let mut magic = [0u8; 8];
        r.take(&mut magic)?;
        if &magic != MAGIC {
            return Err(r.bad("not a distbuild snapshot (bad magic)"));
        }
        let meta_len = r.u32()? as usize;
        if meta_len > MAX_META_BYTES {
            return Err(r.bad(format!("meta of {meta_len} bytes")));
        }
        r.meta = r.bytes(meta_len)?;
        let n_tables = r.u16()?;
        for _ in 0..n_tables {
            let len = r.u16()? as usize;
            let name = r.bytes(len)?;
            let name = String::from_utf8(name).map_err(|_| r.bad("table name is not UTF-8"))?;
            r.tables.push(name);
        }
        Ok(r)
    }

    /// The snapshot's meta, decoded.
    pub(crate) fn meta<N: serde::de::DeserializeOwned>(&self) -> Result<N, StoreError> {
        db::decode("snapshot meta", &self.meta)
    }

    fn bad(&self, problem: impl Into<String>) -> StoreError {
        StoreError::BadSnapshot {
            path: self.path.clone(),
            problem: problem.into(),
        }
    }

    fn take(&mut self, buf: &mut [u8]) -> Result<(), StoreError> {
        self.input.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                self.bad("truncated")
            } else {
                StoreError::io(format!("read snapshot {}", self.path.display()), e)
            }
        })?;
        self.crc.update(buf);
        Ok(())
    }

    fn u16(&mut self) -> Result<u16, StoreError> {
        let mut b = [0u8; 2];
        self.take(&mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    fn u32(&mut self) -> Result<u32, StoreError> {
        let mut b = [0u8; 4];
        self.take(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn bytes(&mut self, len: usize) -> Result<Vec<u8>, StoreError> {
        let mut v = vec![0u8; len];
        self.take(&mut v)?;
        Ok(v)
    }

    fn part(&mut self) -> Result<Vec<u8>, StoreError> {
        let len = self.u32()? as usize;
        if len > MAX_RECORD_PART_BYTES {
            return Err(self.bad(format!("record part of {len} bytes")));
        }
        self.bytes(len)
    }

    /// The next record as (table index, key, value), or `None` after the end
    /// marker, once the record count and checksum have been verified.
    pub(crate) fn next_record(&mut self) -> Result<Option<(usize, Vec<u8>, Vec<u8>)>, StoreError> {
        if self.finished {
            return Ok(None);
        }
        let mut tag = [0u8; 1];
        self.take(&mut tag)?;
        match tag[0] {
            TAG_RECORD => {
                let table = self.u16()? as usize;
                if table >= self.tables.len() {
                    return Err(
                        self.bad(format!("record for table {table} of {}", self.tables.len()))
                    );
                }
                let key = self.part()?;
                let value = self.part()?;
                self.n_records += 1;
                Ok(Some((table, key, value)))
            }
            TAG_END => {
                let mut count = [0u8; 8];
                self.take(&mut count)?;
                let expected_crc = self.crc.clone().finalize();
                let mut crc = [0u8; 4];
                self.input
                    .read_exact(&mut crc)
                    .map_err(|_| self.bad("truncated checksum"))?;
                if u64::from_le_bytes(count) != self.n_records {
                    return Err(self.bad(format!(
                        "end marker counts {} records, file has {}",
                        u64::from_le_bytes(count),
                        self.n_records
                    )));
                }
                if u32::from_le_bytes(crc) != expected_crc {
                    return Err(self.bad("checksum mismatch"));
                }
                let mut rest = [0u8; 1];
                if self
                    .input
                    .read(&mut rest)
                    .map_err(|e| StoreError::io("read snapshot", e))?
                    != 0
                {
                    return Err(self.bad("bytes after the end marker"));
                }
                self.finished = true;
                Ok(None)
            }
            other => Err(self.bad(format!("unknown record tag {other}"))),
        }
    }

    /// Reads to the end, verifying everything.
    pub(crate) fn verify_to_end(&mut self) -> Result<(), StoreError> {
        while self.next_record()?.is_some() {}
        Ok(())
    }
}

/// A `Read` that copies everything it reads into `out`.
struct Tee<R, W> {
    input: R,
    out: W,
}

impl<R: Read, W: Write> Read for Tee<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.input.read(buf)?;
        self.out.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// The directory of snapshot files: `current.snap` is the current snapshot;
/// `install.tmp` is a received snapshot being installed; anything else is
/// debris of an interrupted build and removed on open.
pub(crate) struct SnapshotDir<C: StoreTypeConfig> {
    dir: PathBuf,
    /// Meta of `current.snap`; also the lock that orders replacing it.
    current: Mutex<Option<Meta<C>>>,
    _config: PhantomData<C>,
}

pub(crate) fn open_reader(path: &Path) -> Result<SnapshotReader<BufReader<File>>, StoreError> {
    let file =
        File::open(path).map_err(|e| StoreError::io(format!("open {}", path.display()), e))?;
    SnapshotReader::new(BufReader::with_capacity(IO_BUFFER_BYTES, file), path)
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(format!("fsync directory {}", dir.display()), e))
}

impl<C: StoreTypeConfig> SnapshotDir<C> {
    pub(crate) fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::io(format!("create {}", dir.display()), e))?;
        let entries = std::fs::read_dir(dir)
            .map_err(|e| StoreError::io(format!("list {}", dir.display()), e))?;
        for entry in entries {
            let entry = entry.map_err(|e| StoreError::io(format!("list {}", dir.display()), e))?;
            let name = entry.file_name();
            if name != "current.snap" && name != "install.tmp" {
                let path = entry.path();
                std::fs::remove_file(&path)
                    .map_err(|e| StoreError::io(format!("remove {}", path.display()), e))?;
            }
        }
        let current_path = dir.join("current.snap");
        let current = if current_path.exists() {
            Some(open_reader(&current_path)?.meta()?)
        } else {
            None
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            current: Mutex::new(current),
            _config: PhantomData,
        })
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn current_path(&self) -> PathBuf {
        self.dir.join("current.snap")
    }

    pub(crate) fn install_path(&self) -> PathBuf {
        self.dir.join("install.tmp")
    }

    #[cfg(test)]
    pub(crate) fn current_meta(&self) -> Option<Meta<C>> {
        self.current.lock().expect("snapshot lock poisoned").clone()
    }

    /// The current snapshot's meta and a file handle on it from its start.
    pub(crate) fn open_current(&self) -> Result<Option<(Meta<C>, File)>, StoreError> {
        let current = self.current.lock().expect("snapshot lock poisoned");
        match &*current {
            None => Ok(None),
            Some(meta) => {
                let path = self.current_path();
                let file = File::open(&path)
                    .map_err(|e| StoreError::io(format!("open {}", path.display()), e))?;
                Ok(Some((meta.clone(), file)))
            }
        }
    }

    /// Writes a new snapshot with `write_records` and makes it current unless
    /// a newer one became current meanwhile. Returns a handle on the file
    /// written (valid whether or not it became current).
    pub(crate) fn build(
        &self,
        meta: &Meta<C>,
        tables: &[&str],
        write_records: impl FnOnce(&mut SnapshotWriter<BufWriter<File>>) -> Result<(), StoreError>,
    ) -> Result<File, StoreError> {
        let tmp = NamedTempFile::new_in(&self.dir).map_err(|e| {
            StoreError::io(format!("create a snapshot in {}", self.dir.display()), e)
        })?;
        let file = tmp
            .reopen()
            .map_err(|e| StoreError::io("reopen snapshot file", e))?;
        let out = BufWriter::with_capacity(IO_BUFFER_BYTES, file);
        let mut writer = SnapshotWriter::new(out, meta, tables)?;
        write_records(&mut writer)?;
        let out = writer.finish()?;
        let file = out
            .into_inner()
            .map_err(|e| StoreError::io("flush snapshot", e.into_error()))?;
        file.sync_all()
            .map_err(|e| StoreError::io("fsync snapshot", e))?;

        let mut reader = tmp
            .reopen()
            .map_err(|e| StoreError::io("reopen snapshot file", e))?;
        reader
            .seek(SeekFrom::Start(0))
            .map_err(|e| StoreError::io("seek snapshot", e))?;
        let mut current = self.current.lock().expect("snapshot lock poisoned");
        let newer = current
            .as_ref()
            .is_none_or(|cur| cur.last_log_id <= meta.last_log_id);
        if newer {
            tmp.persist(self.current_path())
                .map_err(|e| StoreError::io("make the snapshot current", e.error))?;
            sync_dir(&self.dir)?;
            *current = Some(meta.clone());
        }
        Ok(reader)
    }

    /// Copies a received snapshot to `install.tmp`, verifying its structure
    /// and checksum on the way, and fsyncs it. Returns the meta it carries
    /// and its table names.
    pub(crate) fn receive(&self, mut input: File) -> Result<(Meta<C>, Vec<String>), StoreError> {
        input
            .seek(SeekFrom::Start(0))
            .map_err(|e| StoreError::io("seek received snapshot", e))?;
        let path = self.install_path();
        let out = File::create(&path)
            .map_err(|e| StoreError::io(format!("create {}", path.display()), e))?;
        let tee = Tee {
            input: BufReader::with_capacity(IO_BUFFER_BYTES, input),
            out: BufWriter::with_capacity(IO_BUFFER_BYTES, out),
        };
        let mut reader = SnapshotReader::new(tee, &path)?;
        reader.verify_to_end()?;
        let meta: Meta<C> = reader.meta()?;
        let tables = std::mem::take(&mut reader.tables);
        let out = reader
            .input
            .out
            .into_inner()
            .map_err(|e| StoreError::io("flush received snapshot", e.into_error()))?;
        out.sync_all()
            .map_err(|e| StoreError::io("fsync received snapshot", e))?;
        // The marker written next names this file: its directory entry must
        // be durable first.
        sync_dir(&self.dir)?;
        Ok((meta, tables))
    }

    /// Makes `install.tmp` the current snapshot, whatever was current.
    pub(crate) fn promote_installed(&self, meta: &Meta<C>) -> Result<(), StoreError> {
        let mut current = self.current.lock().expect("snapshot lock poisoned");
        std::fs::rename(self.install_path(), self.current_path())
            .map_err(|e| StoreError::io("make the installed snapshot current", e))?;
        sync_dir(&self.dir)?;
        *current = Some(meta.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Records = Vec<(usize, Vec<u8>, Vec<u8>)>;

    fn sample() -> (String, Vec<&'static str>, Records) {
        let records = vec![
            (0, b"a".to_vec(), b"1".to_vec()),
            (0, b"b".to_vec(), vec![7u8; 3000]),
            (1, Vec::new(), Vec::new()),
            (1, b"z".to_vec(), b"last".to_vec()),
        ];
        ("meta-1".to_string(), vec!["jobs", "blobs"], records)
    }

    fn write(meta: &String, tables: &[&str], records: &Records) -> Vec<u8> {
        let mut w = SnapshotWriter::new(Vec::new(), meta, tables).expect("header");
        for (t, k, v) in records {
            w.record(*t, k, v).expect("record");
        }
        w.finish().expect("finish")
    }

    fn read(bytes: &[u8]) -> Result<(String, Vec<String>, Records), StoreError> {
        let mut r = SnapshotReader::new(bytes, Path::new("test.snap"))?;
        let meta: String = r.meta()?;
        let mut records = Vec::new();
        while let Some(record) = r.next_record()? {
            records.push(record);
        }
        Ok((meta, r.tables.clone(), records))
    }

    #[test]
    fn round_trip() {
        let (meta, tables, records) = sample();
        let bytes = write(&meta, &tables, &records);
        let (meta2, tables2, records2) = read(&bytes).expect("read back");
        assert_eq!(meta2, meta);
        assert_eq!(tables2, tables);
        assert_eq!(records2, records);
    }

    #[test]
    fn every_truncation_is_detected() {
        let (meta, tables, records) = sample();
        let bytes = write(&meta, &tables, &records);
        for len in 0..bytes.len() {
            assert!(
                read(&bytes[..len]).is_err(),
                "truncation to {len} bytes went unnoticed"
            );
        }
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let (meta, tables, records) = sample();
        let bytes = write(&meta, &tables, &records);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(read(&bad).is_err(), "flipped byte {i} went unnoticed");
        }
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let (meta, tables, records) = sample();
        let mut bytes = write(&meta, &tables, &records);
        bytes.push(0);
        assert!(read(&bytes).is_err());
    }

    #[test]
    fn oversized_lengths_are_refused_without_allocating() {
        let (meta, tables, _) = sample();
        let mut bytes = write(&meta, &tables, &Vec::new());
        // Replace the end marker with a record header claiming a 4 GiB key.
        let end = bytes.len() - (1 + 8 + 4);
        bytes.truncate(end);
        bytes.push(TAG_RECORD);
        bytes.extend_from_slice(&0u16.to_le_bytes());
        bytes.extend_from_slice(&u32::MAX.to_le_bytes());
        let err = read(&bytes).expect_err("a 4 GiB key must be refused");
        assert!(err.to_string().contains("record part of"), "{err}");
    }
}
