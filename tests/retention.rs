//! Retention at the receiver (issue 12): once a received study's retention ends, it is gone at
//! telerad-c — every file of its data folder is checked — and hospital-a holds telerad-c's
//! signed destruction receipt, visible in `audit report`. Forged, misaddressed and unknown
//! destruction receipts are refused.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use assert_cmd::Command;
use common::*;
use pacs_broker::config::TlsPaths;
use pacs_broker::demo::{write_synthetic_ct, SyntheticPatient};
use pacs_broker::federation::client::PeerClient;
use pacs_broker::federation::destruction::{self, DestructionLedger};
use pacs_broker::federation::proto::DestructionReceipt;
use pacs_broker::federation::tls::SiteTls;
use pacs_broker::node::Node;
use pacs_broker::retention::{ManualClock, DAY};
use pacs_broker::store::Store;
use sha2::{Digest, Sha256};

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Sends a generated study from hospital-a; returns its study token.
async fn send_study(fed: &Federation, slices: usize) -> String {
    let src = fed.dir.path().join(format!("study-{slices}"));
    write_synthetic_ct(&src, &SyntheticPatient::default(), slices, 32).unwrap();
    let report = fed
        .node("hospital-a")
        .send(AGREEMENT, FLOW, None, std::slice::from_ref(&src))
        .await
        .unwrap();
    assert_eq!(report.studies.len(), 1, "{report:?}");
    report.studies[0].study_token.clone()
}

fn held_receipts(node: &Node) -> Vec<destruction::HeldReceipt> {
    DestructionLedger::new(&node.config.data_dir).held()
}

/// Distinctive pieces of every received instance file: its file meta header (binary tags and
/// the instance UID together) and its last bytes (pixel data).
fn content_marks(files: &[PathBuf]) -> (Vec<Vec<u8>>, Vec<[u8; 32]>) {
    let mut marks = Vec::new();
    let mut hashes = Vec::new();
    for f in files {
        let b = std::fs::read(f).unwrap();
        assert!(b.len() > 600, "{} is too small to mark", f.display());
        marks.push(b[132..132 + 160].to_vec());
        marks.push(b[b.len() - 160..].to_vec());
        hashes.push(Sha256::digest(&b).into());
    }
    (marks, hashes)
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
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_study_is_gone_at_the_receiver_and_the_origin_holds_the_signed_receipt() {
    let fed = Federation::start(&["hospital-a", "telerad-c"]).await;
    let (a, c) = (
        fed.node("hospital-a").clone(),
        fed.node("telerad-c").clone(),
    );
    let study = send_study(&fed, 3).await;
    let c_data = c.config.data_dir.clone();
    let received = files_under(&c_data.join("store").join("inbox"));
    assert_eq!(received.len(), 3);
    let (marks, hashes) = content_marks(&received);
    let now = pacs_broker::retention::SystemClock;
    let now = pacs_broker::retention::Clock::now(&now);

    // The test flow keeps studies 30 days: on day 29 nothing goes.
    let clock = Arc::new(ManualClock::at(now + 29 * DAY));
    c.set_clock(clock.clone());
    let run = c.sweep_retention().await.unwrap();
    assert!(run.destroyed.is_empty());
    assert_eq!(c.store().unwrap().studies().unwrap().len(), 1);

    // On day 31 the serving node's own sweep destroys it and reports to the origin.
    clock.set(now + 31 * DAY);
    c.set_clock(clock.clone());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while held_receipts(&a).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no destruction receipt reached hospital-a"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Gone at telerad-c: no index record, no file holding any part of any instance.
    assert!(c.store().unwrap().studies().unwrap().is_empty());
    assert!(c
        .store()
        .unwrap()
        .delivery_queue()
        .entries()
        .unwrap()
        .is_empty());
    for sub in ["blobs", "inbox", "sums", "staging", "quarantine"] {
        let left = files_under(&c_data.join("store").join(sub));
        assert!(left.is_empty(), "left in store/{sub}: {left:?}");
    }
    let all = files_under(&c_data);
    assert!(all.len() > 3, "the data folder is still there: {all:?}");
    for f in &all {
        let b = std::fs::read(f).unwrap();
        let h: [u8; 32] = Sha256::digest(&b).into();
        assert!(
            !hashes.contains(&h),
            "{} is a received instance",
            f.display()
        );
        for m in &marks {
            assert!(
                !contains(&b, m),
                "{} holds bytes of a received instance",
                f.display()
            );
        }
    }
    let tomb = c.store().unwrap().destructions().unwrap();
    assert_eq!(tomb.len(), 1);
    assert_eq!(
        tomb[0].1.state,
        pacs_broker::store::retention::DestructionState::Acknowledged
    );

    // hospital-a holds the receipt, verifiable again from what it kept.
    let held = held_receipts(&a);
    assert_eq!(held.len(), 1);
    let h = &held[0];
    assert!(h.verify_again());
    assert!(h.digest_matches_sent);
    let r = h.decode().unwrap();
    assert_eq!(
        (r.study_token.as_str(), r.receiver_site.as_str()),
        (study.as_str(), "telerad-c")
    );
    assert_eq!((r.instances_destroyed, r.retention_days), (3, 30));
    assert_eq!(r.after, "delete");

    // Both sides audited it.
    let c_log = pacs_broker::audit::read_entries(c.audit.path()).unwrap();
    assert!(c_log.iter().any(|e| e.event.action == "retention-delete"
        && e.event.outcome.starts_with("ok")
        && e.detail.study.as_deref() == Some(study.as_str())));
    assert!(
        c_log
            .iter()
            .any(|e| e.event.action == "destruction-receipt-sent"
                && e.event.outcome.starts_with("ok"))
    );
    pacs_broker::audit::verify(c.audit.path()).unwrap();
    pacs_broker::audit::verify(a.audit.path()).unwrap();

    // The privacy officer sees it in the disclosure report.
    let a_cfg = a.config.clone();
    drop((a, c));
    let _dir = fed.stop_keeping_files().await;
    let a_toml = a_cfg.data_dir.parent().unwrap().join("node.toml");
    std::fs::write(&a_toml, a_cfg.to_toml()).unwrap();
    let patient = SyntheticPatient::default();
    let (code, out, err) = cli(
        &[
            "audit",
            "report",
            "--patient",
            &patient.id,
            "--reason",
            "retention check",
        ],
        &a_toml,
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&study), "{out}");
    assert!(!out.contains("destruction receipt: none"), "{out}");
    assert!(out.contains("destruction receipt: 20"), "{out}");
    let (_, json, _) = cli(
        &["audit", "report", "--patient", &patient.id, "--json"],
        &a_toml,
    );
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(
        v["disclosures"][0]["destruction_receipt"].is_string(),
        "{v}"
    );
}

fn tls_of(fed: &Federation, site: &str) -> SiteTls {
    let pki = fed.pki();
    SiteTls::load(
        site,
        &TlsPaths {
            ca: pki.join("ca.pem"),
            cert: pki.join(format!("{site}.pem")),
            key: pki.join(format!("{site}.key")),
            crl: None,
        },
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_misaddressed_and_unknown_destruction_receipts_are_refused() {
    let fed = Federation::start(&["hospital-a", "telerad-c"]).await;
    let study = send_study(&fed, 2).await;
    let a = fed.node("hospital-a").clone();
    let c_tls = tls_of(&fed, "telerad-c");
    let b_tls = tls_of(&fed, "hospital-b");
    let genuine = DestructionReceipt {
        agreement_id: AGREEMENT.into(),
        flow: FLOW.into(),
        study_token: study.clone(),
        receiver_site: "telerad-c".into(),
        origin_site: "hospital-a".into(),
        instances_destroyed: 2,
        study_digest: vec![9; 32],
        received_at: 1,
        destroyed_at: 2,
        retention_days: 30,
        after: "delete".into(),
        forwarded_to_site_pacs: false,
        signature: Vec::new(),
        audit_checkpoint: Vec::new(),
    };
    let signed = |r: &DestructionReceipt, tls: &SiteTls| {
        let mut r = r.clone();
        destruction::sign(&mut r, &tls.key_pkcs8).unwrap();
        r
    };
    let report = |tls: SiteTls, r: DestructionReceipt| {
        let addr = fed.addrs["hospital-a"].clone();
        async move {
            let mut client = PeerClient::connect(&tls, "hospital-a", &addr, "localhost")
                .await
                .unwrap();
            client.raw().report_destruction(r).await
        }
    };
    let denied = |r: Result<tonic::Response<_>, tonic::Status>, code, what: &str| {
        let s = r.expect_err(what);
        assert_eq!(s.code(), code, "{what}: {s:?}");
        s.message().to_string()
    };
    use tonic::Code;

    // hospital-b is a party with a valid certificate, but the study was not sent to it.
    let mut as_b = genuine.clone();
    as_b.receiver_site = "hospital-b".into();
    let m = denied(
        report(b_tls.clone(), signed(&as_b, &b_tls)).await,
        Code::PermissionDenied,
        "a receipt for a study sent to another party",
    );
    assert!(m.contains("no such study was sent to your site"), "{m}");
    // ... nor may it speak for telerad-c.
    denied(
        report(b_tls.clone(), signed(&genuine, &b_tls)).await,
        Code::PermissionDenied,
        "a receipt naming another site as receiver",
    );
    // telerad-c: a study it never received.
    let mut unknown = genuine.clone();
    unknown.study_token = "2.25.123456789".into();
    let m = denied(
        report(c_tls.clone(), signed(&unknown, &c_tls)).await,
        Code::PermissionDenied,
        "an unknown study",
    );
    assert!(!m.contains("2.25.123456789"), "{m}");
    // Under another flow name than the one it was sent under.
    let mut other_flow = genuine.clone();
    other_flow.flow = "other-flow".into();
    denied(
        report(c_tls.clone(), signed(&other_flow, &c_tls)).await,
        Code::PermissionDenied,
        "another flow",
    );
    // Signed by someone else's key, or altered after signing.
    denied(
        report(c_tls.clone(), signed(&genuine, &b_tls)).await,
        Code::PermissionDenied,
        "a signature by another key",
    );
    let mut altered = signed(&genuine, &c_tls);
    altered.instances_destroyed = 1;
    let m = denied(
        report(c_tls.clone(), altered).await,
        Code::PermissionDenied,
        "an altered receipt",
    );
    assert!(m.contains("not signed by the certificate"), "{m}");
    let mut unsigned = genuine.clone();
    unsigned.signature = Vec::new();
    denied(
        report(c_tls.clone(), unsigned).await,
        Code::InvalidArgument,
        "an unsigned receipt",
    );
    // Hostile strings are refused without being echoed.
    let mut hostile = genuine.clone();
    hostile.agreement_id = format!("{}\n../../etc", "x".repeat(5000));
    let m = denied(
        report(c_tls.clone(), signed(&hostile, &c_tls)).await,
        Code::InvalidArgument,
        "a hostile agreement id",
    );
    assert!(
        m.len() < 200 && !m.contains("xxxx") && !m.contains("etc"),
        "{m}"
    );
    assert!(held_receipts(&a).is_empty(), "a refused receipt was kept");

    // The genuine one is kept once; a retry is acknowledged as already held.
    let ok = signed(&genuine, &c_tls);
    let ack = report(c_tls.clone(), ok.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(!ack.already_held);
    let ack = report(c_tls.clone(), ok).await.unwrap().into_inner();
    assert!(ack.already_held);
    let held = held_receipts(&a);
    assert_eq!(held.len(), 1);
    assert!(held[0].verify_again());
    assert!(
        !held[0].digest_matches_sent,
        "this digest is not that of what was sent"
    );
    let log = pacs_broker::audit::read_entries(a.audit.path()).unwrap();
    let kept: Vec<_> = log
        .iter()
        .filter(|e| e.event.action == pacs_broker::audit::report::DESTRUCTION_RECEIPT)
        .collect();
    assert_eq!(kept.len(), 1);
    assert!(kept[0].event.outcome.contains("DIFFERS"), "{:?}", kept[0]);
    drop(a);
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_or_lost_receipt_stays_queued_and_is_retried_until_the_origin_has_it() {
    use pacs_broker::store::retention::DestructionState;
    let fed = Federation::start(&["hospital-a", "telerad-c"]).await;
    let (a, c) = (
        fed.node("hospital-a").clone(),
        fed.node("telerad-c").clone(),
    );
    let study = send_study(&fed, 2).await;
    // The origin cannot match the receipt to a study it sent (its outbox record is away).
    let record = a
        .outbox()
        .study_dir(AGREEMENT, &study)
        .join("transfer.json");
    let aside = record.with_extension("aside");
    std::fs::rename(&record, &aside).unwrap();
    let start = pacs_broker::retention::Clock::now(&pacs_broker::retention::SystemClock);
    let clock = Arc::new(ManualClock::at(start + 31 * DAY));
    c.set_clock(clock.clone());
    let tomb = |c: &Node| c.store().unwrap().destructions().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while tomb(&c).first().is_none_or(|t| t.1.receipt_attempts == 0) {
        assert!(std::time::Instant::now() < deadline, "no attempt was made");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t = &tomb(&c)[0].1;
    assert_eq!(t.state, DestructionState::Deleted, "{t:?}");
    assert!(
        t.last_error
            .as_deref()
            .is_some_and(|e| e.contains("no such study was sent to your site")),
        "{t:?}"
    );
    assert!(held_receipts(&a).is_empty());
    assert!(
        c.store().unwrap().studies().unwrap().is_empty(),
        "deleted anyway"
    );
    // Not retried before its backoff; retried after it, and then the origin has it.
    assert_eq!(c.sweep_retention().await.unwrap().receipts.acknowledged, 0);
    std::fs::rename(&aside, &record).unwrap();
    assert_eq!(c.sweep_retention().await.unwrap().receipts.acknowledged, 0);
    clock.advance(pacs_broker::store::retention::receipt_backoff_secs(1));
    c.set_clock(clock.clone());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while tomb(&c)[0].1.state != DestructionState::Acknowledged {
        assert!(std::time::Instant::now() < deadline, "never acknowledged");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(held_receipts(&a).len(), 1);
    let log = pacs_broker::audit::read_entries(c.audit.path()).unwrap();
    let sent: Vec<_> = log
        .iter()
        .filter(|e| e.event.action == "destruction-receipt-sent")
        .map(|e| e.event.outcome.clone())
        .collect();
    assert_eq!(sent.len(), 2, "{sent:?}");
    assert!(
        sent[0].starts_with("not delivered yet") && sent[1].starts_with("ok"),
        "{sent:?}"
    );
    drop((a, c));
    fed.stop().await;
}

/// A report telerad-c made on a study, still waiting to go home (hospital-a unreachable from
/// telerad-c), is destroyed with the study when its retention ends: a result is derived from
/// the study's data and may not outlive it at the receiver.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_still_waiting_to_go_home_is_destroyed_with_its_study() {
    use pacs_broker::results::queue::{ReturnQueue, ReturnState, RESULT_FILE};
    use pacs_broker::results::recognise::ReturnTarget;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let fed = Federation::start_with(&["hospital-a", "telerad-c"], |cfg| {
        if cfg.site_id == "telerad-c" {
            cfg.peers.get_mut("hospital-a").unwrap().address = dead.clone();
        }
    })
    .await;
    let c = fed.node("telerad-c").clone();
    let study = send_study(&fed, 2).await;
    let report = fed.dir.path().join("report.dcm");
    std::fs::write(&report, b"a report telerad-c made on the study").unwrap();
    let target = ReturnTarget {
        agreement: AGREEMENT.into(),
        flow: FLOW.into(),
        origin: "hospital-a".into(),
        purpose: "treatment".into(),
        study_token: study.clone(),
        sop_instance_uid: "2.25.4242".into(),
    };
    let (dir, _) = c
        .return_queue()
        .add(&report, &target, ReturnState::Pending)
        .unwrap();
    // The serving node tries to send it home and cannot: it stays queued, with its file.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while ReturnQueue::load(&dir).unwrap().attempts == 0 {
        assert!(std::time::Instant::now() < deadline, "never attempted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ReturnQueue::load(&dir).unwrap().state, ReturnState::Pending);
    assert!(dir.join(RESULT_FILE).exists());

    let start = pacs_broker::retention::Clock::now(&pacs_broker::retention::SystemClock);
    c.set_clock(Arc::new(ManualClock::at(start + 31 * DAY)));
    let run = c.sweep_retention().await.unwrap();
    assert_eq!(run.destroyed.len(), 1);
    let entry = ReturnQueue::load(&dir).unwrap();
    assert_eq!(entry.state, ReturnState::Destroyed, "{entry:?}");
    assert!(
        !dir.join(RESULT_FILE).exists(),
        "the result went with its study"
    );
    assert!(c.return_queue().due(u64::MAX).is_empty(), "never sent now");
    let log = pacs_broker::audit::read_entries(c.audit.path()).unwrap();
    let deleted: Vec<_> = log
        .iter()
        .filter(|e| e.event.action == "retention-delete")
        .map(|e| e.event.object.clone())
        .collect();
    assert!(
        deleted
            .iter()
            .any(|o| o.contains("result 2.25.4242") && o.contains(&study)),
        "{deleted:?}"
    );
    drop(c);
    fed.stop().await;
}

/// `vault shred` beside a running node that holds the vault (sled locks it to one process): the
/// command destroys the token secret at once, the node deletes the vault records within its
/// next housekeeping round, and both are audited; re-identification ends at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_shred_beside_a_running_node_that_holds_the_vault() {
    let fed = Federation::start(&["hospital-a", "telerad-c"]).await;
    let a = fed.node("hospital-a").clone();
    send_study(&fed, 2).await;
    let vault = a.vault().unwrap(); // held by this (serving) process from now on
    let tokens = vault.tokens(AGREEMENT).unwrap();
    assert!(!tokens.is_empty());
    // The agreement ends; its flow promised partners no retention, so it may be shredded now.
    let policy = a.config.agreements.join("test.toml");
    let ended = agreement_toml("ended", "false")
        .replace("[flows.retention]\ndays = 30\nafter = \"delete\"\n", "");
    assert!(!ended.contains("[flows.retention]"));
    std::fs::write(&policy, ended).unwrap();
    let _ = std::fs::remove_dir_all(pacs_broker::dsa::sign::signature_dir(&policy));
    sign_by_all(fed.dir.path(), &policy);
    a.reload_agreements();
    let config = fed.dir.path().join("hospital-a.toml");
    std::fs::write(&config, a.config.to_toml()).unwrap();

    let (code, out, err) = cli(&["vault", "shred", "--agreement", AGREEMENT], &config);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("token secret is destroyed"), "{out}");
    assert!(
        out.contains("The running node that holds the vault: ok:")
            && out.contains("vault records destroyed"),
        "{out}"
    );
    assert!(vault.tokens(AGREEMENT).unwrap().is_empty(), "records left");
    let e = vault
        .reidentify(AGREEMENT, &tokens[0])
        .unwrap_err()
        .to_string();
    assert!(e.contains("was shredded on"), "{e}");
    let log = pacs_broker::audit::read_entries(a.audit.path()).unwrap();
    let shreds: Vec<(String, String)> = log
        .iter()
        .filter(|e| e.event.action == "vault-shred")
        .map(|e| (e.event.actor.clone(), e.event.outcome.clone()))
        .collect();
    assert_eq!(shreds.len(), 2, "{shreds:?}");
    assert!(shreds[0].0.contains("dpo-test") && shreds[0].1.contains("token secret destroyed"));
    assert_eq!(shreds[1].0, "node", "{shreds:?}");
    drop((vault, a));
    fed.stop().await;
}
