//! On every replica: deletes the files of source blobs the state no longer
//! records (collected through the log, see `distbuild_model::gc`, or
//! never recorded because their upload failed half way).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::node::Node;

pub async fn sweep_blobs(node: Arc<Node>, shutdown: CancellationToken) {
    let period = Duration::from_millis(node.tuning.gc_interval_ms);
    // A blob file is written (and copied to the other replicas, or to a
    // learner catching up) before its record is applied here: only a file
    // older than this may count as unrecorded.
    let grace = Duration::from_millis(node.tuning.blob_sweep_grace_ms);
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
