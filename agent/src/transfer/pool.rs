//! [`SessionPool`]: the agent's SSH connections per server, shared by polls,
//! transfers and post-actions.
//!
//! **Invariants:**
//! - At most `max_sessions` connections to a server are open at once on this
//!   agent — in use or idle alike: each open connection holds one of the
//!   server's permits until it has closed. (Across agents the budget holds
//!   because the coordinator gives a server's transfers and post-actions to
//!   the agent that polls it.)
//! - At most [`USERS_PER_SESSION`] checkouts use one connection at once.
//!
//! SFTP multiplexes requests by id, so one connection carries several
//! checkouts at once. Which connection a checkout gets is decided by
//! [`choose`] (pure) from how busy the server's open connections are and
//! the kind of [`Work`]: light work (a listing, a post-action, a small file)
//! rides on the least busy open connection and opens a new one only when
//! none has room; heavy work (a large file) takes an unused connection, else
//! opens one while the budget allows, and shares one only when the budget is
//! spent. A login costs an OpenSSH server about 10 ms of CPU (BENCHMARKS.md)
//! and waits behind the agent's other logins to that host; the few requests
//! of a small file cost a fraction of a millisecond. A large file wants a
//! connection's throughput to itself.
//!
//! A checked-out session is a [`PooledSession`]; its connection stays open
//! for later checkouts when the last user drops it, unless it died or an
//! error that [breaks the session](SftpError::breaks_session) was reported
//! on it (then no new checkout gets it, and it closes when its last user is
//! done). Connections unused for longer than the idle limit are closed on the
//! next checkout or by the pool's background task.
//!
//! A server whose connection settings change (new credentials, host key,
//! `max_sessions`) gets a fresh slot; the old slot's unused connections are
//! closed at once, its busy ones when their last user is done.

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
/// Checkouts that use one connection at once.
pub(crate) const USERS_PER_SESSION: usize = 8;
/// The largest file a transfer copies as [`Work::Light`]: a few read
/// requests (256 KiB each on OpenSSH) and one `PutObject`.
pub(crate) const LIGHT_TRANSFER_MAX_BYTES: u64 = 1 << 20;

/// What a checkout is for; decides whether it shares a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Work {
    /// A listing, a post-action or a small file: a few requests.
    Light,
    /// A large file: wants a connection's throughput.
    Heavy,
}

impl Work {
    /// The kind of work copying a file of `size` bytes is.
    pub(crate) fn transfer(size: u64) -> Work {
        if size <= LIGHT_TRANSFER_MAX_BYTES {
            Work::Light
        } else {
            Work::Heavy
        }
    }
}

/// What a checkout does next.
#[derive(Debug, PartialEq, Eq)]
enum Choice {
    /// Check out the open connection at this index once more.
    Use(usize),
    /// Open a new connection: a permit is free.
    Open,
    /// Wait for a checkout to end or a connection to close.
    Wait,
}

/// A [`Choice`] carried out under the slot's lock.
enum Next {
    /// Checked out: this connection's user count already includes us.
    Take(Arc<Open>),
    Open,
    Wait,
}

/// Picks a connection for `work`. `users` holds how many checkouts use each
/// open connection that may take more (a broken one counts as full);
/// `permit_free` says whether the server's budget allows one more
/// connection. Among equally busy connections the last is taken (the most
/// recently opened), so the others go unused and are closed in time.
fn choose(users: &[usize], permit_free: bool, work: Work) -> Choice {
    let least = users
        .iter()
        .enumerate()
        .rev()
        .filter(|(_, u)| **u < USERS_PER_SESSION)
        .min_by_key(|(_, u)| **u)
        .map(|(i, u)| (i, *u));
    match (work, least) {
        (_, Some((i, 0))) | (Work::Light, Some((i, _))) => Choice::Use(i),
        _ if permit_free => Choice::Open,
        (Work::Heavy, Some((i, _))) => Choice::Use(i),
        _ => Choice::Wait,
    }
}

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

/// One server's connections.
struct Slot {
    /// The settings the connections were opened with.
    conn: proto::ServerConnection,
    /// One permit per open connection, in use or idle (`max_sessions`).
    permits: Arc<Semaphore>,
    /// Open connections, in use or idle, oldest first.
    open: Mutex<Vec<Entry>>,
    /// Signalled when a checkout ends.
    returned: Notify,
}

/// An open connection of a slot and who uses it.
struct Entry {
    open: Arc<Open>,
    /// Checkouts using it now.
    users: usize,
    /// No new checkouts: it died, an error broke it, or its slot was
    /// replaced. Closed when its last user is done.
    retired: bool,
}

impl Entry {
    /// How busy it is for [`choose`]: a retired connection counts as full.
    fn load(&self) -> usize {
        if self.retired {
            USERS_PER_SESSION
        } else {
            self.users
        }
    }
}

/// An open connection and the permit it holds: the permit goes back when
/// the last holder drops this, after the connection has been closed.
struct Open {
    session: SftpSession,
    _permit: OwnedSemaphorePermit,
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

    /// A session to `conn`'s server for `work` (see [`choose`]): an open
    /// connection with room, else a new connection if the server's budget
    /// allows, else the first of the two to come (a checkout ended, a
    /// connection closed).
    pub(crate) async fn checkout(
        &self,
        conn: &proto::ServerConnection,
        work: Work,
    ) -> Result<PooledSession, SftpError> {
        let slot = self.inner.slot(conn);
        loop {
            let returned = slot.returned.notified();
            tokio::pin!(returned);
            // Registered before looking, so a return in between is not missed.
            returned.as_mut().enable();
            let (next, stale) = {
                let mut open = lock(&slot.open);
                let stale = self.inner.retire_unusable(&mut open);
                let users: Vec<usize> = open.iter().map(Entry::load).collect();
                let next = match choose(&users, slot.permits.available_permits() > 0, work) {
                    Choice::Use(i) => {
                        open[i].users += 1;
                        Next::Take(open[i].open.clone())
                    }
                    Choice::Open => Next::Open,
                    Choice::Wait => Next::Wait,
                };
                (next, stale)
            };
            close_all(stale);
            let permit = match next {
                Next::Take(open) => return Ok(PooledSession::new(open, slot.clone(), true)),
                Next::Open => match slot.permits.clone().try_acquire_owned() {
                    Ok(permit) => permit,
                    Err(TryAcquireError::Closed) => return Err(pool_closed()),
                    // Taken meanwhile by a waiter: look again.
                    Err(TryAcquireError::NoPermits) => continue,
                },
                Next::Wait => tokio::select! {
                    permit = slot.permits.clone().acquire_owned() => {
                        permit.map_err(|_| pool_closed())?
                    }
                    _ = returned => continue,
                },
            };
            let session = sftp::connect(&endpoint(conn)?, &self.inner.timeouts).await?;
            let open = Arc::new(Open {
                session,
                _permit: permit,
            });
            lock(&slot.open).push(Entry {
                open: open.clone(),
                users: 1,
                retired: false,
            });
            return Ok(PooledSession::new(open, slot.clone(), false));
        }
    }
}

fn pool_closed() -> SftpError {
    SftpError::Disconnected("session pool closed".to_owned())
}

impl Inner {
    /// Takes out the connections nobody uses that died, were retired or sat
    /// unused too long (to be closed), and retires the busy ones that died.
    fn retire_unusable(&self, open: &mut Vec<Entry>) -> Vec<Arc<Open>> {
        let mut stale = Vec::new();
        let mut i = 0;
        while i < open.len() {
            let e = &mut open[i];
            e.retired |= !e.open.session.is_alive();
            let unusable = e.retired || e.open.session.idle_for() > self.idle_limit;
            if e.users == 0 && unusable {
                stale.push(open.remove(i).open);
            } else {
                i += 1;
            }
        }
        stale
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
            open: Mutex::new(Vec::new()),
            returned: Notify::new(),
        });
        if let Some(old) = servers.insert(conn.server_id, slot.clone()) {
            let stale = {
                let mut open = lock(&old.open);
                for e in open.iter_mut() {
                    e.retired = true;
                }
                self.retire_unusable(&mut open)
            };
            close_all(stale);
        }
        slot
    }

    fn close_idle(&self) {
        let slots: Vec<Arc<Slot>> = lock(&self.servers).values().cloned().collect();
        for slot in slots {
            let stale = self.retire_unusable(&mut lock(&slot.open));
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
/// Other checkouts may use the same connection at once.
pub(crate) struct PooledSession {
    open: Arc<Open>,
    slot: Arc<Slot>,
    reused: bool,
    broken: bool,
}

impl PooledSession {
    fn new(open: Arc<Open>, slot: Arc<Slot>, reused: bool) -> PooledSession {
        PooledSession {
            open,
            slot,
            reused,
            broken: false,
        }
    }

    /// True if the connection was already open rather than opened for this
    /// checkout (a pooled one may have died unnoticed: worth one retry).
    pub(crate) fn reused(&self) -> bool {
        self.reused
    }

    /// Records an error seen on this session; one that breaks the session
    /// retires its connection.
    pub(crate) fn note(&mut self, err: &SftpError) {
        if err.breaks_session() {
            self.broken = true;
        }
    }

    /// Retires this session's connection.
    pub(crate) fn discard(&mut self) {
        self.broken = true;
    }
}

impl Deref for PooledSession {
    type Target = SftpSession;

    fn deref(&self) -> &SftpSession {
        &self.open.session
    }
}

impl Drop for PooledSession {
    fn drop(&mut self) {
        let stale = {
            let mut open = lock(&self.slot.open);
            let mut stale = None;
            if let Some(i) = open.iter().position(|e| Arc::ptr_eq(&e.open, &self.open)) {
                let e = &mut open[i];
                e.users = e.users.saturating_sub(1);
                e.retired |= self.broken || !self.open.session.is_alive();
                if e.retired && e.users == 0 {
                    stale = Some(open.remove(i).open);
                }
            }
            stale
        };
        close_all(stale.into_iter().collect());
        self.slot.returned.notify_one();
    }
}

/// Closes connections in the background; each one's permit is given back
/// once its connection has ended and its last holder has let go, so a new
/// connection never overlaps it.
fn close_all(connections: Vec<Arc<Open>>) {
    if connections.is_empty() {
        return;
    }
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            for open in connections {
                open.session.close().await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn light_work_rides_on_a_busy_connection_rather_than_logging_in_again() {
        // The poller lists on the server's one connection; a small file's
        // transfer shares it though the budget would allow a second login.
        assert_eq!(choose(&[1], true, Work::Light), Choice::Use(0));
        assert_eq!(choose(&[3, 1, 2], true, Work::Light), Choice::Use(1));
        assert_eq!(choose(&[], true, Work::Light), Choice::Open);
    }

    #[test]
    fn heavy_work_gets_a_connection_of_its_own_while_the_budget_allows() {
        assert_eq!(choose(&[1, 0], true, Work::Heavy), Choice::Use(1));
        assert_eq!(choose(&[1], true, Work::Heavy), Choice::Open);
        // Budget spent: sharing beats waiting.
        assert_eq!(choose(&[2, 1], false, Work::Heavy), Choice::Use(1));
    }

    #[test]
    fn a_full_connection_takes_no_more_and_the_budget_bounds_new_ones() {
        let full = [USERS_PER_SESSION, USERS_PER_SESSION];
        assert_eq!(choose(&full, true, Work::Light), Choice::Open);
        assert_eq!(choose(&full, false, Work::Light), Choice::Wait);
        assert_eq!(choose(&full, false, Work::Heavy), Choice::Wait);
        assert_eq!(choose(&[], false, Work::Light), Choice::Wait);
    }

    #[test]
    fn among_equally_busy_connections_the_newest_is_used() {
        assert_eq!(choose(&[0, 0, 0], true, Work::Light), Choice::Use(2));
        assert_eq!(choose(&[2, 1, 1], false, Work::Light), Choice::Use(2));
    }

    #[test]
    fn transfers_up_to_a_mebibyte_are_light() {
        assert_eq!(Work::transfer(0), Work::Light);
        assert_eq!(Work::transfer(LIGHT_TRANSFER_MAX_BYTES), Work::Light);
        assert_eq!(Work::transfer(LIGHT_TRANSFER_MAX_BYTES + 1), Work::Heavy);
    }
}
