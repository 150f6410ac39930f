//! What happens to one attribute: the table's action under the flow's options, the agreement's
//! overrides, private attributes, and the documented defaults for attributes the table does not
//! name.
//!
//! Defaults for public attributes that are not in Table E.1-1 (PS3.15 leaves them to the
//! implementation; pacs-broker fails closed):
//! - sequences are kept and every item is processed with the same rules, at every depth;
//! - UIDs are replaced (U) unless they name a class, a transfer syntax or a coding scheme, or are
//!   registered DICOM UIDs (`1.2.840.10008.*`);
//! - numeric, binary and code-string (CS) values are kept: they cannot carry a name or an address
//!   beyond what the residual-PHI verifier checks;
//! - dates (DA, DT) follow the longitudinal options (kept, shifted, else removed); times (TM) are
//!   kept only with a longitudinal option;
//! - any other text (LO, SH, LT, ST, UT, UC, UR, PN, AE, AS) is removed unless it is on the short,
//!   reviewed [`SAFE_TEXT`] list of coded or technical attributes, or the agreement keeps it;
//! - values of unknown VR (UN) are removed: they cannot be inspected.

use std::collections::BTreeSet;

use dicom_core::{Tag, VR};
use dicom_dictionary_std::tags;

use super::table::{self, Action, Row};
use super::{DeidConfig, OverrideAction, ProfileOption};

/// What the engine does to one element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Act {
    Keep,
    Remove,
    Empty,
    Dummy,
    Clean,
    Uid,
    Token,
    Fixed(String),
}

impl Act {
    pub fn code(&self) -> &'static str {
        match self {
            Act::Keep => "K",
            Act::Remove => "X",
            Act::Empty => "Z",
            Act::Dummy => "D",
            Act::Clean => "C",
            Act::Uid => "U",
            Act::Token => "D (token)",
            Act::Fixed(_) => "fixed",
        }
    }
}

/// An action and the rule that chose it (table row and column, override, or default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub act: Act,
    pub rule: Rule,
    /// The table's action code when a table row decided (for check_release).
    pub table_action: Option<Action>,
}

/// Attributes that carry the agreement's pseudonym (a keyed token) when the profile empties or
/// dummies them: the patient's identity and the accession number, so results can come back.
pub const PSEUDONYM_TAGS: &[Tag] = &[tags::PATIENT_ID, tags::PATIENT_NAME, tags::ACCESSION_NUMBER];

/// UI attributes that name a class, a transfer syntax or a scheme, never an instance.
pub const CLASS_UIDS: &[Tag] = &[
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
    tags::PRIVATE_INFORMATION_CREATOR_UID,
    tags::RELATED_GENERAL_SOP_CLASS_UID,
    tags::ORIGINAL_SPECIALIZED_SOP_CLASS_UID,
    tags::SOP_CLASSES_IN_STUDY,
    tags::MAPPING_RESOURCE_UID,
    tags::CODING_SCHEME_REGISTRY,
];

/// Text attributes outside Table E.1-1 kept by default: coded entries, equipment model and
/// technique descriptions that name no person, place or patient. Reviewed by hand.
pub const SAFE_TEXT: &[Tag] = &[
    tags::CODE_VALUE,
    tags::CODING_SCHEME_DESIGNATOR,
    tags::CODING_SCHEME_VERSION,
    tags::CODE_MEANING,
    tags::LONG_CODE_VALUE,
    tags::URN_CODE_VALUE,
    tags::CONTEXT_IDENTIFIER,
    tags::MAPPING_RESOURCE,
    tags::MAPPING_RESOURCE_NAME,
    tags::CODING_SCHEME_NAME,
    tags::CODING_SCHEME_RESPONSIBLE_ORGANIZATION,
    tags::MANUFACTURER,
    tags::MANUFACTURER_MODEL_NAME,
    tags::SOFTWARE_VERSIONS,
    tags::CONVOLUTION_KERNEL,
    tags::WINDOW_CENTER_WIDTH_EXPLANATION,
    tags::LUT_EXPLANATION,
    tags::RESCALE_TYPE,
    tags::POSITION_REFERENCE_INDICATOR,
    tags::RECEIVE_COIL_NAME,
    tags::TRANSMIT_COIL_NAME,
    tags::SEQUENCE_NAME,
    tags::IMAGED_NUCLEUS,
    tags::PULSE_SEQUENCE_NAME,
    tags::CONTRAST_BOLUS_ROUTE,
    tags::LOSSY_IMAGE_COMPRESSION_METHOD,
    tags::FILTER_TYPE,
    tags::IMPLEMENTATION_VERSION_NAME,
    tags::TEMPLATE_IDENTIFIER,
    tags::MEASUREMENT_UNITS_CODE_SEQUENCE,
    tags::DOSE_UNITS,
    tags::ROI_GENERATION_ALGORITHM,
    tags::RTROI_INTERPRETED_TYPE,
    tags::RADIOPHARMACEUTICAL,
    tags::STRUCTURE_SET_LABEL,
    tags::DEIDENTIFICATION_METHOD,
    tags::VALUE_TYPE,
    tags::RELATIONSHIP_TYPE,
    tags::CONTINUITY_OF_CONTENT,
    tags::COMPLETION_FLAG,
    tags::VERIFICATION_FLAG,
    tags::PIXEL_SPACING_CALIBRATION_DESCRIPTION,
    tags::FRAME_LABEL_VECTOR,
    tags::SPECIFIC_CHARACTER_SET,
    tags::SEGMENT_LABEL,
    tags::SEGMENT_ALGORITHM_NAME,
];

/// The text of coded entries (PS3.3 Table 8.8-1), in any sequence: kept as vocabulary, but
/// cleaned (C) of the identifying words of the instance, because a Code Meaning, a private
/// coding scheme's code value or its name is typed by someone and can name the patient. The
/// residual-PHI verifier searches them as well.
pub const CODED_TEXT: &[Tag] = &[
    tags::CODE_VALUE,
    tags::CODING_SCHEME_DESIGNATOR,
    tags::CODING_SCHEME_VERSION,
    tags::CODE_MEANING,
    tags::LONG_CODE_VALUE,
    tags::URN_CODE_VALUE,
    tags::MAPPING_RESOURCE,
    tags::MAPPING_RESOURCE_NAME,
    tags::CODING_SCHEME_NAME,
    tags::CODING_SCHEME_RESPONSIBLE_ORGANIZATION,
];

/// Composite-action attributes that are Type 1 (or Type 2 for X/D) in some IOD — SR, enhanced
/// multi-frame, RT plan and treatment records — so they get a dummy (D) when present instead of
/// being removed (X/D) or emptied (Z/D, X/Z/D). All other composites: X/D -> X, X/Z -> Z,
/// Z/D -> Z, X/Z/D -> Z (a zero-length value conforms for Type 2 and 3 and carries nothing).
const DUMMY_WHEN_PRESENT: &[Tag] = &[
    tags::CONTENT_DATE,
    tags::CONTENT_TIME,
    tags::ACQUISITION_DATE_TIME,
    tags::INSTRUCTION_PERFORMED_DATE_TIME,
    tags::START_ACQUISITION_DATE_TIME,
    tags::END_ACQUISITION_DATE_TIME,
    tags::OBSERVATION_DATE_TIME,
    tags::RT_PLAN_DATE,
    tags::RT_PLAN_TIME,
    tags::TREATMENT_DATE,
    tags::TREATMENT_TIME,
    tags::FIRST_TREATMENT_DATE,
    tags::MOST_RECENT_TREATMENT_DATE,
    tags::INTENDED_PHASE_START_DATE,
    tags::INTENDED_PHASE_END_DATE,
    tags::DEVICE_SERIAL_NUMBER,
];

/// Text attributes outside Table E.1-1 that are Type 2 in some IOD: emptied (Z) rather than
/// removed, so the output stays conformant; an empty value carries nothing.
const EMPTY_BY_DEFAULT: &[Tag] = &[tags::CONTENT_DESCRIPTION];

/// Attributes outside Table E.1-1 that pacs-broker gives a table-like row: SR Text Value, which
/// Content Sequence (D, or C with Clean Structured Content) would otherwise leave to the default.
static EXTENSION_ROWS: &[Row] = &[Row {
    tag: 0x0040_A160,
    mask: 0xFFFF_FFFF,
    keyword: "TextValue",
    name: "Text Value (pacs-broker extension row)",
    basic: Action::D,
    options: [
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        Some(Action::C),
        None,
    ],
    std_comp_iod: Some(true),
}];

fn row_or_extension(tag: Tag) -> Option<&'static Row> {
    table::row_for(tag).or_else(|| {
        let t = (u32::from(tag.group()) << 16) | u32::from(tag.element());
        EXTENSION_ROWS.iter().find(|r| r.tag == t)
    })
}

/// The row that governs a tag (table, extension or private), for previews.
pub fn governing_row(tag: Tag) -> Option<&'static Row> {
    row_or_extension(tag)
}

/// Decides a public attribute (even group). `vr` is the element's VR as read.
pub fn decide_public(tag: Tag, vr: VR, has_value: bool, config: &DeidConfig) -> Decision {
    if let Some(ov) = config.overrides.iter().find(|o| o.tag == tag) {
        let act = match &ov.action {
            OverrideAction::Keep => Act::Keep,
            OverrideAction::Remove => Act::Remove,
            OverrideAction::Token => Act::Token,
            OverrideAction::Fixed(v) => Act::Fixed(v.clone()),
        };
        return Decision {
            act,
            rule: Rule::Override,
            table_action: None,
        };
    }
    if tag.element() == 0 {
        return Decision {
            act: Act::Remove,
            rule: Rule::Text("group length (not needed; removed)"),
            table_action: None,
        };
    }
    let options = &config.options;
    if let Some(row) = row_or_extension(tag) {
        let (action, column) = table::resolve(row, options);
        let mut act = match action {
            Action::D => Act::Dummy,
            Action::XD if DUMMY_WHEN_PRESENT.contains(&tag) => Act::Dummy,
            Action::XD => Act::Remove,
            Action::Z | Action::XZ => Act::Empty,
            Action::X => Act::Remove,
            Action::K | Action::XZU => Act::Keep,
            Action::C => Act::Clean,
            Action::U => Act::Uid,
            Action::ZD | Action::XZD => {
                if DUMMY_WHEN_PRESENT.contains(&tag) {
                    Act::Dummy
                } else {
                    Act::Empty
                }
            }
        };
        if PSEUDONYM_TAGS.contains(&tag) && matches!(act, Act::Empty | Act::Dummy) && has_value {
            act = Act::Token;
        }
        if vr == VR::UN && matches!(act, Act::Keep | Act::Clean | Act::Dummy | Act::Uid) {
            return Decision {
                act: Act::Remove,
                rule: Rule::TableUnknownVr {
                    row,
                    column,
                    action,
                },
                table_action: Some(action),
            };
        }
        return Decision {
            act,
            rule: Rule::Table {
                row,
                column,
                action,
            },
            table_action: Some(action),
        };
    }
    let (act, why) = default_for(tag, vr, options);
    Decision {
        act,
        rule: Rule::Default(why),
        table_action: None,
    }
}

fn default_for(tag: Tag, vr: VR, options: &BTreeSet<ProfileOption>) -> (Act, &'static str) {
    let full = options.contains(&ProfileOption::RetainLongitudinalFullDates);
    let modified = options.contains(&ProfileOption::RetainLongitudinalModifiedDates);
    match vr {
        VR::SQ => (Act::Keep, "sequence kept, items processed"),
        VR::UI if CLASS_UIDS.contains(&tag) => (Act::Keep, "class or scheme UID kept"),
        VR::UI if options.contains(&ProfileOption::RetainUids) => {
            (Act::Keep, "UID kept (retain-uids)")
        }
        VR::UI => (Act::Uid, "UID replaced by default"),
        VR::DA | VR::DT if full => (Act::Keep, "date kept (retain-longitudinal-full-dates)"),
        VR::DA | VR::DT if modified => (
            Act::Clean,
            "date shifted (retain-longitudinal-modified-dates)",
        ),
        VR::DA | VR::DT => (Act::Remove, "dates removed by default"),
        VR::TM if full || modified => (Act::Keep, "time kept (longitudinal option)"),
        VR::TM => (Act::Remove, "times removed by default"),
        VR::UN => (Act::Remove, "unknown VR (UN) removed by default"),
        VR::CS
        | VR::DS
        | VR::IS
        | VR::US
        | VR::SS
        | VR::UL
        | VR::SL
        | VR::UV
        | VR::SV
        | VR::FL
        | VR::FD
        | VR::AT
        | VR::OB
        | VR::OW
        | VR::OF
        | VR::OD
        | VR::OL
        | VR::OV => (Act::Keep, "coded, numeric or binary value kept"),
        _ if CODED_TEXT.contains(&tag) => (
            Act::Clean,
            "coded entry text kept, identifying words of the instance scrubbed",
        ),
        _ if SAFE_TEXT.contains(&tag) => (Act::Keep, "reviewed technical text kept"),
        _ if EMPTY_BY_DEFAULT.contains(&tag) => {
            (Act::Empty, "Type 2 text emptied (kept for IOD conformance)")
        }
        _ => (
            Act::Remove,
            "text removed by default (keep it with an agreement override)",
        ),
    }
}

/// Why an action was chosen, as the preview shows it. Kept as data and written out only when
/// shown: most elements of most files are decided without anyone reading the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// An override in the agreement.
    Override,
    /// A fixed explanation.
    Text(&'static str),
    /// A public attribute not in Table E.1-1, handled by the documented default.
    Default(&'static str),
    /// A row of Table E.1-1, the column that applied and its action.
    Table {
        row: &'static table::Row,
        column: &'static str,
        action: Action,
    },
    /// The same, but the action needs the value and its VR is unknown (UN): removed.
    TableUnknownVr {
        row: &'static table::Row,
        column: &'static str,
        action: Action,
    },
    /// The private-attributes row; for C, whether the attribute is on the safe private list.
    Private {
        column: &'static str,
        action: Action,
        safe: Option<bool>,
    },
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rule::Override => f.write_str("agreement override"),
            Rule::Text(t) => f.write_str(t),
            Rule::Default(why) => write!(f, "not in E.1-1: {why}"),
            Rule::Table {
                row,
                column,
                action,
            } => write!(f, "E.1-1 {} {}: {}", row.tag_text(), column, action.code()),
            Rule::TableUnknownVr {
                row,
                column,
                action,
            } => write!(
                f,
                "E.1-1 {} {}: {} but the value has unknown VR (UN) and cannot be inspected",
                row.tag_text(),
                column,
                action.code()
            ),
            Rule::Private {
                column,
                action,
                safe,
            } => {
                write!(f, "E.1-1 (gggg,eeee) odd gggg {column}: {}", action.code())?;
                match safe {
                    Some(true) => f.write_str(", on the agreement's safe private list"),
                    Some(false) => f.write_str(", not on the agreement's safe private list"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// Decides a private data element, given its block's creator (if the dataset has one).
pub fn decide_private(tag: Tag, creator: Option<&str>, config: &DeidConfig) -> Decision {
    if let Some(ov) = config.overrides.iter().find(|o| o.tag == tag) {
        if ov.action == OverrideAction::Remove {
            return Decision {
                act: Act::Remove,
                rule: Rule::Override,
                table_action: None,
            };
        }
    }
    let (action, column) = table::resolve(table::private_row(), &config.options);
    if action != Action::C {
        return Decision {
            act: Act::Remove,
            rule: Rule::Private {
                column,
                action,
                safe: None,
            },
            table_action: Some(action),
        };
    }
    let safe = creator.is_some_and(|c| is_safe_private(tag, c, config));
    if safe {
        Decision {
            act: Act::Keep,
            rule: Rule::Private {
                column,
                action,
                safe: Some(true),
            },
            table_action: Some(action),
        }
    } else {
        Decision {
            act: Act::Remove,
            rule: Rule::Private {
                column,
                action,
                safe: Some(false),
            },
            table_action: Some(action),
        }
    }
}

/// True when (group, creator, element byte) is on the agreement's safe private list.
pub fn is_safe_private(tag: Tag, creator: &str, config: &DeidConfig) -> bool {
    let creator = creator.trim_end_matches(['\0', ' ']).trim();
    config.safe_private.iter().any(|s| {
        s.group == tag.group()
            && s.creator.trim() == creator
            && s.element == (tag.element() & 0xFF) as u8
    })
}

/// The private block of a private data element, `(gggg,xxee)` -> `xx`; `None` for creators and
/// group lengths.
pub fn private_block(tag: Tag) -> Option<u16> {
    (tag.element() >= 0x1000).then_some(tag.element() >> 8)
}

/// True for a private creator element `(gggg,0010-00FF)`.
pub fn is_private_creator(tag: Tag) -> bool {
    tag.group() % 2 == 1 && (0x0010..=0x00FF).contains(&tag.element())
}
