//! Whether the agent takes transfers: a transfer that fails for a fault of
//! the agent itself (S3 refused its credentials, their permissions or its
//! clock; see `transfer::failure`) makes it unavailable for a while, so it
//! stops taking files that would fail the same way. The pause doubles with
//! each fault in a row (10 s up to 5 min) and ends by itself: the next
//! transfer is the test (an agent's fault costs a file no attempt), and a
//! success clears the count. Heartbeats carry the reason to the coordinators,
//! which assign the agent nothing while it is set, and `ferryctl agents`
//! shows it. Pure state; the clock is passed in.

use std::time::{Duration, Instant};

/// First pause after an agent fault.
const FIRST_PAUSE: Duration = Duration::from_secs(10);
/// Longest pause.
const MAX_PAUSE: Duration = Duration::from_secs(300);

/// The agent's availability for transfers.
#[derive(Debug, Default)]
pub(crate) struct Availability {
    /// Agent faults since the last successful transfer.
    faults_in_a_row: u32,
    /// Unavailable until then, for `reason`.
    paused: Option<(Instant, String)>,
}

impl Availability {
    /// A transfer failed for a fault of the agent: pause, longer each time.
    pub(crate) fn agent_fault(&mut self, reason: &str, now: Instant) {
        let pause = pause_after(self.faults_in_a_row);
        self.faults_in_a_row = self.faults_in_a_row.saturating_add(1);
        self.paused = Some((now + pause, reason.to_owned()));
    }

    /// A transfer succeeded: the agent's configuration works.
    pub(crate) fn succeeded(&mut self) {
        self.faults_in_a_row = 0;
        self.paused = None;
    }

    /// Why the agent takes no transfers at `now`; `None` when it takes them.
    pub(crate) fn unavailable(&self, now: Instant) -> Option<String> {
        match &self.paused {
            Some((until, reason)) if now < *until => Some(format!(
                "{reason} (takes no transfers for {}s more)",
                until.saturating_duration_since(now).as_secs().max(1)
            )),
            _ => None,
        }
    }
}

/// The pause after `faults` earlier faults in a row.
fn pause_after(faults: u32) -> Duration {
    FIRST_PAUSE
        .saturating_mul(2u32.saturating_pow(faults.min(16)))
        .min(MAX_PAUSE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fault_pauses_the_agent_then_it_tries_again() {
        let t0 = Instant::now();
        let mut a = Availability::default();
        assert_eq!(a.unavailable(t0), None);
        a.agent_fault("S3 refused the credentials", t0);
        let why = a.unavailable(t0 + Duration::from_secs(1)).unwrap();
        assert!(
            why.starts_with("S3 refused the credentials (takes no transfers for 9s"),
            "{why}"
        );
        assert_eq!(
            a.unavailable(t0 + FIRST_PAUSE),
            None,
            "the pause ends by itself"
        );
    }

    #[test]
    fn pauses_double_while_faults_repeat_and_a_success_resets_them() {
        let t0 = Instant::now();
        let mut a = Availability::default();
        a.agent_fault("x", t0);
        a.agent_fault("x", t0);
        assert!(a.unavailable(t0 + Duration::from_secs(19)).is_some());
        assert!(a.unavailable(t0 + Duration::from_secs(20)).is_none());
        for _ in 0..20 {
            a.agent_fault("x", t0);
        }
        assert!(
            a.unavailable(t0 + MAX_PAUSE - Duration::from_secs(1))
                .is_some()
        );
        assert!(a.unavailable(t0 + MAX_PAUSE).is_none(), "capped");
        a.succeeded();
        assert_eq!(a.unavailable(t0), None);
        a.agent_fault("x", t0);
        assert!(
            a.unavailable(t0 + FIRST_PAUSE).is_none(),
            "back to the first pause"
        );
    }
}
