//! What the PS3.15 Basic Application Level Confidentiality Profile does to the identifiers a
//! privacy officer asks about, grouped in plain-language categories, and which profile option
//! changes that. `explain`, `diff` and the lints read this table; the de-identification engine
//! (`deid`) implements the actions.

use crate::deid::{DeidConfig, OverrideAction, ProfileOption};

/// The form in which a category of identifiers leaves the origin.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Form {
    Removed,
    /// Replaced by consistent pseudonymous UIDs (`2.25.…`).
    Remapped,
    /// Replaced by a keyed token (same patient, same agreement -> same token).
    Token,
    /// Replaced by the trial subject ID from the origin's mapping.
    SubjectId,
    /// Shifted by a per-patient offset; intervals between dates survive.
    Shifted,
    /// Free text cleaned of identifying information.
    Cleaned,
    /// Replaced by a fixed value written in the agreement.
    Fixed(String),
    /// Sent unchanged.
    Kept,
}

impl Form {
    /// How much a form discloses, for comparisons (higher discloses more).
    pub fn disclosure(&self) -> u8 {
        match self {
            Form::Removed | Form::Fixed(_) => 0,
            Form::Remapped | Form::Token | Form::SubjectId => 1,
            Form::Shifted | Form::Cleaned => 2,
            Form::Kept => 3,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Form::Removed => "removed".into(),
            Form::Remapped => "replaced by pseudonymous UIDs".into(),
            Form::Token => "replaced by a keyed token".into(),
            Form::SubjectId => "replaced by the trial subject ID".into(),
            Form::Shifted => "shifted by a per-patient offset (intervals kept)".into(),
            Form::Cleaned => "cleaned of identifying text".into(),
            Form::Fixed(v) => format!("replaced by the fixed value {v:?}"),
            Form::Kept => "KEPT unchanged".into(),
        }
    }
}

/// A plain-language category of identifiers.
#[derive(Debug)]
pub struct Category {
    pub name: &'static str,
    pub keywords: &'static [&'static str],
    /// Direct identifiers of the patient: keeping one is warned about.
    pub direct: bool,
    /// The option that keeps (or cleans instead of removing) this category, if any.
    pub option: Option<ProfileOption>,
}

pub const CATEGORIES: &[Category] = &[
    Category {
        name: "patient name and patient ID",
        keywords: &["PatientName", "PatientID"],
        direct: true,
        option: None,
    },
    Category {
        name: "birth date",
        keywords: &["PatientBirthDate", "PatientBirthTime"],
        direct: true,
        option: None,
    },
    Category {
        name: "other patient identifiers, address and telephone",
        keywords: &[
            "OtherPatientIDs",
            "OtherPatientIDsSequence",
            "OtherPatientNames",
            "PatientAddress",
            "PatientTelephoneNumbers",
            "PatientBirthName",
            "PatientMotherBirthName",
            "MedicalRecordLocator",
            "IssuerOfPatientID",
        ],
        direct: true,
        option: None,
    },
    Category {
        name: "accession number",
        keywords: &["AccessionNumber"],
        direct: true,
        option: None,
    },
    Category {
        name: "study and acquisition dates and times",
        keywords: &[
            "StudyDate",
            "SeriesDate",
            "AcquisitionDate",
            "ContentDate",
            "StudyTime",
            "SeriesTime",
            "AcquisitionTime",
            "ContentTime",
            "AcquisitionDateTime",
        ],
        direct: false,
        option: Some(ProfileOption::RetainLongitudinalModifiedDates),
    },
    Category {
        name: "study, series and instance UIDs",
        keywords: &[
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "SOPInstanceUID",
            "FrameOfReferenceUID",
        ],
        direct: false,
        option: Some(ProfileOption::RetainUids),
    },
    Category {
        name: "institution",
        keywords: &[
            "InstitutionName",
            "InstitutionAddress",
            "InstitutionalDepartmentName",
            "InstitutionCodeSequence",
        ],
        direct: false,
        option: Some(ProfileOption::RetainInstitutionIdentity),
    },
    Category {
        name: "device identity",
        keywords: &["DeviceSerialNumber", "StationName", "DeviceUID"],
        direct: false,
        option: Some(ProfileOption::RetainDeviceIdentity),
    },
    Category {
        name: "patient characteristics (age, sex, size, weight)",
        keywords: &[
            "PatientAge",
            "PatientSex",
            "PatientSize",
            "PatientWeight",
            "EthnicGroup",
            "SmokingStatus",
            "PregnancyStatus",
        ],
        direct: false,
        option: Some(ProfileOption::RetainPatientCharacteristics),
    },
    Category {
        name: "names of physicians and operators",
        keywords: &[
            "ReferringPhysicianName",
            "PerformingPhysicianName",
            "NameOfPhysiciansReadingStudy",
            "OperatorsName",
            "PhysiciansOfRecord",
            "RequestingPhysician",
        ],
        direct: false,
        option: None,
    },
    Category {
        name: "descriptions and comments (free text)",
        keywords: &[
            "StudyDescription",
            "SeriesDescription",
            "PatientComments",
            "AdditionalPatientHistory",
            "ImageComments",
            "AdmittingDiagnosesDescription",
        ],
        direct: false,
        option: Some(ProfileOption::CleanDescriptors),
    },
];

/// The category a keyword belongs to, if it is one the table knows.
pub fn category_of(keyword: &str) -> Option<&'static Category> {
    CATEGORIES.iter().find(|c| c.keywords.contains(&keyword))
}

/// Whether `keyword` is a direct identifier of the patient.
pub fn is_direct_identifier(keyword: &str) -> bool {
    category_of(keyword).is_some_and(|c| c.direct)
}

/// The form a category takes under the Basic profile with `deid`'s options, before overrides.
pub fn profile_form(cat: &Category, deid: &DeidConfig, subject_ids: bool) -> Form {
    let has = |o: ProfileOption| deid.options.contains(&o);
    match cat.keywords[0] {
        "PatientName" if subject_ids => Form::SubjectId,
        "PatientName" | "AccessionNumber" => Form::Token,
        "StudyDate" if has(ProfileOption::RetainLongitudinalFullDates) => Form::Kept,
        "StudyDate" if has(ProfileOption::RetainLongitudinalModifiedDates) => Form::Shifted,
        "StudyInstanceUID" if !has(ProfileOption::RetainUids) => Form::Remapped,
        "StudyDescription" if has(ProfileOption::CleanDescriptors) => Form::Cleaned,
        _ => match cat.option {
            Some(o) if has(o) && o != ProfileOption::CleanDescriptors => Form::Kept,
            _ => Form::Removed,
        },
    }
}

/// The options that bear on a keyword (for dates, both longitudinal options).
pub fn options_for(keyword: &str) -> Vec<ProfileOption> {
    match category_of(keyword).and_then(|c| c.option) {
        Some(ProfileOption::RetainLongitudinalModifiedDates) => vec![
            ProfileOption::RetainLongitudinalFullDates,
            ProfileOption::RetainLongitudinalModifiedDates,
        ],
        Some(o) => vec![o],
        None => vec![],
    }
}

/// The form one attribute takes: its override if any, else its category's profile form.
pub fn attribute_form(keyword: &str, deid: &DeidConfig, subject_ids: bool) -> Option<Form> {
    if let Some(o) = deid.overrides.iter().find(|o| o.keyword == keyword) {
        return Some(match &o.action {
            OverrideAction::Keep => Form::Kept,
            OverrideAction::Remove => Form::Removed,
            OverrideAction::Token => Form::Token,
            OverrideAction::Fixed(v) => Form::Fixed(v.clone()),
        });
    }
    category_of(keyword).map(|c| {
        if keyword == "PatientBirthDate" || keyword == "PatientBirthTime" {
            Form::Removed
        } else {
            profile_form(c, deid, subject_ids)
        }
    })
}

/// Every keyword the table knows (for "did you mean" suggestions).
pub fn known_keywords() -> impl Iterator<Item = &'static str> {
    CATEGORIES.iter().flat_map(|c| c.keywords.iter().copied())
}
