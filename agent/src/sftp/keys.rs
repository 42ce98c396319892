//! Decoded login keys, kept so that a private key is decoded once per agent
//! and not at every login.
//!
//! Decoding a passphrase-protected OpenSSH key runs its key derivation
//! (bcrypt-pbkdf, 16 rounds by default: about 0.1 s of CPU) on purpose. An
//! agent logs in once per polled server and once per transfer session, and
//! again after every dropped connection, so with hundreds of servers the
//! derivation, not the network, bounded how fast it could log in.
//!
//! Entries are keyed by a SHA-256 of the key text and passphrase (neither is
//! stored here), hold only successfully decoded keys (a wrong passphrase is
//! tried again at the next login, so a corrected one takes effect), and leave
//! when unused for [`IDLE`] or when [`CAPACITY`] is reached (least recently
//! used first): a key of a server the agent no longer serves does not stay
//! in memory for good. `ssh_key::PrivateKey` wipes its secret on drop.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Most keys kept.
const CAPACITY: usize = 4096;
/// A key unused for this long is dropped.
const IDLE: Duration = Duration::from_secs(30 * 60);

/// Identity of a key text and passphrase: SHA-256 of both, length-prefixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct KeyId([u8; 32]);

impl KeyId {
    fn of(pem: &str, passphrase: Option<&str>) -> Self {
        let mut h = Sha256::new();
        h.update((pem.len() as u64).to_le_bytes());
        h.update(pem.as_bytes());
        match passphrase {
            None => h.update([0]),
            Some(p) => {
                h.update([1]);
                h.update(p.as_bytes());
            }
        }
        KeyId(h.finalize().into())
    }
}

/// One key's decoded value, filled by the first login that needs it.
type Slot<V> = Arc<tokio::sync::OnceCell<Arc<V>>>;

/// Decoded values by key identity, bounded by count and idle time.
#[derive(Debug)]
pub(crate) struct DecodedKeys<V> {
    entries: HashMap<KeyId, (Slot<V>, Instant)>,
    capacity: usize,
    idle: Duration,
}

impl<V> DecodedKeys<V> {
    fn new(capacity: usize, idle: Duration) -> Self {
        DecodedKeys {
            entries: HashMap::new(),
            capacity,
            idle,
        }
    }

    /// The slot of `pem` and `passphrase`, used at `now`: the one already
    /// kept, or a new empty one (the least recently used entry leaves if
    /// the cache is full; entries idle for too long leave first).
    fn slot(&mut self, pem: &str, passphrase: Option<&str>, now: Instant) -> Slot<V> {
        let id = KeyId::of(pem, passphrase);
        let idle = self.idle;
        self.entries
            .retain(|_, (_, used)| now.saturating_duration_since(*used) < idle);
        if let Some((slot, used)) = self.entries.get_mut(&id) {
            *used = now;
            return slot.clone();
        }
        if self.entries.len() >= self.capacity
            && let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(id, _)| *id)
        {
            self.entries.remove(&oldest);
        }
        let slot = Slot::default();
        self.entries.insert(id, (slot.clone(), now));
        slot
    }
}

/// Runs `decode` for `slot` unless an earlier call filled it; concurrent
/// callers wait for one decode, and a failed one leaves the slot empty for
/// the next caller. The decode runs on the blocking pool (it may take 0.1 s
/// of CPU).
async fn fill<V, E>(
    slot: &Slot<V>,
    decode: impl FnOnce() -> Result<V, E> + Send + 'static,
) -> Result<Arc<V>, E>
where
    V: Send + Sync + 'static,
    E: Send + 'static,
{
    slot.get_or_try_init(|| async {
        match tokio::task::spawn_blocking(decode).await {
            Ok(decoded) => decoded.map(Arc::new),
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        }
    })
    .await
    .cloned()
}

/// The private key decoded from `pem` with `passphrase` by `decode`, decoded
/// at most once while it is in use (see the module docs).
pub(crate) async fn decoded<E: Send + 'static>(
    pem: &str,
    passphrase: Option<&str>,
    decode: impl FnOnce() -> Result<russh::keys::PrivateKey, E> + Send + 'static,
) -> Result<Arc<russh::keys::PrivateKey>, E> {
    static KEYS: OnceLock<Mutex<DecodedKeys<russh::keys::PrivateKey>>> = OnceLock::new();
    let keys = KEYS.get_or_init(|| Mutex::new(DecodedKeys::new(CAPACITY, IDLE)));
    let slot = ferry_common::sync::lock(keys).slot(pem, passphrase, Instant::now());
    fill(&slot, decode).await
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn counting(
        calls: &Arc<AtomicU32>,
        value: u32,
    ) -> impl FnOnce() -> Result<u32, String> + Send + 'static {
        let calls = calls.clone();
        move || {
            calls.fetch_add(1, Ordering::SeqCst);
            Ok(value)
        }
    }

    #[tokio::test]
    async fn a_key_text_and_passphrase_are_decoded_once_also_by_concurrent_logins() {
        let mut keys = DecodedKeys::new(8, IDLE);
        let (calls, now) = (Arc::new(AtomicU32::new(0)), Instant::now());
        let (a, b) = (
            keys.slot("pem", Some("pw"), now),
            keys.slot("pem", Some("pw"), now),
        );
        let (a, b) = tokio::join!(fill(&a, counting(&calls, 1)), fill(&b, counting(&calls, 2)));
        assert!(Arc::ptr_eq(&a.unwrap(), &b.unwrap()));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Another passphrase, no passphrase, another text: decoded anew.
        for (pem, pass) in [("pem", Some("other")), ("pem", None), ("pem2", Some("pw"))] {
            let v = fill(&keys.slot(pem, pass, now), counting(&calls, 3)).await;
            assert_eq!(*v.unwrap(), 3);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn a_failed_decode_is_tried_again() {
        let mut keys: DecodedKeys<u32> = DecodedKeys::new(8, IDLE);
        let now = Instant::now();
        let slot = keys.slot("pem", Some("pw"), now);
        let failed = fill(&slot, || Err("bad passphrase".to_owned())).await;
        assert_eq!(failed.unwrap_err(), "bad passphrase");
        let calls = Arc::new(AtomicU32::new(0));
        let v = fill(&keys.slot("pem", Some("pw"), now), counting(&calls, 7)).await;
        assert_eq!(*v.unwrap(), 7);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn unused_keys_leave_after_the_idle_time_and_the_least_recent_at_capacity() {
        let mut keys: DecodedKeys<u32> = DecodedKeys::new(2, Duration::from_secs(60));
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let a = keys.slot("a", None, at(0));
        let b = keys.slot("b", None, at(1));
        // "a" used again, so "b" is the least recently used when "c" comes.
        assert!(Arc::ptr_eq(&a, &keys.slot("a", None, at(2))));
        keys.slot("c", None, at(3));
        assert!(Arc::ptr_eq(&a, &keys.slot("a", None, at(4))), "a stayed");
        assert!(
            !Arc::ptr_eq(&b, &keys.slot("b", None, at(5))),
            "b was evicted"
        );
        // Nothing used for a minute: all gone.
        assert!(!Arc::ptr_eq(&a, &keys.slot("a", None, at(70))));
        assert_eq!(keys.entries.len(), 1);
    }
}
