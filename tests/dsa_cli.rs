//! The `pacs-broker dsa` commands as a privacy officer runs them: output and exit codes.

use std::path::{Path, PathBuf};

use assert_cmd::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn dsa(args: &[&str]) -> (i32, String) {
    let out = Command::cargo_bin("pacs-broker")
        .unwrap()
        .arg("dsa")
        .args(args)
        .current_dir(root())
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap() + &String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn check_passes_every_example_and_exits_zero() {
    let files: Vec<String> = std::fs::read_dir(root().join("policies"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .map(|p| p.strip_prefix(root()).unwrap().display().to_string())
        .collect();
    let mut args = vec!["check", "--ca", "certs-dev/ca.pem"];
    args.extend(files.iter().map(String::as_str));
    let (code, out) = dsa(&args);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("4 file(s): 0 error(s)"), "{out}");
    assert!(!out.contains("not enforceable"), "{out}");
}

#[test]
fn check_reports_every_error_with_position_and_caret_and_exits_one() {
    let (code, out) = dsa(&[
        "check",
        "tests/dsa-corpus/unknown-purpose.toml",
        "tests/dsa-corpus/dates-reversed.toml",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(
            "tests/dsa-corpus/unknown-purpose.toml:28:26: error: unknown purpose \"marketing\""
        ),
        "{out}"
    );
    assert!(out.contains("tests/dsa-corpus/dates-reversed.toml:9:15: error: valid_until 2025-12-31 is before valid_from 2026-01-01 (dates reversed)"), "{out}");
    assert!(
        out.contains("   9 | valid_until = 2025-12-31\n                     ^"),
        "{out}"
    );
    assert!(out.contains("2 file(s): 2 error(s)"), "{out}");
}

#[test]
fn check_warns_about_an_unsigned_draft_but_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("draft.toml");
    let text = std::fs::read_to_string(root().join("policies/example-teleradiology.toml"))
        .unwrap()
        .replace(
            "status = \"active\"\nvalid_from",
            "status = \"draft\"\nvalid_from",
        );
    std::fs::write(&p, text).unwrap();
    let (code, out) = dsa(&["check", p.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(
            "warning: not signed by hospital-a, telerad-c (normal for a draft being edited)"
        ),
        "{out}"
    );
}

#[test]
fn explain_and_diff_speak_plainly() {
    let (code, out) = dsa(&["explain", "policies/example-multisite-trial.toml"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("- patient name and patient ID: replaced by the trial subject ID"),
        "{out}"
    );
    assert!(
        out.contains("- Consent: required for every patient; recorded in Trial consent register"),
        "{out}"
    );
    let dir = tempfile::tempdir().unwrap();
    let new = dir.path().join("v2.toml");
    let text = std::fs::read_to_string(root().join("policies/example-teleradiology.toml"))
        .unwrap()
        .replace("version = 1", "version = 2")
        .replace("days = 30", "days = 90")
        .replace("to = \"telerad-c\"", "to = \"hospital-b\"");
    std::fs::write(&new, text).unwrap();
    let (code, out) = dsa(&[
        "diff",
        "policies/example-teleradiology.toml",
        new.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("[WIDENS]") && lines[1].starts_with("[WIDENS]"),
        "{out}"
    );
    assert!(
        out.contains("[WIDENS]  flow \"ct-reads\": new recipient hospital-b (was telerad-c)"),
        "{out}"
    );
    assert!(out.contains("[WIDENS]  flow \"ct-reads\": retention 30 days then delete -> 90 days then delete (lengthened)"), "{out}");
    assert!(out.contains("change(s) widen disclosure"), "{out}");
}

#[test]
fn format_prints_what_the_parser_understood() {
    let (code, out) = dsa(&["format", "policies/example-teaching-file.toml"]);
    assert_eq!(code, 0, "{out}");
    let a = pacs_broker::dsa::Agreement::parse("f", &out).unwrap();
    assert_eq!(
        a,
        pacs_broker::dsa::Agreement::from_file(Path::new(
            &root().join("policies/example-teaching-file.toml")
        ))
        .unwrap()
    );
}
