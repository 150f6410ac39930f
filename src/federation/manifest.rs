//! The manifest of a pending offer, on disk.
//!
//! Owns: [`Manifest`], the instances an offer announced, as fixed-size records sorted by
//! SHA-256 in a file of the store's staging area, searched in place (binary search with
//! positioned reads). A pending offer therefore holds a file and a few hundred bytes of memory
//! whatever its size; a transfer reads one record per instance it receives. The file is removed
//! when the offer is consumed or expires (and at start-up, with the rest of staging).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Bytes of one record: SHA-256, size, state, UID length, UID (padded to 64).
pub const RECORD: usize = 32 + 8 + 1 + 1 + 64;

/// What the receiver does about one announced instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// To be received in the transfer.
    Wanted = 0,
    /// Held already (same sender, agreement and flow; re-hashed and re-checked at the offer).
    Held = 1,
    /// Verified and kept from an interrupted transfer of the same study.
    Resumed = 2,
}

/// One announced instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub sha256: [u8; 32],
    pub size: u64,
    pub disposition: Disposition,
    pub sop_instance_uid: String,
}

impl Entry {
    fn encode(&self) -> [u8; RECORD] {
        let mut r = [0u8; RECORD];
        r[..32].copy_from_slice(&self.sha256);
        r[32..40].copy_from_slice(&self.size.to_le_bytes());
        r[40] = self.disposition as u8;
        let uid = self.sop_instance_uid.as_bytes();
        let n = uid.len().min(64);
        r[41] = n as u8;
        r[42..42 + n].copy_from_slice(&uid[..n]);
        r
    }

    fn decode(r: &[u8; RECORD]) -> Entry {
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(&r[..32]);
        let n = usize::from(r[41]).min(64);
        Entry {
            sha256,
            size: u64::from_le_bytes(r[32..40].try_into().expect("8 bytes")),
            disposition: match r[40] {
                1 => Disposition::Held,
                2 => Disposition::Resumed,
                _ => Disposition::Wanted,
            },
            sop_instance_uid: String::from_utf8_lossy(&r[42..42 + n]).into_owned(),
        }
    }
}

/// A pending offer's instances in a staging file.
#[derive(Debug)]
pub struct Manifest {
    file: File,
    path: PathBuf,
    len: usize,
}

impl Manifest {
    /// Writes `entries` (sorted here by SHA-256) to `file` (opened for reading and writing) at
    /// `path`. No fsync: a pending offer does not survive a restart (staging is cleared).
    pub fn write(file: File, path: PathBuf, mut entries: Vec<Entry>) -> std::io::Result<Manifest> {
        entries.sort_by_key(|a| a.sha256);
        let len = entries.len();
        {
            let mut w = BufWriter::with_capacity(64 * 1024, &file);
            for e in &entries {
                w.write_all(&e.encode())?;
            }
            w.flush()?;
        }
        Ok(Manifest { file, path, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The record at `index`.
    pub fn get(&self, index: usize) -> std::io::Result<Entry> {
        let mut r = [0u8; RECORD];
        self.file.read_exact_at(&mut r, (index * RECORD) as u64)?;
        Ok(Entry::decode(&r))
    }

    /// The record of `sha256` and its index, if announced.
    pub fn find(&self, sha256: &[u8; 32]) -> std::io::Result<Option<(usize, Entry)>> {
        let (mut lo, mut hi) = (0usize, self.len);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let e = self.get(mid)?;
            match e.sha256.cmp(sha256) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Ok(Some((mid, e))),
            }
        }
        Ok(None)
    }

    /// Every record with `disposition`, in order.
    pub fn with(&self, disposition: Disposition) -> std::io::Result<Vec<Entry>> {
        let mut out = Vec::new();
        for i in 0..self.len {
            let e = self.get(i)?;
            if e.disposition == disposition {
                out.push(e);
            }
        }
        Ok(out)
    }

    /// Removes the file.
    pub fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_rw(path: &Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn records_are_found_by_hash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        let entries: Vec<Entry> = (0..1000u32)
            .map(|i| Entry {
                sha256: sha2::Digest::finalize(sha2::Digest::chain_update(
                    <sha2::Sha256 as sha2::Digest>::new(),
                    i.to_le_bytes(),
                ))
                .into(),
                size: u64::from(i) + 1,
                disposition: if i % 3 == 0 {
                    Disposition::Held
                } else {
                    Disposition::Wanted
                },
                sop_instance_uid: format!("2.25.{i}"),
            })
            .collect();
        let m = Manifest::write(open_rw(&path), path.clone(), entries.clone()).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            (1000 * RECORD) as u64
        );
        for e in &entries {
            let (_, found) = m.find(&e.sha256).unwrap().unwrap();
            assert_eq!(&found, e);
        }
        assert!(m.find(&[7u8; 32]).unwrap().is_none());
        assert_eq!(m.with(Disposition::Held).unwrap().len(), 334);
        m.remove();
        assert!(!path.exists());
    }
}
