//! A hostile partner: a valid site certificate of the federation and a custom gRPC client. Each
//! test tries one attack on the receiver (telerad-c) and checks that it holds: limits per peer,
//! bounded peer strings, scoped dedup, the delivery check, the guarded reader, timeouts,
//! revocation and pins, integrity at rest, file modes.
//!
//! Every test here runs under a cap on single allocations (256 MiB): a length bomb that reached
//! the DICOM parser would abort the run instead of passing quietly.

#[path = "common/capped.rs"]
mod capped;
mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use pacs_broker::config::{NodeConfig, TlsPaths};
use pacs_broker::demo::{write_synthetic_ct, SyntheticPatient};
use pacs_broker::federation::client::{OutgoingInstance, PeerClient, SendError};
use pacs_broker::federation::proto::{
    HelloRequest, InstanceManifest, OfferRequest, OfferResponse, TransferChunk,
};
use pacs_broker::federation::tls::SiteTls;
use pacs_broker::node::Node;
use sha2::{Digest, Sha256};

/// A change made to a de-identified instance before it is sent.
type Tweak = Box<dyn Fn(&mut dicom_object::DefaultDicomObject)>;

/// A second agreement beside the test one: Hospital B sends to Telerad C (so B is a legitimate
/// sender that can flood), and a trial flow from Hospital A whose patients are subject IDs.
const HOSTILE_AGREEMENT: &str = "hostile-test";

fn hostile_agreement_toml(pin_a: Option<&str>) -> String {
    let pin = pin_a
        .map(|p| format!("certificate_pin = \"{p}\"\n"))
        .unwrap_or_default();
    format!(
        r#"[agreement]
id = "{HOSTILE_AGREEMENT}"
version = 1
title = "Hostile partner tests"
status = "active"
valid_from = 2020-01-01
valid_until = 2099-12-31
governing_law = "Test"

[[parties]]
site = "hospital-a"
organisation = "Hospital A"
privacy_officer = "DPO A"
privacy_contact = "dpo@a.example"
{pin}
[[parties]]
site = "hospital-b"
organisation = "Hospital B"
privacy_officer = "DPO B"
privacy_contact = "dpo@b.example"

[[parties]]
site = "telerad-c"
organisation = "Telerad C"
privacy_officer = "DPO C"
privacy_contact = "dpo@c.example"

[[flows]]
name = "b-reads"
from = "hospital-b"
to = "telerad-c"
purposes = ["treatment"]

[flows.deid]
options = ["retain-longitudinal-modified-dates"]

[flows.retention]
days = 30
after = "delete"

[[flows]]
name = "trial-reads"
from = "hospital-a"
to = "telerad-c"
purposes = ["research"]

[flows.deid]
options = ["retain-longitudinal-modified-dates"]

[flows.subject_ids]
mapping = "hostile-subjects.csv"

[flows.retention]
days = 30
after = "delete"
"#
    )
}

/// Small limits and timeouts, so that the tests are fast.
fn tight(cfg: &mut NodeConfig) {
    cfg.limits.pending_offers_per_peer = 4;
    cfg.limits.pending_offers_total = 64;
    cfg.limits.offer_ttl_secs = 2;
    cfg.limits.idle_timeout_secs = 2;
    cfg.limits.stall_timeout_secs = 1;
}

/// Writes the hostile-test agreement (signed by all) into every site's agreements folder and
/// waits until Telerad C enforces it.
async fn add_hostile_agreement(fed: &Federation, pin_a: Option<&str>) {
    for site in fed.nodes.keys() {
        let dir = fed.dir.path().join(site).join("agreements");
        std::fs::write(
            dir.join("hostile-subjects.csv"),
            "patient_id,subject_id\nA0000123,SI-01-0001\n",
        )
        .unwrap();
        let policy = dir.join("hostile.toml");
        std::fs::write(&policy, hostile_agreement_toml(pin_a)).unwrap();
        sign_by_all(fed.dir.path(), &policy);
    }
    let c = fed.node("telerad-c");
    let until = Instant::now() + Duration::from_secs(10);
    while !c.agreements().agreements.contains_key(HOSTILE_AGREEMENT) {
        if Instant::now() > until {
            let (_, why) =
                pacs_broker::node::load_agreements(&c.config.agreements, &c.config.tls.ca, None);
            panic!("the hostile-test agreement was not loaded: {why:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn tls_paths(pki: &Path, site: &str) -> TlsPaths {
    TlsPaths {
        ca: pki.join("ca.pem"),
        cert: pki.join(format!("{site}.pem")),
        key: pki.join(format!("{site}.key")),
        crl: None,
    }
}

fn site_tls(fed: &Federation, site: &str) -> SiteTls {
    SiteTls::load(site, &tls_paths(&fed.pki(), site)).unwrap()
}

async fn client_of(fed: &Federation, tls: &SiteTls) -> Result<PeerClient, SendError> {
    PeerClient::connect(tls, "telerad-c", &fed.addrs["telerad-c"], "localhost").await
}

/// De-identified instances of a synthetic study under the test flow (as Hospital A's node would
/// make them), each changed by `tweak` before it is written.
fn instances(
    node: &Node,
    dir: &Path,
    n: usize,
    patient: &SyntheticPatient,
    tweak: impl Fn(&mut dicom_object::DefaultDicomObject),
) -> (String, Vec<OutgoingInstance>) {
    prepared_study(node, dir, n, 16, patient, tweak)
}

fn offer_request(
    agreement: &str,
    flow: &str,
    purpose: &str,
    study: &str,
    inst: &[OutgoingInstance],
) -> OfferRequest {
    OfferRequest {
        complete: true,
        audit_checkpoint: Vec::new(),
        agreement_id: agreement.into(),
        flow: flow.into(),
        study_token: study.into(),
        purpose: purpose.into(),
        modalities: vec!["CT".into()],
        instances: inst
            .iter()
            .map(|i| InstanceManifest {
                sop_instance_uid: i.sop_instance_uid.clone(),
                sha256: i.sha256.to_vec(),
                size: i.size,
            })
            .collect(),
    }
}

fn chunks(transfer_id: &str, inst: &[OutgoingInstance]) -> Vec<TransferChunk> {
    let mut v = vec![TransferChunk {
        transfer_id: transfer_id.into(),
        ..Default::default()
    }];
    for i in inst {
        v.push(TransferChunk {
            transfer_id: String::new(),
            instance_sha256: i.sha256.to_vec(),
            offset: 0,
            data: std::fs::read(&i.path).unwrap().into(),
            last: true,
        });
    }
    v
}

/// Offers and transfers in one go; the status of whichever step failed.
async fn offer_and_send(
    client: &mut PeerClient,
    offer: OfferRequest,
    inst: &[OutgoingInstance],
) -> Result<pacs_broker::federation::proto::Receipt, tonic::Status> {
    let answer: OfferResponse = client.raw().offer(offer).await?.into_inner();
    let to_send: Vec<OutgoingInstance> = inst
        .iter()
        .filter(|i| !answer.already_have.contains(&i.sha256.to_vec()))
        .cloned()
        .collect();
    client
        .raw()
        .transfer(tokio_stream::iter(chunks(&answer.transfer_id, &to_send)))
        .await
        .map(|r| r.into_inner())
}

fn store_dir(node: &Node) -> PathBuf {
    node.config.data_dir.join("store")
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn audit_text(node: &Node) -> String {
    std::fs::read_to_string(node.audit.path()).unwrap()
}

// 1. Per-partner limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offer_flood_from_one_partner_leaves_another_partners_send_working() {
    let fed = Federation::start_with(&["hospital-a", "telerad-c"], |c| {
        tight(c);
        c.limits.offer_ttl_secs = 4;
    })
    .await;
    add_hostile_agreement(&fed, None).await;
    let dir = fed.dir.path().join("flood");
    let (study, inst) = instances(
        fed.node("hospital-a"),
        &dir,
        1,
        &SyntheticPatient::default(),
        |_| {},
    );
    let b = site_tls(&fed, "hospital-b");
    let mut flooder = client_of(&fed, &b).await.unwrap();
    // 60 offers, 12 at a time (a partner over its limit is answered after a short delay).
    let calls = (0..60).map(|_| {
        let mut raw = flooder.raw().clone();
        let o = offer_request(HOSTILE_AGREEMENT, "b-reads", "treatment", &study, &inst);
        async move { raw.offer(o).await }
    });
    let (mut accepted, mut exhausted) = (0, 0);
    // At most 12 in flight: the server allows 16 concurrent streams per connection, and a
    // stream over that is refused by HTTP/2 before the service sees the offer.
    use futures::StreamExt;
    let answers: Vec<_> = futures::stream::iter(calls)
        .buffer_unordered(12)
        .collect()
        .await;
    for r in answers {
        match r {
            Ok(_) => accepted += 1,
            Err(s) => {
                assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s}");
                exhausted += 1;
            }
        }
    }
    assert_eq!(accepted, 4, "the per-peer limit of pending offers");
    assert_eq!(exhausted, 56);
    // Another partner is not affected: Hospital A's node sends its study.
    let src = fed.dir.path().join("legit");
    write_synthetic_ct(&src, &SyntheticPatient::default(), 3, 16).unwrap();
    let report = fed
        .node("hospital-a")
        .send(AGREEMENT, FLOW, None, std::slice::from_ref(&src))
        .await
        .unwrap();
    assert_eq!(report.studies.len(), 1, "queued: {:?}", report.queued);
    assert_eq!(report.studies[0].instances_sent, 3);
    // Pending offers expire in seconds here (minutes by default): the flooder may offer again.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let o = offer_request(HOSTILE_AGREEMENT, "b-reads", "treatment", &study, &inst);
    flooder
        .raw()
        .offer(o)
        .await
        .expect("expired offers free the slots");
    // A sender treats RESOURCE_EXHAUSTED as temporary: the study stays pending.
    let busy = SendError::Offer {
        site: "telerad-c".into(),
        status: tonic::Status::resource_exhausted("busy"),
    };
    assert!(busy.is_transient());
    // The flood costs a few audit entries, not one per refusal.
    let refusals = audit_text(fed.node("telerad-c"))
        .lines()
        .filter(|l| l.contains("offer over limit"))
        .count();
    assert!(refusals <= 6, "{refusals} refusals audited one by one");
    fed.stop().await;
}

// 1. Memory per pending offer is bounded: the manifest waits on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_under_large_manifests() {
    let fed = Federation::start_with(&["telerad-c"], |c| {
        tight(c);
        c.limits.pending_offers_per_peer = 12;
        c.limits.offer_ttl_secs = 600;
    })
    .await;
    let a = site_tls(&fed, "hospital-a");
    let mut client = client_of(&fed, &a).await.unwrap();
    const N: usize = 30_000;
    let make = |k: usize| OfferRequest {
        complete: true,
        audit_checkpoint: Vec::new(),
        agreement_id: AGREEMENT.into(),
        flow: FLOW.into(),
        study_token: format!("2.25.{}", 1000 + k),
        purpose: "treatment".into(),
        modalities: vec!["CT".into()],
        instances: (0..N)
            .map(|i| InstanceManifest {
                sop_instance_uid: format!("2.25.{}", (k + 1) * 1_000_000 + i),
                sha256: Sha256::digest(format!("{k}/{i}")).to_vec(),
                size: 1000,
            })
            .collect(),
    };
    // One offer first, so that the allocator has grown to what one offer needs in flight.
    client.raw().offer(make(0)).await.unwrap();
    let before = rss_kib();
    for k in 1..12 {
        client.raw().offer(make(k)).await.unwrap();
    }
    let grown_mib = rss_kib().saturating_sub(before) / 1024;
    // Eleven more pending offers of 30,000 instances: an in-memory manifest cost ~5 MB each
    // (55 MB); what remains is the allocator keeping the buffers of decoding one message.
    eprintln!("RSS grew by {grown_mib} MiB for 11 more pending offers of {N} instances");
    assert!(grown_mib < 30, "RSS grew by {grown_mib} MiB");
    let staged: u64 = files_under(&store_dir(fed.node("telerad-c")).join("staging"))
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum();
    assert_eq!(
        staged,
        12 * N as u64 * pacs_broker::federation::manifest::RECORD as u64
    );
    fed.stop().await;
}

// 2. Bounded input: megabyte-sized ids from a site in no flow cost a few KB of audit log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn megabyte_sized_ids_grow_the_audit_log_by_a_few_kb() {
    let fed = Federation::start_with(&["telerad-c"], tight).await;
    let c = fed.node("telerad-c");
    let before = std::fs::metadata(c.audit.path()).unwrap().len();
    let b = site_tls(&fed, "hospital-b");
    let mut client = client_of(&fed, &b).await.unwrap();
    let huge = "\u{1b}[31mA\n".repeat(500_000);
    for field in 0..10 {
        let mut o = OfferRequest {
            complete: true,
            audit_checkpoint: Vec::new(),
            agreement_id: AGREEMENT.into(),
            flow: FLOW.into(),
            study_token: "2.25.1".into(),
            purpose: "treatment".into(),
            modalities: vec![],
            instances: vec![],
        };
        match field % 4 {
            0 => o.agreement_id = huge.clone(),
            1 => o.flow = huge.clone(),
            2 => o.purpose = huge.clone(),
            _ => o.study_token = huge.clone(),
        }
        let s = client.raw().offer(o).await.unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{}", s.message());
        assert!(s.message().len() < 200, "the status echoes the id");
    }
    let grown = std::fs::metadata(c.audit.path()).unwrap().len() - before;
    eprintln!("audit log grew by {grown} bytes for ten offers with 3.5 MB ids");
    assert!(grown < 8 * 1024, "audit log grew by {grown} bytes");
    let log = audit_text(c);
    assert!(
        !log.contains("\u{1b}"),
        "control characters reached the audit log"
    );
    assert!(log.contains("bytes not shown"), "{log}");
    pacs_broker::audit::verify(c.audit.path()).unwrap();
    fed.stop().await;
}

// 3. No cross-scope dedup, no hash probing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_agreement_claim_delivers_nothing() {
    let fed = Federation::start_with(&["hospital-a", "telerad-c"], tight).await;
    add_hostile_agreement(&fed, None).await;
    let dir = fed.dir.path().join("x");
    let (study, inst) = instances(
        fed.node("hospital-a"),
        &dir,
        2,
        &SyntheticPatient::default(),
        |_| {},
    );
    let a = site_tls(&fed, "hospital-a");
    let mut ca = client_of(&fed, &a).await.unwrap();
    offer_and_send(
        &mut ca,
        offer_request(AGREEMENT, FLOW, "treatment", &study, &inst),
        &inst,
    )
    .await
    .unwrap();
    // Hospital B claims the same instances under its own agreement and flow.
    let b = site_tls(&fed, "hospital-b");
    let mut cb = client_of(&fed, &b).await.unwrap();
    let answer = cb
        .raw()
        .offer(offer_request(
            HOSTILE_AGREEMENT,
            "b-reads",
            "treatment",
            &study,
            &inst,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(
        answer.already_have.is_empty(),
        "the receiver revealed that it holds another party's instances"
    );
    // Sending nothing does not get them delivered.
    let s = cb
        .raw()
        .transfer(tokio_stream::iter(chunks(&answer.transfer_id, &[])))
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::Aborted, "{s}");
    let inbox = store_dir(fed.node("telerad-c")).join("inbox");
    assert!(files_under(&inbox.join(HOSTILE_AGREEMENT)).is_empty());
    assert_eq!(files_under(&inbox.join(AGREEMENT)).len(), 2);
    // A same-scope resend is still answered "already held".
    let again = ca
        .raw()
        .offer(offer_request(AGREEMENT, FLOW, "treatment", &study, &inst))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.already_have.len(), 2);
    fed.stop().await;
}

// 4. The delivery check: every gap the issue found, over the wire; and a positive control.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_release_check_gap_is_refused() {
    let fed = Federation::start_with(&["hospital-a", "telerad-c"], tight).await;
    add_hostile_agreement(&fed, None).await;
    let a = site_tls(&fed, "hospital-a");
    let mut client = client_of(&fed, &a).await.unwrap();
    let node = fed.node("hospital-a").clone();
    let base = fed.dir.path().join("gaps");
    let p = SyntheticPatient::default();
    let put = |obj: &mut dicom_object::DefaultDicomObject, tag, vr, v: &str| {
        obj.put(DataElement::new(tag, vr, PrimitiveValue::from(v)));
    };
    let cases: Vec<(&str, &str, Tweak)> = vec![
        (
            "ImageComments with a name, an ID and a birth date",
            FLOW,
            Box::new(move |o| {
                put(
                    o,
                    tags::IMAGE_COMMENTS,
                    VR::LT,
                    "DOE^JOHN MRN-0042117 19700101",
                )
            }),
        ),
        (
            "an empty attribute the profile removes",
            FLOW,
            Box::new(move |o| put(o, tags::IMAGE_COMMENTS, VR::LT, "")),
        ),
        (
            "a PatientID that is not a token of the project's form",
            FLOW,
            Box::new(move |o| put(o, tags::PATIENT_ID, VR::LO, "ILOU0123456789AB")),
        ),
        (
            "a clear PatientName and PatientID on a trial flow",
            "trial-reads",
            Box::new(move |o| {
                put(o, tags::PATIENT_NAME, VR::PN, "DOE^JOHN");
                put(o, tags::PATIENT_ID, VR::LO, "MRN-0042117");
            }),
        ),
    ];
    for (i, (what, flow, tweak)) in cases.iter().enumerate() {
        let (study, inst) = instances(&node, &base.join(format!("c{i}")), 1, &p, tweak);
        let (agreement, purpose) = if *flow == FLOW {
            (AGREEMENT, "treatment")
        } else {
            (HOSTILE_AGREEMENT, "research")
        };
        let s = offer_and_send(
            &mut client,
            offer_request(agreement, flow, purpose, &study, &inst),
            &inst,
        )
        .await
        .expect_err(what);
        assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{what}: {s}");
    }
    // The offered study token must be every instance's Study Instance UID.
    let (_, inst) = instances(&node, &base.join("token"), 1, &p, |_| {});
    let s = offer_and_send(
        &mut client,
        offer_request(AGREEMENT, FLOW, "treatment", "2.25.999", &inst),
        &inst,
    )
    .await
    .unwrap_err();
    assert!(s.message().contains("study token"), "{s}");
    for bad in [".", "..", "../../etc"] {
        let s = offer_and_send(
            &mut client,
            offer_request(AGREEMENT, FLOW, "treatment", bad, &inst),
            &inst,
        )
        .await
        .unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{bad}: {s}");
    }
    assert!(files_under(&store_dir(fed.node("telerad-c")).join("inbox")).is_empty());
    // Positive control: a trial instance named by its subject ID is accepted.
    let (study, inst) = instances(&node, &base.join("ok"), 1, &p, move |o| {
        put(o, tags::PATIENT_NAME, VR::PN, "SI-01-0001");
        put(o, tags::PATIENT_ID, VR::LO, "SI-01-0001");
    });
    offer_and_send(
        &mut client,
        offer_request(HOSTILE_AGREEMENT, "trial-reads", "research", &study, &inst),
        &inst,
    )
    .await
    .expect("a well-formed trial instance is accepted");
    fed.stop().await;
}

// 5. One guarded reader: a length bomb over the wire (the fuzz corpus) is refused without a
// large allocation (the allocation cap of this binary would abort the run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_length_bomb_over_the_wire_is_refused_without_a_large_allocation() {
    let fed = Federation::start_with(&["telerad-c"], tight).await;
    let a = site_tls(&fed, "hospital-a");
    let mut client = client_of(&fed, &a).await.unwrap();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fuzz");
    let before = rss_kib();
    for (k, e) in std::fs::read_dir(&dir).unwrap().enumerate() {
        let path = e.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let inst = OutgoingInstance {
            sha256: Sha256::digest(&bytes).into(),
            size: bytes.len() as u64,
            sop_instance_uid: format!("2.25.77{k}"),
            path,
        };
        let s = offer_and_send(
            &mut client,
            offer_request(
                AGREEMENT,
                FLOW,
                "treatment",
                "2.25.7",
                std::slice::from_ref(&inst),
            ),
            &[inst],
        )
        .await
        .unwrap_err();
        assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s}");
        // Refused either as unreadable, or (where the guard defuses the bomb and reads what is
        // left) because what is left is not the instance the manifest announced.
        assert!(
            s.message().contains("not a readable DICOM file")
                || s.message().contains("differs from the manifest"),
            "{s}"
        );
    }
    assert!(rss_kib().saturating_sub(before) < 64 * 1024);
    // Nothing refused is left: no blob, and no (hidden) inbox copy.
    for d in ["blobs", "inbox", "staging"] {
        let left: Vec<_> = files_under(&store_dir(fed.node("telerad-c")).join(d))
            .into_iter()
            .filter(|p| {
                p.is_file()
                    && !p.starts_with(store_dir(fed.node("telerad-c")).join("staging/resume"))
            })
            .collect();
        assert!(left.is_empty(), "{d}: {left:?}");
    }
    fed.stop().await;
}

// 6. Timeouts: an idle connection is closed; a stalled transfer is cut and its staging removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_and_a_stalled_transfer_is_cut() {
    use tokio::io::AsyncReadExt;
    let fed = Federation::start_with(&["hospital-a", "telerad-c"], tight).await;
    let a = site_tls(&fed, "hospital-a");
    // Handshake, then say nothing.
    let started = Instant::now();
    let (mut tls, _) = pacs_broker::federation::tls::connect(
        a.client.clone(),
        &fed.addrs["telerad-c"],
        "localhost",
        "telerad-c",
        &a.pins,
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(8), async {
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the idle connection was not closed");
    let after = started.elapsed();
    assert!(
        after >= Duration::from_millis(1500),
        "closed after {after:?}"
    );

    // A transfer that stops sending is cut after the stall timeout.
    let (study, inst) = instances(
        fed.node("hospital-a"),
        &fed.dir.path().join("stall"),
        2,
        &SyntheticPatient::default(),
        |_| {},
    );
    let mut client = client_of(&fed, &a).await.unwrap();
    let answer = client
        .raw()
        .offer(offer_request(AGREEMENT, FLOW, "treatment", &study, &inst))
        .await
        .unwrap()
        .into_inner();
    let mut first = chunks(&answer.transfer_id, &inst[..1]);
    let last = first.last_mut().unwrap();
    last.data.truncate(last.data.len() / 2);
    last.last = false;
    let stalled = tokio_stream::StreamExt::chain(
        tokio_stream::iter(first),
        futures::stream::pending::<TransferChunk>(),
    );
    let s = client.raw().transfer(stalled).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::DeadlineExceeded, "{s}");
    let staging = store_dir(fed.node("telerad-c")).join("staging");
    let left: Vec<_> = files_under(&staging)
        .into_iter()
        .filter(|f| {
            f.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("incoming-")
        })
        .collect();
    assert!(left.is_empty(), "staging left behind: {left:?}");
    // Both are audited (the idle close by the receiver's housekeeping, within a second).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let log = audit_text(fed.node("telerad-c"));
    assert!(log.contains("idle connection closed"), "{log}");
    assert!(log.contains("transfer interrupted"), "{log}");
    fed.stop().await;
}

// 7. Revocation: a CRL change cuts and refuses a certificate without a restart, both ways; a
// pinned party presenting another key is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_certificate_is_refused_after_a_crl_change_without_restart() {
    use pacs_broker::federation::crl::revoke_with_dev_ca;
    let pki_tmp = tempfile::tempdir().unwrap();
    let crl = pki_tmp.path().join("crl.pem");
    let crl2 = crl.clone();
    let fed = Federation::start_with(&["telerad-c"], move |c| {
        tight(c);
        c.limits.idle_timeout_secs = 30;
        let pki = c.tls.ca.parent().unwrap().to_owned();
        if !crl2.exists() {
            revoke_with_dev_ca(&pki.join("ca.pem"), &pki.join("ca.key"), &[], &crl2, 30).unwrap();
        }
        c.tls.crl = Some(crl2.clone());
    })
    .await;
    let pki = fed.pki();
    let a = site_tls(&fed, "hospital-a");
    let mut client = client_of(&fed, &a).await.unwrap();
    client.raw().hello(HelloRequest {}).await.unwrap();
    revoke_with_dev_ca(
        &pki.join("ca.pem"),
        &pki.join("ca.key"),
        &[pki.join("hospital-a.pem")],
        &crl,
        30,
    )
    .unwrap();
    let cut = Instant::now();
    // The open connection is cut within a second, and no new one gets through.
    let mut refused = false;
    while cut.elapsed() < Duration::from_secs(3) {
        if client.raw().hello(HelloRequest {}).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refused, "the revoked certificate's connection still works");
    assert!(
        cut.elapsed() < Duration::from_millis(1500),
        "{:?}",
        cut.elapsed()
    );
    let fresh = match client_of(&fed, &a).await {
        Err(_) => true,
        Ok(mut c) => c.raw().hello(HelloRequest {}).await.is_err(),
    };
    assert!(
        fresh,
        "a new connection with the revoked certificate got through"
    );
    // Another site is unaffected.
    let b = site_tls(&fed, "hospital-b");
    client_of(&fed, &b)
        .await
        .unwrap()
        .raw()
        .hello(HelloRequest {})
        .await
        .unwrap();
    // The client side checks the server too: B, with a CRL revoking telerad-c, refuses it.
    let crl_c = pki_tmp.path().join("crl-c.pem");
    revoke_with_dev_ca(
        &pki.join("ca.pem"),
        &pki.join("ca.key"),
        &[pki.join("telerad-c.pem")],
        &crl_c,
        30,
    )
    .unwrap();
    let mut paths = tls_paths(&pki, "hospital-b");
    paths.crl = Some(crl_c);
    let b_strict = SiteTls::load("hospital-b", &paths).unwrap();
    let to_revoked = match client_of(&fed, &b_strict).await {
        Err(_) => true,
        Ok(mut c) => c.raw().hello(HelloRequest {}).await.is_err(),
    };
    assert!(to_revoked, "a client accepted a revoked server certificate");
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_party_with_another_key_is_refused() {
    let fed = Federation::start_with(&["telerad-c"], tight).await;
    let pki = fed.pki();
    let real = pacs_broker::federation::pki::load_certs(&pki.join("hospital-a.pem")).unwrap();
    let pin = hex::encode(pacs_broker::federation::pki::spki_sha256(&real[0]).unwrap());
    add_hostile_agreement(&fed, Some(&pin)).await;
    // A second certificate for hospital-a from the same CA, with another key (stolen CA access,
    // a mis-issued certificate): valid for the CA, refused by the pin.
    let other = fed.dir.path().join("other");
    pacs_broker::federation::pki::issue_dev_site_certificate(&pki, "hospital-a", &other).unwrap();
    let mut paths = tls_paths(&pki, "hospital-a");
    paths.cert = other.join("hospital-a.pem");
    paths.key = other.join("hospital-a.key");
    let impostor = SiteTls::load("hospital-a", &paths).unwrap();
    let mut c = client_of(&fed, &impostor).await.unwrap();
    let s = c.raw().hello(HelloRequest {}).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s}");
    assert!(s.message().contains("certificate_pin"), "{s}");
    // The real key still works.
    let a = site_tls(&fed, "hospital-a");
    client_of(&fed, &a)
        .await
        .unwrap()
        .raw()
        .hello(HelloRequest {})
        .await
        .unwrap();
    fed.stop().await;
}

// 8. Integrity at rest: a damaged stored copy is never counted as held; `store verify` finds it.
// With inbox delivery and encryption at rest the inbox copy is the one stored copy (no blob).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_stored_copy_is_never_counted_as_held() {
    // Default limits: this test is about integrity, and the `tight` ones (a 1 s stall timeout,
    // 2 s offer TTL) can cut or expire a send on a loaded machine, which then only queues.
    let fed = Federation::start(&["hospital-a", "telerad-c"]).await;
    let src = fed.dir.path().join("study");
    write_synthetic_ct(&src, &SyntheticPatient::default(), 3, 16).unwrap();
    let a = fed.node("hospital-a");
    let first = a
        .send(AGREEMENT, FLOW, None, std::slice::from_ref(&src))
        .await
        .unwrap();
    assert!(first.queued.is_empty(), "{:?}", first.queued);
    assert_eq!(first.studies[0].instances_sent, 3);
    let c = fed.node("telerad-c");
    let store = store_dir(c);
    assert!(
        files_under(&store.join("blobs")).is_empty(),
        "the inbox copy is the one stored copy"
    );
    let inbox = files_under(&store.join("inbox"));
    assert_eq!(inbox.len(), 3);
    let good: Vec<Vec<u8>> = inbox.iter().map(|f| std::fs::read(f).unwrap()).collect();
    // One stored copy is damaged at rest (one bit), another was taken out by the site.
    let damaged = inbox[0].clone();
    let mut bytes = std::fs::read(&damaged).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&damaged, &bytes).unwrap();
    std::fs::remove_file(&inbox[1]).unwrap();
    // `store verify` finds the flipped byte (while the node runs) and names the file.
    let cfg_path = fed.dir.path().join("telerad-c.toml");
    std::fs::write(&cfg_path, c.config.to_toml()).unwrap();
    let verify = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pacs-broker"))
            .args(["store", "verify", "--config"])
            .arg(&cfg_path)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
        )
    };
    let (code, text) = verify();
    assert_eq!(code, Some(3), "{text}");
    assert_eq!(text.matches("MISMATCH").count(), 1, "{text}");
    let name = damaged.file_name().unwrap().to_string_lossy().to_string();
    assert!(text.contains(&name), "{text}");
    assert!(text.contains("1 handed on"), "{text}");
    // A resend: the damaged copy is quarantined and asked for again (never counted as held);
    // the intact one and the one handed on count as held; what reaches the inbox is the
    // sender's bytes, and the instance handed on is not delivered a second time.
    let report = a
        .send(AGREEMENT, FLOW, None, std::slice::from_ref(&src))
        .await
        .unwrap();
    assert!(report.queued.is_empty(), "{:?}", report.queued);
    assert_eq!(report.studies[0].instances_sent, 1);
    assert_eq!(report.studies[0].already_held, 2);
    let now = files_under(&store.join("inbox"));
    assert_eq!(now.len(), 2, "{now:?}");
    assert_eq!(
        std::fs::read(&damaged).unwrap(),
        good[0],
        "not the sender's bytes"
    );
    assert_eq!(std::fs::read(&inbox[2]).unwrap(), good[2]);
    assert!(
        !inbox[1].exists(),
        "a handed-on instance was delivered again"
    );
    assert_eq!(files_under(&store.join("quarantine")).len(), 1);
    assert!(audit_text(c).contains("quarantine"));
    let (code, text) = verify();
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("all intact"), "{text}");
    fed.stop().await;
}

// 10. A re-sent SOP Instance UID with other bytes is refused with a clear status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_instance_with_other_bytes_is_refused() {
    let fed = Federation::start_with(&["hospital-a", "telerad-c"], tight).await;
    let a = site_tls(&fed, "hospital-a");
    let mut client = client_of(&fed, &a).await.unwrap();
    let node = fed.node("hospital-a").clone();
    let p = SyntheticPatient::default();
    let (study, inst) = instances(&node, &fed.dir.path().join("v1"), 1, &p, |_| {});
    offer_and_send(
        &mut client,
        offer_request(AGREEMENT, FLOW, "treatment", &study, &inst),
        &inst,
    )
    .await
    .unwrap();
    // The same instance (same SOP Instance UID), with one attribute changed.
    let mut obj = dicom_object::open_file(&inst[0].path).unwrap();
    obj.put(DataElement::new(
        tags::SERIES_NUMBER,
        VR::IS,
        PrimitiveValue::from("99"),
    ));
    let mut bytes = Vec::new();
    obj.write_all(&mut bytes).unwrap();
    let path = fed.dir.path().join("v2.dcm");
    std::fs::write(&path, &bytes).unwrap();
    let changed = vec![OutgoingInstance {
        path,
        sha256: Sha256::digest(&bytes).into(),
        size: bytes.len() as u64,
        sop_instance_uid: inst[0].sop_instance_uid.clone(),
    }];
    assert_eq!(changed[0].sop_instance_uid, inst[0].sop_instance_uid);
    let s = offer_and_send(
        &mut client,
        offer_request(AGREEMENT, FLOW, "treatment", &study, &changed),
        &changed,
    )
    .await
    .unwrap_err();
    assert_eq!(s.code(), tonic::Code::AlreadyExists, "{s}");
    assert!(s.message().contains("different content"), "{s}");
    fed.stop().await;
}

/// A plaintext instance whose first bytes are the marker of a file sealed at rest (a DICOM
/// preamble may hold anything) is refused, whether its first chunk carries the whole marker (the
/// receiver looks at the bytes as they arrive) or only part of it (the check opens the file to
/// look): the inbox never holds a plaintext copy that reads as sealed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_instance_that_looks_sealed_is_refused() {
    let fed = Federation::start_with(&["hospital-a", "telerad-c"], tight).await;
    let a = site_tls(&fed, "hospital-a");
    let mut client = client_of(&fed, &a).await.unwrap();
    let node = fed.node("hospital-a").clone();
    let p = SyntheticPatient::default();
    let (study, inst) = instances(&node, &fed.dir.path().join("sealed-look"), 1, &p, |_| {});
    let mut bytes = std::fs::read(&inst[0].path).unwrap();
    bytes[..8].copy_from_slice(b"PBSEALED");
    let path = fed.dir.path().join("sealed-look.dcm");
    std::fs::write(&path, &bytes).unwrap();
    let looks_sealed = vec![OutgoingInstance {
        path,
        sha256: Sha256::digest(&bytes).into(),
        size: bytes.len() as u64,
        sop_instance_uid: inst[0].sop_instance_uid.clone(),
    }];
    for first in [bytes.len(), 4] {
        let offer = offer_request(AGREEMENT, FLOW, "treatment", &study, &looks_sealed);
        let answer: OfferResponse = client.raw().offer(offer).await.unwrap().into_inner();
        let mut v = vec![TransferChunk {
            transfer_id: answer.transfer_id,
            ..Default::default()
        }];
        for (offset, part) in [(0, &bytes[..first]), (first, &bytes[first..])] {
            if part.is_empty() {
                continue;
            }
            v.push(TransferChunk {
                transfer_id: String::new(),
                instance_sha256: looks_sealed[0].sha256.to_vec(),
                offset: offset as u64,
                data: part.to_vec().into(),
                last: offset + part.len() == bytes.len(),
            });
        }
        let s = client
            .raw()
            .transfer(tokio_stream::iter(v))
            .await
            .unwrap_err();
        assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{first}: {s}");
        assert!(s.message().contains("cannot be read"), "{first}: {s}");
        let left: Vec<_> = files_under(&store_dir(fed.node("telerad-c")).join("inbox"))
            .into_iter()
            .filter(|p| p.is_file())
            .collect();
        assert!(left.is_empty(), "{first}: {left:?}");
    }
    fed.stop().await;
}

// 9 and 10. File modes, and a data folder whose index or vault went missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_data_are_private_and_a_lost_index_or_vault_refuses_to_start() {
    use std::os::unix::fs::PermissionsExt;
    let fed = Federation::start_with(&["hospital-a", "telerad-c"], tight).await;
    let src = fed.dir.path().join("study");
    write_synthetic_ct(&src, &SyntheticPatient::default(), 1, 16).unwrap();
    fed.node("hospital-a")
        .send(AGREEMENT, FLOW, None, std::slice::from_ref(&src))
        .await
        .unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    let pki = fed.pki();
    for k in ["ca.key", "hospital-a.key", "telerad-c.key"] {
        assert_eq!(mode(&pki.join(k)), 0o600, "{k}");
    }
    for site in ["hospital-a", "telerad-c"] {
        let n = fed.node(site);
        let data = &n.config.data_dir;
        assert_eq!(mode(data), 0o700, "{site} data folder");
        assert_eq!(mode(n.audit.path()), 0o600, "{site} audit log");
    }
    let c = fed.node("telerad-c");
    for f in [
        store_dir(c).join("index/db"),
        fed.node("hospital-a").config.data_dir.join("vault/db"),
    ] {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
    // A TLS key others can read is refused with the site key's message.
    let open = fed.dir.path().join("open.key");
    std::fs::copy(pki.join("hospital-a.key"), &open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut paths = tls_paths(&pki, "hospital-a");
    paths.key = open.clone();
    let e = SiteTls::load("hospital-a", &paths)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("is readable by group or others (mode 644); run `chmod 600"),
        "{e}"
    );
    let cfg_a = fed.node("hospital-a").config.clone();
    let cfg_c = c.config.clone();
    // `serve` returns once its background loops have ended: the stopped nodes hold no database.
    let _kept = fed.stop_keeping_files().await;

    // The index went missing beside blobs: refused with a clear message.
    let index = cfg_c.data_dir.join("store/index");
    std::fs::rename(&index, cfg_c.data_dir.join("index.moved")).unwrap();
    let node = Node::open(cfg_c).unwrap();
    let e = node.store().err().unwrap().to_string();
    assert!(e.contains("index") && e.contains("missing"), "{e}");
    // The vault went missing at the origin: refused.
    let vault = cfg_a.data_dir.join("vault");
    std::fs::rename(&vault, cfg_a.data_dir.join("vault.moved")).unwrap();
    let node = Node::open(cfg_a).unwrap();
    let e = node.vault().err().unwrap().to_string();
    assert!(e.contains("vault") && e.contains("missing"), "{e}");
}

// A partner whose certificate is revoked while a transfer to it runs: the sender stops
// streaming (the server side already cuts a revoked client's open connections).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_stops_when_the_partners_certificate_is_revoked_meanwhile() {
    use pacs_broker::federation::crl::revoke_with_dev_ca;
    let fed = Federation::start_with(&["hospital-a", "telerad-c"], tight).await;
    let pki = fed.pki();
    let crl = fed.dir.path().join("crl-a.pem");
    revoke_with_dev_ca(&pki.join("ca.pem"), &pki.join("ca.key"), &[], &crl, 30).unwrap();
    let mut paths = tls_paths(&pki, "hospital-a");
    paths.crl = Some(crl.clone());
    let a = SiteTls::load("hospital-a", &paths).unwrap();
    let node = fed.node("hospital-a").clone();
    let (study, inst) = instances(
        &node,
        &fed.dir.path().join("s"),
        3,
        &SyntheticPatient::default(),
        |_| {},
    );
    // Connected, the partner's certificate verified; then it is revoked and hospital-a's node
    // reloads its CRL (as `serve` does when the file changes) before the instances stream.
    let mut client = client_of(&fed, &a).await.unwrap();
    client.raw().hello(HelloRequest {}).await.unwrap();
    revoke_with_dev_ca(
        &pki.join("ca.pem"),
        &pki.join("ca.key"),
        &[pki.join("telerad-c.pem")],
        &crl,
        30,
    )
    .unwrap();
    assert!(matches!(a.reload_crl_if_changed(), Some(Ok(_))));
    let e = client
        .send_study(AGREEMENT, FLOW, "treatment", &study, vec![], &inst, true)
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("certificate was revoked during the transfer"),
        "{e}"
    );
    assert!(!e.is_transient(), "not retried: {e}");
    let store = fed.node("telerad-c").store().unwrap();
    assert!(
        pacs_broker::store::Store::studies(store.as_ref())
            .unwrap()
            .is_empty(),
        "nothing committed"
    );
    fed.stop().await;
}
