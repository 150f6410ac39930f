//! At the origin: where a re-identified result goes.
//!
//! Owns [`ResultSink`]: with `[dicom.deliver]` configured, the result becomes a blob of the
//! store and an entry of the existing PACS delivery queue (`store::delivery`), which forwards it
//! by C-STORE with retries and audits the outcome; without one, it is written to the results
//! folder, `<data_dir>/results/<agreement>/<study token>/<SOP Instance UID>.dcm` (written under
//! a temporary name, fsynced, renamed: the folder never shows a partial file). Folder names are
//! tokens and the result's own UID, never an original identifier. A result delivered once is
//! remembered by its SHA-256 (`results/.received/`), so a resend is answered without being
//! delivered twice.
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
                let (mut f, path) = store.stage_file().map_err(storage)?;
                let written = f.write_all(&bytes).and_then(|()| f.sync_all());
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
