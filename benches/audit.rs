//! What auditing costs: audit records per second (each fsynced) without signing, with signed
//! checkpoints, and with live syslog/TLS forwarding to an in-process collector; and the audit work
//! one study's send does (sender and receiver side, checkpoints both ways) against the time of
//! the send itself between two nodes on loopback.
//!
//!     cargo bench --bench audit
//!     AUDIT_BENCH_RECORDS=5000 AUDIT_BENCH_SLICES=200 cargo bench --bench audit
//!
//! A benchmark, not a test: it prints rates and the overhead in percent.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Read;
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pacs_broker::audit::config::SyslogConfig;
use pacs_broker::audit::{AuditConfig, AuditLog, Detail, Event, SiteAudit};
use pacs_broker::demo::{write_synthetic_ct, SyntheticPatient};

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A syslog-over-TLS collector that counts octet-counted messages and discards them.
fn collector(dir: &Path) -> (String, std::path::PathBuf, Arc<AtomicU64>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let ca = dir.join("collector.pem");
    std::fs::write(&ca, cert.pem()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let server = Arc::new(server);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    std::thread::spawn(move || {
        for sock in listener.incoming().flatten() {
            let (server, c) = (server.clone(), c.clone());
            std::thread::spawn(move || {
                let conn = rustls::ServerConnection::new(server).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, sock);
                let mut buf = Vec::new();
                let mut chunk = [0u8; 65536];
                while let Ok(n) = tls.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(sp) = buf.iter().position(|&b| b == b' ') {
                        let len: usize = std::str::from_utf8(&buf[..sp]).unwrap().parse().unwrap();
                        if buf.len() < sp + 1 + len {
                            break;
                        }
                        buf.drain(..sp + 1 + len);
                        c.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    (addr, ca, count)
}

/// (PKCS#8 key, certificate), both DER.
type Identity = (Vec<u8>, Vec<u8>);

fn identity() -> Identity {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["bench".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    (key.serialize_der(), cert.der().to_vec())
}

fn open(dir: &Path, name: &str, syslog: Option<SyslogConfig>, id: &Identity) -> AuditLog {
    let data = dir.join(name);
    let config = AuditConfig {
        syslog,
        ..AuditConfig::default()
    };
    AuditLog::open_site(
        &data.join("audit.log"),
        &SiteAudit {
            site: "hospital-a",
            key_pkcs8: &id.0,
            cert_der: &id.1,
            data_dir: &data,
            config: &config,
        },
    )
    .unwrap()
}

fn event(i: usize) -> Event {
    Event {
        actor: "node".into(),
        action: "disclose".into(),
        object: format!("study 2.25.{i} (100 instances, 100 sent) to site:telerad-c"),
        agreement: "example-teleradiology".into(),
        purpose: "treatment".into(),
        outcome: "ok (signed receipt verified)".into(),
    }
}

fn detail(i: usize) -> Detail {
    Detail {
        patient_tokens: vec!["0123456789ABCDEF".into()],
        study: Some(format!("2.25.{i}")),
        party: Some("telerad-c".into()),
        flow: Some("ct-reads".into()),
        instances: Some(100),
        receipt: Some("ab".repeat(150)),
    }
}

fn records(n: usize) {
    let dir = tempfile::tempdir().unwrap();
    let id = identity();
    let (addr, ca, received) = collector(dir.path());
    let syslog = SyslogConfig {
        address: addr,
        ca,
        server_name: Some("localhost".into()),
        app_name: "pacs-broker".into(),
    };
    let plain = AuditLog::open(&dir.path().join("plain/audit.log")).unwrap();
    let signed = open(dir.path(), "signed", None, &id);
    let forwarded = open(dir.path(), "forwarded", Some(syslog), &id);
    println!("audit records, each fsynced before it returns ({n} per variant):");
    for (name, log) in [
        ("chain only (as before)", &plain),
        ("signed checkpoints every 100", &signed),
        ("checkpoints + syslog/TLS forwarding", &forwarded),
    ] {
        let t = Instant::now();
        for i in 0..n {
            log.record_detailed(event(i), detail(i)).unwrap();
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "  {name:<38} {:>8.0} records/s  {:>7.1} µs/record",
            n as f64 / s,
            s * 1e6 / n as f64
        );
    }
    let t = Instant::now();
    while received.load(Ordering::Relaxed) < n as u64 && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(5));
    }
    println!(
        "  collector received {} of {n} forwarded entries ({:.2} s after the last record)",
        received.load(Ordering::Relaxed),
        t.elapsed().as_secs_f64()
    );
}

/// The audit calls one study's delivery makes, on both sides.
fn audit_work_per_study(a: &AuditLog, c: &AuditLog, ids: &(Identity, Identity), i: usize) {
    let offer_cp = a.checkpoint_for_peer();
    c.accept_partner_checkpoint("hospital-a", &ids.0 .1, &offer_cp);
    c.record_detailed(
        Event {
            actor: "site:hospital-a".into(),
            action: "receive".into(),
            ..event(i)
        },
        detail(i),
    )
    .unwrap();
    let receipt_cp = c.checkpoint_for_peer();
    a.record_detailed(event(i), detail(i)).unwrap();
    a.accept_partner_checkpoint("telerad-c", &ids.1 .1, &receipt_cp);
}

fn main() {
    let n = env("AUDIT_BENCH_RECORDS", 2000);
    let slices = env("AUDIT_BENCH_SLICES", 100);
    records(n);

    // The audit work of one study, measured alone (with forwarding on at both ends).
    let dir = tempfile::tempdir().unwrap();
    let ids = (identity(), identity());
    let (addr, ca, _) = collector(dir.path());
    let syslog = SyslogConfig {
        address: addr,
        ca,
        server_name: Some("localhost".into()),
        app_name: "pacs-broker".into(),
    };
    let a = open(dir.path(), "a", Some(syslog.clone()), &ids.0);
    let c = open(dir.path(), "c", Some(syslog), &ids.1);
    let rounds = 200;
    let t = Instant::now();
    for i in 0..rounds {
        audit_work_per_study(&a, &c, &ids, i);
    }
    let per_study = t.elapsed().as_secs_f64() / rounds as f64;

    // The send it belongs to: two nodes on loopback, a CT study of `slices` instances.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sends: Vec<f64> = rt.block_on(async {
        let fed = common::Federation::start(&["hospital-a", "telerad-c"]).await;
        let mut times = Vec::new();
        for k in 0..3 {
            let input = fed.dir.path().join(format!("study-{k}"));
            let files =
                write_synthetic_ct(&input, &SyntheticPatient::default(), slices, 256).unwrap();
            let t = Instant::now();
            fed.node("hospital-a")
                .send(common::AGREEMENT, common::FLOW, None, &files)
                .await
                .unwrap();
            times.push(t.elapsed().as_secs_f64());
        }
        fed.stop().await;
        times
    });
    let mut sorted = sends.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[1];
    println!(
        "\nsend of a {slices}-instance CT study (256², two nodes, loopback, audited): median {:.3} s of {:?}",
        median, sends
    );
    println!(
        "audit work of one study (both sides: 2 entries, 2 signed checkpoints, 2 partner checkpoints verified, forwarding on): {:.2} ms = {:.2} % of the send",
        per_study * 1e3,
        per_study / median * 100.0
    );
}
