//! Retention prunes what ferry no longer needs, and nothing else: a processed
//! version gone from its server loses its row, history and announcement; one
//! still on the server keeps its row (so it is not ingested again) but loses
//! old history and published announcements; a file whose announcement the
//! broker has not confirmed keeps everything.

use ferry_tests::eventually;

use crate::flow::flow_with;
use crate::stack::WAIT;

/// Rows of `table` for the file whose path ends with `/name`.
async fn rows_of(db: &sqlx::PgPool, table: &str, name: &str) -> i64 {
    let sql = if table == "files" {
        "SELECT count(*) FROM files WHERE path LIKE '%/' || $1".to_owned()
    } else {
        format!(
            "SELECT count(*) FROM {table} t JOIN files f ON f.id = t.file_id \
             WHERE f.path LIKE '%/' || $1"
        )
    };
    sqlx::query_scalar(&sql)
        .bind(name)
        .fetch_one(db)
        .await
        .unwrap()
}

#[tokio::test]
async fn retention_prunes_gone_versions_old_history_and_published_announcements_only() {
    let http = std::net::SocketAddr::from(([127, 0, 0, 1], ferry_tests::free_port()));
    let mut f = flow_with(&[
        ("FERRY_RETENTION_DAYS", "30"),
        ("FERRY_RETENTION_INTERVAL_SECS", "1"),
        ("FERRY_HTTP_LISTEN", &http.to_string()),
    ])
    .await;
    let server = f.s.add_server(f.s.server_req("ret")).await;
    f.watch(server, "del", "delete").await;
    f.watch(server, "keep", "keep").await;
    f.s.sshd.write_file("del/a.csv", b"deleted after storing");
    f.s.sshd.write_file("keep/b.csv", b"kept on the server");
    let _agent = f.s.agent_with("a1", f.agent_opts(2)).await;
    f.wait_status(2, "processed", WAIT).await;
    let db = f.s.db.pool().clone();
    eventually("a.csv removed by its post-action", WAIT, || async {
        let gone: Option<bool> =
            sqlx::query_scalar("SELECT gone_at IS NOT NULL FROM files WHERE path LIKE '%/a.csv'")
                .fetch_optional(&db)
                .await
                .unwrap();
        (gone == Some(true)).then_some(())
    })
    .await;
    // A third file waits for the broker.
    f.amqp_proxy.cut();
    f.s.sshd.write_file("keep/c.csv", b"not yet announced");
    f.wait_status(1, "uploaded", WAIT).await;

    // Everything is now 40 days old.
    for sql in [
        "UPDATE files SET updated_at = now() - interval '40 days'",
        "UPDATE file_events SET at = now() - interval '40 days'",
        "UPDATE outbox SET published_at = now() - interval '40 days' WHERE published_at IS NOT NULL",
    ] {
        sqlx::query(sql).execute(&db).await.unwrap();
    }

    eventually("a.csv pruned with its history", WAIT, || async {
        (rows_of(&db, "files", "a.csv").await == 0).then_some(())
    })
    .await;
    // History and announcements refer to their file without a foreign key:
    // pruning a file removed its rows too, and no other row lost its file.
    let orphans: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM file_events e WHERE NOT EXISTS (SELECT 1 FROM files f WHERE f.id = e.file_id)) \
              + (SELECT count(*) FROM outbox o WHERE NOT EXISTS (SELECT 1 FROM files f WHERE f.id = o.file_id))",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(
        orphans, 0,
        "history or outbox rows of a pruned file are left"
    );
    eventually("b.csv's history and announcement pruned", WAIT, || async {
        (rows_of(&db, "file_events", "b.csv").await == 0
            && rows_of(&db, "outbox", "b.csv").await == 0)
            .then_some(())
    })
    .await;
    let b_status: String = sqlx::query_scalar("SELECT status FROM files WHERE path LIKE '%/b.csv'")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(
        b_status, "processed",
        "a version on the server keeps its row"
    );
    let (c_status, c_pending): (String, i64) = sqlx::query_as(
        "SELECT f.status, (SELECT count(*) FROM outbox o WHERE o.file_id = f.id AND o.published_at IS NULL) \
         FROM files f WHERE f.path LIKE '%/c.csv'",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!((c_status.as_str(), c_pending), ("uploaded", 1));
    assert!(
        rows_of(&db, "file_events", "c.csv").await > 0,
        "history of a file not processed is kept"
    );

    // The broker returns: c.csv is announced; b.csv was not ingested again.
    f.amqp_proxy.heal();
    f.wait_status(2, "processed", WAIT).await;
    assert_eq!(rows_of(&db, "files", "b.csv").await, 1);
    assert_eq!(rows_of(&db, "files", "c.csv").await, 1);
    // What the passes removed is counted: a.csv's row, history and
    // announcement, b.csv's history and announcement at least.
    let (_, metrics) = crate::health::get(http, "/metrics")
        .await
        .expect("/metrics");
    let pruned = |kind: &str| -> f64 {
        let series = format!("ferry_retention_pruned_total{{kind=\"{kind}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in {metrics}"))
    };
    assert!(pruned("files") >= 1.0, "{metrics}");
    assert!(pruned("events") >= 2.0, "{metrics}");
    assert!(pruned("announcements") >= 2.0, "{metrics}");
    // Pruned rows left the kept file counts too.
    crate::stack::assert_counts_exact(&db).await;
}
