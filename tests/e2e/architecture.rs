//! The dependency graph is the architecture (ARCHITECTURE.md, "Crates"):
//! these assertions keep it from rotting. Each runs `cargo tree` on the
//! locked workspace and checks what a crate links in normal builds.

use std::collections::BTreeSet;
use std::process::Command;

use ferry_tests::workspace_root;

/// Package names in the normal-dependency tree of `package` (itself included).
fn normal_tree(package: &str) -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(workspace_root())
        .args([
            "tree",
            "--locked",
            "--offline",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
            "-p",
            package,
        ])
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "cargo tree -p {package} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

fn assert_links_none(package: &str, banned: &[&str], why: &str) {
    let tree = normal_tree(package);
    assert!(
        tree.contains(package),
        "cargo tree output for {package} does not name the package itself: {tree:?}"
    );
    let found: Vec<&&str> = banned.iter().filter(|b| tree.contains(**b)).collect();
    assert!(
        found.is_empty(),
        "{package} links {found:?}, but {why} (see `cargo tree -e normal -p {package} -i <crate>`)"
    );
}

#[test]
fn the_agent_never_links_postgres_or_amqp() {
    assert_links_none(
        "ferry-agent",
        &[
            "sqlx",
            "sqlx-core",
            "sqlx-postgres",
            "lapin",
            "ferry-coordinator",
        ],
        "the agent never talks to Postgres or AMQP",
    );
}

#[test]
fn the_coordinator_never_links_ssh_or_s3() {
    assert_links_none(
        "ferry-coordinator",
        &[
            "russh",
            "russh-sftp",
            "aws-sdk-s3",
            "aws-config",
            "ferry-agent",
        ],
        "the coordinator never opens SSH connections nor touches object storage",
    );
}

#[test]
fn ferryctl_links_no_server_side_dependency() {
    assert_links_none(
        "ferryctl",
        &[
            "sqlx",
            "lapin",
            "russh",
            "russh-sftp",
            "aws-sdk-s3",
            "ferry-coordinator",
            "ferry-agent",
        ],
        "ferryctl is a pure gRPC client of the admin API",
    );
}

#[test]
fn the_domain_crate_is_pure() {
    assert_links_none(
        "ferry-common",
        &[
            "tokio",
            "tonic",
            "prost",
            "sqlx",
            "lapin",
            "russh",
            "aws-sdk-s3",
        ],
        "ferry-common is the pure domain: no runtime, protocol or storage",
    );
}
