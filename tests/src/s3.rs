//! A real S3-compatible server per test: `s3s-fs` (installed by
//! `deploy/test-deps.sh`) on a free loopback port, storing objects in a temp
//! dir, plus an `aws-sdk-s3` client configured the MinIO-compatible way
//! (path-style addressing, checksums only when required).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::primitives::ByteStream;
use tokio::process::Command;

use crate::util::{ChildGuard, LogDir, free_port, log_tail, random_hex};

pub const REGION: &str = "us-east-1";

/// A running `s3s-fs`; killed on drop.
#[derive(Debug)]
pub struct S3Server {
    dir: LogDir,
    _child: ChildGuard,
    port: u16,
    access_key: String,
    secret_key: String,
    client: Client,
    log: PathBuf,
}

impl S3Server {
    /// Starts `s3s-fs` and waits for its port; panics with its log otherwise.
    pub async fn start() -> Self {
        Self::try_start()
            .await
            .unwrap_or_else(|e| panic!("start s3s-fs: {e:#}"))
    }

    async fn try_start() -> anyhow::Result<Self> {
        let bin = find_s3s_fs()?;
        let dir = LogDir::new("s3")?;
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).context("create s3s-fs data dir")?;
        let access_key = format!("AK{}", random_hex(8).to_uppercase());
        let secret_key = random_hex(20);
        let log = dir.path().join("s3s-fs.log");
        let mut last_err = None;
        // The free port can be taken between probing and binding: retry.
        for _ in 0..3 {
            let port = free_port();
            let out = std::fs::File::create(&log).context("create s3s-fs log")?;
            let err = out.try_clone().context("clone s3s-fs log handle")?;
            let child = Command::new(&bin)
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--access-key", &access_key, "--secret-key", &secret_key])
                .arg(&data)
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::from(out))
                .stderr(Stdio::from(err))
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("spawn {}", bin.display()))?;
            let mut child = ChildGuard::new(child, "s3s-fs");
            match child
                .wait_for_port(
                    SocketAddr::from(([127, 0, 0, 1], port)),
                    Duration::from_secs(15),
                )
                .await
            {
                Ok(()) => {
                    let client = client(
                        &format!("http://127.0.0.1:{port}"),
                        &access_key,
                        &secret_key,
                    );
                    return Ok(Self {
                        dir,
                        _child: child,
                        port,
                        access_key,
                        secret_key,
                        client,
                        log,
                    });
                }
                Err(e) => {
                    child.kill().await;
                    last_err = Some(anyhow::anyhow!(
                        "{e:#}\nlog {}:\n{}",
                        log.display(),
                        log_tail(&log, 20)
                    ));
                }
            }
        }
        Err(last_err.expect("at least one attempt"))
    }

    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn access_key(&self) -> &str {
        &self.access_key
    }

    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    pub fn region(&self) -> &'static str {
        REGION
    }

    /// Process id of `s3s-fs` (to stop and continue it with signals).
    pub fn pid(&self) -> Option<u32> {
        self._child.id()
    }

    /// An SDK client for this server.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and
    /// `AWS_REGION` for processes (agents, rclone) that talk to this server.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ENDPOINT_URL".into(), self.endpoint()),
            ("AWS_ACCESS_KEY_ID".into(), self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), self.secret_key.clone()),
            ("AWS_REGION".into(), REGION.into()),
        ]
    }

    pub async fn create_bucket(&self, bucket: &str) {
        self.client
            .create_bucket()
            .bucket(bucket)
            .send()
            .await
            .unwrap_or_else(|e| panic!("create bucket {bucket}: {}", sdk_error(&e)));
    }

    pub async fn put_object(&self, bucket: &str, key: &str, bytes: Vec<u8>) {
        self.client
            .put_object()
            .bucket(bucket)
            .key(key)
            .body(ByteStream::from(bytes))
            .send()
            .await
            .unwrap_or_else(|e| panic!("put s3://{bucket}/{key}: {}", sdk_error(&e)));
    }

    /// The object's bytes; panics if it does not exist.
    pub async fn get_object(&self, bucket: &str, key: &str) -> Vec<u8> {
        self.try_get_object(bucket, key)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
            .unwrap_or_else(|| panic!("s3://{bucket}/{key} does not exist"))
    }

    /// The object's bytes, or `None` if there is no such key.
    pub async fn try_get_object(&self, bucket: &str, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let resp = match self
            .client
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
        {
            Ok(resp) => resp,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => return Ok(None),
            Err(e) => anyhow::bail!("get s3://{bucket}/{key}: {}", sdk_error(&e)),
        };
        let body = resp
            .body
            .collect()
            .await
            .with_context(|| format!("read body of s3://{bucket}/{key}"))?;
        Ok(Some(body.into_bytes().to_vec()))
    }

    /// All keys in the bucket, sorted.
    pub async fn list_keys(&self, bucket: &str) -> Vec<String> {
        let mut keys = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(bucket)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.unwrap_or_else(|e| panic!("list s3://{bucket}: {}", sdk_error(&e)));
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key().map(str::to_string)),
            );
        }
        keys.sort();
        keys
    }

    /// Where `s3s-fs` keeps the buckets (`<data>/<bucket>/<key>`).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

/// An SDK client for an S3 endpoint, configured as ferry's agent would for MinIO.
pub fn client(endpoint: &str, access_key: &str, secret_key: &str) -> Client {
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new(
            access_key,
            secret_key,
            None,
            None,
            "ferry-tests",
        ))
        .force_path_style(true)
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        .build();
    Client::from_conf(config)
}

/// An SDK error with its service error details (the default Display hides them).
fn sdk_error<E: std::error::Error + 'static>(e: &E) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    msg
}

fn find_s3s_fs() -> anyhow::Result<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("s3s-fs"))
                .collect()
        })
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(Path::new(&home).join(".cargo/bin/s3s-fs"));
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .context("s3s-fs not found on PATH or in ~/.cargo/bin; run deploy/test-deps.sh")
}
