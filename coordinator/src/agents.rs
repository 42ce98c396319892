//! `ferry.v1.AgentService`: one bidirectional stream per connected agent.

use std::pin::Pin;

use ferry_common::proto::{self, agent_service_server::AgentService};
use futures::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::state::Coordinator;

/// The agent streams held by this coordinator.
#[derive(Clone)]
pub struct AgentStreams {
    coord: Coordinator,
    cancel: CancellationToken,
}

impl AgentStreams {
    pub fn new(coord: Coordinator, cancel: CancellationToken) -> Self {
        AgentStreams { coord, cancel }
    }

    /// Marks this coordinator's agents disconnected on shutdown.
    pub async fn shutdown(&self) {
        let _ = (&self.coord, &self.cancel);
    }
}

type OutStream = Pin<Box<dyn Stream<Item = Result<proto::CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for AgentStreams {
    type ConnectStream = OutStream;

    async fn connect(
        &self,
        _req: Request<Streaming<proto::AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        Err(Status::unimplemented("agent streams arrive with the agents issue"))
    }
}
