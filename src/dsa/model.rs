//! The agreement model: what a parsed DSA file says, with no source positions in it.
//!
//! Every type here is plain data with `PartialEq`, so `parse(format(x)) == x` can be tested.

use std::collections::BTreeSet;
use std::fmt;

use time::Date;

use crate::deid::DeidConfig;

/// Purposes of use, a fixed vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Purpose {
    Treatment,
    TeleradiologyReport,
    Research,
    ClinicalTrial,
    QualityImprovement,
    Teaching,
}

impl Purpose {
    /// Every purpose, in the order the documentation lists them.
    pub const ALL: [Purpose; 6] = [
        Purpose::Treatment,
        Purpose::TeleradiologyReport,
        Purpose::Research,
        Purpose::ClinicalTrial,
        Purpose::QualityImprovement,
        Purpose::Teaching,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Purpose::Treatment => "treatment",
            Purpose::TeleradiologyReport => "teleradiology-report",
            Purpose::Research => "research",
            Purpose::ClinicalTrial => "clinical-trial",
            Purpose::QualityImprovement => "quality-improvement",
            Purpose::Teaching => "teaching",
        }
    }

    /// A plain-language phrase for reports.
    pub fn describe(self) -> &'static str {
        match self {
            Purpose::Treatment => "the patient's own treatment",
            Purpose::TeleradiologyReport => "reporting by a teleradiology service",
            Purpose::Research => "research",
            Purpose::ClinicalTrial => "a clinical trial",
            Purpose::QualityImprovement => "quality improvement",
            Purpose::Teaching => "teaching",
        }
    }

    pub fn parse(s: &str) -> Option<Purpose> {
        Purpose::ALL.into_iter().find(|p| p.name() == s)
    }

    /// Purposes for which patient consent is normally expected (lint).
    pub fn expects_consent(self) -> bool {
        matches!(
            self,
            Purpose::Research | Purpose::ClinicalTrial | Purpose::Teaching
        )
    }
}

impl fmt::Display for Purpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The agreement's life-cycle state. Only an active agreement lets data move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Draft,
    Active,
    Suspended,
    Ended,
}

impl Status {
    pub const ALL: [Status; 4] = [
        Status::Draft,
        Status::Active,
        Status::Suspended,
        Status::Ended,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Status::Draft => "draft",
            Status::Active => "active",
            Status::Suspended => "suspended",
            Status::Ended => "ended",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether a party may currently send or receive under the agreement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PartyStatus {
    #[default]
    Active,
    /// Cut off at once: nothing is sent to or accepted from this party.
    Suspended,
}

impl PartyStatus {
    pub const ALL: [PartyStatus; 2] = [PartyStatus::Active, PartyStatus::Suspended];

    pub fn name(self) -> &'static str {
        match self {
            PartyStatus::Active => "active",
            PartyStatus::Suspended => "suspended",
        }
    }
}

/// A site that is party to the agreement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Party {
    /// Site id, as in the site certificate's URI SAN `urn:pacs-broker:site:<id>` and its CN.
    pub site: String,
    pub organisation: String,
    /// Name (or role) of the party's privacy officer.
    pub privacy_officer: String,
    /// How to reach the privacy officer (e-mail or telephone).
    pub privacy_contact: String,
    /// Optional pin: lowercase hex SHA-256 of the site certificate's SubjectPublicKeyInfo (DER).
    pub certificate_pin: Option<String>,
    pub status: PartyStatus,
}

impl Party {
    pub fn is_suspended(&self) -> bool {
        self.status == PartyStatus::Suspended
    }
}

/// Which studies a flow covers. Empty sets and `None` mean "no restriction on this criterion".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    /// DICOM Modality codes (CT, MR, ...). Every modality of a study must be listed.
    pub modalities: BTreeSet<String>,
    /// Body Part Examined values (CHEST, HEAD, ...).
    pub body_parts: BTreeSet<String>,
    pub study_date_from: Option<Date>,
    pub study_date_until: Option<Date>,
    /// Study Description pattern: `*` any run of characters, `?` one character, case-insensitive.
    pub description: Option<String>,
    /// Calling AE titles of the local modalities or PACS the studies must come from.
    pub source_aes: BTreeSet<String>,
}

/// Patient consent for a flow.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Consent {
    pub required: bool,
    /// Where consent is recorded (system, form, register). Required when `required`.
    pub recorded_in: String,
}

/// Trial subject IDs: the origin replaces the patient with the trial subject ID from a mapping
/// it holds (site patient ID -> subject ID) instead of a keyed token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectIds {
    /// The mapping file at the origin, relative to the agreement file (CSV `patient_id,subject_id`).
    /// It never leaves the origin and is not part of the signed agreement text's data.
    pub mapping: String,
}

/// What the receiver does when the retention period ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterRetention {
    Delete,
    Return,
}

impl AfterRetention {
    pub const ALL: [AfterRetention; 2] = [AfterRetention::Delete, AfterRetention::Return];

    pub fn name(self) -> &'static str {
        match self {
            AfterRetention::Delete => "delete",
            AfterRetention::Return => "return",
        }
    }
}

/// How long the receiver may keep what it received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub days: u32,
    pub after: AfterRetention,
}

/// Whether results (reports, reads) may come back to the origin, and who may re-identify them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Results {
    pub return_to_origin: bool,
    /// Roles at the origin allowed to re-identify returned results.
    pub reidentify_by: Vec<String>,
}

/// One direction of disclosure: who sends what to whom, for which purposes, de-identified how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    pub name: String,
    pub from: String,
    pub to: String,
    pub purposes: BTreeSet<Purpose>,
    pub select: Selector,
    pub consent: Consent,
    /// The PS3.15 Basic profile with these options, overrides, safe private tags, pixel rules.
    pub deid: DeidConfig,
    pub subject_ids: Option<SubjectIds>,
    /// `None`: no retention limit (the lint warns).
    pub retention: Option<Retention>,
    /// `None`: no volume limit.
    pub studies_per_day: Option<u32>,
    pub results: Results,
}

/// A parsed data sharing agreement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agreement {
    pub id: String,
    pub version: u32,
    pub title: String,
    pub status: Status,
    pub valid_from: Date,
    pub valid_until: Date,
    /// Governing law or jurisdiction, as in the signed paper agreement.
    pub governing_law: String,
    /// Reference to the signed paper agreement (contract number, date). Empty if none yet.
    pub paper_reference: String,
    pub parties: Vec<Party>,
    pub flows: Vec<Flow>,
}

impl Agreement {
    /// The flow called `name`.
    pub fn flow(&self, name: &str) -> Option<&Flow> {
        self.flows.iter().find(|f| f.name == name)
    }

    /// The party with site id `site`.
    pub fn party(&self, site: &str) -> Option<&Party> {
        self.parties.iter().find(|p| p.site == site)
    }

    /// Whether `today` lies within the validity period (both ends inclusive).
    pub fn is_valid_on(&self, today: Date) -> bool {
        self.valid_from <= today && today <= self.valid_until
    }
}

/// DICOM Modality defined terms (PS3.3 C.7.3.1.1.1), current and retired, accepted in selectors.
pub const MODALITIES: &[&str] = &[
    "ANN",
    "AR",
    "ASMT",
    "AU",
    "BDUS",
    "BI",
    "BMD",
    "CFM",
    "CR",
    "CT",
    "CTPROTOCOL",
    "DMS",
    "DG",
    "DOC",
    "DX",
    "ECG",
    "EEG",
    "EMG",
    "EOG",
    "EPS",
    "ES",
    "FID",
    "GM",
    "HC",
    "HD",
    "IO",
    "IOL",
    "IVOCT",
    "IVUS",
    "KER",
    "KO",
    "LEN",
    "LS",
    "MG",
    "MR",
    "M3D",
    "NM",
    "OAM",
    "OCT",
    "OP",
    "OPM",
    "OPT",
    "OPTBSV",
    "OPTENF",
    "OPV",
    "OSS",
    "OT",
    "PA",
    "PLAN",
    "POS",
    "PR",
    "PT",
    "PX",
    "REG",
    "RESP",
    "RF",
    "RG",
    "RTDOSE",
    "RTIMAGE",
    "RTINTENT",
    "RTPLAN",
    "RTRAD",
    "RTRECORD",
    "RTSEGANN",
    "RTSTRUCT",
    "RWV",
    "SEG",
    "SM",
    "SMR",
    "SR",
    "SRF",
    "STAIN",
    "TEXTUREMAP",
    "TG",
    "US",
    "VA",
    "XA",
    "XAPROTOCOL",
    "XC",
];
