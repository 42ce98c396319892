//! ferry benchmarks: print figures, assert nothing about time (the machine is
//! shared and noisy). Run with the release binaries:
//!
//! ```text
//! cargo build --release --bins && cargo bench -p ferry-tests --bench ferry            # all
//! cargo bench -p ferry-tests --bench ferry -- discovery    # 100,000-file directory
//! cargo bench -p ferry-tests --bench ferry -- transfer     # 1 GiB and 4 GiB, RSS, MB/s, rclone
//! cargo bench -p ferry-tests --bench ferry -- small        # N x 4 KiB files, ferry vs rclone
//! cargo bench -p ferry-tests --bench ferry -- dispatch     # tasks/s, 1 and 2 coordinators, fake agents
//! cargo bench -p ferry-tests --bench ferry -- servers      # S servers x F files vs 1 server, idle cost
//! cargo bench -p ferry-tests --bench ferry -- scale        # read paths and retention at 10 M rows vs empty
//! ```
//! `scale` runs only when named; `FERRY_BENCH_ROWS` sets its file versions
//! (default 10000000).
//! `FERRY_BENCH_FILES` (discovery: default 100000; small: a list, default
//! `2000,10000`), `FERRY_BENCH_SIZES_MIB` (default `1024,4096`),
//! `FERRY_BENCH_KIB` (small: file size, default 4), `FERRY_BENCH_CAPACITY`
//! and `FERRY_BENCH_SESSIONS` (small: agent capacity and server
//! `max_sessions`, default 8), `FERRY_BENCH_TASKS`, `FERRY_BENCH_AGENTS`
//! and `FERRY_BENCH_SERVERS` (dispatch: default 20000 tasks, 8 fake agents
//! of capacity 64, 16 servers), `FERRY_BENCH_LAYOUT` and
//! `FERRY_BENCH_POLL_SECS` (servers: default `1000x5` and 2 s) and
//! `FERRY_BENCH_AUTH` (servers: `password`, the default, `key` or
//! `key-passphrase`) change the workload.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use ferry_proto as proto;
use ferry_tests::{
    Agent, AgentOptions, AmqpQueue, Coordinator, CpuSnapshot, S3Server, Sshd, TestDb, TestPki,
    eventually, unique_exchange,
};

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(db.pool()).await.unwrap()
}

/// When a run's files reached their milestones, from its start.
#[derive(Default)]
struct Milestones {
    all_rows: Option<Duration>,
    first_processed: Option<Duration>,
}

/// Waits until `n` files are `processed`, polling Postgres with queries
/// that stay cheap (the bench shares the 2 cores with what it measures: a
/// `count(*)` of every row every 50 ms cost Postgres 1.7 s in a 10,000-file
/// run). Until all rows are there and one file is `processed`, those two
/// are checked every 50 ms; after that the files not yet `processed` are
/// counted (an index scan, its cost in proportion to them), next after
/// 0.5 ms per such file, at least 50 ms and at most 0.5 s: the end is seen
/// within 50 ms. Panics after an hour.
async fn await_processed(db: &TestDb, n: i64, start: Instant) -> Milestones {
    let mut m = Milestones::default();
    loop {
        if m.all_rows.is_none() && count(db, "SELECT count(*) FROM files").await >= n {
            m.all_rows = Some(start.elapsed());
        }
        if m.first_processed.is_none()
            && count(
                db,
                "SELECT count(*) FROM (SELECT 1 FROM files WHERE status = 'processed' LIMIT 1) f",
            )
            .await
                > 0
        {
            m.first_processed = Some(start.elapsed());
        }
        let mut pause = Duration::from_millis(50);
        if m.all_rows.is_some() && m.first_processed.is_some() {
            let left = count(
                db,
                "SELECT count(*) FROM files \
                 WHERE status IN ('new', 'in_progress', 'uploaded', 'error')",
            )
            .await;
            if left == 0 {
                let processed =
                    count(db, "SELECT count(*) FROM files WHERE status = 'processed'").await;
                assert!(
                    processed >= n,
                    "only {processed} of {n} files processed; the rest ended failed, lost or skipped"
                );
                return m;
            }
            let left = u32::try_from(left).unwrap_or(u32::MAX);
            pause = (Duration::from_micros(500) * left).clamp(pause, Duration::from_millis(500));
        }
        assert!(
            start.elapsed() < Duration::from_secs(3600),
            "not all of {n} files processed after an hour"
        );
        tokio::time::sleep(pause).await;
    }
}

/// The server `bench` on `sshd`, password login, pinned host key.
fn server_request(sshd: &Sshd) -> proto::AddServerRequest {
    proto::AddServerRequest {
        name: "bench".into(),
        hostname: "127.0.0.1".into(),
        port: u32::from(sshd.port()),
        username: sshd.user().into(),
        auth: Some(proto::add_server_request::Auth::Password(proto::Password {
            password: sshd.password().into(),
        })),
        host_key_fingerprint: sshd.host_key_fingerprint().into(),
        ..Default::default()
    }
}

type Admin = proto::admin_service_client::AdminServiceClient<tonic::transport::Channel>;

/// Registers `server`; its id.
async fn add_server(admin: &mut Admin, server: proto::AddServerRequest) -> i64 {
    admin.add_server(server).await.unwrap().into_inner().id
}

/// Registers `server` and `watch` on it; the server's id.
async fn add_watched_server(
    admin: &mut Admin,
    server: proto::AddServerRequest,
    watch: proto::AddWatchRequest,
) -> i64 {
    let server_id = add_server(admin, server).await;
    admin
        .add_watch(proto::AddWatchRequest { server_id, ..watch })
        .await
        .unwrap();
    server_id
}

async fn setup(pki: &TestPki, sshd: &Sshd, coord: &Coordinator, dir: &str, bucket: &str) -> i64 {
    let mut admin = coord.admin_client(&pki.admin("bench")).await.unwrap();
    add_watched_server(
        &mut admin,
        server_request(sshd),
        proto::AddWatchRequest {
            directory: sshd.remote_path(dir),
            poll_interval_secs: 2,
            bucket: bucket.into(),
            ..Default::default()
        },
    )
    .await
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
    settle_disk();
    let db_start: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(db.pool())
        .await
        .unwrap();
    let start = Instant::now();
    let cpu_start = CpuSnapshot::take();
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
    let run_cpu = CpuSnapshot::take().since(&cpu_start);
    println!(
        "discovery: {n} files -> {n} rows in {:.1}s from agent start ({:.0} files/s)",
        all_in.as_secs_f64(),
        n as f64 / all_in.as_secs_f64()
    );
    print_cpu("discovery", n, &run_cpu);
    // Where the time went: before the first row (connect, two polls for
    // the stability rule) and while inserting (history rows carry the time
    // they were written).
    let (first, last): (f64, f64) = sqlx::query_as(
        "SELECT extract(epoch FROM min(at) - $1)::float8, extract(epoch FROM max(at) - $1)::float8 \
         FROM file_events",
    )
    .bind(db_start)
    .fetch_one(db.pool())
    .await
    .unwrap();
    println!(
        "discovery: first row {first:.1}s after agent start, last {last:.1}s ({:.1}s inserting)",
        last - first
    );
    // Steady state: three more polls with nothing new. Rows written are
    // counted from the rows themselves (committed ones: `files` rows whose
    // xmin is newer than a transaction taken now, `file_events` rows above
    // the current id), not from the statistics views, which backends
    // update late.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start_xid = count(
        &db,
        "SELECT (pg_current_xact_id()::text::BIGINT % 4294967296)::BIGINT",
    )
    .await;
    let last_event = count(&db, "SELECT COALESCE(max(id), 0) FROM file_events").await;
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
    let files_written: i64 =
        sqlx::query_scalar("SELECT count(*) FROM files WHERE xmin::text::BIGINT > $1")
            .bind(start_xid)
            .fetch_one(db.pool())
            .await
            .unwrap();
    println!("discovery: steady-state poll durations {durations:?} ms (listing {n} entries)");
    let written: Vec<(String, String, String, i64)> = sqlx::query_as(
        "SELECT COALESCE(from_status, '-'), to_status, left(reason, 80), count(*) FROM file_events \
         WHERE id > $1 GROUP BY 1, 2, 3 ORDER BY 4 DESC LIMIT 5",
    )
    .bind(last_event)
    .fetch_all(db.pool())
    .await
    .unwrap();
    println!(
        "discovery: rows written by 3 polls without changes: files {files_written}, file_events {}",
        written.iter().map(|w| w.3).sum::<i64>()
    );
    for (from, to, reason, n) in written {
        println!("discovery:   {n} events {from} -> {to}: {reason}");
    }
}

/// A `kB` field of `/proc/PID/status` (`VmHWM`: peak RSS, `VmRSS`: RSS),
/// in KiB; 0 if unknown.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))
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

/// Runs rclone with a config naming `src:` (the sshd) and `dst:` (the S3
/// server); returns the wall time of a successful run.
/// Writes back what earlier steps left dirty in the page cache (`sync`), so
/// a timed run does not share the disk and the CPU with the kernel's
/// writeback of the files just created for it, or of the run before it.
fn settle_disk() {
    if let Err(e) = std::process::Command::new("sync").status() {
        println!("bench: sync failed: {e}");
    }
}

fn rclone(sshd: &Sshd, s3: &S3Server, args: &[&str]) -> Option<f64> {
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
    settle_disk();
    let start = Instant::now();
    let status = std::process::Command::new("rclone")
        .args(["--config", conf.to_str().unwrap()])
        .args(args)
        .env_remove("AWS_CA_BUNDLE")
        .status()
        .ok()?;
    status.success().then(|| start.elapsed().as_secs_f64())
}

async fn rclone_copy(sshd: &Sshd, s3: &S3Server, remote_path: &str, bucket: &str) -> Option<f64> {
    rclone(
        sshd,
        s3,
        &[
            "copyto",
            &format!("src:{remote_path}"),
            &format!("dst:{bucket}/rclone.bin"),
        ],
    )
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
        settle_disk();
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
            peak = peak.max(status_kib(pid, "VmHWM"));
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
        peak = peak.max(status_kib(pid, "VmHWM"));
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

/// What `small` and `servers` run: a database, an S3 server with the
/// bucket `bench`, a queue bound to a fresh exchange, a coordinator
/// announcing to it, and an sshd.
struct FlowStack {
    db: TestDb,
    pki: TestPki,
    s3: S3Server,
    queue: AmqpQueue,
    coord: Coordinator,
    sshd: Sshd,
}

impl FlowStack {
    async fn start() -> FlowStack {
        let db = TestDb::create().await;
        let pki = TestPki::new();
        let s3 = S3Server::start().await;
        s3.create_bucket("bench").await;
        let exchange = unique_exchange();
        let queue = AmqpQueue::declare(&exchange).await;
        let coord = Coordinator::start_with_env(
            &db,
            &pki,
            &[
                ("FERRY_AMQP_URL", queue.url()),
                ("FERRY_AMQP_EXCHANGE", exchange.as_str()),
                ("RUST_LOG", "warn"),
            ],
        )
        .await;
        let sshd = Sshd::start().await;
        FlowStack {
            db,
            pki,
            s3,
            queue,
            coord,
            sshd,
        }
    }
}

/// The bench agent of a [`FlowStack`], storing into its S3 server, logging
/// at `log` (a `RUST_LOG` filter).
async fn bench_agent(
    s3: &S3Server,
    pki: &TestPki,
    coord: &Coordinator,
    capacity: u32,
    log: &str,
) -> Agent {
    let mut env = s3.env();
    env.push(("RUST_LOG".into(), log.into()));
    Agent::start(
        "bench-agent",
        &pki.agent("bench-agent"),
        &[coord.endpoint()],
        AgentOptions {
            capacity,
            env,
            ..Default::default()
        },
    )
    .await
}

/// Small files: N files of a few KiB, already stable, in one directory;
/// from watch creation to every file `processed` (counted in Postgres) with
/// one AMQP message each, against `rclone copy` of the same directory to the
/// same S3 server in the same run.
async fn small() {
    let counts: Vec<i64> = env_or("FERRY_BENCH_FILES", "2000,10000")
        .split(',')
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let kib: usize = env_or("FERRY_BENCH_KIB", "4").parse().unwrap();
    let capacity: u32 = env_or("FERRY_BENCH_CAPACITY", "8").parse().unwrap();
    let sessions: u32 = env_or("FERRY_BENCH_SESSIONS", "8").parse().unwrap();
    for n in counts {
        let FlowStack {
            db,
            pki,
            s3,
            mut queue,
            coord,
            sshd,
        } = FlowStack::start().await;
        sshd.mkdir("small");
        let mut body = vec![0u8; kib << 10];
        for i in 0..n {
            body[..8].copy_from_slice(&i.to_le_bytes());
            sshd.write_file(&format!("small/f-{i:06}.csv"), &body);
        }
        let mut admin = coord.admin_client(&pki.admin("bench")).await.unwrap();
        let server_id = add_server(
            &mut admin,
            proto::AddServerRequest {
                max_sessions: sessions,
                ..server_request(&sshd)
            },
        )
        .await;
        let agent_log = std::env::var("FERRY_BENCH_AGENT_LOG").ok();
        let log = agent_log.as_deref().unwrap_or("warn");
        let agent = bench_agent(&s3, &pki, &coord, capacity, log).await;
        eventually("agent connected", Duration::from_secs(60), || async {
            (count(&db, "SELECT count(*) FROM agents WHERE connected").await > 0).then_some(())
        })
        .await;
        settle_disk();
        let cpu_before = CpuSnapshot::take();
        let start = Instant::now();
        admin
            .add_watch(proto::AddWatchRequest {
                server_id,
                directory: sshd.remote_path("small"),
                poll_interval_secs: 1,
                min_age_secs: Some(0),
                bucket: "bench".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let Milestones {
            all_rows,
            first_processed,
        } = await_processed(&db, n, start).await;
        let ferry = start.elapsed().as_secs_f64();
        let ferry_cpu = CpuSnapshot::take().since(&cpu_before);
        let mut ids = HashSet::new();
        let mut messages = 0;
        while let Some(m) = queue.next_message(Duration::from_secs(5)).await {
            messages += 1;
            ids.insert(m.message_id.unwrap_or_default());
            if ids.len() as i64 >= n {
                // Give duplicates, if any, a moment to show up.
                messages += queue.drain_for(Duration::from_secs(1)).await.len();
                break;
            }
        }
        let not_processed = count(
            &db,
            "SELECT count(*) FROM files WHERE status <> 'processed'",
        )
        .await;
        let show =
            |d: Option<Duration>| d.map_or("-".to_string(), |d| format!("{:.2}s", d.as_secs_f64()));
        println!(
            "small: {n} x {kib} KiB ferry {ferry:.2}s ({:.0} files/s); all rows at {}, first processed at {}; \
             AMQP messages {messages} for {} files; files not processed {not_processed}",
            n as f64 / ferry,
            show(all_rows),
            show(first_processed),
            ids.len()
        );
        let phases: Vec<(String, f64, f64)> = sqlx::query_as(
            "SELECT to_status, EXTRACT(EPOCH FROM min(at) - (SELECT min(at) FROM file_events))::FLOAT8, \
                    EXTRACT(EPOCH FROM max(at) - (SELECT min(at) FROM file_events))::FLOAT8 \
             FROM file_events GROUP BY to_status ORDER BY 2",
        )
        .fetch_all(db.pool())
        .await
        .unwrap();
        for (status, first, last) in phases {
            println!(
                "small:   {status:<12} first {first:6.2}s last {last:6.2}s after the first event"
            );
        }
        print_cpu("ferry", n, &ferry_cpu);
        if agent_log.is_some() {
            print_phases(agent.log_path());
        }
        let remote = sshd.remote_path("small");
        let transfers = capacity.to_string();
        let cpu_before = CpuSnapshot::take();
        let rclone_run = rclone(
            &sshd,
            &s3,
            &[
                "copy",
                "--transfers",
                &transfers,
                "--checkers",
                "16",
                "--sftp-disable-hashcheck",
                &format!("src:{remote}"),
                "dst:bench/rclone",
            ],
        );
        print_cpu("rclone", n, &CpuSnapshot::take().since(&cpu_before));
        match rclone_run {
            Some(r) => println!(
                "small: {n} x {kib} KiB rclone copy --transfers {transfers} --checkers 16 {r:.2}s ({:.0} files/s); \
                 ferry/rclone files/s ratio {:.2}",
                n as f64 / r,
                r / ferry
            ),
            None => println!("small: rclone run failed (is rclone installed?)"),
        }
    }
}

/// Many servers: S servers (one directory each, all on one sshd) x F files
/// of a few KiB on one agent, against one server holding S x F files in the
/// same run. Times run from agent start to every file `processed`; printed:
/// files/s of both, when the first file of every server was processed
/// (p50, max), and the agent's idle cost with all S servers polled
/// (SSH connections, RSS, CPU over 10 s).
async fn servers() {
    let layout = env_or("FERRY_BENCH_LAYOUT", "1000x5");
    let (s, f) = layout
        .split_once('x')
        .map(|(s, f)| (s.parse::<usize>().unwrap(), f.parse::<usize>().unwrap()))
        .expect("FERRY_BENCH_LAYOUT is SERVERSxFILES, e.g. 1000x5");
    let poll: u32 = env_or("FERRY_BENCH_POLL_SECS", "2").parse().unwrap();
    let capacity: u32 = env_or("FERRY_BENCH_CAPACITY", "8").parse().unwrap();
    let kib: usize = env_or("FERRY_BENCH_KIB", "4").parse().unwrap();
    let auth = env_or("FERRY_BENCH_AUTH", "password");
    for (servers, files) in [(s, f), (1, s * f)] {
        let FlowStack {
            db,
            pki,
            s3,
            queue: _queue,
            coord,
            sshd,
        } = FlowStack::start().await;
        let mut body = vec![0u8; kib << 10];
        for server in 0..servers {
            sshd.mkdir(&format!("s{server:04}"));
            for i in 0..files {
                body[..8].copy_from_slice(&(server * files + i).to_le_bytes());
                sshd.write_file(&format!("s{server:04}/f-{i:06}.csv"), &body);
            }
        }
        let mut admin = coord.admin_client(&pki.admin("bench")).await.unwrap();
        for server in 0..servers {
            add_watched_server(
                &mut admin,
                proto::AddServerRequest {
                    name: format!("bench-{server:04}"),
                    max_sessions: 2,
                    auth: Some(bench_auth(&sshd, &auth)),
                    ..server_request(&sshd)
                },
                proto::AddWatchRequest {
                    directory: sshd.remote_path(&format!("s{server:04}")),
                    poll_interval_secs: poll,
                    min_age_secs: Some(0),
                    bucket: "bench".into(),
                    ..Default::default()
                },
            )
            .await;
        }
        settle_disk();
        let start = Instant::now();
        let cpu_start = CpuSnapshot::take();
        let agent = bench_agent(&s3, &pki, &coord, capacity, "warn").await;
        let n = (servers * files) as i64;
        await_processed(&db, n, start).await;
        let took = start.elapsed().as_secs_f64();
        let run_cpu = CpuSnapshot::take().since(&cpu_start);
        print_warnings("servers", agent.log_path());
        // When each server's first file was discovered (reported stable:
        // its login and two listings) and processed, from agent start.
        let since = |field: &str| {
            format!(
                "SELECT EXTRACT(EPOCH FROM min(e.at) - $1::timestamptz)::FLOAT8 \
                 FROM file_events e JOIN files f ON f.id = e.file_id \
                 WHERE e.to_status = '{field}' GROUP BY f.server_id"
            )
        };
        let started_at = chrono::Utc::now() - chrono::Duration::from_std(start.elapsed()).unwrap();
        let mut firsts = Vec::new();
        for status in ["new", "processed"] {
            let mut times: Vec<f64> = sqlx::query_scalar(&since(status))
                .bind(started_at)
                .fetch_all(db.pool())
                .await
                .unwrap();
            times.sort_by(f64::total_cmp);
            let p50 = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
            let max = times.last().copied().unwrap_or(f64::NAN);
            firsts.push((p50, max));
        }
        let [(new_p50, new_max), (p50, max)] = firsts[..] else {
            unreachable!("two statuses")
        };
        println!(
            "servers: {servers} servers x {files} files ({kib} KiB, poll {poll}s, capacity {capacity}, \
             {auth} logins): {took:.2}s from agent start ({:.0} files/s); first file of a server \
             processed p50 {p50:.2}s, last server's first {max:.2}s (target: 2 polls + 1s = {}s); \
             discovered p50 {new_p50:.2}s, last server's first {new_max:.2}s",
            n as f64 / took,
            2 * poll + 1
        );
        print_cpu("servers", n, &run_cpu);
        // Idle: every server polled, nothing to do.
        tokio::time::sleep(Duration::from_secs(u64::from(poll) * 2)).await;
        let pid = agent.pid().expect("agent running");
        let connections = ssh_connections(pid, sshd.port());
        let rss = status_kib(pid, "VmRSS");
        let before = CpuSnapshot::take();
        tokio::time::sleep(Duration::from_secs(10)).await;
        let idle = CpuSnapshot::take().since(&before);
        let agent_cpu = idle
            .by_name
            .iter()
            .filter(|(name, _)| name.starts_with("ferry-agent"))
            .map(|(_, d)| d.as_secs_f64())
            .sum::<f64>();
        println!(
            "servers:   idle with {servers} servers polled every {poll}s: agent SSH connections {connections}, \
             agent RSS {} MiB, agent CPU {:.1}% of one core; machine {}",
            rss / 1024,
            agent_cpu * 10.0,
            idle.summary(5)
        );
    }
}

/// How the `servers` bench logs in (`FERRY_BENCH_AUTH`): `password` (sshd
/// checks it against the system's password hash), `key` (ed25519) or
/// `key-passphrase` (ed25519, passphrase-protected: the agent derives the
/// decryption key from the passphrase).
fn bench_auth(sshd: &Sshd, auth: &str) -> proto::add_server_request::Auth {
    use proto::add_server_request::Auth;
    match auth {
        "password" => Auth::Password(proto::Password {
            password: sshd.password().into(),
        }),
        "key" => Auth::PrivateKey(proto::PrivateKey {
            pem: sshd.client_key_ed25519_pem().into(),
            passphrase: String::new(),
        }),
        "key-passphrase" => {
            let (pem, passphrase) = sshd.client_key_encrypted();
            Auth::PrivateKey(proto::PrivateKey {
                pem: pem.into(),
                passphrase: passphrase.into(),
            })
        }
        other => panic!("FERRY_BENCH_AUTH is `password`, `key` or `key-passphrase`, not {other:?}"),
    }
}

/// TCP connections of process `pid` to `port` on this machine (its SSH
/// connections to the bench sshd), from `/proc/PID/net/tcp` and its fds.
fn ssh_connections(pid: u32, port: u16) -> usize {
    let inodes: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().into_owned();
                    l.strip_prefix("socket:[")
                        .and_then(|r| r.strip_suffix(']'))
                        .map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default();
    let table = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
    let remote_port = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            f.len() > 9 && f[2].ends_with(&remote_port) && inodes.contains(f[9])
        })
        .count()
}

/// Per-phase times of the agent's transfers, from the `phases=` field of
/// its "transfer done" lines (logged at debug level:
/// `FERRY_BENCH_AGENT_LOG=warn,ferry_agent::transfer=debug`).
fn print_phases(log: &std::path::Path) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut phases: Vec<(String, Vec<f64>)> = Vec::new();
    for line in text.lines().filter(|l| l.contains("transfer done")) {
        let plain = strip_ansi(line);
        let Some((_, rest)) = plain.split_once("phases=") else {
            continue;
        };
        for token in rest.split_whitespace() {
            let Some((name, ms)) = token
                .split_once('=')
                .and_then(|(n, v)| Some((n, v.strip_suffix("ms")?.parse::<f64>().ok()?)))
            else {
                break;
            };
            match phases.iter_mut().find(|(n, _)| n == name) {
                Some((_, times)) => times.push(ms),
                None => phases.push((name.to_owned(), vec![ms])),
            }
        }
    }
    for (name, mut times) in phases {
        times.sort_by(f64::total_cmp);
        let at = |q: f64| times[((times.len() - 1) as f64 * q) as usize];
        println!(
            "small:   agent phase {name:<14} n {:>6} mean {:7.2}ms p50 {:7.2}ms p90 {:7.2}ms p99 {:7.2}ms",
            times.len(),
            times.iter().sum::<f64>() / times.len() as f64,
            at(0.5),
            at(0.9),
            at(0.99)
        );
    }
}

/// How many WARN and ERROR lines a log holds, by message (the text before
/// the fields), most frequent first: what went wrong during a run.
fn print_warnings(bench: &str, log: &std::path::Path) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut counts: Vec<(String, usize)> = Vec::new();
    for line in text.lines().map(strip_ansi) {
        let Some(rest) = line
            .split_once(" WARN ")
            .or_else(|| line.split_once(" ERROR "))
            .map(|(_, rest)| rest)
        else {
            continue;
        };
        // `target: message field=value ...`: keep target and message.
        let message: String = rest
            .split_whitespace()
            .take_while(|w| !w.contains('='))
            .collect::<Vec<_>>()
            .join(" ");
        match counts.iter_mut().find(|(m, _)| *m == message) {
            Some((_, n)) => *n += 1,
            None => counts.push((message, 1)),
        }
    }
    counts.sort_by_key(|c| std::cmp::Reverse(c.1));
    for (message, n) in counts.iter().take(5) {
        println!("{bench}:   agent log: {n} x {message}");
    }
}

/// `line` without ANSI colour sequences (`ESC [ ... m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The machine's CPU over one run and per file, and the processes that
/// used the most of it.
fn print_cpu(who: &str, files: i64, usage: &ferry_tests::cpu::CpuUsage) {
    println!(
        "cpu:     {who} {:.2} CPU ms per file; {}",
        usage.busy.as_secs_f64() * 1000.0 / files as f64,
        usage.summary(8)
    );
}

/// A fake agent for `dispatch`: the real protocol over gRPC + mTLS, no
/// SFTP or S3. It answers every assignment at once with the success the
/// task asks for, and counts what it was given.
async fn fake_agent(
    endpoint: String,
    certs: ferry_tests::CertFiles,
    capacity: u32,
    assigned: std::sync::Arc<std::sync::Mutex<Vec<i64>>>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    use proto::agent_message::Body;
    use proto::coordinator_message::Body as CBody;
    let tls = proto::tls::TlsPaths {
        ca: certs.ca.clone(),
        cert: certs.cert.clone(),
        key: certs.key.clone(),
    }
    .load()
    .unwrap()
    .client_config("127.0.0.1");
    let channel = tonic::transport::Channel::from_shared(endpoint)
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4096);
    tx.send(proto::AgentMessage {
        body: Some(Body::Hello(proto::Hello {
            version: "bench".into(),
            site: "default".into(),
            capacity,
            running_tasks: Vec::new(),
        })),
    })
    .await
    .unwrap();
    let mut inbound = proto::agent_service_client::AgentServiceClient::new(channel)
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut stop = stop;
    loop {
        let msg = tokio::select! {
            _ = stop.changed() => return,
            m = inbound.message() => m,
        };
        let Ok(Some(proto::CoordinatorMessage { body: Some(body) })) = msg else {
            return;
        };
        if let CBody::TaskAssignment(t) = body {
            assigned.lock().unwrap().push(t.file_id);
            let result = proto::TaskResult {
                file_id: t.file_id,
                fencing_token: t.fencing_token,
                outcome: Some(proto::task_result::Outcome::Success(proto::TaskSuccess {
                    size: t.size,
                    sha256: "0".repeat(64),
                    etag: "\"bench\"".into(),
                    bucket: t.bucket,
                    key: t.key,
                    ..Default::default()
                })),
            };
            if tx
                .send(proto::AgentMessage {
                    body: Some(Body::TaskResult(result)),
                })
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

/// Control-plane throughput: files inserted as `new` straight into Postgres
/// (spread over servers with disabled watches, so nothing polls), fake agents
/// spread over 1 or 2 coordinators sharing the database; from the wake-up to
/// every file `uploaded` (no AMQP configured, so they stay there). Double
/// assignments: files assigned more than once (history and fake agents' counts).
async fn dispatch() {
    let tasks: i64 = env_or("FERRY_BENCH_TASKS", "20000").parse().unwrap();
    let agents: usize = env_or("FERRY_BENCH_AGENTS", "8").parse().unwrap();
    let servers: i64 = env_or("FERRY_BENCH_SERVERS", "16").parse().unwrap();
    for coordinators in [1usize, 2] {
        let db = TestDb::create().await;
        let pki = TestPki::new();
        let quiet = [("RUST_LOG", "warn")];
        let mut coords = Vec::new();
        for _ in 0..coordinators {
            coords.push(Coordinator::start_with_env(&db, &pki, &quiet).await);
        }
        let mut admin = coords[0].admin_client(&pki.admin("bench")).await.unwrap();
        for i in 0..servers {
            add_watched_server(
                &mut admin,
                proto::AddServerRequest {
                    name: format!("bench-{i}"),
                    hostname: "127.0.0.1".into(),
                    port: 22,
                    username: "bench".into(),
                    auth: Some(proto::add_server_request::Auth::Password(proto::Password {
                        password: "bench".into(),
                    })),
                    host_key_fingerprint: "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU"
                        .into(),
                    max_sessions: 1000,
                    ..Default::default()
                },
                proto::AddWatchRequest {
                    directory: format!("/in/{i}"),
                    bucket: "bench".into(),
                    enabled: Some(false),
                    ..Default::default()
                },
            )
            .await;
        }
        let assigned = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut fakes = Vec::new();
        for a in 0..agents {
            let endpoint = coords[a % coordinators].endpoint();
            let certs = pki.agent(&format!("fake-{a}"));
            fakes.push(tokio::spawn(fake_agent(
                endpoint,
                certs,
                64,
                assigned.clone(),
                stop_rx.clone(),
            )));
        }
        eventually("fake agents connected", Duration::from_secs(60), || async {
            (count(&db, "SELECT count(*) FROM agents WHERE connected").await >= agents as i64)
                .then_some(())
        })
        .await;
        sqlx::query(
            "INSERT INTO files (server_id, watch_id, path, size, mtime_unix) \
             SELECT w.server_id, w.id, '/in/f-' || g, 4096, 1700000000 \
             FROM generate_series(1, $1) g \
             JOIN watches w ON w.directory = '/in/' || (g % $2)",
        )
        .bind(tasks)
        .bind(servers)
        .execute(db.pool())
        .await
        .unwrap();
        let commits_before = commits(&db).await;
        let cpu_before = CpuSnapshot::take();
        let start = Instant::now();
        sqlx::query("SELECT pg_notify('ferry_files_due', '')")
            .execute(db.pool())
            .await
            .unwrap();
        loop {
            let done = count(&db, "SELECT count(*) FROM files WHERE status = 'uploaded'").await;
            if done >= tasks {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(1800),
                "{done} of {tasks} tasks done after 30 minutes"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let secs = start.elapsed().as_secs_f64();
        let cpu = CpuSnapshot::take().since(&cpu_before);
        let commits = commits(&db).await - commits_before;
        let _ = stop_tx.send(true);
        for f in fakes {
            let _ = f.await;
        }
        let given = assigned.lock().unwrap().clone();
        let distinct: HashSet<i64> = given.iter().copied().collect();
        let double = count(
            &db,
            "SELECT count(*) FROM (SELECT file_id FROM file_events WHERE to_status = 'in_progress' \
             GROUP BY file_id HAVING count(*) > 1) d",
        )
        .await;
        println!(
            "dispatch: {coordinators} coordinator(s), {agents} fake agents x capacity 64, {servers} servers: \
             {tasks} tasks assigned and applied in {secs:.2}s = {:.0} tasks/s; assignments received {} for {} files, \
             files assigned more than once: {double} (history), {} (agents)",
            tasks as f64 / secs,
            given.len(),
            distinct.len(),
            given.len() - distinct.len()
        );
        println!(
            "dispatch: {:.2} Postgres commits per task ({commits} in all)",
            commits as f64 / tasks as f64
        );
        print_cpu(&format!("dispatch x{coordinators}"), tasks, &cpu);
    }
}

/// Transactions committed so far in the bench's database.
/// Fills `db` with `rows` file versions of 100 servers (one watch each), as
/// months of running leave them: 99.7 % `processed` (a third of them gone
/// from their server), 0.1 % each `failed`, `lost` and `new`, discovered
/// over the last 180 days, 4 history rows per processed file and a
/// published announcement for every tenth. Rows go in with
/// `generate_series`, a million per statement.
async fn fill(db: &TestDb, rows: i64) {
    let pool = db.pool();
    sqlx::query(
        "INSERT INTO servers (name, hostname, username, auth_kind, secret_ciphertext, host_key_fingerprint) \
         SELECT 'scale-' || i, '127.0.0.1', 'u', 'password', '\\x00', 'SHA256:x' FROM generate_series(1, 100) i",
    )
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO watches (server_id, directory, bucket) SELECT id, '/in', 'ferry-scale' FROM servers",
    )
    .execute(pool)
    .await
    .unwrap();
    let chunk = 1_000_000i64;
    let mut from = 0i64;
    while from < rows {
        let to = (from + chunk).min(rows);
        sqlx::query(
            "INSERT INTO files (server_id, watch_id, path, size, mtime_unix, status, attempts, \
                                bucket, object_key, etag, sha256, discovered_at, uploaded_at, \
                                updated_at, gone_at, last_error) \
             SELECT w.server_id, w.id, '/in/' || to_char(d, 'YYYY/MM/DD') || '/file-' || g || '.csv', \
                    4096 + g % 1000, 1700000000 + g, st, CASE WHEN st = 'failed' THEN 5 ELSE 0 END, \
                    CASE WHEN st = 'processed' THEN 'ferry-scale' END, \
                    CASE WHEN st = 'processed' THEN 'scale/in/file-' || g END, \
                    CASE WHEN st = 'processed' THEN md5(g::text) END, \
                    CASE WHEN st = 'processed' THEN md5(g::text) || md5(g::text) END, \
                    d, CASE WHEN st = 'processed' THEN d END, d, \
                    CASE WHEN st = 'processed' AND g % 3 = 0 THEN d END, \
                    CASE WHEN st IN ('failed', 'lost') THEN 'connection reset' END \
             FROM (SELECT g, now() - make_interval(secs => 15552000.0 * g / $3) AS d, \
                          CASE g % 1000 WHEN 1 THEN 'failed' WHEN 2 THEN 'lost' WHEN 3 THEN 'new' \
                                        ELSE 'processed' END AS st \
                   FROM generate_series($1 + 1, $2) g) x \
             JOIN watches w ON w.server_id = (g % 100) + (SELECT min(id) FROM servers)",
        )
        .bind(from)
        .bind(to)
        .bind(rows as f64)
        .execute(pool)
        .await
        .unwrap();
        from = to;
    }
    // History and announcements, file by file range.
    let (lo, hi): (i64, i64) = sqlx::query_as("SELECT min(id), max(id) FROM files")
        .fetch_one(pool)
        .await
        .unwrap();
    let mut start = lo;
    while start <= hi {
        let end = start + chunk / 4;
        sqlx::query(
            "INSERT INTO file_events (file_id, at, from_status, to_status, actor, reason) \
             SELECT f.id, f.discovered_at + make_interval(secs => e.n), e.from_status, e.to_status, \
                    'agent:default/scale', '' \
             FROM files f CROSS JOIN (VALUES (0, NULL, 'new'), (1, 'new', 'in_progress'), \
                                             (2, 'in_progress', 'uploaded'), (3, 'uploaded', 'processed')) \
                  AS e(n, from_status, to_status) \
             WHERE f.id >= $1 AND f.id < $2 AND (f.status = 'processed' OR e.n = 0)",
        )
        .bind(start)
        .bind(end)
        .execute(pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO outbox (file_id, payload, created_at, published_at) \
             SELECT id, jsonb_build_object('schema_version', 1, 'file_id', id), uploaded_at, uploaded_at \
             FROM files WHERE id >= $1 AND id < $2 AND status = 'processed' AND id % 10 = 0",
        )
        .bind(start)
        .bind(end)
        .execute(pool)
        .await
        .unwrap();
        start = end;
    }
    sqlx::query("VACUUM ANALYZE").execute(pool).await.unwrap();
}

/// The median of `runs` timings of `f`, in milliseconds.
async fn median_ms<F, Fut>(runs: usize, mut f: F) -> f64
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut ms = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        f().await;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(f64::total_cmp);
    ms[ms.len() / 2]
}

/// The figures of [`scale`] on one database.
#[derive(Debug, Default)]
struct ScaleFigures {
    metrics_ms: f64,
    status_ms: f64,
    retry_dry_run_ms: f64,
    list_first_page_ms: f64,
    file_show_ms: f64,
    bytes_per_version: f64,
    retention_history_per_s: f64,
}

/// Measures the coordinator's read paths and retention on `db` (filled or
/// empty) with a coordinator of its own.
async fn scale_figures(db: &TestDb, pki: &TestPki) -> ScaleFigures {
    let http = format!("127.0.0.1:{}", ferry_tests::free_port());
    let addr: std::net::SocketAddr = http.parse().unwrap();
    let mut out = ScaleFigures::default();
    {
        let coord = Coordinator::start_with_env(
            db,
            pki,
            &[("FERRY_HTTP_LISTEN", &http), ("FERRY_RETENTION_DAYS", "0")],
        )
        .await;
        let admin = coord.admin_client(&pki.admin("bench")).await.unwrap();
        eventually("/metrics answering", Duration::from_secs(60), || {
            ferry_tests::cluster::http_get(addr, "/metrics")
        })
        .await;
        out.metrics_ms = median_ms(5, || async {
            let (status, _) = ferry_tests::cluster::http_get(addr, "/metrics")
                .await
                .expect("/metrics");
            assert_eq!(status, 200);
        })
        .await;
        out.status_ms = median_ms(5, || {
            let mut admin = admin.clone();
            async move {
                admin.get_status(proto::GetStatusRequest {}).await.unwrap();
            }
        })
        .await;
        out.retry_dry_run_ms = median_ms(3, || {
            let mut admin = admin.clone();
            async move {
                admin
                    .retry_files(proto::RetryFilesRequest {
                        statuses: vec![proto::FileStatus::Failed as i32],
                        dry_run: true,
                        ..Default::default()
                    })
                    .await
                    .unwrap();
            }
        })
        .await;
        out.list_first_page_ms = median_ms(5, || {
            let mut admin = admin.clone();
            async move {
                admin
                    .list_files(proto::ListFilesRequest {
                        page_size: 100,
                        ..Default::default()
                    })
                    .await
                    .unwrap();
            }
        })
        .await;
        let some_file: Option<i64> = sqlx::query_scalar("SELECT max(id) FROM files")
            .fetch_one(db.pool())
            .await
            .unwrap();
        if let Some(id) = some_file {
            out.file_show_ms = median_ms(5, || {
                let mut admin = admin.clone();
                async move {
                    admin.get_file(proto::GetFileRequest { id }).await.unwrap();
                }
            })
            .await;
        }
    }
    let (versions, bytes): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM files), \
                pg_total_relation_size('files') + pg_total_relation_size('file_events') \
                + pg_total_relation_size('outbox')",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    out.bytes_per_version = if versions > 0 {
        bytes as f64 / versions as f64
    } else {
        0.0
    };
    // Retention catching up with every row older than 30 days, for 30 s.
    let coord = Coordinator::start_with_env(
        db,
        pki,
        &[
            ("FERRY_HTTP_LISTEN", &http),
            ("FERRY_RETENTION_DAYS", "30"),
            ("FERRY_RETENTION_INTERVAL_SECS", "1"),
        ],
    )
    .await;
    // Rows deleted from `file_events` so far, from Postgres's statistics (a
    // pass counts its metric only once it is done, and a count of the table
    // would cost what is measured).
    let pruned = || async {
        let deleted: i64 = sqlx::query_scalar(
            "SELECT n_tup_del FROM pg_stat_user_tables WHERE relname = 'file_events'",
        )
        .fetch_one(db.pool())
        .await
        .unwrap();
        deleted as f64
    };
    let (t0, n0) = (Instant::now(), pruned().await);
    tokio::time::sleep(Duration::from_secs(30)).await;
    let n1 = pruned().await;
    out.retention_history_per_s = (n1 - n0) / t0.elapsed().as_secs_f64();
    drop(coord);
    out
}

/// Months of data: the read paths an operator and Prometheus use, and
/// retention, on a database of `FERRY_BENCH_ROWS` file versions (default
/// 10,000,000) beside the same figures on an empty database, in one run.
async fn scale() {
    let rows: i64 = env_or("FERRY_BENCH_ROWS", "10000000").parse().unwrap();
    let pki = TestPki::new();
    let empty_db = TestDb::create().await;
    let empty = scale_figures(&empty_db, &pki).await;
    let db = TestDb::create().await;
    // A coordinator's start migrates the schema.
    drop(Coordinator::start(&db, &pki).await);
    let t = Instant::now();
    fill(&db, rows).await;
    println!(
        "scale: filled {rows} file versions (with history and announcements) in {:.0} s",
        t.elapsed().as_secs_f64()
    );
    let full = scale_figures(&db, &pki).await;
    println!("scale: figure                       empty db   {rows} rows");
    let line = |what: &str, a: f64, b: f64, unit: &str| {
        println!("scale: {what:<34} {a:>9.1} {b:>12.1} {unit}");
    };
    line("GET /metrics", empty.metrics_ms, full.metrics_ms, "ms");
    line("GetStatus", empty.status_ms, full.status_ms, "ms");
    line(
        "RetryFiles failed, dry run",
        empty.retry_dry_run_ms,
        full.retry_dry_run_ms,
        "ms",
    );
    line(
        "ListFiles first page (100)",
        empty.list_first_page_ms,
        full.list_first_page_ms,
        "ms",
    );
    line("GetFile", empty.file_show_ms, full.file_show_ms, "ms");
    line(
        "bytes on disk per file version",
        empty.bytes_per_version,
        full.bytes_per_version,
        "B",
    );
    line(
        "retention catch-up, history rows",
        empty.retention_history_per_s,
        full.retention_history_per_s,
        "rows/s",
    );
}

async fn commits(db: &TestDb) -> i64 {
    count(
        db,
        "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
    )
    .await
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
    if wants("small") {
        small().await;
    }
    if wants("servers") {
        servers().await;
    }
    if wants("dispatch") {
        dispatch().await;
    }
    if filter.iter().any(|f| "scale".contains(f.as_str())) {
        // Only on request: a fill of 10 M rows takes a while.
        scale().await;
    }
}
