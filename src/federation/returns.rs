//! The return path over the federation: the `ReturnResult` RPC.
//!
//! Owns, at the origin, [`ReturnDesk`], the handler the receiving service delegates
//! `ReturnResult` to. It never trusts the partner:
//! - the caller's site comes from its verified certificate (and must match a `certificate_pin`);
//!   the agreement must be in force between the two sites, with a flow from this site to the
//!   caller whose `results.return_to_origin` is true;
//! - every string of the header is bounded and of a safe character set ([`super::wire`]) before
//!   it is logged, audited or used; sizes are bounded (`results::MAX_RESULT_SIZE`), a stream that
//!   sends nothing for `stall_timeout_secs` is cut, and calls count against the peer's transfer
//!   slots (`[limits]`);
//! - the bytes are staged to a file, checked against the announced SHA-256 and size, read through
//!   the guarded reader (`deid::guard`), and must carry the announced SOP Instance UID and study
//!   token; then the result is re-identified through the vault (`results::restore`: an unknown
//!   token is refused with FAILED_PRECONDITION) and delivered (`results::sink`). A failure leaves
//!   nothing behind. Every outcome is audited; no status, log line or audit entry carries an
//!   original value.
//!
//! At the partner, [`send_result`] streams one queued result to its origin.
//!
//! Does not own: recognising results at the partner or queueing them (`results`), or the
//! vault's cryptography (`pseudonym`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tonic::{Status, Streaming};

use super::client::PeerClient;
use super::proto::{ResultChunk, ResultHeader, ResultReceipt};
use super::tls::PeerInfo;
use super::wire;
use super::CHUNK_SIZE;
use crate::audit::{AuditLog, Detail, Event};
use crate::deid::ProfileOption;
use crate::dsa::AgreementSet;
use crate::pseudonym::{SiteKeys, Vault};
use crate::results::restore::{restore, RestoreContext, Restored};
use crate::results::sink::{already_received, Delivered, ResultSink};
use crate::results::{ResultError, MAX_RESULT_SIZE};
use crate::store::sealed::{AtRest, SealError};
use crate::store::StudyKey;

/// Opens the origin's vault for one call (shared with the other users of the serving node).
pub type VaultAccess = dyn Fn() -> Result<Arc<Vault>, String> + Send + Sync + 'static;

/// The origin's handler of `ReturnResult`.
pub struct ReturnDesk {
    pub site_id: String,
    pub data_dir: PathBuf,
    pub agreements: watch::Receiver<Arc<AgreementSet>>,
    pub audit: Arc<AuditLog>,
    pub keys: SiteKeys,
    pub vault: Box<VaultAccess>,
    pub sink: ResultSink,
    /// Seals the incoming result while it is received: it is pseudonymised data, and the
    /// staging folder is no delivery folder.
    pub at_rest: crate::store::sealed::AtRest,
}

/// An agreement's permission for results to return from a partner.
struct Allowed {
    flow: String,
    purpose: String,
    shift_dates: bool,
}

/// A header whose fields passed the checks.
struct Header {
    agreement: String,
    study_token: String,
    sop: String,
    sha256: [u8; 32],
    size: u64,
}

fn check_header(h: &ResultHeader) -> Result<Header, wire::BadField> {
    wire::check_name("agreement id", &h.agreement_id)?;
    wire::check_uid("study token", &h.study_token)?;
    wire::check_uid("SOP Instance UID", &h.sop_instance_uid)?;
    let sha256: [u8; 32] = h.sha256.as_slice().try_into().map_err(|_| wire::BadField {
        field: "sha256",
        why: "a SHA-256 is 32 bytes".into(),
    })?;
    if h.size == 0 || h.size > MAX_RESULT_SIZE {
        return Err(wire::BadField {
            field: "size",
            why: format!("{} bytes; a result has 1-{MAX_RESULT_SIZE}", h.size),
        });
    }
    Ok(Header {
        agreement: h.agreement_id.clone(),
        study_token: h.study_token.clone(),
        sop: h.sop_instance_uid.clone(),
        sha256,
        size: h.size,
    })
}

/// Whether `agreement` lets results return from `partner` to `origin` today.
fn authorise_return(
    set: &AgreementSet,
    agreement: &str,
    partner: &str,
    origin: &str,
    spki_sha256: &[u8; 32],
) -> Result<Allowed, String> {
    let today = time::OffsetDateTime::now_utc().date();
    set.still_allowed(agreement, partner, origin, today)
        .map_err(|r| r.to_string())?;
    let a = &set.agreements[agreement];
    if let Some(pin) = a.party(partner).and_then(|p| p.certificate_pin.as_deref()) {
        if hex::encode(spki_sha256) != pin {
            return Err(format!("the certificate's public key does not match the certificate_pin of party {partner:?} in agreement {agreement:?}"));
        }
    }
    let flows: Vec<_> = a
        .flows
        .iter()
        .filter(|f| f.from == origin && f.to == partner)
        .collect();
    let Some(f) = flows.iter().find(|f| f.results.return_to_origin) else {
        return Err(match flows.first() {
            None => format!("agreement {agreement:?} has no flow from {origin:?} to {partner:?}: results return only on a flow that sent the study"),
            Some(f) => format!("flow {:?} of agreement {agreement:?} does not let results return to the origin (results.return_to_origin is false)", f.name),
        });
    };
    let o = &f.deid.options;
    Ok(Allowed {
        flow: f.name.clone(),
        purpose: f
            .purposes
            .iter()
            .next()
            .map(|p| p.name().to_string())
            .unwrap_or_default(),
        shift_dates: o.contains(&ProfileOption::RetainLongitudinalModifiedDates)
            && !o.contains(&ProfileOption::RetainLongitudinalFullDates),
    })
}

/// The gRPC status for a result the origin cannot take (no original value in any of them).
fn status_of(e: &ResultError) -> Status {
    let msg = e.to_string().replace('\n', "; ");
    match e {
        ResultError::UnknownToken { .. } | ResultError::Shredded(_) => {
            Status::failed_precondition(msg)
        }
        ResultError::Storage(_) | ResultError::Vault(_) => {
            tracing::error!(error = %msg, "a returned result could not be taken");
            Status::internal("the origin could not store the result; it will be retried")
        }
        _ => Status::invalid_argument(msg),
    }
}

/// A result the origin did not take: the status for the partner, and what the receiver's
/// bounded refusal audit records (`super::refusals`: a flooding partner costs a few entries).
#[derive(Debug)]
pub struct ReturnRefusal {
    pub status: Status,
    pub agreement: String,
    pub object: String,
}

/// Removes a staged file unless disarmed.
struct StagedFile(Option<PathBuf>);

impl Drop for StagedFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl ReturnDesk {
    fn audit_event(
        &self,
        partner: &str,
        h: Option<&Header>,
        purpose: &str,
        outcome: String,
    ) -> Event {
        Event {
            actor: format!("site:{partner}"),
            action: "return-receive".into(),
            object: match h {
                Some(h) => format!("result {} on study {}", h.sop, h.study_token),
                None => "result".into(),
            },
            agreement: h.map(|h| h.agreement.clone()).unwrap_or_default(),
            purpose: purpose.to_string(),
            outcome,
        }
    }

    fn refuse(&self, h: Option<&Header>, status: Status) -> ReturnRefusal {
        ReturnRefusal {
            agreement: h.map(|h| h.agreement.clone()).unwrap_or_default(),
            object: match h {
                Some(h) => format!("result {} on study {}", h.sop, h.study_token),
                None => "result".into(),
            },
            status,
        }
    }

    /// Takes one result from `peer` (see the module documentation).
    pub async fn receive(
        &self,
        peer: PeerInfo,
        mut stream: Streaming<ResultChunk>,
        stall: Duration,
    ) -> Result<ResultReceipt, ReturnRefusal> {
        let partner = peer.identity.site_id.clone();
        let first = next_chunk(&mut stream, stall)
            .await
            .and_then(|m| m.ok_or_else(|| Status::invalid_argument("the result stream is empty")))
            .map_err(|s| self.refuse(None, s))?;
        let Some(raw) = first.header.as_ref() else {
            return Err(self.refuse(
                None,
                Status::invalid_argument("the first message carries no header"),
            ));
        };
        let h = check_header(raw)
            .map_err(|e| self.refuse(None, Status::invalid_argument(e.to_string())))?;
        self.audit.accept_partner_checkpoint(
            &partner,
            peer.identity.certificate.as_ref(),
            &raw.audit_checkpoint,
        );
        let set = self.agreements.borrow().clone();
        let allowed = authorise_return(
            &set,
            &h.agreement,
            &partner,
            &self.site_id,
            &peer.identity.spki_sha256,
        )
        .map_err(|why| self.refuse(Some(&h), Status::permission_denied(why)))?;
        let receipt = ResultReceipt {
            receiver_site: self.site_id.clone(),
            sop_instance_uid: h.sop.clone(),
            sha256: h.sha256.to_vec(),
            already_held: false,
            audit_checkpoint: Vec::new(),
        };
        if already_received(&self.data_dir, &h.sha256) {
            self.audit.record_or_warn(self.audit_event(
                &partner,
                Some(&h),
                &allowed.purpose,
                "ok (already received; not delivered twice)".into(),
            ));
            return Ok(ResultReceipt {
                already_held: true,
                audit_checkpoint: self.audit.checkpoint_for_peer(),
                ..receipt
            });
        }
        let staged = self
            .stage(&h, first.data, &mut stream, stall)
            .await
            .map_err(|s| self.refuse(Some(&h), s))?;
        let outcome = self
            .take(staged, &h, &partner, allowed.shift_dates, &allowed.flow)
            .await;
        match outcome {
            Ok((restored, delivered)) => {
                self.audit_taken(&partner, &h, &allowed, restored, delivered);
                Ok(ResultReceipt {
                    audit_checkpoint: self.audit.checkpoint_for_peer(),
                    ..receipt
                })
            }
            Err(e) => Err(self.refuse(Some(&h), status_of(&e))),
        }
    }

    /// The audit entry of a result taken: what was mapped back (counts) and where it went.
    fn audit_taken(
        &self,
        partner: &str,
        h: &Header,
        allowed: &Allowed,
        restored: Restored,
        delivered: Delivered,
    ) {
        let outcome = format!(
            "ok: re-identified ({} UIDs, {} tokens, {} dates mapped back) and {delivered}",
            restored.uids, restored.tokens, restored.dates
        );
        self.audit.record_detailed_or_warn(
            self.audit_event(partner, Some(h), &allowed.purpose, outcome),
            Detail {
                patient_tokens: vec![restored.patient_token],
                study: Some(h.study_token.clone()),
                party: Some(partner.to_string()),
                flow: Some(allowed.flow.clone()),
                instances: Some(1),
                receipt: None,
            },
        );
    }

    /// Streams the result to a staging file (sealed at rest), bounded by the announced size, and
    /// checks its hash. Not flushed: nothing is acknowledged before the re-identified result is
    /// delivered durably, and a crash leaves the partner to send it again.
    async fn stage(
        &self,
        h: &Header,
        first: Vec<u8>,
        stream: &mut Streaming<ResultChunk>,
        stall: Duration,
    ) -> Result<StagedFile, Status> {
        let cannot =
            |e: std::io::Error| Status::internal(format!("cannot stage the result: {}", e.kind()));
        let dir = self.data_dir.join("results").join(".staging");
        tokio::fs::create_dir_all(&dir).await.map_err(cannot)?;
        let path = dir.join(format!("{}.part", hex::encode(rand::random::<[u8; 16]>())));
        let staged = StagedFile(Some(path.clone()));
        let mut f = tokio::fs::File::create(&path).await.map_err(cannot)?;
        // Sealed in memory one segment at a time, then written.
        let mut sealing = self.at_rest.writer(Vec::new()).map_err(cannot)?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut chunk = first;
        loop {
            if chunk.len() > CHUNK_SIZE {
                return Err(Status::invalid_argument(format!(
                    "a chunk holds more than {CHUNK_SIZE} bytes"
                )));
            }
            size += chunk.len() as u64;
            if size > h.size {
                return Err(Status::invalid_argument(
                    "the result is longer than its announced size",
                ));
            }
            hasher.update(&chunk);
            std::io::Write::write_all(&mut sealing, &chunk).map_err(cannot)?;
            let sealed = std::mem::take(sealing.get_mut());
            f.write_all(&sealed).await.map_err(cannot)?;
            match next_chunk(stream, stall).await? {
                Some(m) if m.header.is_some() => {
                    return Err(Status::invalid_argument(
                        "only the first message may carry a header",
                    ))
                }
                Some(m) => chunk = m.data,
                None => break,
            }
        }
        let (tail, _) = sealing.finish().map_err(cannot)?;
        f.write_all(&tail).await.map_err(cannot)?;
        f.flush().await.map_err(cannot)?;
        let got: [u8; 32] = hasher.finalize().into();
        if size != h.size || got != h.sha256 {
            return Err(Status::data_loss(
                "the result's bytes do not match the announced SHA-256 and size",
            ));
        }
        Ok(staged)
    }

    /// Reads the staged result through the guard, re-identifies it and delivers it. Blocking
    /// work runs off the async threads.
    async fn take(
        &self,
        staged: StagedFile,
        h: &Header,
        partner: &str,
        shift_dates: bool,
        flow: &str,
    ) -> Result<(Restored, Delivered), ResultError> {
        let vault = (self.vault)().map_err(ResultError::Vault)?;
        let tokenizer = self
            .keys
            .tokenizer(&h.agreement)
            .map_err(ResultError::from_vault)?;
        let (sink, data_dir, at_rest) = (
            self.sink.clone(),
            self.data_dir.clone(),
            self.at_rest.clone(),
        );
        let key = StudyKey::new(&h.agreement, flow, partner, &h.study_token);
        let (sop, study, sha) = (h.sop.clone(), h.study_token.clone(), h.sha256);
        let path = staged.0.clone().expect("staged");
        tokio::task::spawn_blocking(move || {
            let _staged = staged;
            // The plaintext is read from memory, never from a file on disk.
            let view = at_rest
                .plain_view(&path)
                .map_err(|e| ResultError::Storage(e.to_string()))?;
            let mut obj = read_result(view.path())?;
            check_identity(&obj, &sop, &study)?;
            let cx = RestoreContext {
                agreement: &key.agreement,
                vault: &vault,
                tokenizer: &tokenizer,
                shift_dates,
            };
            let restored = restore(&mut obj, &cx)?;
            let delivered = sink.deliver(&data_dir, &obj, &key, &sop, &sha)?;
            Ok((restored, delivered))
        })
        .await
        .map_err(|e| ResultError::Storage(format!("the re-identification stopped: {e}")))?
    }
}

/// The next message, or DEADLINE_EXCEEDED after `stall` without one.
async fn next_chunk(
    stream: &mut Streaming<ResultChunk>,
    stall: Duration,
) -> Result<Option<ResultChunk>, Status> {
    match tokio::time::timeout(stall, stream.message()).await {
        Err(_) => Err(Status::deadline_exceeded(format!(
            "the stream sent nothing for {} s",
            stall.as_secs()
        ))),
        Ok(m) => m,
    }
}

/// Reads a result through the guarded reader (a parser panic is an unreadable file).
fn read_result(path: &Path) -> Result<dicom_object::DefaultDicomObject, ResultError> {
    let run = std::panic::AssertUnwindSafe(|| crate::deid::guard::read_guarded(path));
    std::panic::catch_unwind(run)
        .unwrap_or_else(|_| Err("the DICOM parser gave up on this object".into()))
        .map_err(ResultError::Unreadable)
}

/// The object is the one announced: its SOP Instance UID and Study Instance UID.
fn check_identity(
    obj: &dicom_object::DefaultDicomObject,
    sop: &str,
    study: &str,
) -> Result<(), ResultError> {
    use dicom_dictionary_std::tags;
    let text = |tag| {
        obj.get(tag)
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
            .unwrap_or_default()
    };
    if text(tags::SOP_INSTANCE_UID) != sop {
        return Err(ResultError::Unreadable(
            "the SOP Instance UID differs from the header".into(),
        ));
    }
    if text(tags::STUDY_INSTANCE_UID) != study {
        return Err(ResultError::Unreadable(
            "the Study Instance UID differs from the header's study token".into(),
        ));
    }
    Ok(())
}

/// Why a result did not go home from the partner.
#[derive(Debug, thiserror::Error)]
pub enum ReturnSendError {
    #[error("cannot read the queued result {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{site} refused the result: {status}")]
    Refused { site: String, status: Status },
    #[error("the receipt does not match the result sent")]
    BadReceipt,
}

impl ReturnSendError {
    /// Worth retrying later: the origin unavailable, busy, timed out, or failing to store.
    pub fn is_transient(&self) -> bool {
        match self {
            ReturnSendError::Refused { status, .. } => matches!(
                status.code(),
                tonic::Code::Unavailable
                    | tonic::Code::ResourceExhausted
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Unknown
                    | tonic::Code::Aborted
                    | tonic::Code::Internal
            ),
            _ => false,
        }
    }
}

/// One result as the partner sends it home.
pub struct OutgoingResult<'a> {
    pub agreement: &'a str,
    pub study_token: &'a str,
    pub sop_instance_uid: &'a str,
    /// The queued file, opened through `at_rest` (sealed when encryption at rest is on).
    pub path: &'a Path,
    pub at_rest: &'a AtRest,
    pub sha256: [u8; 32],
    pub size: u64,
}

/// Reads the queued result's plaintext (each sealed segment authenticated as it is read) and
/// sends it in chunks of at most `CHUNK_SIZE` bytes, the header on the first; stops at the
/// first error, which it returns.
fn stream_result(
    path: &Path,
    at_rest: &AtRest,
    mut header: Option<ResultHeader>,
    tx: &tokio::sync::mpsc::Sender<ResultChunk>,
) -> Result<(), ReturnSendError> {
    let read = |source| ReturnSendError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut f = at_rest
        .open(path)
        .map_err(|e| read(std::io::Error::other(e.to_string())))?;
    loop {
        let mut data = Vec::with_capacity(CHUNK_SIZE);
        (&mut f)
            .take(CHUNK_SIZE as u64)
            .read_to_end(&mut data)
            .map_err(|e| {
                read(std::io::Error::other(
                    SealError::from_io(path, e).to_string(),
                ))
            })?;
        let done = data.len() < CHUNK_SIZE;
        if data.is_empty() && header.is_none() {
            return Ok(());
        }
        let chunk = ResultChunk {
            header: header.take(),
            data,
        };
        if tx.blocking_send(chunk).is_err() || done {
            return Ok(());
        }
    }
}

/// Streams one result to its origin and checks the receipt.
pub async fn send_result(
    client: &mut PeerClient,
    result: &OutgoingResult<'_>,
    audit_checkpoint: Vec<u8>,
) -> Result<ResultReceipt, ReturnSendError> {
    let header = ResultHeader {
        agreement_id: result.agreement.to_string(),
        study_token: result.study_token.to_string(),
        sop_instance_uid: result.sop_instance_uid.to_string(),
        sha256: result.sha256.to_vec(),
        size: result.size,
        audit_checkpoint,
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<ResultChunk>(4);
    let (path, at_rest) = (result.path.to_path_buf(), result.at_rest.clone());
    let reading =
        tokio::task::spawn_blocking(move || stream_result(&path, &at_rest, Some(header), &tx));
    let site = client.site().to_string();
    let receipt = client
        .raw()
        .return_result(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await;
    // A file that could not be read is the reason, whatever the origin made of the cut stream.
    match reading.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(e) => {
            return Err(ReturnSendError::Read {
                path: result.path.to_path_buf(),
                source: std::io::Error::other(e.to_string()),
            })
        }
    }
    let receipt = receipt
        .map_err(|status| ReturnSendError::Refused {
            site: site.clone(),
            status,
        })?
        .into_inner();
    if receipt.receiver_site != site
        || receipt.sha256 != result.sha256
        || receipt.sop_instance_uid != result.sop_instance_uid
    {
        return Err(ReturnSendError::BadReceipt);
    }
    Ok(receipt)
}
