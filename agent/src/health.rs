//! What this agent tells orchestrators about itself on `FERRY_HTTP_LISTEN`:
//! `/healthz` (alive), `/readyz` (holds a welcomed stream to a coordinator
//! and is not shutting down) and `/metrics` ([`crate::metrics`]).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use ferry_common::sync::lock;
use ferry_proto::http::{ProbeFuture, Probes};

/// The agent's readiness, updated by the connection loop.
#[derive(Debug, Default)]
pub(crate) struct Readiness {
    /// The coordinator whose welcome the current stream got.
    coordinator: Mutex<Option<String>>,
    stopping: AtomicBool,
}

impl Readiness {
    pub(crate) fn connected(&self, coordinator: &str) {
        *lock(&self.coordinator) = Some(coordinator.to_string());
    }

    pub(crate) fn disconnected(&self) {
        *lock(&self.coordinator) = None;
    }

    pub(crate) fn stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    fn check(&self) -> Result<(), String> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err("shutting down".into());
        }
        match lock(&self.coordinator).as_deref() {
            Some(_) => Ok(()),
            None => Err("no coordinator stream".into()),
        }
    }
}

impl Probes for Readiness {
    fn ready(&self) -> ProbeFuture<'_, Result<(), String>> {
        Box::pin(async move { self.check() })
    }

    fn metrics(&self) -> ProbeFuture<'_, Option<Result<String, String>>> {
        Box::pin(async { Some(Ok(crate::metrics::render())) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_while_connected_and_not_stopping() {
        let r = Readiness::default();
        assert_eq!(r.check(), Err("no coordinator stream".into()));
        r.connected("c1");
        assert_eq!(r.check(), Ok(()));
        r.disconnected();
        assert!(r.check().is_err());
        r.connected("c2");
        r.stopping();
        assert_eq!(r.check(), Err("shutting down".into()));
    }
}
