//! What a node asks the agreements before it sends or accepts a study: [`AgreementSet`], the
//! [`TransferRequest`] it describes, and the [`Refusal`] it gets. Pure functions of the loaded
//! agreements and the request; the node keeps the state (volume counts, reloads).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use time::{Date, OffsetDateTime};

use super::model::*;
use super::sign::{self, FederationCa, Verdict};
use super::{Agreement, DsaError};

/// What a study is, as far as the flow's selector is concerned. The sender fills in everything
/// it knows; the receiver fills in what the offer carries (at least the modalities). A `None` or
/// empty criterion is not checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StudyFacts {
    pub modalities: Vec<String>,
    pub body_parts: Vec<String>,
    pub study_date: Option<Date>,
    pub description: Option<String>,
    pub source_ae: Option<String>,
}

/// One proposed transfer: under which agreement, flow and purpose, between which sites, of what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferRequest<'r> {
    pub agreement: &'r str,
    pub flow: &'r str,
    /// As sent on the wire; must be a purpose of the flow.
    pub purpose: &'r str,
    /// Site ids from the verified certificates (never from request fields).
    pub sender: &'r str,
    pub receiver: &'r str,
    pub study: &'r StudyFacts,
    pub today: Date,
}

/// Why a transfer is refused under the agreements. Messages name no PHI.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("no agreement {0:?} is in force at this site (unknown, or refused at load: unsigned or invalid)")]
    UnknownAgreement(String),
    #[error("agreement {agreement:?} is {status}, not active")]
    NotActive { agreement: String, status: Status },
    #[error("agreement {agreement:?} is valid from {from}, not yet on {today}")]
    NotYetValid {
        agreement: String,
        from: Date,
        today: Date,
    },
    #[error("agreement {agreement:?} expired on {until} (today is {today})")]
    Expired {
        agreement: String,
        until: Date,
        today: Date,
    },
    #[error("agreement {agreement:?} has no flow {flow:?}")]
    UnknownFlow { agreement: String, flow: String },
    #[error("flow {flow:?} is from {expected:?}, but the sender is {actual:?}")]
    WrongSender {
        flow: String,
        expected: String,
        actual: String,
    },
    #[error("flow {flow:?} is to {expected:?}, not to {actual:?}")]
    WrongReceiver {
        flow: String,
        expected: String,
        actual: String,
    },
    #[error("site {site:?} is not a party to agreement {agreement:?}")]
    NotAParty { agreement: String, site: String },
    #[error("party {site:?} is suspended in agreement {agreement:?}")]
    PartySuspended { agreement: String, site: String },
    #[error("purpose {purpose:?} is not allowed by flow {flow:?} (allowed: {allowed})")]
    PurposeNotAllowed {
        flow: String,
        purpose: String,
        allowed: String,
    },
    #[error("flow {flow:?} does not cover this study: {why}")]
    NotSelected { flow: String, why: String },
    #[error("flow {flow:?} allows {limit} studies per day and {count} were already sent today")]
    OverVolume {
        flow: String,
        limit: u32,
        count: u32,
    },
}

/// Whether `text` matches a `*`/`?` pattern, ignoring ASCII case.
pub fn matches_pattern(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.to_ascii_uppercase().chars().collect();
    let t: Vec<char> = text.to_ascii_uppercase().chars().collect();
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

impl Selector {
    /// Why `study` falls outside this selector, or `Ok`.
    pub fn check(&self, study: &StudyFacts) -> Result<(), String> {
        if !self.modalities.is_empty() {
            if study.modalities.is_empty() {
                return Err("the study's modality is not known and the flow is limited to listed modalities".into());
            }
            if let Some(m) = study
                .modalities
                .iter()
                .find(|m| !self.modalities.contains(*m))
            {
                return Err(format!("modality {m} is not in the flow's modalities"));
            }
        }
        if !self.body_parts.is_empty() {
            if let Some(b) = study
                .body_parts
                .iter()
                .find(|b| !self.body_parts.contains(&b.to_ascii_uppercase()))
            {
                return Err(format!("body part {b} is not in the flow's body parts"));
            }
        }
        if let Some(d) = study.study_date {
            if self.study_date_from.is_some_and(|f| d < f)
                || self.study_date_until.is_some_and(|u| d > u)
            {
                return Err("the study date is outside the flow's study date range".into());
            }
        }
        if let (Some(p), Some(d)) = (&self.description, &study.description) {
            if !matches_pattern(p, d) {
                return Err("the study description does not match the flow's pattern".into());
            }
        }
        if let Some(ae) = &study.source_ae {
            if !self.source_aes.is_empty() && !self.source_aes.contains(ae.trim()) {
                return Err("the study does not come from one of the flow's source AEs".into());
            }
        }
        Ok(())
    }
}

impl Flow {
    /// The volume limit check: `sent_today` studies were already sent (or accepted) today on
    /// this flow. The node keeps the count; call this before sending or accepting one more.
    pub fn check_volume(&self, sent_today: u32) -> Result<(), Refusal> {
        match self.studies_per_day {
            Some(limit) if sent_today >= limit => Err(Refusal::OverVolume {
                flow: self.name.clone(),
                limit,
                count: sent_today,
            }),
            _ => Ok(()),
        }
    }
}

/// The agreements a node enforces, by id.
#[derive(Debug, Clone, Default)]
pub struct AgreementSet {
    pub agreements: BTreeMap<String, Agreement>,
}

fn policy_files(dir: &Path) -> Result<Vec<PathBuf>, DsaError> {
    if !dir.is_dir() {
        return Ok(vec![dir.to_owned()]);
    }
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| DsaError::Io {
            file: dir.to_owned(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "toml"))
        .collect();
    v.sort();
    Ok(v)
}

impl AgreementSet {
    /// Loads every `*.toml` agreement in a folder (or one file), without checking signatures.
    /// For tools and tests; a node uses [`AgreementSet::load_enforced`].
    pub fn load(path: &Path) -> Result<AgreementSet, DsaError> {
        let mut set = AgreementSet::default();
        for f in policy_files(path)? {
            let a = Agreement::from_file(&f)?;
            set.agreements.insert(a.id.clone(), a);
        }
        Ok(set)
    }

    /// Loads the agreements in `dir` (or one file) that every party has signed, over their exact
    /// bytes, with a certificate issued by the CA in `ca_cert_pem` and naming the party's site
    /// id. Returns the refused files with a reason each, for the node's log. A second file with
    /// an agreement id already loaded is refused too.
    pub fn load_enforced(dir: &Path, ca_cert_pem: &Path) -> (AgreementSet, Vec<(PathBuf, String)>) {
        Self::load_enforced_at(dir, ca_cert_pem, OffsetDateTime::now_utc())
    }

    /// [`AgreementSet::load_enforced`] at a given time (certificate validity is checked at `now`).
    pub fn load_enforced_at(
        dir: &Path,
        ca_cert_pem: &Path,
        now: OffsetDateTime,
    ) -> (AgreementSet, Vec<(PathBuf, String)>) {
        let mut set = AgreementSet::default();
        let mut refused = Vec::new();
        let files = match policy_files(dir) {
            Ok(f) => f,
            Err(e) => return (set, vec![(dir.to_owned(), e.to_string())]),
        };
        let ca = match FederationCa::from_pem_file(ca_cert_pem) {
            Ok(ca) => ca,
            Err(e) => {
                let why = format!("cannot check signatures: {e}");
                return (set, files.into_iter().map(|f| (f, why.clone())).collect());
            }
        };
        for f in files {
            match load_signed(&f, &ca, now) {
                Ok(a) if set.agreements.contains_key(&a.id) => {
                    refused.push((
                        f,
                        format!(
                            "agreement id {:?} is already loaded from another file",
                            a.id
                        ),
                    ));
                }
                Ok(a) => {
                    set.agreements.insert(a.id.clone(), a);
                }
                Err(why) => refused.push((f, why)),
            }
        }
        (set, refused)
    }

    /// The earlier call form, kept so existing callers compile: checks status, validity today
    /// (UTC), parties, suspension, direction and purpose, but not the study selector.
    /// Prefer [`AgreementSet::authorise_transfer`], which also checks what the study is.
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
        let f = a.flow(flow).ok_or_else(|| Refusal::UnknownFlow {
            agreement: agreement.to_string(),
            flow: flow.to_string(),
        })?;
        let purpose = purpose.unwrap_or_else(|| f.purposes.iter().next().map_or("", |p| p.name()));
        let unselective = Flow {
            select: Selector::default(),
            ..f.clone()
        };
        let study = StudyFacts::default();
        let req = TransferRequest {
            agreement,
            flow,
            purpose,
            sender,
            receiver,
            study: &study,
            today: OffsetDateTime::now_utc().date(),
        };
        check_transfer(a, &unselective, &req)?;
        Ok((a, f))
    }

    /// Checks a proposed transfer against the agreements and returns the agreement and flow.
    /// Both ends call this: the sender before it sends, the receiver on every offer. Volume is
    /// checked separately with [`Flow::check_volume`].
    pub fn authorise_transfer(
        &self,
        req: &TransferRequest,
    ) -> Result<(&Agreement, &Flow), Refusal> {
        let a = self
            .agreements
            .get(req.agreement)
            .ok_or_else(|| Refusal::UnknownAgreement(req.agreement.to_string()))?;
        let f = a.flow(req.flow).ok_or_else(|| Refusal::UnknownFlow {
            agreement: a.id.clone(),
            flow: req.flow.to_string(),
        })?;
        check_transfer(a, f, req)?;
        Ok((a, f))
    }

    /// Whether `site` may still exchange anything under `agreement` today: the agreement is
    /// active and valid and neither `site` nor `peer` is suspended. A node calls this on every
    /// chunk of an in-flight transfer (after a reload) to cut it off at once.
    pub fn still_allowed(
        &self,
        agreement: &str,
        sender: &str,
        receiver: &str,
        today: Date,
    ) -> Result<(), Refusal> {
        let a = self
            .agreements
            .get(agreement)
            .ok_or_else(|| Refusal::UnknownAgreement(agreement.to_string()))?;
        in_force(a, sender, receiver, today)
    }
}

/// Whether agreement `a` is in force today between `sender` and `receiver`: active, within its
/// validity, both sites parties and neither suspended.
fn in_force(a: &Agreement, sender: &str, receiver: &str, today: Date) -> Result<(), Refusal> {
    let id = a.id.clone();
    if a.status != Status::Active {
        return Err(Refusal::NotActive {
            agreement: id,
            status: a.status,
        });
    }
    if today < a.valid_from {
        return Err(Refusal::NotYetValid {
            agreement: id,
            from: a.valid_from,
            today,
        });
    }
    if today > a.valid_until {
        return Err(Refusal::Expired {
            agreement: id,
            until: a.valid_until,
            today,
        });
    }
    for site in [sender, receiver] {
        match a.party(site) {
            None => {
                return Err(Refusal::NotAParty {
                    agreement: id,
                    site: site.to_string(),
                })
            }
            Some(p) if p.is_suspended() => {
                return Err(Refusal::PartySuspended {
                    agreement: id,
                    site: site.to_string(),
                })
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Every check of [`AgreementSet::authorise_transfer`] on one agreement and flow.
fn check_transfer(a: &Agreement, f: &Flow, req: &TransferRequest) -> Result<(), Refusal> {
    in_force(a, req.sender, req.receiver, req.today)?;
    if f.from != req.sender {
        return Err(Refusal::WrongSender {
            flow: f.name.clone(),
            expected: f.from.clone(),
            actual: req.sender.to_string(),
        });
    }
    if f.to != req.receiver {
        return Err(Refusal::WrongReceiver {
            flow: f.name.clone(),
            expected: f.to.clone(),
            actual: req.receiver.to_string(),
        });
    }
    if !Purpose::parse(req.purpose).is_some_and(|p| f.purposes.contains(&p)) {
        let allowed: Vec<&str> = f.purposes.iter().map(|p| p.name()).collect();
        return Err(Refusal::PurposeNotAllowed {
            flow: f.name.clone(),
            purpose: req.purpose.to_string(),
            allowed: allowed.join(", "),
        });
    }
    f.select
        .check(req.study)
        .map_err(|why| Refusal::NotSelected {
            flow: f.name.clone(),
            why,
        })?;
    Ok(())
}

/// Reads, parses and verifies one agreement file; the reason it is refused otherwise.
fn load_signed(path: &Path, ca: &FederationCa, now: OffsetDateTime) -> Result<Agreement, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    let text = String::from_utf8(bytes.clone()).map_err(|_| "not UTF-8 text".to_string())?;
    let a = Agreement::parse(&path.display().to_string(), &text).map_err(|e| {
        format!(
            "has errors ({} problem(s)); run `pacs-broker dsa check`: {e}",
            e.count()
        )
    })?;
    let v = sign::verify(path, &bytes, &a, ca, now);
    match v.verdict() {
        Verdict::FullySigned => Ok(a),
        Verdict::Unsigned => Err(format!(
            "agreement {:?} version {} is not signed by every party: {}",
            a.id,
            a.version,
            v.problems()
        )),
        Verdict::Mismatch => Err(format!(
            "agreement {:?} version {}: a signature does not match this file: {}",
            a.id,
            a.version,
            v.problems()
        )),
    }
}
