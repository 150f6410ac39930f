//! Must be true #3 (issue 11): burned-in text found and removed with OCR.
//!
//! A 640 x 480 ultrasound image with a name, an MRN, a date and an institution rendered into its
//! pixels with a real font comes out of `pacs-broker deid --burned-in-text clean-pixel-data` with
//! the text gone (an independent Tesseract run reads nothing, the text region's pixels changed,
//! the image outside it did not) and is released; the same image with OCR unavailable is
//! quarantined; an ultrasound image without text is released under the OCR mode and quarantined
//! without it. Multi-frame RGB and 16-bit images are cleaned frame by frame. Outputs parse in
//! dcmtk and pydicom.

mod ocr_common;

use std::path::{Path, PathBuf};
use std::process::Command;

use dicom_core::PrimitiveValue;
use dicom_dictionary_std::tags;
use ocr_common::*;
use pacs_broker::deid::{BurnedInTextMode, DeidConfig, DeidError, Deidentifier, OcrEngine};
use pacs_broker::pseudonym::SiteKeys;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_pacs-broker"))
}

struct Run {
    code: i32,
    out: PathBuf,
    stdout: String,
    stderr: String,
}

/// `pacs-broker deid --profile basic [--burned-in-text MODE]` on `inputs`, with OCR at `tesseract`.
fn deid(dir: &Path, name: &str, mode: Option<&str>, tesseract: &str, inputs: &[&Path]) -> Run {
    let key = dir.join("site.key");
    if !key.exists() {
        SiteKeys::generate().write_new(&key).unwrap();
    }
    let out = dir.join(name);
    let mut cmd = bin();
    cmd.args(["deid", "--profile", "basic", "--key"])
        .arg(&key)
        .arg("--out")
        .arg(&out)
        .env("PACS_BROKER_TESSERACT", tesseract)
        .env("PACS_BROKER_LOG", "debug");
    if let Some(m) = mode {
        cmd.args(["--burned-in-text", m]);
    }
    let o = cmd.args(inputs).output().unwrap();
    Run {
        code: o.status.code().unwrap_or(-1),
        out,
        stdout: String::from_utf8_lossy(&o.stdout).into(),
        stderr: String::from_utf8_lossy(&o.stderr).into(),
    }
}

fn quarantine_list(out: &Path) -> String {
    std::fs::read_to_string(out.join("quarantine.jsonl")).unwrap_or_default()
}

fn assert_parses_in_dcmtk_and_pydicom(f: &Path) {
    let d = Command::new("dcmdump")
        .arg("-q")
        .arg(f)
        .output()
        .expect("dcmdump (run .ci/setup)");
    assert!(
        d.status.success(),
        "dcmdump: {}",
        String::from_utf8_lossy(&d.stderr)
    );
    let p = Command::new("/usr/bin/python3")
        .args(["-c", "import pydicom,sys; d=pydicom.dcmread(sys.argv[1]); assert len(d.PixelData) == d.Rows * d.Columns * d.SamplesPerPixel * d.BitsAllocated // 8 * int(d.get('NumberOfFrames', 1)); print(d.BurnedInAnnotation)"])
        .arg(f)
        .output()
        .expect("python3-pydicom (run .ci/setup)");
    assert!(
        p.status.success(),
        "pydicom: {}",
        String::from_utf8_lossy(&p.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&p.stdout).trim(), "NO");
}

const PHI_IN_PIXELS: &[&str] = &["DOE", "JOHN", "4471180", "2019", "MARY", "HOSPITAL"];

#[test]
fn burned_in_text_is_found_removed_and_the_image_released() {
    let dir = tempfile::tempdir().unwrap();
    let (obj, bbox) = us_with_text("1.2.826.0.1.3680043.10.1137.7", 7, SCREEN_TEXT);
    let input = dir.path().join("us-text.dcm");
    obj.write_to_file(&input).unwrap();
    let before = pixels_of(&input);
    let seen: Vec<String> = readable_words(&before, 640, 480)
        .into_iter()
        .map(|w| w.1)
        .collect();
    assert!(
        seen.iter().any(|w| w.contains("4471180")),
        "the test image must carry readable text: {seen:?}"
    );

    let run = deid(
        dir.path(),
        "out",
        Some("clean-pixel-data"),
        "tesseract",
        &[&input],
    );
    assert_eq!(
        run.code,
        0,
        "{}{}\n{}",
        run.stdout,
        run.stderr,
        quarantine_list(&run.out)
    );
    let output = run.out.join("us-text.dcm");
    let after = pixels_of(&output);
    let left = readable_words(&after, 640, 480);
    assert!(
        left.is_empty(),
        "text still readable after cleaning: {left:?}"
    );
    // The text region changed; the sector (the image itself) below it did not.
    let [x0, y0, x1, y1] = bbox.unwrap();
    let changed = (y0..y1)
        .flat_map(|y| (x0..x1).map(move |x| (y * 640 + x) as usize))
        .filter(|&i| before[i] != after[i])
        .count();
    assert!(
        changed > 1000,
        "only {changed} pixels of the text region changed"
    );
    let sector = 200 * 640..470 * 640;
    assert_eq!(
        before[sector.clone()],
        after[sector],
        "the image outside the text was altered"
    );
    assert_parses_in_dcmtk_and_pydicom(&output);
    // No text read from the pixels, nor the patient's identity, in any log line or message.
    for phi in PHI_IN_PIXELS {
        assert!(
            !run.stderr.contains(phi),
            "{phi:?} in the log: {}",
            run.stderr
        );
        assert!(!run.stdout.contains(phi), "{phi:?} on screen");
    }
}

#[test]
fn without_ocr_the_same_image_is_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let (obj, _) = us_with_text("1.2.826.0.1.3680043.10.1137.8", 7, SCREEN_TEXT);
    let input = dir.path().join("us-text.dcm");
    obj.write_to_file(&input).unwrap();
    let run = deid(
        dir.path(),
        "out",
        Some("clean-pixel-data"),
        "/nonexistent/tesseract",
        &[&input],
    );
    assert_eq!(run.code, 3, "{}{}", run.stdout, run.stderr);
    let q = quarantine_list(&run.out);
    assert!(q.contains("\"quarantined\""), "{q}");
    assert!(q.contains("OCR is not available"), "{q}");
    assert!(
        !run.out.join("us-text.dcm").exists(),
        "nothing is written for a held image"
    );
}

#[test]
fn an_image_without_text_is_released_under_ocr_and_held_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let (obj, bbox) = us_with_text("1.2.826.0.1.3680043.10.1137.9", 11, &[]);
    assert!(bbox.is_none());
    let input = dir.path().join("us-plain.dcm");
    obj.write_to_file(&input).unwrap();
    let with = deid(
        dir.path(),
        "ocr",
        Some("clean-pixel-data"),
        "tesseract",
        &[&input],
    );
    assert_eq!(
        with.code,
        0,
        "{}{}\n{}",
        with.stdout,
        with.stderr,
        quarantine_list(&with.out)
    );
    let output = with.out.join("us-plain.dcm");
    assert_eq!(
        pixels_of(&output),
        pixels_of(&input),
        "pixels of a text-free image are untouched"
    );
    assert_parses_in_dcmtk_and_pydicom(&output);

    let without = deid(dir.path(), "plain", None, "tesseract", &[&input]);
    assert_eq!(without.code, 3, "{}{}", without.stdout, without.stderr);
    let q = quarantine_list(&without.out);
    assert!(q.contains("US image without BurnedInAnnotation NO"), "{q}");
}

fn engine_deidentifier(engine: OcrEngine) -> Deidentifier {
    let config = DeidConfig {
        burned_in_text: BurnedInTextMode::CleanPixelData,
        ..DeidConfig::default()
    };
    Deidentifier::new(
        config,
        SiteKeys::from_bytes([7; 32], [9; 32])
            .tokenizer("DSA-OCR")
            .unwrap(),
    )
    .with_ocr_engine(engine)
}

#[test]
fn rgb_multiframe_images_are_cleaned_frame_by_frame_with_evidence() {
    // Frame 0 has no text, frame 1 has the screen text: only frame 1 changes.
    let (plain, _) = render(320, 240, 3, &[]);
    let (texted, bbox) = render(320, 240, 4, &["8,8,16,DOE^JOHN 4471180"]);
    let mut px = Vec::new();
    for frame in [&plain, &texted] {
        px.extend(frame.iter().flat_map(|&v| [v, v, v]));
    }
    let obj = ultrasound(
        "1.2.826.0.1.3680043.10.1137.10",
        320,
        240,
        2,
        3,
        8,
        PrimitiveValue::U8(px.clone().into()),
    );
    let d = engine_deidentifier(OcrEngine::from_env())
        .deidentify(obj)
        .expect("released");
    let ev = d.ocr_evidence.expect("evidence for the audit entry");
    assert_eq!(ev.mode, "clean-pixel-data");
    assert!(ev.engine.starts_with("tesseract "), "{}", ev.engine);
    assert_eq!(ev.frames, 2);
    assert!(
        ev.boxes_redacted >= 2 && ev.redacted.iter().all(|b| b.frame == 1),
        "{ev:?}"
    );
    assert_eq!(ev.residual_readable, 0);
    assert!(
        !format!("{ev:?}").contains("DOE"),
        "evidence holds boxes, never text"
    );
    let out = d
        .object
        .element(tags::PIXEL_DATA)
        .unwrap()
        .to_bytes()
        .unwrap()
        .into_owned();
    let frame = 320 * 240 * 3;
    assert_eq!(
        out[..frame],
        px[..frame],
        "the frame without text is untouched"
    );
    let grey: Vec<u8> = out[frame..].chunks(3).map(|p| p[0]).collect();
    assert!(readable_words(&grey, 320, 240).is_empty());
    let [x0, y0, x1, y1] = bbox.unwrap();
    assert!((y0..y1).all(|y| (x0..x1).all(|x| grey[(y * 320 + x) as usize] == 0)));
}

#[test]
fn sixteen_bit_images_are_cleaned_and_missing_ocr_means_quarantine() {
    let (px, bbox) = render(320, 240, 5, &["8,8,16,DOE^JOHN 4471180"]);
    let words: Vec<u16> = px.iter().map(|&v| u16::from(v) * 16).collect();
    let make = || {
        ultrasound(
            "1.2.826.0.1.3680043.10.1137.11",
            320,
            240,
            1,
            1,
            16,
            PrimitiveValue::U16(words.clone().into()),
        )
    };
    let d = engine_deidentifier(OcrEngine::from_env())
        .deidentify(make())
        .expect("released");
    let out = d
        .object
        .element(tags::PIXEL_DATA)
        .unwrap()
        .to_bytes()
        .unwrap()
        .into_owned();
    let values: Vec<u16> = out
        .chunks(2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .collect();
    let [x0, y0, x1, y1] = bbox.unwrap();
    assert!((y0..y1).all(|y| (x0..x1).all(|x| values[(y * 320 + x) as usize] == 0)));
    let grey: Vec<u8> = values.iter().map(|&v| (v / 16) as u8).collect();
    assert!(readable_words(&grey, 320, 240).is_empty());

    let held = engine_deidentifier(OcrEngine::new("/nonexistent/tesseract")).deidentify(make());
    match held {
        Err(DeidError::Quarantined { reason }) => {
            assert!(reason.contains("OCR is not available"), "{reason}");
            assert!(!reason.contains("DOE"));
        }
        other => panic!("expected quarantine, got {other:?}"),
    }
}

#[test]
fn declared_burned_in_text_that_ocr_cannot_find_is_held_back() {
    let (px, _) = render(320, 240, 6, &[]);
    let mut obj = ultrasound(
        "1.2.826.0.1.3680043.10.1137.12",
        320,
        240,
        1,
        1,
        8,
        PrimitiveValue::U8(px.into()),
    );
    obj.put(dicom_core::DataElement::new(
        tags::BURNED_IN_ANNOTATION,
        dicom_core::VR::CS,
        "YES",
    ));
    match engine_deidentifier(OcrEngine::from_env()).deidentify(obj) {
        Err(DeidError::Quarantined { reason }) => {
            assert!(reason.contains("OCR found no text"), "{reason}")
        }
        other => panic!("expected quarantine, got {other:?}"),
    }
}

#[test]
fn compressed_images_are_decoded_cleaned_and_written_uncompressed() {
    let dir = tempfile::tempdir().unwrap();
    let (obj, bbox) = us_with_text("1.2.826.0.1.3680043.10.1137.13", 7, SCREEN_TEXT);
    let native = dir.path().join("native.dcm");
    obj.write_to_file(&native).unwrap();
    let inputs = dir.path().join("in");
    std::fs::create_dir_all(&inputs).unwrap();
    // dcmtk compresses: JPEG baseline (lossy) and RLE (lossless).
    for (tool, flag, name) in [
        ("dcmcjpeg", "+eb", "jpeg.dcm"),
        ("dcmcrle", "+e", "rle.dcm"),
    ] {
        let o = Command::new(tool)
            .arg(flag)
            .arg(&native)
            .arg(inputs.join(name))
            .output()
            .expect("dcmtk (run .ci/setup)");
        assert!(
            o.status.success(),
            "{tool}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let run = deid(
        dir.path(),
        "out",
        Some("clean-pixel-data"),
        "tesseract",
        &[&inputs],
    );
    assert_eq!(
        run.code,
        0,
        "{}{}\n{}",
        run.stdout,
        run.stderr,
        quarantine_list(&run.out)
    );
    let [x0, y0, x1, y1] = bbox.unwrap();
    for (name, lossy) in [("jpeg.dcm", true), ("rle.dcm", false)] {
        let output = run.out.join(name);
        let o = dicom_object::open_file(&output).unwrap();
        assert_eq!(
            o.meta().transfer_syntax().trim_end_matches('\0'),
            "1.2.840.10008.1.2.1",
            "{name} is written uncompressed"
        );
        let lossy_attr = o
            .element(tags::LOSSY_IMAGE_COMPRESSION)
            .ok()
            .and_then(|e| e.to_str().ok().map(|s| s.trim().to_string()));
        assert_eq!(
            lossy_attr.as_deref() == Some("01"),
            lossy,
            "{name}: LossyImageCompression"
        );
        let px = pixels_of(&output);
        assert!(
            readable_words(&px, 640, 480).is_empty(),
            "{name}: text left"
        );
        let dark = (y0..y1)
            .flat_map(|y| (x0..x1).map(move |x| (y * 640 + x) as usize))
            .filter(|&i| px[i] == 0)
            .count();
        let area = ((x1 - x0) * (y1 - y0)) as usize;
        assert!(dark * 10 > area * 9, "{name}: text region not blacked out");
        assert_parses_in_dcmtk_and_pydicom(&output);
    }
}
