//! The ferry wire protocol: code generated from `proto/ferry/v1/*.proto`, the
//! conversions between it and the domain types of `ferry-common`, and the
//! mTLS and logging plumbing every binary shares.
//!
//! **Architecture invariant:** this is the only crate that knows both the
//! protocol and the domain; domain logic in `ferry-common` never sees `proto::*`.

mod generated {
    //! Generated protobuf / gRPC code for package `ferry.v1`.
    #![allow(
        clippy::all,
        clippy::pedantic,
        missing_docs,
        unreachable_pub,
        clippy::allow_attributes_without_reason,
        reason = "generated code"
    )]
    tonic::include_proto!("ferry.v1");
}

pub use generated::*;

pub mod convert;
pub mod http;
pub mod metrics;
mod redact;
pub mod telemetry;
pub mod tls;

/// The largest message either end of `AgentService.Connect` decodes or
/// encodes (4 MiB, the gRPC default, set explicitly on both ends): a larger
/// one ends the stream with `RESOURCE_EXHAUSTED` / `OUT_OF_RANGE` before it
/// is read. The agent keeps its discovery batches far below it.
pub const AGENT_STREAM_MAX_MESSAGE: usize = 4 * 1024 * 1024;

/// Encoded file descriptor set, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/ferry_descriptor.bin"));
