//! `distbuild cluster add-node` / `remove-node` against the in-process fake
//! coordinator: flags checked before anything is sent, the leader followed,
//! refusals shown as the cluster words them (exit 2), a change whose answer
//! was lost confirmed from the membership, an unreachable cluster (exit 3).

mod support;

use std::time::Duration;

use distbuild_client::{
    AddNodeArgs, ConnectionArgs, RemoveNodeArgs, connect::Connector, exit_code,
};
use distbuild_proto::v1::Member;
use support::{Failure, Fake, Server, dead_address};
use tonic::Code;

fn connection(coordinators: Vec<String>, timeout_secs: u64) -> ConnectionArgs {
    ConnectionArgs {
        coordinators,
        timeout_secs,
        security: Default::default(),
    }
}

fn add(node_id: &str, addr: &str, coordinators: Vec<String>) -> AddNodeArgs {
    AddNodeArgs {
        node_id: node_id.into(),
        addr: addr.into(),
        cluster_secret_file: None,
        connection: connection(coordinators, 5),
    }
}

fn remove(node_id: &str, force: bool, coordinators: Vec<String>) -> RemoveNodeArgs {
    RemoveNodeArgs {
        node_id: node_id.into(),
        force,
        cluster_secret_file: None,
        connection: connection(coordinators, 5),
    }
}

fn voter(node_id: u64) -> Member {
    Member {
        node_id,
        addr: format!("127.0.0.1:700{node_id}"),
        voter: true,
        ..Default::default()
    }
}

/// A fake leader whose voters are nodes 1, 2 and 3.
async fn three_voters() -> (Fake, Server) {
    let fake = Fake::default();
    fake.lock().members = vec![voter(1), voter(2), voter(3)];
    let server = Server::start(fake.clone()).await;
    (fake, server)
}

#[tokio::test]
async fn bad_flags_exit_2_with_one_line_before_anything_is_sent() {
    let (fake, server) = three_voters().await;
    let coordinators = vec![server.addr.clone()];
    let add_cases = [
        ("0", "127.0.0.1:7004", "error: bad --node-id \"0\""),
        ("-4", "127.0.0.1:7004", "error: bad --node-id \"-4\""),
        ("four", "127.0.0.1:7004", "error: bad --node-id \"four\""),
        ("4", "127.0.0.1", "error: bad --addr \"127.0.0.1\": no port"),
        (
            "4",
            "127.0.0.1:0",
            "error: bad --addr \"127.0.0.1:0\": the port",
        ),
        ("4", "http://h:7004", "error: bad --addr \"http://h:7004\""),
        ("4", "", "error: bad --addr \"\""),
    ];
    for (node_id, addr, expected) in add_cases {
        let (console, out, err) = support::console();
        let code = distbuild_client::run_add_node(
            add(node_id, addr, coordinators.clone()),
            Connector::tcp(),
            console,
        )
        .await;
        let err = err.text();
        assert_eq!(code, exit_code::BAD_INPUT, "{node_id} {addr}: {err}");
        assert!(err.starts_with(expected), "{node_id} {addr}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert_eq!(out.text(), "");
    }
    for node_id in ["0", "", "1.5"] {
        let (console, _out, err) = support::console();
        let code = distbuild_client::run_remove_node(
            remove(node_id, true, coordinators.clone()),
            Connector::tcp(),
            console,
        )
        .await;
        let err = err.text();
        assert_eq!(code, exit_code::BAD_INPUT, "{node_id}: {err}");
        assert!(err.starts_with("error: bad --node-id"), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    // No coordinator given.
    let (console, _out, err) = support::console();
    let code = distbuild_client::run_add_node(
        add("4", "127.0.0.1:7004", vec![]),
        Connector::tcp(),
        console,
    )
    .await;
    assert_eq!(code, exit_code::BAD_INPUT);
    assert!(err.text().starts_with("error: no coordinator given"));

    {
        let state = fake.lock();
        assert!(state.add_node_requests.is_empty() && state.remove_node_requests.is_empty());
    }
    server.stop().await;
}

#[tokio::test]
async fn add_node_follows_the_leader_and_prints_the_voters() {
    let (leader, leader_server) = three_voters().await;
    let follower = Fake::default();
    follower.lock().redirect_to = Some(leader_server.addr.clone());
    let follower_server = Server::start(follower.clone()).await;
    let coordinators = vec![follower_server.addr.clone()];

    let (console, out, err) = support::console();
    let code = distbuild_client::run_add_node(
        add("4", "127.0.0.1:7004", coordinators.clone()),
        Connector::tcp(),
        console,
    )
    .await;
    assert_eq!(code, exit_code::OK, "{}", err.text());
    assert_eq!(
        out.text(),
        "added node 4 (127.0.0.1:7004); voters: 1 (127.0.0.1:7001), 2 (127.0.0.1:7002), \
         3 (127.0.0.1:7003), 4 (127.0.0.1:7004)\n"
    );
    assert_eq!(err.text(), "");
    assert!(follower.lock().redirected >= 1);
    {
        let state = leader.lock();
        assert_eq!(state.add_node_requests.len(), 1);
        assert_eq!(state.add_node_requests[0].node_id, 4);
        assert_eq!(state.add_node_requests[0].addr, "127.0.0.1:7004");
    }

    // Again: the leader refuses (the first attempt, at the follower, was
    // turned away, so nothing is in doubt).
    let (console, out, err) = support::console();
    let code = distbuild_client::run_add_node(
        add("4", "127.0.0.1:7004", coordinators),
        Connector::tcp(),
        console,
    )
    .await;
    assert_eq!(code, exit_code::BAD_INPUT);
    assert_eq!(err.text(), "error: node 4 is already a member\n");
    assert_eq!(out.text(), "");

    follower_server.stop().await;
    leader_server.stop().await;
}

#[tokio::test]
async fn a_remove_refused_for_the_quorum_exits_2_with_the_message_and_the_force_hint() {
    let (fake, server) = three_voters().await;
    let message = "removing node 3 would leave 1 of 2 voters up: not a quorum";
    let in_progress = "another membership change is in progress; retry";
    let worded_by_the_server = "would leave too few voters for a quorum; pass --force";
    fake.lock().failures.insert(
        "remove_node",
        [message, in_progress, worded_by_the_server]
            .map(|message| Failure {
                code: Code::FailedPrecondition,
                message: message.into(),
                leader: None,
            })
            .into(),
    );
    let (console, out, err) = support::console();
    let code = distbuild_client::run_remove_node(
        remove("3", false, vec![server.addr.clone()]),
        Connector::tcp(),
        console,
    )
    .await;
    assert_eq!(code, exit_code::BAD_INPUT);
    assert_eq!(
        err.text(),
        format!("error: {message} (pass --force to remove it anyway)\n")
    );
    assert_eq!(out.text(), "");
    // Other preconditions get no hint, nor one the server already gave.
    for expected in [in_progress, worded_by_the_server] {
        let (console, _out, err) = support::console();
        let code = distbuild_client::run_remove_node(
            remove("3", false, vec![server.addr.clone()]),
            Connector::tcp(),
            console,
        )
        .await;
        assert_eq!(code, exit_code::BAD_INPUT);
        assert_eq!(err.text(), format!("error: {expected}\n"));
    }

    // With --force the cluster is asked to go ahead.
    let (console, out, err) = support::console();
    let code = distbuild_client::run_remove_node(
        remove("3", true, vec![server.addr.clone()]),
        Connector::tcp(),
        console,
    )
    .await;
    assert_eq!(code, exit_code::OK, "{}", err.text());
    assert_eq!(
        out.text(),
        "removed node 3; voters: 1 (127.0.0.1:7001), 2 (127.0.0.1:7002)\n"
    );
    let forced: Vec<bool> = fake
        .lock()
        .remove_node_requests
        .iter()
        .map(|r| r.force)
        .collect();
    assert_eq!(
        forced,
        [true],
        "the refused request was scripted, not recorded"
    );

    // A node that is not a member.
    let (console, _out, err) = support::console();
    let code = distbuild_client::run_remove_node(
        remove("9", false, vec![server.addr.clone()]),
        Connector::tcp(),
        console,
    )
    .await;
    assert_eq!(code, exit_code::BAD_INPUT);
    assert_eq!(err.text(), "error: node 9 is not a member\n");
    server.stop().await;
}

#[tokio::test]
async fn a_change_whose_answer_was_lost_is_confirmed_from_the_membership() {
    let (fake, server) = three_voters().await;
    {
        let mut state = fake.lock();
        state.lose_answers.insert("add_node", 1);
        state.lose_answers.insert("remove_node", 1);
    }
    let (console, out, err) = support::console();
    let code = distbuild_client::run_add_node(
        add("4", "127.0.0.1:7004", vec![server.addr.clone()]),
        Connector::tcp(),
        console,
    )
    .await;
    assert_eq!(code, exit_code::OK, "{}", err.text());
    assert!(
        out.text()
            .starts_with("added node 4 (127.0.0.1:7004); voters: 1 (127.0.0.1:7001), "),
        "{}",
        out.text()
    );
    assert_eq!(fake.lock().add_node_requests.len(), 2, "retried once");

    let (console, out, err) = support::console();
    let code = distbuild_client::run_remove_node(
        remove("2", false, vec![server.addr.clone()]),
        Connector::tcp(),
        console,
    )
    .await;
    assert_eq!(code, exit_code::OK, "{}", err.text());
    assert_eq!(
        out.text(),
        "removed node 2; voters: 1 (127.0.0.1:7001), 3 (127.0.0.1:7003), 4 (127.0.0.1:7004)\n"
    );
    assert_eq!(fake.lock().remove_node_requests.len(), 2, "retried once");
    server.stop().await;
}

#[tokio::test]
async fn a_change_the_leader_gave_up_on_exits_1_with_its_message_without_retrying() {
    let (fake, server) = three_voters().await;
    fake.lock().failures.insert(
        "add_node",
        [Failure {
            code: Code::DeadlineExceeded,
            message: "catching up the new node did not finish in 60s".into(),
            leader: None,
        }]
        .into(),
    );
    let (console, out, err) = support::console();
    let code = distbuild_client::run_add_node(
        add("4", "127.0.0.1:7004", vec![server.addr.clone()]),
        Connector::tcp(),
        console,
    )
    .await;
    assert_eq!(code, exit_code::BUILD_FAILED);
    assert_eq!(
        err.text(),
        "error: add node 4: catching up the new node did not finish in 60s\n"
    );
    assert_eq!(out.text(), "");
    assert!(
        fake.lock().members.iter().all(|m| m.node_id != 4),
        "not retried"
    );
    server.stop().await;
}

#[tokio::test]
async fn an_unreachable_cluster_exits_3_after_the_timeout() {
    let addrs = vec![dead_address().await, dead_address().await];
    let mut args = add("4", "127.0.0.1:7004", addrs);
    args.connection.timeout_secs = 1;
    let started = std::time::Instant::now();
    let (console, _out, err) = support::console();
    let code = distbuild_client::run_add_node(args, Connector::tcp(), console).await;
    let elapsed = started.elapsed();
    assert_eq!(code, exit_code::UNREACHABLE);
    assert!(
        elapsed >= Duration::from_secs(1) && elapsed < Duration::from_secs(5),
        "{elapsed:?}"
    );
    let err = err.text();
    assert!(
        err.starts_with("error: could not reach the cluster at "),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}
