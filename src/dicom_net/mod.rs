//! DICOM networking (DIMSE over dicom-ul) between the node and the site's own systems.
//!
//! Owns: delivery of received studies to the site's PACS by C-STORE ([`deliver`]).
//!
//! Does not own: de-identification or admission of what arrives (`ingest`), or storage (`store`).

pub mod deliver;
