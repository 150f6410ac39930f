//! Helpers shared by the de-identification tests: building DICOM objects, finding the Debian
//! sample files and tools, and walking outputs.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use dicom_core::header::Header;
use dicom_core::value::{DataSetSequence, Value};
use dicom_core::{DataElement, Length, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::mem::InMemDicomObject;
use dicom_object::{DefaultDicomObject, FileMetaTableBuilder};
use pacs_broker::deid::{DeidConfig, Deidentifier, ProfileOption};
use pacs_broker::pseudonym::SiteKeys;

pub const CT_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.2";

pub fn keys() -> SiteKeys {
    SiteKeys::from_bytes([7; 32], [9; 32])
}

pub fn deidentifier(options: &[ProfileOption]) -> Deidentifier {
    let config = DeidConfig {
        options: options.iter().copied().collect(),
        ..DeidConfig::default()
    };
    Deidentifier::new(config, keys().tokenizer("DSA-TEST-1").unwrap())
}

pub fn text(tag: Tag, vr: VR, v: &str) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, PrimitiveValue::from(v))
}

pub fn seq(tag: Tag, items: Vec<InMemDicomObject>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::SQ, DataSetSequence::new(items, Length::UNDEFINED))
}

pub fn item(elems: Vec<DataElement<InMemDicomObject>>) -> InMemDicomObject {
    InMemDicomObject::from_element_iter(elems)
}

/// A small CT instance of patient "DOE^JANE" (ID MRN0042) with the given extra elements.
pub fn ct(
    study: &str,
    series: &str,
    sop: &str,
    extra: Vec<DataElement<InMemDicomObject>>,
) -> DefaultDicomObject {
    let mut o = item(vec![
        text(tags::SOP_CLASS_UID, VR::UI, CT_IMAGE_STORAGE),
        text(tags::SOP_INSTANCE_UID, VR::UI, sop),
        text(tags::STUDY_INSTANCE_UID, VR::UI, study),
        text(tags::SERIES_INSTANCE_UID, VR::UI, series),
        text(tags::FRAME_OF_REFERENCE_UID, VR::UI, &format!("{study}.9")),
        text(tags::MODALITY, VR::CS, "CT"),
        text(tags::PATIENT_NAME, VR::PN, "DOE^JANE"),
        text(tags::PATIENT_ID, VR::LO, "MRN0042"),
        text(tags::PATIENT_BIRTH_DATE, VR::DA, "19610203"),
        text(tags::STUDY_DATE, VR::DA, "20240110"),
        text(tags::ACCESSION_NUMBER, VR::SH, "ACC778899"),
        text(tags::INSTITUTION_NAME, VR::LO, "St Elsewhere General"),
        DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(4_u16)),
        DataElement::new(tags::COLUMNS, VR::US, PrimitiveValue::from(4_u16)),
        DataElement::new(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(16_u16)),
        DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(1_u16)),
        DataElement::new(
            tags::PIXEL_DATA,
            VR::OW,
            PrimitiveValue::U16((0..16u16).collect()),
        ),
    ]);
    for e in extra {
        o.put(e);
    }
    file(o)
}

pub fn file(o: InMemDicomObject) -> DefaultDicomObject {
    let s = |t: Tag| {
        o.get(t)
            .and_then(|e| e.to_str().ok())
            .map(|v| v.to_string())
            .unwrap_or_default()
    };
    let (class, sop) = (s(tags::SOP_CLASS_UID), s(tags::SOP_INSTANCE_UID));
    o.with_meta(
        FileMetaTableBuilder::new()
            .transfer_syntax("1.2.840.10008.1.2.1")
            .media_storage_sop_class_uid(class)
            .media_storage_sop_instance_uid(sop),
    )
    .expect("meta")
}

/// Every (path, element) of a dataset at every depth.
pub fn walk(obj: &InMemDicomObject) -> Vec<(String, DataElement<InMemDicomObject>)> {
    fn go(
        o: &InMemDicomObject,
        path: &str,
        out: &mut Vec<(String, DataElement<InMemDicomObject>)>,
    ) {
        for e in o.iter() {
            out.push((path.to_string(), e.clone()));
            if let Value::Sequence(s) = e.value() {
                for (i, it) in s.items().iter().enumerate() {
                    go(it, &format!("{path}{}[{i}]/", e.tag()), out);
                }
            }
        }
    }
    let mut out = Vec::new();
    go(obj, "", &mut out);
    out
}

pub fn str_of(e: &DataElement<InMemDicomObject>) -> String {
    e.to_str()
        .map(|s| s.trim_matches(['\0', ' ']).to_string())
        .unwrap_or_default()
}

/// Serialises a file object to bytes (for determinism checks).
pub fn bytes(obj: &DefaultDicomObject) -> Vec<u8> {
    let mut v = Vec::new();
    obj.write_all(&mut v).expect("encode");
    v
}

/// pydicom's sample files, from the Debian package (python3-pydicom).
pub fn pydicom_test_files() -> PathBuf {
    let known = Path::new("/usr/lib/python3/dist-packages/pydicom/data/test_files");
    if known.is_dir() {
        return known.to_path_buf();
    }
    let out = Command::new("/usr/bin/python3")
        .args(["-c", "import pydicom,os;print(os.path.join(os.path.dirname(pydicom.__file__),'data','test_files'))"])
        .output()
        .expect("/usr/bin/python3 with pydicom (Debian python3-pydicom) is required");
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        p.is_dir(),
        "pydicom test files not found; install python3-pydicom"
    );
    p
}

pub fn tool(name: &str) -> String {
    for dir in ["/usr/bin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p.display().to_string();
        }
    }
    panic!("{name} not found; install dcmtk and dicom3tools (see .ci/setup)");
}

/// The standard's table as kept in the repository (for the Python checker).
pub fn table_csv() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/deid/standard/ps315_table_e1_1.csv")
}

pub fn checker() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/check_deid.py")
}
