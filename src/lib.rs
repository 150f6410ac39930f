//! # pacs-broker
//!
//! One pacs-broker node runs at each partner site of an imaging network, teleradiology service or
//! multisite trial. It takes studies from its own PACS, de-identifies and tokenises them exactly as
//! a data sharing agreement (DSA) says, and sends them to partner nodes over mutual-TLS gRPC.
//! Partners see only pseudonyms; the keys that reverse them never leave the originating site.
//!
//! Data flows top to bottom through these modules:
//!
//! | module | owns |
//! |---|---|
//! | [`config`] | the node configuration file (TOML): site id, listen address, paths, peers |
//! | [`dsa`] | agreement model, parser with file:line:col errors, authorisation of flows |
//! | [`deid`] | the de-identification engine (PS3.15 Annex E) and its configuration |
//! | [`ingest`] | the one guarded pipeline every input goes through: files and DIMSE -> guard -> admit against the flow -> de-identify -> outbox |
//! | [`dicom_net`] | DIMSE with the site's own systems (dicom-ul): the listener (associations, allow-list, C-ECHO, C-STORE SCP) and C-STORE delivery to the local PACS from a durable queue |
//! | [`pseudonym`] | site keys, keyed tokens and UIDs, date offsets, the origin-only vault |
//! | [`store`] | the `Store` trait, its sled + content-addressed-file implementation, the inbox, the durable outbox, the PACS delivery queue, the quarantine of held-back instances |
//! | [`federation`] | proto service (tonic), mutual TLS 1.3 (rustls), peer identity, offer/transfer, signed receipts |
//! | [`users`] | local users and roles, behind one small interface (`[[users]]` today) |
//! | [`results`] | the return path: results a partner makes on a received study go home (recognised, queued durably), and only the origin re-identifies them through the vault and delivers them to its PACS or results folder |
//! | [`reidentify`] | who may see the original behind a token at the origin, audited |
//! | [`audit`] | the append-only hash-chained audit log: bounded entries, signed checkpoints (also held by partners), verification, disclosure reports, exports (JSON lines, RFC 5424, DICOM A.5), syslog/TLS forwarding, alerts |
//! | [`retention`] | the receiver's retention: when a received study expires (by a clock tests can set), its destruction through the store, and the signed destruction receipt delivered to the origin |
//! | [`node`] | wires the above into a running site: agreement reload, outbox worker, sending, shutdown |
//! | [`demo`] | the self-contained demo federation behind `pacs-broker demo` |
//!
//! The binary (`src/main.rs`) holds the command line only.
#![forbid(unsafe_code)]

pub mod audit;
pub mod config;
pub mod custody;
pub mod deid;
pub mod demo;
pub mod dicom_net;
pub mod dsa;
pub mod federation;
pub mod ingest;
pub mod keyring;
pub mod node;
pub mod pseudonym;
pub mod reidentify;
pub mod results;
pub mod retention;
pub mod send;
pub mod store;
pub mod users;
