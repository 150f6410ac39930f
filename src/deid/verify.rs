//! Fail-closed checks.
//!
//! - The residual-PHI verifier ([`PhiTerms`], [`find_residual_phi`]): the origin collects the
//!   identifying values of the original instance and scans every element of the output (all text
//!   VRs at all depths, UN/OB blobs except pixel data, and the file meta group) for them.
//! - The release check ([`check_release`]): what a node that only sees the de-identified instance
//!   (a receiver) can verify against the flow's profile.
//!
//! Reasons name attributes and kinds of value, never the values themselves.

use std::collections::BTreeSet;

use dicom_core::value::Value;
use dicom_core::{Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::mem::InMemDicomObject;
use dicom_object::{DefaultDicomObject, FileMetaTable};

use super::policy::{self, Act};
use super::values::{self, fold, word_matches};
use super::{keyword_of, DeidConfig, DeidError, ProfileOption};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Whole word, case-insensitive (name parts, short IDs).
    Word,
    /// Anywhere, case-insensitive (long IDs, addresses, institution, dates in text).
    Substring,
    /// The digits of a phone number, ignoring separators.
    Digits,
    /// Exactly equal to a UID value.
    Uid,
}

#[derive(Debug, Clone)]
struct Term {
    folded: String,
    kind: &'static str,
    mode: Mode,
}

/// The identifying values of one original instance, ready to search for.
#[derive(Debug, Clone, Default)]
pub struct PhiTerms {
    terms: Vec<Term>,
}

const PATIENT_NAMES: &[Tag] = &[
    tags::PATIENT_NAME,
    tags::OTHER_PATIENT_NAMES,
    tags::PATIENT_BIRTH_NAME,
    tags::PATIENT_MOTHER_BIRTH_NAME,
];
const STAFF_NAMES: &[Tag] = &[
    tags::REFERRING_PHYSICIAN_NAME,
    tags::PERFORMING_PHYSICIAN_NAME,
    tags::NAME_OF_PHYSICIANS_READING_STUDY,
    tags::OPERATORS_NAME,
    tags::PHYSICIANS_OF_RECORD,
    tags::REQUESTING_PHYSICIAN,
];
#[allow(deprecated)]
const IDS: &[Tag] = &[
    tags::PATIENT_ID,
    tags::OTHER_PATIENT_I_DS,
    tags::ACCESSION_NUMBER,
    tags::MEDICAL_RECORD_LOCATOR,
    tags::ADMISSION_ID,
    tags::SERVICE_EPISODE_ID,
    tags::REQUESTED_PROCEDURE_ID,
    tags::PERFORMED_PROCEDURE_STEP_ID,
    tags::SCHEDULED_PROCEDURE_STEP_ID,
    tags::FILLER_ORDER_NUMBER_IMAGING_SERVICE_REQUEST,
    tags::PLACER_ORDER_NUMBER_IMAGING_SERVICE_REQUEST,
];
const ADDRESSES: &[Tag] = &[tags::PATIENT_ADDRESS, tags::REFERRING_PHYSICIAN_ADDRESS];
const PHONES: &[Tag] = &[
    tags::PATIENT_TELEPHONE_NUMBERS,
    tags::REFERRING_PHYSICIAN_TELEPHONE_NUMBERS,
];
const INSTITUTION: &[Tag] = &[
    tags::INSTITUTION_NAME,
    tags::INSTITUTION_ADDRESS,
    tags::INSTITUTIONAL_DEPARTMENT_NAME,
];
/// Values the engine itself writes as dummies (D action), folded: never PHI.
const ENGINE_DUMMIES: &[&str] = &["removed", "urn:removed"];
/// Top-level attributes the engine writes itself after de-identifying (PS3.15 E.1.1): their text
/// is the engine's (profile and option names, CID 7050 code meanings), never the input's, so a
/// patient whose name is a word of it ("Clean", "Patient", "Basic") is not refused for it.
const ENGINE_WRITTEN: &[Tag] = &[
    tags::PATIENT_IDENTITY_REMOVED,
    tags::DEIDENTIFICATION_METHOD,
    tags::DEIDENTIFICATION_METHOD_CODE_SEQUENCE,
    tags::LONGITUDINAL_TEMPORAL_INFORMATION_MODIFIED,
];
/// Equipment make and model.
const EQUIPMENT: &[Tag] = &[
    tags::MANUFACTURER,
    tags::MANUFACTURER_MODEL_NAME,
    tags::SOFTWARE_VERSIONS,
];
const INSTANCE_UIDS: &[Tag] = &[
    tags::STUDY_INSTANCE_UID,
    tags::SERIES_INSTANCE_UID,
    tags::SOP_INSTANCE_UID,
    tags::FRAME_OF_REFERENCE_UID,
];

fn strings(obj: &InMemDicomObject, tag: Tag) -> Vec<String> {
    obj.get(tag)
        .and_then(|e| e.to_multi_str().ok())
        .map(|v| {
            v.iter()
                .map(|s| s.trim_matches(['\0', ' ']).to_string())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

impl PhiTerms {
    /// Collects the identifying values of `original` that the flow does not release on purpose
    /// (an agreement override that keeps or fixes an attribute, or an option that keeps it, takes
    /// its value off the list).
    pub fn collect(original: &InMemDicomObject, config: &DeidConfig) -> PhiTerms {
        let released = |tag: Tag| {
            let d = policy::decide_public(tag, VR::LO, true, config);
            matches!(d.act, Act::Keep | Act::Fixed(_))
        };
        let mut terms = Vec::new();
        let mut push = |s: &str, kind: &'static str, mode: Mode, min: usize| {
            let f = fold(s.trim());
            if f.chars().count() >= min
                && !terms.iter().any(|t: &Term| t.folded == f && t.mode == mode)
            {
                terms.push(Term {
                    folded: f,
                    kind,
                    mode,
                });
            }
        };
        let names = |tags_: &[Tag],
                     kind: &'static str,
                     push: &mut dyn FnMut(&str, &'static str, Mode, usize)| {
            for &tag in tags_ {
                if released(tag) {
                    continue;
                }
                for v in strings(original, tag) {
                    for part in v.split(['^', '=', ' ', ',', '.']) {
                        push(part, kind, Mode::Word, 3);
                    }
                }
            }
        };
        names(PATIENT_NAMES, "patient name", &mut push);
        names(STAFF_NAMES, "staff name", &mut push);
        let mut ids: Vec<String> = Vec::new();
        for &tag in IDS {
            if !released(tag) {
                ids.extend(strings(original, tag));
            }
        }
        if let Some(seq) = original
            .get(tags::OTHER_PATIENT_I_DS_SEQUENCE)
            .and_then(|e| e.items())
        {
            for item in seq {
                ids.extend(strings(item, tags::PATIENT_ID));
            }
        }
        for id in ids {
            let mode = if id.len() >= 6 {
                Mode::Substring
            } else {
                Mode::Word
            };
            push(&id, "identifier", mode, 3);
        }
        if !released(tags::PATIENT_BIRTH_DATE) {
            for d in strings(original, tags::PATIENT_BIRTH_DATE) {
                if d.len() == 8 && d.bytes().all(|b| b.is_ascii_digit()) {
                    let (y, m, dd) = (&d[..4], &d[4..6], &d[6..8]);
                    for form in [
                        d.clone(),
                        format!("{y}-{m}-{dd}"),
                        format!("{dd}/{m}/{y}"),
                        format!("{m}/{dd}/{y}"),
                        format!("{dd}.{m}.{y}"),
                        format!("{y}.{m}.{dd}"),
                    ] {
                        push(&form, "birth date", Mode::Substring, 8);
                    }
                }
            }
        }
        for &tag in ADDRESSES {
            if released(tag) {
                continue;
            }
            for v in strings(original, tag) {
                push(&v, "address", Mode::Substring, 5);
                for part in v.split(['^', ',', '\n', '\r']) {
                    push(part, "address", Mode::Substring, 5);
                }
            }
        }
        for &tag in PHONES {
            if released(tag) {
                continue;
            }
            for v in strings(original, tag) {
                let digits: String = v.chars().filter(char::is_ascii_digit).collect();
                push(&digits, "phone number", Mode::Digits, 6);
            }
        }
        if !config
            .options
            .contains(&ProfileOption::RetainInstitutionIdentity)
        {
            for &tag in INSTITUTION {
                if released(tag) {
                    continue;
                }
                for v in strings(original, tag) {
                    push(&v, "institution", Mode::Substring, 4);
                }
            }
        }
        if !config.options.contains(&ProfileOption::RetainUids) {
            for &tag in INSTANCE_UIDS {
                if released(tag) {
                    continue;
                }
                for v in strings(original, tag) {
                    push(&v, "original UID", Mode::Uid, 1);
                }
            }
        }
        PhiTerms { terms }
    }

    /// Name parts, IDs, addresses and institution names, for cleaning free text (the C action).
    pub fn words(&self) -> Vec<String> {
        self.terms
            .iter()
            .filter(|t| matches!(t.mode, Mode::Word | Mode::Substring))
            .map(|t| t.folded.clone())
            .collect()
    }

    /// The kinds of identifying value found in `text` of VR `vr` in attribute `tag`.
    ///
    /// Every text value is searched, coded entries included: a Code Meaning is typed by someone
    /// at some point and can name the patient (the engine scrubs identifying words out of coded
    /// entry text, so what is found here was not removed). Three exemptions keep the verifier
    /// from refusing instances for nothing:
    /// - code strings (CS) are defined terms, a closed vocabulary of at most 16 upper-case
    ///   characters (`ORIGINAL\PRIMARY\PERFUSION`): they are not searched for name parts or
    ///   institution names, which are words of the language; identifiers, dates and UIDs are
    ///   still searched;
    /// - institution names are not searched in the manufacturer and model (sites often type the
    ///   vendor as the institution);
    /// - a value that is exactly a dummy the engine writes (`REMOVED`) is the engine's text.
    fn find(&self, text: &str, vr: VR, tag: Tag) -> Option<&'static str> {
        let folded = fold(text.trim_matches(['\0', ' ']));
        if folded.is_empty() || ENGINE_DUMMIES.contains(&folded.as_str()) {
            return None;
        }
        let free = values::is_free_text(vr) || vr == VR::CS || vr == VR::UN || vr == VR::OB;
        let code_string = vr == VR::CS;
        let equipment = EQUIPMENT.contains(&tag);
        for t in &self.terms {
            if (code_string && (t.mode == Mode::Word || t.kind == "institution"))
                || (equipment && t.kind == "institution")
            {
                continue;
            }
            let hit = match t.mode {
                Mode::Uid => {
                    if vr == VR::UI {
                        folded
                            .split('\\')
                            .any(|u| u.trim_matches(['\0', ' ']) == t.folded)
                    } else {
                        free && t.folded.len() >= 8 && folded.contains(&t.folded)
                    }
                }
                Mode::Word => free && !word_matches(&folded, &t.folded).is_empty(),
                Mode::Substring => free && folded.contains(&t.folded),
                Mode::Digits => {
                    values::is_free_text(vr) && {
                        let digits: String = folded.chars().filter(char::is_ascii_digit).collect();
                        digits.contains(&t.folded)
                    }
                }
            };
            if hit {
                return Some(t.kind);
            }
        }
        None
    }
}

/// One place where an identifying value of the original survived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub path: String,
    pub keyword: String,
    pub kind: &'static str,
}

fn is_pixel_like(tag: Tag) -> bool {
    tag == tags::PIXEL_DATA
        || tag == tags::FLOAT_PIXEL_DATA
        || tag == tags::DOUBLE_FLOAT_PIXEL_DATA
        || (tag.group() & 0xFF00 == 0x6000 && tag.element() == 0x3000)
}

fn scan(obj: &InMemDicomObject, terms: &PhiTerms, path: &str, out: &mut Vec<Finding>) {
    for elem in obj.iter() {
        let tag = elem.header().tag;
        let vr = elem.vr();
        if path.is_empty() && ENGINE_WRITTEN.contains(&tag) {
            continue;
        }
        match elem.value() {
            Value::Sequence(seq) => {
                for (i, item) in seq.items().iter().enumerate() {
                    scan(item, terms, &format!("{path}{tag}[{i}]/"), out);
                }
            }
            Value::PixelSequence(_) => {}
            Value::Primitive(p) => {
                if is_pixel_like(tag) {
                    continue;
                }
                let text = match vr {
                    VR::UN | VR::OB => p.to_bytes().iter().map(|&b| b as char).collect::<String>(),
                    vr if values::is_text(vr) || vr == VR::UI => p.to_str().into_owned(),
                    _ => continue,
                };
                if let Some(kind) = terms.find(&text, vr, tag) {
                    out.push(Finding {
                        path: format!("{path}{tag}"),
                        keyword: keyword_of(tag).to_string(),
                        kind,
                    });
                }
            }
        }
    }
}

/// Every element of `output` (and its file meta group) that still holds an identifying value.
pub fn find_residual_phi(output: &DefaultDicomObject, terms: &PhiTerms) -> Vec<Finding> {
    let mut out = Vec::new();
    scan(output, terms, "", &mut out);
    let meta = output.meta();
    for (name, vr, value) in meta_strings(meta) {
        if let Some(kind) = terms.find(value, vr, Tag(0x0002, 0x0000)) {
            out.push(Finding {
                path: format!("meta/{name}"),
                keyword: name.to_string(),
                kind,
            });
        }
    }
    out
}

fn meta_strings(meta: &FileMetaTable) -> Vec<(&'static str, VR, &str)> {
    let mut v = vec![
        (
            "MediaStorageSOPInstanceUID",
            VR::UI,
            meta.media_storage_sop_instance_uid.as_str(),
        ),
        (
            "MediaStorageSOPClassUID",
            VR::UI,
            meta.media_storage_sop_class_uid.as_str(),
        ),
    ];
    for (name, field) in [
        (
            "ImplementationVersionName",
            &meta.implementation_version_name,
        ),
        (
            "SourceApplicationEntityTitle",
            &meta.source_application_entity_title,
        ),
        (
            "SendingApplicationEntityTitle",
            &meta.sending_application_entity_title,
        ),
        (
            "ReceivingApplicationEntityTitle",
            &meta.receiving_application_entity_title,
        ),
    ] {
        if let Some(s) = field {
            v.push((name, VR::SH, s.as_str()));
        }
    }
    v
}

/// Summarises findings as a quarantine reason (kinds and attribute names only, never values).
pub fn findings_reason(findings: &[Finding]) -> String {
    let mut parts: Vec<String> = findings
        .iter()
        .map(|f| format!("{} in {} {}", f.kind, f.keyword, f.path))
        .collect();
    parts.dedup();
    parts.truncate(8);
    format!("residual PHI after de-identification: {}", parts.join("; "))
}

/// The receiving node's check: refuses an object that still holds anything the flow's profile
/// would have removed. It has no original to compare with, so it checks the shape of the output:
/// - PatientIdentityRemoved is YES;
/// - no attribute the profile removes (X) or empties (Z) holds a value (pseudonymised attributes
///   may hold a token, attributes the agreement overrides may hold what the override says);
/// - no private attribute outside the agreement's safe list (and no private creator without one);
/// - instance UIDs are of the `2.25.` form unless the flow retains UIDs;
/// - text outside the table only where the defaults keep it;
/// - no BurnedInAnnotation YES, and no kind of image that usually carries burned-in text unless
///   it says BurnedInAnnotation NO.
pub fn check_release(obj: &InMemDicomObject, config: &DeidConfig) -> Result<(), DeidError> {
    let removed = obj
        .get(tags::PATIENT_IDENTITY_REMOVED)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim().to_string());
    if removed.as_deref() != Some("YES") {
        return Err(refuse("PatientIdentityRemoved is not YES".into()));
    }
    if let Some(reason) = super::pixels::burned_in_risk(obj) {
        return Err(refuse(format!("{reason} (release check)")));
    }
    if let Some(reason) = super::visual::gate(obj, config) {
        return Err(refuse(format!("{reason} (release check)")));
    }
    check_dataset(obj, config, "")
}

/// [`check_release`] plus the file meta group.
pub fn check_release_file(obj: &DefaultDicomObject, config: &DeidConfig) -> Result<(), DeidError> {
    check_release(obj, config)?;
    let meta = obj.meta();
    if !config.options.contains(&ProfileOption::RetainUids)
        && !is_replaced_uid(&meta.media_storage_sop_instance_uid)
    {
        return Err(refuse(
            "MediaStorageSOPInstanceUID is not a replaced (2.25) UID".into(),
        ));
    }
    for (name, field) in [
        (
            "SourceApplicationEntityTitle",
            &meta.source_application_entity_title,
        ),
        (
            "SendingApplicationEntityTitle",
            &meta.sending_application_entity_title,
        ),
        (
            "ReceivingApplicationEntityTitle",
            &meta.receiving_application_entity_title,
        ),
    ] {
        if field
            .as_deref()
            .is_some_and(|s| !s.trim_matches(['\0', ' ']).is_empty())
        {
            return Err(refuse(format!("file meta {name} is present")));
        }
    }
    if meta.private_information.is_some() {
        return Err(refuse("file meta PrivateInformation is present".into()));
    }
    Ok(())
}

/// The receiving node's check on every delivery (instances received, and instances answered as
/// already held): [`check_release_file`], and stricter:
/// - an attribute the flow's profile removes is absent, not merely empty;
/// - pseudonymised attributes hold a token of exactly the form the project writes (16 Crockford
///   base32 characters);
/// - on a trial flow, PatientID and PatientName hold the same trial subject ID (one component
///   of letters, digits, '.', '_' or '-': a person's name or a value with spaces is refused).
pub fn check_delivery_file(obj: &DefaultDicomObject, config: &DeidConfig) -> Result<(), DeidError> {
    check_release_file(obj, config)?;
    check_delivery_forms(obj, config, "")?;
    if config.subject_ids {
        let text = |tag| {
            obj.get(tag)
                .and_then(|e| e.to_str().ok())
                .map(|s| s.trim_matches(['\0', ' ']).to_string())
                .unwrap_or_default()
        };
        let (id, name) = (text(tags::PATIENT_ID), text(tags::PATIENT_NAME));
        if !is_subject_id(&id) {
            return Err(refuse(
                "PatientID is not a trial subject ID (trial flow)".into(),
            ));
        }
        if name != id {
            return Err(refuse(
                "PatientName is not the trial subject ID of PatientID (trial flow)".into(),
            ));
        }
    }
    Ok(())
}

/// The form of a trial subject ID as the origin's mapping gives it: 1-64 of `[A-Za-z0-9._-]`,
/// starting with a letter or digit.
fn is_subject_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A token exactly as `pseudonym::Tokenizer::token` writes it.
fn is_strict_token(s: &str) -> bool {
    const CROCKFORD: &[u8] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let s = s.trim_end_matches(['\0', ' ']);
    s.len() == 16 && s.bytes().all(|b| CROCKFORD.contains(&b))
}

fn check_delivery_forms(
    obj: &InMemDicomObject,
    config: &DeidConfig,
    path: &str,
) -> Result<(), DeidError> {
    for elem in obj.iter() {
        let tag = elem.header().tag;
        if let Value::Sequence(seq) = elem.value() {
            for (i, item) in seq.items().iter().enumerate() {
                check_delivery_forms(item, config, &format!("{path}{tag}[{i}]/"))?;
            }
        }
        if tag.group() % 2 == 1 || tag.group() == 0x0002 {
            continue;
        }
        let d = policy::decide_public(tag, elem.vr(), has_value(elem), config);
        let at = || format!("{} {path}{tag}", keyword_of(tag));
        match d.act {
            Act::Remove => {
                return Err(refuse(format!(
                    "{} is present although the profile removes it",
                    at()
                )));
            }
            Act::Token => {
                let trial_patient =
                    config.subject_ids && matches!(tag, tags::PATIENT_ID | tags::PATIENT_NAME);
                let text = elem.to_str().map(|s| s.into_owned()).unwrap_or_default();
                if !trial_patient && !is_strict_token(&text) {
                    return Err(refuse(format!(
                        "{} holds a value that is not a pseudonym of the form this project writes",
                        at()
                    )));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

fn refuse(reason: String) -> DeidError {
    DeidError::Quarantined { reason }
}

fn is_replaced_uid(u: &str) -> bool {
    let u = u.trim_end_matches(['\0', ' ']);
    u.is_empty()
        || u.starts_with("1.2.840.10008.")
        || (u.starts_with("2.25.") && u.len() > 5 && u[5..].bytes().all(|b| b.is_ascii_digit()))
}

/// A value that looks like a pacs-broker token (16 Crockford base32 characters).
fn is_token(s: &str) -> bool {
    let s = s.trim_end_matches(['\0', ' ']);
    s.len() == 16
        && s.bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
}

/// True when an element holds something: items, fragments, non-blank text, or any bytes.
/// Never renders binary values as text (pixel data would cost a string of millions of numbers).
pub(super) fn has_value(elem: &dicom_object::mem::InMemElement) -> bool {
    match elem.value() {
        Value::Sequence(s) => !s.items().is_empty(),
        Value::PixelSequence(_) => true,
        Value::Primitive(p)
            if values::is_text(elem.vr()) || matches!(elem.vr(), VR::UI | VR::DS | VR::IS) =>
        {
            !p.to_str().trim_matches(['\0', ' ']).is_empty()
        }
        Value::Primitive(p) => p.calculate_byte_len() > 0,
    }
}

/// The VR to judge an element by: its own, or, for a UN value longer than its dictionary VR's
/// 16-bit length can say (written as UN on purpose, PS3.5 6.2.2), the dictionary VR.
fn long_value_vr(elem: &dicom_object::mem::InMemElement) -> VR {
    use dicom_core::dictionary::{DataDictionary, VirtualVr};
    let vr = elem.vr();
    if vr != VR::UN {
        return vr;
    }
    let Value::Primitive(p) = elem.value() else {
        return vr;
    };
    match dicom_dictionary_std::StandardDataDictionary
        .by_tag(elem.header().tag)
        .map(|e| e.vr)
    {
        Some(VirtualVr::Exact(d))
            if super::engine::has_short_length(d) && p.calculate_byte_len() > 0xFFFE =>
        {
            d
        }
        _ => vr,
    }
}

fn check_dataset(obj: &InMemDicomObject, config: &DeidConfig, path: &str) -> Result<(), DeidError> {
    let retain_uids = config.options.contains(&ProfileOption::RetainUids);
    let mut creators: BTreeSet<(u16, u16)> = BTreeSet::new();
    let mut blocks_used: BTreeSet<(u16, u16)> = BTreeSet::new();
    for elem in obj.iter() {
        let tag = elem.header().tag;
        let at = || format!("{} {path}{tag}", keyword_of(tag));
        if tag.group() % 2 == 1 {
            if policy::is_private_creator(tag) {
                creators.insert((tag.group(), tag.element()));
                continue;
            }
            let creator = policy::private_block(tag)
                .and_then(|b| obj.get(Tag(tag.group(), b)))
                .and_then(|e| e.to_str().ok().map(|s| s.into_owned()));
            let d = policy::decide_private(tag, creator.as_deref(), config);
            if d.act != Act::Keep {
                return Err(refuse(format!(
                    "private attribute {path}{tag} not on the safe list"
                )));
            }
            if let Some(b) = policy::private_block(tag) {
                blocks_used.insert((tag.group(), b));
            }
            continue;
        }
        let present = has_value(elem);
        let d = policy::decide_public(tag, long_value_vr(elem), present, config);
        let retained_by_override = d.rule == super::policy::Rule::Override;
        match &d.act {
            Act::Remove if present => {
                let who = if retained_by_override {
                    "the agreement"
                } else {
                    "the profile"
                };
                return Err(refuse(format!("{} holds a value {who} removes", at())));
            }
            Act::Empty if present => {
                return Err(refuse(format!(
                    "{} holds a value the profile empties",
                    at()
                )));
            }
            Act::Token if !retained_by_override => {
                let text = elem.to_str().map(|s| s.into_owned()).unwrap_or_default();
                let subject_id = config.subject_ids
                    && matches!(tag, tags::PATIENT_ID | tags::PATIENT_NAME)
                    && !text.trim_end_matches(['\0', ' ']).is_empty();
                if !subject_id && !is_token(&text) {
                    return Err(refuse(format!(
                        "{} holds a value that is not a pseudonym",
                        at()
                    )));
                }
            }
            Act::Uid if !retain_uids => {
                if let Ok(v) = elem.to_multi_str() {
                    if !v.iter().all(|u| is_replaced_uid(u)) {
                        return Err(refuse(format!(
                            "{} holds a UID that was not replaced",
                            at()
                        )));
                    }
                }
            }
            _ => {}
        }
        if let Value::Sequence(seq) = elem.value() {
            for (i, item) in seq.items().iter().enumerate() {
                check_dataset(item, config, &format!("{path}{tag}[{i}]/"))?;
            }
        }
    }
    for (g, e) in creators {
        if !blocks_used.contains(&(g, e)) {
            return Err(refuse(format!(
                "private creator {path}{} without safe attributes",
                Tag(g, e)
            )));
        }
    }
    Ok(())
}
