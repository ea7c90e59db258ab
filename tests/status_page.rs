//! The coordinator's live status page in a real browser: Debian's
//! Chromium, headless, loads it (logging in with the metrics token) from a
//! three-coordinator cluster with a build in progress, runs its script
//! against the live `status.json`, and the test reads what the page shows.

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

/// Chromium, headless, as root in a container: no sandbox of its own
/// (the test's processes are already confined), a throwaway profile, and
/// a few seconds of virtual time for the page's polls.
fn chromium(profile: &std::path::Path, extra: &[&str], url: &str) -> std::process::Output {
    chromium_for(profile, 3_000, extra, url)
}

/// [`chromium`] with `virtual_ms` of virtual time (the page polls once a
/// virtual second; each poll's fetch takes real time).
fn chromium_for(
    profile: &std::path::Path,
    virtual_ms: u64,
    extra: &[&str],
    url: &str,
) -> std::process::Output {
    let mut command = Command::new("timeout");
    command
        .arg("90")
        .arg("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
        ])
        .arg(format!("--virtual-time-budget={virtual_ms}"))
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url);
    command
        .output()
        .expect("run chromium (Debian's `chromium` package; scripts/setup.sh installs it)")
}

#[test]
fn the_status_page_shows_the_cluster_and_a_running_build_in_a_browser() {
    let cluster = HaCluster::start(3, 0, 1, 2);
    let leader = cluster.wait_for_stable_leader(Duration::from_secs(1));
    let follower = (1..=3u64).find(|id| *id != leader).expect("a follower");
    let gate = cluster.path("gate");
    let wait = format!(
        "while [ ! -e {} ]; do sleep 0.05; done; echo slow > {{{{.OutputDir}}}}/x",
        gate.display()
    );
    let graph = graph(
        &[],
        vec![
            sh_job("compile slow.c", &[], &[], &[&wait]),
            sh_job("ok", &[], &[], &["echo 1 > {{.OutputDir}}/x"]),
            sh_job(
                "bad",
                &[],
                &[],
                &["echo '<script>alert(1)</script> broke' >&2; exit 3"],
            ),
        ],
    );
    let build = cluster.spawn_build(&graph, &["--timeout", "60"]);
    // Wait until the data says the slow job runs and the bad one failed.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let worker_id = loop {
        let (_, body) = cluster.http_get(leader, "/status.json");
        let page: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        let b = &page["builds"][0];
        if b["running"][0]["job"] == "compile slow.c" && b["failed"] == 1 {
            break page["workers"][0]["id"]
                .as_str()
                .expect("worker id")
                .to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never running: {page}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };

    let profile = tempfile::tempdir().expect("profile dir");
    // A follower's page: any replica serves it.
    let url = format!(
        "http://{}/login?token={}",
        cluster.metrics_addr(follower),
        cluster.metrics_token
    );
    let out = chromium(profile.path(), &["--dump-dom"], &url);
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && dom.contains("id=\"nodes\""),
        "chromium failed ({:?}): {}\n{dom}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // The summary names who answered and the leader.
    assert!(
        dom.contains(&format!("node {follower} answered"))
            && dom.contains(&format!("leader: node {leader}")),
        "{dom}"
    );
    // Three nodes, the worker, the build with its running job and failure.
    for addr in (1..=3).map(|id| cluster.node_addr(id)) {
        assert!(dom.contains(&addr), "node {addr} missing: {dom}");
    }
    assert!(dom.contains(&worker_id), "{dom}");
    assert!(dom.contains("class=\"build\""), "{dom}");
    assert!(dom.contains("class=\"state state-running\""), "{dom}");
    // (Class names as the DOM writes them: the page's style names them too.)
    assert!(dom.contains("class=\"running-job\""), "{dom}");
    assert!(dom.contains("compile slow.c"), "{dom}");
    assert!(dom.contains("class=\"failure\""), "{dom}");
    // The job's stderr is text on the page, never markup.
    assert!(
        dom.contains("&lt;script&gt;alert(1)&lt;/script&gt; broke"),
        "{dom}"
    );
    assert!(!dom.contains("<script>alert(1)"), "{dom}");
    // The banner saying the data is stale stays hidden.
    assert!(dom.contains("<div id=\"conn\" hidden=\"\"></div>"), "{dom}");

    // Without the token the page says what it needs.
    let profile = tempfile::tempdir().expect("profile dir");
    let out = chromium(
        profile.path(),
        &["--dump-dom"],
        &format!("http://{}/", cluster.metrics_addr(leader)),
    );
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("<div id=\"conn\">") && dom.contains("metrics token"),
        "{dom}"
    );
    assert!(!dom.contains(&worker_id), "{dom}");

    if let Some(path) = std::env::var_os("DISTBUILD_PAGE_SCREENSHOT") {
        let profile = tempfile::tempdir().expect("profile dir");
        let shot = format!("--screenshot={}", std::path::Path::new(&path).display());
        chromium(
            profile.path(),
            &["--hide-scrollbars", "--window-size=1200,900", &shot],
            &url,
        );
    }
    // Live: a page loaded while the build runs shows it finished, without
    // a reload, once it has (the gate opens while the page polls).
    let profile = tempfile::tempdir().expect("profile dir");
    let opener = {
        let gate = gate.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            std::fs::write(&gate, "").expect("open the gate");
        })
    };
    // 300 polls: each waits for a real fetch, several real seconds in
    // all, well past the build's end.
    let out = chromium_for(profile.path(), 300_000, &["--dump-dom"], &url);
    opener.join().expect("gate opener");
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("class=\"state state-failed\""),
        "the page never showed the end: {dom}"
    );
    assert!(!dom.contains("class=\"running-job\""), "{dom}");
    let run = finish_build_explained(build, Duration::from_secs(120), || cluster.logs());
    assert_ne!(run.code, Some(0));
}
