//! Multi-node tests of the walking skeleton: two sites on loopback over mutual TLS 1.3.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use pacs_broker::config::TlsPaths;
use pacs_broker::demo::{write_synthetic_ct, SyntheticPatient};
use pacs_broker::federation::client::{OutgoingInstance, PeerClient, SendError};
use pacs_broker::federation::proto::{InstanceManifest, OfferRequest, TransferChunk};
use pacs_broker::federation::tls::SiteTls;
use pacs_broker::node::Node;

fn originals(files: &[PathBuf]) -> Vec<String> {
    use dicom_dictionary_std::tags;
    let p = SyntheticPatient::default();
    let mut v = vec![
        p.name.clone(),
        p.id.clone(),
        p.birth_date.clone(),
        p.accession.clone(),
    ];
    for f in files {
        let o = dicom_object::open_file(f).unwrap();
        for t in [
            tags::STUDY_INSTANCE_UID,
            tags::SERIES_INSTANCE_UID,
            tags::SOP_INSTANCE_UID,
        ] {
            v.push(
                o.element(t)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .trim_end_matches('\0')
                    .to_string(),
            );
        }
    }
    v.sort();
    v.dedup();
    v
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn store_dir(node: &Node) -> PathBuf {
    node.config.data_dir.join("store")
}

fn assert_nothing_stored(node: &Node) {
    let store = store_dir(node);
    assert!(
        files_under(&store.join("blobs")).is_empty(),
        "blobs were stored"
    );
    assert!(
        files_under(&store.join("inbox")).is_empty(),
        "inbox was written"
    );
    assert!(
        files_under(&store.join("staging")).is_empty(),
        "staging files were left behind"
    );
    use pacs_broker::store::Store;
    assert!(
        node.store().unwrap().studies().unwrap().is_empty(),
        "a study was indexed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sites_exchange_a_deidentified_study_idempotently() {
    let fed = Federation::start(&["hospital-a", "telerad-c"]).await;
    let src = fed.dir.path().join("study");
    let files = write_synthetic_ct(&src, &SyntheticPatient::default(), 6, 64).unwrap();
    let report = fed
        .node("hospital-a")
        .send(AGREEMENT, FLOW, None, std::slice::from_ref(&src))
        .await
        .unwrap();
    assert_eq!(report.studies.len(), 1);
    assert_eq!(report.studies[0].instances, 6);
    assert_eq!(report.studies[0].instances_sent, 6);
    assert!(report.held_back.is_empty(), "{:?}", report.held_back);

    let c = fed.node("telerad-c");
    let blobs = files_under(&store_dir(c).join("blobs"));
    let inbox = files_under(&store_dir(c).join("inbox"));
    // With inbox delivery and encryption at rest the inbox copy is the one stored copy: no
    // sealed blob beside it.
    assert!(blobs.is_empty(), "{blobs:?}");
    assert_eq!(inbox.len(), 6);
    let secrets = originals(&files);
    for f in blobs.iter().chain(&inbox) {
        let bytes = std::fs::read(f).unwrap();
        for s in &secrets {
            assert!(
                !contains(&bytes, s),
                "an original identifier survived in {}",
                f.display()
            );
        }
    }
    // What the receiver keeps of the study outside the inbox is sealed at rest (store::sealed):
    // the checksum lists of the inbox copies, one per commit (`send` offers what is
    // de-identified while the rest is, then the rest: one or two commits for six instances).
    let sums = files_under(&store_dir(c).join("sums"));
    assert!((1..=2).contains(&sums.len()), "{sums:?}");
    for f in &sums {
        assert!(
            pacs_broker::store::sealed::AtRest::key_id_of(f)
                .unwrap()
                .is_some(),
            "{} is not sealed",
            f.display()
        );
    }
    for f in &inbox {
        dicom_object::open_file(f).expect("delivered file parses with dicom-object");
    }
    for f in &inbox {
        let (ok, out) = run_tool("dcmdump", &["-q", f.to_str().unwrap()]);
        assert!(
            ok && !out.contains("E: "),
            "dcmdump rejected {}: {out}",
            f.display()
        );
    }

    // Re-sending the same study stores nothing new and is acknowledged.
    let again = fed
        .node("hospital-a")
        .send(AGREEMENT, FLOW, None, std::slice::from_ref(&src))
        .await
        .unwrap();
    assert_eq!(again.studies[0].instances_sent, 0);
    assert_eq!(again.studies[0].already_held, 6);
    assert!(files_under(&store_dir(c).join("blobs")).is_empty());
    assert_eq!(files_under(&store_dir(c).join("inbox")).len(), 6);
    use pacs_broker::store::Store;
    assert_eq!(c.store().unwrap().studies().unwrap().len(), 1);

    // Both audit logs verify and record the disclosure and the receipt.
    for site in ["hospital-a", "telerad-c"] {
        let n = fed.node(site);
        let v = pacs_broker::audit::verify(n.audit.path()).unwrap();
        assert!(v.entries >= 2, "{site} audited {} entries", v.entries);
        let log = std::fs::read(n.audit.path()).unwrap();
        for s in &secrets {
            assert!(!contains(&log, s), "PHI in the audit log of {site}");
        }
    }
    fed.stop().await;
}

/// A de-identified instance of the test flow, as the sender would produce it, in `dir`.
fn prepared_instances(node: &Node, dir: &Path, n: usize) -> (String, Vec<OutgoingInstance>) {
    prepared_study(node, dir, n, 32, &SyntheticPatient::default(), |_| {})
}

async fn client_for(fed: &Federation, tls: &SiteTls) -> Result<PeerClient, SendError> {
    PeerClient::connect(tls, "telerad-c", &fed.addrs["telerad-c"], "localhost").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_site_that_is_not_the_flow_sender_is_denied() {
    let fed = Federation::start(&["hospital-a", "telerad-c"]).await;
    let pki = fed.pki();
    let b_tls = SiteTls::load(
        "hospital-b",
        &TlsPaths {
            ca: pki.join("ca.pem"),
            cert: pki.join("hospital-b.pem"),
            key: pki.join("hospital-b.key"),
            crl: None,
        },
    )
    .unwrap();
    let (study, inst) = prepared_instances(fed.node("hospital-a"), fed.dir.path(), 2);
    let mut client = client_for(&fed, &b_tls).await.unwrap();
    let err = client
        .send_study(AGREEMENT, FLOW, "treatment", &study, vec![], &inst, true)
        .await
        .unwrap_err();
    match err {
        SendError::Offer { status, .. } => {
            assert_eq!(status.code(), tonic::Code::PermissionDenied);
            assert!(
                status.message().contains("hospital-b"),
                "{}",
                status.message()
            );
        }
        other => panic!("expected PERMISSION_DENIED, got {other}"),
    }
    assert_nothing_stored(fed.node("telerad-c"));
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_fails_the_handshake() {
    let fed = Federation::start(&["hospital-a", "telerad-c"]).await;
    let rogue = tempfile::tempdir().unwrap();
    pacs_broker::federation::pki::generate_dev_federation(rogue.path(), &["hospital-a".into()])
        .unwrap();
    // Trusts the real CA (so it would accept the server) but presents a certificate that another
    // CA issued for the sender's site id.
    let tls = SiteTls::load(
        "hospital-a",
        &TlsPaths {
            ca: fed.pki().join("ca.pem"),
            cert: rogue.path().join("hospital-a.pem"),
            key: rogue.path().join("hospital-a.key"),
            crl: None,
        },
    )
    .unwrap();
    let result = match client_for(&fed, &tls).await {
        Err(e) => Err(e.to_string()),
        Ok(mut c) => c
            .raw()
            .hello(pacs_broker::federation::proto::HelloRequest {})
            .await
            .map(|_| ())
            .map_err(|s| s.to_string()),
    };
    assert!(result.is_err(), "a rogue certificate was accepted");
    assert_nothing_stored(fed.node("telerad-c"));
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_connection_fails() {
    let fed = Federation::start(&["telerad-c"]).await;
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", fed.addrs["telerad-c"]))
            .unwrap()
            .connect_timeout(std::time::Duration::from_secs(5))
            .timeout(std::time::Duration::from_secs(5))
            .connect_lazy();
    let mut c = pacs_broker::federation::proto::federation_client::FederationClient::new(channel);
    let r = c
        .hello(pacs_broker::federation::proto::HelloRequest {})
        .await;
    assert!(r.is_err(), "a plaintext gRPC call succeeded");
    fed.stop().await;
}

async fn offer(client: &mut PeerClient, study: &str, inst: &[OutgoingInstance]) -> String {
    offer_answer(client, study, inst).await.transfer_id
}

async fn offer_answer(
    client: &mut PeerClient,
    study: &str,
    inst: &[OutgoingInstance],
) -> pacs_broker::federation::proto::OfferResponse {
    client
        .raw()
        .offer(OfferRequest {
            agreement_id: AGREEMENT.into(),
            flow: FLOW.into(),
            study_token: study.into(),
            purpose: "treatment".into(),
            modalities: vec!["CT".into()],
            complete: true,
            instances: inst
                .iter()
                .map(|i| InstanceManifest {
                    sop_instance_uid: i.sop_instance_uid.clone(),
                    sha256: i.sha256.to_vec(),
                    size: i.size,
                })
                .collect(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
}

fn chunks_of(transfer_id: &str, inst: &[OutgoingInstance], corrupt: bool) -> Vec<TransferChunk> {
    let mut v = vec![TransferChunk {
        transfer_id: transfer_id.into(),
        ..Default::default()
    }];
    for i in inst {
        let mut data = std::fs::read(&i.path).unwrap();
        if corrupt {
            let mid = data.len() / 2;
            data[mid] ^= 0xff;
        }
        v.push(TransferChunk {
            transfer_id: String::new(),
            instance_sha256: i.sha256.to_vec(),
            offset: 0,
            data: data.into(),
            last: true,
        });
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_chunk_is_rejected_and_nothing_is_stored() {
    let fed = Federation::start(&["hospital-a", "telerad-c"]).await;
    let (study, inst) = prepared_instances(fed.node("hospital-a"), fed.dir.path(), 2);
    let mut client = client_for(&fed, &fed.node("hospital-a").tls).await.unwrap();
    let id = offer(&mut client, &study, &inst).await;
    // The first instance is intact, the second corrupted: the whole transfer must be refused.
    let mut chunks = chunks_of(&id, &inst[..1], false);
    chunks.extend(chunks_of("", &inst[1..], true).into_iter().skip(1));
    let status = client
        .raw()
        .transfer(tokio_stream::iter(chunks))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::DataLoss, "{status}");
    assert!(status.message().contains("SHA-256"), "{}", status.message());
    assert_nothing_stored(fed.node("telerad-c"));
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_stream_stores_nothing_and_the_next_offer_resumes() {
    let fed = Federation::start(&["hospital-a", "telerad-c"]).await;
    let c = fed.node("telerad-c");
    let (study, inst) = prepared_instances(fed.node("hospital-a"), fed.dir.path(), 3);
    let mut client = client_for(&fed, &fed.node("hospital-a").tls).await.unwrap();
    let id = offer(&mut client, &study, &inst).await;
    let mut chunks = chunks_of(&id, &inst[..2], false);
    // The first instance whole, half of the second, then the stream ends (a dropped link).
    let last = chunks.last_mut().unwrap();
    last.data.truncate(last.data.len() / 2);
    last.last = false;
    let status = client
        .raw()
        .transfer(tokio_stream::iter(chunks))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Aborted, "{status}");
    assert!(
        status.message().contains("1 verified instances are kept"),
        "{}",
        status.message()
    );
    // Nothing is stored: no blob, no index entry, nothing delivered.
    let store = store_dir(c);
    assert!(files_under(&store.join("blobs")).is_empty());
    assert!(files_under(&store.join("inbox")).is_empty());
    use pacs_broker::store::Store;
    assert!(c.store().unwrap().studies().unwrap().is_empty());
    assert_eq!(
        files_under(&store.join("staging")).len(),
        1,
        "the verified instance is kept"
    );

    // The next offer of the same study resumes: the receiver already has the first instance.
    let answer = offer_answer(&mut client, &study, &inst).await;
    assert_eq!(answer.already_have, vec![inst[0].sha256.to_vec()]);
    let receipt = client
        .raw()
        .transfer(tokio_stream::iter(chunks_of(
            &answer.transfer_id,
            &inst[1..],
            false,
        )))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(receipt.instances_stored, 3);
    assert!(files_under(&store.join("blobs")).is_empty());
    assert_eq!(files_under(&store.join("inbox")).len(), 3);
    assert!(files_under(&store.join("staging")).is_empty());
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_instance_streams_in_chunks() {
    // 2048x2048x16-bit = 8 MiB: larger than one gRPC message, sent as 1 MiB chunks.
    let fed = Federation::start(&["hospital-a", "telerad-c"]).await;
    let src = fed.dir.path().join("big");
    write_synthetic_ct(&src, &SyntheticPatient::default(), 1, 2048).unwrap();
    let report = fed
        .node("hospital-a")
        .send(AGREEMENT, FLOW, None, std::slice::from_ref(&src))
        .await
        .unwrap();
    assert!(report.studies[0].bytes_sent > 8 << 20);
    assert_eq!(
        files_under(&store_dir(fed.node("telerad-c")).join("inbox")).len(),
        1
    );
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_says_per_file_why_anything_was_held_back_and_a_suspension_as_such() {
    use pacs_broker::ingest::HeldBackKind;
    let fed = Federation::start(&["hospital-a", "telerad-c"]).await;
    let src = fed.dir.path().join("study");
    write_synthetic_ct(&src, &SyntheticPatient::default(), 2, 32).unwrap();
    std::fs::write(src.join("notes.txt"), b"not DICOM").unwrap();
    let a = fed.node("hospital-a");
    let report = a
        .send(AGREEMENT, FLOW, None, std::slice::from_ref(&src))
        .await
        .unwrap();
    assert_eq!(
        report.studies.len(),
        1,
        "queued: {:?}, held back: {:?}",
        report.queued,
        report.held_back
    );
    assert_eq!(report.studies[0].instances, 2);
    assert_eq!(report.held_back.len(), 1, "{:?}", report.held_back);
    let held = &report.held_back[0];
    assert_eq!(held.kind, HeldBackKind::Failed);
    assert!(held.input.ends_with("notes.txt"), "{held:?}");
    assert!(!held.reason.is_empty());
    assert_eq!(held.path.as_deref(), Some(src.join("notes.txt").as_path()));
    // The outbox entry names the patient token(s) that left.
    let entries = a.outbox().entries();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].1.patient_tokens.len(), 1);
    assert!(!entries[0].1.patient_tokens[0].contains("MRN"));

    // hospital-a's privacy officer suspends hospital-a in the agreement: send says so.
    std::fs::write(
        a.config.agreements.join("test.toml"),
        agreement_toml("active", "true"),
    )
    .unwrap();
    a.reload_agreements();
    let err = a
        .send(AGREEMENT, FLOW, None, std::slice::from_ref(&src))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("suspended"), "{err}");
    fed.stop().await;
}
