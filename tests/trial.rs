//! Trial flows: the patient leaves as the trial subject ID of the origin's mapping, not as a
//! token, and a patient who is not enrolled never leaves.

use std::path::Path;

use dicom_dictionary_std::tags;
use pacs_broker::deid::{check_release_file, DeidError};
use pacs_broker::demo::{write_synthetic_ct, SyntheticPatient};
use pacs_broker::dsa::{Agreement, Flow};
use pacs_broker::pseudonym::SiteKeys;

/// The example trial agreement, its file, and Hospital A's flow to the core lab.
fn trial() -> (Agreement, std::path::PathBuf, Flow) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/example-multisite-trial.toml");
    let agreement = Agreement::from_file(&path).unwrap();
    let flow = agreement
        .flows
        .iter()
        .find(|f| f.from == "hospital-a")
        .unwrap()
        .clone();
    (agreement, path, flow)
}

fn text(obj: &dicom_object::DefaultDicomObject, tag: dicom_core::Tag) -> String {
    obj.get(tag)
        .map(|e| {
            e.to_str()
                .unwrap()
                .trim_end_matches(['\0', ' '])
                .to_string()
        })
        .unwrap_or_default()
}

#[test]
fn an_enrolled_patient_leaves_as_the_trial_subject_id() {
    let (agreement, path, flow) = trial();
    let keys = SiteKeys::from_bytes([1; 32], [2; 32]);
    let deid = flow.deidentifier(&agreement.id, &path, &keys).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let patient = SyntheticPatient {
        id: "A0000123".into(),
        ..SyntheticPatient::default()
    };
    let files = write_synthetic_ct(dir.path(), &patient, 2, 16).unwrap();
    for f in &files {
        let d = deid
            .deidentify(dicom_object::open_file(f).unwrap())
            .unwrap();
        assert_eq!(text(&d.object, tags::PATIENT_ID), "SI-01-0001");
        assert_eq!(d.patient_token, "SI-01-0001");
        assert!(!text(&d.object, tags::PATIENT_NAME).contains("DOE"));
        check_release_file(&d.object, &flow.release_config()).expect("the receiver accepts it");
    }
}

#[test]
fn a_patient_who_is_not_enrolled_is_quarantined_without_phi_in_the_reason() {
    let (agreement, path, flow) = trial();
    let keys = SiteKeys::from_bytes([1; 32], [2; 32]);
    let deid = flow.deidentifier(&agreement.id, &path, &keys).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let files = write_synthetic_ct(dir.path(), &SyntheticPatient::default(), 1, 16).unwrap();
    match deid.deidentify(dicom_object::open_file(&files[0]).unwrap()) {
        Err(DeidError::Quarantined { reason }) => {
            assert!(reason.contains("not enrolled"), "{reason}");
            assert!(
                !reason.contains("MRN-0042117") && !reason.contains("DOE"),
                "{reason}"
            );
        }
        other => panic!("expected quarantine, got {other:?}"),
    }
}

#[test]
fn the_deid_command_uses_the_subject_ids_of_a_trial_flow() {
    let (_, path, flow) = trial();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("site.key");
    SiteKeys::generate().write_new(&key).unwrap();
    let patient = SyntheticPatient {
        id: "A0000456".into(),
        ..SyntheticPatient::default()
    };
    write_synthetic_ct(&dir.path().join("in"), &patient, 1, 16).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pacs-broker"))
        .args(["deid", "--agreement"])
        .arg(&path)
        .args(["--flow", &flow.name, "--key"])
        .arg(&key)
        .arg(dir.path().join("in"))
        .arg("--out")
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let obj = dicom_object::open_file(dir.path().join("out/CT0001.dcm")).unwrap();
    assert_eq!(text(&obj, tags::PATIENT_ID), "SI-01-0002");
}
