//! Must-be-true 5 of issue 13: live forwarding to a real rsyslog (Debian `rsyslog` with
//! `rsyslog-gnutls`, a TLS-only imtcp input started by this test on a free loopback port with a
//! temporary CA and certificate): entries arrive over TLS, in RFC 5424 with octet counting; with
//! rsyslog stopped and restarted, none is lost or reordered.

use std::time::Duration;

use pacs_broker::audit::config::SyslogConfig;
use pacs_broker::audit::{AuditConfig, AuditLog, Event, SiteAudit};

#[path = "common/rsyslog.rs"]
mod rsyslog;
use rsyslog::{received, wait_for, Collector, Rsyslog};

fn site_identity() -> (Vec<u8>, Vec<u8>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["hospital-a".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    (key.serialize_der(), cert.der().to_vec())
}

fn event(i: u64) -> Event {
    Event {
        actor: "node".into(),
        action: "disclose".into(),
        object: format!("study 2.25.{i}"),
        agreement: "agr".into(),
        purpose: "treatment".into(),
        outcome: "ok".into(),
    }
}

#[test]
fn entries_reach_rsyslog_over_tls_and_survive_its_restart_in_order() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("pacs_broker=debug")
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let collector = Collector::start(dir.path());
    let (rsyslog, conf, out) = (collector.rsyslog, collector.conf, collector.out);

    let (key, cert) = site_identity();
    let config = AuditConfig {
        syslog: Some(SyslogConfig {
            address: collector.address,
            ca: collector.ca,
            server_name: Some("localhost".into()),
            app_name: "pacs-broker".into(),
        }),
        ..AuditConfig::default()
    };
    let data = dir.path().join("data");
    let log = AuditLog::open_site(
        &data.join("audit.log"),
        &SiteAudit {
            site: "hospital-a",
            key_pkcs8: &key,
            cert_der: &cert,
            data_dir: &data,
            config: &config,
        },
    )
    .unwrap();
    for i in 1..=20 {
        log.record(event(i)).unwrap();
    }
    wait_for("20 entries at rsyslog", 20, dir.path(), || {
        received(&out).len() >= 20
    });
    let first = std::fs::read_to_string(&out).unwrap();
    let line = first.lines().next().unwrap();
    assert!(
        line.starts_with("<109>1 ")
            && line.contains(
                " hospital-a pacs-broker - disclose [pacs-broker@32473 seq=\"1\" hash=\""
            ),
        "{line}"
    );

    // The collector goes away; the node keeps auditing.
    rsyslog.stop();
    for i in 21..=35 {
        log.record(event(i)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(received(&out).len(), 20);

    // It comes back on the same address: the backlog arrives, in order, nothing lost.
    let _rsyslog = Rsyslog::start(&conf, dir.path());
    wait_for("the backlog at rsyslog", 30, dir.path(), || {
        received(&out).len() >= 35
    });
    for i in 36..=40 {
        log.record(event(i)).unwrap();
    }
    wait_for("live entries after the restart", 20, dir.path(), || {
        received(&out).len() >= 40
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(received(&out), (1..=40).collect::<Vec<u64>>());
    drop(log);
}
