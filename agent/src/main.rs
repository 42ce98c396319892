//! ferry agent: holds one control stream to a coordinator, polls the SFTP
//! servers it is assigned, and streams files from SFTP to S3. See ARCHITECTURE.md.

mod availability;
mod config;
mod control;
mod health;
mod metrics;
mod poller;
mod runner;
mod sftp;
mod transfer;

use crate::config::AgentConfig;
use clap::Parser;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    ferry_proto::tls::install_crypto_provider();
    let cfg = AgentConfig::parse();
    ferry_proto::telemetry::init_logging(cfg.log_format);
    let cancel = CancellationToken::new();
    tokio::spawn(shutdown_on_signal(cancel.clone()));
    match control::run(cfg, cancel).await {
        Ok(()) => {
            tracing::info!("stopped");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ferry-agent: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// SIGTERM or Ctrl-C closes the stream and stops the pollers.
async fn shutdown_on_signal(cancel: CancellationToken) {
    let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutdown requested");
    cancel.cancel();
}
