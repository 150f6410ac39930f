//! The tamper-evident audit log: who did what to which pseudonymous object, when, under which
//! agreement and purpose — and proof, held outside this machine, that the record was not rewritten.
//!
//! Owns:
//! - the log (`audit.log`, JSON lines): every entry carries its sequence number, the hash of the
//!   previous entry and its own hash (SHA-256 over its canonical JSON), so that any edit, deletion
//!   or reordering is found by [`verify`]. Each append is fsynced before it returns, and appends
//!   take an exclusive file lock and read the chain head from the file itself, so several processes
//!   of one site (a `serve` and a `send`) extend one unbroken chain;
//! - bounding and escaping every field, whatever the caller passes ([`text`]), and the rate
//!   summary that keeps a flood of refusals to a few entries a minute ([`summary`]);
//! - the catalogue of event kinds and actor forms, and the constructors of shared events
//!   ([`events`]; described in `docs/audit.md`);
//! - signed checkpoints of the chain head every N entries or minutes and when the log is closed,
//!   the partners' checkpoints this site holds, and the start-up check that refuses a log shorter
//!   than its last checkpoint or missing while the data directory is in use ([`checkpoint`],
//!   [`partner`], [`verify_site`]);
//! - reading it back: the disclosure report ([`report`]), exports for a SIEM ([`export`]: JSON
//!   lines, RFC 5424 syslog, DICOM audit messages), live forwarding over syslog/TLS with the log
//!   itself as the durable backlog ([`syslog`]), and alerts ([`alert`]).
//!
//! Entries name tokens, pseudonymous UIDs, sites and agreements — never PHI.
//!
//! Does not own: deciding what is audited (the node, federation, DICOM edge and commands call
//! [`AuditLog::record`]) or the wire exchange of checkpoints (federation carries the bytes).

pub mod alert;
pub mod checkpoint;
pub mod config;
pub mod events;
pub mod export;
pub mod partner;
pub mod report;
pub mod summary;
pub mod syslog;
pub mod text;

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use checkpoint::{Checkpoint, CheckpointSigner};
pub use config::AuditConfig;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("audit log {path} line {line}: {reason}")]
    Broken {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("audit log {path} ends at entry {entries}, but {source_name} holds a checkpoint of entry {seq} signed {time}: entries {first_missing}..={seq} were removed (or the log emptied or replaced)\n  help: restore the log from backup; the node does not start on a shortened log")]
    Truncated {
        path: PathBuf,
        entries: u64,
        seq: u64,
        first_missing: u64,
        time: String,
        source_name: String,
    },
    #[error("audit log {path} is missing, but {evidence}\n  help: restore the log from backup; the node does not start a new empty log over a data directory in use")]
    Missing { path: PathBuf, evidence: String },
    #[error("checkpoint file {path} line {line}: {reason}")]
    Checkpoint {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("audit configuration: {0}")]
    Config(String),
}

/// What happened, to what, for whom. All fields are free of PHI by construction: callers pass
/// site ids, agreement ids, purposes and pseudonymous tokens. Every field is bounded and escaped
/// when it is written ([`text::bound`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Who acted: `site:<id>` for a peer identified by its certificate, `remote:<address>` for a
    /// network peer not identified (yet), `user:<name>` (or `uid:<n>`) for a local operator,
    /// `dicom:<calling AE>@<address>` for a local DICOM device, `node` for the node
    /// ([`events::actor`]).
    pub actor: String,
    /// One of [`events::kind`]: `disclose`, `receive`, `refuse`, `reidentify`...
    pub action: String,
    /// The object: study token, instance count, transfer id.
    pub object: String,
    pub agreement: String,
    pub purpose: String,
    /// `ok` or a short refusal reason.
    pub outcome: String,
}

/// Structured facts an entry may carry beyond the [`Event`], for reports and exports. Tokens only.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Detail {
    /// Patient tokens of the object (per agreement; resolvable only at the origin, via the vault).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patient_tokens: Vec<String>,
    /// Pseudonymous study token (the de-identified Study Instance UID).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub study: Option<String>,
    /// The other site of an exchange.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub party: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<u64>,
    /// The receiver's signed receipt (hex of its protobuf encoding), as verified by the sender.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt: Option<String>,
}

impl Detail {
    pub fn is_empty(&self) -> bool {
        *self == Detail::default()
    }

    fn bounded(self) -> Detail {
        let b = |o: Option<String>| o.map(|s| text::bound(&s));
        Detail {
            patient_tokens: text::bound_tokens(&self.patient_tokens),
            study: b(self.study),
            party: b(self.party),
            flow: b(self.flow),
            instances: self.instances,
            // A receipt is hex of a bounded protobuf; a larger one is not a receipt we verified.
            receipt: self.receipt.map(|r| text::bound_to(&r, MAX_RECEIPT_HEX)),
        }
    }
}

const MAX_RECEIPT_HEX: usize = 4096;

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub seq: u64,
    /// RFC 3339 UTC.
    pub time: String,
    #[serde(flatten)]
    pub event: Event,
    #[serde(default, skip_serializing_if = "Detail::is_empty")]
    pub detail: Detail,
    pub prev: String,
    pub hash: String,
}

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The hash of an entry: SHA-256 over its canonical JSON (keys sorted), without the hash itself.
/// An entry without detail hashes as entries did before details existed.
pub fn entry_hash(e: &Entry) -> String {
    let mut body = serde_json::json!({
        "seq": e.seq, "time": e.time, "actor": e.event.actor, "action": e.event.action,
        "object": e.event.object, "agreement": e.event.agreement, "purpose": e.event.purpose,
        "outcome": e.event.outcome, "prev": e.prev,
    });
    if !e.detail.is_empty() {
        body["detail"] = serde_json::to_value(&e.detail).expect("detail serialises");
    }
    hex::encode(Sha256::digest(body.to_string().as_bytes()))
}

/// Now, RFC 3339 UTC.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// The site material an audit log signs with and the data directory it protects.
pub struct SiteAudit<'a> {
    pub site: &'a str,
    pub key_pkcs8: &'a [u8],
    pub cert_der: &'a [u8],
    pub data_dir: &'a Path,
    pub config: &'a AuditConfig,
}

struct Cadence {
    every: u64,
    interval: Duration,
    /// The latest checkpoint this process knows of (its own, or the file's at open).
    last: Option<Checkpoint>,
    last_at: Instant,
}

/// An open audit log. Appends are serialised by a mutex within the process and by an exclusive
/// file lock across processes, and fsynced.
pub struct AuditLog {
    path: PathBuf,
    file: Mutex<File>,
    signer: Option<Arc<CheckpointSigner>>,
    cadence: Mutex<Cadence>,
    alerts: Option<alert::Alerts>,
    forwarder: Option<syslog::Forwarder>,
}

/// The (sequence, hash) of the last entry, read from the end of the file.
fn head_of(file: &mut File) -> std::io::Result<(u64, String)> {
    use std::io::{Read, Seek, SeekFrom};
    let len = file.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok((0, GENESIS.to_string()));
    }
    let mut back = 4096u64;
    loop {
        let start = len.saturating_sub(back);
        file.seek(SeekFrom::Start(start))?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)?;
        let trimmed = buf.strip_suffix(b"\n").unwrap_or(&buf);
        if let Some(i) = trimmed.iter().rposition(|&b| b == b'\n') {
            return parse_head(&trimmed[i + 1..]);
        }
        if start == 0 {
            return parse_head(trimmed);
        }
        back *= 4;
    }
}

fn parse_head(line: &[u8]) -> std::io::Result<(u64, String)> {
    let e: Entry = serde_json::from_slice(line).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("last audit entry unreadable: {e}"),
        )
    })?;
    Ok((e.seq, e.hash))
}

/// What in a data directory shows it is in use (so a missing log is not a fresh start).
const IN_USE_MARKERS: &[&str] = &["store", "vault", "outbox", "inbox"];

impl AuditLog {
    /// Opens (or creates) the log and verifies the existing chain before appending to it.
    /// Without a site key no checkpoints are made (tools and tests); a node uses [`AuditLog::open_site`].
    pub fn open(path: &Path) -> Result<AuditLog, AuditError> {
        match verify(path) {
            Ok(_) => {}
            Err(AuditError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            }
            Err(e) => return Err(e),
        }
        Self::open_file(path, None, &AuditConfig::default(), None)
    }

    /// Opens a site's log: checks it against the site's signed checkpoints (a log shorter than
    /// its last checkpoint, rewritten under it, or missing while the data directory is in use is
    /// an error naming what is missing), then signs checkpoints as entries are written, raises
    /// alerts and forwards to syslog as configured.
    pub fn open_site(path: &Path, site: &SiteAudit<'_>) -> Result<AuditLog, AuditError> {
        let signer = CheckpointSigner::new(site.site, site.key_pkcs8, site.cert_der);
        if signer.is_none() {
            tracing::warn!(
                "site key is not an ECDSA P-256 PKCS#8 key: audit checkpoints are not signed"
            );
        }
        let own = checkpoint::own_file(path);
        let cps = checked_checkpoints(&own, site.site, site.cert_der)?;
        let last = cps.iter().max_by_key(|c| c.seq).cloned();
        if !path.exists() {
            if let Some(c) = cps.iter().max_by_key(|c| c.seq) {
                return Err(AuditError::Missing {
                    path: path.to_owned(),
                    evidence: format!(
                        "{} holds a checkpoint of entry {} signed {}",
                        own.display(),
                        c.seq,
                        c.time
                    ),
                });
            }
            let used: Vec<&str> = IN_USE_MARKERS
                .iter()
                .copied()
                .filter(|m| site.data_dir.join(m).exists())
                .collect();
            if !used.is_empty() {
                return Err(AuditError::Missing {
                    path: path.to_owned(),
                    evidence: format!(
                        "the data directory {} is in use (it holds {})",
                        site.data_dir.display(),
                        used.join(", ")
                    ),
                });
            }
        } else {
            verify_against(path, &[(own.display().to_string(), cps)])?;
        }
        let mut log = Self::open_file(path, signer.map(Arc::new), site.config, last)?;
        log.alerts =
            Some(alert::Alerts::new(site.config.alerts.clone()).map_err(|e| {
                AuditError::Config(format!("[audit.alerts] reidentify_hours: {e}"))
            })?);
        if let Some(s) = &site.config.syslog {
            log.forwarder = Some(
                syslog::Forwarder::start(path, site.site, s, site.key_pkcs8, site.cert_der)
                    .map_err(AuditError::Config)?,
            );
        }
        Ok(log)
    }

    fn open_file(
        path: &Path,
        signer: Option<Arc<CheckpointSigner>>,
        config: &AuditConfig,
        last: Option<Checkpoint>,
    ) -> Result<AuditLog, AuditError> {
        let io = |source| AuditError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(io)?;
        }
        let mut opts = OpenOptions::new();
        opts.create(true).read(true).append(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let file = opts.open(path).map_err(io)?;
        Ok(AuditLog {
            path: path.to_owned(),
            file: Mutex::new(file),
            signer,
            cadence: Mutex::new(Cadence {
                every: config.checkpoint_every.max(1),
                interval: Duration::from_secs(config.checkpoint_interval_secs.max(1)),
                last,
                last_at: Instant::now(),
            }),
            alerts: None,
            forwarder: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The site's certificate (DER) when the log signs checkpoints.
    pub fn signer(&self) -> Option<&CheckpointSigner> {
        self.signer.as_deref()
    }

    /// The alert rules (to set volume limits from the agreements in force).
    pub fn alerts(&self) -> Option<&alert::Alerts> {
        self.alerts.as_ref()
    }

    /// What live syslog forwarding has done so far; `None` without `[audit.syslog]`.
    pub fn forwarding(&self) -> Option<syslog::ForwarderStats> {
        self.forwarder.as_ref().map(|f| f.stats())
    }

    /// Appends an event and makes it durable.
    pub fn record(&self, event: Event) -> Result<Entry, AuditError> {
        self.record_detailed(event, Detail::default())
    }

    /// Appends an event with structured detail and makes it durable; raises the alerts it causes.
    pub fn record_detailed(&self, event: Event, detail: Detail) -> Result<Entry, AuditError> {
        let entry = self.append(bounded(event), detail.bounded())?;
        if let Some(alerts) = &self.alerts {
            for a in alerts.observe(&entry, time::OffsetDateTime::now_utc()) {
                tracing::warn!(alert = a.kind, subject = %a.subject, "{}", a.message);
                let alert = Event {
                    actor: "node".into(),
                    action: "alert".into(),
                    object: format!("{} {}", a.kind, a.subject),
                    agreement: entry.event.agreement.clone(),
                    purpose: String::new(),
                    outcome: a.message,
                };
                let _ = self.append(bounded(alert), Detail::default());
            }
        }
        Ok(entry)
    }

    fn append(&self, event: Event, detail: Detail) -> Result<Entry, AuditError> {
        let io = |source| AuditError::Io {
            path: self.path.clone(),
            source,
        };
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        file.lock().map_err(io)?;
        let result = self.append_locked(&mut file, event, detail);
        let result = result.and_then(|e| {
            self.checkpoint_if_due(&e)?;
            Ok(e)
        });
        let _ = file.unlock();
        drop(file);
        if let Some(f) = &self.forwarder {
            f.notify();
        }
        result
    }

    fn append_locked(
        &self,
        file: &mut File,
        event: Event,
        detail: Detail,
    ) -> Result<Entry, AuditError> {
        let io = |source| AuditError::Io {
            path: self.path.clone(),
            source,
        };
        let (seq, prev) = head_of(file).map_err(io)?;
        let mut e = Entry {
            seq: seq + 1,
            time: now_rfc3339(),
            event,
            detail,
            prev,
            hash: String::new(),
        };
        e.hash = entry_hash(&e);
        let mut line = serde_json::to_string(&e).expect("entry serialises");
        line.push('\n');
        file.write_all(line.as_bytes()).map_err(io)?;
        file.sync_data().map_err(io)?;
        Ok(e)
    }

    /// Under the file lock: a checkpoint every N entries or after the interval.
    fn checkpoint_if_due(&self, e: &Entry) -> Result<(), AuditError> {
        let Some(signer) = &self.signer else {
            return Ok(());
        };
        let mut c = self.cadence.lock().unwrap_or_else(|p| p.into_inner());
        if e.seq.is_multiple_of(c.every) || c.last_at.elapsed() >= c.interval {
            let cp = signer.sign(e.seq, &e.hash);
            checkpoint::append(&checkpoint::own_file(&self.path), &cp)?;
            c.last = Some(cp);
            c.last_at = Instant::now();
        }
        Ok(())
    }

    /// Signs a checkpoint of the current head (unless the last one already covers it) and
    /// returns the latest checkpoint; `None` without a site key or with an empty log.
    pub fn checkpoint_now(&self) -> Result<Option<Checkpoint>, AuditError> {
        let Some(signer) = &self.signer else {
            return Ok(None);
        };
        let io = |source| AuditError::Io {
            path: self.path.clone(),
            source,
        };
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        file.lock().map_err(io)?;
        let head = head_of(&mut file).map_err(io);
        let result = head.and_then(|(seq, hash)| {
            if seq == 0 {
                return Ok(None);
            }
            let mut c = self.cadence.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(l) = c.last.as_ref().filter(|l| l.seq == seq && l.hash == hash) {
                return Ok(Some(l.clone()));
            }
            // Another process of the site may have signed this head already: a second
            // checkpoint of the same entry is harmless.
            let cp = signer.sign(seq, &hash);
            checkpoint::append(&checkpoint::own_file(&self.path), &cp)?;
            c.last = Some(cp.clone());
            c.last_at = Instant::now();
            Ok(Some(cp))
        });
        let _ = file.unlock();
        result
    }

    /// Records an event; a failure to audit is logged loudly (the caller has already acted).
    pub fn record_or_warn(&self, event: Event) {
        if let Err(e) = self.record(event) {
            tracing::error!(error = %e, "could not write the audit log");
        }
    }

    /// Records an event with detail; a failure to audit is logged loudly.
    pub fn record_detailed_or_warn(&self, event: Event, detail: Detail) {
        if let Err(e) = self.record_detailed(event, detail) {
            tracing::error!(error = %e, "could not write the audit log");
        }
    }
}

impl Drop for AuditLog {
    /// A checkpoint at shutdown, so the last entries are signed too.
    fn drop(&mut self) {
        if let Err(e) = self.checkpoint_now() {
            tracing::error!(error = %e, "could not sign the closing audit checkpoint");
        }
        if let Some(f) = self.forwarder.take() {
            f.stop();
        }
    }
}

fn bounded(e: Event) -> Event {
    Event {
        actor: text::bound(&e.actor),
        action: text::bound(&e.action),
        object: text::bound(&e.object),
        agreement: text::bound(&e.agreement),
        purpose: text::bound(&e.purpose),
        outcome: text::bound(&e.outcome),
    }
}

/// The checkpoints of a file, each checked to be `site`'s and signed by its certificate.
pub fn checked_checkpoints(
    path: &Path,
    site: &str,
    cert_der: &[u8],
) -> Result<Vec<Checkpoint>, AuditError> {
    let cps = checkpoint::load(path)?;
    for (i, c) in cps.iter().enumerate() {
        let bad = |reason: String| AuditError::Checkpoint {
            path: path.to_owned(),
            line: i + 1,
            reason,
        };
        if c.site != site {
            return Err(bad(format!(
                "checkpoint of site `{}`, not of this site `{site}`",
                text::bound(&c.site)
            )));
        }
        c.verify(cert_der).map_err(|why| {
            bad(format!(
                "checkpoint of entry {} is not genuine: {why}",
                c.seq
            ))
        })?;
    }
    Ok(cps)
}

/// Result of a successful verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub entries: u64,
    pub last_hash: String,
}

/// Reads the whole log and checks sequence numbers, the hash chain and every entry's own hash.
pub fn verify(path: &Path) -> Result<Verified, AuditError> {
    verify_against(path, &[])
}

/// [`verify`], and every checkpoint of `sources` (name, checkpoints already checked as genuine)
/// must match the log: the entry it names must exist with the hash it signed.
pub fn verify_against(
    path: &Path,
    sources: &[(String, Vec<Checkpoint>)],
) -> Result<Verified, AuditError> {
    let f = File::open(path).map_err(|source| AuditError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mut pinned: BTreeMap<u64, Vec<(&str, &Checkpoint)>> = BTreeMap::new();
    for (name, cps) in sources {
        for c in cps {
            pinned.entry(c.seq).or_default().push((name, c));
        }
    }
    let mut prev = GENESIS.to_string();
    let mut n = 0u64;
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let broken = |reason: String| AuditError::Broken {
            path: path.to_owned(),
            line: i + 1,
            reason,
        };
        let line = line.map_err(|e| broken(e.to_string()))?;
        let e: Entry =
            serde_json::from_str(&line).map_err(|e| broken(format!("not an entry: {e}")))?;
        if e.seq != n + 1 {
            return Err(broken(format!(
                "sequence {} follows {n} (entry missing or reordered)",
                e.seq
            )));
        }
        if e.prev != prev {
            return Err(broken(format!(
                "entry {}: previous-hash link broken (entry removed, inserted or reordered)",
                e.seq
            )));
        }
        if entry_hash(&e) != e.hash {
            return Err(broken(format!(
                "entry {}: hash does not match its content (entry edited)",
                e.seq
            )));
        }
        for (name, c) in pinned.get(&e.seq).into_iter().flatten() {
            if c.hash != e.hash {
                return Err(broken(format!(
                    "entry {} differs from the checkpoint signed {} held in {name}: the log was rewritten from entry {} on or before",
                    e.seq, c.time, e.seq
                )));
            }
        }
        prev = e.hash;
        n += 1;
    }
    if let Some((seq, list)) = pinned.range(n + 1..).next_back() {
        let (name, c) = list[0];
        return Err(AuditError::Truncated {
            path: path.to_owned(),
            entries: n,
            seq: *seq,
            first_missing: n + 1,
            time: c.time.clone(),
            source_name: name.to_string(),
        });
    }
    Ok(Verified {
        entries: n,
        last_hash: prev,
    })
}

/// What [`verify_site`] checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteVerified {
    pub verified: Verified,
    /// (source, checkpoints, highest entry covered) for the own file and each partner's.
    pub sources: Vec<(String, usize, u64)>,
    /// Entries after the last checkpoint (not yet signed anywhere).
    pub unsigned_tail: u64,
}

/// Verifies a site's log against its own signed checkpoints and against the checkpoints of this
/// site that partners hold (`partner_files`: files as `audit checkpoints --of <this site>`
/// prints them at the partner). Every checkpoint must be genuine (signed by `cert_der`).
pub fn verify_site(
    path: &Path,
    site: &str,
    cert_der: &[u8],
    partner_files: &[PathBuf],
) -> Result<SiteVerified, AuditError> {
    let own = checkpoint::own_file(path);
    let mut sources = vec![(
        own.display().to_string(),
        checked_checkpoints(&own, site, cert_der)?,
    )];
    for p in partner_files {
        if !p.exists() {
            return Err(AuditError::Io {
                path: p.clone(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            });
        }
        sources.push((
            format!("partner file {}", p.display()),
            checked_checkpoints(p, site, cert_der)?,
        ));
    }
    if !path.exists() {
        if let Some((name, c)) = sources
            .iter()
            .flat_map(|(n, cs)| cs.iter().map(move |c| (n, c)))
            .max_by_key(|(_, c)| c.seq)
        {
            return Err(AuditError::Missing {
                path: path.to_owned(),
                evidence: format!(
                    "{name} holds a checkpoint of entry {} signed {}",
                    c.seq, c.time
                ),
            });
        }
    }
    let verified = verify_against(path, &sources)?;
    let covered = sources
        .iter()
        .flat_map(|(_, cs)| cs.iter().map(|c| c.seq))
        .max()
        .unwrap_or(0);
    Ok(SiteVerified {
        unsigned_tail: verified.entries.saturating_sub(covered),
        sources: sources
            .iter()
            .map(|(n, cs)| {
                (
                    n.clone(),
                    cs.len(),
                    cs.iter().map(|c| c.seq).max().unwrap_or(0),
                )
            })
            .collect(),
        verified,
    })
}

/// Every entry of a log, in order (unverified: run [`verify`] first where it matters).
pub fn read_entries(path: &Path) -> Result<Vec<Entry>, AuditError> {
    let f = File::open(path).map_err(|source| AuditError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let broken = |reason: String| AuditError::Broken {
            path: path.to_owned(),
            line: i + 1,
            reason,
        };
        let line = line.map_err(|e| broken(e.to_string()))?;
        out.push(serde_json::from_str(&line).map_err(|e| broken(format!("not an entry: {e}")))?);
    }
    Ok(out)
}

/// The actor for a local operator: `user:<login name>` (or `uid:<n>`).
pub fn local_user() -> String {
    match std::env::var("USER").or_else(|_| std::env::var("LOGNAME")) {
        Ok(u) if !u.is_empty() => format!("user:{u}"),
        _ => {
            use std::os::unix::fs::MetadataExt;
            let uid = fs::metadata("/proc/self")
                .map(|m| m.uid())
                .unwrap_or(u32::MAX);
            format!("uid:{uid}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(action: &str) -> Event {
        Event {
            actor: "site:x".into(),
            action: action.into(),
            object: "study 2.25.1".into(),
            agreement: "a".into(),
            purpose: "treatment".into(),
            outcome: "ok".into(),
        }
    }

    #[test]
    fn chain_verifies_and_detects_edits_deletions_reordering() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.log");
        {
            let log = AuditLog::open(&p).unwrap();
            for a in ["one", "two", "three"] {
                log.record(ev(a)).unwrap();
            }
        }
        let log = AuditLog::open(&p).unwrap();
        log.record(ev("four")).unwrap();
        // A second writer (as a second process would) extends the same chain.
        let other = AuditLog::open(&p).unwrap();
        other.record(ev("five")).unwrap();
        log.record(ev("six")).unwrap();
        assert_eq!(verify(&p).unwrap().entries, 6);
        let text = fs::read_to_string(&p).unwrap();
        let keep: Vec<&str> = text.lines().take(4).collect();
        fs::write(&p, keep.join("\n") + "\n").unwrap();
        assert_eq!(verify(&p).unwrap().entries, 4);
        let text = fs::read_to_string(&p).unwrap();
        let lines: Vec<&str> = text.lines().collect();

        let edited = text.replace("\"three\"", "\"3hree\"");
        fs::write(&p, &edited).unwrap();
        assert!(matches!(
            verify(&p),
            Err(AuditError::Broken { line: 3, .. })
        ));

        let deleted = [lines[0], lines[2], lines[3]].join("\n") + "\n";
        fs::write(&p, deleted).unwrap();
        assert!(matches!(
            verify(&p),
            Err(AuditError::Broken { line: 2, .. })
        ));

        let reordered = [lines[1], lines[0], lines[2], lines[3]].join("\n") + "\n";
        fs::write(&p, reordered).unwrap();
        assert!(matches!(
            verify(&p),
            Err(AuditError::Broken { line: 1, .. })
        ));
    }

    #[test]
    fn fields_are_bounded_and_escaped_whatever_the_caller_passes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.log");
        let log = AuditLog::open(&p).unwrap();
        let huge = "X".repeat(4 << 20);
        let e = log
            .record_detailed(
                Event {
                    actor: "site:evil\nforged line".into(),
                    agreement: huge.clone(),
                    ..ev("refuse")
                },
                Detail {
                    patient_tokens: vec![huge.clone()],
                    study: Some(huge),
                    ..Detail::default()
                },
            )
            .unwrap();
        assert_eq!(e.event.actor, "site:evil\\nforged line");
        assert!(e.event.agreement.ends_with("…[truncated, 4194304 bytes]"));
        let len = fs::metadata(&p).unwrap().len();
        assert!(len < 2048, "entry of {len} bytes");
        assert_eq!(fs::read_to_string(&p).unwrap().lines().count(), 1);
        assert_eq!(verify(&p).unwrap().entries, 1);
    }

    #[test]
    fn entries_without_detail_hash_as_before() {
        // Logs written before details existed still verify.
        let e = Entry {
            seq: 1,
            time: "2026-01-01T00:00:00Z".into(),
            event: ev("one"),
            detail: Detail::default(),
            prev: GENESIS.into(),
            hash: String::new(),
        };
        let legacy = serde_json::json!({
            "seq": 1, "time": e.time, "actor": "site:x", "action": "one",
            "object": "study 2.25.1", "agreement": "a", "purpose": "treatment",
            "outcome": "ok", "prev": GENESIS,
        });
        assert_eq!(
            entry_hash(&e),
            hex::encode(Sha256::digest(legacy.to_string().as_bytes()))
        );
    }
}
