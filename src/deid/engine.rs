//! The walk: every element at every depth gets the action [`policy`] decides, then the
//! de-identification record is added, the file meta group is cleaned, and the output is checked
//! by the residual-PHI verifier and the release check before it is handed back.

use std::collections::{HashMap, HashSet};

use dicom_core::header::Header;
use dicom_core::value::{DataSetSequence, PrimitiveValue, Value};
use dicom_core::{DataElement, Length, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::mem::{InMemDicomObject, InMemElement};

use super::policy::{self, Act, Decision};
use super::values::{self, dummy, scrub, shift_values};
use super::{keyword_of, Change, DeidConfig, ProfileOption};
use crate::pseudonym::{Tokenizer, VaultEntry};

/// State of one instance's de-identification.
pub(super) struct Work<'a> {
    pub tok: &'a Tokenizer,
    pub config: &'a DeidConfig,
    pub offset: i64,
    pub patient_token: String,
    pub scrub_terms: Vec<String>,
    pub vault: Vec<(String, VaultEntry)>,
    pub vault_seen: HashSet<String>,
    pub changes: Vec<Change>,
    pub record_values: bool,
}

/// A short printable form of a value, for previews only (never logged).
fn describe(elem: &InMemElement) -> String {
    match elem.value() {
        Value::Sequence(s) => format!("<{} item(s)>", s.items().len()),
        Value::PixelSequence(f) => format!("<{} fragment(s)>", f.fragments().len()),
        Value::Primitive(p) => {
            if values::is_text(elem.vr())
                || elem.vr() == VR::UI
                || matches!(elem.vr(), VR::DS | VR::IS)
            {
                let s = p.to_str();
                let s = s.trim_matches(['\0', ' ']);
                if s.chars().count() > 64 {
                    format!("{}...", s.chars().take(64).collect::<String>())
                } else {
                    s.to_string()
                }
            } else if p.calculate_byte_len() > 64 {
                format!("<{} bytes>", p.calculate_byte_len())
            } else {
                p.to_str().into_owned()
            }
        }
    }
}

use super::verify::has_value;

/// Gives public elements read with VR UN (explicit files written by tools that lost the VR, or
/// implicit files read without a dictionary entry) their dictionary VR, so they are de-identified
/// like any other value: text, DS/IS and UIDs always; binary numbers when the file is little
/// endian; sequences when their items have defined lengths (UN sequences are implicit VR little
/// endian, PS3.5 6.2.2). Recurses into sequences. Values it cannot decode stay UN, and the policy
/// removes them (they cannot be inspected).
pub(super) fn normalise_un(obj: &mut InMemDicomObject, little_endian: bool) {
    use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
    let tags_: Vec<Tag> = obj.tags().collect();
    for tag in tags_ {
        let needs = obj
            .get(tag)
            .is_some_and(|e| e.vr() == VR::UN || matches!(e.value(), Value::Sequence(_)));
        if !needs {
            continue;
        }
        let Some(mut elem) = obj.take(tag) else {
            continue;
        };
        if let Some(items) = elem.items_mut() {
            for item in items.iter_mut() {
                normalise_un(item, little_endian);
            }
            obj.put(elem);
            continue;
        }
        let dict_vr = dicom_dictionary_std::StandardDataDictionary
            .by_tag(tag)
            .and_then(|e| e.vr().exact())
            .filter(|_| tag.group() % 2 == 0);
        let converted = match (dict_vr, elem.value()) {
            (Some(vr), Value::Primitive(p)) => decode_un(tag, vr, &p.to_bytes(), little_endian),
            _ => None,
        };
        elem = converted.unwrap_or(elem);
        obj.put(elem);
    }
}

/// True for VRs whose explicit VR header has a 16-bit length (PS3.5 Table 7.1-2).
pub(super) fn has_short_length(vr: VR) -> bool {
    !matches!(
        vr,
        VR::OB
            | VR::OD
            | VR::OF
            | VR::OL
            | VR::OV
            | VR::OW
            | VR::SQ
            | VR::SV
            | VR::UC
            | VR::UN
            | VR::UR
            | VR::UT
            | VR::UV
    )
}

/// In explicit VR, a value longer than its VR's 16-bit length field can say (65,534 bytes:
/// Contour Data of a large structure, say) is written as UN (PS3.5 6.2.2), as dcmtk does; the
/// encoder would otherwise fail ("Could not write element value"). Only values the engine has
/// already judged (they are kept as they are) pass here; the receiver's check judges them by
/// their dictionary VR. Text in any byte order, binary numbers in little endian only.
pub(super) fn fit_16bit_lengths(obj: &mut InMemDicomObject, little_endian: bool) {
    let long: Vec<Tag> = obj
        .iter()
        .filter(|e| match e.value() {
            Value::Sequence(_) => true,
            Value::Primitive(p) => has_short_length(e.vr()) && p.calculate_byte_len() > 0xFFFE,
            Value::PixelSequence(_) => false,
        })
        .map(|e| e.tag())
        .collect();
    for tag in long {
        let Some(mut elem) = obj.take(tag) else {
            continue;
        };
        if let Some(items) = elem.items_mut() {
            for item in items.iter_mut() {
                fit_16bit_lengths(item, little_endian);
            }
            obj.put(elem);
            continue;
        }
        let bytes = match elem.value() {
            Value::Primitive(p) => as_un_bytes(elem.vr(), p, little_endian),
            _ => None,
        };
        let elem = match bytes {
            Some(b) => DataElement::new(tag, VR::UN, PrimitiveValue::from(b)),
            None => elem,
        };
        obj.put(elem);
    }
}

/// The bytes of a value as its VR encodes them (even length), for writing it as UN.
fn as_un_bytes(vr: VR, p: &PrimitiveValue, little_endian: bool) -> Option<Vec<u8>> {
    let mut b: Vec<u8> = match p {
        PrimitiveValue::Str(_) | PrimitiveValue::Strs(_) => p.to_str().as_bytes().to_vec(),
        _ if !little_endian => return None,
        PrimitiveValue::U16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        PrimitiveValue::I16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        PrimitiveValue::U32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        PrimitiveValue::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        PrimitiveValue::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        PrimitiveValue::F64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        _ => return None,
    };
    if b.len() % 2 == 1 {
        b.push(if vr == VR::UI { 0 } else { b' ' });
    }
    Some(b)
}

fn decode_un(tag: Tag, vr: VR, bytes: &[u8], little_endian: bool) -> Option<InMemElement> {
    let le16 = |c: &[u8]| u16::from_le_bytes([c[0], c[1]]);
    let le32 = |c: &[u8]| u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    let value = match vr {
        vr if values::is_text(vr) || matches!(vr, VR::UI | VR::DS | VR::IS) => {
            let text: String = bytes.iter().map(|&b| b as char).collect();
            let parts: Vec<String> = text
                .trim_end_matches(['\0', ' '])
                .split('\\')
                .map(str::to_string)
                .collect();
            PrimitiveValue::Strs(parts.into())
        }
        _ if !little_endian => return None,
        VR::US if bytes.len().is_multiple_of(2) => {
            PrimitiveValue::U16(bytes.chunks(2).map(le16).collect())
        }
        VR::SS if bytes.len().is_multiple_of(2) => {
            PrimitiveValue::I16(bytes.chunks(2).map(|c| le16(c) as i16).collect())
        }
        VR::UL if bytes.len().is_multiple_of(4) => {
            PrimitiveValue::U32(bytes.chunks(4).map(le32).collect())
        }
        VR::SL if bytes.len().is_multiple_of(4) => {
            PrimitiveValue::I32(bytes.chunks(4).map(|c| le32(c) as i32).collect())
        }
        VR::FL if bytes.len().is_multiple_of(4) => {
            PrimitiveValue::F32(bytes.chunks(4).map(|c| f32::from_bits(le32(c))).collect())
        }
        VR::FD if bytes.len().is_multiple_of(8) => PrimitiveValue::F64(
            bytes
                .chunks(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                .collect(),
        ),
        VR::AT if bytes.len().is_multiple_of(4) => PrimitiveValue::Tags(
            bytes
                .chunks(4)
                .map(|c| Tag(le16(&c[..2]), le16(&c[2..])))
                .collect(),
        ),
        VR::SQ => return decode_un_sequence(tag, bytes),
        _ => return None,
    };
    Some(DataElement::new(tag, vr, value))
}

/// Items of a sequence stored as UN: implicit VR little endian, each item of defined length.
fn decode_un_sequence(tag: Tag, bytes: &[u8]) -> Option<InMemElement> {
    use dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN;
    let mut items = Vec::new();
    let mut pos = 0usize;
    while pos < bytes.len() {
        let head = bytes.get(pos..pos + 8)?;
        let (g, e) = (
            u16::from_le_bytes([head[0], head[1]]),
            u16::from_le_bytes([head[2], head[3]]),
        );
        let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
        pos += 8;
        match (g, e) {
            (0xFFFE, 0xE0DD) => break,
            (0xFFFE, 0xE000) if len != u32::MAX => {
                let body = bytes.get(pos..pos.checked_add(len as usize)?)?;
                // The parser reserves declared lengths before reading; the file's guard did not
                // look inside this value, so its item is checked here (else left as UN, and the
                // UN default removes it).
                super::guard::check_dataset_lengths(body, false, true).ok()?;
                let mut item = InMemDicomObject::read_dataset_with_ts(
                    body,
                    &IMPLICIT_VR_LITTLE_ENDIAN.erased(),
                )
                .ok()?;
                normalise_un(&mut item, true);
                items.push(item);
                pos += len as usize;
            }
            _ => return None,
        }
    }
    Some(DataElement::new(
        tag,
        VR::SQ,
        DataSetSequence::new(items, Length::UNDEFINED),
    ))
}

impl Work<'_> {
    fn record(
        &mut self,
        path: &str,
        tag: Tag,
        d: &Decision,
        action: &'static str,
        before: Option<&InMemElement>,
        after: Option<&InMemElement>,
    ) {
        // Only a preview reads the changes; de-identifying for release skips the bookkeeping.
        if !self.record_values {
            return;
        }
        self.changes.push(Change {
            path: format!("{path}{tag}"),
            keyword: keyword_of(tag).to_string(),
            action,
            rule: d.rule.to_string(),
            before: before.map(describe),
            after: after.map(describe),
        });
    }

    /// Processes every element of one dataset (the top level or a sequence item).
    pub fn dataset(&mut self, obj: &mut InMemDicomObject, path: &str) {
        let creators: HashMap<(u16, u16), String> = obj
            .iter()
            .filter(|e| policy::is_private_creator(e.tag()))
            .filter_map(|e| {
                Some((
                    (e.tag().group(), e.tag().element()),
                    e.to_str().ok()?.into_owned(),
                ))
            })
            .collect();
        let all: Vec<Tag> = obj.tags().collect();
        let mut kept_blocks: HashSet<(u16, u16)> = HashSet::new();
        let mut removed_overlay_groups: HashSet<u16> = HashSet::new();
        for tag in all
            .iter()
            .copied()
            .filter(|t| !policy::is_private_creator(*t))
        {
            let Some(elem) = obj.take(tag) else { continue };
            let decision = if tag.group() % 2 == 1 {
                let creator =
                    policy::private_block(tag).and_then(|b| creators.get(&(tag.group(), b)));
                policy::decide_private(tag, creator.map(String::as_str), self.config)
            } else {
                policy::decide_public(tag, elem.vr(), has_value(&elem), self.config)
            };
            match self.apply(elem, &decision, path) {
                Some(new) => {
                    if let Some(b) = policy::private_block(tag).filter(|_| tag.group() % 2 == 1) {
                        kept_blocks.insert((tag.group(), b));
                    }
                    obj.put(new);
                }
                None => {
                    if tag.group() & 0xFF00 == 0x6000 && tag.element() == 0x3000 {
                        removed_overlay_groups.insert(tag.group());
                    }
                }
            }
        }
        for tag in all
            .iter()
            .copied()
            .filter(|t| policy::is_private_creator(*t))
        {
            if !kept_blocks.contains(&(tag.group(), tag.element())) {
                let d = Decision {
                    act: Act::Remove,
                    rule: policy::Rule::Text(
                        "private creator of a block with no retained attribute",
                    ),
                    table_action: None,
                };
                let before = obj.take(tag);
                self.record(path, tag, &d, "X", before.as_ref(), None);
            }
        }
        for group in removed_overlay_groups {
            let rest: Vec<Tag> = obj.tags().filter(|t| t.group() == group).collect();
            for tag in rest {
                let d = Decision {
                    act: Act::Remove,
                    rule: policy::Rule::Text(
                        "rest of an overlay group whose Overlay Data (60xx,3000) was removed",
                    ),
                    table_action: None,
                };
                let before = obj.take(tag);
                self.record(path, tag, &d, "X", before.as_ref(), None);
            }
        }
    }

    fn sequence(&mut self, elem: InMemElement, path: &str) -> InMemElement {
        let tag = elem.tag();
        let (_, value) = elem.into_parts();
        let mut items = value.into_items().unwrap_or_default();
        for (i, item) in items.iter_mut().enumerate() {
            self.dataset(item, &format!("{path}{tag}[{i}]/"));
        }
        DataElement::new(tag, VR::SQ, DataSetSequence::new(items, Length::UNDEFINED))
    }

    fn apply(&mut self, elem: InMemElement, d: &Decision, path: &str) -> Option<InMemElement> {
        let tag = elem.tag();
        let vr = elem.vr();
        let is_seq = matches!(elem.value(), Value::Sequence(_));
        let new = match &d.act {
            Act::Keep if is_seq => return Some(self.sequence(elem, path)),
            Act::Keep => return Some(elem),
            Act::Remove => {
                self.record(path, tag, d, "X", Some(&elem), None);
                return None;
            }
            Act::Empty if is_seq => DataElement::new(
                tag,
                VR::SQ,
                DataSetSequence::new(Vec::<InMemDicomObject>::new(), Length::UNDEFINED),
            ),
            Act::Empty => DataElement::empty(tag, vr),
            Act::Dummy if is_seq => {
                self.record(path, tag, d, "D (items processed)", None, None);
                return Some(self.sequence(elem, path));
            }
            Act::Dummy | Act::Token => self.dummy_or_token(&elem, matches!(d.act, Act::Token)),
            Act::Fixed(v) => DataElement::new(tag, vr, PrimitiveValue::from(v.as_str())),
            Act::Uid => self.uids(&elem),
            Act::Clean if is_seq => {
                self.record(path, tag, d, "C (items processed)", None, None);
                return Some(self.sequence(elem, path));
            }
            Act::Clean => match self.clean(&elem) {
                Some(new) => new,
                None => return Some(elem),
            },
        };
        if !has_value(&elem) && !has_value(&new) {
            return Some(new);
        }
        let code = d.act.code();
        self.record(path, tag, d, code, Some(&elem), Some(&new));
        Some(new)
    }

    fn vault_push(&mut self, token: &str, attribute: &str, original: &str) {
        if original.is_empty() || !self.vault_seen.insert(format!("{attribute}\u{1f}{token}")) {
            return;
        }
        self.vault.push((
            token.to_string(),
            VaultEntry {
                attribute: attribute.to_string(),
                original: original.to_string(),
            },
        ));
    }

    fn dummy_or_token(&mut self, elem: &InMemElement, token_wanted: bool) -> InMemElement {
        let tag = elem.tag();
        let vr = elem.vr();
        if vr == VR::UI {
            return self.uids(elem);
        }
        let tokenisable = values::is_free_text(vr) || vr == VR::CS;
        if !(tokenisable || token_wanted && values::is_text(vr)) {
            return DataElement::new(tag, vr, dummy(vr));
        }
        let orig = elem
            .to_str()
            .map(|s| s.trim_matches(['\0', ' ']).to_string())
            .unwrap_or_default();
        if orig.is_empty() && !token_wanted {
            return DataElement::new(tag, vr, dummy(vr));
        }
        let token = if tag == tags::PATIENT_ID || tag == tags::PATIENT_NAME {
            self.patient_token.clone()
        } else {
            let kw = keyword_of(tag);
            let t = self.tok.token(kw, &orig);
            self.vault_push(&t, kw, &orig);
            t
        };
        DataElement::new(tag, vr, PrimitiveValue::from(token))
    }

    fn uids(&mut self, elem: &InMemElement) -> InMemElement {
        let tag = elem.tag();
        let values = elem
            .to_multi_str()
            .map(|v| v.into_owned())
            .unwrap_or_default();
        let mapped: Vec<String> = values
            .iter()
            .map(|u| u.trim_matches(['\0', ' ']))
            .map(|u| {
                if u.is_empty() || u.starts_with("1.2.840.10008.") {
                    u.to_string()
                } else {
                    self.tok.uid(u)
                }
            })
            .collect();
        DataElement::new(tag, VR::UI, PrimitiveValue::Strs(mapped.into()))
    }

    /// The C action for a non-sequence value; `None` when the value is already clean.
    fn clean(&mut self, elem: &InMemElement) -> Option<InMemElement> {
        let tag = elem.tag();
        let vr = elem.vr();
        match vr {
            VR::DA | VR::DT => {
                if !self
                    .config
                    .options
                    .contains(&ProfileOption::RetainLongitudinalModifiedDates)
                {
                    return Some(DataElement::empty(tag, vr));
                }
                let values = elem.to_multi_str().ok()?.into_owned();
                Some(match shift_values(&values, vr, self.offset) {
                    Some(v) => DataElement::new(tag, vr, PrimitiveValue::Strs(v.into())),
                    None => DataElement::empty(tag, vr),
                })
            }
            // Whole-day shifts leave the time of day as it was.
            VR::TM => None,
            vr if values::is_free_text(vr) => {
                let text = elem.to_str().ok()?.into_owned();
                let (cleaned, changed) = scrub(&text, &self.scrub_terms);
                changed.then(|| DataElement::new(tag, vr, PrimitiveValue::from(cleaned)))
            }
            _ => None,
        }
    }
}
