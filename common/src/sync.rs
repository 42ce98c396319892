//! The one mutex-poison policy of ferry.
//!
//! Every `std::sync::Mutex` in ferry guards a small in-memory table (sessions,
//! running tasks, pending messages, pooled connections) whose entries are each
//! written in one step, so a thread that panicked while holding the lock
//! cannot leave it half-updated. A poisoned lock is therefore recovered, not
//! propagated: one panicking task must not take a whole coordinator or agent
//! down with it. Lock through [`lock`], never `lock().unwrap()`.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, recovering the guard if a panicking holder poisoned it.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_is_recovered_with_its_data() {
        let m = std::sync::Arc::new(Mutex::new(vec![1]));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let mut g = m2.lock().unwrap();
            g.push(2);
            panic!("holder panics");
        })
        .join();
        assert!(m.is_poisoned());
        assert_eq!(*lock(&m), vec![1, 2]);
    }
}
