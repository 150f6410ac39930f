//! Data sharing agreements (DSA): the machine-readable policy a node enforces, and the privacy
//! officer's tools around it. The file format is documented in `docs/dsa.md`.
//!
//! Owns: the agreement model ([`Agreement`], [`Party`], [`Flow`], [`Purpose`]...), the TOML reader
//! with file:line:col errors ([`Agreement::parse`]), the canonical writer ([`format`]), the lints
//! ([`check`]), the plain-language summary ([`explain`]), the disclosure diff ([`diff`]), detached
//! signatures with the site certificate key ([`sign`]), the trial subject-ID mapping
//! ([`SubjectIdMap`]) and the decisions a node makes before it sends or accepts a study
//! ([`AgreementSet::authorise`], [`AgreementSet::load_enforced`]).
//!
//! Does not own: DICOM bytes (a flow's de-identification settings are handed to `deid` as a
//! [`DeidConfig`](crate::deid::DeidConfig)), the peer's identity (that comes from `federation`),
//! nor reloading or volume counting (the node keeps that state).

use std::fmt;
use std::path::{Path, PathBuf};

use time::Date;

pub mod diff;
pub mod enforce;
pub mod explain;
pub mod format;
pub mod identifiers;
pub mod lint;
pub mod model;
pub mod parse;
pub mod sign;
pub mod subjects;

pub use enforce::{AgreementSet, Refusal, StudyFacts, TransferRequest};
pub use format::format;
pub use model::*;
pub use sign::{FederationCa, SignatureState, Verdict, Verification};
pub use subjects::SubjectIdMap;

/// "; did you mean `x`?" when one of `candidates` is close to `word` (a likely typo), else "".
pub fn did_you_mean<'c>(word: &str, candidates: impl IntoIterator<Item = &'c str>) -> String {
    parse::suggest(word, candidates)
        .map(|s| format!("; did you mean `{s}`?"))
        .unwrap_or_default()
}

/// A DSA error: the file cannot be read, or it has one or more problems at file:line:col.
#[derive(Debug, thiserror::Error)]
pub enum DsaError {
    #[error("{file}: {source}")]
    Io {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(Problems),
}

impl DsaError {
    /// How many problems (1 for an I/O error).
    pub fn count(&self) -> usize {
        match self {
            DsaError::Io { .. } => 1,
            DsaError::Invalid(p) => p.0.len(),
        }
    }
}

/// Every problem found in one file, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problems(pub Vec<Located>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// One problem found in an agreement file, with its position (1-based) and a caret snippet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub message: String,
    pub snippet: String,
}

impl fmt::Display for Located {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}\n{}",
            self.file, self.line, self.col, self.message, self.snippet
        )
    }
}

impl Located {
    /// Locates byte offset `at` of `text` and builds the caret snippet.
    pub fn at(file: &str, text: &str, at: usize, message: impl Into<String>) -> Self {
        let mut at = at.min(text.len());
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        let line_start = text[..at].rfind('\n').map(|i| i + 1).unwrap_or(0);
        let line_no = text[..at].matches('\n').count() + 1;
        let col = text[line_start..at].chars().count() + 1;
        let line_end = text[at..].find('\n').map(|i| at + i).unwrap_or(text.len());
        let line_text = text[line_start..line_end].trim_end_matches('\r');
        let gutter = format!("{line_no:>4} | ");
        let snippet = format!(
            "{gutter}{line_text}\n{}^",
            " ".repeat(gutter.len() + col - 1)
        );
        Located {
            file: file.to_string(),
            line: line_no,
            col,
            message: message.into(),
            snippet,
        }
    }
}

/// The result of `dsa check` on one file's text.
#[derive(Debug)]
pub struct Report {
    pub agreement: Option<Agreement>,
    pub errors: Vec<Located>,
    pub warnings: Vec<Located>,
}

/// Parses and lints agreement text: every error, and (when there is none) every warning.
/// `today` is used for the "expired" warning.
pub fn check(file: &str, text: &str, today: Date) -> Report {
    let parsed = parse::read(file, text);
    let mut errors = parsed.errors;
    errors.sort_by_key(|e| (e.line, e.col));
    let warnings = match &parsed.agreement {
        Some(a) => lint::lint(file, text, a, &parsed.spans, today),
        None => Vec::new(),
    };
    Report {
        agreement: parsed.agreement,
        errors,
        warnings,
    }
}

impl Agreement {
    /// Reads and parses an agreement file.
    pub fn from_file(path: &Path) -> Result<Agreement, DsaError> {
        let text = std::fs::read_to_string(path).map_err(|source| DsaError::Io {
            file: path.to_owned(),
            source,
        })?;
        Agreement::parse(&path.display().to_string(), &text)
    }

    /// Parses agreement text; `file` names it in errors. All errors are reported, in file order.
    pub fn parse(file: &str, text: &str) -> Result<Agreement, DsaError> {
        let parsed = parse::read(file, text);
        match parsed.agreement {
            Some(a) if parsed.errors.is_empty() => Ok(a),
            _ => {
                let mut errors = parsed.errors;
                errors.sort_by_key(|e| (e.line, e.col));
                Err(DsaError::Invalid(Problems(errors)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    pub(crate) const GOOD: &str = r#"[agreement]
id = "a1"
version = 1
title = "Test"
status = "active"
valid_from = 2026-01-01
valid_until = 2027-12-31
governing_law = "Test law"
paper_reference = "Contract 1"

[[parties]]
site = "x"
organisation = "X"
privacy_officer = "DPO X"
privacy_contact = "dpo@x.example"

[[parties]]
site = "y"
organisation = "Y"
privacy_officer = "DPO Y"
privacy_contact = "dpo@y.example"

[[flows]]
name = "f"
from = "x"
to = "y"
purposes = ["treatment"]
studies_per_day = 2

[flows.select]
modalities = ["CT", "SR"]
body_parts = ["CHEST"]
study_date_from = 2020-01-01
description = "*THORAX*"
source_aes = ["CT1"]

[flows.deid]
options = ["retain-longitudinal-modified-dates"]

[flows.retention]
days = 30
after = "delete"
"#;

    fn set(text: &str) -> AgreementSet {
        let a = Agreement::parse("t.toml", text).unwrap();
        let mut s = AgreementSet::default();
        s.agreements.insert(a.id.clone(), a);
        s
    }

    fn ct() -> StudyFacts {
        StudyFacts {
            modalities: vec!["CT".into()],
            body_parts: vec!["CHEST".into()],
            study_date: Some(date!(2026 - 03 - 01)),
            description: Some("CT Thorax with contrast".into()),
            source_ae: Some("CT1".into()),
        }
    }

    fn req<'r>(study: &'r StudyFacts, purpose: &'r str) -> TransferRequest<'r> {
        TransferRequest {
            agreement: "a1",
            flow: "f",
            purpose,
            sender: "x",
            receiver: "y",
            study,
            today: date!(2026 - 06 - 01),
        }
    }

    #[test]
    fn authorises_a_matching_transfer() {
        let s = set(GOOD);
        let study = ct();
        let (a, f) = s.authorise_transfer(&req(&study, "treatment")).unwrap();
        assert_eq!((a.id.as_str(), f.name.as_str()), ("a1", "f"));
        assert!(s.authorise("a1", "f", Some("treatment"), "x", "y").is_ok());
    }

    #[test]
    fn refuses_every_way_out_of_the_flow() {
        let s = set(GOOD);
        let study = ct();
        let r = |m: &dyn Fn(&mut TransferRequest)| {
            let mut q = req(&study, "treatment");
            m(&mut q);
            s.authorise_transfer(&q).unwrap_err()
        };
        assert!(matches!(
            r(&|q| q.purpose = "research"),
            Refusal::PurposeNotAllowed { .. }
        ));
        assert!(matches!(
            r(&|q| q.purpose = "nonsense"),
            Refusal::PurposeNotAllowed { .. }
        ));
        assert!(matches!(
            r(&|q| q.sender = "y"),
            Refusal::WrongSender { .. }
        ));
        assert!(matches!(
            r(&|q| q.receiver = "x"),
            Refusal::WrongReceiver { .. }
        ));
        assert!(matches!(
            r(&|q| q.receiver = "z"),
            Refusal::NotAParty { .. }
        ));
        assert!(matches!(r(&|q| q.flow = "g"), Refusal::UnknownFlow { .. }));
        assert!(matches!(
            r(&|q| q.agreement = "a2"),
            Refusal::UnknownAgreement(_)
        ));
        assert!(matches!(
            r(&|q| q.today = date!(2028 - 01 - 01)),
            Refusal::Expired { .. }
        ));
        assert!(matches!(
            r(&|q| q.today = date!(2025 - 12 - 31)),
            Refusal::NotYetValid { .. }
        ));
        let refuse_study = |study: StudyFacts| {
            let q = TransferRequest {
                study: &study,
                ..req(&study, "treatment")
            };
            match s.authorise_transfer(&q) {
                Err(Refusal::NotSelected { why, .. }) => why,
                other => panic!("{other:?}"),
            }
        };
        assert!(refuse_study(StudyFacts {
            modalities: vec!["CT".into(), "MR".into()],
            ..ct()
        })
        .contains("modality MR"));
        assert!(refuse_study(StudyFacts {
            modalities: vec![],
            ..ct()
        })
        .contains("not known"));
        assert!(refuse_study(StudyFacts {
            body_parts: vec!["HEAD".into()],
            ..ct()
        })
        .contains("body part"));
        assert!(refuse_study(StudyFacts {
            study_date: Some(date!(2019 - 12 - 31)),
            ..ct()
        })
        .contains("date"));
        assert!(refuse_study(StudyFacts {
            description: Some("MR brain".into()),
            ..ct()
        })
        .contains("description"));
        assert!(refuse_study(StudyFacts {
            source_ae: Some("OTHER".into()),
            ..ct()
        })
        .contains("source AE"));
        // The receiver knows only the modalities: the other criteria are not checked.
        let receiver_view = StudyFacts {
            modalities: vec!["CT".into()],
            ..StudyFacts::default()
        };
        assert!(s
            .authorise_transfer(&req(&receiver_view, "treatment"))
            .is_ok());
    }

    #[test]
    fn suspension_of_a_party_or_the_agreement_cuts_off() {
        let study = ct();
        let suspended_party = GOOD.replace(
            "privacy_contact = \"dpo@x.example\"",
            "privacy_contact = \"dpo@x.example\"\nstatus = \"suspended\"",
        );
        let s = set(&suspended_party);
        let e = s.authorise_transfer(&req(&study, "treatment")).unwrap_err();
        assert_eq!(
            e,
            Refusal::PartySuspended {
                agreement: "a1".into(),
                site: "x".into()
            }
        );
        assert_eq!(
            e.to_string(),
            "party \"x\" is suspended in agreement \"a1\""
        );
        assert!(s
            .still_allowed("a1", "x", "y", date!(2026 - 06 - 01))
            .is_err());
        for status in ["suspended", "ended", "draft"] {
            let s = set(&GOOD.replace("status = \"active\"", &format!("status = \"{status}\"")));
            let e = s.authorise_transfer(&req(&study, "treatment")).unwrap_err();
            assert!(matches!(e, Refusal::NotActive { .. }), "{status}");
            assert!(e.to_string().contains(status));
            assert!(s.authorise("a1", "f", Some("treatment"), "x", "y").is_err());
        }
        assert!(set(GOOD)
            .still_allowed("a1", "x", "y", date!(2026 - 06 - 01))
            .is_ok());
    }

    #[test]
    fn volume_limit_is_a_pure_check_on_the_nodes_count() {
        let s = set(GOOD);
        let f = s.agreements["a1"].flow("f").unwrap();
        assert!(f.check_volume(0).is_ok() && f.check_volume(1).is_ok());
        assert_eq!(
            f.check_volume(2).unwrap_err(),
            Refusal::OverVolume {
                flow: "f".into(),
                limit: 2,
                count: 2
            }
        );
    }

    #[test]
    fn patterns_match_like_a_privacy_officer_expects() {
        use enforce::matches_pattern as m;
        assert!(m("*THORAX*", "ct thorax abdomen"));
        assert!(m("CT?HEAD", "CT HEAD"));
        assert!(!m("*THORAX", "THORAX ABDOMEN"));
        assert!(m("*", ""));
        assert!(!m("?", ""));
    }

    fn warnings(text: &str) -> Vec<String> {
        let r = check("t.toml", text, date!(2026 - 06 - 01));
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        r.warnings
            .iter()
            .map(|w| format!("{}:{}: {}", w.line, w.col, w.message))
            .collect()
    }

    #[test]
    fn a_careful_agreement_has_no_warnings() {
        assert_eq!(warnings(GOOD), Vec::<String>::new());
    }

    #[test]
    fn risky_choices_are_warned_about_at_their_line() {
        let has = |w: &[String], s: &str| w.iter().any(|x| x.contains(s));
        let w = warnings(&GOOD.replace("valid_until = 2027-12-31", "valid_until = 2032-12-31"));
        assert!(
            has(&w, "7:15: the agreement is valid for 7.0 years"),
            "{w:?}"
        );
        let w = warnings(&GOOD.replace("[flows.retention]\ndays = 30\nafter = \"delete\"\n", ""));
        assert!(has(&w, "23:1: flow \"f\" has no retention limit"), "{w:?}");
        let w = warnings(&GOOD.replace("purposes = [\"treatment\"]", "purposes = [\"research\"]"));
        assert!(
            has(
                &w,
                "27:12: flow \"f\" is for research without patient consent"
            ),
            "{w:?}"
        );
        let w = warnings(&GOOD.replace("to = \"y\"", "to = \"z\""));
        assert!(
            has(&w, "26:6: flow \"f\" is to \"z\", which is not listed"),
            "{w:?}"
        );
        let keep = |attr: &str| {
            GOOD.replace(
                "[flows.retention]",
                &format!("[[flows.deid.overrides]]\nattribute = \"{attr}\"\naction = \"keep\"\njustification = \"because\"\n\n[flows.retention]"),
            )
        };
        let w = warnings(&keep("PatientID"));
        assert!(
            has(
                &w,
                "42:10: flow \"f\" keeps the direct identifier PatientID"
            ),
            "{w:?}"
        );
        let w = warnings(&keep("InstitutionName"));
        assert!(has(&w, "override keeps InstitutionName although the profile removes the institution; the option retain-institution-identity"), "{w:?}");
        let remove_dates = GOOD.replace(
            "[flows.retention]",
            "[[flows.deid.overrides]]\nattribute = \"StudyDate\"\naction = \"remove\"\njustification = \"because\"\n\n[flows.retention]",
        );
        let w = warnings(&remove_dates);
        assert!(
            has(
                &w,
                "override contradicts option retain-longitudinal-modified-dates"
            ),
            "{w:?}"
        );
        let w = warnings(&GOOD.replace(
            "privacy_contact = \"dpo@y.example\"",
            "privacy_contact = \"dpo@y.example\"\nstatus = \"suspended\"",
        ));
        assert!(has(&w, "party \"y\" is suspended"), "{w:?}");
        let w = warnings(&GOOD.replace("valid_until = 2027-12-31", "valid_until = 2026-02-01"));
        assert!(has(&w, "expired on 2026-02-01"), "{w:?}");
    }

    #[test]
    fn explain_says_who_gets_what_in_which_form() {
        let a = Agreement::parse("t.toml", GOOD).unwrap();
        let e = explain::explain(&a);
        for s in [
            "## Flow \"f\": X (x) sends to Y (y)",
            "- Purpose: the patient's own treatment (treatment).",
            "studies with modality CT or SR, body part CHEST, study date from 2020-01-01, study description matching \"*THORAX*\" and coming from CT1",
            "at most 2 studies per day",
            "keeps the data for at most 30 days, then deletes it",
            "- patient name and patient ID: replaced by a keyed token",
            "- study and acquisition dates and times: shifted by a per-patient offset",
            "- institution: removed",
            "- Results do not return to the sender.",
        ] {
            assert!(e.contains(s), "missing {s:?} in\n{e}");
        }
    }

    #[test]
    fn diff_puts_widening_first_and_marks_it() {
        let old = Agreement::parse("o.toml", GOOD).unwrap();
        let new_text = GOOD
            .replace("version = 1", "version = 2")
            .replace("purposes = [\"treatment\"]", "purposes = [\"treatment\", \"research\"]")
            .replace("days = 30", "days = 365")
            .replace("studies_per_day = 2", "studies_per_day = 1")
            .replace(
                "[flows.retention]",
                "[[flows.deid.overrides]]\nattribute = \"PatientName\"\naction = \"keep\"\njustification = \"because\"\n\n[flows.retention]",
            )
            .replace("[flows.select]", "[flows.select]\n")
            + "\n[[flows]]\nname = \"g\"\nfrom = \"x\"\nto = \"y\"\npurposes = [\"teaching\"]\n";
        let new = Agreement::parse("n.toml", &new_text).unwrap();
        let changes = diff::diff(&old, &new);
        let shown: Vec<String> = changes.iter().map(|c| c.to_string()).collect();
        let first_other = changes
            .iter()
            .position(|c| c.impact != diff::Impact::Widens)
            .unwrap();
        assert!(
            changes[first_other..]
                .iter()
                .all(|c| c.impact != diff::Impact::Widens),
            "{shown:#?}"
        );
        let widening = &shown[..first_other];
        for s in [
            "[WIDENS]  flow \"f\": purposes widened: + research",
            "[WIDENS]  flow \"f\": retention 30 days then delete -> 365 days then delete (lengthened)",
            "[WIDENS]  flow \"f\": PatientName replaced by a keyed token -> KEPT unchanged (identifier newly kept)",
            "[WIDENS]  new flow \"g\": x -> y for teaching",
        ] {
            assert!(widening.iter().any(|w| w == s), "missing {s:?} in {shown:#?}");
        }
        assert!(
            shown
                .iter()
                .any(|s| s == "[narrows] flow \"f\": volume 2/day -> 1/day"),
            "{shown:#?}"
        );
        assert!(diff::diff(&old, &old).is_empty());
    }

    #[test]
    fn burned_in_text_mode_parses_round_trips_and_diffs() {
        let old = Agreement::parse("o.toml", GOOD).unwrap();
        let text = GOOD.replace(
            "options = [\"retain-longitudinal-modified-dates\"]",
            "options = [\"retain-longitudinal-modified-dates\"]\nburned_in_text = \"clean-pixel-data\"",
        );
        let new = Agreement::parse("n.toml", &text).unwrap();
        assert_eq!(
            new.flows[0].deid.burned_in_text,
            crate::deid::BurnedInTextMode::CleanPixelData
        );
        assert_eq!(
            Agreement::parse("f.toml", &format::format(&new)).unwrap(),
            new
        );
        let shown: Vec<String> = diff::diff(&old, &new)
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert!(
            shown.iter().any(|s| s.starts_with("[WIDENS]")
                && s.contains("burned-in text mode quarantine -> clean-pixel-data")),
            "{shown:#?}"
        );
        let back: Vec<String> = diff::diff(&new, &old)
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert!(
            back.iter()
                .any(|s| s.starts_with("[narrows]") && s.contains("now held back")),
            "{back:#?}"
        );
        let bad = GOOD.replace(
            "options = [\"retain-longitudinal-modified-dates\"]",
            "options = []\nburned_in_text = \"clean-pixel\"",
        );
        let err = Agreement::parse("b.toml", &bad).unwrap_err().to_string();
        assert!(
            err.starts_with("b.toml:39:18: unknown burned-in text mode \"clean-pixel\"")
                && err.contains("clean-pixel-data"),
            "{err}"
        );
    }
}
