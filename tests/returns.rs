//! The return path (issue 12, tests 1 and 2): hospital-a sends a CT to telerad-c; telerad-c's
//! reporting system returns an SR on it — by `pacs-broker return` and by DICOM C-STORE (dcmtk
//! `storescu`) at telerad-c's listener — and hospital-a files it under the original patient, with
//! its references pointing at the original instances (checked with dcmtk `dcmdump` and pydicom).
//! telerad-c cannot return a result on a study it never received, nor under an agreement without
//! returns, nor after the origin shredded the agreement's vault; and no call of any RPC, with any
//! token telerad-c holds, gives it an original value (responses, statuses, logs, audit).

mod common;
#[path = "common/orthanc.rs"]
mod orthanc;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::*;
use dicom_core::value::DataSetSequence;
use dicom_core::{DataElement, Length, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::mem::InMemDicomObject;
use dicom_object::meta::FileMetaTableBuilder;
use pacs_broker::config::{DeliverConfig, DicomAllow, DicomConfig, NodeConfig};
use pacs_broker::demo::SyntheticPatient;
use pacs_broker::federation::client::PeerClient;
use pacs_broker::federation::proto::{
    HelloRequest, InstanceManifest, OfferRequest, ResultChunk, ResultHeader, TransferChunk,
};
use pacs_broker::node::{Node, ReturnOutcome};
use sha2::{Digest, Sha256};

/// The agreement whose flow lets results return (the harness's `test-telerad` does not).
const RETURNS: &str = "test-returns";
const TELERAD_AE: &str = "TELERAD_C";
const RIS_AE: &str = "TELERAD_RIS";

fn returns_agreement() -> String {
    format!(
        "{}\n[flows.results]\nreturn_to_origin = true\nreidentify_by = [\"radiologist on duty at Hospital A\"]\n",
        agreement_toml("active", "false").replace(AGREEMENT, RETURNS)
    )
}

/// Everything the test process logs (both nodes run in it), to check for original values.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let w = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("pacs_broker=debug")
            .with_ansi(false)
            .with_writer(move || SharedWriter(w.clone()))
            .try_init();
        buf
    })
    .clone()
}

struct SharedWriter(Arc<Mutex<Vec<u8>>>);

impl Write for SharedWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// hospital-a and telerad-c, both agreements signed; telerad-c listens for DICOM (its RIS may
/// associate; no routes: it takes only results).
async fn start() -> (Federation, u16) {
    start_with_pacs(None).await
}

/// As [`start`], with hospital-a delivering to the PACS at `pacs` (AE `ORTHANC`) when given
/// (and then without telerad-c's DICOM listener: that test does not use it).
async fn start_with_pacs(pacs: Option<String>) -> (Federation, u16) {
    let listen = pacs.is_none();
    let port = free_port();
    let fed = Federation::start_with(&["hospital-a", "telerad-c"], move |cfg: &mut NodeConfig| {
        let policy = cfg.agreements.join("returns.toml");
        std::fs::write(&policy, returns_agreement()).unwrap();
        sign_by_all(cfg.agreements.parent().unwrap().parent().unwrap(), &policy);
        if let (Some(pacs), "hospital-a") = (&pacs, cfg.site_id.as_str()) {
            cfg.dicom = Some(DicomConfig {
                deliver: Some(DeliverConfig {
                    retry_initial_ms: 200,
                    ..DeliverConfig::new("ORTHANC", pacs)
                }),
                ..DicomConfig::default()
            });
        }
        if cfg.site_id == "telerad-c" && listen {
            cfg.dicom = Some(DicomConfig {
                listen: format!("127.0.0.1:{port}"),
                ae_title: TELERAD_AE.into(),
                allow: vec![DicomAllow {
                    ae_title: RIS_AE.into(),
                    address: "127.0.0.1".parse().unwrap(),
                }],
                study_quiet_secs: 1,
                ..DicomConfig::default()
            });
        }
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while listen && std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "telerad-c's DICOM listener");
        std::thread::sleep(Duration::from_millis(50));
    }
    (fed, port)
}

/// The original study as hospital-a has it.
struct Original {
    files: Vec<PathBuf>,
    patient: SyntheticPatient,
    study_uid: String,
    series_uid: String,
    sop_uids: Vec<String>,
    /// Every identifying value of the original (none may reach telerad-c).
    values: Vec<String>,
}

fn text(o: &InMemDicomObject, tag: Tag) -> String {
    o.get(tag)
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_matches(['\0', ' ']).to_string())
        .unwrap_or_default()
}

fn original_study(dir: &Path) -> Original {
    let patient = SyntheticPatient::default();
    let files = pacs_broker::demo::write_synthetic_ct(&dir.join("ct"), &patient, 3, 32).unwrap();
    let objs: Vec<_> = files
        .iter()
        .map(|f| dicom_object::open_file(f).unwrap())
        .collect();
    let study_uid = text(&objs[0], tags::STUDY_INSTANCE_UID);
    let series_uid = text(&objs[0], tags::SERIES_INSTANCE_UID);
    let sop_uids: Vec<String> = objs
        .iter()
        .map(|o| text(o, tags::SOP_INSTANCE_UID))
        .collect();
    let mut values = vec![
        patient.name.clone(),
        patient.name.replace('^', " "),
        patient.id.clone(),
        patient.birth_date.clone(),
        patient.accession.clone(),
        study_uid.clone(),
        series_uid.clone(),
        text(&objs[0], tags::FRAME_OF_REFERENCE_UID),
    ];
    values.extend(sop_uids.iter().cloned());
    Original {
        files,
        patient,
        study_uid,
        series_uid,
        sop_uids,
        values,
    }
}

/// The instances telerad-c received under `agreement` (its inbox).
fn received(fed: &Federation, agreement: &str) -> Vec<InMemDicomObject> {
    let inbox = fed
        .node("telerad-c")
        .config
        .data_dir
        .join("store")
        .join("inbox")
        .join(agreement);
    let mut out: Vec<InMemDicomObject> = files_under(&inbox)
        .iter()
        .map(|f| dicom_object::open_file(f).unwrap().into_inner())
        .collect();
    out.sort_by_key(|o| text(o, tags::SOP_INSTANCE_UID));
    out
}

fn random_uid() -> String {
    format!("2.25.{}", u128::from_be_bytes(rand::random::<[u8; 16]>()))
}

fn seq(tag: Tag, items: Vec<InMemDicomObject>) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, VR::SQ, DataSetSequence::new(items, Length::UNDEFINED))
}

fn el(tag: Tag, vr: VR, v: &str) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, PrimitiveValue::from(v))
}

fn code(value: &str, scheme: &str, meaning: &str) -> InMemDicomObject {
    InMemDicomObject::from_element_iter([
        el(tags::CODE_VALUE, VR::SH, value),
        el(tags::CODING_SCHEME_DESIGNATOR, VR::SH, scheme),
        el(tags::CODE_MEANING, VR::LO, meaning),
    ])
}

/// A Basic Text SR report on the received instances, as telerad-c's reporting system makes it:
/// the study's tokens, its own new series and instance UIDs, today's content date, and an
/// evidence sequence referencing every received instance.
fn report(received: &[InMemDicomObject], sop: &str, path: &Path) -> PathBuf {
    let first = &received[0];
    let mut by_series: std::collections::BTreeMap<String, Vec<&InMemDicomObject>> =
        Default::default();
    for r in received {
        by_series
            .entry(text(r, tags::SERIES_INSTANCE_UID))
            .or_default()
            .push(r);
    }
    let series_items = by_series
        .iter()
        .map(|(series, insts)| {
            let refs = insts
                .iter()
                .map(|i| {
                    InMemDicomObject::from_element_iter([
                        el(
                            tags::REFERENCED_SOP_CLASS_UID,
                            VR::UI,
                            &text(i, tags::SOP_CLASS_UID),
                        ),
                        el(
                            tags::REFERENCED_SOP_INSTANCE_UID,
                            VR::UI,
                            &text(i, tags::SOP_INSTANCE_UID),
                        ),
                    ])
                })
                .collect();
            InMemDicomObject::from_element_iter([
                el(tags::SERIES_INSTANCE_UID, VR::UI, series),
                seq(tags::REFERENCED_SOP_SEQUENCE, refs),
            ])
        })
        .collect();
    let evidence = InMemDicomObject::from_element_iter([
        el(
            tags::STUDY_INSTANCE_UID,
            VR::UI,
            &text(first, tags::STUDY_INSTANCE_UID),
        ),
        seq(tags::REFERENCED_SERIES_SEQUENCE, series_items),
    ]);
    let finding = InMemDicomObject::from_element_iter([
        el(tags::RELATIONSHIP_TYPE, VR::CS, "CONTAINS"),
        el(tags::VALUE_TYPE, VR::CS, "TEXT"),
        seq(
            tags::CONCEPT_NAME_CODE_SEQUENCE,
            vec![code("121071", "DCM", "Finding")],
        ),
        el(
            tags::TEXT_VALUE,
            VR::UT,
            "No acute intracranial abnormality.",
        ),
    ]);
    let sop_class = "1.2.840.10008.5.1.4.1.1.88.11"; // Basic Text SR
    let obj = InMemDicomObject::from_element_iter([
        el(tags::SOP_CLASS_UID, VR::UI, sop_class),
        el(tags::SOP_INSTANCE_UID, VR::UI, sop),
        el(tags::STUDY_DATE, VR::DA, &text(first, tags::STUDY_DATE)),
        el(tags::CONTENT_DATE, VR::DA, "20261202"),
        el(tags::CONTENT_TIME, VR::TM, "081500"),
        el(tags::MODALITY, VR::CS, "SR"),
        el(tags::PATIENT_NAME, VR::PN, &text(first, tags::PATIENT_NAME)),
        el(tags::PATIENT_ID, VR::LO, &text(first, tags::PATIENT_ID)),
        el(
            tags::STUDY_INSTANCE_UID,
            VR::UI,
            &text(first, tags::STUDY_INSTANCE_UID),
        ),
        el(tags::SERIES_INSTANCE_UID, VR::UI, &random_uid()),
        el(tags::SERIES_NUMBER, VR::IS, "900"),
        el(tags::INSTANCE_NUMBER, VR::IS, "1"),
        el(tags::MANUFACTURER, VR::LO, "Telerad C RIS"),
        el(tags::VALUE_TYPE, VR::CS, "CONTAINER"),
        seq(
            tags::CONCEPT_NAME_CODE_SEQUENCE,
            vec![code("18748-4", "LN", "Diagnostic Imaging Report")],
        ),
        el(tags::CONTINUITY_OF_CONTENT, VR::CS, "SEPARATE"),
        el(tags::COMPLETION_FLAG, VR::CS, "COMPLETE"),
        el(tags::VERIFICATION_FLAG, VR::CS, "UNVERIFIED"),
        seq(
            tags::CURRENT_REQUESTED_PROCEDURE_EVIDENCE_SEQUENCE,
            vec![evidence],
        ),
        seq(tags::CONTENT_SEQUENCE, vec![finding]),
    ]);
    let file = obj
        .with_meta(
            FileMetaTableBuilder::new()
                .transfer_syntax("1.2.840.10008.1.2.1")
                .media_storage_sop_class_uid(sop_class)
                .media_storage_sop_instance_uid(sop),
        )
        .unwrap();
    file.write_to_file(path).unwrap();
    path.to_path_buf()
}

/// The re-identified results hospital-a filed in its results folder.
/// The results filed at hospital-a (not a file being written under a temporary name).
fn filed_results(fed: &Federation) -> Vec<PathBuf> {
    files_under(
        &fed.node("hospital-a")
            .config
            .data_dir
            .join("results")
            .join(RETURNS),
    )
    .into_iter()
    .filter(|p| {
        p.extension().is_some_and(|e| e == "dcm")
            && !p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
    })
    .collect()
}

fn wait_for_results(fed: &Federation, n: usize) -> Vec<PathBuf> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let f = filed_results(fed);
        if f.len() >= n {
            return f;
        }
        assert!(
            Instant::now() < deadline,
            "hospital-a filed {} of {n} results",
            f.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Checks a filed result with dcmdump and pydicom: the original patient and study, references
/// pointing at the original instances, the report's own UID kept, no token left.
fn assert_reidentified(path: &Path, orig: &Original, sop: &str, tokens: &[String]) {
    let (ok, dump) = run_tool("dcmdump", &[path.to_str().unwrap()]);
    assert!(ok, "dcmdump cannot read the filed result: {dump}");
    for want in [
        orig.patient.name.as_str(),
        orig.patient.id.as_str(),
        orig.patient.birth_date.as_str(),
        orig.study_uid.as_str(),
        orig.series_uid.as_str(),
        "20261102", // the original study date, shifted back
        "20261202", // the report's own content date, kept
        sop,
    ] {
        assert!(dump.contains(want), "dcmdump shows no `{want}`:\n{dump}");
    }
    for uid in &orig.sop_uids {
        assert!(
            dump.contains(uid.as_str()),
            "reference to original instance {uid} missing:\n{dump}"
        );
    }
    for t in tokens {
        assert!(
            !dump.contains(t.as_str()),
            "token `{t}` left in the filed result:\n{dump}"
        );
    }
    assert!(!dump.contains("PatientIdentityRemoved"), "{dump}");
    let script = r#"
import sys, pydicom
d = pydicom.dcmread(sys.argv[1])
ev = d.CurrentRequestedProcedureEvidenceSequence[0]
refs = [r.ReferencedSOPInstanceUID for s in ev.ReferencedSeriesSequence for r in s.ReferencedSOPSequence]
print(d.PatientName, d.PatientID, d.PatientBirthDate, d.StudyInstanceUID, d.SOPInstanceUID, d.StudyDate)
print(ev.StudyInstanceUID)
print(" ".join(sorted(refs)))
"#;
    let (ok, out) = run_tool("/usr/bin/python3", &["-c", script, path.to_str().unwrap()]);
    assert!(ok, "pydicom cannot read the filed result: {out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        format!(
            "{} {} {} {} {sop} 20261102",
            orig.patient.name, orig.patient.id, orig.patient.birth_date, orig.study_uid
        )
    );
    assert_eq!(lines[1], orig.study_uid);
    let mut want = orig.sop_uids.clone();
    want.sort();
    assert_eq!(lines[2], want.join(" "));
}

fn cli(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pacs-broker"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn config_file(node: &Node, dir: &Path) -> PathBuf {
    let path = dir.join(format!("{}.toml", node.site_id()));
    std::fs::write(&path, node.config.to_toml()).unwrap();
    path
}

fn storescu(port: u16, file: &Path) -> (bool, String) {
    let out = std::process::Command::new("storescu")
        .env("TCP_NODELAY", "1")
        .args(["-v", "-aet", RIS_AE, "-aec", TELERAD_AE, "127.0.0.1"])
        .arg(port.to_string())
        .arg(file)
        .output()
        .expect("storescu (dcmtk) is required: run .ci/setup");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn audit_of(node: &Node) -> String {
    std::fs::read_to_string(node.config.data_dir.join("audit.log")).unwrap()
}

/// Test 1: a CT goes out, the SR comes home by `return` and by DIMSE, filed under the patient.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_report_comes_home_reidentified_by_return_and_by_dimse() {
    let logs = captured_logs();
    let (fed, port) = start().await;
    let work = tempfile::tempdir().unwrap();
    let orig = original_study(work.path());
    let a = fed.node("hospital-a");
    let sent = a.send(RETURNS, FLOW, None, &orig.files).await.unwrap();
    assert_eq!(sent.studies.len(), 1, "{sent:?}");
    let got = received(&fed, RETURNS);
    assert_eq!(got.len(), 3);
    let tokens: Vec<String> = [
        tags::PATIENT_ID,
        tags::STUDY_INSTANCE_UID,
        tags::SERIES_INSTANCE_UID,
    ]
    .iter()
    .map(|t| text(&got[0], *t))
    .chain(got.iter().map(|o| text(o, tags::SOP_INSTANCE_UID)))
    .collect();

    // By `pacs-broker return`, beside telerad-c's running node (which holds its store).
    let sop1 = random_uid();
    let sr1 = report(&got, &sop1, &work.path().join("report1.dcm"));
    let config = config_file(fed.node("telerad-c"), work.path());
    let (code, out) = cli(&[
        "return",
        "--config",
        config.to_str().unwrap(),
        "--agreement",
        RETURNS,
        sr1.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("returned") && out.contains("hospital-a"),
        "{out}"
    );
    let filed = wait_for_results(&fed, 1);
    assert_reidentified(&filed[0], &orig, &sop1, &tokens);
    // A resend is answered without filing it twice.
    let (code, out) = cli(&[
        "return",
        "--config",
        config.to_str().unwrap(),
        "--agreement",
        RETURNS,
        sr1.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}");

    // The site took the study out of its inbox (into its PACS): with encryption at rest the
    // inbox copy was the one stored copy. A report on it still goes home: the receiver noted
    // the study's patient token as it checked the instances.
    let store_c = fed.node("telerad-c").config.data_dir.join("store");
    for f in files_under(&store_c.join("inbox").join(RETURNS)) {
        std::fs::remove_file(f).unwrap();
    }
    assert!(files_under(&store_c.join("blobs")).is_empty());

    // By DIMSE: the RIS C-STOREs its report to telerad-c's listener, which sends it home.
    let sop2 = random_uid();
    let sr2 = report(&got, &sop2, &work.path().join("report2.dcm"));
    let (ok, out) = storescu(port, &sr2);
    assert!(ok && !out.contains("Error"), "storescu: {out}");
    let filed = wait_for_results(&fed, 2);
    let second = filed
        .iter()
        .find(|p| p.to_string_lossy().contains(&sop2))
        .unwrap();
    assert_reidentified(second, &orig, &sop2, &tokens);
    assert_eq!(
        filed_results(&fed).len(),
        2,
        "the resend was not filed twice"
    );

    // Audited at both ends; no original value in either audit log or any log line.
    let (audit_a, audit_c) = (audit_of(a), audit_of(fed.node("telerad-c")));
    // Two results taken; the resend was answered by telerad-c's own record (returned already).
    assert_eq!(
        audit_a.matches("\"return-receive\"").count(),
        2,
        "{audit_a}"
    );
    assert!(audit_a.contains("re-identified"), "{audit_a}");
    assert!(
        audit_c.contains("\"return\"") && audit_c.contains("queued to go home"),
        "{audit_c}"
    );
    let logged = String::from_utf8_lossy(&logs.lock().unwrap()).to_string();
    for v in &orig.values {
        assert!(
            !audit_a.contains(v.as_str()),
            "hospital-a's audit holds `{v}`"
        );
        assert!(
            !audit_c.contains(v.as_str()),
            "telerad-c's audit holds `{v}`"
        );
        assert!(!logged.contains(v.as_str()), "a log line holds `{v}`");
    }
    // The partner keeps no copy of what went home.
    let left: Vec<_> = files_under(&fed.node("telerad-c").config.data_dir.join("returns"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    fed.stop().await;
}

/// Every status, response and log of a call, to search for original values.
struct Seen(Vec<String>);

impl Seen {
    fn status(&mut self, r: Result<impl std::fmt::Debug, tonic::Status>) -> Option<tonic::Status> {
        match r {
            Ok(v) => {
                self.0.push(format!("{v:?}"));
                None
            }
            Err(s) => {
                self.0.push(format!("{s:?}"));
                Some(s)
            }
        }
    }
}

fn result_chunks(agreement: &str, study: &str, sop: &str, bytes: Vec<u8>) -> Vec<ResultChunk> {
    vec![ResultChunk {
        header: Some(ResultHeader {
            agreement_id: agreement.into(),
            study_token: study.into(),
            sop_instance_uid: sop.into(),
            sha256: Sha256::digest(&bytes).to_vec(),
            size: bytes.len() as u64,
            audit_checkpoint: Vec::new(),
        }),
        data: bytes,
    }]
}

/// Test 2: no study never received, no agreement without returns, nothing after a shred; no
/// call with any token telerad-c holds yields an original value.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partner_cannot_return_what_it_never_received_and_learns_nothing() {
    let logs = captured_logs();
    let (fed, port) = start().await;
    let work = tempfile::tempdir().unwrap();
    let orig = original_study(work.path());
    let (a, c) = (fed.node("hospital-a"), fed.node("telerad-c"));
    a.send(RETURNS, FLOW, None, &orig.files).await.unwrap();
    a.send(AGREEMENT, FLOW, None, &orig.files).await.unwrap();
    let got = received(&fed, RETURNS);
    let without_returns = received(&fed, AGREEMENT);

    // A study telerad-c never received: refused at telerad-c, by `return` and by DIMSE.
    let mut stranger = got.clone();
    for o in &mut stranger {
        o.put(el(tags::STUDY_INSTANCE_UID, VR::UI, "2.25.1234567890"));
    }
    let foreign = report(&stranger, &random_uid(), &work.path().join("foreign.dcm"));
    let r = c
        .return_results(RETURNS, std::slice::from_ref(&foreign))
        .await
        .unwrap();
    match &r.outcomes[0].1 {
        ReturnOutcome::Refused { reason } => assert!(reason.contains("never received"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let (_, out) = storescu(port, &foreign);
    // Refused: not authorised (0x0124); the Error Comment says why, and the audit has it.
    assert!(out.contains("Status: 0x124"), "storescu: {out}");

    // Under the agreement whose flow allows no returns: refused before anything is read.
    let on_plain = report(
        &without_returns,
        &random_uid(),
        &work.path().join("plain.dcm"),
    );
    let e = c
        .return_results(AGREEMENT, std::slice::from_ref(&on_plain))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("lets results return"), "{e}");
    // By DIMSE too: telerad-c's listener recognises the study, and refuses the result.
    let (_, out) = storescu(port, &on_plain);
    assert!(out.contains("Status: 0x124"), "storescu: {out}");
    assert!(
        audit_of(c).contains("does not let results return to the origin"),
        "{}",
        audit_of(c)
    );
    // The origin refuses it too when a partner tries it at the protocol level (below).

    // Every RPC, with every token telerad-c holds, from telerad-c's own certificate.
    let mut tokens: BTreeSet<String> = BTreeSet::new();
    for o in got.iter().chain(&without_returns) {
        for t in [
            tags::PATIENT_ID,
            tags::PATIENT_NAME,
            tags::STUDY_INSTANCE_UID,
            tags::SERIES_INSTANCE_UID,
            tags::SOP_INSTANCE_UID,
            tags::FRAME_OF_REFERENCE_UID,
            tags::ACCESSION_NUMBER,
            tags::STUDY_ID,
        ] {
            let v = text(o, t);
            if !v.is_empty() {
                tokens.insert(v);
            }
        }
    }
    let mut client =
        PeerClient::connect(&c.tls, "hospital-a", &fed.addrs["hospital-a"], "localhost")
            .await
            .unwrap();
    let mut seen = Seen(Vec::new());
    seen.status(client.raw().hello(HelloRequest {}).await);
    for token in &tokens {
        let uid_like = if token.starts_with("2.25.") {
            token.clone()
        } else {
            random_uid()
        };
        for agreement in [RETURNS, AGREEMENT] {
            seen.status(
                client
                    .raw()
                    .offer(OfferRequest {
                        agreement_id: agreement.into(),
                        flow: FLOW.into(),
                        study_token: token.clone(),
                        instances: vec![InstanceManifest {
                            sop_instance_uid: uid_like.clone(),
                            sha256: vec![7; 32],
                            size: 10,
                        }],
                        purpose: "treatment".into(),
                        modalities: vec!["CT".into()],
                        complete: true,
                        audit_checkpoint: Vec::new(),
                    })
                    .await,
            );
            // A result whose patient, study and reference are this token.
            let mut fake = got.clone();
            for o in &mut fake {
                o.put(el(tags::PATIENT_ID, VR::LO, token));
                o.put(el(tags::STUDY_INSTANCE_UID, VR::UI, &uid_like));
                o.put(el(tags::SOP_INSTANCE_UID, VR::UI, &uid_like));
            }
            let sop = random_uid();
            let path = report(&fake, &sop, &work.path().join("probe.dcm"));
            let bytes = std::fs::read(&path).unwrap();
            let status = seen.status(
                client
                    .raw()
                    .return_result(tokio_stream::iter(result_chunks(
                        agreement, &uid_like, &sop, bytes,
                    )))
                    .await,
            );
            let status = status.expect("a probe is never taken");
            if agreement == AGREEMENT {
                assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
                assert!(
                    status.message().contains("does not let results return"),
                    "{status:?}"
                );
            }
        }
    }
    seen.status(
        client
            .raw()
            .transfer(tokio_stream::iter(vec![TransferChunk {
                transfer_id: "0".repeat(32),
                ..Default::default()
            }]))
            .await,
    );
    // An unknown patient token on a real study: a clear status naming the token, nothing else.
    let mut wrong = got.clone();
    for o in &mut wrong {
        o.put(el(tags::PATIENT_ID, VR::LO, "ZZZZZZZZZZZZZZZZ"));
    }
    let sop = random_uid();
    let bytes = std::fs::read(report(&wrong, &sop, &work.path().join("wrong.dcm"))).unwrap();
    let status = seen
        .status(
            client
                .raw()
                .return_result(tokio_stream::iter(result_chunks(
                    RETURNS,
                    &text(&got[0], tags::STUDY_INSTANCE_UID),
                    &sop,
                    bytes,
                )))
                .await,
        )
        .unwrap();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("unknown token") && status.message().contains("ZZZZZZZZZZZZZZZZ"),
        "{status:?}"
    );

    // After the origin shreds the agreement's vault, a return under it fails clearly.
    let shredded = a.vault().unwrap().shred(RETURNS).unwrap();
    assert!(shredded > 0);
    let late = report(&got, &random_uid(), &work.path().join("late.dcm"));
    let r = c
        .return_results(RETURNS, std::slice::from_ref(&late))
        .await
        .unwrap();
    match &r.outcomes[0].1 {
        ReturnOutcome::Refused { reason } => {
            assert!(
                reason.contains("unknown token") && reason.contains("shredded"),
                "{reason}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(filed_results(&fed).is_empty(), "nothing was filed");

    // Nothing any call answered, and nothing either node logged or audited, holds an original.
    let answered = seen.0.join("\n");
    let logged = String::from_utf8_lossy(&logs.lock().unwrap()).to_string();
    let (audit_a, audit_c) = (audit_of(a), audit_of(c));
    let partner_files: Vec<String> = files_under(&c.config.data_dir)
        .iter()
        .map(|p| String::from_utf8_lossy(&std::fs::read(p).unwrap()).to_string())
        .collect();
    for v in &orig.values {
        assert!(!answered.contains(v.as_str()), "an RPC answered `{v}`");
        assert!(!logged.contains(v.as_str()), "a log line holds `{v}`");
        assert!(
            !audit_a.contains(v.as_str()),
            "hospital-a's audit holds `{v}`"
        );
        assert!(
            !audit_c.contains(v.as_str()),
            "telerad-c's audit holds `{v}`"
        );
        for f in &partner_files {
            assert!(!f.contains(v.as_str()), "a file of telerad-c holds `{v}`");
        }
    }
    assert!(audit_a.contains("result refused"), "{audit_a}");
    assert!(audit_c.contains("never received"), "{audit_c}");
    fed.stop().await;
}

/// Test 1 with a PACS at the origin: the re-identified report reaches hospital-a's Orthanc
/// through `[dicom.deliver]` (its REST API shows the original patient and study), and no copy is
/// left in the results folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_a_pacs_at_the_origin_the_report_is_delivered_there() {
    let pacs = orthanc::Orthanc::start();
    let (fed, _) = start_with_pacs(Some(pacs.dicom_address())).await;
    let work = tempfile::tempdir().unwrap();
    let orig = original_study(work.path());
    let a = fed.node("hospital-a");
    a.send(RETURNS, FLOW, None, &orig.files).await.unwrap();
    let got = received(&fed, RETURNS);
    let sop = random_uid();
    let sr = report(&got, &sop, &work.path().join("report.dcm"));
    let r = fed
        .node("telerad-c")
        .return_results(RETURNS, std::slice::from_ref(&sr))
        .await
        .unwrap();
    assert!(
        matches!(&r.outcomes[0].1, ReturnOutcome::Returned { .. }),
        "{:?}",
        r.outcomes
    );
    let ids = pacs.wait_for_instances(1, Duration::from_secs(30));
    assert_eq!(ids.len(), 1, "the PACS holds the report");
    let t = pacs.instance_tags(&ids[0]);
    assert_eq!(t["PatientName"], orig.patient.name.as_str(), "{t}");
    assert_eq!(t["PatientID"], orig.patient.id.as_str());
    assert_eq!(t["StudyInstanceUID"], orig.study_uid.as_str());
    assert_eq!(t["SOPInstanceUID"], sop.as_str());
    assert_eq!(t["StudyDate"], "20261102");
    let refs = t["CurrentRequestedProcedureEvidenceSequence"][0]["ReferencedSeriesSequence"][0]
        ["ReferencedSOPSequence"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["ReferencedSOPInstanceUID"].as_str().unwrap().to_string())
        .collect::<BTreeSet<_>>();
    assert_eq!(refs, orig.sop_uids.iter().cloned().collect::<BTreeSet<_>>());
    assert!(
        filed_results(&fed).is_empty(),
        "delivered to the PACS, not the folder"
    );
    let audit = audit_of(a);
    assert!(audit.contains("queued for the site's PACS"), "{audit}");
    // Once the PACS has it, the store keeps no copy with the patient's identifiers (sealed or
    // not: hospital-a received nothing else, so its store keeps no blob at all).
    let deadline = Instant::now() + Duration::from_secs(20);
    let store = a.config.data_dir.join("store").join("blobs");
    loop {
        let holding: Vec<PathBuf> = files_under(&store);
        if holding.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "still in the store: {holding:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    fed.stop().await;
}

/// Issue 12 test 5 on the return path: a result waiting at either end is kept sealed. At
/// telerad-c, the queued SR (de-identified header bytes) waits in `returns/`; at hospital-a,
/// whose PACS is unreachable, the re-identified SR (original identifiers) waits in the store for
/// delivery. Neither the report's text nor any original identifier is in clear in any file of
/// either data directory outside the delivery folders (the inbox and the results folder).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_result_waiting_at_either_end_is_kept_sealed() {
    const REPORT_TEXT: &str = "No acute intracranial abnormality.";
    let dead_pacs = format!("127.0.0.1:{}", free_port());
    let (fed, _) = start_with_pacs(Some(dead_pacs)).await;
    let work = tempfile::tempdir().unwrap();
    let orig = original_study(work.path());
    let (a, c) = (fed.node("hospital-a"), fed.node("telerad-c"));
    a.send(RETURNS, FLOW, None, &orig.files).await.unwrap();
    let got = received(&fed, RETURNS);
    let sop = random_uid();
    let sr = report(&got, &sop, &work.path().join("report.dcm"));
    assert!(contains(
        &std::fs::read(&sr).unwrap(),
        REPORT_TEXT.as_bytes()
    ));

    // Queued at telerad-c and held there (its lock taken: the serving node does not send it yet).
    let target = pacs_broker::results::recognise::ReturnTarget {
        agreement: RETURNS.into(),
        flow: FLOW.into(),
        origin: "hospital-a".into(),
        purpose: "treatment".into(),
        study_token: text(&got[0], tags::STUDY_INSTANCE_UID),
        sop_instance_uid: sop.clone(),
    };
    let queue = c.return_queue();
    let (dir, _) = queue
        .add(
            &sr,
            &target,
            pacs_broker::results::queue::ReturnState::Unchecked,
        )
        .unwrap();
    let claim = pacs_broker::results::queue::ReturnQueue::try_claim(&dir).unwrap();

    // While hospital-a receives a result it stages it sealed: a stream stalled half-way leaves
    // a staging file there that holds nothing in clear.
    {
        let bytes = std::fs::read(&sr).unwrap();
        let mut chunks = result_chunks(RETURNS, &target.study_token, &sop, bytes.clone());
        let half = bytes.len() / 2;
        chunks[0].data.truncate(half);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(chunks.remove(0)).await.unwrap();
        tx.send(ResultChunk {
            header: None,
            data: bytes[half..bytes.len() - 8].to_vec(),
        })
        .await
        .unwrap();
        let mut client =
            PeerClient::connect(&c.tls, "hospital-a", &fed.addrs["hospital-a"], "localhost")
                .await
                .unwrap();
        let call = tokio::spawn(async move {
            client
                .raw()
                .return_result(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        let staging = a.config.data_dir.join("results").join(".staging");
        let deadline = Instant::now() + Duration::from_secs(20);
        let staged = loop {
            let parts = files_under(&staging);
            if let Some(p) = parts.first() {
                let b = std::fs::read(p).unwrap_or_default();
                if b.len() >= 8 {
                    break b;
                }
            }
            assert!(Instant::now() < deadline, "nothing was staged");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(
            staged.starts_with(b"PBSEALED"),
            "the staged result is sealed"
        );
        assert!(!contains(&staged, REPORT_TEXT.as_bytes()));
        drop(tx);
        let status = call.await.unwrap().expect_err("a short result is refused");
        assert_eq!(status.code(), tonic::Code::DataLoss, "{status:?}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !files_under(&staging).is_empty() {
            assert!(Instant::now() < deadline, "the staging file stayed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    let queued = std::fs::read(dir.join(pacs_broker::results::queue::RESULT_FILE)).unwrap();
    assert!(
        queued.starts_with(b"PBSEALED"),
        "the queued result is sealed"
    );
    assert_nothing_in_clear(&c.config.data_dir, &orig.values, REPORT_TEXT);
    drop(claim);

    // It goes home (streamed from the sealed file) and waits at hospital-a for its PACS.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        c.drain_returns().await;
        let e = pacs_broker::results::queue::ReturnQueue::load(&dir).unwrap();
        if e.state == pacs_broker::results::queue::ReturnState::Returned {
            break;
        }
        assert!(Instant::now() < deadline, "not returned: {e:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!dir.join(pacs_broker::results::queue::RESULT_FILE).exists());
    let waiting = a.store().unwrap().delivery_queue().entries().unwrap();
    assert_eq!(waiting.len(), 1, "the result waits for the PACS");
    assert!(
        filed_results(&fed).is_empty(),
        "queued for the PACS, not filed"
    );
    assert_nothing_in_clear(&a.config.data_dir, &orig.values, REPORT_TEXT);
    assert_nothing_in_clear(&c.config.data_dir, &orig.values, REPORT_TEXT);
    fed.stop().await;
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// No file of `data_dir` outside its delivery folders (`store/inbox`, `results`) holds an
/// original value or the report's text in clear.
fn assert_nothing_in_clear(data_dir: &Path, originals: &[String], report_text: &str) {
    let delivery = [
        data_dir.join("store").join("inbox"),
        data_dir.join("results"),
    ];
    let mut checked = 0;
    for f in files_under(data_dir) {
        if delivery.iter().any(|d| f.starts_with(d)) {
            continue;
        }
        let Ok(bytes) = std::fs::read(&f) else {
            continue; // removed meanwhile (a sled or staging file)
        };
        checked += 1;
        for v in originals {
            assert!(
                !contains(&bytes, v.as_bytes()),
                "an original identifier is in clear in {}",
                f.display()
            );
        }
        assert!(
            !contains(&bytes, report_text.as_bytes()),
            "the report's de-identified content is in clear in {}",
            f.display()
        );
    }
    assert!(checked > 5, "only {checked} files were searched");
}
