//! At the origin: where a re-identified result goes.
//!
//! Owns [`ResultSink`]: with `[dicom.deliver]` configured, the result becomes a blob of the
//! store and an entry of the existing PACS delivery queue (`store::delivery`), which forwards it
//! by C-STORE with retries and audits the outcome; without one, it is written to the results
//! folder, `<data_dir>/results/<agreement>/<study token>/<SOP Instance UID>.dcm` (written under
//! a temporary name, fsynced, renamed: the folder never shows a partial file). Folder names are
//! tokens and the result's own UID, never an original identifier. A result delivered once is
//! remembered by its SHA-256 (`results/.received/`), so a resend is answered without being
//! delivered twice. The store's copy of a result queued for the PACS holds original identifiers:
//! it is sealed at rest (the store's `AtRest`, named by the SHA-256 of its plaintext) and deleted
//! once the PACS confirmed it ([`sweep_delivered`]).
//!
//! Does not own: re-identification ([`super::restore`]) or the association with the PACS
//! (`dicom_net::deliver`).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::ResultError;
use crate::store::{safe_name, sync_dir, LocalStore, StagedInstance, Store, StudyKey};

/// Where re-identified results go at the origin.
#[derive(Clone)]
pub enum ResultSink {
    /// The site's PACS, through the store's delivery queue.
    Pacs(Arc<LocalStore>),
    /// The results folder under the data directory.
    Folder(PathBuf),
}

/// Where one result went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivered {
    /// Queued for the PACS (the delivery worker forwards it).
    QueuedForPacs,
    /// Written to this file.
    File(PathBuf),
}

impl std::fmt::Display for Delivered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Delivered::QueuedForPacs => f.write_str("queued for the site's PACS"),
            Delivered::File(_) => f.write_str("written to the results folder"),
        }
    }
}

fn storage(e: impl std::fmt::Display) -> ResultError {
    ResultError::Storage(e.to_string())
}

/// The results folder of a data directory.
pub fn results_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("results")
}

fn marker(data_dir: &Path, sha256: &[u8; 32]) -> PathBuf {
    results_dir(data_dir)
        .join(".received")
        .join(hex::encode(sha256))
}

/// Notes of re-identified results queued for the PACS whose blob is still in the store.
fn pacs_pending(data_dir: &Path) -> PathBuf {
    results_dir(data_dir).join(".pacs-pending")
}

/// Deletes the store's copy of every re-identified result the PACS has confirmed (no longer in
/// the delivery queue): it holds original identifiers, and the PACS now has it. A result the
/// PACS refused for good stays (failed, in the queue) for an operator. Returns how many went.
pub fn sweep_delivered(data_dir: &Path, store: &LocalStore) -> Result<usize, ResultError> {
    let dir = pacs_pending(data_dir);
    let Ok(notes) = fs::read_dir(&dir) else {
        return Ok(0);
    };
    let notes: Vec<PathBuf> = notes.flatten().map(|e| e.path()).collect();
    if notes.is_empty() {
        return Ok(0);
    }
    let queued: std::collections::BTreeSet<String> = store
        .delivery_queue()
        .entries()
        .map_err(storage)?
        .into_iter()
        .map(|(_, q)| q.sha256)
        .collect();
    let mut removed = 0;
    for note in notes {
        let name = note
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        let mut sha = [0u8; 32];
        if hex::decode_to_slice(&name, &mut sha).is_err() {
            let _ = fs::remove_file(&note);
            continue;
        }
        if queued.contains(&name) {
            continue;
        }
        match fs::remove_file(store.instance_path(&sha)) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(storage(e)),
        }
        fs::remove_file(&note).map_err(storage)?;
    }
    sync_dir(&dir).map_err(storage)?;
    Ok(removed)
}

/// Whether the result with these bytes was delivered before.
pub fn already_received(data_dir: &Path, sha256: &[u8; 32]) -> bool {
    marker(data_dir, sha256).exists()
}

impl ResultSink {
    /// Delivers the re-identified `obj` (a result received as `key`, i.e. from the partner, on
    /// its study token) and remembers `received_sha256`, the hash of what the partner sent.
    pub fn deliver(
        &self,
        data_dir: &Path,
        obj: &dicom_object::DefaultDicomObject,
        key: &StudyKey,
        sop_instance_uid: &str,
        received_sha256: &[u8; 32],
    ) -> Result<Delivered, ResultError> {
        let mut bytes = Vec::new();
        obj.write_all(&mut bytes)
            .map_err(|e| ResultError::Storage(format!("cannot encode the result: {e}")))?;
        let delivered = match self {
            ResultSink::Pacs(store) => {
                // It holds original identifiers: sealed at rest until the PACS has it.
                let (f, path) = store.stage_file().map_err(storage)?;
                let written =
                    store
                        .at_rest()
                        .writer(std::io::BufWriter::new(f))
                        .and_then(|mut w| {
                            w.write_all(&bytes)?;
                            let (buffered, _) = w.finish()?;
                            let f = buffered.into_inner().map_err(|e| e.into_error())?;
                            f.sync_all()
                        });
                if let Err(e) = written {
                    let _ = fs::remove_file(&path);
                    return Err(storage(e));
                }
                let staged = StagedInstance {
                    path,
                    sha256: Sha256::digest(&bytes).into(),
                    size: bytes.len() as u64,
                    sop_instance_uid: sop_instance_uid.to_string(),
                };
                let blob = staged.sha256;
                // Noted before it is queued: a crash in between leaves a note and no blob, which
                // the sweep drops; never a blob with identifiers that nothing would remove.
                let note = pacs_pending(data_dir).join(hex::encode(blob));
                crate::store::write_atomic(&note, b"").map_err(storage)?;
                store.queue_result(staged, key).map_err(storage)?;
                Delivered::QueuedForPacs
            }
            ResultSink::Folder(root) => {
                let dir = root
                    .join(safe_name(&key.agreement))
                    .join(safe_name(&key.study_token));
                let target = dir.join(format!("{}.dcm", safe_name(sop_instance_uid)));
                crate::store::private_dir(root).map_err(storage)?;
                crate::store::write_atomic(&target, &bytes).map_err(storage)?;
                Delivered::File(target)
            }
        };
        let m = marker(data_dir, received_sha256);
        let dir = m.parent().expect("marker has a folder");
        fs::create_dir_all(dir).map_err(storage)?;
        fs::write(&m, b"").map_err(storage)?;
        sync_dir(dir).map_err(storage)?;
        Ok(delivered)
    }
}
