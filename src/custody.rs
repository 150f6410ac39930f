//! Custody of a site's keys over the data's life: crypto-shredding an ended agreement
//! (`pacs-broker vault shred`) and rotating the data-encryption keys (`pacs-broker keys rotate`).
//!
//! Owns: when an agreement may be shredded ([`may_shred`]: pure policy, the clock a parameter:
//! the agreement's signed version in force says `ended`, and the longest retention of its flows
//! has passed since its last disclosure), the two operations ([`shred`], [`rotate`]) and their
//! audit entries (when, by whom, what).
//!
//! Does not own: the cryptography (the key file is `keyring`, the vault `pseudonym`, sealed files
//! `store::sealed`), nor where the data lives (`store`, `node`).

use std::path::{Path, PathBuf};

use time::OffsetDateTime;

use crate::audit::{AuditLog, Event};
use crate::dsa::{Agreement, AgreementSet, Status};
use crate::pseudonym::{KeyError, SiteKeys, Vault};
use crate::store::sealed::AtRest;

/// Why an agreement may not be shredded (yet). Messages name the agreement, never a value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShredRefusal {
    #[error("agreement `{0}` is not in force at this site (unknown, or not signed by every party); only an agreement whose signed version says `ended` can be shredded")]
    Unknown(String),
    #[error("agreement `{id}` is `{status}`; only an ended agreement can be shredded\n  help: sign a version with `status = \"ended\"` by every party first")]
    NotEnded { id: String, status: &'static str },
    #[error("agreement `{id}`: its retention ({days} days after its last disclosure on {last}) runs until {until}; shredding is refused until then")]
    RetentionRunning {
        id: String,
        days: u32,
        last: String,
        until: String,
    },
}

/// Errors of [`shred`] and [`rotate`].
#[derive(Debug, thiserror::Error)]
pub enum CustodyError {
    #[error("refused: {0}")]
    Refused(#[from] ShredRefusal),
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error("the vault cannot be opened: {0}")]
    Vault(String),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    #[error("refused: {0}")]
    Retire(RetireRefusal),
}

/// The longest retention of an agreement's flows in days (a flow without one counts as 0: its
/// partners were not promised any time).
pub fn retention_days(a: &Agreement) -> u32 {
    a.flows
        .iter()
        .filter_map(|f| f.retention.as_ref().map(|r| r.days))
        .max()
        .unwrap_or(0)
}

fn shown(t: OffsetDateTime) -> String {
    crate::pseudonym::shown_date(t.unix_timestamp().max(0) as u64)
}

/// Whether agreement `id` may be shredded at `now`, given when data last left under it.
pub fn may_shred(
    set: &AgreementSet,
    id: &str,
    last_disclosure: Option<OffsetDateTime>,
    now: OffsetDateTime,
) -> Result<(), ShredRefusal> {
    let a = set
        .agreements
        .get(id)
        .ok_or_else(|| ShredRefusal::Unknown(id.to_string()))?;
    if a.status != Status::Ended {
        return Err(ShredRefusal::NotEnded {
            id: id.to_string(),
            status: a.status.name(),
        });
    }
    let days = retention_days(a);
    if let Some(last) = last_disclosure {
        let until = last + time::Duration::days(i64::from(days));
        if now < until {
            return Err(ShredRefusal::RetentionRunning {
                id: id.to_string(),
                days,
                last: shown(last),
                until: shown(until),
            });
        }
    }
    Ok(())
}

/// When data last left this site under `agreement`, from the audit log (`disclose` entries).
pub fn last_disclosure(
    audit_log: &Path,
    agreement: &str,
) -> Result<Option<OffsetDateTime>, CustodyError> {
    let entries = crate::audit::read_entries(audit_log)?;
    Ok(entries
        .iter()
        .filter(|e| e.event.agreement == agreement && e.event.action == "disclose")
        .filter_map(|e| {
            OffsetDateTime::parse(&e.time, &time::format_description::well_known::Rfc3339).ok()
        })
        .max())
}

/// Why the vault could not be opened for [`shred`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VaultOpen {
    /// A running node holds the vault database (sled locks it): the records are left to it.
    InUse,
    Failed(String),
}

/// What [`shred`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shredded {
    /// Vault records destroyed now (0 when `by_running_node`).
    pub records: usize,
    /// The vault was held by a running node: the token secret is destroyed, and that node
    /// deletes the records ([`complete_pending_shreds`]), audited when done.
    pub by_running_node: bool,
    /// The agreement's tokens were made under the site token key (before v2 key files): its
    /// vault records are gone, but a token can still be recomputed from a guessed original.
    pub legacy: bool,
}

/// Crypto-shreds agreement `id` if [`may_shred`] allows it at `now`: its vault records and its
/// token secret are destroyed. Audited either way, with `actor` (who asked) and the outcome.
///
/// Beside a running node that holds the vault: the token secret is destroyed in the key file at
/// once (from then on no token of the agreement is reversed or issued: the vault and the key
/// file both refuse), and the node deletes the records within its next housekeeping round
/// ([`complete_pending_shreds`]), audited by it.
pub fn shred(
    set: &AgreementSet,
    id: &str,
    keys: &SiteKeys,
    open_vault: impl FnOnce() -> Result<std::sync::Arc<Vault>, VaultOpen>,
    audit: &AuditLog,
    actor: &str,
    now: OffsetDateTime,
) -> Result<Shredded, CustodyError> {
    let event = |outcome: String| Event {
        actor: actor.to_string(),
        action: "vault-shred".into(),
        object: format!("vault records and token secret of agreement {id}"),
        agreement: id.to_string(),
        purpose: String::new(),
        outcome,
    };
    let last = last_disclosure(audit.path(), id)?;
    if let Err(r) = may_shred(set, id, last, now) {
        audit.record_or_warn(event(format!("refused: {r}")));
        return Err(r.into());
    }
    // Legacy when its tokens are under the site key: no secret of its own to destroy.
    let legacy = keys.agreement_is_legacy(id);
    let legacy_note = if legacy {
        "; legacy agreement: its tokens were made under the site token key, which stays"
    } else {
        " and its token secret destroyed: its tokens can never be reversed again"
    };
    let vault = match open_vault() {
        Ok(v) => v,
        Err(VaultOpen::InUse) => {
            if let Err(e) = keys.shred_agreement(id) {
                audit.record(event(format!("failed: {e}")))?;
                return Err(e.into());
            }
            audit.record(event(format!(
                "ok: token secret destroyed{}; the running node that holds the vault deletes its records",
                if legacy { " (legacy agreement: none of its own; the site token key stays)" } else { "" }
            )))?;
            return Ok(Shredded {
                records: 0,
                by_running_node: true,
                legacy,
            });
        }
        Err(VaultOpen::Failed(e)) => {
            audit.record_or_warn(event("failed: vault unavailable".into()));
            return Err(CustodyError::Vault(e));
        }
    };
    let records = match vault.shred(id) {
        Ok(n) => n,
        Err(e) => {
            audit.record(event(format!("failed: {e}")))?;
            return Err(e.into());
        }
    };
    audit.record(event(format!(
        "ok: {records} vault records destroyed{legacy_note}"
    )))?;
    Ok(Shredded {
        records,
        by_running_node: false,
        legacy,
    })
}

/// A serving node's part of [`shred`]: the vault records of every agreement whose token secret
/// the key file says was destroyed, and whose records this vault has not destroyed yet, are
/// deleted now (audited as `vault-shred` by `node`). `done` remembers the agreements already
/// settled, so the vault is opened only when a new shred appears. Returns (agreement, records
/// destroyed) for each one completed.
pub fn complete_pending_shreds(
    keys: &SiteKeys,
    open_vault: impl FnOnce() -> Result<std::sync::Arc<Vault>, String>,
    audit: &AuditLog,
    done: &mut std::collections::BTreeSet<String>,
) -> Vec<(String, usize)> {
    let pending: Vec<String> = keys
        .shredded_agreements()
        .into_iter()
        .filter(|a| !done.contains(a))
        .collect();
    if pending.is_empty() {
        return Vec::new();
    }
    let vault = match open_vault() {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "a shredded agreement's vault records wait: the vault cannot be opened now");
            return Vec::new();
        }
    };
    let mut completed = Vec::new();
    for id in pending {
        let shredded = vault.records_shredded(&id).and_then(|gone| {
            if gone {
                Ok(None)
            } else {
                vault.shred(&id).map(Some)
            }
        });
        match shredded {
            Ok(None) => {
                done.insert(id);
            }
            Ok(Some(n)) => {
                audit.record_or_warn(Event {
                    actor: "node".into(),
                    action: "vault-shred".into(),
                    object: format!("vault records of agreement {id}"),
                    agreement: id.clone(),
                    purpose: String::new(),
                    outcome: format!(
                        "ok: {n} vault records destroyed, completing `vault shred` (its token secret was destroyed first)"
                    ),
                });
                tracing::info!(agreement = %id, records = n, "shredded agreement: vault records destroyed");
                done.insert(id.clone());
                completed.push((id, n));
            }
            Err(e) => {
                tracing::error!(agreement = %id, error = %e, "a shredded agreement's vault records could not be destroyed; retried");
            }
        }
    }
    completed
}

/// What [`rotate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotated {
    pub new_key: String,
    pub upgraded_from_v1: bool,
    /// Instance files re-sealed under the new key, and those that could not be (logged).
    pub files: usize,
    pub failed: usize,
    /// Vault records re-sealed, or why the vault was left alone.
    pub vault_records: Result<usize, String>,
}

/// Where a node keeps sealed files (relative to its data folder).
const SEALED_DIRS: &[&str] = &[
    "store/blobs",
    "store/staging/resume",
    "store/sums",
    "quarantine",
];

/// Rotates the data-encryption key: a new one becomes current in the key file (a v1 file is
/// upgraded to v2, its agreements kept as legacy so their tokens stay), then every sealed file
/// under `data_dir` and every vault record is re-sealed under it. A running node keeps reading
/// old and new files (old keys stay in the key file) and starts sealing under the new key within
/// seconds; a crash at any point leaves each file under the old key or the new one. The token
/// key is never changed. Audited.
pub fn rotate(
    keys: &SiteKeys,
    data_dir: &Path,
    known_agreements: &[String],
    at_rest: &AtRest,
    open_vault: impl FnOnce() -> Result<std::sync::Arc<Vault>, String>,
    audit: &AuditLog,
    actor: &str,
) -> Result<Rotated, CustodyError> {
    let upgraded_from_v1 = keys.is_v1();
    let new_key = keys.rotate(known_agreements)?;
    let dirs: Vec<PathBuf> = SEALED_DIRS.iter().map(|d| data_dir.join(d)).collect();
    let (mut files, mut failed) = crate::store::reseal_tree(at_rest, &dirs);
    let outbox =
        crate::store::outbox::Outbox::new(data_dir.join("outbox")).with_at_rest(at_rest.clone());
    let (f, x) = outbox.reseal_all();
    files += f;
    failed += x;
    let returns = crate::results::queue::ReturnQueue::new(data_dir).with_at_rest(at_rest.clone());
    let (f, x) = returns.reseal_all();
    files += f;
    failed += x;
    let vault_records = match open_vault() {
        Ok(v) => v.reseal().map(|(n, _)| n).map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    let vault_note = match &vault_records {
        Ok(n) => format!("{n} vault records re-sealed"),
        Err(e) => format!("vault not re-sealed ({e}); its records stay readable under their keys"),
    };
    audit.record(Event {
        actor: actor.to_string(),
        action: "keys-rotate".into(),
        object: format!("data-encryption key {new_key}"),
        agreement: String::new(),
        purpose: String::new(),
        outcome: format!(
            "ok: {files} files re-sealed, {failed} failed; {vault_note}{}",
            if upgraded_from_v1 {
                "; key file upgraded from v1 to v2"
            } else {
                ""
            }
        ),
    })?;
    Ok(Rotated {
        new_key,
        upgraded_from_v1,
        files,
        failed,
        vault_records,
    })
}

/// What [`retire`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retired {
    /// Data keys removed from the key file.
    pub removed: Vec<String>,
    /// Older keys kept because something is still sealed under them (id, files or records).
    pub kept: Vec<(String, usize)>,
    pub files_scanned: usize,
}

/// Why [`retire`] removed nothing.
#[derive(Debug, thiserror::Error)]
pub enum RetireRefusal {
    #[error("the vault cannot be read now ({0}); no key was retired, since its records may still need one\n  help: run it again when the node is idle or stopped")]
    Vault(String),
    #[error("{n} files under the data folder could not be read (the first: `{first}`): no key was retired, since they may still need one")]
    Unreadable { n: usize, first: String },
}

/// Removes from the key file every data-encryption key that nothing under `data_dir` and no
/// vault record is sealed under any more (after `keys rotate` re-sealed everything), keeping the
/// current key always. Every file of the data folder is looked at (its sealed header names its
/// key), so whatever component sealed it, nothing still needed is removed; if a file cannot be
/// read or the vault cannot be opened, nothing is removed. A running node seals new files under
/// the current key only, so it may run meanwhile. Backups of the data folder taken before the
/// last rotation need the retired keys: keep a copy of the key file with such backups (see
/// docs/keys.md). Audited (`keys-retire`).
pub fn retire(
    keys: &SiteKeys,
    data_dir: &Path,
    open_vault: impl FnOnce() -> Result<std::sync::Arc<Vault>, String>,
    audit: &AuditLog,
    actor: &str,
) -> Result<Retired, CustodyError> {
    let event = |outcome: String| Event {
        actor: actor.to_string(),
        action: "keys-retire".into(),
        object: "data-encryption keys no longer used".into(),
        agreement: String::new(),
        purpose: String::new(),
        outcome,
    };
    let (ids, current) = keys.data_key_ids();
    let mut uses: std::collections::BTreeMap<String, usize> = Default::default();
    let (mut scanned, mut unreadable) = (0usize, Vec::new());
    for entry in walkdir::WalkDir::new(data_dir).into_iter() {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                unreadable.push(
                    e.path()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                );
                continue;
            }
        };
        if !entry.file_type().is_file() {
            continue;
        }
        scanned += 1;
        if entry.path().extension().is_some_and(|e| e == "wal") {
            // An ingest log slot holds many sealed records, each with its own header.
            match std::fs::read(entry.path()) {
                Ok(bytes) => {
                    for id in sealed_key_ids_within(&bytes) {
                        *uses.entry(id).or_default() += 1;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(_) => unreadable.push(entry.path().display().to_string()),
            }
            continue;
        }
        match AtRest::key_id_of(entry.path()) {
            Ok(Some(id)) => *uses.entry(id).or_default() += 1,
            Ok(None) => {}
            // Removed between listing and reading (a file the node just renamed or deleted).
            Err(crate::store::sealed::SealError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound => {}
            Err(_) => unreadable.push(entry.path().display().to_string()),
        }
    }
    let refuse = |r: RetireRefusal| {
        audit.record_or_warn(event(format!("refused: {r}")));
        Err(CustodyError::Retire(r))
    };
    if let Some(first) = unreadable.first() {
        return refuse(RetireRefusal::Unreadable {
            n: unreadable.len(),
            first: first.clone(),
        });
    }
    match open_vault().and_then(|v| v.data_key_ids().map_err(|e| e.to_string())) {
        Ok(vault_ids) => {
            for id in vault_ids {
                *uses.entry(id).or_default() += 1;
            }
        }
        Err(e) => return refuse(RetireRefusal::Vault(e)),
    }
    let unused: std::collections::BTreeSet<String> = ids
        .iter()
        .filter(|id| **id != current && !uses.contains_key(*id))
        .cloned()
        .collect();
    let removed = if unused.is_empty() {
        Vec::new()
    } else {
        keys.retire_data_keys(&unused)?
    };
    let kept: Vec<(String, usize)> = ids
        .iter()
        .filter(|id| **id != current)
        .filter_map(|id| uses.get(id).map(|n| (id.clone(), *n)))
        .collect();
    audit.record(event(format!(
        "ok: {} keys retired ({}); {} older keys still in use; {scanned} files scanned",
        removed.len(),
        removed.join(", "),
        kept.len()
    )))?;
    Ok(Retired {
        removed,
        kept,
        files_scanned: scanned,
    })
}

/// Key ids named by the sealed headers found anywhere in `bytes` (`PBSEALED`, version 1, key-id
/// length, key id): an ingest log slot holds one per record, at page boundaries. Conservative:
/// a record already moved out but not yet overwritten still counts.
fn sealed_key_ids_within(bytes: &[u8]) -> std::collections::BTreeSet<String> {
    const MAGIC: &[u8] = b"PBSEALED";
    let mut ids = std::collections::BTreeSet::new();
    let mut at = 0;
    while let Some(i) = bytes[at..].windows(MAGIC.len()).position(|w| w == MAGIC) {
        let h = at + i + MAGIC.len();
        if let (Some(1), Some(&n)) = (bytes.get(h).copied(), bytes.get(h + 1)) {
            if let Some(id) = bytes.get(h + 2..h + 2 + n as usize) {
                if !id.is_empty() && id.iter().all(|b| b.is_ascii_graphic()) {
                    ids.insert(String::from_utf8_lossy(id).into_owned());
                }
            }
        }
        at = h;
    }
    ids
}

/// Agreement ids a v1 key file may have issued tokens under: those in force and those with
/// records in the vault (so that `keys rotate` keeps their tokens stable when it upgrades).
pub fn known_agreements(set: &AgreementSet, vault: Option<&Vault>) -> Vec<String> {
    let mut ids: Vec<String> = set.agreements.keys().cloned().collect();
    if let Some(v) = vault {
        ids.extend(v.agreements());
    }
    ids.sort();
    ids.dedup();
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGREEMENT: &str = include_str!("../policies/example-teleradiology.toml");

    fn set(status: Status) -> AgreementSet {
        let mut a = Agreement::parse("t.toml", AGREEMENT).expect("parses");
        a.status = status;
        let mut s = AgreementSet::default();
        s.agreements.insert(a.id.clone(), a);
        s
    }

    #[test]
    fn only_an_ended_agreement_past_its_retention_may_be_shredded() {
        let s = set(Status::Active);
        let id = s.agreements.keys().next().unwrap().clone();
        let now = OffsetDateTime::now_utc();
        assert!(matches!(
            may_shred(&s, &id, None, now),
            Err(ShredRefusal::NotEnded { .. })
        ));
        assert!(matches!(
            may_shred(&s, "nope", None, now),
            Err(ShredRefusal::Unknown(_))
        ));
        let s = set(Status::Ended);
        let days = retention_days(&s.agreements[&id]);
        assert!(days > 0, "the example agreement sets a retention");
        let last = now - time::Duration::days(1);
        let e = may_shred(&s, &id, Some(last), now).unwrap_err();
        assert!(e.to_string().contains("runs until"), "{e}");
        let later = last + time::Duration::days(i64::from(days)) + time::Duration::seconds(1);
        assert_eq!(may_shred(&s, &id, Some(last), later), Ok(()));
        assert_eq!(may_shred(&s, &id, None, now), Ok(()));
    }

    #[test]
    fn retire_removes_only_keys_nothing_is_sealed_under_any_more() {
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("site.key");
        SiteKeys::generate().write_new(&key_file).unwrap();
        let keys = SiteKeys::load(&key_file).unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(data.join("store")).unwrap();
        let at_rest = AtRest::new(&keys, true);
        let (a, b) = (data.join("store").join("a"), data.join("b"));
        at_rest
            .write_atomic(&a, b"sealed under the first key")
            .unwrap();
        keys.rotate(&[]).unwrap();
        at_rest
            .write_atomic(&b, b"sealed under the second key")
            .unwrap();
        keys.rotate(&[]).unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let vault = std::sync::Arc::new(Vault::new(&keys, db.open_tree("vault").unwrap()));
        let entry = crate::pseudonym::VaultEntry {
            attribute: "PatientID".into(),
            original: "MRN-1".into(),
        };
        vault.record("agr", "TOKEN", &entry).unwrap();
        let audit = AuditLog::open(&dir.path().join("audit.log")).unwrap();
        let (ids, current) = keys.data_key_ids();
        assert_eq!(ids.len(), 3);

        // Both older keys still seal a file: nothing goes.
        let r = retire(&keys, &data, || Ok(vault.clone()), &audit, "user:t").unwrap();
        assert!(r.removed.is_empty(), "{r:?}");
        assert_eq!(r.kept.len(), 2);
        // Re-sealed (as `keys rotate` does): both go, the current key stays, all still read.
        at_rest.reseal(&a).unwrap();
        at_rest.reseal(&b).unwrap();
        // Except while an ingest log slot still holds a record sealed under one of them (at a
        // page boundary inside the slot, not at its start).
        let first = keys.data_key_ids().0[0].clone();
        let wal = data.join("ingest").join("wal");
        std::fs::create_dir_all(&wal).unwrap();
        let mut slot = vec![0u8; 8192];
        let header = [
            b"PBSEALED".as_slice(),
            &[1, first.len() as u8],
            first.as_bytes(),
        ]
        .concat();
        slot[4096..4096 + header.len()].copy_from_slice(&header);
        std::fs::write(wal.join("slot-0.wal"), &slot).unwrap();
        let r = retire(&keys, &data, || Ok(vault.clone()), &audit, "user:t").unwrap();
        assert_eq!(r.removed.len(), 1, "{r:?}");
        assert!(
            !r.removed.contains(&first),
            "a logged record still needs it"
        );
        std::fs::write(wal.join("slot-0.wal"), vec![0u8; 8192]).unwrap();
        // A vault that cannot be read refuses, and removes nothing.
        let refused = retire(&keys, &data, || Err("in use".into()), &audit, "user:t");
        assert!(matches!(
            refused,
            Err(CustodyError::Retire(RetireRefusal::Vault(_)))
        ));
        assert_eq!(keys.data_key_ids().0.len(), 2);
        let r = retire(&keys, &data, || Ok(vault.clone()), &audit, "user:t").unwrap();
        assert_eq!(r.removed.len(), 1, "{r:?}");
        assert_eq!(keys.data_key_ids(), (vec![current.clone()], current));
        let reread = SiteKeys::load(&key_file).unwrap();
        assert_eq!(reread.data_key_ids().0.len(), 1, "written to the key file");
        for f in [&a, &b] {
            let mut plain = Vec::new();
            std::io::Read::read_to_end(
                &mut AtRest::new(&reread, true).open(f).unwrap(),
                &mut plain,
            )
            .unwrap();
            assert!(plain.starts_with(b"sealed under"));
        }
        assert_eq!(
            vault.reidentify("agr", "TOKEN").unwrap().unwrap().original,
            "MRN-1"
        );
        let log = crate::audit::read_entries(audit.path()).unwrap();
        assert_eq!(
            log.iter()
                .filter(|e| e.event.action == "keys-retire")
                .count(),
            4
        );
    }
}
