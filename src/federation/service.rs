//! The receiving side of the federation protocol.
//!
//! Owns: [`Receiver`], the tonic service that answers offers and transfers. It never trusts the
//! sender, and a valid certificate does not make a sender benign:
//! - the caller's site comes from its verified certificate; a party whose agreement pins its key
//!   must present that key;
//! - every string the peer sends is checked for length and character set before it is logged,
//!   audited or used ([`super::wire`]); refusals are audited with bounded fields, and repeated
//!   refusals from one peer are summarised ([`super::refusals`]);
//! - pending offers and concurrent transfers are limited per peer and in total (`[limits]`);
//!   a pending offer expires after `offer_ttl_secs` and holds a few hundred bytes of memory, its
//!   manifest waiting on disk ([`super::manifest`]);
//! - "already held" is answered only for instances the same site sent under the same agreement
//!   and flow, after re-hashing the stored copy (blob or inbox copy) and re-running the release
//!   check (a copy damaged at rest is quarantined and asked for again), or for an inbox copy the
//!   site has handed on (see `store`); nothing tells a peer what others sent;
//! - every offer is authorised against the agreements in force (and re-authorised while a
//!   transfer streams, so a suspension cuts it off); a transfer that sends nothing for
//!   `stall_timeout_secs` is cut;
//! - every instance is streamed to a staging file (memory does not grow with study size; with
//!   inbox delivery and encryption at rest, its plaintext inbox copy under a hidden name),
//!   checked against its SHA-256 and size, parsed through the guarded reader (`deid::guard`),
//!   and must carry the announced SOP Instance UID and the offered study token as its Study
//!   Instance UID, and pass the delivery check of the flow (`deid::verify::check_delivery_file`)
//!   before anything is stored; a failed transfer leaves nothing behind, an interrupted one is
//!   audited and logged at WARN.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

use super::manifest::{Disposition, Entry, Manifest};
use super::proto::federation_server::Federation;
use super::proto::{DestructionAck, DestructionReceipt};
use super::proto::{
    HelloRequest, HelloResponse, OfferRequest, OfferResponse, Receipt, ResultChunk, ResultReceipt,
    TransferChunk,
};
use super::receipt::ReceiptSigner;
use super::refusals::{Refusal as Refused, Refusals};
use super::tls::{Connections, PeerInfo};
use super::wire::{self, shown};
use super::CHUNK_SIZE;
use crate::audit::{AuditLog, Event};
use crate::config::Limits;
use crate::deid::DeidConfig;
use crate::dsa::{AgreementSet, Refusal, StudyFacts, TransferRequest};
use crate::store::sealed::{AtRest, Sealing};
use crate::store::{BlobCheck, StagedInstance, Store, StoreError, StudyKey};

/// Largest single instance accepted (4 GiB).
pub const MAX_INSTANCE_SIZE: u64 = 4 << 30;
/// How long a call over its peer's limit waits before RESOURCE_EXHAUSTED is answered: a flood
/// costs the flooder time, not the receiver CPU.
const OVER_LIMIT_DELAY: Duration = Duration::from_millis(250);
/// Most modalities one offer may list.
const MAX_MODALITIES: usize = 16;

/// A pending offer: a few hundred bytes here, its instances in a manifest file on disk.
struct Plan {
    transfer_id: String,
    agreement: String,
    flow: String,
    purpose: String,
    sender: String,
    study_token: String,
    manifest: Manifest,
    /// Instances to receive in the transfer.
    wanted: usize,
    /// How many instances the offer announced.
    expected: usize,
    /// The sender says this offer lists the whole study.
    complete: bool,
    created: Instant,
}

impl Plan {
    fn key(&self) -> StudyKey {
        StudyKey::new(&self.agreement, &self.flow, &self.sender, &self.study_token)
    }
}

/// Why a transfer did not complete.
enum Failure {
    /// The stream broke, ended early or stalled: verified instances are kept for resumption.
    Interrupted(Status),
    /// Something was wrong with what arrived, or the agreement no longer allows it: everything
    /// received for the study is discarded.
    Rejected(Status),
}

#[derive(Default)]
struct Slots {
    per_peer: HashMap<String, usize>,
    total: usize,
}

/// A slot (transfer, or offer being checked) of one peer, released on drop.
struct TransferSlot<'a> {
    slots: &'a Mutex<Slots>,
    peer: String,
}

impl Drop for TransferSlot<'_> {
    fn drop(&mut self) {
        let mut s = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        s.total = s.total.saturating_sub(1);
        if let Some(n) = s.per_peer.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                s.per_peer.remove(&self.peer);
            }
        }
    }
}

/// Audits a transfer that ends without an outcome (the connection dropped, or it was cut and
/// the call abandoned), unless disarmed.
struct InterruptionWatch<'a> {
    refusals: &'a Refusals,
    site: String,
    agreement: String,
    purpose: String,
    object: String,
    armed: bool,
}

impl Drop for InterruptionWatch<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.refusals.record(Refused {
                site: &self.site,
                kind: "transfer interrupted",
                agreement: &self.agreement,
                purpose: &self.purpose,
                object: &self.object,
                reason: "the connection ended during the transfer; nothing was stored",
            });
        }
    }
}

/// The receiving service of one node.
pub struct Receiver {
    site_id: String,
    store: Arc<dyn Store>,
    agreements: watch::Receiver<Arc<AgreementSet>>,
    audit: Arc<AuditLog>,
    signer: ReceiptSigner,
    limits: Limits,
    plans: Mutex<HashMap<String, Plan>>,
    transfers: Mutex<Slots>,
    /// Offers being checked right now (before they are pending), per peer.
    offering: Mutex<Slots>,
    refusals: Refusals,
    connections: Option<Arc<Connections>>,
    /// Where destruction receipts of studies this site sent are checked and kept (origin side).
    destructions: Option<Arc<super::destruction::DestructionLedger>>,
    /// The origin's side of the return path (`ReturnResult`), when this node takes results.
    returns: Option<Arc<super::returns::ReturnDesk>>,
}

fn status_of_store(e: StoreError) -> Status {
    tracing::error!(error = %e, "storage error");
    Status::internal(format!("the receiver's storage failed: {e}"))
}

impl Receiver {
    pub fn new(
        site_id: String,
        store: Arc<dyn Store>,
        agreements: watch::Receiver<Arc<AgreementSet>>,
        audit: Arc<AuditLog>,
        signer: ReceiptSigner,
    ) -> Self {
        let limits = Limits::default();
        Receiver {
            site_id,
            store,
            agreements,
            refusals: Refusals::new(
                audit.clone(),
                Duration::from_secs(limits.refusal_summary_secs),
            ),
            audit,
            signer,
            limits,
            plans: Mutex::new(HashMap::new()),
            transfers: Mutex::new(Slots::default()),
            offering: Mutex::new(Slots::default()),
            connections: None,
            destructions: None,
            returns: None,
        }
    }

    /// Takes partners' destruction receipts for the studies this site sent them into `ledger`.
    pub fn with_destruction_ledger(
        mut self,
        ledger: Arc<super::destruction::DestructionLedger>,
    ) -> Self {
        self.destructions = Some(ledger);
        self
    }

    /// The node's `[limits]`.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.refusals = Refusals::new(
            self.audit.clone(),
            Duration::from_secs(limits.refusal_summary_secs),
        );
        self.limits = limits;
        self
    }

    /// The endpoint's connections, whose events (idle closes, cuts) this receiver audits.
    pub fn with_connections(mut self, connections: Arc<Connections>) -> Self {
        self.connections = Some(connections);
        self
    }

    /// Takes results returned by partners (`ReturnResult`, see [`super::returns`]).
    pub fn with_returns(mut self, desk: Arc<super::returns::ReturnDesk>) -> Self {
        self.returns = Some(desk);
        self
    }

    /// Expires pending offers past their TTL (removing their manifests), audits connection
    /// events, and writes the refusal summaries of windows that ended. Call about once a second.
    pub fn housekeeping(&self) {
        let ttl = Duration::from_secs(self.limits.offer_ttl_secs);
        let expired: Vec<Plan> = {
            let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
            let ids: Vec<String> = plans
                .iter()
                .filter(|(_, p)| p.created.elapsed() >= ttl)
                .map(|(id, _)| id.clone())
                .collect();
            ids.iter().filter_map(|id| plans.remove(id)).collect()
        };
        for p in expired {
            tracing::info!(peer = %p.sender, study = %p.study_token, "offer expired without its transfer");
            p.manifest.remove();
        }
        self.audit_connection_events();
        self.refusals.flush(false);
    }

    fn audit_connection_events(&self) {
        if let Some(c) = &self.connections {
            for e in c.take_events() {
                self.refusals.record_connection(&e);
            }
        }
    }

    /// At shutdown: audits the connection events not yet audited and writes every open refusal
    /// summary, so nothing counted is lost with the process.
    pub fn flush_audit(&self) {
        self.audit_connection_events();
        self.refusals.flush(true);
    }

    /// Pending offers now (all peers).
    pub fn pending_offers(&self) -> usize {
        self.plans.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn refuse(&self, site: &str, kind: &'static str, o: (&str, &str), object: &str, why: &str) {
        self.refusals.record(Refused {
            site,
            kind,
            agreement: o.0,
            purpose: o.1,
            object,
            reason: why,
        });
    }

    /// Checks an offer: agreement active, valid and fully signed, both sites parties and not
    /// suspended, the sender's key matching its pin, the flow's direction, purpose and modality
    /// selector, and the daily volume.
    fn authorise_offer(
        &self,
        set: &AgreementSet,
        o: &OfferRequest,
        peer: &PeerInfo,
    ) -> Result<DeidConfig, String> {
        let sender = peer.identity.site_id.as_str();
        let study = StudyFacts {
            modalities: o.modalities.clone(),
            ..StudyFacts::default()
        };
        let today = time::OffsetDateTime::now_utc().date();
        let (agreement, flow) = set
            .authorise_transfer(&TransferRequest {
                agreement: &o.agreement_id,
                flow: &o.flow,
                purpose: &o.purpose,
                sender,
                receiver: &self.site_id,
                study: &study,
                today,
            })
            .map_err(|r| r.to_string())?;
        if let Some(pin) = agreement
            .party(sender)
            .and_then(|p| p.certificate_pin.as_deref())
        {
            if hex::encode(peer.identity.spki_sha256) != pin {
                return Err(format!(
                    "the certificate's public key does not match the certificate_pin of party {sender:?} in agreement {:?}",
                    agreement.id
                ));
            }
        }
        if flow.studies_per_day.is_some() {
            let key = StudyKey::new(&o.agreement_id, &o.flow, sender, &o.study_token);
            // A study already (partly) held is a resend, not one more study.
            let known = self.store.study(&key).ok().flatten().is_some();
            if !known {
                flow.check_volume(self.studies_received_today(&o.agreement_id, &o.flow))
                    .map_err(|r| r.to_string())?;
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

    /// RESOURCE_EXHAUSTED when `sender` already has its share of pending offers (or all peers
    /// together have theirs). Expired offers are dropped first.
    fn check_pending(&self, plans: &mut HashMap<String, Plan>, sender: &str) -> Result<(), Status> {
        let ttl = Duration::from_secs(self.limits.offer_ttl_secs);
        let expired: Vec<String> = plans
            .iter()
            .filter(|(_, p)| p.created.elapsed() >= ttl)
            .map(|(id, _)| id.clone())
            .collect();
        for id in expired {
            if let Some(p) = plans.remove(&id) {
                p.manifest.remove();
            }
        }
        let mine = plans.values().filter(|p| p.sender == sender).count();
        if mine >= self.limits.pending_offers_per_peer {
            return Err(Status::resource_exhausted(format!(
                "your site has {mine} offers waiting for their transfer (the limit per site); transfer or let them expire ({} s), then retry",
                self.limits.offer_ttl_secs
            )));
        }
        if plans.len() >= self.limits.pending_offers_total {
            return Err(Status::resource_exhausted(
                "too many offers are waiting for their transfer; retry later",
            ));
        }
        Ok(())
    }

    /// A transfer slot for `sender`, or RESOURCE_EXHAUSTED.
    fn transfer_slot(&self, sender: &str) -> Result<TransferSlot<'_>, Status> {
        take_slot(
            &self.transfers,
            sender,
            (self.limits.transfers_per_peer, self.limits.transfers_total),
            "transfers",
        )
    }

    /// A slot to check an offer in (as many per peer as it may have pending), or
    /// RESOURCE_EXHAUSTED: a peer cannot have more offers checked at once than it may keep.
    fn offer_slot(&self, sender: &str) -> Result<TransferSlot<'_>, Status> {
        take_slot(
            &self.offering,
            sender,
            (
                self.limits.pending_offers_per_peer,
                self.limits.pending_offers_total,
            ),
            "offers being checked",
        )
    }
}

fn take_slot<'a>(
    slots: &'a Mutex<Slots>,
    sender: &str,
    (per_peer, total): (usize, usize),
    what: &str,
) -> Result<TransferSlot<'a>, Status> {
    let mut s = slots.lock().unwrap_or_else(|p| p.into_inner());
    let mine = s.per_peer.get(sender).copied().unwrap_or(0);
    if mine >= per_peer {
        return Err(Status::resource_exhausted(format!(
            "your site already has {mine} {what} in progress (the limit per site); retry later"
        )));
    }
    if s.total >= total {
        return Err(Status::resource_exhausted(format!(
            "too many {what} are in progress; retry later"
        )));
    }
    s.total += 1;
    *s.per_peer.entry(sender.to_string()).or_default() += 1;
    Ok(TransferSlot {
        slots,
        peer: sender.to_string(),
    })
}

impl Receiver {}

fn peer_of<T>(req: &Request<T>) -> Result<PeerInfo, Status> {
    let peer = req.extensions().get::<PeerInfo>().cloned().ok_or_else(|| {
        Status::unauthenticated("no verified client certificate on this connection")
    })?;
    peer.connection.admit()?;
    Ok(peer)
}

fn sha_of(bytes: &[u8]) -> Result<[u8; 32], Status> {
    bytes
        .try_into()
        .map_err(|_| Status::invalid_argument("an instance SHA-256 must be 32 bytes"))
}

fn short(sha: &[u8; 32]) -> String {
    hex::encode(&sha[..6])
}

/// Checks the offer's own strings (agreement, flow, purpose, study token, modalities).
fn check_offer_fields(o: &OfferRequest) -> Result<(), wire::BadField> {
    wire::check_name("agreement id", &o.agreement_id)?;
    wire::check_name("flow", &o.flow)?;
    wire::check_name("purpose", &o.purpose)?;
    wire::check_uid("study token", &o.study_token)?;
    if o.modalities.len() > MAX_MODALITIES {
        return Err(wire::BadField {
            field: "modalities",
            why: format!("{} listed; at most {MAX_MODALITIES}", o.modalities.len()),
        });
    }
    for m in &o.modalities {
        let ok = !m.is_empty()
            && m.len() <= 16
            && m.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
        if !ok {
            return Err(wire::BadField {
                field: "modality",
                why: "a DICOM modality code is 1-16 of A-Z, 0-9 and '_'".into(),
            });
        }
    }
    Ok(())
}

/// Staged files of one transfer (sealed staging files, or hidden plaintext inbox copies, see
/// [`Store::inbox_part`]); removed on drop unless committed (a commit that succeeded renamed
/// them all: the list is emptied then, so nothing is unlinked in vain).
struct Staging {
    files: Vec<std::path::PathBuf>,
    /// The Patient ID the delivery checks read (the first one), noted in the study record.
    patient: Arc<std::sync::OnceLock<String>>,
}

impl Drop for Staging {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// Checks a received (or held) instance before it may be delivered: it parses as DICOM through
/// the guarded reader (a length bomb is refused before any allocation), carries the SOP Instance
/// UID the manifest announced and the offered study token as its Study Instance UID, and passes
/// the flow's delivery check (`deid::verify::check_delivery_file`): the receiver never trusts the
/// sender. Returns its (de-identified) Patient ID.
fn check_instance(
    at_rest: &AtRest,
    path: &std::path::Path,
    expected_uid: &str,
    study_token: &str,
    deid: &DeidConfig,
) -> Result<String, String> {
    let view = at_rest
        .plain_view(path)
        .map_err(|e| format!("the staged instance cannot be read: {e}"))?;
    check_plain_file(view.path(), expected_uid, study_token, deid)
}

/// [`check_instance`] of a file known to hold plaintext (not sealed at rest).
fn check_plain_file(
    path: &std::path::Path,
    expected_uid: &str,
    study_token: &str,
    deid: &DeidConfig,
) -> Result<String, String> {
    let run = std::panic::AssertUnwindSafe(|| {
        // The checks look at every attribute but not at pixel values (only that Pixel Data is
        // there): a file ending with its Pixel Data is parsed up to it, its declared lengths
        // still all checked, and the pixels are never read into memory.
        let (obj, _pixels) = crate::deid::guard::read_guarded_split(path)
            .map_err(|e| format!("not a readable DICOM file: {e}"))?;
        let text = |tag| {
            obj.get(tag)
                .and_then(|e| e.to_str().ok())
                .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
                .unwrap_or_default()
        };
        if text(dicom_dictionary_std::tags::SOP_INSTANCE_UID) != expected_uid {
            return Err("SOP Instance UID differs from the manifest".to_string());
        }
        if text(dicom_dictionary_std::tags::STUDY_INSTANCE_UID) != study_token {
            return Err("Study Instance UID differs from the offered study token".to_string());
        }
        crate::deid::verify::check_delivery_file(&obj, deid).map_err(|e| e.reason().to_string())?;
        Ok(text(dicom_dictionary_std::tags::PATIENT_ID))
    });
    std::panic::catch_unwind(run)
        .unwrap_or_else(|_| Err("the DICOM parser gave up on this instance".to_string()))
}

/// Writes one received chunk (sealed, or the plaintext of an inbox copy: then a slice of the
/// decoded message, never copied in memory) to its file, on the blocking pool.
async fn write_chunk(file: Arc<std::fs::File>, bytes: Bytes) -> std::io::Result<()> {
    use std::io::Write;
    tokio::task::spawn_blocking(move || (&*file).write_all(&bytes))
        .await
        .map_err(std::io::Error::other)?
}

/// One instance whose last chunk arrived, before its checks.
struct Received {
    sha: [u8; 32],
    uid: String,
    size: u64,
    written: u64,
    hasher: Sha256,
    /// Its staging file: sealed, or its plaintext inbox copy (`sealed` false).
    path: std::path::PathBuf,
    /// The same file, open since its first chunk (its write-back starts through it).
    file: Arc<std::fs::File>,
    /// What is still to be written to it, after everything before (the last chunk, and the
    /// sealing's last segment).
    last: Vec<Bytes>,
    sealed: bool,
    /// A plaintext copy whose first bytes arrived and are not the sealed-file marker: the check
    /// parses it as it is, without opening it once more to look at them.
    plain_head: bool,
}

/// The delivery check of one received instance, running on the blocking pool.
type Check = tokio::task::JoinHandle<Result<StagedInstance, Status>>;

/// Received instances under their delivery check while the next ones stream in. At most
/// [`Checks::IN_FLIGHT`] run at once: each holds its last chunk (at most `CHUNK_SIZE` bytes,
/// until written) and one parsed instance in memory.
#[derive(Default)]
struct Checks(std::collections::VecDeque<Check>);

impl Checks {
    const IN_FLIGHT: usize = 2;

    /// Adds a check; waits for the oldest ones (adding them to `done`) while too many run.
    async fn push(&mut self, check: Check, done: &mut Vec<StagedInstance>) -> Result<(), Status> {
        self.0.push_back(check);
        while self.0.len() > Self::IN_FLIGHT {
            let oldest = self.0.pop_front().expect("a check");
            done.push(Self::outcome(oldest).await?);
        }
        Ok(())
    }

    /// Waits for every check still running; the passed ones go to `done`, the first failure is
    /// returned (after all have finished).
    async fn drain_into(self, done: &mut Vec<StagedInstance>) -> Result<(), Status> {
        let mut first_failure = None;
        for check in self.0 {
            match Self::outcome(check).await {
                Ok(s) => done.push(s),
                Err(status) => {
                    first_failure.get_or_insert(status);
                }
            }
        }
        first_failure.map_or(Ok(()), Err)
    }

    async fn outcome(check: Check) -> Result<StagedInstance, Status> {
        check.await.map_err(|e| Status::internal(e.to_string()))?
    }
}

/// One instance as announced, after its fields were checked.
struct Announced {
    sha256: [u8; 32],
    size: u64,
    uid: String,
}

/// Checks the announced instances: count, hashes, sizes, UIDs, and no instance twice.
fn check_instances(o: &OfferRequest, max: usize) -> Result<Vec<Announced>, Status> {
    if o.instances.is_empty() {
        return Err(Status::invalid_argument("the offer lists no instances"));
    }
    if o.instances.len() > max {
        return Err(Status::invalid_argument(format!(
            "the offer lists {} instances; at most {max} per study",
            o.instances.len()
        )));
    }
    let mut out = Vec::with_capacity(o.instances.len());
    for inst in &o.instances {
        let sha256 = sha_of(&inst.sha256)?;
        if inst.size == 0 || inst.size > MAX_INSTANCE_SIZE {
            return Err(Status::invalid_argument(format!(
                "instance {} has size {}; sizes must be 1..={MAX_INSTANCE_SIZE}",
                short(&sha256),
                inst.size
            )));
        }
        wire::check_uid("SOP Instance UID", &inst.sop_instance_uid)
            .map_err(|e| Status::invalid_argument(format!("instance {}: {e}", short(&sha256))))?;
        out.push(Announced {
            sha256,
            size: inst.size,
            uid: inst.sop_instance_uid.clone(),
        });
    }
    let mut shas: Vec<&[u8; 32]> = out.iter().map(|a| &a.sha256).collect();
    shas.sort_unstable();
    if shas.windows(2).any(|w| w[0] == w[1]) {
        return Err(Status::invalid_argument(
            "the offer lists the same instance (SHA-256) twice",
        ));
    }
    let mut uids: Vec<&str> = out.iter().map(|a| a.uid.as_str()).collect();
    uids.sort_unstable();
    if uids.windows(2).any(|w| w[0] == w[1]) {
        return Err(Status::invalid_argument(
            "the offer lists the same SOP Instance UID twice",
        ));
    }
    Ok(out)
}

/// What the receiver found for the announced instances of one offer.
struct Dispositions {
    entries: Vec<Entry>,
    /// SOP Instance UIDs whose held blob failed its SHA-256 check (quarantined, asked again).
    quarantined: Vec<String>,
}

/// Decides for every announced instance whether it is wanted, held already or resumed. Only the
/// study record of the same sender, agreement and flow counts: a blob another party sent is
/// never "held" for this one. A held blob is re-hashed (a mismatch quarantines it) and
/// re-checked against the flow before it counts. Blocking.
fn dispositions(
    store: &dyn Store,
    key: &StudyKey,
    announced: Vec<Announced>,
    deid: &DeidConfig,
) -> Result<Dispositions, Status> {
    let record = store.study(key).map_err(status_of_store)?;
    let mut partials: HashMap<[u8; 32], StagedInstance> = store
        .partials(key)
        .map_err(status_of_store)?
        .into_iter()
        .map(|p| (p.sha256, p))
        .collect();
    let mut out = Dispositions {
        entries: Vec::with_capacity(announced.len()),
        quarantined: Vec::new(),
    };
    for a in announced {
        let held = record.as_ref().and_then(|r| r.instances.get(&a.uid));
        let disposition = match held {
            Some(sha_hex) if *sha_hex != hex::encode(a.sha256) => {
                return Err(Status::already_exists(format!(
                    "instance {} was already received from your site in this study with different content; a changed instance needs a new SOP Instance UID",
                    a.uid
                )));
            }
            Some(_) => match store
                .check_held(key, &a.uid, &a.sha256)
                .map_err(status_of_store)?
            {
                // Delivered to the inbox and taken from there by the site: its receipt and
                // checks are on record, and it is not delivered twice.
                BlobCheck::HandedOn => Disposition::Held,
                BlobCheck::Intact(path) => {
                    match check_instance(&store.at_rest(), &path, &a.uid, &key.study_token, deid) {
                        Ok(_) => Disposition::Held,
                        Err(_) => Disposition::Wanted,
                    }
                }
                BlobCheck::Quarantined(_) => {
                    store
                        .forget_instance(key, &a.uid)
                        .map_err(status_of_store)?;
                    out.quarantined.push(a.uid.clone());
                    Disposition::Wanted
                }
                BlobCheck::Missing => Disposition::Wanted,
            },
            None => match partials.remove(&a.sha256) {
                Some(p) if p.sop_instance_uid == a.uid && p.size == a.size => Disposition::Resumed,
                _ => Disposition::Wanted,
            },
        };
        out.entries.push(Entry {
            sha256: a.sha256,
            size: a.size,
            disposition,
            sop_instance_uid: a.uid,
        });
    }
    Ok(out)
}

#[tonic::async_trait]
impl Federation for Receiver {
    async fn hello(&self, req: Request<HelloRequest>) -> Result<Response<HelloResponse>, Status> {
        let peer = peer_of(&req)?;
        let _call = peer.connection.begin_call();
        Ok(Response::new(HelloResponse {
            receiver_site: self.site_id.clone(),
            caller_site: peer.identity.site_id,
        }))
    }

    async fn report_destruction(
        &self,
        req: Request<DestructionReceipt>,
    ) -> Result<Response<DestructionAck>, Status> {
        let peer = peer_of(&req)?;
        let _call = peer.connection.begin_call();
        let Some(ledger) = &self.destructions else {
            return Err(Status::unimplemented(
                "this node does not take destruction receipts",
            ));
        };
        let origin = super::destruction::Origin {
            site_id: &self.site_id,
            ledger,
            audit: &self.audit,
            agreements: self.agreements.borrow().clone(),
        };
        let site = peer.identity.site_id.clone();
        let refuse = |agreement: &str, object: &str, why: &str| {
            self.refuse(
                &site,
                "destruction receipt refused",
                (agreement, ""),
                object,
                why,
            )
        };
        super::destruction::receive(origin, &peer, req.into_inner(), refuse)
            .await
            .map(Response::new)
    }

    async fn offer(&self, req: Request<OfferRequest>) -> Result<Response<OfferResponse>, Status> {
        let peer = peer_of(&req)?;
        let _call = peer.connection.begin_call();
        let sender = peer.identity.site_id.clone();
        let mut o = req.into_inner();
        if let Err(e) = check_offer_fields(&o) {
            let (a, p) = (shown(&o.agreement_id), shown(&o.purpose));
            self.refuse(&sender, "offer refused", (&a, &p), "offer", &e.to_string());
            return Err(Status::invalid_argument(e.to_string()));
        }
        // From here on the offer's own strings are bounded and of a safe character set.
        let ids = (o.agreement_id.as_str(), o.purpose.as_str());
        // Audit (issue 13): hold the sender's signed checkpoint, checked against its certificate.
        self.audit.accept_partner_checkpoint(
            &sender,
            peer.identity.certificate.as_ref(),
            &o.audit_checkpoint,
        );
        let object = format!("study {}", o.study_token);
        let set = self.agreements.borrow().clone();
        let deid = match self.authorise_offer(&set, &o, &peer) {
            Ok(d) => d,
            Err(why) => {
                self.refuse(&sender, "offer refused", ids, &object, &why);
                return Err(Status::permission_denied(why));
            }
        };
        let over_limit = match self.offer_slot(&sender) {
            Ok(slot) => {
                let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
                match self.check_pending(&mut plans, &sender) {
                    Ok(()) => Ok(slot),
                    Err(s) => Err(s),
                }
            }
            Err(s) => Err(s),
        };
        let _checking = match over_limit {
            Ok(slot) => slot,
            Err(s) => {
                self.refuse(&sender, "offer over limit", ids, &object, s.message());
                // Answer a partner over its limit slowly: a flood costs it time, not us CPU.
                tokio::time::sleep(OVER_LIMIT_DELAY).await;
                return Err(s);
            }
        };
        let announced =
            check_instances(&o, self.limits.max_instances_per_offer).inspect_err(|s| {
                self.refuse(&sender, "offer refused", ids, &object, s.message());
            })?;
        o.instances = Vec::new(); // the manifest goes to disk; free the request's copy
        let key = StudyKey::new(&o.agreement_id, &o.flow, &sender, &o.study_token);
        let store = self.store.clone();
        let key2 = key.clone();
        let found = tokio::task::spawn_blocking(move || {
            let d = dispositions(store.as_ref(), &key2, announced, &deid)?;
            let (file, path) = store.stage_file().map_err(status_of_store)?;
            let m = Manifest::write(file, path.clone(), d.entries)
                .inspect_err(|_| {
                    let _ = std::fs::remove_file(&path);
                })
                .map_err(|e| Status::resource_exhausted(format!("cannot stage the offer: {e}")))?;
            Ok::<_, Status>((m, d.quarantined))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        let (manifest, quarantined) = found.inspect_err(|s| {
            self.refuse(&sender, "offer refused", ids, &object, s.message());
        })?;
        for uid in &quarantined {
            self.audit.record_or_warn(Event {
                actor: "node".into(),
                action: "quarantine".into(),
                object: format!("instance {uid} of {object} from site:{sender}"),
                agreement: o.agreement_id.clone(),
                purpose: o.purpose.clone(),
                outcome: "the stored copy failed its SHA-256 check at rest; quarantined, and asked for again".into(),
            });
        }
        self.plan_offer(o, sender, manifest)
    }

    async fn transfer(
        &self,
        req: Request<Streaming<TransferChunk>>,
    ) -> Result<Response<Receipt>, Status> {
        let peer = peer_of(&req)?;
        let _call = peer.connection.begin_call();
        let sender = peer.identity.site_id.clone();
        let _slot = match self.transfer_slot(&sender) {
            Ok(slot) => slot,
            Err(s) => {
                self.refuse(
                    &sender,
                    "transfer over limit",
                    ("", ""),
                    "transfer",
                    s.message(),
                );
                drop(req);
                tokio::time::sleep(OVER_LIMIT_DELAY).await;
                return Err(s);
            }
        };
        let mut stream = req.into_inner();
        let stall = Duration::from_secs(self.limits.stall_timeout_secs.max(1));
        let first = match tokio::time::timeout(stall, stream.message()).await {
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "the transfer sent nothing for {} s",
                    stall.as_secs()
                )))
            }
            Ok(m) => m?.ok_or_else(|| Status::invalid_argument("the transfer stream is empty"))?,
        };
        wire::check_transfer_id(&first.transfer_id)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let plan = {
            let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
            match plans.get(&first.transfer_id) {
                Some(p) if p.sender != sender => {
                    return Err(Status::permission_denied(
                        "this transfer was offered by another site",
                    ))
                }
                Some(_) => plans.remove(&first.transfer_id).expect("present"),
                None => {
                    return Err(Status::not_found(
                        "unknown or expired transfer id; make a new offer",
                    ))
                }
            }
        };
        let object = format!("study {}", plan.study_token);
        let mut watch = InterruptionWatch {
            refusals: &self.refusals,
            site: sender.clone(),
            agreement: plan.agreement.clone(),
            purpose: plan.purpose.clone(),
            object: object.clone(),
            armed: true,
        };
        let outcome = self.run_transfer(plan, first, &mut stream, &sender).await;
        watch.armed = false;
        outcome
    }

    /// The return path: the handler is [`super::returns::ReturnDesk`]; a call counts against
    /// the peer's transfer slots.
    async fn return_result(
        &self,
        req: Request<Streaming<ResultChunk>>,
    ) -> Result<Response<ResultReceipt>, Status> {
        let peer = peer_of(&req)?;
        let _call = peer.connection.begin_call();
        let Some(desk) = self.returns.clone() else {
            return Err(Status::unimplemented("this node takes no returned results"));
        };
        let _slot = match self.transfer_slot(&peer.identity.site_id) {
            Ok(slot) => slot,
            Err(s) => {
                let site = peer.identity.site_id.clone();
                self.refuse(&site, "return over limit", ("", ""), "result", s.message());
                drop(req);
                tokio::time::sleep(OVER_LIMIT_DELAY).await;
                return Err(s);
            }
        };
        let stall = Duration::from_secs(self.limits.stall_timeout_secs.max(1));
        let site = peer.identity.site_id.clone();
        desk.receive(peer, req.into_inner(), stall)
            .await
            .map(Response::new)
            .map_err(|r| {
                let ids = (r.agreement.as_str(), "");
                self.refuse(&site, "result refused", ids, &r.object, r.status.message());
                r.status
            })
    }
}

impl Receiver {
    /// Records a checked offer as pending (the limits are checked again under the lock).
    fn plan_offer(
        &self,
        o: OfferRequest,
        sender: String,
        manifest: Manifest,
    ) -> Result<Response<OfferResponse>, Status> {
        let mut have = Vec::new();
        let mut wanted = 0;
        for i in 0..manifest.len() {
            let e = manifest
                .get(i)
                .map_err(|e| Status::internal(format!("cannot read the staged offer: {e}")))?;
            match e.disposition {
                Disposition::Wanted => wanted += 1,
                Disposition::Held | Disposition::Resumed => have.push(e.sha256.to_vec()),
            }
        }
        let transfer_id = hex::encode(rand::random::<[u8; 16]>());
        let mut plans = self.plans.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(s) = self.check_pending(&mut plans, &sender) {
            drop(plans);
            manifest.remove();
            self.refuse(
                &sender,
                "offer over limit",
                (&o.agreement_id, &o.purpose),
                "offer",
                s.message(),
            );
            return Err(s);
        }
        plans.insert(
            transfer_id.clone(),
            Plan {
                transfer_id: transfer_id.clone(),
                agreement: o.agreement_id,
                flow: o.flow,
                purpose: o.purpose,
                sender,
                study_token: o.study_token,
                expected: manifest.len(),
                manifest,
                wanted,
                complete: o.complete,
                created: Instant::now(),
            },
        );
        Ok(Response::new(OfferResponse {
            transfer_id,
            already_have: have,
        }))
    }

    /// Receives, then commits or reports the failure of, one planned transfer.
    async fn run_transfer(
        &self,
        plan: Plan,
        first: TransferChunk,
        stream: &mut Streaming<TransferChunk>,
        sender: &str,
    ) -> Result<Response<Receipt>, Status> {
        let object = format!("study {}", plan.study_token);
        let ids = (plan.agreement.clone(), plan.purpose.clone());
        let mut staging = Staging {
            files: Vec::new(),
            patient: Default::default(),
        };
        let mut done = Vec::new();
        let result = self
            .receive(&plan, first, stream, &mut staging, &mut done)
            .await;
        let key = plan.key();
        let store = self.store.clone();
        match result {
            Ok(()) => self.commit(plan, (staging, done), sender).await,
            Err(Failure::Interrupted(status)) => {
                plan.manifest.remove();
                // Keep what was verified, so that the next offer resumes after it.
                let kept: Vec<_> = done.iter().map(|d| d.path.clone()).collect();
                staging.files.retain(|f| !kept.contains(f));
                let n = done.len();
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
                self.refuse(
                    sender,
                    "transfer interrupted",
                    (&ids.0, &ids.1),
                    &object,
                    &message,
                );
                Err(Status::new(status.code(), message))
            }
            Err(Failure::Rejected(status)) => {
                plan.manifest.remove();
                let _ = tokio::task::spawn_blocking(move || store.discard_partials(&key)).await;
                self.refuse(
                    sender,
                    "transfer rejected",
                    (&ids.0, &ids.1),
                    &object,
                    status.message(),
                );
                Err(status)
            }
        }
    }

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

    /// The next chunk: `None` at the end of the stream. A stream that sends nothing for the
    /// stall timeout is cut (`interrupted`); a change of the agreements re-authorises the plan.
    async fn next_chunk(
        &self,
        plan: &Plan,
        stream: &mut Streaming<TransferChunk>,
        agreements: &mut watch::Receiver<Arc<AgreementSet>>,
        interrupted: &mut bool,
    ) -> Result<Option<TransferChunk>, Status> {
        let stall = Duration::from_secs(self.limits.stall_timeout_secs.max(1));
        let deadline = tokio::time::Instant::now() + stall;
        loop {
            tokio::select! {
                m = tokio::time::timeout_at(deadline, stream.message()) => {
                    return match m {
                        Err(_) => {
                            *interrupted = true;
                            Err(Status::deadline_exceeded(format!(
                                "the transfer sent nothing for {} s; it was cut and its incomplete instance removed",
                                stall.as_secs()
                            )))
                        }
                        Ok(m) => m.inspect_err(|_| *interrupted = true),
                    };
                },
                changed = agreements.changed() => {
                    if changed.is_ok() {
                        let set = agreements.borrow_and_update().clone();
                        if let Err(r) = self.still_allowed(&set, plan) {
                            return Err(Status::permission_denied(format!("transfer cut off: {r}")));
                        }
                    }
                }
            }
        }
    }

    /// The chunk loop, then the delivery checks still running; on error, `interrupted` says
    /// whether the stream broke, stalled or ended early (rather than something being wrong with
    /// what arrived).
    async fn receive_chunks(
        &self,
        plan: &Plan,
        first: TransferChunk,
        stream: &mut Streaming<TransferChunk>,
        staging: &mut Staging,
        done: &mut Vec<StagedInstance>,
        interrupted: &mut bool,
    ) -> Result<(), Status> {
        let mut checks = Checks::default();
        let streamed = self
            .stream_chunks(plan, first, stream, staging, done, &mut checks, interrupted)
            .await;
        // Whatever ended the stream, the instances under check finish theirs: on success they
        // must all pass; after an interruption the verified ones may be kept for resumption.
        let checked = checks.drain_into(done).await;
        streamed?;
        checked?;
        if done.len() != plan.wanted {
            *interrupted = true;
            return Err(Status::aborted(format!(
                "the stream ended after {} of {} instances; nothing was stored",
                done.len(),
                plan.wanted
            )));
        }
        Ok(())
    }

    /// Receives chunks into staging files until the stream ends; each completed instance is
    /// checked ([`Receiver::finish_instance`]) while the next ones arrive.
    #[allow(clippy::too_many_arguments)]
    async fn stream_chunks(
        &self,
        plan: &Plan,
        first: TransferChunk,
        stream: &mut Streaming<TransferChunk>,
        staging: &mut Staging,
        done: &mut Vec<StagedInstance>,
        checks: &mut Checks,
        interrupted: &mut bool,
    ) -> Result<(), Status> {
        struct Current {
            sha: [u8; 32],
            uid: String,
            size: u64,
            written: u64,
            hasher: Sha256,
            file: Arc<std::fs::File>,
            /// Seals what arrives in memory (one segment at a time) before it is written; `None`
            /// where the file is the instance's plaintext inbox copy (see `finish_instance`).
            sealing: Option<Sealing<Vec<u8>>>,
            path: std::path::PathBuf,
            /// See [`Received::plain_head`].
            plain_head: bool,
        }
        let mut current: Option<Current> = None;
        let at_rest = self.store.at_rest();
        let mut agreements = self.agreements.clone();
        let mut received = vec![0u64; plan.manifest.len().div_ceil(64)];
        let deid = {
            let set = self.agreements.borrow().clone();
            set.agreements
                .get(&plan.agreement)
                .and_then(|a| a.flow(&plan.flow))
                .map(|f| f.release_config())
                .ok_or_else(|| {
                    Status::permission_denied("transfer cut off: the flow is no longer in force")
                })?
        };
        let mut next = Some(first);
        loop {
            let chunk = match next.take() {
                Some(c) => c,
                None => match self
                    .next_chunk(plan, stream, &mut agreements, interrupted)
                    .await?
                {
                    Some(c) => c,
                    None => break,
                },
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
                let (index, entry) = plan
                    .manifest
                    .find(&sha)
                    .map_err(|e| Status::internal(format!("cannot read the staged offer: {e}")))?
                    .filter(|(_, e)| e.disposition == Disposition::Wanted)
                    .ok_or_else(|| {
                        Status::invalid_argument(format!(
                            "instance {} is not in the offer (or is already held)",
                            short(&sha)
                        ))
                    })?;
                if received[index / 64] & (1 << (index % 64)) != 0 {
                    return Err(Status::invalid_argument(format!(
                        "instance {} was sent twice",
                        short(&sha)
                    )));
                }
                received[index / 64] |= 1 << (index % 64);
                let store = self.store.clone();
                // Where the inbox copy is the stored copy, the instance's plaintext goes there as
                // it arrives (a hidden name until its commit): nothing is sealed, and the check
                // reads it. Otherwise it is staged sealed.
                let (key, uid) = (plan.key(), entry.sop_instance_uid.clone());
                let (file, path, plain) =
                    tokio::task::spawn_blocking(move || match store.inbox_part(&key, &uid)? {
                        Some((f, part)) => Ok((f, part, true)),
                        None => store.stage_file().map(|(f, p)| (f, p, false)),
                    })
                    .await
                    .map_err(|e| Status::internal(e.to_string()))?
                    .map_err(|e| Status::resource_exhausted(format!("cannot stage: {e}")))?;
                staging.files.push(path.clone());
                let sealing = if plain {
                    None
                } else {
                    Some(
                        at_rest
                            .writer(Vec::new())
                            .map_err(|e| Status::internal(format!("cannot seal: {e}")))?,
                    )
                };
                current = Some(Current {
                    sha,
                    uid: entry.sop_instance_uid,
                    size: entry.size,
                    written: 0,
                    hasher: Sha256::new(),
                    file: Arc::new(file),
                    sealing,
                    path,
                    plain_head: false,
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
            if c.written == 0 && c.sealing.is_none() {
                c.plain_head = chunk
                    .data
                    .get(..crate::store::sealed::MAGIC.len())
                    .is_some_and(|head| head != crate::store::sealed::MAGIC);
            }
            let write_err = |e: std::io::Error| {
                Status::resource_exhausted(format!("cannot write staging file: {e}"))
            };
            let len = chunk.data.len() as u64;
            let bytes = match c.sealing.as_mut() {
                Some(sealing) => {
                    std::io::Write::write_all(sealing, &chunk.data).map_err(write_err)?;
                    Bytes::from(std::mem::take(sealing.get_mut()))
                }
                None => chunk.data,
            };
            c.written += len;
            if !chunk.last {
                write_chunk(c.file.clone(), bytes)
                    .await
                    .map_err(write_err)?;
            } else {
                // The last bytes are written by the instance's check task, before it checks:
                // one hand-over to the blocking pool fewer, and the stream reads on meanwhile.
                let c = current.take().expect("current instance");
                let sealed = c.sealing.is_some();
                let mut last = vec![bytes];
                if let Some(sealing) = c.sealing {
                    let (tail, _) = sealing.finish().map_err(write_err)?;
                    last.push(tail.into());
                }
                let received = Received {
                    sha: c.sha,
                    uid: c.uid,
                    size: c.size,
                    written: c.written,
                    hasher: c.hasher,
                    path: c.path,
                    file: c.file,
                    last,
                    sealed,
                    plain_head: c.plain_head,
                };
                let patient = staging.patient.clone();
                let check = self.finish_instance(received, plan, &deid, patient).await?;
                checks.push(check, done).await?;
            }
        }
        if let Some(c) = current {
            *interrupted = true;
            return Err(Status::aborted(format!(
                "the stream ended in the middle of instance {}; nothing was stored",
                short(&c.sha)
            )));
        }
        Ok(())
    }

    /// Checks one completely received instance: size and SHA-256 now, then in the background
    /// (the returned [`Check`]) the write of its last bytes, the guarded parse and the delivery
    /// check. The staging file is not fsynced here: its write-back starts once it passed, and the
    /// store makes a transfer's files durable together when it commits them.
    async fn finish_instance(
        &self,
        r: Received,
        plan: &Plan,
        deid: &DeidConfig,
        patient: Arc<std::sync::OnceLock<String>>,
    ) -> Result<Check, Status> {
        let sha = r.sha;
        let digest: [u8; 32] = r.hasher.finalize().into();
        if r.written != r.size || digest != sha {
            return Err(Status::data_loss(format!(
                "instance {} failed its SHA-256/size check ({} of {} bytes received); nothing was stored",
                short(&sha),
                r.written,
                r.size,
            )));
        }
        // A plaintext inbox copy is read as it is; a sealed staging file is opened in memory.
        let at_rest = if r.sealed {
            self.store.at_rest()
        } else {
            AtRest::plain()
        };
        let (token, deid) = (plan.study_token.clone(), deid.clone());
        let (file, last, as_it_is) = (r.file, r.last, !r.sealed && r.plain_head);
        let staged = StagedInstance {
            path: r.path,
            sha256: sha,
            size: r.size,
            sop_instance_uid: r.uid,
        };
        let refused = move |why: String| {
            Status::failed_precondition(format!(
                "instance {} refused: {why}; nothing was stored",
                short(&sha)
            ))
        };
        Ok(tokio::task::spawn_blocking(move || {
            for bytes in &last {
                std::io::Write::write_all(&mut &*file, bytes).map_err(|e| {
                    Status::resource_exhausted(format!("cannot write staging file: {e}"))
                })?;
            }
            let uid = &staged.sop_instance_uid;
            let id = if as_it_is {
                check_plain_file(&staged.path, uid, &token, &deid)
            } else {
                check_instance(&at_rest, &staged.path, uid, &token, &deid)
            }
            .map_err(refused)?;
            if !id.is_empty() {
                patient.get_or_init(|| id);
            }
            // Checked: the copy the commit makes durable may go to disk now, while the next
            // instances arrive, so that the commit's flush finds little left to write.
            crate::store::durable::start_writeback(&file);
            Ok(staged)
        }))
    }

    /// Makes a completely received study durable (the commit path): last authorisation check,
    /// store commit (received, resumed and already held instances), delivery of a complete study
    /// to the inbox (re-hashing every blob it copies), signed receipt, audit.
    async fn commit(
        &self,
        plan: Plan,
        (staging, staged): (Staging, Vec<StagedInstance>),
        sender: &str,
    ) -> Result<Response<Receipt>, Status> {
        let result = self.commit_plan(&plan, staging, staged, sender).await;
        plan.manifest.remove();
        result
    }

    async fn commit_plan(
        &self,
        plan: &Plan,
        mut staging: Staging,
        staged: Vec<StagedInstance>,
        sender: &str,
    ) -> Result<Response<Receipt>, Status> {
        // Last authorisation check before anything becomes durable.
        let set = self.agreements.borrow().clone();
        if let Err(r) = self.still_allowed(&set, plan) {
            return Err(Status::permission_denied(format!("transfer cut off: {r}")));
        }
        let key = plan.key();
        let already: Vec<(String, [u8; 32])> = plan
            .manifest
            .with(Disposition::Held)
            .map_err(|e| Status::internal(format!("cannot read the staged offer: {e}")))?
            .into_iter()
            .map(|e| (e.sop_instance_uid, e.sha256))
            .collect();
        let resumed: Vec<[u8; 32]> = plan
            .manifest
            .with(Disposition::Resumed)
            .map_err(|e| Status::internal(format!("cannot read the staged offer: {e}")))?
            .into_iter()
            .map(|e| e.sha256)
            .collect();
        let store = self.store.clone();
        let expected = plan.expected;
        let key2 = key.clone();
        let mut staged_now = staged;
        let started = Instant::now();
        let committed = tokio::task::spawn_blocking(move || {
            staged_now.extend(
                store
                    .partials(&key2)?
                    .into_iter()
                    .filter(|p| resumed.contains(&p.sha256)),
            );
            store.commit_and_deliver(&key2, expected, staged_now, already)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        tracing::debug!(
            study = %plan.study_token,
            instances = plan.wanted,
            commit_and_deliver_ms = started.elapsed().as_millis() as u64,
            "transfer committed"
        );
        let patient = staging.patient.get().cloned();
        if committed.is_ok() {
            // Every staged file now has its stored name: nothing is left to remove.
            staging.files.clear();
        }
        drop(staging);
        if let (Ok((c, _)), Some(patient)) = (&committed, patient) {
            if c.study.patient.is_none() {
                // Not part of what the receipt acknowledges: a failure here only means a result
                // returned later is checked against a stored copy instead.
                let (store, key) = (self.store.clone(), key.clone());
                let noted =
                    tokio::task::spawn_blocking(move || store.note_patient(&key, &patient)).await;
                if let Ok(Err(e)) = noted {
                    tracing::warn!(error = %e, "the study's patient token was not noted");
                }
            }
        }
        let (c, delivered) = committed.map_err(|e| match e {
            StoreError::BlobCorrupted(_) => {
                self.audit.record_or_warn(Event {
                    actor: "node".into(),
                    action: "quarantine".into(),
                    object: format!(
                        "an instance of study {} from site:{sender}",
                        plan.study_token
                    ),
                    agreement: plan.agreement.clone(),
                    purpose: plan.purpose.clone(),
                    outcome: format!("{e}"),
                });
                Status::unavailable(format!("{e}; offer the study again"))
            }
            e => status_of_store(e),
        })?;
        Ok(Response::new(self.receipt_for(
            plan,
            &c,
            delivered.is_some(),
            sender,
        )))
    }

    /// The signed receipt of a committed study, audited.
    fn receipt_for(
        &self,
        plan: &Plan,
        c: &crate::store::Committed,
        delivered: bool,
        sender: &str,
    ) -> Receipt {
        let mut shas: Vec<&String> = c.study.instances.values().collect();
        shas.sort();
        let mut h = Sha256::new();
        for s in shas {
            h.update(s.as_bytes());
        }
        let mut receipt = Receipt {
            transfer_id: plan.transfer_id.clone(),
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
                    "study {} ({} stored, {} already held{}{})",
                    plan.study_token,
                    c.stored,
                    c.already_held,
                    if delivered {
                        ", delivered to inbox"
                    } else {
                        ""
                    },
                    if plan.complete {
                        "; study complete"
                    } else {
                        "; more instances to come"
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
        tracing::info!(peer = %sender, agreement = %plan.agreement, study = %plan.study_token, stored = c.stored, already_held = c.already_held, complete = plan.complete, "study received");
        receipt
    }
}
