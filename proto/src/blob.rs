//! Blob and artifact content on the wire, framed once for every side.
//!
//! - Sending: [`upload_chunks`] frames a blob for an upload or a copy
//!   between coordinators (the first chunk names it: digest and size);
//!   [`content_chunks`] frames the answer to a fetch (data only). Both read
//!   the content through the blocking seam as it is sent, in chunks of the
//!   reader's size ([`MAX_BLOB_CHUNK_BYTES`] for the readers every side
//!   opens), so no blob is ever whole in memory.
//! - Receiving: [`receive_chunks`] writes a fetch answer's chunks to a file,
//!   each within an idle timeout, checked by a [`BlobCheck`] (counted,
//!   bounded by the expected size and hashed as it arrives; compared with
//!   the expected blob at the end).
//! - Fetching an artifact from the worker holding it: [`open_artifact`]
//!   connects, asks, and waits a bounded time for the stream to start.

use std::io;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tonic::{Status, Streaming};

use crate::blocking::{ChunkReader, FileWriter};
use crate::net::{ConnectError, Connector, peer_api};
use crate::v1::{BlobChunk, FetchRequest};
use crate::wire::digest_to_wire;
use crate::{BlobKey, Digest, Hasher};

#[cfg(doc)]
use crate::wire::MAX_BLOB_CHUNK_BYTES;

/// Why [`upload_chunks`] ended a blob early.
#[derive(Debug, thiserror::Error)]
pub enum UploadReadError {
    /// Reading the content failed.
    #[error("read: {0}")]
    Read(io::Error),
    /// The content ended before the size the blob was hashed at.
    #[error("changed while it was uploaded (shorter than when hashed)")]
    Short,
}

/// The chunks of blob `digest` (`size` bytes) read from `reader` as they
/// are sent: the first names the blob (digest and size), the others carry
/// data only, each at most the reader's chunk size; an empty blob is one
/// empty chunk. Content past `size` is not sent (the receiver's digest
/// check refuses a blob that grew). A read error, or content shorter than
/// `size`, ends the stream early (the receiver then refuses the short
/// blob) and is handed to `on_error`, so the sender can report the local
/// cause rather than the receiver's refusal.
pub fn upload_chunks(
    reader: ChunkReader,
    digest: impl Into<BlobKey>,
    size: u64,
    on_error: impl FnOnce(UploadReadError) + Send + 'static,
) -> impl Stream<Item = BlobChunk> + Send + 'static {
    struct Upload<F> {
        reader: ChunkReader,
        remaining: u64,
        first: bool,
        on_error: F,
    }
    let digest: BlobKey = digest.into();
    let start = Upload {
        reader,
        remaining: size,
        first: true,
        on_error,
    };
    futures::stream::unfold(Some(start), move |state| async move {
        let mut state = state?;
        let want = state.remaining.min(state.reader.chunk_bytes() as u64) as usize;
        let mut data = match state.reader.next_chunk().await {
            Ok(data) => data,
            Err(e) => {
                (state.on_error)(UploadReadError::Read(e));
                return None;
            }
        };
        if data.len() < want {
            (state.on_error)(UploadReadError::Short);
            return None;
        }
        data.truncate(want);
        let chunk = BlobChunk {
            digest: if state.first {
                bytes::Bytes::copy_from_slice(digest.hash_bytes())
            } else {
                Default::default()
            },
            size: if state.first { size } else { 0 },
            data: data.into(),
        };
        state.first = false;
        state.remaining -= want as u64;
        let next = (state.remaining > 0).then_some(state);
        Some((chunk, next))
    })
}

/// The content of `reader` as the chunks of a fetch answer (data only,
/// each at most the reader's chunk size), read as they are sent. Ends at
/// the end of the content; a read error is its last item.
pub fn content_chunks(
    reader: ChunkReader,
) -> impl Stream<Item = io::Result<BlobChunk>> + Send + 'static {
    futures::stream::unfold(Some(reader), |reader| async move {
        let mut reader = reader?;
        match reader.next_chunk().await {
            Ok(data) if data.is_empty() => None,
            Ok(data) => {
                let chunk = BlobChunk {
                    data: data.into(),
                    ..Default::default()
                };
                Some((Ok(chunk), Some(reader)))
            }
            Err(e) => Some((Err(e), None)),
        }
    })
}

/// Content arrived beyond the size expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("more than the expected {size} bytes")]
pub struct Oversize {
    /// The size expected.
    pub size: u64,
    /// The bytes received, the last chunk included.
    pub received: u64,
}

/// The content received is not the blob expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("got {received} bytes with digest {actual}, expected {size} bytes with digest {digest}")]
pub struct Mismatch {
    /// The digest expected.
    pub digest: BlobKey,
    /// The size expected.
    pub size: u64,
    /// The bytes received.
    pub received: u64,
    /// The digest of what was received (same function).
    pub actual: BlobKey,
}

/// Checks a blob's content as it arrives: counts and hashes it, refuses
/// more than the expected size at once, and at the end says whether it is
/// the blob expected. Every side that receives content it will keep checks
/// it with one.
#[derive(Debug, Clone)]
pub struct BlobCheck {
    digest: BlobKey,
    size: u64,
    received: u64,
    hasher: Hasher,
}

impl BlobCheck {
    /// A check for blob `digest` (hashed with its function) of `size`
    /// bytes.
    pub fn new(digest: impl Into<BlobKey>, size: u64) -> Self {
        let digest = digest.into();
        Self {
            digest,
            size,
            received: 0,
            hasher: digest.function().hasher(),
        }
    }

    /// Counts and hashes the next piece of content; refuses it when it
    /// takes the total past the expected size.
    pub fn add(&mut self, data: &[u8]) -> Result<(), Oversize> {
        self.received += data.len() as u64;
        if self.received > self.size {
            return Err(Oversize {
                size: self.size,
                received: self.received,
            });
        }
        self.hasher.update(data);
        Ok(())
    }

    /// The bytes counted so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Whether what arrived is the blob expected: its size and digest.
    pub fn finish(self) -> Result<(), Mismatch> {
        let actual = self.hasher.finish();
        if self.received != self.size || actual != self.digest {
            return Err(Mismatch {
                digest: self.digest,
                size: self.size,
                received: self.received,
                actual,
            });
        }
        Ok(())
    }
}

/// Why [`receive_chunks`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// No chunk came within the idle timeout.
    #[error("no data for {0:?}")]
    Idle(Duration),
    /// The stream failed (the sender's error, or a broken connection).
    #[error("{}", crate::leader::describe(.0))]
    Status(Status),
    /// More content came than expected.
    #[error(transparent)]
    Oversize(#[from] Oversize),
    /// Writing the content here failed.
    #[error("write: {0}")]
    Write(io::Error),
}

/// Writes the chunks of `stream` to `file` until the stream ends, each
/// chunk within `idle_timeout`, every byte counted and hashed by `check`
/// (which refuses content past the expected size). The caller then asks
/// `check` whether the blob is complete and right.
pub async fn receive_chunks(
    stream: &mut (impl Stream<Item = Result<BlobChunk, Status>> + Unpin),
    file: &mut FileWriter,
    check: &mut BlobCheck,
    idle_timeout: Duration,
) -> Result<(), ReceiveError> {
    loop {
        let chunk = match tokio::time::timeout(idle_timeout, stream.next()).await {
            Err(_) => return Err(ReceiveError::Idle(idle_timeout)),
            Ok(None) => return Ok(()),
            Ok(Some(Err(status))) => return Err(ReceiveError::Status(status)),
            Ok(Some(Ok(chunk))) => chunk,
        };
        check.add(&chunk.data)?;
        file.write_all(chunk.data)
            .await
            .map_err(ReceiveError::Write)?;
    }
}

/// Why an artifact's stream could not be opened at a holder.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// No connection to the holder.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The holder did not answer within the bound.
    #[error("no answer within {0:?}")]
    NoAnswer(Duration),
    /// The holder refused (not here, too busy, ...).
    #[error("{}", crate::leader::describe(.0))]
    Refused(Status),
}

/// Asks the worker at `holder` for artifact `digest` (`PeerApi.
/// FetchArtifact`, through `connector`), waiting at most `start_timeout`
/// for its answer to start; the chunks are then the caller's to receive
/// ([`receive_chunks`]).
pub async fn open_artifact(
    connector: &dyn Connector,
    holder: &str,
    digest: &Digest,
    start_timeout: Duration,
) -> Result<Streaming<BlobChunk>, OpenError> {
    let channel = connector.connect(holder).await?;
    let request = FetchRequest {
        digest: digest_to_wire(digest),
    };
    match tokio::time::timeout(start_timeout, peer_api(channel).fetch_artifact(request)).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(OpenError::Refused(status)),
        Err(_) => Err(OpenError::NoAnswer(start_timeout)),
    }
}

/// The chunks of blob `key` (`size` bytes) read from `path` as they are
/// sent, framed by [`upload_chunks`]; the file is opened afresh for each
/// stream, so a retried upload starts again from its beginning. On an
/// open or read error (or a file shorter than `size`) the stream ends
/// early and the problem is left in `read_error`.
pub fn file_chunks(
    path: std::path::PathBuf,
    key: impl Into<BlobKey>,
    size: u64,
    read_error: std::sync::Arc<std::sync::Mutex<Option<String>>>,
) -> impl Stream<Item = BlobChunk> + Send + 'static {
    let key: BlobKey = key.into();
    let fail = move |problem: String| {
        *read_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(problem);
    };
    let open = crate::blocking::run(move || std::fs::File::open(path));
    futures::stream::once(open).flat_map(move |opened| match opened {
        Ok(file) => {
            let fail = fail.clone();
            let reader = ChunkReader::new(file, crate::wire::MAX_BLOB_CHUNK_BYTES);
            upload_chunks(reader, key, size, move |e| fail(e.to_string())).left_stream()
        }
        Err(e) => {
            fail(format!("open: {e}"));
            futures::stream::empty().right_stream()
        }
    })
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use super::*;
    use crate::wire::MAX_BLOB_CHUNK_BYTES;

    fn reader_of(dir: &tempfile::TempDir, data: &[u8]) -> ChunkReader {
        let path = dir.path().join("blob");
        std::fs::write(&path, data).expect("write");
        ChunkReader::new(File::open(&path).expect("open"), MAX_BLOB_CHUNK_BYTES)
    }

    #[tokio::test]
    async fn uploads_are_framed_bounded_and_cut_at_their_size() {
        let big: Vec<u8> = (0..MAX_BLOB_CHUNK_BYTES * 2 + 5)
            .map(|i| (i % 7) as u8)
            .collect();
        let max = MAX_BLOB_CHUNK_BYTES;
        /// The content, the size the blob was hashed at, the chunk lengths
        /// sent and the problem noted.
        type Case<'a> = (&'a [u8], u64, Vec<usize>, Option<&'a str>);
        let cases: Vec<Case> = vec![
            (&big, big.len() as u64, vec![max, max, 5], None),
            (b"", 0, vec![0], None),
            (b"abcdef", 3, vec![3], None),
            (b"abc", 10, vec![], Some("changed while it was uploaded")),
        ];
        let dir = tempfile::tempdir().expect("tempdir");
        for (content, size, lengths, problem) in cases {
            let digest = Digest::of(&content[..size.min(content.len() as u64) as usize]);
            let (sender, mut noted) = tokio::sync::mpsc::unbounded_channel();
            let chunks: Vec<BlobChunk> =
                upload_chunks(reader_of(&dir, content), digest, size, move |e| {
                    let _ = sender.send(e.to_string());
                })
                .collect()
                .await;
            let what = format!("{} bytes as {size}", content.len());
            let got: Vec<usize> = chunks.iter().map(|c| c.data.len()).collect();
            assert_eq!(got, lengths, "{what}");
            let noted = noted.try_recv().ok();
            assert_eq!(noted.is_some(), problem.is_some(), "{what}: {noted:?}");
            if let (Some(noted), Some(problem)) = (noted, problem) {
                assert!(noted.contains(problem), "{what}: {noted}");
            }
            if let Some((first, rest)) = chunks.split_first() {
                assert_eq!(&first.digest[..], digest.as_bytes(), "{what}");
                assert_eq!(first.size, size, "{what}");
                assert!(rest.iter().all(|c| c.digest.is_empty() && c.size == 0));
                let joined: Vec<u8> = chunks.iter().flat_map(|c| c.data.to_vec()).collect();
                assert_eq!(joined, content[..joined.len()], "{what}");
            }
        }
    }

    #[tokio::test]
    async fn fetch_answers_are_data_only_and_end_with_the_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data: Vec<u8> = (0..MAX_BLOB_CHUNK_BYTES + 3).map(|i| i as u8).collect();
        let chunks: Vec<BlobChunk> = content_chunks(reader_of(&dir, &data))
            .map(|c| c.expect("read"))
            .collect()
            .await;
        let sizes: Vec<usize> = chunks.iter().map(|c| c.data.len()).collect();
        assert_eq!(sizes, vec![MAX_BLOB_CHUNK_BYTES, 3]);
        assert!(chunks.iter().all(|c| c.digest.is_empty() && c.size == 0));
        let empty: Vec<_> = content_chunks(reader_of(&dir, b"")).collect().await;
        assert!(empty.is_empty(), "an empty blob is no chunk at all");
    }

    #[test]
    fn a_check_bounds_counts_and_compares() {
        let content = b"hello blob";
        let digest = Digest::of(content);
        let mut check = BlobCheck::new(digest, 10);
        check.add(b"hello ").expect("within");
        check.add(b"blob").expect("within");
        assert_eq!(check.received(), 10);
        check.finish().expect("the blob");

        let mut over = BlobCheck::new(digest, 10);
        over.add(b"hello ").expect("within");
        assert_eq!(
            over.add(b"blob!"),
            Err(Oversize {
                size: 10,
                received: 11
            })
        );

        let mut wrong = BlobCheck::new(digest, 10);
        wrong.add(b"hello blop").expect("within");
        let mismatch = wrong.finish().expect_err("other content");
        assert_eq!(mismatch.received, 10);
        assert_eq!(mismatch.actual, BlobKey::from(Digest::of(b"hello blop")));

        let mut short = BlobCheck::new(digest, 10);
        short.add(b"hello").expect("within");
        let mismatch = short.finish().expect_err("short");
        assert_eq!(
            mismatch.to_string(),
            format!(
                "got 5 bytes with digest {}, expected 10 bytes with digest {digest}",
                Digest::of(b"hello")
            )
        );
    }

    #[tokio::test]
    async fn received_chunks_are_written_checked_and_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let content = b"the artifact's bytes";
        let digest = Digest::of(content);
        let size = content.len() as u64;
        let chunks = |parts: Vec<Result<&'static [u8], Status>>| {
            futures::stream::iter(parts.into_iter().map(|part| {
                part.map(|data| BlobChunk {
                    data: data.into(),
                    ..Default::default()
                })
            }))
        };
        let receive = async |parts, size| {
            let path = dir.path().join("received");
            let mut file = FileWriter::new(File::create(&path).expect("create"));
            let mut check = BlobCheck::new(digest, size);
            let mut stream = chunks(parts);
            let result =
                receive_chunks(&mut stream, &mut file, &mut check, Duration::from_secs(5)).await;
            drop(file.into_inner());
            (result, check, std::fs::read(&path).expect("read"))
        };

        let (result, check, written) =
            receive(vec![Ok(&b"the artifact"[..]), Ok(&b"'s bytes"[..])], size).await;
        result.expect("received");
        assert_eq!(written, content);
        check.finish().expect("the artifact");

        let (result, _, _) = receive(vec![Ok(&content[..])], size - 1).await;
        assert!(
            matches!(result, Err(ReceiveError::Oversize(_))),
            "{result:?}"
        );

        let (result, _, _) = receive(
            vec![Ok(&b"the"[..]), Err(Status::unavailable("shutting down"))],
            size,
        )
        .await;
        let error = result.expect_err("broken");
        assert_eq!(error.to_string(), "Unavailable: shutting down");

        let mut silent = futures::stream::pending::<Result<BlobChunk, Status>>();
        let path = dir.path().join("silent");
        let mut file = FileWriter::new(File::create(&path).expect("create"));
        let mut check = BlobCheck::new(digest, size);
        let error = receive_chunks(
            &mut silent,
            &mut file,
            &mut check,
            Duration::from_millis(20),
        )
        .await
        .expect_err("idle");
        assert_eq!(error.to_string(), "no data for 20ms");
    }
}
