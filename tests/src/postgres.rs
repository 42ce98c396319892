//! A fresh Postgres database per test on the shared server (127.0.0.1:5432,
//! or `FERRY_TEST_PG_URL`), dropped again when the test is done.

use std::sync::mpsc;
use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use sqlx::{Connection, Executor};

use crate::util::random_hex;

/// Admin URL used to create and drop test databases.
pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The admin URL: `FERRY_TEST_PG_URL` or [`DEFAULT_ADMIN_URL`].
pub fn admin_url() -> String {
    std::env::var("FERRY_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_string())
}

/// A database `ferry_t_<hex>` that exists for the lifetime of this value.
#[derive(Debug)]
pub struct TestDb {
    name: String,
    url: String,
    admin_url: String,
    pool: PgPool,
}

impl TestDb {
    /// Creates an empty database and connects a small pool to it. Panics if
    /// Postgres is unreachable.
    pub async fn create() -> Self {
        Self::try_create()
            .await
            .unwrap_or_else(|e| panic!("create test database: {e:#}"))
    }

    async fn try_create() -> anyhow::Result<Self> {
        let admin_url = admin_url();
        let name = format!("ferry_t_{}", random_hex(8));
        let mut admin = PgConnection::connect(&admin_url).await.with_context(|| {
            format!("connect to Postgres at {admin_url} (is it running? see deploy/test-deps.sh)")
        })?;
        admin
            .execute(format!("CREATE DATABASE \"{name}\"").as_str())
            .await
            .with_context(|| format!("create database {name}"))?;
        let _ = admin.close().await;
        let url = with_database(&admin_url, &name)?;
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect(&url)
            .await
            .with_context(|| format!("connect to test database {url}"))?;
        Ok(Self {
            name,
            url,
            admin_url,
            pool,
        })
    }

    /// Connection URL of the test database (for `FERRY_DATABASE_URL`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Database name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A pool connected to the test database.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Best effort, on a thread with its own runtime: the test's runtime may
        // be shutting down. FORCE disconnects our pool and any coordinator.
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        let (done_tx, done_rx) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("drop-test-db".into())
            .spawn(move || {
                let result = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(anyhow::Error::from)
                    .and_then(|rt| {
                        rt.block_on(async {
                            let mut admin = PgConnection::connect(&admin_url).await?;
                            admin
                                .execute(
                                    format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")
                                        .as_str(),
                                )
                                .await?;
                            let _ = admin.close().await;
                            anyhow::Ok(())
                        })
                    });
                if let Err(e) = result {
                    eprintln!("[ferry-tests] drop database {name}: {e:#}");
                }
                let _ = done_tx.send(());
            });
        if spawned.is_ok() {
            let _ = done_rx.recv_timeout(Duration::from_secs(15));
        }
    }
}

/// `url` with its database path replaced by `database`.
fn with_database(url: &str, database: &str) -> anyhow::Result<String> {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let (scheme, rest) = base
        .split_once("://")
        .with_context(|| format!("Postgres URL {url:?} has no scheme"))?;
    let authority = rest
        .split_once('/')
        .map_or(rest, |(authority, _)| authority);
    let mut out = format!("{scheme}://{authority}/{database}");
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn replaces_database_keeping_query() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "x").unwrap(),
            "postgres://postgres@127.0.0.1:5432/x"
        );
        assert_eq!(
            with_database("postgres://u:p@h/db?sslmode=disable", "x").unwrap(),
            "postgres://u:p@h/x?sslmode=disable"
        );
        assert_eq!(
            with_database("postgres://h:1", "x").unwrap(),
            "postgres://h:1/x"
        );
    }
}
