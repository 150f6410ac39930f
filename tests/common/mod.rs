//! Shared harness for multi-node tests: a fresh federation (own CA) in a temporary folder, site
//! nodes on loopback ports (in this process, or as `serve` processes: [`sites`]), a generated
//! study, free ports and waiting. `orthanc.rs` and `rsyslog.rs` stand alone (tests and the
//! benchmark include them by path) and keep their own small helpers.
#![allow(dead_code)]

pub mod sites;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use pacs_broker::config::{DicomAllow, DicomConfig, DicomRoute, NodeConfig, Peer, TlsPaths};
use pacs_broker::federation::pki;
use pacs_broker::node::Node;
use pacs_broker::pseudonym::SiteKeys;

pub const AGREEMENT: &str = "test-telerad";
pub const FLOW: &str = "ct-reads";

pub fn agreement_toml(status: &str, sender_status: &str) -> String {
    // sender_status: "false" (active) or "true" (suspended), as before.
    let sender_status = if sender_status == "true" {
        "suspended"
    } else {
        "active"
    };
    format!(
        r#"[agreement]
id = "{AGREEMENT}"
version = 1
title = "Test teleradiology agreement"
status = "{status}"
valid_from = 2020-01-01
valid_until = 2099-12-31
governing_law = "Test"

[[parties]]
site = "hospital-a"
organisation = "Hospital A"
privacy_officer = "DPO A"
privacy_contact = "dpo@a.example"
status = "{sender_status}"

[[parties]]
site = "telerad-c"
organisation = "Telerad C"
privacy_officer = "DPO C"
privacy_contact = "dpo@c.example"

[[parties]]
site = "hospital-b"
organisation = "Hospital B"
privacy_officer = "DPO B"
privacy_contact = "dpo@b.example"

[[flows]]
name = "{FLOW}"
from = "hospital-a"
to = "telerad-c"
purposes = ["treatment", "teleradiology-report"]

[flows.deid]
options = ["retain-longitudinal-modified-dates"]

[flows.retention]
days = 30
after = "delete"
"#
    )
}

/// A running test federation.
pub struct Federation {
    pub dir: tempfile::TempDir,
    pub nodes: BTreeMap<String, Arc<Node>>,
    pub addrs: BTreeMap<String, String>,
    stop: tokio::sync::watch::Sender<bool>,
    servers: Vec<tokio::task::JoinHandle<()>>,
}

impl Federation {
    /// Starts nodes for `sites` (all sharing one CA and the test agreement), each serving.
    pub async fn start(sites: &[&str]) -> Federation {
        Federation::start_with(sites, |_| {}).await
    }

    /// Like [`Federation::start`], with each site's config adjusted by `tune` before it opens.
    pub async fn start_with(sites: &[&str], tune: impl Fn(&mut NodeConfig)) -> Federation {
        let dir = tempfile::tempdir().unwrap();
        let all: Vec<String> = ["hospital-a", "hospital-b", "telerad-c"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        pki::generate_dev_federation(&dir.path().join("pki"), &all).unwrap();
        let mut listeners = BTreeMap::new();
        for s in sites {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            listeners.insert(s.to_string(), l);
        }
        let addrs: BTreeMap<String, String> = listeners
            .iter()
            .map(|(s, l)| (s.clone(), l.local_addr().unwrap().to_string()))
            .collect();
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let mut nodes = BTreeMap::new();
        let mut servers = Vec::new();
        for (site, listener) in listeners {
            let mut cfg = site_config(dir.path(), &site, &addrs);
            tune(&mut cfg);
            let node = Arc::new(Node::open(cfg).unwrap());
            let n = node.clone();
            let mut rx = stop_rx.clone();
            servers.push(tokio::spawn(async move {
                n.serve(listener, async move {
                    let _ = rx.wait_for(|s| *s).await;
                })
                .await
                .unwrap();
            }));
            nodes.insert(site, node);
        }
        Federation {
            dir,
            nodes,
            addrs,
            stop,
            servers,
        }
    }

    pub fn node(&self, site: &str) -> &Arc<Node> {
        &self.nodes[site]
    }

    pub fn pki(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    pub async fn stop(self) {
        self.stop_keeping_files().await;
    }

    /// Stops every node and hands back the federation's folder, to inspect it afterwards.
    pub async fn stop_keeping_files(self) -> tempfile::TempDir {
        let _ = self.stop.send(true);
        for s in self.servers {
            let _ = s.await;
        }
        drop(self.nodes);
        self.dir
    }
}

/// Lays out one site's folder and returns its config (also usable without serving).
pub fn site_config(base: &Path, site: &str, addrs: &BTreeMap<String, String>) -> NodeConfig {
    let dir = base.join(site);
    std::fs::create_dir_all(dir.join("agreements")).unwrap();
    let policy = dir.join("agreements").join("test.toml");
    std::fs::write(&policy, agreement_toml("active", "false")).unwrap();
    sign_by_all(base, &policy);
    let key = dir.join("site.key");
    if !key.exists() {
        SiteKeys::generate().write_new(&key).unwrap();
    }
    let pki = base.join("pki");
    NodeConfig {
        site_id: site.into(),
        listen: addrs
            .get(site)
            .cloned()
            .unwrap_or_else(|| "127.0.0.1:0".into()),
        data_dir: dir.join("data"),
        key_file: key,
        agreements: dir.join("agreements"),
        tls: TlsPaths {
            ca: pki.join("ca.pem"),
            cert: pki.join(format!("{site}.pem")),
            key: pki.join(format!("{site}.key")),
            crl: None,
        },
        peers: addrs
            .iter()
            .filter(|(s, _)| s.as_str() != site)
            .map(|(s, a)| {
                (
                    s.clone(),
                    Peer {
                        address: a.clone(),
                        server_name: Some("localhost".into()),
                    },
                )
            })
            .collect(),
        limits: Default::default(),
        dicom: None,
        audit: Default::default(),
        users: Vec::new(),
        storage: Default::default(),
    }
}

/// Signs a policy file with the keys of every test site (all parties sign).
pub fn sign_by_all(base: &Path, policy: &Path) {
    let pki = base.join("pki");
    for site in ["hospital-a", "hospital-b", "telerad-c"] {
        pacs_broker::dsa::sign::sign_file(
            policy,
            &pki.join(format!("{site}.pem")),
            &pki.join(format!("{site}.key")),
            time::OffsetDateTime::now_utc(),
        )
        .unwrap_or_else(|e| panic!("signing the test agreement as {site}: {e}"));
    }
}

/// A loopback port free at the moment of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until `ok` holds, checking every 50 ms; fails naming `what` after `limit`.
pub fn wait_for(what: &str, limit: std::time::Duration, mut ok: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Every file under a folder, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    if !dir.exists() {
        return Vec::new();
    }
    walkdir::WalkDir::new(dir)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .map(|e| e.into_path())
        .collect()
}

/// Runs a command and returns (success, stdout+stderr); panics with a clear message when the tool
/// is missing (the project's set-up installs it).
pub fn run_tool(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} is required for this test (run .ci/setup): {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// De-identified instances of a synthetic study under the test flow, as Hospital A's node would
/// make them (`n` CT slices of `size`²), each changed by `tweak` before it is written to `dir`;
/// returns the study token and the instances ready to offer.
pub fn prepared_study(
    node: &Node,
    dir: &Path,
    n: usize,
    size: u16,
    patient: &pacs_broker::demo::SyntheticPatient,
    tweak: impl Fn(&mut dicom_object::DefaultDicomObject),
) -> (
    String,
    Vec<pacs_broker::federation::client::OutgoingInstance>,
) {
    use sha2::{Digest, Sha256};
    std::fs::create_dir_all(dir).unwrap();
    let files = pacs_broker::demo::write_synthetic_ct(&dir.join("src"), patient, n, size).unwrap();
    let flow = node.agreements().agreements[AGREEMENT]
        .flow(FLOW)
        .unwrap()
        .clone();
    let deid =
        pacs_broker::deid::Deidentifier::new(flow.deid, node.keys.tokenizer(AGREEMENT).unwrap());
    let mut out = Vec::new();
    let mut study = String::new();
    for (i, f) in files.iter().enumerate() {
        let d = deid
            .deidentify(dicom_object::open_file(f).unwrap())
            .unwrap();
        let mut obj = d.object;
        tweak(&mut obj);
        let mut bytes = Vec::new();
        obj.write_all(&mut bytes).unwrap();
        let path = dir.join(format!("out{i}.dcm"));
        std::fs::write(&path, &bytes).unwrap();
        study = d.study_uid.clone();
        out.push(pacs_broker::federation::client::OutgoingInstance {
            path,
            sha256: Sha256::digest(&bytes).into(),
            size: bytes.len() as u64,
            sop_instance_uid: d.sop_instance_uid,
        });
    }
    (study, out)
}

/// A DICOM listener on loopback `port` with the called AE title `ae_title`, taking associations
/// from the `allowed` (AE title, address) pairs and routing what arrives to `agreement`'s `flow`
/// (a one-second study quiet time, so tests see studies complete quickly).
pub fn listener_config(
    port: u16,
    ae_title: &str,
    allowed: &[(&str, &str)],
    agreement: &str,
    flow: &str,
) -> DicomConfig {
    DicomConfig {
        listen: format!("127.0.0.1:{port}"),
        ae_title: ae_title.into(),
        allow: allowed
            .iter()
            .map(|(ae, ip)| DicomAllow {
                ae_title: ae.to_string(),
                address: ip.parse().expect("an IP address"),
            })
            .collect(),
        routes: vec![DicomRoute {
            agreement: agreement.into(),
            flow: flow.into(),
            calling_ae: None,
            called_ae: None,
            purpose: None,
        }],
        max_associations: 4,
        study_quiet_secs: 1,
        max_pdu: 65_536,
        idle_timeout_secs: 30,
        deliver: None,
    }
}
