//! ferry agent: holds one control stream to a coordinator, polls the SFTP
//! servers it is assigned, and streams files from SFTP to S3. See ARCHITECTURE.md.
#![forbid(unsafe_code)]

pub mod config;
pub mod control;
pub mod poller;
pub mod runner;
pub mod sftp;
pub mod transfer;
