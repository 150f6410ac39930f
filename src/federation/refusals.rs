//! Audit of what the receiver refuses, bounded per peer.
//!
//! Owns: [`Refusals`]. Within each window (`[limits] refusal_summary_secs`), the first few
//! refusals of one kind from one peer site are audited (and logged at WARN) one by one; the rest
//! are counted and written as one summary entry when the window ends. A peer that sends a
//! thousand bad offers a second therefore costs a few audit entries a minute, not a thousand a
//! second. Every field it writes is already bounded (peer strings pass through
//! [`super::wire::shown`] before they get here).
//!
//! Connections refused before the peer is identified (a failed TLS handshake, a certificate of
//! another CA or a revoked one, over the total connection limit) have no site to count by: they
//! share one window per kind, whatever their address, so a flood from many addresses costs as
//! little as one from a single address ([`Refusals::record_connection`]).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::tls::ConnectionEvent;
use crate::audit::events::{self, actor};
use crate::audit::{AuditLog, Event};

/// Refusals of one kind from one peer audited one by one per window.
pub const AUDITED_PER_WINDOW: u32 = 5;
/// Longest reason written into one entry.
const MAX_REASON: usize = 300;

/// Most distinct actors counted in one window's summary.
const MAX_ACTORS_COUNTED: usize = 4096;
/// The window key of refusals whose peer is not identified.
const UNIDENTIFIED: &str = "(unidentified peers)";

struct Window {
    started: Instant,
    written: u32,
    suppressed: u64,
    last_reason: String,
    agreement: String,
    /// The actors of the suppressed refusals (one for a site; addresses for unidentified peers).
    actors: HashSet<String>,
}

/// One refusal to audit.
pub struct Refusal<'a> {
    /// The peer's site id, from its verified certificate.
    pub site: &'a str,
    /// Short kind (`offer refused`, `transfer rejected`, `idle connection closed`...).
    pub kind: &'static str,
    /// Bounded: a checked agreement id or [`super::wire::shown`].
    pub agreement: &'a str,
    pub purpose: &'a str,
    pub object: &'a str,
    pub reason: &'a str,
}

/// The receiver's bounded refusal audit.
pub struct Refusals {
    audit: Arc<AuditLog>,
    window: Duration,
    windows: Mutex<HashMap<(String, &'static str), Window>>,
}

fn bounded(s: &str) -> String {
    if s.len() <= MAX_REASON {
        return s.to_string();
    }
    let mut end = MAX_REASON;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

impl Refusals {
    pub fn new(audit: Arc<AuditLog>, window: Duration) -> Refusals {
        Refusals {
            audit,
            window: window.max(Duration::from_secs(1)),
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// Audits (and logs) a refusal of a peer site, or counts it for the window's summary.
    pub fn record(&self, r: Refusal<'_>) {
        self.record_as(actor::site(r.site), r.site.to_string(), r);
    }

    /// Audits a connection event of the endpoint: as the peer site's when its certificate was
    /// verified, otherwise as its address's, in the one window of unidentified peers.
    pub fn record_connection(&self, e: &ConnectionEvent) {
        let mut object = match e.remote {
            Some(a) => format!("connection from {a}"),
            None => "connection".to_string(),
        };
        if let Some(c) = &e.certificate {
            object.push_str(&format!("; {c}"));
        }
        let r = Refusal {
            site: &e.site,
            kind: e.kind,
            agreement: "",
            purpose: "",
            object: &object,
            reason: &e.detail,
        };
        if !e.site.is_empty() {
            return self.record(r);
        }
        let who = e
            .remote
            .map(|a| actor::remote(a.ip()))
            .unwrap_or_else(|| actor::NODE.to_string());
        self.record_as(who, UNIDENTIFIED.to_string(), r);
    }

    /// Audits (and logs) a refusal by `actor`, counted in the window of (`key`, kind).
    fn record_as(&self, actor: String, key: String, r: Refusal<'_>) {
        let reason = bounded(r.reason);
        let write = {
            let mut map = self.windows.lock().unwrap_or_else(|p| p.into_inner());
            let w = map.entry((key, r.kind)).or_insert_with(|| Window {
                started: Instant::now(),
                written: 0,
                suppressed: 0,
                last_reason: String::new(),
                agreement: String::new(),
                actors: HashSet::new(),
            });
            if w.written < AUDITED_PER_WINDOW {
                w.written += 1;
                true
            } else {
                w.suppressed += 1;
                w.last_reason = reason.clone();
                w.agreement = r.agreement.to_string();
                if w.actors.len() < MAX_ACTORS_COUNTED {
                    w.actors.insert(actor.clone());
                }
                false
            }
        };
        if write {
            tracing::warn!(peer = %actor, agreement = %r.agreement, reason = %reason, "{}", r.kind);
            self.audit.record_or_warn(Event {
                purpose: r.purpose.to_string(),
                agreement: r.agreement.to_string(),
                ..events::refusal(actor, bounded(r.object), r.kind, &reason)
            });
        }
    }

    /// Writes the summary of every window that has ended (all of them when `all`), and forgets
    /// those windows.
    pub fn flush(&self, all: bool) {
        let ended: Vec<((String, &'static str), Window)> = {
            let mut map = self.windows.lock().unwrap_or_else(|p| p.into_inner());
            let keys: Vec<_> = map
                .iter()
                .filter(|(_, w)| all || w.started.elapsed() >= self.window)
                .map(|(k, _)| k.clone())
                .collect();
            keys.into_iter()
                .filter_map(|k| map.remove(&k).map(|w| (k, w)))
                .collect()
        };
        for ((key, kind), w) in ended {
            if w.suppressed == 0 {
                continue;
            }
            let secs = w.started.elapsed().as_secs();
            // One actor (a site, or a single address): the summary is its own. Several
            // unidentified addresses: the node writes it and says how many.
            let (who, from) = match w.actors.len() {
                1 => (w.actors.into_iter().next().expect("one"), String::new()),
                n if n >= MAX_ACTORS_COUNTED => (
                    actor::NODE.to_string(),
                    format!(" from {n} or more addresses"),
                ),
                n => (actor::NODE.to_string(), format!(" from {n} addresses")),
            };
            tracing::warn!(peer = %key, count = w.suppressed, window_secs = secs, "{kind}: further refusals summarised");
            self.audit.record_or_warn(Event {
                agreement: w.agreement,
                ..events::refusal(
                    who,
                    format!(
                        "{} further refusals{from} in {secs} s (summary)",
                        w.suppressed
                    ),
                    kind,
                    &format!("last reason: {}", w.last_reason),
                )
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_summarised() {
        let dir = tempfile::tempdir().unwrap();
        let audit = Arc::new(AuditLog::open(&dir.path().join("audit.log")).unwrap());
        let r = Refusals::new(audit.clone(), Duration::from_secs(60));
        for _ in 0..1000 {
            r.record(Refusal {
                site: "hospital-b",
                kind: "offer refused",
                agreement: "x",
                purpose: "",
                object: "study 2.25.1",
                reason: "not a party",
            });
        }
        r.flush(true);
        let v = crate::audit::verify(audit.path()).unwrap();
        assert_eq!(v.entries as u32, AUDITED_PER_WINDOW + 1);
        let text = std::fs::read_to_string(audit.path()).unwrap();
        assert!(text.contains("995 further refusals"), "{text}");
    }

    #[test]
    fn unidentified_peers_share_one_window_whatever_their_address() {
        let dir = tempfile::tempdir().unwrap();
        let audit = Arc::new(AuditLog::open(&dir.path().join("audit.log")).unwrap());
        let r = Refusals::new(audit.clone(), Duration::from_secs(60));
        for i in 0..500u32 {
            r.record_connection(&ConnectionEvent {
                site: String::new(),
                remote: Some(std::net::SocketAddr::from((
                    [10, 0, (i / 250) as u8, (i % 250) as u8],
                    4000,
                ))),
                certificate: Some("certificate subject `CN=x` serial 01, names site `x`".into()),
                kind: "TLS handshake refused",
                detail: "invalid peer certificate: UnknownIssuer".into(),
            });
        }
        r.flush(true);
        let entries = crate::audit::read_entries(audit.path()).unwrap();
        assert_eq!(entries.len() as u32, AUDITED_PER_WINDOW + 1);
        assert_eq!(entries[0].event.actor, "remote:10.0.0.0");
        assert_eq!(entries[0].event.action, "refuse");
        assert_eq!(
            entries[0].event.object,
            "connection from 10.0.0.0:4000; certificate subject `CN=x` serial 01, names site `x`"
        );
        assert_eq!(
            entries[0].event.outcome,
            "TLS handshake refused: invalid peer certificate: UnknownIssuer"
        );
        let summary = &entries[AUDITED_PER_WINDOW as usize].event;
        assert_eq!(summary.actor, "node");
        assert!(
            summary
                .object
                .starts_with("495 further refusals from 495 addresses in "),
            "{summary:?}"
        );
    }
}
