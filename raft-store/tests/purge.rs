//! openraft purges up to a snapshot it is still installing. If the install
//! then dies, the entries past the state machine must still be on disk, so a
//! restart re-applies them instead of finding the log purged past the state.

mod support;

use openraft::RaftLogReader;
use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};

#[tokio::test]
async fn a_purge_past_the_state_machine_survives_a_restart() {
    let dir = tempfile::TempDir::new().expect("tempdir");
    {
        let (mut log, mut sm) = support::open(dir.path()).expect("open");
        log.blocking_append((1..=20).map(|i| support::record_entry(1, i)))
            .await
            .expect("append");
        let first = log.try_get_log_entries(1..=5).await.expect("read");
        sm.apply(first).await.expect("apply");
        // As openraft does right after handing an install to the state machine.
        log.purge(support::log_id(1, 15)).await.expect("purge");
        let state = log.get_log_state().await.expect("state");
        assert_eq!(state.last_purged_log_id, Some(support::log_id(1, 15)));
        let visible = log.try_get_log_entries(0..21).await.expect("read");
        assert_eq!(
            visible.first().map(|e| e.log_id.index),
            Some(16),
            "purged entries are hidden"
        );
        // The install never completes: the process dies here.
    }
    let (mut log, mut sm) = support::open(dir.path()).expect("reopen must not find a purged gap");
    let state = log.get_log_state().await.expect("state");
    assert_eq!(
        state.last_purged_log_id,
        Some(support::log_id(1, 5)),
        "deleted only what was applied"
    );
    let rest = log
        .try_get_log_entries(6..=20)
        .await
        .expect("read the rest");
    assert_eq!(rest.len(), 15);
    sm.apply(rest).await.expect("re-apply");
    sm.state()
        .read(|r| support::check_record_state(r, 20))
        .expect("state of index 20");
}
