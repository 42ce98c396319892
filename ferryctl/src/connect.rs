//! The connection to a coordinator's AdminService: endpoint parsing, mTLS from
//! the `--ca/--cert/--key` files, and a per-request deadline. Connection
//! problems become one-line `anyhow` errors naming the endpoint; gRPC failures
//! stay `tonic::Status` so `main` can print their code.

use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use ferry_proto::admin_service_client::AdminServiceClient;
use ferry_proto::tls::{TlsPaths, endpoint_host};
use tonic::transport::{Channel, Endpoint};

use crate::{GlobalArgs, UsageError};

/// A connected admin client and the deadline applied to each unary call.
pub(crate) struct Admin {
    client: AdminServiceClient<Channel>,
    endpoint: String,
    timeout: Duration,
}

impl Admin {
    /// Loads the TLS files and connects (TCP + TLS handshake) within `--timeout`.
    pub(crate) async fn connect(global: &GlobalArgs) -> anyhow::Result<Admin> {
        let endpoint = normalize_endpoint(&global.endpoint)?;
        let paths = tls_paths(global)?;
        let material = paths.load()?;
        let host = endpoint_host(&endpoint)?;
        let timeout = Duration::from_secs(global.timeout);
        let channel = Endpoint::from_shared(endpoint.clone())
            .with_context(|| format!("invalid endpoint {endpoint:?}"))?
            .tls_config(material.client_config(&host))
            .context("TLS configuration")?
            .connect_timeout(timeout)
            .tcp_nodelay(true);
        // `connect_timeout` covers TCP only; a peer that accepts and then
        // stalls the TLS handshake must not hang us either.
        let channel = match tokio::time::timeout(timeout, channel.connect()).await {
            Ok(connected) => connected.with_context(|| format!("cannot connect to {endpoint}"))?,
            Err(_) => anyhow::bail!(
                "cannot connect to {endpoint}: no TLS handshake within {}s",
                timeout.as_secs()
            ),
        };
        Ok(Admin {
            client: AdminServiceClient::new(channel),
            endpoint,
            timeout,
        })
    }

    /// A handle for one call (cheap: clones share the connection).
    pub(crate) fn client(&self) -> AdminServiceClient<Channel> {
        self.client.clone()
    }

    /// Awaits a unary call (or the start of a stream) within `--timeout`.
    /// Failures, including the deadline, come back as `tonic::Status`.
    pub(crate) async fn call<T>(
        &self,
        request: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> anyhow::Result<T> {
        match tokio::time::timeout(self.timeout, request).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(status.into()),
            Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                "no answer from {} within {}s",
                self.endpoint,
                self.timeout.as_secs()
            ))
            .into()),
        }
    }
}

/// Accepts `host:port` as shorthand for `https://host:port`; the admin API is
/// mTLS only, so plain `http://` is refused.
fn normalize_endpoint(endpoint: &str) -> anyhow::Result<String> {
    let endpoint = endpoint.trim().trim_end_matches('/');
    if endpoint.starts_with("https://") {
        return Ok(endpoint.to_string());
    }
    if endpoint.starts_with("http://") {
        return Err(UsageError(format!(
            "endpoint {endpoint:?}: the admin API requires TLS, use https://"
        ))
        .into());
    }
    if endpoint.contains("://") {
        return Err(
            UsageError(format!("endpoint {endpoint:?}: expected https://host:port")).into(),
        );
    }
    Ok(format!("https://{endpoint}"))
}

fn tls_paths(global: &GlobalArgs) -> anyhow::Result<TlsPaths> {
    let missing = [
        ("--ca", "FERRY_TLS_CA", global.ca.is_none()),
        ("--cert", "FERRY_TLS_CERT", global.cert.is_none()),
        ("--key", "FERRY_TLS_KEY", global.key.is_none()),
    ]
    .into_iter()
    .filter(|(_, _, missing)| *missing)
    .map(|(flag, env, _)| format!("{flag} (or {env})"))
    .collect::<Vec<_>>();
    match (&global.ca, &global.cert, &global.key) {
        (Some(ca), Some(cert), Some(key)) => Ok(TlsPaths {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        }),
        _ => Err(UsageError(format!(
            "the admin API needs mTLS: missing {} (an admin certificate from `ferryctl certs issue admin`)",
            missing.join(", ")
        ))
        .into()),
    }
}

/// Items per page when ferryctl reads a whole listing (the most the API serves).
pub(crate) const FULL_PAGE: u32 = 1000;

/// Every item of a paged `List*` call: `fetch(page_token)` returns one page
/// and the next token; tokens are followed until the last page.
pub(crate) async fn all_pages<T, F, Fut>(mut fetch: F) -> anyhow::Result<Vec<T>>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = anyhow::Result<(Vec<T>, String)>>,
{
    let mut items = Vec::new();
    let mut token = String::new();
    loop {
        let (page, next) = fetch(token.clone()).await?;
        items.extend(page);
        if next.is_empty() {
            return Ok(items);
        }
        if next == token {
            anyhow::bail!("the coordinator returned the same page token twice; stopping");
        }
        token = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_default_to_https() {
        assert_eq!(normalize_endpoint("ctl:7443").unwrap(), "https://ctl:7443");
        assert_eq!(
            normalize_endpoint("https://ctl:7443/").unwrap(),
            "https://ctl:7443"
        );
        assert!(normalize_endpoint("http://ctl:7443").is_err());
        assert!(normalize_endpoint("ftp://ctl").is_err());
    }

    #[tokio::test]
    async fn all_pages_follows_tokens_to_the_last_page() {
        let pages = |token: String| async move {
            Ok(match token.as_str() {
                "" => (vec![1, 2], "a".to_string()),
                "a" => (vec![3, 4], "b".to_string()),
                "b" => (vec![5], String::new()),
                other => anyhow::bail!("unexpected token {other}"),
            })
        };
        assert_eq!(all_pages(pages).await.unwrap(), vec![1, 2, 3, 4, 5]);
    }

    #[tokio::test]
    async fn a_repeated_token_stops_instead_of_looping() {
        let stuck = |_token: String| async move { Ok((vec![1], "same".to_string())) };
        let err = all_pages(stuck).await.unwrap_err();
        assert!(err.to_string().contains("same page token"), "{err}");
    }
}
