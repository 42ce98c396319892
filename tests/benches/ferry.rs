//! ferry benchmarks: print figures, assert nothing about time (the machine is
//! shared and noisy). Run with the release binaries:
//!
//! ```text
//! cargo build --release --bins && cargo bench -p ferry-tests --bench ferry            # all
//! cargo bench -p ferry-tests --bench ferry -- discovery    # 100,000-file directory
//! cargo bench -p ferry-tests --bench ferry -- transfer     # 1 GiB and 4 GiB, RSS, MB/s, rclone
//! ```
//! `FERRY_BENCH_FILES` (default 100000) and `FERRY_BENCH_SIZES_MIB` (default
//! `1024,4096`) change the workload.

use std::time::{Duration, Instant};

use ferry_proto as proto;
use ferry_tests::{Agent, AgentOptions, Coordinator, S3Server, Sshd, TestDb, TestPki, eventually};

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(db.pool()).await.unwrap()
}

async fn setup(pki: &TestPki, sshd: &Sshd, coord: &Coordinator, dir: &str, bucket: &str) -> i64 {
    let mut admin = coord.admin_client(&pki.admin("bench")).await.unwrap();
    let id = admin
        .add_server(proto::AddServerRequest {
            name: "bench".into(),
            hostname: "127.0.0.1".into(),
            port: u32::from(sshd.port()),
            username: sshd.user().into(),
            auth: Some(proto::add_server_request::Auth::Password(proto::Password {
                password: sshd.password().into(),
            })),
            host_key_fingerprint: sshd.host_key_fingerprint().into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id;
    admin
        .add_watch(proto::AddWatchRequest {
            server_id: id,
            directory: sshd.remote_path(dir),
            poll_interval_secs: 2,
            bucket: bucket.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    id
}

async fn discovery() {
    let n: i64 = env_or("FERRY_BENCH_FILES", "100000").parse().unwrap();
    let db = TestDb::create().await;
    let pki = TestPki::new();
    let coord = Coordinator::start(&db, &pki).await;
    let sshd = Sshd::start().await;
    sshd.mkdir("many");
    let made = Instant::now();
    for i in 0..n {
        sshd.write_file(&format!("many/file-{i:06}.dat"), b"x");
    }
    println!(
        "discovery: created {n} files in {:.1}s",
        made.elapsed().as_secs_f64()
    );
    let id = setup(&pki, &sshd, &coord, "many", "bench").await;
    let start = Instant::now();
    let _agent = Agent::start(
        "bench-agent",
        &pki.agent("bench-agent"),
        &[coord.endpoint()],
        AgentOptions {
            capacity: 0,
            ..Default::default()
        },
    )
    .await;
    eventually("all rows", Duration::from_secs(1800), || async {
        (count(&db, "SELECT count(*) FROM files").await >= n).then_some(())
    })
    .await;
    let all_in = start.elapsed();
    println!(
        "discovery: {n} files -> {n} rows in {:.1}s from agent start ({:.0} files/s)",
        all_in.as_secs_f64(),
        n as f64 / all_in.as_secs_f64()
    );
    // Steady state: three more polls with nothing new.
    let inserts = "SELECT (n_tup_ins + n_tup_upd + n_tup_del)::BIGINT FROM pg_stat_user_tables WHERE relname = 'files'";
    let events =
        "SELECT (n_tup_ins)::BIGINT FROM pg_stat_user_tables WHERE relname = 'file_events'";
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (w0, e0) = (count(&db, inserts).await, count(&db, events).await);
    let mut durations = Vec::new();
    for _ in 0..3 {
        let before: Option<chrono::DateTime<chrono::Utc>> =
            sqlx::query_scalar("SELECT last_poll_at FROM servers WHERE id = $1")
                .bind(id)
                .fetch_one(db.pool())
                .await
                .unwrap();
        let d: i32 = eventually("next poll", Duration::from_secs(600), || async {
            let (at, ms): (Option<chrono::DateTime<chrono::Utc>>, Option<i32>) = sqlx::query_as(
                "SELECT last_poll_at, last_poll_duration_ms FROM servers WHERE id = $1",
            )
            .bind(id)
            .fetch_one(db.pool())
            .await
            .unwrap();
            (at != before).then_some(ms.unwrap_or(-1))
        })
        .await;
        durations.push(d);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (w1, e1) = (count(&db, inserts).await, count(&db, events).await);
    println!("discovery: steady-state poll durations {durations:?} ms (listing {n} entries)");
    println!(
        "discovery: rows written by 3 polls without changes: files {} , file_events {}",
        w1 - w0,
        e1 - e0
    );
}

/// Peak RSS (VmHWM) of a process, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn write_big(path: &std::path::Path, mib: u64) {
    use std::io::Write;
    let mut f = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(path).unwrap());
    let mut block = vec![0u8; 1 << 20];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for _ in 0..mib {
        for chunk in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&block).unwrap();
    }
    f.flush().unwrap();
}

async fn rclone_copy(sshd: &Sshd, s3: &S3Server, remote_path: &str, bucket: &str) -> Option<f64> {
    let obscured = std::process::Command::new("rclone")
        .args(["obscure", sshd.password()])
        .output()
        .ok()?;
    let pass = String::from_utf8_lossy(&obscured.stdout).trim().to_string();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("rclone.conf");
    std::fs::write(
        &conf,
        format!(
            "[src]\ntype = sftp\nhost = 127.0.0.1\nport = {}\nuser = {}\npass = {pass}\n\n\
             [dst]\ntype = s3\nprovider = Other\nendpoint = {}\naccess_key_id = {}\nsecret_access_key = {}\nregion = us-east-1\nforce_path_style = true\n",
            sshd.port(),
            sshd.user(),
            s3.endpoint(),
            s3.access_key(),
            s3.secret_key()
        ),
    )
    .unwrap();
    let start = Instant::now();
    let status = std::process::Command::new("rclone")
        .args([
            "--config",
            conf.to_str().unwrap(),
            "copyto",
            &format!("src:{remote_path}"),
            &format!("dst:{bucket}/rclone.bin"),
        ])
        .env_remove("AWS_CA_BUNDLE")
        .status()
        .ok()?;
    status.success().then(|| start.elapsed().as_secs_f64())
}

async fn transfer() {
    let sizes: Vec<u64> = env_or("FERRY_BENCH_SIZES_MIB", "1024,4096")
        .split(',')
        .map(|s| s.trim().parse().unwrap())
        .collect();
    for mib in sizes {
        let db = TestDb::create().await;
        let pki = TestPki::new();
        let s3 = S3Server::start().await;
        s3.create_bucket("bench").await;
        let coord = Coordinator::start(&db, &pki).await;
        let sshd = Sshd::start().await;
        sshd.mkdir("big");
        let local = sshd.root().join("big/payload.bin");
        write_big(&local, mib);
        let _ = std::process::Command::new("chown")
            .args(["ferrytest:", local.to_str().unwrap()])
            .status();
        setup(&pki, &sshd, &coord, "big", "bench").await;
        let mut env = s3.env();
        // Optional agent environment to compare, e.g. FERRY_BENCH_AGENT_ENV=MALLOC_ARENA_MAX=2
        if let Ok(extra) = std::env::var("FERRY_BENCH_AGENT_ENV") {
            for pair in extra.split(',') {
                if let Some((k, v)) = pair.split_once('=') {
                    env.push((k.to_string(), v.to_string()));
                }
            }
        }
        let agent = Agent::start(
            "bench-agent",
            &pki.agent("bench-agent"),
            &[coord.endpoint()],
            AgentOptions {
                capacity: 1,
                env,
                ..Default::default()
            },
        )
        .await;
        let pid = agent.pid().expect("agent pid");
        let mut peak = 0;
        let deadline = Instant::now() + Duration::from_secs(3600);
        loop {
            peak = peak.max(peak_rss_kib(pid));
            let st: Option<String> = sqlx::query_scalar("SELECT status FROM files")
                .fetch_optional(db.pool())
                .await
                .unwrap();
            if matches!(st.as_deref(), Some("uploaded" | "processed")) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "transfer did not finish within an hour"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        peak = peak.max(peak_rss_kib(pid));
        let secs: f64 = sqlx::query_scalar(
            "SELECT EXTRACT(EPOCH FROM (max(e.at) FILTER (WHERE e.to_status = 'uploaded') \
                                       - max(e.at) FILTER (WHERE e.to_status = 'in_progress')))::FLOAT8 FROM file_events e",
        )
        .fetch_one(db.pool())
        .await
        .unwrap();
        let mb = (mib << 20) as f64 / 1e6;
        println!(
            "transfer: {mib} MiB in {secs:.1}s = {:.1} MB/s, agent peak RSS {:.1} MiB",
            mb / secs,
            peak as f64 / 1024.0
        );
        drop(agent);
        match rclone_copy(&sshd, &s3, &sshd.remote_path("big/payload.bin"), "bench").await {
            Some(r) => println!(
                "transfer: rclone copyto same file {r:.1}s = {:.1} MB/s; ferry/rclone throughput ratio {:.2}",
                mb / r,
                r / secs
            ),
            None => println!("transfer: rclone run failed (is rclone installed?)"),
        }
    }
}

#[tokio::main]
async fn main() {
    ferry_tests::init();
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let wants = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    if wants("discovery") {
        discovery().await;
    }
    if wants("transfer") {
        transfer().await;
    }
}
