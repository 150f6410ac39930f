//! The return path at a node: `pacs-broker return` and the serving node's worker at the partner,
//! the `ReturnResult` desk and the DIMSE side door wired to this node's store, agreements, vault
//! and audit.
//!
//! Owns the node-level steps: reading each input through the guarded reader, recognising it
//! (`results::recognise`, against the store's received studies), queueing it durably
//! (`results::queue`), sending it home (`federation::returns::send_result`) and auditing every
//! outcome at the partner. `return` run beside a running node (which holds the store's lock)
//! queues its inputs unchecked and waits for that node to recognise and send them. Does not own
//! the decisions themselves (`results`) or the transport (`federation`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Node, NodeError};
use crate::audit::{Detail, Event};
use crate::federation::client::PeerClient;
use crate::federation::returns::{send_result, OutgoingResult, ReturnDesk, ReturnSendError};
use crate::results::intake::ResultIntake;
use crate::results::queue::{ReturnEntry, ReturnQueue, ReturnState, RESULT_FILE};
use crate::results::recognise::{recognise, ReturnTarget};
use crate::results::sink::{results_dir, ResultSink};
use crate::results::ResultError;
use crate::store::{Store, StoreError};

/// How long `return` beside a running node waits for that node to send what it queued.
const WAIT_FOR_RUNNING_NODE: Duration = Duration::from_secs(60);

/// What became of one input of `pacs-broker return`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReturnOutcome {
    /// The origin confirmed it.
    Returned {
        sop_instance_uid: String,
        origin: String,
    },
    /// Queued; the serving node retries it (the reason it did not go now).
    Queued { reason: String },
    /// Refused here or by the origin; never sent or never taken.
    Refused { reason: String },
}

/// The report of `pacs-broker return`: one outcome per input file.
#[derive(Debug, Clone, Default)]
pub struct ReturnReport {
    pub outcomes: Vec<(PathBuf, ReturnOutcome)>,
}

/// The DICOM files under `inputs` (files as given, folders walked, hidden files skipped).
fn input_files(inputs: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for i in inputs {
        if i.is_dir() {
            let mut v: Vec<PathBuf> = walkdir::WalkDir::new(i)
                .into_iter()
                .flatten()
                .filter(|e| e.file_type().is_file())
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .map(|e| e.into_path())
                .collect();
            v.sort();
            out.extend(v);
        } else {
            out.push(i.clone());
        }
    }
    out
}

fn object_of(e: &ReturnEntry) -> String {
    format!(
        "result {} on study {} to site:{}",
        e.sop_instance_uid, e.study_token, e.origin
    )
}

impl Node {
    /// `pacs-broker return`: sends results on studies this site received under `agreement`
    /// back to their origin (see the module documentation).
    pub async fn return_results(
        &self,
        agreement: &str,
        inputs: &[PathBuf],
    ) -> Result<ReturnReport, NodeError> {
        self.check_returning_agreement(agreement)?;
        let files = input_files(inputs);
        if files.is_empty() {
            return Err(NodeError::NothingToSend);
        }
        let store = match self.store() {
            Ok(s) => Some(s),
            Err(NodeError::Store(StoreError::InUse(_))) => None,
            Err(e) => return Err(e),
        };
        let queue = self.return_queue();
        let mut report = ReturnReport::default();
        let mut waiting = Vec::new();
        for file in files {
            let queued = match &store {
                Some(store) => self.recognise_file(store.as_ref(), &file, Some(agreement)),
                None => self.precheck_file(&file, agreement),
            }
            .and_then(|target| {
                let state = if store.is_some() {
                    ReturnState::Pending
                } else {
                    ReturnState::Unchecked
                };
                queue
                    .add(&file, &target, state)
                    .map_err(|e| ResultError::Storage(e.to_string()))
            });
            let (dir, mut entry) = match queued {
                Ok(q) => q,
                Err(e) => {
                    let reason = e.to_string().replace('\n', "; ");
                    self.audit_return("result".into(), agreement, "", format!("refused: {reason}"));
                    report
                        .outcomes
                        .push((file, ReturnOutcome::Refused { reason }));
                    continue;
                }
            };
            let outcome = match entry.state {
                ReturnState::Unchecked => {
                    waiting.push((file, dir));
                    continue;
                }
                ReturnState::Returned => ReturnOutcome::Returned {
                    sop_instance_uid: entry.sop_instance_uid,
                    origin: entry.origin,
                },
                _ => self.return_now(&dir, &mut entry).await,
            };
            report.outcomes.push((file, outcome));
        }
        for (file, dir) in waiting {
            let outcome = self.wait_for_running_node(&dir).await;
            report.outcomes.push((file, outcome));
        }
        Ok(report)
    }

    /// The agreement is in force and has a flow into this site that lets results return.
    fn check_returning_agreement(&self, agreement: &str) -> Result<(), ResultError> {
        let set = self.agreements();
        let a = set
            .agreements
            .get(agreement)
            .ok_or_else(|| ResultError::UnknownAgreement(agreement.to_string()))?;
        if !a
            .flows
            .iter()
            .any(|f| f.to == self.site_id() && f.results.return_to_origin)
        {
            let e = ResultError::NoReturningFlow {
                agreement: agreement.to_string(),
                site: self.site_id().to_string(),
            };
            self.audit_return("results".into(), agreement, "", format!("refused: {e}"));
            return Err(e);
        }
        Ok(())
    }

    /// Reads a result file (one given to `return`, or a queued one, sealed at rest) through the
    /// guard: its plaintext, bounded by [`crate::results::MAX_RESULT_SIZE`].
    fn read_result_file(
        &self,
        file: &Path,
    ) -> Result<(dicom_object::DefaultDicomObject, u64), ResultError> {
        let view = self
            .at_rest()
            .plain_view(file)
            .map_err(|e| ResultError::Unreadable(e.to_string()))?;
        let size = std::fs::metadata(view.path()).map(|m| m.len()).unwrap_or(0);
        if size > crate::results::MAX_RESULT_SIZE {
            return Err(ResultError::TooLarge { size });
        }
        let (obj, _pixels) =
            crate::deid::guard::read_guarded_split(view.path()).map_err(ResultError::Unreadable)?;
        Ok((obj, size))
    }

    /// Reads `file` through the guard and recognises it against the store.
    fn recognise_file(
        &self,
        store: &dyn Store,
        file: &Path,
        agreement: Option<&str>,
    ) -> Result<ReturnTarget, ResultError> {
        let (obj, _size) = self.read_result_file(file)?;
        let today = time::OffsetDateTime::now_utc().date();
        recognise(
            &obj,
            self.site_id(),
            &self.agreements(),
            store,
            agreement,
            today,
        )
    }

    /// Without the store (a running node holds it): the file is readable, bounded, and names
    /// its study; the running node recognises it fully.
    fn precheck_file(&self, file: &Path, agreement: &str) -> Result<ReturnTarget, ResultError> {
        let (obj, _size) = self.read_result_file(file)?;
        let text = |tag| {
            obj.get(tag)
                .and_then(|e| e.to_str().ok())
                .map(|s| s.trim_matches(['\0', ' ']).to_string())
                .filter(|s| !s.is_empty())
        };
        use dicom_dictionary_std::tags;
        Ok(ReturnTarget {
            agreement: agreement.to_string(),
            flow: String::new(),
            origin: String::new(),
            purpose: String::new(),
            study_token: text(tags::STUDY_INSTANCE_UID)
                .ok_or(ResultError::Missing("Study Instance UID"))?,
            sop_instance_uid: text(tags::SOP_INSTANCE_UID)
                .ok_or(ResultError::Missing("SOP Instance UID"))?,
        })
    }

    /// Waits until the running node has handled an unchecked entry (or the wait ends).
    async fn wait_for_running_node(&self, dir: &Path) -> ReturnOutcome {
        let start = Instant::now();
        loop {
            if let Ok(e) = ReturnQueue::load(dir) {
                match e.state {
                    ReturnState::Returned => {
                        return ReturnOutcome::Returned {
                            sop_instance_uid: e.sop_instance_uid,
                            origin: e.origin,
                        }
                    }
                    ReturnState::Refused | ReturnState::Destroyed => {
                        return ReturnOutcome::Refused {
                            reason: e.last_error.unwrap_or_default(),
                        }
                    }
                    ReturnState::Pending if e.attempts > 0 => {
                        return ReturnOutcome::Queued {
                            reason: e.last_error.unwrap_or_default(),
                        }
                    }
                    _ => {}
                }
            }
            if start.elapsed() > WAIT_FOR_RUNNING_NODE {
                return ReturnOutcome::Queued {
                    reason: "the site's running node has not sent it yet".into(),
                };
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// One attempt for a claimed entry, with its outcome recorded and audited.
    async fn return_now(&self, dir: &Path, entry: &mut ReturnEntry) -> ReturnOutcome {
        let Some(_claim) = ReturnQueue::try_claim(dir) else {
            return ReturnOutcome::Queued {
                reason: "the site's running node is sending it now".into(),
            };
        };
        let result = self.attempt_return(dir, entry).await;
        let object = object_of(entry);
        match result {
            Ok(receipt) => {
                let note = if receipt.already_held {
                    "ok (the origin already had it)"
                } else {
                    "ok (the origin re-identified and took it)"
                };
                self.audit.record_detailed_or_warn(
                    Event {
                        actor: "node".into(),
                        action: "return".into(),
                        object,
                        agreement: entry.agreement.clone(),
                        purpose: entry.purpose.clone(),
                        outcome: note.into(),
                    },
                    Detail {
                        study: Some(entry.study_token.clone()),
                        party: Some(entry.origin.clone()),
                        flow: Some(entry.flow.clone()),
                        instances: Some(1),
                        ..Detail::default()
                    },
                );
                if let Err(e) = ReturnQueue::mark_returned(dir, entry) {
                    tracing::error!(error = %e, "returned, but the queue entry could not be updated");
                }
                ReturnOutcome::Returned {
                    sop_instance_uid: entry.sop_instance_uid.clone(),
                    origin: entry.origin.clone(),
                }
            }
            Err(e) => {
                let transient = e.is_transient();
                let reason = e.to_string();
                let note = if transient {
                    "queued for retry: "
                } else {
                    "refused: "
                };
                self.audit_return(
                    object,
                    &entry.agreement.clone(),
                    &entry.purpose.clone(),
                    format!("{note}{reason}"),
                );
                if let Err(err) = ReturnQueue::mark_failed(dir, entry, &reason, transient) {
                    tracing::error!(error = %err, "the return queue entry could not be updated");
                }
                if transient {
                    ReturnOutcome::Queued { reason }
                } else {
                    ReturnOutcome::Refused { reason }
                }
            }
        }
    }

    fn audit_return(&self, object: String, agreement: &str, purpose: &str, outcome: String) {
        self.audit.record_or_warn(Event {
            actor: "node".into(),
            action: "return".into(),
            object,
            agreement: agreement.to_string(),
            purpose: purpose.to_string(),
            outcome,
        });
    }

    /// Connects to the origin and streams the result; the agreement must still allow it.
    async fn attempt_return(
        &self,
        dir: &Path,
        entry: &ReturnEntry,
    ) -> Result<crate::federation::proto::ResultReceipt, ReturnSendError> {
        let refused = |why: String| ReturnSendError::Refused {
            site: entry.origin.clone(),
            status: tonic::Status::failed_precondition(why),
        };
        let today = time::OffsetDateTime::now_utc().date();
        self.agreements()
            .still_allowed(&entry.agreement, self.site_id(), &entry.origin, today)
            .map_err(|r| refused(format!("not sent: {r}")))?;
        let peer = self
            .config
            .peers
            .get(&entry.origin)
            .cloned()
            .ok_or_else(|| refused(NodeError::NoPeer(entry.origin.clone()).to_string()))?;
        let server_name = peer.server_name.clone().unwrap_or_else(|| {
            peer.address
                .rsplit_once(':')
                .map(|(h, _)| h.trim_matches(['[', ']']).to_string())
                .unwrap_or_else(|| peer.address.clone())
        });
        let mut client = PeerClient::connect(&self.tls, &entry.origin, &peer.address, &server_name)
            .await
            .map_err(|e| ReturnSendError::Refused {
                site: entry.origin.clone(),
                status: tonic::Status::unavailable(e.to_string()),
            })?;
        let mut sha = [0u8; 32];
        hex::decode_to_slice(&entry.sha256, &mut sha)
            .map_err(|_| refused("the queue entry has a malformed SHA-256".into()))?;
        let at_rest = self.at_rest();
        let result = OutgoingResult {
            agreement: &entry.agreement,
            study_token: &entry.study_token,
            sop_instance_uid: &entry.sop_instance_uid,
            path: &dir.join(RESULT_FILE),
            at_rest: &at_rest,
            sha256: sha,
            size: entry.size,
        };
        send_result(&mut client, &result, self.audit.checkpoint_for_peer()).await
    }

    /// The partner's durable queue of results going home.
    pub fn return_queue(&self) -> ReturnQueue {
        ReturnQueue::new(&self.config.data_dir).with_at_rest(self.at_rest())
    }

    /// The serving node's round: recognises what `return` queued unchecked, and sends every due
    /// result home; returns how many went.
    pub async fn drain_returns(&self) -> usize {
        let mut returned = 0;
        for (dir, _) in self.return_queue().due(crate::store::outbox::now()) {
            let mut entry = match ReturnQueue::load(&dir) {
                Ok(e) => e,
                Err(_) => continue,
            };
            if entry.state == ReturnState::Unchecked {
                let Some(_claim) = ReturnQueue::try_claim(&dir) else {
                    continue;
                };
                let agreement = entry.agreement.clone();
                let recognised = self
                    .store()
                    .map_err(|e| ResultError::Storage(e.to_string()))
                    .and_then(|s| {
                        self.recognise_file(s.as_ref(), &dir.join(RESULT_FILE), Some(&agreement))
                    });
                let marked = match recognised {
                    Ok(target) => ReturnQueue::mark_recognised(&dir, &mut entry, &target),
                    Err(e) => {
                        let reason = e.to_string().replace('\n', "; ");
                        self.audit_return(
                            "result".into(),
                            &agreement,
                            "",
                            format!("refused: {reason}"),
                        );
                        let _ = ReturnQueue::mark_refused(&dir, &mut entry, &reason);
                        continue;
                    }
                };
                if let Err(e) = marked {
                    tracing::error!(error = %e, "the return queue entry could not be updated");
                    continue;
                }
            }
            if matches!(
                self.return_now(&dir, &mut entry).await,
                ReturnOutcome::Returned { .. }
            ) {
                returned += 1;
            }
        }
        returned
    }

    /// At the origin with a PACS: deletes the store's copies of re-identified results the PACS
    /// has confirmed (see `results::sink::sweep_delivered`).
    pub fn sweep_delivered_results(&self) {
        if self
            .config
            .dicom
            .as_ref()
            .is_none_or(|d| d.deliver.is_none())
        {
            return;
        }
        let Ok(store) = self.store() else { return };
        match crate::results::sink::sweep_delivered(&self.config.data_dir, &store) {
            Ok(0) => {}
            Ok(n) => tracing::info!(results = n, "delivered results removed from the store"),
            Err(e) => tracing::error!(error = %e, "cannot remove delivered results from the store"),
        }
    }

    /// The origin's `ReturnResult` desk: results go to `[dicom.deliver]` when configured
    /// (through the store's delivery queue), otherwise to the results folder.
    pub(super) fn return_desk(self: &Arc<Self>) -> Result<ReturnDesk, NodeError> {
        let pacs = self
            .config
            .dicom
            .as_ref()
            .is_some_and(|d| d.deliver.is_some());
        let sink = if pacs {
            ResultSink::Pacs(self.store()?)
        } else {
            ResultSink::Folder(results_dir(&self.config.data_dir))
        };
        // Weak: the desk lives in the federation service, which must not keep the node (and
        // its databases) open after the node is dropped.
        let node = Arc::downgrade(self);
        Ok(ReturnDesk {
            site_id: self.site_id().to_string(),
            data_dir: self.config.data_dir.clone(),
            agreements: self.agreements.subscribe(),
            audit: self.audit.clone(),
            keys: self.keys.clone(),
            vault: Box::new(move || {
                let node = node.upgrade().ok_or("the node is shutting down")?;
                node.shared_vault().map_err(|e| e.to_string())
            }),
            sink,
            at_rest: self.at_rest(),
        })
    }

    /// The DICOM listener's side door for results (see `results::intake`).
    pub(super) fn result_intake(
        self: &Arc<Self>,
        has_routes: bool,
        wake: Arc<tokio::sync::Notify>,
    ) -> ResultIntake {
        let (a, b) = (Arc::downgrade(self), Arc::downgrade(self));
        ResultIntake {
            may_return: Box::new(move || {
                let Some(a) = a.upgrade() else { return false };
                a.agreements().agreements.values().any(|ag| {
                    ag.flows
                        .iter()
                        .any(|f| f.to == a.site_id() && f.results.return_to_origin)
                })
            }),
            recognise: Box::new(move |obj| {
                let b = b
                    .upgrade()
                    .ok_or_else(|| ResultError::Storage("the node is shutting down".into()))?;
                let store = b.store().map_err(|e| ResultError::Storage(e.to_string()))?;
                let today = time::OffsetDateTime::now_utc().date();
                recognise(
                    obj,
                    b.site_id(),
                    &b.agreements(),
                    store.as_ref(),
                    None,
                    today,
                )
            }),
            queue: self.return_queue(),
            audit: self.audit.clone(),
            wake,
            has_routes,
        }
    }
}
