//! Health that tells the truth: `/healthz`, `/readyz` (FERRY_HTTP_LISTEN)
//! and `grpc.health.v1` follow whether the coordinator can reach Postgres;
//! a coordinator started before its database waits for it instead of
//! exiting; an agent is ready while it holds a coordinator stream.

use ferry_tests::{AgentOptions, Coordinator, TcpProxy, TestDb, TestPki, eventually, free_port};
use std::net::SocketAddr;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::stack::{Stack, WAIT};

/// `(status, body)` of `GET path` on a plain-HTTP probe port (the harness's).
pub(crate) use ferry_tests::cluster::http_get as get;

async fn wait_http(addr: SocketAddr, path: &str, want: u16) -> String {
    eventually(
        &format!("GET {path} on {addr} answering {want}"),
        WAIT,
        || async {
            get(addr, path)
                .await
                .filter(|(s, _)| *s == want)
                .map(|(_, b)| b)
        },
    )
    .await
}

#[tokio::test]
async fn readiness_follows_postgres_from_start_to_outage_and_back() {
    let s = Stack::new().await;
    // The coordinator under test reaches Postgres only through a proxy that
    // starts cut: its database is "down" when it starts.
    let pg_proxy = TcpProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    pg_proxy.cut();
    let url =
        s.db.url()
            .replacen("127.0.0.1:5432", &pg_proxy.addr().to_string(), 1);
    let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let env = [
        ("FERRY_DATABASE_URL", url.as_str()),
        ("FERRY_HTTP_LISTEN", &http.to_string()),
    ];
    let starting = Coordinator::start_with_env(&s.db, &s.pki, &env);
    let waiting = async {
        // Alive but not ready, saying why, while Postgres is unreachable.
        wait_http(http, "/healthz", 200).await;
        let why = wait_http(http, "/readyz", 503).await;
        assert!(why.contains("Postgres"), "{why}");
        pg_proxy.heal();
    };
    let (coord, ()) = tokio::join!(starting, waiting);
    wait_http(http, "/readyz", 200).await;

    let channel = coord.channel(&s.pki.admin("alice")).await.unwrap();
    let health = HealthClient::new(channel);
    let status = |service: &'static str| {
        let mut health = health.clone();
        async move {
            health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .map(|r| r.into_inner().status)
                .unwrap_or(-1)
        }
    };
    eventually("gRPC health SERVING", WAIT, || async {
        (status("").await == ServingStatus::Serving as i32
            && status("ferry.v1.AdminService").await == ServingStatus::Serving as i32)
            .then_some(())
    })
    .await;

    // Postgres goes away: not ready, NOT_SERVING; the process stays up.
    pg_proxy.cut();
    wait_http(http, "/readyz", 503).await;
    eventually("gRPC health NOT_SERVING", WAIT, || async {
        (status("").await == ServingStatus::NotServing as i32).then_some(())
    })
    .await;
    assert_eq!(get(http, "/healthz").await.map(|(s, _)| s), Some(200));

    // And comes back: ready again without a restart.
    pg_proxy.heal();
    wait_http(http, "/readyz", 200).await;
    eventually("gRPC health SERVING again", WAIT, || async {
        (status("").await == ServingStatus::Serving as i32).then_some(())
    })
    .await;
    drop(coord);
}

/// A database URL carrying its password as query parameters (`password`,
/// and `sslpassword`, which the driver ignores) shows neither: not in
/// `/readyz` while Postgres is unreachable, not in the log at any level.
#[tokio::test]
async fn database_url_secrets_are_never_shown() {
    const SECRET: &str = "hunter2-in-the-url";
    let db = TestDb::create().await;
    let pki = TestPki::new();
    let pg_proxy = TcpProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    pg_proxy.cut();
    let base = db
        .url()
        .replacen("127.0.0.1:5432", &pg_proxy.addr().to_string(), 1);
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}password={SECRET}&application_name=ferry&sslpassword={SECRET}");
    let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let env = [
        ("FERRY_DATABASE_URL", url.as_str()),
        ("FERRY_HTTP_LISTEN", &http.to_string()),
        ("RUST_LOG", "debug"),
    ];
    let starting = Coordinator::start_with_env(&db, &pki, &env);
    let waiting = async {
        let why = wait_http(http, "/readyz", 503).await;
        assert!(why.contains("Postgres"), "{why}");
        assert!(!why.contains(SECRET), "/readyz shows the password: {why}");
        assert!(why.contains("password=<redacted>"), "{why}");
        pg_proxy.heal();
    };
    let (coord, ()) = tokio::join!(starting, waiting);
    wait_http(http, "/readyz", 200).await;
    let log = std::fs::read_to_string(coord.log_path()).unwrap();
    assert!(log.contains("Postgres not usable yet"), "{log}");
    let leaks: Vec<&str> = log.lines().filter(|l| l.contains(SECRET)).collect();
    assert!(leaks.is_empty(), "the log shows the password: {leaks:#?}");
    assert!(
        log.lines()
            .any(|l| l.contains("does not understand") && l.contains("sslpassword")),
        "the ignored parameter is named"
    );
    drop(coord);
}

#[tokio::test]
async fn an_agent_is_ready_while_it_holds_a_coordinator_stream() {
    let mut s = Stack::new().await;
    let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _agent = s
        .agent_with(
            "probe",
            AgentOptions {
                capacity: 0,
                env: vec![("FERRY_HTTP_LISTEN".into(), http.to_string())],
                ..Default::default()
            },
        )
        .await;
    wait_http(http, "/readyz", 200).await;
    s.coord.kill().await;
    let why = wait_http(http, "/readyz", 503).await;
    assert!(why.contains("no coordinator stream"), "{why}");
    assert_eq!(get(http, "/healthz").await.map(|(st, _)| st), Some(200));
}

#[tokio::test]
async fn metrics_follow_the_files() {
    let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut s = Stack::with_coordinator_env(&[("FERRY_HTTP_LISTEN", &http.to_string())]).await;
    let id = s.add_server(s.server_req("metered")).await;
    let watch = s.add_watch(id, "metered", "*").await;
    let scrape = || async {
        let (status, body) = get(http, "/metrics").await.expect("metrics answer");
        assert_eq!(status, 200, "{body}");
        body
    };
    let text = scrape().await;
    assert!(
        text.contains("ferry_files{server=\"metered\",status=\"new\"} 0\n"),
        "{text}"
    );
    let file: i64 = sqlx::query_scalar(
        "INSERT INTO files (server_id, watch_id, path, size, mtime_unix) \
         VALUES ($1, $2, '/m/a.csv', 1, 1700000000) RETURNING id",
    )
    .bind(id)
    .bind(watch)
    .fetch_one(s.db.pool())
    .await
    .unwrap();
    let text = scrape().await;
    assert!(
        text.contains("ferry_files{server=\"metered\",status=\"new\"} 1\n"),
        "{text}"
    );
    assert!(
        !text.contains("ferry_oldest_waiting_file_age_seconds 0\n"),
        "{text}"
    );
    sqlx::query("UPDATE files SET status = 'processed' WHERE id = $1")
        .bind(file)
        .execute(s.db.pool())
        .await
        .unwrap();
    let text = scrape().await;
    assert!(
        text.contains("ferry_files{server=\"metered\",status=\"new\"} 0\n"),
        "{text}"
    );
    assert!(
        text.contains("ferry_files{server=\"metered\",status=\"processed\"} 1\n"),
        "{text}"
    );
    // Every sample is declared, in the text format Prometheus reads.
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line.rsplit_once(' ').expect("sample line");
        assert!(value.parse::<f64>().is_ok(), "{line}");
        let name = series.split('{').next().unwrap();
        assert!(name.starts_with("ferry_"), "{line}");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|f| text.contains(&format!("# TYPE {f} histogram\n")))
            .unwrap_or(name);
        assert!(text.contains(&format!("# TYPE {family} ")), "{line}");
    }
}

#[tokio::test]
async fn the_broker_is_reported_apart_from_readiness() {
    let amqp = TcpProxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let url = format!("amqp://guest:guest@{}/%2f", amqp.addr());
    let s = Stack::with_coordinator_env(&[
        ("FERRY_HTTP_LISTEN", &http.to_string()),
        ("FERRY_AMQP_URL", &url),
        ("FERRY_AMQP_EXCHANGE", &ferry_tests::unique_exchange()),
    ])
    .await;
    let health = HealthClient::new(s.coord.channel(&s.pki.admin("alice")).await.unwrap());
    let relay = || {
        let mut health = health.clone();
        async move {
            health
                .check(HealthCheckRequest {
                    service: "ferry.v1.Relay".into(),
                })
                .await
                .map(|r| r.into_inner().status)
                .unwrap_or(-1)
        }
    };
    eventually("relay SERVING", WAIT, || async {
        (relay().await == ServingStatus::Serving as i32).then_some(())
    })
    .await;
    // The broker goes away: the relay says so, the coordinator stays ready.
    amqp.cut();
    eventually("relay NOT_SERVING", WAIT, || async {
        (relay().await == ServingStatus::NotServing as i32).then_some(())
    })
    .await;
    assert_eq!(get(http, "/readyz").await.map(|(st, _)| st), Some(200));
    amqp.heal();
    eventually("relay SERVING again", WAIT, || async {
        (relay().await == ServingStatus::Serving as i32).then_some(())
    })
    .await;
}
