//! Chaos soak (issue 10): two coordinators behind HAProxy on a test-owned
//! Postgres, three agents through the balancer, files arriving continuously,
//! and every few seconds one random fault: SIGKILL or SIGSTOP/SIGCONT of a
//! coordinator or an agent, a cut of S3, AMQP or SFTP (the cluster's
//! `TcpProxy`s), a Postgres restart. Each fault is healed before the next.
//! At the end (writing stopped, everything healed) it waits for every file
//! to settle and prints files offered, processed, lost (must be 0), failed,
//! duplicate messages, p50/p99 latency discovery -> processed and faults by
//! kind; it exits non-zero when a file was lost or a `message_id` named two
//! versions. Not part of CI; run with the debug binaries the e2e tests use
//! (it measures robustness, not speed):
//!
//! ```text
//! cargo build --workspace --bins && cargo bench --workspace --profile dev --bench soak
//! ```
//! `FERRY_SOAK_SECS` (default 300) bounds the chaos phase,
//! `FERRY_SOAK_FAULT_SECS` (default 3) is the quiet time between a fault's
//! heal and the next fault (each lasts 3 s), `FERRY_SOAK_FILE_MS` (default
//! 200) the time between two new files, `FERRY_SOAK_SEED` seeds the fault
//! choice, `FERRY_SOAK_FAULTS` (a comma list of the kinds below, default all)
//! restricts it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ferry_tests::cluster::{Cluster, ClusterOptions, Tally, content, percentile};
use ferry_tests::{AmqpMessage, PgCluster, eventually, signal};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The kinds of fault, as printed.
const KINDS: [&str; 8] = [
    "kill-coordinator",
    "stop-coordinator",
    "kill-agent",
    "stop-agent",
    "cut-s3",
    "cut-amqp",
    "cut-sftp",
    "restart-postgres",
];

/// How long a fault lasts before it is healed.
const OUTAGE: Duration = Duration::from_secs(3);

/// What heals the fault in progress.
enum Heal {
    RestartCoordinator(usize),
    ContinuePid(u32),
    RestartAgent(usize),
    ReconnectS3,
    ReconnectAmqp,
    ReconnectSftp,
    StartPostgres,
}

/// The pid of the coordinator child of this process whose
/// `FERRY_COORDINATOR_ID` is `id` (from `/proc/<pid>/environ`).
fn coordinator_pid(id: &str) -> Option<u32> {
    let me = std::process::id();
    let needle = format!("FERRY_COORDINATOR_ID={id}");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        let ppid: u32 = stat[stat.rfind(')')? + 1..]
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        if ppid != me {
            return None;
        }
        let environ = std::fs::read(e.path().join("environ")).ok()?;
        environ
            .split(|b| *b == 0)
            .any(|var| var == needle.as_bytes())
            .then_some(pid)
    })
}

async fn inject(
    kind: &str,
    cluster: &mut Cluster,
    pg: &PgCluster,
    rng: &mut StdRng,
) -> Option<Heal> {
    match kind {
        "kill-coordinator" => {
            let i = rng.random_range(0..cluster.coordinators.len());
            cluster.coordinators[i].kill().await;
            Some(Heal::RestartCoordinator(i))
        }
        "stop-coordinator" => {
            let i = rng.random_range(0..cluster.coordinators.len());
            let pid = coordinator_pid(&ferry_tests::cluster::coordinator_name(i))?;
            signal(pid, "STOP");
            Some(Heal::ContinuePid(pid))
        }
        "kill-agent" => {
            let i = rng.random_range(0..cluster.agents.len());
            cluster.agents[i].kill().await;
            Some(Heal::RestartAgent(i))
        }
        "stop-agent" => {
            let i = rng.random_range(0..cluster.agents.len());
            let pid = cluster.agents[i].pid()?;
            signal(pid, "STOP");
            Some(Heal::ContinuePid(pid))
        }
        "cut-s3" => {
            cluster.s3_proxy.cut();
            Some(Heal::ReconnectS3)
        }
        "cut-amqp" => {
            cluster.amqp_proxy.cut();
            Some(Heal::ReconnectAmqp)
        }
        "cut-sftp" => {
            cluster.sftp_proxy.cut();
            Some(Heal::ReconnectSftp)
        }
        "restart-postgres" => {
            pg.stop();
            Some(Heal::StartPostgres)
        }
        other => unreachable!("fault {other}"),
    }
}

async fn heal(heal: Heal, cluster: &mut Cluster, pg: &PgCluster) {
    match heal {
        Heal::RestartCoordinator(i) => cluster.coordinators[i].restart().await,
        Heal::ContinuePid(pid) => signal(pid, "CONT"),
        Heal::RestartAgent(i) => cluster.agents[i].restart().await,
        Heal::ReconnectS3 => cluster.s3_proxy.heal(),
        Heal::ReconnectAmqp => cluster.amqp_proxy.heal(),
        Heal::ReconnectSftp => cluster.sftp_proxy.heal(),
        Heal::StartPostgres => pg.start_server().await,
    }
}

/// Takes what the queue holds right now (without waiting long).
async fn drain_queue(cluster: &mut Cluster, into: &mut Vec<AmqpMessage>) {
    while let Some(m) = cluster.queue.next_message(Duration::from_millis(5)).await {
        into.push(m);
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let secs = env_u64("FERRY_SOAK_SECS", 300);
    let fault_every = Duration::from_secs(env_u64("FERRY_SOAK_FAULT_SECS", 3));
    let kinds: Vec<&str> = match std::env::var("FERRY_SOAK_FAULTS") {
        Ok(list) => KINDS
            .iter()
            .copied()
            .filter(|k| list.split(',').any(|w| w.trim() == *k))
            .collect(),
        Err(_) => KINDS.to_vec(),
    };
    assert!(
        !kinds.is_empty(),
        "FERRY_SOAK_FAULTS names none of {KINDS:?}"
    );
    let file_every = Duration::from_millis(env_u64("FERRY_SOAK_FILE_MS", 200));
    let seed = env_u64("FERRY_SOAK_SEED", rand::rng().random());
    let mut rng = StdRng::seed_from_u64(seed);
    println!(
        "soak: {secs}s of chaos, a fault {fault_every:?} after the last one healed (each \
         healed after {OUTAGE:?}) from {kinds:?}, a file every {file_every:?}, seed {seed}"
    );

    let pg = PgCluster::start().await;
    pg.create_database("ferry").await;
    let mut cluster = Cluster::start(ClusterOptions {
        database_url: Some(pg.url("ferry")),
        ..Default::default()
    })
    .await;
    cluster.watch("soak").await;
    for name in ["a1", "a2", "a3"] {
        cluster.start_agent(name, 2).await;
    }
    eventually(
        "three agents connected",
        Duration::from_secs(60),
        || async {
            let s = cluster.agent_sessions().await.ok()?;
            (s.len() == 3 && s.iter().all(|s| s.connected)).then_some(())
        },
    )
    .await;

    let started = Instant::now();
    let end = started + Duration::from_secs(secs);
    let mut offered: BTreeMap<String, usize> = BTreeMap::new();
    let mut faults: BTreeMap<&str, usize> = BTreeMap::new();
    let mut skipped: BTreeMap<&str, usize> = BTreeMap::new();
    let mut messages = Vec::new();
    let mut next_file = started;
    let mut next_fault = started + fault_every;
    let mut healing: Option<(Instant, Heal)> = None;
    let mut n = 0u64;
    while Instant::now() < end {
        let now = Instant::now();
        if now >= next_file {
            let size = rng.random_range(1..=512usize) << 10;
            let rel = format!("soak/s{n:05}.bin");
            cluster.sshd.write_file(&rel, &content(n + 1, size));
            offered.insert(cluster.sshd.remote_path(&rel), size);
            n += 1;
            next_file += file_every;
        }
        if let Some((due, _)) = &healing
            && now >= *due
        {
            let (_, h) = healing.take().expect("a fault to heal");
            heal(h, &mut cluster, &pg).await;
            next_fault = Instant::now() + fault_every;
        }
        if healing.is_none() && now >= next_fault {
            let kind = kinds[rng.random_range(0..kinds.len())];
            match inject(kind, &mut cluster, &pg, &mut rng).await {
                Some(h) => {
                    *faults.entry(kind).or_default() += 1;
                    println!("{:>6.1}s fault {kind}", started.elapsed().as_secs_f64());
                    healing = Some((Instant::now() + OUTAGE, h));
                }
                None => {
                    *skipped.entry(kind).or_default() += 1;
                    next_fault = Instant::now() + Duration::from_secs(1);
                }
            }
        }
        drain_queue(&mut cluster, &mut messages).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Some((_, h)) = healing.take() {
        heal(h, &mut cluster, &pg).await;
    }
    let chaos = started.elapsed();
    println!(
        "chaos over after {:.0}s: {} files offered; waiting for them to settle",
        chaos.as_secs_f64(),
        offered.len()
    );

    // Settled: every offered file has a row that is processed or failed.
    let settle = Instant::now();
    let deadline = settle + Duration::from_secs(600);
    let files = loop {
        drain_queue(&mut cluster, &mut messages).await;
        if let Ok(files) = cluster.files().await {
            let done = files.len() >= offered.len()
                && files
                    .iter()
                    .all(|f| f.status == "processed" || f.status == "failed");
            if done || Instant::now() >= deadline {
                break files;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    println!("settled after {:.0}s", settle.elapsed().as_secs_f64());
    // Announcements still on their way.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        messages.extend(cluster.collect_messages(Duration::from_secs(2)).await);
        let stored: Vec<AmqpMessage> = messages
            .iter()
            .filter(|m| m.kind.as_deref() == Some("ferry.file.stored"))
            .cloned()
            .collect();
        if Tally::of(&files, &stored).lost.is_empty() || Instant::now() >= deadline {
            break;
        }
    }

    // Failure announcements (`ferry.file.failed` / `lost`) carry no
    // announcement id: counted apart, the tally is over stored ones.
    let (stored, failure_messages): (Vec<AmqpMessage>, Vec<AmqpMessage>) = messages
        .into_iter()
        .partition(|m| m.kind.as_deref() == Some("ferry.file.stored"));
    let messages = stored;
    let tally = Tally::of(&files, &messages);
    let rows: std::collections::HashSet<&str> = files.iter().map(|f| f.path.as_str()).collect();
    let without_row: Vec<&String> = offered
        .keys()
        .filter(|p| !rows.contains(p.as_str()))
        .collect();
    let latencies: Vec<f64> = files.iter().filter_map(|f| f.latency_secs).collect();
    let lost = tally.lost.len() + without_row.len();
    let fmt = |v: Option<f64>| v.map_or("-".to_string(), |s| format!("{s:.1}s"));
    println!(
        "---- chaos soak ({:.0}s of faults, seed {seed})",
        chaos.as_secs_f64()
    );
    println!("files offered      {}", offered.len());
    println!("processed          {}", tally.processed);
    println!("lost               {lost}");
    println!(
        "failed             {} ({} failure announcements)",
        tally.failed,
        failure_messages.len()
    );
    println!(
        "messages           {} ({} duplicates, all with the same message_id: {})",
        tally.messages,
        tally.duplicates,
        tally.conflicting_ids.is_empty()
    );
    println!(
        "latency discovery -> processed  p50 {}  p99 {}  max {}",
        fmt(percentile(&latencies, 50.0)),
        fmt(percentile(&latencies, 99.0)),
        fmt(percentile(&latencies, 100.0))
    );
    println!(
        "faults injected    {} {:?}",
        faults.values().sum::<usize>(),
        faults
    );
    if !skipped.is_empty() {
        println!("faults skipped     {skipped:?} (target not running)");
    }
    let failed: Vec<(String, i32, Option<String>)> = sqlx::query_as(
        "SELECT path, attempts, last_error FROM files WHERE status = 'failed' ORDER BY id",
    )
    .fetch_all(&cluster.pool)
    .await
    .unwrap_or_default();
    for (path, attempts, error) in &failed {
        println!("  failed {path} after {attempts} attempts: {error:?}");
    }
    if lost > 0 {
        println!("LOST: {:?} {:?}", tally.lost, without_row);
    }
    if !tally.conflicting_ids.is_empty() {
        println!(
            "message ids naming two versions: {:?}",
            tally.conflicting_ids
        );
    }
    if lost == 0 && tally.conflicting_ids.is_empty() && tally.mismatched_bodies == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
