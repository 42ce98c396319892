//! Postgres connection pool and schema migrations.

use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Postgres, Transaction};

/// Migrations compiled into the binary from `migrations/`.
pub(crate) static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

pub(crate) async fn connect(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await
        .with_context(|| format!("connect to Postgres at {}", redact(url)))
}

/// `BEGIN` of the hot path's batch transactions, sent as one simple query
/// (no extra round trip). Their statements pick rows by arrays of ids
/// (`= ANY($1)`, `unnest($1)`), so one generic plan fits every call; left to
/// itself Postgres plans each call anew, because a custom plan for a short
/// array looks cheaper than the generic plan's default array length. That
/// planning was a third of these statements' time (pg_stat_statements over
/// 10,000 small files: 3.4 s of 9.6 s); BENCHMARKS.md has the figures.
/// `SET LOCAL` ends with the transaction, so catch-all queries elsewhere
/// (admin listings with optional filters) keep their custom plans.
const BEGIN_BATCH: &str = "BEGIN; SET LOCAL plan_cache_mode = force_generic_plan";

/// Begins a transaction for batch statements keyed by ids (claims, results,
/// relay rounds); see [`BEGIN_BATCH`].
pub(crate) async fn begin_batch(db: &PgPool) -> sqlx::Result<Transaction<'static, Postgres>> {
    db.begin_with(BEGIN_BATCH).await
}

/// Applies pending migrations. Safe when several coordinators start at once:
/// sqlx serializes migrators with a Postgres advisory lock.
pub(crate) async fn migrate(db: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(db).await.context("apply database migrations")
}

/// The URL without its password, for error messages.
pub(crate) fn redact(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((creds, host)) => {
                let user = creds.split(':').next().unwrap_or("");
                format!("{scheme}://{user}@{host}")
            }
            None => url.to_string(),
        },
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use sqlx::postgres::PgPoolOptions;

    use crate::transitions::tests::Db;

    async fn plan_cache_mode(conn: &mut sqlx::PgConnection) -> String {
        sqlx::query_scalar("SHOW plan_cache_mode")
            .fetch_one(conn)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_batch_transaction_uses_generic_plans_and_leaves_the_connection_as_it_was() {
        let db = Db::create().await;
        // One connection: the transactions' is the one checked after them.
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_with((*db.pool.connect_options()).clone())
            .await
            .unwrap();
        let mut tx = super::begin_batch(&pool).await.unwrap();
        assert_eq!(plan_cache_mode(&mut tx).await, "force_generic_plan");
        tx.commit().await.unwrap();
        assert_eq!(
            plan_cache_mode(&mut pool.acquire().await.unwrap()).await,
            "auto"
        );
        let mut tx = super::begin_batch(&pool).await.unwrap();
        assert_eq!(plan_cache_mode(&mut tx).await, "force_generic_plan");
        tx.rollback().await.unwrap();
        assert_eq!(
            plan_cache_mode(&mut pool.acquire().await.unwrap()).await,
            "auto"
        );
        pool.close().await;
        db.drop().await;
    }

    #[test]
    fn redacts_password() {
        assert_eq!(
            super::redact("postgres://u:secret@h:5432/db"),
            "postgres://u@h:5432/db"
        );
        assert_eq!(super::redact("postgres://h/db"), "postgres://h/db");
    }
}
