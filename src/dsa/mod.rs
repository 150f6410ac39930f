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
