//! `pacs-broker reidentify`: only a declared user with the `reidentify` role, named by the
//! agreement's returning flow, with a justification, sees an original value — at the origin
//! only; every call, allowed or refused, is audited without the original value.

mod common;

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use pacs_broker::config::NodeConfig;
use pacs_broker::federation::pki;
use pacs_broker::node::Node;
use pacs_broker::pseudonym::VaultEntry;
use pacs_broker::users::UserConfig;

const AGREEMENT: &str = "example-teleradiology";
const ORIGINAL: &str = "MRN-REID-4711";

fn user(name: &str, roles: &[&str]) -> UserConfig {
    UserConfig {
        name: name.into(),
        roles: roles.iter().map(|r| r.to_string()).collect(),
    }
}

/// A hospital-a (or `site`) node folder with the signed teleradiology agreement, users, and one
/// vault entry; returns the config file and the token.
fn site(base: &Path, site: &str) -> (PathBuf, String) {
    let all = ["hospital-a", "hospital-b", "telerad-c"].map(String::from);
    if !base.join("pki").exists() {
        pki::generate_dev_federation(&base.join("pki"), &all).unwrap();
    }
    let mut cfg: NodeConfig = common::site_config(base, site, &Default::default());
    let policy = cfg.agreements.join("example-teleradiology.toml");
    std::fs::write(
        &policy,
        include_str!("../policies/example-teleradiology.toml"),
    )
    .unwrap();
    // The harness's own agreement is not needed here.
    std::fs::remove_file(cfg.agreements.join("test.toml")).unwrap();
    for party in ["hospital-a", "telerad-c"] {
        let pki = base.join("pki");
        pacs_broker::dsa::sign::sign_file(
            &policy,
            &pki.join(format!("{party}.pem")),
            &pki.join(format!("{party}.key")),
            time::OffsetDateTime::now_utc(),
        )
        .unwrap();
    }
    cfg.users = vec![
        user(
            "dr-on-duty",
            &["reidentify", "radiologist on duty at Hospital A"],
        ),
        user("clerk", &["radiologist on duty at Hospital A"]),
    ];
    let path = base.join(site).join("node.toml");
    std::fs::write(&path, cfg.to_toml()).unwrap();
    let node = Node::open(cfg.clone()).unwrap();
    let token = node
        .keys
        .tokenizer(AGREEMENT)
        .unwrap()
        .token("PatientID", ORIGINAL);
    let vault = node.vault().unwrap();
    vault
        .record(
            AGREEMENT,
            &token,
            &VaultEntry {
                attribute: "PatientID".into(),
                original: ORIGINAL.into(),
            },
        )
        .unwrap();
    vault.flush().unwrap();
    (path, token)
}

fn reidentify(
    config: &Path,
    token: &str,
    user: &str,
    justification: &str,
) -> (i32, String, String) {
    let out = Command::cargo_bin("pacs-broker")
        .unwrap()
        .args(["reidentify", "--config"])
        .arg(config)
        .args(["--agreement", AGREEMENT, "--token", token, "--user", user])
        .args(["--justification", justification])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn audit_lines(config: &Path) -> Vec<serde_json::Value> {
    let cfg = NodeConfig::load(config).unwrap();
    std::fs::read_to_string(cfg.data_dir.join("audit.log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|e: &serde_json::Value| e["action"] == "reidentify")
        .collect()
}

#[test]
fn only_an_authorised_user_with_a_justification_sees_the_original() {
    let dir = tempfile::tempdir().unwrap();
    let (config, token) = site(dir.path(), "hospital-a");

    let (code, out, err) = reidentify(
        &config,
        &token,
        "dr-on-duty",
        "file the CT report under the right patient",
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), format!("PatientID: {ORIGINAL}"));

    let refusals = [
        ("dr-on-duty", "", "justification is required"),
        ("nobody", "x", "not declared"),
        ("clerk", "x", "does not hold the role `reidentify`"),
    ];
    for (user, why, expected) in refusals {
        let (code, out, err) = reidentify(&config, &token, user, why);
        assert_eq!(code, 3, "{user}: {err}");
        assert!(out.is_empty(), "nothing printed on refusal: {out}");
        assert!(err.contains(expected), "{user}: {err}");
        assert!(!err.contains(ORIGINAL));
    }
    let (code, _, err) = reidentify(&config, "ZZZZZZZZZZZZZZZZ", "dr-on-duty", "x");
    assert_eq!(code, 3);
    assert!(err.contains("no token"), "{err}");

    let entries = audit_lines(&config);
    assert_eq!(entries.len(), 5, "every call is audited: {entries:#?}");
    assert!(entries[0]["outcome"]
        .as_str()
        .unwrap()
        .starts_with("allowed"));
    assert!(entries[0]["actor"] == "user:dr-on-duty");
    assert!(entries[0]["purpose"] == "treatment");
    assert!(entries[0]["outcome"]
        .as_str()
        .unwrap()
        .contains("file the CT report"));
    for e in &entries[1..] {
        assert!(e["outcome"].as_str().unwrap().starts_with("refused"), "{e}");
    }
    let log = std::fs::read_to_string(
        NodeConfig::load(&config)
            .unwrap()
            .data_dir
            .join("audit.log"),
    )
    .unwrap();
    assert!(
        !log.contains(ORIGINAL),
        "the audit never holds the original value"
    );
}

#[test]
fn a_partner_site_cannot_reidentify() {
    let dir = tempfile::tempdir().unwrap();
    let (config, token) = site(dir.path(), "telerad-c");
    let (code, out, err) = reidentify(&config, &token, "dr-on-duty", "curious");
    assert_eq!(code, 3, "{err}");
    assert!(out.is_empty());
    assert!(err.contains("only the origin may re-identify"), "{err}");
}
