//! Quarantine review at a node: holding what a flow held back, a privacy officer's release
//! (de-identification and the verifier run again, the decision recorded) and discard, each
//! audited; and the audit entry of OCR pixel cleaning.
//!
//! Owns: the node-level steps around [`crate::store::quarantine::Quarantine`]. Does not own the
//! store's layout, the de-identification itself (`deid`) nor the delivery (the outbox worker
//! sends what [`Node::stage_for_delivery`] queues).

use std::path::PathBuf;

use dicom_dictionary_std::tags;
use sha2::{Digest, Sha256};

use super::{Node, NodeError};
use crate::audit::Event;
use crate::deid::{DeidError, OcrEvidence};
use crate::ingest::{HeldBack, HeldBackKind};
use crate::store::outbox::{Outbox, OutboxEntry, OutboxInstance, OutboxState};
use crate::store::quarantine::{HeldItem, HoldRequest};
use crate::store::{self};

/// Why a release did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("quarantine item `{id}` still fails the verifier: {reason}\nhelp: nothing was released; if you have reviewed the instance and accept it, release it with `--override` (the override is recorded in the audit log)")]
    StillFails { id: String, reason: String },
    #[error("quarantine item `{id}` cannot be released: {reason}")]
    Unusable { id: String, reason: String },
    #[error(transparent)]
    Node(#[from] NodeError),
}

/// A released item: where its de-identified output waits for delivery.
#[derive(Debug, Clone)]
pub struct Released {
    pub item: HeldItem,
    /// The outbox folder of its study.
    pub outbox_dir: PathBuf,
    /// True when it still failed the verifier and the officer overrode it.
    pub overridden: bool,
    /// The verifier's reason when overridden.
    pub verifier_reason: Option<String>,
}

/// Boxes listed in one audit entry (a long cine loop can have thousands; the count is always there).
const AUDIT_BOXES: usize = 64;

impl Node {
    /// Audits what OCR did to each released instance (mode, engine version, boxes; no text).
    pub(super) fn audit_pixel_cleaning(
        &self,
        agreement: &str,
        purpose: &str,
        cleaned: &[(String, OcrEvidence)],
    ) {
        for (sop, evidence) in cleaned {
            self.audit.record_or_warn(Event {
                actor: "node".into(),
                action: "clean-pixel-data".into(),
                object: format!(
                    "instance {sop}; boxes {}{}",
                    serde_json::to_string(
                        &evidence.redacted[..evidence.redacted.len().min(AUDIT_BOXES)]
                    )
                    .unwrap_or_default(),
                    match evidence.redacted.len().saturating_sub(AUDIT_BOXES) {
                        0 => String::new(),
                        more => format!(" and {more} more"),
                    }
                ),
                agreement: agreement.into(),
                purpose: purpose.into(),
                outcome: format!("ok ({})", evidence.summary()),
            });
        }
    }

    /// Puts every quarantined input that is still on disk into the node's quarantine for
    /// review, auditing each; the item id is added to its reason.
    pub(crate) fn hold_for_review(
        &self,
        agreement: &str,
        flow_name: &str,
        source: &str,
        held: &mut [HeldBack],
    ) {
        let set = self.agreements();
        let retention_days = set
            .agreements
            .get(agreement)
            .and_then(|a| a.flow(flow_name))
            .and_then(|f| f.retention.map(|r| r.days));
        let mut q = None;
        for h in held
            .iter_mut()
            .filter(|h| h.kind == HeldBackKind::Quarantined)
        {
            let Some(path) = h.path.clone() else { continue };
            if q.is_none() {
                match self.quarantine() {
                    Ok(opened) => q = Some(opened),
                    Err(e) => {
                        tracing::error!(error = %e, "the quarantine folder cannot be opened; held inputs stay where they are");
                        return;
                    }
                }
            }
            let Some(q) = q.as_ref() else { return };
            let req = HoldRequest {
                agreement,
                flow: flow_name,
                source,
                reason: &h.reason,
                findings: findings_of(&h.reason),
                retention_days,
                origin: Some(h.input.clone()),
            };
            match q.hold_file(&req, &path) {
                Ok(id) => {
                    self.audit.record_or_warn(Event {
                        actor: "node".into(),
                        action: "quarantine-hold".into(),
                        object: format!("quarantine item {id} (flow {flow_name})"),
                        agreement: agreement.into(),
                        purpose: String::new(),
                        outcome: format!("held: {}", h.reason),
                    });
                    h.reason = format!("{} (held for review as {id})", h.reason);
                }
                Err(e) => {
                    tracing::error!(error = %e, "a quarantined input could not be held for review")
                }
            }
        }
    }

    /// Audits the inputs of a `send` held back for another reason than review (not covered by
    /// the flow, not usable): one entry per kind, with how many and the first reason — a folder
    /// of ten thousand files outside the flow costs two entries. File names are not written
    /// (they may name the patient); quarantined inputs have their own `quarantine-hold` entries.
    pub(super) fn audit_not_sent(&self, flow: &crate::ingest::IngestFlow, held: &[HeldBack]) {
        for kind in [HeldBackKind::NotCovered, HeldBackKind::Failed] {
            let mut of_kind = held.iter().filter(|h| h.kind == kind);
            let Some(first) = of_kind.next() else {
                continue;
            };
            let n = 1 + of_kind.count();
            self.audit.record_or_warn(Event {
                actor: crate::audit::local_user(),
                action: crate::audit::events::kind::REFUSE.into(),
                object: format!("send under flow {}: {n} input(s) not sent", flow.flow),
                agreement: flow.agreement.clone(),
                purpose: flow.purpose.clone(),
                outcome: format!("{}: {}", kind.describe(), first.reason),
            });
        }
    }

    /// A privacy officer's release of a held item: the flow's de-identification and verifier run
    /// again on the original; a pass (or, with `override_verifier`, a failure the officer
    /// accepts) is queued in the flow's outbox and the item deleted. Every attempt is audited
    /// with the officer and the justification.
    pub fn release_quarantined(
        &self,
        id: &str,
        officer: &str,
        justification: &str,
        override_verifier: bool,
    ) -> Result<Released, ReleaseError> {
        let q = self.quarantine()?;
        let item = q.get(id).map_err(NodeError::from)?;
        let audit = |outcome: String| {
            self.audit.record_or_warn(Event {
                actor: format!("user:{officer}"),
                action: "quarantine-release".into(),
                object: format!("quarantine item {id} (flow {})", item.flow),
                agreement: item.agreement.clone(),
                purpose: String::new(),
                outcome: format!("{outcome}; justification: {justification}"),
            })
        };
        let unusable = |reason: String| {
            audit(format!("refused: {reason}"));
            ReleaseError::Unusable {
                id: id.into(),
                reason,
            }
        };
        let set = self.agreements();
        let agreement = set.agreements.get(&item.agreement);
        let Some(flow) = agreement.and_then(|a| a.flow(&item.flow)).cloned() else {
            return Err(unusable(
                "its agreement or flow is no longer in force".into(),
            ));
        };
        let purpose = flow
            .purposes
            .iter()
            .next()
            .map(|p| p.name().to_string())
            .unwrap_or_default();
        set.authorise(
            &item.agreement,
            &item.flow,
            Some(&purpose),
            self.site_id(),
            &flow.to,
        )
        .map_err(|r| unusable(format!("the agreement does not allow it now: {r}")))?;
        let path = self
            .agreement_file(&item.agreement)
            .ok_or_else(|| unusable("the agreement's file is gone".into()))?;
        let deid = flow
            .deidentifier(&item.agreement, &path, &self.keys)
            .map_err(|e| unusable(format!("trial subject IDs: {e}")))?;
        let input = q.input_view(id).map_err(NodeError::from)?;
        let obj = crate::deid::guard::read_guarded(input.path()).map_err(unusable)?;
        let (mut d, verdict) = deid
            .deidentify_for_review(obj)
            .map_err(|e| unusable(e.to_string()))?;
        let verifier_reason = match verdict {
            Ok(()) => None,
            Err(e @ DeidError::Malformed { .. }) => return Err(unusable(e.to_string())),
            Err(DeidError::Quarantined { reason }) if !override_verifier => {
                audit(format!("refused: still fails the verifier ({reason})"));
                return Err(ReleaseError::StillFails {
                    id: id.into(),
                    reason,
                });
            }
            Err(DeidError::Quarantined { reason }) => {
                // The officer has looked at the image: their decision is that what it shows
                // does not identify the patient, which is what BurnedInAnnotation NO states.
                if crate::deid::pixels::burned_in_risk(&d.object).is_some() {
                    d.object.put(dicom_core::DataElement::new(
                        tags::BURNED_IN_ANNOTATION,
                        dicom_core::VR::CS,
                        "NO",
                    ));
                }
                Some(reason)
            }
        };
        if let Some(evidence) = &d.ocr_evidence {
            let cleaned = [(d.sop_instance_uid.clone(), evidence.clone())];
            self.audit_pixel_cleaning(&item.agreement, &purpose, &cleaned);
        }
        let outbox_dir = self
            .stage_for_delivery(&item.agreement, &item.flow, &purpose, &flow.to, d)
            .map_err(|e| unusable(e.to_string()))?;
        q.remove(id).map_err(NodeError::from)?;
        audit(match &verifier_reason {
            None => "released (passes the verifier); queued in the outbox".into(),
            Some(r) => format!(
                "released with the officer's override of the verifier ({r}); queued in the outbox"
            ),
        });
        Ok(Released {
            item,
            outbox_dir,
            overridden: verifier_reason.is_some(),
            verifier_reason,
        })
    }

    /// A privacy officer's discard of a held item: its bytes are deleted; audited.
    pub fn discard_quarantined(
        &self,
        id: &str,
        officer: &str,
        justification: &str,
    ) -> Result<HeldItem, NodeError> {
        let q = self.quarantine()?;
        let item = q.get(id)?;
        q.remove(id)?;
        self.audit.record_or_warn(Event {
            actor: format!("user:{officer}"),
            action: "quarantine-discard".into(),
            object: format!("quarantine item {id} (flow {})", item.flow),
            agreement: item.agreement.clone(),
            purpose: String::new(),
            outcome: format!("deleted; justification: {justification}"),
        });
        Ok(item)
    }

    /// Audits that an officer is about to see a held item's identifying values (`quarantine
    /// show --reveal`). Fails closed: nothing is shown unless the entry is written.
    pub fn audit_reveal(&self, item: &HeldItem, officer: &str) -> Result<(), NodeError> {
        self.audit.record(Event {
            actor: format!("user:{officer}"),
            action: "quarantine-reveal".into(),
            object: format!("quarantine item {} (flow {})", item.id, item.flow),
            agreement: item.agreement.clone(),
            purpose: String::new(),
            outcome: "identifying values shown on screen".into(),
        })?;
        Ok(())
    }

    /// Queues one de-identified instance for delivery under (agreement, flow) where `send`
    /// stages its outputs: the file in the study's outbox folder, its tokens in the vault, and
    /// the study's `transfer.json` (a pending entry gains the instance; otherwise a new pending
    /// entry). The running node's outbox worker delivers it.
    pub fn stage_for_delivery(
        &self,
        agreement: &str,
        flow: &str,
        purpose: &str,
        to: &str,
        d: crate::deid::Deidentified,
    ) -> Result<PathBuf, NodeError> {
        let modality = d
            .object
            .get(tags::MODALITY)
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim_matches(['\0', ' ']).to_string())
            .filter(|s| !s.is_empty());
        let mut bytes = Vec::new();
        crate::deid::batch::encode_output(d.object, d.pixel_data.as_ref(), &mut bytes).map_err(
            |e| NodeError::Input(format!("cannot encode the de-identified object: {e}")),
        )?;
        let vault = self.vault()?;
        for (token, entry) in &d.vault_entries {
            vault
                .record(agreement, token, entry)
                .map_err(|e| NodeError::Store(e.into()))?;
        }
        vault.flush().map_err(|e| NodeError::Store(e.into()))?;
        let outbox = self.outbox();
        let dir = outbox.study_dir(agreement, &d.study_uid);
        std::fs::create_dir_all(&dir).map_err(|source| store::StoreError::Io {
            path: dir.clone(),
            source,
        })?;
        let Some(_claim) = Outbox::try_claim(&dir) else {
            return Err(NodeError::Input(
                "the study is being delivered right now; try again in a minute".into(),
            ));
        };
        let file = format!("{}.dcm", store::safe_name(&d.sop_instance_uid));
        let mut entry = match Outbox::load(&dir) {
            Ok(e) if e.state == OutboxState::Pending && e.flow != flow => {
                return Err(NodeError::Input(format!(
                    "the study waits in the outbox for flow `{}`; let it be delivered first (`pacs-broker outbox --retry`)",
                    e.flow
                )))
            }
            Ok(e) if e.state == OutboxState::Pending => e,
            _ => OutboxEntry::pending(agreement, flow, purpose, to, &d.study_uid, true),
        };
        if !entry.patient_tokens.contains(&d.patient_token) {
            entry.patient_tokens.push(d.patient_token.clone());
        }
        outbox
            .at_rest()
            .write_atomic(&dir.join(&file), &bytes)
            .map_err(store::StoreError::from)?;
        entry
            .instances
            .retain(|i| i.sop_instance_uid != d.sop_instance_uid);
        entry.instances.push(OutboxInstance {
            file,
            sha256: hex::encode(Sha256::digest(&bytes)),
            size: bytes.len() as u64,
            sop_instance_uid: d.sop_instance_uid,
        });
        if let Some(m) = modality.filter(|m| !entry.modalities.contains(m)) {
            entry.modalities.push(m);
            entry.modalities.sort();
        }
        entry.next_attempt = 0;
        outbox.save(&entry)?;
        Ok(dir)
    }
}

/// The verifier's findings in a quarantine reason, one per line (no values are in it).
fn findings_of(reason: &str) -> Vec<String> {
    match reason.split_once(": ") {
        Some((_, rest)) if reason.starts_with("residual PHI") => {
            rest.split("; ").map(str::to_string).collect()
        }
        _ => vec![reason.to_string()],
    }
}
