//! A real rsyslog (Debian `rsyslog` with `rsyslog-gnutls`) as the hospital's SIEM collector: a
//! TLS-only imtcp input on a free loopback port, with a temporary CA and server certificate,
//! writing each message as received (`%rawmsg%`) to a file. Shared by tests/audit_syslog.rs and
//! benches/dicom_edge.rs (which includes this file by path).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running rsyslogd, killed on drop.
pub struct Rsyslog {
    child: Child,
}

impl Rsyslog {
    pub fn start(conf: &Path, dir: &Path) -> Rsyslog {
        Self::start_niced(conf, dir, None)
    }

    /// [`Rsyslog::start`] at a lower CPU priority (`nice -n <n>`), as the benchmark runs it: a
    /// real collector runs on another machine, so on this one it should not compete with the
    /// node it measures.
    pub fn start_niced(conf: &Path, dir: &Path, nice: Option<i32>) -> Rsyslog {
        let mut cmd = match nice {
            Some(n) => {
                let mut c = Command::new("nice");
                c.arg("-n").arg(n.to_string()).arg("/usr/sbin/rsyslogd");
                c
            }
            None => Command::new("/usr/sbin/rsyslogd"),
        };
        let child = cmd
            .arg("-n")
            .arg("-f")
            .arg(conf)
            .arg("-i")
            .arg(dir.join("rsyslogd.pid"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("rsyslogd.err")).unwrap())
            .spawn()
            .expect("rsyslogd is required (run .ci/setup)");
        Rsyslog { child }
    }

    /// SIGTERM, as a service manager stops it, and wait for it to exit.
    pub fn stop(mut self) {
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

/// A collector ready to take messages: the running rsyslogd, its address, the CA that a node's
/// `[audit.syslog] ca` names, and the file it writes messages to.
pub struct Collector {
    pub rsyslog: Rsyslog,
    pub address: String,
    pub port: u16,
    pub ca: PathBuf,
    pub conf: PathBuf,
    pub out: PathBuf,
}

impl Collector {
    /// Writes the PKI and configuration under `dir`, starts rsyslogd and waits until it listens.
    pub fn start(dir: &Path) -> Collector {
        Self::start_niced(dir, None)
    }

    /// [`Collector::start`] with rsyslogd at `nice -n <n>` (see [`Rsyslog::start_niced`]);
    /// everything it writes (its work directory, the received messages) goes under `dir`.
    pub fn start_niced(dir: &Path, nice: Option<i32>) -> Collector {
        let ca = collector_pki(dir);
        let port = free_port();
        let out = dir.join("received.log");
        let conf = rsyslog_conf(dir, port, &out);
        let rsyslog = Rsyslog::start_niced(&conf, dir, nice);
        wait_for("rsyslog to listen", 10, dir, || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Collector {
            rsyslog,
            address: format!("127.0.0.1:{port}"),
            port,
            ca,
            conf,
            out,
        }
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits up to `secs` for `ok`; on timeout, fails with what rsyslogd wrote to stderr.
pub fn wait_for(what: &str, secs: u64, dir: &Path, mut ok: impl FnMut() -> bool) {
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

/// Writes a CA and a server certificate for `localhost` / 127.0.0.1 under `dir`; returns the
/// CA's PEM path.
pub fn collector_pki(dir: &Path) -> PathBuf {
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

/// An rsyslog configuration: TLS-only imtcp on `port`, every message written raw to `out`.
pub fn rsyslog_conf(dir: &Path, port: u16, out: &Path) -> PathBuf {
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

/// The `seq` of every message rsyslog wrote, in file order.
pub fn received(out: &Path) -> Vec<u64> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let i = l.find("seq=\"")? + 5;
            l[i..].split('"').next()?.parse().ok()
        })
        .collect()
}
