//! The file source: DICOM files and folders given to `send`.
//!
//! Every file goes through the guarded reader, the flow's admission and de-identification on a
//! few worker threads; each output is encoded into memory (its pixel data read straight from
//! the input file into the buffer, its SHA-256 taken there) and held under the `send`'s
//! [`MemoryBudget`]; one that does not fit, or is larger than [`crate::send::MEMORY_INSTANCE_MAX`],
//! is written into its outbox study folder instead (spilled: sealed at rest, a working copy).
//! They are handed on in groups (`deid::batch::run_parallel_grouped`), each at once (its vault
//! records flushed first), so that `send` offers it to the partner while the next groups are
//! de-identified (see [`crate::send`], which also writes the files of instances still held in
//! memory when a study must be queued or completed). Spilled files are working copies, NOT
//! flushed: `send` sends them at once and deletes them when the partner's receipt arrives, so
//! on the happy path their bytes never have to reach the disk. The outbox entry says so
//! (`flushed = false`) until a failed attempt makes them durable
//! ([`crate::store::outbox::Outbox::make_durable`]); an entry left so by a crash is re-verified
//! before it is sent ([`crate::store::outbox::Outbox::settle`]). The vault records, by contrast,
//! are durable before a group is handed on: no token leaves the site before its vault record is
//! on disk. Files have no source AE (see [`super::admit`]).
//!
//! Does not own: sending (the [`crate::send`] pipeline), the outbox entry (`transfer.json`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{admit_and_deidentify, HeldBack, HeldBackKind, IngestError, IngestFlow};
use crate::deid::batch::{self, Produced};
use crate::pseudonym::Vault;
use crate::send::{Body, MemoryBudget};
use crate::store::outbox::{Outbox, OutboxInstance};
use crate::store::safe_name;

/// The instances of one study de-identified by a file batch.
#[derive(Debug, Default, Clone)]
pub struct StagedStudy {
    /// (input file, the instance as the outbox lists it, its bytes when held in memory (None:
    /// spilled to its file in the outbox)), in input order.
    pub instances: Vec<(PathBuf, OutboxInstance, Body)>,
    pub modalities: BTreeSet<String>,
    pub patient_tokens: BTreeSet<String>,
    /// (de-identified SOP Instance UID, what OCR found and blacked out), for the audit.
    pub cleaned: Vec<(String, crate::deid::OcrEvidence)>,
}

/// One group of de-identified instances, by study token: each held in memory or its outbox file
/// in place (a working copy), and the vault records of their tokens durable.
pub type StagedGroup = BTreeMap<String, StagedStudy>;

impl StagedStudy {
    /// Adds the instances (and what the audit needs of them) of a later group of this study.
    pub fn extend(&mut self, more: StagedStudy) {
        self.instances.extend(more.instances);
        self.modalities.extend(more.modalities);
        self.patient_tokens.extend(more.patient_tokens);
        self.cleaned.extend(more.cleaned);
    }
}

struct Item {
    input: PathBuf,
    result: Result<Ready, HeldBack>,
}

struct Ready {
    study_token: String,
    patient_token: String,
    modality: Option<String>,
    instance: OutboxInstance,
    body: Body,
    ocr: Option<crate::deid::OcrEvidence>,
}

/// Every file under `inputs` (folders recursively, in name order). A path that does not exist
/// is an error; an unreadable folder entry is held back as failed.
fn collect(inputs: &[PathBuf], skip: &Path) -> Result<Vec<Result<PathBuf, HeldBack>>, IngestError> {
    if let Some(missing) = inputs.iter().find(|i| !i.exists()) {
        return Err(IngestError::Input {
            path: missing.clone(),
            reason: "no such file or folder".into(),
        });
    }
    Ok(batch::collect_inputs(inputs, skip)
        .into_iter()
        .map(|r| {
            r.map(|(path, _)| path).map_err(|(path, reason)| HeldBack {
                input: path.display().to_string(),
                path: Some(path),
                kind: HeldBackKind::Failed,
                reason,
            })
        })
        .collect())
}

/// Guards, admits, de-identifies and holds every file under `inputs` in memory under `memory`,
/// or stages it into the outbox study folders of `flow` as a working copy (named, not flushed:
/// see the module header), recording the tokens in the vault. Each group goes to `on_group`
/// once the vault is flushed (so no token leaves the site before its vault record is durable);
/// an error from `on_group` stops the batch. Returns the inputs held back, each with why.
pub fn ingest_files(
    flow: &IngestFlow,
    inputs: &[PathBuf],
    outbox: &Outbox,
    vault: &Vault,
    memory: &Arc<MemoryBudget>,
    on_group: &mut dyn FnMut(StagedGroup) -> Result<(), IngestError>,
) -> Result<Vec<HeldBack>, IngestError> {
    let root = outbox.study_dir(&flow.agreement, "x");
    let root = root.parent().unwrap_or(Path::new(".")).to_path_buf();
    let jobs = collect(inputs, &root)?;
    let started = std::time::Instant::now();
    let mut held_back = Vec::new();
    // Filled by `finish` with each named instance, emptied by `hand_on` after each group.
    let group = std::cell::RefCell::new(StagedGroup::new());
    let vault_error: std::sync::Mutex<Option<sled::Error>> = Default::default();
    let process = |job: &Result<PathBuf, HeldBack>| -> (Item, Option<Produced>) {
        let input = match job {
            Ok(p) => p.clone(),
            Err(held) => {
                let input = held.path.clone().unwrap_or_default();
                return (
                    Item {
                        input,
                        result: Err(held.clone()),
                    },
                    None,
                );
            }
        };
        let (result, staged) = match stage_one(flow, &input, outbox, vault, memory) {
            Ok((ready, staged)) => (Ok(ready), Some(staged)),
            Err(Failure::Held(h)) => (Err(*h), None),
            Err(Failure::Vault(e)) => {
                *vault_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                let held = HeldBack {
                    input: input.display().to_string(),
                    path: Some(input.clone()),
                    kind: HeldBackKind::Failed,
                    reason: "the vault could not record its tokens".into(),
                };
                (Err(held), None)
            }
        };
        (Item { input, result }, staged)
    };
    let mut finish =
        |item: Item, committed: Option<Result<(), String>>| -> Result<(), IngestError> {
            let ready = match (item.result, committed) {
                (Err(held), _) => {
                    held_back.push(held);
                    return Ok(());
                }
                (Ok(_), Some(Err(reason))) => {
                    held_back.push(HeldBack {
                        input: item.input.display().to_string(),
                        path: Some(item.input),
                        kind: HeldBackKind::Failed,
                        reason,
                    });
                    return Ok(());
                }
                (Ok(ready), _) => ready,
            };
            let mut group = group.borrow_mut();
            let study = group.entry(ready.study_token).or_default();
            study.modalities.extend(ready.modality);
            study.patient_tokens.insert(ready.patient_token);
            if let Some(evidence) = ready.ocr {
                study
                    .cleaned
                    .push((ready.instance.sop_instance_uid.clone(), evidence));
            }
            study
                .instances
                .push((item.input, ready.instance, ready.body));
            Ok(())
        };
    // A named group leaves only with its tokens' vault records on disk, and none leaves after
    // the vault failed to record a token.
    let mut hand_on = || -> Result<(), IngestError> {
        if let Some(e) = vault_error.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(IngestError::Vault(e));
        }
        vault.flush()?;
        let named = std::mem::take(&mut *group.borrow_mut());
        if named.is_empty() {
            return Ok(());
        }
        on_group(named)
    };
    batch::run_parallel_grouped(
        &jobs,
        batch::Keep::WorkingCopy,
        process,
        &mut finish,
        &mut hand_on,
    )
    .map_err(|e| match e {
        batch::ParallelError::Spawn(e) => IngestError::Input {
            path: PathBuf::from("."),
            reason: format!("cannot start de-identification workers: {e}"),
        },
        batch::ParallelError::Finish(e) => e,
    })?;
    // Inputs held back after the last group (a vault error there included) are settled here.
    hand_on()?;
    tracing::debug!(
        files = jobs.len(),
        deidentify_ms = started.elapsed().as_millis() as u64,
        "inputs de-identified into the outbox"
    );
    Ok(held_back)
}

enum Failure {
    Held(Box<HeldBack>),
    Vault(sled::Error),
}

/// One file: guard, admit, de-identify, record its tokens, hold its output in memory or stage
/// it as a file (not yet durable).
fn stage_one(
    flow: &IngestFlow,
    input: &Path,
    outbox: &Outbox,
    vault: &Vault,
    memory: &Arc<MemoryBudget>,
) -> Result<(Ready, Produced), Failure> {
    let held = |kind, reason: String| {
        Failure::Held(Box::new(HeldBack {
            input: input.display().to_string(),
            path: Some(input.to_path_buf()),
            kind,
            reason,
        }))
    };
    let admitted = admit_and_deidentify(flow, input, None).map_err(|why| {
        Failure::Held(Box::new(HeldBack::new(
            input.display().to_string(),
            Some(input.to_path_buf()),
            why,
        )))
    })?;
    let d = admitted.deidentified;
    for (token, entry) in &d.vault_entries {
        vault
            .record(&flow.agreement, token, entry)
            .map_err(Failure::Vault)?;
    }
    let ocr = d.ocr_evidence.clone();
    let file = format!("{}.dcm", safe_name(&d.sop_instance_uid));
    let target = outbox.study_dir(&flow.agreement, &d.study_uid).join(&file);
    let failed = |reason| held(HeldBackKind::Failed, reason);
    let max = crate::send::MEMORY_INSTANCE_MAX;
    let (produced, body, sha256, size) = if d.pixel_data.as_ref().is_some_and(|p| p.len() > max) {
        // Too large to hold: staged as a file as it is encoded, pixel data copied by the kernel.
        let staged = batch::stage_output_hashed(
            d.object,
            d.pixel_data.as_ref(),
            &target,
            outbox.at_rest(),
            batch::Keep::WorkingCopy,
        )
        .map_err(failed)?;
        let (sha256, size) = (staged.sha256().unwrap_or_default(), staged.size());
        (Produced::File(staged), None, sha256, size)
    } else {
        let buffer = memory.buffer(batch::in_memory_capacity(d.pixel_data.as_ref()));
        let (bytes, sha256) =
            batch::encode_in_memory(d.object, d.pixel_data.as_ref(), buffer).map_err(failed)?;
        let size = bytes.len() as u64;
        let kept = if size <= max {
            memory.hold(bytes)
        } else {
            Err(bytes)
        };
        match kept {
            Ok(body) => (Produced::Memory { bytes: size }, Some(body), sha256, size),
            // Over the budget (or too large after all): spilled to its file.
            Err(bytes) => {
                let dir = target.parent().unwrap_or(Path::new("."));
                std::fs::create_dir_all(dir)
                    .map_err(|e| failed(format!("cannot create output folder: {}", e.kind())))?;
                let staged =
                    batch::stage_bytes(&bytes, &target, outbox.at_rest()).map_err(failed)?;
                (Produced::File(staged), None, sha256, size)
            }
        }
    };
    Ok((
        Ready {
            study_token: d.study_uid,
            patient_token: d.patient_token,
            modality: admitted.modality,
            instance: OutboxInstance {
                file,
                sha256: hex::encode(sha256),
                size,
                sop_instance_uid: d.sop_instance_uid,
            },
            body,
            ocr,
        },
        produced,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pseudonym::SiteKeys;
    use crate::store::sealed::{AtRest, MAGIC};

    fn flow(keys: &SiteKeys) -> IngestFlow {
        crate::ingest::test_flow(keys)
    }

    /// Instances are held in memory while the budget lasts; the rest are spilled, sealed, to
    /// their outbox files; dropping the held ones gives the budget back.
    #[test]
    fn instances_beyond_the_memory_budget_are_spilled_sealed_to_the_outbox() {
        let tmp = tempfile::tempdir().unwrap();
        let keys = SiteKeys::from_bytes([7; 32], [9; 32]);
        let inputs = tmp.path().join("in");
        crate::demo::write_synthetic_ct(&inputs, &Default::default(), 6, 64).unwrap();
        let at_rest = AtRest::new(&keys, true);
        let outbox = Outbox::new(tmp.path().join("outbox")).with_at_rest(at_rest.clone());
        let db = sled::open(tmp.path().join("db")).unwrap();
        let vault = Vault::new(&keys, db.open_tree("vault").unwrap());
        // Room for two of these instances (64x64, 16-bit: 8 KiB of pixels, a buffer of about
        // 26 KiB each), not three.
        let memory = MemoryBudget::new(60_000);
        let mut groups = Vec::new();
        let held_back = ingest_files(
            &flow(&keys),
            &[inputs],
            &outbox,
            &vault,
            &memory,
            &mut |g| {
                groups.push(g);
                Ok(())
            },
        )
        .unwrap();
        assert!(held_back.is_empty(), "{held_back:?}");
        let mut study = StagedStudy::default();
        let mut token = String::new();
        for g in groups {
            for (t, s) in g {
                token = t;
                study.extend(s);
            }
        }
        assert_eq!(study.instances.len(), 6);
        let held = study.instances.iter().filter(|i| i.2.is_some()).count();
        assert_eq!(held, 2, "two fit in the budget");
        assert!(memory.used() > 0 && memory.used() <= 60_000);
        let dir = outbox.study_dir("a", &token);
        for (_, instance, body) in &study.instances {
            let file = dir.join(&instance.file);
            match body {
                Some(body) => {
                    assert!(!file.exists(), "held in memory: no file");
                    assert_eq!(body.bytes().len() as u64, instance.size);
                    use sha2::Digest;
                    let sha = sha2::Sha256::digest(body.bytes());
                    assert_eq!(hex::encode(sha), instance.sha256);
                    assert_eq!(&body.bytes()[128..132], b"DICM");
                }
                None => {
                    let raw = std::fs::read(&file).unwrap();
                    assert_eq!(&raw[..MAGIC.len()], MAGIC, "spilled sealed");
                    let (sha, size) = at_rest.hash(&file).unwrap();
                    assert_eq!(
                        (hex::encode(sha), size),
                        (instance.sha256.clone(), instance.size)
                    );
                }
            }
        }
        drop(study);
        assert_eq!(memory.used(), 0, "dropped instances give their memory back");
    }
}
