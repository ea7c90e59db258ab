//! A real Remote Execution API client: Bazel (Debian's `bazel-bootstrap`,
//! 4.2.3, which speaks API 2.0 with SHA-256) against a real coordinator.
//! With `--remote_cache` alone Bazel runs actions itself and shares their
//! results through distbuild's CAS and action cache, here through a
//! follower of three coordinators: after `bazel clean --expunge` every
//! action is a remote cache hit, and the outputs are the same. With
//! `--remote_executor` every action of a small C project runs on
//! distbuild's workers, is a cache hit after `clean --expunge`, rides
//! through a leader kill without running twice, and two output bases
//! building the same targets at once run each action once.

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

/// The offline flags for Bazel's C++ rules (`../shared/bazel/offline-rules.sh`:
/// Debian's rules_cc and rules_java, fixed for Bazel 4.2.3).
fn offline_rule_flags(dir: &Path) -> Vec<String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/bazel/offline-rules.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(dir)
        .output()
        .expect("run offline-rules.sh");
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// A workspace with a small C project (a library, a binary using it, a
/// genrule running the binary) and genrules that note each run of theirs
/// in `runs` (outside the sandbox: the test's directory is writable for
/// jobs): `step1`..`step6`, each after the one before, and `part1`..`part4`,
/// independent, each taking a second.
fn c_workspace(workspace: &Path, runs: &Path) {
    std::fs::create_dir_all(workspace).expect("mkdir");
    let files = [
        ("WORKSPACE", "workspace(name = \"hello\")\n".to_string()),
        (
            "greet.h",
            "const char *greeting(void);\n".to_string(),
        ),
        (
            "greet.c",
            "#include \"greet.h\"\nconst char *greeting(void) { return \"hello\"; }\n".to_string(),
        ),
        (
            "main.c",
            "#include <stdio.h>\n#include \"greet.h\"\nint main(int argc, char **argv) {\n  printf(\"%s %s\\n\", greeting(), argc > 1 ? argv[1] : \"nobody\");\n  return 0;\n}\n"
                .to_string(),
        ),
    ];
    for (name, content) in files {
        std::fs::write(workspace.join(name), content).expect("write");
    }
    let runs = runs.display();
    let mut build = String::from(
        r#"
cc_library(name = "greet", srcs = ["greet.c"], hdrs = ["greet.h"])
cc_binary(name = "hello", srcs = ["main.c"], deps = [":greet"])
genrule(
    name = "said",
    outs = ["said.txt"],
    tools = [":hello"],
    cmd = "$(location :hello) distbuild > $@",
)
"#,
    );
    for step in 1..=6 {
        let srcs = if step == 1 {
            String::new()
        } else {
            format!("\":step{}\"", step - 1)
        };
        build.push_str(&format!(
            "genrule(name = \"step{step}\", srcs = [{srcs}], outs = [\"step{step}.txt\"], \
             cmd = \"sleep 1; echo step{step} >> {runs}; echo {step} > $@\")\n"
        ));
    }
    for part in 1..=4 {
        build.push_str(&format!(
            "genrule(name = \"part{part}\", outs = [\"part{part}.txt\"], \
             cmd = \"sleep 1; echo part{part} >> {runs}; echo {part} > $@\")\n"
        ));
    }
    std::fs::write(workspace.join("BUILD"), build).expect("write");
}

/// How often each marker appears in `runs`.
fn run_counts(runs: &Path) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for line in std::fs::read_to_string(runs).unwrap_or_default().lines() {
        *counts.entry(line.to_string()).or_default() += 1;
    }
    counts
}

/// The number before `what` in Bazel's processes line ("5 remote").
fn processes(line: &str, what: &str) -> usize {
    line.split([':', ','])
        .filter_map(|part| part.trim().trim_end_matches('.').strip_suffix(what))
        .filter_map(|n| n.trim().parse::<usize>().ok())
        .sum()
}

#[test]
fn bazel_executes_a_c_project_remotely_through_a_follower_and_rides_through_a_leader_kill() {
    let mut cluster = HaCluster::start(3, 0, 2, 2);
    let leader = cluster.wait_for_leader();
    let follower = (1..=3).find(|id| *id != leader).expect("a follower");
    let workspace = cluster.path("workspace");
    let root = cluster.path("bazel-root");
    let runs = cluster.path("runs.txt");
    c_workspace(&workspace, &runs);
    let mut flags = offline_rule_flags(&cluster.path("rules"));
    flags.push(format!(
        "--remote_executor=grpc://{}",
        cluster.node_addr(follower)
    ));
    flags.push("--remote_local_fallback=false".into());
    let _server = BazelServer {
        root: &root,
        workspace: &workspace,
    };
    let build = |targets: &[&str]| {
        let mut args = vec!["build"];
        args.extend(flags.iter().map(String::as_str));
        args.extend(targets);
        bazel(&root, &workspace, &args)
    };

    // Every action runs on distbuild's workers; the output is right.
    let first = build(&["//:said"]);
    assert!(
        first.status.success(),
        "{}\n{}",
        text(&first),
        cluster.logs()
    );
    let ran = processes_line(&first);
    assert!(
        processes(&ran, "remote") >= 4,
        "compiles, link and genrule ran remotely: {ran}"
    );
    assert_eq!(
        processes(&ran, "linux-sandbox") + processes(&ran, "local"),
        0,
        "{ran}"
    );
    let said = workspace.join("bazel-bin/said.txt");
    assert_eq!(
        std::fs::read_to_string(&said).expect("output"),
        "hello distbuild\n"
    );

    // After `clean --expunge`, every action is a remote cache hit.
    let clean = bazel(&root, &workspace, &["clean", "--expunge"]);
    assert!(clean.status.success(), "{}", text(&clean));
    let second = build(&["//:said"]);
    assert!(
        second.status.success(),
        "{}\n{}",
        text(&second),
        cluster.logs()
    );
    let hits = processes_line(&second);
    assert_eq!(
        processes(&hits, "remote cache hit"),
        processes(&ran, "remote"),
        "every remote action is a cache hit now: {hits} (first build: {ran})"
    );
    assert_eq!(processes(&hits, "remote"), 0, "{hits}");
    assert_eq!(
        std::fs::read_to_string(&said).expect("output"),
        "hello distbuild\n"
    );

    // The leader dies two steps into a six-step chain: the build goes on
    // through the same follower, and no step runs twice.
    let mut args = vec!["build".to_string()];
    args.extend(flags.iter().cloned());
    args.push("//:step6".into());
    let chain = Command::new("bazel")
        .arg(format!("--output_user_root={}", root.display()))
        .args(&args)
        .current_dir(&workspace)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start bazel");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while run_counts(&runs).len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "steps never ran: {}",
            cluster.logs()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    cluster.kill_node(leader);
    let chain = chain.wait_with_output().expect("bazel");
    assert!(
        chain.status.success(),
        "{}\n{}",
        text(&chain),
        cluster.logs()
    );
    assert_eq!(
        std::fs::read_to_string(workspace.join("bazel-bin/step6.txt")).expect("output"),
        "6\n"
    );
    let counts = run_counts(&runs);
    let expected: std::collections::BTreeMap<String, usize> =
        (1..=6).map(|s| (format!("step{s}"), 1)).collect();
    assert_eq!(counts, expected, "each step ran once\n{}", text(&chain));
    assert_ne!(cluster.wait_for_leader(), leader);
}

#[test]
fn two_bazel_output_bases_building_the_same_targets_at_once_run_each_action_once() {
    let cluster = HaCluster::start(3, 0, 2, 2);
    let leader = cluster.wait_for_leader();
    let follower = (1..=3).find(|id| *id != leader).expect("a follower");
    let runs = cluster.path("runs.txt");
    let remote = format!("--remote_executor=grpc://{}", cluster.node_addr(follower));
    let mut builds = Vec::new();
    let mut servers = Vec::new();
    for n in 0..2 {
        let workspace = cluster.path(&format!("workspace{n}"));
        let root = cluster.path(&format!("bazel-root{n}"));
        c_workspace(&workspace, &runs);
        servers.push((root.clone(), workspace.clone()));
        builds.push(
            Command::new("bazel")
                .arg(format!("--output_user_root={}", root.display()))
                .args(["build", &remote, "--remote_local_fallback=false"])
                .args(["//:part1", "//:part2", "//:part3", "//:part4"])
                .current_dir(&workspace)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("start bazel"),
        );
    }
    let _servers: Vec<BazelServer> = servers
        .iter()
        .map(|(root, workspace)| BazelServer { root, workspace })
        .collect();
    for build in builds {
        let out = build.wait_with_output().expect("bazel");
        assert!(out.status.success(), "{}\n{}", text(&out), cluster.logs());
    }
    let counts = run_counts(&runs);
    let expected: std::collections::BTreeMap<String, usize> =
        (1..=4).map(|p| (format!("part{p}"), 1)).collect();
    assert_eq!(
        counts, expected,
        "each action ran once for both output bases"
    );
}

#[test]
fn bazel_without_tls_uses_a_tls_cluster_through_the_proxy_its_user_runs() {
    let cluster = HaCluster::start_secured(3, 0, 1, 2, None, true);
    let pki = cluster.pki.as_ref().expect("a TLS cluster");
    let leader = cluster.wait_for_leader();
    let follower = (1..=3).find(|id| *id != leader).expect("a follower");
    let mut args = vec![
        "reapi-proxy".to_string(),
        "--coordinator".to_string(),
        cluster.node_addr(follower),
    ];
    args.extend(pki.flags("client", "bazel-user"));
    let proxy = Server::start(&args, cluster.path("proxy.log"));

    let workspace = cluster.path("workspace");
    let root = cluster.path("bazel-root");
    std::fs::create_dir_all(&workspace).expect("mkdir");
    std::fs::write(
        workspace.join("WORKSPACE"),
        "workspace(name = \"proxied\")\n",
    )
    .expect("write");
    std::fs::write(
        workspace.join("BUILD"),
        "genrule(name = \"g\", outs = [\"g.txt\"], cmd = \"echo through the proxy > $@\")\n",
    )
    .expect("write");
    let _server = BazelServer {
        root: &root,
        workspace: &workspace,
    };
    let executor = format!("--remote_executor=grpc://{}", proxy.addr);
    let out = bazel(
        &root,
        &workspace,
        &["build", &executor, "--remote_local_fallback=false", "//:g"],
    );
    assert!(out.status.success(), "{}\n{}", text(&out), cluster.logs());
    let ran = processes_line(&out);
    assert!(ran.contains("1 remote"), "{ran}");
    assert_eq!(
        std::fs::read_to_string(workspace.join("bazel-bin/g.txt")).expect("output"),
        "through the proxy\n"
    );

    // Another user of the machine is turned away before a byte is read.
    let user = other_user().expect("a second user");
    let port = proxy.addr.rsplit(':').next().expect("port");
    let probe = Command::new("runuser")
        .args(["-u", user, "--", "timeout", "10", "bash", "-c"])
        .arg(format!(
            // The proxy may close first: a write then fails, not kills.
            "trap '' PIPE; exec 3<>/dev/tcp/127.0.0.1/{port}; printf 'PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n' >&3; head -c 1 <&3 | wc -c"
        ))
        .output()
        .expect("runuser");
    assert_eq!(
        String::from_utf8_lossy(&probe.stdout).trim(),
        "0",
        "the connection is closed unanswered: {}",
        text(&probe)
    );
    // The proxy's stderr reaches its log through a copying thread.
    let refused =
        |log: &str| log.contains("refused a connection") && log.contains("belongs to user");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut log = String::new();
    while !refused(&log) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
        log = std::fs::read_to_string(cluster.path("proxy.log")).expect("proxy log");
    }
    assert!(refused(&log), "{log}");
}
