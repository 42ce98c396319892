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

/// Encoded file descriptor set, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/ferry_descriptor.bin"));
