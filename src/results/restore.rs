//! Re-identification of a returned result at the origin.
//!
//! Owns [`restore`]: given a result the partner made on a pseudonymised study, it maps every
//! token and remapped UID back through this site's vault and restores the patient, so that the
//! result files under the right patient and points at the original instances:
//! - Patient ID: the patient token must be one this site issued under the agreement (else the
//!   result is refused); it becomes the original Patient ID. Patient's Name and Birth Date are
//!   restored from the vault records made when the study left (`deid::patient_detail_token`).
//! - UIDs at every depth (evidence and reference sequences included: Current Requested Procedure
//!   Evidence, Referenced Series / SOP / Image, Source Image...): a UID the vault knows as a study,
//!   series, instance or frame of reference UID of this agreement becomes the original; any other
//!   UID is the result's own (its new series and instance UIDs, SOP classes) and is kept. Every
//!   Study Instance UID must be known: a result about a study this site never sent is refused.
//! - Other tokens (an accession number the flow tokenised, say) at every depth become their
//!   originals when the vault holds them for that very attribute.
//! - Dates: with the flow's `retain-longitudinal-modified-dates`, the dates that describe the
//!   patient and the study (Study Date, Admitting Date, and Patient's Birth Date when the vault
//!   has no record of it) are shifted back by the patient's offset. Dates the result carries about
//!   itself (Series, Content, Instance Creation dates, SR date-times) are the partner's clock and
//!   are kept.
//! - The de-identification markers (Patient Identity Removed, De-identification Method and its
//!   code sequence, Longitudinal Temporal Information Modified) are removed: the object is
//!   identified again.
//!
//! Does not own: deciding whether the partner may return (`federation::returns`), reading the
//! file (`deid::guard`), or the vault itself (`pseudonym`).

use dicom_core::header::Header;
use dicom_core::value::{DataSetSequence, Value};
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::mem::{InMemDicomObject, InMemElement};

use super::ResultError;
use crate::deid::{keyword_of, patient_detail_token, values};
use crate::pseudonym::{Tokenizer, Vault, VaultEntry};

/// What the origin needs to re-identify results under one agreement.
pub struct RestoreContext<'a> {
    pub agreement: &'a str,
    pub vault: &'a Vault,
    pub tokenizer: &'a Tokenizer,
    /// The flow shifted dates (`retain-longitudinal-modified-dates`): shift them back.
    pub shift_dates: bool,
}

/// What [`restore`] did (counts and tokens only: this is what the audit entry shows).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Restored {
    pub patient_token: String,
    pub study_token: String,
    pub uids: usize,
    pub tokens: usize,
    pub dates: usize,
}

/// UID attributes whose remapped values the vault records (see `deid`).
const RECORDED_UIDS: [&str; 4] = [
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "FrameOfReferenceUID",
];

/// Dates about the patient and the study (shifted when the study left; shifted back here).
const STUDY_DATES: [Tag; 3] = [
    tags::STUDY_DATE,
    tags::ADMITTING_DATE,
    tags::PATIENT_BIRTH_DATE,
];

/// The de-identification markers the result inherited from the study it refers to.
const DEID_MARKERS: [Tag; 4] = [
    tags::PATIENT_IDENTITY_REMOVED,
    tags::DEIDENTIFICATION_METHOD,
    tags::DEIDENTIFICATION_METHOD_CODE_SEQUENCE,
    tags::LONGITUDINAL_TEMPORAL_INFORMATION_MODIFIED,
];

fn text(o: &InMemDicomObject, tag: Tag) -> Option<String> {
    o.get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_matches(['\0', ' ']).to_string())
        .filter(|s| !s.is_empty())
}

/// The patient behind the result, as the vault has it.
struct Patient {
    token: String,
    id: String,
    name: Option<String>,
    birth_date: Option<String>,
    /// Days the patient's dates were shifted by when the study left.
    offset: i64,
}

struct Walk<'a> {
    cx: &'a RestoreContext<'a>,
    patient: Patient,
    done: Restored,
}

impl RestoreContext<'_> {
    fn lookup(&self, token: &str) -> Result<Option<VaultEntry>, ResultError> {
        self.vault
            .reidentify(self.agreement, token)
            .map_err(ResultError::from_vault)
    }

    fn unknown(&self, attribute: &'static str, token: &str) -> ResultError {
        ResultError::UnknownToken {
            attribute,
            token: crate::federation::wire::shown(token),
            agreement: self.agreement.to_string(),
        }
    }

    fn patient(&self, obj: &InMemDicomObject) -> Result<Patient, ResultError> {
        let token = text(obj, tags::PATIENT_ID).ok_or(ResultError::Missing("Patient ID"))?;
        let entry = self
            .lookup(&token)?
            .filter(|e| e.attribute == "PatientID")
            .ok_or_else(|| self.unknown("Patient ID", &token))?;
        let detail = |attribute: &str| -> Result<Option<String>, ResultError> {
            Ok(self
                .lookup(&patient_detail_token(&token, attribute))?
                .filter(|e| e.attribute == attribute)
                .map(|e| e.original))
        };
        Ok(Patient {
            name: detail("PatientName")?,
            birth_date: detail("PatientBirthDate")?,
            offset: self.tokenizer.date_offset_days(&entry.original),
            id: entry.original,
            token,
        })
    }
}

/// Re-identifies `obj` in place (see the module documentation). On error the object is left
/// half-done and must be dropped; the error names no original value.
pub fn restore(obj: &mut InMemDicomObject, cx: &RestoreContext) -> Result<Restored, ResultError> {
    let study =
        text(obj, tags::STUDY_INSTANCE_UID).ok_or(ResultError::Missing("Study Instance UID"))?;
    let patient = cx.patient(obj)?;
    let mut walk = Walk {
        cx,
        done: Restored {
            patient_token: patient.token.clone(),
            study_token: study,
            ..Restored::default()
        },
        patient,
    };
    walk.dataset(obj, true)?;
    let p = &walk.patient;
    obj.put(DataElement::new(
        tags::PATIENT_ID,
        VR::LO,
        PrimitiveValue::from(p.id.as_str()),
    ));
    let name = p.name.clone().unwrap_or_default();
    obj.put(DataElement::new(
        tags::PATIENT_NAME,
        VR::PN,
        PrimitiveValue::from(name),
    ));
    if let Some(b) = &p.birth_date {
        obj.put(DataElement::new(
            tags::PATIENT_BIRTH_DATE,
            VR::DA,
            PrimitiveValue::from(b.as_str()),
        ));
    }
    for t in DEID_MARKERS {
        obj.remove_element(t);
    }
    Ok(walk.done)
}

impl Walk<'_> {
    fn dataset(&mut self, obj: &mut InMemDicomObject, top: bool) -> Result<(), ResultError> {
        let tags_here: Vec<Tag> = obj.tags().collect();
        for tag in tags_here {
            if top && matches!(tag, tags::PATIENT_ID | tags::PATIENT_NAME) {
                continue; // set from the vault afterwards
            }
            if top && tag == tags::PATIENT_BIRTH_DATE && self.patient.birth_date.is_some() {
                continue;
            }
            let Some(elem) = obj.take_element(tag).ok() else {
                continue;
            };
            let new = self.element(elem)?;
            obj.put(new);
        }
        Ok(())
    }

    fn element(&mut self, elem: InMemElement) -> Result<InMemElement, ResultError> {
        let (tag, vr) = (elem.tag(), elem.vr());
        if let Value::Sequence(seq) = elem.value() {
            let mut items: Vec<InMemDicomObject> = seq.items().to_vec();
            for item in &mut items {
                self.dataset(item, false)?;
            }
            return Ok(DataElement::new(
                tag,
                VR::SQ,
                DataSetSequence::new(items, seq.length()),
            ));
        }
        match vr {
            VR::UI => self.uids(elem),
            VR::DA | VR::DT if self.cx.shift_dates && STUDY_DATES.contains(&tag) => {
                Ok(self.date(elem))
            }
            VR::PN
                if elem
                    .to_str()
                    .is_ok_and(|v| v.trim_matches(['\0', ' ']) == self.patient.token) =>
            {
                self.done.tokens += 1;
                let name = self.patient.name.clone().unwrap_or_default();
                Ok(DataElement::new(tag, vr, PrimitiveValue::from(name)))
            }
            VR::LO | VR::SH | VR::PN | VR::CS => self.token(elem),
            _ => Ok(elem),
        }
    }

    /// Maps every value the vault knows as one of this agreement's remapped UIDs back.
    fn uids(&mut self, elem: InMemElement) -> Result<InMemElement, ResultError> {
        let tag = elem.tag();
        let values: Vec<String> = elem
            .to_multi_str()
            .map(|v| {
                v.iter()
                    .map(|s| s.trim_matches(['\0', ' ']).to_string())
                    .collect()
            })
            .unwrap_or_default();
        let mut out = Vec::with_capacity(values.len());
        let mut changed = false;
        for v in values {
            let known = if v.starts_with("1.2.840.10008.") || v.is_empty() {
                None
            } else {
                self.cx
                    .lookup(&v)?
                    .filter(|e| RECORDED_UIDS.contains(&e.attribute.as_str()))
            };
            match known {
                Some(e) => {
                    self.done.uids += 1;
                    changed = true;
                    out.push(e.original);
                }
                None if tag == tags::STUDY_INSTANCE_UID => {
                    return Err(self.cx.unknown("Study Instance UID", &v));
                }
                None => out.push(v),
            }
        }
        if !changed {
            return Ok(elem);
        }
        Ok(DataElement::new(
            tag,
            VR::UI,
            PrimitiveValue::Strs(out.into()),
        ))
    }

    /// Shifts a study date back by the patient's offset (a value that is not a date is kept).
    fn date(&mut self, elem: InMemElement) -> InMemElement {
        let (tag, vr) = (elem.tag(), elem.vr());
        let Ok(values) = elem.to_multi_str().map(|v| v.into_owned()) else {
            return elem;
        };
        match values::shift_values(&values, vr, -self.patient.offset) {
            Some(v) => {
                self.done.dates += 1;
                DataElement::new(tag, vr, PrimitiveValue::Strs(v.into()))
            }
            None => elem,
        }
    }

    /// A short text value that the vault holds as a token of this very attribute.
    fn token(&mut self, elem: InMemElement) -> Result<InMemElement, ResultError> {
        let tag = elem.tag();
        let Ok(value) = elem
            .to_str()
            .map(|v| v.trim_matches(['\0', ' ']).to_string())
        else {
            return Ok(elem);
        };
        // Tokens are 16 characters of Crockford base32 (`pseudonym::Tokenizer::token`).
        let looks_like_token = value.len() == 16
            && value
                .bytes()
                .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase());
        if !looks_like_token {
            return Ok(elem);
        }
        let keyword = keyword_of(tag);
        match self.cx.lookup(&value)? {
            Some(e) if !keyword.is_empty() && e.attribute == keyword => {
                self.done.tokens += 1;
                Ok(DataElement::new(
                    tag,
                    elem.vr(),
                    PrimitiveValue::from(e.original),
                ))
            }
            _ => Ok(elem),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pseudonym::SiteKeys;
    use proptest::prelude::*;

    const AGR: &str = "agr-ret";
    const MRN: &str = "MRN-555";
    const NAME: &str = "ROE^RICHARD";
    const STUDY: &str = "1.2.826.0.1.3680043.10.1432.1.77";
    const SERIES: &str = "1.2.826.0.1.3680043.10.1432.2.77";
    const SOP: &str = "1.2.826.0.1.3680043.10.1432.4.77.1";

    fn el(tag: Tag, vr: VR, v: &str) -> InMemElement {
        DataElement::new(tag, vr, PrimitiveValue::from(v))
    }

    fn sq(tag: Tag, items: Vec<InMemDicomObject>) -> InMemElement {
        DataElement::new(
            tag,
            VR::SQ,
            DataSetSequence::new(items, dicom_core::Length::UNDEFINED),
        )
    }

    /// A vault holding what sending the study recorded; the tokens the partner saw.
    fn sent(dir: &std::path::Path) -> (Vault, Tokenizer, [String; 4]) {
        let keys = SiteKeys::from_bytes([3; 32], [4; 32]);
        let db = sled::open(dir).unwrap();
        let vault = Vault::new(&keys, db.open_tree("vault").unwrap());
        let tok = keys.tokenizer(AGR).unwrap();
        let patient = tok.token("PatientID", MRN);
        let rec = |t: &str, a: &str, o: &str| {
            let e = VaultEntry {
                attribute: a.into(),
                original: o.into(),
            };
            vault.record(AGR, t, &e).unwrap();
        };
        rec(&patient, "PatientID", MRN);
        rec(
            &patient_detail_token(&patient, "PatientName"),
            "PatientName",
            NAME,
        );
        rec(
            &patient_detail_token(&patient, "PatientBirthDate"),
            "PatientBirthDate",
            "19700101",
        );
        let (study, series, sop) = (tok.uid(STUDY), tok.uid(SERIES), tok.uid(SOP));
        rec(&study, "StudyInstanceUID", STUDY);
        rec(&series, "SeriesInstanceUID", SERIES);
        rec(&sop, "SOPInstanceUID", SOP);
        (vault, tok, [patient, study, series, sop])
    }

    fn result(t: &[String; 4], shifted_study_date: &str) -> InMemDicomObject {
        let reference = InMemDicomObject::from_element_iter([
            el(
                tags::REFERENCED_SOP_CLASS_UID,
                VR::UI,
                "1.2.840.10008.5.1.4.1.1.2",
            ),
            el(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, &t[3]),
        ]);
        let series = InMemDicomObject::from_element_iter([
            el(tags::SERIES_INSTANCE_UID, VR::UI, &t[2]),
            sq(tags::REFERENCED_SOP_SEQUENCE, vec![reference.clone()]),
        ]);
        let evidence = InMemDicomObject::from_element_iter([
            el(tags::STUDY_INSTANCE_UID, VR::UI, &t[1]),
            sq(tags::REFERENCED_SERIES_SEQUENCE, vec![series]),
        ]);
        InMemDicomObject::from_element_iter([
            el(tags::SOP_CLASS_UID, VR::UI, "1.2.840.10008.5.1.4.1.1.88.11"),
            el(tags::SOP_INSTANCE_UID, VR::UI, "2.25.42"),
            el(tags::SERIES_INSTANCE_UID, VR::UI, "2.25.43"),
            el(tags::STUDY_INSTANCE_UID, VR::UI, &t[1]),
            el(tags::PATIENT_ID, VR::LO, &t[0]),
            el(tags::PATIENT_NAME, VR::PN, &t[0]),
            el(tags::STUDY_DATE, VR::DA, shifted_study_date),
            el(tags::CONTENT_DATE, VR::DA, "20261202"),
            el(tags::PATIENT_IDENTITY_REMOVED, VR::CS, "YES"),
            sq(
                tags::CURRENT_REQUESTED_PROCEDURE_EVIDENCE_SEQUENCE,
                vec![evidence],
            ),
            sq(tags::REFERENCED_IMAGE_SEQUENCE, vec![reference]),
        ])
    }

    fn find(o: &InMemDicomObject, path: &[Tag], leaf: Tag) -> String {
        let mut cur = o.clone();
        for t in path {
            let items = cur.get(*t).unwrap().items().unwrap().to_vec();
            cur = items[0].clone();
        }
        cur.get(leaf)
            .unwrap()
            .to_str()
            .unwrap()
            .trim_end_matches('\0')
            .to_string()
    }

    #[test]
    fn a_result_is_filed_under_the_patient_with_original_references_and_its_own_uids() {
        let dir = tempfile::tempdir().unwrap();
        let (vault, tok, t) = sent(dir.path());
        let offset = tok.date_offset_days(MRN);
        let shifted = values::shift_date("20261102", offset).unwrap();
        let mut obj = result(&t, &shifted);
        let cx = RestoreContext {
            agreement: AGR,
            vault: &vault,
            tokenizer: &tok,
            shift_dates: true,
        };
        let done = restore(&mut obj, &cx).unwrap();
        assert_eq!(done.uids, 5);
        assert_eq!(text(&obj, tags::PATIENT_ID).unwrap(), MRN);
        assert_eq!(text(&obj, tags::PATIENT_NAME).unwrap(), NAME);
        assert_eq!(text(&obj, tags::PATIENT_BIRTH_DATE).unwrap(), "19700101");
        assert_eq!(text(&obj, tags::STUDY_INSTANCE_UID).unwrap(), STUDY);
        assert_eq!(text(&obj, tags::STUDY_DATE).unwrap(), "20261102");
        assert_eq!(
            text(&obj, tags::CONTENT_DATE).unwrap(),
            "20261202",
            "the result's own date"
        );
        assert_eq!(
            text(&obj, tags::SOP_INSTANCE_UID).unwrap(),
            "2.25.42",
            "its own UID"
        );
        assert_eq!(text(&obj, tags::SERIES_INSTANCE_UID).unwrap(), "2.25.43");
        assert!(obj.get(tags::PATIENT_IDENTITY_REMOVED).is_none());
        let ev = tags::CURRENT_REQUESTED_PROCEDURE_EVIDENCE_SEQUENCE;
        assert_eq!(find(&obj, &[ev], tags::STUDY_INSTANCE_UID), STUDY);
        assert_eq!(
            find(
                &obj,
                &[ev, tags::REFERENCED_SERIES_SEQUENCE],
                tags::SERIES_INSTANCE_UID
            ),
            SERIES
        );
        let refd = [
            ev,
            tags::REFERENCED_SERIES_SEQUENCE,
            tags::REFERENCED_SOP_SEQUENCE,
        ];
        assert_eq!(find(&obj, &refd, tags::REFERENCED_SOP_INSTANCE_UID), SOP);
        assert_eq!(
            find(
                &obj,
                &[tags::REFERENCED_IMAGE_SEQUENCE],
                tags::REFERENCED_SOP_INSTANCE_UID
            ),
            SOP
        );
    }

    #[test]
    fn unknown_tokens_and_studies_are_refused_without_an_original() {
        let dir = tempfile::tempdir().unwrap();
        let (vault, tok, t) = sent(dir.path());
        let cx = RestoreContext {
            agreement: AGR,
            vault: &vault,
            tokenizer: &tok,
            shift_dates: true,
        };
        let mut obj = result(&t, "20240101");
        obj.put(el(tags::PATIENT_ID, VR::LO, "ZZZZZZZZZZZZZZZZ"));
        let e = restore(&mut obj, &cx).unwrap_err();
        assert!(
            matches!(
                e,
                ResultError::UnknownToken {
                    attribute: "Patient ID",
                    ..
                }
            ),
            "{e}"
        );
        let mut obj = result(&t, "20240101");
        obj.put(el(tags::STUDY_INSTANCE_UID, VR::UI, "2.25.999"));
        let e = restore(&mut obj, &cx).unwrap_err();
        assert!(
            e.to_string().contains("Study Instance UID `2.25.999`"),
            "{e}"
        );
        // The study token as a patient, the patient's name record as a patient: unknown.
        for wrong in [t[1].clone(), patient_detail_token(&t[0], "PatientName")] {
            let mut obj = result(&t, "20240101");
            obj.put(el(tags::PATIENT_ID, VR::LO, &wrong));
            let e = restore(&mut obj, &cx).unwrap_err().to_string();
            for original in [MRN, NAME, STUDY, SERIES, SOP, "19700101"] {
                assert!(!e.contains(original), "{e}");
            }
        }
        // After the vault is shredded, nothing can be re-identified.
        vault.shred(AGR).unwrap();
        let e = restore(&mut result(&t, "20240101"), &cx)
            .unwrap_err()
            .to_string();
        assert!(e.contains("shredded"), "{e}");
    }

    proptest! {
        #[test]
        fn no_error_names_an_original(patient in "[ -~]{0,40}", study in "[0-9.]{1,64}") {
            let dir = tempfile::tempdir().unwrap();
            let (vault, tok, t) = sent(dir.path());
            let cx = RestoreContext { agreement: AGR, vault: &vault, tokenizer: &tok, shift_dates: true };
            let mut obj = result(&t, "20240101");
            obj.put(el(tags::PATIENT_ID, VR::LO, &patient));
            obj.put(el(tags::STUDY_INSTANCE_UID, VR::UI, &study));
            if let Err(e) = restore(&mut obj, &cx) {
                let e = e.to_string();
                for original in [MRN, NAME, STUDY, SERIES, SOP, "19700101"] {
                    prop_assert!(!e.contains(original), "{}", e);
                }
            }
        }
    }
}
