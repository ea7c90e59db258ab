//! The blocking-work seam: file and RocksDB work that must not stall the
//! async threads runs through [`run`]. In production that is tokio's
//! blocking pool. A deterministic simulation runs every host on one thread
//! and calls [`run_inline_on_this_thread`] first: the work then runs in
//! place, so when it finishes never depends on another thread's timing.

use std::cell::Cell;
use std::fs::File;
use std::io::{self, Read as _, Write as _};

use bytes::Bytes;

thread_local! {
    static INLINE: Cell<bool> = const { Cell::new(false) };
}

/// From now on, blocking work started on this thread runs in place (for a
/// single-threaded simulation; see the module documentation).
pub fn run_inline_on_this_thread() {
    INLINE.with(|inline| inline.set(true));
}

/// Whether blocking work on this thread runs in place.
pub fn is_inline() -> bool {
    INLINE.with(Cell::get)
}

/// Blocking work that panicked (a bug): what the panic said. Callers get
/// it as an error of their own kind, so a panicking file operation fails
/// the one request or job that ran it, and the process goes on serving.
#[derive(Debug, thiserror::Error)]
#[error("blocking work panicked: {0}")]
pub struct Panicked(pub String);

impl From<Panicked> for io::Error {
    fn from(panicked: Panicked) -> Self {
        io::Error::other(panicked)
    }
}

impl From<Panicked> for String {
    fn from(panicked: Panicked) -> Self {
        panicked.to_string()
    }
}

/// Runs `work` off the async threads (or in place, see
/// [`run_inline_on_this_thread`]). A panic in `work` on tokio's blocking
/// pool becomes a [`Panicked`] error; in place, it unwinds as any panic of
/// the calling task does (a simulation fails the run on it).
pub async fn run<F, T, E>(work: F) -> Result<T, E>
where
    F: FnOnce() -> Result<T, E> + Send + 'static,
    T: Send + 'static,
    E: From<Panicked> + Send + 'static,
{
    if is_inline() {
        return work();
    }
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(e) if e.is_panic() => {
            let payload = e.into_panic();
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".to_string());
            Err(Panicked(message).into())
        }
        // The runtime is shutting down and dropped the task: nothing will
        // wait for this answer.
        Err(_) => std::future::pending().await,
    }
}

/// A file read in chunks through [`run`].
pub struct ChunkReader {
    /// None only while a read is under way, or after one failed.
    file: Option<File>,
    chunk_bytes: usize,
}

impl ChunkReader {
    /// Reads `file` from its current position in chunks of `chunk_bytes`.
    pub fn new(file: File, chunk_bytes: usize) -> Self {
        Self {
            file: Some(file),
            chunk_bytes: chunk_bytes.max(1),
        }
    }

    /// The length of a full chunk.
    pub fn chunk_bytes(&self) -> usize {
        self.chunk_bytes
    }

    /// The next chunk: `chunk_bytes` long unless the file ends first;
    /// empty at the end.
    pub async fn next_chunk(&mut self) -> io::Result<Vec<u8>> {
        let mut file = self
            .file
            .take()
            .ok_or_else(|| io::Error::other("an earlier read failed"))?;
        let chunk_bytes = self.chunk_bytes;
        let (file, chunk) = run(move || {
            let mut buf = Vec::with_capacity(chunk_bytes);
            (&mut file).take(chunk_bytes as u64).read_to_end(&mut buf)?;
            Ok::<_, io::Error>((file, buf))
        })
        .await?;
        self.file = Some(file);
        Ok(chunk)
    }
}

/// A file written through [`run`].
pub struct FileWriter {
    /// None only while a write is under way, or after one failed.
    file: Option<File>,
}

impl FileWriter {
    /// Writes to `file` from its current position.
    pub fn new(file: File) -> Self {
        Self { file: Some(file) }
    }

    /// Appends `data`.
    pub async fn write_all(&mut self, data: Bytes) -> io::Result<()> {
        let mut file = self
            .file
            .take()
            .ok_or_else(|| io::Error::other("an earlier write failed"))?;
        let file = run(move || file.write_all(&data).map(|()| file)).await?;
        self.file = Some(file);
        Ok(())
    }

    /// The file, once writing is done.
    pub fn into_inner(self) -> io::Result<File> {
        self.file
            .ok_or_else(|| io::Error::other("an earlier write failed"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn thread_of_work() -> std::thread::ThreadId {
        run(|| Ok::<_, Panicked>(std::thread::current().id()))
            .await
            .expect("no panic")
    }

    #[tokio::test]
    async fn runs_on_the_pool_or_in_place() {
        let here = std::thread::current().id();
        assert_ne!(thread_of_work().await, here);
        run_inline_on_this_thread();
        assert_eq!(thread_of_work().await, here);
    }

    #[tokio::test]
    async fn a_panic_on_the_pool_is_an_error_of_the_callers_kind() {
        let result: io::Result<()> = run(|| panic!("disk on fire")).await;
        let error = result.expect_err("the work panicked");
        assert_eq!(error.to_string(), "blocking work panicked: disk on fire");
        // The pool still serves.
        thread_of_work().await;
    }

    #[tokio::test]
    async fn chunks_written_read_back_in_chunks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let mut writer = FileWriter::new(File::create(&path).expect("create"));
        writer
            .write_all(Bytes::from_static(b"hello "))
            .await
            .expect("write");
        writer
            .write_all(Bytes::from_static(b"world"))
            .await
            .expect("write");
        drop(writer.into_inner().expect("file"));
        let mut reader = ChunkReader::new(File::open(&path).expect("open"), 4);
        let mut chunks = Vec::new();
        loop {
            let chunk = reader.next_chunk().await.expect("read");
            if chunk.is_empty() {
                break;
            }
            chunks.push(String::from_utf8(chunk).expect("utf8"));
        }
        assert_eq!(chunks, ["hell", "o wo", "rld"]);
    }
}
