//! openraft's storage conformance suite against raft-store.

mod support;

use distbuild_raft_store::{LogStore, StateMachineStore};
use openraft::StorageError;
use openraft::testing::{StoreBuilder, Suite};
use support::{TestApp, TestConfig};
use tempfile::TempDir;

struct Builder;

impl StoreBuilder<TestConfig, LogStore<TestConfig>, StateMachineStore<TestConfig, TestApp>, TempDir>
    for Builder
{
    async fn build(
        &self,
    ) -> Result<
        (
            TempDir,
            LogStore<TestConfig>,
            StateMachineStore<TestConfig, TestApp>,
        ),
        StorageError<u64>,
    > {
        let dir = TempDir::new().expect("create a temporary directory");
        let (log, sm) = support::open(dir.path()).expect("open the store");
        Ok((dir, log, sm))
    }
}

/// The suite makes its own tokio runtimes, so this is a plain test.
#[test]
fn openraft_storage_suite() -> Result<(), StorageError<u64>> {
    Suite::test_all(Builder)
}
