//! "Partner under attack": a legitimate 500-instance study sent from Hospital A to Telerad C,
//! once undisturbed and once while Hospital B (a valid partner with its own flow) floods the
//! receiver with offers and holds idle connections open, in the same run and in alternating
//! rounds so that both share the machine's weather. Prints both times and the ratio
//! (undisturbed time / attacked time: 1.0 means the attack costs nothing; the target is >= 0.8).
//!
//!     cargo bench --bench attack
//!     ATTACK_BENCH_INSTANCES=200 ATTACK_BENCH_ROUNDS=1 cargo bench --bench attack
//!
//! The receiver runs with the default `[limits]`. The send measured is the federation transfer
//! (offer, 500 instances streamed, checked, stored and delivered, signed receipt): the instances
//! are de-identified before the clock starts.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use pacs_broker::config::TlsPaths;
use pacs_broker::demo::SyntheticPatient;
use pacs_broker::federation::client::{OutgoingInstance, PeerClient};
use pacs_broker::federation::proto::{InstanceManifest, OfferRequest};
use pacs_broker::federation::tls::SiteTls;
use pacs_broker::node::Node;
use sha2::{Digest, Sha256};

const FLOODER_AGREEMENT: &str = "bench-flooder";

fn flooder_agreement() -> String {
    agreement_toml("active", "false")
        .replace(
            "id = \"test-telerad\"",
            &format!("id = \"{FLOODER_AGREEMENT}\""),
        )
        .replace("from = \"hospital-a\"", "from = \"hospital-b\"")
        .replace("name = \"ct-reads\"", "name = \"b-reads\"")
}

fn tls(pki: &Path, site: &str) -> SiteTls {
    SiteTls::load(
        site,
        &TlsPaths {
            ca: pki.join("ca.pem"),
            cert: pki.join(format!("{site}.pem")),
            key: pki.join(format!("{site}.key")),
            crl: None,
        },
    )
    .unwrap()
}

/// A de-identified study of `n` instances (64x64 CT), ready to send.
fn study(node: &Node, dir: &Path, n: usize) -> (String, Vec<OutgoingInstance>) {
    prepared_study(node, dir, n, 64, &SyntheticPatient::default(), |_| {})
}

/// Hospital B's attack until `stop`: a flood of offers (1,000 instances each) on a few
/// connections, and idle connections opened over and over.
fn attack(
    fed_addr: String,
    b: SiteTls,
    stop: Arc<AtomicBool>,
    offers: Arc<AtomicU64>,
    idle: Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for w in 0..4u64 {
        let (addr, b, stop, offers) = (fed_addr.clone(), b.clone(), stop.clone(), offers.clone());
        tasks.push(tokio::spawn(async move {
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut c) = PeerClient::connect(&b, "telerad-c", &addr, "localhost").await
                else {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                };
                let template = OfferRequest {
                    complete: true,
                    audit_checkpoint: Vec::new(),
                    agreement_id: FLOODER_AGREEMENT.into(),
                    flow: "b-reads".into(),
                    study_token: String::new(),
                    purpose: "treatment".into(),
                    modalities: vec!["CT".into()],
                    instances: (0..1000u64)
                        .map(|i| InstanceManifest {
                            sop_instance_uid: format!("2.25.{}", w * 10_000 + i + 1),
                            sha256: Sha256::digest(format!("{w}/{i}")).to_vec(),
                            size: 1000,
                        })
                        .collect(),
                };
                while !stop.load(Ordering::Relaxed) {
                    k += 1;
                    let mut o = template.clone();
                    o.study_token = format!("2.25.{}", w * 1_000_000_000 + k);
                    // Accepted (up to the per-peer limit) or RESOURCE_EXHAUSTED: either way, more.
                    let _ = c.raw().offer(o).await;
                    offers.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let (addr, stop) = (fed_addr, stop);
    tasks.push(tokio::spawn(async move {
        // 200 connections that say nothing after the handshake, topped up as the receiver
        // closes them (over the per-peer connection limit after 2 s, the others when idle).
        let mut held = std::collections::VecDeque::new();
        while !stop.load(Ordering::Relaxed) {
            let want = if held.len() < 200 { 20 } else { 5 };
            for _ in 0..want {
                if let Ok(c) = pacs_broker::federation::tls::connect(
                    b.client.clone(),
                    &addr,
                    "localhost",
                    "telerad-c",
                    &b.pins,
                )
                .await
                {
                    held.push_back(c);
                    idle.fetch_add(1, Ordering::Relaxed);
                }
            }
            while held.len() > 200 {
                held.pop_front();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }));
    tasks
}

fn main() {
    let n: usize = std::env::var("ATTACK_BENCH_INSTANCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let rounds: usize = std::env::var("ATTACK_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let fed = Federation::start(&["hospital-a", "telerad-c"]).await;
        for site in fed.nodes.keys() {
            let policy = fed.dir.path().join(site).join("agreements/flooder.toml");
            std::fs::write(&policy, flooder_agreement()).unwrap();
            sign_by_all(fed.dir.path(), &policy);
        }
        let c = fed.node("telerad-c");
        while !c.agreements().agreements.contains_key(FLOODER_AGREEMENT) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let a_node = fed.node("hospital-a").clone();
        let pki = fed.pki();
        let a = tls(&pki, "hospital-a");
        let b = tls(&pki, "hospital-b");
        let addr = fed.addrs["telerad-c"].clone();
        println!("preparing {} studies of {n} instances (64x64 CT)...", rounds * 2);
        let studies: Vec<_> = (0..rounds * 2)
            .map(|i| study(&a_node, &fed.dir.path().join(format!("s{i}")), n))
            .collect();
        let bytes: u64 = studies[0].1.iter().map(|i| i.size).sum();
        let (mut calm, mut attacked) = (Vec::new(), Vec::new());
        let (offers, idle) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        for (i, (token, inst)) in studies.into_iter().enumerate() {
            let under_attack = i % 2 == 1;
            let stop = Arc::new(AtomicBool::new(false));
            let tasks = if under_attack {
                let t = attack(addr.clone(), b.clone(), stop.clone(), offers.clone(), idle.clone());
                tokio::time::sleep(Duration::from_millis(500)).await; // let the flood build up
                t
            } else {
                Vec::new()
            };
            let started = Instant::now();
            let mut client = PeerClient::connect(&a, "telerad-c", &addr, "localhost")
                .await
                .unwrap();
            let d = client
                .send_study(AGREEMENT, FLOW, "treatment", &token, vec!["CT".into()], &inst, true)
                .await
                .unwrap();
            let took = started.elapsed();
            assert_eq!(d.receipt.instances_stored as usize, n);
            stop.store(true, Ordering::Relaxed);
            for t in tasks {
                t.abort();
            }
            println!(
                "round {} {}: {:.2} s ({:.0} instances/s)",
                i / 2 + 1,
                if under_attack { "under attack" } else { "undisturbed" },
                took.as_secs_f64(),
                n as f64 / took.as_secs_f64()
            );
            if under_attack {
                attacked.push(took.as_secs_f64());
            } else {
                calm.push(took.as_secs_f64());
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            v[v.len() / 2]
        };
        let (m_calm, m_att) = (median(&mut calm), median(&mut attacked));
        println!(
            "\n{n} instances ({:.1} MB) Hospital A -> Telerad C, median of {rounds} rounds each:",
            bytes as f64 / 1e6
        );
        println!("  undisturbed:  {m_calm:.2} s");
        println!(
            "  under attack: {m_att:.2} s  (Hospital B: {} offers flooded, {} idle connections opened)",
            offers.load(Ordering::Relaxed),
            idle.load(Ordering::Relaxed)
        );
        println!("  ratio (undisturbed / under attack): {:.2}  (target >= 0.80)", m_calm / m_att);
        let log = std::fs::metadata(c.audit.path()).map(|m| m.len()).unwrap_or(0);
        println!("  receiver audit log after the run: {log} bytes");
        fed.stop().await;
    });
}
