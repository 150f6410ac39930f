//! Delivery to a real PACS: hospital-a sends a study to telerad-c, which forwards every received
//! instance by C-STORE to Debian's Orthanc; checked through Orthanc's REST API. telerad-c runs as
//! its own `pacs-broker serve` process, so it can be killed and restarted like a real node.

mod common;
#[path = "common/orthanc.rs"]
mod orthanc;

use std::collections::BTreeSet;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use orthanc::Orthanc;
use pacs_broker::config::{DeliverConfig, NodeConfig};
use pacs_broker::demo::{write_synthetic_ct, SyntheticPatient};
use pacs_broker::node::Node;

/// Compressed samples (Debian's python3-pydicom test files), sent as stored: RLE and JPEG 2000.
const COMPRESSED: &[(&str, &str)] = &[
    ("MR_small_RLE.dcm", "1.2.840.10008.1.2.5"),
    ("693_J2KI.dcm", "1.2.840.10008.1.2.4.91"),
];

/// The called AE title of hospital-a's DICOM listener.
const HOSPITAL_AE: &str = "HOSP_A_BROKER";

fn pydicom_test_files() -> PathBuf {
    let p = Path::new("/usr/lib/python3/dist-packages/pydicom/data/test_files");
    assert!(
        p.is_dir(),
        "python3-pydicom's test files are required (run .ci/setup)"
    );
    p.to_owned()
}

/// hospital-a (used in this process to `send`) and telerad-c (served by its own process) with
/// `[dicom.deliver]` pointing at the given PACS, retrying quickly.
pub struct Sites {
    pub dir: tempfile::TempDir,
    pub hospital: NodeConfig,
    pub telerad: NodeConfig,
    pub telerad_config: PathBuf,
}

impl Sites {
    pub fn new(pacs_ae: &str, pacs_address: &str) -> Sites {
        Sites::new_with(pacs_ae, pacs_address, |_| {})
    }

    /// As [`Sites::new`], with telerad-c's `[dicom.deliver]` adjusted.
    pub fn new_with(
        pacs_ae: &str,
        pacs_address: &str,
        adjust: impl FnOnce(&mut DeliverConfig),
    ) -> Sites {
        let dir = tempfile::tempdir().unwrap();
        let all: Vec<String> = ["hospital-a", "hospital-b", "telerad-c"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        pacs_broker::federation::pki::generate_dev_federation(&dir.path().join("pki"), &all)
            .unwrap();
        let mut addrs = std::collections::BTreeMap::new();
        addrs.insert(
            "telerad-c".to_string(),
            format!("127.0.0.1:{}", free_port()),
        );
        let hospital = site_config(dir.path(), "hospital-a", &addrs);
        let mut telerad = site_config(dir.path(), "telerad-c", &addrs);
        let mut deliver = DeliverConfig {
            retry_initial_ms: 200,
            retry_max_ms: 1_000,
            timeout_ms: 10_000,
            ..DeliverConfig::new(pacs_ae, pacs_address)
        };
        adjust(&mut deliver);
        telerad.dicom.get_or_insert_with(Default::default).deliver = Some(deliver);
        let telerad_config = dir.path().join("telerad-c").join("node.toml");
        std::fs::write(&telerad_config, telerad.to_toml()).unwrap();
        Sites {
            dir,
            hospital,
            telerad,
            telerad_config,
        }
    }

    /// Starts `pacs-broker serve` for telerad-c and waits until it listens.
    pub fn serve_telerad(&self) -> Served {
        self.serve("telerad-c", &self.telerad_config, &self.telerad.listen)
    }

    /// Starts `pacs-broker serve` for `site` with `config` and waits until `addr` accepts.
    pub fn serve(&self, site: &str, config: &Path, addr: &str) -> Served {
        let log = self.dir.path().join(format!("{site}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_pacs-broker"))
            .args(["--log", "pacs_broker=info", "serve", "--config"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let mut served = Served { child, log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(addr).is_err() {
            if let Some(s) = served.child.try_wait().unwrap() {
                panic!("{site} exited with {s}:\n{}", served.log());
            }
            assert!(
                Instant::now() < deadline,
                "{site} did not listen:\n{}",
                served.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        served
    }

    /// Starts hospital-a as `pacs-broker serve` with a DICOM listener (AE `HOSP_A_BROKER`,
    /// taking `MODALITY` from 127.0.0.1, routed to the test flow, a study complete after 1 s
    /// of quiet); returns the process and the listener's port.
    pub fn serve_hospital_listener(&self) -> (Served, u16) {
        let port = free_port();
        let mut cfg = self.hospital.clone();
        cfg.dicom = Some(common::listener_config(
            port,
            HOSPITAL_AE,
            &[("MODALITY", "127.0.0.1")],
            AGREEMENT,
            FLOW,
        ));
        let config = self.dir.path().join("hospital-a").join("node.toml");
        std::fs::write(&config, cfg.to_toml()).unwrap();
        let served = self.serve("hospital-a", &config, &format!("127.0.0.1:{port}"));
        (served, port)
    }

    /// A study of `slices` synthetic CT images plus the compressed samples; returns its folder
    /// and the identifying values of the originals (which must never reach the PACS).
    pub fn write_study(&self, slices: usize) -> (PathBuf, BTreeSet<String>) {
        use dicom_dictionary_std::tags;
        let study = self.dir.path().join("study");
        let mut files =
            write_synthetic_ct(&study, &SyntheticPatient::default(), slices, 64).unwrap();
        for (name, _) in COMPRESSED {
            let to = study.join(name);
            std::fs::copy(pydicom_test_files().join(name), &to).unwrap();
            files.push(to);
        }
        let mut originals = BTreeSet::new();
        for f in &files {
            let o = dicom_object::open_file(f).unwrap();
            for t in [
                tags::PATIENT_NAME,
                tags::PATIENT_ID,
                tags::STUDY_INSTANCE_UID,
                tags::SERIES_INSTANCE_UID,
                tags::SOP_INSTANCE_UID,
            ] {
                if let Some(v) = o.element(t).ok().and_then(|e| e.to_str().ok()) {
                    let v = v.trim_end_matches(['\0', ' ']).to_string();
                    if !v.is_empty() {
                        originals.insert(v);
                    }
                }
            }
        }
        (study, originals)
    }

    /// hospital-a de-identifies the study and sends it to telerad-c; returns the instances sent.
    pub async fn send(&self, study: &Path) -> usize {
        let node = Node::open(self.hospital.clone()).unwrap();
        let report = node
            .send(AGREEMENT, FLOW, None, &[study.to_owned()])
            .await
            .unwrap();
        assert!(
            report.held_back.is_empty() && report.queued.is_empty(),
            "held back: {:?} {:?}",
            report.held_back,
            report.queued
        );
        report.studies.iter().map(|s| s.instances).sum()
    }

    /// telerad-c's audit entries with action `deliver`: (object, outcome).
    pub fn deliveries_audited(&self) -> Vec<(String, String)> {
        let text =
            std::fs::read_to_string(self.telerad.data_dir.join("audit.log")).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["action"] == "deliver")
            .map(|v| {
                (
                    v["object"].as_str().unwrap_or_default().to_string(),
                    v["outcome"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    /// How many instances the audit log records as delivered to the PACS.
    pub fn instances_audited_delivered(&self) -> usize {
        self.deliveries_audited()
            .iter()
            .filter(|(_, outcome)| outcome.starts_with("ok"))
            .map(|(object, _)| {
                object
                    .split(": ")
                    .nth(1)
                    .and_then(|s| s.split(' ').next())
                    .and_then(|n| n.parse::<usize>().ok())
                    .unwrap_or_else(|| panic!("unexpected audit object {object:?}"))
            })
            .sum()
    }
}

/// A `pacs-broker serve` process, killed on drop.
pub struct Served {
    child: Child,
    log: PathBuf,
}

impl Served {
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no chance to finish anything.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for the graceful shutdown.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "telerad-c did not stop:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every instance in the PACS is de-identified: no original name, id or UID; tokens in place.
fn assert_deidentified_in_pacs(pacs: &Orthanc, ids: &[String], originals: &BTreeSet<String>) {
    for id in ids {
        let tags = pacs.instance_tags(id);
        for key in [
            "PatientName",
            "PatientID",
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "SOPInstanceUID",
        ] {
            let v = tags[key].as_str().unwrap_or_default().trim().to_string();
            assert!(
                !originals.contains(&v),
                "{key} of {id} is an original value"
            );
        }
        let patient_id = tags["PatientID"].as_str().unwrap_or_default();
        assert!(!patient_id.is_empty(), "no patient token in {id}");
        for key in ["StudyInstanceUID", "SOPInstanceUID"] {
            let uid = tags[key].as_str().unwrap_or_default();
            assert!(
                uid.starts_with("2.25."),
                "{key} of {id} is not a pseudonymous UID: {uid}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sent_study_reaches_the_partners_pacs_deidentified_and_as_stored() {
    let pacs = Orthanc::start();
    let sites = Sites::new(&pacs.aet, &pacs.dicom_address());
    let slices: usize = std::env::var("DELIVER_TEST_SLICES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    let (study, originals) = sites.write_study(slices);
    let telerad = sites.serve_telerad();

    let started = Instant::now();
    let sent = sites.send(&study).await;
    let received = started.elapsed();
    assert_eq!(sent, slices + COMPRESSED.len(), "every input was sent");
    let ids = pacs.wait_for_instances(sent, Duration::from_secs(60));
    let in_pacs = started.elapsed();
    assert_eq!(
        ids.len(),
        sent,
        "every instance reaches the PACS\ntelerad-c:\n{}\nOrthanc:\n{}",
        telerad.log(),
        pacs.log()
    );
    println!(
        "{sent} instances: send + receipt at telerad-c {} ms; all in Orthanc after {} ms",
        received.as_millis(),
        in_pacs.as_millis()
    );
    assert_deidentified_in_pacs(&pacs, &ids, &originals);

    // Compressed instances arrive in their own transfer syntax: sent as stored, not transcoded.
    let syntaxes: BTreeSet<String> = ids.iter().map(|id| pacs.transfer_syntax(id)).collect();
    for (name, ts) in COMPRESSED {
        assert!(
            syntaxes.contains(*ts),
            "{name} not delivered in {ts}: {syntaxes:?}"
        );
    }

    // Each delivery is audited (counts add up; the entry follows the PACS's response, so it
    // may land just after Orthanc lists the instance), and the audit log names no original value.
    let deadline = Instant::now() + Duration::from_secs(10);
    while sites.instances_audited_delivered() < sent {
        assert!(Instant::now() < deadline, "deliveries not audited");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(sites.instances_audited_delivered(), sent);
    let audit = std::fs::read_to_string(sites.telerad.data_dir.join("audit.log")).unwrap();
    for v in &originals {
        assert!(
            !audit.contains(v.as_str()),
            "the audit log names an original value"
        );
    }
    telerad.stop();

    // Nothing is left in the queue, and no plaintext copy remains after delivery: with a PACS
    // configured the PACS is the delivery, the inbox stays empty and the blobs kept for
    // deduplication and retention are sealed at rest.
    let store =
        pacs_broker::store::LocalStore::open(&sites.telerad.data_dir.join("store")).unwrap();
    assert!(store.delivery_queue().entries().unwrap().is_empty());
    assert!(
        files_under(&store.inbox()).is_empty(),
        "a plaintext inbox copy"
    );
    let blobs = files_under(&sites.telerad.data_dir.join("store").join("blobs"));
    assert_eq!(blobs.len(), sent);
    for f in blobs {
        assert!(
            pacs_broker::store::sealed::AtRest::key_id_of(&f)
                .unwrap()
                .is_some(),
            "{} is in plaintext",
            f.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_while_the_pacs_is_down_or_the_node_restarts() {
    let mut pacs = Orthanc::start();
    let sites = Sites::new(&pacs.aet, &pacs.dicom_address());
    let (study, originals) = sites.write_study(4);
    pacs.stop();
    let telerad = sites.serve_telerad();

    // The PACS is down while telerad-c receives: the study is acknowledged and queued.
    let sent = sites.send(&study).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sites
        .deliveries_audited()
        .iter()
        .any(|(_, outcome)| outcome.starts_with("queued for retry"))
    {
        assert!(
            Instant::now() < deadline,
            "no failed attempt audited:\n{}",
            telerad.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // telerad-c dies with a non-empty queue (SIGKILL) and comes back, the PACS still down.
    telerad.kill();
    let audited_before = sites.deliveries_audited().len();
    let telerad = sites.serve_telerad();
    let deadline = Instant::now() + Duration::from_secs(20);
    while sites.deliveries_audited().len() == audited_before {
        assert!(
            Instant::now() < deadline,
            "the restarted node did not retry:\n{}",
            telerad.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(sites.instances_audited_delivered(), 0);

    // The PACS comes back: everything is delivered, once each, and audited.
    pacs.restart();
    let back = Instant::now();
    let ids = pacs.wait_for_instances(sent, Duration::from_secs(30));
    assert_eq!(
        ids.len(),
        sent,
        "all delivered after the PACS came back\ntelerad-c:\n{}",
        telerad.log()
    );
    println!(
        "{sent} instances in Orthanc {} ms after it came back",
        back.elapsed().as_millis()
    );
    assert_deidentified_in_pacs(&pacs, &ids, &originals);
    let deadline = Instant::now() + Duration::from_secs(10);
    while sites.instances_audited_delivered() < sent {
        assert!(Instant::now() < deadline, "deliveries not audited");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(sites.instances_audited_delivered(), sent);
    telerad.stop();
    let store =
        pacs_broker::store::LocalStore::open(&sites.telerad.data_dir.join("store")).unwrap();
    assert!(store.delivery_queue().entries().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_whose_transfer_syntax_the_pacs_refuses_are_marked_failed_with_the_reason() {
    // A PACS that takes uncompressed data only: the compressed instances are not transcoded to
    // fit; they are refused, retried, then marked failed with a clear reason and kept.
    let pacs = Orthanc::start_with(serde_json::json!({
        "AcceptedTransferSyntaxes": ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"]
    }));
    let sites = Sites::new_with(&pacs.aet, &pacs.dicom_address(), |d| d.max_attempts = 2);
    let slices = 3;
    let (study, _) = sites.write_study(slices);
    let telerad = sites.serve_telerad();
    let sent = sites.send(&study).await;
    assert_eq!(sent, slices + COMPRESSED.len());

    let failed = || {
        sites
            .deliveries_audited()
            .into_iter()
            .filter(|(_, outcome)| outcome.starts_with("failed after 2 attempts"))
            .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while failed().len() < COMPRESSED.len() {
        assert!(
            Instant::now() < deadline,
            "not marked failed:\n{}",
            telerad.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        pacs.wait_for_instances(slices, Duration::from_secs(10))
            .len(),
        slices
    );
    for (_, ts) in COMPRESSED {
        assert!(
            failed().iter().any(|(_, outcome)| outcome
                .contains("refused the presentation context")
                && outcome.contains(ts)),
            "no clear reason for {ts}: {:?}",
            failed()
        );
    }
    assert_eq!(sites.instances_audited_delivered(), slices);
    telerad.stop();

    // They stay in the queue, marked failed, with the reason, for an operator.
    let store =
        pacs_broker::store::LocalStore::open(&sites.telerad.data_dir.join("store")).unwrap();
    let left = store.delivery_queue().entries().unwrap();
    assert_eq!(left.len(), COMPRESSED.len());
    for (_, e) in left {
        assert_eq!(e.state, pacs_broker::store::delivery::DeliveryState::Failed);
        assert_eq!(e.attempts, 2);
        assert!(e.last_error.unwrap().contains("never transcoded"));
    }
}

/// A storescu association profile proposing, for the test study's SOP classes, the uncompressed
/// syntaxes and the compressed ones its samples are stored in (storescu alone would decompress).
const STORESCU_PROFILE: &str = r"
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LittleEndianExplicit
TransferSyntax2 = LittleEndianImplicit
[JPEG2000]
TransferSyntax1 = JPEG2000
[RLE]
TransferSyntax1 = RLELossless

[[PresentationContexts]]
[Study]
PresentationContext1 = CTImageStorage\Uncompressed
PresentationContext2 = CTImageStorage\JPEG2000
PresentationContext3 = MRImageStorage\Uncompressed
PresentationContext4 = MRImageStorage\RLE

[[Profiles]]
[Study]
PresentationContexts = Study
";

#[test]
fn a_study_pushed_by_storescu_travels_through_both_nodes_into_the_pacs_deidentified() {
    let pacs = Orthanc::start();
    let sites = Sites::new(&pacs.aet, &pacs.dicom_address());
    let (study, originals) = sites.write_study(6);
    let files = files_under(&study);
    let telerad = sites.serve_telerad();
    let (hospital, port) = sites.serve_hospital_listener();

    // A "modality" pushes the study into hospital-a's listener, compressed files as stored.
    let profile = sites.dir.path().join("storescu.cfg");
    std::fs::write(&profile, STORESCU_PROFILE).unwrap();
    let started = Instant::now();
    let out = Command::new("storescu")
        .arg("-v")
        .arg("-xf")
        .arg(&profile)
        .args([
            "Study",
            "-aet",
            "MODALITY",
            "-aec",
            HOSPITAL_AE,
            "127.0.0.1",
        ])
        .arg(port.to_string())
        .args(&files)
        .env("TCP_NODELAY", "1")
        .output()
        .expect("storescu (dcmtk) is required: run .ci/setup");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "storescu failed: {text}\n{}",
        hospital.log()
    );
    assert_eq!(
        text.matches("Received Store Response (Success)").count(),
        files.len(),
        "{text}\n{}",
        hospital.log()
    );

    // hospital-a forwards to telerad-c, which delivers every instance to Orthanc.
    let ids = pacs.wait_for_instances(files.len(), Duration::from_secs(60));
    assert_eq!(
        ids.len(),
        files.len(),
        "every instance reaches the PACS\nhospital-a:\n{}\ntelerad-c:\n{}",
        hospital.log(),
        telerad.log()
    );
    println!(
        "{} instances: storescu -> hospital-a -> telerad-c -> Orthanc in {} ms",
        files.len(),
        started.elapsed().as_millis()
    );
    assert_deidentified_in_pacs(&pacs, &ids, &originals);
    let syntaxes: BTreeSet<String> = ids.iter().map(|id| pacs.transfer_syntax(id)).collect();
    for (name, ts) in COMPRESSED {
        assert!(
            syntaxes.contains(*ts),
            "{name} not delivered in {ts}: {syntaxes:?}"
        );
    }

    // Audited at both nodes: hospital-a took every instance from the modality and disclosed
    // the study to telerad-c; telerad-c delivered every instance to its PACS.
    let deadline = Instant::now() + Duration::from_secs(20);
    while sites.instances_audited_delivered() < files.len() {
        assert!(Instant::now() < deadline, "deliveries not audited");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(sites.instances_audited_delivered(), files.len());
    let hospital_audit = || -> (String, Vec<serde_json::Value>) {
        let text =
            std::fs::read_to_string(sites.hospital.data_dir.join("audit.log")).unwrap_or_default();
        let entries = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        (text, entries)
    };
    // The association's entry is written once storescu releases it: wait for it.
    let association = format!(
        "association: {n} instances received, {n} stored",
        n = files.len()
    );
    let ingest_audited = |entries: &[serde_json::Value]| {
        entries.iter().any(|e| {
            e["action"] == "ingest"
                && e["object"].as_str() == Some(association.as_str())
                && e["outcome"] == "ok"
                && e["actor"]
                    .as_str()
                    .is_some_and(|a| a.starts_with("dicom:MODALITY@"))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let (audit_a, entries) = loop {
        let (text, entries) = hospital_audit();
        if ingest_audited(&entries) {
            break (text, entries);
        }
        assert!(
            Instant::now() < deadline,
            "the ingest is not audited:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        entries.iter().any(|e| e["action"] == "disclose"
            && e["agreement"] == AGREEMENT
            && e["object"]
                .as_str()
                .is_some_and(|o| o.ends_with("to site:telerad-c"))),
        "no disclosure to telerad-c audited at hospital-a:\n{audit_a}"
    );
    let audit_c = std::fs::read_to_string(sites.telerad.data_dir.join("audit.log")).unwrap();
    for (site, text) in [("hospital-a", &audit_a), ("telerad-c", &audit_c)] {
        for v in &originals {
            assert!(
                !text.contains(v.as_str()),
                "the audit log of {site} names an original value"
            );
        }
    }
    hospital.stop();
    telerad.stop();
}
