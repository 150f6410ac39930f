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

/// Issue 13's performance clause: forwarding costs per batch, never per entry. A burst of 300
/// entries (each fsynced by the log) reaches rsyslog in a few writes, with the cursor saved a
/// few times at most (two fsyncs each), and after a stop the cursor names the last entry, so a
/// forwarder started again sends nothing twice.
#[test]
fn a_burst_is_forwarded_in_few_batches_and_the_cursor_is_saved_rarely() {
    let dir = tempfile::tempdir().unwrap();
    let collector = Collector::start(dir.path());
    let out = collector.out.clone();
    let (key, cert) = site_identity();
    let config = AuditConfig {
        syslog: Some(SyslogConfig {
            address: collector.address.clone(),
            ca: collector.ca.clone(),
            server_name: Some("localhost".into()),
            app_name: "pacs-broker".into(),
        }),
        ..AuditConfig::default()
    };
    let data = dir.path().join("data");
    let open = || {
        AuditLog::open_site(
            &data.join("audit.log"),
            &SiteAudit {
                site: "hospital-a",
                key_pkcs8: &key,
                cert_der: &cert,
                data_dir: &data,
                config: &config,
            },
        )
        .unwrap()
    };
    let log = open();
    for i in 1..=300 {
        log.record(event(i)).unwrap();
    }
    // The forwarder counts a batch once its write returned, which may be after rsyslog stored it.
    wait_for("300 entries at rsyslog", 30, dir.path(), || {
        received(&out).len() >= 300 && log.forwarding().is_some_and(|s| s.entries >= 300)
    });
    let stats = log.forwarding().expect("forwarding configured");
    assert_eq!(stats.entries, 300);
    assert_eq!(stats.connections, 1);
    // One write per entry would be 300; the linger groups what arrives during 100 ms.
    assert!(stats.batches <= 60, "{stats:?}");
    // At most one save per 5 s while forwarding (none is due yet in a burst this short, unless
    // the machine is very slow), instead of one per batch.
    assert!(stats.cursor_saves <= 2, "{stats:?}");
    drop(log);
    let cursor = std::fs::read_to_string(data.join("audit.syslog-cursor")).unwrap();
    assert_eq!(
        cursor.trim(),
        "300",
        "the cursor is saved when forwarding stops"
    );

    // Started again: nothing is sent twice, new entries follow in order.
    let log = open();
    log.record(event(301)).unwrap();
    wait_for("entry 301 at rsyslog", 20, dir.path(), || {
        received(&out).len() >= 301
    });
    std::thread::sleep(Duration::from_millis(300));
    drop(log);
    assert_eq!(received(&out), (1..=301).collect::<Vec<u64>>());
}
