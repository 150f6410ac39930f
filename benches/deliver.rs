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

    // Into Orthanc (a real PACS: its per-instance commit sets the pace) ...
    let pacs = Orthanc::start();
    let ours = deliver_with_worker(
        &dir.path().join("a"),
        &files,
        &pacs.aet,
        &pacs.dicom_address(),
    );
    assert_eq!(pacs.instances().len(), n, "every instance in Orthanc");
    let other = Orthanc::start();
    let theirs = storescu(&files, &other.aet, other.dicom_port);
    assert_eq!(other.instances().len(), n);
    report("Orthanc", n, mb, ours, theirs);

    // ... and into dcmtk storescp --ignore (receives and discards: the SCU's own pace).
    let port = free_port();
    let mut sink = std::process::Command::new("storescp")
        .env("TCP_NODELAY", "1")
        .args(["--ignore", "-aet", "SINK", &port.to_string()])
        .spawn()
        .expect("dcmtk storescp (run .ci/setup)");
    std::thread::sleep(Duration::from_millis(500));
    let ours = deliver_with_worker(
        &dir.path().join("b"),
        &files,
        "SINK",
        &format!("127.0.0.1:{port}"),
    );
    let theirs = storescu(&files, "SINK", port);
    let _ = sink.kill();
    let _ = sink.wait();
    report("dcmtk storescp --ignore", n, mb, ours, theirs);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn storescu(files: &[std::path::PathBuf], aet: &str, port: u16) -> Duration {
    let started = Instant::now();
    let status = std::process::Command::new("storescu")
        .env("TCP_NODELAY", "1")
        .args(["-aec", aet, "127.0.0.1", &port.to_string()])
        .args(files)
        .status()
        .expect("dcmtk storescu (run .ci/setup)");
    assert!(status.success(), "storescu failed");
    started.elapsed()
}

/// Commits `files` into a fresh receiving store (which queues them) and times the worker until
/// the queue is empty.
fn deliver_with_worker(
    root: &std::path::Path,
    files: &[std::path::PathBuf],
    aet: &str,
    address: &str,
) -> Duration {
    let n = files.len();
    let store = Arc::new(LocalStore::open(&root.join("store")).unwrap());
    let audit = Arc::new(AuditLog::open(&root.join("audit.log")).unwrap());
    let delivery = PacsDelivery::new(
        &DeliverConfig::new(aet, address),
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
    let key = StudyKey::new("bench", "bench", "hospital-a", "2.25.1");
    store.commit(&key, n, staged, vec![]).unwrap();
    let queue = store.delivery_queue();
    assert_eq!(queue.entries().unwrap().len(), n);

    let rt = tokio::runtime::Runtime::new().unwrap();
    let started = Instant::now();
    rt.block_on(async {
        let worker = delivery.start();
        while !queue.entries().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let took = started.elapsed();
        worker.stop().await;
        took
    })
}

fn report(to: &str, n: usize, mb: f64, ours: Duration, theirs: Duration) {
    let rate = |d: Duration| (n as f64 / d.as_secs_f64(), mb / d.as_secs_f64());
    let (oi, om) = rate(ours);
    let (ti, tm) = rate(theirs);
    println!("delivery of {n} CT instances (512x512, 16-bit; {mb:.0} MB) to {to} on loopback:");
    println!(
        "  pacs-broker delivery worker:    {:>7.0} ms  {oi:>6.0} instances/s  {om:>6.1} MB/s",
        ours.as_secs_f64() * 1e3
    );
    println!(
        "  dcmtk storescu (TCP_NODELAY=1): {:>7.0} ms  {ti:>6.0} instances/s  {tm:>6.1} MB/s",
        theirs.as_secs_f64() * 1e3
    );
    println!(
        "  ratio (storescu time / ours): {:.2}",
        theirs.as_secs_f64() / ours.as_secs_f64()
    );
}
