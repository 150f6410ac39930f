//! Must-be-true 1 of issue 13: editing, deleting, reordering and truncating entries, emptying or
//! deleting the log, and rewriting it with recomputed hashes are each detected by
//! `pacs-broker audit verify` (exit 3, naming the entry and line), and a node refuses to start on
//! a log shorter than its last checkpoint or missing while its data directory is in use.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use assert_cmd::Command;
use common::*;
use pacs_broker::audit::{self, Entry, Event};
use pacs_broker::federation::pki;
use pacs_broker::node::Node;

struct Site {
    _dir: tempfile::TempDir,
    config: PathBuf,
    log: PathBuf,
}

/// One site with 10 entries and checkpoints every 3 entries (and one at close).
fn site() -> Site {
    let dir = tempfile::tempdir().unwrap();
    let sites: Vec<String> = ["hospital-a", "telerad-c", "hospital-b"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    pki::generate_dev_federation(&dir.path().join("pki"), &sites).unwrap();
    let mut cfg = site_config(dir.path(), "hospital-a", &BTreeMap::new());
    cfg.audit.checkpoint_every = 3;
    let config = dir.path().join("hospital-a/node.toml");
    std::fs::write(&config, cfg.to_toml()).unwrap();
    let log = cfg.data_dir.join("audit.log");
    {
        let node = Node::open(cfg).unwrap();
        for i in 1..=10 {
            node.audit
                .record(Event {
                    actor: "node".into(),
                    action: "disclose".into(),
                    object: format!("study 2.25.{i}"),
                    agreement: AGREEMENT.into(),
                    purpose: "treatment".into(),
                    outcome: "ok".into(),
                })
                .unwrap();
        }
    }
    Site {
        _dir: dir,
        config,
        log,
    }
}

fn verify(s: &Site, partner: Option<&Path>) -> (i32, String) {
    let mut cmd = Command::cargo_bin("pacs-broker").unwrap();
    cmd.args(["audit", "verify", "--config"]).arg(&s.config);
    if let Some(p) = partner {
        cmd.arg("--partner-checkpoints").arg(p);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

fn write_lines(p: &Path, l: &[String]) {
    std::fs::write(p, l.iter().map(|x| format!("{x}\n")).collect::<String>()).unwrap();
}

/// Rewrites the log from entry `from` on with `edit` applied and every hash recomputed: a chain
/// that verifies on its own.
fn rewrite(p: &Path, from: u64, edit: impl Fn(&mut Entry)) {
    let mut entries = audit::read_entries(p).unwrap();
    let mut prev = String::new();
    for e in &mut entries {
        if e.seq >= from {
            if e.seq == from {
                edit(e);
            }
            e.prev = prev.clone();
            e.hash = audit::entry_hash(e);
        }
        prev = e.hash.clone();
    }
    let l: Vec<String> = entries
        .iter()
        .map(|e| serde_json::to_string(e).unwrap())
        .collect();
    write_lines(p, &l);
}

#[test]
fn an_untouched_log_verifies_with_its_checkpoints() {
    let s = site();
    let (code, out) = verify(&s, None);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("10 entries"), "{out}");
    assert!(out.contains("up to entry 10: consistent"), "{out}");
}

#[test]
fn edits_deletions_and_reordering_are_named_by_line() {
    let s = site();
    let orig = lines(&s.log);

    let mut edited = orig.clone();
    edited[4] = edited[4].replace("2.25.5", "2.25.55");
    write_lines(&s.log, &edited);
    let (code, out) = verify(&s, None);
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("line 5: entry 5: hash does not match"),
        "{out}"
    );

    let mut deleted = orig.clone();
    deleted.remove(6);
    write_lines(&s.log, &deleted);
    let (code, out) = verify(&s, None);
    assert_eq!(code, 3);
    assert!(out.contains("line 7: sequence 8 follows 6"), "{out}");

    let mut reordered = orig.clone();
    reordered.swap(1, 2);
    write_lines(&s.log, &reordered);
    let (code, out) = verify(&s, None);
    assert_eq!(code, 3);
    assert!(out.contains("line 2: sequence 3 follows 1"), "{out}");
}

#[test]
fn truncation_emptying_and_deletion_are_found_against_the_signed_checkpoints() {
    let s = site();
    let orig = lines(&s.log);

    write_lines(&s.log, &orig[..7]);
    let (code, out) = verify(&s, None);
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("ends at entry 7"), "{out}");
    assert!(out.contains("checkpoint of entry 10"), "{out}");
    assert!(out.contains("entries 8..=10 were removed"), "{out}");
    // The node refuses to start on it, naming what is missing.
    let err = Node::open_config(&s.config)
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("entries 8..=10 were removed"), "{err}");

    std::fs::write(&s.log, "").unwrap();
    let (code, out) = verify(&s, None);
    assert_eq!(code, 3);
    assert!(out.contains("ends at entry 0"), "{out}");

    std::fs::remove_file(&s.log).unwrap();
    let (code, out) = verify(&s, None);
    assert_eq!(code, 3);
    assert!(out.contains("is missing, but"), "{out}");
    assert!(out.contains("checkpoint of entry 10"), "{out}");
    let err = Node::open_config(&s.config)
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("is missing"), "{err}");
    assert!(!s.log.exists(), "no new log was started silently");
}

#[test]
fn a_missing_log_with_checkpoints_gone_too_stops_a_node_whose_data_is_in_use() {
    let s = site();
    let data = s.log.parent().unwrap().to_owned();
    std::fs::create_dir_all(data.join("outbox")).unwrap();
    std::fs::remove_file(&s.log).unwrap();
    std::fs::remove_file(audit::checkpoint::own_file(&s.log)).unwrap();
    let err = Node::open_config(&s.config)
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("is in use (it holds outbox)"), "{err}");
    assert!(!s.log.exists());
}

#[test]
fn a_rewrite_with_recomputed_hashes_is_found_by_the_checkpoints() {
    let s = site();
    rewrite(&s.log, 4, |e| e.event.object = "study 2.25.999".into());
    // The chain alone verifies...
    assert_eq!(audit::verify(&s.log).unwrap().entries, 10);
    // ...the signed checkpoints do not.
    let (code, out) = verify(&s, None);
    assert_eq!(code, 3, "{out}");
    assert!(
        out.contains("line 6: entry 6 differs from the checkpoint signed"),
        "{out}"
    );
}

#[test]
fn forged_or_foreign_checkpoints_are_refused() {
    let s = site();
    let own = audit::checkpoint::own_file(&s.log);
    let mut cps = lines(&own);
    cps[0] = cps[0].replace("\"seq\":3", "\"seq\":2");
    write_lines(&own, &cps);
    let (code, out) = verify(&s, None);
    assert_eq!(code, 3);
    assert!(
        out.contains("line 1: checkpoint of entry 2 is not genuine"),
        "{out}"
    );
}
