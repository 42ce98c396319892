//! [`SessionPool`]: the agent's SSH connections per server, shared by polls,
//! transfers and post-actions.
//!
//! **Invariant:** at most `max_sessions` connections to a server are open at
//! once on this agent — in use or idle alike: each open connection holds one
//! of the server's permits until it is closed. A checkout takes an idle
//! connection, else opens one if a permit is free, else waits for either.
//! (Across agents the budget holds because the coordinator gives a server's
//! transfers and post-actions to the agent that polls it.)
//!
//! A checked-out session is a [`PooledSession`]; it goes back to the pool
//! when dropped unless it died or an error that
//! [breaks the session](SftpError::breaks_session) was reported on it.
//! Sessions unused for longer than the idle limit are closed on the next
//! checkout or by the pool's background task.
//!
//! A server whose connection settings change (new credentials, host key,
//! `max_sessions`) gets a fresh slot; the old slot's idle sessions are
//! closed at once, its busy ones when the last of them is returned.

use ferry_common::sync::lock;
use std::collections::HashMap;
use std::ops::Deref;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use ferry_proto as proto;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, TryAcquireError};

use crate::poller::endpoint;
use crate::sftp::{self, SftpError, SftpSession, Timeouts};

/// Sessions per server when the assignment says 0.
pub(crate) const DEFAULT_MAX_SESSIONS: u32 = 4;
/// Close a pooled session nobody used for this long.
pub(crate) const IDLE_LIMIT: Duration = Duration::from_secs(60);

/// SFTP sessions per server id, shared by all transfers of the agent.
///
/// Created inside a Tokio runtime, the pool runs a background task that
/// closes idle sessions; the task ends when the pool is dropped.
pub(crate) struct SessionPool {
    inner: Arc<Inner>,
}

struct Inner {
    timeouts: Timeouts,
    idle_limit: Duration,
    servers: Mutex<HashMap<i64, Arc<Slot>>>,
}

/// One server's sessions.
struct Slot {
    /// The settings the sessions were opened with.
    conn: proto::ServerConnection,
    /// One permit per open connection, in use or idle (`max_sessions`).
    permits: Arc<Semaphore>,
    /// Open sessions nobody uses, most recently returned last.
    idle: Mutex<Vec<Open>>,
    /// Signalled when a session goes back to `idle`.
    returned: Notify,
}

/// An open connection and the permit it holds until it is closed.
struct Open {
    session: SftpSession,
    permit: OwnedSemaphorePermit,
}

impl SessionPool {
    pub(crate) fn new(timeouts: Timeouts) -> SessionPool {
        SessionPool::with_idle_limit(timeouts, IDLE_LIMIT)
    }

    pub(crate) fn with_idle_limit(timeouts: Timeouts, idle_limit: Duration) -> SessionPool {
        let inner = Arc::new(Inner {
            timeouts,
            idle_limit,
            servers: Mutex::new(HashMap::new()),
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(reap(Arc::downgrade(&inner)));
        }
        SessionPool { inner }
    }

    /// A session to `conn`'s server: an idle pooled one if any is alive,
    /// else a new connection if the server's budget has room, else the first
    /// of the two to come (a session returned, a connection closed).
    pub(crate) async fn checkout(
        &self,
        conn: &proto::ServerConnection,
    ) -> Result<PooledSession, SftpError> {
        let slot = self.inner.slot(conn);
        loop {
            let returned = slot.returned.notified();
            tokio::pin!(returned);
            // Registered before looking, so a return in between is not missed.
            returned.as_mut().enable();
            let (found, stale) = {
                let mut idle = lock(&slot.idle);
                let mut stale = Vec::new();
                let mut found = None;
                while let Some(open) = idle.pop() {
                    if self.inner.usable(&open.session) {
                        found = Some(open);
                        break;
                    }
                    stale.push(open);
                }
                (found, stale)
            };
            close_all(stale);
            if let Some(open) = found {
                return Ok(PooledSession::new(open, slot.clone(), true));
            }
            let permit = match slot.permits.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(TryAcquireError::Closed) => return Err(pool_closed()),
                Err(TryAcquireError::NoPermits) => tokio::select! {
                    permit = slot.permits.clone().acquire_owned() => {
                        permit.map_err(|_| pool_closed())?
                    }
                    _ = returned => continue,
                },
            };
            let session = sftp::connect(&endpoint(conn)?, &self.inner.timeouts).await?;
            return Ok(PooledSession::new(
                Open { session, permit },
                slot.clone(),
                false,
            ));
        }
    }
}

fn pool_closed() -> SftpError {
    SftpError::Disconnected("session pool closed".to_owned())
}

impl Inner {
    fn usable(&self, session: &SftpSession) -> bool {
        session.is_alive() && session.idle_for() <= self.idle_limit
    }

    /// The slot of `conn`'s server, replaced if its settings changed.
    fn slot(&self, conn: &proto::ServerConnection) -> Arc<Slot> {
        let mut servers = lock(&self.servers);
        if let Some(slot) = servers.get(&conn.server_id)
            && slot.conn == *conn
        {
            return slot.clone();
        }
        let max = if conn.max_sessions == 0 {
            DEFAULT_MAX_SESSIONS
        } else {
            conn.max_sessions
        };
        let slot = Arc::new(Slot {
            conn: conn.clone(),
            permits: Arc::new(Semaphore::new(max as usize)),
            idle: Mutex::new(Vec::new()),
            returned: Notify::new(),
        });
        if let Some(old) = servers.insert(conn.server_id, slot.clone()) {
            close_all(std::mem::take(&mut *lock(&old.idle)));
        }
        slot
    }

    fn close_idle(&self) {
        let slots: Vec<Arc<Slot>> = lock(&self.servers).values().cloned().collect();
        for slot in slots {
            let stale = {
                let mut idle = lock(&slot.idle);
                let (keep, stale): (Vec<_>, Vec<_>) =
                    idle.drain(..).partition(|o| self.usable(&o.session));
                *idle = keep;
                stale
            };
            close_all(stale);
        }
    }
}

/// Closes idle sessions periodically while the pool exists.
async fn reap(pool: Weak<Inner>) {
    let period = match pool.upgrade() {
        Some(inner) => (inner.idle_limit / 4).max(Duration::from_secs(1)),
        None => return,
    };
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match pool.upgrade() {
            Some(inner) => inner.close_idle(),
            None => return,
        }
    }
}

/// A session checked out of a [`SessionPool`]; derefs to [`SftpSession`].
pub(crate) struct PooledSession {
    open: Option<Open>,
    slot: Arc<Slot>,
    reused: bool,
    broken: bool,
}

impl PooledSession {
    fn new(open: Open, slot: Arc<Slot>, reused: bool) -> PooledSession {
        PooledSession {
            open: Some(open),
            slot,
            reused,
            broken: false,
        }
    }

    /// True if the session came from the pool rather than a new connection
    /// (a pooled session may have died unnoticed: worth one retry).
    pub(crate) fn reused(&self) -> bool {
        self.reused
    }

    /// Records an error seen on this session; one that breaks the session
    /// keeps it out of the pool.
    pub(crate) fn note(&mut self, err: &SftpError) {
        if err.breaks_session() {
            self.broken = true;
        }
    }

    /// Keeps this session out of the pool.
    pub(crate) fn discard(&mut self) {
        self.broken = true;
    }
}

impl Deref for PooledSession {
    type Target = SftpSession;

    #[expect(clippy::expect_used, reason = "only `Drop` takes the session out")]
    fn deref(&self) -> &SftpSession {
        &self
            .open
            .as_ref()
            .expect("pooled session present until drop")
            .session
    }
}

impl Drop for PooledSession {
    fn drop(&mut self) {
        let Some(open) = self.open.take() else {
            return;
        };
        if self.broken || !open.session.is_alive() {
            close_all(vec![open]);
        } else {
            lock(&self.slot.idle).push(open);
            self.slot.returned.notify_one();
        }
    }
}

/// Closes sessions in the background; each one's permit is given back once
/// its connection has ended, so a new connection never overlaps it.
fn close_all(sessions: Vec<Open>) {
    if sessions.is_empty() {
        return;
    }
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            for open in sessions {
                open.session.close().await;
                drop(open.permit);
            }
        });
    }
}
