//! De-identification engine behaviour on constructed instances: nesting, reference consistency,
//! dates, private attributes, burned-in text, the residual-PHI verifier and the release check.

mod deid_common;

use dicom_core::header::Header;
use dicom_core::value::Value;
use dicom_core::{DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use pacs_broker::deid::{
    check_release, check_release_file, AttributeOverride, DeidConfig, DeidError, Deidentifier,
    OverrideAction, PixelCleanRule, ProfileOption, SafePrivate,
};
use pacs_broker::pseudonym::SiteKeys;

use deid_common::*;

const PHI: &[&str] = &[
    "DOE",
    "JANE",
    "MRN0042",
    "19610203",
    "ACC778899",
    "St Elsewhere General",
];

fn assert_no_phi(out: &dicom_object::DefaultDicomObject) {
    for (path, e) in walk(out) {
        if matches!(e.vr(), VR::OW | VR::OB | VR::SQ) {
            continue;
        }
        let v = str_of(&e).to_ascii_uppercase();
        for p in PHI {
            assert!(
                !v.contains(&p.to_ascii_uppercase()),
                "{p} survived at {path}{}",
                e.tag()
            );
        }
    }
}

#[test]
fn identifiers_are_removed_at_every_depth() {
    // Five levels of nesting, each with a name, an ID and a UID.
    let mut inner = item(vec![
        text(tags::PERSON_NAME, VR::PN, "DOE^JANE"),
        text(tags::PATIENT_ID, VR::LO, "MRN0042"),
        text(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, "1.2.3.4.5"),
        text(tags::PATIENT_ADDRESS, VR::LO, "1 Main Street, Springfield"),
    ]);
    for depth in 0..5 {
        inner = item(vec![
            seq(tags::CONTENT_SEQUENCE, vec![inner]),
            text(tags::OPERATORS_NAME, VR::PN, &format!("DOE^JANE{depth}")),
            text(tags::INSTITUTION_NAME, VR::LO, "St Elsewhere General"),
        ]);
    }
    let obj = ct(
        "1.2.3",
        "1.2.3.1",
        "1.2.3.1.1",
        vec![seq(tags::ANATOMIC_REGION_SEQUENCE, vec![inner])],
    );
    let d = deidentifier(&[ProfileOption::CleanStructuredContent])
        .deidentify(obj)
        .expect("released");
    assert_no_phi(&d.object);
    let all = walk(&d.object);
    assert!(
        all.iter().all(|(_, e)| e.tag() != tags::PATIENT_ADDRESS),
        "X attribute at depth survived"
    );
    let person_names: Vec<_> = all
        .iter()
        .filter(|(_, e)| e.tag() == tags::PERSON_NAME)
        .collect();
    assert_eq!(
        person_names.len(),
        1,
        "the deepest Person Name is kept as a dummy (D)"
    );
    assert_eq!(
        str_of(&person_names[0].1).len(),
        16,
        "D on a name is the agreement's token"
    );
}

#[test]
fn references_stay_consistent_across_instances() {
    let keys = keys();
    let tok = keys.tokenizer("DSA-TEST-1").unwrap();
    let ct1 = ct("1.2.3", "1.2.3.1", "1.2.3.1.1", vec![]);
    // An RT structure set referencing the CT's frame of reference, study, series and instance.
    let contour_image = item(vec![
        text(tags::REFERENCED_SOP_CLASS_UID, VR::UI, CT_IMAGE_STORAGE),
        text(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, "1.2.3.1.1"),
    ]);
    let series = item(vec![
        text(tags::SERIES_INSTANCE_UID, VR::UI, "1.2.3.1"),
        seq(tags::CONTOUR_IMAGE_SEQUENCE, vec![contour_image]),
    ]);
    let study = item(vec![
        text(
            tags::REFERENCED_SOP_CLASS_UID,
            VR::UI,
            "1.2.840.10008.3.1.2.3.1",
        ),
        text(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, "1.2.3"),
        seq(tags::RT_REFERENCED_SERIES_SEQUENCE, vec![series]),
    ]);
    let for_item = item(vec![
        text(tags::FRAME_OF_REFERENCE_UID, VR::UI, "1.2.3.9"),
        seq(tags::RT_REFERENCED_STUDY_SEQUENCE, vec![study]),
    ]);
    let predecessor = item(vec![
        text(tags::STUDY_INSTANCE_UID, VR::UI, "1.2.3"),
        seq(
            tags::REFERENCED_SERIES_SEQUENCE,
            vec![item(vec![
                text(tags::SERIES_INSTANCE_UID, VR::UI, "1.2.3.1"),
                seq(
                    tags::REFERENCED_SOP_SEQUENCE,
                    vec![item(vec![
                        text(tags::REFERENCED_SOP_CLASS_UID, VR::UI, CT_IMAGE_STORAGE),
                        text(tags::REFERENCED_SOP_INSTANCE_UID, VR::UI, "1.2.3.1.1"),
                    ])],
                ),
            ])],
        ),
    ]);
    let rtstruct = ct(
        "1.2.3",
        "1.2.3.2",
        "1.2.3.2.1",
        vec![
            text(tags::SOP_CLASS_UID, VR::UI, "1.2.840.10008.5.1.4.1.1.481.3"),
            text(tags::MODALITY, VR::CS, "RTSTRUCT"),
            seq(tags::REFERENCED_FRAME_OF_REFERENCE_SEQUENCE, vec![for_item]),
            seq(tags::PREDECESSOR_DOCUMENTS_SEQUENCE, vec![predecessor]),
        ],
    );
    let deid = deidentifier(&[]);
    let a = deid.deidentify(ct1).expect("ct");
    let b = deid.deidentify(rtstruct).expect("rtstruct");
    assert_eq!(a.study_uid, b.study_uid);
    assert_eq!(a.sop_instance_uid, tok.uid("1.2.3.1.1"));
    let refs: Vec<String> = walk(&b.object)
        .into_iter()
        .filter(|(_, e)| e.tag() == tags::REFERENCED_SOP_INSTANCE_UID)
        .map(|(_, e)| str_of(&e))
        .collect();
    assert_eq!(refs.len(), 3);
    assert!(refs.contains(&a.sop_instance_uid) && refs.contains(&a.study_uid));
    let fors: Vec<String> = walk(&b.object)
        .into_iter()
        .filter(|(_, e)| e.tag() == tags::FRAME_OF_REFERENCE_UID)
        .map(|(_, e)| str_of(&e))
        .collect();
    let a_for = str_of(
        a.object
            .get(tags::FRAME_OF_REFERENCE_UID)
            .expect("FoR kept, remapped"),
    );
    assert!(a_for.starts_with("2.25."));
    assert!(
        fors.iter().all(|f| *f == a_for),
        "frame of reference remapped the same everywhere"
    );
    let series_refs: Vec<String> = walk(&b.object)
        .into_iter()
        .filter(|(p, e)| !p.is_empty() && e.tag() == tags::SERIES_INSTANCE_UID)
        .map(|(_, e)| str_of(&e))
        .collect();
    assert_eq!(
        series_refs,
        vec![a.series_uid.clone(), a.series_uid.clone()]
    );
    assert_eq!(
        b.object.meta().media_storage_sop_instance_uid,
        b.sop_instance_uid
    );
}

#[test]
fn record_of_deidentification_is_written() {
    let d = deidentifier(&[
        ProfileOption::RetainLongitudinalModifiedDates,
        ProfileOption::CleanDescriptors,
    ])
    .deidentify(ct("1.2.3", "1.2.3.1", "1.2.3.1.1", vec![]))
    .unwrap();
    let o = &d.object;
    assert_eq!(
        str_of(o.get(tags::PATIENT_IDENTITY_REMOVED).unwrap()),
        "YES"
    );
    assert_eq!(
        str_of(
            o.get(tags::LONGITUDINAL_TEMPORAL_INFORMATION_MODIFIED)
                .unwrap()
        ),
        "MODIFIED"
    );
    let codes: Vec<String> = o
        .get(tags::DEIDENTIFICATION_METHOD_CODE_SEQUENCE)
        .unwrap()
        .items()
        .unwrap()
        .iter()
        .map(|i| str_of(i.get(tags::CODE_VALUE).unwrap()))
        .collect();
    assert_eq!(codes, vec!["113100", "113107", "113105"]);
}

#[test]
fn dates_shift_by_one_offset_per_patient_and_x_dates_are_removed() {
    let deid = deidentifier(&[ProfileOption::RetainLongitudinalModifiedDates]);
    let first = ct(
        "1.2.3",
        "1.2.3.1",
        "1.2.3.1.1",
        vec![text(tags::LAST_MENSTRUAL_DATE, VR::DA, "20231201")],
    );
    let mut later = ct("1.2.4", "1.2.4.1", "1.2.4.1.1", vec![]);
    later.put(text(tags::STUDY_DATE, VR::DA, "20240210"));
    let a = deid.deidentify(first).unwrap();
    let b = deid.deidentify(later).unwrap();
    let date = |o: &dicom_object::DefaultDicomObject| {
        let s = str_of(o.get(tags::STUDY_DATE).unwrap());
        time::Date::parse(&s, time::macros::format_description!("[year][month][day]")).unwrap()
    };
    assert_ne!(str_of(a.object.get(tags::STUDY_DATE).unwrap()), "20240110");
    assert_eq!(
        (date(&b.object) - date(&a.object)).whole_days(),
        31,
        "interval between studies survives"
    );
    assert_ne!(
        str_of(a.object.get(tags::LAST_MENSTRUAL_DATE).unwrap()),
        "20231201",
        "shifted (option C)"
    );
    let basic = deidentifier(&[])
        .deidentify(ct(
            "1.2.3",
            "1.2.3.1",
            "1.2.3.1.1",
            vec![text(tags::LAST_MENSTRUAL_DATE, VR::DA, "20231201")],
        ))
        .unwrap();
    assert!(
        basic.object.get(tags::LAST_MENSTRUAL_DATE).is_none(),
        "an X date is removed, not dummied"
    );
    // Same patient, another run: same offset. Another agreement: another offset/token.
    let again = deidentifier(&[ProfileOption::RetainLongitudinalModifiedDates])
        .deidentify(ct("1.2.3", "1.2.3.1", "1.2.3.1.1", vec![]))
        .unwrap();
    assert_eq!(date(&again.object), date(&a.object));
    let other = Deidentifier::new(
        DeidConfig {
            options: [ProfileOption::RetainLongitudinalModifiedDates].into(),
            ..DeidConfig::default()
        },
        keys().tokenizer("DSA-OTHER").unwrap(),
    )
    .deidentify(ct("1.2.3", "1.2.3.1", "1.2.3.1.1", vec![]))
    .unwrap();
    assert_ne!(other.patient_token, a.patient_token);
    assert_eq!(a.patient_token, again.patient_token);
}

#[test]
fn without_date_options_dates_are_emptied_and_longitudinal_removed() {
    let d = deidentifier(&[])
        .deidentify(ct("1.2.3", "1.2.3.1", "1.2.3.1.1", vec![]))
        .unwrap();
    assert_eq!(str_of(d.object.get(tags::STUDY_DATE).unwrap()), "");
    assert_eq!(
        str_of(
            d.object
                .get(tags::LONGITUDINAL_TEMPORAL_INFORMATION_MODIFIED)
                .unwrap()
        ),
        "REMOVED"
    );
}

fn private_block(
    creator: &str,
    vr_of_data: VR,
) -> Vec<DataElement<dicom_object::mem::InMemDicomObject>> {
    vec![
        text(Tag(0x0009, 0x0010), VR::LO, creator),
        DataElement::new(Tag(0x0009, 0x1001), VR::DS, PrimitiveValue::from("1.5")),
        DataElement::new(
            Tag(0x0009, 0x1002),
            vr_of_data,
            PrimitiveValue::from(b"DOE^JANE".to_vec()),
        ),
        text(Tag(0x0011, 0x0010), VR::LO, "OTHER VENDOR"),
        text(Tag(0x0011, 0x1001), VR::LO, "MRN0042"),
    ]
}

#[test]
fn private_attributes_removed_unless_on_the_safe_list() {
    let obj = ct(
        "1.2.3",
        "1.2.3.1",
        "1.2.3.1.1",
        private_block("ACME 1.0", VR::UN),
    );
    let d = deidentifier(&[]).deidentify(obj).unwrap();
    assert!(walk(&d.object)
        .iter()
        .all(|(_, e)| e.tag().group() % 2 == 0));

    let config = DeidConfig {
        options: [ProfileOption::RetainSafePrivate].into(),
        safe_private: vec![SafePrivate {
            group: 0x0009,
            creator: "ACME 1.0".into(),
            element: 0x01,
        }],
        ..DeidConfig::default()
    };
    let deid = Deidentifier::new(config.clone(), keys().tokenizer("DSA-TEST-1").unwrap());
    let obj = ct(
        "1.2.3",
        "1.2.3.1",
        "1.2.3.1.1",
        private_block("ACME 1.0", VR::UN),
    );
    let d = deid.deidentify(obj).unwrap();
    let private: Vec<Tag> = walk(&d.object)
        .into_iter()
        .map(|(_, e)| e.tag())
        .filter(|t| t.group() % 2 == 1)
        .collect();
    assert_eq!(private, vec![Tag(0x0009, 0x0010), Tag(0x0009, 0x1001)]);
    check_release_file(&d.object, &config).expect("receiver accepts the safe private attribute");
    // A block with the same element number under another creator is not safe.
    let obj = ct(
        "1.2.3",
        "1.2.3.1",
        "1.2.3.1.1",
        private_block("EVIL CORP", VR::LO),
    );
    let d = deid.deidentify(obj).unwrap();
    assert!(walk(&d.object)
        .iter()
        .all(|(_, e)| e.tag().group() % 2 == 0));
}

#[test]
fn unknown_public_text_is_removed_by_default_and_kept_by_override() {
    let extra = || {
        vec![
            text(
                tags::PERFORMED_PROCEDURE_STEP_DESCRIPTION,
                VR::LO,
                "routine",
            ),
            text(tags::TRANSDUCER_DATA, VR::LO, "probe 7"),
        ]
    };
    let d = deidentifier(&[])
        .deidentify(ct("1.2.3", "1.2.3.1", "1.2.3.1.1", extra()))
        .unwrap();
    assert!(
        d.object.get(tags::TRANSDUCER_DATA).is_none(),
        "non-table text removed by default"
    );
    let config = DeidConfig {
        overrides: vec![AttributeOverride {
            tag: tags::TRANSDUCER_DATA,
            keyword: "TransducerData".into(),
            action: OverrideAction::Keep,
            justification: "probe type needed for the study".into(),
        }],
        ..DeidConfig::default()
    };
    let d = Deidentifier::new(config, keys().tokenizer("DSA-TEST-1").unwrap())
        .deidentify(ct("1.2.3", "1.2.3.1", "1.2.3.1.1", extra()))
        .unwrap();
    assert_eq!(
        str_of(d.object.get(tags::TRANSDUCER_DATA).unwrap()),
        "probe 7"
    );
}

#[test]
fn residual_phi_is_refused_and_reasons_carry_no_phi() {
    // A name typed into free text the profile keeps (a reviewed technical attribute) is caught
    // by the verifier. (Code strings are vocabulary: see tests/deid_realworld.rs.)
    let obj = ct(
        "1.2.3",
        "1.2.3.1",
        "1.2.3.1.1",
        vec![text(tags::CONVOLUTION_KERNEL, VR::SH, "B30f DOE")],
    );
    let err = deidentifier(&[]).deidentify(obj).unwrap_err();
    let DeidError::Quarantined { reason } = &err else {
        panic!("expected quarantine, got {err}")
    };
    assert!(
        reason.contains("patient name") && reason.contains("ConvolutionKernel"),
        "{reason}"
    );
    // A name in a description is removed (basic) or scrubbed (clean-descriptors).
    let desc = || {
        vec![text(
            tags::STUDY_DESCRIPTION,
            VR::LO,
            "CT chest for Jane DOE mrn0042",
        )]
    };
    let d = deidentifier(&[ProfileOption::CleanDescriptors])
        .deidentify(ct("1.2.3", "1.2.3.1", "1.2.3.1.1", desc()))
        .unwrap();
    assert_eq!(
        str_of(d.object.get(tags::STUDY_DESCRIPTION).unwrap()),
        "CT chest for **** *** *******"
    );
    // Kept by an override with the name in it: the verifier still refuses.
    let config = DeidConfig {
        overrides: vec![AttributeOverride {
            tag: tags::STUDY_DESCRIPTION,
            keyword: "StudyDescription".into(),
            action: OverrideAction::Keep,
            justification: "protocol".into(),
        }],
        ..DeidConfig::default()
    };
    let err = Deidentifier::new(config, keys().tokenizer("DSA-TEST-1").unwrap())
        .deidentify(ct("1.2.3", "1.2.3.1", "1.2.3.1.1", desc()))
        .unwrap_err();
    for e in [err] {
        let r = e.reason().to_ascii_uppercase();
        for p in PHI {
            assert!(
                !r.contains(&p.to_ascii_uppercase()),
                "reason names PHI: {r}"
            );
        }
    }
}

#[test]
fn burned_in_text_is_quarantined_unless_cleaned() {
    let us = |burned: Option<&str>| {
        let mut extra = vec![
            text(tags::SOP_CLASS_UID, VR::UI, "1.2.840.10008.5.1.4.1.1.3.1"),
            text(tags::MODALITY, VR::CS, "US"),
            text(tags::NUMBER_OF_FRAMES, VR::IS, "2"),
            DataElement::new(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(8_u16)),
            DataElement::new(
                tags::PIXEL_DATA,
                VR::OB,
                PrimitiveValue::from(vec![200_u8; 32]),
            ),
        ];
        if let Some(b) = burned {
            extra.push(text(tags::BURNED_IN_ANNOTATION, VR::CS, b));
        }
        ct("1.2.3", "1.2.3.1", "1.2.3.1.1", extra)
    };
    assert!(matches!(
        deidentifier(&[]).deidentify(us(None)),
        Err(DeidError::Quarantined { .. })
    ));
    assert!(matches!(
        deidentifier(&[]).deidentify(us(Some("YES"))),
        Err(DeidError::Quarantined { .. })
    ));
    assert!(deidentifier(&[]).deidentify(us(Some("NO"))).is_ok());
    let config = DeidConfig {
        options: [ProfileOption::CleanPixelData].into(),
        pixel_clean: vec![PixelCleanRule {
            modality: Some("US".into()),
            manufacturer: None,
            model: None,
            rects: vec![[0, 0, 4, 1]],
        }],
        ..DeidConfig::default()
    };
    let d = Deidentifier::new(config, keys().tokenizer("DSA-TEST-1").unwrap())
        .deidentify(us(Some("YES")))
        .unwrap();
    let px = d
        .object
        .get(tags::PIXEL_DATA)
        .unwrap()
        .to_bytes()
        .unwrap()
        .into_owned();
    let mut want = vec![200_u8; 32];
    want[0..4].fill(0);
    want[16..20].fill(0);
    assert_eq!(
        px, want,
        "the top row of both frames is blanked, nothing else"
    );
    assert_eq!(
        str_of(d.object.get(tags::BURNED_IN_ANNOTATION).unwrap()),
        "NO"
    );
}

#[test]
fn pixel_data_is_moved_untouched() {
    let d = deidentifier(&[])
        .deidentify(ct("1.2.3", "1.2.3.1", "1.2.3.1.1", vec![]))
        .unwrap();
    // The values are unchanged; native little-endian pixel data is held as its bytes so that it
    // is written as one block.
    let expected: Vec<u8> = (0..16u16).flat_map(|v| v.to_le_bytes()).collect();
    let elem = d.object.get(tags::PIXEL_DATA).unwrap();
    assert_eq!(elem.vr(), VR::OW);
    match elem.value() {
        Value::Primitive(PrimitiveValue::U8(b)) => assert_eq!(b.to_vec(), expected),
        Value::Primitive(PrimitiveValue::U16(v)) => {
            assert_eq!(v.to_vec(), (0..16u16).collect::<Vec<_>>())
        }
        other => panic!("pixel data changed type: {other:?}"),
    }
    let mut out = Vec::new();
    d.object.write_all(&mut out).unwrap();
    assert!(
        out.windows(expected.len())
            .any(|w| w == expected.as_slice()),
        "the written file carries the original pixel bytes"
    );
}

#[test]
fn release_check_refuses_what_the_profile_removes() {
    let config = DeidConfig::default();
    let good = deidentifier(&[])
        .deidentify(ct("1.2.3", "1.2.3.1", "1.2.3.1.1", vec![]))
        .unwrap()
        .object;
    check_release_file(&good, &config).expect("own output passes");
    let refused = |mutate: &dyn Fn(&mut dicom_object::DefaultDicomObject)| {
        let mut o = good.clone();
        mutate(&mut o);
        check_release(&o, &config).is_err()
    };
    assert!(refused(&|o| {
        o.remove_element(tags::PATIENT_IDENTITY_REMOVED);
    }));
    assert!(refused(&|o| {
        o.put(text(tags::PATIENT_ADDRESS, VR::LO, "1 Main Street"));
    }));
    assert!(refused(&|o| {
        o.put(text(tags::SOP_INSTANCE_UID, VR::UI, "1.2.3.1.1"));
    }));
    assert!(refused(&|o| {
        o.put(text(tags::PATIENT_NAME, VR::PN, "DOE^JANE"));
    }));
    assert!(refused(&|o| {
        o.put(text(Tag(0x0009, 0x0010), VR::LO, "ACME"));
        o.put(text(Tag(0x0009, 0x1001), VR::LO, "x"));
    }));
    assert!(refused(&|o| {
        o.put(seq(
            tags::REFERENCED_STUDY_SEQUENCE,
            vec![item(vec![text(tags::PATIENT_BIRTH_NAME, VR::PN, "DOE")])],
        ));
    }));
    assert!(refused(&|o| {
        o.put(text(tags::BURNED_IN_ANNOTATION, VR::CS, "YES"));
    }));
    // The original never passes.
    let original = ct("1.2.3", "1.2.3.1", "1.2.3.1.1", vec![]);
    assert!(check_release(&original, &config).is_err());
}

#[test]
fn missing_instance_uid_is_malformed_without_phi() {
    let mut o = ct("1.2.3", "1.2.3.1", "1.2.3.1.1", vec![]);
    o.remove_element(tags::SOP_INSTANCE_UID);
    let err = deidentifier(&[]).deidentify(o).unwrap_err();
    assert!(matches!(err, DeidError::Malformed { .. }));
    assert_eq!(err.reason(), "missing SOPInstanceUID");
}

#[test]
fn same_input_and_key_give_the_same_bytes() {
    let run = || {
        bytes(
            &deidentifier(&[])
                .deidentify(ct("1.2.3", "1.2.3.1", "1.2.3.1.1", vec![]))
                .unwrap()
                .object,
        )
    };
    assert_eq!(run(), run());
    let other_key = Deidentifier::new(
        DeidConfig::default(),
        SiteKeys::from_bytes([1; 32], [2; 32])
            .tokenizer("DSA-TEST-1")
            .unwrap(),
    )
    .deidentify(ct("1.2.3", "1.2.3.1", "1.2.3.1.1", vec![]))
    .unwrap();
    assert_ne!(bytes(&other_key.object), run());
}

#[test]
fn overlay_and_curve_groups_are_removed() {
    let extra = vec![
        DataElement::new(Tag(0x6000, 0x0010), VR::US, PrimitiveValue::from(4_u16)),
        DataElement::new(
            Tag(0x6000, 0x3000),
            VR::OW,
            PrimitiveValue::from(vec![0_u8; 8]),
        ),
        text(Tag(0x6000, 0x4000), VR::LT, "DOE"),
        text(Tag(0x6002, 0x1500), VR::LO, "label"),
        DataElement::new(Tag(0x5000, 0x0005), VR::US, PrimitiveValue::from(1_u16)),
    ];
    let d = deidentifier(&[])
        .deidentify(ct("1.2.3", "1.2.3.1", "1.2.3.1.1", extra))
        .unwrap();
    assert!(walk(&d.object)
        .iter()
        .all(|(_, e)| !matches!(e.tag().group(), 0x5000 | 0x6000 | 0x6002)));
}
