use std::path::PathBuf;

/// What can go wrong in raft-store outside openraft's own error types.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

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

    #[error("snapshot file {path}: {problem}")]
    BadSnapshot { path: PathBuf, problem: String },

    #[error(
        "store format {found}; this distbuild reads only format {}: remove {dir} to start the store afresh",
        crate::db::FORMAT
    )]
    Format { dir: PathBuf, found: u32 },

    #[error("invalid configuration: {0}")]
    Config(String),

    #[error("unknown column family {0:?}: not in Application::COLUMN_FAMILIES")]
    UnknownColumnFamily(String),

    #[error("store is corrupt: {0}")]
    Corrupt(String),

    #[error("a background task failed: {0}")]
    Task(String),
}

impl StoreError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StoreError::Io {
            context: context.into(),
            source,
        }
    }
}
