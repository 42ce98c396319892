//! The server and watch registry: validated specs and their Postgres rows.
//!
//! **Invariant:** every write here is preceded by full validation of the
//! request, so a rejected request writes nothing.

use chrono::{DateTime, Utc};
use ferry_common::domain::PostAction;
use ferry_common::overlap::{self, PendingMove, WatchTree};
use ferry_common::validate::{self, FieldError};
use sqlx::{PgPool, Postgres, Transaction};

use crate::error::{ApiError, ApiResult, is_unique_violation};
use crate::secrets::{Binding, Credential, SealError, SealFormat, SecretBox};

/// A server as stored, without its secret.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct ServerRow {
    pub id: i64,
    pub name: String,
    pub hostname: String,
    pub port: i32,
    pub username: String,
    pub auth_kind: String,
    pub has_passphrase: bool,
    pub host_key_fingerprint: String,
    pub site: String,
    pub max_sessions: i32,
    pub enabled: bool,
    pub poller_agent: Option<String>,
    pub poll_lease_expires_at: Option<DateTime<Utc>>,
    pub last_poll_at: Option<DateTime<Utc>>,
    pub last_poll_files: Option<i64>,
    pub last_poll_error: Option<String>,
    pub last_poll_duration_ms: Option<i32>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

const SERVER_COLUMNS: &str = "id, name, hostname, port, username, auth_kind, has_passphrase, \
    host_key_fingerprint, site, max_sessions, enabled, poller_agent, poll_lease_expires_at, \
    last_poll_at, last_poll_files, last_poll_error, last_poll_duration_ms, created_at, updated_at";

/// A fully validated server definition.
#[derive(Debug, Clone)]
pub(crate) struct ServerSpec {
    pub name: String,
    pub hostname: String,
    pub port: u16,
    pub username: String,
    pub credential: Credential,
    pub host_key_fingerprint: String,
    pub site: String,
    pub max_sessions: u32,
    pub enabled: bool,
}

/// Checks a password credential.
pub(crate) fn password_credential(password: &str) -> Result<Credential, FieldError> {
    if password.is_empty() {
        return Err(FieldError::new("password", "must not be empty"));
    }
    Ok(Credential::Password(password.to_string()))
}

/// Checks a private-key credential: a key that parses, and a passphrase when
/// the key is encrypted. An empty passphrase means "none".
pub(crate) fn key_credential(pem: &str, passphrase: &str) -> Result<Credential, FieldError> {
    if pem.trim().is_empty() {
        return Err(FieldError::new("private_key", "must not be empty"));
    }
    let passphrase = (!passphrase.is_empty()).then_some(passphrase);
    let protection = validate::private_key_shape(pem)?;
    if protection == validate::KeyProtection::Encrypted && passphrase.is_none() {
        return Err(FieldError::new(
            "passphrase",
            "the private_key is encrypted: a passphrase is required",
        ));
    }
    Ok(Credential::PrivateKey {
        pem: pem.to_string(),
        passphrase: passphrase.map(str::to_string),
    })
}

impl ServerSpec {
    /// Validates every field except the credential (checked by [`password_credential`]
    /// and [`key_credential`]).
    pub(crate) fn check(&self) -> Result<(), FieldError> {
        validate::server_name(&self.name)?;
        validate::hostname(&self.hostname)?;
        validate::port(u32::from(self.port))?;
        validate::username(&self.username)?;
        validate::host_key_fingerprint(&self.host_key_fingerprint)?;
        validate::site(&self.site)?;
        validate::max_sessions(self.max_sessions)?;
        Ok(())
    }

    /// The binding of this spec's credential to the row with `id`.
    fn binding(&self, id: i64) -> Binding<'_> {
        Binding {
            server_id: id,
            hostname: &self.hostname,
            port: i32::from(self.port),
            username: &self.username,
            host_key_fingerprint: &self.host_key_fingerprint,
            site: &self.site,
        }
    }
}

fn map_server_write_error(e: sqlx::Error, name: &str) -> ApiError {
    if is_unique_violation(&e, "servers_name_live") {
        ApiError::AlreadyExists(format!("a server named {name:?} already exists"))
    } else {
        e.into()
    }
}

type ServerQuery<'q> = sqlx::query::QueryAs<'q, Postgres, ServerRow, sqlx::postgres::PgArguments>;

/// Binds `$1..$11` of the insert and the update, in column order.
fn bind_spec<'q>(q: ServerQuery<'q>, spec: &'q ServerSpec, sealed: Vec<u8>) -> ServerQuery<'q> {
    q.bind(&spec.name)
        .bind(&spec.hostname)
        .bind(i32::from(spec.port))
        .bind(&spec.username)
        .bind(spec.credential.kind())
        .bind(sealed)
        .bind(spec.credential.has_passphrase())
        .bind(&spec.host_key_fingerprint)
        .bind(&spec.site)
        .bind(spec.max_sessions as i32)
        .bind(spec.enabled)
}

/// Inserts a server. Its id is taken from the sequence first, so the
/// credential is sealed bound to the row before the row exists.
pub(crate) async fn insert_server(
    db: &PgPool,
    secrets: &SecretBox,
    spec: &ServerSpec,
) -> ApiResult<ServerRow> {
    let id: i64 = sqlx::query_scalar("SELECT nextval(pg_get_serial_sequence('servers', 'id'))")
        .fetch_one(db)
        .await?;
    let sealed = secrets.seal(&spec.credential, &spec.binding(id))?;
    let sql = format!(
        "INSERT INTO servers (name, hostname, port, username, auth_kind, secret_ciphertext, \
         has_passphrase, host_key_fingerprint, site, max_sessions, enabled, id, secret_format) \
         VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13) RETURNING {SERVER_COLUMNS}"
    );
    bind_spec(sqlx::query_as(&sql), spec, sealed)
        .bind(id)
        .bind(SealFormat::BOUND)
        .fetch_one(db)
        .await
        .map_err(|e| map_server_write_error(e, &spec.name))
}

/// Updates a live server. The credential is always re-sealed: it is bound to
/// the connection fields, which may be changing.
pub(crate) async fn update_server(
    db: &PgPool,
    secrets: &SecretBox,
    id: i64,
    spec: &ServerSpec,
) -> ApiResult<ServerRow> {
    let sealed = secrets.seal(&spec.credential, &spec.binding(id))?;
    let sql = format!(
        "UPDATE servers SET name=$1, hostname=$2, port=$3, username=$4, \
         auth_kind=$5, secret_ciphertext=$6, has_passphrase=$7, \
         host_key_fingerprint=$8, site=$9, max_sessions=$10, enabled=$11, updated_at=now(), \
         secret_format=$13, \
         poller_agent = CASE WHEN site IS DISTINCT FROM $9 THEN NULL ELSE poller_agent END, \
         poller_coordinator = CASE WHEN site IS DISTINCT FROM $9 THEN NULL ELSE poller_coordinator END, \
         poll_lease_expires_at = CASE WHEN site IS DISTINCT FROM $9 THEN NULL ELSE poll_lease_expires_at END \
         WHERE id=$12 AND deleted_at IS NULL RETURNING {SERVER_COLUMNS}"
    );
    bind_spec(sqlx::query_as(&sql), spec, sealed)
        .bind(id)
        .bind(SealFormat::BOUND)
        .fetch_optional(db)
        .await
        .map_err(|e| map_server_write_error(e, &spec.name))?
        .ok_or_else(|| server_not_found(id))
}

pub(crate) fn server_not_found(id: i64) -> ApiError {
    ApiError::NotFound(format!("no server with id {id}"))
}

pub(crate) async fn get_server(db: &PgPool, id: i64) -> ApiResult<ServerRow> {
    let sql = format!("SELECT {SERVER_COLUMNS} FROM servers WHERE id=$1 AND deleted_at IS NULL");
    sqlx::query_as::<_, ServerRow>(&sql)
        .bind(id)
        .fetch_optional(db)
        .await?
        .ok_or_else(|| server_not_found(id))
}

pub(crate) async fn get_server_by_name(db: &PgPool, name: &str) -> ApiResult<ServerRow> {
    let sql = format!("SELECT {SERVER_COLUMNS} FROM servers WHERE name=$1 AND deleted_at IS NULL");
    sqlx::query_as::<_, ServerRow>(&sql)
        .bind(name)
        .fetch_optional(db)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no server named {name:?}")))
}

/// Up to `limit` live servers with ids above `after_id`, in id order.
pub(crate) async fn list_servers(
    db: &PgPool,
    after_id: i64,
    limit: i64,
) -> ApiResult<Vec<ServerRow>> {
    let sql = format!(
        "SELECT {SERVER_COLUMNS} FROM servers WHERE deleted_at IS NULL AND id > $1 \
         ORDER BY id LIMIT $2"
    );
    Ok(sqlx::query_as::<_, ServerRow>(&sql)
        .bind(after_id)
        .bind(limit)
        .fetch_all(db)
        .await?)
}

/// Decrypts the credential of a live server.
pub(crate) async fn server_credential(
    db: &PgPool,
    secrets: &SecretBox,
    id: i64,
) -> ApiResult<Credential> {
    let sql = format!("SELECT {CONNECTION_COLUMNS} FROM servers s WHERE s.id=$1");
    let row = sqlx::query_as::<_, ConnectionRow>(&sql)
        .bind(id)
        .fetch_optional(db)
        .await?
        .ok_or_else(|| server_not_found(id))?;
    row.credential(secrets).map_err(|e| {
        ApiError::FailedPrecondition(format!("{e}; set the server's credential again"))
    })
}

/// Soft-deletes a server and its watches: polling stops at once, files and
/// their history stay (the name becomes free for reuse). Returns the number of
/// watches removed.
pub(crate) async fn remove_server(db: &PgPool, id: i64) -> ApiResult<u32> {
    let mut tx: Transaction<'_, Postgres> = db.begin().await?;
    let found = sqlx::query(
        "UPDATE servers SET deleted_at=now(), enabled=false, poller_agent=NULL, \
         poller_coordinator=NULL, poll_lease_expires_at=NULL, updated_at=now() \
         WHERE id=$1 AND deleted_at IS NULL",
    )
    .bind(id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if found == 0 {
        return Err(server_not_found(id));
    }
    let watches = sqlx::query(
        "UPDATE watches SET deleted_at=now(), enabled=false, updated_at=now() \
         WHERE server_id=$1 AND deleted_at IS NULL",
    )
    .bind(id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok(watches as u32)
}

// ------------------------------------------------------------------ watches

#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct WatchRow {
    pub id: i64,
    pub server_id: i64,
    pub server_name: String,
    pub directory: String,
    pub glob: String,
    pub recursive: bool,
    pub poll_interval_secs: i32,
    pub min_age_secs: i32,
    pub bucket: String,
    pub key_template: String,
    #[sqlx(try_from = "String")]
    pub post_action: PostAction,
    pub enabled: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Added with "skip existing files" and its baseline not recorded yet.
    pub baseline_pending: bool,
}

const WATCH_SELECT: &str = "SELECT w.id, w.server_id, s.name AS server_name, w.directory, w.glob, \
    w.recursive, w.poll_interval_secs, w.min_age_secs, w.bucket, w.key_template, w.post_action, \
    w.enabled, w.created_at, w.updated_at, w.baseline_pending FROM watches w JOIN servers s ON s.id = w.server_id";

/// A fully validated watch definition.
#[derive(Debug, Clone)]
pub(crate) struct WatchSpec {
    pub server_id: i64,
    pub directory: String,
    pub glob: String,
    pub recursive: bool,
    pub poll_interval_secs: u32,
    pub min_age_secs: u32,
    pub bucket: String,
    pub key_template: String,
    pub post_action: PostAction,
    pub enabled: bool,
}

impl WatchSpec {
    /// Validates and normalizes every field (on its own; the checks against
    /// the server's other watches run where the watch is written).
    pub(crate) fn checked(mut self) -> Result<Self, FieldError> {
        self.directory = validate::directory(&self.directory)?;
        if let PostAction::Move(target) = &self.post_action {
            // Again: an update keeps the stored action, which may predate the rule.
            self.post_action = validate::post_action_move(target)?;
        }
        self.glob = validate::glob(&self.glob)?;
        self.poll_interval_secs = validate::poll_interval_secs(self.poll_interval_secs)?;
        self.min_age_secs = validate::min_age_secs(self.min_age_secs)?;
        validate::bucket(&self.bucket)?;
        self.key_template = ferry_common::keys::check_template(&self.key_template, self.recursive)?;
        overlap::check_against(&self.tree(0), &[], &[])?;
        Ok(self)
    }

    fn tree(&self, id: i64) -> WatchTree<'_> {
        WatchTree {
            id,
            directory: &self.directory,
            glob: &self.glob,
            recursive: self.recursive,
            move_target: match &self.post_action {
                PostAction::Move(target) => Some(target),
                _ => None,
            },
        }
    }
}

/// A live watch of a server, as the overlap checks see it.
#[derive(Debug, sqlx::FromRow)]
struct TreeRow {
    id: i64,
    directory: String,
    glob: String,
    recursive: bool,
    #[sqlx(try_from = "String")]
    post_action: PostAction,
}

/// Move targets of a server's files whose post-action is still to come
/// without an admin's action, by watch: versions on their way to `processed`
/// or processed and not yet answered for good, of live watches (a removed
/// watch's files get no post-action). `failed`, `lost` and `skipped` files
/// move only after an admin retries them, and do not count. Two branches, so
/// each has its index: `files_server_status` for the unfinished statuses,
/// `files_post_action_due` for processed files.
const PENDING_MOVES: &str = "SELECT p.post_action, p.watch_id, count(*) AS files FROM ( \
      SELECT f.post_action, f.watch_id FROM files f WHERE f.server_id = $1 \
        AND f.status IN ('new', 'in_progress', 'uploaded', 'error') \
        AND f.post_action LIKE 'move:%' AND f.post_action_result IS NULL \
      UNION ALL \
      SELECT f.post_action, f.watch_id FROM files f WHERE f.server_id = $1 \
        AND f.status = 'processed' AND f.post_action_result IS NULL \
        AND f.post_action <> 'keep' AND f.post_action LIKE 'move:%' \
    ) p JOIN watches w ON w.id = p.watch_id AND w.deleted_at IS NULL \
    GROUP BY p.post_action, p.watch_id ORDER BY p.watch_id, p.post_action";

#[derive(Debug, sqlx::FromRow)]
struct PendingMoveRow {
    #[sqlx(try_from = "String")]
    post_action: PostAction,
    watch_id: i64,
    files: i64,
}

/// A stored move target, in the form the overlap rule compares.
fn stored_target(action: &PostAction) -> Option<String> {
    match action {
        PostAction::Move(target) => Some(overlap::lexically_normal(target)),
        _ => None,
    }
}

/// Locks the (live) server against concurrent watch writes and checks the
/// watch `id` (0 when new) against the server's other live watches and the
/// moves pending on its files, so two watches of one server never overlap and
/// no move target, configured or snapshotted, lies in a watched tree.
/// Disabled watches count: enabling them is not re-checked. Stored
/// directories are compared in their lexically normal form (rows written
/// before `.`, `..` and `//` were refused).
async fn check_server_watches(
    tx: &mut Transaction<'_, Postgres>,
    id: i64,
    spec: &WatchSpec,
) -> ApiResult<()> {
    let live: Option<i64> =
        sqlx::query_scalar("SELECT id FROM servers WHERE id=$1 AND deleted_at IS NULL FOR UPDATE")
            .bind(spec.server_id)
            .fetch_optional(&mut **tx)
            .await?;
    if live.is_none() {
        return Err(server_not_found(spec.server_id));
    }
    let rows = sqlx::query_as::<_, TreeRow>(
        "SELECT id, directory, glob, recursive, post_action FROM watches \
         WHERE server_id=$1 AND deleted_at IS NULL AND id <> $2 ORDER BY id",
    )
    .bind(spec.server_id)
    .bind(id)
    .fetch_all(&mut **tx)
    .await?;
    let stored: Vec<(String, Option<String>)> = rows
        .iter()
        .map(|r| {
            (
                overlap::lexically_normal(&r.directory),
                stored_target(&r.post_action),
            )
        })
        .collect();
    let others: Vec<WatchTree<'_>> = rows
        .iter()
        .zip(&stored)
        .map(|(r, (directory, target))| WatchTree {
            id: r.id,
            directory,
            glob: &r.glob,
            recursive: r.recursive,
            move_target: target.as_deref(),
        })
        .collect();
    let pending_rows = sqlx::query_as::<_, PendingMoveRow>(PENDING_MOVES)
        .bind(spec.server_id)
        .fetch_all(&mut **tx)
        .await?;
    let targets: Vec<Option<String>> = pending_rows
        .iter()
        .map(|r| stored_target(&r.post_action))
        .collect();
    let pending: Vec<PendingMove<'_>> = pending_rows
        .iter()
        .zip(&targets)
        .filter_map(|(r, target)| {
            Some(PendingMove {
                target: target.as_deref()?,
                watch_id: r.watch_id,
                files: r.files,
            })
        })
        .collect();
    overlap::check_against(&spec.tree(id), &others, &pending)?;
    Ok(())
}

pub(crate) fn watch_not_found(id: i64) -> ApiError {
    ApiError::NotFound(format!("no watch with id {id}"))
}

/// Adds a watch; with `skip_existing`, the files its first listing finds are
/// recorded as `skipped` (see [`crate::discovery`]).
pub(crate) async fn insert_watch(
    db: &PgPool,
    spec: &WatchSpec,
    skip_existing: bool,
) -> ApiResult<WatchRow> {
    let mut tx = db.begin().await?;
    check_server_watches(&mut tx, 0, spec).await?;
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO watches (server_id, directory, glob, recursive, poll_interval_secs, \
         min_age_secs, bucket, key_template, post_action, enabled, baseline_pending) \
         VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11) RETURNING id",
    )
    .bind(spec.server_id)
    .bind(&spec.directory)
    .bind(&spec.glob)
    .bind(spec.recursive)
    .bind(spec.poll_interval_secs as i32)
    .bind(spec.min_age_secs as i32)
    .bind(&spec.bucket)
    .bind(&spec.key_template)
    .bind(spec.post_action.to_string())
    .bind(spec.enabled)
    .bind(skip_existing)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    get_watch(db, id).await
}

pub(crate) async fn update_watch(db: &PgPool, id: i64, spec: &WatchSpec) -> ApiResult<WatchRow> {
    let mut tx = db.begin().await?;
    check_server_watches(&mut tx, id, spec).await?;
    let n = sqlx::query(
        "UPDATE watches SET directory=$2, glob=$3, recursive=$4, poll_interval_secs=$5, \
         min_age_secs=$6, bucket=$7, key_template=$8, post_action=$9, enabled=$10, updated_at=now() \
         WHERE id=$1 AND deleted_at IS NULL",
    )
    .bind(id)
    .bind(&spec.directory)
    .bind(&spec.glob)
    .bind(spec.recursive)
    .bind(spec.poll_interval_secs as i32)
    .bind(spec.min_age_secs as i32)
    .bind(&spec.bucket)
    .bind(&spec.key_template)
    .bind(spec.post_action.to_string())
    .bind(spec.enabled)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if n == 0 {
        return Err(watch_not_found(id));
    }
    tx.commit().await?;
    get_watch(db, id).await
}

pub(crate) async fn get_watch(db: &PgPool, id: i64) -> ApiResult<WatchRow> {
    let sql = format!("{WATCH_SELECT} WHERE w.id=$1 AND w.deleted_at IS NULL");
    sqlx::query_as::<_, WatchRow>(&sql)
        .bind(id)
        .fetch_optional(db)
        .await?
        .ok_or_else(|| watch_not_found(id))
}

/// Up to `limit` live watches with ids above `after_id`, of one server or
/// (`None`) of all, in id order.
pub(crate) async fn list_watches(
    db: &PgPool,
    server_id: Option<i64>,
    after_id: i64,
    limit: i64,
) -> ApiResult<Vec<WatchRow>> {
    let sql = format!(
        "{WATCH_SELECT} WHERE w.deleted_at IS NULL AND ($1::BIGINT IS NULL OR w.server_id=$1) \
         AND w.id > $2 ORDER BY w.id LIMIT $3"
    );
    Ok(sqlx::query_as::<_, WatchRow>(&sql)
        .bind(server_id)
        .bind(after_id)
        .bind(limit)
        .fetch_all(db)
        .await?)
}

pub(crate) async fn remove_watch(db: &PgPool, id: i64) -> ApiResult<()> {
    let n = sqlx::query(
        "UPDATE watches SET deleted_at=now(), enabled=false, updated_at=now() \
         WHERE id=$1 AND deleted_at IS NULL",
    )
    .bind(id)
    .execute(db)
    .await?
    .rows_affected();
    if n == 0 {
        return Err(watch_not_found(id));
    }
    Ok(())
}

/// How to reach a server, as the agents need it (credential still sealed).
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct ConnectionRow {
    pub server_id: i64,
    pub name: String,
    pub hostname: String,
    pub port: i32,
    pub username: String,
    pub secret_ciphertext: Vec<u8>,
    /// How `secret_ciphertext` is sealed (`SealFormat`).
    pub secret_format: i16,
    pub host_key_fingerprint: String,
    /// The server's site (part of the credential's binding).
    pub server_site: String,
    pub max_sessions: i32,
}

/// Columns of [`ConnectionRow`] from `servers s`.
pub(crate) const CONNECTION_COLUMNS: &str = "s.id AS server_id, s.name, s.hostname, s.port, s.username, \
    s.secret_ciphertext, s.secret_format, s.host_key_fingerprint, s.site AS server_site, s.max_sessions";

/// A server's credential that cannot be opened for its row.
#[derive(Debug, thiserror::Error)]
#[error("credential of server {name:?} (id {server_id}) {problem}")]
pub(crate) struct CredentialError {
    pub server_id: i64,
    pub name: String,
    problem: String,
}

impl CredentialError {
    fn new(server_id: i64, name: &str, e: SealError) -> Self {
        let problem = match e {
            SealError::Mismatch => "does not match its connection fields: was the row changed \
                outside ferry? (or FERRY_SECRET_KEY_FILE is not the key it was sealed with)"
                .to_string(),
            other => format!("cannot be opened: {other}"),
        };
        CredentialError {
            server_id,
            name: name.to_string(),
            problem,
        }
    }
}

impl ConnectionRow {
    pub(crate) fn binding(&self) -> Binding<'_> {
        Binding {
            server_id: self.server_id,
            hostname: &self.hostname,
            port: self.port,
            username: &self.username,
            host_key_fingerprint: &self.host_key_fingerprint,
            site: &self.server_site,
        }
    }

    /// The decrypted credential, if it was sealed for exactly this row.
    pub(crate) fn credential(&self, secrets: &SecretBox) -> Result<Credential, CredentialError> {
        SealFormat::from_column(self.secret_format)
            .and_then(|format| secrets.open(format, &self.secret_ciphertext, &self.binding()))
            .map_err(|e| CredentialError::new(self.server_id, &self.name, e))
    }

    /// [`ConnectionRow::connection`] for callers that only report the error.
    pub(crate) fn to_proto(
        &self,
        secrets: &SecretBox,
    ) -> anyhow::Result<ferry_proto::ServerConnection> {
        Ok(self.connection(secrets)?)
    }

    /// The connection with its decrypted credential, for the agent that needs
    /// it; nothing when the credential was not sealed for exactly this row.
    pub(crate) fn connection(
        &self,
        secrets: &SecretBox,
    ) -> Result<ferry_proto::ServerConnection, CredentialError> {
        use ferry_proto::server_connection::Auth;
        let auth = match self.credential(secrets)? {
            Credential::Password(password) => Auth::Password(ferry_proto::Password { password }),
            Credential::PrivateKey { pem, passphrase } => {
                Auth::PrivateKey(ferry_proto::PrivateKey {
                    pem,
                    passphrase: passphrase.unwrap_or_default(),
                })
            }
        };
        Ok(ferry_proto::ServerConnection {
            server_id: self.server_id,
            name: self.name.clone(),
            hostname: self.hostname.clone(),
            port: self.port as u32,
            username: self.username.clone(),
            auth: Some(auth),
            host_key_fingerprint: self.host_key_fingerprint.clone(),
            max_sessions: self.max_sessions as u32,
        })
    }
}

/// Shows why a server's credential cannot be used as its poll error (what
/// `ferryctl servers list` shows). Returns whether the error is new, so the
/// caller logs it once rather than on every reconcile round.
pub(crate) async fn record_credential_error(
    db: &PgPool,
    error: &CredentialError,
) -> ApiResult<bool> {
    let changed = sqlx::query(
        "UPDATE servers SET last_poll_error = $2 \
         WHERE id = $1 AND last_poll_error IS DISTINCT FROM $2",
    )
    .bind(error.server_id)
    .bind(error.to_string())
    .execute(db)
    .await?
    .rows_affected();
    Ok(changed > 0)
}

/// Counts of [`reseal_legacy`].
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Resealed {
    pub resealed: u64,
    /// Legacy rows whose credential did not open (wrong key, or damaged):
    /// left as they are; they stay unusable and say why.
    pub failed: u64,
}

/// Arbitrary constant naming the re-seal's advisory lock.
const RESEAL_LOCK: i64 = 0x6665_7272_7935;

/// Re-seals every credential stored the pre-0005 way (format 1, no associated
/// data) bound to its row. Runs at coordinator start; idempotent, and safe
/// with several coordinators starting at once (an advisory lock serializes
/// them, and each only sees rows still in format 1).
pub(crate) async fn reseal_legacy(db: &PgPool, secrets: &SecretBox) -> anyhow::Result<Resealed> {
    use anyhow::Context;
    let mut tx = db.begin().await.context("begin re-seal")?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(RESEAL_LOCK)
        .execute(&mut *tx)
        .await
        .context("take the re-seal lock")?;
    let sql = format!(
        "SELECT {CONNECTION_COLUMNS} FROM servers s WHERE s.secret_format = $1 \
         ORDER BY s.id FOR UPDATE"
    );
    let rows = sqlx::query_as::<_, ConnectionRow>(&sql)
        .bind(SealFormat::LEGACY)
        .fetch_all(&mut *tx)
        .await
        .context("read credentials sealed without binding")?;
    let mut out = Resealed::default();
    for row in rows {
        let credential = match secrets.open_legacy(&row.secret_ciphertext) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(
                    server = %row.name,
                    id = row.server_id,
                    error = %e,
                    "cannot re-seal the credential of this server: it stays unusable until an operator sets it again"
                );
                out.failed += 1;
                continue;
            }
        };
        let sealed = secrets.seal(&credential, &row.binding())?;
        sqlx::query("UPDATE servers SET secret_ciphertext = $2, secret_format = $3 WHERE id = $1")
            .bind(row.server_id)
            .bind(sealed)
            .bind(SealFormat::BOUND)
            .execute(&mut *tx)
            .await
            .with_context(|| format!("re-seal the credential of server {:?}", row.name))?;
        out.resealed += 1;
    }
    tx.commit().await.context("commit re-seal")?;
    Ok(out)
}
