//! Throughput of encryption at rest on this machine: sealing and opening with the streaming
//! AES-256-GCM format of `store::sealed` (64 KiB segments), in memory (no disk in the figure),
//! one core.
//!
//! ```text
//! cargo bench --bench at_rest
//! AT_REST_BENCH_MB=1024 cargo bench --bench at_rest
//! ```

use std::io::{Read, Write};
use std::time::Instant;

use pacs_broker::pseudonym::SiteKeys;
use pacs_broker::store::sealed::AtRest;

fn main() {
    let mb: usize = std::env::var("AT_REST_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let data: Vec<u8> = (0..mb << 20).map(|i| (i * 31 % 251) as u8).collect();
    let at_rest = AtRest::new(&SiteKeys::generate(), true);
    raw(&data);
    let mut best_seal = f64::MAX;
    let mut best_open = f64::MAX;
    let mut sealed = Vec::with_capacity(data.len() + data.len() / 1000 + 64);
    for _ in 0..3 {
        sealed.clear();
        let t = Instant::now();
        let mut w = at_rest.writer(&mut sealed).unwrap();
        for chunk in data.chunks(1 << 20) {
            w.write_all(chunk).unwrap();
        }
        w.finish().unwrap();
        best_seal = best_seal.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let mut r = at_rest
            .reader(&sealed[..], std::path::Path::new("bench"))
            .unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut n = 0;
        loop {
            let k = r.read(&mut buf).unwrap();
            if k == 0 {
                break;
            }
            n += k;
        }
        assert_eq!(n, data.len());
        best_open = best_open.min(t.elapsed().as_secs_f64());
    }
    let gbs = |s: f64| data.len() as f64 / s / 1e9;
    println!(
        "at rest, {mb} MiB in memory, one core: seal {:.2} GB/s, open (authenticate + decrypt) {:.2} GB/s; overhead {} bytes ({:.3} %)",
        gbs(best_seal),
        gbs(best_open),
        sealed.len() - data.len(),
        (sealed.len() - data.len()) as f64 * 100.0 / data.len() as f64
    );
}

/// The raw AEADs on the same buffer (64 KiB segments): the aes-gcm crate and ring.
fn raw(data: &[u8]) {
    use aes_gcm::aead::{AeadInPlace, KeyInit};
    let key = [7u8; 32];
    let c = aes_gcm::Aes256Gcm::new_from_slice(&key).unwrap();
    let mut buf = data.to_vec();
    let t = Instant::now();
    for (i, seg) in buf.chunks_mut(64 << 10).enumerate() {
        let mut n = [0u8; 12];
        n[..8].copy_from_slice(&(i as u64).to_be_bytes());
        c.encrypt_in_place_detached(aes_gcm::Nonce::from_slice(&n), b"", seg)
            .unwrap();
    }
    println!(
        "raw aes-gcm crate: {:.2} GB/s",
        data.len() as f64 / t.elapsed().as_secs_f64() / 1e9
    );
    let k = ring::aead::LessSafeKey::new(
        ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &key).unwrap(),
    );
    let t = Instant::now();
    for (i, seg) in buf.chunks_mut(64 << 10).enumerate() {
        let mut n = [0u8; 12];
        n[..8].copy_from_slice(&(i as u64).to_be_bytes());
        let _tag = k
            .seal_in_place_separate_tag(
                ring::aead::Nonce::assume_unique_for_key(n),
                ring::aead::Aad::empty(),
                seg,
            )
            .unwrap();
    }
    println!(
        "raw ring: {:.2} GB/s",
        data.len() as f64 / t.elapsed().as_secs_f64() / 1e9
    );
}
