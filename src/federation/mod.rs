//! The federation: how site nodes talk to each other.
//!
//! Owns: the gRPC protocol (`proto/federation.proto`, package `federation.v1`), mutual TLS 1.3 and
//! the peer identity taken from the verified certificate ([`tls`], [`pki`]), the receiving side of
//! offer/transfer with its enforcement ([`service`]) and the sending side ([`client`]), the
//! return path of results from a partner to the origin ([`returns`]), and signed destruction
//! receipts with the origin's ledger of them ([`destruction`]).
//!
//! Peers are not trusted to be benign: per-peer limits and timeouts, bounded peer strings, CRLs
//! and pins apply to every connection ([`tls`], [`crl`], [`wire`], [`refusals`], [`manifest`]).
//!
//! Does not own: de-identification (the sender calls `deid` before anything reaches this module;
//! the receiver calls `deid::check_release` to re-check what arrives), nor storage (`store`).

pub mod client;
pub mod crl;
pub mod destruction;
pub mod manifest;
pub mod pki;
pub mod receipt;
pub mod refusals;
pub mod returns;
pub mod service;
pub mod tls;
pub mod wire;

/// Generated protocol types and service stubs.
#[allow(clippy::all)]
pub mod proto {
    tonic::include_proto!("federation.v1");
}

/// Largest chunk of an instance in one message (tonic's default message limit is 4 MiB).
pub const CHUNK_SIZE: usize = 1024 * 1024;

/// HTTP/2 receive window of one federation stream: two chunks in flight, so the sender never
/// waits for a WINDOW_UPDATE while the receiver writes the previous chunk.
pub const STREAM_WINDOW: u32 = 2 * CHUNK_SIZE as u32;

/// HTTP/2 receive window of one federation connection (all its streams): bounds what a partner
/// can have buffered here, unread, per connection.
pub const CONNECTION_WINDOW: u32 = 4 * CHUNK_SIZE as u32;
