//! Types shared by the ferry coordinator, agent and admin CLI: the generated
//! protocol, domain types and rules, configuration and TLS helpers. No business IO.
#![forbid(unsafe_code)]

pub mod proto {
    //! Generated protobuf / gRPC code for package `ferry.v1`.
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("ferry.v1");

    /// Encoded file descriptor set, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/ferry_descriptor.bin"));
}

pub mod backoff;
pub mod domain;
pub mod keys;
pub mod pki;
pub mod stability;
pub mod telemetry;
pub mod tls;
pub mod validate;

/// Version of this build, sent in the agent's hello and shown by `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
