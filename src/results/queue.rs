//! At the partner: the durable queue of results waiting to go home.
//!
//! Owns the `returns/` folder of the data directory: one folder per result, named by the SHA-256
//! of its bytes (so a result queued twice is queued once), holding the file and its entry
//! (`entry.json`: agreement, origin, study token, the result's SOP Instance UID, attempts, state).
//! A result is queued durably (written under a temporary name, fsynced, renamed) before anything
//! is acknowledged to the reporting system; the serving node retries what could not go with
//! backoff, and once the origin's receipt arrives the file is deleted (the partner keeps no copy
//! of what went home) and the entry kept as a record. Entries hold only tokens and pseudonymous
//! UIDs. The result file is sealed through the node's encryption at rest
//! ([`ReturnQueue::with_at_rest`]): it is de-identified data, and the queue is not a delivery
//! folder; entries are named by the SHA-256 of the plaintext. Does not own: the decision to
//! return ([`super::recognise`]) or the transport.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::recognise::ReturnTarget;
use crate::store::sealed::AtRest;
use crate::store::{sync_dir, StoreError};

/// Where a queued result stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReturnState {
    /// Queued by `pacs-broker return` beside a running node (which holds the store): the node
    /// recognises it ([`super::recognise`]) before it may go.
    Unchecked,
    Pending,
    /// The origin confirmed it; the file is gone.
    Returned,
    /// The origin refused it (not retried; the reason is kept).
    Refused,
    /// The study it refers to was destroyed here at the end of its retention before the result
    /// went home: the file is gone with the study, the entry stays as the record.
    Destroyed,
}

/// One result waiting to go home (or gone).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReturnEntry {
    pub agreement: String,
    pub flow: String,
    pub origin: String,
    pub purpose: String,
    pub study_token: String,
    pub sop_instance_uid: String,
    pub sha256: String,
    pub size: u64,
    pub queued_at: u64,
    pub attempts: u32,
    /// Unix seconds of the earliest next attempt.
    pub next_attempt: u64,
    pub last_error: Option<String>,
    pub state: ReturnState,
}

/// The result file inside an entry's folder.
pub const RESULT_FILE: &str = "result.dcm";
const ENTRY_FILE: &str = "entry.json";

/// The queue under `data_dir/returns`.
#[derive(Debug, Clone)]
pub struct ReturnQueue {
    root: PathBuf,
    at_rest: AtRest,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

impl ReturnQueue {
    pub fn new(data_dir: &Path) -> ReturnQueue {
        ReturnQueue {
            root: data_dir.join("returns"),
            at_rest: AtRest::plain(),
        }
    }

    /// Seals queued result files through `at_rest` (the node's encryption at rest); files given
    /// to [`ReturnQueue::add`] are opened through it too (a sealed DIMSE spool file, say).
    pub fn with_at_rest(mut self, at_rest: AtRest) -> ReturnQueue {
        self.at_rest = at_rest;
        self
    }

    /// How queued result files are sealed and opened.
    pub fn at_rest(&self) -> &AtRest {
        &self.at_rest
    }

    /// Queues a copy of `file` for `target`; returns its folder and entry. A result already
    /// queued or returned (same bytes) is not queued again: its existing entry is returned. One
    /// refused before is queued afresh.
    pub fn add(
        &self,
        file: &Path,
        target: &ReturnTarget,
        state: ReturnState,
    ) -> Result<(PathBuf, ReturnEntry), StoreError> {
        crate::store::private_dir(&self.root)?;
        let tmp = tempfile::Builder::new()
            .prefix(".incoming-")
            .tempdir_in(&self.root)
            .map_err(io(&self.root))?;
        let copy = tmp.path().join(RESULT_FILE);
        let (sha, size) = self.copy_hashed(file, &copy)?;
        let dir = self.root.join(hex::encode(sha));
        match Self::load(&dir) {
            // Refused before (the agreement suspended then, say), or destroyed with its study:
            // this is a new attempt, judged afresh.
            Ok(existing)
                if matches!(
                    existing.state,
                    ReturnState::Refused | ReturnState::Destroyed
                ) =>
            {
                fs::remove_dir_all(&dir).map_err(io(&dir))?;
            }
            Ok(existing) => return Ok((dir, existing)),
            Err(_) => {}
        }
        let now = crate::store::outbox::now();
        let entry = ReturnEntry {
            agreement: target.agreement.clone(),
            flow: target.flow.clone(),
            origin: target.origin.clone(),
            purpose: target.purpose.clone(),
            study_token: target.study_token.clone(),
            sop_instance_uid: target.sop_instance_uid.clone(),
            sha256: hex::encode(sha),
            size,
            queued_at: now,
            attempts: 0,
            next_attempt: 0,
            last_error: None,
            state,
        };
        write_entry(tmp.path(), &entry)?;
        let tmp = tmp.keep();
        fs::rename(&tmp, &dir).map_err(|e| {
            let _ = fs::remove_dir_all(&tmp);
            io(&dir)(e)
        })?;
        sync_dir(&self.root)?;
        Ok((dir, entry))
    }

    /// Re-seals every queued result file under the current data key (`keys rotate`); returns
    /// (files re-sealed, files that could not be: each logged by its folder).
    pub fn reseal_all(&self) -> (usize, usize) {
        let (mut done, mut failed) = (0, 0);
        for (dir, _) in self.entries() {
            let file = dir.join(RESULT_FILE);
            match self.at_rest.reseal(&file) {
                Ok(true) => done += 1,
                Ok(false) => {}
                // Sent home (and deleted) meanwhile.
                Err(crate::store::sealed::SealError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::error!(folder = %dir.display(), error = %e, "a queued result could not be re-sealed");
                    failed += 1;
                }
            }
        }
        (done, failed)
    }

    /// The entry in `dir`.
    pub fn load(dir: &Path) -> Result<ReturnEntry, StoreError> {
        let p = dir.join(ENTRY_FILE);
        let bytes = fs::read(&p).map_err(io(&p))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| StoreError::Corrupt(format!("return entry {}: {e}", p.display())))
    }

    /// Records `entry` in `dir` (durably).
    pub fn save(dir: &Path, entry: &ReturnEntry) -> Result<(), StoreError> {
        write_entry(dir, entry)
    }

    /// Every entry, oldest first.
    pub fn entries(&self) -> Vec<(PathBuf, ReturnEntry)> {
        let Ok(rd) = fs::read_dir(&self.root) else {
            return Vec::new();
        };
        let mut out: Vec<(PathBuf, ReturnEntry)> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.is_dir()
                    && !p
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .filter_map(|p| Self::load(&p).ok().map(|e| (p, e)))
            .collect();
        out.sort_by_key(|(_, e)| e.queued_at);
        out
    }

    /// Pending (and unchecked) entries due at `now` (unix seconds).
    pub fn due(&self, now: u64) -> Vec<(PathBuf, ReturnEntry)> {
        self.entries()
            .into_iter()
            .filter(|(_, e)| {
                matches!(e.state, ReturnState::Pending | ReturnState::Unchecked)
                    && e.next_attempt <= now
            })
            .collect()
    }

    /// An unchecked entry was recognised: it takes its target and becomes pending.
    pub fn mark_recognised(
        dir: &Path,
        entry: &mut ReturnEntry,
        target: &ReturnTarget,
    ) -> Result<(), StoreError> {
        entry.agreement = target.agreement.clone();
        entry.flow = target.flow.clone();
        entry.origin = target.origin.clone();
        entry.purpose = target.purpose.clone();
        entry.study_token = target.study_token.clone();
        entry.sop_instance_uid = target.sop_instance_uid.clone();
        entry.state = ReturnState::Pending;
        write_entry(dir, entry)
    }

    /// The entry may not go (refused here or by the origin): the file goes, the reason stays.
    pub fn mark_refused(
        dir: &Path,
        entry: &mut ReturnEntry,
        reason: &str,
    ) -> Result<(), StoreError> {
        entry.state = ReturnState::Refused;
        entry.last_error = Some(reason.to_string());
        write_entry(dir, entry)?;
        let _ = fs::remove_file(dir.join(RESULT_FILE));
        sync_dir(dir)
    }

    /// Takes the entry's lock (a second process handling the same result skips it); held
    /// while the returned file is open.
    pub fn try_claim(dir: &Path) -> Option<fs::File> {
        crate::store::outbox::Outbox::try_claim(dir)
    }

    /// The origin confirmed the result: the file goes, the entry stays as the record.
    pub fn mark_returned(dir: &Path, entry: &mut ReturnEntry) -> Result<(), StoreError> {
        entry.state = ReturnState::Returned;
        entry.last_error = None;
        write_entry(dir, entry)?;
        let f = dir.join(RESULT_FILE);
        fs::remove_file(&f).map_err(io(&f))?;
        sync_dir(dir)
    }

    /// Destroys every result still held here (waiting, unchecked or refused: anything whose file
    /// has not gone home) that refers to one of `studies` — (agreement, origin, study token) of
    /// studies destroyed at the end of their retention. A result is derived from its study and
    /// may not outlive it here. Each file is deleted and its entry marked
    /// [`ReturnState::Destroyed`]; a result being sent right now (its entry locked) is left for
    /// the next sweep. Returns the entries destroyed. Idempotent, so a sweep interrupted by a
    /// crash is finished by the next one.
    pub fn destroy_for_studies(
        &self,
        studies: &std::collections::HashSet<(String, String, String)>,
    ) -> Result<Vec<ReturnEntry>, StoreError> {
        let mut destroyed = Vec::new();
        for (dir, mut entry) in self.entries() {
            let held = !matches!(entry.state, ReturnState::Returned | ReturnState::Destroyed)
                || dir.join(RESULT_FILE).exists();
            let key = (
                entry.agreement.clone(),
                entry.origin.clone(),
                entry.study_token.clone(),
            );
            if !held || !studies.contains(&key) {
                continue;
            }
            let Some(_claim) = Self::try_claim(&dir) else {
                continue;
            };
            entry.state = ReturnState::Destroyed;
            entry.last_error = Some("its study was destroyed at the end of its retention".into());
            write_entry(&dir, &entry)?;
            let f = dir.join(RESULT_FILE);
            match fs::remove_file(&f) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(&f)(e)),
            }
            sync_dir(&dir)?;
            destroyed.push(entry);
        }
        Ok(destroyed)
    }

    /// An attempt failed: retried later with backoff when `transient`, else marked refused.
    pub fn mark_failed(
        dir: &Path,
        entry: &mut ReturnEntry,
        error: &str,
        transient: bool,
    ) -> Result<(), StoreError> {
        entry.attempts += 1;
        entry.last_error = Some(error.to_string());
        if !transient {
            return Self::mark_refused(dir, entry, error);
        }
        entry.next_attempt =
            crate::store::outbox::now() + crate::store::outbox::backoff_secs(entry.attempts);
        write_entry(dir, entry)
    }
}

impl ReturnQueue {
    /// Copies the plaintext of `from` (sealed or plain) to `to`, sealed when encryption at rest
    /// is on (fsynced), returning the plaintext's SHA-256 and size.
    fn copy_hashed(&self, from: &Path, to: &Path) -> Result<([u8; 32], u64), StoreError> {
        let mut src = self.at_rest.open(from)?;
        Ok(self.at_rest.write_atomic_from(to, &mut src)?)
    }
}

fn write_entry(dir: &Path, entry: &ReturnEntry) -> Result<(), StoreError> {
    let bytes = serde_json::to_vec_pretty(entry).expect("return entry serialises");
    crate::store::write_atomic(&dir.join(ENTRY_FILE), &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> ReturnTarget {
        ReturnTarget {
            agreement: "agr".into(),
            flow: "f".into(),
            origin: "hospital-a".into(),
            purpose: "treatment".into(),
            study_token: "2.25.1".into(),
            sop_instance_uid: "2.25.2".into(),
        }
    }

    #[test]
    fn a_result_is_queued_once_retried_and_dropped_once_returned() {
        let dir = tempfile::tempdir().unwrap();
        let q = ReturnQueue::new(dir.path());
        let src = dir.path().join("sr.dcm");
        fs::write(&src, b"result bytes").unwrap();
        let (d1, e1) = q.add(&src, &target(), ReturnState::Pending).unwrap();
        let (d2, _) = q.add(&src, &target(), ReturnState::Pending).unwrap();
        assert_eq!(d1, d2);
        assert_eq!(q.entries().len(), 1);
        assert_eq!(q.due(crate::store::outbox::now()).len(), 1);
        let mut e = e1.clone();
        ReturnQueue::mark_failed(&d1, &mut e, "unavailable", true).unwrap();
        assert!(q.due(crate::store::outbox::now()).is_empty(), "backoff");
        ReturnQueue::mark_returned(&d1, &mut e).unwrap();
        assert!(!d1.join(RESULT_FILE).exists());
        assert_eq!(ReturnQueue::load(&d1).unwrap().state, ReturnState::Returned);
        assert_eq!(e1.size, 12);
    }

    #[test]
    fn a_queued_result_is_sealed_and_named_by_its_plaintext() {
        use sha2::{Digest, Sha256};
        let dir = tempfile::tempdir().unwrap();
        let keys = crate::pseudonym::SiteKeys::generate();
        let q = ReturnQueue::new(dir.path()).with_at_rest(AtRest::new(&keys, true));
        let src = dir.path().join("sr.dcm");
        fs::write(&src, b"de-identified report text").unwrap();
        let (d, e) = q.add(&src, &target(), ReturnState::Pending).unwrap();
        let expected: [u8; 32] = Sha256::digest(b"de-identified report text").into();
        assert_eq!(e.sha256, hex::encode(expected));
        assert_eq!(e.size, 25);
        let raw = fs::read(d.join(RESULT_FILE)).unwrap();
        assert!(raw.starts_with(crate::store::sealed::MAGIC));
        assert!(!raw.windows(6).any(|w| w == b"report"));
        assert_eq!(
            q.at_rest().read(&d.join(RESULT_FILE)).unwrap(),
            b"de-identified report text"
        );
        // `keys rotate`: the queued file moves to the new key, its entry stays readable JSON.
        let before = AtRest::key_id_of(&d.join(RESULT_FILE)).unwrap();
        keys.rotate(&[]).unwrap();
        assert_eq!(q.reseal_all(), (1, 0));
        assert_ne!(AtRest::key_id_of(&d.join(RESULT_FILE)).unwrap(), before);
        assert_eq!(ReturnQueue::load(&d).unwrap(), e);
        assert_eq!(
            q.at_rest().read(&d.join(RESULT_FILE)).unwrap(),
            b"de-identified report text"
        );
        // A sealed file given to the queue (the DIMSE spool) is read through the same keys.
        let again = q
            .add(&d.join(RESULT_FILE), &target(), ReturnState::Pending)
            .unwrap();
        assert_eq!(again.0, d);
    }

    #[test]
    fn results_of_a_destroyed_study_are_destroyed_with_it_and_only_those() {
        let dir = tempfile::tempdir().unwrap();
        let q = ReturnQueue::new(dir.path());
        let src = dir.path().join("sr.dcm");
        fs::write(&src, b"report on study 1").unwrap();
        let (d1, _) = q.add(&src, &target(), ReturnState::Pending).unwrap();
        let other = ReturnTarget {
            study_token: "2.25.9".into(),
            ..target()
        };
        let src2 = dir.path().join("sr2.dcm");
        fs::write(&src2, b"report on study 9").unwrap();
        let (d2, _) = q.add(&src2, &other, ReturnState::Pending).unwrap();
        let gone: std::collections::HashSet<_> = [(
            "agr".to_string(),
            "hospital-a".to_string(),
            "2.25.1".to_string(),
        )]
        .into_iter()
        .collect();
        // A result being sent right now is left for the next sweep.
        let claim = ReturnQueue::try_claim(&d1).unwrap();
        assert!(q.destroy_for_studies(&gone).unwrap().is_empty());
        drop(claim);
        let destroyed = q.destroy_for_studies(&gone).unwrap();
        assert_eq!(destroyed.len(), 1);
        assert_eq!(destroyed[0].study_token, "2.25.1");
        assert!(
            !d1.join(RESULT_FILE).exists(),
            "the file goes with its study"
        );
        assert_eq!(
            ReturnQueue::load(&d1).unwrap().state,
            ReturnState::Destroyed
        );
        assert!(
            d2.join(RESULT_FILE).exists(),
            "another study's result stays"
        );
        assert_eq!(ReturnQueue::load(&d2).unwrap().state, ReturnState::Pending);
        assert!(q.due(u64::MAX).iter().all(|(d, _)| d != &d1), "never sent");
        // Idempotent: a second sweep finds nothing more.
        assert!(q.destroy_for_studies(&gone).unwrap().is_empty());
    }
}
