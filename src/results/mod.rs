//! The return path: results (reports, key object selections, segmentations, presentation states,
//! secondary captures, encapsulated PDFs) that a partner makes on a study it received come home
//! to the origin, and only the origin re-identifies them.
//!
//! Owns, at the partner: recognising that a DICOM object is a result on a study this site
//! received from an origin under an agreement whose flow lets results return ([`recognise`]),
//! and the durable queue of results waiting to go home ([`queue`]); the DIMSE side door that
//! takes a reporting system's C-STORE of a result before `[[dicom.routes]]` are consulted
//! ([`intake`]). At the origin: mapping every token and remapped UID of a result back through
//! the vault, shifting dates back and restoring the patient ([`restore`]), and where the
//! re-identified result goes: the site's PACS through the `[dicom.delivery]` queue, or the
//! results folder under the data directory ([`sink`]).
//!
//! Does not own: the transport (the `ReturnResult` RPC is `federation::returns`), the guarded
//! reader every input goes through (`deid::guard`), the vault's cryptography (`pseudonym`), or
//! whether the agreement allows returns (`dsa`: the flow's `results.return_to_origin`).
//!
//! No error of this module carries an original value: messages name attributes, tokens the
//! partner already holds, and agreements — never a patient name, ID, birth date or original UID.

pub mod intake;
pub mod queue;
pub mod recognise;
pub mod restore;
pub mod sink;

/// Largest result object accepted on the return path (64 MiB): reports, PDFs, KOS and
/// presentation states are small; a segmentation of a large CT still fits.
pub const MAX_RESULT_SIZE: u64 = 64 << 20;

/// Why a result cannot return (at the partner) or be re-identified (at the origin).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResultError {
    #[error("agreement `{0}` is not in force at this site")]
    UnknownAgreement(String),
    #[error("agreement `{agreement}` has no flow to this site (`{site}`) that lets results return to the origin\n  help: results return only on a flow whose `[flows.results] return_to_origin` is true")]
    NoReturningFlow { agreement: String, site: String },
    #[error("not a readable DICOM object: {0}")]
    Unreadable(String),
    #[error("the result has no {0}")]
    Missing(&'static str),
    #[error(
        "the result is {size} bytes; at most {MAX_RESULT_SIZE} are accepted on the return path"
    )]
    TooLarge { size: u64 },
    #[error("the result refers to study `{study}`, which this site never received{under}\n  help: a partner may only return results on studies it received from their origin")]
    NotReceived { study: String, under: String },
    #[error("flow `{flow}` of agreement `{agreement}` does not let results return to the origin (`results.return_to_origin` is false)")]
    ReturnsNotAllowed { agreement: String, flow: String },
    #[error("agreement `{agreement}` does not let results return from `{partner}` to `{origin}` now: {why}")]
    NotAllowed {
        agreement: String,
        partner: String,
        origin: String,
        why: String,
    },
    #[error("the result's Patient ID is not the patient of study `{study}` it refers to")]
    WrongPatient { study: String },
    #[error("the result carries SOP Instance UID `{0}` of an instance it refers to; a result must be a new object with its own UID")]
    NotNew(String),
    #[error("unknown token: the {attribute} `{token}` was not issued by this site under agreement `{agreement}` (or its vault was shredded)")]
    UnknownToken {
        attribute: &'static str,
        token: String,
        agreement: String,
    },
    #[error("unknown token: {0}")]
    Shredded(String),
    #[error("the vault cannot be read: {0}")]
    Vault(String),
    #[error("the result cannot be stored: {0}")]
    Storage(String),
}

impl ResultError {
    /// A vault or key-file error: a shredded agreement is a refusal for good (its tokens can
    /// never be reversed again), anything else a vault failure worth retrying.
    pub fn from_vault(e: crate::pseudonym::KeyError) -> ResultError {
        match e {
            e @ crate::pseudonym::KeyError::Shredded { .. } => ResultError::Shredded(e.to_string()),
            e => ResultError::Vault(e.to_string()),
        }
    }
}
