//! De-identification on real-world data (issue 11): no leak through coded entries or faces, no
//! quarantine for vocabulary or for the engine's own text, and the kinds of real file that
//! archives hold (deflated, without file meta, CP-246 UN sequences, RT Structure Sets,
//! DICOMDIRs). Real samples come from Debian's python3-pydicom (MIT); every output is read back
//! by dcmtk and pydicom, and checked by the independent pydicom checker.

mod deid_common;

use std::path::{Path, PathBuf};
use std::process::Command;

use dicom_core::header::Header;
use dicom_core::{DataElement, VR};
use dicom_dictionary_std::tags;
use pacs_broker::deid::batch::read_and_deidentify;
use pacs_broker::deid::{
    find_residual_phi, run_batch, AttributeOverride, BatchOutcome, DeidConfig, DeidError,
    Deidentifier, OverrideAction, PhiTerms, ProfileOption,
};

use deid_common::*;

fn quarantine_reason(r: Result<pacs_broker::deid::Deidentified, DeidError>) -> String {
    match r {
        Err(DeidError::Quarantined { reason }) => reason,
        Err(e) => panic!("expected a quarantine, got {e}"),
        Ok(_) => panic!("expected a quarantine, the instance was released"),
    }
}

fn code(value: &str, scheme: &str, meaning: &str) -> dicom_object::mem::InMemDicomObject {
    item(vec![
        text(tags::CODE_VALUE, VR::SH, value),
        text(tags::CODING_SCHEME_DESIGNATOR, VR::SH, scheme),
        text(tags::CODE_MEANING, VR::LO, meaning),
    ])
}

// ---------------------------------------------------------------------------------------------
// Leaks

/// The verifier searches coded entries: a name in a Code Meaning is found (it used to be
/// exempt), and so is an ID in a private scheme's code value.
#[test]
fn the_verifier_finds_names_and_ids_inside_coded_entries() {
    let original = ct("1.2.3", "1.2.3.1", "1.2.3.1.1", vec![]);
    let terms = PhiTerms::collect(&original, &DeidConfig::default());
    let output = file(item(vec![
        text(tags::SOP_CLASS_UID, VR::UI, CT_IMAGE_STORAGE),
        text(tags::SOP_INSTANCE_UID, VR::UI, "2.25.1"),
        seq(
            tags::ANATOMIC_REGION_SEQUENCE,
            vec![code("T-15750", "SRT", "Knee of Jane Doe")],
        ),
        seq(
            tags::CONCEPT_NAME_CODE_SEQUENCE,
            vec![code("MRN0042", "99LOCAL", "Local code")],
        ),
    ]));
    let findings = find_residual_phi(&output, &terms);
    let kinds: Vec<(&str, &str)> = findings
        .iter()
        .map(|f| (f.keyword.as_str(), f.kind))
        .collect();
    assert!(
        kinds.contains(&("CodeMeaning", "patient name")),
        "{findings:?}"
    );
    assert!(kinds.contains(&("CodeValue", "identifier")), "{findings:?}");
}

/// The engine cleans coded-entry text (C): the name is scrubbed, the concept kept, the instance
/// released; nothing of the patient is left in any coded entry.
#[test]
fn names_inside_code_meanings_are_scrubbed_by_the_engine() {
    let obj = ct(
        "1.2.3",
        "1.2.3.1",
        "1.2.3.1.1",
        vec![
            seq(
                tags::ANATOMIC_REGION_SEQUENCE,
                vec![code("T-15750", "SRT", "Knee (patient JANE DOE)")],
            ),
            seq(
                tags::PROCEDURE_CODE_SEQUENCE,
                vec![code("CTKNEE", "99LOCAL", "CT knee for MRN0042")],
            ),
        ],
    );
    let d = deidentifier(&[]).deidentify(obj).unwrap();
    let meanings: Vec<String> = walk(&d.object)
        .into_iter()
        .filter(|(_, e)| e.tag() == tags::CODE_MEANING)
        .map(|(_, e)| str_of(&e))
        .collect();
    assert!(
        meanings.contains(&"Knee (patient **** ***)".to_string()),
        "{meanings:?}"
    );
    assert!(
        meanings.contains(&"CT knee for *******".to_string()),
        "{meanings:?}"
    );
    for (_, e) in walk(&d.object) {
        let v = str_of(&e).to_ascii_uppercase();
        assert!(
            !(v.contains("JANE") || v.contains("MRN0042")),
            "{} still holds PHI",
            e.tag()
        );
    }
}

fn photo(
    extra: Vec<DataElement<dicom_object::mem::InMemDicomObject>>,
) -> dicom_object::DefaultDicomObject {
    let mut o = ct("1.2.3", "1.2.3.1", "1.2.3.1.1", vec![]);
    o.put(text(
        tags::SOP_CLASS_UID,
        VR::UI,
        "1.2.840.10008.5.1.4.1.1.77.1.4",
    ));
    o.put(text(tags::MODALITY, VR::CS, "XC"));
    o.put(text(tags::BURNED_IN_ANNOTATION, VR::CS, "NO"));
    for e in extra {
        o.put(e);
    }
    file(o.into_inner())
}

/// A photograph, or any image with Recognizable Visual Features YES, is held back with a reason
/// that says so, at the origin and at the receiver; the agreement can accept them explicitly.
#[test]
fn images_with_recognizable_visual_features_are_held_back() {
    let reason = quarantine_reason(deidentifier(&[]).deidentify(photo(vec![])));
    assert!(reason.contains("VL Photographic"), "{reason}");
    let face_ct = ct(
        "1.2.3",
        "1.2.3.1",
        "1.2.3.1.1",
        vec![text(tags::RECOGNIZABLE_VISUAL_FEATURES, VR::CS, "YES")],
    );
    let reason = quarantine_reason(deidentifier(&[]).deidentify(face_ct.clone()));
    assert!(
        reason.contains("RecognizableVisualFeatures is YES"),
        "{reason}"
    );
    // Even when the flow cleans burned-in text: a face is not text.
    let reason = quarantine_reason(
        deidentifier(&[ProfileOption::CleanPixelData]).deidentify(face_ct.clone()),
    );
    assert!(reason.contains("Recognizable"), "{reason}");
    // A photograph that declares no recognizable features is released.
    let declared = photo(vec![text(tags::RECOGNIZABLE_VISUAL_FEATURES, VR::CS, "NO")]);
    assert!(deidentifier(&[]).deidentify(declared).is_ok());
    // The agreement's explicit, justified decision releases them.
    let accepting = DeidConfig {
        overrides: vec![AttributeOverride {
            tag: tags::RECOGNIZABLE_VISUAL_FEATURES,
            keyword: "RecognizableVisualFeatures".into(),
            action: OverrideAction::Keep,
            justification: "consented dermatology photographs".into(),
        }],
        ..DeidConfig::default()
    };
    let deid = Deidentifier::new(accepting.clone(), keys().tokenizer("DSA-TEST-1").unwrap());
    let d = deid.deidentify(face_ct).unwrap();
    pacs_broker::deid::check_release_file(&d.object, &accepting).unwrap();
    // The receiver refuses the same output under a flow that does not accept them.
    let e = pacs_broker::deid::check_release_file(&d.object, &DeidConfig::default()).unwrap_err();
    assert!(e.reason().contains("release check"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// False positives

/// A patient whose name is a defined term of a code string (PERFUSION in ImageType) is not
/// refused for it; the same name typed into free text the profile keeps still is.
#[test]
fn code_strings_are_vocabulary_but_kept_free_text_is_still_searched() {
    let perfusion = |extra: Vec<DataElement<dicom_object::mem::InMemDicomObject>>| {
        let mut o = ct("1.2.3", "1.2.3.1", "1.2.3.1.1", extra);
        o.put(text(tags::PATIENT_NAME, VR::PN, "PERFUSION^ANNA"));
        o.put(text(
            tags::IMAGE_TYPE,
            VR::CS,
            "DERIVED\\PRIMARY\\PERFUSION\\ANNA",
        ));
        o
    };
    let d = deidentifier(&[]).deidentify(perfusion(vec![])).unwrap();
    assert_eq!(
        str_of(d.object.get(tags::IMAGE_TYPE).unwrap()),
        "DERIVED\\PRIMARY\\PERFUSION\\ANNA"
    );
    // Free text kept by the profile (a reviewed technical attribute) with the name in it.
    let reason = quarantine_reason(deidentifier(&[]).deidentify(perfusion(vec![text(
        tags::CONVOLUTION_KERNEL,
        VR::SH,
        "ANNA B30f",
    )])));
    assert!(
        reason.contains("patient name in ConvolutionKernel"),
        "{reason}"
    );
    // Free text kept by an agreement override.
    let config = DeidConfig {
        overrides: vec![AttributeOverride {
            tag: tags::STUDY_DESCRIPTION,
            keyword: "StudyDescription".into(),
            action: OverrideAction::Keep,
            justification: "protocol".into(),
        }],
        ..DeidConfig::default()
    };
    let reason = quarantine_reason(
        Deidentifier::new(config, keys().tokenizer("DSA-TEST-1").unwrap()).deidentify(perfusion(
            vec![text(tags::STUDY_DESCRIPTION, VR::LO, "Perfusion CT, Anna")],
        )),
    );
    assert!(
        reason.contains("patient name in StudyDescription"),
        "{reason}"
    );
    // An identifier in a code string is still found.
    let reason = quarantine_reason(deidentifier(&[]).deidentify(ct(
        "1.2.3",
        "1.2.3.1",
        "1.2.3.1.1",
        vec![text(tags::IMAGE_TYPE, VR::CS, "ORIGINAL\\MRN0042")],
    )));
    assert!(reason.contains("identifier in ImageType"), "{reason}");
}

/// Patients named like words the engine writes (DeidentificationMethod, the CID 7050 code
/// meanings, dummies) are released: the engine's own text is not the input's.
#[test]
fn the_engines_own_text_is_not_read_as_phi() {
    let options = [
        ProfileOption::RetainPatientCharacteristics,
        ProfileOption::CleanDescriptors,
        ProfileOption::RetainLongitudinalModifiedDates,
    ];
    for name in [
        "PATIENT^RETAIN^CHARACTERISTICS",
        "CLEAN^OPTION^BASIC",
        "PROFILE^DESCRIPTORS",
        "REMOVED^LONGITUDINAL^TEMPORAL",
        "CONFIDENTIALITY^APPLICATION",
    ] {
        let mut o = ct("1.2.3", "1.2.3.1", "1.2.3.1.1", vec![]);
        o.put(text(tags::PATIENT_NAME, VR::PN, name));
        // A dummied value (D) reads "REMOVED".
        o.put(text(tags::PATIENT_SEX_NEUTERED, VR::CS, "ALTERED"));
        let d = deidentifier(&options)
            .deidentify(o)
            .unwrap_or_else(|e| panic!("patient {name}: {e}"));
        let method = str_of(d.object.get(tags::DEIDENTIFICATION_METHOD).unwrap());
        assert!(
            method.contains("retain-patient-characteristics"),
            "{method}"
        );
    }
    // An input's own DeidentificationMethod inside a sequence is still searched.
    let reason = quarantine_reason(deidentifier(&[]).deidentify(ct(
        "1.2.3",
        "1.2.3.1",
        "1.2.3.1.1",
        vec![seq(
            tags::SOURCE_IMAGE_SEQUENCE,
            vec![item(vec![text(
                tags::DEIDENTIFICATION_METHOD,
                VR::LO,
                "anonymised for Jane Doe",
            )])],
        )],
    )));
    assert!(reason.contains("DeidentificationMethod"), "{reason}");
}

// ---------------------------------------------------------------------------------------------
// Real files

fn sample(name: &str) -> PathBuf {
    pydicom_test_files().join(name)
}

/// dcmtk and pydicom both read `out` as a Part 10 file; pydicom reports its transfer syntax.
fn read_back(out: &Path) -> String {
    read_back_all(&[out.to_path_buf()]).remove(0)
}

/// [`read_back`] for many files, with one dcmdump and one pydicom run.
fn read_back_all(outs: &[PathBuf]) -> Vec<String> {
    let st = Command::new(tool("dcmdump"))
        .arg("-q")
        .args(outs)
        .output()
        .unwrap();
    assert!(
        st.status.success() && st.stderr.is_empty(),
        "dcmdump rejects one of {outs:?}: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    let script = "import sys,pydicom\nfor p in sys.argv[1:]:\n  d=pydicom.dcmread(p)\n  assert d.file_meta.MediaStorageSOPInstanceUID==d.SOPInstanceUID, p\n  d.PixelData if 'PixelData' in d else None\n  print(d.file_meta.TransferSyntaxUID)";
    let o = Command::new("/usr/bin/python3")
        .args(["-W", "ignore", "-c", script])
        .args(outs)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "pydicom rejects one of {outs:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .collect()
}

fn run_checker(pairs: &[(PathBuf, PathBuf)]) -> String {
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.args(["-W", "ignore"])
        .arg(checker())
        .arg(table_csv())
        .arg("-");
    for (a, b) in pairs {
        cmd.arg(a).arg(b);
    }
    let out = cmd.output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{report}");
    report
}

fn deidentify_to(input: &Path, out: &Path) {
    let d = read_and_deidentify(&deidentifier(&[]), input, |_| Ok(()))
        .unwrap_or_else(|e| panic!("{}: {e:?}", input.display()));
    pacs_broker::deid::batch::write_output(d.object, d.pixel_data.as_ref(), out).unwrap();
}

/// Deflated Explicit VR Little Endian (image_dfl.dcm, David Clunie's sample): read through the
/// guard, de-identified, written deflated, read back by dcmtk and pydicom, checked.
#[test]
fn deflated_files_are_read_and_written() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("dfl.dcm");
    let input = sample("image_dfl.dcm");
    // The strict guard inflates and checks the data set as well.
    let mut f = std::fs::File::open(&input).unwrap();
    pacs_broker::deid::guard::check_declared_lengths(&mut f).unwrap();
    // Held back as a screen capture (OT, conversion type WSD) unless declared clean; the
    // reading and writing is what is tested here, so it is declared clean first.
    let d = read_and_deidentify(&deidentifier(&[]), &input, |_| Ok(()));
    assert!(
        matches!(&d, Err(pacs_broker::deid::batch::NotDeidentified::Quarantined { reason }) if reason.contains("BurnedInAnnotation")),
        "{d:?}"
    );
    let mut obj = pacs_broker::deid::guard::read_guarded(&input).unwrap();
    assert_eq!(obj.meta().transfer_syntax(), "1.2.840.10008.1.2.1.99");
    obj.put(text(tags::BURNED_IN_ANNOTATION, VR::CS, "NO"));
    let declared = tmp.path().join("declared.dcm");
    pacs_broker::deid::batch::write_output(obj, None, &declared).unwrap();
    deidentify_to(&declared, &out);
    assert_eq!(read_back(&out), "1.2.840.10008.1.2.1.99");
    run_checker(&[(declared, out)]);
}

/// A deflate stream that inflates beyond the bound is refused before anything is parsed.
#[test]
fn a_deflate_bomb_is_refused() {
    use std::io::Write;
    let input = std::fs::read(sample("image_dfl.dcm")).unwrap();
    let mut f = std::fs::File::open(sample("image_dfl.dcm")).unwrap();
    let layout = pacs_broker::deid::guard::walk(&mut f).unwrap();
    let mut bomb = input[..layout.dataset_at as usize].to_vec();
    let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..(pacs_broker::deid::guard::MAX_INFLATED >> 20) + 1 {
        enc.write_all(&zeros).unwrap();
    }
    bomb.extend_from_slice(&enc.finish().unwrap());
    assert!(bomb.len() < 2 << 20);
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("bomb.dcm");
    std::fs::write(&path, &bomb).unwrap();
    let e = pacs_broker::deid::guard::read_guarded(&path).unwrap_err();
    assert!(e.contains("inflates to more than"), "{e}");
}

/// Files without preamble and file meta group (ACR-NEMA style): the RT Structure Set in
/// implicit VR (rtstruct.dcm) and an RT Ion Plan in explicit VR; written as proper Part 10
/// files in the encoding they were read in.
#[test]
fn files_without_file_meta_and_the_rt_structure_set_are_read() {
    let tmp = tempfile::tempdir().unwrap();
    let mut pairs = Vec::new();
    for (name, ts) in [
        ("rtstruct.dcm", "1.2.840.10008.1.2"),
        ("ExplVR_LitEndNoMeta.dcm", "1.2.840.10008.1.2.1"),
    ] {
        let out = tmp.path().join(name);
        deidentify_to(&sample(name), &out);
        assert_eq!(read_back(&out), ts, "{name}");
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(&bytes[128..132], b"DICM", "{name}: a Part 10 file");
        pairs.push((sample(name), out));
    }
    // The structure set keeps its contours and ROI names are removed or kept per the table.
    let obj = dicom_object::open_file(&pairs[0].1).unwrap();
    let rois = obj.element(tags::ROI_CONTOUR_SEQUENCE).unwrap();
    assert!(!rois.items().unwrap().is_empty());
    run_checker(&pairs);
}

/// Reads the top-level explicit VR little endian element headers of a Part 10 file and returns
/// the offset of the first element whose tag is not below `before`.
fn offset_before(bytes: &[u8], before: (u16, u16)) -> usize {
    let mut pos = 132;
    loop {
        let g = u16::from_le_bytes([bytes[pos], bytes[pos + 1]]);
        let e = u16::from_le_bytes([bytes[pos + 2], bytes[pos + 3]]);
        if g != 0x0002 && (g, e) >= before {
            return pos;
        }
        let vr = &bytes[pos + 4..pos + 6];
        let long = [
            &b"OB"[..],
            b"OW",
            b"SQ",
            b"UN",
            b"UT",
            b"UC",
            b"UR",
            b"OF",
            b"OD",
            b"OL",
        ]
        .contains(&vr);
        let (hdr, len) = if long {
            (
                12,
                u32::from_le_bytes(bytes[pos + 8..pos + 12].try_into().unwrap()) as usize,
            )
        } else {
            (
                8,
                u16::from_le_bytes([bytes[pos + 6], bytes[pos + 7]]) as usize,
            )
        };
        pos += hdr + len;
    }
}

/// CP-246: pydicom's UN_sequence.dcm (a private sequence stored as UN of undefined length,
/// items in implicit VR) grafted into CT_small.dcm, once as that private sequence and once as
/// a public one (Studies Containing Other Referenced Instances): the guard no longer refuses
/// it, the items are decoded, the UIDs inside are replaced like any other, the private one is
/// removed, and dcmtk, pydicom and the checker accept the output.
#[test]
fn cp246_un_sequences_are_decoded() {
    let un = std::fs::read(sample("UN_sequence.dcm")).unwrap();
    let start = un
        .windows(4)
        .position(|w| w == [0x53, 0x44, 0x0C, 0x10])
        .unwrap();
    let element = un[start..].to_vec();
    let ct_bytes = std::fs::read(sample("CT_small.dcm")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut pairs = Vec::new();
    for (name, tag) in [
        ("private.dcm", (0x4453u16, 0x100Cu16)),
        ("public.dcm", (0x0008, 0x1200)),
    ] {
        let at = offset_before(&ct_bytes, tag);
        let mut graft = element.clone();
        graft[..2].copy_from_slice(&tag.0.to_le_bytes());
        graft[2..4].copy_from_slice(&tag.1.to_le_bytes());
        let bytes = [&ct_bytes[..at], &graft[..], &ct_bytes[at..]].concat();
        let input = tmp.path().join(name);
        std::fs::write(&input, bytes).unwrap();
        // The strict walk (for callers that parse the file as it is) still refuses it.
        let mut f = std::fs::File::open(&input).unwrap();
        assert!(pacs_broker::deid::guard::check_declared_lengths(&mut f).is_err());
        let out = tmp.path().join(format!("out-{name}"));
        deidentify_to(&input, &out);
        read_back(&out);
        pairs.push((input, out));
    }
    let public = dicom_object::open_file(&pairs[1].1).unwrap();
    let studies = public
        .element(tags::STUDIES_CONTAINING_OTHER_REFERENCED_INSTANCES_SEQUENCE)
        .unwrap();
    let item = &studies.items().unwrap()[0];
    let sop = item
        .element(tags::REFERENCED_SERIES_SEQUENCE)
        .unwrap()
        .items()
        .unwrap()[0]
        .element(tags::REFERENCED_SOP_SEQUENCE)
        .unwrap()
        .items()
        .unwrap()[0]
        .element(tags::REFERENCED_SOP_INSTANCE_UID)
        .unwrap()
        .to_str()
        .unwrap()
        .into_owned();
    assert!(sop.starts_with("2.25."), "{sop}");
    let private = dicom_object::open_file(&pairs[0].1).unwrap();
    assert!(private.iter().all(|e| e.tag().group() % 2 == 0));
    run_checker(&pairs);
}

/// A DICOMDIR lists patient names: never sent, with a reason that says what it is.
#[test]
fn dicomdirs_are_never_sent() {
    let tmp = tempfile::tempdir().unwrap();
    let input = sample("dicomdirtests/DICOMDIR");
    let out = tmp.path().join("out");
    let mut outcomes = Vec::new();
    run_batch(&deidentifier(&[]), &[input], &out, |i| {
        outcomes.push(format!("{:?}", i.outcome))
    })
    .unwrap();
    assert_eq!(outcomes.len(), 1);
    assert!(
        outcomes[0].starts_with("Quarantined") && outcomes[0].contains("DICOMDIR"),
        "{outcomes:?}"
    );
    assert!(!out.join("DICOMDIR").exists());
}

// ---------------------------------------------------------------------------------------------
// Every real sample: released clean, or held back for a reason a privacy officer accepts.

/// Reasons for holding an instance back that a privacy officer accepts without review of the
/// engine: text likely burned into the pixels, a face, not a storage object.
const ACCEPTED_HOLDS: &[&str] = &[
    "without BurnedInAnnotation NO",
    "BurnedInAnnotation is YES",
    "Recognizable",
    "not a storage object",
];

/// Files that produce nothing because they are not DICOM storage objects that can be read
/// safely; every one names its problem, and nothing of them is released:
/// - not DICOM at all (text, JSON, dumps, gzip) or truncated (dcmdump refuses them too);
/// - a bare data set with a stray first byte, or in big endian (dcmdump refuses both);
/// - a data set in implicit VR whose file meta says an explicit (JPEG) transfer syntax
///   (dcmdump refuses it);
/// - a file meta group without transfer syntax, or without group length (refused by the guard
///   on purpose: the parser and the guard could disagree on where the data set starts);
/// - a DICOMDIR whose directory record declares more bytes than the file holds (DICOMDIRs are
///   never sent anyway).
const UNREADABLE: &[&str] = &[
    "README",
    "README.txt",
    "rtplan.dump",
    "rtstruct.dump",
    "test1.json",
    "test_PN.json",
    "zipMR.gz",
    "MR_truncated.dcm",
    "rtplan_truncated.dcm",
    "no_meta.dcm",
    "ExplVR_BigEndNoMeta.dcm",
    "SC_rgb_jpeg.dcm",
    "meta_missing_tsyntax.dcm",
    "no_meta_group_length.dcm",
    "DICOMDIR-nooffset",
];

#[test]
fn every_real_sample_is_released_clean_or_held_for_an_accepted_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let mut released = Vec::new();
    let mut unexpected = Vec::new();
    let mut failed = Vec::new();
    let mut held = 0;
    run_batch(&deidentifier(&[]), &[pydicom_test_files()], &out, |i| {
        let name = i.input.file_name().unwrap().to_string_lossy().into_owned();
        match &i.outcome {
            BatchOutcome::Deidentified { output, .. } => {
                released.push((i.input.clone(), output.clone()))
            }
            BatchOutcome::Quarantined { reason } => {
                held += 1;
                if !ACCEPTED_HOLDS.iter().any(|a| reason.contains(a)) {
                    unexpected.push(format!("{name}: held back: {reason}"));
                }
            }
            BatchOutcome::Failed { reason } if reason.contains("not a storage object") => held += 1,
            BatchOutcome::Failed { reason } => {
                failed.push(name.clone());
                if !UNREADABLE.contains(&name.as_str()) {
                    unexpected.push(format!("{name}: failed: {reason}"));
                }
            }
        }
    })
    .unwrap();
    assert!(unexpected.is_empty(), "{unexpected:#?}");
    eprintln!(
        "{} released, {} held back, {} not read",
        released.len(),
        held,
        failed.len()
    );
    assert!(released.len() >= 30, "only {} released", released.len());
    let outputs: Vec<PathBuf> = released.iter().map(|(_, o)| o.clone()).collect();
    assert_eq!(read_back_all(&outputs).len(), outputs.len());
    let report = run_checker(&released);
    assert!(
        report.contains(&format!("checked {} pairs, 0 problems", released.len())),
        "{report}"
    );
    failed.sort();
    failed.dedup();
    let mut expected: Vec<String> = UNREADABLE.iter().map(|s| s.to_string()).collect();
    expected.sort();
    assert_eq!(
        failed, expected,
        "the unreadable files are exactly the known ones"
    );
}

/// An RT Structure Set whose Contour Data is longer than an explicit VR 16-bit length can say
/// (more than 65,534 bytes: large contours), stored as UN as the standard requires (PS3.5
/// 6.2.2) by the tool that made the file explicit: de-identified, written (it used to fail with
/// "cannot encode output: Could not write element value"), read back by dcmtk and pydicom with
/// every coordinate, and accepted by the receiver's check.
#[test]
fn rt_structure_sets_with_long_contours_are_written() {
    use dicom_core::PrimitiveValue;
    let points: Vec<String> = (0..12000).map(|i| format!("{}.25", i % 512)).collect();
    let contour = points.join("\\");
    assert!(contour.len() > 0xFFFE);
    let contour_item = item(vec![
        text(tags::CONTOUR_GEOMETRIC_TYPE, VR::CS, "CLOSED_PLANAR"),
        DataElement::new(
            tags::NUMBER_OF_CONTOUR_POINTS,
            VR::IS,
            PrimitiveValue::from("4000"),
        ),
        DataElement::new(
            tags::CONTOUR_DATA,
            VR::UN,
            PrimitiveValue::from(contour.clone().into_bytes()),
        ),
    ]);
    let mut o = ct(
        "1.2.3",
        "1.2.3.1",
        "1.2.3.1.1",
        vec![seq(
            tags::ROI_CONTOUR_SEQUENCE,
            vec![item(vec![
                text(tags::REFERENCED_ROI_NUMBER, VR::IS, "1"),
                seq(tags::CONTOUR_SEQUENCE, vec![contour_item]),
            ])],
        )],
    );
    o.put(text(
        tags::SOP_CLASS_UID,
        VR::UI,
        "1.2.840.10008.5.1.4.1.1.481.3",
    ));
    o.put(text(tags::MODALITY, VR::CS, "RTSTRUCT"));
    o.remove_element(tags::PIXEL_DATA);
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("rtstruct-long.dcm");
    o.write_to_file(&input).unwrap();
    let out = tmp.path().join("out.dcm");
    deidentify_to(&input, &out);
    read_back(&out);
    let script = "import sys,pydicom\nd=pydicom.dcmread(sys.argv[1])\nc=d.ROIContourSequence[0].ContourSequence[0]\nv=c.ContourData if c['ContourData'].VR!='UN' else c['ContourData'].value.decode().split('\\\\')\nprint(len(v))";
    let o = Command::new("/usr/bin/python3")
        .args(["-W", "ignore", "-c", script])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "12000");
    let back = pacs_broker::deid::guard::read_guarded(&out).unwrap();
    pacs_broker::deid::check_release_file(&back, &DeidConfig::default()).unwrap();
}
