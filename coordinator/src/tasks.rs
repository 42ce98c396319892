//! Background loops of a coordinator (poll assignment, scheduling, outbox relay).

use tokio_util::sync::CancellationToken;

use crate::agents::AgentStreams;
use crate::state::Coordinator;

pub async fn run_background(coord: Coordinator, agents: AgentStreams, cancel: CancellationToken) {
    let _ = (coord, agents);
    cancel.cancelled().await;
}
