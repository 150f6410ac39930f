//! `dsa diff`: what changes in disclosure between two versions of an agreement. Every change is
//! classed as widening (more data, more recipients, more purposes, longer, less protected),
//! narrowing, or neutral; widening changes come first.

use std::collections::BTreeSet;
use std::fmt;

use super::identifiers::{attribute_form, known_keywords};
use super::model::*;
use crate::deid::ProfileOption;

/// Whether a change discloses more, less, or neither.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Impact {
    Widens,
    Narrows,
    Neutral,
}

/// One change between two versions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub impact: Impact,
    pub text: String,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mark = match self.impact {
            Impact::Widens => "[WIDENS] ",
            Impact::Narrows => "[narrows]",
            Impact::Neutral => "[other]  ",
        };
        write!(f, "{mark} {}", self.text)
    }
}

struct Changes(Vec<Change>);

impl Changes {
    fn push(&mut self, impact: Impact, text: String) {
        self.0.push(Change { impact, text });
    }

    /// Widens when `more` (new discloses more than old), narrows when `less`.
    fn compare(&mut self, more: bool, less: bool, text: String) {
        let impact = if more {
            Impact::Widens
        } else if less {
            Impact::Narrows
        } else {
            Impact::Neutral
        };
        self.push(impact, text);
    }
}

fn names(set: &BTreeSet<String>) -> String {
    set.iter().cloned().collect::<Vec<_>>().join(", ")
}

/// Every change from `old` to `new`, widening first (stable order within a class).
pub fn diff(old: &Agreement, new: &Agreement) -> Vec<Change> {
    let mut c = Changes(Vec::new());
    if old.id != new.id {
        c.push(
            Impact::Neutral,
            format!(
                "agreement id changed from {:?} to {:?}: these may be different agreements",
                old.id, new.id
            ),
        );
    }
    if old.version != new.version {
        c.push(
            Impact::Neutral,
            format!("version {} -> {}", old.version, new.version),
        );
    } else if old != new {
        c.push(
            Impact::Neutral,
            format!(
                "the content changed but the version number is still {}",
                new.version
            ),
        );
    }
    if old.title != new.title {
        c.push(
            Impact::Neutral,
            format!("title {:?} -> {:?}", old.title, new.title),
        );
    }
    if old.status != new.status {
        let opens = new.status == Status::Active;
        let closes = old.status == Status::Active;
        c.compare(
            opens,
            closes,
            format!("status {} -> {}", old.status, new.status),
        );
    }
    if old.valid_from != new.valid_from {
        c.compare(
            new.valid_from < old.valid_from,
            new.valid_from > old.valid_from,
            format!("valid_from {} -> {}", old.valid_from, new.valid_from),
        );
    }
    if old.valid_until != new.valid_until {
        c.compare(
            new.valid_until > old.valid_until,
            new.valid_until < old.valid_until,
            format!("valid_until {} -> {}", old.valid_until, new.valid_until),
        );
    }
    if old.governing_law != new.governing_law {
        c.push(
            Impact::Neutral,
            format!(
                "governing law {:?} -> {:?}",
                old.governing_law, new.governing_law
            ),
        );
    }
    if old.paper_reference != new.paper_reference {
        c.push(
            Impact::Neutral,
            format!(
                "paper agreement {:?} -> {:?}",
                old.paper_reference, new.paper_reference
            ),
        );
    }
    for p in &new.parties {
        match old.party(&p.site) {
            None => c.push(
                Impact::Widens,
                format!("new party {} ({})", p.site, p.organisation),
            ),
            Some(o) => {
                if o.status != p.status {
                    let back = p.status == PartyStatus::Active;
                    c.compare(
                        back,
                        !back,
                        format!(
                            "party {} {} -> {}",
                            p.site,
                            o.status.name(),
                            p.status.name()
                        ),
                    );
                }
                if o.certificate_pin != p.certificate_pin {
                    c.compare(
                        p.certificate_pin.is_none(),
                        o.certificate_pin.is_none(),
                        format!("party {} certificate pin changed", p.site),
                    );
                }
                if o.organisation != p.organisation
                    || o.privacy_officer != p.privacy_officer
                    || o.privacy_contact != p.privacy_contact
                {
                    c.push(
                        Impact::Neutral,
                        format!("party {} organisation or privacy contact changed", p.site),
                    );
                }
            }
        }
    }
    for p in &old.parties {
        if new.party(&p.site).is_none() {
            c.push(
                Impact::Narrows,
                format!("party {} ({}) removed", p.site, p.organisation),
            );
        }
    }
    for f in &new.flows {
        match old.flow(&f.name) {
            None => c.push(
                Impact::Widens,
                format!(
                    "new flow {:?}: {} -> {} for {}",
                    f.name,
                    f.from,
                    f.to,
                    f.purposes
                        .iter()
                        .map(|p| p.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
            Some(o) => diff_flow(&mut c, o, f),
        }
    }
    for f in &old.flows {
        if new.flow(&f.name).is_none() {
            c.push(
                Impact::Narrows,
                format!("flow {:?} ({} -> {}) removed", f.name, f.from, f.to),
            );
        }
    }
    let mut out = c.0;
    out.sort_by_key(|c| c.impact);
    out
}

fn diff_flow(c: &mut Changes, o: &Flow, n: &Flow) {
    let f = &n.name;
    if o.to != n.to {
        c.push(
            Impact::Widens,
            format!("flow {f:?}: new recipient {} (was {})", n.to, o.to),
        );
    }
    if o.from != n.from {
        c.push(
            Impact::Widens,
            format!("flow {f:?}: new sender {} (was {})", n.from, o.from),
        );
    }
    let added: Vec<&str> = n
        .purposes
        .difference(&o.purposes)
        .map(|p| p.name())
        .collect();
    let removed: Vec<&str> = o
        .purposes
        .difference(&n.purposes)
        .map(|p| p.name())
        .collect();
    if !added.is_empty() {
        c.push(
            Impact::Widens,
            format!("flow {f:?}: purposes widened: + {}", added.join(", ")),
        );
    }
    if !removed.is_empty() {
        c.push(
            Impact::Narrows,
            format!("flow {f:?}: purposes narrowed: - {}", removed.join(", ")),
        );
    }
    diff_selector(c, f, &o.select, &n.select);
    if o.studies_per_day != n.studies_per_day {
        let more = match (o.studies_per_day, n.studies_per_day) {
            (Some(a), Some(b)) => b > a,
            (Some(_), None) => true,
            _ => false,
        };
        let show = |v: Option<u32>| v.map_or("no limit".to_string(), |v| format!("{v}/day"));
        c.compare(
            more,
            !more,
            format!(
                "flow {f:?}: volume {} -> {}",
                show(o.studies_per_day),
                show(n.studies_per_day)
            ),
        );
    }
    if o.consent != n.consent {
        let more = o.consent.required && !n.consent.required;
        let less = !o.consent.required && n.consent.required;
        c.compare(
            more,
            less,
            format!(
                "flow {f:?}: consent required {} -> {} (recorded in {:?})",
                o.consent.required, n.consent.required, n.consent.recorded_in
            ),
        );
    }
    match (o.retention, n.retention) {
        (a, b) if a == b => {}
        (a, b) => {
            let days = |r: Option<Retention>| r.map_or(u64::MAX, |r| u64::from(r.days));
            let show = |r: Option<Retention>| {
                r.map_or("no limit".to_string(), |r| {
                    format!("{} days then {}", r.days, r.after.name())
                })
            };
            let longer = days(b) > days(a);
            let shorter = days(b) < days(a);
            c.compare(
                longer,
                shorter,
                format!(
                    "flow {f:?}: retention {} -> {}{}",
                    show(a),
                    show(b),
                    if longer { " (lengthened)" } else { "" }
                ),
            );
        }
    }
    if o.results != n.results {
        let new_roles: Vec<&String> = n
            .results
            .reidentify_by
            .iter()
            .filter(|r| !o.results.reidentify_by.contains(r))
            .collect();
        let more =
            (!o.results.return_to_origin && n.results.return_to_origin) || !new_roles.is_empty();
        c.compare(
            more,
            !more,
            format!(
                "flow {f:?}: results return {} -> {}, re-identified by [{}] -> [{}]",
                o.results.return_to_origin,
                n.results.return_to_origin,
                o.results.reidentify_by.join(", "),
                n.results.reidentify_by.join(", ")
            ),
        );
    }
    if o.subject_ids != n.subject_ids {
        c.push(
            Impact::Neutral,
            format!(
                "flow {f:?}: trial subject-ID mapping {:?} -> {:?}",
                o.subject_ids.as_ref().map(|s| &s.mapping),
                n.subject_ids.as_ref().map(|s| &s.mapping)
            ),
        );
    }
    diff_deid(c, f, o, n);
}

fn diff_selector(c: &mut Changes, f: &str, o: &Selector, n: &Selector) {
    if o == n {
        return;
    }
    // A criterion widens when it is dropped or gains values; it narrows when added or loses values.
    let set = |c: &mut Changes, what: &str, a: &BTreeSet<String>, b: &BTreeSet<String>| {
        if a == b {
            return;
        }
        let more =
            (!a.is_empty() && b.is_empty()) || (!b.is_empty() && !b.is_subset(a) && !a.is_empty());
        let less =
            (a.is_empty() && !b.is_empty()) || (!a.is_empty() && b.is_subset(a) && !b.is_empty());
        let show = |s: &BTreeSet<String>| {
            if s.is_empty() {
                "any".to_string()
            } else {
                names(s)
            }
        };
        c.compare(
            more,
            less,
            format!("flow {f:?}: {what} {} -> {}", show(a), show(b)),
        );
    };
    set(c, "modalities", &o.modalities, &n.modalities);
    set(c, "body parts", &o.body_parts, &n.body_parts);
    set(c, "source AEs", &o.source_aes, &n.source_aes);
    let earlier = match (o.study_date_from, n.study_date_from) {
        (Some(a), Some(b)) => b < a,
        (Some(_), None) => true,
        _ => false,
    };
    let later = match (o.study_date_until, n.study_date_until) {
        (Some(a), Some(b)) => b > a,
        (Some(_), None) => true,
        _ => false,
    };
    if o.study_date_from != n.study_date_from || o.study_date_until != n.study_date_until {
        c.compare(
            earlier || later,
            !(earlier || later),
            format!("flow {f:?}: study date range changed"),
        );
    }
    if o.description != n.description {
        c.compare(
            n.description.is_none(),
            o.description.is_none(),
            format!(
                "flow {f:?}: description pattern {:?} -> {:?}",
                o.description, n.description
            ),
        );
    }
}

fn diff_deid(c: &mut Changes, f: &str, o: &Flow, n: &Flow) {
    let retains = |x: &ProfileOption| x.name().starts_with("retain-");
    for opt in n.deid.options.difference(&o.deid.options) {
        let more = retains(opt);
        c.compare(
            more,
            !more,
            format!("flow {f:?}: option {} added", opt.name()),
        );
    }
    for opt in o.deid.options.difference(&n.deid.options) {
        let more = !retains(opt);
        c.compare(
            more,
            !more,
            format!("flow {f:?}: option {} removed", opt.name()),
        );
    }
    // Compare the form of every attribute either version names, or the known table covers.
    let mut keywords: BTreeSet<String> = known_keywords().map(str::to_string).collect();
    keywords.extend(
        o.deid
            .overrides
            .iter()
            .chain(&n.deid.overrides)
            .map(|x| x.keyword.clone()),
    );
    for k in keywords {
        let a = attribute_form(&k, &o.deid, o.subject_ids.is_some());
        let b = attribute_form(&k, &n.deid, n.subject_ids.is_some());
        if a == b {
            continue;
        }
        let show = |x: &Option<super::identifiers::Form>| {
            x.as_ref()
                .map_or("as the profile does".to_string(), |x| x.describe())
        };
        let da = a.as_ref().map_or(0, |x| x.disclosure());
        let db = b.as_ref().map_or(0, |x| x.disclosure());
        let newly_kept = b == Some(super::identifiers::Form::Kept) && a != b;
        let text = format!(
            "flow {f:?}: {k} {} -> {}{}",
            show(&a),
            show(&b),
            if newly_kept {
                " (identifier newly kept)"
            } else {
                ""
            }
        );
        c.compare(db > da, db < da, text);
    }
    let justifications = |fl: &Flow| -> Vec<(String, String)> {
        fl.deid
            .overrides
            .iter()
            .map(|x| (x.keyword.clone(), x.justification.clone()))
            .collect()
    };
    for (k, j) in justifications(n) {
        if justifications(o)
            .iter()
            .any(|(ok, oj)| *ok == k && *oj != j)
        {
            c.push(
                Impact::Neutral,
                format!("flow {f:?}: justification for {k} changed to {j:?}"),
            );
        }
    }
    if o.deid.safe_private != n.deid.safe_private {
        let more = n
            .deid
            .safe_private
            .iter()
            .any(|p| !o.deid.safe_private.contains(p));
        c.compare(
            more,
            !more,
            format!(
                "flow {f:?}: safe private attributes changed ({} -> {})",
                o.deid.safe_private.len(),
                n.deid.safe_private.len()
            ),
        );
    }
    if o.deid.burned_in_text != n.deid.burned_in_text {
        use crate::deid::BurnedInTextMode;
        let wider = n.deid.burned_in_text == BurnedInTextMode::CleanPixelData;
        c.compare(
            wider,
            !wider,
            format!(
                "flow {f:?}: burned-in text mode {} -> {} ({})",
                o.deid.burned_in_text,
                n.deid.burned_in_text,
                if wider {
                    "images with text found and removed by OCR are now sent instead of held back"
                } else {
                    "images at risk of burned-in text are now held back"
                }
            ),
        );
    }
    if o.deid.pixel_clean != n.deid.pixel_clean {
        c.push(
            Impact::Neutral,
            format!(
                "flow {f:?}: pixel cleaning rules changed ({} -> {} rules); review the regions",
                o.deid.pixel_clean.len(),
                n.deid.pixel_clean.len()
            ),
        );
    }
}
