//! The `distbuild` binary as users run it.

use std::process::Command;

fn distbuild() -> Command {
    Command::new(env!("CARGO_BIN_EXE_distbuild"))
}

#[test]
fn version_names_the_crate_version() {
    let out = distbuild()
        .arg("--version")
        .output()
        .expect("run distbuild");
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.trim(),
        format!("distbuild {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn unknown_arguments_are_refused_with_usage_exit_code() {
    let out = distbuild()
        .arg("--no-such-flag")
        .output()
        .expect("run distbuild");
    assert_eq!(out.status.code(), Some(2), "clap's usage error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--no-such-flag"));
}
