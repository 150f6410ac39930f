//! Durable storage of a node.
//!
//! Owns: the [`Store`] trait (what the rest of the node may ask of storage), and its embedded
//! implementation [`LocalStore`]: a sled index plus the stored copy of each received instance,
//! a staging area for transfers that are not yet verified (and the verified instances of
//! interrupted ones, kept sealed for resumption), delivery of studies to the inbox folder as
//! ordinary DICOM files, `store verify`, the durable [`outbox`] of studies waiting to be sent,
//! and the durable [`delivery`] queue of received instances waiting for the site's PACS. The
//! destruction of a received study whose retention ended, and the queue of its receipts, is
//! [`retention`].
//!
//! A received instance is kept on disk once:
//! - inbox delivery with encryption at rest (`[storage] encrypt_at_rest`, on by default): the
//!   plaintext inbox file is the stored copy. The receiver writes it as it arrives under a hidden
//!   name ([`Store::inbox_part`]); the commit makes it durable and names it; no sealed blob is
//!   written. Its SHA-256 goes into a sealed checksum list ([`LocalStore::sums_path`]) so that
//!   `store verify` can check it while the node runs, and every "already held" answer re-hashes
//!   it ([`Store::check_held`]). A copy the site took out of the inbox is handed on: still held
//!   by the index, never delivered again;
//! - a PACS as the delivery (`[dicom.deliver]`): the sealed, content-addressed blob (written
//!   under a temporary name, made durable, renamed) is the one copy, queued for the PACS; the
//!   inbox is not written;
//! - encryption at rest off: the plaintext blob, with the inbox file a hard link to it.
//!
//! Flushes are per file, several at once ([`durable`]), never of the whole file system. sled
//! records hold tokens, de-identified UIDs and hashes only.
//!
//! sled 0.34 only fsyncs on its own every 500 ms, so every method that records something flushes
//! before it returns: nothing is acknowledged to a peer before it is on disk.
//!
//! Does not own: what may be stored (that is `federation` enforcing `dsa`), or the vault (that
//! is `pseudonym`; the node opens it in its own database, `data/vault`).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub mod delivery;
pub mod durable;
pub mod outbox;
pub mod quarantine;
pub mod retention;
pub mod sealed;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("storage index: {0}")]
    Index(#[from] sled::Error),
    #[error(transparent)]
    Sealed(#[from] sealed::SealError),
    #[error("the data directory {0} is in use by another pacs-broker process (is `serve` running with this config?)")]
    InUse(PathBuf),
    #[error("storage index record is corrupt: {0}")]
    Corrupt(String),
    #[error("stored instance {0} failed its SHA-256 check at rest; it was quarantined and must be received again")]
    BlobCorrupted(String),
    #[error("the {what} of data folder {dir} is missing ({path}) although the folder was used before; refusing to start with an empty one. Restore it from backup (or move the data folder away to start afresh)")]
    Missing {
        what: &'static str,
        dir: PathBuf,
        path: PathBuf,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A verified instance waiting in the staging area to be committed.
#[derive(Debug, Clone)]
pub struct StagedInstance {
    pub path: PathBuf,
    pub sha256: [u8; 32],
    pub size: u64,
    pub sop_instance_uid: String,
}

/// What a node knows about one received study.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StudyRecord {
    pub agreement: String,
    pub flow: String,
    pub from_site: String,
    pub study_token: String,
    /// SOP Instance UID (de-identified) -> SHA-256 (hex) of the instance.
    pub instances: BTreeMap<String, String>,
    /// How many instances the last offer announced.
    pub expected: usize,
    /// Unix time (seconds) of the first and last receipt.
    pub first_received: u64,
    pub last_received: u64,
    /// The study's (de-identified) Patient ID, a token, as the receiver's delivery check read it
    /// ([`Store::note_patient`]): a result returned on the study is checked against it even
    /// after the site has taken every inbox copy out. `None` in records from before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
}

impl StudyRecord {
    pub fn is_complete(&self) -> bool {
        self.instances.len() >= self.expected
    }
}

/// Outcome of committing a transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub stored: usize,
    pub already_held: usize,
    pub study: StudyRecord,
    /// Blobs this commit wrote from staged files whose SHA-256 was verified as they arrived:
    /// delivering them need not hash them again.
    pub verified: std::collections::HashSet<[u8; 32]>,
}

/// What the node needs from storage. [`LocalStore`] is the embedded implementation; an object
/// store could implement the same trait.
pub trait Store: Send + Sync + 'static {
    /// True when an instance with these exact bytes is held. Internal use only: answering a
    /// peer with it would tell that peer what other parties sent (use [`Store::check_blob`] on
    /// an instance of the same study record instead).
    fn has_instance(&self, sha256: &[u8; 32]) -> Result<bool, StoreError>;
    /// Re-hashes a held blob. A blob whose bytes no longer match its SHA-256 is moved to the
    /// quarantine folder (never delivered again) and reported as [`BlobCheck::Quarantined`].
    fn check_blob(&self, sha256: &[u8; 32]) -> Result<BlobCheck, StoreError>;
    /// Re-hashes the stored copy of instance `sop_instance_uid` of study `key` (SHA-256
    /// `sha256`): its sealed blob, or, where the inbox copy is the stored copy, that file. A copy
    /// whose bytes no longer match is moved to the quarantine folder. An inbox copy the site took
    /// out of the inbox is [`BlobCheck::HandedOn`].
    fn check_held(
        &self,
        _key: &StudyKey,
        _sop_instance_uid: &str,
        sha256: &[u8; 32],
    ) -> Result<BlobCheck, StoreError> {
        self.check_blob(sha256)
    }
    /// Notes the (de-identified) Patient ID of a study in its record, unless one is noted.
    fn note_patient(&self, _key: &StudyKey, _patient: &str) -> Result<(), StoreError> {
        Ok(())
    }
    /// Forgets one instance of a study record (it will be asked for again).
    fn forget_instance(&self, key: &StudyKey, sop_instance_uid: &str) -> Result<(), StoreError>;
    /// A fresh file in the staging area (same file system as the blobs, so commit is a rename).
    fn stage_file(&self) -> Result<(fs::File, PathBuf), StoreError>;
    /// Moves verified staged instances into the store and records them under the study, durably
    /// (the staged files need not have been flushed: their bytes are made durable, together,
    /// before they are renamed).
    fn commit(
        &self,
        key: &StudyKey,
        expected: usize,
        staged: Vec<StagedInstance>,
        already_held: Vec<(String, [u8; 32])>,
    ) -> Result<Committed, StoreError>;
    /// The record of one study.
    fn study(&self, key: &StudyKey) -> Result<Option<StudyRecord>, StoreError>;
    /// Every study record.
    fn studies(&self) -> Result<Vec<StudyRecord>, StoreError>;
    /// Reads an instance's bytes.
    fn read_instance(&self, sha256: &[u8; 32]) -> Result<Vec<u8>, StoreError>;
    /// Writes a complete study as DICOM files to the inbox folder; returns its folder.
    fn deliver(&self, study: &StudyRecord) -> Result<PathBuf, StoreError>;
    /// [`Store::deliver`] right after a commit: the blobs that commit wrote were verified a
    /// moment ago and are not hashed again (every other blob is).
    fn deliver_committed(&self, c: &Committed) -> Result<PathBuf, StoreError> {
        self.deliver(&c.study)
    }
    /// Keeps verified instances of an interrupted transfer (made durable here, like
    /// [`Store::commit`]) so that the next offer of the same study from the same site resumes
    /// after them. They are not stored (not indexed, not
    /// delivered) until a transfer of the whole study completes.
    fn keep_partial(&self, key: &StudyKey, staged: Vec<StagedInstance>) -> Result<(), StoreError>;
    /// The verified instances kept for a study's resumption.
    fn partials(&self, key: &StudyKey) -> Result<Vec<StagedInstance>, StoreError>;
    /// Forgets (and deletes) what was kept for a study's resumption.
    fn discard_partials(&self, key: &StudyKey) -> Result<(), StoreError>;
    /// How instance files are sealed at rest: staged files are written through it, and every
    /// stored instance is read through it (see [`sealed`]).
    fn at_rest(&self) -> sealed::AtRest {
        sealed::AtRest::plain()
    }
    /// Where the receiver writes the plaintext of an instance as it arrives, when the inbox copy
    /// is the stored copy (inbox delivery with encryption at rest): a new file (opened for
    /// writing, created here) under a fresh hidden name in the study's inbox folder, which the
    /// delivery check reads and [`Store::commit`] makes durable and names. The folder is created
    /// only when it is missing (the first instance of a study, or after the site removed it).
    /// `None` where instances are staged sealed instead ([`Store::stage_file`]): a PACS is the
    /// delivery (`[dicom.deliver]`, the sealed blob is the one copy), or instances are not sealed
    /// at rest (the inbox copy is then a hard link to the blob).
    fn inbox_part(
        &self,
        _key: &StudyKey,
        _sop_instance_uid: &str,
    ) -> Result<Option<(fs::File, PathBuf)>, StoreError> {
        Ok(None)
    }
    /// [`Store::commit`], then [`Store::deliver_committed`] if the study is complete.
    fn commit_and_deliver(
        &self,
        key: &StudyKey,
        expected: usize,
        staged: Vec<StagedInstance>,
        already_held: Vec<(String, [u8; 32])>,
    ) -> Result<(Committed, Option<PathBuf>), StoreError>;
}

/// What re-hashing a held blob found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobCheck {
    /// The bytes match: the blob at this path may be delivered.
    Intact(PathBuf),
    /// No such blob.
    Missing,
    /// The bytes did not match; the blob was moved to this path in the quarantine folder.
    Quarantined(PathBuf),
    /// Its one stored copy was the inbox copy, and the site took it out of the inbox (into its
    /// PACS, by hand or script): the index's record of its receipt and checks stands, and a
    /// re-offer of it counts as already held (see [`Store::check_held`]).
    HandedOn,
}

/// How long the verified instances of an interrupted transfer wait for its resumption.
pub const PARTIAL_TTL_SECS: u64 = 24 * 3600;

#[derive(Serialize, Deserialize)]
struct PartialRecord {
    uid: String,
    size: u64,
    at: u64,
}

/// Identifies a received study: (agreement, sending site, study token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StudyKey {
    pub agreement: String,
    pub flow: String,
    pub from_site: String,
    pub study_token: String,
}

impl StudyKey {
    /// The key of a study received from `from_site` under (agreement, flow).
    pub fn new(agreement: &str, flow: &str, from_site: &str, study_token: &str) -> StudyKey {
        StudyKey {
            agreement: agreement.to_string(),
            flow: flow.to_string(),
            from_site: from_site.to_string(),
            study_token: study_token.to_string(),
        }
    }

    fn partial_prefix(&self) -> Vec<u8> {
        format!(
            "{}\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}",
            self.agreement, self.flow, self.from_site, self.study_token
        )
        .into_bytes()
    }

    fn index_key(&self) -> Vec<u8> {
        format!(
            "study\u{1f}{}\u{1f}{}\u{1f}{}\u{1f}{}",
            self.agreement, self.flow, self.from_site, self.study_token
        )
        .into_bytes()
    }
}

/// sled index + content-addressed files under one data directory.
pub struct LocalStore {
    root: PathBuf,
    db: sled::Db,
    index: sled::Tree,
    partial: sled::Tree,
    /// Instances waiting for the site's PACS; filled by `commit` only once delivery is enabled.
    delivery: delivery::DeliveryQueue,
    pacs_delivery: std::sync::atomic::AtomicBool,
    /// Instance files are sealed through this (or written plain when encryption at rest is off).
    at_rest: sealed::AtRest,
}

impl LocalStore {
    /// Opens (creating if needed) the store under `root`.
    ///
    /// Refuses to start with an empty index beside blobs or an inbox that exist (or when the
    /// index was created here before): a lost index is restored from backup, never recreated
    /// empty. Folders are 0700, index files 0600.
    pub fn open(root: &Path) -> Result<LocalStore, StoreError> {
        LocalStore::open_with(root, sealed::AtRest::plain())
    }

    /// [`LocalStore::open`] with encryption at rest: staged instances are sealed by whoever
    /// writes them through [`Store::at_rest`], and every stored instance is read through it.
    pub fn open_with(root: &Path, at_rest: sealed::AtRest) -> Result<LocalStore, StoreError> {
        let used_before = ["blobs", "inbox"].iter().any(|d| {
            walkdir::WalkDir::new(root.join(d))
                .into_iter()
                .flatten()
                .any(|e| e.file_type().is_file())
        });
        guard_component(root, "index", &root.join("index"), used_before)?;
        private_dir(root)?;
        for d in [
            "blobs",
            "staging",
            "staging/resume",
            "inbox",
            "quarantine",
            "sums",
        ] {
            private_dir(&root.join(d))?;
        }
        let db = sled::Config::new()
            .path(root.join("index"))
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|e| match &e {
                sled::Error::Io(io) if io.to_string().contains("lock") => {
                    StoreError::InUse(root.to_owned())
                }
                _ => StoreError::Index(e),
            })?;
        // Only now, holding the index's lock (a `store verify` beside a running node stops at
        // it): anything left in staging, and any hidden inbox copy, is from a transfer that
        // never completed; it was never acknowledged, so it is discarded.
        let staging = root.join("staging");
        for e in fs::read_dir(&staging).map_err(io_err(&staging))?.flatten() {
            if e.path().is_file() {
                let _ = fs::remove_file(e.path());
            }
        }
        discard_inbox_parts(&root.join("inbox"))?;
        let index = db.open_tree("index")?;
        let partial = db.open_tree("partial")?;
        let delivery = delivery::DeliveryQueue::open(&db)?;
        db.flush()?;
        restrict_tree(&root.join("index"))?;
        mark_component(root, "index")?;
        let store = LocalStore {
            root: root.to_owned(),
            db,
            index,
            partial,
            delivery,
            pacs_delivery: Default::default(),
            at_rest,
        };
        store.sweep_partials()?;
        Ok(store)
    }

    fn resume_path(&self, sha256: &[u8; 32]) -> PathBuf {
        self.root
            .join("staging")
            .join("resume")
            .join(hex::encode(sha256))
    }

    /// Drops kept instances older than [`PARTIAL_TTL_SECS`], and files no record points at.
    fn sweep_partials(&self) -> Result<(), StoreError> {
        let now = Self::now();
        let mut live = std::collections::BTreeSet::new();
        for item in self.partial.iter() {
            let (k, v) = item?;
            let rec: Option<PartialRecord> = serde_json::from_slice(&v).ok();
            let sha_hex = String::from_utf8_lossy(&k)
                .rsplit('\u{1f}')
                .next()
                .unwrap_or_default()
                .to_string();
            match rec {
                Some(r) if now.saturating_sub(r.at) < PARTIAL_TTL_SECS => {
                    live.insert(sha_hex);
                }
                _ => {
                    self.partial.remove(k)?;
                }
            }
        }
        let dir = self.root.join("staging").join("resume");
        for e in fs::read_dir(&dir).map_err(io_err(&dir))?.flatten() {
            if !live.contains(&e.file_name().to_string_lossy().to_string()) {
                let _ = fs::remove_file(e.path());
            }
        }
        self.partial.flush()?;
        Ok(())
    }

    /// Moves a blob whose bytes no longer match its name to the quarantine folder.
    fn quarantine(&self, sha256: &[u8; 32]) -> Result<PathBuf, StoreError> {
        self.quarantine_file(&self.blob_path(sha256), sha256)
    }

    /// Moves the stored copy `from` of instance `sha256` (a blob or an inbox copy) whose bytes
    /// no longer match to the quarantine folder, named by the SHA-256 it should have had.
    fn quarantine_file(&self, from: &Path, sha256: &[u8; 32]) -> Result<PathBuf, StoreError> {
        let to =
            self.root
                .join("quarantine")
                .join(format!("{}.{}", hex::encode(sha256), Self::now()));
        fs::rename(from, &to).map_err(io_err(&to))?;
        tracing::error!(blob = %hex::encode(&sha256[..6]), "stored instance failed its SHA-256 check at rest; quarantined");
        Ok(to)
    }

    /// Re-hashes every blob (`pacs-broker store verify`), opening sealed blobs through
    /// `at_rest`. Nothing is moved.
    pub fn verify_blobs(root: &Path, at_rest: &sealed::AtRest) -> Result<BlobReport, StoreError> {
        let mut report = BlobReport::default();
        let blobs = root.join("blobs");
        for e in walkdir::WalkDir::new(&blobs).sort_by_file_name() {
            let e = e.map_err(|e| StoreError::Io {
                path: blobs.clone(),
                source: e.into(),
            })?;
            if !e.file_type().is_file() {
                continue;
            }
            let name = e.file_name().to_string_lossy().to_string();
            let mut want = [0u8; 32];
            let named = hex::decode_to_slice(&name, &mut want).is_ok();
            let got = match at_rest.hash(e.path()) {
                Ok((h, _)) => Some(h),
                Err(sealed::SealError::Io { path, source }) => {
                    return Err(StoreError::Io { path, source })
                }
                Err(err @ sealed::SealError::UnknownKey { .. }) => {
                    // Not damage: the key file in use does not hold the blob's key.
                    report.checked += 1;
                    report.unreadable.push((e.into_path(), err.to_string()));
                    continue;
                }
                Err(_) => None,
            };
            report.checked += 1;
            report.bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
            if !named || got != Some(want) {
                report.mismatched.push(e.into_path());
            }
        }
        verify_inbox_copies(root, at_rest, &mut report)?;
        Ok(report)
    }

    /// Instances the index lists whose blob is missing (`pacs-broker store verify`).
    pub fn missing_blobs(&self) -> Result<Vec<(StudyKey, String)>, StoreError> {
        let mut out = Vec::new();
        for rec in self.studies()? {
            for (uid, sha_hex) in &rec.instances {
                let mut sha = [0u8; 32];
                hex::decode_to_slice(sha_hex, &mut sha)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                let key =
                    StudyKey::new(&rec.agreement, &rec.flow, &rec.from_site, &rec.study_token);
                // Where the inbox copy is the stored copy, an instance with neither a blob nor
                // an inbox copy was handed on by the site, not lost.
                let copy_or_handed_on =
                    || self.inbox_copies() || self.inbox_copy_path(&key, uid).exists();
                if !self.blob_path(&sha).exists() && !copy_or_handed_on() {
                    out.push((
                        StudyKey::new(&rec.agreement, &rec.flow, &rec.from_site, &rec.study_token),
                        uid.clone(),
                    ));
                }
            }
        }
        Ok(out)
    }

    /// The inbox folder where complete studies are delivered.
    pub fn inbox(&self) -> PathBuf {
        self.root.join("inbox")
    }

    /// Whether the inbox copy of a received instance is its stored copy (inbox delivery with
    /// encryption at rest): then no sealed blob is written for it.
    fn inbox_copies(&self) -> bool {
        self.at_rest.seals() && !self.pacs_delivery.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The inbox folder of one study.
    fn study_inbox(&self, agreement: &str, study_token: &str) -> PathBuf {
        self.inbox()
            .join(safe_name(agreement))
            .join(safe_name(study_token))
    }

    /// The inbox copy of one instance.
    fn inbox_copy_path(&self, key: &StudyKey, sop_instance_uid: &str) -> PathBuf {
        self.study_inbox(&key.agreement, &key.study_token)
            .join(format!("{}.dcm", safe_name(sop_instance_uid)))
    }

    /// The folder of the checksum lists of a study's inbox copies (where they are the stored
    /// copies): each commit writes one list, `<random>.sha256`, with one
    /// `<sha256 hex>  <file name>` line per instance it stored (the format of `sha256sum`),
    /// sealed at rest. Lists are written once and never rewritten (so a key rotation re-sealing
    /// them beside a running node loses nothing). They live outside the inbox, so that the
    /// site's scripts see only DICOM files there, and let `store verify` check the inbox copies
    /// while the node runs (its index is locked then).
    pub fn sums_path(root: &Path, agreement: &str, study_token: &str) -> PathBuf {
        root.join("sums")
            .join(safe_name(agreement))
            .join(safe_name(study_token))
    }

    /// From now on, every instance a commit adds to a study is also queued for the site's PACS
    /// (in the same flush); returns the queue.
    pub fn enable_pacs_delivery(&self) -> delivery::DeliveryQueue {
        self.pacs_delivery
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.delivery.clone()
    }

    /// The queue of instances waiting for the site's PACS.
    pub fn delivery_queue(&self) -> delivery::DeliveryQueue {
        self.delivery.clone()
    }

    /// Queues a result re-identified at the origin (the return path, `results::sink`) for the
    /// site's PACS: the staged file becomes a blob and the delivery queue gets its entry, in one
    /// flush. No study record is made: a result is not a received study.
    pub fn queue_result(&self, staged: StagedInstance, key: &StudyKey) -> Result<(), StoreError> {
        let dest = self.blob_path(&staged.sha256);
        let dir = dest.parent().expect("blob has a folder").to_owned();
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        fs::rename(&staged.path, &dest).map_err(io_err(&dest))?;
        sync_dir(&dir)?;
        self.delivery
            .push(key, &staged.sop_instance_uid, &hex::encode(staged.sha256))?;
        self.db.flush()?;
        Ok(())
    }

    /// The file holding a stored instance (to stream it without reading it whole).
    pub fn instance_path(&self, sha256: &[u8; 32]) -> PathBuf {
        self.blob_path(sha256)
    }

    fn blob_path(&self, sha256: &[u8; 32]) -> PathBuf {
        let h = hex::encode(sha256);
        self.root.join("blobs").join(&h[..2]).join(&h)
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
}

/// What `store verify` found among the blobs.
#[derive(Debug, Default, Clone)]
pub struct BlobReport {
    /// Blobs checked.
    pub checked: usize,
    /// Inbox copies checked (where they are the stored copies).
    pub inbox_checked: usize,
    /// Inbox copies listed in a study's checksum list that the site took out of the inbox.
    pub handed_on: usize,
    pub bytes: u64,
    /// Blobs whose bytes do not match their name (SHA-256), or whose seal fails authentication.
    pub mismatched: Vec<PathBuf>,
    /// Blobs sealed under a data key the key file does not hold (a wrong key file), with why.
    pub unreadable: Vec<(PathBuf, String)>,
}

/// `store verify` of the inbox copies that are stored copies: each study's checksum list
/// ([`LocalStore::sums_path`]) is read and every file it lists still in the inbox is re-hashed.
fn verify_inbox_copies(
    root: &Path,
    at_rest: &sealed::AtRest,
    report: &mut BlobReport,
) -> Result<(), StoreError> {
    let sums = root.join("sums");
    // Every list of a study, merged (an instance received again after damage is listed twice).
    let mut studies: BTreeMap<PathBuf, BTreeMap<String, [u8; 32]>> = BTreeMap::new();
    for e in walkdir::WalkDir::new(&sums)
        .sort_by_file_name()
        .min_depth(3)
        .max_depth(3)
    {
        let e = e.map_err(|e| StoreError::Io {
            path: sums.clone(),
            source: e.into(),
        })?;
        let name = e.file_name().to_string_lossy();
        if name.starts_with('.') || !name.ends_with(".sha256") {
            continue; // a temporary file of a commit or a rotation under way
        }
        let Ok(rel) = e.path().parent().unwrap_or(&sums).strip_prefix(&sums) else {
            continue;
        };
        let dir = root.join("inbox").join(rel);
        match at_rest.read(e.path()) {
            Ok(list) => studies.entry(dir).or_default().extend(parse_sums(&list)),
            Err(sealed::SealError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound => {} // destroyed meanwhile
            Err(sealed::SealError::Io { path, source }) => {
                return Err(StoreError::Io { path, source })
            }
            Err(err @ sealed::SealError::UnknownKey { .. }) => {
                report.unreadable.push((e.into_path(), err.to_string()));
            }
            Err(_) => report.mismatched.push(e.into_path()),
        }
    }
    for (dir, list) in studies {
        for (file, want) in list {
            let path = dir.join(&file);
            match hash_file(&path) {
                Ok(got) => {
                    report.inbox_checked += 1;
                    report.bytes += fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                    if got != want {
                        report.mismatched.push(path);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => report.handed_on += 1,
                Err(source) => return Err(StoreError::Io { path, source }),
            }
        }
    }
    Ok(())
}

/// The entries of a checksum list: (file name, SHA-256). Malformed lines are skipped.
fn parse_sums(list: &[u8]) -> BTreeMap<String, [u8; 32]> {
    String::from_utf8_lossy(list)
        .lines()
        .filter_map(|l| {
            let (hex_sha, file) = l.split_once("  ")?;
            let mut sha = [0u8; 32];
            hex::decode_to_slice(hex_sha, &mut sha).ok()?;
            let plain_name = !file.contains('/') && !file.starts_with('.');
            plain_name.then(|| (file.to_string(), sha))
        })
        .collect()
}

/// Removes the hidden inbox copies of transfers that never committed (a crash): they were never
/// acknowledged, and the site must not mistake them for delivered files.
fn discard_inbox_parts(inbox: &Path) -> Result<(), StoreError> {
    for e in walkdir::WalkDir::new(inbox)
        .min_depth(3)
        .max_depth(3)
        .into_iter()
        .flatten()
    {
        let name = e.file_name().to_string_lossy();
        if e.file_type().is_file() && name.starts_with('.') && name.ends_with(".part") {
            fs::remove_file(e.path()).map_err(io_err(e.path()))?;
        }
    }
    Ok(())
}

/// SHA-256 of a file, read in 256 KiB blocks.
pub fn hash_file(path: &Path) -> std::io::Result<[u8; 32]> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().into())
}

/// Makes the bytes of `files` durable, together: one `fdatasync` per file, several at once
/// ([`durable::sync_files_together`]), never a whole-file-system flush that would also write
/// other processes' files. Staged files of a transfer are written without a flush and made
/// durable here, before they are renamed into the store.
pub fn sync_files<'a>(files: impl IntoIterator<Item = &'a Path>) -> Result<(), StoreError> {
    let files: Vec<&Path> = files.into_iter().collect();
    durable::sync_files_together(&files).map_err(|(p, e)| StoreError::Io { path: p, source: e })
}

/// Makes the entries of `dirs` durable (renames and links into them): one `fsync` per folder,
/// several at once ([`durable::sync_dirs_together`]).
pub fn sync_dirs<'a>(dirs: impl IntoIterator<Item = &'a Path>) -> Result<(), StoreError> {
    let dirs: Vec<&Path> = dirs.into_iter().collect();
    durable::sync_dirs_together(&dirs).map_err(|(p, e)| StoreError::Io { path: p, source: e })
}

/// fsyncs a directory so that a rename inside it is durable.
pub fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    #[cfg(unix)]
    {
        fs::File::open(dir)
            .and_then(|f| f.sync_all())
            .map_err(io_err(dir))?;
    }
    let _ = dir;
    Ok(())
}

/// True when a process holds the sled database in `dir` open (sled locks its `db` file
/// exclusively while open): a node serving from that data folder, or sending beside it.
pub fn database_in_use(dir: &Path) -> bool {
    let Ok(f) = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("db"))
    else {
        return false;
    };
    matches!(f.try_lock(), Err(fs::TryLockError::WouldBlock))
}

/// Creates a folder (and its parents) and makes it private to the node's user (0700).
pub fn private_dir(dir: &Path) -> Result<(), StoreError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
    }
    Ok(())
}

/// Makes a file private to the node's user (0600).
pub fn private_file(path: &Path) -> Result<(), StoreError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io_err(path))?;
    }
    let _ = path;
    Ok(())
}

/// Makes every file under a folder 0600 and every folder 0700 (a sled database, say).
pub fn restrict_tree(dir: &Path) -> Result<(), StoreError> {
    for e in walkdir::WalkDir::new(dir).into_iter().flatten() {
        if e.file_type().is_dir() {
            private_dir(e.path())?;
        } else if e.file_type().is_file() {
            private_file(e.path())?;
        }
    }
    Ok(())
}

const LAYOUT_FILE: &str = ".pacs-broker-layout";

fn layout_lists(dir: &Path, what: &str) -> bool {
    fs::read_to_string(dir.join(LAYOUT_FILE))
        .map(|t| t.lines().any(|l| l.trim() == what))
        .unwrap_or(false)
}

/// Refuses to (re)create `what` at `path` when it is missing but `dir` shows it existed: its
/// layout file lists it, or `used_before` (data that only exists beside it). An index or vault
/// that silently started empty would hide lost records (and a lost vault loses re-identification).
pub fn guard_component(
    dir: &Path,
    what: &'static str,
    path: &Path,
    used_before: bool,
) -> Result<(), StoreError> {
    if !path.exists() && (used_before || layout_lists(dir, what)) {
        return Err(StoreError::Missing {
            what,
            dir: dir.to_owned(),
            path: path.to_owned(),
        });
    }
    Ok(())
}

/// Records in `dir`'s layout file that `what` exists, so that losing it is noticed.
pub fn mark_component(dir: &Path, what: &str) -> Result<(), StoreError> {
    // Read, append, write: two components opened at once in one process (a node's store as it
    // starts serving, its vault for a `send`) must not lose each other's line.
    static LAYOUT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = LAYOUT.lock().unwrap_or_else(|p| p.into_inner());
    if layout_lists(dir, what) {
        return Ok(());
    }
    let path = dir.join(LAYOUT_FILE);
    let mut text = fs::read_to_string(&path).unwrap_or_else(|_| {
        "# Parts of this data folder that exist; pacs-broker refuses to start if one goes missing.\n"
            .to_string()
    });
    text.push_str(what);
    text.push('\n');
    write_atomic(&path, text.as_bytes())?;
    private_file(&path)
}

/// Writes `bytes` to `path` atomically: temporary name in the same folder, fsync, rename, fsync dir.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io_err(dir))?;
    tmp.write_all(bytes).map_err(io_err(path))?;
    tmp.as_file().sync_all().map_err(io_err(path))?;
    tmp.persist(path).map_err(|e| StoreError::Io {
        path: path.to_owned(),
        source: e.error,
    })?;
    sync_dir(dir)
}

impl Store for LocalStore {
    fn has_instance(&self, sha256: &[u8; 32]) -> Result<bool, StoreError> {
        Ok(self.blob_path(sha256).exists())
    }

    fn check_blob(&self, sha256: &[u8; 32]) -> Result<BlobCheck, StoreError> {
        let path = self.blob_path(sha256);
        match self.at_rest.hash(&path) {
            Ok((h, _)) if h == *sha256 => Ok(BlobCheck::Intact(path)),
            Ok(_) | Err(sealed::SealError::Damaged { .. } | sealed::SealError::Header { .. }) => {
                Ok(BlobCheck::Quarantined(self.quarantine(sha256)?))
            }
            Err(sealed::SealError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(BlobCheck::Missing)
            }
            // A data key this key file does not hold is the wrong key file, not a damaged blob:
            // nothing is moved.
            Err(e) => Err(e.into()),
        }
    }

    fn check_held(
        &self,
        key: &StudyKey,
        sop_instance_uid: &str,
        sha256: &[u8; 32],
    ) -> Result<BlobCheck, StoreError> {
        match self.check_blob(sha256)? {
            BlobCheck::Missing => {}
            found => return Ok(found),
        }
        let copy = self.inbox_copy_path(key, sop_instance_uid);
        match hash_file(&copy) {
            Ok(h) if h == *sha256 => Ok(BlobCheck::Intact(copy)),
            Ok(_) => Ok(BlobCheck::Quarantined(self.quarantine_file(&copy, sha256)?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(if self.inbox_copies() {
                BlobCheck::HandedOn
            } else {
                BlobCheck::Missing
            }),
            Err(e) => Err(io_err(&copy)(e)),
        }
    }

    fn at_rest(&self) -> sealed::AtRest {
        self.at_rest.clone()
    }

    fn note_patient(&self, key: &StudyKey, patient: &str) -> Result<(), StoreError> {
        let k = key.index_key();
        if let Some(v) = self.index.get(&k)? {
            let mut rec: StudyRecord =
                serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            if rec.patient.is_none() {
                rec.patient = Some(patient.to_string());
                self.index
                    .insert(k, serde_json::to_vec(&rec).expect("record serialises"))?;
                self.db.flush()?;
            }
        }
        Ok(())
    }

    fn forget_instance(&self, key: &StudyKey, sop_instance_uid: &str) -> Result<(), StoreError> {
        let k = key.index_key();
        if let Some(v) = self.index.get(&k)? {
            let mut rec: StudyRecord =
                serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            rec.instances.remove(sop_instance_uid);
            self.index
                .insert(k, serde_json::to_vec(&rec).expect("record serialises"))?;
            self.db.flush()?;
        }
        Ok(())
    }

    fn stage_file(&self) -> Result<(fs::File, PathBuf), StoreError> {
        let dir = self.root.join("staging");
        let (f, p) = tempfile::Builder::new()
            .prefix("incoming-")
            .tempfile_in(&dir)
            .map_err(io_err(&dir))?
            .keep()
            .map_err(|e| StoreError::Io {
                path: dir.clone(),
                source: e.error,
            })?;
        Ok((f, p))
    }

    fn commit(
        &self,
        key: &StudyKey,
        expected: usize,
        staged: Vec<StagedInstance>,
        already_held: Vec<(String, [u8; 32])>,
    ) -> Result<Committed, StoreError> {
        if self.inbox_copies() {
            self.commit_into_inbox(key, expected, staged, already_held)
        } else {
            self.commit_to_blobs(key, expected, staged, already_held)
        }
    }

    fn inbox_part(
        &self,
        key: &StudyKey,
        sop_instance_uid: &str,
    ) -> Result<Option<(fs::File, PathBuf)>, StoreError> {
        if !self.inbox_copies() {
            return Ok(None);
        }
        let dir = self.study_inbox(&key.agreement, &key.study_token);
        let part = part_name(&dir, sop_instance_uid);
        let create = || {
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&part)
        };
        // One `mkdir` per study, not per instance: the folder is made when the first open finds
        // it missing.
        let file = match create() {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::create_dir_all(&dir).map_err(io_err(&dir))?;
                create()
            }
            other => other,
        }
        .map_err(io_err(&part))?;
        Ok(Some((file, part)))
    }

    fn commit_and_deliver(
        &self,
        key: &StudyKey,
        expected: usize,
        staged: Vec<StagedInstance>,
        already_held: Vec<(String, [u8; 32])>,
    ) -> Result<(Committed, Option<PathBuf>), StoreError> {
        let c = self.commit(key, expected, staged, already_held)?;
        let delivered = if c.study.is_complete() {
            Some(self.deliver_committed(&c)?)
        } else {
            None
        };
        Ok((c, delivered))
    }

    fn study(&self, key: &StudyKey) -> Result<Option<StudyRecord>, StoreError> {
        self.index
            .get(key.index_key())?
            .map(|v| serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt(e.to_string())))
            .transpose()
    }

    fn studies(&self) -> Result<Vec<StudyRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.index.scan_prefix(b"study\x1f") {
            let (_, v) = item?;
            out.push(serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt(e.to_string()))?);
        }
        Ok(out)
    }

    fn read_instance(&self, sha256: &[u8; 32]) -> Result<Vec<u8>, StoreError> {
        Ok(self.at_rest.read(&self.blob_path(sha256))?)
    }

    fn keep_partial(&self, key: &StudyKey, staged: Vec<StagedInstance>) -> Result<(), StoreError> {
        let now = Self::now();
        let dir = self.root.join("staging").join("resume");
        let staging = self.root.join("staging");
        sync_files(
            staged
                .iter()
                .filter(|s| s.path.starts_with(&staging))
                .map(|s| s.path.as_path()),
        )?;
        for s in staged {
            let dest = self.resume_path(&s.sha256);
            if s.path.starts_with(&staging) {
                fs::rename(&s.path, &dest).map_err(io_err(&dest))?;
            } else {
                // A plaintext inbox copy of an interrupted transfer: kept sealed, outside the
                // inbox, until the transfer resumes (this path is rare: its cost is one copy).
                let mut from = fs::File::open(&s.path).map_err(io_err(&s.path))?;
                self.at_rest.write_atomic_from(&dest, &mut from)?;
                let _ = fs::remove_file(&s.path);
            }
            let mut k = key.partial_prefix();
            k.extend_from_slice(hex::encode(s.sha256).as_bytes());
            let rec = PartialRecord {
                uid: s.sop_instance_uid,
                size: s.size,
                at: now,
            };
            self.partial
                .insert(k, serde_json::to_vec(&rec).expect("record serialises"))?;
        }
        sync_dir(&dir)?;
        self.partial.flush()?;
        Ok(())
    }

    fn partials(&self, key: &StudyKey) -> Result<Vec<StagedInstance>, StoreError> {
        let mut out = Vec::new();
        for item in self.partial.scan_prefix(key.partial_prefix()) {
            let (k, v) = item?;
            let rec: PartialRecord =
                serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let sha_hex = &k[key.partial_prefix().len()..];
            let mut sha = [0u8; 32];
            hex::decode_to_slice(sha_hex, &mut sha)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let path = self.resume_path(&sha);
            if path.exists() {
                out.push(StagedInstance {
                    path,
                    sha256: sha,
                    size: rec.size,
                    sop_instance_uid: rec.uid,
                });
            }
        }
        Ok(out)
    }

    fn discard_partials(&self, key: &StudyKey) -> Result<(), StoreError> {
        for s in self.partials(key)? {
            let _ = fs::remove_file(&s.path);
        }
        for item in self.partial.scan_prefix(key.partial_prefix()) {
            self.partial.remove(item?.0)?;
        }
        self.partial.flush()?;
        Ok(())
    }

    fn deliver(&self, study: &StudyRecord) -> Result<PathBuf, StoreError> {
        self.deliver_to_inbox(study, &Default::default())
    }

    fn deliver_committed(&self, c: &Committed) -> Result<PathBuf, StoreError> {
        self.deliver_to_inbox(&c.study, &c.verified)
    }
}

impl LocalStore {
    /// [`Store::commit`] where the sealed blob is the stored copy (a PACS is the delivery, or
    /// nothing is sealed at rest and the inbox copy is a hard link to the blob): every staged
    /// file is made durable, then renamed to its blob.
    fn commit_to_blobs(
        &self,
        key: &StudyKey,
        expected: usize,
        staged: Vec<StagedInstance>,
        already_held: Vec<(String, [u8; 32])>,
    ) -> Result<Committed, StoreError> {
        let mut stored = 0;
        let mut verified = std::collections::HashSet::new();
        let mut touched_dirs = std::collections::BTreeSet::new();
        let mut entries = Vec::new();
        // The bytes are on disk before any name points at them.
        sync_files(staged.iter().map(|s| s.path.as_path()))?;
        for s in staged {
            // A verified staged file always replaces the blob of the same hash: that repairs a
            // blob damaged at rest, and costs a rename.
            let dest = self.blob_path(&s.sha256);
            let dir = dest.parent().expect("blob has a folder").to_owned();
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
            let existed = dest.exists();
            fs::rename(&s.path, &dest).map_err(io_err(&dest))?;
            touched_dirs.insert(dir);
            if !existed {
                stored += 1;
            }
            verified.insert(s.sha256);
            entries.push((s.sop_instance_uid, s.sha256));
        }
        // The renames are durable once their folders are (blobs are spread over up to 256).
        sync_dirs(touched_dirs.iter().map(PathBuf::as_path))?;
        self.record_commit(key, expected, entries, already_held, (stored, verified))
    }

    /// [`Store::commit`] where the inbox copy is the stored copy (inbox delivery, sealed at
    /// rest): no blob is written. Each staged instance is its plaintext in a hidden file of the
    /// study's inbox folder ([`Store::inbox_part`]; one staged sealed, kept for resumption, is
    /// decrypted there first, its SHA-256 checked). The copies and the study's checksum list are
    /// made durable together, then named, then recorded in the index: the inbox never shows a
    /// partial file, and nothing is acknowledged before its copy is on disk.
    fn commit_into_inbox(
        &self,
        key: &StudyKey,
        expected: usize,
        staged: Vec<StagedInstance>,
        already_held: Vec<(String, [u8; 32])>,
    ) -> Result<Committed, StoreError> {
        let dir = self.study_inbox(&key.agreement, &key.study_token);
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let (parts, sealed) = self.plaintext_parts(&dir, staged)?;
        let sums_dir = Self::sums_path(&self.root, &key.agreement, &key.study_token);
        let sums = sums_dir.join(format!("{:016x}.sha256", rand::random::<u64>()));
        let listed = parts
            .iter()
            .map(|(s, _)| (format!("{}.dcm", safe_name(&s.sop_instance_uid)), s.sha256));
        let sums_tmp = match self.write_sums_unsynced(&sums, listed) {
            Ok(tmp) => tmp,
            Err(e) => {
                remove_parts(&parts, &sealed);
                return Err(e);
            }
        };
        let mut files: Vec<&Path> = parts.iter().map(|(_, p)| p.as_path()).collect();
        files.push(&sums_tmp);
        if let Err(e) = sync_files(files) {
            remove_parts(&parts, &sealed);
            let _ = fs::remove_file(&sums_tmp);
            return Err(e);
        }
        let mut stored = 0;
        let mut verified = std::collections::HashSet::new();
        let mut entries = Vec::with_capacity(parts.len());
        for (s, part) in parts {
            let target = dir.join(format!("{}.dcm", safe_name(&s.sop_instance_uid)));
            if !target.exists() {
                stored += 1;
            }
            fs::rename(&part, &target).map_err(io_err(&target))?;
            verified.insert(s.sha256);
            entries.push((s.sop_instance_uid, s.sha256));
        }
        fs::rename(&sums_tmp, &sums).map_err(io_err(&sums))?;
        sync_dirs([dir.as_path(), sums_dir.as_path()])?;
        let c = self.record_commit(key, expected, entries, already_held, (stored, verified))?;
        // Sealed files kept for resumption now have their plaintext copy in the inbox.
        for f in sealed {
            let _ = fs::remove_file(f);
        }
        Ok(c)
    }

    /// The plaintext inbox copy of each staged instance: the staged file itself when the
    /// receiver wrote it there, else a hidden copy decrypted from the sealed staged file (listed
    /// second, to be removed once committed). Nothing is left behind on failure.
    #[allow(clippy::type_complexity)]
    fn plaintext_parts(
        &self,
        dir: &Path,
        staged: Vec<StagedInstance>,
    ) -> Result<(Vec<(StagedInstance, PathBuf)>, Vec<PathBuf>), StoreError> {
        let mut parts = Vec::with_capacity(staged.len());
        let mut sealed = Vec::new();
        for s in staged {
            if s.path.parent() == Some(dir) {
                let p = s.path.clone();
                parts.push((s, p));
                continue;
            }
            let part = part_name(dir, &s.sop_instance_uid);
            if let Err(e) = self.at_rest.copy_out_unsynced(&s.path, &part, &s.sha256) {
                remove_parts(&parts, &sealed);
                return Err(e.into());
            }
            sealed.push(s.path.clone());
            parts.push((s, part));
        }
        Ok((parts, sealed))
    }

    /// Writes the checksum list `sums` of `new` entries (sealed, not flushed) to a temporary
    /// file beside it; returns that file.
    fn write_sums_unsynced(
        &self,
        sums: &Path,
        new: impl Iterator<Item = (String, [u8; 32])>,
    ) -> Result<PathBuf, StoreError> {
        let list: BTreeMap<String, [u8; 32]> = new.collect();
        let mut text = String::with_capacity(list.len() * 100);
        for (file, sha) in &list {
            text.push_str(&hex::encode(sha));
            text.push_str("  ");
            text.push_str(file);
            text.push('\n');
        }
        let dir = sums.parent().expect("a list has a folder");
        private_dir(dir.parent().expect("an agreement folder"))?;
        private_dir(dir)?;
        let tmp = dir.join(format!(".{:016x}.part", rand::random::<u64>()));
        let f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        let written = self
            .at_rest
            .writer(std::io::BufWriter::new(f))
            .and_then(|mut w| {
                w.write_all(text.as_bytes())?;
                let (mut inner, _) = w.finish()?;
                inner.flush()
            });
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io_err(&tmp)(e));
        }
        Ok(tmp)
    }

    /// Records committed instances (`entries`, plus those `already_held`) in the study's index
    /// record, queues new ones for the site's PACS when that is the delivery, forgets what was
    /// kept for the study's resumption, and flushes the index.
    fn record_commit(
        &self,
        key: &StudyKey,
        expected: usize,
        mut entries: Vec<(String, [u8; 32])>,
        already_held: Vec<(String, [u8; 32])>,
        (stored, verified): (usize, std::collections::HashSet<[u8; 32]>),
    ) -> Result<Committed, StoreError> {
        let n_held = already_held.len();
        entries.extend(already_held);
        let k = key.index_key();
        let now = Self::now();
        let mut rec = match self.index.get(&k)? {
            Some(v) => serde_json::from_slice::<StudyRecord>(&v)
                .map_err(|e| StoreError::Corrupt(e.to_string()))?,
            None => StudyRecord {
                agreement: key.agreement.clone(),
                flow: key.flow.clone(),
                from_site: key.from_site.clone(),
                study_token: key.study_token.clone(),
                instances: BTreeMap::new(),
                expected,
                first_received: now,
                last_received: now,
                patient: None,
            },
        };
        let to_pacs = self.pacs_delivery.load(std::sync::atomic::Ordering::SeqCst);
        for (uid, sha) in entries {
            let sha = hex::encode(sha);
            let known = rec.instances.insert(uid.clone(), sha.clone());
            if to_pacs && known.as_ref() != Some(&sha) {
                self.delivery.push(key, &uid, &sha)?;
            }
        }
        rec.expected = rec.expected.max(expected);
        rec.last_received = now;
        self.index
            .insert(k, serde_json::to_vec(&rec).expect("record serialises"))?;
        for item in self.partial.scan_prefix(key.partial_prefix()) {
            self.partial.remove(item?.0)?;
        }
        self.db.flush()?;
        Ok(Committed {
            stored,
            already_held: n_held,
            study: rec,
            verified,
        })
    }
}

/// A fresh hidden name for an instance's plaintext in the inbox folder `dir`.
fn part_name(dir: &Path, sop_instance_uid: &str) -> PathBuf {
    dir.join(format!(
        ".{}.{:016x}.part",
        safe_name(sop_instance_uid),
        rand::random::<u64>()
    ))
}

/// Removes the hidden inbox copies a failed commit wrote (`parts` decrypted from `sealed` files;
/// the receiver's own are removed with its staging).
fn remove_parts(parts: &[(StagedInstance, PathBuf)], sealed: &[PathBuf]) {
    for (s, part) in parts {
        if sealed.contains(&s.path) {
            let _ = fs::remove_file(part);
        }
    }
}

impl LocalStore {
    /// Puts each instance of `study` into the inbox (a hard link to its blob, or its decrypted
    /// copy); every blob not in `verified` is re-hashed first. Where the inbox copy is the stored
    /// copy, the commit already named it: an instance with neither an inbox copy nor a blob was
    /// handed on by the site and is not delivered again.
    fn deliver_to_inbox(
        &self,
        study: &StudyRecord,
        verified: &std::collections::HashSet<[u8; 32]>,
    ) -> Result<PathBuf, StoreError> {
        let dir = self.study_inbox(&study.agreement, &study.study_token);
        if self.at_rest.seals() && self.pacs_delivery.load(std::sync::atomic::Ordering::SeqCst) {
            // The site's PACS is the delivery (`[dicom.deliver]`): no plaintext copy is made
            // here; the sealed blob stays for deduplication, resumption and retention.
            return Ok(dir);
        }
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        // Decrypted copies of sealed blobs: written first, flushed together, then named.
        let mut decrypted: Vec<(PathBuf, PathBuf)> = Vec::new();
        let named_by_commit = self.inbox_copies();
        for (uid, sha_hex) in &study.instances {
            let mut sha = [0u8; 32];
            let decoded = hex::decode_to_slice(sha_hex, &mut sha);
            if named_by_commit && decoded.is_ok() && verified.contains(&sha) {
                // Its inbox copy is the stored copy, and the commit just gave it its name.
                continue;
            }
            let target = dir.join(format!("{}.dcm", safe_name(uid)));
            if target.exists() {
                continue;
            }
            decoded.map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let blob = self.blob_path(&sha);
            if self.inbox_copies() && !blob.exists() {
                continue; // handed on by the site
            }
            // Re-hashed before it is delivered: a blob corrupted at rest is quarantined, never
            // delivered, and the study waits for this instance to be received again. (A blob
            // just committed from a verified staging file is what was verified.)
            if sealed::AtRest::key_id_of(&blob)?.is_some() {
                let tmp = dir.join(format!(".{}.part", safe_name(uid)));
                let _ = fs::remove_file(&tmp);
                if let Err(e) = self.copy_out_sealed(study, uid, &sha, &tmp) {
                    for (t, _) in &decrypted {
                        let _ = fs::remove_file(t);
                    }
                    return Err(e);
                }
                decrypted.push((tmp, target));
                continue;
            }
            let check = if verified.contains(&sha) {
                BlobCheck::Intact(self.blob_path(&sha))
            } else {
                self.check_blob(&sha)?
            };
            match check {
                BlobCheck::Intact(blob) => link_or_copy(&blob, &dir, &target, uid)?,
                BlobCheck::Quarantined(_) | BlobCheck::Missing | BlobCheck::HandedOn => {
                    let key = StudyKey::new(
                        &study.agreement,
                        &study.flow,
                        &study.from_site,
                        &study.study_token,
                    );
                    self.forget_instance(&key, uid)?;
                    return Err(StoreError::BlobCorrupted(hex::encode(&sha[..6])));
                }
            }
        }
        if !decrypted.is_empty() {
            name_flushed(decrypted)?;
        }
        sync_dir(&dir)?;
        Ok(dir)
    }
}

impl LocalStore {
    /// Writes a sealed blob's plaintext to `target` (a temporary name in the inbox; decrypted and
    /// hash checked, not yet flushed). A blob that fails is quarantined and forgotten.
    fn copy_out_sealed(
        &self,
        study: &StudyRecord,
        uid: &str,
        sha: &[u8; 32],
        target: &Path,
    ) -> Result<(), StoreError> {
        match self
            .at_rest
            .copy_out_unsynced(&self.blob_path(sha), target, sha)
        {
            Ok(()) => Ok(()),
            Err(sealed::SealError::Damaged { .. } | sealed::SealError::Header { .. }) => {
                self.quarantine(sha)?;
                self.forget_instance(
                    &StudyKey::new(
                        &study.agreement,
                        &study.flow,
                        &study.from_site,
                        &study.study_token,
                    ),
                    uid,
                )?;
                Err(StoreError::BlobCorrupted(hex::encode(&sha[..6])))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Re-seals every instance file of the store under the current data key (`keys rotate`);
    /// returns (files re-sealed, files that could not be: each logged by path).
    pub fn reseal_all(&self) -> (usize, usize) {
        reseal_tree(
            &self.at_rest,
            &[
                self.root.join("blobs"),
                self.root.join("staging").join("resume"),
                self.root.join("sums"),
            ],
        )
    }
}

/// Flushes the written files `(temporary, final)` to disk together (one `fdatasync` each,
/// several at once), then gives each its name: the inbox never shows a partial file.
fn name_flushed(files: Vec<(PathBuf, PathBuf)>) -> Result<(), StoreError> {
    let tmps: Vec<&Path> = files.iter().map(|(t, _)| t.as_path()).collect();
    if let Err((path, e)) = durable::sync_files_together(&tmps) {
        for (tmp, _) in &files {
            let _ = fs::remove_file(tmp);
        }
        return Err(StoreError::Io { path, source: e });
    }
    for (tmp, target) in files {
        fs::rename(&tmp, &target).map_err(io_err(&target))?;
    }
    Ok(())
}

/// Re-seals every file under `dirs` (see [`sealed::AtRest::reseal`]); hidden files (being
/// written) are left alone. Returns (re-sealed, failed).
pub fn reseal_tree(at_rest: &sealed::AtRest, dirs: &[PathBuf]) -> (usize, usize) {
    let (mut done, mut failed) = (0, 0);
    for d in dirs {
        for e in walkdir::WalkDir::new(d).into_iter().flatten() {
            let hidden = e.file_name().to_string_lossy().starts_with('.');
            if !e.file_type().is_file() || hidden {
                continue;
            }
            match at_rest.reseal(e.path()) {
                Ok(true) => done += 1,
                Ok(false) => {}
                Err(sealed::SealError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => {
                    tracing::error!(error = %err, "file not re-sealed");
                    failed += 1;
                }
            }
        }
    }
    (done, failed)
}

/// Puts the stored instance `src` at `target` in the inbox as a hard link, so that a received
/// instance is kept on disk once, not twice. Blobs are never rewritten in place (written once
/// under a temporary name, then renamed), and whatever reads the inbox must not edit its files
/// in place either: they are the store's blobs under a second name. (Deleting a blob leaves the
/// inbox file whole; retention must delete both.) Where a link is impossible (the inbox on
/// another file system, or one without links) the blob is copied instead: under a temporary
/// name, fsynced, renamed, so the inbox never shows a partial file.
fn link_or_copy(src: &Path, dir: &Path, target: &Path, uid: &str) -> Result<(), StoreError> {
    match fs::hard_link(src, target) {
        Ok(()) => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(io_err(src)(e)),
        Err(e) => tracing::debug!(error = %e, "inbox: no hard link possible, copying"),
    }
    copy_into_place(src, dir, target, uid)
}

/// Copies `src` to `target` under a temporary name in `dir`, fsynced, then renamed.
fn copy_into_place(src: &Path, dir: &Path, target: &Path, uid: &str) -> Result<(), StoreError> {
    let tmp = dir.join(format!(".{}.part", safe_name(uid)));
    fs::copy(src, &tmp).map_err(io_err(src))?;
    fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io_err(&tmp))?;
    fs::rename(&tmp, target).map_err(io_err(target))
}

/// A file-name-safe form of a token or UID (they are already [0-9A-Za-z.-], this guards the rest).
pub fn safe_name(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn stage(store: &LocalStore, bytes: &[u8], uid: &str) -> StagedInstance {
        let (mut f, path) = store.stage_file().unwrap();
        f.write_all(bytes).unwrap();
        f.sync_all().unwrap();
        StagedInstance {
            path,
            sha256: Sha256::digest(bytes).into(),
            size: bytes.len() as u64,
            sop_instance_uid: uid.into(),
        }
    }

    #[test]
    fn commit_is_idempotent_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let key = StudyKey::new("a", "f", "x", "2.25.1");
        {
            let s = LocalStore::open(dir.path()).unwrap();
            let st = stage(&s, b"one", "2.25.11");
            let c = s.commit(&key, 2, vec![st], vec![]).unwrap();
            assert_eq!(c.stored, 1);
            assert!(!c.study.is_complete());
            let again = stage(&s, b"one", "2.25.11");
            let st2 = stage(&s, b"two", "2.25.12");
            let c = s.commit(&key, 2, vec![again, st2], vec![]).unwrap();
            assert_eq!(c.stored, 1);
            assert!(c.study.is_complete());
        }
        let s = LocalStore::open(dir.path()).unwrap();
        let rec = s.study(&key).unwrap().unwrap();
        assert_eq!(rec.instances.len(), 2);
        let out = s.deliver(&rec).unwrap();
        assert_eq!(fs::read(out.join("2.25.12.dcm")).unwrap(), b"two");
        let left: Vec<_> = walkdir::WalkDir::new(dir.path().join("staging"))
            .into_iter()
            .flatten()
            .filter(|e| e.file_type().is_file())
            .collect();
        assert!(left.is_empty(), "staging files left: {left:?}");
    }

    #[test]
    fn partials_are_kept_then_committed_or_discarded() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        let key = StudyKey::new("a", "f", "x", "2.25.9");
        s.keep_partial(&key, vec![stage(&s, b"p1", "2.25.91")])
            .unwrap();
        let kept = s.partials(&key).unwrap();
        assert_eq!(kept.len(), 1);
        assert!(
            !s.has_instance(&kept[0].sha256).unwrap(),
            "a partial is not stored"
        );
        // Survives a restart, then a completed transfer commits it.
        drop(s);
        let s = LocalStore::open(dir.path()).unwrap();
        let kept = s.partials(&key).unwrap();
        let mut all = kept.clone();
        all.push(stage(&s, b"p2", "2.25.92"));
        let c = s.commit(&key, 2, all, vec![]).unwrap();
        assert_eq!(c.stored, 2);
        assert!(s.partials(&key).unwrap().is_empty());
        // Discarding removes records and files.
        let other = StudyKey {
            study_token: "2.25.10".into(),
            ..key.clone()
        };
        s.keep_partial(&other, vec![stage(&s, b"p3", "2.25.101")])
            .unwrap();
        s.discard_partials(&other).unwrap();
        assert!(s.partials(&other).unwrap().is_empty());
        assert!(fs::read_dir(dir.path().join("staging/resume"))
            .unwrap()
            .next()
            .is_none());
    }
}

#[cfg(test)]
mod lock_tests {
    use super::*;

    #[test]
    fn a_second_process_on_the_same_data_dir_gets_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let _first = LocalStore::open(dir.path()).unwrap();
        // sled takes an exclusive file lock on its index; a second open (here in the same
        // process, in real life a second `pacs-broker` process) is refused with a clear error.
        match LocalStore::open(dir.path()) {
            Err(StoreError::InUse(p)) => assert_eq!(p, dir.path()),
            Err(other) => panic!("unexpected error: {other}"),
            Ok(_) => panic!("a second store opened the same data directory"),
        }
    }

    #[test]
    fn a_second_open_leaves_the_running_stores_transfers_alone() {
        // `store verify` opens the store beside a running node: it must not delete the files of
        // a transfer under way (a staging file, a hidden inbox copy).
        let dir = tempfile::tempdir().unwrap();
        let at_rest = sealed::AtRest::new(&crate::pseudonym::SiteKeys::generate(), true);
        let running = LocalStore::open_with(dir.path(), at_rest.clone()).unwrap();
        let (_, staged) = running.stage_file().unwrap();
        let key = StudyKey::new("a", "f", "x", "2.25.8");
        let (mut f, part) = running.inbox_part(&key, "2.25.81").unwrap().unwrap();
        f.write_all(b"arriving").unwrap();
        assert!(matches!(
            LocalStore::open_with(dir.path(), at_rest),
            Err(StoreError::InUse(_))
        ));
        assert!(staged.exists() && part.exists());
    }

    #[test]
    fn a_database_held_open_is_seen_in_use() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            !database_in_use(&dir.path().join("index")),
            "no database yet"
        );
        let store = LocalStore::open(dir.path()).unwrap();
        assert!(database_in_use(&dir.path().join("index")));
        drop(store);
        assert!(!database_in_use(&dir.path().join("index")));
    }
}

#[cfg(test)]
pub(crate) mod inbox_tests {
    use super::*;
    use sha2::{Digest, Sha256};

    #[test]
    fn the_inbox_holds_a_link_to_the_blob_not_a_second_copy() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        let key = StudyKey::new("a", "f", "x", "2.25.3");
        let (mut f, path) = s.stage_file().unwrap();
        f.write_all(b"pixels").unwrap();
        let sha: [u8; 32] = Sha256::digest(b"pixels").into();
        let staged = StagedInstance {
            path,
            sha256: sha,
            size: 6,
            sop_instance_uid: "2.25.31".into(),
        };
        let c = s.commit(&key, 1, vec![staged], vec![]).unwrap();
        let out = s.deliver(&c.study).unwrap();
        // Delivering again (a re-sent study) is a no-op, not an error.
        s.deliver(&c.study).unwrap();
        let inbox_file = out.join("2.25.31.dcm");
        assert_eq!(fs::read(&inbox_file).unwrap(), b"pixels");
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            let a = fs::metadata(&inbox_file).unwrap();
            let b = fs::metadata(s.instance_path(&sha)).unwrap();
            assert_eq!(
                (a.dev(), a.ino()),
                (b.dev(), b.ino()),
                "one file, two names"
            );
            assert_eq!(b.nlink(), 2);
        }
        // Where no link is possible (another file system) the copy is whole and leaves no
        // temporary file behind.
        let elsewhere = tempfile::tempdir().unwrap();
        let target = elsewhere.path().join("x.dcm");
        copy_into_place(&s.instance_path(&sha), elsewhere.path(), &target, "x").unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"pixels");
        assert_eq!(fs::read_dir(elsewhere.path()).unwrap().count(), 1);
    }

    fn staged(s: &LocalStore, bytes: &[u8], uid: &str) -> StagedInstance {
        // Written without a flush, as the receiver stages: commit makes them durable.
        let (mut f, path) = s.stage_file().unwrap();
        f.write_all(bytes).unwrap();
        StagedInstance {
            path,
            sha256: Sha256::digest(bytes).into(),
            size: bytes.len() as u64,
            sop_instance_uid: uid.into(),
        }
    }

    #[test]
    fn delivery_after_a_commit_rehashes_only_the_blobs_that_commit_did_not_verify() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).unwrap();
        let key = StudyKey::new("a", "f", "x", "2.25.4");
        // Three instances (more than two: made durable by one file-system flush).
        let first: Vec<_> = (0..3u8)
            .map(|i| staged(&s, &[b'a', i], &format!("2.25.4{i}")))
            .collect();
        let c = s.commit(&key, 5, first, vec![]).unwrap();
        assert_eq!(c.verified.len(), 3);
        // One of them is damaged at rest before the study is complete.
        let damaged: [u8; 32] = Sha256::digest([b'a', 0]).into();
        fs::write(s.instance_path(&damaged), b"rot").unwrap();
        // The next commit verified only its own two: the damaged blob is caught and quarantined,
        // and the study waits for it again.
        let rest = vec![staged(&s, b"b0", "2.25.48"), staged(&s, b"b1", "2.25.49")];
        let c = s.commit(&key, 5, rest, vec![]).unwrap();
        assert_eq!(c.verified.len(), 2);
        assert!(matches!(
            s.deliver_committed(&c),
            Err(StoreError::BlobCorrupted(_))
        ));
        assert!(!s.instance_path(&damaged).exists(), "moved to quarantine");
        // Received again, the study is delivered whole, with the intact bytes.
        let again = s
            .commit(&key, 5, vec![staged(&s, &[b'a', 0], "2.25.40")], vec![])
            .unwrap();
        let out = s.deliver_committed(&again).unwrap();
        assert_eq!(fs::read(out.join("2.25.40.dcm")).unwrap(), [b'a', 0]);
        assert_eq!(fs::read_dir(&out).unwrap().count(), 5);
    }

    /// Sealed at rest with inbox delivery: the receiver wrote each instance's plaintext once, at
    /// `inbox_part`, as it arrived; the commit makes those copies durable and names them, and
    /// they are the stored copies: no blob is written.
    fn sealed_inbox_store(dir: &Path) -> (LocalStore, sealed::AtRest) {
        let at_rest = sealed::AtRest::new(&crate::pseudonym::SiteKeys::generate(), true);
        (
            LocalStore::open_with(dir, at_rest.clone()).unwrap(),
            at_rest,
        )
    }

    /// An instance received into its hidden inbox copy (as the receiver writes it), staged.
    pub(crate) fn received_plain(
        s: &LocalStore,
        key: &StudyKey,
        bytes: &[u8],
        uid: &str,
    ) -> StagedInstance {
        let (mut f, part) = s.inbox_part(key, uid).unwrap().expect("inbox copy");
        assert!(part.file_name().unwrap().to_string_lossy().starts_with('.'));
        f.write_all(bytes).unwrap();
        StagedInstance {
            path: part,
            sha256: Sha256::digest(bytes).into(),
            size: bytes.len() as u64,
            sop_instance_uid: uid.into(),
        }
    }

    #[test]
    fn an_inbox_copy_is_made_in_its_study_folder_even_after_the_site_removed_it() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = sealed_inbox_store(dir.path());
        let key = StudyKey::new("a", "f", "x", "2.25.6");
        let (_, first) = s.inbox_part(&key, "2.25.61").unwrap().expect("inbox copy");
        let folder = first.parent().unwrap().to_owned();
        assert_eq!(folder, s.study_inbox("a", "2.25.6"));
        assert!(first.is_file());
        // The site's script removed the study folder between two instances.
        fs::remove_dir_all(&folder).unwrap();
        let (mut f, second) = s.inbox_part(&key, "2.25.62").unwrap().expect("inbox copy");
        f.write_all(b"arriving").unwrap();
        assert_eq!(second.parent(), Some(folder.as_path()));
        assert_eq!(fs::read(&second).unwrap(), b"arriving");
        // A fresh hidden name every time: an instance sent again never writes into another copy.
        let (_, again) = s.inbox_part(&key, "2.25.62").unwrap().expect("inbox copy");
        assert_ne!(again, second);
        assert!(again
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with('.'));
    }

    #[test]
    fn with_inbox_delivery_sealed_at_rest_the_inbox_copy_is_the_one_stored_copy() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = sealed_inbox_store(dir.path());
        let key = StudyKey::new("a", "f", "x", "2.25.5");
        let staged_all: Vec<_> = (0..3u8)
            .map(|i| received_plain(&s, &key, &[b'p', i, 42], &format!("2.25.5{i}")))
            .collect();
        let (c, delivered) = s.commit_and_deliver(&key, 3, staged_all, vec![]).unwrap();
        assert_eq!(c.stored, 3);
        let out = delivered.expect("complete: delivered");
        let mut names: Vec<String> = fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        names.sort();
        assert_eq!(names, ["2.25.50.dcm", "2.25.51.dcm", "2.25.52.dcm"]);
        let blobs: Vec<_> = walkdir::WalkDir::new(dir.path().join("blobs"))
            .into_iter()
            .flatten()
            .filter(|e| e.file_type().is_file())
            .collect();
        assert!(blobs.is_empty(), "no second copy: {blobs:?}");
        // The checksum list is sealed (outside the delivery folder) and lists every copy.
        let sums = LocalStore::sums_path(dir.path(), "a", "2.25.5");
        let list = fs::read_dir(&sums).unwrap().next().unwrap().unwrap().path();
        assert!(sealed::AtRest::key_id_of(&list).unwrap().is_some());
        assert_eq!(parse_sums(&s.at_rest().read(&list).unwrap()).len(), 3);
        let report = LocalStore::verify_blobs(dir.path(), &s.at_rest()).unwrap();
        assert_eq!((report.checked, report.inbox_checked), (0, 3));
        assert!(report.mismatched.is_empty());
        for i in 0..3u8 {
            let sha: [u8; 32] = Sha256::digest([b'p', i, 42]).into();
            let uid = format!("2.25.5{i}");
            let copy = out.join(format!("{uid}.dcm"));
            assert_eq!(fs::read(&copy).unwrap(), [b'p', i, 42]);
            assert_eq!(
                s.check_held(&key, &uid, &sha).unwrap(),
                BlobCheck::Intact(copy)
            );
        }
        // Damaged at rest: `store verify` names it, and a check quarantines it.
        let damaged = out.join("2.25.50.dcm");
        fs::write(&damaged, b"rot").unwrap();
        let report = LocalStore::verify_blobs(dir.path(), &s.at_rest()).unwrap();
        assert_eq!(report.mismatched, vec![damaged.clone()]);
        let sha0: [u8; 32] = Sha256::digest([b'p', 0, 42]).into();
        assert!(matches!(
            s.check_held(&key, "2.25.50", &sha0).unwrap(),
            BlobCheck::Quarantined(_)
        ));
        assert!(!damaged.exists());
        // Taken out of the inbox by the site: handed on, neither missing nor damaged.
        fs::remove_file(out.join("2.25.51.dcm")).unwrap();
        let sha1: [u8; 32] = Sha256::digest([b'p', 1, 42]).into();
        assert_eq!(
            s.check_held(&key, "2.25.51", &sha1).unwrap(),
            BlobCheck::HandedOn
        );
        let report = LocalStore::verify_blobs(dir.path(), &s.at_rest()).unwrap();
        assert_eq!((report.inbox_checked, report.handed_on), (1, 2));
        assert!(s.missing_blobs().unwrap().is_empty());
        // Delivering again does not bring a handed-on instance back.
        s.deliver(&c.study).unwrap();
        assert!(!out.join("2.25.51.dcm").exists());
        // The damaged one, received again, is stored again and listed once.
        let again = received_plain(&s, &key, &[b'p', 0, 42], "2.25.50");
        let (c, _) = s.commit_and_deliver(&key, 3, vec![again], vec![]).unwrap();
        assert_eq!(c.stored, 1);
        assert_eq!(fs::read(&damaged).unwrap(), [b'p', 0, 42]);
        assert_eq!(
            fs::read_dir(&sums).unwrap().count(),
            2,
            "one list per commit"
        );
        let report = LocalStore::verify_blobs(dir.path(), &s.at_rest()).unwrap();
        assert_eq!((report.inbox_checked, report.handed_on), (2, 1));
        assert!(report.mismatched.is_empty());

        // Without sealing the inbox copy is a hard link: no plaintext copy is prepared.
        let plain_dir = tempfile::tempdir().unwrap();
        let p = LocalStore::open(plain_dir.path()).unwrap();
        assert!(p.inbox_part(&key, "2.25.59").unwrap().is_none());
    }

    #[test]
    fn an_interrupted_inbox_copy_is_kept_sealed_and_resumes_into_the_inbox() {
        let dir = tempfile::tempdir().unwrap();
        let (s, at_rest) = sealed_inbox_store(dir.path());
        let key = StudyKey::new("a", "f", "x", "2.25.6");
        let first = received_plain(&s, &key, b"first-plaintext", "2.25.61");
        let part = first.path.clone();
        s.keep_partial(&key, vec![first]).unwrap();
        assert!(!part.exists(), "the plaintext copy left the inbox");
        let kept = s.partials(&key).unwrap();
        assert_eq!(kept.len(), 1);
        assert!(
            sealed::AtRest::key_id_of(&kept[0].path).unwrap().is_some(),
            "kept sealed"
        );
        // A hidden copy left by a crash mid-transfer is removed at the next start.
        let (mut f, stray) = s.inbox_part(&key, "2.25.63").unwrap().unwrap();
        f.write_all(b"never acknowledged").unwrap();
        drop(f);
        drop(s);
        let s = LocalStore::open_with(dir.path(), at_rest).unwrap();
        assert!(!stray.exists());
        // The resumed transfer completes: the kept instance is decrypted into the inbox.
        let mut all = s.partials(&key).unwrap();
        all.push(received_plain(&s, &key, b"second", "2.25.62"));
        let (c, out) = s.commit_and_deliver(&key, 2, all, vec![]).unwrap();
        assert_eq!(c.stored, 2);
        let out = out.unwrap();
        assert_eq!(
            fs::read(out.join("2.25.61.dcm")).unwrap(),
            b"first-plaintext"
        );
        assert_eq!(fs::read(out.join("2.25.62.dcm")).unwrap(), b"second");
        assert_eq!(fs::read_dir(&out).unwrap().count(), 2);
        let left: Vec<_> = walkdir::WalkDir::new(dir.path().join("staging"))
            .into_iter()
            .chain(walkdir::WalkDir::new(dir.path().join("blobs")))
            .flatten()
            .filter(|e| e.file_type().is_file())
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
