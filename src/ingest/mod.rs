//! The one guarded pipeline every DICOM input goes through before it may leave the site:
//! source -> guard -> admit against the flow (with the source AE where there is one) ->
//! de-identify -> stage into the outbox.
//!
//! Owns: resolving an agreement's flow for sending ([`IngestFlow::resolve`], with errors a user
//! can act on), the admission rule ([`admit`]: the flow's study selector, `select.source_aes`
//! included), the sources — files ([`files`]: parallel, pixel data copied by the kernel, grouped
//! durable commits; used by `send`) and DIMSE ([`dimse`]: one instance at a time, read from the
//! listener's memory spool ([`admit_and_deidentify_memory`]) or its spool file, durable before
//! it is acknowledged, through the write-ahead log [`wal`]; used by the DICOM listener) — and [`HeldBack`], the one record of why an input did not go (quarantined, not
//! covered by the flow, failed) with the input it came from.
//!
//! The `deid` command shares the same guarded reader, de-identification step and parallel
//! grouped-commit machinery (`deid::batch::run_parallel`); it writes to a folder instead of
//! the outbox.
//!
//! Does not own: transport. The DIMSE association layer is `dicom_net`; sending studies to the
//! partner is the node's outbox worker (`node`).

use std::path::PathBuf;

use crate::deid::batch::{self, NotDeidentified};
use crate::deid::{Deidentified, Deidentifier};
use crate::dsa::{AgreementSet, Refusal, Selector, StudyFacts};

pub mod dimse;
pub mod files;
pub mod wal;

/// Errors that stop an ingest before any input is looked at.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(
        "agreement `{id}` is unknown at this site{hint}\n  help: agreements in force: {known}"
    )]
    UnknownAgreement {
        id: String,
        hint: String,
        known: String,
    },
    #[error("agreement `{agreement}` has no flow `{flow}`\n  help: its flows are: {flows}")]
    UnknownFlow {
        agreement: String,
        flow: String,
        flows: String,
    },
    #[error("flow `{flow}` of agreement `{agreement}` goes from `{from}` to `{to}`; this site (`{site}`) cannot send on it")]
    NotOurFlow {
        agreement: String,
        flow: String,
        from: String,
        to: String,
        site: String,
    },
    #[error("cannot send on flow `{flow}`: {refusal}")]
    Refused { flow: String, refusal: Refusal },
    #[error("no partner address is configured for site `{0}`\n  help: add [peers.{0}] with its address to the node config")]
    NoPeer(String),
    #[error("the file of agreement `{0}` is gone from the agreements folder")]
    AgreementFileGone(String),
    #[error(transparent)]
    Keys(crate::pseudonym::KeyError),
    #[error("trial subject IDs of agreement `{agreement}`: {reason}")]
    SubjectIds { agreement: String, reason: String },
    #[error("input {path}: {reason}")]
    Input { path: PathBuf, reason: String },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("the vault could not record tokens: {0}")]
    Vault(#[from] sled::Error),
}

/// One agreement's flow, ready to admit and de-identify instances for its receiver.
pub struct IngestFlow {
    pub agreement: String,
    pub flow: String,
    pub purpose: String,
    /// The receiving site.
    pub to: String,
    pub deid: Deidentifier,
    pub select: Selector,
}

impl IngestFlow {
    /// Resolves (agreement, flow) for sending from `site`: the agreement must be in force and
    /// name the flow, the flow must go from this site, and the agreement must allow sending on
    /// it now (active, valid today, both parties not suspended, the purpose allowed). Errors say
    /// what is wrong in words a user can act on: an unknown agreement with a did-you-mean and
    /// the agreements in force, an unknown flow with the agreement's flows, a suspension as a
    /// suspension.
    pub fn resolve(
        set: &AgreementSet,
        site: &str,
        agreement: &str,
        flow: &str,
        purpose: Option<&str>,
        agreement_file: Option<&std::path::Path>,
        keys: &crate::pseudonym::SiteKeys,
    ) -> Result<IngestFlow, IngestError> {
        let a = set.agreements.get(agreement).ok_or_else(|| {
            let known: Vec<&str> = set.agreements.keys().map(String::as_str).collect();
            IngestError::UnknownAgreement {
                id: agreement.to_string(),
                hint: crate::dsa::did_you_mean(agreement, known.iter().copied()),
                known: if known.is_empty() {
                    "none (is each agreement signed by every party?)".into()
                } else {
                    known
                        .iter()
                        .map(|k| format!("`{k}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            }
        })?;
        let f = a.flow(flow).ok_or_else(|| IngestError::UnknownFlow {
            agreement: agreement.to_string(),
            flow: flow.to_string(),
            flows: a
                .flows
                .iter()
                .map(|f| format!("`{}` ({} -> {})", f.name, f.from, f.to))
                .collect::<Vec<_>>()
                .join(", "),
        })?;
        if f.from != site {
            return Err(IngestError::NotOurFlow {
                agreement: agreement.into(),
                flow: flow.into(),
                from: f.from.clone(),
                to: f.to.clone(),
                site: site.into(),
            });
        }
        let purpose = purpose
            .map(str::to_string)
            .or_else(|| f.purposes.iter().next().map(|p| p.name().to_string()))
            .unwrap_or_default();
        set.authorise(agreement, flow, Some(&purpose), site, &f.to)
            .map_err(|refusal| IngestError::Refused {
                flow: flow.to_string(),
                refusal,
            })?;
        let file =
            agreement_file.ok_or_else(|| IngestError::AgreementFileGone(agreement.into()))?;
        let deid = f.deidentifier(agreement, file, keys).map_err(|e| match e {
            crate::dsa::subjects::SubjectIdError::Keys(k) => IngestError::Keys(k),
            e => IngestError::SubjectIds {
                agreement: agreement.into(),
                reason: e.to_string(),
            },
        })?;
        Ok(IngestFlow {
            agreement: agreement.to_string(),
            flow: flow.to_string(),
            purpose,
            to: f.to.clone(),
            deid,
            select: f.select.clone(),
        })
    }
}

/// Why an input did not go to the partner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HeldBackKind {
    /// Held back on purpose by de-identification (burned-in text, residual PHI, release check).
    Quarantined,
    /// Outside the flow's study selector (modality, body part, dates, source AE, ...).
    NotCovered,
    /// Not usable DICOM, or it could not be stored.
    Failed,
}

impl HeldBackKind {
    pub fn describe(self) -> &'static str {
        match self {
            HeldBackKind::Quarantined => "quarantined",
            HeldBackKind::NotCovered => "not covered by the flow",
            HeldBackKind::Failed => "failed",
        }
    }
}

/// One input held back, with why and where it came from. This is the one place that keeps an
/// input's reason: `send` prints it, the listener audits it and answers a failure status, and
/// a quarantine store can take it from here. `input` names a file, or for DIMSE input the
/// association's calling AE and the instance's number in it (never a UID or other PHI).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HeldBack {
    pub input: String,
    /// The file holding the original instance (for DIMSE input: gone once answered).
    pub path: Option<PathBuf>,
    pub kind: HeldBackKind,
    pub reason: String,
}

impl HeldBack {
    fn new(input: String, path: Option<PathBuf>, why: NotDeidentified) -> HeldBack {
        let (kind, reason) = match why {
            NotDeidentified::Quarantined { reason } => (HeldBackKind::Quarantined, reason),
            NotDeidentified::Failed { reason } => (HeldBackKind::Failed, reason),
            NotDeidentified::NotAdmitted { reason } => (HeldBackKind::NotCovered, reason),
        };
        HeldBack {
            input,
            path,
            kind,
            reason,
        }
    }
}

/// What the flow's selector looks at, read from the original instance (before
/// de-identification), and where it came from (the calling AE title, for DIMSE input).
pub fn study_facts(obj: &dicom_object::InMemDicomObject, source_ae: Option<&str>) -> StudyFacts {
    use dicom_dictionary_std::tags;
    let text = |tag| {
        obj.get(tag)
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim_end_matches(['\0', ' ']).trim().to_string())
            .filter(|s| !s.is_empty())
    };
    let study_date = text(tags::STUDY_DATE).and_then(|d| {
        let f = time::macros::format_description!("[year][month][day]");
        time::Date::parse(&d, &f).ok()
    });
    StudyFacts {
        modalities: text(tags::MODALITY).into_iter().collect(),
        body_parts: text(tags::BODY_PART_EXAMINED).into_iter().collect(),
        study_date,
        description: text(tags::STUDY_DESCRIPTION),
        source_ae: source_ae.map(|s| s.trim().to_string()),
    }
}

/// Whether the flow takes this instance. A flow that names `select.source_aes` takes only
/// instances that arrived over DICOM from one of those AE titles: files (which have no source
/// AE) are not covered by it, so a signed restriction to certain devices cannot be bypassed by
/// exporting their images to disk.
pub fn admit(select: &Selector, facts: &StudyFacts) -> Result<(), String> {
    if !select.source_aes.is_empty() && facts.source_ae.is_none() {
        return Err(format!(
            "the flow takes instances only from the source AE titles {} over DICOM, and a file has no source AE",
            select
                .source_aes
                .iter()
                .map(|a| format!("`{a}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    select.check(facts)
}

/// One admitted, de-identified instance.
pub struct Admitted {
    pub deidentified: Deidentified,
    /// The original's modality (for the offer's modality list).
    pub modality: Option<String>,
}

/// Guard, admit and de-identify one file (the common step of every source).
pub fn admit_and_deidentify(
    flow: &IngestFlow,
    path: &std::path::Path,
    source_ae: Option<&str>,
) -> Result<Admitted, NotDeidentified> {
    admit_and_deidentify_read(
        flow,
        || crate::deid::guard::read_guarded_split(path),
        source_ae,
    )
}

/// [`admit_and_deidentify`] of an instance held in memory: a whole Part 10 file, as the DICOM
/// listener received it. The same guarded reader reads it from the bytes
/// ([`crate::deid::guard::read_guarded_split_memory`]: the same walk, checks and parse), then the
/// same steps; the pixel data stays in `bytes` until the output is encoded.
pub fn admit_and_deidentify_memory(
    flow: &IngestFlow,
    bytes: std::sync::Arc<Vec<u8>>,
    source_ae: Option<&str>,
) -> Result<Admitted, NotDeidentified> {
    admit_and_deidentify_read(
        flow,
        || crate::deid::guard::read_guarded_split_memory(bytes),
        source_ae,
    )
}

/// Admits and de-identifies what `read` (one of the guarded reader's entry points) reads, through
/// `deid::batch::deidentify_guarded`: the steps every source shares.
fn admit_and_deidentify_read(
    flow: &IngestFlow,
    read: impl FnOnce() -> Result<
        (
            dicom_object::DefaultDicomObject,
            Option<crate::deid::guard::PixelSource>,
        ),
        String,
    >,
    source_ae: Option<&str>,
) -> Result<Admitted, NotDeidentified> {
    let mut modality = None;
    let check = |obj: &dicom_object::InMemDicomObject| {
        let facts = study_facts(obj, source_ae);
        modality = facts.modalities.first().cloned();
        admit(&flow.select, &facts)
    };
    let deidentified = batch::deidentify_guarded(&flow.deid, read, check)?;
    Ok(Admitted {
        deidentified,
        modality,
    })
}

/// The nice value of the DICOM listener's background threads (the mover, the hashing thread,
/// the log's slot preparation): on two
/// cores, the association thread, the modality sending to it and these compete, and only the
/// first two are on the path of an acknowledgement. They still get what the association leaves
/// (it waits for the modality's next instance and for each `fdatasync`), and all of a core when
/// the association is idle.
pub const BACKGROUND_NICE: i32 = 10;

/// Lowers the calling thread's priority to [`BACKGROUND_NICE`] (Linux: nice is per thread). Best
/// effort: a failure leaves the thread as it was.
pub(crate) fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        let me = rustix::thread::gettid();
        if let Err(e) = rustix::process::setpriority_process(Some(me), BACKGROUND_NICE) {
            tracing::debug!(error = %e, "cannot lower a background thread's priority");
        }
    }
}

/// A flow of agreement "a", flow "f", to site "c", with the default de-identification and no
/// selection criteria (the unit tests' flow).
#[cfg(test)]
pub(crate) fn test_flow(keys: &crate::pseudonym::SiteKeys) -> IngestFlow {
    IngestFlow {
        agreement: "a".into(),
        flow: "f".into(),
        purpose: "treatment".into(),
        to: "c".into(),
        deid: crate::deid::Deidentifier::new(Default::default(), keys.tokenizer("a").unwrap()),
        select: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flow_naming_source_aes_takes_only_dicom_input_from_them() {
        let mut select = Selector::default();
        select.source_aes.insert("CT1".into());
        let from = |ae: Option<&str>| StudyFacts {
            source_ae: ae.map(str::to_string),
            ..StudyFacts::default()
        };
        assert!(admit(&select, &from(Some("CT1"))).is_ok());
        assert!(admit(&select, &from(Some("OTHER"))).is_err());
        let file = admit(&select, &from(None)).unwrap_err();
        assert!(file.contains("a file has no source AE"), "{file}");
        // Without source_aes, files are covered as before.
        assert!(admit(&Selector::default(), &from(None)).is_ok());
    }
}
