//! Must-be-true 5 of issue 13: live forwarding to a real rsyslog (Debian `rsyslog` with
//! `rsyslog-gnutls`, a TLS-only imtcp input started by this test on a free loopback port with a
//! temporary CA and certificate): entries arrive over TLS, in RFC 5424 with octet counting; with
//! rsyslog stopped and restarted, none is lost or reordered.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pacs_broker::audit::config::SyslogConfig;
use pacs_broker::audit::{AuditConfig, AuditLog, Event, SiteAudit};

struct Rsyslog {
    child: Child,
}

impl Rsyslog {
    fn start(conf: &Path, dir: &Path) -> Rsyslog {
        let child = Command::new("/usr/sbin/rsyslogd")
            .arg("-n")
            .arg("-f")
            .arg(conf)
            .arg("-i")
            .arg(dir.join("rsyslogd.pid"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("rsyslogd.err")).unwrap())
            .spawn()
            .expect("rsyslogd is required for this test (run .ci/setup)");
        Rsyslog { child }
    }

    /// SIGTERM, as a service manager stops it, and wait for it to exit.
    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for(what: &str, secs: u64, dir: &Path, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        assert!(
            Instant::now() < end,
            "timed out waiting for {what}; rsyslogd said:\n{}",
            std::fs::read_to_string(dir.join("rsyslogd.err")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// (CA PEM path, server cert, server key) for `localhost` / 127.0.0.1.
fn collector_pki(dir: &Path) -> PathBuf {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "test SIEM CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), key.serialize_pem()).unwrap();
    dir.join("ca.pem")
}

fn rsyslog_conf(dir: &Path, port: u16, out: &Path) -> PathBuf {
    std::fs::create_dir_all(dir.join("work")).unwrap();
    let d = dir.display();
    let conf = format!(
        r#"global(
  workDirectory="{d}/work"
  DefaultNetstreamDriver="gtls"
  DefaultNetstreamDriverCAFile="{d}/ca.pem"
  DefaultNetstreamDriverCertFile="{d}/server.pem"
  DefaultNetstreamDriverKeyFile="{d}/server.key"
)
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1" StreamDriver.AuthMode="anon")
input(type="imtcp" port="{port}" address="127.0.0.1")
template(name="raw" type="string" string="%rawmsg%\n")
action(type="omfile" file="{}" template="raw")
"#,
        out.display()
    );
    let p = dir.join("rsyslog.conf");
    std::fs::write(&p, conf).unwrap();
    p
}

fn site_identity() -> (Vec<u8>, Vec<u8>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["hospital-a".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    (key.serialize_der(), cert.der().to_vec())
}

/// The `seq` of every message rsyslog wrote, in file order.
fn received(out: &Path) -> Vec<u64> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let i = l.find("seq=\"")? + 5;
            l[i..].split('"').next()?.parse().ok()
        })
        .collect()
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
    let ca = collector_pki(dir.path());
    let port = free_port();
    let out = dir.path().join("received.log");
    let conf = rsyslog_conf(dir.path(), port, &out);
    let rsyslog = Rsyslog::start(&conf, dir.path());
    wait_for("rsyslog to listen", 10, dir.path(), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });

    let (key, cert) = site_identity();
    let config = AuditConfig {
        syslog: Some(SyslogConfig {
            address: format!("127.0.0.1:{port}"),
            ca,
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
