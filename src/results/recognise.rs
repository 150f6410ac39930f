//! At the partner: is this object a result this site may return, and to whom?
//!
//! Owns [`recognise`]: a result must be a storage object with its own SOP Instance UID whose
//! Study Instance UID is a study this site received (the store's records, never a field the
//! reporting system could invent), from the origin it goes back to, under an agreement in force
//! whose flow lets results return, about the same patient (its Patient ID is the token the
//! received study carries). Anything else is refused: a partner cannot push arbitrary data into
//! a hospital. Does not own: reading the file (the caller used `deid::guard`), the queue
//! ([`super::queue`]) or the transport (`federation::returns`).

use dicom_dictionary_std::tags;
use dicom_object::mem::InMemDicomObject;

use super::ResultError;
use crate::dsa::AgreementSet;
use crate::federation::wire;
use crate::store::{BlobCheck, Store, StudyKey, StudyRecord};

/// Where a recognised result goes home.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReturnTarget {
    pub agreement: String,
    pub flow: String,
    /// The origin: the site the study came from.
    pub origin: String,
    pub purpose: String,
    pub study_token: String,
    /// The result's own SOP Instance UID.
    pub sop_instance_uid: String,
}

fn text(o: &InMemDicomObject, tag: dicom_core::Tag) -> Option<String> {
    o.get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_matches(['\0', ' ']).to_string())
        .filter(|s| !s.is_empty())
}

/// The UID of `tag`, present and well formed.
fn uid(
    o: &InMemDicomObject,
    tag: dicom_core::Tag,
    name: &'static str,
) -> Result<String, ResultError> {
    let v = text(o, tag).ok_or(ResultError::Missing(name))?;
    wire::check_uid(name, &v).map_err(|e| ResultError::Unreadable(e.to_string()))?;
    Ok(v)
}

/// Decides whether `obj` may return from `site` (this partner), and to which origin. With
/// `only_agreement`, the study must have been received under that agreement. Blocking (reads
/// the store).
pub fn recognise(
    obj: &InMemDicomObject,
    site: &str,
    agreements: &AgreementSet,
    store: &dyn Store,
    only_agreement: Option<&str>,
    today: time::Date,
) -> Result<ReturnTarget, ResultError> {
    if text(obj, tags::SOP_CLASS_UID).is_none() {
        return Err(ResultError::Missing("SOP Class UID"));
    }
    let sop = uid(obj, tags::SOP_INSTANCE_UID, "SOP Instance UID")?;
    let study = uid(obj, tags::STUDY_INSTANCE_UID, "Study Instance UID")?;
    // Point lookups, one per flow into this site (no scan of every study the site holds: the
    // DICOM listener asks this for every instance it receives).
    let mut received: Vec<StudyRecord> = Vec::new();
    for a in agreements.agreements.values() {
        if only_agreement.is_some_and(|id| id != a.id) {
            continue;
        }
        for f in a.flows.iter().filter(|f| f.to == site) {
            let key = StudyKey::new(&a.id, &f.name, &f.from, &study);
            if let Some(rec) = store
                .study(&key)
                .map_err(|e| ResultError::Storage(e.to_string()))?
            {
                received.push(rec);
            }
        }
    }
    if received.is_empty() {
        return Err(ResultError::NotReceived {
            study,
            under: match only_agreement {
                Some(a) => format!(" under agreement `{a}`"),
                None => " under any agreement in force here".into(),
            },
        });
    }
    // The first record whose flow allows returns; otherwise the reason the first one does not.
    let mut refusal = None;
    for rec in &received {
        match returnable(rec, site, agreements, today) {
            Ok(purpose) => {
                check_result_of(obj, rec, &sop, store)?;
                return Ok(ReturnTarget {
                    agreement: rec.agreement.clone(),
                    flow: rec.flow.clone(),
                    origin: rec.from_site.clone(),
                    purpose,
                    study_token: study,
                    sop_instance_uid: sop,
                });
            }
            Err(e) => {
                refusal.get_or_insert(e);
            }
        }
    }
    Err(refusal.unwrap_or(ResultError::NotReceived {
        study: String::new(),
        under: String::new(),
    }))
}

/// Whether results on `rec` may go back to its origin now; the flow's first purpose if so.
fn returnable(
    rec: &StudyRecord,
    site: &str,
    agreements: &AgreementSet,
    today: time::Date,
) -> Result<String, ResultError> {
    let not_allowed = |why: String| ResultError::NotAllowed {
        agreement: rec.agreement.clone(),
        partner: site.to_string(),
        origin: rec.from_site.clone(),
        why,
    };
    let agreement = agreements
        .agreements
        .get(&rec.agreement)
        .ok_or_else(|| not_allowed("the agreement is not in force at this site".into()))?;
    let flow = agreement
        .flow(&rec.flow)
        .ok_or_else(|| not_allowed(format!("it has no flow `{}` any more", rec.flow)))?;
    if !flow.results.return_to_origin {
        return Err(ResultError::ReturnsNotAllowed {
            agreement: rec.agreement.clone(),
            flow: rec.flow.clone(),
        });
    }
    agreements
        .still_allowed(&rec.agreement, site, &rec.from_site, today)
        .map_err(|r| not_allowed(r.to_string()))?;
    Ok(flow
        .purposes
        .iter()
        .next()
        .map(|p| p.name().to_string())
        .unwrap_or_default())
}

/// The result is a new object (not one of the received instances) about the received patient.
fn check_result_of(
    obj: &InMemDicomObject,
    rec: &StudyRecord,
    sop: &str,
    store: &dyn Store,
) -> Result<(), ResultError> {
    if rec.instances.contains_key(sop) {
        return Err(ResultError::NotNew(sop.to_string()));
    }
    let patient = text(obj, tags::PATIENT_ID).ok_or(ResultError::Missing("Patient ID"))?;
    let wrong = || ResultError::WrongPatient {
        study: rec.study_token.clone(),
    };
    // The patient token of the received study, from one of its stored instances.
    // Noted by the receiver as it checked the study (the copies may have left the inbox since).
    if let Some(held) = rec.patient.as_deref() {
        return if held.trim_matches(['\0', ' ']) == patient {
            Ok(())
        } else {
            Err(wrong())
        };
    }
    let key = StudyKey::new(&rec.agreement, &rec.flow, &rec.from_site, &rec.study_token);
    for (uid, sha_hex) in &rec.instances {
        let mut sha = [0u8; 32];
        if hex::decode_to_slice(sha_hex, &mut sha).is_err() {
            continue;
        }
        // The sealed blob, or the inbox copy where that is the stored copy.
        let Ok(BlobCheck::Intact(path)) = store.check_held(&key, uid, &sha) else {
            continue;
        };
        // Blobs are sealed at rest: the guard reads their plaintext from memory.
        let read = store
            .at_rest()
            .plain_view(&path)
            .map_err(|e| e.to_string())
            .and_then(|view| crate::deid::guard::read_guarded_split(view.path()));
        let (held, _pixels) = match read {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(study = %rec.study_token, error = %e, "a stored instance could not be read to check a result's patient");
                continue;
            }
        };
        return match text(&held, tags::PATIENT_ID) {
            Some(p) if p == patient => Ok(()),
            _ => Err(wrong()),
        };
    }
    Err(ResultError::Storage(format!(
        "no intact stored instance of study `{}` is left to check the result's patient against",
        rec.study_token
    )))
}
