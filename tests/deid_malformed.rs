//! Malformed input never panics the engine and never produces a half-written output: a stable,
//! deterministic stand-in for the cargo-fuzz target in fuzz/ (which needs nightly). Sample files
//! are truncated and bit-flipped with a fixed seed (1,400 inputs), checked by the guard and
//! parsed as the node does, and de-identified with and without every option; whatever is
//! released must pass the release check. Every test here runs under a cap on single
//! allocations, so a memory bomb that slips past the guard fails the run.

#[path = "common/capped.rs"]
mod capped;
mod deid_common;

use rand::{Rng, SeedableRng};

use pacs_broker::deid::{check_release_file, run_batch, DeidConfig, Deidentifier, ProfileOption};

use deid_common::*;

/// Run under the allocation cap (`common/capped.rs`): the guard must have stopped every memory
/// bomb.
#[test]
fn mutated_samples_never_panic_and_releases_pass_the_check() {
    let dir = pydicom_test_files();
    let seeds = [
        "CT_small.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "test-SR.dcm",
        "rtplan.dcm",
        "rtdose_rle.dcm",
        "JPEG2000.dcm",
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5EED);
    let all = DeidConfig {
        options: ProfileOption::ALL
            .into_iter()
            .filter(|o| *o != ProfileOption::RetainUids)
            .collect(),
        ..DeidConfig::default()
    };
    let configs = [DeidConfig::default(), all];
    let mut parsed = 0;
    for name in seeds {
        let original = std::fs::read(dir.join(name)).unwrap();
        for round in 0..200 {
            let mut bytes = original.clone();
            match round % 3 {
                0 => bytes.truncate(rng.gen_range(132..bytes.len())),
                1 => {
                    for _ in 0..rng.gen_range(1..16) {
                        let i = rng.gen_range(132..bytes.len());
                        bytes[i] ^= 1 << rng.gen_range(0..8);
                    }
                }
                _ => {
                    let i = rng.gen_range(132..bytes.len());
                    let n = rng.gen_range(1..64).min(bytes.len() - i);
                    let junk: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
                    bytes.splice(i..i + n, junk);
                }
            }
            // As the node does: the guard first, then the parser.
            let guarded =
                pacs_broker::deid::guard::check_declared_lengths(&mut std::io::Cursor::new(&bytes));
            if guarded.is_err() {
                continue;
            }
            let read = std::panic::catch_unwind(|| {
                dicom_object::OpenFileOptions::new().from_reader(&bytes[128..])
            });
            let Ok(Ok(obj)) = read else { continue };
            parsed += 1;
            for config in &configs {
                let deid = Deidentifier::new(config.clone(), keys().tokenizer("FUZZ").unwrap());
                if let Ok(d) = deid.deidentify(obj.clone()) {
                    check_release_file(&d.object, config)
                        .expect("a released output passes the release check");
                    let mut out = Vec::new();
                    let _ = d.object.write_all(&mut out);
                }
            }
        }
    }
    assert!(
        parsed > 300,
        "the mutations should still parse often enough to exercise the engine ({parsed})"
    );
}

#[test]
fn a_batch_survives_hostile_files() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    let ct = std::fs::read(pydicom_test_files().join("CT_small.dcm")).unwrap();
    std::fs::write(input.join("a_empty.dcm"), b"").unwrap();
    std::fs::write(
        input.join("b_preamble_only.dcm"),
        [&[0u8; 128][..], b"DICM"].concat(),
    )
    .unwrap();
    std::fs::write(input.join("c_half.dcm"), &ct[..ct.len() / 2]).unwrap();
    let mut huge_len = ct.clone();
    huge_len.truncate(400);
    huge_len.extend_from_slice(&[0x10, 0x00, 0x10, 0x00, b'P', b'N', 0xFF, 0xFF]);
    std::fs::write(input.join("d_bad_length.dcm"), huge_len).unwrap();
    std::fs::write(input.join("e_good.dcm"), &ct).unwrap();
    let out = tmp.path().join("out");
    let summary = run_batch(&deidentifier(&[]), &[input], &out, |_| {}).unwrap();
    assert_eq!(summary.deidentified, 1);
    assert_eq!(summary.failed + summary.quarantined, 4);
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, vec!["e_good.dcm", "quarantine.jsonl"]);
}

/// Inputs that made the DICOM library reserve gigabytes (found by fuzzing) are refused by the
/// pre-parse guard, with a reason that names the problem, before the parser runs.
#[test]
fn fuzz_found_memory_bombs_are_refused_before_parsing() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fuzz");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let mut f = std::fs::File::open(&path).unwrap();
        let refused = pacs_broker::deid::guard::check_declared_lengths(&mut f);
        assert!(refused.is_err(), "{} passed the guard", path.display());
        n += 1;
    }
    assert_eq!(n, 3);
}

/// Inputs that pass the file's guard but declare gigabytes inside a value the engine decodes
/// (a sequence stored as UN): de-identified within the allocation cap, the suspicious value
/// removed, the output released or refused but never a crash.
#[test]
fn memory_bombs_inside_values_are_defused() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fuzz-deid");
    let deid = deidentifier(&[]);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let mut f = std::fs::File::open(&path).unwrap();
        assert!(
            pacs_broker::deid::guard::check_declared_lengths(&mut f).is_ok(),
            "{} no longer reaches the engine",
            path.display()
        );
        let _ = pacs_broker::deid::batch::read_and_deidentify(&deid, &path, |_| Ok(()));
        n += 1;
    }
    assert_eq!(n, 1);
}

/// An output that cannot be put in place (its name is taken by a folder) fails on its own, with
/// the reason in the quarantine list; the others of its commit group are written, and no
/// temporary file is left behind.
#[test]
fn an_output_that_cannot_be_placed_fails_alone_and_leaves_no_temporary_file() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    for i in 0..5 {
        let sop = format!("1.2.826.0.1.3680043.99.1.1.{i}");
        ct(
            "1.2.826.0.1.3680043.99.1",
            "1.2.826.0.1.3680043.99.1.1",
            &sop,
            vec![],
        )
        .write_to_file(input.join(format!("im{i}.dcm")))
        .unwrap();
    }
    let out = tmp.path().join("out");
    std::fs::create_dir_all(out.join("im2.dcm")).unwrap();
    let summary = run_batch(&deidentifier(&[]), &[input], &out, |_| {}).unwrap();
    assert_eq!((summary.deidentified, summary.failed), (4, 1));
    let list = std::fs::read_to_string(out.join("quarantine.jsonl")).unwrap();
    assert!(
        list.contains("im2.dcm") && list.contains("cannot rename output into place"),
        "{list}"
    );
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "im0.dcm",
            "im1.dcm",
            "im2.dcm",
            "im3.dcm",
            "im4.dcm",
            "quarantine.jsonl"
        ]
    );
    assert!(out.join("im2.dcm").is_dir());
    for n in ["im0.dcm", "im4.dcm"] {
        let o = dicom_object::open_file(out.join(n)).unwrap();
        assert!(o.element(dicom_dictionary_std::tags::PIXEL_DATA).is_ok());
    }
}
