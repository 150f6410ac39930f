//! The receiving side of the federation protocol.
//!
//! Owns: [`Receiver`], the tonic service that answers offers and transfers. It never trusts the
//! sender: the caller's site comes from its verified certificate; every offer is authorised
//! against the agreements in force (and re-authorised while a transfer streams, so a suspension
//! cuts it off); every instance is streamed to a staging file (memory does not grow with study
//! size), checked against its SHA-256 and size, parsed as DICOM and re-checked against the flow's
//! de-identification profile before anything is stored; a failed transfer leaves nothing behind.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

use super::proto::federation_server::Federation;
use super::proto::{
    HelloRequest, HelloResponse, OfferRequest, OfferResponse, Receipt, TransferChunk,
};
use super::receipt::ReceiptSigner;
use super::tls::PeerInfo;
use super::CHUNK_SIZE;
use crate::audit::{AuditLog, Event};
use crate::deid::DeidConfig;
use crate::dsa::{AgreementSet, Refusal, StudyFacts, TransferRequest};
use crate::store::{StagedInstance, Store, StudyKey};

/// Most instances one offer may announce.
pub const MAX_INSTANCES_PER_OFFER: usize = 100_000;
/// Largest single instance accepted (4 GiB).
pub const MAX_INSTANCE_SIZE: u64 = 4 << 30;
/// Most offers waiting for their transfer at once.
pub const MAX_PENDING_OFFERS: usize = 1024;
/// How long an offer stays valid without its transfer.
pub const OFFER_TTL: Duration = Duration::from_secs(3600);

struct Plan {
    agreement: String,
    flow: String,
    purpose: String,
    sender: String,
    study_token: String,
    /// Instances to receive: sha -> (SOP Instance UID, size).
    wanted: HashMap<[u8; 32], (String, u64)>,
    already: Vec<(String, [u8; 32])>,
    /// Verified instances kept from an interrupted transfer of this study (resumption).
    resumed: Vec<StagedInstance>,
    /// The flow's de-identification settings: every received instance must satisfy them.
    deid: DeidConfig,
    expected: usize,
    created: Instant,
}

impl Plan {
    fn key(&self) -> StudyKey {
        StudyKey {
            agreement: self.agreement.clone(),
            flow: self.flow.clone(),
            from_site: self.sender.clone(),
            study_token: self.study_token.clone(),
        }
    }
}

/// Why a transfer did not complete.
enum Failure {
    /// The stream broke or ended early: verified instances are kept for resumption.
    Interrupted(Status),
    /// Something was wrong with what arrived, or the agreement no longer allows it: everything
    /// received for the study is discarded.
    Rejected(Status),
}

/// The receiving service of one node.
pub struct Receiver {
    site_id: String,
    store: Arc<dyn Store>,
    agreements: watch::Receiver<Arc<AgreementSet>>,
    audit: Arc<AuditLog>,
    signer: ReceiptSigner,
    plans: Mutex<HashMap<String, Plan>>,
}

impl Receiver {
    pub fn new(
        site_id: String,
        store: Arc<dyn Store>,
        agreements: watch::Receiver<Arc<AgreementSet>>,
        audit: Arc<AuditLog>,
        signer: ReceiptSigner,
    ) -> Self {
        Receiver {
            site_id,
            store,
            agreements,
            audit,
            signer,
            plans: Mutex::new(HashMap::new()),
        }
    }

    fn refuse(&self, peer: &str, agreement: &str, purpose: &str, object: &str, why: &str) {
        self.audit.record_or_warn(Event {
            actor: format!("site:{peer}"),
            action: "refuse".into(),
            object: object.into(),
            agreement: agreement.into(),
            purpose: purpose.into(),
            outcome: why.into(),
        });
    }

    /// Checks an offer: agreement active, valid and fully signed, both sites parties and not
    /// suspended, the flow's direction, purpose and modality selector, and the daily volume.
    fn authorise_offer(
        &self,
        set: &AgreementSet,
        o: &OfferRequest,
        sender: &str,
    ) -> Result<DeidConfig, Refusal> {
        let study = StudyFacts {
            modalities: o.modalities.clone(),
            ..StudyFacts::default()
        };
        let today = time::OffsetDateTime::now_utc().date();
        let (_, flow) = set.authorise_transfer(&TransferRequest {
            agreement: &o.agreement_id,
            flow: &o.flow,
            purpose: &o.purpose,
            sender,
            receiver: &self.site_id,
            study: &study,
            today,
        })?;
        if flow.studies_per_day.is_some() {
            let key = StudyKey {
                agreement: o.agreement_id.clone(),
                flow: o.flow.clone(),
                from_site: sender.to_string(),
                study_token: o.study_token.clone(),
            };
            // A study already (partly) held is a resend, not one more study.
            let known = self.store.study(&key).ok().flatten().is_some();
            if !known {
                flow.check_volume(self.studies_received_today(&o.agreement_id, &o.flow))?;
            }
        }
        Ok(flow.release_config())
    }

    /// New studies received today (UTC) on one flow, from the store's records.
    fn studies_received_today(&self, agreement: &str, flow: &str) -> u32 {
        let now = time::OffsetDateTime::now_utc();
        let midnight = now
            .replace_time(time::Time::MIDNIGHT)
            .unix_timestamp()
            .max(0) as u64;
        self.store
            .studies()
            .unwrap_or_default()
            .iter()
            .filter(|s| s.agreement == agreement && s.flow == flow && s.first_received >= midnight)
            .count() as u32
    }

    /// Whether an in-flight transfer may go on under the agreements now in force.
    fn still_allowed(&self, set: &AgreementSet, plan: &Plan) -> Result<(), Refusal> {
        let today = time::OffsetDateTime::now_utc().date();
        set.still_allowed(&plan.agreement, &plan.sender, &self.site_id, today)
    }
}

fn peer_of<T>(req: &Request<T>) -> Result<PeerInfo, Status> {
    req.extensions()
        .get::<PeerInfo>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("no verified client certificate on this connection"))
}

fn sha_of(bytes: &[u8]) -> Result<[u8; 32], Status> {
    bytes
        .try_into()
        .map_err(|_| Status::invalid_argument("an instance SHA-256 must be 32 bytes"))
}

fn short(sha: &[u8; 32]) -> String {
    hex::encode(&sha[..6])
}

/// Staged files of one transfer; removed on drop unless committed.
struct Staging {
    files: Vec<std::path::PathBuf>,
}

impl Drop for Staging {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// Checks a received instance before it may be stored: it parses as DICOM, carries the SOP
/// Instance UID the manifest announced, and passes the release check of the flow's
/// de-identification profile (`deid::check_release_file`): the receiver never trusts the sender.
fn check_instance(
    path: &std::path::Path,
    expected_uid: &str,
    deid: &DeidConfig,
) -> Result<(), String> {
    let run = std::panic::AssertUnwindSafe(|| {
        let obj =
            dicom_object::open_file(path).map_err(|e| format!("not a readable DICOM file: {e}"))?;
        let uid = obj
            .get(dicom_dictionary_std::tags::SOP_INSTANCE_UID)
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
            .unwrap_or_default();
        if uid != expected_uid {
            return Err("SOP Instance UID differs from the manifest".to_string());
        }
        crate::deid::check_release_file(&obj, deid).map_err(|e| e.reason().to_string())
    });
    std::panic::catch_unwind(run)
        .unwrap_or_else(|_| Err("the DICOM parser gave up on this instance".to_string()))
}

#[tonic::async_trait]
impl Federation for Receiver {
    async fn hello(&self, req: Request<HelloRequest>) -> Result<Response<HelloResponse>, Status> {
        let peer = peer_of(&req)?;
        Ok(Response::new(HelloResponse {
            receiver_site: self.site_id.clone(),
            caller_site: peer.identity.site_id,
        }))
    }

    async fn offer(&self, req: Request<OfferRequest>) -> Result<Response<OfferResponse>, Status> {
        let peer = peer_of(&req)?;
        let sender = peer.identity.site_id.clone();
        let o = req.into_inner();
        // Audit (issue 13): hold the sender's signed checkpoint, checked against its certificate.
        self.audit.accept_partner_checkpoint(
            &sender,
            peer.identity.certificate.as_ref(),
            &o.audit_checkpoint,
        );
        let object = format!("study {}", o.study_token);
        let set = self.agreements.borrow().clone();
        let deid = match self.authorise_offer(&set, &o, &sender) {
            Ok(d) => d,
            Err(r) => {
                self.refuse(
                    &sender,
                    &o.agreement_id,
                    &o.purpose,
                    &object,
                    &r.to_string(),
                );
                tracing::warn!(peer = %sender, agreement = %o.agreement_id, reason = %r, "offer refused");
                return Err(Status::permission_denied(r.to_string()));
            }
        };
        if o.instances.is_empty() {
            return Err(Status::invalid_argument("the offer lists no instances"));
        }
        if o.instances.len() > MAX_INSTANCES_PER_OFFER {
            return Err(Status::invalid_argument(format!(
                "the offer lists {} instances; at most {MAX_INSTANCES_PER_OFFER} per study",
                o.instances.len()
            )));
        }
        if o.study_token.is_empty() || o.study_token.len() > 64 {
            return Err(Status::invalid_argument(
                "the study token must be 1-64 characters",
            ));
        }
        let key = StudyKey {
            agreement: o.agreement_id.clone(),
            flow: o.flow.clone(),
            from_site: sender.clone(),
            study_token: o.study_token.clone(),
        };
        let mut partials: HashMap<[u8; 32], StagedInstance> = self
            .store
            .partials(&key)
            .map_err(|e| Status::internal(e.to_string()))?
            .into_iter()
            .map(|p| (p.sha256, p))
            .collect();
        let mut wanted = HashMap::new();
        let mut already = Vec::new();
        let mut resumed = Vec::new();
        let mut have = Vec::new();
        for inst in &o.instances {
            let sha = sha_of(&inst.sha256)?;
            if inst.size == 0 || inst.size > MAX_INSTANCE_SIZE {
                return Err(Status::invalid_argument(format!(
                    "instance {} has size {}; sizes must be 1..={MAX_INSTANCE_SIZE}",
                    short(&sha),
                    inst.size
                )));
            }
            if inst.sop_instance_uid.is_empty() || inst.sop_instance_uid.len() > 64 {
                return Err(Status::invalid_argument(
                    "a SOP Instance UID must be 1-64 characters",
                ));
            }
            let held = self
                .store
                .has_instance(&sha)
                .map_err(|e| Status::internal(e.to_string()))?;
            if held {
                have.push(sha.to_vec());
                already.push((inst.sop_instance_uid.clone(), sha));
            } else if let Some(p) = partials
                .remove(&sha)
                .filter(|p| p.sop_instance_uid == inst.sop_instance_uid && p.size == inst.size)
            {
                have.push(sha.to_vec());
                resumed.push(p);
            } else {
                wanted.insert(sha, (inst.sop_instance_uid.clone(), inst.size));
            }
        }
        let transfer_id = hex::encode(rand::random::<[u8; 16]>());
        let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        plans.retain(|_, p| p.created.elapsed() < OFFER_TTL);
        if plans.len() >= MAX_PENDING_OFFERS {
            return Err(Status::resource_exhausted(
                "too many offers are waiting for their transfer; retry later",
            ));
        }
        plans.insert(
            transfer_id.clone(),
            Plan {
                agreement: o.agreement_id,
                flow: o.flow,
                purpose: o.purpose,
                sender,
                study_token: o.study_token,
                wanted,
                already,
                resumed,
                deid,
                expected: o.instances.len(),
                created: Instant::now(),
            },
        );
        Ok(Response::new(OfferResponse {
            transfer_id,
            already_have: have,
        }))
    }

    async fn transfer(
        &self,
        req: Request<Streaming<TransferChunk>>,
    ) -> Result<Response<Receipt>, Status> {
        let peer = peer_of(&req)?;
        let sender = peer.identity.site_id.clone();
        let mut stream = req.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the transfer stream is empty"))?;
        let plan = self
            .plans
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&first.transfer_id)
            .ok_or_else(|| Status::not_found("unknown or expired transfer id; make a new offer"))?;
        if plan.sender != sender {
            return Err(Status::permission_denied(
                "this transfer was offered by another site",
            ));
        }
        let object = format!("study {}", plan.study_token);
        let transfer_id = first.transfer_id.clone();
        let mut staging = Staging { files: Vec::new() };
        let mut done = Vec::new();
        let result = self
            .receive(&plan, first, &mut stream, &mut staging, &mut done)
            .await;
        let key = plan.key();
        let store = self.store.clone();
        match result {
            Ok(()) => {
                done.extend(plan.resumed.iter().cloned());
                self.commit(plan, (staging, done), &sender, transfer_id)
                    .await
            }
            Err(Failure::Interrupted(status)) => {
                // Keep what was verified, so that the next offer resumes after it.
                let kept: Vec<_> = done.iter().map(|d| d.path.clone()).collect();
                staging.files.retain(|f| !kept.contains(f));
                let n = done.len() + plan.resumed.len();
                let kept_ok = tokio::task::spawn_blocking(move || store.keep_partial(&key, done))
                    .await
                    .map(|r| r.is_ok())
                    .unwrap_or(false);
                let message = if kept_ok && n > 0 {
                    format!(
                        "{}; {n} verified instances are kept for 24 h so that a new offer resumes after them",
                        status.message()
                    )
                } else {
                    status.message().to_string()
                };
                self.refuse(&sender, &plan.agreement, &plan.purpose, &object, &message);
                tracing::warn!(peer = %sender, agreement = %plan.agreement, reason = %message, "transfer interrupted; nothing stored");
                Err(Status::new(status.code(), message))
            }
            Err(Failure::Rejected(status)) => {
                let _ = tokio::task::spawn_blocking(move || store.discard_partials(&key)).await;
                self.refuse(
                    &sender,
                    &plan.agreement,
                    &plan.purpose,
                    &object,
                    status.message(),
                );
                tracing::warn!(peer = %sender, agreement = %plan.agreement, reason = %status.message(), "transfer rejected; nothing stored");
                Err(status)
            }
        }
    }
}

impl Receiver {
    /// Streams every wanted instance to staging (`staging`), verifying each (`done`), and says
    /// on failure whether the stream was interrupted (verified instances may be kept for
    /// resumption) or something was wrong (everything is discarded).
    async fn receive(
        &self,
        plan: &Plan,
        first: TransferChunk,
        stream: &mut Streaming<TransferChunk>,
        staging: &mut Staging,
        done: &mut Vec<StagedInstance>,
    ) -> Result<(), Failure> {
        let mut interrupted = false;
        self.receive_chunks(plan, first, stream, staging, done, &mut interrupted)
            .await
            .map_err(|status| {
                if interrupted {
                    Failure::Interrupted(status)
                } else {
                    Failure::Rejected(status)
                }
            })
    }

    /// The chunk loop; on error, `interrupted` says whether the stream broke or ended early
    /// (rather than something being wrong with what arrived).
    async fn receive_chunks(
        &self,
        plan: &Plan,
        first: TransferChunk,
        stream: &mut Streaming<TransferChunk>,
        staging: &mut Staging,
        done: &mut Vec<StagedInstance>,
        interrupted: &mut bool,
    ) -> Result<(), Status> {
        struct Current {
            sha: [u8; 32],
            uid: String,
            size: u64,
            written: u64,
            hasher: Sha256,
            file: tokio::fs::File,
            path: std::path::PathBuf,
        }
        let mut current: Option<Current> = None;
        let mut agreements = self.agreements.clone();
        let mut next = Some(first);
        loop {
            let chunk = match next.take() {
                Some(c) => c,
                None => {
                    tokio::select! {
                        m = stream.message() => match m.inspect_err(|_| *interrupted = true)? {
                            Some(c) => c,
                            None => break,
                        },
                        changed = agreements.changed() => {
                            if changed.is_ok() {
                                let set = agreements.borrow_and_update().clone();
                                if let Err(r) = self.still_allowed(&set, plan) {
                                    return Err(Status::permission_denied(format!("transfer cut off: {r}")));
                                }
                            }
                            continue;
                        }
                    }
                }
            };
            if chunk.instance_sha256.is_empty() && chunk.data.is_empty() {
                continue; // header-only message (the first one carries the transfer id)
            }
            let sha = sha_of(&chunk.instance_sha256)?;
            if chunk.data.len() > CHUNK_SIZE {
                return Err(Status::invalid_argument(format!(
                    "chunk of {} bytes exceeds the {CHUNK_SIZE}-byte limit",
                    chunk.data.len()
                )));
            }
            if current.as_ref().is_some_and(|c| c.sha != sha) {
                return Err(Status::invalid_argument(
                    "a new instance started before the previous one's last chunk",
                ));
            }
            if current.is_none() {
                if done.iter().any(|d| d.sha256 == sha) {
                    return Err(Status::invalid_argument(format!(
                        "instance {} was sent twice",
                        short(&sha)
                    )));
                }
                let (uid, size) = plan.wanted.get(&sha).cloned().ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "instance {} is not in the offer (or is already held)",
                        short(&sha)
                    ))
                })?;
                let store = self.store.clone();
                let (file, path) = tokio::task::spawn_blocking(move || store.stage_file())
                    .await
                    .map_err(|e| Status::internal(e.to_string()))?
                    .map_err(|e| Status::resource_exhausted(format!("cannot stage: {e}")))?;
                staging.files.push(path.clone());
                current = Some(Current {
                    sha,
                    uid,
                    size,
                    written: 0,
                    hasher: Sha256::new(),
                    file: tokio::fs::File::from_std(file),
                    path,
                });
            }
            let c = current.as_mut().expect("current instance");
            if chunk.offset != c.written {
                return Err(Status::invalid_argument(format!(
                    "chunk of instance {} at offset {} but {} bytes were received",
                    short(&sha),
                    chunk.offset,
                    c.written
                )));
            }
            if c.written + chunk.data.len() as u64 > c.size {
                return Err(Status::invalid_argument(format!(
                    "instance {} is longer than the {} bytes the offer announced",
                    short(&sha),
                    c.size
                )));
            }
            c.hasher.update(&chunk.data);
            c.file.write_all(&chunk.data).await.map_err(|e| {
                Status::resource_exhausted(format!("cannot write staging file: {e}"))
            })?;
            c.written += chunk.data.len() as u64;
            if chunk.last {
                let mut c = current.take().expect("current instance");
                c.file.sync_all().await.map_err(|e| {
                    Status::resource_exhausted(format!("cannot sync staging file: {e}"))
                })?;
                let digest: [u8; 32] = std::mem::take(&mut c.hasher).finalize().into();
                if c.written != c.size || digest != c.sha {
                    return Err(Status::data_loss(format!(
                        "instance {} failed its SHA-256/size check ({} of {} bytes received); nothing was stored",
                        short(&c.sha),
                        c.written,
                        c.size
                    )));
                }
                let (path, uid, deid) = (c.path.clone(), c.uid.clone(), plan.deid.clone());
                let checked =
                    tokio::task::spawn_blocking(move || check_instance(&path, &uid, &deid))
                        .await
                        .map_err(|e| Status::internal(e.to_string()))?;
                if let Err(why) = checked {
                    return Err(Status::failed_precondition(format!(
                        "instance {} refused: {why}; nothing was stored",
                        short(&c.sha)
                    )));
                }
                done.push(StagedInstance {
                    path: c.path,
                    sha256: c.sha,
                    size: c.size,
                    sop_instance_uid: c.uid,
                });
            }
        }
        if let Some(c) = current {
            *interrupted = true;
            return Err(Status::aborted(format!(
                "the stream ended in the middle of instance {}; nothing was stored",
                short(&c.sha)
            )));
        }
        if done.len() != plan.wanted.len() {
            *interrupted = true;
            return Err(Status::aborted(format!(
                "the stream ended after {} of {} instances; nothing was stored",
                done.len(),
                plan.wanted.len()
            )));
        }
        Ok(())
    }

    async fn commit(
        &self,
        plan: Plan,
        (staging, staged): (Staging, Vec<StagedInstance>),
        sender: &str,
        transfer_id: String,
    ) -> Result<Response<Receipt>, Status> {
        // Last authorisation check before anything becomes durable.
        let set = self.agreements.borrow().clone();
        if let Err(r) = self.still_allowed(&set, &plan) {
            return Err(Status::permission_denied(format!("transfer cut off: {r}")));
        }
        let key = StudyKey {
            agreement: plan.agreement.clone(),
            flow: plan.flow.clone(),
            from_site: sender.to_string(),
            study_token: plan.study_token.clone(),
        };
        let store = self.store.clone();
        let expected = plan.expected;
        let already = plan.already.clone();
        let key2 = key.clone();
        let committed = tokio::task::spawn_blocking(move || {
            let c = store.commit(&key2, expected, staged, already)?;
            let delivered = if c.study.is_complete() {
                Some(store.deliver(&c.study)?)
            } else {
                None
            };
            Ok::<_, crate::store::StoreError>((c, delivered))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        drop(staging);
        let (c, delivered) = committed.map_err(|e| {
            tracing::error!(error = %e, "commit failed");
            Status::internal(format!("the receiver could not store the study: {e}"))
        })?;
        let mut shas: Vec<&String> = c.study.instances.values().collect();
        shas.sort();
        let mut h = Sha256::new();
        for s in shas {
            h.update(s.as_bytes());
        }
        let mut receipt = Receipt {
            transfer_id,
            receiver_site: self.site_id.clone(),
            study_token: plan.study_token.clone(),
            instances_stored: c.stored as u32,
            instances_already_held: c.already_held as u32,
            study_digest: h.finalize().to_vec(),
            signature: Vec::new(),
            audit_checkpoint: Vec::new(),
        };
        self.signer.sign(&mut receipt);
        self.audit.record_detailed_or_warn(
            Event {
                actor: format!("site:{sender}"),
                action: "receive".into(),
                object: format!(
                    "study {} ({} stored, {} already held{})",
                    plan.study_token,
                    c.stored,
                    c.already_held,
                    if delivered.is_some() {
                        ", delivered to inbox"
                    } else {
                        ""
                    }
                ),
                agreement: plan.agreement.clone(),
                purpose: plan.purpose.clone(),
                outcome: "ok".into(),
            },
            crate::audit::Detail {
                study: Some(plan.study_token.clone()),
                party: Some(sender.to_string()),
                flow: Some(plan.flow.clone()),
                ..Default::default()
            },
        );
        // Audit (issue 13): the receipt carries this site's checkpoint, covering the receive.
        receipt.audit_checkpoint = self.audit.checkpoint_for_peer();
        tracing::info!(peer = %sender, agreement = %plan.agreement, study = %plan.study_token, stored = c.stored, already_held = c.already_held, "study received");
        Ok(Response::new(receipt))
    }
}
