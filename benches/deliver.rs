//! Delivery to the site's PACS: a generated CT study (512x512, 16-bit) committed to a receiving
//! store with `[dicom.deliver]` on, then forwarded by the delivery worker (C-STORE, one
//! association per batch) to Debian's Orthanc; against dcmtk `storescu` (TCP_NODELAY=1) of the
//! same files into a second, fresh Orthanc on the same machine in the same run.
//!
//!     cargo bench --bench deliver                       # 500 instances
//!     DELIVER_BENCH_INSTANCES=100 cargo bench --bench deliver
//!
//! A benchmark, not a test: it prints instances/s, MB/s and the ratio. Needs `orthanc` and
//! `dcmtk` (.ci/setup installs both).

#[path = "../tests/common/orthanc.rs"]
mod orthanc;

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use orthanc::Orthanc;
use pacs_broker::audit::AuditLog;
use pacs_broker::config::DeliverConfig;
use pacs_broker::demo::{write_synthetic_ct, SyntheticPatient};
use pacs_broker::dicom_net::deliver::PacsDelivery;
use pacs_broker::store::{LocalStore, StagedInstance, Store, StudyKey};
use sha2::{Digest, Sha256};

fn main() {
    let n: usize = std::env::var("DELIVER_BENCH_INSTANCES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(500);
    let dir = tempfile::tempdir().unwrap();
    let files = write_synthetic_ct(
        &dir.path().join("study"),
        &SyntheticPatient::default(),
        n,
        512,
    )
    .unwrap();
    let bytes: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum();
    let mb = bytes as f64 / 1e6;

    // Ours: commit into a receiving store (queues every instance), then time the worker.
    let pacs = Orthanc::start();
    let store = Arc::new(LocalStore::open(&dir.path().join("store")).unwrap());
    let audit = Arc::new(AuditLog::open(&dir.path().join("audit.log")).unwrap());
    let delivery = PacsDelivery::new(
        &DeliverConfig::new(&pacs.aet, &pacs.dicom_address()),
        "telerad-c",
        store.clone(),
        audit,
    )
    .unwrap();
    let staged: Vec<StagedInstance> = files
        .iter()
        .map(|f| {
            let data = std::fs::read(f).unwrap();
            let (mut file, path) = store.stage_file().unwrap();
            file.write_all(&data).unwrap();
            let uid = dicom_object::open_file(f)
                .unwrap()
                .meta()
                .media_storage_sop_instance_uid()
                .to_string();
            StagedInstance {
                path,
                sha256: Sha256::digest(&data).into(),
                size: data.len() as u64,
                sop_instance_uid: uid,
            }
        })
        .collect();
    let key = StudyKey {
        agreement: "bench".into(),
        flow: "bench".into(),
        from_site: "hospital-a".into(),
        study_token: "2.25.1".into(),
    };
    store.commit(&key, n, staged, vec![]).unwrap();
    let queue = store.delivery_queue();
    assert_eq!(queue.entries().unwrap().len(), n);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let started = Instant::now();
    let ours = rt.block_on(async {
        let worker = delivery.start();
        while !queue.entries().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let took = started.elapsed();
        worker.stop().await;
        took
    });
    assert_eq!(pacs.instances().len(), n, "every instance in Orthanc");

    // dcmtk storescu of the same files into a fresh Orthanc.
    let other = Orthanc::start();
    let started = Instant::now();
    let status = std::process::Command::new("storescu")
        .env("TCP_NODELAY", "1")
        .args([
            "-aec",
            &other.aet,
            "127.0.0.1",
            &other.dicom_port.to_string(),
        ])
        .args(&files)
        .status()
        .expect("dcmtk storescu (run .ci/setup)");
    let theirs = started.elapsed();
    assert!(status.success(), "storescu failed");
    assert_eq!(other.instances().len(), n);

    let rate = |d: Duration| (n as f64 / d.as_secs_f64(), mb / d.as_secs_f64());
    let (oi, om) = rate(ours);
    let (ti, tm) = rate(theirs);
    println!("delivery of {n} CT instances (512x512, 16-bit; {mb:.0} MB) to Orthanc on loopback:");
    println!(
        "  pacs-broker delivery worker: {:>7.0} ms  {oi:>6.0} instances/s  {om:>6.1} MB/s",
        ours.as_secs_f64() * 1e3
    );
    println!(
        "  dcmtk storescu (TCP_NODELAY=1): {:>4.0} ms  {ti:>6.0} instances/s  {tm:>6.1} MB/s",
        theirs.as_secs_f64() * 1e3
    );
    println!(
        "  ratio (storescu time / ours): {:.2}",
        theirs.as_secs_f64() / ours.as_secs_f64()
    );
}
