//! The audit event catalogue: every action the log records, named in one place, how an actor is
//! written, and the events whose shape several modules share.
//!
//! Owns: the action names ([`kind`]), the actor forms ([`actor`]), and constructors for the
//! events written from more than one place or by commands: refusals and peer connections
//! refused ([`refusal`]), the policy in force ([`policy_agreement`], [`policy_summary`]),
//! administrative commands ([`admin`]), node start and stop, and the destruction receipt a
//! partner sends back ([`destruction_receipt`]). `docs/audit.md` describes every kind, its fields
//! and its actor; a test keeps that page and [`kind::ALL`] in step.
//!
//! Does not own: deciding when something is audited (the callers do), bounding and escaping
//! (every field of every event is bounded by [`super::AuditLog::record`], whatever is passed
//! here), or the rate summary of refusals ([`super::summary`]).

use super::{Detail, Event};

/// Action names. A new kind is added here, to `docs/audit.md`, and to the DICOM export mapping.
pub mod kind {
    /// A study left for a partner (sender side; also failures, with the reason).
    pub const DISCLOSE: &str = "disclose";
    /// A study arrived from a partner and was stored (receiver side).
    pub const RECEIVE: &str = "receive";
    /// Something was refused: an offer, a transfer, a send, a peer connection (with the reason).
    pub const REFUSE: &str = "refuse";
    /// A partner's audit checkpoint was not accepted.
    pub const REFUSE_CHECKPOINT: &str = "refuse-checkpoint";
    /// Received data was quarantined (it failed a check).
    pub const QUARANTINE: &str = "quarantine";
    /// Outgoing data was held back for review.
    pub const QUARANTINE_HOLD: &str = "quarantine-hold";
    pub const QUARANTINE_RELEASE: &str = "quarantine-release";
    pub const QUARANTINE_DISCARD: &str = "quarantine-discard";
    pub const QUARANTINE_REVEAL: &str = "quarantine-reveal";
    pub const QUARANTINE_EXPIRE: &str = "quarantine-expire";
    /// Burned-in text was removed from pixel data before sending.
    pub const CLEAN_PIXEL_DATA: &str = "clean-pixel-data";
    /// A person saw the original behind a token.
    pub const REIDENTIFY: &str = "reidentify";
    /// An instance from a local DICOM device went through the ingest pipeline.
    pub const INGEST: &str = "ingest";
    /// A received instance was delivered to the site's PACS.
    pub const DELIVER: &str = "deliver";
    /// A DICOM association was accepted or rejected.
    pub const ASSOCIATE: &str = "associate";
    /// The agreements in force: at `serve` start and after every reload.
    pub const POLICY_LOAD: &str = "policy-load";
    /// One agreement added, changed or removed by a reload.
    pub const POLICY_CHANGE: &str = "policy-change";
    /// The federation CA's revocation list file changed and was (or was not) taken.
    pub const CRL_RELOAD: &str = "crl-reload";
    /// `serve` started / stopped.
    pub const NODE_START: &str = "node-start";
    pub const NODE_STOP: &str = "node-stop";
    /// An alert raised by the log itself (a burst of refusals, volume, hours).
    pub const ALERT: &str = "alert";
    /// The audit log was read by a person.
    pub const VERIFY: &str = "verify";
    pub const EXPORT: &str = "export";
    pub const REPORT: &str = "report";
    pub const AUDIT_CHECKPOINTS: &str = "audit-checkpoints";
    /// Administrative commands.
    pub const STORE_VERIFY: &str = "store-verify";
    pub const OUTBOX_RETRY: &str = "outbox-retry";
    pub const DSA_SIGN: &str = "dsa-sign";
    pub const KEYS_NEW: &str = "keys-new";
    pub const CERTS_REVOKE: &str = "certs-revoke";
    /// A partner's signed receipt that it destroyed what it received.
    pub const DESTRUCTION_RECEIPT: &str = "destruction-receipt";
    /// Received data deleted when its flow's retention ended.
    pub const RETENTION_DELETE: &str = "retention-delete";
    /// The receiver's signed destruction receipt sent back to the origin.
    pub const DESTRUCTION_RECEIPT_SENT: &str = "destruction-receipt-sent";
    /// A result (report, SR, PDF) sent back to the origin by a partner, or taken in for return.
    pub const RETURN: &str = "return";
    /// A result from a partner received at the origin.
    pub const RETURN_RECEIVE: &str = "return-receive";
    /// A new data-encryption key made current, everything at rest re-sealed under it.
    pub const KEYS_ROTATE: &str = "keys-rotate";
    /// Data-encryption keys nothing is sealed under any more removed from the key file.
    pub const KEYS_RETIRE: &str = "keys-retire";
    /// An ended agreement's vault records and token secret crypto-shredded.
    pub const VAULT_SHRED: &str = "vault-shred";

    /// Every kind above (the catalogue test checks each is documented).
    pub const ALL: &[&str] = &[
        DISCLOSE,
        RECEIVE,
        REFUSE,
        REFUSE_CHECKPOINT,
        QUARANTINE,
        QUARANTINE_HOLD,
        QUARANTINE_RELEASE,
        QUARANTINE_DISCARD,
        QUARANTINE_REVEAL,
        QUARANTINE_EXPIRE,
        CLEAN_PIXEL_DATA,
        REIDENTIFY,
        INGEST,
        DELIVER,
        ASSOCIATE,
        POLICY_LOAD,
        POLICY_CHANGE,
        CRL_RELOAD,
        NODE_START,
        NODE_STOP,
        ALERT,
        VERIFY,
        EXPORT,
        REPORT,
        AUDIT_CHECKPOINTS,
        STORE_VERIFY,
        OUTBOX_RETRY,
        DSA_SIGN,
        KEYS_NEW,
        CERTS_REVOKE,
        DESTRUCTION_RECEIPT,
        RETENTION_DELETE,
        DESTRUCTION_RECEIPT_SENT,
        RETURN,
        RETURN_RECEIVE,
        KEYS_ROTATE,
        KEYS_RETIRE,
        VAULT_SHRED,
    ];
}

/// How the actor of an entry is written.
pub mod actor {
    /// A partner site, from its verified certificate (never from a request field).
    pub fn site(id: &str) -> String {
        format!("site:{id}")
    }

    /// A network peer not (or not yet) identified by a verified certificate: its address only.
    pub fn remote(ip: std::net::IpAddr) -> String {
        format!("remote:{ip}")
    }

    /// A local DICOM device: its calling AE title (as it sent it) and address.
    pub fn dicom(calling_ae: &str, ip: std::net::IpAddr) -> String {
        format!("dicom:{calling_ae}@{ip}")
    }

    /// The node itself.
    pub const NODE: &str = "node";

    /// A named local user (from `[[users]]` or a command's `--user`/`--officer`).
    pub fn user(name: &str) -> String {
        format!("user:{name}")
    }
}

/// Something the receiving endpoint refused: an offer, a transfer, a peer connection. `kind` says
/// what (`offer refused`, `TLS handshake refused`...), `reason` why. For a connection, `actor` is
/// [`actor::site`] when the peer's certificate was verified, [`actor::remote`] otherwise, and
/// `object` says what is known of it (its address, and the certificate's subject and the site it
/// names where one was presented).
pub fn refusal(actor: String, object: String, kind: &str, reason: &str) -> Event {
    Event {
        actor,
        action: kind::REFUSE.into(),
        object,
        outcome: format!("{kind}: {reason}"),
        ..Event::default()
    }
}

/// One agreement of the policy in force: id, version, status and the SHA-256 of its file.
/// `outcome` is `in force`, or says how it came to be in force (e.g. narrowed by an unsigned edit).
pub fn policy_agreement(
    action: &'static str,
    agreement: &str,
    version: u32,
    status: &str,
    file_sha256: Option<&str>,
    outcome: String,
) -> Event {
    Event {
        actor: actor::NODE.into(),
        action: action.into(),
        object: format!(
            "agreement {agreement} version {version} ({status}), file sha256 {}",
            file_sha256.unwrap_or("unknown")
        ),
        agreement: agreement.into(),
        outcome,
        ..Event::default()
    }
}

/// The policy load as a whole: why it was loaded, how many agreements are in force and how many
/// files were not enforced.
pub fn policy_summary(trigger: &str, in_force: usize, not_enforced: usize) -> Event {
    Event {
        actor: actor::NODE.into(),
        action: kind::POLICY_LOAD.into(),
        object: format!("{in_force} agreement(s) in force ({trigger})"),
        outcome: if not_enforced == 0 {
            "ok".into()
        } else {
            format!("{not_enforced} agreement file(s) not enforced")
        },
        ..Event::default()
    }
}

/// The CRL file changed: `Ok((CRLs in force, open connections cut))`, or why the new file was
/// not taken (the previous CRLs stay in force).
pub fn crl_reload(result: Result<(usize, usize), String>) -> Event {
    let (object, outcome) = match result {
        Ok((crls, cut)) => (
            format!("{crls} revocation list(s) in force; {cut} open connection(s) cut"),
            "ok".to_string(),
        ),
        Err(why) => (
            "revocation list file changed".to_string(),
            format!("failed: {why}; the previous revocation lists stay in force"),
        ),
    };
    Event {
        actor: actor::NODE.into(),
        action: kind::CRL_RELOAD.into(),
        object,
        outcome,
        ..Event::default()
    }
}

/// An administrative command by `actor` (a named user, or the OS user: [`super::local_user`]).
pub fn admin(actor: String, action: &'static str, object: String, outcome: String) -> Event {
    Event {
        actor,
        action: action.into(),
        object,
        outcome,
        ..Event::default()
    }
}

/// A partner's signed receipt that it destroyed a study it received from this site, under
/// (agreement, flow). The report joins it to the disclosure of the same party and study.
pub fn destruction_receipt(
    party: &str,
    agreement: &str,
    flow: &str,
    study_token: &str,
    outcome: String,
) -> (Event, Detail) {
    (
        Event {
            actor: actor::site(party),
            action: kind::DESTRUCTION_RECEIPT.into(),
            object: format!("study {study_token}"),
            agreement: agreement.into(),
            outcome,
            ..Event::default()
        },
        Detail {
            study: Some(study_token.into()),
            party: Some(party.into()),
            flow: Some(flow.into()),
            ..Detail::default()
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_unique_and_lowercase() {
        let mut seen = std::collections::BTreeSet::new();
        for k in kind::ALL {
            assert!(seen.insert(*k), "{k} listed twice");
            assert!(k.chars().all(|c| c.is_ascii_lowercase() || c == '-'));
        }
    }

    #[test]
    fn every_kind_is_documented() {
        let doc = include_str!("../../docs/audit.md");
        for k in kind::ALL {
            assert!(
                doc.contains(&format!("| `{k}` |")),
                "audit event kind `{k}` is not in docs/audit.md"
            );
        }
    }

    /// Every action literal of an event anywhere in the crate is a kind of the catalogue, so a new
    /// event cannot be added without naming it here and documenting it.
    #[test]
    fn every_action_written_in_the_crate_is_in_the_catalogue() {
        fn rust_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
            for e in std::fs::read_dir(dir).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    rust_files(&p, out);
                } else if p.extension().is_some_and(|x| x == "rs") {
                    out.push(p);
                }
            }
        }
        let mut files = Vec::new();
        rust_files(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut files,
        );
        let mut unknown = Vec::new();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            for (i, _) in text.match_indices("action: \"") {
                let rest = &text[i + "action: \"".len()..];
                let name = &rest[..rest.find('"').unwrap_or(0)];
                if !kind::ALL.contains(&name) {
                    unknown.push(format!("{}: `{name}`", f.display()));
                }
            }
        }
        assert!(
            unknown.is_empty(),
            "audit actions not in audit::events::kind::ALL (add them there and to docs/audit.md): {unknown:?}"
        );
    }

    #[test]
    fn destruction_receipt_names_party_flow_and_study() {
        let (e, d) = destruction_receipt("telerad-c", "agr", "reads", "2.25.9", "ok".into());
        assert_eq!(e.actor, "site:telerad-c");
        assert_eq!(e.action, "destruction-receipt");
        assert_eq!(d.study.as_deref(), Some("2.25.9"));
        assert_eq!(d.flow.as_deref(), Some("reads"));
        assert_eq!(d.party.as_deref(), Some("telerad-c"));
    }
}
