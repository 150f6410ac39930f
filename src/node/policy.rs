//! Auditing the policy in force: which agreements a node enforces when `serve` starts (id,
//! version, status, the SHA-256 of the file every party signed), what each reload added, changed
//! or removed, and which agreement files were not enforced and why.
//!
//! Owns: turning an [`AgreementSet`] and the files it came from into audit entries.
//!
//! Does not own: loading, signing or enforcing agreements (`dsa`, [`super::load_agreements`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::audit::events::{self, kind};
use crate::audit::AuditLog;
use crate::dsa::{Agreement, AgreementSet};

/// Why the policy was (re)loaded, for the summary entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Trigger {
    ServeStart,
    Reload,
}

impl Trigger {
    fn describe(self) -> &'static str {
        match self {
            Trigger::ServeStart => "at serve start",
            Trigger::Reload => "reloaded after a change of the agreements folder",
        }
    }
}

/// One agreement file: where, what it says, and the SHA-256 of its bytes (what every party signs).
struct PolicyFile {
    path: PathBuf,
    agreement: Agreement,
    sha256: String,
}

/// Each agreement file of `path` (a folder, or one file), by agreement id.
fn agreement_files(path: &Path) -> BTreeMap<String, PolicyFile> {
    let files: Vec<PathBuf> = if path.is_dir() {
        std::fs::read_dir(path)
            .map(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "toml"))
                    .collect()
            })
            .unwrap_or_default()
    } else {
        vec![path.to_owned()]
    };
    let mut out = BTreeMap::new();
    for f in files {
        let (Ok(bytes), Ok(a)) = (std::fs::read(&f), Agreement::from_file(&f)) else {
            continue;
        };
        out.entry(a.id.clone()).or_insert(PolicyFile {
            path: f,
            agreement: a,
            sha256: hex::encode(Sha256::digest(&bytes)),
        });
    }
    out
}

/// How `new` differs from `old`, in a few words (empty when they are equal).
fn changes(old: &Agreement, new: &Agreement) -> Vec<String> {
    let mut out = Vec::new();
    if old.version != new.version {
        out.push(format!("version {} -> {}", old.version, new.version));
    }
    if old.status != new.status {
        out.push(format!("status {} -> {}", old.status, new.status));
    }
    for p in &new.parties {
        match old.party(&p.site) {
            None => out.push(format!("party {} added", p.site)),
            Some(o) if o.status != p.status => out.push(format!(
                "party {} {}",
                p.site,
                if p.is_suspended() {
                    "suspended"
                } else {
                    "reinstated"
                }
            )),
            Some(o) if o.certificate_pin != p.certificate_pin => {
                out.push(format!("party {} certificate pin changed", p.site))
            }
            _ => {}
        }
    }
    for p in old.parties.iter().filter(|p| new.party(&p.site).is_none()) {
        out.push(format!("party {} removed", p.site));
    }
    for f in &new.flows {
        match old.flow(&f.name) {
            None => out.push(format!("flow {} added", f.name)),
            Some(o) if o != f => out.push(format!("flow {} changed", f.name)),
            _ => {}
        }
    }
    for f in old.flows.iter().filter(|f| new.flow(&f.name).is_none()) {
        out.push(format!("flow {} removed", f.name));
    }
    if out.is_empty() && old != new {
        out.push("terms changed".into());
    }
    out
}

/// Audits the agreements in force: at serve start every one of them; after a reload those
/// added, changed or removed since `previous`. Then the files not enforced, and a summary.
pub(super) fn audit_policy(
    audit: &AuditLog,
    path: &Path,
    set: &AgreementSet,
    previous: Option<&AgreementSet>,
    rejected: &[(PathBuf, String)],
    trigger: Trigger,
) {
    let files = agreement_files(path);
    let empty = AgreementSet::default();
    for (id, a) in &set.agreements {
        // The fingerprint is the file's only when every party signed the file and it holds
        // exactly what is in force. An unsigned edit leaves the last fully signed version in
        // force, narrowed by the edit's suspensions: the file's hash is then not what was signed.
        let file = files.get(id);
        let signed =
            file.filter(|f| f.agreement == *a && !rejected.iter().any(|(r, _)| *r == f.path));
        let sha = signed.map(|f| f.sha256.as_str());
        let how = match (signed, file) {
            (Some(_), _) => "in force".to_string(),
            (None, Some(f)) => format!(
                "in force: the last fully signed version, with the suspensions of an unsigned edit applied (the file now has sha256 {})",
                f.sha256
            ),
            (None, None) => "in force: the last fully signed version (its file is gone)".into(),
        };
        let (action, outcome) = match previous.map(|p| p.agreements.get(id)) {
            None => (kind::POLICY_LOAD, how),
            Some(None) => (kind::POLICY_CHANGE, format!("added; {how}")),
            Some(Some(old)) => {
                let c = changes(old, a);
                if c.is_empty() {
                    continue;
                }
                (kind::POLICY_CHANGE, format!("{}; {how}", c.join(", ")))
            }
        };
        audit.record_or_warn(events::policy_agreement(
            action,
            id,
            a.version,
            &a.status.to_string(),
            sha,
            outcome,
        ));
    }
    for (id, old) in &previous.unwrap_or(&empty).agreements {
        if !set.agreements.contains_key(id) {
            audit.record_or_warn(events::policy_agreement(
                kind::POLICY_CHANGE,
                id,
                old.version,
                &old.status.to_string(),
                None,
                "removed: no longer in force".into(),
            ));
        }
    }
    for (file, why) in rejected {
        let name = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        audit.record_or_warn(crate::audit::Event {
            object: format!("agreement file {name}"),
            outcome: format!("not enforced: {why}"),
            ..events::policy_summary(trigger.describe(), 0, 0)
        });
    }
    audit.record_or_warn(events::policy_summary(
        trigger.describe(),
        set.agreements.len(),
        rejected.len(),
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(version: u32, suspend_b: bool) -> String {
        format!(
            r#"[agreement]
id = "agr"
version = {version}
title = "T"
status = "active"
valid_from = 2020-01-01
valid_until = 2099-12-31
governing_law = "Test"

[[parties]]
site = "a"
organisation = "A"
privacy_officer = "DPO A"
privacy_contact = "dpo@a.example"

[[parties]]
site = "b"
organisation = "B"
privacy_officer = "DPO B"
privacy_contact = "dpo@b.example"
status = "{}"

[[flows]]
name = "reads"
from = "a"
to = "b"
purposes = ["treatment"]

[flows.retention]
days = 30
after = "delete"
"#,
            if suspend_b { "suspended" } else { "active" }
        )
    }

    fn agreement(version: u32, suspend_b: bool) -> Agreement {
        Agreement::parse("agr.toml", &text(version, suspend_b)).unwrap()
    }

    #[test]
    fn changes_name_version_and_suspension() {
        assert!(changes(&agreement(1, false), &agreement(1, false)).is_empty());
        assert_eq!(
            changes(&agreement(1, false), &agreement(2, true)),
            vec!["version 1 -> 2", "party b suspended"]
        );
    }

    #[test]
    fn start_lists_every_agreement_with_its_fingerprint_and_reload_only_changes() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("agreements");
        std::fs::create_dir_all(&folder).unwrap();
        let file = folder.join("agr.toml");
        std::fs::write(&file, text(1, false)).unwrap();
        let log = AuditLog::open(&dir.path().join("audit.log")).unwrap();
        let mut set = AgreementSet::default();
        set.agreements.insert("agr".into(), agreement(1, false));
        audit_policy(&log, &folder, &set, None, &[], Trigger::ServeStart);
        let entries = crate::audit::read_entries(log.path()).unwrap();
        let sha = hex::encode(Sha256::digest(std::fs::read(&file).unwrap()));
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].event.action, "policy-load");
        assert_eq!(entries[0].event.agreement, "agr");
        assert_eq!(
            entries[0].event.object,
            format!("agreement agr version 1 (active), file sha256 {sha}")
        );
        assert_eq!(entries[0].event.outcome, "in force");
        assert_eq!(
            entries[1].event.object,
            "1 agreement(s) in force (at serve start)"
        );

        // A reload whose version in force is not the file's (an unsigned edit, narrowed).
        let previous = set.clone();
        set.agreements.insert("agr".into(), agreement(2, true));
        let bad = vec![(folder.join("bad.toml"), "not signed by b".to_string())];
        audit_policy(&log, &folder, &set, Some(&previous), &bad, Trigger::Reload);
        let entries = crate::audit::read_entries(log.path()).unwrap();
        assert_eq!(entries[2].event.action, "policy-change");
        assert!(
            entries[2]
                .event
                .outcome
                .starts_with("version 1 -> 2, party b suspended; in force: the last fully signed"),
            "{:?}",
            entries[2]
        );
        assert!(entries[2].event.object.ends_with("file sha256 unknown"));
        assert_eq!(entries[3].event.object, "agreement file bad.toml");
        assert_eq!(entries[3].event.outcome, "not enforced: not signed by b");
        assert_eq!(entries[4].event.outcome, "1 agreement file(s) not enforced");
        // Nothing changed: only the summary. Removed: said so.
        audit_policy(
            &log,
            &folder,
            &set,
            Some(&set.clone()),
            &[],
            Trigger::Reload,
        );
        assert_eq!(crate::audit::read_entries(log.path()).unwrap().len(), 6);
        audit_policy(
            &log,
            &folder,
            &AgreementSet::default(),
            Some(&set),
            &[],
            Trigger::Reload,
        );
        let entries = crate::audit::read_entries(log.path()).unwrap();
        assert_eq!(entries[6].event.outcome, "removed: no longer in force");
    }
}
