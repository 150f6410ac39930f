//! The node's DICOM edge: DIMSE networking with the `dicom-ul` crate, between the node and the
//! site's own systems.
//!
//! Owns: the DICOM listener ([`scp`]): associations, the allow-list by AE title and address,
//! presentation contexts for every storage SOP class of the standard, C-ECHO and C-STORE, and
//! DIMSE statuses; and delivery of received studies to the site's PACS by C-STORE
//! ([`deliver`]).
//!
//! Does not own: what happens to a received instance (the `ingest` pipeline, reached through
//! [`scp::StoreService`]), agreements (`dsa`) or storage (`store`).

pub mod deliver;
pub mod scp;
