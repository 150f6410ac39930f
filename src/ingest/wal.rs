//! The ingest write-ahead log: how the DICOM listener makes an instance durable with one
//! `fdatasync` before it answers C-STORE success.
//!
//! Owns: the log's files and format, appending a record durably ([`Wal::append`]), reading a
//! record back ([`Wal::read`]), the checkpoint of what has been moved out of the log
//! ([`Wal::consumed`]), and, at start, finding the records a stopped (or killed) node had
//! acknowledged but not yet moved ([`Wal::open`]), dropping a torn last record.
//!
//! Does not own: what a record means. `ingest::dimse` builds the records (one per acknowledged
//! instance: its de-identified bytes, where they go in the outbox, its vault entries), moves them
//! into the outbox in the background and replays the unconsumed ones at start.
//!
//! Why: a new file + `fsync` + rename + folder `fsync` per instance costs a journal commit each
//! (about 1.4 ms for a 526 KB CT slice on the reference machine), and the modality waits for it
//! on every instance. Overwriting an already allocated, already zeroed region of a file and
//! `fdatasync`ing it changes no file-system metadata (about 0.4 ms).
//!
//! Layout (in `<data_dir>/ingest/wal/`):
//!
//! ```text
//! slot-<n>.wal   SLOT_BYTES, written with zeros and fsynced once when created, then reused:
//!                header (4 KiB): "PBWALSEG" | generation u64 LE | check u64 LE
//!                records, each starting on a 4 KiB boundary:
//!                  "PBWALREC" | generation u64 LE | meta length u32 LE | data length u32 LE
//!                  | check u64 LE | data (sealed instance bytes) | meta (sealed JSON)
//! checkpoint     two copies of "PBWALCKP" | sequence u64 | generation u64 | offset u64 | check,
//!                at offsets 0 and 512, written alternately; the valid one with the higher
//!                sequence counts: every record before (generation, offset) has been moved
//! ```
//!
//! `check` is the first 8 bytes of the SHA-256 of the bytes before it. Meta and data are sealed
//! with the node's data key (`store::sealed`, when encryption at rest is on), so the log holds
//! no plaintext: the meta carries the instance's vault entries (original identifiers). What
//! ties a record's data to its meta: in a sealed log the sealed data's last tag (`data_tag`, the
//! data being authenticated by its sealing; the instance's SHA-256 is computed beside the
//! `fdatasync` and may be absent), in a plain log the SHA-256 of the data.
//!
//! A slot holds one generation at a time; generations only grow, so a slot's records are read in
//! the order of their generations and a record of another generation than its slot's header (a
//! stale record of a recycled slot) ends that slot. Records start on a page boundary, so writing
//! one never rewrites a page of an acknowledged one. A crash while a record is being appended
//! leaves a record whose header, meta or data does not verify: it was never acknowledged (the
//! answer follows the `fdatasync`) and is dropped at start. A slot is reused once the
//! checkpoint is past all its records. Two slots are prepared (their zeros written) in the
//! background when the log opens; another is created in the background, up to [`MAX_SLOTS`],
//! when a roll takes the last free one (or finds none free: the caller then makes the instance
//! durable the slower way). Dropping the log waits for the slots still being created.

use std::fs;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use crate::pseudonym::VaultEntry;
use crate::store::sealed::{AtRest, MAGIC as SEALED_MAGIC};

/// Bytes of one slot file.
pub const SLOT_BYTES: u64 = 32 << 20;
/// Slot files at most (the log never takes more than `MAX_SLOTS * SLOT_BYTES` of disk: 512 MiB).
/// Enough for a whole large study (a 500-slice CT is about 263 MB) to be acknowledged through
/// the log while the mover, which runs at a lower priority than the listener, is behind.
pub const MAX_SLOTS: usize = 16;
/// Slot files prepared when the log opens.
pub const READY_SLOTS: usize = 2;
const PAGE: u64 = 4096;
const HEADER: usize = 32;
const SEG_MAGIC: &[u8; 8] = b"PBWALSEG";
const REC_MAGIC: &[u8; 8] = b"PBWALREC";
const CKP_MAGIC: &[u8; 8] = b"PBWALCKP";
/// The AES-GCM tag that ends sealed data.
const SEAL_TAG: usize = 16;

/// What went wrong with the log. Messages name files, never content.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("ingest log {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("ingest log {path}: a record at offset {offset} does not verify ({reason})")]
    Damaged {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> WalError + '_ {
    move |source| WalError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What one record says about its instance (sealed in the log: the vault entries hold the
/// original identifiers).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InstanceRecord {
    pub agreement: String,
    pub flow: String,
    pub purpose: String,
    /// The receiving site.
    pub to: String,
    /// The study token (the outbox study folder).
    pub study: String,
    /// The file name in the outbox study folder.
    pub file: String,
    /// SHA-256 (hex) of the de-identified instance's plaintext. A plain log always has it (it
    /// is the record's integrity check). A sealed log may leave it out: its data is
    /// authenticated by the sealing and bound to this meta by `data_tag`, and the hash is
    /// computed beside the log's `fdatasync` (or from the data, when the record is recovered),
    /// so that the modality does not wait for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Length of the de-identified instance's plaintext.
    pub size: u64,
    /// The last authentication tag of the sealed data (hex), binding this meta to its data
    /// (set by [`Wal::seal`] when the log seals).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_tag: Option<String>,
    pub sop_instance_uid: String,
    pub modality: Option<String>,
    pub patient_token: String,
    pub vault_entries: Vec<(String, VaultEntry)>,
}

/// A point in the log: generation and byte offset in its slot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub generation: u64,
    pub offset: u64,
}

/// Where one appended record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub slot: usize,
    pub start: Position,
    /// Just after it (what [`Wal::consumed`] takes once it has been moved).
    pub end: Position,
}

/// One record read back: its meta and its data (sealed instance bytes, as the outbox keeps them).
#[derive(Debug)]
pub struct Record {
    pub location: Location,
    pub meta: InstanceRecord,
    pub data: Vec<u8>,
}

/// A record read by [`Wal::read_in_log`]: its meta (`record.data` is empty) and where its data
/// is in its slot file.
#[derive(Debug)]
pub struct InLog {
    pub record: Record,
    file: fs::File,
    data: std::ops::Range<u64>,
}

impl InLog {
    /// Copies the record's data (sealed instance bytes) to the end of `to`; fails if the slot
    /// no longer holds them all.
    pub fn copy_to(&self, mut to: &fs::File) -> std::io::Result<()> {
        use std::io::Seek;
        let len = self.data.end - self.data.start;
        let mut from = &self.file;
        from.seek(std::io::SeekFrom::Start(self.data.start))?;
        let copied = std::io::copy(&mut from.take(len), &mut to)?;
        if copied != len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the log slot ends inside the record",
            ));
        }
        Ok(())
    }
}

struct Slot {
    index: usize,
    file: fs::File,
    generation: u64,
    /// Where its last record ends (retired slots), to know when all of it has been moved.
    end: u64,
}

struct Writer {
    active: Option<(Slot, u64)>,
    idle: Vec<Slot>,
    next_generation: u64,
    /// Which slot files exist or are being created.
    taken: [bool; MAX_SLOTS],
}

/// The log of one node's listener.
pub struct Wal {
    dir: PathBuf,
    at_rest: AtRest,
    writer: Mutex<Writer>,
    consumed: Mutex<(Position, u64)>,
    /// Slots created in the background land here.
    created: Arc<Mutex<Vec<Slot>>>,
    /// The threads creating them, joined when the log is dropped.
    creating: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Drop for Wal {
    /// Waits for the slots being created (a few tens of milliseconds each), so that no thread
    /// writes into the log's folder once the log is gone (a slot file cut short when the
    /// process ends is removed at the next open anyway).
    fn drop(&mut self) {
        let threads = self.creating.get_mut().unwrap_or_else(|p| p.into_inner());
        for t in threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn check(bytes: &[u8]) -> [u8; 8] {
    let h = Sha256::digest(bytes);
    h[..8].try_into().expect("8 bytes")
}

fn align(n: u64) -> u64 {
    n.div_ceil(PAGE) * PAGE
}

fn slot_path(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("slot-{index}.wal"))
}

fn slot_header(generation: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(24);
    h.extend_from_slice(SEG_MAGIC);
    h.extend_from_slice(&generation.to_le_bytes());
    let c = check(&h);
    h.extend_from_slice(&c);
    h
}

/// The generation in a slot header (0: never used, or not a valid header).
fn read_slot_generation(file: &fs::File) -> u64 {
    let mut h = [0u8; 24];
    if file.read_exact_at(&mut h, 0).is_err() || &h[..8] != SEG_MAGIC || h[16..] != check(&h[..16])
    {
        return 0;
    }
    u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"))
}

/// Creates a slot file: zeros written and flushed, so that later writes change no metadata.
fn create_slot(dir: &Path, index: usize) -> Result<Slot, WalError> {
    let path = slot_path(dir, index);
    let tmp = dir.join(format!(".slot-{index}.part"));
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io_at(&tmp))?;
    let zeros = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < SLOT_BYTES {
        file.write_all_at(&zeros, at).map_err(io_at(&tmp))?;
        at += zeros.len() as u64;
    }
    file.sync_all().map_err(io_at(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_at(&path))?;
    crate::store::sync_dir(dir).map_err(|e| WalError::Io {
        path: dir.to_owned(),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(Slot {
        index,
        file,
        generation: 0,
        end: 0,
    })
}

fn checkpoint_copy(seq: u64, p: Position) -> Vec<u8> {
    let mut c = Vec::with_capacity(40);
    c.extend_from_slice(CKP_MAGIC);
    c.extend_from_slice(&seq.to_le_bytes());
    c.extend_from_slice(&p.generation.to_le_bytes());
    c.extend_from_slice(&p.offset.to_le_bytes());
    let k = check(&c);
    c.extend_from_slice(&k);
    c
}

/// The checkpoint's valid copy with the higher sequence: (sequence, position).
fn read_checkpoint(path: &Path) -> (u64, Position) {
    let Ok(file) = fs::File::open(path) else {
        return (0, Position::default());
    };
    let mut best = (0, Position::default());
    for at in [0u64, 512] {
        let mut c = [0u8; 40];
        if file.read_exact_at(&mut c, at).is_err()
            || &c[..8] != CKP_MAGIC
            || c[32..] != check(&c[..32])
        {
            continue;
        }
        let n = |r: std::ops::Range<usize>| u64::from_le_bytes(c[r].try_into().expect("8 bytes"));
        let seq = n(8..16);
        if seq >= best.0 {
            best = (
                seq,
                Position {
                    generation: n(16..24),
                    offset: n(24..32),
                },
            );
        }
    }
    best
}

impl Wal {
    /// Opens (or creates) the log in `dir` and returns it with the records that were appended
    /// (acknowledged) but not yet moved, in order. The caller moves them, then calls
    /// [`Wal::consumed`] with the last one's end (or [`Wal::replayed`]) before appending.
    /// A torn last record is dropped with a warning; damage before the end is an error.
    pub fn open(dir: &Path, at_rest: AtRest) -> Result<(Wal, Vec<Record>), WalError> {
        fs::create_dir_all(dir).map_err(io_at(dir))?;
        for e in fs::read_dir(dir).map_err(io_at(dir))?.flatten() {
            if e.file_name().to_string_lossy().ends_with(".part") {
                let _ = fs::remove_file(e.path());
            }
        }
        let ckp_path = dir.join("checkpoint");
        if !ckp_path.exists() {
            let tmp = dir.join(".checkpoint.part");
            let f = fs::File::create(&tmp).map_err(io_at(&tmp))?;
            f.write_all_at(&[0u8; PAGE as usize], 0)
                .and_then(|()| f.sync_all())
                .map_err(io_at(&tmp))?;
            fs::rename(&tmp, &ckp_path).map_err(io_at(&ckp_path))?;
            crate::store::sync_dir(dir).map_err(|e| WalError::Io {
                path: dir.to_owned(),
                source: std::io::Error::other(e.to_string()),
            })?;
        }
        let (seq, ckp) = read_checkpoint(&ckp_path);
        let mut slots = Vec::new();
        for index in 0..MAX_SLOTS {
            let path = slot_path(dir, index);
            let Ok(file) = fs::OpenOptions::new().read(true).write(true).open(&path) else {
                continue;
            };
            if file.metadata().map(|m| m.len()).unwrap_or(0) != SLOT_BYTES {
                drop(file);
                let _ = fs::remove_file(&path);
                continue;
            }
            let generation = read_slot_generation(&file);
            slots.push(Slot {
                index,
                file,
                generation,
                end: 0,
            });
        }
        slots.sort_by_key(|s| s.generation);
        let wal = Wal {
            dir: dir.to_owned(),
            at_rest,
            writer: Mutex::new(Writer {
                active: None,
                idle: Vec::new(),
                next_generation: 0,
                taken: std::array::from_fn(|i| slots.iter().any(|s| s.index == i)),
            }),
            consumed: Mutex::new((ckp, seq)),
            created: Arc::new(Mutex::new(Vec::new())),
            creating: Mutex::new(Vec::new()),
        };
        let mut records = Vec::new();
        for slot in &mut slots {
            if slot.generation == 0 || slot.generation < ckp.generation {
                continue;
            }
            let from = if slot.generation == ckp.generation {
                ckp.offset.max(PAGE)
            } else {
                PAGE
            };
            slot.end = wal.scan(slot, from, &mut records)?;
        }
        let last = slots.iter().map(|s| s.generation).max().unwrap_or(0);
        {
            let mut w = wal.lock_writer();
            w.next_generation = last.max(ckp.generation) + 1;
            w.idle = slots;
        }
        Ok((wal, records))
    }

    fn lock_writer(&self) -> std::sync::MutexGuard<'_, Writer> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads one slot's records from `from` on; returns where they end.
    fn scan(&self, slot: &Slot, from: u64, out: &mut Vec<Record>) -> Result<u64, WalError> {
        let path = slot_path(&self.dir, slot.index);
        let mut at = from;
        while at + HEADER as u64 <= SLOT_BYTES {
            let start = Position {
                generation: slot.generation,
                offset: at,
            };
            let found = self
                .read_at(&slot.file, &path, slot.index, start)
                .and_then(|r| match r {
                    Some(mut r) => self.verify(&mut r).map(|()| Some(r)),
                    None => Ok(None),
                });
            match found {
                Ok(Some(r)) => {
                    at = r.location.end.offset;
                    out.push(r);
                }
                Ok(None) => break,
                Err(e) => {
                    // Only the last record can be torn (the one being appended when the node
                    // stopped); it was never acknowledged. Anything after it would be damage.
                    if self.any_record_after(&slot.file, slot.generation, at) {
                        return Err(e);
                    }
                    tracing::warn!(error = %e, "dropped a torn record at the end of the ingest log (never acknowledged)");
                    break;
                }
            }
        }
        Ok(at)
    }

    /// Whether a valid record header of `generation` follows `at` (damage vs a torn tail).
    fn any_record_after(&self, file: &fs::File, generation: u64, at: u64) -> bool {
        let mut o = align(at + 1);
        while o + HEADER as u64 <= SLOT_BYTES {
            let mut h = [0u8; HEADER];
            if file.read_exact_at(&mut h, o).is_ok()
                && parse_header(&h).is_some_and(|(g, _, _)| g == generation)
            {
                return true;
            }
            o += PAGE;
        }
        false
    }

    /// The record starting at `start`: `None` where the slot's records end (zeros, or a stale
    /// record of an earlier generation); an error when it does not verify.
    fn read_at(
        &self,
        file: &fs::File,
        path: &Path,
        slot: usize,
        start: Position,
    ) -> Result<Option<Record>, WalError> {
        Ok(self
            .read_record_at(file, path, slot, start, true)?
            .map(|(r, _)| r))
    }

    /// [`Wal::read_at`], with the record's data read (`with_data`) or left in the log (the
    /// record's `data` then empty); with where the data is in the slot file.
    fn read_record_at(
        &self,
        file: &fs::File,
        path: &Path,
        slot: usize,
        start: Position,
        with_data: bool,
    ) -> Result<Option<(Record, std::ops::Range<u64>)>, WalError> {
        let damaged = |reason: &str| WalError::Damaged {
            path: path.to_owned(),
            offset: start.offset,
            reason: reason.to_string(),
        };
        let mut h = [0u8; HEADER];
        file.read_exact_at(&mut h, start.offset)
            .map_err(io_at(path))?;
        if &h[..8] != REC_MAGIC {
            if h.iter().all(|b| *b == 0) {
                return Ok(None);
            }
            return Err(damaged("no record header"));
        }
        let Some((generation, meta_len, data_len)) = parse_header(&h) else {
            return Err(damaged("header check"));
        };
        if generation != start.generation {
            return Ok(None);
        }
        let body = start.offset + HEADER as u64;
        let end = body + meta_len as u64 + data_len as u64;
        if end > SLOT_BYTES {
            return Err(damaged("longer than its slot"));
        }
        // Read into fresh capacity, not a zeroed buffer: zeroing it cost the mover about as
        // much CPU as the read itself.
        let mut data = Vec::new();
        if with_data {
            data.reserve_exact(data_len as usize);
            let mut from = file;
            std::io::Seek::seek(&mut from, std::io::SeekFrom::Start(body)).map_err(io_at(path))?;
            from.take(u64::from(data_len))
                .read_to_end(&mut data)
                .map_err(io_at(path))?;
            if data.len() != data_len as usize {
                return Err(damaged("the slot ends inside the record"));
            }
        }
        let mut meta = vec![0u8; meta_len as usize];
        file.read_exact_at(&mut meta, body + data_len as u64)
            .map_err(io_at(path))?;
        let meta = self
            .open_sealed(&meta, path)
            .map_err(|e| damaged(&format!("meta: {e}")))?;
        let meta: InstanceRecord =
            serde_json::from_slice(&meta).map_err(|_| damaged("meta is not a record"))?;
        let record = Record {
            location: Location {
                slot,
                start,
                end: Position {
                    generation,
                    offset: align(end),
                },
            },
            meta,
            data,
        };
        Ok(Some((record, body..body + u64::from(data_len))))
    }

    fn open_sealed(&self, bytes: &[u8], path: &Path) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        self.at_rest
            .reader(bytes, path)
            .map_err(|e| e.to_string())?
            .read_to_end(&mut out)
            .map_err(|e| crate::store::sealed::SealError::from_io(path, e).to_string())?;
        Ok(out)
    }

    /// Checks that a record's data is the instance its meta names (length, SHA-256 of the
    /// plaintext, and the sealed data's last tag where the meta has it), and completes the
    /// meta's SHA-256 where a sealed record left it out: done for every record found at start,
    /// and by the mover for a record whose hash it was not given.
    pub fn verify(&self, r: &mut Record) -> Result<(), WalError> {
        let path = slot_path(&self.dir, r.location.slot);
        let damaged = |reason: String| WalError::Damaged {
            path: path.clone(),
            offset: r.location.start.offset,
            reason,
        };
        let plain = self
            .open_sealed(&r.data, &path)
            .map_err(|e| damaged(format!("data: {e}")))?;
        let hash = hex::encode(Sha256::digest(&plain));
        let tag = r.data.len().checked_sub(SEAL_TAG).map(|at| &r.data[at..]);
        let tag_bound = match &r.meta.data_tag {
            Some(t) => r.data.starts_with(SEALED_MAGIC) && tag.map(hex::encode).as_ref() == Some(t),
            None => true,
        };
        if plain.len() as u64 != r.meta.size || !tag_bound {
            return Err(damaged("data is not the instance its meta names".into()));
        }
        match &r.meta.sha256 {
            Some(h) if *h != hash => Err(damaged("data does not match its SHA-256".into())),
            Some(_) => Ok(()),
            // Without its hash, a record holds only if its sealing binds it to its meta.
            None if r.meta.data_tag.is_none() => {
                Err(damaged("neither a SHA-256 nor a sealed data tag".into()))
            }
            None => {
                r.meta.sha256 = Some(hash);
                Ok(())
            }
        }
    }

    /// Whether records are sealed (encryption at rest): then a record's meta may leave out the
    /// SHA-256 (see [`InstanceRecord::sha256`]).
    pub fn seals(&self) -> bool {
        self.at_rest.seals()
    }

    /// Seals `meta` and the instance's plaintext `data` into one record.
    pub fn seal(&self, meta: &InstanceRecord, data: &[u8]) -> Result<Vec<u8>, WalError> {
        self.seal_instance(meta.clone(), data, Vec::new())
            .map(|(rec, _)| rec)
    }

    /// Seals the instance's plaintext `data`, then `meta`, into one record, written into `rec`
    /// (a buffer to reuse: its content is replaced); returns it with the meta as recorded: its
    /// length set, and, when the log seals, the sealed data's last tag (`data_tag`); a plain
    /// log computes the SHA-256 if `meta` lacks it (its only check).
    pub fn seal_instance(
        &self,
        mut meta: InstanceRecord,
        data: &[u8],
        mut rec: Vec<u8>,
    ) -> Result<(Vec<u8>, InstanceRecord), WalError> {
        let path = self.dir.clone();
        let fail = |reason: String| WalError::Io {
            path: path.clone(),
            source: std::io::Error::other(reason),
        };
        // Room for the sealed data (a tag per segment) and the meta: never reallocated.
        let segments = data.len() / crate::store::sealed::SEGMENT + 1;
        rec.clear();
        rec.reserve(HEADER + data.len() + segments * SEAL_TAG + 8192);
        rec.resize(HEADER, 0);
        // Sealed in place in the record: one copy of the instance.
        self.at_rest
            .seal_into(data, &mut rec)
            .map_err(io_at(&path))?;
        let data_len = rec.len() - HEADER;
        meta.size = data.len() as u64;
        if self.at_rest.seals() {
            meta.data_tag = Some(hex::encode(&rec[rec.len() - SEAL_TAG..]));
        } else if meta.sha256.is_none() {
            meta.sha256 = Some(hex::encode(Sha256::digest(data)));
        }
        let json = serde_json::to_vec(&meta).map_err(|e| fail(e.to_string()))?;
        self.at_rest
            .seal_into(&json, &mut rec)
            .map_err(io_at(&path))?;
        let meta_len = rec.len() - HEADER - data_len;
        let too_large = || fail("the record is too large".into());
        let data_len = u32::try_from(data_len).map_err(|_| too_large())?;
        let meta_len = u32::try_from(meta_len).map_err(|_| too_large())?;
        rec[..8].copy_from_slice(REC_MAGIC);
        rec[16..20].copy_from_slice(&meta_len.to_le_bytes());
        rec[20..24].copy_from_slice(&data_len.to_le_bytes());
        Ok((rec, meta))
    }

    /// The sealed instance bytes of a record made by [`Wal::seal`].
    pub fn data_of(rec: &[u8]) -> &[u8] {
        let data = u32::from_le_bytes(rec[20..24].try_into().expect("4 bytes")) as usize;
        &rec[HEADER..HEADER + data]
    }

    /// Whether a sealed record of `len` bytes can ever go into the log.
    pub fn fits(len: usize) -> bool {
        (HEADER + len) as u64 <= SLOT_BYTES - PAGE
    }

    /// Appends a record made by [`Wal::seal`] and makes it durable (one `fdatasync`); `Ok(None)`
    /// when it cannot go into the log now (too large, or no free slot yet): the caller makes the
    /// instance durable another way. `then` runs with the record's location while the log is
    /// still locked, so that whoever moves records sees them in the order they were appended.
    pub fn append(
        &self,
        rec: &mut [u8],
        then: impl FnOnce(Location),
    ) -> Result<Option<Location>, WalError> {
        if !Wal::fits(rec.len() - HEADER) {
            return Ok(None);
        }
        let mut w = self.lock_writer();
        let fits_active = w
            .active
            .as_ref()
            .is_some_and(|(_, at)| at + rec.len() as u64 <= SLOT_BYTES);
        if !fits_active && !self.roll(&mut w)? {
            return Ok(None);
        }
        let (slot, at) = w.active.as_mut().expect("an active slot");
        let start = Position {
            generation: slot.generation,
            offset: *at,
        };
        rec[8..16].copy_from_slice(&slot.generation.to_le_bytes());
        let c = check(&rec[..24]);
        rec[24..32].copy_from_slice(&c);
        let path = slot_path(&self.dir, slot.index);
        slot.file
            .write_all_at(rec, *at)
            .and_then(|()| slot.file.sync_data())
            .map_err(io_at(&path))?;
        *at = align(*at + rec.len() as u64);
        slot.end = *at;
        let location = Location {
            slot: slot.index,
            start,
            end: Position {
                generation: start.generation,
                offset: *at,
            },
        };
        then(location);
        Ok(Some(location))
    }

    /// Retires the active slot and starts the next generation in a free one; false when none
    /// is free. When none is free, or none is left after this one, another is created in the
    /// background, up to [`MAX_SLOTS`].
    fn roll(&self, w: &mut Writer) -> Result<bool, WalError> {
        let created: Vec<Slot> =
            std::mem::take(&mut *self.created.lock().unwrap_or_else(|p| p.into_inner()));
        w.idle.extend(created);
        if let Some((slot, _)) = w.active.take() {
            w.idle.push(slot);
        }
        let (consumed, _) = *self.consumed.lock().unwrap_or_else(|p| p.into_inner());
        let is_free = |s: &Slot| {
            s.generation == 0
                || s.generation < consumed.generation
                || (s.generation == consumed.generation && s.end <= consumed.offset)
        };
        let Some(i) = w.idle.iter().position(is_free) else {
            self.create_in_background(w);
            return Ok(false);
        };
        let mut slot = w.idle.swap_remove(i);
        if !w.idle.iter().any(is_free) {
            // The last free one: the next is prepared now, so that the next roll finds one
            // (while the mover is behind) rather than sending instances the slower way.
            self.create_in_background(w);
        }
        let generation = w.next_generation;
        let path = slot_path(&self.dir, slot.index);
        slot.file
            .write_all_at(&slot_header(generation), 0)
            .and_then(|()| slot.file.sync_data())
            .map_err(io_at(&path))?;
        w.next_generation += 1;
        slot.generation = generation;
        slot.end = PAGE;
        w.active = Some((slot, PAGE));
        Ok(true)
    }

    fn create_in_background(&self, w: &mut Writer) {
        let Some(index) = w.taken.iter().position(|t| !t) else {
            return;
        };
        w.taken[index] = true;
        let (dir, created) = (self.dir.clone(), self.created.clone());
        let spawned = std::thread::Builder::new()
            .name("ingest-log-slot".into())
            .spawn(move || {
                super::lower_priority();
                match create_slot(&dir, index) {
                    Ok(slot) => created.lock().unwrap_or_else(|p| p.into_inner()).push(slot),
                    Err(e) => tracing::warn!(error = %e, "cannot create an ingest log slot"),
                }
            });
        match spawned {
            Ok(t) => {
                let mut threads = self.creating.lock().unwrap_or_else(|p| p.into_inner());
                threads.retain(|t| !t.is_finished());
                threads.push(t);
            }
            Err(_) => w.taken[index] = false,
        }
    }

    /// Prepares [`READY_SLOTS`] slots in the background (a fresh log has none): two are enough
    /// while the mover keeps up (one fills while the other is moved out); more are created only
    /// when a roll finds none free.
    pub fn warm_up(&self) {
        let mut w = self.lock_writer();
        let have = w.taken.iter().filter(|t| **t).count();
        for _ in have..READY_SLOTS {
            self.create_in_background(&mut w);
        }
    }

    /// Reads a record back (to move it).
    pub fn read(&self, at: Location) -> Result<Record, WalError> {
        let path = slot_path(&self.dir, at.slot);
        let file = fs::File::open(&path).map_err(io_at(&path))?;
        self.read_at(&file, &path, at.slot, at.start)?
            .ok_or_else(|| WalError::Damaged {
                path,
                offset: at.start.offset,
                reason: "the record is gone".into(),
            })
    }

    /// Reads a record's meta and leaves its data in the log: [`InLog::copy_to`] copies it into
    /// a file inside the kernel (`copy_file_range`), never through memory of ours (the mover:
    /// no buffer to fill and no second copy of each instance).
    pub fn read_in_log(&self, at: Location) -> Result<InLog, WalError> {
        let path = slot_path(&self.dir, at.slot);
        let file = fs::File::open(&path).map_err(io_at(&path))?;
        let (record, data) = self
            .read_record_at(&file, &path, at.slot, at.start, false)?
            .ok_or_else(|| WalError::Damaged {
                path: path.clone(),
                offset: at.start.offset,
                reason: "the record is gone".into(),
            })?;
        Ok(InLog { record, file, data })
    }

    /// Every record before `upto` has been moved and made durable elsewhere: records the
    /// checkpoint durably (slots behind it become free).
    pub fn consumed(&self, upto: Position) -> Result<(), WalError> {
        let mut c = self.consumed.lock().unwrap_or_else(|p| p.into_inner());
        if upto <= c.0 {
            return Ok(());
        }
        let seq = c.1 + 1;
        let path = self.dir.join("checkpoint");
        let file = fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io_at(&path))?;
        let at = if seq.is_multiple_of(2) { 0 } else { 512 };
        file.write_all_at(&checkpoint_copy(seq, upto), at)
            .and_then(|()| file.sync_data())
            .map_err(io_at(&path))?;
        *c = (upto, seq);
        Ok(())
    }

    /// Every record found by [`Wal::open`] has been moved: the log starts afresh.
    pub fn replayed(&self) -> Result<(), WalError> {
        let next = self.lock_writer().next_generation;
        self.consumed(Position {
            generation: next,
            offset: 0,
        })
    }
}

fn parse_header(h: &[u8; HEADER]) -> Option<(u64, u32, u32)> {
    if &h[..8] != REC_MAGIC || h[24..32] != check(&h[..24]) {
        return None;
    }
    let generation = u64::from_le_bytes(h[8..16].try_into().ok()?);
    let meta = u32::from_le_bytes(h[16..20].try_into().ok()?);
    let data = u32::from_le_bytes(h[20..24].try_into().ok()?);
    Some((generation, meta, data))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::pseudonym::SiteKeys;

    fn meta(n: usize, data: &[u8]) -> InstanceRecord {
        record(n, data, "SECRET^PATIENT")
    }

    /// A new, empty log in `dir`, ready for appends (as a node's start leaves it: nothing
    /// found, replayed, its first slots being prepared).
    pub(crate) fn ready_log(dir: &Path, at_rest: AtRest) -> Wal {
        let (wal, found) = Wal::open(dir, at_rest).unwrap();
        assert!(found.is_empty());
        wal.replayed().unwrap();
        wal.warm_up();
        wal
    }

    /// A logged instance `n` of one study with `data`, whose token stands for `original`.
    pub(crate) fn record(n: usize, data: &[u8], original: &str) -> InstanceRecord {
        InstanceRecord {
            agreement: "a".into(),
            flow: "f".into(),
            purpose: "treatment".into(),
            to: "c".into(),
            study: "study-token".into(),
            file: format!("{n}.dcm"),
            sha256: Some(hex::encode(Sha256::digest(data))),
            size: data.len() as u64,
            data_tag: None,
            sop_instance_uid: format!("2.25.{n}"),
            modality: Some("CT".into()),
            patient_token: "p".into(),
            vault_entries: vec![(
                format!("tok{n}"),
                VaultEntry {
                    attribute: "PatientName".into(),
                    original: original.into(),
                },
            )],
        }
    }

    fn data(n: usize, len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + n) as u8).collect()
    }

    /// Appends record `n`, waiting for a slot (a fresh log creates its first in the background).
    fn append(wal: &Wal, n: usize, len: usize) -> Location {
        let d = data(n, len);
        let mut rec = wal.seal(&meta(n, &d), &d).unwrap();
        for _ in 0..1000 {
            if let Some(at) = wal.append(&mut rec, |_| {}).unwrap() {
                return at;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("no slot became free");
    }

    fn at_rest() -> AtRest {
        AtRest::new(&SiteKeys::from_bytes([3; 32], [5; 32]), true)
    }

    /// Every byte of the log's files. A slot still being prepared in the background may be
    /// renamed between listing and reading (it holds only zeros): skipped.
    fn files(dir: &Path) -> Vec<u8> {
        let mut all = Vec::new();
        for e in fs::read_dir(dir).unwrap().flatten() {
            match fs::read(e.path()) {
                Ok(bytes) => all.extend(bytes),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => panic!("{e}"),
            }
        }
        all
    }

    #[test]
    fn appended_records_come_back_in_order_until_consumed_and_are_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let wal = ready_log(dir.path(), at_rest());
        let locs: Vec<Location> = (0..3).map(|n| append(&wal, n, 100_000 + n)).collect();
        let mut r = wal.read(locs[1]).unwrap();
        // As appended, plus the tag that binds it to its sealed data.
        assert!(r.meta.data_tag.is_some());
        let appended = InstanceRecord {
            data_tag: r.meta.data_tag.clone(),
            ..meta(1, &data(1, 100_001))
        };
        assert_eq!(r.meta, appended);
        wal.verify(&mut r).unwrap();
        let raw = files(dir.path());
        for secret in [
            &b"SECRET^PATIENT"[..],
            b"study-token",
            &data(0, 100_000)[1000..1064],
        ] {
            // memmem, not a window-by-window comparison: `raw` holds two 32 MiB slots, which a
            // debug build took half a minute to search that way.
            assert!(
                memchr::memmem::find(&raw, secret).is_none(),
                "plaintext in the log"
            );
        }
        drop(wal);

        // A restart finds all three, in order.
        let (wal, found) = Wal::open(dir.path(), at_rest()).unwrap();
        let names: Vec<&str> = found.iter().map(|r| r.meta.file.as_str()).collect();
        assert_eq!(names, ["0.dcm", "1.dcm", "2.dcm"]);
        // The first two moved: only the third is found again.
        wal.consumed(found[1].location.end).unwrap();
        drop(wal);
        let (wal, found) = Wal::open(dir.path(), at_rest()).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].meta.file, "2.dcm");
        // All moved: a restart finds nothing, and new records go on after.
        wal.replayed().unwrap();
        append(&wal, 3, 5000);
        drop(wal);
        let (_, found) = Wal::open(dir.path(), at_rest()).unwrap();
        let names: Vec<&str> = found.iter().map(|r| r.meta.file.as_str()).collect();
        assert_eq!(names, ["3.dcm"]);
    }

    #[test]
    fn a_torn_last_record_is_dropped_and_damage_before_the_end_is_an_error() {
        for torn in ["end", "header", "body"] {
            let dir = tempfile::tempdir().unwrap();
            let wal = ready_log(dir.path(), at_rest());
            append(&wal, 0, 200_000);
            let last = append(&wal, 1, 200_000);
            drop(wal);
            // A crash while the last record was being written: part of it never reached the disk.
            let path = slot_path(dir.path(), last.slot);
            let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
            let at = match torn {
                "header" => last.start.offset + 20,
                "body" => last.start.offset + HEADER as u64 + 10,
                _ => last.end.offset - PAGE - 100,
            };
            f.write_all_at(&[0u8; 64], at).unwrap();
            drop(f);
            let (_, found) = Wal::open(dir.path(), at_rest()).unwrap();
            let names: Vec<&str> = found.iter().map(|r| r.meta.file.as_str()).collect();
            assert_eq!(names, ["0.dcm"], "torn {torn}");
        }

        // Damage to a record followed by a good one is not a torn tail: it is reported.
        let dir = tempfile::tempdir().unwrap();
        let wal = ready_log(dir.path(), at_rest());
        let first = append(&wal, 0, 200_000);
        append(&wal, 1, 200_000);
        drop(wal);
        let f = fs::OpenOptions::new()
            .write(true)
            .open(slot_path(dir.path(), first.slot))
            .unwrap();
        f.write_all_at(&[0xAAu8; 64], first.start.offset + 5000)
            .unwrap();
        drop(f);
        let err = Wal::open(dir.path(), at_rest())
            .err()
            .expect("damage is an error");
        assert!(err.to_string().contains("does not verify"), "{err}");
        assert!(!err.to_string().contains("SECRET"), "{err}");
    }

    /// A record left in the log ([`Wal::read_in_log`]) has the meta of the record read whole, and
    /// its data copied into a file is the data read whole.
    #[test]
    fn a_record_left_in_the_log_is_copied_out_whole() {
        let dir = tempfile::tempdir().unwrap();
        let wal = ready_log(dir.path(), at_rest());
        let at = [append(&wal, 1, 200_000), append(&wal, 2, 7)];
        for at in at {
            let whole = wal.read(at).unwrap();
            let left = wal.read_in_log(at).unwrap();
            assert!(left.record.data.is_empty());
            assert_eq!(left.record.meta, whole.meta);
            assert_eq!(left.record.location, whole.location);
            let out = tempfile::tempfile().unwrap();
            std::io::Write::write_all(&mut &out, b"x").unwrap();
            left.copy_to(&out).unwrap();
            let mut copied = Vec::new();
            std::io::Seek::seek(&mut &out, std::io::SeekFrom::Start(1)).unwrap();
            std::io::Read::read_to_end(&mut &out, &mut copied).unwrap();
            assert_eq!(copied, whole.data);
        }
    }

    /// Dropping the log waits for the slots being prepared in the background: once it is
    /// gone, they are all there, whole, and nothing is left half-written in its folder.
    #[test]
    fn dropping_the_log_waits_for_the_slots_being_prepared() {
        let dir = tempfile::tempdir().unwrap();
        let wal = ready_log(dir.path(), at_rest());
        drop(wal);
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["checkpoint", "slot-0.wal", "slot-1.wal"]);
        for slot in ["slot-0.wal", "slot-1.wal"] {
            let len = fs::metadata(dir.path().join(slot)).unwrap().len();
            assert_eq!(len, SLOT_BYTES);
        }
    }

    #[test]
    fn slots_roll_over_and_are_reused_once_consumed() {
        let dir = tempfile::tempdir().unwrap();
        let wal = ready_log(dir.path(), at_rest());
        let len = 3 << 20;
        let mut last = None;
        // More than MAX_SLOTS slots' worth: only possible because moved records free slots.
        for n in 0..(MAX_SLOTS * 11 + 3) {
            let at = append(&wal, n, len);
            if n % 2 == 1 {
                wal.consumed(at.end).unwrap();
            }
            last = Some((n, at));
        }
        let slots = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("slot-"))
            .count();
        assert!(slots <= MAX_SLOTS);
        drop(wal);
        let (wal, found) = Wal::open(dir.path(), at_rest()).unwrap();
        let (n, _) = last.unwrap();
        assert_eq!(found.len(), 1, "only the last, unconsumed record");
        assert_eq!(found[0].meta.file, format!("{n}.dcm"));
        let mut last = found.into_iter().next().unwrap();
        wal.verify(&mut last).unwrap();
    }

    /// A sealed record may leave its SHA-256 out (it is computed beside the `fdatasync`): found
    /// at start, it gets the hash of its data. Its meta is bound to its data by the sealed
    /// data's last tag, so another record's (validly sealed) data in its place does not verify.
    #[test]
    fn a_sealed_record_without_its_hash_gets_it_at_start_and_is_bound_to_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let wal = ready_log(dir.path(), at_rest());
        let len = 80_000;
        for n in 0..2 {
            let d = data(n, len);
            let mut m = meta(n, &d);
            m.sha256 = None;
            let (mut rec, recorded) = wal.seal_instance(m, &d, Vec::new()).unwrap();
            assert!(recorded.sha256.is_none() && recorded.data_tag.is_some());
            let mut appended = false;
            for _ in 0..1000 {
                if wal.append(&mut rec, |_| {}).unwrap().is_some() {
                    appended = true;
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            assert!(appended, "no slot became free");
        }
        drop(wal);
        let (wal, found) = Wal::open(dir.path(), at_rest()).unwrap();
        assert_eq!(found.len(), 2);
        for (n, r) in found.iter().enumerate() {
            let want = hex::encode(Sha256::digest(data(n, len)));
            assert_eq!(r.meta.sha256.as_deref(), Some(want.as_str()));
        }
        let mut swapped = Record {
            location: found[0].location,
            meta: InstanceRecord {
                sha256: None,
                ..found[0].meta.clone()
            },
            data: found[1].data.clone(),
        };
        let err = wal.verify(&mut swapped).expect_err("another record's data");
        assert!(err.to_string().contains("not the instance"), "{err}");
        let mut untied = Record {
            location: found[0].location,
            meta: InstanceRecord {
                sha256: None,
                data_tag: None,
                ..found[0].meta.clone()
            },
            data: found[0].data.clone(),
        };
        assert!(wal.verify(&mut untied).is_err(), "neither hash nor tag");
    }

    #[test]
    fn a_plain_log_verifies_its_data_by_hash() {
        let dir = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(dir.path(), AtRest::plain()).unwrap();
        let d = data(9, 1000);
        let mut m = meta(9, &d);
        m.sha256 = None;
        let (_, recorded) = wal.seal_instance(m, &d, Vec::new()).unwrap();
        assert_eq!(
            recorded.sha256,
            Some(hex::encode(Sha256::digest(&d))),
            "a plain record always carries its hash"
        );
        assert!(recorded.data_tag.is_none());
        drop(wal);
        drop(dir);

        let dir = tempfile::tempdir().unwrap();
        let wal = ready_log(dir.path(), AtRest::plain());
        let at = append(&wal, 0, 50_000);
        drop(wal);
        let f = fs::OpenOptions::new()
            .write(true)
            .open(slot_path(dir.path(), at.slot))
            .unwrap();
        f.write_all_at(&[0x55u8; 8], at.end.offset - PAGE - 8)
            .unwrap();
        drop(f);
        let (_, found) = Wal::open(dir.path(), AtRest::plain()).unwrap();
        assert!(found.is_empty(), "a record whose data changed is dropped");
    }
}
