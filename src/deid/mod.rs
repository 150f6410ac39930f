//! De-identification of DICOM objects.
//!
//! Owns: the de-identification configuration a flow asks for ([`DeidConfig`]: PS3.15 profile
//! options, per-attribute overrides, safe private attributes, pixel cleaning), and the engine
//! ([`Deidentifier`]) that turns one DICOM object into its de-identified form, reporting the
//! tokens it issued (for the origin's vault) and the changes it made.
//!
//! Does not own: the network, the agreement file (that is `dsa`, which builds a [`DeidConfig`]),
//! nor the keys (that is `pseudonym`, which provides the [`Tokenizer`]).
//!
//! This first profile covers the patient, study, accession, institution, physician identifiers and
//! the dates of PS3.15 Table E.1-1, and remaps every instance UID at every depth.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use dicom_core::header::Header;
use dicom_core::value::{DataSetSequence, Value};
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::mem::InMemDicomObject;
use dicom_object::DefaultDicomObject;

use crate::pseudonym::{Tokenizer, VaultEntry};

/// The option columns of PS3.15 Table E.1-1, plus Clean Pixel Data (PS3.15 E.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProfileOption {
    RetainSafePrivate,
    RetainUids,
    RetainDeviceIdentity,
    RetainInstitutionIdentity,
    RetainPatientCharacteristics,
    RetainLongitudinalFullDates,
    RetainLongitudinalModifiedDates,
    CleanDescriptors,
    CleanStructuredContent,
    CleanGraphics,
    CleanPixelData,
}

impl ProfileOption {
    /// Every option, in the standard's column order.
    pub const ALL: [ProfileOption; 11] = [
        ProfileOption::RetainSafePrivate,
        ProfileOption::RetainUids,
        ProfileOption::RetainDeviceIdentity,
        ProfileOption::RetainInstitutionIdentity,
        ProfileOption::RetainPatientCharacteristics,
        ProfileOption::RetainLongitudinalFullDates,
        ProfileOption::RetainLongitudinalModifiedDates,
        ProfileOption::CleanDescriptors,
        ProfileOption::CleanStructuredContent,
        ProfileOption::CleanGraphics,
        ProfileOption::CleanPixelData,
    ];

    /// The kebab-case name used in agreements and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            ProfileOption::RetainSafePrivate => "retain-safe-private",
            ProfileOption::RetainUids => "retain-uids",
            ProfileOption::RetainDeviceIdentity => "retain-device-identity",
            ProfileOption::RetainInstitutionIdentity => "retain-institution-identity",
            ProfileOption::RetainPatientCharacteristics => "retain-patient-characteristics",
            ProfileOption::RetainLongitudinalFullDates => "retain-longitudinal-full-dates",
            ProfileOption::RetainLongitudinalModifiedDates => "retain-longitudinal-modified-dates",
            ProfileOption::CleanDescriptors => "clean-descriptors",
            ProfileOption::CleanStructuredContent => "clean-structured-content",
            ProfileOption::CleanGraphics => "clean-graphics",
            ProfileOption::CleanPixelData => "clean-pixel-data",
        }
    }
}

impl fmt::Display for ProfileOption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ProfileOption {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ProfileOption::ALL
            .into_iter()
            .find(|o| o.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = ProfileOption::ALL.iter().map(|o| o.name()).collect();
                format!(
                    "unknown de-identification option {s:?}; known: {}",
                    names.join(", ")
                )
            })
    }
}

/// What an override does to one attribute, in place of the profile's action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OverrideAction {
    Keep,
    Remove,
    Token,
    Fixed(String),
}

/// A per-attribute override from the agreement, with the justification the privacy officer gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttributeOverride {
    pub tag: Tag,
    pub keyword: String,
    pub action: OverrideAction,
    pub justification: String,
}

/// A private attribute known to be safe: (private creator, element byte within the block).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafePrivate {
    pub group: u16,
    pub creator: String,
    pub element: u8,
}

/// A rectangle of pixels to blank (columns x, rows y, width, height), for the instances it matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PixelCleanRule {
    pub modality: Option<String>,
    pub manufacturer: Option<String>,
    pub model: Option<String>,
    pub rects: Vec<[u32; 4]>,
}

/// Everything a flow says about de-identification. The profile is always PS3.15 Basic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeidConfig {
    pub options: BTreeSet<ProfileOption>,
    pub overrides: Vec<AttributeOverride>,
    pub safe_private: Vec<SafePrivate>,
    pub pixel_clean: Vec<PixelCleanRule>,
}

/// Why an instance was not released.
#[derive(Debug, thiserror::Error)]
pub enum DeidError {
    /// Held back on purpose (burned-in text, residual PHI...). The reason names no PHI.
    #[error("quarantined: {reason}")]
    Quarantined { reason: String },
    /// The object cannot be de-identified (missing required attribute, unreadable value...).
    #[error("malformed: {reason}")]
    Malformed { reason: String },
}

/// One change made to an attribute, for previews and reports (no values, only the action).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub path: String,
    pub keyword: String,
    pub action: &'static str,
}

/// The result of de-identifying one instance.
#[derive(Debug)]
pub struct Deidentified {
    pub object: DefaultDicomObject,
    /// Token standing for the patient in this agreement.
    pub patient_token: String,
    /// De-identified Study / Series / SOP Instance UIDs.
    pub study_uid: String,
    pub series_uid: String,
    pub sop_instance_uid: String,
    /// (token, original) pairs for the origin's vault.
    pub vault_entries: Vec<(String, VaultEntry)>,
    pub changes: Vec<Change>,
}

/// The de-identification engine for one flow: a configuration and the agreement's tokenizer.
#[derive(Debug, Clone)]
pub struct Deidentifier {
    config: DeidConfig,
    tokenizer: Tokenizer,
}

/// Identifying attributes the first profile removes (X), at any depth.
#[allow(deprecated)]
const REMOVE: &[Tag] = &[
    tags::PATIENT_BIRTH_TIME,
    tags::OTHER_PATIENT_I_DS,
    tags::OTHER_PATIENT_NAMES,
    tags::OTHER_PATIENT_I_DS_SEQUENCE,
    tags::PATIENT_BIRTH_NAME,
    tags::PATIENT_MOTHER_BIRTH_NAME,
    tags::PATIENT_ADDRESS,
    tags::PATIENT_TELEPHONE_NUMBERS,
    tags::MILITARY_RANK,
    tags::MEDICAL_RECORD_LOCATOR,
    tags::INSTITUTION_NAME,
    tags::INSTITUTION_ADDRESS,
    tags::INSTITUTIONAL_DEPARTMENT_NAME,
    tags::INSTITUTION_CODE_SEQUENCE,
    tags::PERFORMING_PHYSICIAN_NAME,
    tags::NAME_OF_PHYSICIANS_READING_STUDY,
    tags::OPERATORS_NAME,
    tags::PHYSICIANS_OF_RECORD,
    tags::REQUESTING_PHYSICIAN,
    tags::STATION_NAME,
    tags::DEVICE_SERIAL_NUMBER,
    tags::PATIENT_COMMENTS,
    tags::ADDITIONAL_PATIENT_HISTORY,
    tags::OTHER_PATIENT_I_DS_SEQUENCE,
    tags::ISSUER_OF_PATIENT_ID,
    tags::ADMITTING_DIAGNOSES_DESCRIPTION,
];

/// Attributes replaced by an empty value (Z).
const EMPTY: &[Tag] = &[
    tags::PATIENT_BIRTH_DATE,
    tags::REFERRING_PHYSICIAN_NAME,
    tags::STUDY_ID,
];

/// UI attributes that name a class or a coding scheme, not an instance: never remapped.
const CLASS_UIDS: &[Tag] = &[
    tags::SOP_CLASS_UID,
    tags::REFERENCED_SOP_CLASS_UID,
    tags::MEDIA_STORAGE_SOP_CLASS_UID,
    tags::TRANSFER_SYNTAX_UID,
    tags::IMPLEMENTATION_CLASS_UID,
    tags::CODING_SCHEME_UID,
    tags::AFFECTED_SOP_CLASS_UID,
    tags::REQUESTED_SOP_CLASS_UID,
    tags::REFERENCED_SOP_CLASS_UID_IN_FILE,
    tags::REFERENCED_TRANSFER_SYNTAX_UID_IN_FILE,
    tags::CONTEXT_GROUP_EXTENSION_CREATOR_UID,
    tags::PRIVATE_INFORMATION_CREATOR_UID,
];

impl Deidentifier {
    pub fn new(config: DeidConfig, tokenizer: Tokenizer) -> Self {
        Deidentifier { config, tokenizer }
    }

    pub fn config(&self) -> &DeidConfig {
        &self.config
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// De-identifies one object. The input is consumed; pixel data is moved, never copied.
    pub fn deidentify(&self, mut obj: DefaultDicomObject) -> Result<Deidentified, DeidError> {
        let text = |o: &InMemDicomObject, tag: Tag| -> Option<String> {
            o.get(tag)
                .and_then(|e| e.to_str().ok())
                .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
        };
        for (tag, name) in [
            (tags::STUDY_INSTANCE_UID, "StudyInstanceUID"),
            (tags::SERIES_INSTANCE_UID, "SeriesInstanceUID"),
            (tags::SOP_INSTANCE_UID, "SOPInstanceUID"),
        ] {
            if text(&obj, tag).filter(|s| !s.is_empty()).is_none() {
                return Err(DeidError::Malformed {
                    reason: format!("missing {name}"),
                });
            }
        }
        if text(&obj, tags::BURNED_IN_ANNOTATION).as_deref() == Some("YES")
            && !self.config.options.contains(&ProfileOption::CleanPixelData)
        {
            return Err(DeidError::Quarantined {
                reason: "BurnedInAnnotation is YES and the flow does not clean pixel data".into(),
            });
        }
        let patient_id = text(&obj, tags::PATIENT_ID).unwrap_or_default();
        let patient_key = if patient_id.is_empty() {
            text(&obj, tags::PATIENT_NAME).unwrap_or_default()
        } else {
            patient_id.clone()
        };
        let patient_token = self.tokenizer.token("PatientID", &patient_key);
        let mut work = Work {
            tok: &self.tokenizer,
            config: &self.config,
            offset: self.tokenizer.date_offset_days(&patient_key),
            vault: Vec::new(),
            changes: Vec::new(),
            patient_token: patient_token.clone(),
        };
        if !patient_key.is_empty() {
            work.vault.push((
                patient_token.clone(),
                VaultEntry {
                    attribute: "PatientID".into(),
                    original: patient_key.clone(),
                },
            ));
        }
        work.dataset(&mut obj, "");

        obj.put(DataElement::new(
            tags::PATIENT_IDENTITY_REMOVED,
            VR::CS,
            "YES",
        ));
        obj.put(DataElement::new(
            tags::DEIDENTIFICATION_METHOD,
            VR::LO,
            "pacs-broker PS3.15 Basic Profile (first profile)",
        ));
        obj.put(DataElement::new(
            tags::LONGITUDINAL_TEMPORAL_INFORMATION_MODIFIED,
            VR::CS,
            "MODIFIED",
        ));
        let sop = text(&obj, tags::SOP_INSTANCE_UID).unwrap_or_default();
        let meta = obj.meta_mut();
        meta.media_storage_sop_instance_uid = sop.clone();
        meta.source_application_entity_title = None;
        meta.sending_application_entity_title = None;
        meta.receiving_application_entity_title = None;
        meta.private_information = None;
        meta.private_information_creator_uid = None;
        meta.update_information_group_length();
        Ok(Deidentified {
            study_uid: text(&obj, tags::STUDY_INSTANCE_UID).unwrap_or_default(),
            series_uid: text(&obj, tags::SERIES_INSTANCE_UID).unwrap_or_default(),
            sop_instance_uid: sop,
            object: obj,
            patient_token,
            vault_entries: work.vault,
            changes: work.changes,
        })
    }
}

struct Work<'a> {
    tok: &'a Tokenizer,
    config: &'a DeidConfig,
    offset: i64,
    vault: Vec<(String, VaultEntry)>,
    changes: Vec<Change>,
    patient_token: String,
}

impl Work<'_> {
    fn change(&mut self, path: &str, tag: Tag, action: &'static str) {
        self.changes.push(Change {
            path: format!("{path}{tag}"),
            keyword: dicom_dictionary_std::StandardDataDictionary
                .by_tag_keyword(tag)
                .unwrap_or("")
                .to_string(),
            action,
        });
    }

    fn dataset(&mut self, obj: &mut InMemDicomObject, path: &str) {
        let all: Vec<Tag> = obj.tags().collect();
        for tag in all {
            let Some(elem) = obj.take(tag) else { continue };
            if let Some(elem) = self.element(elem, path) {
                obj.put(elem);
            }
        }
    }

    fn element(
        &mut self,
        elem: DataElement<InMemDicomObject>,
        path: &str,
    ) -> Option<DataElement<InMemDicomObject>> {
        let tag = elem.tag();
        let vr = elem.vr();
        if let Some(ov) = self.config.overrides.iter().find(|o| o.tag == tag) {
            return match &ov.action {
                OverrideAction::Keep => Some(elem),
                OverrideAction::Remove => {
                    self.change(path, tag, "X (override)");
                    None
                }
                OverrideAction::Fixed(v) => {
                    self.change(path, tag, "fixed (override)");
                    Some(DataElement::new(tag, vr, PrimitiveValue::from(v.as_str())))
                }
                OverrideAction::Token => {
                    self.change(path, tag, "token (override)");
                    let orig = elem
                        .to_str()
                        .map(|s| s.trim().to_string())
                        .unwrap_or_default();
                    Some(self.tokenise(tag, vr, &orig))
                }
            };
        }
        if tag.group() % 2 == 1 {
            self.change(path, tag, "X (private)");
            return None;
        }
        if REMOVE.contains(&tag) || tag.group() & 0xFF00 == 0x5000 || tag == Tag(0x4008, 0x0300) {
            self.change(path, tag, "X");
            return None;
        }
        if EMPTY.contains(&tag) {
            self.change(path, tag, "Z");
            return Some(DataElement::empty(tag, vr));
        }
        match tag {
            tags::PATIENT_NAME | tags::PATIENT_ID => {
                self.change(path, tag, "D (token)");
                return Some(DataElement::new(
                    tag,
                    vr,
                    PrimitiveValue::from(self.patient_token.as_str()),
                ));
            }
            tags::ACCESSION_NUMBER => {
                let orig = elem
                    .to_str()
                    .map(|s| s.trim().to_string())
                    .unwrap_or_default();
                self.change(path, tag, "D (token)");
                if orig.is_empty() {
                    return Some(DataElement::empty(tag, vr));
                }
                return Some(self.tokenise(tag, vr, &orig));
            }
            _ => {}
        }
        match elem.value() {
            Value::Sequence(_) => {
                let (header, value) = elem.into_parts();
                let mut items = value.into_items().expect("sequence value");
                for (i, item) in items.iter_mut().enumerate() {
                    self.dataset(item, &format!("{path}{tag}[{i}]/"));
                }
                Some(DataElement::new(
                    tag,
                    header.vr(),
                    DataSetSequence::new(items, header.len),
                ))
            }
            Value::Primitive(_) if vr == VR::UI && !CLASS_UIDS.contains(&tag) => {
                let Ok(values) = elem.to_multi_str() else {
                    return Some(elem);
                };
                let mapped: Vec<String> = values
                    .iter()
                    .map(|u| u.trim_end_matches(['\0', ' ']))
                    .map(|u| {
                        if u.is_empty() || u.starts_with("1.2.840.10008.") {
                            u.to_string()
                        } else {
                            self.tok.uid(u)
                        }
                    })
                    .collect();
                self.change(path, tag, "U");
                Some(DataElement::new(
                    tag,
                    VR::UI,
                    PrimitiveValue::Strs(mapped.into()),
                ))
            }
            Value::Primitive(_) if vr == VR::DA => {
                let shifted = elem
                    .to_multi_str()
                    .ok()
                    .map(|v| {
                        v.iter()
                            .map(|d| shift_date(d.trim(), self.offset))
                            .collect::<Option<Vec<_>>>()
                    })
                    .unwrap_or(None);
                match shifted {
                    Some(v) => {
                        self.change(path, tag, "C (date shifted)");
                        Some(DataElement::new(
                            tag,
                            VR::DA,
                            PrimitiveValue::Strs(v.into()),
                        ))
                    }
                    None => {
                        self.change(path, tag, "X (unreadable date)");
                        None
                    }
                }
            }
            Value::Primitive(_) if vr == VR::DT => {
                self.change(path, tag, "X");
                None
            }
            _ => Some(elem),
        }
    }

    fn tokenise(&mut self, tag: Tag, vr: VR, orig: &str) -> DataElement<InMemDicomObject> {
        let keyword = dicom_dictionary_std::StandardDataDictionary
            .by_tag_keyword(tag)
            .unwrap_or("attribute")
            .to_string();
        let token = self.tok.token(&keyword, orig);
        if !orig.is_empty() {
            self.vault.push((
                token.clone(),
                VaultEntry {
                    attribute: keyword,
                    original: orig.to_string(),
                },
            ));
        }
        DataElement::new(tag, vr, PrimitiveValue::from(token.as_str()))
    }
}

trait KeywordOf {
    fn by_tag_keyword(&self, tag: Tag) -> Option<&'static str>;
}

impl KeywordOf for dicom_dictionary_std::StandardDataDictionary {
    fn by_tag_keyword(&self, tag: Tag) -> Option<&'static str> {
        use dicom_core::dictionary::DataDictionary;
        self.by_tag(tag).map(|e| e.alias)
    }
}

/// Shifts a DICOM DA value (YYYYMMDD) by `days`; `None` when it is not a full date.
pub fn shift_date(da: &str, days: i64) -> Option<String> {
    if da.is_empty() {
        return Some(String::new());
    }
    if da.len() != 8 || !da.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let y: i32 = da[..4].parse().ok()?;
    let m: u8 = da[4..6].parse().ok()?;
    let d: u8 = da[6..8].parse().ok()?;
    let date = time::Date::from_calendar_date(y, time::Month::try_from(m).ok()?, d).ok()?;
    let shifted = date.checked_add(time::Duration::days(days))?;
    Some(format!(
        "{:04}{:02}{:02}",
        shifted.year(),
        u8::from(shifted.month()),
        shifted.day()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn date_shift_keeps_intervals() {
        assert_eq!(shift_date("20240301", -1).as_deref(), Some("20240229"));
        assert_eq!(shift_date("2024", -1), None);
        assert_eq!(shift_date("", -5).as_deref(), Some(""));
    }

    #[test]
    fn option_names_round_trip() {
        for o in ProfileOption::ALL {
            assert_eq!(o.name().parse::<ProfileOption>().unwrap(), o);
        }
        assert!("retain-everything".parse::<ProfileOption>().is_err());
    }
}
