//! The DICOM edge against real DICOM software nobody here wrote (dcmtk `echoscu`, `storescu`,
//! `dcmdump`): the listener of hospital-a takes a study from a "modality", de-identifies it and
//! streams it to telerad-c; associations off the allow-list are rejected and audited; a node
//! killed in the middle of an ingest loses nothing it acknowledged and sends nothing twice; a
//! flow restricted to source AEs takes nothing from another device.
//!
//! Both sites run as `pacs-broker serve` processes (the durability test kills one with SIGKILL).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use pacs_broker::demo::{write_synthetic_ct, SyntheticPatient};

use common::sites::{Served, Sites, BROKER_AE};
use common::*;

fn dump(path: &Path) -> String {
    let (ok, out) = run_tool(
        "dcmdump",
        &[
            "-M",
            "+P",
            "0002,0010",
            "+P",
            "0010,0010",
            "+P",
            "0010,0020",
            "+P",
            "0020,000d",
            path.to_str().unwrap(),
        ],
    );
    assert!(ok, "dcmdump cannot read {}: {out}", path.display());
    out
}

fn pydicom_samples() -> PathBuf {
    let known = Path::new("/usr/lib/python3/dist-packages/pydicom/data/test_files");
    assert!(
        known.is_dir(),
        "python3-pydicom's sample files are required: run .ci/setup"
    );
    known.to_path_buf()
}

/// A study of `slices` synthetic CT instances (64x64) plus, relabelled into the same study and
/// patient, pydicom's JPEG baseline, JPEG 2000 and RLE samples (kept compressed).
fn mixed_study(dir: &Path, slices: usize) -> Vec<PathBuf> {
    use dicom_dictionary_std::tags;
    let patient = SyntheticPatient::default();
    let mut files = write_synthetic_ct(&dir.join("ct"), &patient, slices, 64).unwrap();
    let study_uid = dicom_object::open_file(&files[0])
        .unwrap()
        .element(tags::STUDY_INSTANCE_UID)
        .unwrap()
        .to_str()
        .unwrap()
        .trim_end_matches('\0')
        .to_string();
    for name in [
        "SC_rgb_jpeg_dcmtk.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_RLE.dcm",
    ] {
        let mut obj = dicom_object::open_file(pydicom_samples().join(name)).unwrap();
        obj.put_str(
            tags::STUDY_INSTANCE_UID,
            dicom_core::VR::UI,
            study_uid.as_str(),
        );
        obj.put_str(
            tags::PATIENT_NAME,
            dicom_core::VR::PN,
            patient.name.as_str(),
        );
        obj.put_str(tags::PATIENT_ID, dicom_core::VR::LO, patient.id.as_str());
        // Two of the samples share one SOP Instance UID; in one study each instance has its own.
        let uid = format!("2.25.{}", rand::random::<u64>());
        obj.put_str(tags::SOP_INSTANCE_UID, dicom_core::VR::UI, uid.as_str());
        obj.update_meta(|m| m.media_storage_sop_instance_uid = uid.clone());
        // The device states there is no burned-in text (else the burned-in gate holds it back).
        obj.put_str(tags::BURNED_IN_ANNOTATION, dicom_core::VR::CS, "NO");
        let out = dir.join(name);
        obj.write_to_file(&out).unwrap();
        files.push(out);
    }
    files
}

#[test]
fn echoscu_and_storescu_reach_the_partner_deidentified_and_strangers_are_rejected() {
    let sites = Sites::start(
        None,
        &[("MODALITY", "127.0.0.1"), ("REMOTE", "127.0.0.2")],
        Some("info"),
    );
    let port = sites.dicom_port.to_string();
    let (ok, out) = run_tool(
        "echoscu",
        &["-aet", "MODALITY", "-aec", BROKER_AE, "127.0.0.1", &port],
    );
    assert!(ok, "echoscu failed: {out}");

    let study = mixed_study(&sites.dir.path().join("study"), 6);
    let (ok, out) = sites.storescu("MODALITY", BROKER_AE, &study);
    assert!(ok, "storescu failed: {out}\n{}", sites.a.log());
    assert_eq!(
        out.matches("Received Store Response (Success)").count(),
        study.len(),
        "{out}"
    );
    let start = Instant::now();
    while sites.received().len() != study.len() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the study did not reach telerad-c ({} of {}):\n{}\n{}",
            sites.received().len(),
            study.len(),
            sites.a.log(),
            sites.c.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let received = sites.received();
    let mut syntaxes = Vec::new();
    for f in &received {
        let d = dump(f);
        assert!(
            !d.contains("DOE^JANE") && !d.contains("MRN-0042117"),
            "PHI left in {}: {d}",
            f.display()
        );
        syntaxes.push(d);
    }
    for ts in ["JPEGBaseline", "JPEG2000LosslessOnly", "RLELossless"] {
        assert!(
            syntaxes.iter().any(|d| d.contains(ts)),
            "no instance kept {ts}: {syntaxes:?}"
        );
    }
    // One study at the partner, told it is complete after the quiet time.
    let studies: std::collections::BTreeSet<_> = received
        .iter()
        .map(|f| f.parent().unwrap().to_path_buf())
        .collect();
    assert_eq!(studies.len(), 1, "{studies:?}");
    wait_for(
        "the partner to learn the study is complete",
        Duration::from_secs(20),
        || sites.c.audit().contains("study complete"),
    );

    // At most `max_associations` (4 here) at once: one more is rejected as transient.
    let held: Vec<_> = (0..4)
        .map(|_| {
            dicom_ul::ClientAssociationOptions::new()
                .with_abstract_syntax(dicom_dictionary_std::uids::VERIFICATION)
                .calling_ae_title("MODALITY")
                .called_ae_title(BROKER_AE)
                .establish(("127.0.0.1", sites.dicom_port))
                .expect("an association within the limit")
        })
        .collect();
    let (ok, out) = sites.storescu("MODALITY", BROKER_AE, &study[..1]);
    assert!(
        !ok && out.contains("Association Rejected") && out.contains("Local Limit Exceeded"),
        "{out}"
    );
    for a in held {
        a.release().unwrap();
    }
    assert!(sites
        .a
        .audit()
        .contains("associations in progress (the configured limit)"));

    // Off the allow-list: a stranger's AE title, an allowed AE title from another address, and
    // another called AE title. Each is rejected at association, audited, and nothing is stored.
    let ingested = |audit: &str| audit.matches("\"action\":\"ingest\"").count();
    let before = ingested(&sites.a.audit());
    let one = &study[..1];
    for (calling, called, reason) in [
        ("INTRUDER", BROKER_AE, "Calling AE Title Not Recognized"),
        ("REMOTE", BROKER_AE, "Calling AE Title Not Recognized"),
        ("MODALITY", "SOMEONE_ELSE", "Called AE Title Not Recognized"),
    ] {
        let (ok, out) = sites.storescu(calling, called, one);
        assert!(!ok, "{calling} -> {called} was accepted: {out}");
        assert!(
            out.contains("Association Rejected") && out.contains(reason),
            "{calling} -> {called}: {out}"
        );
    }
    let audit = sites.a.audit();
    assert_eq!(
        audit.matches("calling AE title not recognized").count(),
        2,
        "{audit}"
    );
    assert_eq!(
        audit.matches("called AE title not recognized").count(),
        1,
        "{audit}"
    );
    assert!(audit.contains("INTRUDER@127.0.0.1") && audit.contains("REMOTE@127.0.0.1"));
    assert_eq!(
        ingested(&audit),
        before,
        "a rejected association reached the pipeline"
    );
    let spool = sites.a.cfg.data_dir.join("ingest").join("spool");
    assert!(files_under(&spool).is_empty(), "spool files left behind");
    assert_eq!(sites.received().len(), study.len());
    // No PHI in the sender's log or audit.
    for text in [sites.a.log(), audit] {
        assert!(!text.contains("DOE^JANE") && !text.contains("MRN-0042117"));
    }
}

/// (file, acknowledged) per file storescu tried, from its verbose output.
fn acknowledged(out: &str) -> Vec<(String, bool)> {
    let mut seen: Vec<(String, bool)> = Vec::new();
    for line in out.lines() {
        if let Some(f) = line.split("Sending file: ").nth(1) {
            seen.push((f.trim().to_string(), false));
        } else if line.contains("Received Store Response (Success)") {
            if let Some(last) = seen.last_mut() {
                last.1 = true;
            }
        }
    }
    seen
}

#[test]
fn a_node_killed_mid_ingest_delivers_every_acknowledged_instance_exactly_once() {
    let mut sites = Sites::start(None, &[("MODALITY", "127.0.0.1")], Some("info"));
    let study = write_synthetic_ct(
        &sites.dir.path().join("study"),
        &SyntheticPatient::default(),
        200,
        64,
    )
    .unwrap();
    let port = sites.dicom_port.to_string();
    let mut args = vec![
        "-v".to_string(),
        "-aet".into(),
        "MODALITY".into(),
        "-aec".into(),
        BROKER_AE.into(),
        "127.0.0.1".into(),
        port.clone(),
    ];
    args.extend(study.iter().map(|f| f.display().to_string()));
    let storescu = Command::new("storescu")
        .args(&args)
        .env("TCP_NODELAY", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("storescu (dcmtk) is required");
    // Kill the origin with SIGKILL once part of the study is in (in its outbox, or, forwarded
    // from memory and confirmed, already at the partner with no outbox copy).
    wait_for("part of the ingest", Duration::from_secs(60), || {
        sites.outbox_instances() + sites.received().len() >= 60
    });
    sites.a.kill();
    let out = storescu.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let tried = acknowledged(&text);
    let acked = tried.iter().filter(|(_, a)| *a).count();
    assert!(
        (60..200).contains(&acked),
        "acknowledged {acked} of 200: {text}"
    );

    // Restart: what it acknowledged reaches the partner without storescu sending it again.
    let (config, cfg) = (sites.a.config.clone(), sites.a.cfg.clone());
    sites.a = Served::start(&config, &cfg, Some("info"));
    wait_for(
        "the acknowledged instances at telerad-c",
        Duration::from_secs(60),
        || sites.received().len() >= acked,
    );
    std::thread::sleep(Duration::from_secs(2));
    let after_restart = sites.received().len();
    assert!(
        after_restart <= acked + 1,
        "{after_restart} at the partner, {acked} acknowledged"
    );

    // The modality sends what was not acknowledged; everything is there once.
    let rest: Vec<PathBuf> = study
        .iter()
        .filter(|f| !tried.iter().any(|(t, a)| *a && Path::new(t) == f.as_path()))
        .cloned()
        .collect();
    let (ok, out) = sites.storescu("MODALITY", BROKER_AE, &rest);
    assert!(ok, "{out}");
    wait_for("all 200 at telerad-c", Duration::from_secs(60), || {
        sites.received().len() == 200
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(sites.received().len(), 200);
    // Each instance once: the inbox copy is the partner's one stored copy (no blob beside it).
    let blobs = files_under(&sites.c.cfg.data_dir.join("store").join("blobs")).len();
    assert_eq!(
        blobs, 0,
        "the partner holds {blobs} blobs beside its inbox copies"
    );
}

#[test]
fn a_flow_restricted_to_source_aes_takes_nothing_from_another_device() {
    let text = agreement_toml("active", "false").replace(
        "[flows.deid]",
        "[flows.select]\nsource_aes = [\"CT1\"]\n\n[flows.deid]",
    );
    let sites = Sites::start(
        Some(text),
        &[("MODALITY", "127.0.0.1"), ("CT1", "127.0.0.1")],
        Some("info"),
    );
    let study = write_synthetic_ct(
        &sites.dir.path().join("study"),
        &SyntheticPatient::default(),
        3,
        64,
    )
    .unwrap();
    let (_, out) = sites.storescu("MODALITY", BROKER_AE, &study);
    assert_eq!(
        out.matches("Received Store Response (Success)").count(),
        0,
        "{out}"
    );
    assert!(out.contains("Status: 0x124"), "{out}");
    assert_eq!(sites.outbox_instances(), 0);
    let audit = sites.a.audit();
    assert!(audit.contains("not covered by the flow"), "{audit}");
    assert!(audit.contains("source AEs"), "{audit}");
    // The device the flow names is taken.
    let (ok, out) = sites.storescu("CT1", BROKER_AE, &study);
    assert!(
        ok && out.matches("Received Store Response (Success)").count() == 3,
        "{out}"
    );
    wait_for("CT1's study at telerad-c", Duration::from_secs(30), || {
        sites.received().len() == 3
    });
}

#[test]
fn an_instance_quarantined_by_deidentification_is_held_for_review_and_not_sent() {
    use dicom_dictionary_std::tags;
    let sites = Sites::start(None, &[("MODALITY", "127.0.0.1")], Some("info"));
    let study = write_synthetic_ct(
        &sites.dir.path().join("study"),
        &SyntheticPatient::default(),
        2,
        64,
    )
    .unwrap();
    // The device says the second image has burned-in text: the flow's burned-in gate holds it.
    let mut obj = dicom_object::open_file(&study[1]).unwrap();
    obj.put_str(tags::BURNED_IN_ANNOTATION, dicom_core::VR::CS, "YES");
    obj.write_to_file(&study[1]).unwrap();

    let (_, out) = sites.storescu("MODALITY", BROKER_AE, &study[1..]);
    assert!(!out.contains("Received Store Response (Success)"), "{out}");
    // Cannot understand (0xC001: held back by de-identification), never success.
    assert!(
        out.contains("Received Store Response (Error: CannotUnderstand)"),
        "{out}"
    );

    // The original is in the quarantine, listed for the privacy officer, its source the AE.
    let list = Command::new(env!("CARGO_BIN_EXE_pacs-broker"))
        .args(["quarantine", "list", "--config"])
        .arg(&sites.a.config)
        .env("USER", "dpo-a")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&list.stdout).to_string();
    assert!(
        list.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let held: Vec<&str> = text.lines().filter(|l| l.starts_with('q')).collect();
    assert_eq!(held.len(), 1, "{text}");
    let id = held[0].split_whitespace().next().unwrap();
    assert!(text.contains("BurnedInAnnotation is YES"), "{text}");
    let item = sites.a.cfg.data_dir.join("quarantine").join(id);
    let record = std::fs::read_to_string(item.join("item.json")).unwrap();
    assert!(
        record.contains("\"source\": \"dicom:MODALITY\""),
        "{record}"
    );
    // The held bytes are the instance as the modality sent it (the spool file is gone), sealed
    // at rest: read through the node's quarantine.
    assert!(
        pacs_broker::store::sealed::AtRest::key_id_of(&item.join("input.dcm"))
            .unwrap()
            .is_some(),
        "the held original is not sealed"
    );
    let node = pacs_broker::node::Node::open(sites.a.cfg.clone()).unwrap();
    let view = node.quarantine().unwrap().input_view(id).unwrap();
    let input = dicom_object::open_file(view.path()).unwrap();
    assert_eq!(
        input
            .element(tags::PATIENT_ID)
            .unwrap()
            .to_str()
            .unwrap()
            .trim(),
        SyntheticPatient::default().id.trim()
    );
    let spool = sites.a.cfg.data_dir.join("ingest").join("spool");
    assert!(files_under(&spool).is_empty(), "spool files left behind");

    // Audited (no PHI), and nothing went to the partner.
    let audit = sites.a.audit();
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"action\":\"quarantine-hold\"") && l.contains(id)),
        "{audit}"
    );
    assert!(!audit.contains("DOE^JANE") && !audit.contains("MRN-0042117"));
    assert_eq!(sites.outbox_instances(), 0);

    // An image without burned-in text from the same association path still goes.
    let (ok, out) = sites.storescu("MODALITY", BROKER_AE, &study[..1]);
    assert!(ok, "{out}");
    wait_for(
        "the clean image at telerad-c",
        Duration::from_secs(30),
        || sites.received().len() == 1,
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        sites.received().len(),
        1,
        "the quarantined image reached the partner"
    );
}
