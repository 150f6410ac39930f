//! Writes an [`Agreement`] as canonical DSA TOML: the inverse of the parser
//! (`parse(format(x)) == x`). Used to normalise files and by the round-trip property test.

use std::fmt::Write;

use time::Date;

use super::model::*;
use crate::deid::OverrideAction;

/// A TOML basic string, escaped.
pub(crate) fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn list<'a>(items: impl IntoIterator<Item = &'a str>) -> String {
    let v: Vec<String> = items.into_iter().map(quote).collect();
    format!("[{}]", v.join(", "))
}

fn date(d: Date) -> String {
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// Formats an agreement as DSA TOML.
pub fn format(a: &Agreement) -> String {
    let mut s = String::new();
    let w = &mut s;
    let _ = writeln!(w, "[agreement]");
    let _ = writeln!(w, "id = {}", quote(&a.id));
    let _ = writeln!(w, "version = {}", a.version);
    let _ = writeln!(w, "title = {}", quote(&a.title));
    let _ = writeln!(w, "status = {}", quote(a.status.name()));
    let _ = writeln!(w, "valid_from = {}", date(a.valid_from));
    let _ = writeln!(w, "valid_until = {}", date(a.valid_until));
    let _ = writeln!(w, "governing_law = {}", quote(&a.governing_law));
    if !a.paper_reference.is_empty() {
        let _ = writeln!(w, "paper_reference = {}", quote(&a.paper_reference));
    }
    for p in &a.parties {
        let _ = writeln!(w, "\n[[parties]]");
        let _ = writeln!(w, "site = {}", quote(&p.site));
        let _ = writeln!(w, "organisation = {}", quote(&p.organisation));
        let _ = writeln!(w, "privacy_officer = {}", quote(&p.privacy_officer));
        let _ = writeln!(w, "privacy_contact = {}", quote(&p.privacy_contact));
        if let Some(pin) = &p.certificate_pin {
            let _ = writeln!(w, "certificate_pin = {}", quote(pin));
        }
        let _ = writeln!(w, "status = {}", quote(p.status.name()));
    }
    for f in &a.flows {
        format_flow(w, f);
    }
    s
}

fn format_flow(w: &mut String, f: &Flow) {
    let _ = writeln!(w, "\n[[flows]]");
    let _ = writeln!(w, "name = {}", quote(&f.name));
    let _ = writeln!(w, "from = {}", quote(&f.from));
    let _ = writeln!(w, "to = {}", quote(&f.to));
    let _ = writeln!(
        w,
        "purposes = {}",
        list(f.purposes.iter().map(|p| p.name()))
    );
    if let Some(n) = f.studies_per_day {
        let _ = writeln!(w, "studies_per_day = {n}");
    }
    let sel = &f.select;
    if *sel != Selector::default() {
        let _ = writeln!(w, "\n[flows.select]");
        if !sel.modalities.is_empty() {
            let _ = writeln!(
                w,
                "modalities = {}",
                list(sel.modalities.iter().map(String::as_str))
            );
        }
        if !sel.body_parts.is_empty() {
            let _ = writeln!(
                w,
                "body_parts = {}",
                list(sel.body_parts.iter().map(String::as_str))
            );
        }
        if let Some(d) = sel.study_date_from {
            let _ = writeln!(w, "study_date_from = {}", date(d));
        }
        if let Some(d) = sel.study_date_until {
            let _ = writeln!(w, "study_date_until = {}", date(d));
        }
        if let Some(d) = &sel.description {
            let _ = writeln!(w, "description = {}", quote(d));
        }
        if !sel.source_aes.is_empty() {
            let _ = writeln!(
                w,
                "source_aes = {}",
                list(sel.source_aes.iter().map(String::as_str))
            );
        }
    }
    let _ = writeln!(w, "\n[flows.consent]");
    let _ = writeln!(w, "required = {}", f.consent.required);
    if !f.consent.recorded_in.is_empty() {
        let _ = writeln!(w, "recorded_in = {}", quote(&f.consent.recorded_in));
    }
    let _ = writeln!(w, "\n[flows.deid]");
    let _ = writeln!(w, "profile = \"basic\"");
    let _ = writeln!(
        w,
        "options = {}",
        list(f.deid.options.iter().map(|o| o.name()))
    );
    if f.deid.burned_in_text != crate::deid::BurnedInTextMode::default() {
        let _ = writeln!(
            w,
            "burned_in_text = {}",
            quote(f.deid.burned_in_text.name())
        );
    }
    for o in &f.deid.overrides {
        let _ = writeln!(w, "\n[[flows.deid.overrides]]");
        let _ = writeln!(w, "attribute = {}", quote(&o.keyword));
        match &o.action {
            OverrideAction::Keep => {
                let _ = writeln!(w, "action = \"keep\"");
            }
            OverrideAction::Remove => {
                let _ = writeln!(w, "action = \"remove\"");
            }
            OverrideAction::Token => {
                let _ = writeln!(w, "action = \"token\"");
            }
            OverrideAction::Fixed(v) => {
                let _ = writeln!(w, "action = \"fixed\"\nvalue = {}", quote(v));
            }
        }
        let _ = writeln!(w, "justification = {}", quote(&o.justification));
    }
    for p in &f.deid.safe_private {
        let _ = writeln!(w, "\n[[flows.deid.safe_private]]");
        let _ = writeln!(w, "group = 0x{:04X}", p.group);
        let _ = writeln!(w, "creator = {}", quote(&p.creator));
        let _ = writeln!(w, "element = 0x{:02X}", p.element);
    }
    for p in &f.deid.pixel_clean {
        let _ = writeln!(w, "\n[[flows.deid.pixel_clean]]");
        for (k, v) in [
            ("modality", &p.modality),
            ("manufacturer", &p.manufacturer),
            ("model", &p.model),
        ] {
            if let Some(v) = v {
                let _ = writeln!(w, "{k} = {}", quote(v));
            }
        }
        let rects: Vec<String> = p
            .rects
            .iter()
            .map(|r| format!("[{}, {}, {}, {}]", r[0], r[1], r[2], r[3]))
            .collect();
        let _ = writeln!(w, "rects = [{}]", rects.join(", "));
    }
    if let Some(s) = &f.subject_ids {
        let _ = writeln!(w, "\n[flows.subject_ids]\nmapping = {}", quote(&s.mapping));
    }
    if let Some(r) = f.retention {
        let _ = writeln!(
            w,
            "\n[flows.retention]\ndays = {}\nafter = {}",
            r.days,
            quote(r.after.name())
        );
    }
    let _ = writeln!(w, "\n[flows.results]");
    let _ = writeln!(w, "return_to_origin = {}", f.results.return_to_origin);
    if !f.results.reidentify_by.is_empty() {
        let _ = writeln!(
            w,
            "reidentify_by = {}",
            list(f.results.reidentify_by.iter().map(String::as_str))
        );
    }
}
