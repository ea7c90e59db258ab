//! The coordinator's replicated state: builds, their jobs and events, the
//! executions in flight (one per cache key) with their leases, the result
//! cache, workers and what their caches hold, and the source blobs stored.
//!
//! [`Model`] is the whole state in memory; [`Model::apply`] is the
//! deterministic transition function openraft drives (time and IDs arrive in
//! the command or come from the log id, iteration is over ordered maps only).
//! Every change marks the records it touched; [`Model::flush`] writes exactly
//! those to the column families, so each log entry is one atomic batch, and
//! [`Model::load`] rebuilds the model from the column families after a
//! restart or a snapshot install. Build events are write-only here: they go
//! to the `events` table and are read from there by watchers.

mod apply;
mod builds;
mod cmd;
mod durations;
mod gc;
mod index;
pub mod invariants;
pub mod log;
mod outputs;
mod queries;
mod rebuild;
pub mod records;
pub mod requests;
mod retry;
mod schedule;
mod staging;
mod state;
mod storage;
pub mod tables;
mod tally;

pub use builds::{MAX_RETAINED_BUILDS, MAX_RETAINED_EVENT_BYTES, MIN_RETAINED_MS};
pub use cmd::{BUILD_CANCELLED, MAX_ASSIGN_BATCH};
pub use durations::{DEFAULT_EXPECTED_MS, MAX_DURATIONS, duration_key};
pub use gc::{RECENT_BLOB_MS, RESULT_USE_RESOLUTION_MS};
pub use invariants::InvariantViolation;
pub use log::{
    CmdText, Collected, Command, DepRef, Event, GcLimits, InputRef, JobSpec, MAX_BATCH, Outcome,
    OutputRef, Proposal, RemoteAction, Response, SubmittedJob, command_index,
};
pub use queries::Gauges;
pub use records::{
    ActionResultRecord, Build, BuildHeader, BuildJob, CachedResult, DurationRecord, ExecState,
    Execution, JobOutput, JobState, Rank, Worker,
};
pub use requests::Requests;
pub use staging::{
    MAX_STAGED_BYTES, MAX_STAGED_SUBMITS, MAX_SUBMIT_PARTS, STAGED_ABANDONED_MS, StageRefusal,
};
pub use state::Model;
pub use tables::{ReadTables, StorageError, TABLES, Tables};
pub use tally::{RunEnd, Tally};

#[cfg(test)]
mod tests;
