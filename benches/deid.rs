//! De-identification throughput: a generated 500-instance CT study (512x512, 16-bit) through
//! pacs-broker (its batch runner in process, and its command line), dcmtk `dcmodify` (a handful
//! of edits) and, when installed, the pydicom-based `dicognito` and `deid` (PyPI), on the same
//! machine in the same run, in rounds that run every tool in turn so that they share the
//! machine's weather. The comparison tools are optional: `pip install dicognito deid`.
//!
//!     cargo bench --bench deid                 # 500 instances
//!     DEID_BENCH_INSTANCES=100 cargo bench --bench deid
//!     DEID_BENCH_ONLY_OURS=1 cargo bench --bench deid   # skip the comparison tools
//!     DEID_BENCH_VERBOSE=1 DEID_BENCH_RUSAGE=1 cargo bench --bench deid   # every run, and the
//!                                          # command line's CPU time (needs /usr/bin/time)
//!
//! A benchmark, not a test: it prints instances/s, MB/s and the ratios, and skips a comparison
//! tool that is not installed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use dicom_core::value::{DataSetSequence, PrimitiveValue};
use dicom_core::{DataElement, Length, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::mem::InMemDicomObject;
use dicom_object::FileMetaTableBuilder;
use pacs_broker::deid::{run_batch, DeidConfig, Deidentifier, ProfileOption};
use pacs_broker::pseudonym::SiteKeys;

fn t(tag: Tag, vr: VR, v: &str) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, PrimitiveValue::from(v))
}

fn generate(dir: &Path, n: usize) -> u64 {
    std::fs::create_dir_all(dir).unwrap();
    let study = "1.2.826.0.1.3680043.99.7";
    let series = format!("{study}.1");
    let pixels: Vec<u16> = (0..512 * 512).map(|i| ((i * 7) % 4096) as u16).collect();
    let mut total = 0;
    for i in 0..n {
        let sop = format!("{series}.{}", i + 1);
        let refd = DataSetSequence::new(
            vec![InMemDicomObject::from_element_iter([
                t(
                    tags::REFERENCED_SOP_CLASS_UID,
                    VR::UI,
                    "1.2.840.10008.5.1.4.1.1.2",
                ),
                t(
                    tags::REFERENCED_SOP_INSTANCE_UID,
                    VR::UI,
                    &format!("{series}.{}", (i + 1) % n + 1),
                ),
            ])],
            Length::UNDEFINED,
        );
        let obj = InMemDicomObject::from_element_iter([
            t(tags::SPECIFIC_CHARACTER_SET, VR::CS, "ISO_IR 100"),
            t(tags::IMAGE_TYPE, VR::CS, "ORIGINAL\\PRIMARY\\AXIAL"),
            t(tags::SOP_CLASS_UID, VR::UI, "1.2.840.10008.5.1.4.1.1.2"),
            t(tags::SOP_INSTANCE_UID, VR::UI, &sop),
            t(tags::STUDY_DATE, VR::DA, "20240110"),
            t(tags::SERIES_DATE, VR::DA, "20240110"),
            t(tags::CONTENT_DATE, VR::DA, "20240110"),
            t(tags::STUDY_TIME, VR::TM, "101500"),
            t(tags::ACCESSION_NUMBER, VR::SH, "ACC778899"),
            t(tags::MODALITY, VR::CS, "CT"),
            t(tags::MANUFACTURER, VR::LO, "ACME Medical"),
            t(tags::INSTITUTION_NAME, VR::LO, "St Elsewhere General"),
            t(tags::REFERRING_PHYSICIAN_NAME, VR::PN, "WELBY^MARCUS"),
            t(tags::STATION_NAME, VR::SH, "CT01"),
            t(tags::STUDY_DESCRIPTION, VR::LO, "CT CHEST"),
            t(tags::SERIES_DESCRIPTION, VR::LO, "AXIAL 1MM"),
            DataElement::new(tags::REFERENCED_IMAGE_SEQUENCE, VR::SQ, refd),
            t(tags::PATIENT_NAME, VR::PN, "DOE^JANE"),
            t(tags::PATIENT_ID, VR::LO, "MRN0042"),
            t(tags::PATIENT_BIRTH_DATE, VR::DA, "19610203"),
            t(tags::PATIENT_SEX, VR::CS, "F"),
            t(Tag(0x0009, 0x0010), VR::LO, "ACME 1.0"),
            t(Tag(0x0009, 0x1001), VR::LO, "scanner internal"),
            t(tags::SLICE_THICKNESS, VR::DS, "1.0"),
            t(tags::KVP, VR::DS, "120"),
            t(tags::STUDY_INSTANCE_UID, VR::UI, study),
            t(tags::SERIES_INSTANCE_UID, VR::UI, &series),
            t(tags::STUDY_ID, VR::SH, "1"),
            t(tags::SERIES_NUMBER, VR::IS, "1"),
            t(tags::INSTANCE_NUMBER, VR::IS, &(i + 1).to_string()),
            t(tags::IMAGE_POSITION_PATIENT, VR::DS, &format!("0\\0\\{i}")),
            t(tags::IMAGE_ORIENTATION_PATIENT, VR::DS, "1\\0\\0\\0\\1\\0"),
            t(tags::FRAME_OF_REFERENCE_UID, VR::UI, &format!("{study}.9")),
            t(tags::POSITION_REFERENCE_INDICATOR, VR::LO, ""),
            DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(1_u16)),
            t(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2"),
            DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(512_u16)),
            DataElement::new(tags::COLUMNS, VR::US, PrimitiveValue::from(512_u16)),
            t(tags::PIXEL_SPACING, VR::DS, "0.7\\0.7"),
            DataElement::new(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(16_u16)),
            DataElement::new(tags::BITS_STORED, VR::US, PrimitiveValue::from(12_u16)),
            DataElement::new(tags::HIGH_BIT, VR::US, PrimitiveValue::from(11_u16)),
            DataElement::new(
                tags::PIXEL_REPRESENTATION,
                VR::US,
                PrimitiveValue::from(0_u16),
            ),
            t(tags::RESCALE_INTERCEPT, VR::DS, "-1024"),
            t(tags::RESCALE_SLOPE, VR::DS, "1"),
            DataElement::new(
                tags::PIXEL_DATA,
                VR::OW,
                PrimitiveValue::U16(pixels.clone().into()),
            ),
        ]);
        let file = obj
            .with_meta(
                FileMetaTableBuilder::new()
                    .transfer_syntax("1.2.840.10008.1.2.1")
                    .media_storage_sop_class_uid("1.2.840.10008.5.1.4.1.1.2")
                    .media_storage_sop_instance_uid(sop),
            )
            .unwrap();
        let path = dir.join(format!("IM{i:05}.dcm"));
        file.write_to_file(&path).unwrap();
        total += std::fs::metadata(&path).unwrap().len();
    }
    total
}

fn copy_dir(from: &Path, to: &Path) -> Vec<PathBuf> {
    std::fs::create_dir_all(to).unwrap();
    let mut files = Vec::new();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dst = to.join(p.file_name().unwrap());
        std::fs::copy(&p, &dst).unwrap();
        files.push(dst);
    }
    files.sort();
    files
}

fn report(name: &str, n: usize, bytes: u64, d: Duration, ours: Option<Duration>, spread: &str) {
    let s = d.as_secs_f64();
    let ratio = ours
        .map(|o| format!("  pacs-broker is {:.1}x faster", s / o.as_secs_f64()))
        .unwrap_or_default();
    println!(
        "{name:<32} {n:>4} instances in {s:>5.2} s {spread:<20} {:>7.1} instances/s {:>7.1} MB/s{ratio}",
        n as f64 / s,
        bytes as f64 / 1e6 / s
    );
}

/// A Python interpreter on this machine that can import `module`.
fn python_with(module: &str) -> Option<String> {
    for py in ["python3", "/usr/bin/python3"] {
        let ok = Command::new(py)
            .args(["-c", &format!("import {module}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            return Some(py.to_string());
        }
    }
    None
}

/// One contender: a name and a run (given a fresh output folder) that returns its time.
struct Contender<'a> {
    name: &'static str,
    run: Box<dyn FnMut(&Path) -> Duration + 'a>,
    times: Vec<Duration>,
}

/// pydicom-deid (PyPI `deid`) with its default recipe, private tags removed.
const PYDICOM_DEID: &str = "import sys, glob\nfrom deid.logger import bot\nbot.level = 0\n\
from deid.dicom import replace_identifiers\n\
files = sorted(glob.glob(sys.argv[1] + '/*.dcm'))\n\
replace_identifiers(files, save=True, output_folder=sys.argv[2], overwrite=True, remove_private=True)\n";

fn main() {
    let n: usize = std::env::var("DEID_BENCH_INSTANCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    println!("generating {n} CT instances (512x512, 16-bit)...");
    let bytes = generate(&input, n);
    println!("input: {:.1} MB", bytes as f64 / 1e6);

    let keys = SiteKeys::from_bytes([7; 32], [9; 32]);
    let config = DeidConfig {
        options: [ProfileOption::RetainLongitudinalModifiedDates].into(),
        ..DeidConfig::default()
    };
    let deid = Deidentifier::new(config, keys.tokenizer("BENCH").unwrap());
    let exe = env!("CARGO_BIN_EXE_pacs-broker");
    let key = tmp.path().join("site.key");
    let made = Command::new(exe)
        .args(["keys", "new", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(made.status.success(), "keys new failed: {made:?}");

    let input = &input;
    let timed = |cmd: &mut Command, what: &str| {
        let start = Instant::now();
        let out = cmd.output().unwrap();
        let took = start.elapsed();
        if std::env::var_os("DEID_BENCH_RUSAGE").is_some() {
            eprint!("{}", String::from_utf8_lossy(&out.stderr));
        }
        assert!(out.status.success(), "{what} failed: {out:?}");
        took
    };
    let mut contenders: Vec<Contender> = Vec::new();
    // pacs-broker: the full profile, verifier and release check, outputs durable on disk.
    contenders.push(Contender {
        name: "pacs-broker deid, in process",
        run: Box::new(|out| {
            let start = Instant::now();
            let summary = run_batch(&deid, std::slice::from_ref(input), out, |_| {}).unwrap();
            let took = start.elapsed();
            assert_eq!(summary.deidentified, n, "every instance is released");
            took
        }),
        times: Vec::new(),
    });
    // The same through the command line, as a user runs it (process start, key file).
    contenders.push(Contender {
        name: "pacs-broker deid, command line",
        run: Box::new(|out| {
            let mut cmd = if std::env::var_os("DEID_BENCH_RUSAGE").is_some() {
                let mut c = Command::new("/usr/bin/time");
                c.args([
                    "-f",
                    "cli: %e s elapsed %U user %S sys %F majfl %R minfl %w waits %c ctxsw",
                    exe,
                ]);
                c
            } else {
                Command::new(exe)
            };
            timed(
                cmd.args(["deid", "--profile", "basic", "--option"])
                    .arg("retain-longitudinal-modified-dates")
                    .arg("--key")
                    .arg(&key)
                    .arg(input)
                    .arg("--out")
                    .arg(out),
                "pacs-broker deid",
            )
        }),
        times: Vec::new(),
    });
    let others = std::env::var_os("DEID_BENCH_ONLY_OURS").is_none();
    // dcmtk dcmodify: a handful of edits, in place on a fresh copy (copying is not timed).
    if others && Command::new("dcmodify").arg("--version").output().is_ok() {
        contenders.push(Contender {
            name: "dcmtk dcmodify (8 edits)",
            run: Box::new(|out| {
                let files = copy_dir(input, out);
                sync();
                timed(
                    Command::new("dcmodify")
                        .args(["-nb", "-q", "-ie"])
                        .args(["-ma", "(0010,0010)=ANON", "-ma", "(0010,0020)=ANON"])
                        .args(["-ea", "(0010,0030)", "-ea", "(0008,0080)"])
                        .args(["-ea", "(0008,0090)", "-ea", "(0008,0050)"])
                        .args(["-gin", "-gst", "-gse", "-ep"])
                        .args(&files),
                    "dcmodify",
                )
            }),
            times: Vec::new(),
        });
    } else if others {
        println!("dcmtk dcmodify not installed; skipped");
    }
    match python_with("dicognito").filter(|_| others) {
        Some(py) => contenders.push(Contender {
            name: "dicognito (pydicom)",
            run: Box::new(move |out| {
                timed(
                    Command::new(&py)
                        .args(["-m", "dicognito", "--quiet"])
                        .args(["--assume-burned-in-annotation", "never", "-o"])
                        .arg(out)
                        .arg(input),
                    "dicognito",
                )
            }),
            times: Vec::new(),
        }),
        None if others => println!("dicognito not installed (pip install dicognito); skipped"),
        None => {}
    }
    match python_with("deid.dicom").filter(|_| others) {
        Some(py) => contenders.push(Contender {
            name: "pydicom-deid (PyPI deid)",
            run: Box::new(move |out| {
                std::fs::create_dir_all(out).unwrap();
                timed(
                    Command::new(&py)
                        .args(["-c", PYDICOM_DEID])
                        .arg(input)
                        .arg(out),
                    "pydicom-deid",
                )
            }),
            times: Vec::new(),
        }),
        None if others => println!("pydicom-deid not installed (pip install deid); skipped"),
        None => {}
    }

    println!(
        "each figure: the median of {REPS} rounds; each round runs every tool once, in turn, \
         each after `sync` (no dirty pages pending)\n"
    );
    for round in 0..REPS {
        for (i, c) in contenders.iter_mut().enumerate() {
            let out = tmp.path().join(format!("out-{i}-{round}"));
            sync();
            let t = (c.run)(&out);
            if std::env::var_os("DEID_BENCH_VERBOSE").is_some() {
                eprintln!("round {round}: {} {t:?}", c.name);
            }
            c.times.push(t);
        }
    }
    let medians: Vec<Duration> = contenders
        .iter_mut()
        .map(|c| {
            c.times.sort();
            c.times[REPS / 2]
        })
        .collect();
    // Ratios are against the slower of pacs-broker's two figures.
    let ours = medians[0].max(medians[1]);
    for (i, (c, t)) in contenders.iter().zip(&medians).enumerate() {
        let spread = format!(
            "(runs {:.2}-{:.2} s)",
            c.times[0].as_secs_f64(),
            c.times[REPS - 1].as_secs_f64()
        );
        report(c.name, n, bytes, *t, (i >= 2).then_some(ours), &spread);
    }
}

/// Rounds; the median of each tool's runs is reported.
const REPS: usize = 5;

/// Flushes every dirty page so that one tool's writes do not slow the next one's.
fn sync() {
    let _ = Command::new("sync").status();
}
