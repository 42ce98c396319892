-- ferry schema: server registry, watches, file versions and their history,
-- agents, and the transactional outbox of AMQP notifications.

CREATE TABLE servers (
    id                    BIGSERIAL PRIMARY KEY,
    name                  TEXT NOT NULL CHECK (name <> '' AND length(name) <= 128),
    hostname              TEXT NOT NULL CHECK (hostname <> ''),
    port                  INTEGER NOT NULL DEFAULT 22 CHECK (port BETWEEN 1 AND 65535),
    username              TEXT NOT NULL CHECK (username <> ''),
    auth_kind             TEXT NOT NULL CHECK (auth_kind IN ('password', 'private_key')),
    -- AES-256-GCM(nonce || ciphertext) of the JSON credential; never returned by any API.
    secret_ciphertext     BYTEA NOT NULL,
    has_passphrase        BOOLEAN NOT NULL DEFAULT FALSE,
    host_key_fingerprint  TEXT NOT NULL CHECK (host_key_fingerprint LIKE 'SHA256:%'),
    site                  TEXT NOT NULL DEFAULT 'default' CHECK (site <> ''),
    max_sessions          INTEGER NOT NULL DEFAULT 4 CHECK (max_sessions BETWEEN 1 AND 1024),
    enabled               BOOLEAN NOT NULL DEFAULT TRUE,
    -- Soft delete: a removed server stops being polled but keeps its files' history.
    deleted_at            TIMESTAMPTZ,
    -- Poll lease: exactly one agent polls a server at a time.
    poller_agent          TEXT,
    poller_coordinator    TEXT,
    poll_lease_expires_at TIMESTAMPTZ,
    last_poll_at          TIMESTAMPTZ,
    last_poll_files       BIGINT,
    last_poll_error       TEXT,
    created_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at            TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- Names are unique among live servers; a removed server's name may be reused.
CREATE UNIQUE INDEX servers_name_live ON servers (name) WHERE deleted_at IS NULL;

CREATE TABLE watches (
    id                  BIGSERIAL PRIMARY KEY,
    server_id           BIGINT NOT NULL REFERENCES servers (id),
    directory           TEXT NOT NULL CHECK (directory LIKE '/%'),
    glob                TEXT NOT NULL DEFAULT '*' CHECK (glob <> ''),
    recursive           BOOLEAN NOT NULL DEFAULT FALSE,
    poll_interval_secs  INTEGER NOT NULL DEFAULT 30 CHECK (poll_interval_secs > 0),
    min_age_secs        INTEGER NOT NULL DEFAULT 0 CHECK (min_age_secs >= 0),
    bucket              TEXT NOT NULL CHECK (length(bucket) BETWEEN 3 AND 63),
    key_template        TEXT NOT NULL DEFAULT '{server}/{path}' CHECK (key_template <> ''),
    post_action         TEXT NOT NULL DEFAULT 'keep'
                        CHECK (post_action IN ('keep', 'delete') OR post_action LIKE 'move:/%'),
    enabled             BOOLEAN NOT NULL DEFAULT TRUE,
    deleted_at          TIMESTAMPTZ,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at          TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX watches_server ON watches (server_id) WHERE deleted_at IS NULL;

CREATE TABLE files (
    id                  BIGSERIAL PRIMARY KEY,
    server_id           BIGINT NOT NULL REFERENCES servers (id),
    watch_id            BIGINT NOT NULL REFERENCES watches (id),
    path                TEXT NOT NULL,
    size                BIGINT NOT NULL CHECK (size >= 0),
    mtime_unix          BIGINT NOT NULL,
    status              TEXT NOT NULL DEFAULT 'new'
                        CHECK (status IN ('new', 'in_progress', 'uploaded', 'processed', 'error', 'failed', 'lost')),
    attempts            INTEGER NOT NULL DEFAULT 0,
    next_attempt_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    last_error          TEXT,
    lease_owner         TEXT,
    lease_expires_at    TIMESTAMPTZ,
    -- Bumped on every assignment; results carrying an older token are rejected.
    fencing_token       BIGINT NOT NULL DEFAULT 0,
    bucket              TEXT,
    object_key          TEXT,
    etag                TEXT,
    sha256              TEXT,
    post_action_result  TEXT,
    discovered_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    uploaded_at         TIMESTAMPTZ,
    updated_at          TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- Identity of a file version: the same name with another size or mtime is a new version.
CREATE UNIQUE INDEX files_identity ON files (watch_id, path, size, mtime_unix);
CREATE INDEX files_due ON files (next_attempt_at) WHERE status IN ('new', 'error');
CREATE INDEX files_server_status ON files (server_id, status);
CREATE INDEX files_status ON files (status, id);

CREATE TABLE file_events (
    id           BIGSERIAL PRIMARY KEY,
    file_id      BIGINT NOT NULL REFERENCES files (id),
    at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    from_status  TEXT,
    to_status    TEXT NOT NULL,
    actor        TEXT NOT NULL,
    reason       TEXT NOT NULL DEFAULT ''
);
CREATE INDEX file_events_file ON file_events (file_id, id);

CREATE TABLE agents (
    name                   TEXT PRIMARY KEY,
    site                   TEXT NOT NULL,
    version                TEXT NOT NULL DEFAULT '',
    capacity               INTEGER NOT NULL DEFAULT 0,
    connected              BOOLEAN NOT NULL DEFAULT FALSE,
    connected_coordinator  TEXT,
    -- Bumped on every (re)connect so that a stale stream cannot mark a newer one gone.
    session_id             TEXT,
    connected_at           TIMESTAMPTZ,
    last_seen_at           TIMESTAMPTZ,
    in_flight              INTEGER NOT NULL DEFAULT 0,
    files_transferred      BIGINT NOT NULL DEFAULT 0,
    bytes_transferred      BIGINT NOT NULL DEFAULT 0,
    errors                 BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE outbox (
    id            BIGSERIAL PRIMARY KEY,
    file_id       BIGINT NOT NULL REFERENCES files (id),
    payload       JSONB NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    published_at  TIMESTAMPTZ,
    attempts      INTEGER NOT NULL DEFAULT 0,
    last_error    TEXT
);
CREATE INDEX outbox_pending ON outbox (id) WHERE published_at IS NULL;

-- Wake-up hints for coordinators (statement-level, payload-less: one NOTIFY per
-- transaction however many rows it wrote). Coordinators also rescan on a timer.
CREATE FUNCTION ferry_notify_file_events() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('ferry_file_events', '');
    RETURN NULL;
END $$;
CREATE TRIGGER file_events_notify AFTER INSERT ON file_events
    FOR EACH STATEMENT EXECUTE FUNCTION ferry_notify_file_events();
