//! Audit of what the receiver refuses, bounded per peer.
//!
//! Owns: [`Refusals`]: what a receiver's refusal entry says (actor, kind, bounded reason) and
//! which window it counts in. Within each window (`[limits] refusal_summary_secs`), the first
//! few refusals of one kind from one peer site are audited (and logged at WARN) one by one; the
//! rest are counted and written as one summary entry when the window ends
//! ([`crate::audit::summary`]). A peer that sends a thousand bad offers a second therefore costs
//! a few audit entries a minute, not a thousand a second. Every field it writes is already
//! bounded (peer strings pass through [`super::wire::shown`] before they get here).
//!
//! Connections refused before the peer is identified (a failed TLS handshake, a certificate of
//! another CA or a revoked one, over the total connection limit) have no site to count by: they
//! share one window per kind, whatever their address, so a flood from many addresses costs as
//! little as one from a single address ([`Refusals::record_connection`]).

use std::sync::Arc;
use std::time::Duration;

use super::tls::ConnectionEvent;
use crate::audit::events::{self, actor};
use crate::audit::summary::Summary;
use crate::audit::{AuditLog, Event};

/// Refusals of one kind from one peer audited one by one per window.
pub const AUDITED_PER_WINDOW: u32 = crate::audit::summary::AUDITED_PER_WINDOW;
/// Longest reason written into one entry.
const MAX_REASON: usize = 300;
/// The window key of refusals whose peer is not identified.
const UNIDENTIFIED: &str = "(unidentified peers)";

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
    summary: Summary,
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
            summary: Summary::new(audit, window),
        }
    }

    /// Audits (and logs) a refusal of a peer site, or counts it for the window's summary.
    pub fn record(&self, r: Refusal<'_>) {
        self.record_as(actor::site(r.site), r.site, r);
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
        self.record_as(who, UNIDENTIFIED, r);
    }

    /// Audits (and logs) a refusal by `actor`, counted in the window of (`key`, kind).
    fn record_as(&self, actor: String, key: &str, r: Refusal<'_>) {
        let reason = bounded(r.reason);
        let event = Event {
            purpose: r.purpose.to_string(),
            agreement: r.agreement.to_string(),
            ..events::refusal(actor, bounded(r.object), r.kind, &reason)
        };
        let peer = event.actor.clone();
        if self.summary.record(key, r.kind, event, &reason) {
            tracing::warn!(peer = %peer, agreement = %r.agreement, reason = %reason, "{}", r.kind);
        }
    }

    /// Writes the summary of every window that has ended (all of them when `all`), and forgets
    /// those windows.
    pub fn flush(&self, all: bool) {
        self.summary.flush(all);
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
                .starts_with("495 further refusals from 495 peers in "),
            "{summary:?}"
        );
    }
}
