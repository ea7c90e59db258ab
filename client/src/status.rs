//! `distbuild cluster status`: the coordinators and workers as the cluster
//! sees them.

use std::io::Write;

use distbuild_proto::v1::{ClusterStatusRequest, ClusterStatusResponse, Member};
use serde::Serialize;

use crate::args::ClusterStatusArgs;
use crate::cluster::{CallError, Cluster, RPC_TIMEOUT};
use crate::connect::{Connector, admin_api};
use crate::exit_code;
use crate::render::Console;
use distbuild_proto::tls::Role;

/// Runs `distbuild cluster status` over real TCP connections, printing to
/// stdout; returns the process exit code.
pub async fn cluster_status_cli(args: ClusterStatusArgs) -> i32 {
    let mut console = Console::stdio();
    match args.connection.connector(&Role::ALL) {
        Ok(connector) => run_cluster_status(args, connector, console).await,
        Err(e) => console.fail(exit_code::BAD_INPUT, e),
    }
}

/// The cluster's status, asked of whichever coordinator answers.
pub async fn fetch_status(cluster: &Cluster) -> Result<ClusterStatusResponse, CallError> {
    cluster
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
    let status = match fetch_status(&cluster).await {
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
    answered_by: u64,
}

#[derive(Serialize)]
struct JsonMember<'a> {
    node_id: u64,
    addr: &'a str,
    voter: bool,
    role: &'a str,
    term: u64,
    last_log_index: u64,
    applied_index: u64,
    lag: u64,
    /// `null` when the node answered.
    error: Option<&'a str>,
}

#[derive(Serialize)]
struct JsonWorker<'a> {
    id: &'a str,
    addr: &'a str,
    slots: u32,
    running: u32,
    alive: bool,
    peer_bytes_fetched_total: u64,
    properties: &'a [String],
    draining: bool,
}

/// The status as one JSON object (one line). Keys are never renamed or
/// removed; new ones are added.
pub fn status_json(status: &ClusterStatusResponse) -> String {
    let json = JsonStatus {
        leader: status.leader,
        members: status
            .members
            .iter()
            .map(|m| JsonMember {
                node_id: m.node_id,
                addr: &m.addr,
                voter: m.voter,
                role: &m.role,
                term: m.term,
                last_log_index: m.last_log_index,
                applied_index: m.applied_index,
                lag: m.lag,
                error: (!m.error.is_empty()).then_some(m.error.as_str()),
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
                properties: &w.properties,
                draining: w.draining,
            })
            .collect(),
        answered_by: status.answered_by,
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

/// The role shown for a member: what it reported, or (from a server that
/// reports no roles) "leader" for the leader.
fn member_role(status: &ClusterStatusResponse, member: &Member) -> String {
    if !member.role.is_empty() {
        member.role.clone()
    } else if member.node_id == status.leader {
        "leader".to_string()
    } else {
        "-".to_string()
    }
}

/// The status as human-readable tables: the coordinators with their Raft
/// progress (numbers shown as `-` for a node that did not answer, followed
/// by why), then the workers.
pub fn status_table(status: &ClusterStatusResponse) -> String {
    let leader = if status.leader == 0 {
        "none (election in progress)".to_string()
    } else {
        format!("node {}", status.leader)
    };
    let answered_by = if status.answered_by == 0 {
        String::new()
    } else {
        format!(" (as seen by node {})", status.answered_by)
    };
    let mut out = format!("leader: {leader}{answered_by}\n\ncoordinators:\n");
    let mut header = [
        "NODE", "ADDRESS", "KIND", "ROLE", "TERM", "LAST LOG", "APPLIED", "LAG",
    ]
    .map(String::from)
    .to_vec();
    let any_error = status.members.iter().any(|m| !m.error.is_empty());
    if any_error {
        header.push("ERROR".to_string());
    }
    let mut rows = vec![header];
    for m in &status.members {
        let role = member_role(status, m);
        let unreachable = role == "unreachable";
        let number = |n: u64| {
            if unreachable {
                "-".to_string()
            } else {
                n.to_string()
            }
        };
        let mut row = vec![
            m.node_id.to_string(),
            m.addr.clone(),
            if m.voter { "voter" } else { "learner" }.to_string(),
            role,
            number(m.term),
            number(m.last_log_index),
            number(m.applied_index),
            number(m.lag),
        ];
        if any_error {
            row.push(crate::cluster::one_line(&m.error));
        }
        rows.push(row);
    }
    out.push_str(&table(&rows));
    out.push_str(&format!("\nworkers ({}):\n", status.workers.len()));
    let mut rows = vec![
        ["ID", "ADDRESS", "SLOTS", "RUNNING", "ALIVE", "PROPERTIES"]
            .map(String::from)
            .to_vec(),
    ];
    for w in &status.workers {
        rows.push(vec![
            w.id.clone(),
            w.addr.clone(),
            w.slots.to_string(),
            w.running.to_string(),
            match (w.alive, w.draining) {
                (true, false) => "yes",
                (true, true) => "yes (draining)",
                (false, _) => "no",
            }
            .to_string(),
            w.properties.join(","),
        ]);
    }
    out.push_str(&table(&rows));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use distbuild_proto::v1::{Member, WorkerStatus};

    fn member(node_id: u64, role: &str, voter: bool, numbers: [u64; 4]) -> Member {
        let [term, last_log_index, applied_index, lag] = numbers;
        Member {
            node_id,
            addr: format!("10.0.0.{node_id}:7000"),
            voter,
            role: role.into(),
            term,
            last_log_index,
            applied_index,
            lag,
            error: String::new(),
        }
    }

    fn sample() -> ClusterStatusResponse {
        ClusterStatusResponse {
            leader: 1,
            members: vec![
                member(1, "leader", true, [3, 1204, 1204, 0]),
                member(2, "follower", true, [3, 1190, 1188, 14]),
            ],
            workers: vec![WorkerStatus {
                id: "w-1".into(),
                addr: "10.0.0.9:7100".into(),
                slots: 4,
                running: 2,
                alive: true,
                peer_bytes_fetched_total: 5,
                properties: vec!["OSFamily=Linux".into(), "pool=large".into()],
                draining: false,
            }],
            answered_by: 2,
        }
    }

    /// A three-voter cluster with one node down and a learner catching up.
    fn degraded() -> ClusterStatusResponse {
        let mut status = sample();
        let mut down = member(3, "unreachable", true, [0, 0, 0, 0]);
        down.error = "connect to 10.0.0.3:7000:\nconnection refused".into();
        status.members.push(down);
        status
            .members
            .push(member(14, "learner", false, [3, 640, 640, 564]));
        status.workers.clear();
        status
    }

    #[test]
    fn json_keeps_the_old_keys_and_adds_the_raft_progress() {
        assert_eq!(
            status_json(&sample()),
            concat!(
                r#"{"leader":1,"members":["#,
                r#"{"node_id":1,"addr":"10.0.0.1:7000","voter":true,"role":"leader","term":3,"last_log_index":1204,"applied_index":1204,"lag":0,"error":null},"#,
                r#"{"node_id":2,"addr":"10.0.0.2:7000","voter":true,"role":"follower","term":3,"last_log_index":1190,"applied_index":1188,"lag":14,"error":null}],"#,
                r#""workers":[{"id":"w-1","addr":"10.0.0.9:7100","slots":4,"running":2,"alive":true,"peer_bytes_fetched_total":5,"properties":["OSFamily=Linux","pool=large"],"draining":false}],"#,
                r#""answered_by":2}"#
            )
        );
        let json: serde_json::Value =
            serde_json::from_str(&status_json(&degraded())).expect("valid JSON");
        assert_eq!(json["members"][2]["role"], "unreachable");
        assert_eq!(
            json["members"][2]["error"],
            "connect to 10.0.0.3:7000:\nconnection refused"
        );
        assert_eq!(json["members"][3]["voter"], false);
        assert_eq!(json["members"][3]["lag"], 564);
    }

    #[test]
    fn table_is_aligned() {
        assert_eq!(
            status_table(&sample()),
            "leader: node 1 (as seen by node 2)\n\
             \n\
             coordinators:\n\
             NODE  ADDRESS        KIND   ROLE      TERM  LAST LOG  APPLIED  LAG\n\
             1     10.0.0.1:7000  voter  leader    3     1204      1204     0\n\
             2     10.0.0.2:7000  voter  follower  3     1190      1188     14\n\
             \n\
             workers (1):\n\
             ID   ADDRESS        SLOTS  RUNNING  ALIVE  PROPERTIES\n\
             w-1  10.0.0.9:7100  4      2        yes    OSFamily=Linux,pool=large\n"
        );
    }

    #[test]
    fn table_shows_unreachable_nodes_with_their_error_and_learners() {
        assert_eq!(
            status_table(&degraded()),
            "leader: node 1 (as seen by node 2)\n\
             \n\
             coordinators:\n\
             NODE  ADDRESS         KIND     ROLE         TERM  LAST LOG  APPLIED  LAG  ERROR\n\
             1     10.0.0.1:7000   voter    leader       3     1204      1204     0\n\
             2     10.0.0.2:7000   voter    follower     3     1190      1188     14\n\
             3     10.0.0.3:7000   voter    unreachable  -     -         -        -    connect to 10.0.0.3:7000: connection refused\n\
             14    10.0.0.14:7000  learner  learner      3     640       640      564\n\
             \n\
             workers (0):\n\
             ID  ADDRESS  SLOTS  RUNNING  ALIVE  PROPERTIES\n"
        );
    }

    #[test]
    fn a_server_reporting_no_roles_still_marks_the_leader() {
        let mut status = sample();
        for m in &mut status.members {
            m.role.clear();
        }
        let table = status_table(&status);
        assert!(
            table.contains("\n1     10.0.0.1:7000  voter  leader  3 "),
            "{table}"
        );
        assert!(
            table.contains("\n2     10.0.0.2:7000  voter  -       3 "),
            "{table}"
        );

        status.leader = 0;
        status.answered_by = 0;
        let table = status_table(&status);
        assert!(
            table.starts_with("leader: none (election in progress)\n"),
            "{table}"
        );
    }
}
