//! ferry coordinator: owns the Postgres schema, the server registry, file
//! state, task assignment and AMQP notifications. See ARCHITECTURE.md.

mod admin;
mod agent_input;
mod agents;
mod auth;
mod config;
mod convert;
mod counts;
mod db;
mod discovery;
mod error;
mod events;
mod files;
mod health;
mod hostkey;
mod metrics;
mod paging;
mod polls;
mod post_actions;
mod registry;
mod relay;
mod results;
mod retention;
mod scheduler;
mod secrets;
mod server;
mod state;
mod status;
mod tasks;
mod transitions;
mod urls;

use crate::config::{Cli, Command};
use clap::Parser;

use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    ferry_proto::tls::install_crypto_provider();
    let cli = Cli::parse();
    ferry_proto::telemetry::init_logging(cli.log_format);
    let result = match cli.command {
        Command::Serve(args) => {
            let drain = CancellationToken::new();
            tokio::spawn(drain_on_signal(drain.clone()));
            server::serve(*args, drain).await
        }
        Command::Migrate(args) => {
            async {
                let pool = db::connect(&args.database_url, 2).await?;
                db::migrate(&pool).await?;
                println!("migrations applied");
                Ok(())
            }
            .await
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-coordinator: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// SIGTERM or Ctrl-C starts the graceful drain (see `server::serve`).
async fn drain_on_signal(drain: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install SIGTERM handler");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutdown requested");
    drain.cancel();
}
