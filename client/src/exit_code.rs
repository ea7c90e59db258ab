//! Process exit codes of the client commands.

/// Every job succeeded (or the command did what it was asked).
pub const OK: i32 = 0;
/// A job failed or was skipped, or the build did not finish ok.
pub const BUILD_FAILED: i32 = 1;
/// Bad input: flags, graph, source files, or a request the cluster
/// refused as invalid.
pub const BAD_INPUT: i32 = 2;
/// The cluster could not be reached within `--timeout`.
pub const UNREACHABLE: i32 = 3;
/// Another command holds the local server's lock and
/// `--block-for-lock=false` was given.
pub const LOCKED: i32 = 4;
/// The cluster refused who we are: no certificate or one it does not
/// accept (UNAUTHENTICATED, or a TLS handshake it refused), or a role
/// that may not do this (PERMISSION_DENIED).
pub const DENIED: i32 = 5;
/// Interrupted (Ctrl-C) after the build was submitted: it was
/// cancelled on the cluster.
pub const INTERRUPTED: i32 = 130;
