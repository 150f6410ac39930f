//! Alerts raised from the audit stream: a burst of refusals from one peer, a day's volume over a
//! flow's `studies_per_day`, a re-identification outside the configured hours.
//!
//! Owns: the rules (pure, with the clock as a parameter) and their state. The log
//! ([`super::AuditLog`]) feeds every entry it writes through [`Alerts::observe`] and writes each
//! alert as an entry of its own (action `alert`), logged at WARN and forwarded to syslog with
//! severity "alert".
//!
//! Does not own: the limits themselves (the agreements, set by the node with
//! [`Alerts::set_volume_limits`]) or who gets paged (the SIEM).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use time::OffsetDateTime;

use super::config::AlertConfig;
use super::Entry;

/// One alert: what kind, about whom, and a sentence without PHI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alert {
    /// `refusal-burst`, `volume-over-limit`, `reidentify-outside-hours`.
    pub kind: &'static str,
    pub subject: String,
    pub message: String,
}

/// Hours of a day (UTC) as minutes since midnight, `start..end`; wraps past midnight when
/// `start > end` (e.g. `22:00-06:00`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hours {
    start: u16,
    end: u16,
}

impl Hours {
    /// Parses `"HH:MM-HH:MM"`.
    pub fn parse(s: &str) -> Result<Hours, String> {
        let bad = || format!("`{s}` is not hours like `07:00-19:00`");
        let (a, b) = s.trim().split_once('-').ok_or_else(bad)?;
        let minutes = |t: &str| -> Result<u16, String> {
            let (h, m) = t.trim().split_once(':').ok_or_else(bad)?;
            let (h, m): (u16, u16) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
            if h > 24 || m > 59 || (h == 24 && m != 0) {
                return Err(bad());
            }
            Ok(h * 60 + m)
        };
        Ok(Hours {
            start: minutes(a)?,
            end: minutes(b)?,
        })
    }

    /// Whether `t` (UTC) falls inside these hours.
    pub fn contains(&self, t: OffsetDateTime) -> bool {
        let t = t.to_offset(time::UtcOffset::UTC);
        let m = t.hour() as u16 * 60 + t.minute() as u16;
        if self.start <= self.end {
            (self.start..self.end).contains(&m)
        } else {
            m >= self.start || m < self.end
        }
    }
}

/// Whether a re-identification at `t` is outside the configured hours (never, when unset).
pub fn reidentify_outside_hours(hours: Option<&Hours>, t: OffsetDateTime) -> bool {
    hours.is_some_and(|h| !h.contains(t))
}

/// The alert rules and their running state.
pub struct Alerts {
    config: AlertConfig,
    hours: Option<Hours>,
    /// Peer -> times (unix seconds) of recent refusals, and when it last raised an alert.
    refusals: Mutex<HashMap<String, (VecDeque<i64>, i64)>>,
    /// (agreement, flow) -> studies_per_day.
    limits: Mutex<HashMap<(String, String), u32>>,
    /// (agreement, flow, day) -> studies so far.
    volume: Mutex<HashMap<(String, String, time::Date), u32>>,
}

impl Alerts {
    pub fn new(config: AlertConfig) -> Result<Alerts, String> {
        let hours = config
            .reidentify_hours
            .as_deref()
            .map(Hours::parse)
            .transpose()?;
        Ok(Alerts {
            config,
            hours,
            refusals: Mutex::default(),
            limits: Mutex::default(),
            volume: Mutex::default(),
        })
    }

    /// Replaces the volume limits: (agreement, flow) -> studies per day.
    pub fn set_volume_limits(&self, limits: HashMap<(String, String), u32>) {
        *self.limits.lock().unwrap_or_else(|p| p.into_inner()) = limits;
    }

    /// The alerts an entry raises, at time `now`.
    pub fn observe(&self, e: &Entry, now: OffsetDateTime) -> Vec<Alert> {
        let mut out = Vec::new();
        match e.event.action.as_str() {
            "refuse" => out.extend(self.refusal(e, now)),
            "disclose" | "receive" if e.event.outcome.starts_with("ok") => {
                out.extend(self.volume(e, now))
            }
            "reidentify" if reidentify_outside_hours(self.hours.as_ref(), now) => out.push(Alert {
                kind: "reidentify-outside-hours",
                subject: e.event.actor.clone(),
                message: format!(
                    "re-identification by {} at {:02}:{:02} UTC, outside the configured hours {}",
                    e.event.actor,
                    now.hour(),
                    now.minute(),
                    self.config.reidentify_hours.as_deref().unwrap_or("")
                ),
            }),
            _ => {}
        }
        out
    }

    fn refusal(&self, e: &Entry, now: OffsetDateTime) -> Option<Alert> {
        /// Peers tracked before quiet ones are forgotten.
        const MAX_TRACKED_PEERS: usize = 1024;
        // A peer site, or a network address refused before it was identified.
        let actor = e.event.actor.as_str();
        let peer = actor
            .strip_prefix("site:")
            .map(|s| format!("site {s}"))
            .or_else(|| {
                actor
                    .strip_prefix("remote:")
                    .map(|a| format!("address {a}"))
            })?;
        let t = now.unix_timestamp();
        let window = self.config.refusal_window_secs as i64;
        let mut map = self.refusals.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > MAX_TRACKED_PEERS {
            // Addresses come and go: forget those quiet for a window.
            map.retain(|_, (times, _)| times.back().is_some_and(|&x| x > t - window));
        }
        let (times, last_alert) = map
            .entry(actor.to_string())
            .or_insert((VecDeque::new(), i64::MIN));
        times.push_back(t);
        while times.front().is_some_and(|&x| x <= t - window) {
            times.pop_front();
        }
        let burst = self.config.refusal_burst.max(1) as usize;
        if times.len() >= burst && *last_alert <= t - window {
            *last_alert = t;
            return Some(Alert {
                kind: "refusal-burst",
                subject: actor.to_string(),
                message: format!(
                    "{} refusals of {peer} within {window} s (threshold {burst})",
                    times.len()
                ),
            });
        }
        None
    }

    fn volume(&self, e: &Entry, now: OffsetDateTime) -> Option<Alert> {
        let flow = e.detail.flow.clone()?;
        let key = (e.event.agreement.clone(), flow);
        let limit = *self
            .limits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)?;
        let day = now.date();
        let mut vol = self.volume.lock().unwrap_or_else(|p| p.into_inner());
        vol.retain(|(_, _, d), _| *d == day);
        let n = vol.entry((key.0.clone(), key.1.clone(), day)).or_insert(0);
        *n += 1;
        (*n == limit + 1).then(|| Alert {
            kind: "volume-over-limit",
            subject: format!("{}/{}", key.0, key.1),
            message: format!(
                "{} studies today under agreement {} flow {}, over its studies_per_day of {limit}",
                *n, key.0, key.1
            ),
        })
    }
}

/// Puts the `studies_per_day` of every flow of `set` in force as volume alert limits.
pub fn set_volume_limits(log: &super::AuditLog, set: &crate::dsa::AgreementSet) {
    let Some(alerts) = log.alerts() else { return };
    let limits = set
        .agreements
        .values()
        .flat_map(|a| {
            a.flows
                .iter()
                .filter_map(move |f| Some(((a.id.clone(), f.name.clone()), f.studies_per_day?)))
        })
        .collect();
    alerts.set_volume_limits(limits);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Detail, Event};
    use time::macros::datetime;

    fn entry(actor: &str, action: &str, outcome: &str, flow: Option<&str>) -> Entry {
        Entry {
            seq: 1,
            time: String::new(),
            event: Event {
                actor: actor.into(),
                action: action.into(),
                object: "study T".into(),
                agreement: "agr".into(),
                purpose: "treatment".into(),
                outcome: outcome.into(),
            },
            detail: Detail {
                flow: flow.map(str::to_string),
                ..Detail::default()
            },
            prev: String::new(),
            hash: String::new(),
        }
    }

    #[test]
    fn hours_parse_and_wrap() {
        let day = Hours::parse("07:00-19:00").unwrap();
        assert!(day.contains(datetime!(2026-01-01 07:00 UTC)));
        assert!(!day.contains(datetime!(2026-01-01 19:00 UTC)));
        assert!(!day.contains(datetime!(2026-01-01 03:10 UTC)));
        let night = Hours::parse("22:00-06:00").unwrap();
        assert!(night.contains(datetime!(2026-01-01 23:30 UTC)));
        assert!(night.contains(datetime!(2026-01-01 05:59 UTC)));
        assert!(!night.contains(datetime!(2026-01-01 12:00 UTC)));
        assert!(Hours::parse("7-19").is_err());
        assert!(Hours::parse("25:00-19:00").is_err());
    }

    #[test]
    fn reidentification_outside_hours_alerts() {
        let a = Alerts::new(AlertConfig {
            reidentify_hours: Some("07:00-19:00".into()),
            ..AlertConfig::default()
        })
        .unwrap();
        let e = entry("user:dpo", "reidentify", "ok", None);
        assert!(a.observe(&e, datetime!(2026-01-01 12:00 UTC)).is_empty());
        let night = a.observe(&e, datetime!(2026-01-01 02:00 UTC));
        assert_eq!(night.len(), 1);
        assert_eq!(night[0].kind, "reidentify-outside-hours");
        assert!(!reidentify_outside_hours(
            None,
            datetime!(2026-01-01 02:00 UTC)
        ));
    }

    #[test]
    fn a_burst_of_refusals_alerts_once_per_window() {
        let a = Alerts::new(AlertConfig {
            refusal_burst: 3,
            refusal_window_secs: 60,
            reidentify_hours: None,
        })
        .unwrap();
        let e = entry("site:evil", "refuse", "no agreement", None);
        let t = datetime!(2026-01-01 12:00 UTC);
        assert!(a.observe(&e, t).is_empty());
        assert!(a.observe(&e, t + time::Duration::seconds(1)).is_empty());
        let third = a.observe(&e, t + time::Duration::seconds(2));
        assert_eq!(third[0].kind, "refusal-burst");
        assert_eq!(third[0].subject, "site:evil");
        assert!(a.observe(&e, t + time::Duration::seconds(3)).is_empty());
        // Refusals spread out over time never add up to a burst.
        let other = entry("site:slow", "refuse", "x", None);
        for i in 0..10 {
            assert!(a
                .observe(&other, t + time::Duration::seconds(61 * i))
                .is_empty());
        }
    }

    #[test]
    fn volume_over_studies_per_day_alerts() {
        let a = Alerts::new(AlertConfig::default()).unwrap();
        a.set_volume_limits(HashMap::from([(("agr".into(), "ct".into()), 2)]));
        let e = entry("node", "disclose", "ok", Some("ct"));
        let t = datetime!(2026-01-01 12:00 UTC);
        assert!(a.observe(&e, t).is_empty());
        assert!(a.observe(&e, t).is_empty());
        assert_eq!(a.observe(&e, t)[0].kind, "volume-over-limit");
        assert!(a.observe(&e, t).is_empty());
        // A new day starts from zero.
        assert!(a.observe(&e, t + time::Duration::days(1)).is_empty());
        let failed = entry("node", "disclose", "failed: x", Some("ct"));
        assert!(a.observe(&failed, t).is_empty());
    }
}
