//! Structured logging setup shared by the binaries.

use tracing_subscriber::EnvFilter;

/// Log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where sqlx logs a database URL parameter it ignores, with the parameter's
/// value (a `sslpassword=...` in clear); never shown, whatever `RUST_LOG`
/// says. The coordinator names such parameters itself, without values.
const SQLX_IGNORED_PARAMETER: &str = "sqlx_postgres::options::parse=off";

/// Logs to stderr, filtered by `RUST_LOG` (default `info`; lapin's per-message
/// warnings, which include message bodies, are kept at `error`; sqlx's line
/// about an ignored database URL parameter, which prints its value, is off).
pub fn init_logging(format: LogFormat) {
    let mut filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,lapin::returned_messages=error"));
    // A constant, parsed in the tests below.
    if let Ok(directive) = SQLX_IGNORED_PARAMETER.parse() {
        filter = filter.add_directive(directive);
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_sqlx_parameter_directive_parses() {
        assert!(
            super::SQLX_IGNORED_PARAMETER
                .parse::<tracing_subscriber::filter::Directive>()
                .is_ok()
        );
    }
}
