//! The node's DICOM edge: DIMSE networking with the `dicom-ul` crate.
//!
//! Owns: the DICOM listener ([`scp`]): associations, the allow-list by AE title and address,
//! presentation contexts for every storage SOP class of the standard, C-ECHO and C-STORE, and
//! DIMSE statuses.
//!
//! Does not own: what happens to a received instance (the `ingest` pipeline, reached through
//! [`scp::StoreService`]) or agreements (`dsa`).

pub mod scp;
