//! `ferryctl certs`: a development PKI on disk. `init` creates a CA in a
//! directory, `issue` signs coordinator, agent and admin certificates with it
//! (via `ferryctl::pki`). Private keys are written with mode 0600, and no
//! existing file is replaced without `--force`.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use ferry_common::domain::Role;
use ferryctl::pki::{self, PemPair, Subject};
use serde_json::json;

use crate::output::{outln, print_json};
use crate::{CertsCmd, IssueCmd, IssueTarget, UsageError};

const CA_CERT: &str = "ca.pem";
const CA_KEY: &str = "ca-key.pem";

/// One file to write: where, what, and whether it is secret.
struct Output {
    path: PathBuf,
    contents: String,
    private: bool,
    what: String,
}

pub(crate) fn run(cmd: &CertsCmd, json: bool) -> anyhow::Result<()> {
    match cmd {
        CertsCmd::Init {
            dir,
            common_name,
            force,
        } => init(dir, common_name, *force, json),
        CertsCmd::Issue(issue_cmd) => issue(issue_cmd, json),
    }
}

fn init(dir: &Path, common_name: &str, force: bool, json: bool) -> anyhow::Result<()> {
    if common_name.trim().is_empty() {
        return Err(UsageError("--common-name must not be empty".into()).into());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create directory {}", dir.display()))?;
    let ca = pki::create_ca(common_name)?;
    let outputs = [
        Output {
            path: dir.join(CA_CERT),
            contents: ca.cert_pem,
            private: false,
            what: format!("CA certificate, CN {common_name:?}"),
        },
        Output {
            path: dir.join(CA_KEY),
            contents: ca.key_pem,
            private: true,
            what: "CA private key, mode 0600".into(),
        },
    ];
    write_all(&outputs, force)?;
    if json {
        print_json(&json!({
            "ca_certificate": outputs[0].path.display().to_string(),
            "ca_key": outputs[1].path.display().to_string(),
            "common_name": common_name,
        }))?;
    } else {
        report(&outputs)?;
    }
    Ok(())
}

fn issue(cmd: &IssueCmd, json: bool) -> anyhow::Result<()> {
    let (target, subject, kind) = match cmd {
        IssueCmd::Coordinator { target, hosts } => {
            check_name(&target.name)?;
            for host in hosts {
                ferry_common::validate::hostname(host)
                    .map_err(|e| UsageError(format!("--host: {e}")))?;
            }
            let subject = Subject::Coordinator {
                name: target.name.clone(),
                hosts: hosts.clone(),
            };
            (target, subject, "coordinator")
        }
        IssueCmd::Agent { target, site } => {
            check_name(&target.name)?;
            ferry_common::validate::site(site)
                .map_err(|e| anyhow::anyhow!("invalid --site: {e}"))?;
            (
                target,
                Subject::Client(Role::agent(target.name.clone(), site.clone())),
                "agent",
            )
        }
        IssueCmd::Admin { target } => {
            check_name(&target.name)?;
            (
                target,
                Subject::Client(Role::Admin(target.name.clone())),
                "admin",
            )
        }
    };
    let ca = load_ca(&target.dir)?;
    let pair = pki::issue(&ca, &subject).with_context(|| format!("issue {kind} certificate"))?;
    let identity = match &subject {
        Subject::Coordinator { hosts, .. } => format!("hosts {}", hosts.join(", ")),
        Subject::Client(role) => format!("SAN URI {}", role.uri()),
    };
    let outputs = leaf_outputs(target, pair, &format!("{kind} certificate, {identity}"));
    write_all(&outputs, target.force)?;
    if json {
        let mut doc = json!({
            "kind": kind,
            "name": target.name,
            "certificate": outputs[0].path.display().to_string(),
            "key": outputs[1].path.display().to_string(),
        });
        match &subject {
            Subject::Coordinator { hosts, .. } => doc["hosts"] = json!(hosts),
            Subject::Client(role) => doc["uri"] = json!(role.uri()),
        }
        print_json(&doc)?;
    } else {
        report(&outputs)?;
    }
    Ok(())
}

fn leaf_outputs(target: &IssueTarget, pair: PemPair, what: &str) -> [Output; 2] {
    [
        Output {
            path: target.dir.join(format!("{}.pem", target.name)),
            contents: pair.cert_pem,
            private: false,
            what: what.to_string(),
        },
        Output {
            path: target.dir.join(format!("{}-key.pem", target.name)),
            contents: pair.key_pem,
            private: true,
            what: "private key, mode 0600".into(),
        },
    ]
}

/// Certificate holder names double as file names: same alphabet as roles
/// (letters, digits, `-`, `_`, `.`), no leading `.`/`-`, and not `ca`.
fn check_name(name: &str) -> Result<(), UsageError> {
    let valid_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if name.is_empty() || name.len() > 128 || !valid_chars {
        return Err(UsageError(format!(
            "--name {name:?}: use 1 to 128 letters, digits, '-', '_' or '.'"
        )));
    }
    if name.starts_with(['.', '-']) {
        return Err(UsageError(format!(
            "--name {name:?}: must not start with '.' or '-'"
        )));
    }
    if name == "ca" {
        return Err(UsageError(
            "--name \"ca\" would overwrite the CA files; pick another name".into(),
        ));
    }
    Ok(())
}

fn load_ca(dir: &Path) -> anyhow::Result<PemPair> {
    let read = |file: &str| {
        let path = dir.join(file);
        std::fs::read_to_string(&path).with_context(|| {
            format!(
                "read {} (create a CA first: ferryctl certs init --dir {})",
                path.display(),
                dir.display()
            )
        })
    };
    Ok(PemPair {
        cert_pem: read(CA_CERT)?,
        key_pem: read(CA_KEY)?,
    })
}

/// Writes every output, or none if one exists and `force` is off.
fn write_all(outputs: &[Output], force: bool) -> anyhow::Result<()> {
    if !force {
        let existing: Vec<String> = outputs
            .iter()
            .filter(|o| o.path.exists())
            .map(|o| o.path.display().to_string())
            .collect();
        if !existing.is_empty() {
            let verb = if existing.len() == 1 {
                "exists"
            } else {
                "exist"
            };
            anyhow::bail!(
                "{} already {verb}; pass --force to overwrite",
                existing.join(" and ")
            );
        }
    }
    for output in outputs {
        write_file(output, force)?;
    }
    Ok(())
}

/// Creates the file fresh so a key never exists, even briefly, with wider
/// permissions (an overwritten file is removed first rather than truncated).
fn write_file(output: &Output, force: bool) -> anyhow::Result<()> {
    let path = &output.path;
    if force {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("remove {}", path.display())),
        }
    }
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if output.private { 0o600 } else { 0o644 });
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    file.write_all(output.contents.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("write {}", path.display()))
}

fn report(outputs: &[Output]) -> std::io::Result<()> {
    for output in outputs {
        outln!("wrote {} ({})", output.path.display(), output.what)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_safe_file_names() {
        assert!(check_name("agent-1.site_a").is_ok());
        for bad in ["", "a/b", "..", ".hidden", "-x", "ca", "a b", "é"] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
