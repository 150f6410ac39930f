//! What the content digest costs on this machine: SHA-256 (`sha2`, the digest every manifest,
//! receipt, blob name and outbox entry carries) against BLAKE3, over CT-slice-sized instances
//! in memory, one core.
//!
//! A `send` hashes every instance twice, once for its manifest at the origin and once when the
//! partner verifies it before signing its receipt, and in the `dicom_edge` bench both run on
//! the same machine. This bench gives the per-byte figure behind that, so that a site can weigh
//! the digest on its own hardware (docs/performance.md, "What sets the pace"). BLAKE3 is a
//! dev-dependency only: the product hashes with SHA-256.
//!
//! ```text
//! cargo bench --bench digest
//! DIGEST_BENCH_INSTANCES=1000 cargo bench --bench digest
//! ```

use std::time::Instant;

use sha2::{Digest, Sha256};

/// Bytes of one 512 x 512, 16-bit CT slice with its header, as in the `dicom_edge` study.
const INSTANCE: usize = 526_000;

fn main() {
    let n: usize = std::env::var("DIGEST_BENCH_INSTANCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    // Pixel-like data: a smooth ramp with noise, not zeros (no hash cares, but a reader may).
    let instances: Vec<Vec<u8>> = (0..n)
        .map(|k| {
            (0..INSTANCE)
                .map(|i| {
                    ((i / 2 + k * 7) as u32 ^ (i as u32).wrapping_mul(2_654_435_761) >> 28) as u8
                })
                .collect()
        })
        .collect();
    let total = (n * INSTANCE) as f64;
    let best = |f: &dyn Fn(&[u8]) -> [u8; 32]| {
        let mut best = f64::MAX;
        let mut check = 0u8;
        for _ in 0..3 {
            let t = Instant::now();
            for i in &instances {
                check ^= f(i)[0];
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        std::hint::black_box(check);
        best
    };
    let sha = best(&|b| Sha256::digest(b).into());
    let blake = best(&|b| *blake3::hash(b).as_bytes());
    let study = |s: f64| 2.0 * s;
    println!(
        "digest       {n} instances of {:.0} KB in memory, one core, best of 3",
        INSTANCE as f64 / 1e3
    );
    println!(
        "SHA-256      {:.3} s = {:.2} GB/s; both passes of a send (origin + partner): {:.3} CPU-s",
        sha,
        total / sha / 1e9,
        study(sha)
    );
    println!(
        "BLAKE3       {:.3} s = {:.2} GB/s; both passes: {:.3} CPU-s ({:.1}x faster than SHA-256)",
        blake,
        total / blake / 1e9,
        study(blake),
        sha / blake
    );
}
