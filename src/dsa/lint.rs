//! Warnings about risky choices in an agreement that parses: they do not stop `dsa check`
//! (exit 0) but a privacy officer should read each one before signing.

use time::Date;

use super::identifiers::{category_of, is_direct_identifier, options_for};
use super::model::*;
use super::parse::Spans;
use super::Located;
use crate::deid::OverrideAction;

/// Longest validity before a warning, in days (five years).
const LONG_VALIDITY_DAYS: i64 = 5 * 365 + 1;

/// Every warning for `a`, positioned through `spans` in `text`.
pub fn lint(file: &str, text: &str, a: &Agreement, spans: &Spans, today: Date) -> Vec<Located> {
    let mut out = Vec::new();
    let mut warn = |path: &str, msg: String| out.push(Located::at(file, text, spans.at(path), msg));

    let days = (a.valid_until - a.valid_from).whole_days();
    if days > LONG_VALIDITY_DAYS {
        warn(
            ".agreement.valid_until",
            format!("the agreement is valid for {:.1} years (more than five); plan a review and a shorter term", days as f64 / 365.25),
        );
    }
    if a.valid_until < today && a.status == Status::Active {
        warn(
            ".agreement.valid_until",
            format!(
                "the agreement is active but expired on {}: nodes refuse all its flows",
                a.valid_until
            ),
        );
    }
    if a.paper_reference.trim().is_empty() && a.status == Status::Active {
        warn(".agreement", "an active agreement without paper_reference: name the signed paper agreement it implements".into());
    }
    if a.flows.is_empty() {
        warn(
            ".agreement",
            "the agreement has no [[flows]]: it allows nothing to be sent".into(),
        );
    }
    for (i, p) in a.parties.iter().enumerate() {
        if p.is_suspended() {
            warn(
                &format!(".parties[{i}].status"),
                format!(
                    "party {:?} is suspended: nothing is sent to or accepted from it",
                    p.site
                ),
            );
        }
    }

    for (i, f) in a.flows.iter().enumerate() {
        let fp = format!(".flows[{i}]");
        for (end, site) in [("from", &f.from), ("to", &f.to)] {
            if a.party(site).is_none() {
                warn(
                    &format!("{fp}.{end}"),
                    format!("flow {:?} is {end} {site:?}, which is not listed in [[parties]]: it has not signed and nodes will refuse this flow", f.name),
                );
            }
        }
        if f.retention.is_none() {
            warn(&fp, format!("flow {:?} has no retention limit: the receiver may keep the data forever; add [flows.retention]", f.name));
        }
        let consent_purposes: Vec<&str> = f
            .purposes
            .iter()
            .filter(|p| p.expects_consent())
            .map(|p| p.name())
            .collect();
        if !consent_purposes.is_empty() && !f.consent.required {
            warn(
                &format!("{fp}.purposes"),
                format!("flow {:?} is for {} without patient consent: make sure an ethics-board waiver or legal basis covers it", f.name, consent_purposes.join(", ")),
            );
        }
        if f.select.modalities.is_empty()
            && f.select.body_parts.is_empty()
            && f.select.description.is_none()
            && f.select.source_aes.is_empty()
        {
            warn(&fp, format!("flow {:?} selects every study (no modality, body part, description or source AE in [flows.select])", f.name));
        }
        for (j, o) in f.deid.overrides.iter().enumerate() {
            let op = format!("{fp}.deid.overrides[{j}]");
            let keeps = matches!(o.action, OverrideAction::Keep);
            if keeps && is_direct_identifier(&o.keyword) {
                warn(
                    &format!("{op}.action"),
                    format!(
                        "flow {:?} keeps the direct identifier {} (justification: {:?})",
                        f.name, o.keyword, o.justification
                    ),
                );
                continue;
            }
            let opts = options_for(&o.keyword);
            let chosen: Vec<_> = opts.iter().filter(|x| f.deid.options.contains(x)).collect();
            let cat = category_of(&o.keyword).map(|c| c.name).unwrap_or("");
            if keeps && !opts.is_empty() && chosen.is_empty() {
                let names: Vec<&str> = opts.iter().map(|x| x.name()).collect();
                warn(
                    &format!("{op}.action"),
                    format!("override keeps {} although the profile removes the {cat}; the option {} governs these consistently", o.keyword, names.join(" or ")),
                );
            } else if !keeps && !chosen.is_empty() {
                warn(
                    &format!("{op}.action"),
                    format!("override contradicts option {}: the option retains {} but the override does not; drop one of them", chosen[0].name(), o.keyword),
                );
            } else if keeps && opts.is_empty() && category_of(&o.keyword).is_some() {
                warn(
                    &format!("{op}.action"),
                    format!(
                        "override keeps {}, which the profile always removes ({cat})",
                        o.keyword
                    ),
                );
            }
        }
        if f.deid.burned_in_text == crate::deid::BurnedInTextMode::CleanPixelData {
            warn(
                &format!("{fp}.deid.burned_in_text"),
                format!("flow {:?} sends images whose burned-in text OCR removed: OCR can miss text it cannot read (handwriting, tiny or rotated fonts); sample the released images, and install Tesseract (tesseract-ocr, tesseract-ocr-eng) on the sending node or every image at risk is held back", f.name),
            );
        }
        if f.subject_ids.is_some()
            && f.deid
                .overrides
                .iter()
                .any(|o| o.keyword == "PatientID" || o.keyword == "PatientName")
        {
            warn(&format!("{fp}.subject_ids"), format!("flow {:?} maps trial subject IDs but also overrides PatientID/PatientName; the override wins", f.name));
        }
    }
    out
}
