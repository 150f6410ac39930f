//! Enforcement of agreements in running nodes: a party suspended in its agreement is cut off at
//! once (new offers refused within a second of the file change, an in-flight transfer cut with
//! nothing half-stored); unsigned edits never widen what is allowed.

mod common;

use std::time::{Duration, Instant};

use common::*;
use pacs_broker::deid::Deidentifier;
use pacs_broker::demo::{write_synthetic_ct, SyntheticPatient};
use pacs_broker::federation::client::PeerClient;
use pacs_broker::federation::proto::{InstanceManifest, OfferRequest, TransferChunk};
use sha2::{Digest, Sha256};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspending_a_party_cuts_it_off_within_a_second() {
    let fed = Federation::start(&["hospital-a", "telerad-c"]).await;
    let a = fed.node("hospital-a");
    let c = fed.node("telerad-c");
    // Two de-identified instances.
    let src = fed.dir.path().join("src");
    let files = write_synthetic_ct(&src, &SyntheticPatient::default(), 2, 64).unwrap();
    let flow = a.agreements().agreements[AGREEMENT]
        .flow(FLOW)
        .unwrap()
        .clone();
    let deid = Deidentifier::new(flow.deid, a.keys.tokenizer(AGREEMENT).unwrap());
    let mut blobs = Vec::new();
    let mut study = String::new();
    for f in &files {
        let d = deid
            .deidentify(dicom_object::open_file(f).unwrap())
            .unwrap();
        let mut bytes = Vec::new();
        d.object.write_all(&mut bytes).unwrap();
        study = d.study_uid.clone();
        blobs.push((d.sop_instance_uid, bytes));
    }
    let manifest = |blobs: &[(String, Vec<u8>)]| OfferRequest {
        agreement_id: AGREEMENT.into(),
        flow: FLOW.into(),
        study_token: study.clone(),
        purpose: "treatment".into(),
        modalities: vec!["CT".into()],
        complete: true,
        instances: blobs
            .iter()
            .map(|(uid, b)| InstanceManifest {
                sop_instance_uid: uid.clone(),
                sha256: Sha256::digest(b).to_vec(),
                size: b.len() as u64,
            })
            .collect(),
        ..Default::default()
    };
    let mut client = PeerClient::connect(&a.tls, "telerad-c", &fed.addrs["telerad-c"], "localhost")
        .await
        .unwrap();
    let id = client
        .raw()
        .offer(manifest(&blobs))
        .await
        .unwrap()
        .into_inner()
        .transfer_id;

    // Start the transfer: the header and half of the first instance, then hold the stream open.
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(TransferChunk {
        transfer_id: id,
        ..Default::default()
    })
    .await
    .unwrap();
    let (uid0, b0) = &blobs[0];
    let _ = uid0;
    tx.send(TransferChunk {
        transfer_id: String::new(),
        instance_sha256: Sha256::digest(b0).to_vec(),
        offset: 0,
        data: b0[..b0.len() / 2].to_vec().into(),
        last: false,
    })
    .await
    .unwrap();
    let mut raw = client.raw().clone();
    let transfer = tokio::spawn(async move {
        raw.transfer(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The privacy officer suspends hospital-a at the receiving site.
    let changed = Instant::now();
    std::fs::write(
        c.config.agreements.join("test.toml"),
        agreement_toml("active", "true"),
    )
    .unwrap();

    let status = tokio::time::timeout(Duration::from_secs(5), transfer)
        .await
        .expect("the in-flight transfer was not cut off")
        .unwrap()
        .unwrap_err();
    let cut_after = changed.elapsed();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
    assert!(
        status.message().contains("suspended"),
        "{}",
        status.message()
    );
    assert!(
        cut_after < Duration::from_secs(1),
        "cut off after {cut_after:?}"
    );
    drop(tx);

    // A new offer is refused, and says why.
    let refused = client.raw().offer(manifest(&blobs)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(
        refused.message().contains("hospital-a"),
        "{}",
        refused.message()
    );

    // Nothing half-stored.
    use pacs_broker::store::Store;
    let store = c.config.data_dir.join("store");
    assert!(files_under(&store.join("blobs")).is_empty());
    assert!(files_under(&store.join("staging")).is_empty());
    assert!(c.store().unwrap().studies().unwrap().is_empty());
    fed.stop().await;
}

async fn offer_with_purpose(client: &mut PeerClient, purpose: &str) -> Result<(), tonic::Status> {
    client
        .raw()
        .offer(OfferRequest {
            agreement_id: AGREEMENT.into(),
            flow: FLOW.into(),
            study_token: "2.25.1".into(),
            purpose: purpose.into(),
            modalities: vec!["CT".into()],
            complete: true,
            instances: vec![InstanceManifest {
                sop_instance_uid: "2.25.2".into(),
                sha256: vec![7; 32],
                size: 10,
            }],
            ..Default::default()
        })
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsigned_edit_never_widens_and_an_unsigned_agreement_is_not_enforced() {
    let fed = Federation::start(&["hospital-a", "telerad-c"]).await;
    let a = fed.node("hospital-a");
    let c = fed.node("telerad-c");
    let mut client = PeerClient::connect(&a.tls, "telerad-c", &fed.addrs["telerad-c"], "localhost")
        .await
        .unwrap();
    // Research is not a purpose of the signed flow.
    let e = offer_with_purpose(&mut client, "research")
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(e.message().contains("research"), "{}", e.message());
    // Someone widens the flow without the parties' signatures: still refused after the reload.
    let policy = c.config.agreements.join("test.toml");
    let widened = agreement_toml("active", "false").replace(
        r#"purposes = ["treatment", "teleradiology-report"]"#,
        r#"purposes = ["treatment", "teleradiology-report", "research"]"#,
    );
    assert!(widened.contains("\"research\""));
    std::fs::write(&policy, widened).unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let e = offer_with_purpose(&mut client, "research")
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        tonic::Code::PermissionDenied,
        "an unsigned edit widened the flow"
    );
    // The signed purposes still work (the last fully signed version stays in force).
    offer_with_purpose(&mut client, "treatment").await.unwrap();
    // Once every party signs the new version, it is in force.
    sign_by_all(fed.dir.path(), &policy);
    tokio::time::sleep(Duration::from_millis(700)).await;
    offer_with_purpose(&mut client, "research").await.unwrap();

    // A brand-new agreement that nobody signed is never enforced.
    let other = agreement_toml("active", "false").replace(AGREEMENT, "unsigned-agreement");
    std::fs::write(c.config.agreements.join("unsigned.toml"), other).unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!c.agreements().agreements.contains_key("unsigned-agreement"));
    fed.stop().await;
}
