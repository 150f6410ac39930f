//! De-identification of DICOM objects: DICOM PS3.15 Annex E, the Basic Application Level
//! Confidentiality Profile and every option of Table E.1-1.
//!
//! Owns: the de-identification configuration a flow asks for ([`DeidConfig`]: PS3.15 profile
//! options, per-attribute overrides, safe private attributes, pixel cleaning), the standard's
//! table compiled in ([`table`], generated from `standard/ps315_table_e1_1.csv`), the engine
//! ([`Deidentifier`]) that turns one DICOM object into its de-identified form at every nesting
//! depth, the burned-in text gate and pixel cleaning ([`pixels`]), the fail-closed checks
//! ([`verify`]: residual-PHI verifier at the origin, [`check_release`] at the receiver), the
//! recognizable-visual-features gate ([`visual`]), the guarded reader every input goes through
//! ([`guard`], with [`transcode`] for CP-246 sequences), and the batch runner shared by the
//! `deid` command and the send path ([`batch`]).
//!
//! Does not own: the network, the agreement file (that is `dsa`, which builds a [`DeidConfig`]),
//! nor the keys (that is `pseudonym`, which provides the [`Tokenizer`]).
//!
//! Behaviour in brief (details beside each piece):
//! - every element, at every depth, gets the action of its Table E.1-1 row under the flow's
//!   options (K from an option wins over C; composites: X/Z -> Z, X/D -> X, Z/D and X/Z/D -> Z,
//!   each -> D for the few attributes that are Type 1 in some IOD, X/Z/U* -> keep the sequence and
//!   replace the UIDs inside); attributes outside the table get the documented defaults of [`policy`];
//! - UIDs become `2.25.<HMAC>` wherever they appear, so references stay consistent;
//! - Patient ID and Name carry the agreement's per-patient token; dates shift by one offset per
//!   patient and agreement with Retain Longitudinal Modified Dates;
//! - PatientIdentityRemoved, DeidentificationMethod(CodeSequence) and
//!   LongitudinalTemporalInformationModified are written;
//! - the output is refused (quarantined) if it still holds any identifying value of the original
//!   or fails the receiver's release check; quarantine reasons never contain PHI.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use std::collections::HashSet;

use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, Length, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::mem::InMemDicomObject;
use dicom_object::DefaultDicomObject;

use crate::pseudonym::{Tokenizer, VaultEntry};

pub mod batch;
mod engine;
pub mod guard;
pub mod ocr;
pub mod pixels;
pub mod policy;
pub mod table;
pub mod transcode;
#[rustfmt::skip]
mod table_e1_1;
pub mod values;
pub mod verify;
pub mod visual;

pub use batch::{run_batch, BatchItem, BatchOutcome, BatchSummary};
pub use ocr::{BurnedInTextMode, OcrEngine, OcrEvidence};
pub use table::Action;
pub use values::shift_date;
pub use verify::{check_release, check_release_file, find_residual_phi, Finding, PhiTerms};

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
    /// The patient is named by a trial subject ID from the origin's mapping (a trial flow), not
    /// by a keyed token: Patient ID and Patient Name then hold that subject ID.
    pub subject_ids: bool,
    /// What happens to images at risk of burned-in text: held back (the default), or cleaned
    /// with OCR (`burned_in_text = "clean-pixel-data"`, see [`ocr`]).
    pub burned_in_text: BurnedInTextMode,
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

impl DeidError {
    /// The reason, without the kind.
    pub fn reason(&self) -> &str {
        match self {
            DeidError::Quarantined { reason } | DeidError::Malformed { reason } => reason,
        }
    }
}

/// One change made to an attribute: where, what, and the rule that caused it. `before`/`after`
/// are filled only by [`Deidentifier::preview`] (values are PHI: never log them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub path: String,
    pub keyword: String,
    pub action: &'static str,
    /// The Table E.1-1 row and column, override or default that chose the action.
    pub rule: String,
    pub before: Option<String>,
    pub after: Option<String>,
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
    /// Pixel data left in the input file (see [`guard::read_guarded_split`]): `object` then
    /// holds an empty placeholder, and writing the output copies these bytes in its place
    /// ([`batch::encode_output`]).
    pub pixel_data: Option<guard::PixelSource>,
    /// What OCR found and blacked out, when the flow's burned-in text mode is
    /// `clean-pixel-data` and the image was at risk (for the audit entry; no text in it).
    pub ocr_evidence: Option<OcrEvidence>,
}

/// What a privacy officer reads before signing: every change with its values and rule, and
/// whether the instance would be released.
#[derive(Debug)]
pub struct Preview {
    pub changes: Vec<Change>,
    /// `Ok` when the instance would be released, else the quarantine or failure.
    pub verdict: Result<(), DeidError>,
}

/// The de-identification engine for one flow: a configuration and the agreement's tokenizer.
#[derive(Debug, Clone)]
pub struct Deidentifier {
    config: DeidConfig,
    tokenizer: Tokenizer,
    /// Trial flows: site Patient ID -> trial subject ID, used instead of the token.
    subject_ids: Option<std::sync::Arc<std::collections::BTreeMap<String, String>>>,
    /// The OCR engine of the `clean-pixel-data` burned-in text mode.
    ocr: OcrEngine,
}

/// The CID 7050 code of the Basic Profile and of each option (DCM coding scheme).
fn cid7050(option: Option<ProfileOption>) -> (&'static str, &'static str) {
    match option {
        None => ("113100", "Basic Application Confidentiality Profile"),
        Some(ProfileOption::CleanPixelData) => ("113101", "Clean Pixel Data Option"),
        Some(ProfileOption::CleanGraphics) => ("113103", "Clean Graphics Option"),
        Some(ProfileOption::CleanStructuredContent) => {
            ("113104", "Clean Structured Content Option")
        }
        Some(ProfileOption::CleanDescriptors) => ("113105", "Clean Descriptors Option"),
        Some(ProfileOption::RetainLongitudinalFullDates) => (
            "113106",
            "Retain Longitudinal Temporal Information Full Dates Option",
        ),
        Some(ProfileOption::RetainLongitudinalModifiedDates) => (
            "113107",
            "Retain Longitudinal Temporal Information Modified Dates Option",
        ),
        Some(ProfileOption::RetainPatientCharacteristics) => {
            ("113108", "Retain Patient Characteristics Option")
        }
        Some(ProfileOption::RetainDeviceIdentity) => ("113109", "Retain Device Identity Option"),
        Some(ProfileOption::RetainUids) => ("113110", "Retain UIDs Option"),
        Some(ProfileOption::RetainSafePrivate) => ("113111", "Retain Safe Private Option"),
        Some(ProfileOption::RetainInstitutionIdentity) => {
            ("113112", "Retain Institution Identity Option")
        }
    }
}

/// The vault key under which the origin keeps one more detail of the patient behind
/// `patient_token` (`PatientName`, `PatientBirthDate`): the token, a slash, the attribute.
pub fn patient_detail_token(patient_token: &str, attribute: &str) -> String {
    format!("{patient_token}/{attribute}")
}

/// The keyword of a tag in the standard dictionary ("" for private or unknown tags).
pub fn keyword_of(tag: Tag) -> &'static str {
    use dicom_core::dictionary::DataDictionary;
    dicom_dictionary_std::StandardDataDictionary
        .by_tag(tag)
        .map(|e| e.alias)
        .unwrap_or("")
}

fn text(o: &InMemDicomObject, tag: Tag) -> Option<String> {
    o.get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_matches(['\0', ' ']).to_string())
}

impl DeidConfig {
    /// Problems with the configuration itself (for the agreement linter).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self
            .options
            .contains(&ProfileOption::RetainLongitudinalFullDates)
            && self
                .options
                .contains(&ProfileOption::RetainLongitudinalModifiedDates)
        {
            out.push("retain-longitudinal-full-dates and retain-longitudinal-modified-dates are exclusive; full dates win".into());
        }
        if !self.safe_private.is_empty()
            && !self.options.contains(&ProfileOption::RetainSafePrivate)
        {
            out.push("a safe private list is given but retain-safe-private is not enabled; private attributes are removed".into());
        }
        if self.options.contains(&ProfileOption::CleanPixelData)
            && self.pixel_clean.is_empty()
            && self.burned_in_text == BurnedInTextMode::Quarantine
        {
            out.push("clean-pixel-data without any pixel clean rule: images with burned-in text stay quarantined".into());
        }
        out
    }
}

impl Deidentifier {
    pub fn new(config: DeidConfig, tokenizer: Tokenizer) -> Self {
        Deidentifier {
            config,
            tokenizer,
            subject_ids: None,
            ocr: OcrEngine::from_env(),
        }
    }

    /// Uses this OCR engine for the `clean-pixel-data` burned-in text mode (by default, the
    /// Tesseract named by `PACS_BROKER_TESSERACT`, else `tesseract` on the `PATH`).
    pub fn with_ocr_engine(mut self, engine: OcrEngine) -> Self {
        self.ocr = engine;
        self
    }

    /// For a trial flow: the patient becomes the trial subject ID of this mapping (site Patient
    /// ID -> subject ID) instead of a keyed token; a patient not in it is not enrolled, and is
    /// quarantined rather than sent.
    pub fn with_subject_ids(mut self, map: std::collections::BTreeMap<String, String>) -> Self {
        self.config.subject_ids = true;
        self.subject_ids = Some(std::sync::Arc::new(map));
        self
    }

    pub fn config(&self) -> &DeidConfig {
        &self.config
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// De-identifies one object. The input is consumed; pixel data is moved, never copied, and is
    /// byte-identical in the output unless Clean Pixel Data blanked part of it.
    pub fn deidentify(&self, obj: DefaultDicomObject) -> Result<Deidentified, DeidError> {
        self.run(obj, false)
            .and_then(|(d, verdict)| verdict.map(|()| d))
    }

    /// For a privacy officer's release from quarantine: the de-identified object and the verdict
    /// on it, so that an officer's explicit override can release what the verifier refuses (the
    /// caller records the decision). Only an object that cannot be transformed is an error.
    pub fn deidentify_for_review(
        &self,
        obj: DefaultDicomObject,
    ) -> Result<(Deidentified, Result<(), DeidError>), DeidError> {
        self.run(obj, false)
    }

    /// True when de-identifying `obj` needs its pixel values (Clean Pixel Data on an image
    /// at risk of burned-in text); otherwise the pixel data passes through untouched.
    pub fn needs_pixel_values(&self, obj: &InMemDicomObject) -> bool {
        (self.config.options.contains(&ProfileOption::CleanPixelData)
            || self.config.burned_in_text == BurnedInTextMode::CleanPixelData)
            && pixels::burned_in_risk(obj).is_some()
    }

    /// Every change the flow would make to `obj`, with before/after values, and the verdict.
    pub fn preview(&self, obj: DefaultDicomObject) -> Result<Preview, DeidError> {
        let (d, verdict) = self.run(obj, true)?;
        Ok(Preview {
            changes: d.changes,
            verdict,
        })
    }

    /// Transforms, then judges. The outer error is for objects that could not be transformed at
    /// all; the inner verdict is the release decision on the transformed object.
    fn run(
        &self,
        mut obj: DefaultDicomObject,
        record_values: bool,
    ) -> Result<(Deidentified, Result<(), DeidError>), DeidError> {
        if let Some(reason) = not_a_storage_object(&obj) {
            return Err(DeidError::Quarantined { reason });
        }
        if text(&obj, tags::SOP_CLASS_UID).is_none_or(|c| c.is_empty()) {
            return Err(DeidError::Malformed {
                reason: "not a storage object: the data set has no SOP Class UID (0008,0016)"
                    .into(),
            });
        }
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
        // A face is held back whatever could be done about text (PS3.15 E.3.2): no OCR for it.
        let (gate, pixels_cleaned, ocr_evidence) = match visual::gate(&obj, &self.config) {
            Some(reason) => (Err(DeidError::Quarantined { reason }), false, None),
            None => self.burned_in_gate(&mut obj)?,
        };
        let little_endian =
            obj.meta().transfer_syntax().trim_end_matches('\0') != "1.2.840.10008.1.2.2";
        engine::normalise_un(&mut obj, little_endian);
        let terms = PhiTerms::collect(&obj, &self.config);
        let patient_id = text(&obj, tags::PATIENT_ID).unwrap_or_default();
        let patient_key = if patient_id.is_empty() {
            text(&obj, tags::PATIENT_NAME).unwrap_or_default()
        } else {
            patient_id
        };
        let patient_token = match &self.subject_ids {
            None => self.tokenizer.token("PatientID", &patient_key),
            Some(map) => match map.get(patient_key.trim()) {
                Some(subject) => subject.clone(),
                None => {
                    return Err(DeidError::Quarantined {
                        reason: "the patient is not enrolled in this trial (no subject ID in the flow's mapping)".into(),
                    })
                }
            },
        };
        let mut work = engine::Work {
            tok: &self.tokenizer,
            config: &self.config,
            offset: self.tokenizer.date_offset_days(&patient_key),
            patient_token: patient_token.clone(),
            scrub_terms: terms.words(),
            vault: Vec::new(),
            vault_seen: HashSet::new(),
            changes: Vec::new(),
            record_values,
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
        // The patient's name and birth date, under keys derived from the patient token, so that
        // a result returned on this study can be filed under the patient again (the return
        // path, `results::restore`); only the origin's vault holds them.
        for (tag, attribute) in [
            (tags::PATIENT_NAME, "PatientName"),
            (tags::PATIENT_BIRTH_DATE, "PatientBirthDate"),
        ] {
            if let Some(original) = text(&obj, tag).filter(|v| !v.is_empty()) {
                work.vault.push((
                    patient_detail_token(&patient_token, attribute),
                    VaultEntry {
                        attribute: attribute.into(),
                        original,
                    },
                ));
            }
        }
        // Study, series and instance UIDs (and the frame of reference, which segmentations and
        // registrations refer to) are recorded so that references in a returned result can be
        // mapped back to the originals.
        let originals: Vec<(Tag, Option<String>)> = [
            tags::STUDY_INSTANCE_UID,
            tags::SERIES_INSTANCE_UID,
            tags::SOP_INSTANCE_UID,
            tags::FRAME_OF_REFERENCE_UID,
        ]
        .into_iter()
        .map(|t| (t, text(&obj, t)))
        .collect();
        work.dataset(&mut obj, "");
        for (tag, original) in originals {
            if let (Some(original), Some(new)) = (original, text(&obj, tag)) {
                if original != new {
                    work.vault.push((
                        new,
                        VaultEntry {
                            attribute: keyword_of(tag).into(),
                            original,
                        },
                    ));
                }
            }
        }
        self.write_record(&mut obj, pixels_cleaned);
        let sop = text(&obj, tags::SOP_INSTANCE_UID).unwrap_or_default();
        let meta = obj.meta_mut();
        meta.media_storage_sop_instance_uid = sop.clone();
        meta.source_application_entity_title = None;
        meta.sending_application_entity_title = None;
        meta.receiving_application_entity_title = None;
        meta.private_information = None;
        meta.private_information_creator_uid = None;
        meta.update_information_group_length();
        pack_native_pixel_data(&mut obj);
        if obj.meta().transfer_syntax().trim_end_matches(['\0', ' ']) != "1.2.840.10008.1.2" {
            engine::fit_16bit_lengths(&mut obj, little_endian);
        }

        let verdict = gate.and_then(|()| {
            let findings = find_residual_phi(&obj, &terms);
            if findings.is_empty() {
                Ok(())
            } else {
                Err(DeidError::Quarantined {
                    reason: verify::findings_reason(&findings),
                })
            }
        });
        let verdict = verdict.and_then(|()| {
            check_release_file(&obj, &self.config).map_err(|e| DeidError::Quarantined {
                reason: format!("output failed the release check: {}", e.reason()),
            })
        });
        Ok((
            Deidentified {
                study_uid: text(&obj, tags::STUDY_INSTANCE_UID).unwrap_or_default(),
                series_uid: text(&obj, tags::SERIES_INSTANCE_UID).unwrap_or_default(),
                sop_instance_uid: sop,
                object: obj,
                patient_token,
                vault_entries: work.vault,
                changes: work.changes,
                pixel_data: None,
                ocr_evidence,
            },
            verdict,
        ))
    }

    /// The burned-in text gate: `(verdict so far, pixels cleaned, OCR evidence)`. Images not at
    /// risk pass; the others are cleaned by the flow's masks (Clean Pixel Data option) and/or by
    /// OCR (`clean-pixel-data` mode), or held back. Only a malformed image is an outer error.
    #[allow(clippy::type_complexity)]
    fn burned_in_gate(
        &self,
        obj: &mut DefaultDicomObject,
    ) -> Result<(Result<(), DeidError>, bool, Option<OcrEvidence>), DeidError> {
        let Some(risk) = pixels::burned_in_risk(obj) else {
            return Ok((Ok(()), false, None));
        };
        let masks = self.config.options.contains(&ProfileOption::CleanPixelData);
        let by_ocr = self.config.burned_in_text == BurnedInTextMode::CleanPixelData;
        if !masks && !by_ocr {
            let reason = format!("{risk}, and the flow does not enable clean-pixel-data");
            return Ok((Err(DeidError::Quarantined { reason }), false, None));
        }
        let declared = text(obj, tags::BURNED_IN_ANNOTATION).as_deref() == Some("YES");
        let mut cleaned = false;
        if masks && (!by_ocr || pixels::has_matching_rule(&self.config.pixel_clean, obj)) {
            match pixels::clean_pixels(obj, &self.config.pixel_clean, &risk) {
                Ok(_) => cleaned = true,
                Err(e @ DeidError::Malformed { .. }) => return Err(e),
                Err(e) => return Ok((Err(e), false, None)),
            }
        }
        if !by_ocr {
            return Ok((Ok(()), cleaned, None));
        }
        match ocr::clean_burned_in_text(obj, &self.ocr, &risk, declared && !cleaned) {
            Ok(evidence) => Ok((Ok(()), true, Some(evidence))),
            Err(e @ DeidError::Malformed { .. }) => Err(e),
            Err(e) => Ok((Err(e), false, None)),
        }
    }

    /// PatientIdentityRemoved, DeidentificationMethod, its CID 7050 code sequence and
    /// LongitudinalTemporalInformationModified (PS3.15 E.1.1 and E.3.6).
    fn write_record(&self, obj: &mut InMemDicomObject, pixels_cleaned: bool) {
        // Clean Pixel Data is claimed only when pixels were actually cleaned (by masks or OCR).
        let applied: Vec<ProfileOption> = ProfileOption::ALL
            .into_iter()
            .filter(|o| match o {
                ProfileOption::CleanPixelData => pixels_cleaned,
                _ => self.config.options.contains(o),
            })
            .collect();
        obj.put(DataElement::new(
            tags::PATIENT_IDENTITY_REMOVED,
            VR::CS,
            "YES",
        ));
        let mut methods = vec!["pacs-broker PS3.15 E.1-1 (2024b) Basic Profile".to_string()];
        methods.extend(applied.iter().map(|o| o.name().to_string()));
        if !self.config.overrides.is_empty() {
            methods.push(format!(
                "{} agreement override(s)",
                self.config.overrides.len()
            ));
        }
        obj.put(DataElement::new(
            tags::DEIDENTIFICATION_METHOD,
            VR::LO,
            PrimitiveValue::Strs(methods.into()),
        ));
        let items: Vec<InMemDicomObject> = std::iter::once(None)
            .chain(applied.iter().copied().map(Some))
            .map(|o| {
                let (code, meaning) = cid7050(o);
                InMemDicomObject::from_element_iter([
                    DataElement::new(tags::CODE_VALUE, VR::SH, code),
                    DataElement::new(tags::CODING_SCHEME_DESIGNATOR, VR::SH, "DCM"),
                    DataElement::new(tags::CODE_MEANING, VR::LO, meaning),
                ])
            })
            .collect();
        obj.put(DataElement::new(
            tags::DEIDENTIFICATION_METHOD_CODE_SEQUENCE,
            VR::SQ,
            DataSetSequence::new(items, Length::UNDEFINED),
        ));
        let longitudinal = if self
            .config
            .options
            .contains(&ProfileOption::RetainLongitudinalFullDates)
        {
            "UNMODIFIED"
        } else if self
            .config
            .options
            .contains(&ProfileOption::RetainLongitudinalModifiedDates)
        {
            "MODIFIED"
        } else {
            "REMOVED"
        };
        obj.put(DataElement::new(
            tags::LONGITUDINAL_TEMPORAL_INFORMATION_MODIFIED,
            VR::CS,
            longitudinal,
        ));
    }
}

/// Media Storage Directory Storage: a DICOMDIR.
const MEDIA_STORAGE_DIRECTORY: &str = "1.2.840.10008.1.3.10";

/// Why `obj` is not an object to share at all, or `None`. A DICOMDIR (media directory) lists
/// the patients, studies and files of a medium, names and IDs included: it is never sent as it
/// is (the receiver indexes what it receives itself).
fn not_a_storage_object(obj: &DefaultDicomObject) -> Option<String> {
    let class = text(obj, tags::SOP_CLASS_UID)
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| {
            obj.meta()
                .media_storage_sop_class_uid()
                .trim_end_matches(['\0', ' '])
                .to_string()
        });
    if class == MEDIA_STORAGE_DIRECTORY || obj.get(tags::DIRECTORY_RECORD_SEQUENCE).is_some() {
        return Some(
            "not a storage object: a DICOMDIR (media directory, which lists patient names and IDs) is never sent; the receiver indexes the instances it gets".into(),
        );
    }
    None
}

/// Holds native 16-bit pixel data as its little-endian bytes when the transfer syntax is little
/// endian. The values (and so the bytes written) are unchanged; the encoder then writes the pixel
/// data as one block instead of value by value, which is most of the cost of writing an image.
fn pack_native_pixel_data(obj: &mut DefaultDicomObject) {
    const LITTLE_ENDIAN: [&str; 2] = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"];
    let ts = obj.meta().transfer_syntax().trim_end_matches(['\0', ' ']);
    if !LITTLE_ENDIAN.contains(&ts) {
        return;
    }
    let Some(elem) = obj.get(tags::PIXEL_DATA) else {
        return;
    };
    let Some(PrimitiveValue::U16(words)) = elem.value().primitive() else {
        return;
    };
    let mut bytes = vec![0u8; words.len() * 2];
    for (out, w) in bytes.chunks_exact_mut(2).zip(words.iter()) {
        out.copy_from_slice(&w.to_le_bytes());
    }
    let vr = elem.vr();
    obj.put(DataElement::new(
        tags::PIXEL_DATA,
        vr,
        PrimitiveValue::U8(bytes.into()),
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_names_round_trip() {
        for o in ProfileOption::ALL {
            assert_eq!(o.name().parse::<ProfileOption>().unwrap(), o);
        }
        assert!("retain-everything".parse::<ProfileOption>().is_err());
    }

    #[test]
    fn every_option_has_its_own_cid7050_code() {
        let mut codes: Vec<_> = ProfileOption::ALL
            .iter()
            .map(|o| cid7050(Some(*o)).0)
            .collect();
        codes.push(cid7050(None).0);
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), ProfileOption::ALL.len() + 1);
    }
}
