//! Signed destruction receipts: a receiver's proof, kept by the origin, that it destroyed a study
//! when the flow's retention ended.
//!
//! Owns: the bytes a destruction receipt's signature covers ([`signed_bytes`]), signing them with
//! the receiver's site key ([`sign`]) and checking them against the certificate of the site that
//! presents them ([`verify`]); at the origin, the [`DestructionLedger`] (which studies a partner
//! may report destroyed: only those this site sent it, per the outbox; and the receipts it holds,
//! one file each, written atomically) and the handler of `ReportDestruction` ([`receive`]), which
//! treats the caller as possibly hostile: every string is bounded before it is used, the
//! receipt must name the caller (from its certificate) and this site, carry the caller's valid
//! signature and refer to a study this site sent the caller under that agreement and flow.
//!
//! Does not own: deciding when a study expires or deleting it (`retention`, `store`), nor the
//! `ReportDestruction` call itself (`service` dispatches it here).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tonic::Status;

use super::proto::{DestructionAck, DestructionReceipt};
use super::tls::PeerInfo;
use super::wire::{self, shown};
use crate::audit::report::DESTRUCTION_RECEIPT;
use crate::audit::{AuditLog, Detail, Event};
use crate::store::outbox::{Outbox, OutboxState};
use crate::store::{safe_name, write_atomic, StoreError};

/// Longest signature accepted (a DER ECDSA P-256 signature is at most 72 bytes).
const MAX_SIGNATURE: usize = 128;
/// Most destruction receipts kept for one study from one partner (a study re-sent after its
/// destruction is destroyed again; a partner cannot fill the origin's disk with variants).
pub const MAX_RECEIPTS_PER_STUDY: usize = 8;

/// The exact bytes a destruction receipt's signature covers.
pub fn signed_bytes(r: &DestructionReceipt) -> Vec<u8> {
    format!(
        "pacs-broker-destruction-receipt-v1\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}\n",
        r.agreement_id,
        r.flow,
        r.study_token,
        r.receiver_site,
        r.origin_site,
        r.instances_destroyed,
        hex::encode(&r.study_digest),
        r.received_at,
        r.destroyed_at,
        r.retention_days,
        r.after,
        r.forwarded_to_site_pacs,
    )
    .into_bytes()
}

/// SHA-256 over the sorted instance hashes (hex) of a study: the digest transfer receipts carry.
pub fn study_digest<'a>(sha256_hex: impl IntoIterator<Item = &'a String>) -> Vec<u8> {
    let mut shas: Vec<&String> = sha256_hex.into_iter().collect();
    shas.sort();
    let mut h = Sha256::new();
    for s in shas {
        h.update(s.as_bytes());
    }
    h.finalize().to_vec()
}

/// Fills in `r.signature` with the site's PKCS#8 ECDSA P-256 key.
pub fn sign(r: &mut DestructionReceipt, key_pkcs8: &[u8]) -> Result<(), String> {
    let rng = SystemRandom::new();
    let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, key_pkcs8, &rng)
        .map_err(|_| "the site key is not an ECDSA P-256 PKCS#8 key".to_string())?;
    r.signature = key
        .sign(&rng, &signed_bytes(r))
        .map_err(|_| "signing failed".to_string())?
        .as_ref()
        .to_vec();
    Ok(())
}

/// Checks a destruction receipt's signature against the certificate of the site that made it.
pub fn verify(r: &DestructionReceipt, cert_der: &[u8]) -> bool {
    let Ok((_, x)) = x509_parser::parse_x509_certificate(cert_der) else {
        return false;
    };
    let pk = UnparsedPublicKey::new(
        &ECDSA_P256_SHA256_ASN1,
        x.public_key().subject_public_key.data.as_ref(),
    );
    pk.verify(&signed_bytes(r), &r.signature).is_ok()
}

/// Checks the receipt's own strings and sizes (before anything logs or uses them).
fn check_fields(r: &DestructionReceipt) -> Result<(), wire::BadField> {
    wire::check_name("agreement id", &r.agreement_id)?;
    wire::check_name("flow", &r.flow)?;
    wire::check_uid("study token", &r.study_token)?;
    wire::check_name("receiver site", &r.receiver_site)?;
    wire::check_name("origin site", &r.origin_site)?;
    let bad = |field, why: &str| wire::BadField {
        field,
        why: why.to_string(),
    };
    if !matches!(r.after.as_str(), "delete" | "return") {
        return Err(bad("after", "must be `delete` or `return`"));
    }
    if r.study_digest.len() != 32 {
        return Err(bad("study digest", "must be 32 bytes"));
    }
    if r.signature.is_empty() || r.signature.len() > MAX_SIGNATURE {
        return Err(bad("signature", "missing or longer than a P-256 signature"));
    }
    if r.destroyed_at < r.received_at {
        return Err(bad("destroyed at", "earlier than received at"));
    }
    Ok(())
}

/// A destruction receipt as the origin keeps it: the receipt (hex of its protobuf encoding,
/// signature included) and the certificate that signed it, so it can be checked again later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldReceipt {
    pub receiver_site: String,
    pub agreement: String,
    pub flow: String,
    pub study_token: String,
    /// Unix seconds when this site verified and stored it.
    pub verified_at: u64,
    /// Whether the receipt's study digest equals the digest of the instances this site sent.
    pub digest_matches_sent: bool,
    pub receipt: String,
    pub receiver_certificate: String,
}

impl HeldReceipt {
    /// The receipt itself, decoded.
    pub fn decode(&self) -> Option<DestructionReceipt> {
        use prost::Message;
        DestructionReceipt::decode(hex::decode(&self.receipt).ok()?.as_slice()).ok()
    }

    /// Checks the kept receipt's signature again against the kept certificate.
    pub fn verify_again(&self) -> bool {
        let cert = hex::decode(&self.receiver_certificate).unwrap_or_default();
        self.decode().is_some_and(|r| verify(&r, &cert))
    }
}

/// The origin's record of destruction receipts, beside its outbox: which studies a partner may
/// report destroyed (those this site sent it), and the receipts it holds
/// (`<dir>/<agreement>/<study token>.<site>.<destroyed at>.json`).
pub struct DestructionLedger {
    dir: PathBuf,
    outbox: Outbox,
}

/// Why the ledger could not take a receipt.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("no such study was sent to your site under this agreement and flow")]
    NotSent,
    #[error("this site already holds {MAX_RECEIPTS_PER_STUDY} destruction receipts of yours for this study")]
    TooMany,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl DestructionLedger {
    /// The ledger of the data folder `data_dir` (receipts in `data_dir/destruction-receipts`).
    pub fn new(data_dir: &Path) -> DestructionLedger {
        DestructionLedger {
            dir: data_dir.join("destruction-receipts"),
            outbox: Outbox::new(data_dir.join("outbox")),
        }
    }

    /// The digest of what this site sent `to` of the study, when it sent it (the outbox entry
    /// names that site and flow, and the partner's receipt for it was verified).
    fn sent(&self, r: &DestructionReceipt) -> Option<Vec<u8>> {
        let dir = self.outbox.study_dir(&r.agreement_id, &r.study_token);
        let e = Outbox::load(&dir).ok()?;
        let delivered = e.state == OutboxState::Delivered || e.delivered.is_some();
        (e.to == r.receiver_site
            && e.flow == r.flow
            && e.agreement == r.agreement_id
            && e.study_token == r.study_token
            && delivered)
            .then(|| study_digest(e.instances.iter().map(|i| &i.sha256)))
    }

    fn prefix_of(r: &DestructionReceipt) -> String {
        format!(
            "{}.{}.",
            safe_name(&r.study_token),
            safe_name(&r.receiver_site)
        )
    }

    fn path_of(&self, r: &DestructionReceipt) -> PathBuf {
        self.dir.join(safe_name(&r.agreement_id)).join(format!(
            "{}{}.json",
            Self::prefix_of(r),
            r.destroyed_at
        ))
    }

    /// How many receipts of this partner are held for this study.
    fn count_for(&self, r: &DestructionReceipt) -> usize {
        let prefix = Self::prefix_of(r);
        std::fs::read_dir(self.dir.join(safe_name(&r.agreement_id)))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                    .count()
            })
            .unwrap_or(0)
    }

    /// Keeps a verified receipt durably; `Ok(None)` when it was held already.
    pub fn hold(
        &self,
        r: &DestructionReceipt,
        cert_der: &[u8],
    ) -> Result<Option<HeldReceipt>, LedgerError> {
        use prost::Message;
        let sent = self.sent(r).ok_or(LedgerError::NotSent)?;
        let path = self.path_of(r);
        if path.exists() {
            return Ok(None);
        }
        if self.count_for(r) >= MAX_RECEIPTS_PER_STUDY {
            return Err(LedgerError::TooMany);
        }
        let held = HeldReceipt {
            receiver_site: r.receiver_site.clone(),
            agreement: r.agreement_id.clone(),
            flow: r.flow.clone(),
            study_token: r.study_token.clone(),
            verified_at: crate::store::outbox::now(),
            digest_matches_sent: sent == r.study_digest,
            receipt: hex::encode(r.encode_to_vec()),
            receiver_certificate: hex::encode(cert_der),
        };
        crate::store::private_dir(&self.dir)?;
        let json = serde_json::to_vec_pretty(&held).expect("receipt serialises");
        write_atomic(&path, &json)?;
        crate::store::private_file(&path)?;
        Ok(Some(held))
    }

    /// Every receipt held, oldest file name first.
    pub fn held(&self) -> Vec<HeldReceipt> {
        let mut files: Vec<PathBuf> = walkdir::WalkDir::new(&self.dir)
            .into_iter()
            .flatten()
            .filter(|e| e.file_type().is_file())
            .map(|e| e.into_path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        files
            .iter()
            .filter_map(|p| serde_json::from_slice(&std::fs::read(p).ok()?).ok())
            .collect()
    }
}

/// What `receive` needs from the service: the ledger, the audit log, this site's id, and the
/// agreements in force (for `certificate_pin`s).
pub struct Origin<'a> {
    pub site_id: &'a str,
    pub ledger: &'a Arc<DestructionLedger>,
    pub audit: &'a Arc<AuditLog>,
    pub agreements: Arc<crate::dsa::AgreementSet>,
}

/// True when the agreement in force pins `site` to keys other than `spki_sha256`.
fn pin_refuses(
    set: &crate::dsa::AgreementSet,
    agreement: &str,
    site: &str,
    spki_sha256: &[u8; 32],
) -> bool {
    set.agreements
        .get(agreement)
        .and_then(|a| a.party(site))
        .and_then(|p| p.certificate_pin.as_deref())
        .is_some_and(|pin| !pin.eq_ignore_ascii_case(&hex::encode(spki_sha256)))
}

/// Handles `ReportDestruction` from `peer`: checks, verifies, keeps and audits the receipt.
/// `refuse(agreement, object, why)` records a refusal (summarised per peer by the service).
pub async fn receive(
    origin: Origin<'_>,
    peer: &PeerInfo,
    r: DestructionReceipt,
    refuse: impl Fn(&str, &str, &str),
) -> Result<DestructionAck, Status> {
    let caller = peer.identity.site_id.as_str();
    if let Err(e) = check_fields(&r) {
        refuse(
            &shown(&r.agreement_id),
            "destruction receipt",
            &e.to_string(),
        );
        return Err(Status::invalid_argument(e.to_string()));
    }
    // From here on the receipt's strings are bounded and of a safe character set.
    let object = format!("destruction receipt for study {}", r.study_token);
    if r.receiver_site != caller || r.origin_site != origin.site_id {
        let why =
            "a destruction receipt must name the calling site as receiver and this site as origin";
        refuse(&r.agreement_id, &object, why);
        return Err(Status::permission_denied(why));
    }
    if pin_refuses(
        &origin.agreements,
        &r.agreement_id,
        caller,
        &peer.identity.spki_sha256,
    ) {
        let why = "the certificate's public key does not match the caller's certificate_pin in this agreement";
        refuse(&r.agreement_id, &object, why);
        return Err(Status::permission_denied(why));
    }
    let cert = peer.identity.certificate.as_ref().to_vec();
    if !verify(&r, &cert) {
        let why = "the destruction receipt is not signed by the certificate the caller presented";
        refuse(&r.agreement_id, &object, why);
        return Err(Status::permission_denied(why));
    }
    let (ledger, r2, cert2) = (origin.ledger.clone(), r.clone(), cert.clone());
    let held = tokio::task::spawn_blocking(move || ledger.hold(&r2, &cert2))
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
    let held = match held {
        Ok(h) => h,
        Err(e @ LedgerError::NotSent) => {
            refuse(&r.agreement_id, &object, &e.to_string());
            return Err(Status::permission_denied(e.to_string()));
        }
        Err(e @ LedgerError::TooMany) => {
            refuse(&r.agreement_id, &object, &e.to_string());
            return Err(Status::resource_exhausted(e.to_string()));
        }
        Err(LedgerError::Store(e)) => {
            tracing::error!(error = %e, "cannot keep a destruction receipt");
            return Err(Status::unavailable(
                "the origin cannot store the receipt now; send it again later",
            ));
        }
    };
    origin
        .audit
        .accept_partner_checkpoint(caller, &cert, &r.audit_checkpoint);
    let Some(held) = held else {
        return Ok(DestructionAck { already_held: true });
    };
    record(origin.audit, &r, &held);
    Ok(DestructionAck {
        already_held: false,
    })
}

/// The origin's audit entry for a receipt it now holds (what `audit report` joins).
fn record(audit: &AuditLog, r: &DestructionReceipt, held: &HeldReceipt) {
    let pacs = if r.forwarded_to_site_pacs {
        "; the receiver had also forwarded it to its own PACS, outside this receipt"
    } else {
        ""
    };
    let digest = if held.digest_matches_sent {
        "the study digest matches what was sent"
    } else {
        "the study digest DIFFERS from what was sent (the receiver held another set of instances)"
    };
    audit.record_detailed_or_warn(
        Event {
            actor: format!("site:{}", r.receiver_site),
            action: DESTRUCTION_RECEIPT.into(),
            object: format!(
                "study {} ({} instances destroyed after {} days, then {}{pacs})",
                r.study_token, r.instances_destroyed, r.retention_days, r.after
            ),
            agreement: r.agreement_id.clone(),
            purpose: String::new(),
            outcome: format!("ok (signature verified; {digest})"),
        },
        Detail {
            study: Some(r.study_token.clone()),
            party: Some(r.receiver_site.clone()),
            flow: Some(r.flow.clone()),
            instances: Some(r.instances_destroyed as u64),
            receipt: Some(held.receipt.clone()),
            ..Default::default()
        },
    );
    tracing::info!(peer = %r.receiver_site, agreement = %r.agreement_id, study = %r.study_token, "destruction receipt verified and kept");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A change made to a receipt.
    type Change = Box<dyn Fn(&mut DestructionReceipt)>;

    fn receipt() -> DestructionReceipt {
        DestructionReceipt {
            agreement_id: "agr".into(),
            flow: "ct".into(),
            study_token: "2.25.7".into(),
            receiver_site: "telerad-c".into(),
            origin_site: "hospital-a".into(),
            instances_destroyed: 3,
            study_digest: vec![7; 32],
            received_at: 10,
            destroyed_at: 20,
            retention_days: 30,
            after: "delete".into(),
            forwarded_to_site_pacs: false,
            signature: vec![1; 70],
            audit_checkpoint: Vec::new(),
        }
    }

    #[test]
    fn fields_are_checked_before_use() {
        assert!(check_fields(&receipt()).is_ok());
        let cases: Vec<Change> = vec![
            Box::new(|r| r.agreement_id = "../x".into()),
            Box::new(|r| r.study_token = "2.25.x".into()),
            Box::new(|r| r.after = "keep".into()),
            Box::new(|r| r.study_digest = vec![0; 3]),
            Box::new(|r| r.signature = vec![0; 4096]),
            Box::new(|r| r.signature.clear()),
            Box::new(|r| r.destroyed_at = 1),
            Box::new(|r| r.receiver_site = "x".repeat(200)),
        ];
        for (i, c) in cases.iter().enumerate() {
            let mut r = receipt();
            c(&mut r);
            assert!(check_fields(&r).is_err(), "case {i}");
        }
    }

    #[test]
    fn every_field_is_covered_by_the_signature() {
        let base = signed_bytes(&receipt());
        let changes: Vec<Change> = vec![
            Box::new(|r| r.agreement_id.push('x')),
            Box::new(|r| r.flow.push('x')),
            Box::new(|r| r.study_token.push('1')),
            Box::new(|r| r.receiver_site.push('x')),
            Box::new(|r| r.origin_site.push('x')),
            Box::new(|r| r.instances_destroyed += 1),
            Box::new(|r| r.study_digest[0] ^= 1),
            Box::new(|r| r.received_at += 1),
            Box::new(|r| r.destroyed_at += 1),
            Box::new(|r| r.retention_days += 1),
            Box::new(|r| r.after = "return".into()),
            Box::new(|r| r.forwarded_to_site_pacs = true),
        ];
        for (i, c) in changes.iter().enumerate() {
            let mut r = receipt();
            c(&mut r);
            assert_ne!(signed_bytes(&r), base, "field {i} not signed");
        }
    }

    #[test]
    fn the_ledger_takes_receipts_only_for_studies_sent_to_that_site_and_bounds_them() {
        use crate::store::outbox::{OutboxEntry, OutboxInstance};
        let dir = tempfile::tempdir().unwrap();
        let ledger = DestructionLedger::new(dir.path());
        let r = receipt();
        assert!(matches!(
            ledger.hold(&r, b"cert"),
            Err(LedgerError::NotSent)
        ));
        let outbox = Outbox::new(dir.path().join("outbox"));
        let mut e = OutboxEntry::pending("agr", "ct", "treatment", "telerad-c", "2.25.7", true);
        e.instances.push(OutboxInstance {
            file: "1.dcm".into(),
            sha256: "ab".repeat(32),
            size: 1,
            sop_instance_uid: "2.25.71".into(),
        });
        outbox.save(&e).unwrap();
        assert!(
            matches!(ledger.hold(&r, b"cert"), Err(LedgerError::NotSent)),
            "not delivered yet"
        );
        e.state = OutboxState::Delivered;
        outbox.save(&e).unwrap();
        let mut other_site = r.clone();
        other_site.receiver_site = "hospital-b".into();
        assert!(matches!(
            ledger.hold(&other_site, b"c"),
            Err(LedgerError::NotSent)
        ));
        let held = ledger.hold(&r, b"cert").unwrap().unwrap();
        assert!(!held.digest_matches_sent);
        assert_eq!(held.decode().unwrap(), r);
        assert!(ledger.hold(&r, b"cert").unwrap().is_none(), "held already");
        let mut matching = r.clone();
        matching.destroyed_at += 1;
        matching.study_digest = study_digest(&["ab".repeat(32)]);
        assert!(
            ledger
                .hold(&matching, b"cert")
                .unwrap()
                .unwrap()
                .digest_matches_sent
        );
        for i in 2..MAX_RECEIPTS_PER_STUDY as u64 {
            let mut again = r.clone();
            again.destroyed_at += i;
            ledger.hold(&again, b"cert").unwrap().unwrap();
        }
        let mut one_more = r.clone();
        one_more.destroyed_at += 1000;
        assert!(matches!(
            ledger.hold(&one_more, b"cert"),
            Err(LedgerError::TooMany)
        ));
        assert_eq!(ledger.held().len(), MAX_RECEIPTS_PER_STUDY);
    }

    #[test]
    fn a_pinned_party_must_present_its_pinned_key() {
        let text = |pin: &str| {
            format!(
                r#"[agreement]
id = "agr"
version = 1
title = "t"
status = "active"
valid_from = 2020-01-01
valid_until = 2099-12-31
governing_law = "x"

[[parties]]
site = "a"
organisation = "A"
privacy_officer = "P"
privacy_contact = "p@a.example"

[[parties]]
site = "c"
organisation = "C"
privacy_officer = "P"
privacy_contact = "p@c.example"
{pin}

[[flows]]
name = "ct"
from = "a"
to = "c"
purposes = ["treatment"]
"#
            )
        };
        let key = [7u8; 32];
        let set = |pin: &str| {
            let a = crate::dsa::Agreement::parse("agr.toml", &text(pin)).unwrap();
            let mut s = crate::dsa::AgreementSet::default();
            s.agreements.insert(a.id.clone(), a);
            s
        };
        let unpinned = set("");
        assert!(!pin_refuses(&unpinned, "agr", "c", &key));
        let pinned = set(&format!("certificate_pin = \"{}\"", hex::encode(key)));
        assert!(!pin_refuses(&pinned, "agr", "c", &key));
        assert!(pin_refuses(&pinned, "agr", "c", &[8u8; 32]));
        assert!(!pin_refuses(&pinned, "other", "c", &[8u8; 32]));
    }

    proptest::proptest! {
        #[test]
        fn any_peer_strings_are_judged_without_echo(
            agreement in ".{0,200}", flow in ".{0,80}", token in ".{0,100}", site in ".{0,80}",
            after in ".{0,20}",
        ) {
            // A marker no message contains, carried by every peer string.
            let mut r = receipt();
            r.agreement_id = format!("QZX{agreement}");
            r.flow = format!("QZX{flow}");
            r.study_token = format!("{token}QZX");
            r.receiver_site = format!("QZX{site}");
            r.after = format!("QZX{after}");
            let m = check_fields(&r).expect_err("QZX is never valid everywhere").to_string();
            proptest::prop_assert!(m.len() < 120, "{m}");
            proptest::prop_assert!(!m.contains("QZX"), "{m}");
        }
    }

    #[test]
    fn digest_is_order_independent() {
        let a = ["bb".to_string(), "aa".to_string()];
        let b = ["aa".to_string(), "bb".to_string()];
        assert_eq!(study_digest(&a), study_digest(&b));
        assert_ne!(study_digest(&a), study_digest(&a[..1]));
    }
}
