//! A party suspended in its agreement is cut off at once: new offers are refused within a second
//! of the file change, and an in-flight transfer is cut with nothing half-stored.

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
    let deid = Deidentifier::new(flow.deid, a.keys.tokenizer(AGREEMENT));
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
        instances: blobs
            .iter()
            .map(|(uid, b)| InstanceManifest {
                sop_instance_uid: uid.clone(),
                sha256: Sha256::digest(b).to_vec(),
                size: b.len() as u64,
            })
            .collect(),
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
        data: b0[..b0.len() / 2].to_vec(),
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
