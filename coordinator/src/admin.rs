//! `ferry.v1.AdminService`: validates admin requests, applies them to the
//! registry, and answers queries over files and agents.

use std::pin::Pin;

use ferry_common::domain::{AgentId, FileStatus, PostAction, Role};
use ferry_common::validate::{self, AgentRef, FieldError};
use ferry_proto::convert::post_action_from_proto;
use ferry_proto::{
    self as proto, add_server_request, admin_service_server::AdminService, update_server_request,
};
use futures::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::agents::AgentStreams;
use crate::convert;
use crate::error::{ApiError, ApiResult};
use crate::events;
use crate::files::{self, FileFilter, RetrySelection};
use crate::hostkey;
use crate::paging::{self, Listing};
use crate::registry::{self, ServerSpec, WatchSpec};
use crate::secrets::Credential;
use crate::state::Coordinator;
use crate::status;

/// The admin API of one coordinator.
#[derive(Clone)]
pub(crate) struct Admin {
    pub coord: Coordinator,
    /// This coordinator's agent streams, through which host keys are probed.
    pub agents: AgentStreams,
}

type Rpc<T> = Result<Response<T>, Status>;

fn ok<T>(v: ApiResult<T>) -> Rpc<T> {
    v.map(Response::new).map_err(Status::from)
}

/// Who made a change, for the file history ("admin:<name>").
fn actor<T>(req: &Request<T>) -> String {
    match ferry_proto::tls::peer_role(req) {
        Some(Role::Admin(name)) => format!("admin:{name}"),
        _ => "admin:unknown".into(),
    }
}

fn none_if_zero(v: i64) -> Option<i64> {
    (v != 0).then_some(v)
}

/// Where a server is, for reading its host key: through an agent of `site`.
struct ProbeTarget<'a> {
    site: &'a str,
    hostname: &'a str,
    port: u16,
}

/// Resolves the host key to pin: the given fingerprint, or the one the server
/// presents now (read by an agent of its site) when trust-on-first-use was
/// asked for explicitly.
async fn host_key_to_pin(
    agents: &AgentStreams,
    given: Option<&str>,
    trust: bool,
    target: ProbeTarget<'_>,
) -> ApiResult<String> {
    let given = given.filter(|g| !g.is_empty());
    match (given, trust) {
        (Some(_), true) => Err(FieldError::new(
            "host_key_fingerprint",
            "give either host_key_fingerprint or trust_host_key, not both",
        )
        .into()),
        (Some(fp), false) => {
            validate::host_key_fingerprint(fp)?;
            Ok(fp.to_string())
        }
        (None, true) => {
            let probed = agents
                .probe_host_key(target.site, target.hostname, target.port)
                .await?;
            Ok(probed.fingerprint)
        }
        (None, false) => Err(FieldError::new(
            "host_key_fingerprint",
            "required: pin the server's SSH host key with --host-key SHA256:... \
             (`ssh-keygen -lf` of its host key, or `ferryctl servers probe --host HOST`), \
             or pass --trust-host-key to pin the key it presents now",
        )
        .into()),
    }
}

impl Admin {
    async fn add_server(&self, r: proto::AddServerRequest) -> ApiResult<proto::Server> {
        validate::server_name(&r.name)?;
        validate::hostname(&r.hostname)?;
        let port = if r.port == 0 {
            22
        } else {
            validate::port(r.port)?
        };
        validate::username(&r.username)?;
        let credential = match &r.auth {
            None => {
                return Err(
                    FieldError::new("auth", "a password or a private_key is required").into(),
                );
            }
            Some(add_server_request::Auth::Password(p)) => {
                registry::password_credential(&p.password)?
            }
            Some(add_server_request::Auth::PrivateKey(k)) => {
                registry::key_credential(&k.pem, &k.passphrase)?
            }
        };
        let site = if r.site.is_empty() {
            "default".to_string()
        } else {
            r.site
        };
        validate::site(&site)?;
        let max_sessions = if r.max_sessions == 0 {
            4
        } else {
            validate::max_sessions(r.max_sessions)?
        };
        let fingerprint = host_key_to_pin(
            &self.agents,
            Some(&r.host_key_fingerprint),
            r.trust_host_key,
            ProbeTarget {
                site: &site,
                hostname: &r.hostname,
                port,
            },
        )
        .await?;
        let spec = ServerSpec {
            name: r.name,
            hostname: r.hostname,
            port,
            username: r.username,
            credential,
            host_key_fingerprint: fingerprint,
            site,
            max_sessions,
            enabled: r.enabled.unwrap_or(true),
        };
        spec.check()?;
        let row = registry::insert_server(&self.coord.db, &self.coord.secrets, &spec).await?;
        tracing::info!(server = %row.name, id = row.id, "server added");
        self.coord.registry_changed().await;
        Ok(convert::server(&row))
    }

    async fn update_server(&self, r: proto::UpdateServerRequest) -> ApiResult<proto::Server> {
        let db = &self.coord.db;
        let row = registry::get_server(db, r.id).await?;
        // A new password or key needs no stored one: that is how an operator
        // repairs a server whose stored credential no longer opens.
        let credential = match &r.auth {
            None => registry::server_credential(db, &self.coord.secrets, r.id).await?,
            Some(update_server_request::Auth::Password(p)) => {
                registry::password_credential(&p.password)?
            }
            Some(update_server_request::Auth::PrivateKey(k)) => {
                registry::key_credential(&k.pem, &k.passphrase)?
            }
            Some(update_server_request::Auth::Passphrase(passphrase)) => {
                // Only the passphrase changes: it must belong to the stored key.
                let current = registry::server_credential(db, &self.coord.secrets, r.id).await?;
                let Credential::PrivateKey { pem, .. } = &current else {
                    return Err(FieldError::new(
                        "passphrase",
                        "only applies to a private_key, and this server logs in with a password",
                    )
                    .into());
                };
                registry::key_credential(pem, passphrase)?
            }
        };
        let hostname = r.hostname.unwrap_or(row.hostname);
        validate::hostname(&hostname)?;
        let port = match r.port {
            Some(p) => validate::port(p)?,
            None => row.port as u16,
        };
        let site = r.site.clone().unwrap_or_else(|| row.site.clone());
        let fingerprint = if r.trust_host_key || r.host_key_fingerprint.is_some() {
            host_key_to_pin(
                &self.agents,
                r.host_key_fingerprint.as_deref(),
                r.trust_host_key,
                ProbeTarget {
                    site: &site,
                    hostname: &hostname,
                    port,
                },
            )
            .await?
        } else {
            row.host_key_fingerprint
        };
        let spec = ServerSpec {
            name: r.name.unwrap_or(row.name),
            hostname,
            port,
            username: r.username.unwrap_or(row.username),
            credential,
            host_key_fingerprint: fingerprint,
            site,
            max_sessions: match r.max_sessions {
                Some(n) => validate::max_sessions(n)?,
                None => row.max_sessions as u32,
            },
            enabled: r.enabled.unwrap_or(row.enabled),
        };
        spec.check()?;
        let row = registry::update_server(db, &self.coord.secrets, r.id, &spec).await?;
        tracing::info!(server = %row.name, id = row.id, "server updated");
        self.coord.registry_changed().await;
        Ok(convert::server(&row))
    }

    async fn add_watch(&self, r: proto::AddWatchRequest) -> ApiResult<proto::Watch> {
        if r.server_id <= 0 {
            return Err(FieldError::new("server_id", "is required").into());
        }
        let spec = WatchSpec {
            server_id: r.server_id,
            directory: r.directory,
            glob: r.glob,
            recursive: r.recursive,
            poll_interval_secs: if r.poll_interval_secs == 0 {
                30
            } else {
                r.poll_interval_secs
            },
            min_age_secs: r.min_age_secs.unwrap_or(0),
            bucket: r.bucket,
            key_template: r.key_template,
            post_action: match &r.post_action {
                Some(action) => post_action_from_proto(action)?,
                None => PostAction::Keep,
            },
            enabled: r.enabled.unwrap_or(true),
        }
        .checked()?;
        let row = registry::insert_watch(&self.coord.db, &spec, r.skip_existing).await?;
        tracing::info!(watch = row.id, server = %row.server_name, dir = %row.directory, skip_existing = r.skip_existing, "watch added");
        self.coord.registry_changed().await;
        Ok(convert::watch(&row))
    }

    async fn update_watch(&self, r: proto::UpdateWatchRequest) -> ApiResult<proto::Watch> {
        let row = registry::get_watch(&self.coord.db, r.id).await?;
        let spec = WatchSpec {
            server_id: row.server_id,
            directory: r.directory.unwrap_or(row.directory),
            glob: r.glob.unwrap_or(row.glob),
            recursive: r.recursive.unwrap_or(row.recursive),
            poll_interval_secs: r
                .poll_interval_secs
                .unwrap_or(row.poll_interval_secs as u32),
            min_age_secs: r.min_age_secs.unwrap_or(row.min_age_secs as u32),
            bucket: r.bucket.unwrap_or(row.bucket),
            key_template: r.key_template.unwrap_or(row.key_template),
            post_action: match &r.post_action {
                Some(action) => post_action_from_proto(action)?,
                None => row.post_action,
            },
            enabled: r.enabled.unwrap_or(row.enabled),
        }
        .checked()?;
        let row = registry::update_watch(&self.coord.db, r.id, &spec).await?;
        self.coord.registry_changed().await;
        Ok(convert::watch(&row))
    }

    async fn list_files(&self, r: proto::ListFilesRequest) -> ApiResult<proto::ListFilesResponse> {
        let mut statuses = statuses(&r.statuses, "statuses")?;
        statuses.sort_by_key(|s| s.as_str());
        statuses.dedup();
        let listing = Listing::new(
            "files",
            &format!(
                "statuses={};server={};watch={};newest_first={}",
                statuses
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                r.server_id,
                r.watch_id,
                r.newest_first
            ),
        );
        let after_id = match listing.start_after(&r.page_token)? {
            None => None,
            key => Some(paging::id_after(key)?),
        };
        let filter = FileFilter {
            statuses,
            server_id: none_if_zero(r.server_id),
            watch_id: none_if_zero(r.watch_id),
            newest_first: r.newest_first,
            after_id,
            limit: i64::from(paging::page_size(r.page_size)),
        };
        let (rows, more) = files::list_files(&self.coord.db, &filter).await?;
        let (files, next_page_token) = listing.cut(
            rows.iter().map(convert::file).collect(),
            more,
            |f| f.id.to_string(),
            paging::wire_len,
        );
        Ok(proto::ListFilesResponse {
            files,
            next_page_token,
        })
    }

    async fn list_servers(
        &self,
        r: proto::ListServersRequest,
    ) -> ApiResult<proto::ListServersResponse> {
        let listing = Listing::new("servers", "");
        let after_id = paging::id_after(listing.start_after(&r.page_token)?)?;
        let size = paging::page_size(r.page_size);
        let rows = registry::list_servers(&self.coord.db, after_id, i64::from(size) + 1).await?;
        let (servers, next_page_token) = listing.page_within(
            rows.iter().map(convert::server).collect(),
            size,
            |s| s.id.to_string(),
            paging::wire_len,
        );
        Ok(proto::ListServersResponse {
            servers,
            next_page_token,
        })
    }

    async fn list_watches(
        &self,
        r: proto::ListWatchesRequest,
    ) -> ApiResult<proto::ListWatchesResponse> {
        let listing = Listing::new("watches", &format!("server={}", r.server_id));
        let after_id = paging::id_after(listing.start_after(&r.page_token)?)?;
        let size = paging::page_size(r.page_size);
        let rows = registry::list_watches(
            &self.coord.db,
            none_if_zero(r.server_id),
            after_id,
            i64::from(size) + 1,
        )
        .await?;
        let (watches, next_page_token) = listing.page_within(
            rows.iter().map(convert::watch).collect(),
            size,
            |w| w.id.to_string(),
            paging::wire_len,
        );
        Ok(proto::ListWatchesResponse {
            watches,
            next_page_token,
        })
    }

    /// The agent an admin call names: its site and name, or a bare name
    /// that only one site's agent has.
    async fn resolve_agent(&self, site: &str, name: &str) -> ApiResult<AgentId> {
        let bare = match validate::agent_ref(site, name)? {
            AgentRef::Exact(id) => return Ok(id),
            AgentRef::Bare(name) => name,
        };
        let sites: Vec<String> =
            sqlx::query_scalar("SELECT site FROM agents WHERE name = $1 ORDER BY site")
                .bind(&bare)
                .fetch_all(&self.coord.db)
                .await?;
        match sites.as_slice() {
            [] => Err(ApiError::NotFound(format!(
                "no agent named {bare:?} is known; name it with its site as SITE/{bare} \
                 (or the site field) to act on one that never connected"
            ))),
            [one] => Ok(AgentId::new(one.clone(), bare)),
            many => Err(FieldError::new(
                "name",
                format!(
                    "agent name {bare:?} is ambiguous: agents of that name exist at the sites {}; \
                     name one as SITE/{bare} (e.g. {}/{bare}) or give the site field",
                    many.join(", "),
                    many[0]
                ),
            )
            .into()),
        }
    }

    /// The agent's row as the API shows it.
    async fn agent_row(&self, agent: &str) -> ApiResult<proto::Agent> {
        let row = files::list_agents(&self.coord.db, None, Some(agent), 1)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| ApiError::NotFound(format!("no agent {agent}")))?;
        Ok(convert::agent(&row))
    }

    async fn drain_agent(&self, r: proto::DrainAgentRequest) -> ApiResult<proto::Agent> {
        if r.name.is_empty() {
            return Err(FieldError::new("name", "give the agent's name").into());
        }
        let agent = self.resolve_agent(&r.site, &r.name).await?.to_string();
        let draining = !r.undo;
        let found = sqlx::query("UPDATE agents SET draining = $2 WHERE id = $1")
            .bind(&agent)
            .bind(draining)
            .execute(&self.coord.db)
            .await?
            .rows_affected();
        if found == 0 {
            return Err(ApiError::NotFound(format!(
                "no agent {agent} has ever connected"
            )));
        }
        tracing::info!(agent = %agent, draining, "agent drain set");
        // Fast path when the stream is here; otherwise its coordinator
        // notices on the agent's next heartbeat.
        self.agents.drain_changed(&agent, draining).await;
        self.agent_row(&agent).await
    }

    async fn revoke_agent(
        &self,
        r: proto::RevokeAgentRequest,
        actor: &str,
    ) -> ApiResult<proto::Agent> {
        let who = self.resolve_agent(&r.site, &r.name).await?;
        let agent = who.to_string();
        let db = &self.coord.db;
        if r.undo {
            let found =
                sqlx::query("UPDATE agents SET revoked_at = NULL, revoked_by = NULL WHERE id = $1")
                    .bind(&agent)
                    .execute(db)
                    .await?
                    .rows_affected();
            if found == 0 {
                return Err(ApiError::NotFound(format!("no agent {agent}")));
            }
            tracing::info!(agent = %agent, by = %actor, "agent revocation lifted");
        } else {
            let mut tx = db.begin().await?;
            // An agent that never connected gets a row too: its certificate
            // may have leaked before it was first used.
            sqlx::query(
                "INSERT INTO agents (name, site, revoked_at, revoked_by) VALUES ($1, $2, now(), $3) \
                 ON CONFLICT (site, name) DO UPDATE SET revoked_at = now(), revoked_by = $3",
            )
            .bind(&who.name)
            .bind(&who.site)
            .bind(actor)
            .execute(&mut *tx)
            .await?;
            // Its servers go to other agents of the site at once ...
            sqlx::query(
                "UPDATE servers SET poller_agent = NULL, poller_coordinator = NULL, \
                 poll_lease_expires_at = NULL WHERE poller_agent = $1",
            )
            .bind(&agent)
            .execute(&mut *tx)
            .await?;
            // ... and its running transfers are requeued by the lease reaper
            // (the stale agent's late results fail the fencing check).
            sqlx::query(
                "UPDATE files SET lease_expires_at = now() \
                 WHERE lease_owner = $1 AND status = 'in_progress'",
            )
            .bind(&agent)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            tracing::warn!(agent = %agent, by = %actor, "agent revoked");
            // Fast path when the stream is here; other coordinators close
            // theirs on the agent's next heartbeat.
            self.agents.close_agent(
                &agent,
                Status::permission_denied(format!(
                    "agent {agent} was revoked by {actor}; its certificate is refused"
                )),
            );
            self.coord.registry_changed().await;
            self.coord.files_due().await;
        }
        self.agent_row(&agent).await
    }

    async fn list_agents(
        &self,
        r: proto::ListAgentsRequest,
    ) -> ApiResult<proto::ListAgentsResponse> {
        let listing = Listing::new("agents", "");
        let after = listing.start_after(&r.page_token)?;
        let size = paging::page_size(r.page_size);
        let rows =
            files::list_agents(&self.coord.db, after.as_deref(), None, i64::from(size) + 1).await?;
        let (agents, next_page_token) = listing.page_within(
            rows.iter().map(convert::agent).collect(),
            size,
            |a| a.id.clone(),
            paging::wire_len,
        );
        Ok(proto::ListAgentsResponse {
            agents,
            next_page_token,
        })
    }
}

fn statuses(raw: &[i32], field: &'static str) -> Result<Vec<FileStatus>, FieldError> {
    raw.iter()
        .map(|s| {
            proto::FileStatus::try_from(*s)
                .ok()
                .and_then(ferry_proto::convert::status_from_proto)
                .ok_or_else(|| FieldError::new(field, format!("{s} is not a file status")))
        })
        .collect()
}

type EventStream = Pin<Box<dyn Stream<Item = Result<proto::FileEvent, Status>> + Send>>;

#[tonic::async_trait]
impl AdminService for Admin {
    async fn add_server(&self, req: Request<proto::AddServerRequest>) -> Rpc<proto::Server> {
        ok(Admin::add_server(self, req.into_inner()).await)
    }

    async fn update_server(&self, req: Request<proto::UpdateServerRequest>) -> Rpc<proto::Server> {
        ok(Admin::update_server(self, req.into_inner()).await)
    }

    async fn remove_server(
        &self,
        req: Request<proto::RemoveServerRequest>,
    ) -> Rpc<proto::RemoveServerResponse> {
        let id = req.into_inner().id;
        let result = registry::remove_server(&self.coord.db, id).await;
        if result.is_ok() {
            tracing::info!(server = id, "server removed");
            self.coord.registry_changed().await;
        }
        ok(result.map(|watches_removed| proto::RemoveServerResponse { watches_removed }))
    }

    async fn get_server(&self, req: Request<proto::GetServerRequest>) -> Rpc<proto::Server> {
        let r = req.into_inner();
        let row = match (r.id, r.name.as_str()) {
            (0, "") => Err(FieldError::new("id", "give a server id or name").into()),
            (0, name) => registry::get_server_by_name(&self.coord.db, name).await,
            (id, _) => registry::get_server(&self.coord.db, id).await,
        };
        ok(row.map(|r| convert::server(&r)))
    }

    async fn list_servers(
        &self,
        req: Request<proto::ListServersRequest>,
    ) -> Rpc<proto::ListServersResponse> {
        ok(Admin::list_servers(self, req.into_inner()).await)
    }

    async fn probe_host_key(
        &self,
        req: Request<proto::ProbeHostKeyRequest>,
    ) -> Rpc<proto::ProbeHostKeyResponse> {
        let r = req.into_inner();
        let result = async {
            validate::hostname(&r.hostname)?;
            let port = if r.port == 0 {
                22
            } else {
                validate::port(r.port)?
            };
            let site = if r.site.is_empty() {
                "default"
            } else {
                r.site.as_str()
            };
            validate::site(site)?;
            let probed = self.agents.probe_host_key(site, &r.hostname, port).await?;
            Ok(proto::ProbeHostKeyResponse {
                fingerprint: probed.fingerprint,
                key_algorithm: probed.algorithm,
            })
        }
        .await;
        ok(result)
    }

    async fn add_watch(&self, req: Request<proto::AddWatchRequest>) -> Rpc<proto::Watch> {
        ok(Admin::add_watch(self, req.into_inner()).await)
    }

    async fn update_watch(&self, req: Request<proto::UpdateWatchRequest>) -> Rpc<proto::Watch> {
        ok(Admin::update_watch(self, req.into_inner()).await)
    }

    async fn remove_watch(
        &self,
        req: Request<proto::RemoveWatchRequest>,
    ) -> Rpc<proto::RemoveWatchResponse> {
        let result = registry::remove_watch(&self.coord.db, req.into_inner().id).await;
        if result.is_ok() {
            self.coord.registry_changed().await;
        }
        ok(result.map(|()| proto::RemoveWatchResponse {}))
    }

    async fn list_watches(
        &self,
        req: Request<proto::ListWatchesRequest>,
    ) -> Rpc<proto::ListWatchesResponse> {
        ok(Admin::list_watches(self, req.into_inner()).await)
    }

    async fn list_files(
        &self,
        req: Request<proto::ListFilesRequest>,
    ) -> Rpc<proto::ListFilesResponse> {
        ok(Admin::list_files(self, req.into_inner()).await)
    }

    async fn get_file(&self, req: Request<proto::GetFileRequest>) -> Rpc<proto::GetFileResponse> {
        let id = req.into_inner().id;
        let result = async {
            let file = convert::file(&files::get_file(&self.coord.db, id).await?);
            let events = files::file_events(&self.coord.db, id).await?;
            let (events, omitted) = paging::newest_within(
                events.iter().map(convert::event).collect(),
                paging::MAX_PAGE_BYTES.saturating_sub(paging::wire_len(&file)),
                paging::wire_len,
            );
            Ok(proto::GetFileResponse {
                file: Some(file),
                events,
                earlier_events_omitted: omitted as u64,
            })
        }
        .await;
        ok(result)
    }

    async fn retry_files(
        &self,
        req: Request<proto::RetryFilesRequest>,
    ) -> Rpc<proto::RetryFilesResponse> {
        let actor = actor(&req);
        let r = req.into_inner();
        let result = async {
            let statuses = statuses(&r.statuses, "statuses")?;
            if let Some(bad) = statuses.iter().find(|s| !s.is_retryable_by_admin()) {
                return Err(FieldError::new(
                    "statuses",
                    format!("{bad} files cannot be retried (only error, failed, lost, skipped)"),
                )
                .into());
            }
            let sel = RetrySelection {
                ids: r.ids,
                statuses,
                server_id: none_if_zero(r.server_id),
                dry_run: r.dry_run,
            };
            let outcome =
                files::retry_files(&self.coord.db, &sel, &actor, &self.agents.settings.retry)
                    .await?;
            if !r.dry_run {
                self.coord.files_due().await;
            }
            Ok(proto::RetryFilesResponse {
                requeued: outcome.count,
                file_ids: outcome.file_ids,
            })
        }
        .await;
        ok(result)
    }

    async fn get_status(
        &self,
        _req: Request<proto::GetStatusRequest>,
    ) -> Rpc<proto::GetStatusResponse> {
        let result = status::status(&self.coord.db).await;
        ok(result.map(|rows| convert::system_status(&rows)))
    }

    async fn list_agents(
        &self,
        req: Request<proto::ListAgentsRequest>,
    ) -> Rpc<proto::ListAgentsResponse> {
        ok(Admin::list_agents(self, req.into_inner()).await)
    }

    async fn drain_agent(&self, req: Request<proto::DrainAgentRequest>) -> Rpc<proto::Agent> {
        ok(Admin::drain_agent(self, req.into_inner()).await)
    }

    async fn revoke_agent(&self, req: Request<proto::RevokeAgentRequest>) -> Rpc<proto::Agent> {
        let who = actor(&req);
        ok(Admin::revoke_agent(self, req.into_inner(), &who).await)
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        req: Request<proto::WatchEventsRequest>,
    ) -> Rpc<Self::WatchEventsStream> {
        let r = req.into_inner();
        let filter = events::Filter {
            server_id: none_if_zero(r.server_id),
            watch_id: none_if_zero(r.watch_id),
        };
        let resumed = events::Cursor::resume(filter, &r.resume_token)
            .map_err(|e| Status::from(ApiError::from(e)))?;
        let wake = self.coord.subscribe_file_events();
        let cursor = match resumed {
            Some(cursor) => cursor,
            // Every event of a transaction that finishes after this point
            // is delivered exactly once (see `files::event_horizon`).
            None => events::Cursor::starting_at(
                files::event_horizon(&self.coord.db)
                    .await
                    .map_err(Status::from)?,
            ),
        };
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        tokio::spawn(events::stream(
            self.coord.db.clone(),
            wake,
            filter,
            cursor,
            tx,
        ));
        Ok(Response::new(
            Box::pin(ReceiverStream::new(rx)) as EventStream
        ))
    }
}

impl From<hostkey::ProbeError> for ApiError {
    fn from(e: hostkey::ProbeError) -> Self {
        ApiError::Unavailable(e.to_string())
    }
}
