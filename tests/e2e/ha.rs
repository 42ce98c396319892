//! High availability behind a real L4 balancer: two coordinators behind
//! HAProxy (run from `deploy/haproxy/haproxy.cfg`), two agents connected
//! through it, files flowing. A coordinator SIGKILLed or SIGTERMed mid-flow
//! costs no file, no running transfer and no announcement; its agents serve
//! again through the survivor. With a test-owned Postgres ([`PgCluster`]): a
//! restart mid-flow costs no file and no attempt (health NOT_SERVING
//! meanwhile); a coordinator started before Postgres becomes ready once it
//! runs; a restore of a dump taken mid-flow leaves nothing on the server
//! unprocessed and reuses no `message_id` for another version. With a
//! test-owned RabbitMQ node ([`RabbitNode`]): a stop and start of the broker
//! mid-flow loses no announcement.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ferry_tests::cluster::{
    Cluster, ClusterOptions, FileRow, Tally, content, coordinator_name, http_get, stored_digests,
};
use ferry_tests::{AmqpMessage, Coordinator, PgCluster, RabbitNode, eventually};
use sha2::{Digest, Sha256};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::stack::WAIT;

/// Writes the files `f<i>.bin` (`i` in `range`) of `size` bytes into `dir`,
/// one every `every`; returns the sha256 of each, by remote path.
async fn write_files(
    cluster: &Cluster,
    dir: &str,
    range: std::ops::Range<u64>,
    size: usize,
    every: Duration,
) -> BTreeMap<String, String> {
    let mut expected = BTreeMap::new();
    for i in range {
        let bytes = content(i + 1, size);
        let rel = format!("{dir}/f{i:03}.bin");
        cluster.sshd.write_file(&rel, &bytes);
        expected.insert(
            cluster.sshd.remote_path(&rel),
            hex::encode(Sha256::digest(&bytes)),
        );
        tokio::time::sleep(every).await;
    }
    expected
}

async fn wait_files(cluster: &Cluster, what: &str, check: impl Fn(&[FileRow]) -> bool) {
    eventually(what, WAIT * 2, || async {
        let files = cluster.files().await.ok()?;
        check(&files).then_some(())
    })
    .await;
}

/// Every agent holds a stream with the coordinator `live` (the other one is
/// dead or gone, so a row naming `live` was written after it went away or
/// was already true before).
async fn agents_served_by(cluster: &Cluster, live: &str) -> bool {
    let Ok(sessions) = cluster.agent_sessions().await else {
        return false;
    };
    sessions.len() == cluster.agents.len()
        && sessions
            .iter()
            .all(|s| s.connected && s.connected_coordinator.as_deref() == Some(live))
}

/// The coordinator most agents hold a stream with.
async fn busiest_coordinator(cluster: &Cluster) -> usize {
    let sessions = cluster.agent_sessions().await.unwrap();
    (0..cluster.coordinators.len())
        .max_by_key(|&i| {
            let name = coordinator_name(i);
            sessions
                .iter()
                .filter(|s| s.connected && s.connected_coordinator.as_deref() == Some(&name))
                .count()
        })
        .unwrap()
}

/// Every expected file processed, with the stored bytes and at least one
/// message; returns the tally (printed).
async fn check_outcome(cluster: &mut Cluster, expected: &BTreeMap<String, String>) -> Tally {
    let n = expected.len();
    wait_files(cluster, &format!("all {n} files processed"), |files| {
        files.len() >= n && files.iter().all(|f| f.status == "processed")
    })
    .await;
    let files = cluster.files().await.unwrap();
    let mut messages = Vec::new();
    let deadline = Instant::now() + WAIT;
    loop {
        messages.extend(cluster.collect_messages(Duration::from_secs(2)).await);
        let tally = Tally::of(&files, &messages);
        if tally.lost.is_empty() || Instant::now() >= deadline {
            break;
        }
    }
    let tally = Tally::of(&files, &messages);
    println!("{tally}");
    assert_nothing_lost_or_misannounced(&tally, n);
    let stored = stored_digests(&cluster.s3, &files).await;
    assert_eq!(&stored, expected, "stored bytes");
    tally
}

/// One row per file on the server, every one announced, and no
/// `message_id` naming two versions or disagreeing with its body.
fn assert_nothing_lost_or_misannounced(tally: &Tally, n: usize) {
    assert_eq!(tally.files, n, "one row per file on the server");
    assert!(tally.lost.is_empty(), "unannounced: {:?}", tally.lost);
    assert!(
        tally.conflicting_ids.is_empty(),
        "message ids naming two versions: {:?}",
        tally.conflicting_ids
    );
    assert_eq!(
        tally.mismatched_bodies, 0,
        "body announcement_id = message_id"
    );
}

/// Two coordinators behind HAProxy, a watch on `dir`, and agents a1 and a2
/// (capacity 2) connected through the balancer.
/// The drain delay the drain test gives its coordinators (the default):
/// longer than HAProxy as deployed takes to mark a draining coordinator
/// down (about 5 s here), as `FERRY_DRAIN_DELAY_SECS` must be.
const DRAIN_DELAY_SECS: &str = "10";

async fn cluster_with_two_agents(dir: &str, options: ClusterOptions) -> Cluster {
    let mut cluster = Cluster::start(options).await;
    cluster.watch(dir).await;
    cluster.start_agent("a1", 2).await;
    cluster.start_agent("a2", 2).await;
    eventually("both agents connected", WAIT, || async {
        let s = cluster.agent_sessions().await.ok()?;
        (s.len() == 2 && s.iter().all(|s| s.connected)).then_some(())
    })
    .await;
    cluster
}

#[tokio::test]
async fn a_killed_coordinator_costs_no_file_and_its_agents_serve_again_through_the_balancer() {
    let mut cluster = cluster_with_two_agents("kill", ClusterOptions::default()).await;

    let writing = write_files(&cluster, "kill", 0..30, 1 << 20, Duration::from_millis(100));
    let expected = {
        let cluster = &cluster;
        let killed = async {
            // Mid-flow: some files done, some being transferred.
            wait_files(cluster, "files processed and in flight", |files| {
                files.iter().any(|f| f.status == "processed")
                    && files.iter().any(|f| f.status == "in_progress")
            })
            .await;
        };
        let (expected, ()) = tokio::join!(writing, killed);
        expected
    };
    let victim = busiest_coordinator(&cluster).await;
    let survivor = coordinator_name(1 - victim);
    let killed_at = Instant::now();
    cluster.coordinators[victim].kill().await;
    eventually("both agents serving through the survivor", WAIT, || async {
        agents_served_by(&cluster, &survivor).await.then_some(())
    })
    .await;
    let back = killed_at.elapsed();
    println!(
        "SIGKILL {}: both agents served by {survivor} again after {:.1}s",
        coordinator_name(victim),
        back.as_secs_f64()
    );
    assert!(back < Duration::from_secs(60), "agents back after {back:?}");

    let tally = check_outcome(&mut cluster, &expected).await;
    assert!(tally.messages >= expected.len());
}

#[tokio::test]
async fn a_drained_coordinator_hands_its_agents_over_without_losing_a_running_transfer() {
    let mut cluster = cluster_with_two_agents(
        "drain",
        ClusterOptions {
            coordinator_env: vec![("FERRY_DRAIN_DELAY_SECS".into(), DRAIN_DELAY_SECS.into())],
            ..ClusterOptions::default()
        },
    )
    .await;
    let big = content(7, 160 << 20);
    cluster.sshd.write_file("drain/big.bin", &big);
    let mut expected = BTreeMap::new();
    expected.insert(
        cluster.sshd.remote_path("drain/big.bin"),
        hex::encode(Sha256::digest(&big)),
    );
    drop(big);
    let owner = eventually("the big transfer running", WAIT, || async {
        let files = cluster.files().await.ok()?;
        files
            .iter()
            .find(|f| f.status == "in_progress")
            .and_then(|f| f.lease_owner.clone())
    })
    .await;
    let sessions = cluster.agent_sessions().await.unwrap();
    let holder = sessions
        .iter()
        .find(|s| s.name == owner)
        .and_then(|s| s.connected_coordinator.clone())
        .expect("the transferring agent's coordinator");
    let victim = (0..2).find(|&i| coordinator_name(i) == holder).unwrap();
    let survivor = coordinator_name(1 - victim);
    let before = cluster.lb.server(&holder).await.unwrap();

    let drained_at = Instant::now();
    cluster.coordinators[victim].terminate();
    // Not ready from the moment it drains: `/readyz` answers 503 (its HTTP
    // listener stays up until the process exits), not a refused connection
    // a balancer could take for a crash; the process itself is alive.
    let readyz = eventually(
        "/readyz of the drained coordinator failing",
        WAIT,
        || async {
            match http_get(cluster.http[victim], "/readyz").await {
                Some((200, _)) => None,
                other => Some(other),
            }
        },
    )
    .await;
    let healthz = http_get(cluster.http[victim], "/healthz").await;
    // gRPC health says the same while the listener still answers (the drain
    // delay): NOT_SERVING (2).
    let grpc = grpc_health(&cluster, victim).await;
    println!(
        "SIGTERM {holder}: /readyz {readyz:?} after {:.1}s, /healthz {healthz:?}, gRPC health {grpc}",
        drained_at.elapsed().as_secs_f64()
    );
    assert_eq!(grpc, 2, "gRPC health of the draining {holder}");
    assert_eq!(
        readyz,
        Some((503, "not ready: draining\n".to_string())),
        "/readyz of the draining {holder}"
    );
    assert_eq!(
        healthz.map(|(s, _)| s),
        Some(200),
        "/healthz while draining"
    );
    cluster
        .lb
        .wait_status(&holder, "DOWN", Duration::from_secs(60))
        .await;
    println!(
        "haproxy marked {holder} DOWN after {:.1}s",
        drained_at.elapsed().as_secs_f64()
    );
    // Out of rotation while it still serves: the point of the drain delay.
    assert!(
        cluster.coordinators[victim].is_running(),
        "{holder} exited before the balancer marked it down"
    );
    let down = cluster.lb.server(&holder).await.unwrap();
    // New connections all go to the survivor now.
    for _ in 0..5 {
        let channel = cluster.lb.channel(&cluster.pki.admin("bob")).await.unwrap();
        let mut admin = ferry_proto::admin_service_client::AdminServiceClient::new(channel);
        admin
            .list_servers(ferry_proto::ListServersRequest::default())
            .await
            .expect("an admin call through the balancer");
    }
    let after = cluster.lb.server(&holder).await.unwrap();
    assert_eq!(
        after.total, down.total,
        "no new connection to the drained {holder} (before the drain: {before:?})"
    );
    let exited = cluster.coordinators[victim]
        .wait_exit(WAIT)
        .await
        .expect("the drained coordinator exits");
    assert!(exited.success(), "drained coordinator exit: {exited}");
    println!(
        "{holder} exited by {:.1}s",
        drained_at.elapsed().as_secs_f64()
    );

    eventually("both agents served by the survivor", WAIT, || async {
        agents_served_by(&cluster, &survivor).await.then_some(())
    })
    .await;
    println!(
        "agents served by {survivor} after {:.1}s",
        drained_at.elapsed().as_secs_f64()
    );

    check_outcome(&mut cluster, &expected).await;
    let files = cluster.files().await.unwrap();
    assert_eq!(
        files[0].attempts, 1,
        "the running transfer was not restarted"
    );
    let history: Vec<(String, String)> =
        sqlx::query_as("SELECT to_status, reason FROM file_events WHERE file_id = $1 ORDER BY id")
            .bind(files[0].id)
            .fetch_all(&cluster.pool)
            .await
            .unwrap();
    assert!(
        !history
            .iter()
            .any(|(st, _)| st == "error" || st == "failed"),
        "{history:?}"
    );
    assert_eq!(
        history.iter().filter(|(st, _)| st == "in_progress").count(),
        1,
        "assigned once: {history:?}"
    );
}

/// gRPC health (`""`) of coordinator `i`, asked directly (not through the balancer).
async fn grpc_health(cluster: &Cluster, i: usize) -> i32 {
    let Ok(channel) = cluster.coordinators[i]
        .channel(&cluster.pki.admin("alice"))
        .await
    else {
        return -1;
    };
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|r| r.into_inner().status)
        .unwrap_or(-1)
}

/// A cluster whose coordinators use database `ferry` of a test-owned Postgres.
async fn cluster_on(pg: &PgCluster, env: &[(&str, &str)]) -> Cluster {
    pg.create_database("ferry").await;
    Cluster::start(ClusterOptions {
        database_url: Some(pg.url("ferry")),
        coordinator_env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    })
    .await
}

#[tokio::test]
async fn a_postgres_restart_mid_flow_loses_no_file_and_costs_no_attempt() {
    let pg = PgCluster::start().await;
    // While Postgres is down HAProxy takes both coordinators out and cuts the
    // agents' streams; they come back with backoff. The lease outlasts that,
    // so what is measured is whether the outage itself costs an attempt.
    let mut cluster = cluster_on(&pg, &[("FERRY_TASK_LEASE_SECS", "30")]).await;
    cluster.watch("pgr").await;
    cluster.start_agent("a1", 2).await;
    cluster.start_agent("a2", 2).await;
    let writing = write_files(&cluster, "pgr", 0..20, 1 << 20, Duration::from_millis(100));
    let expected = {
        let cluster = &cluster;
        let mid_flow = wait_files(cluster, "files processed and in flight", |files| {
            files.iter().any(|f| f.status == "processed")
                && files.iter().any(|f| f.status == "in_progress")
        });
        tokio::join!(writing, mid_flow).0
    };

    let stopped_at = Instant::now();
    pg.stop();
    for i in 0..2 {
        eventually("gRPC health NOT_SERVING without Postgres", WAIT, || async {
            (grpc_health(&cluster, i).await == ServingStatus::NotServing as i32).then_some(())
        })
        .await;
        assert_eq!(cluster.readyz(i).await, Some(503), "/readyz of {i}");
        cluster
            .lb
            .wait_status(&coordinator_name(i), "DOWN", WAIT)
            .await;
    }
    println!(
        "Postgres stopped: both coordinators NOT_SERVING and out of the balancer after {:.1}s",
        stopped_at.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    pg.start_server().await;
    let started_at = Instant::now();
    for i in 0..2 {
        eventually("gRPC health SERVING again", WAIT, || async {
            (grpc_health(&cluster, i).await == ServingStatus::Serving as i32).then_some(())
        })
        .await;
        cluster
            .lb
            .wait_status(&coordinator_name(i), "UP", WAIT)
            .await;
    }
    println!(
        "Postgres back: both coordinators serving after {:.1}s (outage {:.1}s)",
        started_at.elapsed().as_secs_f64(),
        stopped_at.elapsed().as_secs_f64()
    );

    check_outcome(&mut cluster, &expected).await;
    let files = cluster.files().await.unwrap();
    let retried: Vec<_> = files.iter().filter(|f| f.attempts != 1).collect();
    assert!(
        retried.is_empty(),
        "the outage consumed attempts: {retried:?}"
    );
}

#[tokio::test]
async fn a_coordinator_started_before_postgres_becomes_ready_once_it_runs() {
    let pg = PgCluster::init();
    let db = ferry_tests::TestDb::create().await;
    let pki = ferry_tests::TestPki::new();
    let http: SocketAddr = format!("127.0.0.1:{}", ferry_tests::free_port())
        .parse()
        .unwrap();
    let url = pg.url("ferry");
    let env = [
        ("FERRY_DATABASE_URL", url.as_str()),
        ("FERRY_HTTP_LISTEN", &http.to_string()),
    ];
    let starting = Coordinator::start_with_env(&db, &pki, &env);
    let postgres = async {
        let why = eventually(
            "/readyz 503 while Postgres is not running",
            WAIT,
            || async {
                http_get(http, "/readyz")
                    .await
                    .filter(|(status, _)| *status == 503)
                    .map(|(_, body)| body)
            },
        )
        .await;
        println!("before Postgres: /readyz 503 {why:?}");
        // Still waiting a while later: it retries rather than exits.
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(http_get(http, "/readyz").await.map(|(s, _)| s), Some(503));
        pg.start_server().await;
        pg.create_database("ferry").await;
    };
    let (coordinator, ()) = tokio::join!(starting, postgres);
    eventually("/readyz 200 once Postgres runs", WAIT, || async {
        (http_get(http, "/readyz").await.map(|(s, _)| s) == Some(200)).then_some(())
    })
    .await;
    let health = HealthClient::new(coordinator.channel(&pki.admin("alice")).await.unwrap());
    eventually("gRPC health SERVING", WAIT, || {
        let mut health = health.clone();
        async move {
            let status = health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map(|r| r.into_inner().status)
                .unwrap_or(-1);
            (status == ServingStatus::Serving as i32).then_some(())
        }
    })
    .await;
    // It migrated the database it waited for.
    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
        .await
        .unwrap();
    let migrated: i64 = sqlx::query_scalar("SELECT count(*) FROM files")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(migrated, 0);
}

/// Seconds since the epoch on the Postgres clock (the clock of `file_events.at`).
async fn db_now(cluster: &Cluster) -> f64 {
    sqlx::query_scalar("SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8")
        .fetch_one(&cluster.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_broker_restart_mid_flow_loses_no_announcement() {
    let mut node = RabbitNode::start().await;
    // The coordinators publish to the node (through the cluster's AMQP proxy).
    let mut cluster = Cluster::start(ClusterOptions {
        amqp_target: Some(node.addr()),
        ..Default::default()
    })
    .await;
    // A durable queue on the node: it and its persistent messages survive
    // the restart, so what is read afterwards is all that was delivered.
    let queue = "ferry-ha-announcements";
    node.declare_queue(cluster.queue.exchange(), queue).await;
    cluster.watch("mq").await;
    cluster.start_agent("a1", 2).await;
    cluster.start_agent("a2", 2).await;

    // The node stops as soon as the first announcement is confirmed, while
    // files are still being written and transferred.
    let writing = write_files(&cluster, "mq", 0..20, 256 << 10, Duration::from_millis(150));
    let (mut expected, stopped_at) = {
        let (cluster, node) = (&cluster, &mut node);
        let stop = async move {
            wait_files(cluster, "a file announced", |files| {
                files.iter().any(|f| f.status == "processed")
            })
            .await;
            node.stop().await;
            Instant::now()
        };
        tokio::join!(writing, stop)
    };
    // Files confirmed by the broker before it stopped are processed; none
    // can become processed while it is down.
    let at_stop = cluster.files().await.unwrap();
    let processed_at_stop = at_stop.iter().filter(|f| f.status == "processed").count();
    // More files arrive during the outage.
    expected
        .extend(write_files(&cluster, "mq", 20..25, 256 << 10, Duration::from_millis(50)).await);
    let n = expected.len();
    wait_files(
        &cluster,
        "every file stored, waiting for the broker",
        |files| {
            files.len() == n
                && files
                    .iter()
                    .all(|f| f.status == "uploaded" || f.status == "processed")
        },
    )
    .await;
    let during = cluster.files().await.unwrap();
    let pending: Vec<FileRow> = during
        .iter()
        .filter(|f| f.status == "uploaded")
        .cloned()
        .collect();
    assert_eq!(
        during.len() - pending.len(),
        processed_at_stop,
        "no file became processed while the broker was down"
    );
    assert!(!pending.is_empty(), "files waiting for the broker");
    for i in 0..2 {
        assert_eq!(
            cluster.readyz(i).await,
            Some(200),
            "a coordinator without a broker stays ready"
        );
    }
    println!(
        "broker stopped with {processed_at_stop} of {} files processed; {} files wait in the outbox",
        at_stop.len(),
        pending.len()
    );

    let restarting = Instant::now();
    // The broker takes connections before `start_server` returns (it waits
    // for the whole boot), so the outage ends when the start begins.
    let returned_at = db_now(&cluster).await;
    node.start_server().await;
    println!(
        "broker back after an outage of {:.1}s (start took {:.1}s)",
        stopped_at.elapsed().as_secs_f64(),
        restarting.elapsed().as_secs_f64()
    );
    wait_files(&cluster, "every file processed", |files| {
        files.len() == n && files.iter().all(|f| f.status == "processed")
    })
    .await;
    println!(
        "every file processed {:.1}s after the broker returned",
        restarting.elapsed().as_secs_f64()
    );
    let files = cluster.files().await.unwrap();
    // Everything delivered, before the stop (kept in the durable queue) and
    // after the return, is read now, after the return.
    let mut messages: Vec<AmqpMessage> = Vec::new();
    let deadline = Instant::now() + WAIT;
    loop {
        messages.extend(
            node.take_messages(queue, Duration::from_secs(2))
                .await
                .unwrap(),
        );
        if Tally::of(&files, &messages).lost.is_empty() || Instant::now() >= deadline {
            break;
        }
    }
    let tally = Tally::of(&files, &messages);
    println!("{tally}");
    assert_nothing_lost_or_misannounced(&tally, n);
    assert_eq!(tally.processed, n);
    // Each file that waited was announced (confirmed by the broker, so
    // processed) only after the broker returned.
    let early: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM file_events e JOIN files f ON f.id = e.file_id \
         WHERE f.announcement_id::text = ANY($1) AND e.to_status = 'processed' \
           AND EXTRACT(EPOCH FROM e.at) < $2",
    )
    .bind(
        pending
            .iter()
            .map(|f| f.announcement_id.clone())
            .collect::<Vec<_>>(),
    )
    .bind(returned_at)
    .fetch_one(&cluster.pool)
    .await
    .unwrap();
    assert_eq!(
        early, 0,
        "a waiting file processed before the broker returned"
    );
    let stored = stored_digests(&cluster.s3, &files).await;
    assert_eq!(stored, expected, "stored bytes");
}

/// Every file version announced, by `(path, size, mtime, sha256)`: the
/// distinct `message_id`s it was announced with.
fn announced_versions(
    messages: &[AmqpMessage],
) -> BTreeMap<(String, i64, String, String), std::collections::BTreeSet<String>> {
    let mut out: BTreeMap<_, std::collections::BTreeSet<String>> = BTreeMap::new();
    for m in messages {
        let body = m.json();
        let version = (
            body["path"].as_str().unwrap_or_default().to_string(),
            body["size"].as_i64().unwrap_or(-1),
            body["mtime"].as_str().unwrap_or_default().to_string(),
            body["sha256"].as_str().unwrap_or_default().to_string(),
        );
        out.entry(version)
            .or_default()
            .insert(m.message_id.clone().unwrap_or_default());
    }
    out
}

fn count_by_status(files: &[FileRow]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for f in files {
        *out.entry(f.status.clone()).or_default() += 1;
    }
    out
}

#[tokio::test]
async fn a_restore_from_a_dump_taken_mid_flow_reuses_no_message_id_and_leaves_nothing_unprocessed()
{
    let pg = PgCluster::start().await;
    let mut cluster = cluster_on(&pg, &[]).await;
    cluster.watch("rst").await;
    cluster.start_agent("a1", 2).await;
    cluster.start_agent("a2", 2).await;

    // Files flowing; the dump is taken while some are done, some are on
    // their way and some are not written yet (they have no row in it).
    let writing = write_files(
        &cluster,
        "rst",
        0..24,
        256 << 10,
        Duration::from_millis(250),
    );
    let (mut expected, (dump, at_dump)) = {
        let (cluster, pg) = (&cluster, &pg);
        let dumping = async move {
            wait_files(cluster, "files processed and in flight", |files| {
                files.iter().any(|f| f.status == "processed")
                    && files.iter().any(|f| f.status != "processed")
            })
            .await;
            let dump = pg.dump("ferry", "mid-flow");
            (dump, cluster.files().await.unwrap())
        };
        tokio::join!(writing, dumping)
    };
    println!(
        "dump taken mid-flow (about {:?})",
        count_by_status(&at_dump)
    );
    wait_files(&cluster, "the first 24 files processed", |files| {
        files.len() == 24 && files.iter().all(|f| f.status == "processed")
    })
    .await;
    let mut messages = cluster.collect_messages(Duration::from_secs(2)).await;
    let before_restore = cluster.files().await.unwrap();

    for c in &mut cluster.coordinators {
        c.terminate();
        let exit = c.wait_exit(WAIT).await.expect("the coordinator exits");
        assert!(exit.success(), "coordinator exit: {exit}");
    }
    pg.restore("ferry", &dump).await;
    let restored = cluster.files().await.unwrap();
    println!(
        "restored: {} rows {:?} (there were {} processed before the restore)",
        restored.len(),
        count_by_status(&restored),
        before_restore.len()
    );
    for c in &mut cluster.coordinators {
        c.restart().await;
    }
    for i in 0..cluster.coordinators.len() {
        cluster
            .lb
            .wait_status(&coordinator_name(i), "UP", WAIT)
            .await;
    }
    // New files after the restore.
    expected.extend(
        write_files(
            &cluster,
            "rst",
            24..30,
            256 << 10,
            Duration::from_millis(100),
        )
        .await,
    );

    // Every file on the server ends with a processed row.
    let n = expected.len();
    wait_files(&cluster, "every file on the server processed", |files| {
        let processed: std::collections::HashSet<&str> = files
            .iter()
            .filter(|f| f.status == "processed")
            .map(|f| f.path.as_str())
            .collect();
        expected.keys().all(|p| processed.contains(p.as_str()))
            && files.iter().all(|f| f.status == "processed")
    })
    .await;
    let files = cluster.files().await.unwrap();
    // What became of the rows the dump held unfinished (printed: README).
    for r in restored.iter().filter(|r| r.status != "processed") {
        let history: Vec<String> = sqlx::query_scalar(
            "SELECT coalesce(from_status, '-') || '->' || to_status || ' (' || reason || ')' \
             FROM file_events WHERE file_id = $1 AND at > now() - interval '1 hour' \
             ORDER BY id",
        )
        .bind(r.id)
        .fetch_all(&cluster.pool)
        .await
        .unwrap();
        let last = history.len().saturating_sub(6);
        println!(
            "restored {} row {}: {:?}",
            r.status,
            r.path.rsplit('/').next().unwrap_or_default(),
            &history[last..]
        );
    }
    let deadline = Instant::now() + WAIT;
    loop {
        messages.extend(cluster.collect_messages(Duration::from_secs(2)).await);
        if Tally::of(&files, &messages).lost.is_empty() || Instant::now() >= deadline {
            break;
        }
    }
    let tally = Tally::of(&files, &messages);
    let versions = announced_versions(&messages);
    let reannounced = versions.values().filter(|ids| ids.len() > 1).count();
    println!(
        "after the restore: {tally} versions announced {} of them under two message ids {reannounced}",
        versions.len(),
    );
    // The point of announcement ids: over the whole run, before and after
    // the restore, no message_id names two different file versions.
    assert_nothing_lost_or_misannounced(&tally, n);
    // And a version stored before the restore whose row the restore lost is
    // found in the bucket (not written again) and announced again only
    // under the id consumers already saw.
    assert_eq!(
        reannounced,
        0,
        "versions announced under two message ids: {:?}",
        versions
            .iter()
            .filter(|(_, ids)| ids.len() > 1)
            .collect::<Vec<_>>()
    );
    let stored = stored_digests(&cluster.s3, &files).await;
    assert_eq!(stored, expected, "stored bytes");
}
