//! Live forwarding of the audit log to the hospital's syslog collector over TLS (RFC 5425:
//! RFC 5424 messages, octet-counting framing), with nothing lost while the collector is down.
//!
//! Owns: the [`Forwarder`] thread. The durable backlog is the audit log itself — already fsynced
//! before a record returns — plus a cursor file (`audit.syslog-cursor`, the last sequence number
//! handed to a live connection, written atomically). The forwarder sends every entry after the
//! cursor, in order; when the collector is unreachable it retries with backoff and resumes from
//! the cursor, so entries written meanwhile (or by another process of the site, e.g. a `send`
//! beside the `serve`) are sent in order when it returns. One process forwards at a time
//! (`audit.syslog-lock`, an exclusive file lock). Before every batch the connection is checked
//! for a close by the collector, so a collector that stopped is noticed before anything is
//! written into a dead socket. Syslog over TLS has no application acknowledgement: a collector
//! that dies between reading and storing a message can still lose it; the sequence numbers and
//! hashes in every message let the SIEM see any gap.
//!
//! Cost to the node (issue 13: auditing must not slow sending or ingest): the forwarder works
//! per batch, never per entry or per instance. After a batch it lingers [`LINGER`] so that a
//! burst of entries goes out as one write; it keeps the cursor in memory while it holds the lock
//! and saves it (two fsyncs) at most every [`CURSOR_SAVE_EVERY`] and when it stops, so that it
//! adds no fsync to the node's busy moments; and while idle it looks at the log's length once a
//! second (one `statx`) to pick up entries other processes of the site wrote. A node that
//! crashes re-sends at most the entries of the last [`CURSOR_SAVE_EVERY`] after restart: the
//! same sequence numbers and hashes, which a SIEM recognises as duplicates — delivery is at
//! least once, never a gap.
//!
//! Does not own: the message format ([`super::export::syslog_message`]).

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};

use super::config::SyslogConfig;
use super::export::syslog_message;
use super::Entry;

type Tls = StreamOwned<ClientConnection, TcpStream>;

/// Longest wait between attempts to reach a collector that is down (a connection attempt is
/// cheap; a SIEM that comes back should not wait long for the backlog).
const RETRY_MAX: Duration = Duration::from_secs(5);

/// How long the forwarder waits after a batch before the next one, so that a burst of entries
/// (a reload writing one per agreement, a flood summary) costs one write, not one per entry.
pub const LINGER: Duration = Duration::from_millis(100);

/// How often, at most, the cursor is saved (atomically, fsynced) while forwarding; it is saved
/// again when the forwarder stops.
pub const CURSOR_SAVE_EVERY: Duration = Duration::from_secs(5);

/// How often an idle forwarder looks for entries written by other processes of the site.
const IDLE_POLL: Duration = Duration::from_secs(1);

/// What a forwarder has done so far (for tests and the benchmark's evidence).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForwarderStats {
    /// Entries handed to a live connection.
    pub entries: u64,
    /// Writes of one or more entries to the connection.
    pub batches: u64,
    /// Saves of the cursor file.
    pub cursor_saves: u64,
    /// Connections made to the collector.
    pub connections: u64,
}

struct Shared {
    dirty: Mutex<bool>,
    wake: Condvar,
    stop: AtomicBool,
    stats: Mutex<ForwarderStats>,
}

/// A running forwarder; stopped (after a last attempt to send) on [`Forwarder::stop`].
pub struct Forwarder {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Forwarder {
    /// Starts forwarding `log` to the collector of `cfg`. Fails on a configuration that cannot
    /// work (CA file unreadable, bad server name); an unreachable collector is not an error.
    pub fn start(
        log: &Path,
        site: &str,
        cfg: &SyslogConfig,
        key_pkcs8: &[u8],
        cert_der: &[u8],
    ) -> Result<Forwarder, String> {
        let tls = client_config(cfg, key_pkcs8, cert_der)?;
        let name = ServerName::try_from(cfg.server_name()).map_err(|_| {
            format!(
                "[audit.syslog] server name `{}` is not valid",
                cfg.server_name()
            )
        })?;
        let shared = Arc::new(Shared {
            dirty: Mutex::new(true),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            stats: Mutex::new(ForwarderStats::default()),
        });
        let mut worker = Worker {
            log: log.to_owned(),
            cursor: sibling(log, "syslog-cursor"),
            lock: sibling(log, "syslog-lock"),
            lock_file: None,
            address: cfg.address.clone(),
            name: name.to_owned(),
            tls: Arc::new(tls),
            host: site.to_string(),
            app_name: cfg.app_name.clone(),
            conn: None,
            offset: 0,
            next_seq: 0,
            sent: None,
            saved: 0,
            saved_at: Instant::now(),
            failures: 0,
            shared: shared.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("audit-syslog".into())
            .spawn(move || worker.run())
            .map_err(|e| format!("cannot start the syslog forwarder: {e}"))?;
        Ok(Forwarder {
            shared,
            thread: Some(thread),
        })
    }

    /// New entries are in the log.
    pub fn notify(&self) {
        *self.shared.dirty.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.shared.wake.notify_one();
    }

    /// What it has done so far.
    pub fn stats(&self) -> ForwarderStats {
        *self.shared.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends what it can now, saves its cursor, then stops.
    pub fn stop(mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.notify();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn sibling(log: &Path, ext: &str) -> PathBuf {
    let stem = log
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "audit".into());
    log.with_file_name(format!("{stem}.{ext}"))
}

fn client_config(
    cfg: &SyslogConfig,
    key_pkcs8: &[u8],
    cert_der: &[u8],
) -> Result<ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    let certs = crate::federation::pki::load_certs(&cfg.ca)
        .map_err(|e| format!("[audit.syslog] ca: {e}"))?;
    for c in certs {
        roots
            .add(c)
            .map_err(|e| format!("[audit.syslog] ca {}: {e}", cfg.ca.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
    // The site certificate is offered to collectors that ask for a client certificate.
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8.to_vec()));
    let chain = vec![rustls::pki_types::CertificateDer::from(cert_der.to_vec())];
    match builder.clone().with_client_auth_cert(chain, key) {
        Ok(c) => Ok(c),
        Err(_) => Ok(builder.with_no_client_auth()),
    }
}

struct Worker {
    log: PathBuf,
    cursor: PathBuf,
    lock: PathBuf,
    lock_file: Option<File>,
    address: String,
    name: ServerName<'static>,
    tls: Arc<ClientConfig>,
    host: String,
    app_name: String,
    conn: Option<Tls>,
    /// Byte offset in the log of the entry `next_seq`.
    offset: u64,
    next_seq: u64,
    /// The last sequence number handed to a live connection, once the lock is held (read from
    /// the cursor file when it is taken; in memory after that, as no other process forwards).
    sent: Option<u64>,
    /// The sequence number in the cursor file, and when it was written.
    saved: u64,
    saved_at: Instant,
    failures: u32,
    shared: Arc<Shared>,
}

impl Worker {
    fn run(&mut self) {
        loop {
            let stopping = self.shared.stop.load(Ordering::SeqCst);
            let (wait, sent) = self.pass();
            if stopping {
                self.save_cursor();
                return;
            }
            if sent {
                self.linger();
            }
            let mut dirty = self.shared.dirty.lock().unwrap_or_else(|p| p.into_inner());
            if !*dirty {
                dirty = self
                    .shared
                    .wake
                    .wait_timeout(dirty, wait)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
            *dirty = false;
        }
    }

    /// Waits [`LINGER`] (cut short by a stop) so that entries written meanwhile share a batch.
    fn linger(&self) {
        let until = Instant::now() + LINGER;
        let mut dirty = self.shared.dirty.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let now = Instant::now();
            if now >= until || self.shared.stop.load(Ordering::SeqCst) {
                return;
            }
            dirty = self
                .shared
                .wake
                .wait_timeout(dirty, until - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// One round: send everything after the cursor. Returns how long to wait before the next
    /// and whether anything was sent.
    fn pass(&mut self) -> (Duration, bool) {
        if !self.hold_lock() {
            return (Duration::from_secs(2), false);
        }
        let cursor = *self.sent.get_or_insert_with(|| read_cursor(&self.cursor));
        if self.caught_up(cursor) {
            self.save_cursor_if_due();
            return (IDLE_POLL, false);
        }
        let (entries, end) = match self.read_after(cursor) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "syslog forwarder cannot read the audit log");
                return (Duration::from_secs(5), false);
            }
        };
        if entries.is_empty() {
            self.save_cursor_if_due();
            return (IDLE_POLL, false);
        }
        match self.send(&entries) {
            Ok(()) => {
                let last = entries.last().map(|e| e.seq).unwrap_or(cursor);
                self.offset = end;
                self.next_seq = last + 1;
                self.sent = Some(last);
                self.count(|s| {
                    s.entries += entries.len() as u64;
                    s.batches += 1;
                });
                self.save_cursor_if_due();
                self.failures = 0;
                (IDLE_POLL, true)
            }
            Err(e) => {
                self.conn = None;
                self.failures += 1;
                let backoff = Duration::from_millis(250u64 << self.failures.min(5)).min(RETRY_MAX);
                if self.failures == 1 || self.failures.is_multiple_of(20) {
                    tracing::warn!(collector = %self.address, error = %e, backlog = entries.len(), "audit syslog collector unreachable; entries wait in the log");
                }
                (backoff, false)
            }
        }
    }

    /// Whether everything in the log up to its current end was sent: one `statx`, so that an
    /// idle forwarder costs nothing but that once a second.
    fn caught_up(&self, cursor: u64) -> bool {
        self.next_seq == cursor + 1 && fs::metadata(&self.log).is_ok_and(|m| m.len() == self.offset)
    }

    fn count(&self, f: impl FnOnce(&mut ForwarderStats)) {
        f(&mut self.shared.stats.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn save_cursor_if_due(&mut self) {
        if self.saved_at.elapsed() >= CURSOR_SAVE_EVERY {
            self.save_cursor();
        }
    }

    /// Writes the cursor file (atomically) when it is behind what was sent.
    fn save_cursor(&mut self) {
        let Some(sent) = self.sent.filter(|s| *s != self.saved) else {
            return;
        };
        match crate::store::write_atomic(&self.cursor, sent.to_string().as_bytes()) {
            Ok(()) => {
                self.saved = sent;
                self.saved_at = Instant::now();
                self.count(|s| s.cursor_saves += 1);
            }
            Err(e) => tracing::error!(error = %e, "syslog forwarder cannot save its cursor"),
        }
    }

    fn hold_lock(&mut self) -> bool {
        if self.lock_file.is_some() {
            return true;
        }
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&self.lock);
        match f {
            Ok(f) if f.try_lock().is_ok() => {
                self.lock_file = Some(f);
                // Another process may have forwarded (and saved its cursor) before.
                self.sent = None;
                self.saved = read_cursor(&self.cursor);
                self.saved_at = Instant::now();
                true
            }
            _ => false,
        }
    }

    /// Entries with a sequence number above `cursor`, in order (at most 1,000 per pass), and
    /// the byte offset after the last of them. `self.offset` / `self.next_seq` keep pointing at
    /// the first entry not yet sent, so a failed send re-reads from there.
    fn read_after(&mut self, cursor: u64) -> std::io::Result<(Vec<Entry>, u64)> {
        let mut f = File::open(&self.log)?;
        let len = f.metadata()?.len();
        if self.next_seq != cursor + 1 || self.offset > len {
            self.offset = 0;
            self.next_seq = 1;
        }
        f.seek(SeekFrom::Start(self.offset))?;
        let mut r = BufReader::new(f);
        let mut out = Vec::new();
        let mut line = String::new();
        let mut at = self.offset;
        loop {
            line.clear();
            let n = r.read_line(&mut line)?;
            if n == 0 || !line.ends_with('\n') {
                break; // end, or an entry still being written
            }
            let e: Entry = serde_json::from_str(&line)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            at += n as u64;
            if e.seq <= cursor {
                // Skipping what was sent before (first pass after start).
                self.offset = at;
                self.next_seq = e.seq + 1;
                continue;
            }
            out.push(e);
            if out.len() >= 1000 {
                break;
            }
        }
        Ok((out, at))
    }

    fn send(&mut self, entries: &[Entry]) -> Result<(), String> {
        if self.conn.as_mut().is_some_and(peer_closed) {
            self.conn = None;
        }
        if self.conn.is_none() {
            self.conn = Some(self.connect()?);
        }
        let conn = self.conn.as_mut().expect("connected");
        let mut buf = Vec::new();
        for e in entries {
            let msg = syslog_message(e, &self.host, &self.app_name);
            buf.extend_from_slice(format!("{} ", msg.len()).as_bytes());
            buf.extend_from_slice(msg.as_bytes());
        }
        let result = conn.write_all(&buf).and_then(|_| conn.flush());
        result.map_err(|e| e.to_string())
    }

    fn connect(&self) -> Result<Tls, String> {
        let addr = self
            .address
            .to_socket_addrs()
            .map_err(|e| e.to_string())?
            .next()
            .ok_or_else(|| format!("{} resolves to no address", self.address))?;
        let sock =
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
        let _ = sock.set_nodelay(true);
        sock.set_write_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let conn = ClientConnection::new(self.tls.clone(), self.name.clone())
            .map_err(|e| e.to_string())?;
        let mut tls = StreamOwned::new(conn, sock);
        while tls.conn.is_handshaking() {
            tls.conn
                .complete_io(&mut tls.sock)
                .map_err(|e| format!("TLS handshake with the collector: {e}"))?;
        }
        self.count(|s| s.connections += 1);
        tracing::info!(collector = %self.address, "audit syslog forwarding connected");
        Ok(tls)
    }
}

/// Whether the collector closed the connection (a collector never sends us data).
fn peer_closed(tls: &mut Tls) -> bool {
    if tls.sock.set_nonblocking(true).is_err() {
        return true;
    }
    let mut buf = [0u8; 256];
    let r = tls.read(&mut buf);
    let _ = tls.sock.set_nonblocking(false);
    match r {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

fn read_cursor(path: &Path) -> u64 {
    fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}
