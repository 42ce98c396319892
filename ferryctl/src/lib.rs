//! `ferryctl` as a library: the development PKI behind `ferryctl certs`, also
//! used by the end-to-end harness to mint certificates. The CLI itself is
//! `main.rs`.

pub mod pki;
