//! The durable outbox: de-identified studies waiting for delivery to a partner, or done with it.
//!
//! Each study waits in its own folder, `outbox/<agreement>/<study token>/`, holding its
//! de-identified instance files and `transfer.json` (who it goes to, under which flow and purpose,
//! every instance's SHA-256 and size, attempts, the next attempt, the last error, and the state).
//! `transfer.json` is written before the first attempt, atomically, so a study whose sending was
//! interrupted (partner down, process killed) is retried by the running node with exponential
//! backoff. `send`'s instance files are working copies, not flushed, until an attempt fails
//! ([`Outbox::make_durable`]); one left so by a crash is re-verified or discarded before it is
//! sent ([`Outbox::settle`]). The first [`OutboxEntry::receipted`] instances of an entry were
//! confirmed by the partner's signed receipts before the entry was written (`send`'s and the
//! DICOM forwarder's partial offers): they are listed, but need no file. A delivered study's instance files are deleted once the partner's
//! signed receipt is verified: the outbox keeps the record, not the images. Nothing here holds
//! PHI.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::sealed::AtRest;
use super::{io_err, safe_name, write_atomic, StoreError};
use crate::federation::client::OutgoingInstance;

/// Where a queued study stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutboxState {
    /// Waiting for its next attempt.
    Pending,
    /// The partner's signed receipt was verified.
    Delivered,
    /// Refused for a reason a retry cannot fix (e.g. the agreement does not allow it).
    Failed,
}

/// One instance of a queued study.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxInstance {
    /// File name inside the study's outbox folder.
    pub file: String,
    pub sha256: String,
    pub size: u64,
    pub sop_instance_uid: String,
}

/// `transfer.json`: a study queued for a partner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxEntry {
    pub agreement: String,
    pub flow: String,
    pub purpose: String,
    pub to: String,
    pub study_token: String,
    /// Patient tokens of the study under this agreement (never the patient id: the origin's
    /// disclosure report resolves them through the vault).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patient_tokens: Vec<String>,
    pub modalities: Vec<String>,
    pub instances: Vec<OutboxInstance>,
    pub state: OutboxState,
    /// Unix seconds.
    pub created: u64,
    pub attempts: u32,
    pub next_attempt: u64,
    pub last_error: Option<String>,
    /// Instances the receiver stored / already held, from its signed receipt.
    pub delivered: Option<(u32, u32)>,
    /// False while the study is still arriving over DICOM (the listener's forwarder sends what
    /// has arrived and owns the entry); true once the whole study is here (files given to
    /// `send`, or a DICOM study after its quiet time).
    #[serde(default = "true_by_default")]
    pub complete: bool,
    /// False while the instance files are working copies not yet made durable (`send` writes
    /// them without a flush and sends them at once; they are deleted once the partner's receipt
    /// arrives, so on the happy path they never need to reach the disk). Set, and the files
    /// flushed, by [`Outbox::make_durable`] when an attempt fails and the study stays queued.
    /// An entry found with `false` and nobody sending it was left by a crash: its files may be
    /// torn, and [`Outbox::settle`] re-verifies them before anything is sent.
    #[serde(default = "true_by_default")]
    pub flushed: bool,
    /// How many of `instances`, the first ones, the partner had confirmed by signed receipts
    /// before this entry was written (`send`'s partial offers, the DICOM forwarder's partial
    /// offers): their files need not be kept (the partner answers "already held" for them), and
    /// nothing here flushes or re-verifies them. `send` keeps none; the DICOM listener's mover
    /// makes none for an instance already confirmed, but may have made one before the receipt
    /// came: a delivered study's files are deleted for every listed instance.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub receipted: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

fn true_by_default() -> bool {
    true
}

const ENTRY_FILE: &str = "transfer.json";

/// Seconds to wait after `attempts` failed attempts: 5 s doubling, at most one hour.
pub fn backoff_secs(attempts: u32) -> u64 {
    (5u64 << attempts.saturating_sub(1).min(10)).min(3600)
}

impl OutboxEntry {
    /// A new pending entry for one study, with no instances yet: the one constructor every
    /// source (files, DIMSE, a released quarantine item) starts from. `complete` is false while
    /// the study is still arriving over DICOM.
    pub fn pending(
        agreement: &str,
        flow: &str,
        purpose: &str,
        to: &str,
        study_token: &str,
        complete: bool,
    ) -> OutboxEntry {
        OutboxEntry {
            agreement: agreement.to_string(),
            flow: flow.to_string(),
            purpose: purpose.to_string(),
            to: to.to_string(),
            study_token: study_token.to_string(),
            patient_tokens: Vec::new(),
            modalities: Vec::new(),
            instances: Vec::new(),
            state: OutboxState::Pending,
            created: now(),
            attempts: 0,
            next_attempt: 0,
            last_error: None,
            delivered: None,
            complete,
            flushed: true,
            receipted: 0,
        }
    }

    /// The instances that have files in the study's folder: all but the first
    /// [`OutboxEntry::receipted`].
    pub fn kept_instances(&self) -> &[OutboxInstance] {
        &self.instances[self.receipted.min(self.instances.len())..]
    }
}

/// Unix seconds now.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The outbox folder of a node.
#[derive(Debug, Clone)]
pub struct Outbox {
    root: PathBuf,
    /// Instance files are sealed through this (`transfer.json` holds no instance bytes and no
    /// PHI, and stays plain so an operator can read it).
    at_rest: AtRest,
}

impl Outbox {
    /// An outbox whose instance files are written plain (tests, tools); a node uses
    /// [`Outbox::with_at_rest`].
    pub fn new(root: PathBuf) -> Outbox {
        Outbox {
            root,
            at_rest: AtRest::plain(),
        }
    }

    /// Seals instance files through `at_rest`.
    pub fn with_at_rest(mut self, at_rest: AtRest) -> Outbox {
        self.at_rest = at_rest;
        self
    }

    /// How instance files here are sealed.
    pub fn at_rest(&self) -> &AtRest {
        &self.at_rest
    }

    /// Re-seals every instance file under the current data key (`keys rotate`), skipping studies
    /// a running node is sending right now (claimed). Returns (re-sealed, failed).
    pub fn reseal_all(&self) -> (usize, usize) {
        let (mut done, mut failed) = (0, 0);
        for (dir, _) in self.entries() {
            let Some(_claim) = Outbox::try_claim(&dir) else {
                continue;
            };
            let files: Vec<PathBuf> = fs::read_dir(&dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "dcm"))
                .filter(|p| {
                    !p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                })
                .collect();
            let (d, f) = super::reseal_tree(&self.at_rest, &files);
            done += d;
            failed += f;
        }
        (done, failed)
    }

    /// The folder of one study.
    pub fn study_dir(&self, agreement: &str, study_token: &str) -> PathBuf {
        self.root
            .join(safe_name(agreement))
            .join(safe_name(study_token))
    }

    /// Writes an entry atomically into its study folder.
    pub fn save(&self, entry: &OutboxEntry) -> Result<PathBuf, StoreError> {
        let dir = self.study_dir(&entry.agreement, &entry.study_token);
        let bytes = serde_json::to_vec_pretty(entry).expect("entry serialises");
        write_atomic(&dir.join(ENTRY_FILE), &bytes)?;
        Ok(dir)
    }

    /// Reads the entry of a study folder.
    pub fn load(dir: &Path) -> Result<OutboxEntry, StoreError> {
        let p = dir.join(ENTRY_FILE);
        let bytes = fs::read(&p).map_err(io_err(&p))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| StoreError::Corrupt(format!("{}: {e}", p.display())))
    }

    /// Every entry, oldest first.
    pub fn entries(&self) -> Vec<(PathBuf, OutboxEntry)> {
        let mut out: Vec<(PathBuf, OutboxEntry)> = walkdir::WalkDir::new(&self.root)
            .min_depth(3)
            .max_depth(3)
            .into_iter()
            .flatten()
            .filter(|e| e.file_name() == ENTRY_FILE)
            .filter_map(|e| {
                let dir = e.path().parent()?.to_owned();
                match Outbox::load(&dir) {
                    Ok(entry) => Some((dir, entry)),
                    Err(err) => {
                        tracing::error!(error = %err, "unreadable outbox entry skipped");
                        None
                    }
                }
            })
            .collect();
        out.sort_by_key(|(_, e)| e.created);
        out
    }

    /// Deletes the working copies a `send` left when it was killed before it wrote its entry
    /// (while it offered the study's first groups): a study folder with no `transfer.json`,
    /// not claimed by any process, none of whose files changed for `older_than`. Nothing lists
    /// such files, so nothing would ever send or delete them; sending the study again makes them
    /// anew. Folders with an entry (a DIMSE study writes its entry before its first file) are
    /// never touched. Returns how many folders were removed.
    pub fn discard_abandoned(&self, older_than: std::time::Duration) -> usize {
        let mut removed = 0;
        let studies = walkdir::WalkDir::new(&self.root)
            .min_depth(2)
            .max_depth(2)
            .into_iter()
            .flatten()
            .filter(|e| e.file_type().is_dir());
        for study in studies {
            let dir = study.path();
            if dir.join(ENTRY_FILE).exists() {
                continue;
            }
            let Some(_claim) = Outbox::try_claim(dir) else {
                continue;
            };
            // The folder's own time changes as files are added to it or renamed into it, so a
            // folder a `send` just made (empty still, its outputs being written elsewhere) is
            // not quiet either.
            let untouched = |m: std::io::Result<fs::Metadata>| {
                m.and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().is_ok_and(|age| age >= older_than))
            };
            let quiet = untouched(fs::metadata(dir))
                && fs::read_dir(dir)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .all(|f| f.file_name() == ".lock" || untouched(f.metadata()));
            // Checked again under the claim: an entry written meanwhile keeps the folder.
            if !quiet || dir.join(ENTRY_FILE).exists() {
                continue;
            }
            match fs::remove_dir_all(dir) {
                Ok(()) => removed += 1,
                Err(e) => {
                    tracing::warn!(error = %e.kind(), "an abandoned outbox folder could not be removed")
                }
            }
        }
        if removed > 0 {
            tracing::info!(
                folders = removed,
                "removed the working copies of sends stopped before they queued their study"
            );
        }
        removed
    }

    /// Pending entries whose next attempt is due at `now`.
    pub fn due(&self, now: u64) -> Vec<(PathBuf, OutboxEntry)> {
        self.entries()
            .into_iter()
            .filter(|(_, e)| e.state == OutboxState::Pending && e.complete && e.next_attempt <= now)
            .collect()
    }

    /// Takes the study's lock (a second process attempting the same study at the same time
    /// skips it). The lock is held while the returned file is open.
    pub fn try_claim(dir: &Path) -> Option<fs::File> {
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(".lock"))
            .ok()?;
        f.try_lock().ok()?;
        Some(f)
    }

    /// The instances of an entry as the federation client sends them.
    pub fn outgoing(dir: &Path, entry: &OutboxEntry) -> Result<Vec<OutgoingInstance>, StoreError> {
        entry
            .instances
            .iter()
            .map(|i| {
                let mut sha = [0u8; 32];
                hex::decode_to_slice(&i.sha256, &mut sha)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                Ok(OutgoingInstance {
                    path: dir.join(&i.file),
                    sha256: sha,
                    size: i.size,
                    sop_instance_uid: i.sop_instance_uid.clone(),
                })
            })
            .collect()
    }

    /// Adds to `entry` every instance file in its folder that it does not list yet (hashing
    /// each): a study that was still arriving when the node stopped lists only what had been
    /// forwarded, while every instance made durable (and so acknowledged) is a file here.
    /// Returns how many were added.
    pub fn reconcile(&self, dir: &Path, entry: &mut OutboxEntry) -> Result<usize, StoreError> {
        let listed: std::collections::HashSet<String> =
            entry.instances.iter().map(|i| i.file.clone()).collect();
        let mut added = 0;
        let mut names: Vec<String> = fs::read_dir(dir)
            .map_err(io_err(dir))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.ends_with(".dcm") && !n.starts_with('.') && !listed.contains(n))
            .collect();
        names.sort();
        for name in names {
            let p = dir.join(&name);
            let (sha, size) = self.at_rest.hash(&p)?;
            entry.instances.push(OutboxInstance {
                sop_instance_uid: name.trim_end_matches(".dcm").to_string(),
                file: name,
                sha256: hex::encode(sha),
                size,
            });
            added += 1;
        }
        Ok(added)
    }

    /// Makes the instance files of `entry` durable (one `fdatasync` each, several at once, then
    /// the folder), then records that in its `transfer.json` (`flushed`): the marker is written
    /// only once the files are on disk.
    pub fn make_durable(&self, dir: &Path, entry: &mut OutboxEntry) -> Result<(), StoreError> {
        let files: Vec<PathBuf> = entry
            .kept_instances()
            .iter()
            .map(|i| dir.join(&i.file))
            .collect();
        super::sync_files(files.iter().map(PathBuf::as_path))?;
        super::sync_dir(dir)?;
        entry.flushed = true;
        self.save(entry).map(|_| ())
    }

    /// Settles an entry found with its working copies not made durable and nobody sending it
    /// (call under its claim): a `send` stopped by a crash or a kill. Every instance file is
    /// re-verified (opened through the seal, which authenticates every segment, and its
    /// plaintext SHA-256 and size compared with the manifest); if all are whole they are made
    /// durable and the entry is kept; if any is torn or missing, the files are deleted and the
    /// entry fails with a message saying to send the study again. Returns true when the entry is
    /// usable (and now durable).
    pub fn settle(&self, dir: &Path, entry: &mut OutboxEntry) -> Result<bool, StoreError> {
        if entry.flushed {
            return Ok(true);
        }
        let whole = entry.kept_instances().iter().all(|i| {
            self.at_rest
                .hash(&dir.join(&i.file))
                .is_ok_and(|(sha, size)| hex::encode(sha) == i.sha256 && size == i.size)
        });
        if whole {
            self.make_durable(dir, entry)?;
            return Ok(true);
        }
        tracing::warn!(
            study = %entry.study_token,
            "an outbox study left by an interrupted send has torn or missing files; discarded"
        );
        for i in entry.kept_instances() {
            let _ = fs::remove_file(dir.join(&i.file));
        }
        entry.state = OutboxState::Failed;
        entry.last_error = Some(
            "the send was interrupted before its outbox copy was on disk, and the copy is incomplete; it was discarded: send the study again".into(),
        );
        entry.flushed = true; // nothing left that could be torn
        self.save(entry)?;
        Ok(false)
    }

    /// Records a verified delivery and deletes the study's instance files.
    pub fn mark_delivered(
        &self,
        dir: &Path,
        entry: &mut OutboxEntry,
        stored: u32,
        already_held: u32,
    ) -> Result<(), StoreError> {
        entry.state = OutboxState::Delivered;
        entry.attempts += 1;
        entry.last_error = None;
        entry.delivered = Some((stored, already_held));
        self.save(entry)?;
        // Every listed instance: a receipted one may have a file too (the DICOM listener's
        // mover copies an instance the partner had not confirmed yet when it looked).
        for i in &entry.instances {
            let _ = fs::remove_file(dir.join(&i.file));
        }
        Ok(())
    }

    /// Puts every FAILED study back in the queue, due now (an operator's `outbox --retry`, after
    /// fixing what failed it). Returns how many were re-queued.
    pub fn requeue_failed(&self) -> Result<usize, StoreError> {
        let mut n = 0;
        for (_, mut e) in self.entries() {
            if e.state == OutboxState::Failed {
                e.state = OutboxState::Pending;
                e.next_attempt = 0;
                self.save(&e)?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Records a failed attempt: retried later with backoff when `transient`, else failed for good.
    /// Working copies not yet durable are made durable first ([`Outbox::make_durable`]): a study
    /// is only ever queued for a later attempt with its files on disk.
    pub fn mark_attempt_failed(
        &self,
        entry: &mut OutboxEntry,
        error: &str,
        transient: bool,
    ) -> Result<(), StoreError> {
        if !entry.flushed {
            let dir = self.study_dir(&entry.agreement, &entry.study_token);
            self.make_durable(&dir, entry)?;
        }
        entry.attempts += 1;
        entry.last_error = Some(error.to_string());
        if transient {
            entry.next_attempt = now() + backoff_secs(entry.attempts);
        } else {
            entry.state = OutboxState::Failed;
        }
        self.save(entry).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> OutboxEntry {
        OutboxEntry {
            agreement: "a".into(),
            flow: "f".into(),
            purpose: "treatment".into(),
            to: "y".into(),
            study_token: "2.25.5".into(),
            patient_tokens: vec!["TOKEN".into()],
            modalities: vec!["CT".into()],
            instances: vec![OutboxInstance {
                file: "i.dcm".into(),
                sha256: hex::encode([1u8; 32]),
                size: 3,
                sop_instance_uid: "2.25.6".into(),
            }],
            state: OutboxState::Pending,
            created: now(),
            attempts: 0,
            next_attempt: 0,
            last_error: None,
            delivered: None,
            complete: true,
            flushed: true,
            receipted: 0,
        }
    }

    #[test]
    fn only_quiet_unclaimed_folders_without_an_entry_are_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let ob = Outbox::new(dir.path().to_owned());
        // A queued study: never touched, however old.
        let queued = ob.save(&entry()).unwrap();
        fs::write(queued.join("i.dcm"), b"abc").unwrap();
        // Working copies of a killed send, and of a send still running (claimed).
        let abandoned = ob.study_dir("dsa-1", "2.25.901");
        let running = ob.study_dir("dsa-1", "2.25.902");
        for d in [&abandoned, &running] {
            fs::create_dir_all(d).unwrap();
            fs::write(d.join("x.dcm"), b"sealed").unwrap();
        }
        let claim = Outbox::try_claim(&running).unwrap();
        // A folder a send just made, still empty: kept.
        let fresh = ob.study_dir("dsa-1", "2.25.903");
        fs::create_dir_all(&fresh).unwrap();
        assert_eq!(ob.discard_abandoned(std::time::Duration::from_secs(1)), 0);
        assert!(fresh.exists());
        // Too recent: kept (a send may be about to claim it).
        assert_eq!(
            ob.discard_abandoned(std::time::Duration::from_secs(3600)),
            0
        );
        assert!(abandoned.exists());
        assert_eq!(ob.discard_abandoned(std::time::Duration::ZERO), 2);
        assert!(!abandoned.exists() && !fresh.exists());
        assert!(running.join("x.dcm").exists(), "a claimed folder is kept");
        assert!(
            queued.join("i.dcm").exists(),
            "a folder with an entry is kept"
        );
        drop(claim);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff_secs(1), 5);
        assert_eq!(backoff_secs(2), 10);
        assert_eq!(backoff_secs(5), 80);
        assert_eq!(backoff_secs(40), 3600);
    }

    #[test]
    fn entries_move_through_their_states() {
        let dir = tempfile::tempdir().unwrap();
        let ob = Outbox::new(dir.path().to_owned());
        let mut e = entry();
        let study = ob.save(&e).unwrap();
        fs::write(study.join("i.dcm"), b"abc").unwrap();
        assert_eq!(ob.due(now()).len(), 1);
        let claim = Outbox::try_claim(&study).expect("first claim");
        assert!(
            Outbox::try_claim(&study).is_none(),
            "second claim while held"
        );
        drop(claim);
        ob.mark_attempt_failed(&mut e, "peer unavailable", true)
            .unwrap();
        assert!(ob.due(now()).is_empty(), "not due before its backoff");
        assert_eq!(ob.due(now() + 5).len(), 1);
        ob.mark_attempt_failed(&mut e, "refused", false).unwrap();
        assert!(
            ob.due(u64::MAX).is_empty(),
            "a failed study is not retried on its own"
        );
        assert_eq!(ob.requeue_failed().unwrap(), 1);
        assert_eq!(ob.due(now()).len(), 1, "re-queued by an operator");
        e = Outbox::load(&study).unwrap();
        ob.mark_delivered(&study, &mut e, 1, 0).unwrap();
        assert!(ob.due(u64::MAX).is_empty());
        assert!(
            !study.join("i.dcm").exists(),
            "delivered images are not kept"
        );
        assert_eq!(Outbox::load(&study).unwrap().state, OutboxState::Delivered);
    }

    /// A `send` killed after writing its working copies unflushed: the entry says so, and the
    /// next attempt re-verifies every file through its seal and SHA-256 before anything leaves.
    #[test]
    fn an_unflushed_entry_left_by_a_crash_is_reverified_and_a_torn_one_discarded() {
        use sha2::{Digest, Sha256};
        let dir = tempfile::tempdir().unwrap();
        let at_rest = AtRest::new(&crate::pseudonym::SiteKeys::generate(), true);
        let ob = Outbox::new(dir.path().to_owned()).with_at_rest(at_rest.clone());
        let body = vec![7u8; 300_000];
        let unflushed = |token: &str| {
            let mut e = entry();
            e.study_token = token.into();
            e.flushed = false;
            e.instances[0].sha256 = hex::encode(Sha256::digest(&body));
            e.instances[0].size = body.len() as u64;
            let d = ob.save(&e).unwrap();
            at_rest.write_atomic(&d.join("i.dcm"), &body).unwrap();
            (d, e)
        };

        // Whole: kept, made durable, and the marker saved.
        let (whole_dir, mut whole) = unflushed("2.25.7");
        assert!(!Outbox::load(&whole_dir).unwrap().flushed);
        assert!(ob.settle(&whole_dir, &mut whole).unwrap());
        assert!(Outbox::load(&whole_dir).unwrap().flushed);
        assert!(whole_dir.join("i.dcm").exists());
        assert_eq!(ob.due(now()).len(), 1);

        // Torn (the tail of the sealed file never reached the disk): discarded, failed, and
        // never sent.
        let (torn_dir, mut torn) = unflushed("2.25.8");
        let sealed = fs::read(torn_dir.join("i.dcm")).unwrap();
        fs::write(torn_dir.join("i.dcm"), &sealed[..sealed.len() / 2]).unwrap();
        assert!(!ob.settle(&torn_dir, &mut torn).unwrap());
        assert!(!torn_dir.join("i.dcm").exists(), "a torn copy is deleted");
        let kept = Outbox::load(&torn_dir).unwrap();
        assert_eq!(kept.state, OutboxState::Failed);
        assert!(kept.last_error.unwrap().contains("send the study again"));
        assert_eq!(ob.due(u64::MAX).len(), 1, "only the whole one is due");

        // Present but with other bytes than the manifest says: discarded as well.
        let (wrong_dir, mut wrong) = unflushed("2.25.9");
        at_rest
            .write_atomic(&wrong_dir.join("i.dcm"), &[8u8; 300_000])
            .unwrap();
        assert!(!ob.settle(&wrong_dir, &mut wrong).unwrap());

        // A failed attempt makes the working copies durable before the study is queued.
        let (failed_dir, mut failed) = unflushed("2.25.10");
        ob.mark_attempt_failed(&mut failed, "peer unavailable", true)
            .unwrap();
        let queued = Outbox::load(&failed_dir).unwrap();
        assert!(queued.flushed && queued.state == OutboxState::Pending);
    }

    /// The instances a `send`'s partial offers had confirmed before its entry was written have
    /// no file: settling, flushing and delivering the entry leave them alone, and a missing
    /// file among the others still discards it.
    #[test]
    fn receipted_instances_have_no_file_and_the_others_are_checked() {
        use sha2::{Digest, Sha256};
        let dir = tempfile::tempdir().unwrap();
        let at_rest = AtRest::new(&crate::pseudonym::SiteKeys::generate(), true);
        let ob = Outbox::new(dir.path().to_owned()).with_at_rest(at_rest.clone());
        let body = vec![5u8; 1000];
        let two = |token: &str, write_second: bool| {
            let mut e = entry();
            e.study_token = token.into();
            e.flushed = false;
            e.receipted = 1;
            let mut second = e.instances[0].clone();
            second.file = "j.dcm".into();
            second.sha256 = hex::encode(Sha256::digest(&body));
            second.size = body.len() as u64;
            e.instances.push(second);
            let d = ob.save(&e).unwrap();
            if write_second {
                at_rest.write_atomic(&d.join("j.dcm"), &body).unwrap();
            }
            (d, e)
        };
        let (d, mut e) = two("2.25.11", true);
        assert!(!d.join("i.dcm").exists());
        assert!(
            ob.settle(&d, &mut e).unwrap(),
            "the receipted one needs no file"
        );
        assert!(Outbox::load(&d).unwrap().flushed);
        assert_eq!(Outbox::load(&d).unwrap().receipted, 1);
        ob.mark_delivered(&d, &mut e, 1, 1).unwrap();
        assert!(!d.join("j.dcm").exists());

        let (d, mut e) = two("2.25.12", false);
        assert!(
            !ob.settle(&d, &mut e).unwrap(),
            "an unconfirmed file is missing"
        );
    }
}
