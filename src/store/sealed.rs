//! Encryption at rest of the files a node keeps: one streaming, chunked AES-256-GCM format and
//! the one reader and writer every instance byte on disk goes through.
//!
//! Owns: the sealed file format, [`SealedWriter`] (implements `Write`), [`SealedReader`]
//! (implements `Read`, verifying as it goes), and [`AtRest`], the node's switch and key handle:
//! it opens files sealed or plain, seals new ones when encryption at rest is on, hashes, copies
//! out to the delivery folders and re-seals under a new key (`keys rotate`).
//!
//! Does not own: the keys (the site key file, `keyring`), nor where files live (`store`,
//! `ingest`, `dicom_net`).
//!
//! Format (version 1):
//!
//! ```text
//! header:  "PBSEALED" | version u8 = 1 | key-id length u8 | key id (ASCII) | nonce prefix (7 bytes)
//!          | segment size u32 BE
//! segment: AES-256-GCM(key, nonce = prefix | counter u32 BE | last u8, aad = header) of up to
//!          `segment size` plaintext bytes, followed by its 16-byte tag
//! ```
//!
//! Every segment but the last holds exactly `segment size` bytes; the last one (flag 1) may hold
//! fewer, or none. The counter and flag in the nonce (the STREAM construction) make reordering,
//! dropping or duplicating segments, and truncating the file at a segment boundary, fail
//! authentication; the header (key id, segment size) is bound as associated data. The nonce prefix
//! is random per file, so no (key, nonce) pair repeats across files. Memory stays at one segment
//! (64 KiB) however large the file.
//!
//! Content addressing stays on the plaintext: a blob is named by the SHA-256 of the instance's
//! bytes, manifests and receipts carry that hash, and [`AtRest::hash`] decrypts to compute it. A
//! file without the magic is read as plaintext (a data folder from before encryption at rest, or
//! a site that turned it off); `keys rotate` seals such files when encryption is on. Where the
//! hash of a plain file is checked (blobs, outbox), swapping a sealed file for a plain one with
//! other bytes is caught like any other damage.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use rand::RngCore;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use sha2::{Digest, Sha256};

use crate::pseudonym::SiteKeys;

/// The first bytes of a sealed file.
pub const MAGIC: &[u8; 8] = b"PBSEALED";
const VERSION: u8 = 1;
/// Plaintext bytes per segment.
pub const SEGMENT: usize = 64 * 1024;
const TAG: usize = 16;
const PREFIX: usize = 7;

/// What went wrong reading or writing a sealed file. Messages name the file, never its content.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is sealed under data key `{key_id}`, which the key file does not hold (wrong key file?)")]
    UnknownKey { path: PathBuf, key_id: String },
    #[error("{path} failed authentication at segment {segment}: wrong key, or the file was damaged, truncated or tampered with")]
    Damaged { path: PathBuf, segment: u32 },
    #[error("{path} has a damaged sealed-file header: {reason}")]
    Header { path: PathBuf, reason: &'static str },
}

impl SealError {
    /// As an `io::Error` (for `Read` and `Write`), keeping this error as its source.
    fn into_io(self) -> io::Error {
        let kind = match &self {
            SealError::Io { source, .. } => source.kind(),
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, self)
    }

    /// The sealed-file error carried by an `io::Error` from [`SealedReader`], or a plain I/O error
    /// on `path`.
    pub fn from_io(path: &Path, e: io::Error) -> SealError {
        if e.get_ref().is_some_and(|inner| inner.is::<SealError>()) {
            let inner = e.into_inner().expect("checked");
            return *inner.downcast::<SealError>().expect("checked");
        }
        SealError::Io {
            path: path.to_owned(),
            source: e,
        }
    }
}

/// The nonce of one segment: every (key, nonce) pair is used once, since the prefix is random per
/// file and the counter never repeats within a file.
fn nonce(prefix: &[u8; PREFIX], counter: u32, last: bool) -> Nonce {
    let mut n = [0u8; 12];
    n[..PREFIX].copy_from_slice(prefix);
    n[PREFIX..PREFIX + 4].copy_from_slice(&counter.to_be_bytes());
    n[11] = last as u8;
    Nonce::assume_unique_for_key(n)
}

/// AES-256-GCM (ring's implementation: AES-NI and carry-less multiplication where the CPU has
/// them, several times faster here than the pure-Rust crate).
fn cipher(key: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("32-byte key"))
}

/// Writes a sealed file into `inner`. Call [`SealedWriter::finish`] at the end: a writer dropped
/// without it leaves a file without its last segment, which every reader refuses.
pub struct SealedWriter<W: Write> {
    inner: W,
    cipher: LessSafeKey,
    header: Vec<u8>,
    prefix: [u8; PREFIX],
    counter: u32,
    buf: Vec<u8>,
    plain_len: u64,
}

impl<W: Write> SealedWriter<W> {
    /// Starts a sealed file under the data key `key_id` (its header is written at once).
    pub fn new(mut inner: W, key_id: &str, key: &[u8; 32]) -> io::Result<Self> {
        let mut prefix = [0u8; PREFIX];
        rand::rngs::OsRng.fill_bytes(&mut prefix);
        let id = key_id.as_bytes();
        assert!(id.len() <= u8::MAX as usize, "data key ids are short");
        let mut header = Vec::with_capacity(MAGIC.len() + 2 + id.len() + PREFIX + 4);
        header.extend_from_slice(MAGIC);
        header.push(VERSION);
        header.push(id.len() as u8);
        header.extend_from_slice(id);
        header.extend_from_slice(&prefix);
        header.extend_from_slice(&(SEGMENT as u32).to_be_bytes());
        inner.write_all(&header)?;
        Ok(SealedWriter {
            inner,
            cipher: cipher(key),
            header,
            prefix,
            counter: 0,
            buf: Vec::with_capacity(SEGMENT + TAG),
            plain_len: 0,
        })
    }

    fn seal_segment(&mut self, last: bool) -> io::Result<()> {
        let n = nonce(&self.prefix, self.counter, last);
        let tag = self
            .cipher
            .seal_in_place_separate_tag(n, Aad::from(&self.header[..]), &mut self.buf)
            .map_err(|_| io::Error::other("AES-GCM refused a segment"))?;
        self.buf.extend_from_slice(tag.as_ref());
        self.inner.write_all(&self.buf)?;
        self.buf.clear();
        self.counter = self
            .counter
            .checked_add(1)
            .ok_or_else(|| io::Error::other("sealed file too large (2^32 segments)"))?;
        Ok(())
    }

    /// Seals the last segment and returns the inner writer (not flushed to disk: the caller
    /// fsyncs as the place requires) and the plaintext length.
    pub fn finish(mut self) -> io::Result<(W, u64)> {
        self.seal_segment(true)?;
        self.inner.flush()?;
        Ok((self.inner, self.plain_len))
    }

    /// The inner writer (to take out what was written so far, e.g. a `Vec<u8>` drained to an
    /// async file).
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }
}

impl<W: Write> Write for SealedWriter<W> {
    fn write(&mut self, mut data: &[u8]) -> io::Result<usize> {
        let total = data.len();
        while !data.is_empty() {
            // A full segment is sealed only when more data follows, so the last one is always
            // sealed by `finish` with the last flag.
            if self.buf.len() == SEGMENT {
                self.seal_segment(false)?;
            }
            let take = (SEGMENT - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
        self.plain_len += total as u64;
        Ok(total)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl SealedWriter<&mut Vec<u8>> {
    /// Seals `data` as the whole rest of the file, each segment copied once into the output
    /// vector and sealed there in place (through [`SealedWriter::write`] it is copied twice:
    /// into the segment buffer, then out of it). The same bytes as `write_all(data)` then
    /// `finish()`: every segment but the last full, the last one flagged as last.
    fn seal_all_in_place(mut self, data: &[u8]) -> io::Result<u64> {
        debug_assert!(self.buf.is_empty() && self.counter == 0);
        if data.is_empty() {
            self.seal_segment(true)?;
            return Ok(0);
        }
        let mut segments = data.chunks(SEGMENT).peekable();
        while let Some(segment) = segments.next() {
            let last = segments.peek().is_none();
            let n = nonce(&self.prefix, self.counter, last);
            let at = self.inner.len();
            self.inner.extend_from_slice(segment);
            let tag = self
                .cipher
                .seal_in_place_separate_tag(n, Aad::from(&self.header[..]), &mut self.inner[at..])
                .map_err(|_| io::Error::other("AES-GCM refused a segment"))?;
            self.inner.extend_from_slice(tag.as_ref());
            self.counter = self
                .counter
                .checked_add(1)
                .ok_or_else(|| io::Error::other("sealed file too large (2^32 segments)"))?;
        }
        Ok(data.len() as u64)
    }
}

/// Reads a sealed file, authenticating each segment before any of its bytes are returned.
pub struct SealedReader<R: Read> {
    inner: R,
    path: PathBuf,
    cipher: LessSafeKey,
    header: Vec<u8>,
    prefix: [u8; PREFIX],
    segment: usize,
    counter: u32,
    /// Ciphertext read ahead (one segment, its tag, and one byte to see whether more follow).
    raw: Vec<u8>,
    plain: Vec<u8>,
    pos: usize,
    done: bool,
}

/// The header of a sealed file, read from `inner` after its magic.
fn read_header<R: Read>(inner: &mut R, path: &Path) -> Result<(Vec<u8>, String), SealError> {
    let bad = |reason| SealError::Header {
        path: path.to_owned(),
        reason,
    };
    let io = |source| SealError::Io {
        path: path.to_owned(),
        source,
    };
    let mut head = MAGIC.to_vec();
    let mut two = [0u8; 2];
    inner.read_exact(&mut two).map_err(|_| bad("too short"))?;
    if two[0] != VERSION {
        return Err(bad("unknown version"));
    }
    head.extend_from_slice(&two);
    let mut rest = vec![0u8; two[1] as usize + PREFIX + 4];
    inner.read_exact(&mut rest).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => bad("too short"),
        _ => io(e),
    })?;
    head.extend_from_slice(&rest);
    let id = std::str::from_utf8(&rest[..two[1] as usize])
        .map_err(|_| bad("key id is not text"))?
        .to_string();
    Ok((head, id))
}

impl<R: Read> SealedReader<R> {
    /// Opens a sealed file whose magic has been read from `inner` already; `keys` gives the
    /// data key the header names. `path` names the file in errors.
    fn after_magic(mut inner: R, path: &Path, keys: &SiteKeys) -> Result<Self, SealError> {
        let (header, key_id) = read_header(&mut inner, path)?;
        let key = keys
            .data_key(&key_id)
            .ok_or_else(|| SealError::UnknownKey {
                path: path.to_owned(),
                key_id: key_id.clone(),
            })?;
        let n = header.len();
        let segment = u32::from_be_bytes(header[n - 4..].try_into().expect("4 bytes")) as usize;
        if segment == 0 || segment > 16 << 20 {
            return Err(SealError::Header {
                path: path.to_owned(),
                reason: "segment size out of range",
            });
        }
        let prefix: [u8; PREFIX] = header[n - 4 - PREFIX..n - 4].try_into().expect("7 bytes");
        Ok(SealedReader {
            inner,
            path: path.to_owned(),
            cipher: cipher(&key),
            header,
            prefix,
            segment,
            counter: 0,
            raw: Vec::with_capacity(segment + TAG + 1),
            plain: Vec::new(),
            pos: 0,
            done: false,
        })
    }

    /// The id of the data key this file is sealed under.
    pub fn key_id(&self) -> &str {
        let n = self.header[MAGIC.len() + 1] as usize;
        std::str::from_utf8(&self.header[MAGIC.len() + 2..MAGIC.len() + 2 + n]).unwrap_or("")
    }

    fn damaged(&self) -> io::Error {
        SealError::Damaged {
            path: self.path.clone(),
            segment: self.counter,
        }
        .into_io()
    }

    /// Reads and authenticates the next segment into `plain`.
    fn next_segment(&mut self) -> io::Result<()> {
        let want = self.segment + TAG + 1;
        while self.raw.len() < want {
            let have = self.raw.len();
            self.raw.resize(want, 0);
            let n = self.inner.read(&mut self.raw[have..]);
            let n = match n {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    self.raw.truncate(have);
                    continue;
                }
                Err(e) => {
                    self.raw.truncate(have);
                    return Err(e);
                }
            };
            self.raw.truncate(have + n);
            if n == 0 {
                break;
            }
        }
        let last = self.raw.len() < want;
        let take = if last {
            self.raw.len()
        } else {
            self.segment + TAG
        };
        if take < TAG {
            return Err(self.damaged());
        }
        let mut seg: Vec<u8> = std::mem::take(&mut self.plain);
        seg.clear();
        seg.extend_from_slice(&self.raw[..take]);
        self.raw.drain(..take);
        let n = nonce(&self.prefix, self.counter, last);
        let plain_len = self
            .cipher
            .open_in_place(n, Aad::from(&self.header[..]), &mut seg)
            .map_err(|_| self.damaged())?
            .len();
        seg.truncate(plain_len);
        self.counter = self.counter.checked_add(1).ok_or_else(|| self.damaged())?;
        self.plain = seg;
        self.pos = 0;
        self.done = last;
        Ok(())
    }
}

impl<R: Read> Read for SealedReader<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.plain.len() {
            if self.done {
                return Ok(0);
            }
            self.next_segment()?;
        }
        let n = (self.plain.len() - self.pos).min(out.len());
        out[..n].copy_from_slice(&self.plain[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// True for the first bytes of a sealed file that was damaged there (a few bits off the magic) or
/// cut inside it: such a file is refused, never read as a plain file. (No DICOM file, whose first
/// bytes are a zero preamble or `DICM`, and no JSON record comes near the magic.)
fn damaged_magic(head: &[u8]) -> bool {
    if head.is_empty() {
        return false;
    }
    if head.len() < MAGIC.len() {
        return MAGIC.starts_with(head) && head.len() >= 2;
    }
    let bits: u32 = head
        .iter()
        .zip(MAGIC)
        .map(|(a, b)| (a ^ b).count_ones())
        .sum();
    bits <= 8
}

/// A file opened for reading: sealed (decrypted as read) or plain.
pub enum Opened<R: Read> {
    Sealed(Box<SealedReader<R>>),
    /// A plain file; the bytes already read to look for the magic come first.
    Plain(io::Chain<io::Cursor<Vec<u8>>, R>),
}

impl<R: Read> Read for Opened<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        match self {
            Opened::Sealed(r) => r.read(out),
            Opened::Plain(r) => r.read(out),
        }
    }
}

/// A file being written: sealed or plain.
pub enum Sealing<W: Write> {
    Sealed(Box<SealedWriter<W>>),
    Plain(W, u64),
}

impl<W: Write> Sealing<W> {
    /// Ends the file (the last segment of a sealed one); returns the inner writer and the
    /// plaintext length.
    pub fn finish(self) -> io::Result<(W, u64)> {
        match self {
            Sealing::Sealed(w) => w.finish(),
            Sealing::Plain(mut w, n) => {
                w.flush()?;
                Ok((w, n))
            }
        }
    }

    /// The inner writer.
    pub fn get_mut(&mut self) -> &mut W {
        match self {
            Sealing::Sealed(w) => w.get_mut(),
            Sealing::Plain(w, _) => w,
        }
    }
}

impl<W: Write> Write for Sealing<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match self {
            Sealing::Sealed(w) => w.write(data),
            Sealing::Plain(w, n) => {
                let k = w.write(data)?;
                *n += k as u64;
                Ok(k)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Sealing::Sealed(w) => w.flush(),
            Sealing::Plain(w, _) => w.flush(),
        }
    }
}

/// The node's encryption at rest: whether new files are sealed, and the keys to open any.
#[derive(Clone, Debug)]
pub struct AtRest {
    keys: Option<SiteKeys>,
    seal: bool,
}

impl AtRest {
    /// Seals new files under the current data key of `keys` (`[storage] encrypt_at_rest = true`,
    /// the default) or writes them plain (`false`); either way sealed files are read.
    pub fn new(keys: &SiteKeys, seal: bool) -> AtRest {
        AtRest {
            keys: Some(keys.clone()),
            seal,
        }
    }

    /// No keys at all: files are written plain and a sealed file cannot be read (tests, tools).
    pub fn plain() -> AtRest {
        AtRest {
            keys: None,
            seal: false,
        }
    }

    /// Whether new files are sealed.
    pub fn seals(&self) -> bool {
        self.seal && self.keys.is_some()
    }

    /// Starts a file in `inner`: sealed under the current data key, or plain.
    pub fn writer<W: Write>(&self, inner: W) -> io::Result<Sealing<W>> {
        match (&self.keys, self.seal) {
            (Some(keys), true) => {
                let (id, key) = keys.current_data_key();
                Ok(Sealing::Sealed(Box::new(SealedWriter::new(
                    inner, &id, &key,
                )?)))
            }
            _ => Ok(Sealing::Plain(inner, 0)),
        }
    }

    /// Appends to `out` what [`AtRest::writer`] writes for the whole of `plain` (sealed under the
    /// current data key, or plain), sealing each segment in place in `out`: for a buffer in
    /// memory (the DICOM listener's log records) one copy of the plaintext instead of two.
    pub fn seal_into(&self, plain: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        match (&self.keys, self.seal) {
            (Some(keys), true) => {
                let (id, key) = keys.current_data_key();
                SealedWriter::new(out, &id, &key)?.seal_all_in_place(plain)?;
            }
            _ => out.extend_from_slice(plain),
        }
        Ok(())
    }

    /// Opens what `inner` holds, sealed or plain (`path` names it in errors).
    pub fn reader<R: Read>(&self, mut inner: R, path: &Path) -> Result<Opened<R>, SealError> {
        let mut head = Vec::with_capacity(MAGIC.len());
        (&mut inner)
            .take(MAGIC.len() as u64)
            .read_to_end(&mut head)
            .map_err(|source| SealError::Io {
                path: path.to_owned(),
                source,
            })?;
        if head.as_slice() != MAGIC {
            if damaged_magic(&head) {
                return Err(SealError::Header {
                    path: path.to_owned(),
                    reason: "its magic is damaged or the file is cut short",
                });
            }
            return Ok(Opened::Plain(io::Cursor::new(head).chain(inner)));
        }
        match &self.keys {
            Some(keys) => Ok(Opened::Sealed(Box::new(SealedReader::after_magic(
                inner, path, keys,
            )?))),
            None => Err(SealError::UnknownKey {
                path: path.to_owned(),
                key_id: "(no key file given)".into(),
            }),
        }
    }

    /// Opens a file for reading (buffered), sealed or plain.
    pub fn open(&self, path: &Path) -> Result<Opened<io::BufReader<fs::File>>, SealError> {
        let f = fs::File::open(path).map_err(|source| SealError::Io {
            path: path.to_owned(),
            source,
        })?;
        self.reader(io::BufReader::with_capacity(SEGMENT + TAG + 64, f), path)
    }

    /// Reads a whole file into memory (small files: records, manifests).
    pub fn read(&self, path: &Path) -> Result<Vec<u8>, SealError> {
        let mut out = Vec::new();
        self.open(path)?
            .read_to_end(&mut out)
            .map_err(|e| SealError::from_io(path, e))?;
        Ok(out)
    }

    /// SHA-256 and length of a file's plaintext.
    pub fn hash(&self, path: &Path) -> Result<([u8; 32], u64), SealError> {
        let mut r = self.open(path)?;
        let mut h = Sha256::new();
        let n = io::copy(&mut r, &mut h).map_err(|e| SealError::from_io(path, e))?;
        Ok((h.finalize().into(), n))
    }

    /// Writes `bytes` to `path` atomically (temporary name, fsync, rename, fsync folder), sealed
    /// when encryption at rest is on.
    pub fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<(), SealError> {
        self.write_atomic_from(path, &mut &bytes[..]).map(|_| ())
    }

    /// Copies everything `from` yields into a new file at `path` (atomically, as
    /// [`AtRest::write_atomic`]); returns the plaintext SHA-256 and length.
    pub fn write_atomic_from(
        &self,
        path: &Path,
        from: &mut dyn Read,
    ) -> Result<([u8; 32], u64), SealError> {
        let io = |source| SealError::Io {
            path: path.to_owned(),
            source,
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(io)?;
        let tmp = tempfile::Builder::new()
            .prefix(".sealing-")
            .tempfile_in(dir)
            .map_err(io)?;
        let mut w = self
            .writer(io::BufWriter::with_capacity(SEGMENT + TAG, tmp.as_file()))
            .map_err(io)?;
        let mut hashing = HashingWriter {
            inner: &mut w,
            hash: Sha256::new(),
        };
        io::copy(from, &mut hashing).map_err(|e| SealError::from_io(path, e))?;
        let sha: [u8; 32] = hashing.hash.finalize().into();
        let (_, n) = w.finish().map_err(io)?;
        tmp.as_file().sync_all().map_err(io)?;
        tmp.persist(path).map_err(|e| io(e.error))?;
        if let Ok(d) = fs::File::open(dir) {
            d.sync_all().map_err(io)?;
        }
        Ok((sha, n))
    }

    /// Writes the plaintext of `src` to a new file `tmp`, checking that its SHA-256 is `sha256`,
    /// without flushing it: the caller flushes a whole batch at once and then names each file
    /// (see `LocalStore::deliver`). Nothing is left at `tmp` on failure.
    pub fn copy_out_unsynced(
        &self,
        src: &Path,
        tmp: &Path,
        sha256: &[u8; 32],
    ) -> Result<(), SealError> {
        let io = |source| SealError::Io {
            path: tmp.to_owned(),
            source,
        };
        let result = (|| {
            let mut r = self.open(src)?;
            let f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(tmp)
                .map_err(io)?;
            let mut w = HashingWriter {
                inner: &mut io::BufWriter::with_capacity(SEGMENT, f),
                hash: Sha256::new(),
            };
            io::copy(&mut r, &mut w).map_err(|e| SealError::from_io(src, e))?;
            let HashingWriter { inner, hash } = w;
            inner.flush().map_err(io)?;
            if <[u8; 32]>::from(hash.finalize()) != *sha256 {
                return Err(SealError::Damaged {
                    path: src.to_owned(),
                    segment: 0,
                });
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = fs::remove_file(tmp);
        }
        result
    }

    /// The data key id a file is sealed under (`None`: a plain file).
    pub fn key_id_of(path: &Path) -> Result<Option<String>, SealError> {
        let mut f = fs::File::open(path).map_err(|source| SealError::Io {
            path: path.to_owned(),
            source,
        })?;
        let mut magic = [0u8; 8];
        if f.read_exact(&mut magic).is_err() || &magic != MAGIC {
            return Ok(None);
        }
        read_header(&mut f, path).map(|(_, id)| Some(id))
    }

    /// Re-seals one file under the current data key when it is sealed under another (or is
    /// plain while encryption at rest is on): the new file is written beside it and renamed over
    /// it, so a crash leaves the old file or the new one, both readable. Returns whether the
    /// file was rewritten. The plaintext is authenticated as it is read; a damaged file is left
    /// as it is and reported.
    pub fn reseal(&self, path: &Path) -> Result<bool, SealError> {
        let Some(keys) = &self.keys else {
            return Ok(false);
        };
        let (current, _) = keys.current_data_key();
        let was = AtRest::key_id_of(path)?;
        match &was {
            Some(id) if *id == current => return Ok(false),
            None if !self.seal => return Ok(false),
            _ => {}
        }
        let sealer = AtRest::new(keys, true);
        let dir = path.parent().unwrap_or(Path::new("."));
        let tmp = dir.join(format!(".reseal-{:016x}.part", rand::random::<u64>()));
        let mut r = self.open(path)?;
        let written = sealer.write_atomic_from(&tmp, &mut r);
        let result = written.and_then(|_| {
            if !path.exists() {
                // Deleted meanwhile (a delivered outbox study, say): do not bring it back.
                return Err(SealError::Io {
                    path: path.to_owned(),
                    source: io::ErrorKind::NotFound.into(),
                });
            }
            fs::rename(&tmp, path).map_err(|source| SealError::Io {
                path: path.to_owned(),
                source,
            })
        });
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map(|()| true)
    }
}

/// A file's plaintext where a reader wants a path (the guarded DICOM reader seeks and copies
/// pixel data by offset): the file itself when it is plain, or, when it is sealed, its
/// plaintext in an anonymous memory file (Linux `memfd`) that never reaches a disk and is gone
/// when this is dropped. The memory cost is one instance per view; a sealed file is never
/// decrypted into a file on disk.
#[derive(Debug)]
pub struct PlainView {
    path: PathBuf,
    _memory: Option<fs::File>,
}

impl PlainView {
    /// The path to read the plaintext from (valid while this view lives).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl AtRest {
    /// The plaintext of `path` as a readable path: see [`PlainView`].
    pub fn plain_view(&self, path: &Path) -> Result<PlainView, SealError> {
        if AtRest::key_id_of(path)?.is_none() {
            return Ok(PlainView {
                path: path.to_owned(),
                _memory: None,
            });
        }
        let io = |source| SealError::Io {
            path: path.to_owned(),
            source,
        };
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let fd = rustix::fs::memfd_create("pacs-broker-plain", rustix::fs::MemfdFlags::CLOEXEC)
                .map_err(|e| io(e.into()))?;
            let mut memory = fs::File::from(fd);
            let mut r = self.open(path)?;
            io::copy(&mut r, &mut memory).map_err(|e| SealError::from_io(path, e))?;
            let view = PathBuf::from(format!("/proc/self/fd/{}", memory.as_raw_fd()));
            Ok(PlainView {
                path: view,
                _memory: Some(memory),
            })
        }
        #[cfg(not(target_os = "linux"))]
        {
            Err(io(io::ErrorKind::Unsupported.into()))
        }
    }
}

/// A writer that hashes (SHA-256) and counts the plaintext passing through it to `inner` (a
/// [`Sealing`] writer, say): content addressing stays on the plaintext while it is sealed.
pub struct Hashing<W: Write> {
    inner: W,
    hash: Sha256,
    bytes: u64,
}

impl<W: Write> Hashing<W> {
    pub fn new(inner: W) -> Hashing<W> {
        Hashing {
            inner,
            hash: Sha256::new(),
            bytes: 0,
        }
    }

    /// The inner writer, the SHA-256 and the length of what was written.
    pub fn finish(self) -> (W, [u8; 32], u64) {
        (self.inner, self.hash.finalize().into(), self.bytes)
    }
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(data)?;
        self.hash.update(&data[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Hashes what passes through it.
struct HashingWriter<'a, W: Write> {
    inner: &'a mut W,
    hash: Sha256,
}

impl<W: Write> Write for HashingWriter<'_, W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(data)?;
        self.hash.update(&data[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> SiteKeys {
        SiteKeys::generate()
    }

    fn seal(keys: &SiteKeys, data: &[u8]) -> Vec<u8> {
        let mut w = AtRest::new(keys, true).writer(Vec::new()).unwrap();
        w.write_all(data).unwrap();
        w.finish().unwrap().0
    }

    fn open(keys: &SiteKeys, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        let p = Path::new("blob");
        let mut r = AtRest::new(keys, true).reader(sealed, p)?;
        let mut out = Vec::new();
        r.read_to_end(&mut out)
            .map_err(|e| SealError::from_io(p, e))?;
        Ok(out)
    }

    #[test]
    fn round_trips_at_every_size_around_segment_boundaries() {
        let k = keys();
        for n in [
            0,
            1,
            SEGMENT - 1,
            SEGMENT,
            SEGMENT + 1,
            3 * SEGMENT,
            3 * SEGMENT + 7,
        ] {
            let data: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
            let s = seal(&k, &data);
            assert!(s.starts_with(MAGIC));
            assert!(!s.windows(16).any(|w| data.len() >= 16 && w == &data[..16]));
            assert_eq!(open(&k, &s).unwrap(), data, "size {n}");
            // Sealed in place into a buffer: the same layout, read the same.
            let mut into = b"before".to_vec();
            AtRest::new(&k, true).seal_into(&data, &mut into).unwrap();
            assert_eq!(into.len() - 6, s.len(), "size {n}");
            assert_eq!(open(&k, &into[6..]).unwrap(), data, "size {n}");
            let mut plain = Vec::new();
            AtRest::new(&k, false).seal_into(&data, &mut plain).unwrap();
            assert_eq!(plain, data);
        }
    }

    #[test]
    fn truncation_reordering_flips_and_wrong_keys_are_caught() {
        let k = keys();
        let data = vec![0x5a; 3 * SEGMENT + 100];
        let s = seal(&k, &data);
        let head = s.len() - (3 * (SEGMENT + TAG) + 100 + TAG);
        let seg = SEGMENT + TAG;
        // Truncated at a segment boundary: the last-segment flag is missing.
        let cut = &s[..head + 2 * seg];
        assert!(matches!(open(&k, cut), Err(SealError::Damaged { .. })));
        // Two segments swapped.
        let mut swapped = s[..head].to_vec();
        swapped.extend_from_slice(&s[head + seg..head + 2 * seg]);
        swapped.extend_from_slice(&s[head..head + seg]);
        swapped.extend_from_slice(&s[head + 2 * seg..]);
        assert!(matches!(
            open(&k, &swapped),
            Err(SealError::Damaged { segment: 0, .. })
        ));
        // One bit flipped in the last segment.
        let mut flipped = s.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(
            open(&k, &flipped),
            Err(SealError::Damaged { segment: 3, .. })
        ));
        // The header's segment size changed.
        let mut hdr = s.clone();
        hdr[head - 1] ^= 1;
        assert!(open(&k, &hdr).is_err());
        // Another key file.
        let e = open(&keys(), &s).unwrap_err();
        assert!(e.to_string().contains("does not hold"), "{e}");
        // Plain input is passed through.
        assert_eq!(open(&k, b"DICM plain").unwrap(), b"DICM plain");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Any damage to a sealed file (a flipped bit anywhere, a cut anywhere) is an error,
        /// never a panic and never wrong bytes; the undamaged file reads back exactly.
        #[test]
        fn damage_anywhere_is_caught(
            len in 0usize..(3 * SEGMENT),
            at in 0usize..usize::MAX,
            bit in 0u8..8,
            cut in 0usize..usize::MAX,
        ) {
            let k = SiteKeys::from_bytes([3; 32], [4; 32]);
            let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
            let s = seal(&k, &data);
            proptest::prop_assert_eq!(open(&k, &s).unwrap(), data);
            let mut flipped = s.clone();
            let i = at % flipped.len();
            flipped[i] ^= 1 << bit;
            proptest::prop_assert!(open(&k, &flipped).is_err());
            let cut = cut % s.len();
            proptest::prop_assert!(open(&k, &s[..cut]).is_err() || cut <= 1);
        }
    }

    #[test]
    fn reseal_moves_a_file_to_the_current_key_and_keeps_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        keys().write_new(&path).unwrap();
        let k = SiteKeys::load(&path).unwrap();
        let at_rest = AtRest::new(&k, true);
        let f = dir.path().join("blob");
        at_rest.write_atomic(&f, b"instance bytes").unwrap();
        let old = AtRest::key_id_of(&f).unwrap().unwrap();
        assert!(!at_rest.reseal(&f).unwrap(), "already current");
        let new = k.rotate(&[]).unwrap();
        assert!(at_rest.reseal(&f).unwrap());
        assert_eq!(AtRest::key_id_of(&f).unwrap().unwrap(), new);
        assert_ne!(old, new);
        assert_eq!(at_rest.read(&f).unwrap(), b"instance bytes");
        // A plain file is sealed too.
        let p = dir.path().join("plain");
        fs::write(&p, b"old plain").unwrap();
        assert!(at_rest.reseal(&p).unwrap());
        assert_eq!(at_rest.read(&p).unwrap(), b"old plain");
        let (sha, n) = at_rest.hash(&p).unwrap();
        assert_eq!((sha, n), (Sha256::digest(b"old plain").into(), 9));
        // A sealed file read through a path: its plaintext, in memory only.
        let view = at_rest.plain_view(&p).unwrap();
        assert_ne!(view.path(), p.as_path());
        assert_eq!(fs::read(view.path()).unwrap(), b"old plain");
    }
}
