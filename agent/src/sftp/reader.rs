//! [`RemoteReader`]: a remote file as `AsyncRead`, one read request in
//! flight at a time. Simple and correct for small files and tests; bulk
//! transfer pipelines requests on [`SftpSession::raw`](super::SftpSession::raw).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use russh_sftp::client::RawSftpSession;
use russh_sftp::client::error::Error as SftpLibError;
use russh_sftp::protocol::{Data, StatusCode};
use tokio::io::{AsyncRead, ReadBuf};

use super::error::classify;

type ReadFuture = Pin<Box<dyn Future<Output = Result<Data, SftpLibError>> + Send + Sync>>;

/// An open remote file read front to back. I/O errors carry an
/// [`SftpError`](super::SftpError); recover it with
/// [`SftpError::from_io`](super::SftpError::from_io).
///
/// Call [`RemoteReader::close`] to release the server handle and see the
/// result; dropping the reader closes it in the background.
pub struct RemoteReader {
    sftp: Arc<RawSftpSession>,
    handle: Option<String>,
    path: String,
    chunk: u32,
    /// File offset of the next request.
    offset: u64,
    buffer: Vec<u8>,
    /// Bytes of `buffer` already handed out.
    consumed: usize,
    in_flight: Option<ReadFuture>,
    eof: bool,
}

impl RemoteReader {
    pub(crate) fn new(
        sftp: Arc<RawSftpSession>,
        handle: String,
        path: String,
        chunk: u32,
    ) -> RemoteReader {
        RemoteReader {
            sftp,
            handle: Some(handle),
            path,
            chunk,
            offset: 0,
            buffer: Vec::new(),
            consumed: 0,
            in_flight: None,
            eof: false,
        }
    }

    /// Remote path being read.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Bytes handed out so far.
    pub fn position(&self) -> u64 {
        let buffered = (self.buffer.len() - self.consumed) as u64;
        self.offset - buffered
    }

    /// Closes the remote handle and waits for the server's answer.
    pub async fn close(mut self) -> Result<(), super::SftpError> {
        self.in_flight = None;
        match self.handle.take() {
            Some(handle) => self
                .sftp
                .close(handle)
                .await
                .map(drop)
                .map_err(|e| classify(e, &self.path)),
            None => Ok(()),
        }
    }
}

impl AsyncRead for RemoteReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.consumed < this.buffer.len() {
                let n = buf.remaining().min(this.buffer.len() - this.consumed);
                buf.put_slice(&this.buffer[this.consumed..this.consumed + n]);
                this.consumed += n;
                return Poll::Ready(Ok(()));
            }
            if this.eof || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let Some(handle) = this.handle.clone() else {
                return Poll::Ready(Err(io::Error::other("reader already closed")));
            };
            let request = this.in_flight.get_or_insert_with(|| {
                let sftp = this.sftp.clone();
                let (offset, len) = (this.offset, this.chunk);
                Box::pin(async move { sftp.read(handle, offset, len).await })
            });
            let result = ready!(request.as_mut().poll(cx));
            this.in_flight = None;
            match result {
                // Short reads are legal anywhere; continue after what came.
                Ok(data) if !data.data.is_empty() => {
                    this.offset += data.data.len() as u64;
                    this.buffer = data.data;
                    this.consumed = 0;
                }
                Ok(_) => this.eof = true,
                Err(SftpLibError::Status(status)) if status.status_code == StatusCode::Eof => {
                    this.eof = true;
                }
                Err(e) => return Poll::Ready(Err(classify(e, &this.path).into_io())),
            }
        }
    }
}

impl Drop for RemoteReader {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            close_in_background(self.sftp.clone(), handle);
        }
    }
}

/// Sends `CLOSE` for `handle` without waiting for the answer, if a Tokio
/// runtime is around to run it (otherwise the server frees the handle when
/// the channel closes).
pub(crate) fn close_in_background(sftp: Arc<RawSftpSession>, handle: String) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            if let Err(e) = sftp.close(handle).await {
                tracing::debug!(error = %e, "closing abandoned SFTP handle");
            }
        });
    }
}
