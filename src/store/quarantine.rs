//! The node's quarantine: instances held back from a flow (burned-in text, a face, residual PHI,
//! a failed release check), kept for a privacy officer's review.
//!
//! Owns: where held items live (`<data_dir>/quarantine/<id>/`, folders 0700, files 0600: the
//! original input `input.dcm`, which is PHI, and `item.json`, which is not), holding an item
//! ([`Quarantine::hold`]), listing and reading items, removing one (after release or discard)
//! and the retention sweep ([`Quarantine::sweep`]: an item expires with its flow's retention).
//!
//! Does not own: the decision to hold (that is `deid`), releasing (re-running de-identification
//! and staging the output is the node's, see `Node::release_quarantined`), nor the audit entries
//! (the caller writes them). `item.json` names no patient: the reason and findings come from the
//! verifier, which never puts values in them; the original file name, which may name a patient,
//! is kept apart in `source.json` and shown only on request.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::sealed::{AtRest, PlainView};
use super::{io_err, sync_dir, StoreError};

const ITEM_FILE: &str = "item.json";
const SOURCE_FILE: &str = "source.json";
const INPUT_FILE: &str = "input.dcm";

/// One held instance, as `list` and `show` present it. Holds no PHI.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldItem {
    pub id: String,
    /// Unix seconds when it was held.
    pub held_at: u64,
    pub agreement: String,
    pub flow: String,
    /// What brought it in: `send`, `dicom:<calling AE title>` (the DICOM listener), `partner`, ...
    pub source: String,
    /// Why it was held (no PHI).
    pub reason: String,
    /// The verifier's findings, one per line (attribute and kind, never the value).
    pub findings: Vec<String>,
    pub input_sha256: String,
    pub input_size: u64,
    /// Unix seconds after which the sweep deletes it (`None`: the flow sets no retention).
    pub expires_at: Option<u64>,
}

/// What the caller knows when holding an instance.
#[derive(Debug, Clone)]
pub struct HoldRequest<'a> {
    pub agreement: &'a str,
    pub flow: &'a str,
    pub source: &'a str,
    pub reason: &'a str,
    pub findings: Vec<String>,
    /// The flow's retention in days; the item expires that long after it was held.
    pub retention_days: Option<u32>,
    /// The original file name or calling AE, shown only with `--reveal` (may be PHI).
    pub origin: Option<String>,
}

/// The quarantine folder of a node.
#[derive(Debug, Clone)]
pub struct Quarantine {
    root: PathBuf,
    /// `input.dcm` and `source.json` (PHI) are sealed through this; `item.json` (no PHI) is not.
    at_rest: AtRest,
}

fn now() -> u64 {
    super::outbox::now()
}

#[cfg(unix)]
fn private_dir(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(io_err(path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(io_err(path))
}

#[cfg(not(unix))]
fn private_dir(path: &Path) -> Result<(), StoreError> {
    fs::create_dir_all(path).map_err(io_err(path))
}

/// Writes a 0600 file sealed through `at_rest` (plain when encryption at rest is off), flushed.
fn private_sealed(path: &Path, bytes: &[u8], at_rest: &AtRest) -> Result<(), StoreError> {
    let mut o = fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    let f = o.open(path).map_err(io_err(path))?;
    let mut w = at_rest
        .writer(std::io::BufWriter::new(f))
        .map_err(io_err(path))?;
    w.write_all(bytes).map_err(io_err(path))?;
    let (buffered, _) = w.finish().map_err(io_err(path))?;
    let f = buffered
        .into_inner()
        .map_err(|e| io_err(path)(e.into_error()))?;
    f.sync_all().map_err(io_err(path))
}

/// Writes a 0600 file, flushed to disk.
fn private_file(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut o = fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    let mut f = o.open(path).map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// An item id: the time it was held and 64 random bits, e.g. `q20260601-120000-3f2a9c...`.
fn new_id() -> String {
    let t = time::OffsetDateTime::now_utc();
    let f = time::macros::format_description!("[year][month][day]-[hour][minute][second]");
    format!(
        "q{}-{:016x}",
        t.format(&f).unwrap_or_default(),
        rand::random::<u64>()
    )
}

/// True for a string that can be an item id (so a user's argument never walks out of the folder).
fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id.starts_with('q')
        && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

impl Quarantine {
    /// The quarantine under `data_dir` (created 0700 if missing).
    pub fn open(data_dir: &Path) -> Result<Quarantine, StoreError> {
        let root = data_dir.join("quarantine");
        private_dir(&root)?;
        Ok(Quarantine {
            root,
            at_rest: AtRest::plain(),
        })
    }

    /// Seals held inputs through `at_rest` (the node's encryption at rest).
    pub fn with_at_rest(mut self, at_rest: AtRest) -> Quarantine {
        self.at_rest = at_rest;
        self
    }

    fn dir(&self, id: &str) -> Result<PathBuf, StoreError> {
        if !valid_id(id) {
            return Err(StoreError::Corrupt(format!(
                "`{}` is not a quarantine item id (see `quarantine list`)",
                id.chars().take(64).collect::<String>()
            )));
        }
        Ok(self.root.join(id))
    }

    /// Holds `input` (the original instance's bytes) back for review; returns the item id.
    /// The item appears whole or not at all: it is written under a hidden name, flushed, and
    /// renamed into place.
    pub fn hold(&self, req: &HoldRequest<'_>, input: &[u8]) -> Result<String, StoreError> {
        use sha2::Digest;
        let id = new_id();
        let tmp = self.root.join(format!(".{id}.part"));
        private_dir(&tmp)?;
        let held_at = now();
        let item = HeldItem {
            id: id.clone(),
            held_at,
            agreement: req.agreement.to_string(),
            flow: req.flow.to_string(),
            source: req.source.to_string(),
            reason: req.reason.to_string(),
            findings: req.findings.clone(),
            input_sha256: hex::encode(sha2::Sha256::digest(input)),
            input_size: input.len() as u64,
            expires_at: req
                .retention_days
                .map(|d| held_at.saturating_add(u64::from(d) * 86_400)),
        };
        let written = (|| {
            private_sealed(&tmp.join(INPUT_FILE), input, &self.at_rest)?;
            let json = serde_json::to_vec_pretty(&item).expect("item serialises");
            private_file(&tmp.join(ITEM_FILE), &json)?;
            let origin = serde_json::json!({ "origin": req.origin });
            private_sealed(
                &tmp.join(SOURCE_FILE),
                origin.to_string().as_bytes(),
                &self.at_rest,
            )?;
            sync_dir(&tmp)?;
            let dir = self.root.join(&id);
            fs::rename(&tmp, &dir).map_err(io_err(&dir))?;
            sync_dir(&self.root)
        })();
        if written.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        written.map(|()| id)
    }

    /// Holds the file at `path` (read whole; a held instance is one object).
    pub fn hold_file(&self, req: &HoldRequest<'_>, path: &Path) -> Result<String, StoreError> {
        let bytes = self.at_rest.read(path)?;
        self.hold(req, &bytes)
    }

    /// Every held item, oldest first. Unreadable records are skipped with a warning.
    pub fn list(&self) -> Vec<HeldItem> {
        let mut items: Vec<HeldItem> = fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| valid_id(&e.file_name().to_string_lossy()))
            .filter_map(|e| match self.get(&e.file_name().to_string_lossy()) {
                Ok(i) => Some(i),
                Err(err) => {
                    tracing::warn!(error = %err, "unreadable quarantine record skipped");
                    None
                }
            })
            .collect();
        items.sort_by(|a, b| (a.held_at, &a.id).cmp(&(b.held_at, &b.id)));
        items
    }

    /// One held item.
    pub fn get(&self, id: &str) -> Result<HeldItem, StoreError> {
        let p = self.dir(id)?.join(ITEM_FILE);
        let bytes = fs::read(&p).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                StoreError::Corrupt(format!("no quarantine item `{id}` (see `quarantine list`)"))
            }
            _ => StoreError::Io {
                path: p.clone(),
                source: e,
            },
        })?;
        serde_json::from_slice(&bytes)
            .map_err(|e| StoreError::Corrupt(format!("{}: {e}", p.display())))
    }

    /// The original file name or calling AE of an item (may be PHI: show only on request).
    pub fn origin(&self, id: &str) -> Result<Option<String>, StoreError> {
        let p = self.dir(id)?.join(SOURCE_FILE);
        let bytes = self.at_rest.read(&p)?;
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| StoreError::Corrupt(format!("{}: {e}", p.display())))?;
        Ok(v["origin"].as_str().map(str::to_string))
    }

    /// The held original instance (PHI), readable by path for as long as the view lives (its
    /// plaintext stays in memory when it is sealed; see [`PlainView`]).
    pub fn input_view(&self, id: &str) -> Result<PlainView, StoreError> {
        Ok(self.at_rest.plain_view(&self.dir(id)?.join(INPUT_FILE))?)
    }

    /// Deletes an item (after release or discard). The bytes are gone once this returns.
    pub fn remove(&self, id: &str) -> Result<(), StoreError> {
        let dir = self.dir(id)?;
        self.get(id)?;
        fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
        sync_dir(&self.root)
    }

    /// Deletes every item whose retention ended by `now` (Unix seconds), and any half-written
    /// item left by a crash; returns the expired items (for the audit log).
    pub fn sweep(&self, now: u64) -> Vec<HeldItem> {
        for e in fs::read_dir(&self.root).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with('.') && name.ends_with(".part") {
                let _ = fs::remove_dir_all(e.path());
            }
        }
        let expired: Vec<HeldItem> = self
            .list()
            .into_iter()
            .filter(|i| i.expires_at.is_some_and(|t| t <= now))
            .collect();
        expired
            .into_iter()
            .filter(|i| match self.remove(&i.id) {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!(item = %i.id, error = %e, "expired quarantine item could not be deleted");
                    false
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(days: Option<u32>) -> HoldRequest<'static> {
        HoldRequest {
            agreement: "a1",
            flow: "us",
            source: "send",
            reason: "US image without BurnedInAnnotation NO",
            findings: vec!["patient name in ImageComments".into()],
            retention_days: days,
            origin: Some("DOE_JOHN/IM0001".into()),
        }
    }

    #[test]
    fn hold_list_get_remove_with_private_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let q = Quarantine::open(dir.path()).unwrap();
        let id = q.hold(&req(Some(30)), b"DICM bytes").unwrap();
        let items = q.list();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].id, id);
        assert_eq!(items[0].input_size, 10);
        assert!(items[0].expires_at.unwrap() > items[0].held_at);
        assert_eq!(q.origin(&id).unwrap().as_deref(), Some("DOE_JOHN/IM0001"));
        let item_json = fs::read_to_string(q.dir(&id).unwrap().join(ITEM_FILE)).unwrap();
        assert!(!item_json.contains("DOE"), "the record names no patient");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&q.root), 0o700);
            assert_eq!(mode(&q.dir(&id).unwrap()), 0o700);
            assert_eq!(mode(&q.dir(&id).unwrap().join(INPUT_FILE)), 0o600);
        }
        q.remove(&id).unwrap();
        assert!(q.list().is_empty());
        assert!(q.get(&id).is_err());
    }

    #[test]
    fn ids_cannot_walk_out_of_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        let q = Quarantine::open(dir.path()).unwrap();
        for bad in ["../x", "q/../../etc", "", "x1"] {
            assert!(q.get(bad).is_err(), "{bad}");
            assert!(q.remove(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sweep_deletes_only_expired_items_and_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let q = Quarantine::open(dir.path()).unwrap();
        let short = q.hold(&req(Some(1)), b"a").unwrap();
        let forever = q.hold(&req(None), b"b").unwrap();
        fs::create_dir(q.root.join(".qleft.part")).unwrap();
        assert!(q.sweep(now()).is_empty());
        let gone = q.sweep(now() + 2 * 86_400);
        assert_eq!(gone.len(), 1);
        assert_eq!(gone[0].id, short);
        assert_eq!(q.list().len(), 1);
        assert_eq!(q.list()[0].id, forever);
        assert!(!q.root.join(".qleft.part").exists());
    }
}
