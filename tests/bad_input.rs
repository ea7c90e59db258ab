//! Bad input is refused before anything runs: exit 2, one line naming the
//! problem, and the cluster keeps serving.

mod support;

use serde_json::{Value, json};
use support::{Cluster, distbuild, graph, id, sh_job};

struct Case {
    name: &'static str,
    /// The graph file's bytes.
    graph: String,
    /// Source files to create.
    files: &'static [&'static str],
    /// What the one-line message must contain.
    message: &'static str,
}

fn case(
    name: &'static str,
    graph: Value,
    files: &'static [&'static str],
    message: &'static str,
) -> Case {
    Case {
        name,
        graph: graph.to_string(),
        files,
        message,
    }
}

#[test]
fn bad_input_is_refused_with_exit_2_and_changes_nothing() {
    let cluster = Cluster::start(1, 1);
    let ran = cluster.path("ran.log");
    // A job that leaves a trace if it ever runs.
    let marker = |name: &str, inputs: &[&str], deps: &[&str]| {
        sh_job(
            name,
            inputs,
            deps,
            &[&format!("echo {name} >> {}", ran.display())],
        )
    };
    let with_files = |files: Value, jobs: Vec<Value>| json!({"SourceFiles": files, "Jobs": jobs});
    let file_id = id("file");
    let cases = vec![
        Case {
            name: "malformed JSON",
            graph: r#"{"Jobs": [ {"ID": "#.to_string(),
            files: &[],
            message: "malformed graph JSON",
        },
        case(
            "bad ID",
            json!({"Jobs": [{"ID": "not-hex", "Name": "x", "Cmds": [{"Exec": ["true"]}]}]}),
            &[],
            "not-hex",
        ),
        case(
            "duplicate job IDs",
            graph(&[], vec![marker("dup", &[], &[]), marker("dup", &[], &[])]),
            &[],
            "duplicate job ID",
        ),
        case(
            "cycle",
            graph(
                &[],
                vec![marker("a", &[], &["b"]), marker("b", &[], &["a"])],
            ),
            &[],
            "dependency cycle",
        ),
        case(
            "unknown dependency",
            graph(&[], vec![marker("a", &[], &["ghost"])]),
            &[],
            "depends on unknown job",
        ),
        case(
            "input not listed",
            graph(&[], vec![marker("a", &["unlisted.c"], &[])]),
            &[],
            "unlisted.c",
        ),
        case(
            "input missing on disk",
            graph(&["missing.c"], vec![marker("a", &["missing.c"], &[])]),
            &[],
            "missing.c",
        ),
        case(
            "absolute path",
            with_files(
                json!({file_id.clone(): "/etc/passwd"}),
                vec![marker("a", &[], &[])],
            ),
            &[],
            "is absolute",
        ),
        case(
            "path climbing out",
            with_files(
                json!({file_id.clone(): "../up.c"}),
                vec![marker("a", &[], &[])],
            ),
            &[],
            "climbs out",
        ),
        case(
            "template error",
            json!({"Jobs": [{"ID": id("t"), "Name": "t", "Cmds": [{"Exec": ["echo", "{{.Nope}}"]}]}]}),
            &[],
            "{{.Nope}}",
        ),
    ];
    for case in &cases {
        let src = cluster.path(&format!("src-{}", case.name.replace(' ', "-")));
        std::fs::create_dir_all(&src).expect("mkdir");
        for f in case.files {
            std::fs::write(src.join(f), "x").expect("write source");
        }
        let graph_path = cluster.path(&format!("{}.json", case.name.replace(' ', "-")));
        std::fs::write(&graph_path, &case.graph).expect("write graph");
        let run = cluster.build_file(&graph_path, &src, &[]);
        assert_eq!(run.code, Some(2), "{}: {}", case.name, run.describe());
        let stderr = run.stderr.trim_end();
        assert_eq!(
            stderr.lines().count(),
            1,
            "{}: one line: {stderr:?}",
            case.name
        );
        assert!(
            stderr.contains(case.message),
            "{}: {stderr:?} should mention {:?}",
            case.name,
            case.message
        );
        assert!(
            run.events.is_empty(),
            "{}: nothing submitted: {:?}",
            case.name,
            run.events
        );
    }
    assert!(!ran.exists(), "no job of a refused graph ran");

    // The cluster still serves.
    let ok = cluster.build(
        &graph(&[], vec![sh_job("fine", &[], &[], &["echo fine"])]),
        &cluster.path("nosrc"),
        &[],
    );
    assert_eq!(ok.code, Some(0), "{}", ok.describe());
}

#[test]
fn an_unreachable_cluster_exits_3() {
    let dir = tempfile::tempdir().expect("tempdir");
    let graph_path = dir.path().join("g.json");
    std::fs::write(
        &graph_path,
        graph(&[], vec![sh_job("x", &[], &[], &["true"])]).to_string(),
    )
    .expect("write graph");
    // Port 1 on loopback refuses connections.
    let out = distbuild()
        .args([
            "build",
            "--json",
            "--timeout",
            "2",
            "--insecure",
            "--coordinator",
            "127.0.0.1:1",
            "--graph",
        ])
        .arg(&graph_path)
        .output()
        .expect("run distbuild build");
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
