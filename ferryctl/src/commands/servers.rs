//! `ferryctl servers ...`: register, change, remove, list and show SFTP
//! servers, probe host keys, and resolve `ID|NAME` references for the other
//! commands. SSH secrets are read from environment variables, files or stdin,
//! never taken as argument values; host-key rules are left to the server so
//! its message is the only one.

use std::io::Read;
use std::path::Path;

use anyhow::Context;
use ferry_proto::{
    AddServerRequest, GetServerRequest, ListServersRequest, Password, PrivateKey,
    ProbeHostKeyRequest, RemoveServerRequest, Server, UpdateServerRequest, add_server_request,
    update_server_request,
};
use serde_json::{Value, json};

use crate::commands::watches;
use crate::connect::{Admin, FULL_PAGE, all_pages};
use crate::output::{self, Table, outln};
use crate::{
    CredentialArgs, PassphraseArgs, ServerAddArgs, ServerRef, ServerUpdateArgs, ServersCmd,
    UsageError,
};

pub(crate) async fn run(admin: &Admin, cmd: ServersCmd, json: bool) -> anyhow::Result<()> {
    match cmd {
        ServersCmd::Add(args) => add(admin, args, json).await,
        ServersCmd::Update(args) => update(admin, args, json).await,
        ServersCmd::Remove { server } => remove(admin, &server, json).await,
        ServersCmd::List => list(admin, json).await,
        ServersCmd::Show { server } => show(admin, &server, json).await,
        ServersCmd::Probe { host, port, site } => probe(admin, host, port, site, json).await,
    }
}

/// Fetches a server by id or name (`GetServer`).
pub(crate) async fn get(admin: &Admin, server: &ServerRef) -> anyhow::Result<Server> {
    let request = match server {
        ServerRef::Id(id) => GetServerRequest {
            id: *id,
            name: String::new(),
        },
        ServerRef::Name(name) => GetServerRequest {
            id: 0,
            name: name.clone(),
        },
    };
    admin.call(admin.client().get_server(request)).await
}

/// The id of a server reference; names cost one `GetServer` call.
pub(crate) async fn resolve_id(admin: &Admin, server: &ServerRef) -> anyhow::Result<i64> {
    match server {
        ServerRef::Id(id) => Ok(*id),
        ServerRef::Name(_) => Ok(get(admin, server).await?.id),
    }
}

/// [`resolve_id`] for optional filters; 0 (the API's "any") when absent.
pub(crate) async fn resolve_filter(
    admin: &Admin,
    server: Option<&ServerRef>,
) -> anyhow::Result<i64> {
    match server {
        Some(server) => resolve_id(admin, server).await,
        None => Ok(0),
    }
}

/// The secrets selected by the credential flags, read from their sources.
#[derive(Default)]
struct Secrets {
    password: Option<String>,
    private_key: Option<String>,
    passphrase: Option<String>,
}

impl Secrets {
    fn read(args: &CredentialArgs, pass: &PassphraseArgs) -> anyhow::Result<Secrets> {
        let password = if let Some(var) = &args.password_env {
            Some(from_env(var, "password")?)
        } else if let Some(path) = &args.password_file {
            Some(from_file(path, "password")?)
        } else if args.password_stdin {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("read password from stdin")?;
            Some(strip_newline(text))
        } else {
            None
        };
        if password.as_deref() == Some("") {
            return Err(UsageError("the SSH password is empty".into()).into());
        }
        let private_key = match &args.key_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("read private key {}", path.display()))?,
            ),
            None => None,
        };
        let passphrase = if let Some(var) = &pass.passphrase_env {
            Some(from_env(var, "passphrase")?)
        } else if let Some(path) = &pass.passphrase_file {
            Some(from_file(path, "passphrase")?)
        } else {
            None
        };
        Ok(Secrets {
            password,
            private_key,
            passphrase,
        })
    }
}

impl Secrets {
    /// The credential of an add request; `None` lets the coordinator name
    /// the missing field.
    fn auth(self) -> Option<add_server_request::Auth> {
        match (self.password, self.private_key) {
            (Some(password), _) => Some(add_server_request::Auth::Password(Password { password })),
            (None, Some(pem)) => Some(add_server_request::Auth::PrivateKey(PrivateKey {
                pem,
                passphrase: self.passphrase.unwrap_or_default(),
            })),
            (None, None) => None,
        }
    }

    /// The credential change of an update request; `None` keeps the stored one.
    fn update_auth(self) -> Option<update_server_request::Auth> {
        match (self.password, self.private_key, self.passphrase) {
            (Some(password), ..) => {
                Some(update_server_request::Auth::Password(Password { password }))
            }
            (None, Some(pem), passphrase) => {
                Some(update_server_request::Auth::PrivateKey(PrivateKey {
                    pem,
                    passphrase: passphrase.unwrap_or_default(),
                }))
            }
            (None, None, Some(passphrase)) => {
                Some(update_server_request::Auth::Passphrase(passphrase))
            }
            (None, None, None) => None,
        }
    }
}

fn from_env(var: &str, what: &str) -> anyhow::Result<String> {
    match std::env::var(var) {
        Ok(value) => Ok(value),
        Err(std::env::VarError::NotPresent) => Err(UsageError(format!(
            "environment variable {var} (the SSH {what}) is not set"
        ))
        .into()),
        Err(std::env::VarError::NotUnicode(_)) => Err(UsageError(format!(
            "environment variable {var} (the SSH {what}) is not UTF-8"
        ))
        .into()),
    }
}

fn from_file(path: &Path, what: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("read SSH {what} from {}", path.display()))?;
    Ok(strip_newline(text))
}

/// Drops one trailing `\n` or `\r\n` (what `echo` and editors add).
fn strip_newline(mut text: String) -> String {
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    text
}

async fn add(admin: &Admin, args: ServerAddArgs, json: bool) -> anyhow::Result<()> {
    let secrets = Secrets::read(&args.credential, &args.passphrase)?;
    let request = AddServerRequest {
        name: args.name,
        hostname: args.host,
        port: u32::from(args.port),
        username: args.user,
        auth: secrets.auth(),
        host_key_fingerprint: args.host_key.host_key.unwrap_or_default(),
        trust_host_key: args.host_key.trust_host_key,
        site: args.site.unwrap_or_default(),
        max_sessions: args.max_sessions.unwrap_or(0),
        enabled: args.disabled.then_some(false),
    };
    let server = admin.call(admin.client().add_server(request)).await?;
    if json {
        return Ok(output::print_json(&server_json(&server))?);
    }
    outln!("added server {} {:?}\n", server.id, server.name)?;
    print_detail(&server)?;
    Ok(())
}

async fn update(admin: &Admin, args: ServerUpdateArgs, json: bool) -> anyhow::Result<()> {
    let secrets = Secrets::read(&args.credential, &args.passphrase)?;
    let enabled = match (args.enable, args.disable) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => None,
    };
    let mut request = UpdateServerRequest {
        id: 0,
        name: args.rename,
        hostname: args.host,
        port: args.port.map(u32::from),
        username: args.user,
        auth: secrets.update_auth(),
        host_key_fingerprint: args.host_key.host_key,
        trust_host_key: args.host_key.trust_host_key,
        site: args.site,
        max_sessions: args.max_sessions,
        enabled,
    };
    if request == (UpdateServerRequest::default()) {
        return Err(
            UsageError("nothing to change: give at least one option (see --help)".into()).into(),
        );
    }
    request.id = resolve_id(admin, &args.server).await?;
    let server = admin.call(admin.client().update_server(request)).await?;
    if json {
        return Ok(output::print_json(&server_json(&server))?);
    }
    outln!("updated server {} {:?}\n", server.id, server.name)?;
    print_detail(&server)?;
    Ok(())
}

async fn remove(admin: &Admin, server: &ServerRef, json: bool) -> anyhow::Result<()> {
    let id = resolve_id(admin, server).await?;
    let response = admin
        .call(admin.client().remove_server(RemoveServerRequest { id }))
        .await?;
    if json {
        output::print_json(&json!({ "id": id, "watches_removed": response.watches_removed }))?;
    } else {
        let named = match server {
            ServerRef::Id(_) => id.to_string(),
            ServerRef::Name(name) => format!("{name:?} (id {id})"),
        };
        let watches = output::count(response.watches_removed.into(), "watch", "watches");
        outln!("removed server {named} and {watches}")?;
    }
    Ok(())
}

async fn list(admin: &Admin, json: bool) -> anyhow::Result<()> {
    let servers = all_pages(|page_token| async move {
        let page = admin
            .call(admin.client().list_servers(ListServersRequest {
                page_size: FULL_PAGE,
                page_token,
            }))
            .await?;
        Ok((page.servers, page.next_page_token))
    })
    .await?;
    if json {
        let servers: Vec<Value> = servers.iter().map(server_json).collect();
        return Ok(output::print_json(&Value::Array(servers))?);
    }
    let mut table = Table::new(&[
        "ID",
        "NAME",
        "HOST",
        "PORT",
        "USER",
        "SITE",
        "ENABLED",
        "POLLER",
        "LAST-POLL",
        "POLL-TIME",
        "ERROR",
    ]);
    for s in &servers {
        let health = s.health.clone().unwrap_or_default();
        table.row(vec![
            s.id.to_string(),
            s.name.clone(),
            s.hostname.clone(),
            s.port.to_string(),
            s.username.clone(),
            output::or_dash(&s.site),
            output::yes_no(s.enabled),
            output::or_dash(&health.poller_agent),
            last_poll(&health),
            poll_duration(&health),
            output::or_dash(&output::truncate(&health.last_error, 60)),
        ]);
    }
    Ok(table.print_or("no servers registered (add one with `ferryctl servers add`)")?)
}

async fn show(admin: &Admin, server: &ServerRef, json: bool) -> anyhow::Result<()> {
    let server = get(admin, server).await?;
    if json {
        return Ok(output::print_json(&server_json(&server))?);
    }
    print_detail(&server)?;
    let watches = watches::all_watches(admin, server.id).await?;
    outln!()?;
    if watches.is_empty() {
        outln!(
            "no watches (add one with `ferryctl watches add --server {}`)",
            server.name
        )?;
        return Ok(());
    }
    outln!("Watches:")?;
    Ok(watches::table(&watches).print_or("")?)
}

async fn probe(
    admin: &Admin,
    host: String,
    port: u16,
    site: String,
    json: bool,
) -> anyhow::Result<()> {
    let request = ProbeHostKeyRequest {
        hostname: host.clone(),
        port: u32::from(port),
        site,
    };
    let response = admin.call(admin.client().probe_host_key(request)).await?;
    if json {
        output::print_json(&json!({
            "hostname": host,
            "port": port,
            "fingerprint": response.fingerprint,
            "key_algorithm": response.key_algorithm,
        }))?;
    } else {
        outln!(
            "{} {}",
            output::clean(&response.fingerprint),
            output::clean(&response.key_algorithm)
        )?;
        eprintln!(
            "pin it with: ferryctl servers add NAME --host {host} --port {port} ... --host-key {}",
            output::clean(&response.fingerprint)
        );
    }
    Ok(())
}

/// `3s ago (12 files)`, or `never`.
fn last_poll(health: &ferry_proto::ServerHealth) -> String {
    if health.last_poll_at.is_none() {
        return "never".into();
    }
    format!(
        "{} ({})",
        output::age(health.last_poll_at.as_ref()),
        output::count(health.last_poll_files, "file", "files")
    )
}

/// `840 ms`, `12.3 s`; `-` before the first poll.
fn poll_duration(health: &ferry_proto::ServerHealth) -> String {
    if health.last_poll_at.is_none() {
        return "-".into();
    }
    match health.last_poll_duration_ms {
        ms @ 0..1000 => format!("{ms} ms"),
        ms => format!("{:.1} s", f64::from(ms) / 1000.0),
    }
}

fn print_detail(s: &Server) -> std::io::Result<()> {
    let health = s.health.clone().unwrap_or_default();
    let auth = match (output::auth_kind_name(s.auth_kind), s.has_passphrase) {
        ("password", _) => "password".to_string(),
        ("private_key", true) => "private key (with passphrase)".to_string(),
        ("private_key", false) => "private key".to_string(),
        (other, _) => other.to_string(),
    };
    output::print_fields(&[
        ("ID", s.id.to_string()),
        ("Name", s.name.clone()),
        ("Host", format!("{}:{}", s.hostname, s.port)),
        ("User", s.username.clone()),
        ("Auth", auth),
        ("Host key", output::or_dash(&s.host_key_fingerprint)),
        ("Site", output::or_dash(&s.site)),
        ("Max sessions", s.max_sessions.to_string()),
        ("Enabled", output::yes_no(s.enabled)),
        ("Created", output::time_and_age(s.created_at.as_ref())),
        ("Updated", output::time_and_age(s.updated_at.as_ref())),
        ("Poller", output::or_dash(&health.poller_agent)),
        ("Last poll", last_poll(&health)),
        ("Poll duration", poll_duration(&health)),
        ("Last error", output::or_dash(&health.last_error)),
    ])
}

/// JSON shape of a server (secrets are never part of the message).
pub(crate) fn server_json(s: &Server) -> Value {
    let health = s.health.clone().unwrap_or_default();
    json!({
        "id": s.id,
        "name": s.name,
        "hostname": s.hostname,
        "port": s.port,
        "username": s.username,
        "auth_kind": output::auth_kind_name(s.auth_kind),
        "has_passphrase": s.has_passphrase,
        "host_key_fingerprint": output::json_opt(&s.host_key_fingerprint),
        "site": s.site,
        "max_sessions": s.max_sessions,
        "enabled": s.enabled,
        "created_at": output::json_time(s.created_at.as_ref()),
        "updated_at": output::json_time(s.updated_at.as_ref()),
        "health": {
            "poller_agent": output::json_opt(&health.poller_agent),
            "last_poll_at": output::json_time(health.last_poll_at.as_ref()),
            "last_poll_files": health.last_poll_files,
            "last_poll_duration_ms": health
                .last_poll_at
                .is_some()
                .then_some(health.last_poll_duration_ms),
            "last_error": output::json_opt(&health.last_error),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_trailing_newline_is_dropped() {
        assert_eq!(strip_newline("pw\n".into()), "pw");
        assert_eq!(strip_newline("pw\r\n".into()), "pw");
        assert_eq!(strip_newline("pw\n\n".into()), "pw\n");
        assert_eq!(strip_newline("pw ".into()), "pw ");
    }

    #[test]
    fn server_json_uses_names_and_rfc3339() {
        let server = Server {
            id: 3,
            name: "s1".into(),
            auth_kind: ferry_proto::AuthKind::PrivateKey as i32,
            created_at: Some(prost_types::Timestamp {
                seconds: 0,
                nanos: 0,
            }),
            ..Server::default()
        };
        let v = server_json(&server);
        assert_eq!(v["auth_kind"], "private_key");
        assert_eq!(v["created_at"], "1970-01-01T00:00:00Z");
        assert_eq!(v["health"]["last_error"], Value::Null);
        assert_eq!(v["health"]["last_poll_duration_ms"], Value::Null);
    }

    #[test]
    fn poll_durations_read_naturally() {
        let polled = |ms| ferry_proto::ServerHealth {
            last_poll_at: Some(prost_types::Timestamp::default()),
            last_poll_duration_ms: ms,
            ..Default::default()
        };
        assert_eq!(poll_duration(&ferry_proto::ServerHealth::default()), "-");
        assert_eq!(poll_duration(&polled(840)), "840 ms");
        assert_eq!(poll_duration(&polled(12_340)), "12.3 s");
    }
}
