//! The audit events of issue 13's "Every event, bounded" list that the other audit tests do not
//! cover, each checked to be written with its actor: peer connections refused (a certificate of
//! another CA, a revoked one, no TLS at all, a flood, over the total connection limit), a CRL
//! reload, the policy in force at `serve` start and its changes, node start and stop, DICOM
//! associations accepted and rejected (with dcmtk's `echoscu` and `storescu`; a flood of
//! rejections summarised), inputs a `send` held back, and the administrative commands (run as
//! the `pacs-broker` binary). None of them may carry PHI: the logs are grepped for the originals
//! of a study that went through the DICOM listener. The report at the origin shows the forms the
//! identifiers left in and a destruction receipt; the real log exports to DICOM audit messages
//! that jing validates.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use pacs_broker::audit::{read_entries, Entry};
use pacs_broker::config::{NodeConfig, TlsPaths};
use pacs_broker::demo::{write_synthetic_ct, SyntheticPatient};
use pacs_broker::federation::{pki, tls};

use common::*;

const BROKER_AE: &str = "HOSP_A_BROKER";

fn entries(path: &Path) -> Vec<Entry> {
    read_entries(path).unwrap_or_default()
}

/// Waits (up to 15 s) until an entry of `log` satisfies `want`; returns it.
async fn wait_for_entry(log: &Path, what: &str, want: impl Fn(&Entry) -> bool) -> Entry {
    let start = Instant::now();
    loop {
        if let Some(e) = entries(log).into_iter().find(&want) {
            return e;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "no audit entry {what} in {}:\n{}",
            log.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Opens a TLS connection to `addr` presenting `cert`/`key` (trusting the federation's CA for
/// the server), and waits for the server to close it.
async fn connect_as(ca: &Path, cert: &Path, key: &Path, site: &str, addr: &str) {
    let paths = TlsPaths {
        ca: ca.to_owned(),
        cert: cert.to_owned(),
        key: key.to_owned(),
        crl: None,
    };
    let client = tls::SiteTls::load(site, &paths).unwrap();
    let pins = tls::Pins::default();
    if let Ok((mut s, _)) =
        tls::connect(client.client.clone(), addr, "localhost", "telerad-c", &pins).await
    {
        use tokio::io::AsyncReadExt;
        let mut b = [0u8; 16];
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await;
    }
}

/// A TCP connection that speaks no TLS.
fn not_tls(addr: &str) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
}

fn is_refusal(e: &Entry, kind: &str) -> bool {
    e.event.action == "refuse" && e.event.outcome.starts_with(&format!("{kind}:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_are_audited_with_what_the_certificate_claims_and_bounded() {
    // telerad-c enforces a CRL that revokes hospital-b's certificate.
    let fed = Federation::start_with(&["telerad-c"], |cfg| {
        let pki = cfg.tls.ca.parent().unwrap().to_owned();
        let crl = pki.join("crl.pem");
        pacs_broker::federation::crl::revoke_with_dev_ca(
            &pki.join("ca.pem"),
            &pki.join("ca.key"),
            &[pki.join("hospital-b.pem")],
            &crl,
            30,
        )
        .unwrap();
        cfg.tls.crl = Some(crl);
    })
    .await;
    let addr = fed.addrs["telerad-c"].clone();
    let log = fed.node("telerad-c").audit.path().to_owned();
    let pki = fed.pki();

    // A certificate of another CA that claims to be hospital-a.
    let rogue = fed.dir.path().join("rogue");
    pki::generate_dev_federation(&rogue, &["hospital-a".to_string()]).unwrap();
    connect_as(
        &pki.join("ca.pem"),
        &rogue.join("hospital-a.pem"),
        &rogue.join("hospital-a.key"),
        "hospital-a",
        &addr,
    )
    .await;
    let e = wait_for_entry(&log, "for the rogue certificate", |e| {
        is_refusal(e, "TLS handshake refused") && e.event.object.contains("names site `hospital-a`")
    })
    .await;
    assert_eq!(e.event.actor, "remote:127.0.0.1");
    assert!(
        e.event.object.starts_with("connection from 127.0.0.1:"),
        "{e:?}"
    );
    assert!(e.event.object.contains("certificate subject `"), "{e:?}");
    // Another CA (here with the same name as the federation's: its signature does not verify).
    assert!(
        e.event
            .outcome
            .starts_with("TLS handshake refused: invalid peer certificate: "),
        "{e:?}"
    );

    // hospital-b's genuine but revoked certificate.
    connect_as(
        &pki.join("ca.pem"),
        &pki.join("hospital-b.pem"),
        &pki.join("hospital-b.key"),
        "hospital-b",
        &addr,
    )
    .await;
    let e = wait_for_entry(&log, "for the revoked certificate", |e| {
        is_refusal(e, "TLS handshake refused") && e.event.object.contains("names site `hospital-b`")
    })
    .await;
    assert!(e.event.outcome.contains("Revoked"), "{e:?}");

    // No TLS at all.
    tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || not_tls(&addr)
    })
    .await
    .unwrap();
    wait_for_entry(&log, "for a connection without TLS", |e| {
        is_refusal(e, "TLS handshake refused") && !e.event.object.contains("certificate")
    })
    .await;

    // The CA issues a new CRL (same revocations): the node takes it and audits it.
    pacs_broker::federation::crl::revoke_with_dev_ca(
        &pki.join("ca.pem"),
        &pki.join("ca.key"),
        &[],
        &pki.join("crl.pem"),
        30,
    )
    .unwrap();
    let e = wait_for_entry(&log, "crl-reload", |e| e.event.action == "crl-reload").await;
    assert_eq!(
        e.event.object,
        "1 revocation list(s) in force; 0 open connection(s) cut"
    );
    assert_eq!(e.event.outcome, "ok");

    // A flood: 40 more. Refusals of unidentified peers share one window: at most
    // AUDITED_PER_WINDOW entries one by one, the rest in a summary written at the latest when
    // the node stops.
    tokio::task::spawn_blocking({
        let addr = addr.clone();
        move || {
            for _ in 0..40 {
                not_tls(&addr)
            }
        }
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let dir = fed.stop_keeping_files().await;
    let all = entries(&dir.path().join("telerad-c/data/audit.log"));
    let handshake: Vec<&Entry> = all
        .iter()
        .filter(|e| is_refusal(e, "TLS handshake refused"))
        .collect();
    let per_window = pacs_broker::federation::refusals::AUDITED_PER_WINDOW as usize;
    assert_eq!(handshake.len(), per_window + 1, "{handshake:#?}");
    let summary = handshake.last().unwrap();
    assert_eq!(summary.event.actor, "remote:127.0.0.1");
    assert!(
        summary.event.object.starts_with("38 further refusals in "),
        "{summary:?}"
    );
    let stop = all.last().unwrap();
    assert_eq!(stop.event.action, "node-stop");
    assert_eq!(stop.event.actor, "node");
    pacs_broker::audit::verify(&dir.path().join("telerad-c/data/audit.log")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_total_connection_limit_is_audited() {
    let fed = Federation::start_with(&["telerad-c"], |cfg| cfg.limits.connections_total = 1).await;
    let addr = fed.addrs["telerad-c"].clone();
    let log = fed.node("telerad-c").audit.path().to_owned();
    // The first connection holds the only slot (its handshake waits); the second is closed.
    let _holding = std::net::TcpStream::connect(&addr).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    tokio::task::spawn_blocking(move || not_tls(&addr))
        .await
        .unwrap();
    let e = wait_for_entry(&log, "over the total limit", |e| {
        is_refusal(e, "over the total connection limit")
    })
    .await;
    assert_eq!(e.event.actor, "remote:127.0.0.1");
    assert!(e.event.outcome.contains("connections_total"), "{e:?}");
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_start_and_reload_audit_the_policy_in_force() {
    let fed = Federation::start(&["telerad-c"]).await;
    let node = fed.node("telerad-c").clone();
    let log = node.audit.path().to_owned();
    let policy = node.config.agreements.join("test.toml");
    let sha = pacs_broker::dsa::sign::sha256_hex(&std::fs::read(&policy).unwrap());

    let start = wait_for_entry(&log, "node-start", |e| e.event.action == "node-start").await;
    assert!(start.event.actor.starts_with("user:") || start.event.actor.starts_with("uid:"));
    assert!(
        start.event.object.starts_with(&format!(
            "site telerad-c serving on {}",
            fed.addrs["telerad-c"]
        )),
        "{start:?}"
    );
    let load = wait_for_entry(&log, "policy-load of the agreement", |e| {
        e.event.action == "policy-load" && e.event.agreement == AGREEMENT
    })
    .await;
    assert_eq!(
        load.event.object,
        format!("agreement {AGREEMENT} version 1 (active), file sha256 {sha}")
    );
    assert_eq!(load.event.outcome, "in force");
    assert_eq!(load.event.actor, "node");
    wait_for_entry(&log, "policy-load summary", |e| {
        e.event.action == "policy-load"
            && e.event.object == "1 agreement(s) in force (at serve start)"
    })
    .await;

    // An unsigned edit that suspends hospital-a: narrowing applies at once, and is audited as a
    // change of the agreement in force.
    let text = std::fs::read_to_string(&policy).unwrap();
    let edited = text.replacen(
        "privacy_contact = \"dpo@a.example\"\nstatus = \"active\"",
        "privacy_contact = \"dpo@a.example\"\nstatus = \"suspended\"",
        1,
    );
    assert_ne!(text, edited);
    std::fs::write(&policy, edited).unwrap();
    let change = wait_for_entry(&log, "policy-change", |e| e.event.action == "policy-change").await;
    assert_eq!(change.event.agreement, AGREEMENT);
    assert!(
        change
            .event
            .outcome
            .starts_with("party hospital-a suspended; in force: the last fully signed version"),
        "{change:?}"
    );
    assert!(
        change.event.object.ends_with("file sha256 unknown"),
        "{change:?}"
    );
    wait_for_entry(&log, "policy-load after reload", |e| {
        e.event.action == "policy-load"
            && e.event.object.contains("reloaded")
            && e.event.outcome == "1 agreement file(s) not enforced"
    })
    .await;
    fed.stop().await;
}

/// hospital-a with a DICOM listener that allows `MODALITY1` from loopback, routing to the test
/// flow.
fn with_dicom(port: u16) -> impl Fn(&mut NodeConfig) {
    move |cfg| {
        if cfg.site_id != "hospital-a" {
            return;
        }
        cfg.dicom = Some(common::listener_config(
            port,
            BROKER_AE,
            &[("MODALITY1", "127.0.0.1")],
            AGREEMENT,
            FLOW,
        ));
    }
}

async fn echoscu(calling: &str, port: u16) -> (bool, String) {
    let args: Vec<String> = [
        "-aet",
        calling,
        "-aec",
        BROKER_AE,
        "127.0.0.1",
        &port.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_tool("echoscu", &args)
    })
    .await
    .unwrap()
}

fn originals(files: &[PathBuf]) -> Vec<String> {
    use dicom_dictionary_std::tags;
    let p = SyntheticPatient::default();
    let mut v = vec![p.name, p.id, p.birth_date, p.accession];
    for f in files {
        let o = dicom_object::open_file(f).unwrap();
        for t in [tags::STUDY_INSTANCE_UID, tags::SOP_INSTANCE_UID] {
            v.push(
                o.element(t)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .trim_end_matches('\0')
                    .to_string(),
            );
        }
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dicom_associations_are_audited_without_phi_and_the_report_shows_forms_and_destruction() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let fed = Federation::start_with(&["hospital-a", "telerad-c"], with_dicom(port)).await;
    let port_s = port.to_string();
    let log_a = fed.node("hospital-a").audit.path().to_owned();
    let log_c = fed.node("telerad-c").audit.path().to_owned();
    let wait = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            wait.elapsed() < Duration::from_secs(10),
            "DICOM listener not up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (ok, out) = echoscu("MODALITY1", port).await;
    assert!(ok, "echoscu failed: {out}");
    let accepted = wait_for_entry(&log_a, "association accepted", |e| {
        e.event.action == "associate" && e.event.outcome.starts_with("accepted")
    })
    .await;
    assert_eq!(accepted.event.actor, "dicom:MODALITY1@127.0.0.1");
    assert_eq!(accepted.event.object, format!("association to {BROKER_AE}"));
    assert_eq!(
        accepted.event.outcome,
        "accepted: 1 presentation context(s)"
    );

    let (ok, _) = echoscu("INTRUDER", port).await;
    assert!(!ok, "an AE off the allow-list was accepted");
    let rejected = wait_for_entry(&log_a, "association rejected", |e| {
        e.event.action == "associate" && e.event.outcome.starts_with("rejected")
    })
    .await;
    assert_eq!(rejected.event.actor, "dicom:INTRUDER@127.0.0.1");
    // A flood of rejected requests: a few entries one by one, the rest in one summary (written
    // when the listener stops, at the latest).
    for _ in 0..10 {
        assert!(!echoscu("INTRUDER", port).await.0);
    }

    // A study with PHI through the listener to the partner: no original in any audit entry.
    let src = fed.dir.path().join("study");
    let files = write_synthetic_ct(&src, &SyntheticPatient::default(), 3, 32).unwrap();
    let mut args: Vec<String> = ["-aet", "MODALITY1", "-aec", BROKER_AE, "127.0.0.1", &port_s]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend(files.iter().map(|f| f.display().to_string()));
    let out = tokio::task::spawn_blocking(move || {
        Command::new("storescu")
            .args(&args)
            .env("TCP_NODELAY", "1")
            .output()
            .expect("storescu (dcmtk) is required: run .ci/setup")
    })
    .await
    .unwrap();
    assert!(out.status.success(), "storescu: {out:?}");
    wait_for_entry(&log_c, "receive at telerad-c", |e| {
        e.event.action == "receive" && e.event.outcome == "ok"
    })
    .await;
    // The sender records the disclosure once the receipt is verified.
    wait_for_entry(&log_a, "the study's disclosure at hospital-a", |e| {
        e.event.action == "disclose" && e.event.outcome == "ok (signed receipt verified)"
    })
    .await;
    let secrets = originals(&files);
    let cfg_a = fed.node("hospital-a").config.clone();
    let dir = fed.stop_keeping_files().await;

    // The partner's destruction receipt comes back (its RPC is another part's): the report at the
    // origin shows it, with the signed receipt and the form each identifier left in.
    let study = entries(&log_a)
        .into_iter()
        .find(|e| e.event.action == "disclose" && e.event.outcome.starts_with("ok"))
        .and_then(|e| e.detail.study)
        .unwrap_or_else(|| {
            panic!(
                "no disclosure with its study at hospital-a:\n{}",
                std::fs::read_to_string(&log_a).unwrap()
            )
        });
    {
        let node = pacs_broker::node::Node::open(cfg_a.clone()).unwrap();
        let (event, detail) = pacs_broker::audit::events::destruction_receipt(
            "telerad-c",
            AGREEMENT,
            FLOW,
            &study,
            "ok: signature verified".into(),
        );
        node.audit.record_detailed(event, detail).unwrap();
    }
    let config = dir.path().join("hospital-a/node.toml");
    std::fs::write(&config, cfg_a.to_toml()).unwrap();
    let patient = SyntheticPatient::default().id;
    let out = Command::new(env!("CARGO_BIN_EXE_pacs-broker"))
        .args([
            "audit",
            "report",
            "--config",
            config.to_str().unwrap(),
            "--patient",
        ])
        .arg(&patient)
        .args(["--json", "--reason", "accounting of disclosures request"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let d = &json["disclosures"][0];
    assert_eq!(d["party"], "telerad-c", "{json:#}");
    assert_eq!(d["study"], study.as_str());
    assert_eq!(d["signed_receipt_held"], true);
    assert!(d["destruction_receipt"].is_string(), "{json:#}");
    let forms: Vec<(String, String)> = d["identifiers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["identifiers"].as_str().unwrap().to_string(),
                f["form"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let form_of = |cat: &str| {
        forms
            .iter()
            .find(|(c, _)| c == cat)
            .map(|(_, f)| f.clone())
            .unwrap_or_else(|| panic!("no form for {cat}: {forms:?}"))
    };
    assert_eq!(
        form_of("patient name and patient ID"),
        "replaced by a keyed token"
    );
    assert!(
        forms.iter().any(|(_, f)| f.starts_with("shifted")),
        "{forms:?}"
    );
    assert!(forms.iter().any(|(_, f)| f == "removed"), "{forms:?}");

    // Every entry of this real log (new kinds included) exports as a DICOM audit message that
    // validates against the PS3.15 A.5 schema (jing).
    let out = Command::new(env!("CARGO_BIN_EXE_pacs-broker"))
        .args(["audit", "export", "--format", "dicom", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let xml = String::from_utf8(out.stdout).unwrap();
    let mut files = Vec::new();
    for (i, m) in xml.lines().enumerate() {
        let f = dir.path().join(format!("message-{i}.xml"));
        std::fs::write(&f, m).unwrap();
        files.push(f.display().to_string());
    }
    assert!(files.len() > 15, "{xml}");
    let schema = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("docs/schema/dicom-audit-message.rnc")
        .display()
        .to_string();
    let mut args = vec!["-c", schema.as_str()];
    args.extend(files.iter().map(String::as_str));
    let (ok, out) = run_tool("jing", &args);
    assert!(ok, "jing rejected the export: {out}");

    let all = entries(&log_a);
    let one_by_one = all
        .iter()
        .filter(|e| e.event.action == "associate" && e.event.outcome.starts_with("rejected: "))
        .count();
    assert_eq!(one_by_one, 5, "rejections written one by one");
    let summary = all
        .iter()
        .find(|e| e.event.action == "associate" && e.event.object.contains("(summary)"))
        .expect("a summary of the rejections");
    assert_eq!(summary.event.actor, "dicom:INTRUDER@127.0.0.1");
    assert!(
        summary.event.object.starts_with("6 further refusals in "),
        "{summary:?}"
    );
    assert!(
        summary
            .event
            .outcome
            .starts_with("rejected (not allowed): last reason: calling AE title not recognized"),
        "{summary:?}"
    );

    for site in ["hospital-a", "telerad-c"] {
        let text = std::fs::read_to_string(dir.path().join(site).join("data/audit.log")).unwrap();
        for s in &secrets {
            assert!(
                !text.contains(s.as_str()),
                "PHI {s:?} in the audit log of {site}"
            );
        }
        for kind in ["node-start", "policy-load", "node-stop"] {
            assert!(
                text.contains(&format!("\"action\":\"{kind}\"")),
                "{site}: no {kind}"
            );
        }
    }
}

fn broker(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pacs-broker"))
        .args(args)
        .env("USER", "officer-jane")
        .env("PACS_BROKER_LOG", "debug")
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn admin_commands_are_audited_with_the_os_user() {
    let dir = tempfile::tempdir().unwrap();
    let all: Vec<String> = ["hospital-a", "hospital-b", "telerad-c"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    pki::generate_dev_federation(&dir.path().join("pki"), &all).unwrap();
    let cfg = site_config(dir.path(), "hospital-a", &Default::default());
    let config = dir.path().join("hospital-a/node.toml");
    std::fs::write(&config, cfg.to_toml()).unwrap();
    let c = config.to_str().unwrap();
    let pki_dir = dir.path().join("pki");
    let p = |f: &str| pki_dir.join(f).display().to_string();

    // The store exists once the node has opened it.
    pacs_broker::node::Node::open(cfg.clone())
        .unwrap()
        .store()
        .unwrap();
    let policy = cfg.agreements.join("test.toml");
    let key_out = dir.path().join("new.key");
    let runs: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["store".into(), "verify".into(), "--config".into(), c.into()],
            "store-verify",
        ),
        (
            vec![
                "outbox".into(),
                "--config".into(),
                c.into(),
                "--retry".into(),
            ],
            "outbox-retry",
        ),
        (
            vec![
                "dsa".into(),
                "sign".into(),
                "--site-cert".into(),
                p("hospital-a.pem"),
                "--site-key".into(),
                p("hospital-a.key"),
                policy.display().to_string(),
                "--config".into(),
                c.into(),
            ],
            "dsa-sign",
        ),
        (
            vec![
                "keys".into(),
                "new".into(),
                "--out".into(),
                key_out.display().to_string(),
                "--config".into(),
                c.into(),
            ],
            "keys-new",
        ),
        (
            vec![
                "certs".into(),
                "revoke".into(),
                "--ca-dir".into(),
                pki_dir.display().to_string(),
                "--config".into(),
                c.into(),
                p("hospital-b.pem"),
            ],
            "certs-revoke",
        ),
        (
            vec![
                "audit".into(),
                "checkpoints".into(),
                "--config".into(),
                c.into(),
                "--of".into(),
                "telerad-c".into(),
            ],
            "audit-checkpoints",
        ),
    ];
    for (args, kind) in &runs {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, out) = broker(&args);
        // `audit checkpoints` exits 1 when no checkpoint of the partner is held; still audited.
        assert!(ok || *kind == "audit-checkpoints", "{args:?}: {out}");
        let log = cfg.data_dir.join("audit.log");
        let e = entries(&log)
            .into_iter()
            .rev()
            .find(|e| e.event.action == *kind)
            .unwrap_or_else(|| panic!("no `{kind}` entry after {args:?}: {out}"));
        assert_eq!(e.event.actor, "user:officer-jane", "{e:?}");
    }
    let all = entries(&cfg.data_dir.join("audit.log"));
    let find = |k: &str| all.iter().find(|e| e.event.action == k).unwrap().clone();
    assert_eq!(find("store-verify").event.outcome, "ok");
    let signed = find("dsa-sign");
    assert_eq!(signed.event.agreement, AGREEMENT);
    let sha = pacs_broker::dsa::sign::sha256_hex(&std::fs::read(&policy).unwrap());
    assert!(signed.event.object.contains(&sha), "{signed:?}");
    assert_eq!(
        find("keys-new").event.object,
        "new site key file new.key written"
    );
    assert!(find("certs-revoke")
        .event
        .object
        .contains("1 revoked certificate(s)"));
    pacs_broker::audit::verify(&cfg.data_dir.join("audit.log")).unwrap();

    // Without --config, the commands that need no node still work (and write no log).
    let (ok, out) = broker(&[
        "keys",
        "new",
        "--out",
        dir.path().join("k2").to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_a_send_holds_back_are_audited_without_their_file_names() {
    let fed = Federation::start(&["hospital-a", "telerad-c"]).await;
    let src = fed.dir.path().join("study");
    write_synthetic_ct(&src, &SyntheticPatient::default(), 2, 32).unwrap();
    // A file that is not DICOM, named as files sometimes are.
    std::fs::write(src.join("DOE_JANE_QUINN.dcm"), b"not dicom").unwrap();
    let report = fed
        .node("hospital-a")
        .send(AGREEMENT, FLOW, None, std::slice::from_ref(&src))
        .await
        .unwrap();
    assert_eq!(report.held_back.len(), 1, "{:?}", report.held_back);
    let log = fed.node("hospital-a").audit.path().to_owned();
    let e = wait_for_entry(&log, "the input not sent", |e| {
        e.event.action == "refuse" && e.event.object.contains("input(s) not sent")
    })
    .await;
    assert_eq!(
        e.event.object,
        format!("send under flow {FLOW}: 1 input(s) not sent")
    );
    assert!(e.event.outcome.starts_with("failed: "), "{e:?}");
    assert_eq!(e.event.agreement, AGREEMENT);
    assert!(e.event.actor.starts_with("user:") || e.event.actor.starts_with("uid:"));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains("DOE"),
        "a file name reached the audit log: {text}"
    );
    fed.stop().await;
}

/// A port probe (TCP connect and close, not a byte sent — what a health check or a script
/// waiting for the port does) is audited as a refused TLS handshake, and a stream of probes is
/// summarised like any refusal flood (docs/audit.md, "Port probes").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_probes_are_audited_and_summarised() {
    let fed = Federation::start(&["telerad-c"]).await;
    let addr = fed.addrs["telerad-c"].clone();
    tokio::task::spawn_blocking(move || {
        for _ in 0..30 {
            drop(std::net::TcpStream::connect(&addr).unwrap());
            std::thread::sleep(Duration::from_millis(10));
        }
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let dir = fed.stop_keeping_files().await;
    let log = dir.path().join("telerad-c/data/audit.log");
    let probes: Vec<Entry> = entries(&log)
        .into_iter()
        .filter(|e| is_refusal(e, "TLS handshake refused"))
        .collect();
    let per_window = pacs_broker::federation::refusals::AUDITED_PER_WINDOW as usize;
    assert_eq!(probes.len(), per_window + 1, "{probes:#?}");
    for p in &probes[..per_window] {
        assert_eq!(p.event.actor, "remote:127.0.0.1");
        assert_eq!(p.event.outcome, "TLS handshake refused: tls handshake eof");
    }
    let summary = &probes[per_window].event;
    let further = 30 - per_window;
    assert!(
        summary
            .object
            .starts_with(&format!("{further} further refusals in ")),
        "{summary:?}"
    );
    pacs_broker::audit::verify(&log).unwrap();
}
