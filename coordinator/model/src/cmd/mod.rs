//! One module per command: what applying it changes.

mod action;
mod assign;
mod blob;
mod cancel;
mod drain;
mod heartbeat;
mod leases;
mod register;
mod report;
mod submit;

pub use assign::MAX_ASSIGN_BATCH;
pub use cancel::BUILD_CANCELLED;
pub(crate) use report::Reported;
