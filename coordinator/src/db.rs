//! Postgres connection pool and schema migrations.

use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Postgres, Transaction};

use crate::urls;

/// Migrations compiled into the binary from `migrations/`.
pub(crate) static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

pub(crate) async fn connect(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    for name in urls::unrecognized_pg_params(url) {
        tracing::warn!(
            parameter = %name,
            "FERRY_DATABASE_URL: ignoring a query parameter the Postgres driver does not understand"
        );
    }
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await
        .with_context(|| format!("connect to Postgres at {}", urls::redact(url)))
}

/// `BEGIN` of the hot path's batch transactions, sent as one simple query
/// (no extra round trip). Their statements look rows up by keys, mostly
/// arrays of ids (`= ANY($1)`, `unnest($1)`), so one plan fits every call;
/// left to itself Postgres plans each call anew, because a custom plan for a
/// short array looks cheaper than the generic plan's default array length.
/// That planning was about a quarter of Postgres's CPU in a 10,000-file
/// small-file run (`perf`, `GetCachedPlan`; pg_stat_statements: 3.4 s of
/// 9.6 s of these statements' time); BENCHMARKS.md has the figures.
///
/// A generic plan is made once per connection and statement and kept; one
/// made while a table is still small would scan it whole (on an empty
/// `files`, `id = ANY($1)` plans as a sequential scan) and keep doing so as
/// it grows. Sequential scans are therefore priced out in these
/// transactions: a key lookup goes through its index at every size.
/// `SET LOCAL` ends with the transaction, so other queries (admin listings
/// with optional filters) keep their custom plans.
const BEGIN_BATCH: &str =
    "BEGIN; SET LOCAL plan_cache_mode = force_generic_plan; SET LOCAL enable_seqscan = off";

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

#[cfg(test)]
mod tests {
    use sqlx::postgres::PgPoolOptions;

    use crate::transitions::tests::Db;

    /// `plan_cache_mode` and `enable_seqscan`.
    async fn settings(conn: &mut sqlx::PgConnection) -> (String, String) {
        sqlx::query_as(
            "SELECT current_setting('plan_cache_mode'), current_setting('enable_seqscan')",
        )
        .fetch_one(conn)
        .await
        .unwrap()
    }

    fn batch() -> (String, String) {
        ("force_generic_plan".into(), "off".into())
    }

    fn default() -> (String, String) {
        ("auto".into(), "on".into())
    }

    #[tokio::test]
    async fn a_batch_transaction_plans_key_lookups_once_by_index_and_leaves_the_connection_as_it_was()
     {
        let db = Db::create().await;
        // One connection: the transactions' is the one checked after them.
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_with((*db.pool.connect_options()).clone())
            .await
            .unwrap();
        let mut tx = super::begin_batch(&pool).await.unwrap();
        assert_eq!(settings(&mut tx).await, batch());
        // `files` is empty: a plan made now must still use the index.
        sqlx::query("PREPARE by_ids(BIGINT[]) AS SELECT status FROM files WHERE id = ANY($1)")
            .execute(&mut *tx)
            .await
            .unwrap();
        let plan: Vec<String> = sqlx::query_scalar("EXPLAIN EXECUTE by_ids('{1,2,3}')")
            .fetch_all(&mut *tx)
            .await
            .unwrap();
        let plan = plan.join("\n");
        assert!(plan.contains("files_pkey"), "{plan}");
        assert!(plan.contains("$1"), "a generic plan: {plan}");
        tx.commit().await.unwrap();
        assert_eq!(
            settings(&mut pool.acquire().await.unwrap()).await,
            default()
        );
        let mut tx = super::begin_batch(&pool).await.unwrap();
        assert_eq!(settings(&mut tx).await, batch());
        tx.rollback().await.unwrap();
        assert_eq!(
            settings(&mut pool.acquire().await.unwrap()).await,
            default()
        );
        pool.close().await;
        db.drop().await;
    }
}
