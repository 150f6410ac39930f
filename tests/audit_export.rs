//! Must-be-true 4 of issue 13: `audit export --format dicom` writes DICOM audit messages that
//! validate against the PS3.15 A.5.1 schema (docs/schema/, transcribed from the standard) with
//! Debian's `jing`; the syslog and JSON-lines exports carry every entry.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use assert_cmd::Command;
use common::*;
use pacs_broker::audit::{Detail, Event};
use pacs_broker::federation::pki;
use pacs_broker::node::Node;

fn schema() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/schema/dicom-audit-message.rnc")
}

/// A site whose log holds one entry of every kind the node writes, some with hostile text.
fn site_with_entries(dir: &Path) -> PathBuf {
    let sites: Vec<String> = ["hospital-a", "telerad-c", "hospital-b"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    pki::generate_dev_federation(&dir.join("pki"), &sites).unwrap();
    let cfg = site_config(dir, "hospital-a", &BTreeMap::new());
    let config = dir.join("hospital-a/node.toml");
    std::fs::write(&config, cfg.to_toml()).unwrap();
    let node = Node::open(cfg).unwrap();
    let ev = |actor: &str, action: &str, outcome: &str| Event {
        actor: actor.into(),
        action: action.into(),
        object: "study 2.25.1234".into(),
        agreement: AGREEMENT.into(),
        purpose: "treatment".into(),
        outcome: outcome.into(),
    };
    let study = Detail {
        patient_tokens: vec!["0123456789ABCDEF".into()],
        study: Some("2.25.1234".into()),
        party: Some("telerad-c".into()),
        flow: Some(FLOW.into()),
        instances: Some(3),
        receipt: Some("0a0b".into()),
    };
    let log = &node.audit;
    log.record_detailed(
        ev("node", "disclose", "ok (signed receipt verified)"),
        study.clone(),
    )
    .unwrap();
    log.record_detailed(ev("site:telerad-c", "receive", "ok"), study.clone())
        .unwrap();
    log.record(ev(
        "site:evil\n<AuditMessage>",
        "refuse",
        "agreement `</x>&\"'` unknown \u{1b}[31m",
    ))
    .unwrap();
    log.record(ev("user:dpo", "reidentify", "ok")).unwrap();
    log.record(ev("user:dpo", "report", "ok")).unwrap();
    log.record(ev("node", "alert", "refusal-burst site:evil"))
        .unwrap();
    log.record(ev("node", "policy-load", "ok")).unwrap();
    log.record(Event::default()).unwrap();
    config
}

fn export(config: &Path, format: &str) -> String {
    let out = Command::cargo_bin("pacs-broker")
        .unwrap()
        .args(["audit", "export", "--format", format, "--config"])
        .arg(config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn dicom_export_validates_against_the_ps3_15_schema_with_jing() {
    let dir = tempfile::tempdir().unwrap();
    let config = site_with_entries(dir.path());
    let xml = export(&config, "dicom");
    let messages: Vec<&str> = xml.lines().collect();
    assert_eq!(messages.len(), 8);
    let mut files = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let f = dir.path().join(format!("message-{i}.xml"));
        std::fs::write(&f, m).unwrap();
        files.push(f.to_string_lossy().to_string());
    }
    let schema = schema().to_string_lossy().to_string();
    let mut args = vec!["-c", schema.as_str()];
    args.extend(files.iter().map(String::as_str));
    let (ok, out) = run_tool("jing", &args);
    let errors: Vec<&str> = out.lines().filter(|l| !l.contains("[warning]")).collect();
    assert!(ok, "jing rejected the export:\n{}", errors.join("\n"));
    assert!(messages[0].contains("csd-code=\"110106\""));
    assert!(messages[2].contains("Security Alert"));
    assert!(messages[2].contains("&lt;/x&gt;&amp;"));

    // The validator is really validating: a message without its required event id fails.
    let broken = messages[0].replace("<EventID ", "<EventIdentifier ");
    let f = dir.path().join("broken.xml");
    std::fs::write(&f, broken).unwrap();
    let (ok, _) = run_tool("jing", &["-c", &schema, &f.to_string_lossy()]);
    assert!(!ok, "jing accepted a message without EventID");
}

#[test]
fn syslog_and_jsonl_exports_carry_every_entry() {
    let dir = tempfile::tempdir().unwrap();
    let config = site_with_entries(dir.path());
    let jsonl = export(&config, "jsonl");
    let entries: Vec<serde_json::Value> = jsonl
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(entries.len(), 8);
    assert_eq!(
        entries[0]["detail"]["patient_tokens"][0],
        "0123456789ABCDEF"
    );
    let syslog = export(&config, "syslog");
    let lines: Vec<&str> = syslog.lines().collect();
    assert_eq!(lines.len(), 9, "8 entries and the first export's own entry");
    for (i, l) in lines.iter().enumerate() {
        let (pri, rest) = l[1..].split_once('>').unwrap();
        let pri: u8 = pri.parse().unwrap();
        assert_eq!(pri / 8, 13, "facility log audit");
        assert!(rest.starts_with("1 "), "RFC 5424 version: {l}");
        assert!(l.contains(&format!("seq=\"{}\"", i + 1)), "{l}");
        assert!(l.contains(" hospital-a pacs-broker - "), "{l}");
    }
    assert!(
        lines[5].starts_with("<105>1 "),
        "alerts have severity alert: {}",
        lines[5]
    );
    assert!(
        lines[2].starts_with("<108>1 "),
        "refusals are warnings: {}",
        lines[2]
    );
}
