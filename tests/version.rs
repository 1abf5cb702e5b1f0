//! `wspush -version`: the version, the commit it was built from, its features.

use std::process::Command;

#[test]
fn version_names_the_release_the_commit_and_the_features() {
    let out = Command::new(env!("CARGO_BIN_EXE_wspush"))
        .arg("-version")
        .output()
        .expect("run wspush");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], format!("wspush {}", env!("CARGO_PKG_VERSION")));
    let built_from = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8(o.stdout).unwrap().trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    assert_eq!(lines[1], format!("commit: {built_from}"));
    assert!(
        lines[2].starts_with("features: ") && lines[2].contains("queue-redis"),
        "{text}"
    );
}
