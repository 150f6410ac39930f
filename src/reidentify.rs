//! Re-identification by a person, under control.
//!
//! Owns: the decision whether a named local user may learn the original value behind a token
//! ([`authorise`], pure policy over the agreements, the user directory and the request), and the
//! one place that then opens the vault and audits ([`reidentify`]). Every call, allowed or
//! refused, is audited with the user, the token, the purpose and the justification — never the
//! original value.
//!
//! Who may: the user is known ([`crate::users::Directory`]), holds the `reidentify` role, and
//! holds one of the roles the agreement's returning flow names in `reidentify_by` (or is named
//! there); this site must be the origin of a flow of the agreement whose results return to it;
//! a justification is given. Does not own: the vault's cryptography ([`crate::pseudonym`]) or
//! the users list ([`crate::users`]).

use crate::audit::{AuditLog, Event};
use crate::dsa::{AgreementSet, Flow};
use crate::pseudonym::{KeyError, Vault, VaultEntry};
use crate::users::{Directory, User, ROLE_REIDENTIFY};

/// Longest justification accepted (it is written into the audit log).
pub const MAX_JUSTIFICATION_LEN: usize = 1000;

/// One person's request to see the original behind a token.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub agreement: &'a str,
    pub token: &'a str,
    pub user: &'a str,
    pub justification: &'a str,
    /// Purpose of use; defaults to the returning flow's first purpose.
    pub purpose: Option<&'a str>,
}

/// Why a re-identification is refused. Messages name the problem and never an original value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("a justification is required: say why you need the original value (--justification \"...\")")]
    MissingJustification,
    #[error("the justification is not usable: at most {MAX_JUSTIFICATION_LEN} characters, no control characters")]
    BadJustification,
    #[error("user `{0}` is not declared in this node's [[users]]")]
    UnknownUser(String),
    #[error("user `{user}` does not hold the role `{ROLE_REIDENTIFY}`")]
    MissingRole { user: String },
    #[error("no agreement `{agreement}` is in force at this site{hint}")]
    UnknownAgreement { agreement: String, hint: String },
    #[error("this site is not the origin of any flow of agreement `{agreement}` whose results return to it; only the origin may re-identify")]
    NotOrigin { agreement: String },
    #[error("agreement `{agreement}` names nobody who may re-identify (its flows' `reidentify_by` is empty)")]
    NobodyNamed { agreement: String },
    #[error("user `{user}` holds none of the roles agreement `{agreement}` allows to re-identify: {allowed}")]
    NotNamedByAgreement {
        user: String,
        agreement: String,
        allowed: String,
    },
    #[error("purpose `{purpose}` is not one of the purposes of agreement `{agreement}`'s returning flow: {allowed}")]
    WrongPurpose {
        purpose: String,
        agreement: String,
        allowed: String,
    },
    #[error("`{0}` is not a token or UID this project writes")]
    BadToken(String),
}

/// Why a re-identification did not give a value.
#[derive(Debug, thiserror::Error)]
pub enum ReidentifyError {
    #[error("refused: {0}")]
    Refused(#[from] Refusal),
    #[error("no token `{token}` was issued under agreement `{agreement}` at this site (or its vault was shredded)")]
    UnknownToken { agreement: String, token: String },
    #[error("the vault cannot be opened: {0}")]
    VaultUnavailable(String),
    /// The agreement was crypto-shredded (`vault shred`): says when.
    #[error("{0}")]
    Shredded(KeyError),
    #[error("the vault entry of token `{token}` cannot be opened (wrong key file, or the entry is corrupted)")]
    Vault {
        token: String,
        #[source]
        source: KeyError,
    },
}

/// What an allowed request resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorised {
    pub user: String,
    pub purpose: String,
    pub flow: String,
}

/// Whether `token` has the form of a token (16 base32 characters) or a `2.25.` UID this project
/// writes. Anything else is refused before it is looked up or audited.
pub fn is_project_token(token: &str) -> bool {
    let b = token.as_bytes();
    let base32 = b.len() == 16
        && b.iter()
            .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase());
    let uid = token.len() <= 64
        && token
            .strip_prefix("2.25.")
            .is_some_and(|d| !d.is_empty() && d.bytes().all(|c| c.is_ascii_digit()));
    base32 || uid
}

/// The flows of `agreement` from `site` whose results return to it.
fn returning_flows<'s>(set: &'s AgreementSet, agreement: &str, site: &str) -> Vec<&'s Flow> {
    set.agreements
        .get(agreement)
        .map(|a| {
            a.flows
                .iter()
                .filter(|f| f.from == site && f.results.return_to_origin)
                .collect()
        })
        .unwrap_or_default()
}

fn check_justification(j: &str) -> Result<(), Refusal> {
    if j.trim().is_empty() {
        return Err(Refusal::MissingJustification);
    }
    if j.chars().count() > MAX_JUSTIFICATION_LEN || j.chars().any(char::is_control) {
        return Err(Refusal::BadJustification);
    }
    Ok(())
}

fn check_user(directory: &dyn Directory, name: &str) -> Result<User, Refusal> {
    let user = directory
        .find(name)
        .ok_or_else(|| Refusal::UnknownUser(bounded(name, 64)))?;
    if !user.has_role(ROLE_REIDENTIFY) {
        return Err(Refusal::MissingRole { user: user.name });
    }
    Ok(user)
}

/// Decides a request. Pure: no vault, no audit, no clock.
pub fn authorise(
    set: &AgreementSet,
    site: &str,
    directory: &dyn Directory,
    req: &Request,
) -> Result<Authorised, Refusal> {
    check_justification(req.justification)?;
    let user = check_user(directory, req.user)?;
    if !set.agreements.contains_key(req.agreement) {
        let hint =
            crate::dsa::parse::suggest(req.agreement, set.agreements.keys().map(String::as_str))
                .map(|s| format!("; did you mean `{s}`?"))
                .unwrap_or_default();
        return Err(Refusal::UnknownAgreement {
            agreement: bounded(req.agreement, 64),
            hint,
        });
    }
    let flows = returning_flows(set, req.agreement, site);
    if flows.is_empty() {
        return Err(Refusal::NotOrigin {
            agreement: req.agreement.into(),
        });
    }
    let named: Vec<&str> = flows
        .iter()
        .flat_map(|f| f.results.reidentify_by.iter().map(String::as_str))
        .collect();
    if named.is_empty() {
        return Err(Refusal::NobodyNamed {
            agreement: req.agreement.into(),
        });
    }
    let Some(flow) = flows.iter().find(|f| {
        f.results
            .reidentify_by
            .iter()
            .any(|r| *r == user.name || user.has_role(r))
    }) else {
        return Err(Refusal::NotNamedByAgreement {
            user: user.name,
            agreement: req.agreement.into(),
            allowed: named.join("; "),
        });
    };
    let allowed: Vec<&str> = flow.purposes.iter().map(|p| p.name()).collect();
    let purpose = match req.purpose {
        Some(p) if allowed.contains(&p) => p.to_string(),
        Some(p) => {
            return Err(Refusal::WrongPurpose {
                purpose: bounded(p, 64),
                agreement: req.agreement.into(),
                allowed: allowed.join(", "),
            })
        }
        None => allowed.first().copied().unwrap_or_default().to_string(),
    };
    if !is_project_token(req.token) {
        return Err(Refusal::BadToken(bounded(req.token, 64)));
    }
    Ok(Authorised {
        user: user.name,
        purpose,
        flow: flow.name.clone(),
    })
}

/// `s` cut to `max` characters, control characters replaced: user-typed text on its way into a
/// message or an audit entry.
fn bounded(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .take(max)
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect();
    if s.chars().count() > max {
        out.push('…');
    }
    out
}

/// Decides the request, audits the decision and, if allowed, opens the vault (`open_vault` is
/// called only then, so a refusal never touches it). The audit entry carries the user, the
/// token, the purpose and the justification, never the original value.
pub fn reidentify<V: std::ops::Deref<Target = Vault>>(
    set: &AgreementSet,
    site: &str,
    directory: &dyn Directory,
    open_vault: impl FnOnce() -> Result<V, String>,
    audit: &AuditLog,
    req: &Request,
) -> Result<VaultEntry, ReidentifyError> {
    let event = |purpose: &str, outcome: String| Event {
        actor: format!("user:{}", bounded(req.user, 64)),
        action: "reidentify".into(),
        object: format!("token {}", bounded(req.token, 64)),
        agreement: bounded(req.agreement, 64),
        purpose: purpose.into(),
        outcome: format!(
            "{outcome}; justification: {:?}",
            bounded(req.justification, MAX_JUSTIFICATION_LEN)
        ),
    };
    let ok = match authorise(set, site, directory, req) {
        Ok(ok) => ok,
        Err(r) => {
            audit.record_or_warn(event(req.purpose.unwrap_or(""), format!("refused: {r}")));
            return Err(r.into());
        }
    };
    let vault = match open_vault() {
        Ok(v) => v,
        Err(e) => {
            audit.record_or_warn(event(&ok.purpose, "failed: vault unavailable".into()));
            return Err(ReidentifyError::VaultUnavailable(e));
        }
    };
    let found = vault.reidentify(req.agreement, req.token);
    let outcome = match &found {
        Ok(Some(e)) => format!("allowed: original {} shown to the user", e.attribute),
        Ok(None) => "refused: unknown token".to_string(),
        Err(KeyError::Shredded { on, .. }) => format!("refused: agreement shredded on {on}"),
        Err(_) => "failed: vault entry cannot be opened".to_string(),
    };
    audit.record_or_warn(event(&ok.purpose, outcome));
    match found {
        Ok(Some(e)) => Ok(e),
        Ok(None) => Err(ReidentifyError::UnknownToken {
            agreement: req.agreement.into(),
            token: req.token.into(),
        }),
        Err(e @ KeyError::Shredded { .. }) => Err(ReidentifyError::Shredded(e)),
        Err(source) => Err(ReidentifyError::Vault {
            token: req.token.into(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::users::{LocalUsers, UserConfig};

    const AGREEMENT: &str = include_str!("../policies/example-teleradiology.toml");

    fn set() -> AgreementSet {
        let a = crate::dsa::Agreement::parse("t.toml", AGREEMENT).expect("parses");
        let mut s = AgreementSet::default();
        s.agreements.insert(a.id.clone(), a);
        s
    }

    fn users() -> LocalUsers {
        LocalUsers::from_config(&[
            UserConfig {
                name: "dr-on-duty".into(),
                roles: vec![
                    "reidentify".into(),
                    "radiologist on duty at Hospital A".into(),
                ],
            },
            UserConfig {
                name: "clerk".into(),
                roles: vec!["radiologist on duty at Hospital A".into()],
            },
            UserConfig {
                name: "intern".into(),
                roles: vec!["reidentify".into()],
            },
        ])
        .unwrap()
    }

    fn req<'a>(user: &'a str, justification: &'a str) -> Request<'a> {
        Request {
            agreement: "example-teleradiology",
            token: "ABCDEFGHJK012345",
            user,
            justification,
            purpose: None,
        }
    }

    #[test]
    fn the_named_role_with_a_justification_may() {
        let ok = authorise(
            &set(),
            "hospital-a",
            &users(),
            &req("dr-on-duty", "file report"),
        )
        .unwrap();
        assert_eq!(ok.purpose, "treatment");
        assert_eq!(ok.flow, "ct-reads");
    }

    #[test]
    fn refusals_name_the_problem() {
        let (s, u) = (set(), users());
        let r = |req: Request| authorise(&s, "hospital-a", &u, &req).unwrap_err();
        assert_eq!(r(req("dr-on-duty", "  ")), Refusal::MissingJustification);
        assert_eq!(r(req("nobody", "x")), Refusal::UnknownUser("nobody".into()));
        assert!(matches!(r(req("clerk", "x")), Refusal::MissingRole { .. }));
        assert!(matches!(
            r(req("intern", "x")),
            Refusal::NotNamedByAgreement { .. }
        ));
        let mut wrong = req("dr-on-duty", "x");
        wrong.agreement = "example-teleradiolgy";
        let e = r(wrong).to_string();
        assert!(e.contains("did you mean `example-teleradiology`"), "{e}");
        let mut bad = req("dr-on-duty", "x");
        bad.token = "../../etc";
        assert!(matches!(r(bad), Refusal::BadToken(_)));
        let mut p = req("dr-on-duty", "x");
        p.purpose = Some("research");
        assert!(matches!(r(p), Refusal::WrongPurpose { .. }));
    }

    #[test]
    fn only_the_origin_may() {
        let e = authorise(&set(), "telerad-c", &users(), &req("dr-on-duty", "x")).unwrap_err();
        assert!(matches!(e, Refusal::NotOrigin { .. }));
    }

    #[test]
    fn token_forms() {
        assert!(is_project_token("ABCDEFGHJK012345"));
        assert!(is_project_token("2.25.1234567890"));
        assert!(!is_project_token("2.25."));
        assert!(!is_project_token("abcdefghjk012345"));
        assert!(!is_project_token("1.2.840.10008"));
    }
}
