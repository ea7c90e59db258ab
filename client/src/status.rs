//! `distbuild cluster status`: the coordinators and workers as the cluster
//! sees them.

use std::io::Write;

use distbuild_proto::v1::{ClusterStatusRequest, ClusterStatusResponse};
use serde::Serialize;

use crate::args::ClusterStatusArgs;
use crate::cluster::{Cluster, RPC_TIMEOUT};
use crate::connect::{Connector, admin_api};
use crate::exit_code;
use crate::render::Console;

/// Runs `distbuild cluster status` over real TCP connections, printing to
/// stdout; returns the process exit code.
pub async fn cluster_status_cli(args: ClusterStatusArgs) -> i32 {
    run_cluster_status(args, Connector::tcp(), Console::stdio()).await
}

/// Runs `distbuild cluster status` through `connector`, writing to
/// `console`; returns the process exit code.
pub async fn run_cluster_status(
    args: ClusterStatusArgs,
    connector: Connector,
    mut console: Console,
) -> i32 {
    let addrs = match args.connection.addresses() {
        Ok(addrs) => addrs,
        Err(message) => return console.fail(exit_code::BAD_INPUT, message),
    };
    let cluster = Cluster::new(connector, addrs, args.connection.patience());
    let status = match cluster
        .call(
            "get the cluster status",
            Some(RPC_TIMEOUT),
            |channel| async move {
                Ok(admin_api(channel)
                    .cluster_status(ClusterStatusRequest {})
                    .await?
                    .into_inner())
            },
        )
        .await
    {
        Ok(status) => status,
        Err(e) => return console.fail(e.exit_code(), e),
    };
    let text = if args.json {
        format!("{}\n", status_json(&status))
    } else {
        status_table(&status)
    };
    if let Err(e) = console
        .out
        .write_all(text.as_bytes())
        .and_then(|()| console.out.flush())
    {
        return console.fail(exit_code::BUILD_FAILED, format!("write the status: {e}"));
    }
    exit_code::OK
}

#[derive(Serialize)]
struct JsonStatus<'a> {
    leader: u64,
    members: Vec<JsonMember<'a>>,
    workers: Vec<JsonWorker<'a>>,
}

#[derive(Serialize)]
struct JsonMember<'a> {
    node_id: u64,
    addr: &'a str,
}

#[derive(Serialize)]
struct JsonWorker<'a> {
    id: &'a str,
    addr: &'a str,
    slots: u32,
    running: u32,
    alive: bool,
    peer_bytes_fetched_total: u64,
}

/// The status as one JSON object (one line).
pub fn status_json(status: &ClusterStatusResponse) -> String {
    let json = JsonStatus {
        leader: status.leader,
        members: status
            .members
            .iter()
            .map(|m| JsonMember {
                node_id: m.node_id,
                addr: &m.addr,
            })
            .collect(),
        workers: status
            .workers
            .iter()
            .map(|w| JsonWorker {
                id: &w.id,
                addr: &w.addr,
                slots: w.slots,
                running: w.running,
                alive: w.alive,
                peer_bytes_fetched_total: w.peer_bytes_fetched_total,
            })
            .collect(),
    };
    serde_json::to_string(&json).expect("plain strings and numbers always serialize")
}

/// Rows as aligned columns, two spaces apart.
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .map(|r| r.get(c).map_or(0, |s| s.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[c]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The status as human-readable tables.
pub fn status_table(status: &ClusterStatusResponse) -> String {
    let leader = if status.leader == 0 {
        "none (election in progress)".to_string()
    } else {
        format!("node {}", status.leader)
    };
    let mut out = format!("leader: {leader}\n\ncoordinators:\n");
    let mut rows = vec![vec![
        "NODE".to_string(),
        "ADDRESS".to_string(),
        String::new(),
    ]];
    for m in &status.members {
        rows.push(vec![
            m.node_id.to_string(),
            m.addr.clone(),
            if m.node_id == status.leader {
                "leader".to_string()
            } else {
                String::new()
            },
        ]);
    }
    out.push_str(&table(&rows));
    out.push_str(&format!("\nworkers ({}):\n", status.workers.len()));
    let mut rows = vec![
        ["ID", "ADDRESS", "SLOTS", "RUNNING", "ALIVE"]
            .map(String::from)
            .to_vec(),
    ];
    for w in &status.workers {
        rows.push(vec![
            w.id.clone(),
            w.addr.clone(),
            w.slots.to_string(),
            w.running.to_string(),
            if w.alive { "yes" } else { "no" }.to_string(),
        ]);
    }
    out.push_str(&table(&rows));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use distbuild_proto::v1::{Member, WorkerStatus};

    fn sample() -> ClusterStatusResponse {
        ClusterStatusResponse {
            leader: 1,
            members: vec![
                Member {
                    node_id: 1,
                    addr: "10.0.0.1:7000".into(),
                },
                Member {
                    node_id: 2,
                    addr: "10.0.0.2:7000".into(),
                },
            ],
            workers: vec![WorkerStatus {
                id: "w-1".into(),
                addr: "10.0.0.9:7100".into(),
                slots: 4,
                running: 2,
                alive: true,
                peer_bytes_fetched_total: 5,
            }],
        }
    }

    #[test]
    fn json_is_as_specified() {
        assert_eq!(
            status_json(&sample()),
            r#"{"leader":1,"members":[{"node_id":1,"addr":"10.0.0.1:7000"},{"node_id":2,"addr":"10.0.0.2:7000"}],"workers":[{"id":"w-1","addr":"10.0.0.9:7100","slots":4,"running":2,"alive":true,"peer_bytes_fetched_total":5}]}"#
        );
    }

    #[test]
    fn table_is_aligned() {
        assert_eq!(
            status_table(&sample()),
            "leader: node 1\n\
             \n\
             coordinators:\n\
             NODE  ADDRESS\n\
             1     10.0.0.1:7000  leader\n\
             2     10.0.0.2:7000\n\
             \n\
             workers (1):\n\
             ID   ADDRESS        SLOTS  RUNNING  ALIVE\n\
             w-1  10.0.0.9:7100  4      2        yes\n"
        );
    }
}
