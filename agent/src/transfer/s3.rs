//! [`S3Target`]: the agent's S3 client, configured once from the standard
//! `AWS_*` environment, and the S3 requests a transfer makes, each
//! mapping its SDK error into a [`TransferError`] that names the request.
//!
//! Settings are the MinIO-compatible ones: path-style addressing, and
//! checksums only when an operation requires them (newer SDKs add CRC
//! trailers by default that older MinIO and s3s reject). Payloads are still
//! SigV4-signed, so the server verifies every part's bytes.

use ferry_common::sync::lock;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::meta::region::RegionProviderChain;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{Region, RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};

use super::failure::{S3Fault, S3FaultKind, TransferError};

/// Region when none is configured (MinIO ignores it, but SigV4 needs one).
pub(crate) const DEFAULT_REGION: &str = "us-east-1";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// One attempt of one request; a part of up to a few hundred MiB must fit.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(120);
/// Attempts per request, SDK standard retry (exponential backoff, jitter).
const MAX_ATTEMPTS: u32 = 3;

/// Where objects go: an S3 client for the configured endpoint.
#[derive(Clone, Debug)]
pub(crate) struct S3Target {
    client: Client,
    /// Buckets a `HeadBucket` found to exist.
    known_buckets: Arc<Mutex<HashSet<String>>>,
    /// False once the store refused a conditional write (`If-None-Match: *`)
    /// as not implemented: writes are then unconditional, as before.
    conditional_writes: Arc<AtomicBool>,
}

/// An object already in the bucket, as `HeadObject` shows it.
#[derive(Debug, Clone, Default)]
pub(crate) struct ExistingObject {
    /// Without quotes.
    pub etag: String,
    pub size: Option<i64>,
    /// User metadata (keys without `x-amz-meta-`, lower-case).
    pub metadata: HashMap<String, String>,
}

/// What a write that must not replace an object got.
#[derive(Debug)]
pub(crate) enum Written {
    /// Written; the ETag without quotes.
    Created(String),
    /// An object was already at the key (`412 Precondition Failed`); nothing
    /// was written.
    AlreadyThere,
}

/// One object being written, for messages and requests.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ObjectRef<'a> {
    pub bucket: &'a str,
    pub key: &'a str,
    /// The object's `Content-Type` (see [`super::object::content_type`]).
    pub content_type: &'static str,
}

impl std::fmt::Display for ObjectRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.bucket, self.key)
    }
}

impl S3Target {
    /// Reads `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`
    /// and `AWS_REGION` (default us-east-1), plus whatever else the SDK's
    /// default chain supports (profiles, web identity, ...).
    pub(crate) async fn from_env() -> S3Target {
        let region = RegionProviderChain::default_provider().or_else(Region::new(DEFAULT_REGION));
        let sdk = aws_config::defaults(BehaviorVersion::latest())
            .region(region)
            .load()
            .await;
        S3Target::from_sdk_config(&sdk)
    }

    /// Applies ferry's S3 settings (addressing, checksums, timeouts,
    /// retries) on top of a loaded SDK configuration.
    pub(crate) fn from_sdk_config(sdk: &aws_config::SdkConfig) -> S3Target {
        let mut config = aws_sdk_s3::config::Builder::from(sdk)
            .force_path_style(true)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                    .build(),
            )
            .retry_config(RetryConfig::standard().with_max_attempts(MAX_ATTEMPTS));
        if sdk.region().is_none() {
            config = config.region(Region::new(DEFAULT_REGION));
        }
        S3Target {
            client: Client::from_conf(config.build()),
            known_buckets: Arc::default(),
            conditional_writes: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Fails with `NoSuchBucket` if `bucket` does not exist; checked once
    /// per bucket with `HeadBucket`. Some S3 servers (s3s-fs) create a
    /// missing bucket on upload instead of refusing it; this makes a
    /// misconfigured destination fail the same way everywhere. Any answer
    /// but 404 (e.g. 403 for a login allowed to write but not to list)
    /// lets the upload go ahead and report for itself.
    pub(crate) async fn check_bucket(&self, bucket: &str) -> Result<(), TransferError> {
        let known = |b: &str| lock(&self.known_buckets).contains(b);
        if known(bucket) {
            return Ok(());
        }
        match self.client.head_bucket().bucket(bucket).send().await {
            Ok(_) => {
                lock(&self.known_buckets).insert(bucket.to_owned());
                Ok(())
            }
            Err(e) if e.raw_response().map(|r| r.status().as_u16()) == Some(404) => {
                Err(TransferError::S3 {
                    op: format!("HeadBucket {bucket}"),
                    fault: S3Fault {
                        kind: S3FaultKind::Response,
                        status: Some(404),
                        code: Some("NoSuchBucket".to_owned()),
                        detail: "NoSuchBucket: the bucket does not exist".to_owned(),
                    },
                })
            }
            Err(e) => {
                tracing::debug!(bucket, error = %TransferError::s3("HeadBucket", &e), "bucket check inconclusive");
                Ok(())
            }
        }
    }

    /// Single-request upload. With `if_absent`, only if no object is at the
    /// key (`If-None-Match: *`, where the store supports it).
    pub(crate) async fn put_object(
        &self,
        obj: ObjectRef<'_>,
        body: bytes::Bytes,
        metadata: &HashMap<String, String>,
        if_absent: bool,
    ) -> Result<Written, TransferError> {
        let len = i64::try_from(body.len()).unwrap_or(i64::MAX);
        self.write(
            obj,
            if_absent,
            || format!("PutObject {obj}"),
            |condition| {
                let request = self
                    .client
                    .put_object()
                    .bucket(obj.bucket)
                    .key(obj.key)
                    .content_length(len)
                    .content_type(obj.content_type)
                    .set_metadata(Some(metadata.clone()))
                    .set_if_none_match(condition)
                    .body(ByteStream::from(body.clone()));
                async move { request.send().await.map(|out| trim_etag(out.e_tag())) }
            },
        )
        .await
    }

    /// One write request through `send(If-None-Match value)`, conditional
    /// when `if_absent` and the store implements the condition: a `412`
    /// answer is [`Written::AlreadyThere`]; a `501` turns conditions off for
    /// this target (logged once). Without them, an `if_absent` write looks
    /// with `HeadObject` first and writes only if nothing is at the key (a
    /// write by someone else between the two can still be replaced).
    async fn write<E, F, Fut>(
        &self,
        obj: ObjectRef<'_>,
        if_absent: bool,
        op: impl Fn() -> String,
        send: F,
    ) -> Result<Written, TransferError>
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        F: Fn(Option<String>) -> Fut,
        Fut: std::future::Future<Output = Result<String, SdkError<E, HttpResponse>>>,
    {
        let mut conditional = if_absent && self.conditional_writes.load(Ordering::Relaxed);
        loop {
            if if_absent && !conditional && self.head_object(obj).await?.is_some() {
                return Ok(Written::AlreadyThere);
            }
            let err = match send(conditional.then(|| "*".to_owned())).await {
                Ok(etag) => return Ok(Written::Created(etag)),
                Err(err) => err,
            };
            let status = err.raw_response().map(|r| r.status().as_u16());
            match (conditional, status) {
                (true, Some(412)) => return Ok(Written::AlreadyThere),
                (true, Some(501)) => {
                    if self.conditional_writes.swap(false, Ordering::Relaxed) {
                        tracing::warn!(
                            "the S3 store does not implement If-None-Match on writes: an \
                             object is looked for before each write instead (a write by \
                             another client in between can be replaced)"
                        );
                    }
                    conditional = false;
                }
                _ => return Err(TransferError::s3(op(), &err)),
            }
        }
    }

    /// The object at `obj`'s key, or `None` if there is none.
    pub(crate) async fn head_object(
        &self,
        obj: ObjectRef<'_>,
    ) -> Result<Option<ExistingObject>, TransferError> {
        match self
            .client
            .head_object()
            .bucket(obj.bucket)
            .key(obj.key)
            .send()
            .await
        {
            Ok(out) => Ok(Some(ExistingObject {
                etag: trim_etag(out.e_tag()),
                size: out.content_length(),
                metadata: out
                    .metadata()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                            .collect()
                    })
                    .unwrap_or_default(),
            })),
            Err(e) if e.raw_response().map(|r| r.status().as_u16()) == Some(404) => Ok(None),
            Err(e) => Err(TransferError::s3(format!("HeadObject {obj}"), &e)),
        }
    }

    /// The sha256 (lower-case hex) and length of the bytes of the object at
    /// `obj` whose ETag is `etag` (`If-Match`), read back whole; `None` if
    /// it is gone or was replaced meanwhile. The judgement of an existing
    /// object that carries no `ferry-sha256` (a multipart object) needs it:
    /// S3 has no full-object SHA-256 for multipart uploads (only CRC
    /// full-object checksums, and composite SHA-256 of the parts).
    pub(crate) async fn hash_object(
        &self,
        obj: ObjectRef<'_>,
        etag: &str,
    ) -> Result<Option<(String, u64)>, TransferError> {
        use sha2::{Digest, Sha256};
        let op = || format!("GetObject {obj}");
        let out = match self
            .client
            .get_object()
            .bucket(obj.bucket)
            .key(obj.key)
            .if_match(format!("\"{etag}\""))
            .send()
            .await
        {
            Ok(out) => out,
            Err(e)
                if matches!(
                    e.raw_response().map(|r| r.status().as_u16()),
                    Some(404 | 412)
                ) =>
            {
                return Ok(None);
            }
            Err(e) => return Err(TransferError::s3(op(), &e)),
        };
        let mut body = out.body;
        let mut hasher = Sha256::new();
        let mut len = 0u64;
        while let Some(chunk) = body
            .try_next()
            .await
            .map_err(|e| TransferError::Transient(format!("S3 {}: reading the body: {e}", op())))?
        {
            hasher.update(&chunk);
            len += chunk.len() as u64;
        }
        Ok(Some((hex::encode(hasher.finalize()), len)))
    }

    /// Starts a multipart upload; returns its upload id.
    pub(crate) async fn create_multipart(
        &self,
        obj: ObjectRef<'_>,
        metadata: HashMap<String, String>,
    ) -> Result<String, TransferError> {
        let op = || format!("CreateMultipartUpload {obj}");
        let out = self
            .client
            .create_multipart_upload()
            .bucket(obj.bucket)
            .key(obj.key)
            .content_type(obj.content_type)
            .set_metadata(Some(metadata))
            .send()
            .await
            .map_err(|e| TransferError::s3(op(), &e))?;
        match out.upload_id() {
            Some(id) if !id.is_empty() => Ok(id.to_owned()),
            _ => Err(TransferError::Transient(format!(
                "S3 {}: response carries no upload id",
                op()
            ))),
        }
    }

    /// Uploads part `number` (1-based); returns it as it goes into the
    /// completion request.
    pub(crate) async fn upload_part(
        &self,
        bucket: String,
        key: String,
        upload_id: String,
        number: i32,
        body: bytes::Bytes,
    ) -> Result<CompletedPart, TransferError> {
        let len = body.len();
        let out = self
            .client
            .upload_part()
            .bucket(&bucket)
            .key(&key)
            .upload_id(upload_id)
            .part_number(number)
            .content_length(i64::try_from(len).unwrap_or(i64::MAX))
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| TransferError::s3(format!("UploadPart {number} of {bucket}/{key}"), &e))?;
        Ok(CompletedPart::builder()
            .part_number(number)
            .set_e_tag(out.e_tag().map(str::to_owned))
            .build())
    }

    /// Completes a multipart upload from its parts (any order). With
    /// `if_absent`, only if no object is at the key (as [`Self::put_object`]);
    /// the upload stays open when an object was there.
    pub(crate) async fn complete_multipart(
        &self,
        obj: ObjectRef<'_>,
        upload_id: &str,
        mut parts: Vec<CompletedPart>,
        if_absent: bool,
    ) -> Result<Written, TransferError> {
        parts.sort_by_key(|p| p.part_number());
        self.write(
            obj,
            if_absent,
            || format!("CompleteMultipartUpload {obj}"),
            |condition| {
                let request = self
                    .client
                    .complete_multipart_upload()
                    .bucket(obj.bucket)
                    .key(obj.key)
                    .upload_id(upload_id)
                    .set_if_none_match(condition)
                    .multipart_upload(
                        CompletedMultipartUpload::builder()
                            .set_parts(Some(parts.clone()))
                            .build(),
                    );
                async move { request.send().await.map(|out| trim_etag(out.e_tag())) }
            },
        )
        .await
    }

    /// Discards a multipart upload and its parts.
    pub(crate) async fn abort_multipart(
        &self,
        obj: ObjectRef<'_>,
        upload_id: &str,
    ) -> Result<(), TransferError> {
        self.client
            .abort_multipart_upload()
            .bucket(obj.bucket)
            .key(obj.key)
            .upload_id(upload_id)
            .send()
            .await
            .map(drop)
            .map_err(|e| TransferError::s3(format!("AbortMultipartUpload {obj}"), &e))
    }
}

/// ETags come quoted (`"abc-3"`); ferry reports them bare.
fn trim_etag(etag: Option<&str>) -> String {
    etag.unwrap_or_default().trim_matches('"').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_lose_their_quotes() {
        assert_eq!(trim_etag(Some("\"d41d8cd9\"")), "d41d8cd9");
        assert_eq!(trim_etag(Some("abc-3")), "abc-3");
        assert_eq!(trim_etag(None), "");
    }

    #[tokio::test]
    async fn config_is_path_style_with_a_default_region() {
        let sdk = aws_config::SdkConfig::builder()
            .behavior_version(BehaviorVersion::latest())
            .build();
        let target = S3Target::from_sdk_config(&sdk);
        let conf = target.client.config();
        assert_eq!(conf.region().map(|r| r.as_ref()), Some(DEFAULT_REGION));
        let timeouts = conf.timeout_config().expect("timeouts set");
        assert_eq!(timeouts.connect_timeout(), Some(CONNECT_TIMEOUT));
        assert_eq!(
            conf.retry_config().map(|r| r.max_attempts()),
            Some(MAX_ATTEMPTS)
        );
    }
}
