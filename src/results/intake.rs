//! At the partner: the DICOM listener's side door for results.
//!
//! Owns [`WithResults`], a [`StoreService`] around the listener's ordinary one (the ingest
//! pipeline of `[[dicom.routes]]`): every C-STORE is first asked "is this a result on a study
//! this site received?" — read through the guarded reader (`deid::guard`) from the listener's
//! memory spool, or as the plaintext of its spool file (sealed at rest), recognised by
//! [`super::recognise`] — and if so it is queued durably to go home ([`super::queue`]) and only
//! then acknowledged; it never enters a route. An instance on a study this site did not receive
//! goes to the routes as before; on a listener without routes it is refused here, with the reason
//! (refers to a study never received). A result that is recognised but may not return (the flow
//! allows no returns, the patient differs, it reuses a received instance's UID) is refused with
//! the reason. Each outcome is audited. Nodes that receive nothing under a flow that lets results
//! return skip the check (no extra parse on the ingest path).
//!
//! Does not own: the association (`dicom_net::scp`) or sending results home (the node's worker).

use std::sync::Arc;

use dicom_object::mem::InMemDicomObject;

use super::queue::ReturnQueue;
use super::recognise::ReturnTarget;
use super::ResultError;
use crate::audit::{AuditLog, Event};
use crate::dicom_net::scp::{AssociationPeer, Received, StoreOutcome, StoreService, StoreStatus};

/// Recognises a result (the node's store and agreements behind it).
pub type Recogniser =
    dyn Fn(&InMemDicomObject) -> Result<ReturnTarget, ResultError> + Send + Sync + 'static;

/// What the side door needs from the node.
pub struct ResultIntake {
    /// True when some agreement in force has a flow into this site that lets results return.
    pub may_return: Box<dyn Fn() -> bool + Send + Sync + 'static>,
    pub recognise: Box<Recogniser>,
    pub queue: ReturnQueue,
    pub audit: Arc<AuditLog>,
    /// Woken when a result is queued (the node's worker sends it home).
    pub wake: Arc<tokio::sync::Notify>,
    /// The listener has `[[dicom.routes]]` for what is not a result.
    pub has_routes: bool,
}

/// The listener's store service with the results side door in front of `inner`.
pub struct WithResults<S: StoreService> {
    pub inner: Arc<S>,
    pub intake: Arc<ResultIntake>,
}

/// An association's session: the ordinary one, and who is calling.
pub struct Session<T> {
    inner: T,
    peer: AssociationPeer,
}

impl ResultIntake {
    fn audit(
        &self,
        peer: &AssociationPeer,
        target: Option<&ReturnTarget>,
        object: String,
        outcome: String,
    ) {
        self.audit.record_or_warn(Event {
            actor: format!("dicom:{}@{}", peer.calling_ae.trim(), peer.address.ip()),
            action: "return".into(),
            object,
            agreement: target.map(|t| t.agreement.clone()).unwrap_or_default(),
            purpose: target.map(|t| t.purpose.clone()).unwrap_or_default(),
            outcome,
        });
    }

    /// `Some(answer)` when the instance is (or claims to be) a result; `None` to pass it on.
    fn take(&self, peer: &AssociationPeer, instance: Received<'_>) -> Option<StoreOutcome> {
        if !(self.may_return)() {
            return (!self.has_routes).then(|| {
                StoreOutcome::refused(
                    StoreStatus::NOT_AUTHORIZED,
                    "this listener takes only results on received studies, and no agreement in force lets results return from this site",
                )
            });
        }
        // The listener seals its spool (encryption at rest): read the plaintext through the
        // same keys, in memory, never a decrypted copy on disk.
        let read = match instance {
            Received::Memory(bytes) => crate::deid::guard::read_guarded_split_memory(bytes.clone()),
            Received::File(spool) => self
                .queue
                .at_rest()
                .plain_view(spool)
                .map_err(|e| e.to_string())
                .and_then(|view| crate::deid::guard::read_guarded_split(view.path())),
        };
        let obj = match read {
            Ok((obj, _pixels)) => obj,
            Err(_) if self.has_routes => return None,
            Err(e) => {
                let why = ResultError::Unreadable(e).to_string();
                self.audit(peer, None, "result".into(), format!("refused: {why}"));
                return Some(StoreOutcome::refused(StoreStatus::CANNOT_UNDERSTAND, why));
            }
        };
        let target = match (self.recognise)(&obj) {
            Ok(t) => t,
            Err(ResultError::NotReceived { .. }) if self.has_routes => return None,
            Err(e) => {
                let status = match e {
                    ResultError::Missing(_) | ResultError::Unreadable(_) => {
                        StoreStatus::CANNOT_UNDERSTAND
                    }
                    ResultError::Storage(_) => StoreStatus::OUT_OF_RESOURCES,
                    _ => StoreStatus::NOT_AUTHORIZED,
                };
                let why = e.to_string().replace('\n', "; ");
                tracing::warn!(calling_ae = %peer.calling_ae, reason = %why, "result refused");
                self.audit(peer, None, "result".into(), format!("refused: {why}"));
                return Some(StoreOutcome::refused(status, why));
            }
        };
        let object = format!(
            "result {} on study {} to site:{}",
            target.sop_instance_uid, target.study_token, target.origin
        );
        let added = instance
            .with_path(|spool| {
                self.queue
                    .add(spool, &target, super::queue::ReturnState::Pending)
            })
            .map_err(|source| crate::store::StoreError::Io {
                path: "memory spool".into(),
                source,
            })
            .and_then(|added| added);
        match added {
            Ok(_) => {
                self.audit(
                    peer,
                    Some(&target),
                    object,
                    "queued to go home to the origin".into(),
                );
                self.wake.notify_one();
                Some(StoreOutcome::Stored)
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot queue a result");
                self.audit(
                    peer,
                    Some(&target),
                    object,
                    "failed: cannot queue it".into(),
                );
                Some(StoreOutcome::refused(
                    StoreStatus::OUT_OF_RESOURCES,
                    "the result could not be queued durably",
                ))
            }
        }
    }
}

impl<S: StoreService> StoreService for WithResults<S> {
    type Session = Session<S::Session>;

    fn begin(&self, peer: &AssociationPeer) -> Self::Session {
        Session {
            inner: self.inner.begin(peer),
            peer: peer.clone(),
        }
    }

    fn store(&self, session: &mut Self::Session, instance: Received<'_>) -> StoreOutcome {
        match self.intake.take(&session.peer, instance) {
            Some(outcome) => outcome,
            None => self.inner.store(&mut session.inner, instance),
        }
    }

    fn end(&self, session: Self::Session) {
        self.inner.end(session.inner)
    }
}
