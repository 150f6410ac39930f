//! The DICOM listener: C-ECHO and C-STORE SCP on `dicom-ul` associations.
//!
//! Owns: accepting associations (at most `max_associations` at once; one more is rejected as
//! transient, local limit exceeded), the allow-list (the accepted socket's `peer_addr` is
//! checked before the association is established, and the AE titles through dicom-ul's
//! `AccessControl`: a calling AE title not allowed from that address or another called AE title
//! is answered with A-ASSOCIATE-RJ and the right reason, and audited), presentation contexts
//! for Verification and every storage SOP class of the standard (decided from the DICOM
//! dictionary, `dicom-dictionary-std`), with the first transfer syntax the sender proposes that
//! the registry can parse (compressed ones included; nothing is transcoded), and the DIMSE
//! message loop: each C-STORE's data set is streamed to a spool as its PDUs arrive, handed to
//! the [`StoreService`], and answered with its status only then: success only once the service
//! has made the instance durable.
//!
//! The spool of an instance is a buffer in memory up to [`MEMORY_SPOOL`] bytes (it never
//! reaches a disk, so it needs no sealing); the service gets it as it is ([`Received::Memory`]),
//! and the guarded reader parses it from there: no copy into a file and back. An instance that
//! grows past [`MEMORY_SPOOL`] moves to a spool file on disk, sealed at rest, and continues
//! there ([`Received::File`]). Spooled memory is therefore at most `max_associations x
//! MEMORY_SPOOL`. An association keeps its memory spool (up to [`REUSED_SPOOL`] bytes of
//! capacity) for its next instance, emptied and written over.
//!
//! The command set of each DIMSE message is read by a small reader of its own ([`Command`]):
//! the few fields the listener needs, every length checked against the bytes there are.
//!
//! Does not own: what happens to an instance ([`StoreService`]: the ingest pipeline).

use crate::store::sealed::{AtRest, Sealing};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dicom_core::{dicom_value, DataElement, PrimitiveValue, Tag, VR};
use dicom_dictionary_std::tags;
use dicom_object::InMemDicomObject;
use dicom_ul::association::server::AccessControl;
use dicom_ul::pdu::{
    AssociationRJ, AssociationRJResult, AssociationRJServiceProviderPresentationReason,
    AssociationRJServiceUserReason, AssociationRJSource, PDataValue, PDataValueType,
    PresentationContextResultReason, UserIdentity,
};
use dicom_ul::{Pdu, ServerAssociationOptions};

use crate::audit::summary::Summary;
use crate::audit::{AuditLog, Event};
use crate::config::{DicomAllow, DicomConfig};

/// Who is on the other end of an association.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssociationPeer {
    pub calling_ae: String,
    pub called_ae: String,
    pub address: SocketAddr,
}

/// A DIMSE status code (PS3.4 Annex B, PS3.7 Annex C).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreStatus(pub u16);

impl StoreStatus {
    pub const SUCCESS: StoreStatus = StoreStatus(0x0000);
    /// Refused: out of resources (storage could not be made durable).
    pub const OUT_OF_RESOURCES: StoreStatus = StoreStatus(0xA700);
    /// Error: cannot understand (not a usable DICOM data set).
    pub const CANNOT_UNDERSTAND: StoreStatus = StoreStatus(0xC000);
    /// Error: cannot understand, held back by de-identification (burned-in text, residual PHI).
    pub const DEIDENTIFICATION_REFUSED: StoreStatus = StoreStatus(0xC001);
    /// Refused: not authorised (no route, or the flow does not cover the instance).
    pub const NOT_AUTHORIZED: StoreStatus = StoreStatus(0x0124);
    /// Refused: SOP class not supported.
    pub const SOP_CLASS_NOT_SUPPORTED: StoreStatus = StoreStatus(0x0122);
}

/// The answer to one C-STORE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreOutcome {
    /// Durable; answered with success.
    Stored,
    /// Not stored; answered with `status` and `reason` as Error Comment (no PHI).
    Refused { status: StoreStatus, reason: String },
}

impl StoreOutcome {
    pub fn refused(status: StoreStatus, reason: impl Into<String>) -> StoreOutcome {
        StoreOutcome::Refused {
            status,
            reason: reason.into(),
        }
    }
}

/// One received instance, as the listener hands it to the [`StoreService`]: a whole DICOM
/// Part 10 file (preamble, file meta group, data set as received), gone after `store` returns.
#[derive(Debug, Clone, Copy)]
pub enum Received<'a> {
    /// In memory (at most [`MEMORY_SPOOL`] bytes). Shared, so that what is read from it (its
    /// pixel data) can refer to it without a copy; every clone must be dropped by the time
    /// `store` returns for the listener to reuse the buffer (otherwise it allocates a new one).
    Memory(&'a Arc<Vec<u8>>),
    /// A spool file on disk, sealed at rest (an instance larger than [`MEMORY_SPOOL`]).
    File(&'a Path),
}

impl Received<'_> {
    /// Runs `f` with a path to the instance: the spool file, or, for an instance in memory, an
    /// anonymous memory file holding a copy (Linux `memfd`, never on a disk; for the few users
    /// that need a file, such as a quarantine taking the original).
    pub fn with_path<T>(&self, f: impl FnOnce(&Path) -> T) -> std::io::Result<T> {
        match self {
            Received::File(p) => Ok(f(p)),
            Received::Memory(bytes) => {
                #[cfg(target_os = "linux")]
                {
                    use std::os::fd::AsRawFd;
                    let fd = rustix::fs::memfd_create(
                        "pacs-broker-spool",
                        rustix::fs::MemfdFlags::CLOEXEC,
                    )?;
                    let mut file = std::fs::File::from(fd);
                    file.write_all(bytes)?;
                    let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
                    Ok(f(&path))
                }
                #[cfg(not(target_os = "linux"))]
                {
                    let _ = bytes;
                    Err(std::io::ErrorKind::Unsupported.into())
                }
            }
        }
    }
}

/// What the listener hands received instances to.
pub trait StoreService: Send + Sync + 'static {
    type Session: Send;
    /// An association was established.
    fn begin(&self, peer: &AssociationPeer) -> Self::Session;
    /// One received instance ([`Received`]: in memory, or a spool file deleted after this
    /// returns). `Stored` only once the instance is durable.
    fn store(&self, session: &mut Self::Session, instance: Received<'_>) -> StoreOutcome;
    /// The association ended (released, aborted or broken).
    fn end(&self, session: Self::Session);
}

/// True for the storage SOP classes of the standard: SOP classes of the DICOM dictionary whose
/// name ends in "Storage" (retired ones included: old devices still send them), except the
/// DICOMDIR's Media Storage Directory Storage, which is not sent over the network.
pub fn is_storage_sop_class(uid: &str) -> bool {
    use dicom_core::dictionary::{UidDictionary, UidType};
    let uid = uid.trim_end_matches(['\0', ' ']);
    dicom_dictionary_std::StandardSopClassDictionary
        .by_uid(uid)
        .is_some_and(|e| {
            e.r#type == UidType::SopClass
                && e.name.trim_end_matches(" (Retired)").ends_with(" Storage")
                && uid != dicom_dictionary_std::uids::MEDIA_STORAGE_DIRECTORY_STORAGE
        })
}

const VERIFICATION: &str = dicom_dictionary_std::uids::VERIFICATION;

/// Why an association request is rejected, decided from the allow-list.
fn access_decision(
    cfg_ae: &str,
    allow: &[DicomAllow],
    peer: IpAddr,
    calling: &str,
    called: &str,
) -> Result<(), AssociationRJServiceUserReason> {
    if called.trim() != cfg_ae.trim() {
        return Err(AssociationRJServiceUserReason::CalledAETitleNotRecognized);
    }
    let peer = canonical(peer);
    if allow
        .iter()
        .any(|a| a.ae_title.trim() == calling.trim() && canonical(a.address) == peer)
    {
        Ok(())
    } else {
        Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized)
    }
}

/// An IPv4 address seen through an IPv6 socket is the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// dicom-ul's access control hook, holding the peer address checked on the accepted socket.
struct AllowList {
    allow: Vec<DicomAllow>,
    peer: IpAddr,
}

impl AccessControl for AllowList {
    fn check_access(
        &self,
        this_ae_title: &str,
        calling_ae_title: &str,
        called_ae_title: &str,
        _user_identity: Option<&UserIdentity>,
    ) -> Result<(), AssociationRJServiceUserReason> {
        access_decision(
            this_ae_title,
            &self.allow,
            self.peer,
            calling_ae_title,
            called_ae_title,
        )
    }
}

/// The DICOM listener of a node.
pub struct Listener<S: StoreService> {
    config: DicomConfig,
    service: Arc<S>,
    audit: Arc<AuditLog>,
    spool: PathBuf,
    /// Rejected associations, summarised per window: anyone who can reach the port can ask.
    rejections: Summary,
    /// Spool files hold original instances (PHI): sealed through this as they arrive.
    at_rest: AtRest,
}

/// Bytes of an instance spooled in memory before it moves to a sealed spool file on disk.
pub const MEMORY_SPOOL: u64 = 32 << 20;
/// A memory spool of up to this capacity is kept for the association's next instance (emptied,
/// then written over): allocating and freeing its pages for every instance costs more than
/// the instance's own copy into it.
const REUSED_SPOOL: u64 = 4 << 20;

/// Default window of the rejection summary (the node passes `[limits] refusal_summary_secs`).
const REJECTION_WINDOW: Duration = Duration::from_secs(60);
/// The summary key of rejected associations: their AE titles are claims, not identities.
const REJECTED_PEERS: &str = "dicom";

impl<S: StoreService> Listener<S> {
    /// `spool` is a private folder for instances being received (cleared now: anything there
    /// was never acknowledged).
    pub fn new(
        config: DicomConfig,
        service: Arc<S>,
        audit: Arc<AuditLog>,
        spool: PathBuf,
    ) -> std::io::Result<Listener<S>> {
        std::fs::create_dir_all(&spool)?;
        for e in std::fs::read_dir(&spool)?.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
        Ok(Listener {
            config,
            rejections: Summary::new(audit.clone(), REJECTION_WINDOW),
            service,
            audit,
            spool,
            at_rest: AtRest::plain(),
        })
    }

    /// Rejections beyond a few per kind within `window` are written as one summary entry.
    pub fn with_refusal_window(mut self, window: Duration) -> Self {
        self.rejections = Summary::new(self.audit.clone(), window);
        self
    }

    /// Seals spool files through `at_rest` (the node's encryption at rest); the service opens
    /// them through the same.
    pub fn with_at_rest(mut self, at_rest: AtRest) -> Self {
        self.at_rest = at_rest;
        self
    }

    /// Accepts associations on `listener` until `shutdown` completes, then waits for the
    /// associations in progress to end (each one ends when its peer releases it or goes quiet).
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) {
        let limit = Arc::new(tokio::sync::Semaphore::new(self.config.max_associations));
        tokio::pin!(shutdown);
        let mut summaries = tokio::time::interval(Duration::from_secs(1));
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = summaries.tick() => {
                    self.rejections.flush(false);
                    continue;
                }
                _ = &mut shutdown => break,
            };
            let (socket, addr) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "DICOM accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let socket = match socket.into_std() {
                Ok(s) => s,
                Err(_) => continue,
            };
            let permit = limit.clone().try_acquire_owned().ok();
            let me = self.clone();
            let spawned = std::thread::Builder::new()
                .name("dicom-association".into())
                .spawn(move || {
                    me.association(socket, addr, permit.is_some());
                    drop(permit);
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start an association thread");
            }
        }
        // Drain: every permit back means every association ended.
        let _ = limit
            .acquire_many(self.config.max_associations as u32)
            .await;
        self.rejections.flush(true);
    }

    fn record(&self, peer: &str, object: String, outcome: String) {
        self.audit
            .record_or_warn(Self::associate(peer, object, outcome));
    }

    fn associate(peer: &str, object: String, outcome: String) -> Event {
        Event {
            actor: format!("dicom:{peer}"),
            action: "associate".into(),
            object,
            agreement: String::new(),
            purpose: String::new(),
            outcome,
        }
    }

    /// A rejected association: audited one by one up to a few per kind and window, then
    /// summarised, so that a flood of association requests cannot fill the log.
    fn rejected(&self, peer: &str, called: &str, kind: &'static str, reason: String) {
        let object = format!("association to {called}");
        let event = Self::associate(peer, object, format!("rejected: {reason}"));
        self.rejections.record(REJECTED_PEERS, kind, event, &reason);
    }

    /// One association, from the request to its end.
    fn association(&self, socket: TcpStream, addr: SocketAddr, within_limit: bool) {
        let _ = socket.set_nonblocking(false);
        let _ = socket.set_nodelay(true);
        let idle = Duration::from_secs(self.config.idle_timeout_secs.max(1));
        let _ = socket.set_read_timeout(Some(idle));
        let _ = socket.set_write_timeout(Some(idle));
        let Some(rq) = peek_request(&socket, self.config.max_pdu, idle) else {
            tracing::debug!(%addr, "connection closed before an association request");
            return;
        };
        let (calling, called, proposed) = match &rq {
            Pdu::AssociationRQ(r) => (
                r.calling_ae_title.trim().to_string(),
                r.called_ae_title.trim().to_string(),
                r.presentation_contexts
                    .iter()
                    .map(|pc| pc.abstract_syntax.trim_end_matches(['\0', ' ']).to_string())
                    .collect::<Vec<_>>(),
            ),
            _ => return,
        };
        let who = format!("{calling}@{}", addr.ip());
        if !within_limit {
            reject(
                socket,
                AssociationRJResult::Transient,
                AssociationRJSource::ServiceProviderPresentation(
                    AssociationRJServiceProviderPresentationReason::LocalLimitExceeded,
                ),
            );
            let why = format!(
                "{} associations in progress (the configured limit)",
                self.config.max_associations
            );
            self.rejected(&who, &called, "rejected (association limit)", why);
            return;
        }
        let allowed = access_decision(
            &self.config.ae_title,
            &self.config.allow,
            addr.ip(),
            &calling,
            &called,
        );
        if let Err(reason) = &allowed {
            tracing::warn!(calling_ae = %calling, called_ae = %called, address = %addr.ip(), ?reason, "association rejected");
            let why = describe(reason).to_string();
            self.rejected(&who, &called, "rejected (not allowed)", why);
        }
        let mut options = ServerAssociationOptions::new()
            .ae_access_control(AllowList {
                allow: self.config.allow.clone(),
                peer: addr.ip(),
            })
            .ae_title(self.config.ae_title.trim().to_string())
            .max_pdu_length(self.config.max_pdu)
            .read_timeout(idle)
            .write_timeout(idle)
            .with_abstract_syntax(VERIFICATION);
        for uid in proposed.iter().filter(|u| is_storage_sop_class(u)) {
            options = options.with_abstract_syntax(uid.clone());
        }
        let mut assoc = match options.establish(socket) {
            Ok(a) => a,
            Err(e) => {
                // Access rejections were audited above. Anything else (nothing acceptable
                // proposed, a protocol failure) is audited here, so every request has its entry.
                if allowed.is_ok() {
                    tracing::warn!(%addr, error = %e, "association could not be established");
                    let why = format!("not established: {e}");
                    self.rejected(&who, &called, "rejected (not established)", why);
                }
                return;
            }
        };
        let accepted = assoc
            .presentation_contexts()
            .iter()
            .filter(|pc| pc.reason == PresentationContextResultReason::Acceptance)
            .count();
        tracing::info!(calling_ae = %calling, address = %addr.ip(), contexts = accepted, "association established");
        self.record(
            &who,
            format!("association to {called}"),
            format!("accepted: {accepted} presentation context(s)"),
        );
        let peer = AssociationPeer {
            calling_ae: calling,
            called_ae: called,
            address: addr,
        };
        let mut session = self.service.begin(&peer);
        if let Err(e) = self.messages(&mut assoc, &mut session, &peer) {
            tracing::warn!(calling_ae = %peer.calling_ae, error = %e, "association ended abnormally");
            let _ = assoc.abort();
        }
        self.service.end(session);
    }

    /// The DIMSE loop: commands and data sets until release or abort.
    fn messages(
        &self,
        assoc: &mut dicom_ul::ServerAssociation<TcpStream>,
        session: &mut S::Session,
        peer: &AssociationPeer,
    ) -> Result<(), String> {
        let mut command: Vec<u8> = Vec::new();
        let mut incoming: Option<Incoming> = None;
        // The memory spool of the last instance, reused for the next (its pages stay allocated).
        let mut spare: Option<Vec<u8>> = None;
        let mut stream = PduStream::new(assoc, self.config.max_pdu)?;
        loop {
            let received = stream.next(|pdv, event| match (pdv.command, event) {
                (true, PdvEvent::Data(data)) => {
                    if command.len() + data.len() > 64 * 1024 {
                        return Err("command set larger than 64 KiB".into());
                    }
                    data.chunks(|bytes| {
                        command.extend_from_slice(bytes);
                        Ok(())
                    })
                }
                (true, PdvEvent::End) => {
                    if pdv.last {
                        let cmd = std::mem::take(&mut command);
                        incoming = self.command(assoc, &cmd, pdv.pc_id, peer, &mut spare)?;
                    }
                    Ok(())
                }
                (false, event) => {
                    let inc = incoming
                        .as_mut()
                        .ok_or("a data set arrived without its C-STORE command")?;
                    match event {
                        PdvEvent::Data(data) => inc.receive(data),
                        PdvEvent::End if pdv.last => {
                            let inc = incoming.take().expect("incoming instance");
                            self.stored(assoc, session, inc, &mut spare)
                        }
                        PdvEvent::End => Ok(()),
                    }
                }
            })?;
            match received {
                None => {}
                Some(Pdu::ReleaseRQ) => {
                    assoc.send(&Pdu::ReleaseRP).map_err(|e| e.to_string())?;
                    return Ok(());
                }
                Some(Pdu::AbortRQ { .. }) => return Ok(()),
                Some(other) => return Err(format!("unexpected PDU {:?}", pdu_name(&other))),
            }
        }
    }

    /// A complete command set: C-ECHO is answered at once; C-STORE opens a spool for its data
    /// set (the `spare` memory spool of the last instance, when there is one).
    fn command(
        &self,
        assoc: &mut dicom_ul::ServerAssociation<TcpStream>,
        bytes: &[u8],
        pc_id: u8,
        peer: &AssociationPeer,
        spare: &mut Option<Vec<u8>>,
    ) -> Result<Option<Incoming>, String> {
        let cmd = Command::read(bytes)?;
        let field = cmd.field.ok_or("command set without Command Field")?;
        let id = cmd.message_id.unwrap_or(0);
        let sop_class = cmd.sop_class;
        match field {
            0x0030 => {
                let rsp = response(0x8030, id, &sop_class, None, StoreStatus::SUCCESS, None);
                send_command(assoc, pc_id, rsp)?;
                Ok(None)
            }
            0x0001 => {
                let instance = cmd.sop_instance;
                let pc = assoc
                    .presentation_contexts()
                    .iter()
                    .find(|pc| {
                        pc.id == pc_id && pc.reason == PresentationContextResultReason::Acceptance
                    })
                    .ok_or("C-STORE on a presentation context that was not accepted")?;
                let ts_uid = pc.transfer_syntax.trim_end_matches(['\0', ' ']).to_string();
                let mut inc = Incoming {
                    pc_id,
                    message_id: id,
                    sop_class,
                    sop_instance: instance,
                    spool: None,
                    failed: None,
                    started: Instant::now(),
                    disk: self.spool.clone(),
                    at_rest: self.at_rest.clone(),
                };
                let mut head = Vec::with_capacity(1024);
                match write_preamble(&mut head, &inc, &ts_uid, &peer.calling_ae) {
                    Ok(()) => {
                        inc.spool = Some(Spool::memory(spare.take()));
                        inc.write(&head)?;
                    }
                    Err(e) => inc.failed = Some(e),
                }
                Ok(Some(inc))
            }
            other => Err(format!("unsupported DIMSE command 0x{other:04X}")),
        }
    }

    /// The last fragment of a data set arrived: hand the instance over and answer. A memory
    /// spool of up to [`REUSED_SPOOL`] bytes of capacity is kept in `spare` for the next
    /// instance (when the service kept no clone of it).
    fn stored(
        &self,
        assoc: &mut dicom_ul::ServerAssociation<TcpStream>,
        session: &mut S::Session,
        inc: Incoming,
        spare: &mut Option<Vec<u8>>,
    ) -> Result<(), String> {
        let Incoming {
            pc_id,
            message_id,
            sop_class,
            sop_instance,
            spool,
            failed,
            started,
            ..
        } = inc;
        let outcome = match (spool, failed) {
            (Some(Spool::Memory(bytes)), None) => {
                let shared = Arc::new(bytes);
                let outcome = self.service.store(session, Received::Memory(&shared));
                if let Ok(mut b) = Arc::try_unwrap(shared) {
                    if b.capacity() as u64 <= REUSED_SPOOL {
                        b.clear();
                        *spare = Some(b);
                    }
                }
                outcome
            }
            (Some(Spool::Disk(w)), None) => match w
                .finish()
                .and_then(|(w, _)| w.into_inner().map_err(|e| e.into_error()))
            {
                Ok(file) => self.service.store(session, Received::File(file.path())),
                Err(e) => StoreOutcome::refused(
                    StoreStatus::OUT_OF_RESOURCES,
                    format!("cannot write the spool file: {}", e.kind()),
                ),
            },
            (_, Some(reason)) => StoreOutcome::refused(StoreStatus::OUT_OF_RESOURCES, reason),
            (None, None) => StoreOutcome::refused(StoreStatus::OUT_OF_RESOURCES, "no spool file"),
        };
        let (status, comment) = match &outcome {
            StoreOutcome::Stored => (StoreStatus::SUCCESS, None),
            StoreOutcome::Refused { status, reason } => (*status, Some(reason.as_str())),
        };
        tracing::debug!(
            status = status.0,
            ms = started.elapsed().as_millis() as u64,
            "C-STORE answered"
        );
        let rsp = response(
            0x8001,
            message_id,
            &sop_class,
            Some(&sop_instance),
            status,
            comment,
        );
        send_command(assoc, pc_id, rsp)
    }
}

/// Reads the PDUs of an established association straight off its socket: a P-DATA-TF PDU's
/// PDV items are handed on as they arrive ([`PdvData`]: read straight into the memory spool, or
/// in chunks of one reused buffer; dicom-ul's `receive` copies every PDU three times: into its
/// read buffer, into a `Bytes`, into each PDV's `Vec`);
/// any other PDU is read whole (at most 64 KiB) and parsed by dicom-ul. It starts at a PDU
/// boundary with nothing buffered by dicom-ul: after `establish`, since a requester sends
/// nothing before its A-ASSOCIATE-AC (one that does is out of step and ends with an error).
/// Limits as dicom-ul's strict mode: no PDU longer than the maximum length this side announced.
struct PduStream {
    socket: TcpStream,
    max_pdu: u32,
    chunk: Vec<u8>,
}

/// The header of one PDV item.
struct PdvHeader {
    pc_id: u8,
    /// A command set fragment (else a data set fragment).
    command: bool,
    /// The last fragment of its command or data set.
    last: bool,
}

/// What [`PduStream::next`] hands on from a PDV item: its bytes (unless it has none), then its
/// end.
enum PdvEvent<'a, 'b> {
    Data(&'a mut PdvData<'b>),
    End,
}

/// The bytes of one PDV item, still to be read off the socket: whoever gets them reads all of
/// them, in chunks of the stream's buffer or straight into a buffer of its own.
struct PdvData<'a> {
    socket: &'a mut TcpStream,
    chunk: &'a mut [u8],
    left: usize,
}

impl PdvData<'_> {
    /// How many bytes are still to be read.
    fn len(&self) -> usize {
        self.left
    }

    /// Reads them in chunks of the stream's buffer, each handed to `f`.
    fn chunks(&mut self, mut f: impl FnMut(&[u8]) -> Result<(), String>) -> Result<(), String> {
        while self.left > 0 {
            let n = self.left.min(self.chunk.len());
            PduStream::read(self.socket, &mut self.chunk[..n])?;
            self.left -= n;
            f(&self.chunk[..n])?;
        }
        Ok(())
    }

    /// Reads them onto the end of `to`, straight from the socket (no copy through the chunk
    /// buffer; `to` grows only if the caller did not reserve room for them).
    fn append_to(&mut self, to: &mut Vec<u8>) -> Result<(), String> {
        let got = (&mut *self.socket)
            .take(self.left as u64)
            .read_to_end(to)
            .map_err(|e| format!("cannot read the next PDU: {}", e.kind()))?;
        self.left -= got;
        if self.left > 0 {
            return Err("cannot read the next PDU: unexpected end of file".into());
        }
        Ok(())
    }
}

/// P-DATA-TF (PS3.8 9.3.5).
const P_DATA_TF: u8 = 0x04;
/// The largest PDU other than P-DATA-TF taken (association control PDUs are small).
const CONTROL_PDU: u32 = 64 * 1024;

impl PduStream {
    fn new(
        assoc: &mut dicom_ul::ServerAssociation<TcpStream>,
        max_pdu: u32,
    ) -> Result<PduStream, String> {
        let socket = assoc
            .inner_stream()
            .try_clone()
            .map_err(|e| format!("cannot read the association: {}", e.kind()))?;
        Ok(PduStream {
            socket,
            max_pdu,
            chunk: vec![0u8; 64 * 1024],
        })
    }

    fn read(socket: &mut TcpStream, buf: &mut [u8]) -> Result<(), String> {
        socket
            .read_exact(buf)
            .map_err(|e| format!("cannot read the next PDU: {}", e.kind()))
    }

    /// Reads one PDU: a P-DATA-TF's items go to `on` (`None` is returned); any other PDU is
    /// returned.
    fn next(
        &mut self,
        mut on: impl FnMut(&PdvHeader, PdvEvent<'_, '_>) -> Result<(), String>,
    ) -> Result<Option<Pdu>, String> {
        let mut head = [0u8; 6];
        Self::read(&mut self.socket, &mut head)?;
        let len = u32::from_be_bytes([head[2], head[3], head[4], head[5]]);
        if head[0] != P_DATA_TF {
            if len > CONTROL_PDU {
                return Err(format!("a PDU of type 0x{:02X} and {len} bytes", head[0]));
            }
            let mut whole = vec![0u8; 6 + len as usize];
            whole[..6].copy_from_slice(&head);
            Self::read(&mut self.socket, &mut whole[6..])?;
            return dicom_ul::read_pdu(&whole[..], self.max_pdu, true)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| "an incomplete PDU".to_string())
                .map(Some);
        }
        if len > self.max_pdu {
            return Err(format!(
                "a P-DATA-TF PDU of {len} bytes, more than the {} announced",
                self.max_pdu
            ));
        }
        let mut left = len as usize;
        while left > 0 {
            let mut item = [0u8; 6];
            if left < item.len() {
                return Err("a P-DATA-TF PDU ends inside a PDV item header".into());
            }
            Self::read(&mut self.socket, &mut item)?;
            let item_len = u32::from_be_bytes([item[0], item[1], item[2], item[3]]) as usize;
            if item_len < 2 || item_len > left - 4 {
                return Err("a PDV item longer than its P-DATA-TF PDU, or without header".into());
            }
            left -= 4 + item_len;
            let pdv = PdvHeader {
                pc_id: item[4],
                command: item[5] & 0x01 != 0,
                last: item[5] & 0x02 != 0,
            };
            if item_len > 2 {
                let mut data = PdvData {
                    socket: &mut self.socket,
                    chunk: &mut self.chunk,
                    left: item_len - 2,
                };
                on(&pdv, PdvEvent::Data(&mut data))?;
                if data.left > 0 {
                    // Whoever took them must read them all, or the stream is out of step.
                    return Err("a PDV item was not read whole".into());
                }
            }
            on(&pdv, PdvEvent::End)?;
        }
        Ok(None)
    }
}

/// A C-STORE whose data set is arriving.
struct Incoming {
    pc_id: u8,
    message_id: u16,
    sop_class: String,
    sop_instance: String,
    spool: Option<Spool>,
    /// Set when the spool failed: the rest of the data set is read and dropped, then answered
    /// with out of resources.
    failed: Option<String>,
    started: Instant,
    /// The spool folder and sealing, for an instance too large for memory.
    disk: PathBuf,
    at_rest: AtRest,
}

/// Where an arriving instance is spooled.
enum Spool {
    /// A buffer in memory (its length is the instance's so far).
    Memory(Vec<u8>),
    /// A spool file on disk, sealed at rest.
    Disk(Sealing<std::io::BufWriter<tempfile::NamedTempFile>>),
}

impl Spool {
    /// A memory spool: `reuse` (an earlier instance's, emptied) or a new one.
    fn memory(reuse: Option<Vec<u8>>) -> Spool {
        let mut b = reuse.unwrap_or_default();
        b.clear();
        Spool::Memory(b)
    }

    /// A sealed spool file in `dir` holding `memory`'s bytes.
    fn to_disk(memory: &[u8], dir: &Path, at_rest: &AtRest) -> std::io::Result<Spool> {
        let f = tempfile::Builder::new()
            .prefix("incoming-")
            .tempfile_in(dir)?;
        let mut w = at_rest.writer(std::io::BufWriter::with_capacity(256 * 1024, f))?;
        w.write_all(memory)?;
        Ok(Spool::Disk(w))
    }
}

impl Incoming {
    /// Takes a PDV item's bytes: into the memory spool straight from the socket while they fit
    /// in it, else through [`Incoming::write`].
    fn receive(&mut self, data: &mut PdvData<'_>) -> Result<(), String> {
        if let Some(Spool::Memory(m)) = &mut self.spool {
            let len = m.len() + data.len();
            if len as u64 <= MEMORY_SPOOL {
                Self::make_room(m, len);
                return data.append_to(m);
            }
        }
        data.chunks(|bytes| self.write(bytes))
    }

    /// Room for `len` bytes in a memory spool: grown by doubling, but never past MEMORY_SPOOL
    /// (the bound is on its capacity).
    fn make_room(m: &mut Vec<u8>, len: usize) {
        if len > m.capacity() {
            let want = (m.capacity() * 2).clamp(len, MEMORY_SPOOL as usize);
            m.reserve_exact(want - m.len());
        }
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        let Some(spool) = self.spool.as_mut() else {
            return Ok(());
        };
        if let Spool::Memory(m) = spool {
            let len = m.len() + bytes.len();
            if len as u64 > MEMORY_SPOOL {
                match Spool::to_disk(m, &self.disk, &self.at_rest) {
                    Ok(d) => *spool = d,
                    Err(e) => {
                        self.failed = Some(format!("cannot write the spool file: {}", e.kind()));
                        self.spool = None;
                        return Ok(());
                    }
                }
            } else {
                Self::make_room(m, len);
            }
        }
        let written = match spool {
            Spool::Memory(m) => {
                m.extend_from_slice(bytes);
                Ok(())
            }
            Spool::Disk(w) => w.write_all(bytes),
        };
        if let Err(e) = written {
            self.failed = Some(format!("cannot write the spool file: {}", e.kind()));
            self.spool = None;
        }
        Ok(())
    }
}

/// The fields of a DIMSE command set the listener reads (PS3.7 9.3, 9.1.5): a command set is a
/// list of group 0000 elements in implicit VR little endian. Read here rather than by the DICOM
/// library, which builds a whole object for each message and, ending the set at its end of
/// input, creates (and, with `RUST_BACKTRACE` set, unwinds the stack for) an error it discards.
#[derive(Debug, Default, PartialEq, Eq)]
struct Command {
    field: Option<u16>,
    message_id: Option<u16>,
    sop_class: String,
    sop_instance: String,
}

impl Command {
    /// Reads `bytes` (at most 64 KiB, see `messages`); an element longer than what is left,
    /// or of undefined length, makes the set unreadable.
    fn read(bytes: &[u8]) -> Result<Command, String> {
        let unreadable = || "unreadable command set".to_string();
        let mut cmd = Command::default();
        let mut rest = bytes;
        while !rest.is_empty() {
            let head: &[u8; 8] = rest
                .get(..8)
                .and_then(|h| h.try_into().ok())
                .ok_or_else(unreadable)?;
            let group = u16::from_le_bytes([head[0], head[1]]);
            let element = u16::from_le_bytes([head[2], head[3]]);
            let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
            let end = len.checked_add(8).ok_or_else(unreadable)?;
            let value = rest.get(8..end).ok_or_else(unreadable)?;
            rest = &rest[end..];
            let text = || {
                String::from_utf8_lossy(value)
                    .trim_end_matches(['\0', ' '])
                    .to_string()
            };
            let us = || (len == 2).then(|| u16::from_le_bytes([value[0], value[1]]));
            match Tag(group, element) {
                tags::COMMAND_FIELD => cmd.field = us(),
                tags::MESSAGE_ID => cmd.message_id = us(),
                tags::AFFECTED_SOP_CLASS_UID => cmd.sop_class = text(),
                tags::AFFECTED_SOP_INSTANCE_UID => cmd.sop_instance = text(),
                _ => {}
            }
        }
        Ok(cmd)
    }
}

/// Preamble, `DICM` and the file meta group, so that the spool file is a Part 10 file the
/// guarded reader takes like any other; the data set follows as received.
fn write_preamble(
    w: &mut impl Write,
    inc: &Incoming,
    ts: &str,
    calling_ae: &str,
) -> Result<(), String> {
    let meta = dicom_object::FileMetaTableBuilder::new()
        .media_storage_sop_class_uid(inc.sop_class.as_str())
        .media_storage_sop_instance_uid(inc.sop_instance.as_str())
        .transfer_syntax(ts)
        .source_application_entity_title(calling_ae)
        .build()
        .map_err(|_| "the C-STORE command lacks its SOP class or instance UID".to_string())?;
    let io = |e: std::io::Error| format!("cannot write the spool file: {}", e.kind());
    w.write_all(&[0u8; 128]).map_err(io)?;
    w.write_all(b"DICM").map_err(io)?;
    meta.write(&mut *w)
        .map_err(|_| "cannot write the spool file's meta group".to_string())
}

/// A DIMSE response command set.
fn response(
    field: u16,
    id: u16,
    sop_class: &str,
    sop_instance: Option<&str>,
    status: StoreStatus,
    comment: Option<&str>,
) -> InMemDicomObject {
    let mut elements = vec![
        DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(sop_class),
        ),
        DataElement::new(tags::COMMAND_FIELD, VR::US, dicom_value!(U16, [field])),
        DataElement::new(
            tags::MESSAGE_ID_BEING_RESPONDED_TO,
            VR::US,
            dicom_value!(U16, [id]),
        ),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            dicom_value!(U16, [0x0101]),
        ),
        DataElement::new(tags::STATUS, VR::US, dicom_value!(U16, [status.0])),
    ];
    if let Some(uid) = sop_instance {
        elements.push(DataElement::new(
            tags::AFFECTED_SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(uid),
        ));
    }
    if let Some(c) = comment {
        // Error Comment is LO: at most 64 characters.
        let c: String = c.chars().filter(|c| *c != '\\').take(64).collect();
        elements.push(DataElement::new(
            tags::ERROR_COMMENT,
            VR::LO,
            PrimitiveValue::from(c),
        ));
    }
    InMemDicomObject::command_from_element_iter(elements)
}

fn send_command(
    assoc: &mut dicom_ul::ServerAssociation<TcpStream>,
    pc_id: u8,
    cmd: InMemDicomObject,
) -> Result<(), String> {
    let ts = dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased();
    let mut data = Vec::new();
    cmd.write_dataset_with_ts(&mut data, &ts)
        .map_err(|e| format!("cannot encode a response: {e}"))?;
    assoc
        .send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc_id,
                value_type: PDataValueType::Command,
                is_last: true,
                data,
            }],
        })
        .map_err(|e| e.to_string())
}

/// Reads the A-ASSOCIATE-RQ without consuming it (`MSG_PEEK`), so that the presentation
/// contexts can be decided before dicom-ul establishes the association from the same bytes.
fn peek_request(socket: &TcpStream, max_pdu: u32, wait: Duration) -> Option<Pdu> {
    let deadline = Instant::now() + wait;
    let mut buf = vec![0u8; 6];
    loop {
        let n = socket.peek(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        if n >= 6 {
            let len = u32::from_be_bytes([buf[2], buf[3], buf[4], buf[5]]) as usize;
            // An association request is small; a huge one is not a request we take.
            if buf[0] != 0x01 || len > 64 * 1024 {
                return None;
            }
            if buf.len() < 6 + len {
                buf.resize(6 + len, 0);
                continue;
            }
            if n >= 6 + len {
                return dicom_ul::read_pdu(&buf[..6 + len], max_pdu.max(16 * 1024), false)
                    .ok()
                    .flatten();
            }
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Answers an association request with A-ASSOCIATE-RJ and closes.
fn reject(mut socket: TcpStream, result: AssociationRJResult, source: AssociationRJSource) {
    // Consume the request first, so the peer reads the rejection rather than a reset.
    let mut head = [0u8; 6];
    if socket.read_exact(&mut head).is_ok() {
        let len = u32::from_be_bytes([head[2], head[3], head[4], head[5]]) as u64;
        let _ = std::io::copy(&mut (&socket).take(len), &mut std::io::sink());
    }
    let mut out = Vec::new();
    if dicom_ul::write_pdu(
        &mut out,
        &Pdu::AssociationRJ(AssociationRJ { result, source }),
    )
    .is_ok()
    {
        let _ = socket.write_all(&out);
    }
    let _ = socket.shutdown(std::net::Shutdown::Both);
}

fn describe(reason: &AssociationRJServiceUserReason) -> &'static str {
    match reason {
        AssociationRJServiceUserReason::CalledAETitleNotRecognized => {
            "called AE title not recognized (not this node's AE title)"
        }
        AssociationRJServiceUserReason::CallingAETitleNotRecognized => {
            "calling AE title not recognized (not on the allow-list from this address)"
        }
        _ => "not allowed",
    }
}

fn pdu_name(p: &Pdu) -> &'static str {
    match p {
        Pdu::AssociationRQ(_) => "A-ASSOCIATE-RQ",
        Pdu::AssociationAC(_) => "A-ASSOCIATE-AC",
        Pdu::AssociationRJ(_) => "A-ASSOCIATE-RJ",
        Pdu::PData { .. } => "P-DATA-TF",
        Pdu::ReleaseRQ => "A-RELEASE-RQ",
        Pdu::ReleaseRP => "A-RELEASE-RP",
        Pdu::AbortRQ { .. } => "A-ABORT",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_sop_classes_come_from_the_dictionary() {
        use dicom_dictionary_std::uids;
        assert!(is_storage_sop_class(uids::CT_IMAGE_STORAGE));
        assert!(is_storage_sop_class(uids::ENHANCED_MR_IMAGE_STORAGE));
        assert!(is_storage_sop_class(uids::BASIC_TEXT_SR_STORAGE));
        assert!(is_storage_sop_class(uids::SECONDARY_CAPTURE_IMAGE_STORAGE));
        assert!(!is_storage_sop_class(uids::VERIFICATION));
        assert!(!is_storage_sop_class(uids::STORAGE_COMMITMENT_PUSH_MODEL));
        assert!(!is_storage_sop_class(uids::MEDIA_STORAGE_DIRECTORY_STORAGE));
        assert!(!is_storage_sop_class(
            uids::STUDY_ROOT_QUERY_RETRIEVE_INFORMATION_MODEL_FIND
        ));
        assert!(!is_storage_sop_class("1.2.3.4.5"));
    }

    /// P-DATA-TF PDUs read straight off the socket: PDV items whole and split across PDUs,
    /// other PDUs parsed by dicom-ul; a PDU over the announced maximum, or a PDV item longer than
    /// its PDU, is an error, never a panic or a read past it.
    #[test]
    fn pdus_are_read_straight_off_the_socket_with_their_limits() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let pdata = |pdvs: Vec<(bool, bool, Vec<u8>)>| {
            let data = pdvs
                .into_iter()
                .map(|(command, is_last, data)| PDataValue {
                    presentation_context_id: 3,
                    value_type: if command {
                        PDataValueType::Command
                    } else {
                        PDataValueType::Data
                    },
                    is_last,
                    data,
                })
                .collect();
            let mut out = Vec::new();
            dicom_ul::write_pdu(&mut out, &Pdu::PData { data }).unwrap();
            out
        };
        let mut wire = pdata(vec![
            (true, true, vec![1; 10]),
            (false, false, vec![2; 70_000]),
        ]);
        wire.extend(pdata(vec![(false, true, vec![3; 5])]));
        dicom_ul::write_pdu(&mut wire, &Pdu::ReleaseRQ).unwrap();
        // Too large for the announced 100 000 bytes.
        wire.extend(pdata(vec![(false, true, vec![4; 100_001])]));
        let sender = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(&wire).unwrap();
        });
        let (socket, _) = listener.accept().unwrap();
        let mut stream = PduStream {
            socket,
            max_pdu: 100_000,
            chunk: vec![0u8; 64 * 1024],
        };
        let mut seen: Vec<(bool, bool, Option<usize>)> = Vec::new();
        let mut data = Vec::new();
        for _ in 0..2 {
            let other = stream
                .next(|pdv, event| {
                    assert_eq!(pdv.pc_id, 3);
                    match event {
                        // The last PDV straight into a buffer, the others in chunks.
                        PdvEvent::Data(d) if pdv.last && !pdv.command => {
                            let n = d.len();
                            d.append_to(&mut data)?;
                            seen.push((pdv.command, pdv.last, Some(n)));
                        }
                        PdvEvent::Data(d) => d.chunks(|b| {
                            if !pdv.command {
                                data.extend_from_slice(b);
                            }
                            seen.push((pdv.command, pdv.last, Some(b.len())));
                            Ok(())
                        })?,
                        PdvEvent::End => seen.push((pdv.command, pdv.last, None)),
                    }
                    Ok(())
                })
                .unwrap();
            assert!(other.is_none());
        }
        assert_eq!(
            seen,
            vec![
                (true, true, Some(10)),
                (true, true, None),
                (false, false, Some(64 * 1024)),
                (false, false, Some(70_000 - 64 * 1024)),
                (false, false, None),
                (false, true, Some(5)),
                (false, true, None),
            ]
        );
        assert_eq!(data.len(), 70_005);
        assert!(data[..70_000].iter().all(|b| *b == 2) && data[70_000..] == [3; 5]);
        let release = stream.next(|_, _| Ok(())).unwrap();
        assert!(matches!(release, Some(Pdu::ReleaseRQ)));
        let err = stream.next(|_, _| Ok(())).unwrap_err();
        assert!(err.contains("more than the 100000 announced"), "{err}");
        sender.join().unwrap();

        // A PDV item that claims more than its PDU holds.
        let sender = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            let mut bad = vec![0x04, 0, 0, 0, 0, 12];
            bad.extend_from_slice(&100u32.to_be_bytes());
            bad.extend_from_slice(&[1, 0x02, 0, 0, 0, 0, 0, 0]);
            s.write_all(&bad).unwrap();
        });
        let (socket, _) = listener.accept().unwrap();
        let mut stream = PduStream {
            socket,
            max_pdu: 100_000,
            chunk: vec![0u8; 64 * 1024],
        };
        let err = stream.next(|_, _| Ok(())).unwrap_err();
        assert!(err.contains("longer than its P-DATA-TF PDU"), "{err}");
        sender.join().unwrap();
    }

    /// The listener's own command set reader: the fields it needs, padding trimmed; a set cut
    /// short or an element claiming more than the set holds is unreadable, never a panic.
    #[test]
    fn command_sets_are_read_with_every_length_checked() {
        let cmd = InMemDicomObject::command_from_element_iter(vec![
            DataElement::new(
                tags::AFFECTED_SOP_CLASS_UID,
                VR::UI,
                PrimitiveValue::from("1.2.840.10008.5.1.4.1.1.2\0"),
            ),
            DataElement::new(tags::COMMAND_FIELD, VR::US, dicom_value!(U16, [0x0001])),
            DataElement::new(tags::MESSAGE_ID, VR::US, dicom_value!(U16, [7])),
            DataElement::new(tags::PRIORITY, VR::US, dicom_value!(U16, [0])),
            DataElement::new(tags::COMMAND_DATA_SET_TYPE, VR::US, dicom_value!(U16, [0])),
            DataElement::new(
                tags::AFFECTED_SOP_INSTANCE_UID,
                VR::UI,
                PrimitiveValue::from("1.2.3.4 "),
            ),
        ]);
        let ts = dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased();
        let mut bytes = Vec::new();
        cmd.write_dataset_with_ts(&mut bytes, &ts).unwrap();
        assert_eq!(
            Command::read(&bytes).unwrap(),
            Command {
                field: Some(1),
                message_id: Some(7),
                sop_class: "1.2.840.10008.5.1.4.1.1.2".into(),
                sop_instance: "1.2.3.4".into(),
            }
        );
        let mut cut_inside = 0;
        for cut in 1..bytes.len() {
            if Command::read(&bytes[..cut]).is_err() {
                cut_inside += 1;
            }
        }
        assert!(
            cut_inside > bytes.len() / 2,
            "most cuts fall inside an element"
        );
        // The first element (the group length) claiming more than the set holds.
        let mut bad = bytes.clone();
        bad[4..8].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(Command::read(&bad).unwrap_err(), "unreadable command set");
        bad[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Command::read(&bad).is_err());
        // No Command Field: read, and the caller refuses it.
        assert_eq!(Command::read(&[]).unwrap(), Command::default());
    }

    /// An instance is spooled in memory up to MEMORY_SPOOL bytes (its buffer never grows past
    /// that) and continues in a spool file sealed at rest beyond: the file holds every byte.
    #[test]
    fn an_instance_past_the_memory_spool_continues_in_a_sealed_spool_file() {
        let dir = tempfile::tempdir().unwrap();
        let keys = crate::pseudonym::SiteKeys::from_bytes([7; 32], [9; 32]);
        let at_rest = AtRest::new(&keys, true);
        let mut inc = Incoming {
            pc_id: 1,
            message_id: 1,
            sop_class: String::new(),
            sop_instance: String::new(),
            spool: Some(Spool::memory(Some(vec![9u8; 100]))),
            failed: None,
            started: Instant::now(),
            disk: dir.path().to_path_buf(),
            at_rest: at_rest.clone(),
        };
        let chunk: Vec<u8> = (0..(1u32 << 20)).map(|i| i as u8).collect();
        for _ in 0..(MEMORY_SPOOL >> 20) {
            inc.write(&chunk).unwrap();
        }
        match &inc.spool {
            Some(Spool::Memory(m)) => {
                assert_eq!(m.len() as u64, MEMORY_SPOOL, "a reused spool starts empty");
                assert!(m.capacity() as u64 <= MEMORY_SPOOL);
            }
            _ => panic!("still in memory"),
        }
        inc.write(b"the rest").unwrap();
        assert!(inc.failed.is_none());
        let Some(Spool::Disk(w)) = inc.spool.take() else {
            panic!("moved to disk")
        };
        let (w, _) = w.finish().unwrap();
        let file = w.into_inner().map_err(|e| e.into_error()).unwrap();
        assert!(AtRest::key_id_of(file.path()).unwrap().is_some(), "sealed");
        let read = at_rest.read(file.path()).unwrap();
        assert_eq!(read.len() as u64, MEMORY_SPOOL + 8);
        assert!(read[..chunk.len()] == chunk[..] && read.ends_with(b"the rest"));
    }

    #[test]
    fn the_allow_list_checks_called_ae_calling_ae_and_address_together() {
        let allow = vec![DicomAllow {
            ae_title: "MODALITY".into(),
            address: "127.0.0.1".parse().unwrap(),
        }];
        let local: IpAddr = "127.0.0.1".parse().unwrap();
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        assert_eq!(
            access_decision("BROKER", &allow, local, "MODALITY", "BROKER"),
            Ok(())
        );
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(
            access_decision("BROKER", &allow, mapped, "MODALITY", "BROKER"),
            Ok(())
        );
        assert_eq!(
            access_decision("BROKER", &allow, local, "MODALITY", "OTHER"),
            Err(AssociationRJServiceUserReason::CalledAETitleNotRecognized)
        );
        assert_eq!(
            access_decision("BROKER", &allow, local, "INTRUDER", "BROKER"),
            Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized)
        );
        assert_eq!(
            access_decision("BROKER", &allow, other, "MODALITY", "BROKER"),
            Err(AssociationRJServiceUserReason::CallingAETitleNotRecognized)
        );
    }
}
