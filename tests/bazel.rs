//! A real Remote Execution API client: Bazel (Debian's `bazel-bootstrap`,
//! 4.2.3, which speaks API 2.0 with SHA-256) against a real coordinator.
//! With `--remote_cache` alone Bazel runs actions itself and shares their
//! results through distbuild's CAS and action cache, here through a
//! follower of three coordinators: after `bazel clean --expunge` every
//! action is a remote cache hit, and the outputs are the same.

mod support;

use std::path::Path;
use std::process::{Command, Output};

use support::*;

/// Bazel with its own output root (nothing shared with the machine's),
/// in `workspace`.
fn bazel(root: &Path, workspace: &Path, args: &[&str]) -> Output {
    Command::new("bazel")
        .arg(format!("--output_user_root={}", root.display()))
        .args(args)
        .current_dir(workspace)
        .output()
        .expect("run bazel (scripts/setup.sh installs bazel-bootstrap)")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The line of Bazel's summary counting processes by where they ran.
fn processes_line(output: &Output) -> String {
    text(output)
        .lines()
        .find(|l| l.contains(" processes: "))
        .unwrap_or_default()
        .to_string()
}

/// Stops the workspace's Bazel server when the test ends, however it ends.
struct BazelServer<'a> {
    root: &'a Path,
    workspace: &'a Path,
}

impl Drop for BazelServer<'_> {
    fn drop(&mut self) {
        let _ = bazel(self.root, self.workspace, &["shutdown"]);
    }
}

#[test]
fn bazel_with_remote_cache_alone_shares_results_through_a_follower() {
    let cluster = HaCluster::start(3, 0, 0, 1);
    let leader = cluster.wait_for_leader();
    let follower = (1..=3).find(|id| *id != leader).expect("a follower");
    let workspace = cluster.path("workspace");
    let root = cluster.path("bazel-root");
    std::fs::create_dir_all(&workspace).expect("mkdir");
    std::fs::write(workspace.join("WORKSPACE"), "workspace(name = \"hello\")\n").expect("write");
    std::fs::write(workspace.join("name.txt"), "distbuild\n").expect("write");
    std::fs::write(
        workspace.join("BUILD"),
        r#"
genrule(
    name = "greeting",
    srcs = ["name.txt"],
    outs = ["greeting.txt"],
    cmd = "echo hello $$(cat $(location name.txt)) > $@",
)
genrule(
    name = "shout",
    srcs = [":greeting"],
    outs = ["shout.txt"],
    cmd = "tr a-z A-Z < $(location :greeting) > $@",
)
"#,
    )
    .expect("write");
    let _server = BazelServer {
        root: &root,
        workspace: &workspace,
    };
    // Pointed at a follower, which passes every call to the leader.
    let remote_cache = format!("--remote_cache=grpc://{}", cluster.node_addr(follower));
    let build = || bazel(&root, &workspace, &["build", &remote_cache, "//:shout"]);

    let first = build();
    assert!(
        first.status.success(),
        "{}\n{}",
        text(&first),
        cluster.logs()
    );
    let ran = processes_line(&first);
    assert!(
        !ran.contains("remote cache hit"),
        "nothing was cached yet: {ran}"
    );
    let output = workspace.join("bazel-bin/shout.txt");
    assert_eq!(
        std::fs::read_to_string(&output).expect("output"),
        "HELLO DISTBUILD\n"
    );

    let clean = bazel(&root, &workspace, &["clean", "--expunge"]);
    assert!(clean.status.success(), "{}", text(&clean));
    let second = build();
    assert!(
        second.status.success(),
        "{}\n{}",
        text(&second),
        cluster.logs()
    );
    let hits = processes_line(&second);
    assert!(
        hits.contains("2 remote cache hit"),
        "both genrules come from distbuild's cache: {hits}\n{}",
        text(&second)
    );
    assert_eq!(
        std::fs::read_to_string(&output).expect("output"),
        "HELLO DISTBUILD\n"
    );
}
