//! The OCR path of burned-in text removal (`burned_in_text = "clean-pixel-data"`): images per
//! second per core for 640 x 480 ultrasound images, with text (two OCR passes: find, then check
//! the cleaned pixels) and without (one pass), and the share of a mixed study's de-identification
//! time that OCR takes (CT slices need no OCR; the ultrasound images of the study do).
//!
//!     cargo bench --bench ocr
//!     OCR_BENCH_IMAGES=20 OCR_BENCH_CT=200 OCR_BENCH_US=20 cargo bench --bench ocr
//!
//! Needs Tesseract (tesseract-ocr, tesseract-ocr-eng), Pillow (python3-pil) and the DejaVu fonts
//! (fonts-dejavu-core): `.ci/setup` installs them. A benchmark, not a test: it prints numbers.

#[path = "../tests/ocr_common/mod.rs"]
mod ocr_common;

use std::path::Path;
use std::time::Instant;

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use dicom_object::mem::InMemDicomObject;
use dicom_object::FileMetaTableBuilder;
use pacs_broker::deid::{run_batch, BurnedInTextMode, DeidConfig, Deidentifier, OcrEngine};
use pacs_broker::pseudonym::SiteKeys;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn deidentifier() -> Deidentifier {
    let config = DeidConfig {
        burned_in_text: BurnedInTextMode::CleanPixelData,
        ..DeidConfig::default()
    };
    Deidentifier::new(
        config,
        SiteKeys::from_bytes([7; 32], [9; 32])
            .tokenizer("BENCH")
            .unwrap(),
    )
}

/// `n` ultrasound images from `frames` rendered pictures (each reused with its own UIDs).
fn ultrasound_set(frames: &[Vec<u8>], n: usize, tag: u32) -> Vec<dicom_object::DefaultDicomObject> {
    (0..n)
        .map(|i| {
            let px = frames[i % frames.len()].clone();
            let sop = format!("1.2.826.0.1.3680043.10.1137.{tag}.{}", i + 1);
            ocr_common::ultrasound(&sop, 640, 480, 1, 1, 8, PrimitiveValue::U8(px.into()))
        })
        .collect()
}

/// Images per second on one core: one image at a time on this thread (Tesseract runs with one
/// thread per call).
fn per_core(what: &str, deid: &Deidentifier, images: Vec<dicom_object::DefaultDicomObject>) {
    let n = images.len();
    let start = Instant::now();
    let mut released = 0;
    for obj in images {
        if deid.deidentify(obj).is_ok() {
            released += 1;
        }
    }
    let s = start.elapsed().as_secs_f64();
    println!(
        "{what:<32} {n:>4} images in {s:>6.2} s = {:>6.2} images/s per core ({:.0} ms each), {released} released",
        n as f64 / s,
        1000.0 * s / n as f64
    );
}

fn write_ct(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let pixels: Vec<u16> = (0..512 * 512).map(|i| ((i * 7) % 4096) as u16).collect();
    for i in 0..n {
        let sop = format!("1.2.826.0.1.3680043.10.1137.1.{}", i + 1);
        let t = |tag, vr, v: &str| DataElement::new(tag, vr, PrimitiveValue::from(v));
        let o = InMemDicomObject::from_element_iter([
            t(tags::SOP_CLASS_UID, VR::UI, "1.2.840.10008.5.1.4.1.1.2"),
            t(tags::SOP_INSTANCE_UID, VR::UI, &sop),
            t(
                tags::STUDY_INSTANCE_UID,
                VR::UI,
                "1.2.826.0.1.3680043.10.1137.1",
            ),
            t(
                tags::SERIES_INSTANCE_UID,
                VR::UI,
                "1.2.826.0.1.3680043.10.1137.1.3",
            ),
            t(tags::MODALITY, VR::CS, "CT"),
            t(tags::PATIENT_NAME, VR::PN, "DOE^JOHN"),
            t(tags::PATIENT_ID, VR::LO, "4471180"),
            t(tags::STUDY_DATE, VR::DA, "20190314"),
            t(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2"),
            DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(1_u16)),
            DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(512_u16)),
            DataElement::new(tags::COLUMNS, VR::US, PrimitiveValue::from(512_u16)),
            DataElement::new(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(16_u16)),
            DataElement::new(tags::BITS_STORED, VR::US, PrimitiveValue::from(12_u16)),
            DataElement::new(
                tags::PIXEL_DATA,
                VR::OW,
                PrimitiveValue::U16(pixels.clone().into()),
            ),
        ]);
        o.with_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax("1.2.840.10008.1.2.1")
                .media_storage_sop_class_uid("1.2.840.10008.5.1.4.1.1.2")
                .media_storage_sop_instance_uid(sop.clone()),
        )
        .unwrap()
        .write_to_file(dir.join(format!("ct{i:04}.dcm")))
        .unwrap();
    }
}

fn batch_seconds(deid: &Deidentifier, input: &Path, out: &Path) -> (f64, usize, usize) {
    let start = Instant::now();
    let s = run_batch(deid, &[input.to_path_buf()], out, |_| {}).unwrap();
    (start.elapsed().as_secs_f64(), s.deidentified, s.quarantined)
}

fn main() {
    let engine = OcrEngine::from_env();
    let version = engine
        .version()
        .expect("Tesseract is required for this benchmark (run .ci/setup)");
    let n = env("OCR_BENCH_IMAGES", 20);
    println!("{version}; 640 x 480 8-bit ultrasound images, {n} per kind");
    let texted: Vec<Vec<u8>> = (0..4)
        .map(|s| ocr_common::render(640, 480, s, ocr_common::SCREEN_TEXT).0)
        .collect();
    let plain: Vec<Vec<u8>> = (10..14)
        .map(|s| ocr_common::render(640, 480, s, &[]).0)
        .collect();
    let deid = deidentifier();
    per_core(
        "with text (find, black out, check)",
        &deid,
        ultrasound_set(&texted, n, 2),
    );
    per_core(
        "without text (one OCR pass)",
        &deid,
        ultrasound_set(&plain, n, 3),
    );

    // A mixed study: CT slices (no OCR) and ultrasound images (half with text), through the
    // batch runner with its default workers, against the same study without the ultrasound.
    let (ct, us) = (env("OCR_BENCH_CT", 200), env("OCR_BENCH_US", 20));
    let tmp = tempfile::tempdir().unwrap();
    let (all, only_ct) = (tmp.path().join("all"), tmp.path().join("ct"));
    write_ct(&only_ct, ct);
    write_ct(&all, ct);
    for (i, obj) in ultrasound_set(&texted, us / 2, 4)
        .into_iter()
        .chain(ultrasound_set(&plain, us - us / 2, 5))
        .enumerate()
    {
        obj.write_to_file(all.join(format!("us{i:04}.dcm")))
            .unwrap();
    }
    let (t_ct, _, _) = batch_seconds(&deid, &only_ct, &tmp.path().join("out-ct"));
    let (t_all, done, held) = batch_seconds(&deid, &all, &tmp.path().join("out-all"));
    println!(
        "mixed study: {ct} CT (512 x 512) + {us} US ({} with text): {t_all:.2} s ({done} released, {held} held); the CT alone: {t_ct:.2} s",
        us / 2
    );
    println!(
        "OCR share of the mixed study's time: {:.0}% ({} workers)",
        100.0 * (t_all - t_ct).max(0.0) / t_all,
        std::thread::available_parallelism()
            .map_or(0, |n| n.get() * 2)
            .clamp(2, 16)
    );
}
