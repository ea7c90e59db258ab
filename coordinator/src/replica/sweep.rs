//! On every replica: deletes the files of source blobs the state no longer
//! records (collected through the log, see `distbuild_model::gc`, or
//! never recorded because their upload failed half way).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::node::Node;

/// The longest a blob file waits for its record before it counts as
/// unrecorded (shorter when the retention is shorter).
const MAX_SWEEP_GRACE: Duration = Duration::from_secs(3600);

pub async fn sweep_blobs(node: Arc<Node>, shutdown: CancellationToken) {
    let period = Duration::from_millis(node.tuning.gc_interval_ms);
    let grace = Duration::from_millis(node.tuning.gc.blob_retention_ms).min(MAX_SWEEP_GRACE);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        let recorded: std::collections::BTreeSet<_> = {
            let model = node.model();
            model.blobs().into_iter().map(|(d, _)| d).collect()
        };
        match node
            .blobs()
            .sweep(move |d| recorded.contains(d), grace)
            .await
        {
            Ok((0, _)) => {}
            Ok((files, bytes)) => tracing::info!(files, bytes, "deleted unrecorded blobs"),
            Err(e) => tracing::warn!("sweep blobs: {e}"),
        }
    }
}
