//! `dsa explain`: a plain-language summary of an agreement that a privacy officer can paste into
//! a report: who receives what, for which purpose, for how long, and in which form each kind of
//! identifier leaves the origin.

use std::fmt::Write;

use super::identifiers::{profile_form, Form, CATEGORIES};
use super::model::*;
use crate::deid::{OverrideAction, ProfileOption};

fn party_name(a: &Agreement, site: &str) -> String {
    match a.party(site) {
        Some(p) => format!("{} ({})", p.organisation, site),
        None => format!("{site} (NOT A LISTED PARTY)"),
    }
}

fn join_and(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// The "which studies" sentence for a flow.
pub fn describe_selector(s: &Selector) -> String {
    let mut parts = Vec::new();
    if !s.modalities.is_empty() {
        parts.push(format!(
            "modality {}",
            s.modalities
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join(" or ")
        ));
    }
    if !s.body_parts.is_empty() {
        parts.push(format!(
            "body part {}",
            s.body_parts
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join(" or ")
        ));
    }
    match (s.study_date_from, s.study_date_until) {
        (Some(f), Some(u)) => parts.push(format!("study date from {f} to {u}")),
        (Some(f), None) => parts.push(format!("study date from {f}")),
        (None, Some(u)) => parts.push(format!("study date until {u}")),
        (None, None) => {}
    }
    if let Some(d) = &s.description {
        parts.push(format!("study description matching {d:?}"));
    }
    if !s.source_aes.is_empty() {
        parts.push(format!(
            "coming from {}",
            s.source_aes
                .iter()
                .cloned()
                .collect::<Vec<_>>()
                .join(" or ")
        ));
    }
    if parts.is_empty() {
        "every study (no selection criteria)".into()
    } else {
        format!("studies with {}", join_and(&parts))
    }
}

/// The plain-language summary of `a`.
pub fn explain(a: &Agreement) -> String {
    let mut s = String::new();
    let w = &mut s;
    let _ = writeln!(
        w,
        "# {} (agreement {:?}, version {})",
        a.title, a.id, a.version
    );
    let _ = writeln!(w);
    let years = (a.valid_until - a.valid_from).whole_days() as f64 / 365.25;
    let _ = writeln!(
        w,
        "Status: {}. Valid from {} to {} ({years:.1} years). Governing law: {}.",
        a.status, a.valid_from, a.valid_until, a.governing_law
    );
    if a.paper_reference.is_empty() {
        let _ = writeln!(w, "Signed paper agreement: none referenced.");
    } else {
        let _ = writeln!(w, "Signed paper agreement: {}.", a.paper_reference);
    }
    if a.status != Status::Active {
        let _ = writeln!(
            w,
            "Because the agreement is {}, no data moves under it.",
            a.status
        );
    }
    let _ = writeln!(w, "\n## Parties\n");
    for p in &a.parties {
        let suspended = if p.is_suspended() {
            " — SUSPENDED: nothing is sent to or accepted from this party"
        } else {
            ""
        };
        let _ = writeln!(
            w,
            "- {} (site {}); privacy officer {}, {}{suspended}",
            p.organisation, p.site, p.privacy_officer, p.privacy_contact
        );
    }
    if a.flows.is_empty() {
        let _ = writeln!(
            w,
            "\nThis agreement has no flows: it allows no data to be sent."
        );
    }
    for f in &a.flows {
        explain_flow(w, a, f);
    }
    s
}

fn explain_flow(w: &mut String, a: &Agreement, f: &Flow) {
    let _ = writeln!(
        w,
        "\n## Flow {:?}: {} sends to {}\n",
        f.name,
        party_name(a, &f.from),
        party_name(a, &f.to)
    );
    let purposes: Vec<String> = f
        .purposes
        .iter()
        .map(|p| format!("{} ({})", p.describe(), p.name()))
        .collect();
    let _ = writeln!(w, "- Purpose: {}.", join_and(&purposes));
    let _ = writeln!(w, "- What: {}.", describe_selector(&f.select));
    match f.studies_per_day {
        Some(n) => {
            let _ = writeln!(w, "- Volume: at most {n} studies per day.");
        }
        None => {
            let _ = writeln!(w, "- Volume: no daily limit.");
        }
    }
    if f.consent.required {
        let _ = writeln!(
            w,
            "- Consent: required for every patient; recorded in {}.",
            f.consent.recorded_in
        );
    } else {
        let _ = writeln!(w, "- Consent: not required by this agreement.");
    }
    let receiver = a
        .party(&f.to)
        .map(|p| p.organisation.as_str())
        .unwrap_or(&f.to);
    match f.retention {
        Some(r) => {
            let after = match r.after {
                AfterRetention::Delete => "then deletes it",
                AfterRetention::Return => "then returns it to the sender and deletes its copy",
            };
            let _ = writeln!(
                w,
                "- Retention: {receiver} keeps the data for at most {} days, {after}.",
                r.days
            );
        }
        None => {
            let _ = writeln!(
                w,
                "- Retention: NO LIMIT — {receiver} may keep the data indefinitely."
            );
        }
    }
    if f.results.return_to_origin {
        let origin = a
            .party(&f.from)
            .map(|p| p.organisation.as_str())
            .unwrap_or(&f.from);
        if f.results.reidentify_by.is_empty() {
            let _ = writeln!(w, "- Results (reports, reads) may return to {origin}; nobody there may re-identify them.");
        } else {
            let _ = writeln!(
                w,
                "- Results (reports, reads) may return to {origin}, where only {} may re-identify them.",
                join_and(&f.results.reidentify_by)
            );
        }
    } else {
        let _ = writeln!(w, "- Results do not return to the sender.");
    }
    let _ = writeln!(
        w,
        "\nIdentifiers leave {} in this form (PS3.15 Basic profile with options: {}):\n",
        party_name(a, &f.from),
        {
            let o: Vec<&str> = f.deid.options.iter().map(|o| o.name()).collect();
            if o.is_empty() {
                "none".to_string()
            } else {
                o.join(", ")
            }
        }
    );
    for cat in CATEGORIES {
        let base = profile_form(cat, &f.deid, f.subject_ids.is_some());
        let mut line = format!("- {}: {}", cat.name, base.describe());
        let exceptions: Vec<String> = f
            .deid
            .overrides
            .iter()
            .filter(|o| cat.keywords.contains(&o.keyword.as_str()))
            .map(|o| format!("{} {}", o.keyword, action_form(&o.action).describe()))
            .collect();
        if !exceptions.is_empty() {
            let _ = write!(line, "; except {}", join_and(&exceptions));
        }
        let _ = writeln!(w, "{line}");
    }
    if let Some(s) = &f.subject_ids {
        let _ = writeln!(w, "- The trial subject ID comes from the mapping {:?}, held only at the sender; patients not in it are not sent.", s.mapping);
    }
    let _ = writeln!(w, "- burned-in text in images: {}", burned_in_text(&f.deid));
    let private = if f.deid.options.contains(&ProfileOption::RetainSafePrivate) {
        format!(
            "removed, except {} listed safe private attribute(s)",
            f.deid.safe_private.len()
        )
    } else {
        "removed".into()
    };
    let _ = writeln!(w, "- private (vendor) attributes: {private}");
    if !f.deid.overrides.is_empty() {
        let _ = writeln!(w, "\nPer-attribute exceptions and their justification:\n");
        for o in &f.deid.overrides {
            let _ = writeln!(
                w,
                "- {}: {} — \"{}\"",
                o.keyword,
                action_form(&o.action).describe(),
                o.justification
            );
        }
    }
}

/// In plain words: which images are held back, which are cleaned and how, and why.
pub fn burned_in_text(d: &crate::deid::DeidConfig) -> String {
    use crate::deid::BurnedInTextMode;
    let at_risk = "ultrasound, angiography, fluoroscopy, endoscopy, photographs, secondary and screen captures that do not declare BurnedInAnnotation NO, and every image that declares burned-in annotation";
    let masks = d.options.contains(&ProfileOption::CleanPixelData) && !d.pixel_clean.is_empty();
    let mask_text = format!(
        "the agreed regions of {} pixel clean rule(s) are blanked first where a rule matches the device; ",
        d.pixel_clean.len()
    );
    match d.burned_in_text {
        BurnedInTextMode::CleanPixelData => format!(
            "images at risk of text in their pixels ({at_risk}) are read with OCR (Tesseract); {}every text box found is blacked out, the image is read again, and it is sent only if nothing readable remains; an image where OCR finds no text is sent as it is. Held back, not sent: images where text is still readable after cleaning, images that declare burned-in annotation but where OCR finds none, compressed images (not yet re-encoded), and every image at risk when OCR is not available on the sending node. Images with a recognisable face stay held back whatever OCR finds. The audit log records for each image the mode, the OCR engine's version and the number of boxes found and blacked out",
            if masks { mask_text.as_str() } else { "" }
        ),
        BurnedInTextMode::Quarantine if masks => format!(
            "images at risk of text in their pixels ({at_risk}) are cleaned by blanking the agreed regions of {} pixel clean rule(s) when a rule matches the device; the others are held back, not sent",
            d.pixel_clean.len()
        ),
        BurnedInTextMode::Quarantine => format!(
            "images at risk of text in their pixels ({at_risk}) are held back, not sent: nothing in this agreement removes such text (burned_in_text = \"clean-pixel-data\" would find and remove it with OCR)"
        ),
    }
}

/// The form an override action gives an attribute.
pub fn action_form(a: &OverrideAction) -> Form {
    match a {
        OverrideAction::Keep => Form::Kept,
        OverrideAction::Remove => Form::Removed,
        OverrideAction::Token => Form::Token,
        OverrideAction::Fixed(v) => Form::Fixed(v.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deid::{BurnedInTextMode, DeidConfig, PixelCleanRule};

    #[test]
    fn burned_in_text_is_explained_for_each_mode() {
        let mut d = DeidConfig::default();
        let held = burned_in_text(&d);
        assert!(
            held.contains("ultrasound") && held.contains("held back, not sent"),
            "{held}"
        );
        assert!(
            held.contains("burned_in_text = \"clean-pixel-data\""),
            "{held}"
        );
        d.options.insert(ProfileOption::CleanPixelData);
        d.pixel_clean.push(PixelCleanRule {
            modality: Some("US".into()),
            manufacturer: None,
            model: None,
            rects: vec![[0, 0, 10, 10]],
        });
        assert!(burned_in_text(&d).contains("1 pixel clean rule(s)"));
        d.burned_in_text = BurnedInTextMode::CleanPixelData;
        let ocr = burned_in_text(&d);
        for words in [
            "OCR",
            "blacked out",
            "read again",
            "OCR is not available",
            "face",
            "audit log",
        ] {
            assert!(ocr.contains(words), "{words}: {ocr}");
        }
    }
}
