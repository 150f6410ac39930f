//! De-identification of real sample files shipped by Debian packages (pydicom's test files from
//! python3-pydicom, dicom3tools' example): every output parses in dcmtk and pydicom, dciodvfy finds
//! no more errors than in the input, and an independent pydicom script checks each output against
//! the standard's table (tests/scripts/check_deid.py).

mod deid_common;

use std::path::{Path, PathBuf};
use std::process::Command;

use pacs_broker::deid::{
    run_batch, BatchOutcome, DeidConfig, Deidentifier, PixelCleanRule, ProfileOption,
};

use deid_common::*;

/// CT, MR (explicit, implicit, big endian, RLE, JPEG 2000, JPEG-LS), SR, RT plan and dose,
/// multi-frame, waveform, and files with private tags and sequences.
const RELEASED: &[&str] = &[
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_expb.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "test-SR.dcm",
    "reportsi.dcm",
    "rtplan.dcm",
    "rtdose.dcm",
    "rtdose_rle.dcm",
    "liver_1frame.dcm",
    "waveform_ecg.dcm",
    "693_J2KI.dcm",
];

fn stage(names: &[&str], dir: &Path) -> Vec<PathBuf> {
    let src = pydicom_test_files();
    std::fs::create_dir_all(dir).unwrap();
    names
        .iter()
        .map(|n| {
            let to = dir.join(n);
            std::fs::copy(src.join(n), &to).unwrap_or_else(|e| panic!("{n}: {e}"));
            to
        })
        .collect()
}

fn dciodvfy_errors(path: &Path) -> usize {
    let out = Command::new(tool("dciodvfy")).arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .chain(String::from_utf8_lossy(&out.stdout).lines())
        .filter(|l| l.starts_with("Error"))
        .count()
}

fn run_checker(options: &str, pairs: &[(PathBuf, PathBuf)]) -> (bool, String) {
    let mut cmd = Command::new("/usr/bin/python3");
    cmd.arg("-W")
        .arg("ignore")
        .arg(checker())
        .arg(table_csv())
        .arg(options);
    for (a, b) in pairs {
        cmd.arg(a).arg(b);
    }
    let out = cmd.output().expect("python3");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn batch(options: &[ProfileOption], inputs: &[PathBuf], out: &Path) -> Vec<(PathBuf, PathBuf)> {
    let deid = deidentifier(options);
    let mut pairs = Vec::new();
    let mut problems = Vec::new();
    run_batch(&deid, inputs, out, |item| match &item.outcome {
        BatchOutcome::Deidentified { output, .. } => {
            pairs.push((item.input.clone(), output.clone()))
        }
        other => problems.push(format!("{}: {other:?}", item.input.display())),
    })
    .unwrap();
    assert!(problems.is_empty(), "{problems:#?}");
    pairs
}

#[test]
fn real_samples_pass_dcmtk_dciodvfy_and_the_pydicom_table_check() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = stage(RELEASED, &tmp.path().join("in"));
    let out = tmp.path().join("out");
    let pairs = batch(&[], &[tmp.path().join("in")], &out);
    assert_eq!(pairs.len(), RELEASED.len());
    for (input, output) in &pairs {
        let st = Command::new(tool("dcmdump"))
            .arg("-q")
            .arg(output)
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "dcmdump rejects {}: {}",
            output.display(),
            String::from_utf8_lossy(&st.stderr)
        );
        let (before, after) = (dciodvfy_errors(input), dciodvfy_errors(output));
        assert!(
            after <= before,
            "{}: dciodvfy errors {before} -> {after}",
            output.display()
        );
    }
    let (ok, report) = run_checker("-", &pairs);
    assert!(ok, "{report}");
    assert!(
        report.contains(&format!("checked {} pairs, 0 problems", RELEASED.len())),
        "{report}"
    );
    assert_eq!(inputs.len(), pairs.len());
}

#[test]
fn options_are_checked_against_their_table_columns() {
    let tmp = tempfile::tempdir().unwrap();
    stage(
        &["CT_small.dcm", "MR_small.dcm", "test-SR.dcm", "rtplan.dcm"],
        &tmp.path().join("in"),
    );
    let options = [
        ProfileOption::RetainLongitudinalModifiedDates,
        ProfileOption::CleanDescriptors,
        ProfileOption::RetainDeviceIdentity,
        ProfileOption::CleanStructuredContent,
    ];
    let pairs = batch(&options, &[tmp.path().join("in")], &tmp.path().join("out"));
    let names: Vec<&str> = options.iter().map(|o| o.name()).collect();
    let (ok, report) = run_checker(&names.join(","), &pairs);
    assert!(ok, "{report}");
}

#[test]
fn the_checker_catches_an_untouched_file() {
    let src = pydicom_test_files().join("CT_small.dcm");
    let (ok, report) = run_checker("-", &[(src.clone(), src)]);
    assert!(!ok, "the checker must fail on an original: {report}");
    assert!(
        report.contains("PatientIdentityRemoved") && report.contains("private attribute survived"),
        "{report}"
    );
}

#[test]
fn bad_and_risky_files_are_listed_and_produce_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = stage(
        &[
            "CT_small.dcm",
            "ExplVR_BigEnd.dcm",
            "no_meta.dcm",
            "MR_truncated.dcm",
            "README.txt",
            "JPEG2000.dcm",
        ],
        &tmp.path().join("in"),
    );
    let out = tmp.path().join("out");
    let deid = deidentifier(&[]);
    let summary = run_batch(&deid, &inputs, &out, |_| {}).unwrap();
    assert_eq!(
        (summary.deidentified, summary.quarantined, summary.failed),
        (1, 2, 3)
    );
    let written: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut written = written;
    written.sort();
    assert_eq!(
        written,
        vec!["CT_small.dcm", "quarantine.jsonl"],
        "no temporary or partial files left"
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("quarantine.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5);
    let reason_of = |name: &str| {
        lines
            .iter()
            .find(|l| l["path"].as_str().unwrap().ends_with(name))
            .map(|l| {
                (
                    l["outcome"].as_str().unwrap().to_string(),
                    l["reason"].as_str().unwrap().to_string(),
                )
            })
            .unwrap()
    };
    assert_eq!(reason_of("ExplVR_BigEnd.dcm").0, "quarantined");
    assert!(reason_of("ExplVR_BigEnd.dcm").1.contains("US image"));
    assert_eq!(reason_of("no_meta.dcm").0, "failed");
    assert_eq!(reason_of("MR_truncated.dcm").0, "failed");
}

#[test]
fn compressed_pixel_data_that_needs_cleaning_is_refused_and_native_is_blanked() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = stage(
        &["JPEG2000.dcm", "SC_rgb_small_odd.dcm"],
        &tmp.path().join("in"),
    );
    let config = DeidConfig {
        options: [ProfileOption::CleanPixelData].into(),
        pixel_clean: vec![PixelCleanRule {
            modality: None,
            manufacturer: None,
            model: None,
            rects: vec![[0, 0, 10, 5]],
        }],
        ..DeidConfig::default()
    };
    let deid = Deidentifier::new(config, keys().tokenizer("DSA-TEST-1").unwrap());
    let mut outcomes = Vec::new();
    run_batch(&deid, &inputs, &tmp.path().join("out"), |i| {
        outcomes.push((i.input.clone(), format!("{:?}", i.outcome)))
    })
    .unwrap();
    assert!(
        outcomes[0]
            .1
            .contains("compressed (encapsulated) pixel data cannot be cleaned"),
        "{outcomes:?}"
    );
    assert!(outcomes[1].1.starts_with("Deidentified"), "{outcomes:?}");
    let out = tmp.path().join("out/SC_rgb_small_odd.dcm");
    let script = format!(
        "import pydicom,sys\na=pydicom.dcmread({:?});b=pydicom.dcmread({:?})\n\
         pa=a.pixel_array;pb=b.pixel_array\n\
         assert (pb[0:5,0:10]==0).all(), 'rectangle not blanked'\n\
         m=pa.copy();m[0:5,0:10]=0\n\
         assert (m==pb).all(), 'pixels outside the rectangle changed'\n\
         assert b.BurnedInAnnotation=='NO'\nprint('ok')",
        inputs[1].display().to_string(),
        out.display().to_string()
    );
    let o = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(script)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// The fast path (pixel data left in the input file and copied into the output by the kernel)
/// writes exactly the bytes that parsing the whole file and encoding it writes.
#[test]
fn pixel_data_passed_through_gives_the_same_bytes_as_a_full_parse() {
    use pacs_broker::deid::batch::{encode_file, encode_output, read_and_deidentify};
    use pacs_broker::deid::guard::read_guarded;

    let tmp = tempfile::tempdir().unwrap();
    let mut inputs = stage(RELEASED, &tmp.path().join("in"));
    // pydicom's JPEG 2000 sample says OW for its encapsulated pixel data (the encoder writes
    // OB, so that file is parsed whole); the same file with OB, as modalities write it.
    let jp2k = std::fs::read(tmp.path().join("in/693_J2KI.dcm")).unwrap();
    let header = [
        0xE0, 0x7F, 0x10, 0x00, b'O', b'W', 0, 0, 0xFF, 0xFF, 0xFF, 0xFF,
    ];
    let at = jp2k.windows(12).position(|w| w == header).unwrap();
    let mut ob = jp2k.clone();
    ob[at + 5] = b'B';
    let ob_path = tmp.path().join("in/jp2k_ob.dcm");
    std::fs::write(&ob_path, ob).unwrap();
    inputs.push(ob_path);
    let deid = deidentifier(&[ProfileOption::RetainLongitudinalModifiedDates]);
    let mut passed_through = Vec::new();
    for input in &inputs {
        let whole = deid.deidentify(read_guarded(input).unwrap()).unwrap();
        assert!(whole.pixel_data.is_none());
        let mut expected = Vec::new();
        encode_file(whole.object, &mut expected).unwrap();

        let split = read_and_deidentify(&deid, input, |_| Ok(())).unwrap();
        if split.pixel_data.is_some() {
            passed_through.push(input.file_name().unwrap().to_string_lossy().to_string());
        }
        let mut got = Vec::new();
        encode_output(split.object, split.pixel_data.as_ref(), &mut got).unwrap();
        assert!(
            got == expected,
            "{}: the pass-through output differs from the full parse",
            input.display()
        );
        // And into a file, where the copy is done by the kernel.
        let out = tmp.path().join("out").join(input.file_name().unwrap());
        let split = read_and_deidentify(&deid, input, |_| Ok(())).unwrap();
        pacs_broker::deid::batch::write_output(split.object, split.pixel_data.as_ref(), &out)
            .unwrap();
        assert!(
            std::fs::read(&out).unwrap() == expected,
            "{}",
            out.display()
        );
    }
    // Native (explicit, implicit, big endian, multi-frame) and compressed files take the fast
    // path; files with trailing padding after the pixel data (CT_small), an unfinished pixel
    // sequence (MR_small_RLE) or OW on encapsulated data are parsed whole.
    for name in [
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "liver_1frame.dcm",
        "rtdose.dcm",
        "jp2k_ob.dcm",
    ] {
        assert!(
            passed_through.iter().any(|n| n == name),
            "{name} was parsed whole: {passed_through:?}"
        );
    }
}
