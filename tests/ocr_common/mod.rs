//! Helpers shared by the OCR tests and benchmark: synthetic ultrasound images with text rendered
//! into their pixels by a real font (DejaVu from Debian, through Pillow), and an independent OCR
//! read of an output's pixels with the Tesseract command line.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Stdio};

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::mem::InMemDicomObject;
use dicom_object::{DefaultDicomObject, FileMetaTableBuilder};

pub const US_IMAGE_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.6.1";
pub const US_MULTIFRAME_STORAGE: &str = "1.2.840.10008.5.1.4.1.1.3.1";

/// The text a synthetic ultrasound screen carries: a name, an MRN, a date, an institution.
pub const SCREEN_TEXT: &[&str] = &[
    "12,10,16,DOE^JOHN  MRN 4471180",
    "12,32,14,2019-03-14 10:22",
    "470,10,14,ST MARY HOSPITAL",
];

/// Renders a `w` x `h` 8-bit ultrasound frame with `lines` ("x,y,size,text") of text; returns
/// the pixels and the box (x0, y0, x1, y1) that holds all the text.
pub fn render(w: u32, h: u32, seed: u32, lines: &[&str]) -> (Vec<u8>, Option<[u32; 4]>) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ocr_common/render.py");
    let out = Command::new("/usr/bin/python3")
        .arg(script)
        .args([w.to_string(), h.to_string(), seed.to_string()])
        .args(lines)
        .output()
        .expect("/usr/bin/python3 with python3-pil is required (run .ci/setup)");
    assert!(
        out.status.success(),
        "render.py failed (python3-pil, fonts-dejavu-core installed?)"
    );
    assert_eq!(out.stdout.len(), (w * h) as usize);
    let b = String::from_utf8_lossy(&out.stderr).to_string();
    let n: Vec<u32> = b
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    (out.stdout, (n.len() == 4).then(|| [n[0], n[1], n[2], n[3]]))
}

fn el(tag: dicom_core::Tag, vr: VR, v: &str) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, PrimitiveValue::from(v))
}

/// An ultrasound instance of "DOE^JOHN" holding `pixels` (8-bit MONOCHROME2 or RGB, or 16-bit
/// MONOCHROME2 when `bits` is 16), in Explicit VR Little Endian.
pub fn ultrasound(
    sop: &str,
    cols: u16,
    rows: u16,
    frames: u16,
    samples: u16,
    bits: u16,
    pixels: PrimitiveValue,
) -> DefaultDicomObject {
    let class = if frames > 1 {
        US_MULTIFRAME_STORAGE
    } else {
        US_IMAGE_STORAGE
    };
    let mut o = InMemDicomObject::from_element_iter([
        el(tags::SOP_CLASS_UID, VR::UI, class),
        el(tags::SOP_INSTANCE_UID, VR::UI, sop),
        el(
            tags::STUDY_INSTANCE_UID,
            VR::UI,
            "1.2.826.0.1.3680043.10.1137.1",
        ),
        el(
            tags::SERIES_INSTANCE_UID,
            VR::UI,
            "1.2.826.0.1.3680043.10.1137.1.2",
        ),
        el(tags::MODALITY, VR::CS, "US"),
        el(tags::PATIENT_NAME, VR::PN, "DOE^JOHN"),
        el(tags::PATIENT_ID, VR::LO, "4471180"),
        el(tags::PATIENT_BIRTH_DATE, VR::DA, "19580314"),
        el(tags::STUDY_DATE, VR::DA, "20190314"),
        el(tags::ACCESSION_NUMBER, VR::SH, "ACC-US-0001"),
        el(
            tags::PHOTOMETRIC_INTERPRETATION,
            VR::CS,
            if samples == 3 { "RGB" } else { "MONOCHROME2" },
        ),
        DataElement::new(
            tags::SAMPLES_PER_PIXEL,
            VR::US,
            PrimitiveValue::from(samples),
        ),
        DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(rows)),
        DataElement::new(tags::COLUMNS, VR::US, PrimitiveValue::from(cols)),
        DataElement::new(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(bits)),
        DataElement::new(
            tags::BITS_STORED,
            VR::US,
            PrimitiveValue::from(if bits == 16 { 12 } else { 8 }),
        ),
        DataElement::new(
            tags::HIGH_BIT,
            VR::US,
            PrimitiveValue::from(if bits == 16 { 11 } else { 7 }),
        ),
        DataElement::new(
            tags::PIXEL_REPRESENTATION,
            VR::US,
            PrimitiveValue::from(0_u16),
        ),
    ]);
    if samples == 3 {
        o.put(DataElement::new(
            tags::PLANAR_CONFIGURATION,
            VR::US,
            PrimitiveValue::from(0_u16),
        ));
    }
    if frames > 1 {
        o.put(el(tags::NUMBER_OF_FRAMES, VR::IS, &frames.to_string()));
    }
    let vr = if bits == 16 { VR::OW } else { VR::OB };
    o.put(DataElement::new(tags::PIXEL_DATA, vr, pixels));
    o.with_meta(
        FileMetaTableBuilder::new()
            .transfer_syntax("1.2.840.10008.1.2.1")
            .media_storage_sop_class_uid(class)
            .media_storage_sop_instance_uid(sop),
    )
    .expect("meta")
}

/// A single-frame 640 x 480 8-bit ultrasound image with `lines` of text in its pixels.
pub fn us_with_text(
    sop: &str,
    seed: u32,
    lines: &[&str],
) -> (DefaultDicomObject, Option<[u32; 4]>) {
    let (px, bbox) = render(640, 480, seed, lines);
    (
        ultrasound(sop, 640, 480, 1, 1, 8, PrimitiveValue::U8(px.into())),
        bbox,
    )
}

/// The words (confidence, text) an independent Tesseract run reads in an 8-bit grey picture
/// that have a letter or digit and confidence of at least 40.
pub fn readable_words(pixels: &[u8], w: usize, h: usize) -> Vec<(f32, String)> {
    let mut pgm = format!("P5\n{w} {h}\n255\n").into_bytes();
    pgm.extend_from_slice(pixels);
    let mut child = Command::new("tesseract")
        .args(["stdin", "stdout", "-l", "eng", "--psm", "11", "tsv"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("tesseract is required (run .ci/setup)");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(&pgm).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.splitn(12, '\t').collect();
            let conf: f32 = f.get(10)?.parse().ok()?;
            let text = f.get(11)?.trim().to_string();
            (f[0] == "5"
                && conf >= 40.0
                && text.chars().filter(|c| c.is_alphanumeric()).count() >= 2)
                .then_some((conf, text))
        })
        .collect()
}

/// The 8-bit pixels of a DICOM file (single frame, one sample).
pub fn pixels_of(path: &Path) -> Vec<u8> {
    let o = dicom_object::open_file(path).expect("output opens");
    o.element(tags::PIXEL_DATA)
        .unwrap()
        .to_bytes()
        .unwrap()
        .into_owned()
}
