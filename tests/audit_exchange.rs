//! Must-be-true 2 and 3 of issue 13, after a real two-node exchange over mutual TLS:
//! - `audit report --patient` at the origin lists the disclosure (party, agreement, flow, purpose,
//!   identifier forms, signed receipt held); the incident view lists the patient's local id;
//! - the receiver's log holds the matching receive; each side holds the other's signed checkpoint;
//! - a rewritten origin log, with its own checkpoints deleted, is caught by the checkpoints the
//!   receiver holds;
//! - no original identifier of the test study appears in any audit file or log line.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use assert_cmd::Command;
use common::*;
use pacs_broker::audit::{self, checkpoint, Entry};
use pacs_broker::demo::{write_synthetic_ct, SyntheticPatient};
use pacs_broker::pseudonym::SiteKeys;

/// Every log line of this test process, at debug level.
fn captured() -> &'static Arc<Mutex<Vec<u8>>> {
    static BUF: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    BUF.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let b = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("pacs_broker=debug")
            .with_ansi(false)
            .with_writer(move || Capture(b.clone()))
            .try_init();
        buf
    })
}

struct Capture(Arc<Mutex<Vec<u8>>>);
impl Write for Capture {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(data);
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn originals(p: &SyntheticPatient, files: &[PathBuf]) -> Vec<String> {
    use dicom_dictionary_std::tags;
    let mut v = vec![
        p.name.clone(),
        p.id.clone(),
        p.birth_date.clone(),
        p.accession.clone(),
    ];
    for f in files {
        let o = dicom_object::open_file(f).unwrap();
        for t in [
            tags::STUDY_INSTANCE_UID,
            tags::SERIES_INSTANCE_UID,
            tags::SOP_INSTANCE_UID,
        ] {
            let s = o.element(t).unwrap().to_str().unwrap();
            v.push(s.trim_end_matches('\0').to_string());
        }
    }
    v
}

fn cli(args: &[&str], config: &Path) -> (i32, String, String) {
    let out = Command::cargo_bin("pacs-broker")
        .unwrap()
        .args(args)
        .arg("--config")
        .arg(config)
        .env("USER", "dpo-test")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn audit_files(data: &Path) -> Vec<PathBuf> {
    files_under(data)
        .into_iter()
        .filter(|p| {
            let n = p.to_string_lossy();
            n.contains("audit.") || n.contains("audit.partners")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disclosures_are_accounted_for_at_both_ends_without_phi() {
    let logs = captured().clone();
    let fed = Federation::start(&["hospital-a", "telerad-c"]).await;
    let patient = SyntheticPatient::default();
    let input = fed.dir.path().join("study");
    let files = write_synthetic_ct(&input, &patient, 3, 32).unwrap();
    let a = fed.node("hospital-a").clone();
    let c = fed.node("telerad-c").clone();
    let report = a.send(AGREEMENT, FLOW, None, &files).await.unwrap();
    let study = report.studies[0].study_token.clone();
    // A later study of the same patient: its offer carries the origin's checkpoint covering the
    // first disclosure (a checkpoint cannot cover an entry written after it was sent).
    let later = write_synthetic_ct(&fed.dir.path().join("study-2"), &patient, 2, 32).unwrap();
    let report2 = a.send(AGREEMENT, FLOW, None, &later).await.unwrap();
    let study2 = report2.studies[0].study_token.clone();
    let files: Vec<PathBuf> = files.into_iter().chain(later).collect();
    let (a_cfg, c_cfg) = (a.config.clone(), c.config.clone());
    let token = SiteKeys::load(&a_cfg.key_file)
        .unwrap()
        .tokenizer(AGREEMENT)
        .unwrap()
        .token("PatientID", &patient.id);

    // Origin: a structured disclosure with the patient token and the signed receipt.
    let a_log = a_cfg.data_dir.join("audit.log");
    let entries = audit::read_entries(&a_log).unwrap();
    let d: &Entry = entries
        .iter()
        .find(|e| e.event.action == "disclose")
        .unwrap();
    assert_eq!(d.detail.patient_tokens, vec![token.clone()]);
    assert_eq!(d.detail.study.as_deref(), Some(study.as_str()));
    assert_eq!(d.detail.party.as_deref(), Some("telerad-c"));
    assert!(d.detail.receipt.as_deref().is_some_and(|r| r.len() > 64));
    // Receiver: the matching receive.
    let c_log = c_cfg.data_dir.join("audit.log");
    let received = audit::read_entries(&c_log).unwrap();
    assert!(received.iter().any(|e| e.event.action == "receive"
        && e.detail.study.as_deref() == Some(study.as_str())
        && e.detail.party.as_deref() == Some("hospital-a")
        && e.event.actor == "site:hospital-a"));
    // Each side holds the other's signed checkpoint, genuine under the other's certificate.
    let pem = |site: &str| {
        pacs_broker::federation::pki::load_certs(&fed.pki().join(format!("{site}.pem"))).unwrap()[0]
            .to_vec()
    };
    let held_by_a = audit::checked_checkpoints(
        &checkpoint::partner_file(&a_log, "telerad-c"),
        "telerad-c",
        &pem("telerad-c"),
    )
    .unwrap();
    let receive_seq = received
        .iter()
        .find(|e| e.event.action == "receive")
        .unwrap()
        .seq;
    assert!(
        held_by_a.iter().any(|c| c.seq >= receive_seq),
        "{held_by_a:?}"
    );
    let held_by_c_file = checkpoint::partner_file(&c_log, "hospital-a");
    let held_by_c =
        audit::checked_checkpoints(&held_by_c_file, "hospital-a", &pem("hospital-a")).unwrap();
    assert!(held_by_c.iter().any(|c| c.seq >= d.seq), "{held_by_c:?}");
    drop((a, c));
    let _dir = fed.stop_keeping_files().await;

    let a_toml = fed_config(&a_cfg);
    // The privacy officer's question, in one command.
    let (code, out, err) = cli(
        &[
            "audit",
            "report",
            "--patient",
            &patient.id,
            "--reason",
            "patient request",
        ],
        &a_toml,
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&study) && out.contains(&study2), "{out}");
    assert!(out.contains("to site telerad-c under agreement"), "{out}");
    assert!(out.contains(&format!("flow {FLOW} for treatment")), "{out}");
    assert!(out.contains(&token), "{out}");
    assert!(out.contains("signed receipt: held"), "{out}");
    assert!(
        out.contains("patient name and patient ID: replaced by a keyed token"),
        "{out}"
    );
    let (_, json, _) = cli(
        &["audit", "report", "--patient", &patient.id, "--json"],
        &a_toml,
    );
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["disclosures"][0]["party"], "telerad-c");
    assert_eq!(v["disclosures"][0]["signed_receipt_held"], true);
    let (_, none, _) = cli(&["audit", "report", "--patient", "SOMEONE-ELSE"], &a_toml);
    assert!(none.contains("No disclosure matches"), "{none}");
    // The incident view: the patients that went to that party in a window, by local id.
    let (code, out, err) = cli(
        &[
            "audit",
            "report",
            "--party",
            "telerad-c",
            "--since",
            "2000-01-01",
            "--until",
            "2100-01-01",
        ],
        &a_toml,
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&patient.id), "{out}");
    let (_, out, _) = cli(
        &[
            "audit",
            "report",
            "--party",
            "telerad-c",
            "--until",
            "2000-01-01",
        ],
        &a_toml,
    );
    assert!(!out.contains(&patient.id), "{out}");
    // Looking was audited: who, why, which tokens; not the id that was on screen.
    let after = audit::read_entries(&a_log).unwrap();
    let looked: Vec<&Entry> = after
        .iter()
        .filter(|e| e.event.action == "report")
        .collect();
    assert_eq!(looked.len(), 5);
    assert_eq!(looked[0].event.actor, "user:dpo-test");
    assert_eq!(looked[0].event.purpose, "patient request");
    assert_eq!(looked[0].detail.patient_tokens, vec![token.clone()]);
    assert!(audit::verify(&a_log).is_ok());

    // No original identifier in any audit file of either site, or in any log line.
    let secrets = originals(&patient, &files);
    let mut haystacks: Vec<(String, Vec<u8>)> = audit_files(&a_cfg.data_dir)
        .into_iter()
        .chain(audit_files(&c_cfg.data_dir))
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect();
    haystacks.push(("log lines".into(), logs.lock().unwrap().clone()));
    assert!(
        haystacks.len() >= 7,
        "{:?}",
        haystacks.iter().map(|h| &h.0).collect::<Vec<_>>()
    );
    assert!(
        !haystacks.last().unwrap().1.is_empty(),
        "no log line was captured"
    );
    for (name, bytes) in &haystacks {
        for s in &secrets {
            assert!(
                !bytes.windows(s.len()).any(|w| w == s.as_bytes()),
                "{name} holds an original identifier"
            );
        }
    }

    // Rewritten at the origin with recomputed hashes, its own checkpoints deleted: the chain and
    // the (absent) local checkpoints pass, the receiver's copy does not.
    let mut es = audit::read_entries(&a_log).unwrap();
    let mut prev = String::new();
    for e in &mut es {
        if e.event.action == "disclose" {
            e.detail.party = Some("somewhere-else".into());
        }
        e.prev = if prev.is_empty() {
            e.prev.clone()
        } else {
            prev.clone()
        };
        e.hash = audit::entry_hash(e);
        prev = e.hash.clone();
    }
    std::fs::write(
        &a_log,
        es.iter()
            .map(|e| serde_json::to_string(e).unwrap() + "\n")
            .collect::<String>(),
    )
    .unwrap();
    std::fs::remove_file(checkpoint::own_file(&a_log)).unwrap();
    let (code, out, _) = cli(&["audit", "verify"], &a_toml);
    assert_eq!(
        code, 0,
        "alone, a rewrite with recomputed hashes passes: {out}"
    );
    let partner = held_by_c_file.to_string_lossy().to_string();
    let (code, _, err) = cli(
        &["audit", "verify", "--partner-checkpoints", &partner],
        &a_toml,
    );
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("differs from the checkpoint signed"), "{err}");
    assert!(err.contains("partner file"), "{err}");
    // Emptied: the partner's checkpoint names what is gone.
    std::fs::write(&a_log, "").unwrap();
    let (code, _, err) = cli(
        &["audit", "verify", "--partner-checkpoints", &partner],
        &a_toml,
    );
    assert_eq!(code, 3);
    assert!(err.contains("ends at entry 0"), "{err}");
}

fn fed_config(cfg: &pacs_broker::config::NodeConfig) -> PathBuf {
    let p = cfg.data_dir.parent().unwrap().join("node.toml");
    std::fs::write(&p, cfg.to_toml()).unwrap();
    p
}
