//! Role checks: the role comes from the client certificate's SAN URI, never
//! from anything the caller says.
//!
//! **Architecture invariant:** an agent certificate cannot call the admin API and
//! an admin certificate cannot open an agent stream. Callers without a client
//! certificate from the configured CA never get past the TLS handshake.

use ferry_common::domain::Role;
use ferry_proto::tls::peer_role;
use tonic::{Request, Status};

fn denied(role: &Option<Role>, wanted: &str) -> Status {
    match role {
        Some(r) => Status::permission_denied(format!(
            "certificate {} may not call the {wanted} API",
            r.uri()
        )),
        None => Status::permission_denied(format!(
            "client certificate carries no ferry role (expected SAN URI spiffe://ferry/{wanted}/<name>)"
        )),
    }
}

/// Interceptor for `AdminService`.
pub(crate) fn require_admin(req: Request<()>) -> Result<Request<()>, Status> {
    match peer_role(&req) {
        Some(Role::Admin(_)) => Ok(req),
        other => Err(denied(&other, "admin")),
    }
}

/// Interceptor for `AgentService`.
pub(crate) fn require_agent(req: Request<()>) -> Result<Request<()>, Status> {
    match peer_role(&req) {
        Some(Role::Agent { .. }) => Ok(req),
        other => Err(denied(&other, "agent")),
    }
}
