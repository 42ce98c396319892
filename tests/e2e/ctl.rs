//! `ferryctl` against a real coordinator: certificates, CRUD with tables and
//! `--json`, trust-on-first-use pinning, errors that print the server's message.

use std::time::Duration;

use ferry_tests::{
    AgentOptions, CertFiles, Coordinator, Ctl, S3Server, TestDb, TestPki, bin_path, eventually,
};
use serde_json::Value;

use crate::stack::{Stack, WAIT};

#[tokio::test]
async fn ferryctl_certs_issue_working_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let ctl = bin_path("ferryctl");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(&ctl)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ferryctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["certs", "init", "--dir", d]);
    run(&[
        "certs",
        "issue",
        "coordinator",
        "--dir",
        d,
        "--name",
        "coord",
        "--host",
        "127.0.0.1",
        "--host",
        "localhost",
    ]);
    run(&["certs", "issue", "admin", "--dir", d, "--name", "ops"]);
    let again = std::process::Command::new(&ctl)
        .args(["certs", "init", "--dir", d])
        .output()
        .unwrap();
    assert!(
        !again.status.success(),
        "init must not overwrite an existing CA"
    );
    let files = |n: &str| CertFiles {
        ca: dir.path().join("ca.pem"),
        cert: dir.path().join(format!("{n}.pem")),
        key: dir.path().join(format!("{n}-key.pem")),
    };
    let coord_files = files("coord");
    let db = TestDb::create().await;
    let pki = TestPki::new();
    let coord = Coordinator::start_with_certs(&db, &pki, &coord_files).await;
    let out = Ctl::new(coord.endpoint(), &files("ops"))
        .json(&["servers", "list", "--json"])
        .await;
    assert_eq!(out, Value::Array(vec![]));
}

#[tokio::test]
async fn ferryctl_crud_round_trip_with_trust_on_first_use() {
    let s = Stack::new().await;
    let ctl = s
        .coord
        .ctl(&s.pki.admin("alice"))
        .env("SFTP_PASSWORD", s.sshd.password());
    let port = s.sshd.port().to_string();

    // Without a pin, the server's message says how to pin; nothing is written.
    let out = ctl
        .run(&[
            "servers",
            "add",
            "nopin",
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--user",
            "ferrytest",
            "--password-env",
            "SFTP_PASSWORD",
        ])
        .await;
    assert_eq!(out.status, 1, "{}", out.stderr);
    assert!(
        out.stderr
            .starts_with("error: invalid host_key_fingerprint"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("--trust-host-key"), "{}", out.stderr);

    // The coordinator never opens SSH itself: with no agent of the site
    // connected, the probe is refused with a message naming the site.
    let probe_args = [
        "--json",
        "servers",
        "probe",
        "--host",
        "127.0.0.1",
        "--port",
        &port,
    ];
    let out = ctl.run(&probe_args).await;
    assert_eq!(out.status, 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("Unavailable") && out.stderr.contains("no agent of site \"default\""),
        "{}",
        out.stderr
    );
    let _default_agent = s.agent("probe-default", "default").await;
    let _lab_agent = s.agent("probe-lab", "lab").await;
    let probe = eventually("a probe through the default site's agent", WAIT, || {
        let ctl = &ctl;
        async move {
            let out = ctl.run(&probe_args).await;
            out.success()
                .then(|| serde_json::from_str::<Value>(&out.stdout).unwrap())
        }
    })
    .await;
    assert_eq!(probe["fingerprint"], s.sshd.host_key_fingerprint());

    let added = ctl
        .json(&[
            "--json",
            "servers",
            "add",
            "sftp1",
            "--host",
            "127.0.0.1",
            "--port",
            &port,
            "--user",
            "ferrytest",
            "--password-env",
            "SFTP_PASSWORD",
            "--trust-host-key",
            "--site",
            "lab",
            "--max-sessions",
            "3",
        ])
        .await;
    assert_eq!(
        added["host_key_fingerprint"],
        s.sshd.host_key_fingerprint(),
        "pinned what the server presented"
    );
    assert_eq!(added["max_sessions"], 3);
    assert!(
        !added.to_string().contains(s.sshd.password()),
        "secret echoed back"
    );

    let listed = ctl.json(&["--json", "servers", "list"]).await;
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["name"], "sftp1");
    let table = ctl.run(&["servers", "list"]).await;
    assert!(
        table.success() && table.stdout.contains("sftp1") && table.stdout.contains("lab"),
        "{}",
        table.stdout
    );

    let updated = ctl
        .json(&[
            "--json",
            "servers",
            "update",
            "sftp1",
            "--max-sessions",
            "2",
            "--disable",
        ])
        .await;
    assert_eq!(
        (updated["max_sessions"].clone(), updated["enabled"].clone()),
        (Value::from(2), Value::from(false))
    );

    let bad = ctl
        .run(&["servers", "update", "sftp1", "--site", "bad site"])
        .await;
    assert_eq!(bad.status, 1, "{}", bad.stderr);
    assert!(
        bad.stderr.contains("invalid site") && bad.stderr.contains("InvalidArgument"),
        "{}",
        bad.stderr
    );
    let bad = ctl
        .run(&[
            "watches", "add", "--server", "sftp1", "--dir", "relative", "--bucket", "bucket-1",
        ])
        .await;
    assert_eq!(bad.status, 1);
    assert!(bad.stderr.contains("directory"), "{}", bad.stderr);

    let watch = ctl
        .json(&[
            "--json",
            "watches",
            "add",
            "--server",
            "sftp1",
            "--dir",
            "/data/in",
            "--glob",
            "*.csv",
            "--bucket",
            "bucket-1",
            "--post-action",
            "move:/data/done",
        ])
        .await;
    assert_eq!(watch["directory"], "/data/in");
    assert_eq!(watch["post_action"], "move:/data/done");
    let watches = ctl
        .json(&["--json", "watches", "list", "--server", "sftp1"])
        .await;
    assert_eq!(watches.as_array().unwrap().len(), 1);
    let id = watch["id"].to_string();
    assert!(ctl.run(&["watches", "remove", &id]).await.success());
    assert!(ctl.run(&["servers", "remove", "sftp1"]).await.success());
    let gone = ctl.run(&["servers", "show", "sftp1"]).await;
    assert_eq!(gone.status, 1);
    assert!(gone.stderr.contains("NotFound"), "{}", gone.stderr);
}

#[tokio::test]
async fn ferryctl_agents_and_live_file_events() {
    let mut s = Stack::new().await;
    let id = s.add_server(s.server_req("live")).await;
    s.add_watch(id, "in", "*").await;
    let mut agent = s.agent("a1", "default").await;
    let ctl = s.coord.ctl(&s.pki.admin("alice"));
    let agents = eventually("agent listed with its server", WAIT, || async {
        let v = ctl.json(&["--json", "agents"]).await;
        (v[0]["polled_servers"] == serde_json::json!(["live"])).then_some(v)
    })
    .await;
    assert_eq!(agents[0]["name"], "a1");
    assert_eq!(agents[0]["connected"], true);

    // `files watch` follows the live stream.
    let admin = s.pki.admin("alice");
    let mut watcher = tokio::process::Command::new(bin_path("ferryctl"))
        .args(["--json", "files", "watch"])
        .env("FERRY_ENDPOINT", s.coord.endpoint())
        .env("FERRY_TLS_CA", &admin.ca)
        .env("FERRY_TLS_CERT", &admin.cert)
        .env("FERRY_TLS_KEY", &admin.key)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    s.sshd.write_file("in/live.csv", b"hello");
    let stdout = watcher.stdout.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout));
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("an event line")
        .unwrap()
        .unwrap();
    let event: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["to_status"], "new", "{line}");
    assert!(
        event["path"].as_str().unwrap().ends_with("/in/live.csv"),
        "{line}"
    );

    // SIGTERM: the agent exits cleanly and shows as disconnected.
    let status = agent
        .terminate(Duration::from_secs(15))
        .await
        .expect("agent exits after SIGTERM");
    assert!(status.success(), "{status:?}");
    eventually("agent shown disconnected", WAIT, || async {
        let v = ctl.json(&["--json", "agents"]).await;
        (v[0]["connected"] == false).then_some(())
    })
    .await;
}

#[tokio::test]
async fn concurrent_coordinator_starts_share_one_schema() {
    let db = TestDb::create().await;
    let pki = TestPki::new();
    let (a, b, c) = tokio::join!(
        Coordinator::start(&db, &pki),
        Coordinator::start(&db, &pki),
        Coordinator::start(&db, &pki)
    );
    let migrations: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(db.pool())
        .await
        .unwrap();
    let shipped = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../migrations"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "sql")
        })
        .count();
    assert!(shipped >= 3, "migrations/ has {shipped} files");
    assert_eq!(migrations, shipped as i64, "each migration applied once");
    for coord in [&a, &b, &c] {
        let v = coord
            .ctl(&pki.admin("alice"))
            .json(&["--json", "servers", "list"])
            .await;
        assert_eq!(v, Value::Array(vec![]));
    }
}

/// `ferryctl agents drain`: of two agents of a site, the drained one gives
/// up its poll lease and gets no transfers; the other does all the work.
/// `--undo` lifts the drain.
#[tokio::test]
async fn a_drained_agent_gets_no_new_work() {
    let s3 = S3Server::start().await;
    s3.create_bucket("ferry-test").await;
    let mut s = Stack::new().await;
    let id = s.add_server(s.server_req("drain")).await;
    s.add_watch(id, "in", "*.csv").await;
    let opts = || AgentOptions {
        capacity: 2,
        env: s3.env(),
        ..Default::default()
    };
    let _a1 = s.agent_with("a1", opts()).await;
    let _a2 = s.agent_with("a2", opts()).await;
    let ctl = s.coord.ctl(&s.pki.admin("alice"));
    // Drain whichever polls, so the lease has to move.
    let first = s.wait_poller(id, "a poller", |p| !p.is_empty()).await;
    // Pollers are named by identity, `site/name`.
    let (drained, other) = if first == "default/a1" {
        ("default/a1", "default/a2")
    } else {
        ("default/a2", "default/a1")
    };
    let v = ctl.json(&["--json", "agents", "drain", drained]).await;
    assert_eq!(v["id"], drained);
    assert_eq!(v["draining"], true);
    s.wait_poller(id, "the other agent polls", |p| p == other)
        .await;
    let agent = |list: &Value, name: &str| -> Value {
        list.as_array()
            .unwrap()
            .iter()
            .find(|a| a["id"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} not listed: {list}"))
    };
    let list = ctl.json(&["--json", "agents"]).await;
    assert_eq!(agent(&list, drained)["draining"], true);
    assert_eq!(
        agent(&list, drained)["connected"],
        true,
        "stream stays open"
    );
    assert_eq!(agent(&list, other)["draining"], false);
    let table = ctl.run(&["agents"]).await;
    assert!(table.stdout.contains("DRAINING"), "{}", table.stdout);

    for i in 0..4 {
        s.sshd.write_file(&format!("in/f{i}.csv"), b"0123456789");
    }
    eventually("4 files uploaded", WAIT, || async {
        (s3.list_keys("ferry-test").await.len() == 4).then_some(())
    })
    .await;
    // Counters arrive with heartbeats.
    let list = eventually("the other agent reports 4 transfers", WAIT, || async {
        let list = ctl.json(&["--json", "agents"]).await;
        (agent(&list, other)["files_transferred"] == 4).then_some(list)
    })
    .await;
    assert_eq!(agent(&list, drained)["files_transferred"], 0, "{list}");
    assert_eq!(
        agent(&list, drained)["polled_servers"],
        serde_json::json!([])
    );

    // The server has been polled: its poll duration shows.
    let servers = ctl.json(&["--json", "servers", "list"]).await;
    assert!(
        servers[0]["health"]["last_poll_duration_ms"].is_u64(),
        "{servers}"
    );
    let table = ctl.run(&["servers", "list"]).await;
    assert!(table.stdout.contains("POLL-TIME"), "{}", table.stdout);
    let shown = ctl.run(&["servers", "show", "drain"]).await;
    assert!(
        shown.stdout.contains("Poll duration") && shown.stdout.contains(" ms"),
        "{}",
        shown.stdout
    );

    let v = ctl
        .json(&["--json", "agents", "drain", drained, "--undo"])
        .await;
    assert_eq!(v["draining"], false);
    let unknown = ctl.run(&["agents", "drain", "nobody"]).await;
    assert!(!unknown.success());
    assert!(unknown.stderr.contains("nobody"), "{}", unknown.stderr);
}

/// `ferryctl status` sums up the system: file counts by status per server,
/// the announcement backlog, the oldest waiting file, agent load and the
/// servers whose last poll failed.
#[tokio::test]
async fn ferryctl_status_sums_up_the_system() {
    let mut s = Stack::new().await;
    // Site "default" has no agent: nothing moves these rows.
    let main = s.add_server(s.server_req("main")).await;
    let watch = s.add_watch(main, "in", "*").await;
    let broken = s.add_server(s.server_req("broken")).await;
    sqlx::query("UPDATE servers SET last_poll_error = 'connection refused' WHERE id = $1")
        .bind(broken)
        .execute(s.db.pool())
        .await
        .unwrap();
    let ids: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO files (server_id, watch_id, path, size, mtime_unix, status, discovered_at, \
                            next_attempt_at) \
         VALUES ($1, $2, '/in/new', 1, 1700000000, 'new', now() - interval '1 hour', now()), \
                ($1, $2, '/in/err', 1, 1700000000, 'error', now() - interval '2 hours', \
                 now() + interval '1 day'), \
                ($1, $2, '/in/p1', 1, 1700000000, 'processed', now(), now()), \
                ($1, $2, '/in/p2', 1, 1700000000, 'processed', now(), now()), \
                ($1, $2, '/in/gone', 1, 1700000000, 'failed', now(), now()) \
         RETURNING id",
    )
    .bind(main)
    .bind(watch)
    .fetch_all(s.db.pool())
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO outbox (file_id, payload, created_at, published_at, parked_at) \
         VALUES ($1, '{}', now() - interval '10 minutes', NULL, NULL), \
                ($2, '{}', now(), NULL, now()), \
                ($2, '{}', now(), now(), NULL)",
    )
    .bind(ids[2])
    .bind(ids[3])
    .execute(s.db.pool())
    .await
    .unwrap();
    let _agent = s
        .agent_with(
            "lab1",
            AgentOptions {
                site: "lab".into(),
                capacity: 3,
                ..Default::default()
            },
        )
        .await;
    let ctl = s.coord.ctl(&s.pki.admin("alice"));
    let v = eventually("the agent counted as connected", WAIT, || async {
        let v = ctl.json(&["--json", "status"]).await;
        (v["agents"]["connected"] == 1).then_some(v)
    })
    .await;
    assert_eq!(
        v["agents"],
        serde_json::json!({"connected": 1, "total": 1, "in_flight": 0, "capacity": 3})
    );
    let servers = v["servers"].as_array().unwrap();
    assert_eq!(servers.len(), 2, "{v}");
    assert_eq!(servers[0]["name"], "main");
    assert_eq!(
        servers[0]["counts"],
        serde_json::json!({"new": 1, "in_progress": 0, "uploaded": 0, "processed": 2,
                           "error": 1, "failed": 1, "lost": 0, "skipped": 0})
    );
    assert_eq!(servers[0]["total"], 5);
    assert_eq!(servers[1]["name"], "broken");
    assert_eq!(servers[1]["total"], 0);
    assert_eq!(v["outbox"]["unpublished"], 2);
    assert_eq!(v["outbox"]["parked"], 1);
    assert!(
        v["outbox"]["oldest_pending_age_secs"].as_i64().unwrap() >= 600,
        "{v}"
    );
    assert_eq!(v["oldest_waiting"]["id"], ids[1]);
    assert_eq!(v["oldest_waiting"]["status"], "error");
    assert!(
        v["oldest_waiting"]["age_secs"].as_i64().unwrap() >= 7200,
        "{v}"
    );
    assert_eq!(
        v["failing_servers"],
        serde_json::json!([{"name": "broken", "error": "connection refused"}])
    );
    let table = ctl.run(&["status"]).await;
    assert!(table.success(), "{}", table.stderr);
    assert!(
        table.stdout.contains("broken: connection refused")
            && table.stdout.contains("1/1 connected, 0/3"),
        "{}",
        table.stdout
    );
}

/// `files list` shows the newest files first (`--sort oldest` for discovery
/// order), across pages; `files retry --dry-run` reports the server's
/// selection and changes nothing.
#[tokio::test]
async fn ferryctl_files_list_order_and_retry_dry_run() {
    let mut s = Stack::new().await;
    // Site "default" has no agent: nothing moves these rows.
    let server = s.add_server(s.server_req("main")).await;
    let watch = s.add_watch(server, "in", "*").await;
    let ids: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO files (server_id, watch_id, path, size, mtime_unix, status, next_attempt_at) \
         VALUES ($1, $2, '/in/a', 1, 1700000000, 'processed', now()), \
                ($1, $2, '/in/b', 1, 1700000000, 'error', now() + interval '1 day'), \
                ($1, $2, '/in/c', 1, 1700000000, 'failed', now()) \
         RETURNING id",
    )
    .bind(server)
    .bind(watch)
    .fetch_all(s.db.pool())
    .await
    .unwrap();
    let ctl = s.coord.ctl(&s.pki.admin("alice"));
    let listed = |v: Value| -> Vec<i64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|f| f["id"].as_i64().unwrap())
            .collect()
    };
    let newest = listed(ctl.json(&["--json", "files", "list"]).await);
    assert_eq!(newest, [ids[2], ids[1], ids[0]]);
    let oldest = listed(
        ctl.json(&["--json", "files", "list", "--sort", "oldest"])
            .await,
    );
    assert_eq!(oldest, ids);
    let all = listed(ctl.json(&["--json", "files", "list", "--all"]).await);
    assert_eq!(all, newest);
    let two = listed(ctl.json(&["--json", "files", "list", "--limit", "2"]).await);
    assert_eq!(two, [ids[2], ids[1]]);
    let bad = ctl.run(&["files", "list", "--sort", "sideways"]).await;
    assert_eq!(bad.status, 2, "{}", bad.stderr);

    let statuses = || async {
        let rows: Vec<String> = sqlx::query_scalar("SELECT status FROM files ORDER BY id")
            .fetch_all(s.db.pool())
            .await
            .unwrap();
        let events: i64 = sqlx::query_scalar("SELECT count(*) FROM file_events")
            .fetch_one(s.db.pool())
            .await
            .unwrap();
        (rows, events)
    };
    let before = statuses().await;
    let dry = ctl.json(&["--json", "files", "retry", "--dry-run"]).await;
    assert_eq!(dry["requeued"], 2, "{dry}");
    assert_eq!(dry["file_ids"], serde_json::json!([ids[1], ids[2]]));
    assert_eq!(statuses().await, before, "a dry run changes nothing");
    let text = ctl.run(&["files", "retry", "--dry-run"]).await;
    assert!(
        text.stdout.contains("would requeue 2 files")
            && text.stdout.contains(&format!("{} {}", ids[1], ids[2])),
        "{}",
        text.stdout
    );
    assert_eq!(statuses().await, before, "a dry run changes nothing");

    let done = ctl.json(&["--json", "files", "retry"]).await;
    assert_eq!(done["requeued"], 2, "{done}");
    assert_eq!(statuses().await.0, ["processed", "new", "new"]);
}

/// A retry of a large selection answers its count and the first ids only,
/// so neither the response nor the dry run's output grows with the table.
#[tokio::test]
async fn a_retry_of_many_files_answers_its_count_and_the_first_ids() {
    let mut s = Stack::new().await;
    let id = s.add_server(s.server_req("many")).await;
    let watch = s.add_watch(id, "in", "*").await;
    sqlx::query(
        "INSERT INTO files (server_id, watch_id, path, size, mtime_unix, status) \
         SELECT $1, $2, '/in/f' || g, 1, 1700000000, 'failed' FROM generate_series(1, 1500) g",
    )
    .bind(id)
    .bind(watch)
    .execute(s.db.pool())
    .await
    .unwrap();
    let ctl = s.coord.ctl(&s.pki.admin("alice"));
    let dry = ctl.json(&["--json", "files", "retry", "--dry-run"]).await;
    assert_eq!(dry["requeued"], 1500);
    let ids = dry["file_ids"].as_array().unwrap();
    assert_eq!(ids.len(), 1000, "the answer lists the first 1000 ids");
    let text = ctl.run(&["files", "retry", "--dry-run"]).await;
    assert!(text.success(), "{}", text.stderr);
    assert!(
        text.stdout.contains("would requeue 1500 files")
            && text.stdout.contains("(the first 20 of 1500;"),
        "{}",
        text.stdout
    );
    assert!(
        text.stdout.len() < 1000,
        "{} bytes printed",
        text.stdout.len()
    );
    let done = ctl.json(&["--json", "files", "retry"]).await;
    assert_eq!(done["requeued"], 1500);
    let new: i64 = sqlx::query_scalar("SELECT count(*) FROM files WHERE status = 'new'")
        .fetch_one(s.db.pool())
        .await
        .unwrap();
    assert_eq!(new, 1500);
}
