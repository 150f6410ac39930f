//! Rate-summarised auditing of events an outsider can repeat at will (refused connections,
//! offers, associations), so that a flood cannot fill the log.
//!
//! Owns: [`Summary`]. Within each window, the first [`AUDITED_PER_WINDOW`] events of one kind
//! under one key (a peer site; or one shared key for peers that are not identified, whatever
//! their address) are written one by one; the rest are counted and written as one summary entry
//! when the window ends (at the next [`Summary::flush`]) or when the owner stops
//! (`flush(true)`). A thousand refusals a second cost a few entries a minute.
//!
//! Does not own: what counts as a refusal or how its entry reads (the federation receiver's
//! `federation::refusals`, the DICOM listener), or bounding the fields (the log does that).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::events::actor;
use super::{AuditLog, Event};

/// Events of one kind under one key written one by one per window.
pub const AUDITED_PER_WINDOW: u32 = 5;
/// Most distinct actors counted in one window's summary.
const MAX_ACTORS_COUNTED: usize = 4096;

struct Window {
    started: Instant,
    written: u32,
    suppressed: u64,
    /// The last event counted (its action, agreement and outcome reason go into the summary).
    last: Event,
    last_reason: String,
    /// The actors of the counted events (one for a site; many for unidentified peers).
    actors: HashSet<String>,
}

/// Writes events of one kind under one key one by one up to a limit per window, and a summary
/// of the rest.
pub struct Summary {
    audit: Arc<AuditLog>,
    window: Duration,
    windows: Mutex<HashMap<(String, &'static str), Window>>,
}

impl Summary {
    /// `window` is at least one second.
    pub fn new(audit: Arc<AuditLog>, window: Duration) -> Summary {
        Summary {
            audit,
            window: window.max(Duration::from_secs(1)),
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// Writes `event` if fewer than [`AUDITED_PER_WINDOW`] events of (`key`, `kind`) were
    /// written in this window; otherwise counts it (with `reason`, which the summary repeats).
    /// Returns whether it was written.
    pub fn record(&self, key: &str, kind: &'static str, event: Event, reason: &str) -> bool {
        {
            let mut map = self.windows.lock().unwrap_or_else(|p| p.into_inner());
            let w = map
                .entry((key.to_string(), kind))
                .or_insert_with(|| Window {
                    started: Instant::now(),
                    written: 0,
                    suppressed: 0,
                    last: Event::default(),
                    last_reason: String::new(),
                    actors: HashSet::new(),
                });
            if w.written >= AUDITED_PER_WINDOW {
                w.suppressed += 1;
                w.last_reason = reason.to_string();
                if w.actors.len() < MAX_ACTORS_COUNTED {
                    w.actors.insert(event.actor.clone());
                }
                w.last = event;
                return false;
            }
            w.written += 1;
        }
        self.audit.record_or_warn(event);
        true
    }

    /// Writes the summary of every window that has ended (all of them when `all`) and forgets
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
            // unidentified peers: the node writes it and says how many.
            let (who, from) = match w.actors.len() {
                1 => (w.actors.into_iter().next().expect("one"), String::new()),
                n if n >= MAX_ACTORS_COUNTED => {
                    (actor::NODE.to_string(), format!(" from {n} or more peers"))
                }
                n => (actor::NODE.to_string(), format!(" from {n} peers")),
            };
            tracing::warn!(peer = %key, count = w.suppressed, window_secs = secs, "{kind}: further refusals summarised");
            self.audit.record_or_warn(Event {
                actor: who,
                action: w.last.action,
                object: format!(
                    "{} further refusals{from} in {secs} s (summary)",
                    w.suppressed
                ),
                agreement: w.last.agreement,
                purpose: String::new(),
                outcome: format!("{kind}: last reason: {}", w.last_reason),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected(actor: &str) -> Event {
        Event {
            actor: actor.into(),
            action: "associate".into(),
            object: "association to BROKER".into(),
            outcome: "rejected: calling AE title not recognized".into(),
            ..Event::default()
        }
    }

    #[test]
    fn a_flood_of_one_kind_costs_a_few_entries_and_a_summary() {
        let dir = tempfile::tempdir().unwrap();
        let audit = Arc::new(AuditLog::open(&dir.path().join("audit.log")).unwrap());
        let s = Summary::new(audit.clone(), Duration::from_secs(60));
        let mut written = 0;
        for i in 0..300 {
            let who = format!("dicom:X{}@10.0.0.{}", i % 3, i % 3);
            written +=
                s.record("dicom", "rejected", rejected(&who), "not on the allow-list") as u32;
        }
        // Another kind has its own window.
        assert!(s.record("dicom", "other", rejected("dicom:Y@10.0.0.9"), "x"));
        assert_eq!(written, AUDITED_PER_WINDOW);
        s.flush(false);
        assert_eq!(
            crate::audit::read_entries(audit.path()).unwrap().len() as u32,
            AUDITED_PER_WINDOW + 1,
            "a window that has not ended is not summarised yet"
        );
        s.flush(true);
        let entries = crate::audit::read_entries(audit.path()).unwrap();
        let summary = entries.last().unwrap();
        assert_eq!(summary.event.actor, "node");
        assert_eq!(summary.event.action, "associate");
        assert!(
            summary
                .event
                .object
                .starts_with("295 further refusals from 3 peers in "),
            "{summary:?}"
        );
        assert_eq!(
            summary.event.outcome,
            "rejected: last reason: not on the allow-list"
        );
    }
}
