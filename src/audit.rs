//! The tamper-evident audit log.
//!
//! Owns: an append-only JSON-lines file in which every entry carries its sequence number, the hash
//! of the previous entry and its own hash (SHA-256 over its canonical JSON), so that any edit,
//! deletion or reordering is found by [`verify`]. Each append is fsynced before it returns.
//! Entries name tokens, pseudonymous UIDs, sites and agreements — never PHI.
//!
//! Does not own: deciding what is audited (the node and federation call [`AuditLog::record`]).

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

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
}

/// What happened, to what, for whom. All fields are free of PHI by construction: callers pass
/// site ids, agreement ids, purposes and pseudonymous tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Who acted: `site:<id>` for a peer, `user:<name>` for a local operator, `node` for the node.
    pub actor: String,
    /// e.g. `disclose`, `receive`, `refuse`, `reidentify`.
    pub action: String,
    /// The object: study token, instance count, transfer id.
    pub object: String,
    pub agreement: String,
    pub purpose: String,
    /// `ok` or a short refusal reason.
    pub outcome: String,
}

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub seq: u64,
    /// RFC 3339 UTC.
    pub time: String,
    #[serde(flatten)]
    pub event: Event,
    pub prev: String,
    pub hash: String,
}

const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn entry_hash(e: &Entry) -> String {
    let body = serde_json::json!({
        "seq": e.seq, "time": e.time, "actor": e.event.actor, "action": e.event.action,
        "object": e.event.object, "agreement": e.event.agreement, "purpose": e.event.purpose,
        "outcome": e.event.outcome, "prev": e.prev,
    });
    hex::encode(Sha256::digest(body.to_string().as_bytes()))
}

/// An open audit log. Appends are serialised by a mutex and fsynced.
pub struct AuditLog {
    path: PathBuf,
    state: Mutex<(File, u64, String)>,
}

impl AuditLog {
    /// Opens (or creates) the log and verifies the existing chain before appending to it.
    pub fn open(path: &Path) -> Result<AuditLog, AuditError> {
        let io = |source| AuditError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir).map_err(io)?;
        }
        let (seq, last) = match verify(path) {
            Ok(v) => (v.entries, v.last_hash),
            Err(AuditError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                (0, GENESIS.to_string())
            }
            Err(e) => return Err(e),
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        Ok(AuditLog {
            path: path.to_owned(),
            state: Mutex::new((file, seq, last)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends an event and makes it durable.
    pub fn record(&self, event: Event) -> Result<Entry, AuditError> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let time = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let mut e = Entry {
            seq: st.1 + 1,
            time,
            event,
            prev: st.2.clone(),
            hash: String::new(),
        };
        e.hash = entry_hash(&e);
        let mut line = serde_json::to_string(&e).expect("entry serialises");
        line.push('\n');
        let io = |source| AuditError::Io {
            path: self.path.clone(),
            source,
        };
        st.0.write_all(line.as_bytes()).map_err(io)?;
        st.0.sync_data().map_err(io)?;
        st.1 = e.seq;
        st.2 = e.hash.clone();
        Ok(e)
    }

    /// Records an event; a failure to audit is logged loudly (the caller has already acted).
    pub fn record_or_warn(&self, event: Event) {
        if let Err(e) = self.record(event) {
            tracing::error!(error = %e, "could not write the audit log");
        }
    }
}

/// Result of a successful verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub entries: u64,
    pub last_hash: String,
}

/// Reads the whole log and checks sequence numbers, the hash chain and every entry's own hash.
pub fn verify(path: &Path) -> Result<Verified, AuditError> {
    let f = File::open(path).map_err(|source| AuditError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mut prev = GENESIS.to_string();
    let mut n = 0u64;
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let broken = |reason: String| AuditError::Broken {
            path: path.to_owned(),
            line: i + 1,
            reason,
        };
        let line = line.map_err(|e| broken(e.to_string()))?;
        let e: Entry = serde_json::from_str(&line).map_err(|e| broken(format!("not an entry: {e}")))?;
        if e.seq != n + 1 {
            return Err(broken(format!("sequence {} follows {n} (entry missing or reordered)", e.seq)));
        }
        if e.prev != prev {
            return Err(broken("previous-hash link broken (entry removed, inserted or reordered)".into()));
        }
        if entry_hash(&e) != e.hash {
            return Err(broken("entry hash does not match its content (entry edited)".into()));
        }
        prev = e.hash;
        n += 1;
    }
    Ok(Verified {
        entries: n,
        last_hash: prev,
    })
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
        assert_eq!(verify(&p).unwrap().entries, 4);
        let text = fs::read_to_string(&p).unwrap();
        let lines: Vec<&str> = text.lines().collect();

        let edited = text.replace("\"three\"", "\"3hree\"");
        fs::write(&p, &edited).unwrap();
        assert!(matches!(verify(&p), Err(AuditError::Broken { line: 3, .. })));

        let deleted = [lines[0], lines[2], lines[3]].join("\n") + "\n";
        fs::write(&p, deleted).unwrap();
        assert!(matches!(verify(&p), Err(AuditError::Broken { line: 2, .. })));

        let reordered = [lines[1], lines[0], lines[2], lines[3]].join("\n") + "\n";
        fs::write(&p, reordered).unwrap();
        assert!(matches!(verify(&p), Err(AuditError::Broken { line: 1, .. })));
    }
}
