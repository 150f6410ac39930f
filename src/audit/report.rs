//! Accounting of disclosures: who received which patient's studies, when, under which agreement,
//! flow and purpose, in which form the identifiers left, and what the receiver acknowledged.
//!
//! Owns: selecting the disclosures of the log ([`disclosures`]: `disclose` entries that
//! succeeded, filtered by patient tokens, agreement, party and time window), joining destruction
//! receipts to them, describing the identifier forms from the flow's profile, grouping them by
//! patient for the incident view ([`patients`]), and the text and JSON renderings.
//!
//! Does not own: turning a patient id into tokens or tokens back into local ids (the caller does
//! that with the site keys and the vault, at the origin only) or auditing the report itself.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;
use time::OffsetDateTime;

use super::Entry;
use crate::dsa::identifiers::{attribute_form, profile_form, CATEGORIES};
use crate::dsa::AgreementSet;

/// The action of an entry recording that a receiver destroyed what it received (its signed
/// destruction receipt came back); its `detail.study` names the study, its actor the receiver.
pub const DESTRUCTION_RECEIPT: &str = super::events::kind::DESTRUCTION_RECEIPT;

/// What to report on. Empty fields do not filter.
#[derive(Debug, Clone, Default)]
pub struct Query {
    /// Patient tokens to look for, with their agreement: (agreement, token).
    pub patient_tokens: Vec<(String, String)>,
    pub agreement: Option<String>,
    pub party: Option<String>,
    pub since: Option<OffsetDateTime>,
    pub until: Option<OffsetDateTime>,
}

/// One identifier category and the form it left in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IdentifierForm {
    pub identifiers: String,
    pub form: String,
}

/// One study that left the site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Disclosure {
    pub seq: u64,
    pub time: String,
    pub party: String,
    pub agreement: String,
    pub flow: String,
    pub purpose: String,
    pub study: String,
    pub instances: Option<u64>,
    pub patient_tokens: Vec<String>,
    /// The receiver's signed receipt is held in the log (verified when it arrived).
    pub signed_receipt_held: bool,
    /// Time of the receiver's destruction receipt, if one came back.
    pub destruction_receipt: Option<String>,
    /// In which form each kind of identifier left, from the flow's profile in force now
    /// (empty when the agreement or flow is no longer known).
    pub identifiers: Vec<IdentifierForm>,
}

/// Parses `--since` / `--until`: RFC 3339, or a date (`YYYY-MM-DD`, start of day UTC).
pub fn parse_time(s: &str) -> Result<OffsetDateTime, String> {
    use time::format_description::well_known::Rfc3339;
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Ok(t);
    }
    let f = time::macros::format_description!("[year]-[month]-[day]");
    time::Date::parse(s, &f)
        .map(|d| d.midnight().assume_utc())
        .map_err(|_| {
            format!(
                "`{s}` is not a time (RFC 3339, e.g. 2026-01-31T08:00:00Z) or a date (2026-01-31)"
            )
        })
}

fn entry_time(e: &Entry) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(&e.time, &time::format_description::well_known::Rfc3339).ok()
}

/// The disclosures of `entries` that match `q`, oldest first.
pub fn disclosures(entries: &[Entry], q: &Query, set: &AgreementSet) -> Vec<Disclosure> {
    let destroyed: BTreeMap<(String, String), String> = entries
        .iter()
        // Only a receipt that was verified when it arrived counts as destruction.
        .filter(|e| e.event.action == DESTRUCTION_RECEIPT && e.event.outcome.starts_with("ok"))
        .filter_map(|e| {
            let party = match &e.detail.party {
                Some(p) => p.clone(),
                None => e.event.actor.strip_prefix("site:")?.to_string(),
            };
            Some(((party, e.detail.study.clone()?), e.time.clone()))
        })
        .collect();
    entries
        .iter()
        .filter(|e| e.event.action == "disclose" && e.event.outcome.starts_with("ok"))
        .filter(|e| matches(e, q))
        .map(|e| {
            let party = e.detail.party.clone().unwrap_or_default();
            let study = e.detail.study.clone().unwrap_or_default();
            let flow = e.detail.flow.clone().unwrap_or_default();
            Disclosure {
                seq: e.seq,
                time: e.time.clone(),
                destruction_receipt: destroyed.get(&(party.clone(), study.clone())).cloned(),
                identifiers: identifier_forms(set, &e.event.agreement, &flow),
                party,
                agreement: e.event.agreement.clone(),
                flow,
                purpose: e.event.purpose.clone(),
                study,
                instances: e.detail.instances,
                patient_tokens: e.detail.patient_tokens.clone(),
                signed_receipt_held: e.detail.receipt.as_deref().is_some_and(|r| !r.is_empty()),
            }
        })
        .collect()
}

fn matches(e: &Entry, q: &Query) -> bool {
    if q.agreement
        .as_ref()
        .is_some_and(|a| *a != e.event.agreement)
    {
        return false;
    }
    if q.party
        .as_ref()
        .is_some_and(|p| Some(p) != e.detail.party.as_ref())
    {
        return false;
    }
    if q.since.is_some() || q.until.is_some() {
        let Some(t) = entry_time(e) else { return false };
        if q.since.is_some_and(|s| t < s) || q.until.is_some_and(|u| t > u) {
            return false;
        }
    }
    q.patient_tokens.is_empty()
        || q.patient_tokens.iter().any(|(agreement, token)| {
            *agreement == e.event.agreement && e.detail.patient_tokens.contains(token)
        })
}

/// The forms identifiers take under a flow's profile (as `dsa explain` lists them).
pub fn identifier_forms(set: &AgreementSet, agreement: &str, flow: &str) -> Vec<IdentifierForm> {
    let Some(f) = set.agreements.get(agreement).and_then(|a| a.flow(flow)) else {
        return Vec::new();
    };
    CATEGORIES
        .iter()
        .map(|cat| {
            let base = profile_form(cat, &f.deid, f.subject_ids.is_some());
            let mut form = base.describe();
            for kw in cat.keywords {
                if f.deid.overrides.iter().any(|o| o.keyword == *kw) {
                    if let Some(fo) = attribute_form(kw, &f.deid, f.subject_ids.is_some()) {
                        let _ = write!(form, "; {kw} {}", fo.describe());
                    }
                }
            }
            IdentifierForm {
                identifiers: cat.name.to_string(),
                form,
            }
        })
        .collect()
}

/// A patient whose data went out, for the incident view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PatientDisclosed {
    /// The local patient id, from the vault (None when the vault has no record of the token).
    pub local_id: Option<String>,
    pub agreement: String,
    pub token: String,
    pub studies: usize,
    pub first: String,
    pub last: String,
}

/// The patients of `ds`, each once per (agreement, token), with `resolve` turning a token into
/// the local id (the vault, at the origin).
pub fn patients(
    ds: &[Disclosure],
    mut resolve: impl FnMut(&str, &str) -> Option<String>,
) -> Vec<PatientDisclosed> {
    let mut by: BTreeMap<(String, String), PatientDisclosed> = BTreeMap::new();
    for d in ds {
        for t in &d.patient_tokens {
            let p = by
                .entry((d.agreement.clone(), t.clone()))
                .or_insert_with(|| PatientDisclosed {
                    local_id: None,
                    agreement: d.agreement.clone(),
                    token: t.clone(),
                    studies: 0,
                    first: d.time.clone(),
                    last: d.time.clone(),
                });
            p.studies += 1;
            p.last = d.time.clone();
        }
    }
    let mut out: Vec<PatientDisclosed> = by.into_values().collect();
    for p in &mut out {
        p.local_id = resolve(&p.agreement, &p.token);
    }
    out
}

/// The report as text for people.
pub fn render_text(ds: &[Disclosure], patients: Option<&[PatientDisclosed]>) -> String {
    let mut w = String::new();
    if ds.is_empty() {
        w.push_str("No disclosure matches.\n");
    }
    for d in ds {
        let _ = writeln!(
            w,
            "{}  to site {} under agreement {} flow {} for {}\n  study {} ({} instances), patient token(s) {}\n  signed receipt: {}; destruction receipt: {}\n  audit entry {}",
            d.time,
            d.party,
            d.agreement,
            d.flow,
            d.purpose,
            d.study,
            d.instances.map(|n| n.to_string()).unwrap_or_else(|| "?".into()),
            if d.patient_tokens.is_empty() { "(not recorded)".into() } else { d.patient_tokens.join(", ") },
            if d.signed_receipt_held { "held" } else { "NOT held" },
            d.destruction_receipt.as_deref().unwrap_or("none"),
            d.seq
        );
        if d.identifiers.is_empty() {
            let _ = writeln!(
                w,
                "  identifiers: (the agreement or flow is no longer in force here)"
            );
        } else {
            let _ = writeln!(
                w,
                "  identifiers, as the flow in force now de-identifies them:"
            );
            for i in &d.identifiers {
                let _ = writeln!(w, "    - {}: {}", i.identifiers, i.form);
            }
        }
    }
    if let Some(ps) = patients {
        let _ = writeln!(w, "\nPatients whose data left ({}):", ps.len());
        for p in ps {
            let _ = writeln!(
                w,
                "  {}  agreement {} token {}  {} stud{} {} .. {}",
                p.local_id.as_deref().unwrap_or("(not in the vault)"),
                p.agreement,
                p.token,
                p.studies,
                if p.studies == 1 { "y" } else { "ies" },
                p.first,
                p.last
            );
        }
    }
    w
}

/// The report as JSON for tools.
pub fn render_json(ds: &[Disclosure], patients: Option<&[PatientDisclosed]>) -> String {
    let mut v = serde_json::json!({ "disclosures": ds });
    if let Some(p) = patients {
        v["patients"] = serde_json::to_value(p).expect("patients serialise");
    }
    serde_json::to_string_pretty(&v).expect("report serialises")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Detail, Event};

    fn disclose(seq: u64, time: &str, party: &str, token: &str, receipt: bool) -> Entry {
        Entry {
            seq,
            time: time.into(),
            event: Event {
                actor: "node".into(),
                action: "disclose".into(),
                object: String::new(),
                agreement: "agr".into(),
                purpose: "treatment".into(),
                outcome: "ok".into(),
            },
            detail: Detail {
                patient_tokens: vec![token.into()],
                study: Some(format!("2.25.{seq}")),
                party: Some(party.into()),
                flow: Some("ct".into()),
                instances: Some(3),
                receipt: receipt.then(|| "0a".into()),
            },
            prev: String::new(),
            hash: String::new(),
        }
    }

    #[test]
    fn filters_by_patient_party_and_window_and_joins_destruction() {
        let mut entries = vec![
            disclose(1, "2026-01-01T10:00:00Z", "b", "TOK1", true),
            disclose(2, "2026-01-02T10:00:00Z", "c", "TOK1", false),
            disclose(3, "2026-01-03T10:00:00Z", "b", "TOK2", true),
        ];
        let mut failed = disclose(4, "2026-01-03T11:00:00Z", "b", "TOK1", false);
        failed.event.outcome = "queued for retry: down".into();
        entries.push(failed);
        let mut destroyed = disclose(5, "2026-02-01T00:00:00Z", "b", "", false);
        destroyed.event.action = DESTRUCTION_RECEIPT.into();
        destroyed.event.actor = "site:b".into();
        destroyed.detail.study = Some("2.25.1".into());
        entries.push(destroyed);
        let set = AgreementSet::default();
        let q = Query {
            patient_tokens: vec![("agr".into(), "TOK1".into())],
            ..Query::default()
        };
        let ds = disclosures(&entries, &q, &set);
        assert_eq!(ds.iter().map(|d| d.seq).collect::<Vec<_>>(), vec![1, 2]);
        assert!(ds[0].signed_receipt_held && !ds[1].signed_receipt_held);
        assert_eq!(
            ds[0].destruction_receipt.as_deref(),
            Some("2026-02-01T00:00:00Z")
        );
        // Tokens of another agreement do not match.
        let other = Query {
            patient_tokens: vec![("agr-2".into(), "TOK1".into())],
            ..Query::default()
        };
        assert!(disclosures(&entries, &other, &set).is_empty());
        let incident = Query {
            party: Some("b".into()),
            since: Some(parse_time("2026-01-01").unwrap()),
            until: Some(parse_time("2026-01-03T23:59:59Z").unwrap()),
            ..Query::default()
        };
        let ds = disclosures(&entries, &incident, &set);
        assert_eq!(ds.len(), 2);
        let ps = patients(&ds, |_, t| (t == "TOK1").then(|| "MRN-1".to_string()));
        assert_eq!(ps.len(), 2);
        assert_eq!(ps[0].local_id.as_deref(), Some("MRN-1"));
        assert_eq!(ps[1].local_id, None);
        let text = render_text(&ds, Some(&ps));
        assert!(text.contains("MRN-1") && text.contains("(not in the vault)"));
        let json: serde_json::Value = serde_json::from_str(&render_json(&ds, Some(&ps))).unwrap();
        assert_eq!(json["patients"][0]["local_id"], "MRN-1");
        assert!(parse_time("yesterday").is_err());
    }
}
