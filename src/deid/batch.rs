//! The one implementation of "walk inputs, de-identify, write atomically, collect quarantine
//! reasons", shared by the `deid` command and the send path.
//!
//! Each output is written to a temporary file in its final folder; groups of them are flushed to
//! disk together and only then renamed into place, so a crash or a bad file never leaves a
//! half-written output. Pixel data that needs no change is not read into memory: it is copied
//! from the input file into the output file by the kernel (see [`super::guard::PixelSource`]).
//! The send path may instead keep an output in memory ([`encode_in_memory`], handed on as
//! [`Produced::Memory`]) and write it to a file only if it must ([`stage_bytes`]).
//!
//! Every input that produces no output is one JSON line in `<out>/quarantine.jsonl` (path,
//! outcome, reason) and nothing else is written for it. A bad file never stops the batch.

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use dicom_dictionary_std::tags;
use dicom_object::{DefaultDicomObject, InMemDicomObject};

use super::{DeidError, Deidentifier};
use crate::pseudonym::VaultEntry;

/// What happened to one input file.
#[derive(Debug)]
pub enum BatchOutcome {
    Deidentified {
        output: PathBuf,
        patient_token: String,
        study_uid: String,
        series_uid: String,
        sop_instance_uid: String,
        vault_entries: Vec<(String, VaultEntry)>,
    },
    /// Held back on purpose (burned-in text, residual PHI, release check).
    Quarantined { reason: String },
    /// Not a DICOM object, malformed, or could not be written.
    Failed { reason: String },
}

/// One input and its outcome. `relative` is where its output goes under the output folder.
#[derive(Debug)]
pub struct BatchItem {
    pub input: PathBuf,
    pub relative: PathBuf,
    pub outcome: BatchOutcome,
}

/// Counts of a finished batch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchSummary {
    pub deidentified: usize,
    pub quarantined: usize,
    pub failed: usize,
}

/// Errors that stop a batch before it starts (the output folder itself is unusable).
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("output folder {path}: {source}")]
    Output {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The name of the quarantine list inside the output folder.
pub const QUARANTINE_FILE: &str = "quarantine.jsonl";

/// Every file under the inputs (folders recursively, in name order) with its relative output
/// path. Files inside `skip` (the output folder) are left out. Unreadable entries are returned
/// as errors to report, not to stop on.
pub fn collect_inputs(
    inputs: &[PathBuf],
    skip: &Path,
) -> Vec<Result<(PathBuf, PathBuf), (PathBuf, String)>> {
    let skip = fs::canonicalize(skip).unwrap_or_else(|_| skip.to_path_buf());
    let mut out = Vec::new();
    for input in inputs {
        if input.is_dir() {
            for entry in walkdir::WalkDir::new(input).sort_by_file_name() {
                match entry {
                    Ok(e) if e.file_type().is_file() => {
                        let path = e.path().to_path_buf();
                        if fs::canonicalize(&path).is_ok_and(|p| p.starts_with(&skip)) {
                            continue;
                        }
                        let rel = path.strip_prefix(input).unwrap_or(&path).to_path_buf();
                        out.push(Ok((path, rel)));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let path = e
                            .path()
                            .map(Path::to_path_buf)
                            .unwrap_or_else(|| input.clone());
                        out.push(Err((
                            path,
                            format!(
                                "cannot read: {}",
                                e.io_error().map_or("loop".into(), |i| i.kind().to_string())
                            ),
                        )));
                    }
                }
            }
        } else if input.is_file() {
            let rel = input
                .file_name()
                .map(PathBuf::from)
                .unwrap_or_else(|| input.clone());
            out.push(Ok((input.clone(), rel)));
        } else {
            out.push(Err((input.clone(), "no such file or folder".into())));
        }
    }
    out
}

fn short(e: impl std::fmt::Display) -> String {
    let s = e.to_string();
    if s.chars().count() > 200 {
        format!("{}...", s.chars().take(200).collect::<String>())
    } else {
        s
    }
}

/// Reads and de-identifies one file. `admit` sees the original object first and may decline it
/// (its reason is returned as [`NotDeidentified::NotAdmitted`]). A panic inside the DICOM parser
/// on a hostile file is contained and reported as a failure of that file.
pub fn read_and_deidentify(
    deid: &Deidentifier,
    input: &Path,
    admit: impl FnOnce(&InMemDicomObject) -> Result<(), String>,
) -> Result<super::Deidentified, NotDeidentified> {
    deidentify_guarded(deid, || super::guard::read_guarded_split(input), admit)
}

/// [`read_and_deidentify`] of an instance read by `read`: one of the guarded reader's entry
/// points (a file, or a whole Part 10 file held in memory), so that every source takes the same
/// steps after it.
pub fn deidentify_guarded(
    deid: &Deidentifier,
    read: impl FnOnce() -> Result<(DefaultDicomObject, Option<super::guard::PixelSource>), String>,
    admit: impl FnOnce(&InMemDicomObject) -> Result<(), String>,
) -> Result<super::Deidentified, NotDeidentified> {
    let run = std::panic::AssertUnwindSafe(|| {
        let failed = |reason| NotDeidentified::Failed { reason };
        // The pixel data stays in the input (file or memory) and is copied into the output at
        // the end, unless de-identifying needs its values (cleaning burned-in text).
        let (mut obj, mut pixels) = read().map_err(failed)?;
        if let Some(source) = pixels.take_if(|_| deid.needs_pixel_values(&obj)) {
            obj = source.parse_whole().map_err(failed)?;
        }
        admit(&obj).map_err(|reason| NotDeidentified::NotAdmitted { reason })?;
        let mut d = deid.deidentify(obj).map_err(|e| match e {
            DeidError::Quarantined { reason } => NotDeidentified::Quarantined { reason },
            DeidError::Malformed { reason } => NotDeidentified::Failed {
                reason: format!("malformed: {reason}"),
            },
        })?;
        d.pixel_data = pixels;
        Ok(d)
    });
    std::panic::catch_unwind(run).unwrap_or_else(|_| {
        Err(NotDeidentified::Failed {
            reason: "malformed: the DICOM parser gave up on this file (internal error contained)"
                .into(),
        })
    })
}

/// Why [`read_and_deidentify`] produced no output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotDeidentified {
    /// Held back on purpose (burned-in text, residual PHI, release check).
    Quarantined { reason: String },
    /// Not a DICOM object, or malformed.
    Failed { reason: String },
    /// Declined by the caller's `admit` check (e.g. outside a flow's study selector).
    NotAdmitted { reason: String },
}

/// Reads, de-identifies and stages one file (written beside its target, not yet durable nor
/// visible; [`commit_outputs`] finishes it). A bad file is reported as that file's outcome and
/// never stops the batch.
fn process_file(
    deid: &Deidentifier,
    input: &Path,
    target: &Path,
) -> (BatchOutcome, Option<StagedOutput>) {
    let d = match read_and_deidentify(deid, input, |_| Ok(())) {
        Ok(d) => d,
        Err(NotDeidentified::Quarantined { reason }) => {
            return (BatchOutcome::Quarantined { reason }, None)
        }
        Err(NotDeidentified::Failed { reason } | NotDeidentified::NotAdmitted { reason }) => {
            return (BatchOutcome::Failed { reason }, None)
        }
    };
    let staged = match stage_output(d.object, d.pixel_data.as_ref(), target) {
        Ok(s) => s,
        Err(reason) => return (BatchOutcome::Failed { reason }, None),
    };
    let outcome = BatchOutcome::Deidentified {
        output: target.to_path_buf(),
        patient_token: d.patient_token,
        study_uid: d.study_uid,
        series_uid: d.series_uid,
        sop_instance_uid: d.sop_instance_uid,
        vault_entries: d.vault_entries,
    };
    (outcome, Some(staged))
}

/// Encodes a de-identified object as a DICOM Part 10 file into `to`: [`encode_file`], then, when
/// its pixel data was left in the input file, those bytes copied verbatim in place of the
/// placeholder (the transfer syntax is the input's, so they are valid as they are). When `to`
/// is a file, the copy happens inside the kernel.
pub fn encode_output<W: Write>(
    mut obj: DefaultDicomObject,
    pixel_data: Option<&super::guard::PixelSource>,
    to: &mut W,
) -> Result<(), String> {
    let Some(pixels) = pixel_data.filter(|_| super::guard::has_pixel_placeholder(&obj)) else {
        return encode_file(obj, to);
    };
    obj.take(tags::PIXEL_DATA);
    // Pixel Data was the input's last element and de-identification adds nothing after it;
    // if anything did follow, appending the bytes would misplace them, so refuse.
    if obj.tags().any(|t| t > tags::PIXEL_DATA) {
        return Err("cannot place the pixel data: elements follow it".into());
    }
    encode_file(obj, &mut *to)?;
    pixels.copy_to(to)
}

/// Encodes `obj` as a DICOM Part 10 file (preamble, `DICM`, file meta, data set in the meta's
/// transfer syntax) into `to`, consuming it.
///
/// dicom-object's own `write_all` borrows the object and so clones every element on its way to
/// the encoder, pixel data included; taking the object by value hands each value to the encoder
/// as it is, so an image's pixel data goes from its buffer to the file in one write.
pub fn encode_file(obj: DefaultDicomObject, mut to: impl Write) -> Result<(), String> {
    use dicom_encoding::transfer_syntax::Codec;
    use dicom_parser::dataset::write::DataSetWriter;
    use dicom_parser::dataset::IntoTokens;
    use dicom_transfer_syntax_registry::{TransferSyntaxIndex, TransferSyntaxRegistry};

    let uid = obj.meta().transfer_syntax().trim_end_matches(['\0', ' ']);
    let ts = TransferSyntaxRegistry
        .get(uid)
        .ok_or_else(|| format!("unknown transfer syntax {uid}"))?;
    let io = |e: std::io::Error| format!("cannot write output: {}", e.kind());
    to.write_all(&[0; 128]).map_err(io)?;
    to.write_all(b"DICM").map_err(io)?;
    obj.meta()
        .write(&mut to)
        .map_err(|e| format!("cannot encode the file meta group: {}", short(e)))?;
    let tokens = obj.into_inner().into_tokens();
    let encoded = match ts.codec() {
        Codec::Dataset(Some(adapter)) => {
            let mut w =
                DataSetWriter::with_ts(adapter.adapt_writer(Box::new(to)), ts).map_err(short)?;
            w.write_sequence(tokens).and_then(|()| w.flush())
        }
        Codec::Dataset(None) => {
            return Err(format!(
                "cannot write transfer syntax {} ({})",
                ts.uid(),
                ts.name()
            ))
        }
        _ => {
            let mut w = DataSetWriter::with_ts(to, ts).map_err(short)?;
            w.write_sequence(tokens).and_then(|()| w.flush())
        }
    };
    encoded.map_err(|e| format!("cannot encode output: {}", short(e)))
}

/// An output written in its final folder but not yet durable nor visible under its name: until
/// [`commit_outputs`] it is an unnamed file (Linux `O_TMPFILE`: a crash leaves nothing behind),
/// or, where that is not available, a hidden `.deid-*.part` file. Dropped uncommitted, it is
/// gone.
#[derive(Debug)]
pub struct StagedOutput {
    file: Staging,
    target: PathBuf,
    bytes: u64,
    sha256: Option<[u8; 32]>,
}

impl StagedOutput {
    /// Where the output goes once committed.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        self.bytes
    }

    /// SHA-256 of the bytes written, when staged by [`stage_output_hashed`].
    pub fn sha256(&self) -> Option<[u8; 32]> {
        self.sha256
    }

    /// Reads the written bytes back (from the page cache: called before write-back starts).
    fn hash(&self) -> Result<[u8; 32], String> {
        use sha2::{Digest, Sha256};
        use std::os::unix::fs::FileExt;
        let file = self.file.file();
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut at = 0u64;
        while at < self.bytes {
            let n = file
                .read_at(&mut buf, at)
                .map_err(|e| format!("cannot read back the output: {}", e.kind()))?;
            if n == 0 {
                return Err("cannot read back the output: it is shorter than written".into());
            }
            hasher.update(&buf[..n]);
            at += n as u64;
        }
        Ok(hasher.finalize().into())
    }
}

#[derive(Debug)]
enum Staging {
    Unnamed(fs::File),
    Named(tempfile::NamedTempFile),
}

impl Staging {
    fn file(&self) -> &fs::File {
        match self {
            Staging::Unnamed(f) => f,
            Staging::Named(t) => t.as_file(),
        }
    }
}

/// A new file in `dir` for an output: unnamed where the system allows it.
fn new_staging(dir: &Path) -> Result<Staging, String> {
    #[cfg(target_os = "linux")]
    {
        use rustix::fs::{Mode, OFlags};
        // An unnamed file is given its name through /proc/self/fd (see `place`).
        static PROC_FD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        let flags = OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC;
        if *PROC_FD.get_or_init(|| Path::new("/proc/self/fd").is_dir()) {
            if let Ok(fd) = rustix::fs::openat(rustix::fs::CWD, dir, flags, Mode::RUSR | Mode::WUSR)
            {
                return Ok(Staging::Unnamed(fs::File::from(fd)));
            }
        }
    }
    tempfile::Builder::new()
        .prefix(".deid-")
        .suffix(".part")
        .tempfile_in(dir)
        .map(Staging::Named)
        .map_err(|e| format!("cannot create temporary file: {}", e.kind()))
}

/// Encodes `obj` into a new file beside `target`; [`commit_outputs`] makes it durable and puts
/// it in place.
pub fn stage_output(
    obj: DefaultDicomObject,
    pixel_data: Option<&super::guard::PixelSource>,
    target: &Path,
) -> Result<StagedOutput, String> {
    let staged = stage(obj, pixel_data, target, false)?;
    crate::store::durable::start_writeback(staged.file.file());
    Ok(staged)
}

/// [`stage_output`], and the SHA-256 of the output's bytes ([`StagedOutput::sha256`]), for
/// outputs that leave the site with a manifest (the outbox). The file is sealed through
/// `at_rest` when encryption at rest is on; its hash and size are then those of the plaintext,
/// taken as it is written.
pub fn stage_output_hashed(
    obj: DefaultDicomObject,
    pixel_data: Option<&super::guard::PixelSource>,
    target: &Path,
    at_rest: &crate::store::sealed::AtRest,
    keep: Keep,
) -> Result<StagedOutput, String> {
    let staged = if at_rest.seals() {
        stage_sealed(obj, pixel_data, target, at_rest)?
    } else {
        stage(obj, pixel_data, target, true)?
    };
    if keep == Keep::Durable {
        crate::store::durable::start_writeback(staged.file.file());
    }
    Ok(staged)
}

/// What becomes of a staged output at its commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// Made durable, then named ([`commit_outputs`]): write-back starts as soon as it is staged,
    /// so that the commit's flush finds little left to do.
    Durable,
    /// Named without a flush ([`name_outputs_unflushed`]): a working copy that is normally
    /// deleted before its pages ever need to reach the disk (`send`'s outbox copies).
    WorkingCopy,
}

/// Stages an output sealed at rest: encoder -> buffer -> SHA-256 of the plaintext -> sealing
/// writer -> file.
fn stage_sealed(
    obj: DefaultDicomObject,
    pixel_data: Option<&super::guard::PixelSource>,
    target: &Path,
    at_rest: &crate::store::sealed::AtRest,
) -> Result<StagedOutput, String> {
    let write_err = |e: std::io::Error| format!("cannot write output: {}", e.kind());
    let dir = target.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| format!("cannot create output folder: {}", e.kind()))?;
    let staging = new_staging(dir)?;
    let (hash, bytes) = {
        let sealing = at_rest
            .writer(std::io::BufWriter::with_capacity(
                crate::store::sealed::SEGMENT + 64,
                staging.file(),
            ))
            .map_err(write_err)?;
        let mut hashing = crate::store::sealed::Hashing::new(sealing);
        let mut w = std::io::BufWriter::with_capacity(64 * 1024, &mut hashing);
        encode_output(obj, pixel_data, &mut w)?;
        w.flush().map_err(write_err)?;
        drop(w);
        let (inner, hash, bytes) = hashing.finish();
        let (mut buffered, _) = inner.finish().map_err(write_err)?;
        buffered.flush().map_err(write_err)?;
        (hash, bytes)
    };
    Ok(StagedOutput {
        bytes,
        file: staging,
        target: target.to_path_buf(),
        sha256: Some(hash),
    })
}

fn stage(
    obj: DefaultDicomObject,
    pixel_data: Option<&super::guard::PixelSource>,
    target: &Path,
    hashed: bool,
) -> Result<StagedOutput, String> {
    let dir = target.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| format!("cannot create output folder: {}", e.kind()))?;
    let staging = new_staging(dir)?;
    let file = staging.file();
    {
        // Small on purpose: headers are gathered, and a value larger than the buffer (pixel
        // data) goes to the file straight from its own memory, without another copy.
        let mut w = std::io::BufWriter::with_capacity(64 * 1024, file);
        encode_output(obj, pixel_data, &mut w)?;
        w.flush()
            .map_err(|e| format!("cannot write output: {}", e.kind()))?;
    }
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot write output: {}", e.kind()))?;
    let mut staged = StagedOutput {
        bytes: meta.len(),
        file: staging,
        target: target.to_path_buf(),
        sha256: None,
    };
    if hashed {
        staged.sha256 = Some(staged.hash()?);
    }
    // Outputs to be made durable start writing to disk now, in the background (the callers:
    // `stage_output`, `stage_output_hashed`), so that the commit's flush finds little left to
    // do and the disk works while the cores de-identify the next files.
    Ok(staged)
}

/// The buffer [`encode_in_memory`] wants for an object whose pixel data is left in the input
/// file (`pixel_data`): the header of a de-identified object is a few KiB, the pixel data is
/// known exactly.
pub fn in_memory_capacity(pixel_data: Option<&super::guard::PixelSource>) -> usize {
    pixel_data.map_or(0, |p| p.len() as usize) + 16 * 1024
}

/// Encodes a de-identified object as a DICOM Part 10 file into memory, into `bytes` (emptied
/// first; see [`in_memory_capacity`]), with [`encode_output`] (the pixel data left in the
/// input file is read straight into the buffer) and returns the bytes with their SHA-256:
/// `send`'s outputs, offered from memory.
pub fn encode_in_memory(
    obj: DefaultDicomObject,
    pixel_data: Option<&super::guard::PixelSource>,
    mut bytes: Vec<u8>,
) -> Result<(Vec<u8>, [u8; 32]), String> {
    use sha2::{Digest, Sha256};
    bytes.clear();
    bytes.reserve(in_memory_capacity(pixel_data));
    encode_output(obj, pixel_data, &mut bytes)?;
    // Growth past the estimate (a large header, in-memory pixel data) may have left up to
    // twice the length reserved: give the excess back, it is counted against a budget.
    if bytes.capacity() - bytes.len() > bytes.len() / 16 + 16 * 1024 {
        bytes.shrink_to_fit();
    }
    let sha256 = Sha256::digest(&bytes).into();
    Ok((bytes, sha256))
}

/// Writes an output already encoded in memory (its plaintext `bytes`) into a new file beside
/// `target`, sealed through `at_rest` when encryption at rest is on, for
/// [`name_outputs_unflushed`] or [`commit_outputs`] to name. The folder must exist.
pub fn stage_bytes(
    bytes: &[u8],
    target: &Path,
    at_rest: &crate::store::sealed::AtRest,
) -> Result<StagedOutput, String> {
    let write_err = |e: std::io::Error| format!("cannot write output: {}", e.kind());
    let staging = new_staging(target.parent().unwrap_or(Path::new(".")))?;
    let mut w = at_rest
        .writer(std::io::BufWriter::with_capacity(
            crate::store::sealed::SEGMENT + 64,
            staging.file(),
        ))
        .map_err(write_err)?;
    w.write_all(bytes).map_err(write_err)?;
    let (mut buffered, _) = w.finish().map_err(write_err)?;
    buffered.flush().map_err(write_err)?;
    drop(buffered);
    Ok(StagedOutput {
        bytes: bytes.len() as u64,
        file: staging,
        target: target.to_path_buf(),
        sha256: None,
    })
}

/// Makes every staged output durable, then puts each in place: one `fdatasync` per output,
/// several at once (`store::durable`), so that their journal commits are shared. An output gets its name
/// only once its bytes are on disk, so a crash at any point leaves either the whole output or
/// none. The names themselves become durable when the folders are fsynced ([`run_batch`] does
/// that once per folder at its end).
pub fn commit_outputs(staged: Vec<StagedOutput>) -> Vec<(PathBuf, Result<(), String>)> {
    let flushed = flush_to_disk(&staged);
    // Now on disk, the outputs' pages are clean: let them go, as `dd oflag=nocache` does. A
    // batch's outputs are read by whatever takes them next, not by this process, and the
    // memory returns at once to the files still being written instead of filling the cache.
    #[cfg(target_os = "linux")]
    if flushed.is_ok() {
        for s in &staged {
            let _ = rustix::fs::fadvise(s.file.file(), 0, None, rustix::fs::Advice::DontNeed);
        }
    }
    staged
        .into_iter()
        .map(|s| {
            let result = match &flushed {
                Err(reason) => Err(reason.clone()),
                Ok(()) => place(s.file, &s.target),
            };
            (s.target, result)
        })
        .collect()
}

/// Gives a flushed output its name, replacing whatever file had it.
fn place(staging: Staging, target: &Path) -> Result<(), String> {
    let fail = |e: std::io::Error| format!("cannot rename output into place: {}", e.kind());
    match staging {
        Staging::Named(t) => t.persist(target).map(|_| ()).map_err(|e| fail(e.error)),
        Staging::Unnamed(file) => {
            #[cfg(target_os = "linux")]
            {
                use std::os::fd::AsRawFd;
                let link = |to: &Path| {
                    rustix::fs::linkat(
                        rustix::fs::CWD,
                        format!("/proc/self/fd/{}", file.as_raw_fd()),
                        rustix::fs::CWD,
                        to,
                        rustix::fs::AtFlags::SYMLINK_FOLLOW,
                    )
                };
                match link(target) {
                    Ok(()) => Ok(()),
                    // Something has the name (a re-run into the same folder): link under a
                    // hidden name, then rename over it, which replaces it in one step.
                    Err(rustix::io::Errno::EXIST) => {
                        let hidden = target
                            .with_file_name(format!(".deid-{:016x}.part", rand::random::<u64>()));
                        link(&hidden).map_err(|e| fail(e.into()))?;
                        fs::rename(&hidden, target).map_err(|e| {
                            let _ = fs::remove_file(&hidden);
                            fail(e)
                        })
                    }
                    // Linking refused (a sandbox, say): copy it into a named file instead.
                    Err(e) => copy_into_place(&file, target).map_err(|_| fail(e.into())),
                }
            }
            #[cfg(not(target_os = "linux"))]
            {
                let _ = file;
                Err(fail(std::io::ErrorKind::Unsupported.into()))
            }
        }
    }
}

/// The slow way to name a flushed unnamed file: copy it into a hidden named file beside the
/// target, flush that, and rename it into place.
#[cfg(target_os = "linux")]
fn copy_into_place(mut file: &fs::File, target: &Path) -> std::io::Result<()> {
    use std::io::Seek;
    let dir = target.parent().unwrap_or(Path::new("."));
    let mut named = tempfile::Builder::new()
        .prefix(".deid-")
        .suffix(".part")
        .tempfile_in(dir)?;
    file.seek(std::io::SeekFrom::Start(0))?;
    std::io::copy(&mut file, named.as_file_mut())?;
    named.as_file().sync_all()?;
    named.persist(target).map(|_| ()).map_err(|e| e.error)
}

fn flush_to_disk(staged: &[StagedOutput]) -> Result<(), String> {
    let files: Vec<&fs::File> = staged.iter().map(|s| s.file.file()).collect();
    crate::store::durable::sync_open_files(&files)
        .map_err(|e| format!("cannot sync output: {}", e.kind()))
}

/// Puts every staged output in place WITHOUT making it durable: for outputs that are a working
/// copy only (`send`'s outbox copies, deleted once the partner's receipt arrives, and flushed by
/// [`crate::store::outbox::Outbox::make_durable`] only if the send fails). A crash may leave such
/// a file torn; whoever keeps it must be able to tell (the outbox entry says it was not made
/// durable, and sealing and the SHA-256 in the manifest detect a torn file).
pub fn name_outputs_unflushed(staged: Vec<StagedOutput>) -> Vec<(PathBuf, Result<(), String>)> {
    staged
        .into_iter()
        .map(|s| {
            let result = place(s.file, &s.target);
            (s.target, result)
        })
        .collect()
}

/// Stages, flushes and renames one output ([`stage_output`] then [`commit_outputs`]).
pub fn write_output(
    obj: DefaultDicomObject,
    pixel_data: Option<&super::guard::PixelSource>,
    target: &Path,
) -> Result<(), String> {
    let staged = stage_output(obj, pixel_data, target)?;
    commit_outputs(vec![staged])
        .pop()
        .map_or(Ok(()), |(_, result)| result)
}

/// Outputs staged before a commit: enough that the flush is shared widely, few enough that
/// progress and the callers' per-item work keep moving.
pub const COMMIT_FILES: usize = 64;
const COMMIT_BYTES: u64 = 128 << 20;
/// [`COMMIT_BYTES`] of working copies ([`Keep::WorkingCopy`]: `send`, which offers each group
/// while the next ones are de-identified): de-identification runs only so far ahead of the
/// partner's receipts (`crate::send::AHEAD`), and a group must be complete before it is
/// offered. The first groups are smaller (from [`FIRST_WORKING_GROUP_BYTES`], doubling), so
/// that the first offer leaves early: the partner starts working while the rest is
/// de-identified.
pub const WORKING_GROUP_BYTES: u64 = 32 << 20;
/// The first group of working copies ends past this size; see [`WORKING_GROUP_BYTES`].
pub const FIRST_WORKING_GROUP_BYTES: u64 = 4 << 20;

/// Why [`run_parallel`] stopped early.
#[derive(Debug)]
pub enum ParallelError<E> {
    /// A worker thread could not be started.
    Spawn(std::io::Error),
    /// The caller's `finish` step failed.
    Finish(E),
}

/// How many workers read, de-identify and write at once: flushing to disk is left to the
/// grouped commits, so a worker rarely waits and one per core keeps the cores busy; twice that
/// covers inputs that must come from disk rather than the page cache. Each worker holds one
/// instance in memory. PACS_BROKER_DEID_WORKERS overrides it (1-64).
pub fn worker_count() -> usize {
    std::env::var("PACS_BROKER_DEID_WORKERS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|n| (1..=64).contains(n))
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(4, |n| n.get() * 2)
                .clamp(2, 16)
        })
}

/// The fast path shared by every file batch (the `deid` command, `send`): a few workers run
/// `process` on the jobs in parallel (read, de-identify, stage an output); staged outputs are
/// committed in groups of up to [`COMMIT_FILES`] (`keep`: made durable together by
/// [`commit_outputs`], or named unflushed as working copies by [`name_outputs_unflushed`]) and
/// only then handed to `finish` with the commit's result. Items
/// without an output go to `finish` at once with `None`. `finish` runs on the calling thread,
/// one item at a time.
pub fn run_parallel<J, I, E>(
    jobs: &[J],
    keep: Keep,
    process: impl Fn(&J) -> (I, Option<StagedOutput>) + Sync,
    finish: &mut dyn FnMut(I, Option<Result<(), String>>) -> Result<(), E>,
) -> Result<(), ParallelError<E>>
where
    J: Sync,
    I: Send,
{
    let process = |job: &J| {
        let (item, staged) = process(job);
        (item, staged.map(Produced::File))
    };
    run_parallel_grouped(jobs, keep, process, finish, &mut || Ok(()))
}

/// An output of a worker of [`run_parallel_grouped`].
#[derive(Debug)]
pub enum Produced {
    /// Staged in a file, committed with its group.
    File(StagedOutput),
    /// Held in memory by the item itself (`send`): goes with its group like a file, and its
    /// commit always succeeds (nothing to write).
    Memory { bytes: u64 },
}

/// [`run_parallel`], calling `after_group` on the calling thread after each commit, once
/// `finish` has seen every item of that group: `send` hands each committed group on to the
/// partner while the next ones are de-identified. An error from it stops the batch. Outputs
/// held in memory ([`Produced::Memory`]) are grouped with the files; groups of working copies
/// end at [`WORKING_GROUP_BYTES`] rather than [`COMMIT_BYTES`] (the first ones sooner).
pub fn run_parallel_grouped<J, I, E>(
    jobs: &[J],
    keep: Keep,
    process: impl Fn(&J) -> (I, Option<Produced>) + Sync,
    finish: &mut dyn FnMut(I, Option<Result<(), String>>) -> Result<(), E>,
    after_group: &mut dyn FnMut() -> Result<(), E>,
) -> Result<(), ParallelError<E>>
where
    J: Sync,
    I: Send,
{
    let workers = worker_count().min(jobs.len().max(1));
    let mut group_bytes = match keep {
        Keep::Durable => COMMIT_BYTES,
        Keep::WorkingCopy => FIRST_WORKING_GROUP_BYTES,
    };
    let next = std::sync::atomic::AtomicUsize::new(0);
    let (tx, rx) = std::sync::mpsc::channel::<(I, Option<Produced>)>();
    std::thread::scope(|scope| {
        for _ in 0..workers {
            let (tx, next, process) = (tx.clone(), &next, &process);
            let worker = move || loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(job) = jobs.get(i) else {
                    break;
                };
                if tx.send(process(job)).is_err() {
                    break;
                }
            };
            std::thread::Builder::new()
                .name("deid-worker".into())
                .spawn_scoped(scope, worker)
                .map_err(ParallelError::Spawn)?;
        }
        drop(tx);
        // Written outputs wait here until a commit has made them durable and put them in place
        // (those held in memory wait with them, so that groups keep their order).
        let mut pending: Vec<(I, Option<StagedOutput>)> = Vec::new();
        let mut pending_bytes = 0;
        let mut commit =
            |pending: &mut Vec<(I, Option<StagedOutput>)>,
             finish: &mut dyn FnMut(I, Option<Result<(), String>>) -> Result<(), E>|
             -> Result<(), ParallelError<E>> {
                let (items, staged): (Vec<_>, Vec<_>) = std::mem::take(pending).into_iter().unzip();
                let in_file: Vec<bool> = staged.iter().map(Option::is_some).collect();
                let staged: Vec<StagedOutput> = staged.into_iter().flatten().collect();
                let mut committed = match keep {
                    Keep::Durable => commit_outputs(staged),
                    Keep::WorkingCopy => name_outputs_unflushed(staged),
                }
                .into_iter();
                let named = !items.is_empty();
                for (item, in_file) in items.into_iter().zip(in_file) {
                    let result = match in_file {
                        true => committed
                            .next()
                            .map_or_else(|| Err("output lost".to_string()), |(_, r)| r),
                        false => Ok(()),
                    };
                    finish(item, Some(result)).map_err(ParallelError::Finish)?;
                }
                if named {
                    after_group().map_err(ParallelError::Finish)?;
                }
                Ok(())
            };
        for (item, produced) in rx {
            match produced {
                None => finish(item, None).map_err(ParallelError::Finish)?,
                Some(produced) => {
                    let (bytes, staged) = match produced {
                        Produced::File(s) => (s.bytes, Some(s)),
                        Produced::Memory { bytes } => (bytes, None),
                    };
                    pending_bytes += bytes;
                    pending.push((item, staged));
                    if pending.len() >= COMMIT_FILES || pending_bytes >= group_bytes {
                        commit(&mut pending, &mut *finish)?;
                        pending_bytes = 0;
                        if keep == Keep::WorkingCopy {
                            group_bytes = (group_bytes * 2).min(WORKING_GROUP_BYTES);
                        }
                    }
                }
            }
        }
        commit(&mut pending, finish)
    })
}

/// De-identifies every file under `inputs` into `out`, keeping relative paths, and writes
/// `<out>/quarantine.jsonl`. `on_item` sees every item as it finishes (progress, vault, send).
pub fn run_batch(
    deid: &Deidentifier,
    inputs: &[PathBuf],
    out: &Path,
    mut on_item: impl FnMut(&BatchItem),
) -> Result<BatchSummary, BatchError> {
    let io = |source| BatchError::Output {
        path: out.to_path_buf(),
        source,
    };
    fs::create_dir_all(out).map_err(io)?;
    let qpath = out.join(QUARANTINE_FILE);
    let mut qfile = fs::File::create(&qpath).map_err(io)?;
    let mut summary = BatchSummary::default();
    let mut taken: HashSet<PathBuf> = HashSet::new();
    // Decide every item's target first (collisions, the quarantine list's own name), then let a
    // few workers read, de-identify and write in parallel.
    let mut jobs: Vec<(PathBuf, PathBuf, Option<BatchOutcome>)> = Vec::new();
    for entry in collect_inputs(inputs, out) {
        match entry {
            Err((input, reason)) => {
                jobs.push((input, PathBuf::new(), Some(BatchOutcome::Failed { reason })))
            }
            Ok((input, relative)) => {
                let early = if relative.as_os_str() == QUARANTINE_FILE {
                    Some(BatchOutcome::Failed {
                        reason: "input named like the quarantine list".into(),
                    })
                } else if !taken.insert(relative.clone()) {
                    Some(BatchOutcome::Failed {
                        reason: "another input maps to the same output path".into(),
                    })
                } else {
                    None
                };
                jobs.push((input, relative, early));
            }
        }
    }
    let mut finish = |item: BatchItem, committed: Option<Result<(), String>>| {
        let mut item = item;
        if let Some(Err(reason)) = committed {
            item.outcome = BatchOutcome::Failed { reason };
        }
        let line = match &item.outcome {
            BatchOutcome::Deidentified { .. } => {
                summary.deidentified += 1;
                None
            }
            BatchOutcome::Quarantined { reason } => {
                summary.quarantined += 1;
                Some(("quarantined", reason))
            }
            BatchOutcome::Failed { reason } => {
                summary.failed += 1;
                Some(("failed", reason))
            }
        };
        if let Some((outcome, reason)) = line {
            let json = serde_json::json!({
                "path": item.input.display().to_string(),
                "outcome": outcome,
                "reason": reason,
            });
            writeln!(qfile, "{json}").map_err(io)?;
        }
        on_item(&item);
        Ok(())
    };
    let process = |(input, relative, early): &(PathBuf, PathBuf, Option<BatchOutcome>)| {
        let (outcome, staged) = match early {
            Some(BatchOutcome::Failed { reason }) => (
                BatchOutcome::Failed {
                    reason: reason.clone(),
                },
                None,
            ),
            _ => process_file(deid, input, &out.join(relative)),
        };
        let item = BatchItem {
            input: input.clone(),
            relative: relative.clone(),
            outcome,
        };
        (item, staged)
    };
    run_parallel(&jobs, Keep::Durable, process, &mut finish).map_err(|e| match e {
        ParallelError::Spawn(e) => io(e),
        ParallelError::Finish(e) => e,
    })?;
    qfile.sync_all().map_err(io)?;
    // The renames are durable once their folders are: one fsync per output folder.
    let mut folders: HashSet<PathBuf> = jobs
        .iter()
        .filter(|(_, rel, early)| early.is_none() && !rel.as_os_str().is_empty())
        .filter_map(|(_, rel, _)| out.join(rel).parent().map(Path::to_path_buf))
        .collect();
    folders.insert(out.to_path_buf());
    for f in folders {
        if let Ok(d) = fs::File::open(&f) {
            d.sync_all().map_err(|source| BatchError::Output {
                path: f.clone(),
                source,
            })?;
        }
    }
    Ok(summary)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn groups_of_working_copies_start_small_and_grow_to_their_size() {
        let groups = |keep| {
            let jobs: Vec<u64> = (0..100).collect();
            let sizes = std::cell::RefCell::new(vec![0usize]);
            run_parallel_grouped(
                &jobs,
                keep,
                |_| ((), Some(Produced::Memory { bytes: 1 << 20 })),
                &mut |_, committed| {
                    assert_eq!(committed, Some(Ok(())));
                    *sizes.borrow_mut().last_mut().unwrap() += 1;
                    Ok::<_, ()>(())
                },
                &mut || {
                    sizes.borrow_mut().push(0);
                    Ok(())
                },
            )
            .unwrap();
            let mut sizes = sizes.into_inner();
            sizes.pop();
            sizes
        };
        assert_eq!(groups(Keep::WorkingCopy), vec![4, 8, 16, 32, 32, 8]);
        assert_eq!(groups(Keep::Durable), vec![64, 36]);
    }

    #[test]
    fn an_unnamed_output_is_named_by_link_or_else_by_copy() {
        let dir = tempfile::tempdir().unwrap();
        let stage = |bytes: &[u8]| match new_staging(dir.path()).unwrap() {
            Staging::Unnamed(mut f) => {
                f.write_all(bytes).unwrap();
                f.sync_all().unwrap();
                f
            }
            Staging::Named(_) => panic!("O_TMPFILE is available on this file system"),
        };
        let linked = dir.path().join("linked.dcm");
        place(Staging::Unnamed(stage(b"first")), &linked).unwrap();
        assert_eq!(fs::read(&linked).unwrap(), b"first");
        // A second output for the same name replaces the first.
        place(Staging::Unnamed(stage(b"second")), &linked).unwrap();
        assert_eq!(fs::read(&linked).unwrap(), b"second");
        // The fallback used when linking is refused.
        let copied = dir.path().join("copied.dcm");
        copy_into_place(&stage(b"third"), &copied).unwrap();
        assert_eq!(fs::read(&copied).unwrap(), b"third");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }
}
