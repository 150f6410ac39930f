//! Must be true #3: parse(format(x)) == x for any agreement (property test).

use std::collections::BTreeSet;

use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
use dicom_dictionary_std::StandardDataDictionary;
use pacs_broker::deid::{
    AttributeOverride, DeidConfig, OverrideAction, PixelCleanRule, ProfileOption, SafePrivate,
};
use pacs_broker::dsa::*;
use proptest::collection::{btree_set, vec};
use proptest::option;
use proptest::prelude::*;
use time::{Date, Duration};

/// Free text with the characters that need escaping in TOML, never blank.
fn text() -> impl Strategy<Value = String> {
    "[A-Za-zé][A-Za-z0-9 é\"\\\\\t\n,.'#=\\[\\]{}-]{0,24}"
}

fn date() -> impl Strategy<Value = Date> {
    (0i64..40_000).prop_map(|d| {
        Date::from_calendar_date(2000, time::Month::January, 1).unwrap() + Duration::days(d)
    })
}

fn ordered_dates() -> impl Strategy<Value = (Date, Date)> {
    (date(), 0i64..4000).prop_map(|(a, n)| (a, a + Duration::days(n)))
}

const KEYWORDS: &[&str] = &[
    "PatientAge",
    "PatientSex",
    "PatientName",
    "StudyDate",
    "InstitutionName",
    "BodyPartExamined",
    "StudyDescription",
    "AccessionNumber",
];

fn action() -> impl Strategy<Value = OverrideAction> {
    prop_oneof![
        Just(OverrideAction::Keep),
        Just(OverrideAction::Remove),
        Just(OverrideAction::Token),
        "[ -~é]{0,12}".prop_map(OverrideAction::Fixed),
    ]
}

fn overrides() -> impl Strategy<Value = Vec<AttributeOverride>> {
    (
        btree_set(0..KEYWORDS.len(), 0..4),
        vec((action(), text()), 4),
    )
        .prop_map(|(idx, acts)| {
            idx.into_iter()
                .zip(acts)
                .map(|(i, (action, justification))| {
                    let e = StandardDataDictionary.by_name(KEYWORDS[i]).unwrap();
                    AttributeOverride {
                        tag: e.tag(),
                        keyword: KEYWORDS[i].to_string(),
                        action,
                        justification,
                    }
                })
                .collect()
        })
}

fn deid() -> impl Strategy<Value = DeidConfig> {
    let safe = vec((0x0009u16..0x7FFF, text(), 0x10u8..=0xFF), 0..3).prop_map(|v| {
        v.into_iter()
            .map(|(g, creator, element)| SafePrivate {
                group: g | 1,
                creator,
                element,
            })
            .collect()
    });
    let rect =
        (0u32..4096, 0u32..4096, 1u32..4096, 1u32..4096).prop_map(|(a, b, c, d)| [a, b, c, d]);
    let pixel = vec(
        (
            option::of(text()),
            option::of(text()),
            option::of(text()),
            vec(rect, 1..3),
        ),
        0..3,
    )
    .prop_map(|v| {
        v.into_iter()
            .map(|(modality, manufacturer, model, rects)| PixelCleanRule {
                modality,
                manufacturer,
                model,
                rects,
            })
            .collect()
    });
    (
        btree_set(0..ProfileOption::ALL.len(), 0..5),
        overrides(),
        safe,
        pixel,
        prop::sample::select(&pacs_broker::deid::BurnedInTextMode::ALL[..]),
    )
        .prop_map(
            |(opts, overrides, safe_private, pixel_clean, burned_in_text)| {
                let mut options: BTreeSet<ProfileOption> =
                    opts.into_iter().map(|i| ProfileOption::ALL[i]).collect();
                if options.contains(&ProfileOption::RetainLongitudinalFullDates) {
                    options.remove(&ProfileOption::RetainLongitudinalModifiedDates);
                }
                DeidConfig {
                    options,
                    overrides,
                    safe_private,
                    pixel_clean,
                    // Not part of the file: a node derives it from [flows.subject_ids].
                    subject_ids: false,
                    burned_in_text,
                }
            },
        )
}

fn selector() -> impl Strategy<Value = Selector> {
    (
        btree_set(prop::sample::select(MODALITIES), 0..4),
        btree_set(
            prop::sample::select(&["CHEST", "HEAD", "ABDOMEN", "L_SPINE"][..]),
            0..3,
        ),
        option::of(ordered_dates()),
        any::<bool>(),
        option::of("[A-Z*?][A-Z*? ]{0,11}"),
        btree_set("[A-Z_][A-Z0-9_]{0,15}", 0..3),
    )
        .prop_map(
            |(m, b, dates, only_from, description, source_aes)| Selector {
                modalities: m.into_iter().map(str::to_string).collect(),
                body_parts: b.into_iter().map(str::to_string).collect(),
                study_date_from: dates.map(|d| d.0),
                study_date_until: dates.filter(|_| !only_from).map(|d| d.1),
                description,
                source_aes,
            },
        )
}

fn flow(sites: usize) -> impl Strategy<Value = Flow> {
    (
        (0..sites, 1..sites),
        btree_set(prop::sample::select(&Purpose::ALL[..]), 1..4),
        selector(),
        (any::<bool>(), option::of(text())),
        deid(),
        option::of(text()),
        option::of((1u32..=36_500, any::<bool>())),
        option::of(1u32..100_000),
        (any::<bool>(), vec(text(), 0..3)),
    )
        .prop_map(
            move |(
                (from, step),
                purposes,
                select,
                (required, rec),
                deid,
                subj,
                ret,
                per_day,
                (back, roles),
            )| Flow {
                name: String::new(),
                from: format!("site-{from}"),
                to: format!("site-{}", (from + step) % sites),
                purposes,
                select,
                consent: Consent {
                    required,
                    recorded_in: if required {
                        rec.unwrap_or_else(|| "register".into())
                    } else {
                        rec.unwrap_or_default()
                    },
                },
                deid,
                subject_ids: subj.map(|mapping| SubjectIds { mapping }),
                retention: ret.map(|(days, del)| Retention {
                    days,
                    after: if del {
                        AfterRetention::Delete
                    } else {
                        AfterRetention::Return
                    },
                }),
                studies_per_day: per_day,
                results: Results {
                    return_to_origin: back,
                    reidentify_by: if back { roles } else { vec![] },
                },
            },
        )
}

fn party() -> impl Strategy<Value = Party> {
    (
        text(),
        text(),
        text(),
        option::of("[0-9a-f]{64}"),
        any::<bool>(),
    )
        .prop_map(
            |(organisation, privacy_officer, privacy_contact, certificate_pin, s)| Party {
                site: String::new(),
                organisation,
                privacy_officer,
                privacy_contact,
                certificate_pin,
                status: if s {
                    PartyStatus::Suspended
                } else {
                    PartyStatus::Active
                },
            },
        )
}

fn agreement() -> impl Strategy<Value = Agreement> {
    (2usize..5).prop_flat_map(|n| {
        (
            "[a-z0-9][a-z0-9._-]{0,20}",
            1u32..1000,
            text(),
            prop::sample::select(&Status::ALL[..]),
            ordered_dates(),
            text(),
            prop_oneof![Just(String::new()), text()],
            vec(party(), n),
            vec(flow(n), 0..4),
        )
            .prop_map(
                |(
                    id,
                    version,
                    title,
                    status,
                    (valid_from, valid_until),
                    governing_law,
                    paper_reference,
                    mut parties,
                    mut flows,
                )| {
                    for (i, p) in parties.iter_mut().enumerate() {
                        p.site = format!("site-{i}");
                    }
                    for (i, f) in flows.iter_mut().enumerate() {
                        f.name = format!("flow-{i}");
                    }
                    Agreement {
                        id,
                        version,
                        title,
                        status,
                        valid_from,
                        valid_until,
                        governing_law,
                        paper_reference,
                        parties,
                        flows,
                    }
                },
            )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn parse_of_format_is_identity(a in agreement()) {
        let text = format(&a);
        let back = Agreement::parse("generated.toml", &text);
        prop_assert!(back.is_ok(), "does not parse: {}\n---\n{text}", back.unwrap_err());
        prop_assert_eq!(back.unwrap(), a);
    }
}

#[test]
fn the_examples_survive_a_round_trip() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            let a = Agreement::from_file(&p).unwrap();
            assert_eq!(
                Agreement::parse("f.toml", &format(&a)).unwrap(),
                a,
                "{}",
                p.display()
            );
        }
    }
}
