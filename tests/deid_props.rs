//! Property tests of the engine on random datasets with random nesting: no X attribute survives,
//! no original UID survives anywhere, the same input and key give the same bytes, and every
//! reference equals the replacement of the UID it referred to.

mod deid_common;

use dicom_core::header::Header;
use dicom_core::value::Value;
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::mem::InMemDicomObject;
use pacs_broker::deid::table::{resolve, row_for, Action};
use pacs_broker::deid::{DeidConfig, DeidError, ProfileOption};
use proptest::prelude::*;

use deid_common::*;

/// Text attributes the table removes (X) or empties (Z), with their VR.
const PHI_TEXT: &[(Tag, VR)] = &[
    (tags::PATIENT_ADDRESS, VR::LO),
    (tags::OTHER_PATIENT_NAMES, VR::PN),
    (tags::PATIENT_MOTHER_BIRTH_NAME, VR::PN),
    (tags::MILITARY_RANK, VR::LO),
    (tags::PATIENT_COMMENTS, VR::LT),
    (tags::STUDY_DESCRIPTION, VR::LO),
    (tags::REFERRING_PHYSICIAN_NAME, VR::PN),
    (tags::INSTITUTION_ADDRESS, VR::ST),
    (tags::PERFORMING_PHYSICIAN_NAME, VR::PN),
    (tags::PATIENT_BIRTH_DATE, VR::DA),
    (tags::LAST_MENSTRUAL_DATE, VR::DA),
    (tags::TEXT_VALUE, VR::UT),
    (tags::PERSON_NAME, VR::PN),
];
/// UID attributes, replaced (U) by the table or by the default for UIDs.
const UID_TAGS: &[Tag] = &[
    tags::REFERENCED_SOP_INSTANCE_UID,
    tags::FRAME_OF_REFERENCE_UID,
    tags::SERIES_INSTANCE_UID,
    tags::STUDY_INSTANCE_UID,
    tags::UID,
    tags::SOURCE_FRAME_OF_REFERENCE_UID,
    tags::TRACKING_UID,
];
/// Sequences: kept (not in the table), X/Z/U*, D, and X (removed with their content).
const SEQ_TAGS: &[Tag] = &[
    tags::ANATOMIC_REGION_SEQUENCE,
    tags::REFERENCED_IMAGE_SEQUENCE,
    tags::SOURCE_IMAGE_SEQUENCE,
    tags::CONTENT_SEQUENCE,
    tags::REFERENCED_STUDY_SEQUENCE,
    tags::PREDECESSOR_DOCUMENTS_SEQUENCE,
];

fn pool(i: usize) -> String {
    format!("1.2.826.0.1.3680043.99.{}", i + 1)
}

#[derive(Debug, Clone)]
enum Node {
    Text(usize, String),
    Uid(usize, usize),
    Private(u16, u8, String),
    Seq(usize, Vec<Vec<Node>>),
}

fn node() -> impl Strategy<Value = Node> {
    let leaf = prop_oneof![
        (0..PHI_TEXT.len(), "[A-Z]{4,10}").prop_map(|(t, v)| Node::Text(t, v)),
        (0..UID_TAGS.len(), 0..6usize).prop_map(|(t, u)| Node::Uid(t, u)),
        (0..4u16, 0..4u8, "[A-Z]{4,10}").prop_map(|(g, e, v)| Node::Private(0x0009 + 2 * g, e, v)),
    ];
    leaf.prop_recursive(6, 64, 4, |inner| {
        (
            0..SEQ_TAGS.len(),
            prop::collection::vec(prop::collection::vec(inner, 0..4), 1..3),
        )
            .prop_map(|(t, items)| Node::Seq(t, items))
    })
}

fn build(nodes: &[Node]) -> InMemDicomObject {
    let mut o = InMemDicomObject::new_empty();
    for n in nodes {
        match n {
            Node::Text(t, v) => {
                let (tag, vr) = PHI_TEXT[*t];
                let v = if vr == VR::DA {
                    "20010203".to_string()
                } else {
                    v.clone()
                };
                o.put(text(tag, vr, &v));
            }
            Node::Uid(t, u) => {
                o.put(text(UID_TAGS[*t], VR::UI, &pool(*u)));
            }
            Node::Private(g, e, v) => {
                o.put(text(Tag(*g, 0x0010), VR::LO, "RANDOM VENDOR"));
                o.put(DataElement::new(
                    Tag(*g, 0x1000 | u16::from(*e)),
                    VR::UN,
                    PrimitiveValue::from(v.as_bytes().to_vec()),
                ));
            }
            Node::Seq(t, items) => {
                o.put(seq(SEQ_TAGS[*t], items.iter().map(|i| build(i)).collect()));
            }
        }
    }
    o
}

fn instance(nodes: &[Node]) -> dicom_object::DefaultDicomObject {
    let mut inner = build(nodes);
    // The instance's own UIDs come from the same pool as the references.
    for (tag, i) in [
        (tags::SOP_INSTANCE_UID, 0),
        (tags::STUDY_INSTANCE_UID, 1),
        (tags::SERIES_INSTANCE_UID, 2),
    ] {
        inner.put(text(tag, VR::UI, &pool(i)));
    }
    let base = ct(&pool(1), &pool(2), &pool(0), vec![]);
    let mut o = base.into_inner();
    for e in inner.into_iter() {
        o.put(e);
    }
    file(o)
}

fn uid_paths(obj: &InMemDicomObject) -> Vec<(String, String)> {
    walk(obj)
        .into_iter()
        .filter(|(_, e)| e.vr() == VR::UI && !matches!(e.value(), Value::Sequence(_)))
        .map(|(p, e)| (format!("{p}{}", e.tag()), str_of(&e)))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn random_nested_datasets(nodes in prop::collection::vec(node(), 0..12), modified_dates in any::<bool>()) {
        let options: Vec<ProfileOption> = if modified_dates { vec![ProfileOption::RetainLongitudinalModifiedDates] } else { vec![] };
        let deid = deidentifier(&options);
        let config = DeidConfig { options: options.iter().copied().collect(), ..DeidConfig::default() };
        let tok = keys().tokenizer("DSA-TEST-1").unwrap();
        let input = instance(&nodes);
        let input_uids = uid_paths(&input);
        let first = deid.deidentify(input.clone());
        let second = deid.deidentify(input);
        match (first, second) {
            (Ok(a), Ok(b)) => {
                prop_assert_eq!(bytes(&a.object), bytes(&b.object), "same input and key, same output");
                for (path, e) in walk(&a.object) {
                    if e.tag().group() % 2 == 1 {
                        prop_assert!(false, "private attribute survived at {}{}", path, e.tag());
                    }
                    if let Some(row) = row_for(e.tag()) {
                        let (act, _) = resolve(row, &config.options);
                        let has_value = match e.value() {
                            Value::Sequence(s) => !s.items().is_empty(),
                            _ => !str_of(&e).is_empty(),
                        };
                        prop_assert!(!(act == Action::X && has_value), "X attribute {}{} survived", path, e.tag());
                    }
                }
                let originals: Vec<String> = (0..6).map(pool).collect();
                let out_uids = uid_paths(&a.object);
                for (path, v) in &out_uids {
                    for u in v.split('\\') {
                        prop_assert!(!originals.iter().any(|o| o == u), "original UID at {}", path);
                    }
                }
                // Every UID that survived at a path holds the replacement of the original there.
                for (path, orig) in &input_uids {
                    if let Some((_, new)) = out_uids.iter().find(|(p, _)| p == path) {
                        if !orig.starts_with("1.2.840.10008.") {
                            prop_assert_eq!(new, &tok.uid(orig), "reference at {} not remapped like its target", path);
                        }
                    }
                }
                prop_assert_eq!(&a.sop_instance_uid, &tok.uid(&pool(0)));
            }
            (Err(DeidError::Quarantined { reason: a }), Err(DeidError::Quarantined { reason: b })) => {
                prop_assert_eq!(&a, &b);
                for n in &nodes {
                    if let Node::Text(_, v) = n {
                        prop_assert!(!a.contains(v.as_str()), "reason carries a value");
                    }
                }
            }
            (a, b) => prop_assert!(false, "unexpected or inconsistent outcomes: {:?} / {:?}", a.err(), b.err()),
        }
    }
}
