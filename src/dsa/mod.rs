//! Data sharing agreements (DSA): the machine-readable policy a node enforces.
//!
//! Owns: the agreement model ([`Agreement`], [`Party`], [`Flow`], [`Purpose`]), the TOML parser
//! with file:line:col errors, and the lookups a node makes when it sends or receives (which flow,
//! which parties, which de-identification configuration).
//!
//! Does not own: DICOM bytes (a flow's de-identification settings are handed to `deid` as a
//! [`DeidConfig`]), nor certificates (the peer's site id comes from `federation`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::deid::{DeidConfig, ProfileOption};

/// A DSA error that points at the file, line and column where the problem is.
#[derive(Debug, thiserror::Error)]
pub enum DsaError {
    #[error("{file}: {source}")]
    Io {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", .0)]
    Invalid(Box<Located>),
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
        let at = at.min(text.len());
        let line_start = text[..at].rfind('\n').map(|i| i + 1).unwrap_or(0);
        let line_no = text[..at].matches('\n').count() + 1;
        let col = text[line_start..at].chars().count() + 1;
        let line_end = text[at..].find('\n').map(|i| at + i).unwrap_or(text.len());
        let line_text = &text[line_start..line_end];
        let gutter = format!("{line_no} | ");
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

/// Purposes of use, a fixed vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Purpose {
    Treatment,
    TeleradiologyReport,
    Research,
    ClinicalTrial,
    QualityImprovement,
    Teaching,
}

impl Purpose {
    pub fn name(self) -> &'static str {
        match self {
            Purpose::Treatment => "treatment",
            Purpose::TeleradiologyReport => "teleradiology-report",
            Purpose::Research => "research",
            Purpose::ClinicalTrial => "clinical-trial",
            Purpose::QualityImprovement => "quality-improvement",
            Purpose::Teaching => "teaching",
        }
    }

    pub fn parse(s: &str) -> Option<Purpose> {
        [
            Purpose::Treatment,
            Purpose::TeleradiologyReport,
            Purpose::Research,
            Purpose::ClinicalTrial,
            Purpose::QualityImprovement,
            Purpose::Teaching,
        ]
        .into_iter()
        .find(|p| p.name() == s)
    }
}

impl fmt::Display for Purpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The agreement's life-cycle state. Only an active agreement lets data move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Draft,
    Active,
    Suspended,
    Ended,
}

/// A site that is party to the agreement.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Party {
    /// Site id, as in the site certificate's URI SAN `urn:pacs-broker:site:<id>`.
    pub site: String,
    pub organisation: String,
    #[serde(default)]
    pub privacy_contact: String,
    #[serde(default)]
    pub suspended: bool,
}

/// One direction of disclosure: who sends what to whom, for which purposes, de-identified how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    pub name: String,
    pub from: String,
    pub to: String,
    pub purposes: BTreeSet<Purpose>,
    pub deid: DeidConfig,
}

/// A parsed data sharing agreement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agreement {
    pub id: String,
    pub version: u32,
    pub title: String,
    pub status: Status,
    pub parties: Vec<Party>,
    pub flows: Vec<Flow>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    agreement: RawAgreement,
    #[serde(default)]
    parties: Vec<Party>,
    #[serde(default)]
    flows: Vec<RawFlow>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgreement {
    id: String,
    version: u32,
    title: String,
    status: Status,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlow {
    name: String,
    from: String,
    to: String,
    purposes: Vec<Purpose>,
    #[serde(default)]
    deid: RawDeid,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawDeid {
    #[serde(default = "basic")]
    profile: String,
    #[serde(default)]
    options: Vec<toml::Spanned<String>>,
}

fn basic() -> String {
    "basic".into()
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

    /// Parses agreement text; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Agreement, DsaError> {
        let err =
            |at: usize, msg: String| DsaError::Invalid(Box::new(Located::at(file, text, at, msg)));
        let raw: RawFile = toml::from_str(text).map_err(|e| {
            let at = e.span().map(|s| s.start).unwrap_or(0);
            err(at, e.message().to_string())
        })?;
        let mut flows = Vec::new();
        for f in raw.flows {
            let mut options = BTreeSet::new();
            for o in f.deid.options {
                let parsed = o
                    .get_ref()
                    .parse::<ProfileOption>()
                    .map_err(|m| err(o.span().start, m))?;
                options.insert(parsed);
            }
            if f.deid.profile != "basic" {
                return Err(err(0, format!("unknown profile {:?}; only \"basic\" (PS3.15 Basic Application Level Confidentiality Profile) is defined", f.deid.profile)));
            }
            flows.push(Flow {
                name: f.name,
                from: f.from,
                to: f.to,
                purposes: f.purposes.into_iter().collect(),
                deid: DeidConfig {
                    options,
                    ..DeidConfig::default()
                },
            });
        }
        Ok(Agreement {
            id: raw.agreement.id,
            version: raw.agreement.version,
            title: raw.agreement.title,
            status: raw.agreement.status,
            parties: raw.parties,
            flows,
        })
    }

    /// The flow called `name`.
    pub fn flow(&self, name: &str) -> Option<&Flow> {
        self.flows.iter().find(|f| f.name == name)
    }

    /// The party with site id `site`.
    pub fn party(&self, site: &str) -> Option<&Party> {
        self.parties.iter().find(|p| p.site == site)
    }
}

/// The agreements a node enforces, by id.
#[derive(Debug, Clone, Default)]
pub struct AgreementSet {
    pub agreements: BTreeMap<String, Agreement>,
}

/// Why a transfer is refused under the agreements. Messages name no PHI.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no agreement {0:?} is in force at this site")]
    UnknownAgreement(String),
    #[error("agreement {0:?} is not active")]
    NotActive(String),
    #[error("agreement {agreement:?} has no flow {flow:?}")]
    UnknownFlow { agreement: String, flow: String },
    #[error("flow {flow:?} is from {expected:?}, but the peer is {actual:?}")]
    WrongSender {
        flow: String,
        expected: String,
        actual: String,
    },
    #[error("flow {flow:?} is to {expected:?}, not to this site {actual:?}")]
    WrongReceiver {
        flow: String,
        expected: String,
        actual: String,
    },
    #[error("party {0:?} is suspended in this agreement")]
    PartySuspended(String),
    #[error("purpose {purpose:?} is not allowed by flow {flow:?}")]
    PurposeNotAllowed { flow: String, purpose: String },
}

impl AgreementSet {
    /// Loads every `*.toml` agreement in a folder (or one file).
    pub fn load(path: &Path) -> Result<AgreementSet, DsaError> {
        let mut set = AgreementSet::default();
        let files: Vec<PathBuf> = if path.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|source| DsaError::Io {
                    file: path.to_owned(),
                    source,
                })?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "toml"))
                .collect();
            v.sort();
            v
        } else {
            vec![path.to_owned()]
        };
        for f in files {
            let a = Agreement::from_file(&f)?;
            set.agreements.insert(a.id.clone(), a);
        }
        Ok(set)
    }

    /// Checks that `sender` may send to `receiver` under (agreement, flow, purpose) and returns
    /// the flow. Both ends call this: the sender before it sends, the receiver on every offer.
    pub fn authorise(
        &self,
        agreement: &str,
        flow: &str,
        purpose: Option<&str>,
        sender: &str,
        receiver: &str,
    ) -> Result<(&Agreement, &Flow), Refusal> {
        let a = self
            .agreements
            .get(agreement)
            .ok_or_else(|| Refusal::UnknownAgreement(agreement.to_string()))?;
        if a.status != Status::Active {
            return Err(Refusal::NotActive(agreement.to_string()));
        }
        let f = a.flow(flow).ok_or_else(|| Refusal::UnknownFlow {
            agreement: agreement.to_string(),
            flow: flow.to_string(),
        })?;
        if f.from != sender {
            return Err(Refusal::WrongSender {
                flow: flow.to_string(),
                expected: f.from.clone(),
                actual: sender.to_string(),
            });
        }
        if f.to != receiver {
            return Err(Refusal::WrongReceiver {
                flow: flow.to_string(),
                expected: f.to.clone(),
                actual: receiver.to_string(),
            });
        }
        for site in [sender, receiver] {
            if a.party(site).is_none_or(|p| p.suspended) {
                return Err(Refusal::PartySuspended(site.to_string()));
            }
        }
        if let Some(p) = purpose.filter(|p| !p.is_empty()) {
            if !Purpose::parse(p).is_some_and(|p| f.purposes.contains(&p)) {
                return Err(Refusal::PurposeNotAllowed {
                    flow: flow.to_string(),
                    purpose: p.to_string(),
                });
            }
        }
        Ok((a, f))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[agreement]
id = "a1"
version = 1
title = "t"
status = "active"

[[parties]]
site = "x"
organisation = "X"

[[parties]]
site = "y"
organisation = "Y"

[[flows]]
name = "f"
from = "x"
to = "y"
purposes = ["treatment"]
[flows.deid]
options = ["retain-longitudinal-modified-dates"]
"#;

    #[test]
    fn parses_and_authorises() {
        let a = Agreement::parse("t.toml", GOOD).unwrap();
        let mut set = AgreementSet::default();
        set.agreements.insert(a.id.clone(), a);
        assert!(set
            .authorise("a1", "f", Some("treatment"), "x", "y")
            .is_ok());
        assert!(matches!(
            set.authorise("a1", "f", None, "y", "y"),
            Err(Refusal::WrongSender { .. })
        ));
        assert!(matches!(
            set.authorise("a1", "f", Some("research"), "x", "y"),
            Err(Refusal::PurposeNotAllowed { .. })
        ));
    }

    #[test]
    fn unknown_option_points_at_its_column() {
        let bad = GOOD.replace("retain-longitudinal-modified-dates", "retain-all");
        let DsaError::Invalid(e) = Agreement::parse("t.toml", &bad).unwrap_err() else {
            panic!()
        };
        assert_eq!(e.line, 22);
        assert_eq!(e.col, 12);
        assert!(e.message.contains("retain-all"));
    }
}
