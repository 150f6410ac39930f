//! Partners' checkpoints: what this site holds of each partner's audit chain, and what it hands
//! out of its own.
//!
//! Owns: [`AuditLog::checkpoint_for_peer`] (the bytes a transfer or receipt carries: a fresh
//! signed checkpoint of this site's head) and [`AuditLog::accept_partner_checkpoint`] (a partner's
//! checkpoint, bounded in size, checked against the certificate of the mutual-TLS handshake and
//! against what this site already holds of that partner, then stored). A partner whose chain
//! went backwards or forked since the last checkpoint it showed us raises an alert: its log was
//! truncated, emptied or rewritten, and this side sees it.
//!
//! Does not own: the transport (federation puts the bytes into `OfferRequest` and `Receipt`).

use super::checkpoint::{self, Checkpoint};
use super::{text, AuditLog, Event};

/// What became of a partner's checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartnerCheckpoint {
    /// None was sent (an older partner).
    Absent,
    /// Stored: it extends what we held.
    Stored { seq: u64 },
    /// Already held.
    Known { seq: u64 },
    /// Not accepted (too large, unreadable, wrong site, bad signature). Audited.
    Refused(String),
    /// Genuine, but the partner's chain is shorter than, or differs from, what it showed before:
    /// its log was truncated or rewritten. Stored, audited and alerted.
    Inconsistent(String),
}

impl AuditLog {
    /// A fresh checkpoint of this site's head for a partner to hold (empty without a site key or
    /// entries). Never fails the exchange: an error is logged and nothing is sent.
    pub fn checkpoint_for_peer(&self) -> Vec<u8> {
        match self.checkpoint_now() {
            Ok(Some(c)) => c.to_wire(),
            Ok(None) => Vec::new(),
            Err(e) => {
                tracing::error!(error = %e, "could not sign an audit checkpoint for a partner");
                Vec::new()
            }
        }
    }

    /// Checks and stores the checkpoint `site` sent, against the certificate it presented in the
    /// handshake (`cert_der`). Never fails the exchange; anything wrong is audited and alerted.
    pub fn accept_partner_checkpoint(
        &self,
        site: &str,
        cert_der: &[u8],
        bytes: &[u8],
    ) -> PartnerCheckpoint {
        if bytes.is_empty() {
            return PartnerCheckpoint::Absent;
        }
        let outcome = self.judge_partner_checkpoint(site, cert_der, bytes);
        let (action, why) = match &outcome {
            PartnerCheckpoint::Refused(why) => ("refuse-checkpoint", why.clone()),
            PartnerCheckpoint::Inconsistent(why) => ("alert", why.clone()),
            _ => return outcome,
        };
        tracing::warn!(peer = %text::bound(site), reason = %why, "partner audit checkpoint {action}");
        self.record_or_warn(Event {
            actor: format!("site:{site}"),
            action: action.into(),
            object: format!("audit checkpoint of site:{site}"),
            outcome: why,
            ..Event::default()
        });
        outcome
    }

    fn judge_partner_checkpoint(
        &self,
        site: &str,
        cert_der: &[u8],
        bytes: &[u8],
    ) -> PartnerCheckpoint {
        let c = match Checkpoint::from_wire(bytes) {
            Ok(c) => c,
            Err(why) => return PartnerCheckpoint::Refused(why),
        };
        if c.site != site {
            return PartnerCheckpoint::Refused(format!(
                "checkpoint names site `{}`, the certificate `{site}`",
                text::bound(&c.site)
            ));
        }
        if let Err(why) = c.verify(cert_der) {
            return PartnerCheckpoint::Refused(format!("checkpoint signature: {why}"));
        }
        let file = checkpoint::partner_file(self.path(), site);
        let held = match checkpoint::load(&file) {
            Ok(h) => h,
            Err(e) => {
                return PartnerCheckpoint::Refused(format!("held checkpoints unreadable: {e}"))
            }
        };
        let latest = held.iter().max_by_key(|h| h.seq);
        let verdict = match latest {
            Some(l) if c.seq < l.seq => Some(PartnerCheckpoint::Inconsistent(format!(
                "partner-log-rewound: site {site} now shows entry {} but showed entry {} on {}: its audit log lost entries",
                c.seq, l.seq, l.time
            ))),
            Some(l) if l.seq == c.seq && l.hash == c.hash => {
                return PartnerCheckpoint::Known { seq: c.seq }
            }
            Some(l) if l.seq == c.seq => Some(PartnerCheckpoint::Inconsistent(format!(
                "partner-log-forked: site {site} signed two different entries {}: its audit log was rewritten",
                c.seq
            ))),
            _ => None,
        };
        let verdict = verdict.or_else(|| {
            held.iter()
                .find(|h| h.seq == c.seq && h.hash != c.hash)
                .map(|_| {
                    PartnerCheckpoint::Inconsistent(format!(
                        "partner-log-forked: site {site} signed two different entries {}: its audit log was rewritten",
                        c.seq
                    ))
                })
        });
        if let Err(e) = checkpoint::append_partner(self.path(), site, &c) {
            return PartnerCheckpoint::Refused(format!("cannot store it: {e}"));
        }
        verdict.unwrap_or(PartnerCheckpoint::Stored { seq: c.seq })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::checkpoint::CheckpointSigner;
    use crate::audit::{AuditConfig, SiteAudit};

    fn site_key() -> (Vec<u8>, Vec<u8>) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (key.serialize_der(), cert.der().to_vec())
    }

    #[test]
    fn partner_checkpoints_are_checked_stored_and_regressions_alerted() {
        let dir = tempfile::tempdir().unwrap();
        let (k, c) = site_key();
        let cfg = AuditConfig::default();
        let log = AuditLog::open_site(
            &dir.path().join("b/audit.log"),
            &SiteAudit {
                site: "hospital-b",
                key_pkcs8: &k,
                cert_der: &c,
                data_dir: &dir.path().join("b"),
                config: &cfg,
            },
        )
        .unwrap();
        let (pk, pc) = site_key();
        let partner = CheckpointSigner::new("hospital-a", &pk, &pc).unwrap();
        let h = |b: u8| hex::encode([b; 32]);
        let cp5 = partner.sign(5, &h(5)).to_wire();
        assert_eq!(
            log.accept_partner_checkpoint("hospital-a", &pc, &cp5),
            PartnerCheckpoint::Stored { seq: 5 }
        );
        assert_eq!(
            log.accept_partner_checkpoint("hospital-a", &pc, &cp5),
            PartnerCheckpoint::Known { seq: 5 }
        );
        assert_eq!(
            log.accept_partner_checkpoint("hospital-a", &pc, b""),
            PartnerCheckpoint::Absent
        );
        // Another site's certificate, or another site's name: refused.
        assert!(matches!(
            log.accept_partner_checkpoint("hospital-a", &c, &cp5),
            PartnerCheckpoint::Refused(_)
        ));
        assert!(matches!(
            log.accept_partner_checkpoint("telerad-c", &pc, &cp5),
            PartnerCheckpoint::Refused(_)
        ));
        assert!(matches!(
            log.accept_partner_checkpoint("hospital-a", &pc, &vec![b'{'; 5000]),
            PartnerCheckpoint::Refused(_)
        ));
        // Rewound and forked chains are seen from this side.
        let cp3 = partner.sign(3, &h(3)).to_wire();
        assert!(matches!(
            log.accept_partner_checkpoint("hospital-a", &pc, &cp3),
            PartnerCheckpoint::Inconsistent(w) if w.contains("rewound")
        ));
        let fork = partner.sign(5, &h(9)).to_wire();
        assert!(matches!(
            log.accept_partner_checkpoint("hospital-a", &pc, &fork),
            PartnerCheckpoint::Inconsistent(w) if w.contains("forked")
        ));
        let held = checkpoint::load(&checkpoint::partner_file(log.path(), "hospital-a")).unwrap();
        assert_eq!(held.len(), 3);
        let text = std::fs::read_to_string(log.path()).unwrap();
        assert!(text.contains("partner-log-rewound"));
        assert!(text.contains("refuse-checkpoint"));
    }
}
