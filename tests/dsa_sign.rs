//! Signatures over an agreement's exact bytes with the site certificate keys, verification
//! against the federation CA, and the node's signed-only loading (`load_enforced`).

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use pacs_broker::dsa::sign::{self, signature_dir};
use pacs_broker::dsa::{Agreement, AgreementSet, FederationCa, SignatureState, Verdict};
use pacs_broker::federation::pki;
use time::OffsetDateTime;

const POLICY: &str = r#"[agreement]
id = "sign-test"
version = 1
title = "Signature test"
status = "active"
valid_from = 2026-01-01
valid_until = 2027-12-31
governing_law = "Test law"

[[parties]]
site = "hospital-a"
organisation = "Hospital A"
privacy_officer = "DPO A"
privacy_contact = "dpo@a.example"

[[parties]]
site = "telerad-c"
organisation = "Telerad C"
privacy_officer = "DPO C"
privacy_contact = "dpo@c.example"

[[flows]]
name = "ct-reads"
from = "hospital-a"
to = "telerad-c"
purposes = ["teleradiology-report"]

[flows.retention]
days = 30
after = "delete"
"#;

struct Fixture {
    _dir: tempfile::TempDir,
    pki: PathBuf,
    other_pki: PathBuf,
    policies: PathBuf,
    policy: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let sites: Vec<String> = ["hospital-a", "hospital-b", "telerad-c"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let pki = dir.path().join("pki");
    let other_pki = dir.path().join("other-pki");
    pki::generate_dev_federation(&pki, &sites).unwrap();
    pki::generate_dev_federation(&other_pki, &sites).unwrap();
    let policies = dir.path().join("agreements");
    std::fs::create_dir_all(&policies).unwrap();
    let policy = policies.join("sign-test.toml");
    std::fs::write(&policy, POLICY).unwrap();
    Fixture {
        _dir: dir,
        pki,
        other_pki,
        policies,
        policy,
    }
}

fn sign_as(f: &Fixture, pki: &Path, site: &str) -> PathBuf {
    sign::sign_file(
        &f.policy,
        &pki.join(format!("{site}.pem")),
        &pki.join(format!("{site}.key")),
        OffsetDateTime::now_utc(),
    )
    .unwrap()
}

fn verify(f: &Fixture) -> pacs_broker::dsa::Verification {
    let bytes = std::fs::read(&f.policy).unwrap();
    let a = Agreement::parse("p", std::str::from_utf8(&bytes).unwrap()).unwrap();
    let ca = FederationCa::from_pem_file(&f.pki.join("ca.pem")).unwrap();
    sign::verify(&f.policy, &bytes, &a, &ca, OffsetDateTime::now_utc())
}

fn state(f: &Fixture, site: &str) -> SignatureState {
    verify(f)
        .parties
        .into_iter()
        .find(|(s, _)| s == site)
        .unwrap()
        .1
}

fn load(f: &Fixture) -> (AgreementSet, Vec<(PathBuf, String)>) {
    AgreementSet::load_enforced(&f.policies, &f.pki.join("ca.pem"))
}

#[test]
fn fully_signed_agreement_is_enforced() {
    let f = fixture();
    let out = sign_as(&f, &f.pki, "hospital-a");
    assert_eq!(out, signature_dir(&f.policy).join("hospital-a.sig"));
    sign_as(&f, &f.pki, "telerad-c");
    assert_eq!(verify(&f).verdict(), Verdict::FullySigned);
    let (set, refused) = load(&f);
    assert!(refused.is_empty(), "{refused:?}");
    assert!(set.agreements.contains_key("sign-test"));
}

#[test]
fn partly_signed_agreement_is_refused_with_who_is_missing() {
    let f = fixture();
    sign_as(&f, &f.pki, "hospital-a");
    let v = verify(&f);
    assert_eq!(v.verdict(), Verdict::Unsigned);
    assert_eq!(state(&f, "telerad-c"), SignatureState::Missing);
    let (set, refused) = load(&f);
    assert!(set.agreements.is_empty());
    assert_eq!(refused.len(), 1);
    assert!(
        refused[0].1.contains("not signed by every party")
            && refused[0].1.contains("telerad-c has not signed yet"),
        "{}",
        refused[0].1
    );
}

#[test]
fn any_change_after_signing_breaks_every_signature() {
    let f = fixture();
    sign_as(&f, &f.pki, "hospital-a");
    sign_as(&f, &f.pki, "telerad-c");
    // Widen the purposes without re-signing: one changed byte sequence, same version number.
    let changed = POLICY.replace(
        "purposes = [\"teleradiology-report\"]",
        "purposes = [\"teleradiology-report\", \"research\"]",
    );
    std::fs::write(&f.policy, changed).unwrap();
    assert_eq!(verify(&f).verdict(), Verdict::Mismatch);
    assert!(matches!(
        state(&f, "hospital-a"),
        SignatureState::Stale { .. }
    ));
    let (set, refused) = load(&f);
    assert!(set.agreements.is_empty());
    assert!(
        refused[0].1.contains("does not match this file"),
        "{}",
        refused[0].1
    );
    // Even a comment changes the bytes.
    std::fs::write(&f.policy, format!("{POLICY}# note\n")).unwrap();
    assert_eq!(verify(&f).verdict(), Verdict::Mismatch);
    std::fs::write(&f.policy, POLICY).unwrap();
    assert_eq!(verify(&f).verdict(), Verdict::FullySigned);
}

#[test]
fn forged_signature_value_is_a_mismatch() {
    let f = fixture();
    sign_as(&f, &f.pki, "hospital-a");
    let p = sign_as(&f, &f.pki, "telerad-c");
    let text = std::fs::read_to_string(&p).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("signature = "))
        .unwrap();
    let hexsig = &line[13..line.len() - 1];
    let mut bytes = hex::decode(hexsig).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&p, text.replace(hexsig, &hex::encode(bytes))).unwrap();
    assert!(matches!(state(&f, "telerad-c"), SignatureState::Invalid(m) if m.contains("forged")));
    assert_eq!(verify(&f).verdict(), Verdict::Mismatch);
}

#[test]
fn forged_hash_field_does_not_help() {
    // Someone edits the file and writes the new file hash into an old signature file.
    let f = fixture();
    sign_as(&f, &f.pki, "hospital-a");
    let p = sign_as(&f, &f.pki, "telerad-c");
    let changed = POLICY.replace("days = 30", "days = 3000");
    std::fs::write(&f.policy, &changed).unwrap();
    let text = std::fs::read_to_string(&p).unwrap();
    let old = sign::sha256_hex(POLICY.as_bytes());
    std::fs::write(
        &p,
        text.replace(&old, &sign::sha256_hex(changed.as_bytes())),
    )
    .unwrap();
    assert!(matches!(state(&f, "telerad-c"), SignatureState::Invalid(_)));
}

#[test]
fn certificate_from_another_ca_is_refused() {
    let f = fixture();
    sign_as(&f, &f.pki, "hospital-a");
    sign_as(&f, &f.other_pki, "telerad-c");
    assert!(
        matches!(state(&f, "telerad-c"), SignatureState::Invalid(m) if m.contains("not issued by the federation CA"))
    );
    assert_eq!(verify(&f).verdict(), Verdict::Mismatch);
    assert!(load(&f).0.agreements.is_empty());
}

#[test]
fn a_partys_signature_cannot_stand_in_for_another_party() {
    let f = fixture();
    let a = sign_as(&f, &f.pki, "hospital-a");
    std::fs::copy(&a, signature_dir(&f.policy).join("telerad-c.sig")).unwrap();
    assert!(
        matches!(state(&f, "telerad-c"), SignatureState::Invalid(m) if m.contains("certificate of site \"hospital-a\""))
    );
}

#[test]
fn signing_refuses_a_wrong_key_a_non_party_and_a_broken_file() {
    let f = fixture();
    let err = sign::sign_file(
        &f.policy,
        &f.pki.join("hospital-a.pem"),
        &f.pki.join("telerad-c.key"),
        OffsetDateTime::now_utc(),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("does not belong to the certificate"),
        "{err}"
    );
    let err = sign::sign_file(
        &f.policy,
        &f.pki.join("hospital-b.pem"),
        &f.pki.join("hospital-b.key"),
        OffsetDateTime::now_utc(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("not a party"), "{err}");
    std::fs::write(
        &f.policy,
        POLICY.replace("status = \"active\"", "status = \"live\""),
    )
    .unwrap();
    let err = sign::sign_file(
        &f.policy,
        &f.pki.join("hospital-a.pem"),
        &f.pki.join("hospital-a.key"),
        OffsetDateTime::now_utc(),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("refusing to sign a file with errors"),
        "{err}"
    );
    assert!(!signature_dir(&f.policy).exists());
}

#[test]
fn certificate_pin_is_enforced() {
    let f = fixture();
    let wrong_pin = "0".repeat(64);
    let pinned = POLICY.replace(
        "privacy_contact = \"dpo@c.example\"",
        &format!("privacy_contact = \"dpo@c.example\"\ncertificate_pin = \"{wrong_pin}\""),
    );
    std::fs::write(&f.policy, &pinned).unwrap();
    let err = sign::sign_file(
        &f.policy,
        &f.pki.join("telerad-c.pem"),
        &f.pki.join("telerad-c.key"),
        OffsetDateTime::now_utc(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("certificate_pin"), "{err}");
    // With the right pin it signs and verifies.
    let pem = std::fs::read(f.pki.join("telerad-c.pem")).unwrap();
    let der = x509_parser::pem::parse_x509_pem(&pem).unwrap().1.contents;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    std::fs::write(
        &f.policy,
        pinned.replace(&wrong_pin, &sign::public_key_pin(&cert)),
    )
    .unwrap();
    sign_as(&f, &f.pki, "hospital-a");
    sign_as(&f, &f.pki, "telerad-c");
    assert_eq!(verify(&f).verdict(), Verdict::FullySigned);
}

#[test]
fn load_enforced_reports_broken_and_duplicate_files() {
    let f = fixture();
    sign_as(&f, &f.pki, "hospital-a");
    sign_as(&f, &f.pki, "telerad-c");
    std::fs::write(f.policies.join("broken.toml"), "[agreement]\nid = 3\n").unwrap();
    std::fs::copy(&f.policy, f.policies.join("z-copy.toml")).unwrap();
    let (set, refused) = load(&f);
    assert_eq!(set.agreements.len(), 1);
    let reasons: Vec<String> = refused
        .iter()
        .map(|(p, r)| format!("{}: {r}", p.file_name().unwrap().to_string_lossy()))
        .collect();
    assert_eq!(refused.len(), 2, "{reasons:?}");
    assert!(
        reasons[0].starts_with("broken.toml: has errors"),
        "{reasons:?}"
    );
    assert!(reasons[1].starts_with("z-copy.toml:"), "{reasons:?}");
    // A missing CA refuses everything, with the reason.
    let (set, refused) = AgreementSet::load_enforced(&f.policies, &f.pki.join("nope.pem"));
    assert!(
        set.agreements.is_empty()
            && refused.len() == 3
            && refused[0].1.contains("cannot check signatures")
    );
}

fn cli() -> Command {
    Command::cargo_bin("pacs-broker").unwrap()
}

#[test]
fn verify_exit_codes_tell_unsigned_from_mismatch() {
    let f = fixture();
    let ca = f.pki.join("ca.pem");
    let run = |f: &Fixture| {
        cli()
            .args(["dsa", "verify", "--ca"])
            .arg(&ca)
            .arg(&f.policy)
            .output()
            .unwrap()
    };
    let out = run(&f);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    cli()
        .args(["dsa", "sign", "--site-cert"])
        .arg(f.pki.join("hospital-a.pem"))
        .arg("--site-key")
        .arg(f.pki.join("hospital-a.key"))
        .arg(&f.policy)
        .assert()
        .success();
    assert_eq!(run(&f).status.code(), Some(2));
    sign_as(&f, &f.pki, "telerad-c");
    let out = run(&f);
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("hospital-a: signed version 1 of these exact bytes"),
        "{stdout}"
    );
    std::fs::write(&f.policy, POLICY.replace("days = 30", "days = 31")).unwrap();
    let out = run(&f);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // dsa check --ca warns but does not fail on a signature problem.
    let out = cli()
        .args(["dsa", "check", "--ca"])
        .arg(&ca)
        .arg(&f.policy)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("warning: not enforceable"));
}

#[test]
fn every_example_checks_clean_and_is_signed_by_every_party_with_certs_dev() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let ca = FederationCa::from_pem_file(&root.join("certs-dev/ca.pem")).unwrap();
    let mut n = 0;
    for e in std::fs::read_dir(root.join("policies")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "toml") {
            continue;
        }
        n += 1;
        let bytes = std::fs::read(&p).unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        let report = pacs_broker::dsa::check(
            &p.display().to_string(),
            &text,
            time::macros::date!(2026 - 06 - 01),
        );
        assert!(
            report.errors.is_empty(),
            "{}: {:?}",
            p.display(),
            report.errors
        );
        let a = report.agreement.unwrap();
        let v = sign::verify(&p, &bytes, &a, &ca, OffsetDateTime::now_utc());
        assert_eq!(
            v.verdict(),
            Verdict::FullySigned,
            "{}: {} (run policies/sign-examples.sh)",
            p.display(),
            v.problems()
        );
    }
    assert_eq!(n, 4);
    let (set, refused) =
        AgreementSet::load_enforced(&root.join("policies"), &root.join("certs-dev/ca.pem"));
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!(set.agreements.len(), 4);
    let tele = &set.agreements["example-teleradiology"];
    let flow = tele.flow("ct-reads").unwrap();
    assert_eq!(
        (flow.from.as_str(), flow.to.as_str()),
        ("hospital-a", "telerad-c")
    );
    assert!(flow
        .purposes
        .contains(&pacs_broker::dsa::Purpose::Treatment));
    assert!(flow
        .purposes
        .contains(&pacs_broker::dsa::Purpose::TeleradiologyReport));
}
