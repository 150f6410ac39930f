//! Audit of what the receiver refuses, bounded per peer.
//!
//! Owns: [`Refusals`]. Within each window (`[limits] refusal_summary_secs`), the first few
//! refusals of one kind from one peer site are audited (and logged at WARN) one by one; the rest
//! are counted and written as one summary entry when the window ends. A peer that sends a
//! thousand bad offers a second therefore costs a few audit entries a minute, not a thousand a
//! second. Every field it writes is already bounded (peer strings pass through
//! [`super::wire::shown`] before they get here).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::audit::{AuditLog, Event};

/// Refusals of one kind from one peer audited one by one per window.
pub const AUDITED_PER_WINDOW: u32 = 5;
/// Longest reason written into one entry.
const MAX_REASON: usize = 300;

struct Window {
    started: Instant,
    written: u32,
    suppressed: u64,
    last_reason: String,
    agreement: String,
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

    /// Audits (and logs) a refusal, or counts it for the window's summary.
    pub fn record(&self, r: Refusal<'_>) {
        let reason = bounded(r.reason);
        let write = {
            let mut map = self.windows.lock().unwrap_or_else(|p| p.into_inner());
            let w = map
                .entry((r.site.to_string(), r.kind))
                .or_insert_with(|| Window {
                    started: Instant::now(),
                    written: 0,
                    suppressed: 0,
                    last_reason: String::new(),
                    agreement: String::new(),
                });
            if w.written < AUDITED_PER_WINDOW {
                w.written += 1;
                true
            } else {
                w.suppressed += 1;
                w.last_reason = reason.clone();
                w.agreement = r.agreement.to_string();
                false
            }
        };
        if write {
            tracing::warn!(peer = %r.site, agreement = %r.agreement, reason = %reason, "{}", r.kind);
            self.audit.record_or_warn(Event {
                actor: format!("site:{}", r.site),
                action: "refuse".into(),
                object: bounded(r.object),
                agreement: r.agreement.to_string(),
                purpose: r.purpose.to_string(),
                outcome: format!("{}: {reason}", r.kind),
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
        for ((site, kind), w) in ended {
            if w.suppressed == 0 {
                continue;
            }
            let secs = w.started.elapsed().as_secs();
            tracing::warn!(peer = %site, count = w.suppressed, window_secs = secs, "{kind}: further refusals summarised");
            self.audit.record_or_warn(Event {
                actor: format!("site:{site}"),
                action: "refuse".into(),
                object: format!("{} further refusals in {secs} s (summary)", w.suppressed),
                agreement: w.agreement,
                purpose: String::new(),
                outcome: format!("{kind}: last reason: {}", w.last_reason),
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
}
