//! Destroying a received study at the end of its retention, and the durable queue of the
//! destruction receipts its origin has not yet acknowledged.
//!
//! Owns: [`LocalStore::destroy_study`], which removes everything the store holds of one study —
//! its PACS delivery queue entries, its index record, its inbox files (with encryption at rest
//! and no PACS, the one stored copy; with their checksum list), the instances kept for a
//! resumption, its blobs (those no other study record shares) and any quarantined copy of them —
//! in a crash-safe order; and the `destroyed` tree of the index database: one tombstone per
//! destroyed study (tokens, counts, times, the study digest; never PHI and never instance UIDs),
//! which is also the queue of destruction receipts to deliver to the origin.
//!
//! Crash safety: the index record is replaced by a tombstone in state `deleting` (listing the
//! blobs to delete) in one sled transaction, flushed, before any file is deleted; the files go
//! next; only then does the tombstone become `deleted` (and its receipt due). A crash in between
//! leaves a `deleting` tombstone that [`LocalStore::resume_destructions`] finishes. Nothing is
//! reported destroyed before it is.
//!
//! Does not own: when a study expires (`retention`, from the flow in force and a clock), signing
//! or sending the receipt (`retention`, `federation::destruction`).

use std::collections::BTreeSet;
use std::fs;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use super::{safe_name, sync_dir, LocalStore, Store, StoreError, StudyKey};

/// Where a destroyed study stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DestructionState {
    /// The index record is gone; files are being deleted (finished after a crash).
    Deleting,
    /// Everything is deleted; the destruction receipt waits for the origin's acknowledgement.
    Deleted,
    /// The origin acknowledged the signed destruction receipt.
    Acknowledged,
}

/// The tombstone of one destroyed study.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Destruction {
    pub agreement: String,
    pub flow: String,
    /// The origin, to which the receipt goes.
    pub from_site: String,
    pub study_token: String,
    pub instances: u32,
    /// SHA-256 over the sorted instance hashes (hex), as in the transfer receipt.
    pub study_digest: String,
    /// Unix seconds: first receipt of the study, and its destruction.
    pub received_at: u64,
    pub destroyed_at: u64,
    pub retention_days: u32,
    /// The flow's `after` ("delete" or "return").
    pub after: String,
    /// Whether received instances were also queued for the site's PACS.
    pub forwarded_to_site_pacs: bool,
    pub state: DestructionState,
    /// Blobs (SHA-256 hex) still to delete, while `deleting`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pending_blobs: Vec<String>,
    pub receipt_attempts: u32,
    /// Unix seconds of the next attempt to deliver the receipt.
    pub next_attempt: u64,
    pub last_error: Option<String>,
}

/// The retention that ended, as the tombstone and the receipt record it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionEnded {
    pub days: u32,
    pub after: String,
}

/// Position of a tombstone in the `destroyed` tree.
pub type TombstoneKey = Vec<u8>;

/// How many study records list each blob (SHA-256 hex): built once per sweep
/// ([`LocalStore::blob_refs`]) so that destroying many studies does not rescan the index for
/// each, and kept current by [`LocalStore::destroy_study`].
#[derive(Debug, Default, Clone)]
pub struct BlobRefs(std::collections::HashMap<String, usize>);

/// Seconds before the next attempt to deliver a receipt after `attempts` failures: 30 s
/// doubling, at most six hours.
pub fn receipt_backoff_secs(attempts: u32) -> u64 {
    (30u64 << attempts.saturating_sub(1).min(12)).min(6 * 3600)
}

fn corrupt(e: serde_json::Error) -> StoreError {
    StoreError::Corrupt(format!("destruction record: {e}"))
}

impl LocalStore {
    fn destroyed_tree(&self) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree("destroyed")?)
    }

    /// How many study records list each blob, now.
    pub fn blob_refs(&self) -> Result<BlobRefs, StoreError> {
        let mut refs = BlobRefs::default();
        for r in self.studies()? {
            let distinct: BTreeSet<String> = r.instances.into_values().collect();
            for sha in distinct {
                *refs.0.entry(sha).or_default() += 1;
            }
        }
        Ok(refs)
    }

    /// Destroys everything the store holds of the study `key` (see the module doc for the
    /// order), as of `now` (Unix seconds); a blob that `refs` says another study record lists
    /// is kept. `Ok(None)` when no such study is held.
    pub fn destroy_study(
        &self,
        key: &StudyKey,
        retention: &RetentionEnded,
        now: u64,
        refs: &mut BlobRefs,
    ) -> Result<Option<Destruction>, StoreError> {
        let Some(rec) = self.study(key)? else {
            return Ok(None);
        };
        let own: BTreeSet<String> = rec.instances.values().cloned().collect();
        let mut pending_blobs = Vec::new();
        for sha in own {
            let n = refs.0.entry(sha.clone()).or_insert(1);
            *n = n.saturating_sub(1);
            if *n == 0 {
                pending_blobs.push(sha);
            }
        }
        let forwarded = self.pacs_delivery.load(std::sync::atomic::Ordering::SeqCst);
        // Nothing may be sent to the PACS from here on.
        self.delivery.remove_study(key)?;
        let tomb = Destruction {
            agreement: rec.agreement.clone(),
            flow: rec.flow.clone(),
            from_site: rec.from_site.clone(),
            study_token: rec.study_token.clone(),
            instances: rec.instances.len() as u32,
            study_digest: hex::encode(crate::federation::destruction::study_digest(
                rec.instances.values(),
            )),
            received_at: rec.first_received,
            destroyed_at: now.max(rec.first_received),
            retention_days: retention.days,
            after: retention.after.clone(),
            forwarded_to_site_pacs: forwarded,
            state: DestructionState::Deleting,
            pending_blobs,
            receipt_attempts: 0,
            next_attempt: 0,
            last_error: None,
        };
        let mut tk = key.index_key();
        tk.extend_from_slice(format!("\u{1f}{:020}", tomb.destroyed_at).as_bytes());
        let destroyed = self.destroyed_tree()?;
        let value = serde_json::to_vec(&tomb).expect("tombstone serialises");
        let index_key = key.index_key();
        (&self.index, &destroyed)
            .transaction(|(idx, d)| {
                idx.remove(index_key.as_slice())?;
                d.insert(tk.as_slice(), value.as_slice())?;
                Ok::<_, ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                TransactionError::Storage(e) => StoreError::Index(e),
                TransactionError::Abort(()) => StoreError::Corrupt("transaction aborted".into()),
            })?;
        self.db.flush()?;
        self.finish_destruction(&tk, tomb).map(Some)
    }

    /// Deletes the files of a `deleting` tombstone, then marks it `deleted`. Idempotent.
    fn finish_destruction(
        &self,
        tk: &[u8],
        mut tomb: Destruction,
    ) -> Result<Destruction, StoreError> {
        let key = StudyKey::new(
            &tomb.agreement,
            &tomb.flow,
            &tomb.from_site,
            &tomb.study_token,
        );
        let inbox = self
            .inbox()
            .join(safe_name(&tomb.agreement))
            .join(safe_name(&tomb.study_token));
        remove_tree(&inbox)?;
        // The checksum lists of its inbox copies (where those were the stored copies).
        remove_tree(&LocalStore::sums_path(
            &self.root,
            &tomb.agreement,
            &tomb.study_token,
        ))?;
        self.discard_partials(&key)?;
        let mut dirs = BTreeSet::new();
        let quarantine = self.root.join("quarantine");
        let quarantined: Vec<PathBuf> = fs::read_dir(&quarantine)
            .map_err(super::io_err(&quarantine))?
            .flatten()
            .map(|e| e.path())
            .collect();
        for sha_hex in &tomb.pending_blobs {
            let mut sha = [0u8; 32];
            hex::decode_to_slice(sha_hex, &mut sha)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let blob = self.blob_path(&sha);
            remove_file(&blob)?;
            dirs.insert(blob.parent().expect("blob has a folder").to_owned());
            for q in quarantined.iter().filter(|q| {
                q.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(sha_hex.as_str()))
            }) {
                remove_file(q)?;
                dirs.insert(quarantine.clone());
            }
        }
        for d in &dirs {
            if d.exists() {
                sync_dir(d)?;
            }
        }
        // A PACS delivery attempt in flight when the study was destroyed may have put its
        // entries back: take them out again now that the blobs are gone.
        self.delivery.remove_study(&key)?;
        tomb.pending_blobs.clear();
        tomb.state = DestructionState::Deleted;
        self.destroyed_tree()?
            .insert(tk, serde_json::to_vec(&tomb).expect("tombstone serialises"))?;
        self.db.flush()?;
        Ok(tomb)
    }

    /// Finishes destructions a crash interrupted; returns them.
    pub fn resume_destructions(&self) -> Result<Vec<Destruction>, StoreError> {
        let mut done = Vec::new();
        for (tk, tomb) in self.destructions()? {
            if tomb.state == DestructionState::Deleting {
                done.push(self.finish_destruction(&tk, tomb)?);
            }
        }
        Ok(done)
    }

    /// Every tombstone, oldest study key first.
    pub fn destructions(&self) -> Result<Vec<(TombstoneKey, Destruction)>, StoreError> {
        self.destroyed_tree()?
            .iter()
            .map(|item| {
                let (k, v) = item?;
                Ok((k.to_vec(), serde_json::from_slice(&v).map_err(corrupt)?))
            })
            .collect()
    }

    /// Destroyed studies whose receipt the origin has not acknowledged, due at `now`.
    pub fn receipts_due(&self, now: u64) -> Result<Vec<(TombstoneKey, Destruction)>, StoreError> {
        Ok(self
            .destructions()?
            .into_iter()
            .filter(|(_, t)| t.state == DestructionState::Deleted && t.next_attempt <= now)
            .collect())
    }

    /// Records the outcome of one attempt to deliver a receipt: acknowledged, or an error
    /// (retried with backoff from `now`).
    pub fn settle_receipt(
        &self,
        tk: &[u8],
        outcome: Result<(), String>,
        now: u64,
    ) -> Result<(), StoreError> {
        let tree = self.destroyed_tree()?;
        let Some(v) = tree.get(tk)? else {
            return Ok(());
        };
        let mut tomb: Destruction = serde_json::from_slice(&v).map_err(corrupt)?;
        match outcome {
            Ok(()) => {
                tomb.state = DestructionState::Acknowledged;
                tomb.last_error = None;
            }
            Err(e) => {
                tomb.receipt_attempts += 1;
                tomb.next_attempt = now + receipt_backoff_secs(tomb.receipt_attempts);
                tomb.last_error = Some(e);
            }
        }
        tree.insert(tk, serde_json::to_vec(&tomb).expect("tombstone serialises"))?;
        self.db.flush()?;
        Ok(())
    }
}

fn remove_file(p: &std::path::Path) -> Result<(), StoreError> {
    match fs::remove_file(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(super::io_err(p)(e)),
        _ => Ok(()),
    }
}

/// Removes a study's inbox folder (files, then the folder), durably.
fn remove_tree(dir: &std::path::Path) -> Result<(), StoreError> {
    if !dir.exists() {
        return Ok(());
    }
    for e in walkdir::WalkDir::new(dir).contents_first(true) {
        let e = e.map_err(|e| StoreError::Io {
            path: dir.to_owned(),
            source: e.into(),
        })?;
        if e.file_type().is_dir() {
            fs::remove_dir(e.path()).map_err(super::io_err(e.path()))?;
        } else {
            remove_file(e.path())?;
        }
    }
    if let Some(parent) = dir.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StagedInstance;
    use sha2::{Digest, Sha256};
    use std::io::Write;

    fn stage(s: &LocalStore, bytes: &[u8], uid: &str) -> StagedInstance {
        let (mut f, path) = s.stage_file().unwrap();
        f.write_all(bytes).unwrap();
        StagedInstance {
            path,
            sha256: Sha256::digest(bytes).into(),
            size: bytes.len() as u64,
            sop_instance_uid: uid.into(),
        }
    }

    fn ended() -> RetentionEnded {
        RetentionEnded {
            days: 30,
            after: "delete".into(),
        }
    }

    fn files(dir: &std::path::Path, sub: &str) -> Vec<PathBuf> {
        walkdir::WalkDir::new(dir.join(sub))
            .into_iter()
            .flatten()
            .filter(|e| e.file_type().is_file())
            .map(|e| e.into_path())
            .collect()
    }

    #[test]
    fn destroying_removes_every_copy_but_keeps_shared_blobs_and_other_studies() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        let q = s.enable_pacs_delivery();
        let key = StudyKey::new("a", "f", "x", "2.25.1");
        let other = StudyKey::new("a", "f", "x", "2.25.2");
        let c = s
            .commit(
                &key,
                2,
                vec![
                    stage(&s, b"one", "2.25.11"),
                    stage(&s, b"shared", "2.25.12"),
                ],
                vec![],
            )
            .unwrap();
        s.deliver(&c.study).unwrap();
        s.commit(&other, 1, vec![stage(&s, b"shared", "2.25.21")], vec![])
            .unwrap();
        s.keep_partial(&key, vec![stage(&s, b"resume", "2.25.13")])
            .unwrap();
        assert_eq!(q.entries().unwrap().len(), 3);

        let t = s
            .destroy_study(&key, &ended(), 1_000, &mut s.blob_refs().unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(t.state, DestructionState::Deleted);
        assert_eq!(t.instances, 2);
        assert!(t.forwarded_to_site_pacs);
        assert!(s.study(&key).unwrap().is_none());
        assert!(s.study(&other).unwrap().is_some());
        assert!(!s.has_instance(&Sha256::digest(b"one").into()).unwrap());
        assert!(
            s.has_instance(&Sha256::digest(b"shared").into()).unwrap(),
            "another study's blob stays"
        );
        assert!(files(dir.path(), "inbox").is_empty());
        assert!(files(dir.path(), "staging").is_empty());
        let left: Vec<_> = q.entries().unwrap().into_iter().map(|(_, e)| e).collect();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].study_token, "2.25.2");
        // Destroying again is a no-op; the receipt waits for the origin.
        assert!(s
            .destroy_study(&key, &ended(), 1_001, &mut s.blob_refs().unwrap())
            .unwrap()
            .is_none());
        let due = s.receipts_due(1_000).unwrap();
        assert_eq!(due.len(), 1);
        s.settle_receipt(&due[0].0, Err("origin down".into()), 1_000)
            .unwrap();
        assert!(s.receipts_due(1_000).unwrap().is_empty(), "backs off");
        let later = 1_000 + receipt_backoff_secs(1);
        let due = s.receipts_due(later).unwrap();
        assert_eq!(due[0].1.last_error.as_deref(), Some("origin down"));
        s.settle_receipt(&due[0].0, Ok(()), later).unwrap();
        assert!(s.receipts_due(u64::MAX).unwrap().is_empty());
        // The tombstone survives a restart, acknowledged.
        drop((s, q));
        let s = LocalStore::open(dir.path()).unwrap();
        let all = s.destructions().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].1.state, DestructionState::Acknowledged);
    }

    /// With inbox delivery and encryption at rest the inbox copy is the one stored copy:
    /// destruction removes it, its checksum lists and a quarantined copy of it.
    #[test]
    fn destroying_removes_the_inbox_copies_that_are_the_stored_copies() {
        let dir = tempfile::tempdir().unwrap();
        let at_rest =
            crate::store::sealed::AtRest::new(&crate::pseudonym::SiteKeys::generate(), true);
        let s = LocalStore::open_with(dir.path(), at_rest).unwrap();
        let key = StudyKey::new("a", "f", "x", "2.25.7");
        let staged: Vec<_> = [(&b"one"[..], "2.25.71"), (&b"two"[..], "2.25.72")]
            .into_iter()
            .map(|(bytes, uid)| crate::store::inbox_tests::received_plain(&s, &key, bytes, uid))
            .collect();
        let (c, _) = s.commit_and_deliver(&key, 2, staged, vec![]).unwrap();
        assert_eq!(c.stored, 2);
        assert_eq!(files(dir.path(), "inbox").len(), 2);
        assert_eq!(files(dir.path(), "sums").len(), 1);
        assert!(files(dir.path(), "blobs").is_empty());
        // One copy was damaged at rest and quarantined.
        let copy = s.inbox_copy_path(&key, "2.25.71");
        fs::write(&copy, b"rot").unwrap();
        let sha: [u8; 32] = Sha256::digest(b"one").into();
        assert!(matches!(
            s.check_held(&key, "2.25.71", &sha).unwrap(),
            crate::store::BlobCheck::Quarantined(_)
        ));
        let t = s
            .destroy_study(&key, &ended(), 1_000, &mut s.blob_refs().unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(t.state, DestructionState::Deleted);
        assert_eq!(t.instances, 2);
        for sub in ["inbox", "sums", "quarantine", "blobs", "staging"] {
            assert!(files(dir.path(), sub).is_empty(), "left in {sub}");
        }
    }

    #[test]
    fn a_destruction_interrupted_by_a_crash_is_finished_on_resume() {
        let dir = tempfile::tempdir().unwrap();
        let key = StudyKey::new("a", "f", "x", "2.25.1");
        {
            let s = LocalStore::open(dir.path()).unwrap();
            let c = s
                .commit(&key, 1, vec![stage(&s, b"one", "2.25.11")], vec![])
                .unwrap();
            s.deliver(&c.study).unwrap();
            // What `destroy_study` writes before it deletes any file, as a crash would leave it.
            let tomb = Destruction {
                agreement: "a".into(),
                flow: "f".into(),
                from_site: "x".into(),
                study_token: "2.25.1".into(),
                instances: 1,
                study_digest: String::new(),
                received_at: 1,
                destroyed_at: 2,
                retention_days: 30,
                after: "delete".into(),
                forwarded_to_site_pacs: false,
                state: DestructionState::Deleting,
                pending_blobs: vec![hex::encode(Sha256::digest(b"one"))],
                receipt_attempts: 0,
                next_attempt: 0,
                last_error: None,
            };
            s.index.remove(key.index_key()).unwrap();
            s.destroyed_tree()
                .unwrap()
                .insert(b"k", serde_json::to_vec(&tomb).unwrap())
                .unwrap();
            s.db.flush().unwrap();
            assert!(s.receipts_due(u64::MAX).unwrap().is_empty(), "not yet");
        }
        let s = LocalStore::open(dir.path()).unwrap();
        let done = s.resume_destructions().unwrap();
        assert_eq!(done.len(), 1);
        assert!(files(dir.path(), "blobs").is_empty());
        assert!(files(dir.path(), "inbox").is_empty());
        assert_eq!(s.receipts_due(u64::MAX).unwrap().len(), 1);
    }
}
