//! The DIMSE source: instances a local device sends to the DICOM listener (C-STORE).
//!
//! Owns: routing an association to an agreement's flow (`[[dicom.routes]]`, matched on calling
//! and called AE title), taking one received instance through the pipeline with the calling AE
//! as its source AE (so `select.source_aes` is enforced), making it durable before the listener
//! may acknowledge it, and the studies still arriving ([`OpenStudies`]): what is new since the last
//! forward, and which have been quiet long enough to count as complete. An instance that
//! de-identification quarantines is handed to the node's review hold ([`ReviewHold`]) while its
//! spool file still exists, and is still answered with a failure status.
//!
//! Durable before the answer: an instance up to [`LOG_LIMIT`] bytes is appended, sealed, to the
//! ingest write-ahead log (`ingest::wal`: its de-identified bytes, its outbox study and file name,
//! its vault entries; one `fdatasync`), and the answer goes out. An instance the listener holds
//! in memory is read, de-identified and encoded from there (no file on the way). The instance's
//! SHA-256 is computed meanwhile by the listener's hashing thread (in a sealed log the record
//! needs none: its sealing authenticates it; a plain log's record carries it) and handed to the
//! mover. The mover and the hashing thread run at a lower priority than the association threads
//! (nice [`super::BACKGROUND_NICE`]): on the path of an acknowledgement are only the association and
//! the modality. An instance whose plaintext fits in the listener's forwarding memory
//! ([`FORWARD_MEMORY`], `send`'s [`MemoryBudget`]) is handed to the forwarder the moment it is
//! durable in the log ([`OpenStudies::logged`]) and offered from memory once its hash is there:
//! the forwarder does not wait for the mover. Its vault entries are durable by then in the log's
//! record (the mover records them in the vault; a restart replays the record before anything
//! else runs), so no token reaches the partner before its vault record is durable. The mover (a
//! background thread) then writes the logged instances into their outbox study folders (sealed
//! files named by the SOP instance token, their bytes copied from the log inside the kernel),
//! except those the partner has already confirmed by a signed receipt (it waits up to
//! [`RECEIPT_GRACE`] for the receipt of those offered from memory): they need no copy, and the
//! study's entry lists them as receipted. It records their vault entries, makes all of it durable
//! for a group at once (one file-system flush, the folders fsynced, the vault flushed), marks them
//! consumed in the log and only then tells the forwarder ([`OpenStudies::moved`]) of the copied
//! ones (an instance not handed over in memory is offered only from then on). A record the log
//! replays at start is always copied (the partner answers "already held" for what it has). At
//! start, [`DimseIngest::with_log`]
//! moves the records a stopped or killed node had acknowledged but not moved (idempotently: the
//! same file name and bytes, vault records keyed by token) before the forwarder runs. A larger
//! instance, or one arriving while the log has no free slot, is made durable in the outbox
//! directly (vault flushed, file fsynced and named, folder fsynced) before the answer. When the
//! listener goes away, its mover finishes the group it is moving and ends, waited for up to
//! [`MOVER_EXIT_WAIT`], so that nothing writes into the data folder after the listener is gone.
//!
//! Does not own: the association layer (`dicom_net::scp` calls [`DimseIngest`] through its
//! `StoreService` trait) or sending to the partner (`node` runs the forwarder).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::wal::{InstanceRecord, Location, Record, Wal};
use super::{
    admit_and_deidentify, admit_and_deidentify_memory, HeldBack, HeldBackKind, IngestFlow,
};
use crate::audit::{AuditLog, Event};
use crate::config::DicomRoute;
use crate::deid::batch;
use crate::dicom_net::scp::{AssociationPeer, Received, StoreOutcome, StoreService, StoreStatus};
use crate::federation::client::InstanceBody;
use crate::pseudonym::Vault;
use crate::send::MemoryBudget;
use crate::store::outbox::{Outbox, OutboxEntry, OutboxInstance, OutboxState};
use crate::store::safe_name;

/// Resolves a route's flow against the agreements in force (called once per association, so
/// a reloaded agreement applies from the next association on).
pub type FlowResolver =
    dyn Fn(&DicomRoute) -> Result<IngestFlow, super::IngestError> + Send + Sync + 'static;

/// Opens the site's vault (its sled database takes a lock while open).
pub type VaultOpener = dyn Fn() -> Result<Arc<Vault>, String> + Send + Sync + 'static;

/// Holds a quarantined instance for review (the node's quarantine, audited there): gets the
/// flow, the source (the calling AE title) and the held-back record, whose `path` is the spool
/// file (still on disk), and adds the item id to its reason.
pub type ReviewHold = dyn Fn(&IngestFlow, &str, &mut HeldBack) + Send + Sync + 'static;

/// The listener's side of the pipeline.
pub struct DimseIngest {
    routes: Vec<DicomRoute>,
    resolve: Box<FlowResolver>,
    outbox: Outbox,
    vault: Arc<VaultUse>,
    audit: Arc<AuditLog>,
    open: Arc<OpenStudies>,
    hold_for_review: Box<ReviewHold>,
    /// The write-ahead log and its mover, when the node keeps one.
    log: Option<Logged>,
    /// Plaintext and record buffers kept from one logged instance for the next.
    buffers: Arc<Buffers>,
    /// Computes the SHA-256 of logged instances beside the log's `fdatasync`.
    hasher: Hasher,
    /// The memory logged instances are held in for the forwarder.
    forward: ForwardMemory,
}

/// Instances up to this many bytes (as received) go through the write-ahead log; larger ones
/// are written to the outbox directly (their bytes are not held in memory whole).
pub const LOG_LIMIT: u64 = 8 << 20;
/// The bytes of one group of the mover at most (records recovered at start are read into
/// memory; those of a running listener stay in the log until copied out).
const MOVE_BYTES: usize = 16 << 20;
/// How many records the mover takes for one group at most: each holds two open files while it
/// is moved (its log slot, its outbox file), so small instances must not exhaust descriptors.
const MOVE_RECORDS: usize = 256;
/// How much memory the listener may hold logged instances in for the forwarder (offered from
/// there, not read back from the outbox): counted in the listener's memory bound.
pub const FORWARD_MEMORY: u64 = 24 << 20;
/// How long the mover waits for the partner's receipt of instances offered from memory before
/// it copies them into the outbox anyway.
const RECEIPT_GRACE: Duration = Duration::from_secs(1);

/// The vault while associations are in progress or logged instances wait to be moved, and how
/// many users it has. It is opened for the first and closed after the last, so that `send` can
/// run beside an idle listener (each sled database is locked by the one process that opens it).
struct VaultUse {
    opener: Box<VaultOpener>,
    state: Mutex<(Option<Arc<Vault>>, usize)>,
}

impl VaultUse {
    fn acquire(&self) -> Result<Arc<Vault>, String> {
        let mut v = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if v.0.is_none() {
            v.0 = Some((self.opener)()?);
        }
        v.1 += 1;
        Ok(v.0.clone().expect("just opened"))
    }

    fn release(&self, n: usize) {
        let mut v = self.state.lock().unwrap_or_else(|p| p.into_inner());
        v.1 = v.1.saturating_sub(n);
        if v.1 == 0 {
            v.0 = None;
        }
    }
}

/// The log, the channel to its mover, and how many appended records it has not moved yet.
struct Logged {
    wal: Arc<Wal>,
    to_mover: Mutex<mpsc::Sender<LoggedInstance>>,
    pending: Arc<(Mutex<usize>, Condvar)>,
    /// The mover's thread, waited for when the listener goes (see `Drop`).
    mover: Option<std::thread::JoinHandle<()>>,
}

/// How long the listener going away waits for its mover to finish the group it is moving.
const MOVER_EXIT_WAIT: Duration = Duration::from_secs(10);

impl Drop for Logged {
    /// Ends the mover (its channel closes) and waits up to [`MOVER_EXIT_WAIT`] for it to finish
    /// the group it is moving and let go of the log: otherwise it would still be writing into
    /// the log's and the outbox's folders after whoever owns them (a test's temporary folder,
    /// a node stopping) has moved on. A mover still retrying a failing move by then is left to
    /// end with the process; what it had not moved stays in the log for the next start.
    fn drop(&mut self) {
        let (closed, _) = mpsc::channel();
        drop(std::mem::replace(
            &mut *self.to_mover.lock().unwrap_or_else(|p| p.into_inner()),
            closed,
        ));
        let Some(mover) = self.mover.take() else {
            return;
        };
        let deadline = Instant::now() + MOVER_EXIT_WAIT;
        while !mover.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        if mover.is_finished() {
            let _ = mover.join();
        } else {
            tracing::warn!("the ingest mover is still moving; what it has not moved stays in the ingest log for the next start");
        }
    }
}

/// Where a study goes: the flow's names, as the outbox entry keeps them.
#[derive(Debug, Clone)]
pub struct StudyRoute {
    pub agreement: String,
    pub flow: String,
    pub purpose: String,
    pub to: String,
}

impl From<&IngestFlow> for StudyRoute {
    fn from(f: &IngestFlow) -> StudyRoute {
        StudyRoute {
            agreement: f.agreement.clone(),
            flow: f.flow.clone(),
            purpose: f.purpose.clone(),
            to: f.to.clone(),
        }
    }
}

/// One association's view: who it is and which flow its instances go to.
pub struct Session {
    peer: AssociationPeer,
    /// The flow and vault, or why this association's instances are refused and with what status.
    flow: Result<(Arc<IngestFlow>, Arc<Vault>), (String, StoreStatus)>,
    received: u64,
    stored: u64,
    held_back: Vec<HeldBack>,
}

impl DimseIngest {
    pub fn new(
        routes: Vec<DicomRoute>,
        resolve: Box<FlowResolver>,
        outbox: Outbox,
        open_vault: Box<VaultOpener>,
        audit: Arc<AuditLog>,
        open: Arc<OpenStudies>,
        hold_for_review: Box<ReviewHold>,
    ) -> DimseIngest {
        DimseIngest {
            routes,
            resolve,
            outbox,
            vault: Arc::new(VaultUse {
                opener: open_vault,
                state: Mutex::new((None, 0)),
            }),
            audit,
            open,
            hold_for_review,
            log: None,
            buffers: Arc::new(Buffers::default()),
            hasher: Hasher::default(),
            forward: ForwardMemory::default(),
        }
    }

    /// Acknowledges through the write-ahead log `wal`: first moves `recovered` (the records
    /// [`Wal::open`] found: acknowledged by the last run, not yet moved) into the outbox, then
    /// starts the mover. Call before the forwarder and the outbox worker run.
    pub fn with_log(mut self, wal: Wal, recovered: Vec<Record>) -> Result<DimseIngest, String> {
        let mover = Mover {
            wal: Arc::new(wal),
            outbox: self.outbox.clone(),
            open: self.open.clone(),
            vault: self.vault.clone(),
        };
        if !recovered.is_empty() {
            let n = recovered.len();
            self.vault.acquire()?;
            let moved = (|| {
                let mut group = Vec::new();
                let mut bytes = 0;
                for r in recovered {
                    bytes += r.data.len();
                    group.push(r);
                    if bytes >= MOVE_BYTES || group.len() >= MOVE_RECORDS {
                        mover.apply(std::mem::take(&mut group))?;
                        bytes = 0;
                    }
                }
                mover.apply(group)
            })();
            self.vault.release(1);
            moved?;
            tracing::info!(
                instances = n,
                "instances acknowledged by the last run were moved from the ingest log"
            );
        }
        mover.wal.replayed().map_err(|e| e.to_string())?;
        mover.wal.warm_up();
        let (tx, rx) = mpsc::channel();
        let pending = Arc::new((Mutex::new(0usize), Condvar::new()));
        let wal = mover.wal.clone();
        let moving = pending.clone();
        let thread = std::thread::Builder::new()
            .name("ingest-mover".into())
            .spawn(move || {
                super::lower_priority();
                mover.run(rx, moving)
            })
            .map_err(|e| format!("cannot start the ingest mover: {e}"))?;
        self.log = Some(Logged {
            wal,
            to_mover: Mutex::new(tx),
            pending,
            mover: Some(thread),
        });
        Ok(self)
    }

    /// Waits (up to `limit`) until every logged instance has been moved into the outbox (the
    /// node stopping; what is left is moved at the next start).
    pub fn drain(&self, limit: Duration) {
        let Some(log) = &self.log else { return };
        let (count, cv) = &*log.pending;
        let n = count.lock().unwrap_or_else(|p| p.into_inner());
        let _ = cv.wait_timeout_while(n, limit, |n| *n > 0);
    }

    /// The vault for one more association.
    fn vault_for_association(&self) -> Result<Arc<Vault>, String> {
        self.vault.acquire()
    }

    /// One association fewer; the last user closes the vault.
    fn vault_released(&self) {
        self.vault.release(1);
    }

    fn audit(
        &self,
        peer: &AssociationPeer,
        flow: Option<&IngestFlow>,
        object: String,
        outcome: String,
    ) {
        self.audit.record_or_warn(Event {
            actor: format!("dicom:{}@{}", peer.calling_ae, peer.address.ip()),
            action: "ingest".into(),
            object,
            agreement: flow.map(|f| f.agreement.clone()).unwrap_or_default(),
            purpose: flow.map(|f| f.purpose.clone()).unwrap_or_default(),
            outcome,
        });
    }

    /// The first route whose optional AE matches hold for this association.
    fn route(&self, peer: &AssociationPeer) -> Option<&DicomRoute> {
        let same = |want: &Option<String>, have: &str| {
            want.as_deref().is_none_or(|w| w.trim() == have.trim())
        };
        self.routes
            .iter()
            .find(|r| same(&r.calling_ae, &peer.calling_ae) && same(&r.called_ae, &peer.called_ae))
    }

    /// Stores one instance durably in the outbox; `Err` says why it was held back.
    fn take(
        &self,
        flow: &IngestFlow,
        vault: &Vault,
        peer: &AssociationPeer,
        n: u64,
        instance: Received<'_>,
    ) -> Result<(), (HeldBack, StoreStatus)> {
        let started = Instant::now();
        let input = format!("instance {n} from {}", peer.calling_ae);
        let held = |kind, reason: String, status| {
            (
                HeldBack {
                    input: input.clone(),
                    path: None,
                    kind,
                    reason,
                },
                status,
            )
        };
        let refused = |why| {
            let h = HeldBack::new(input.clone(), None, why);
            let status = match h.kind {
                HeldBackKind::Quarantined => StoreStatus::DEIDENTIFICATION_REFUSED,
                HeldBackKind::NotCovered => StoreStatus::NOT_AUTHORIZED,
                HeldBackKind::Failed => StoreStatus::CANNOT_UNDERSTAND,
            };
            (h, status)
        };
        let (admitted, small) = match instance {
            // Received in memory: the guarded reader reads it there.
            Received::Memory(bytes) => {
                let small = bytes.len() as u64 <= LOG_LIMIT;
                let admitted =
                    admit_and_deidentify_memory(flow, bytes.clone(), Some(&peer.calling_ae))
                        .map_err(refused)?;
                (admitted, small)
            }
            // The spool file is sealed at rest; the guarded reader reads its plaintext in memory.
            Received::File(spool) => {
                let view = self.outbox.at_rest().plain_view(spool).map_err(|e| {
                    held(
                        HeldBackKind::Failed,
                        format!("cannot read the spool file: {e}"),
                        StoreStatus::OUT_OF_RESOURCES,
                    )
                })?;
                let admitted = admit_and_deidentify(flow, view.path(), Some(&peer.calling_ae))
                    .map_err(refused)?;
                (
                    admitted,
                    std::fs::metadata(spool).is_ok_and(|m| m.len() <= LOG_LIMIT),
                )
            }
        };
        let d = admitted.deidentified;
        let deidentified = started.elapsed();
        if let (Some(log), true) = (&self.log, small) {
            return self
                .log_instance(log, flow, d, admitted.modality, started, deidentified)
                .map_err(|r| held(HeldBackKind::Failed, r, StoreStatus::OUT_OF_RESOURCES));
        }
        let dir = self.outbox.study_dir(&flow.agreement, &d.study_uid);
        let file = format!("{}.dcm", safe_name(&d.sop_instance_uid));
        // The vault record is durable before the instance is: a token never exists at the
        // partner without the means to resolve it here. The vault is flushed while the output
        // is written (the modality waits for both), and joined before the output gets its name.
        let (vaulted, staged) = std::thread::scope(|scope| {
            let vaulted = scope.spawn(|| record_durably(vault, &flow.agreement, &d.vault_entries));
            let staged = batch::stage_output_hashed(
                d.object,
                d.pixel_data.as_ref(),
                &dir.join(&file),
                self.outbox.at_rest(),
                batch::Keep::Durable,
            );
            (vaulted.join(), staged)
        });
        if !matches!(vaulted, Ok(Ok(()))) {
            return Err(held(
                HeldBackKind::Failed,
                "the vault could not record its tokens".into(),
                StoreStatus::OUT_OF_RESOURCES,
            ));
        }
        let staged =
            staged.map_err(|r| held(HeldBackKind::Failed, r, StoreStatus::OUT_OF_RESOURCES))?;
        self.open
            .ensure_entry(&self.outbox, &flow.into(), &d.study_uid, &dir)
            .map_err(|e| {
                held(
                    HeldBackKind::Failed,
                    format!("cannot open the outbox study: {e}"),
                    StoreStatus::OUT_OF_RESOURCES,
                )
            })?;
        let written = started.elapsed();
        let instance = OutboxInstance {
            file,
            sha256: hex::encode(staged.sha256().unwrap_or_default()),
            size: staged.size(),
            sop_instance_uid: d.sop_instance_uid,
        };
        for (_, result) in batch::commit_outputs(vec![staged]) {
            result.map_err(|r| held(HeldBackKind::Failed, r, StoreStatus::OUT_OF_RESOURCES))?;
        }
        crate::store::sync_dir(&dir).map_err(|e| {
            held(
                HeldBackKind::Failed,
                format!("cannot sync the outbox folder: {e}"),
                StoreStatus::OUT_OF_RESOURCES,
            )
        })?;
        // Where an acknowledgement's time goes (the modality waits for all of it).
        tracing::debug!(
            deidentify_us = deidentified.as_micros() as u64,
            write_and_vault_us = (written - deidentified).as_micros() as u64,
            durable_us = (started.elapsed() - written).as_micros() as u64,
            "instance durable in the outbox"
        );
        self.open.arrived(
            &flow.into(),
            &d.study_uid,
            dir,
            instance,
            admitted.modality,
            d.patient_token,
        );
        Ok(())
    }
}

impl DimseIngest {
    /// Encodes, seals and appends one instance to the log (durable when this returns `Ok`).
    /// When the log cannot take it now, the instance is moved into the outbox at once instead.
    fn log_instance(
        &self,
        log: &Logged,
        flow: &IngestFlow,
        d: crate::deid::Deidentified,
        modality: Option<String>,
        started: Instant,
        deidentified: Duration,
    ) -> Result<(), String> {
        let file = format!("{}.dcm", safe_name(&d.sop_instance_uid));
        let (object, pixels) = (d.object, d.pixel_data);
        let room = pixels.as_ref().map_or(0, |p| p.len() as usize) + 64 * 1024;
        let mut buf = self
            .forward
            .buffer(room)
            .unwrap_or_else(|| self.buffers.take(room));
        batch::encode_output(object, pixels.as_ref(), &mut buf)?;
        drop(pixels);
        let (plain, held) = self.forward.hold(buf, &self.buffers);
        // The SHA-256 (for the outbox and the partner's manifest) is computed on another
        // thread while the instance is sealed, logged and made durable: the modality does not
        // wait for it. A sealed record needs no hash (its sealing authenticates it); a plain
        // log computes it first, as the record's integrity check.
        let wake = held.is_some().then(|| self.open.clone());
        let mut hashing = log
            .wal
            .seals()
            .then(|| self.hasher.start(plain.clone(), wake));
        let meta = InstanceRecord {
            agreement: flow.agreement.clone(),
            flow: flow.flow.clone(),
            purpose: flow.purpose.clone(),
            to: flow.to.clone(),
            study: d.study_uid,
            file,
            sha256: None,
            size: (*plain).as_ref().len() as u64,
            data_tag: None,
            sop_instance_uid: d.sop_instance_uid,
            modality,
            patient_token: d.patient_token,
            vault_entries: d.vault_entries,
        };
        let rec = self.buffers.take(room + room / 32);
        let (mut rec, meta) = log
            .wal
            .seal_instance(meta, (*plain).as_ref(), rec)
            .map_err(|e| e.to_string())?;
        drop(plain);
        // Held in memory: handed to the forwarder once durable (below) and hashed.
        let mut handed = match held {
            Some(body) => Some(self.forward.hand_over(
                &self.open,
                &self.outbox,
                flow,
                &meta,
                body,
                hashing.clone(),
            )?),
            None => None,
        };
        let sealed = started.elapsed();
        // The mover finds the vault open: one use per record until it is moved.
        self.vault.acquire()?;
        let appended = log.wal.append(&mut rec, |at| {
            // Durable: the forwarder may offer it from memory (before the mover sees it).
            if let Some(h) = handed.take() {
                self.open.logged(h);
            }
            *log.pending.0.lock().unwrap_or_else(|p| p.into_inner()) += 1;
            let _ = log
                .to_mover
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .send((at, hashing.take()));
        });
        // Not in the log: its sealed data goes into the outbox now.
        let unlogged = matches!(appended, Ok(None)).then(|| Wal::data_of(&rec).to_vec());
        self.buffers.give(rec);
        match appended {
            Ok(Some(_)) => {
                tracing::debug!(
                    deidentify_us = deidentified.as_micros() as u64,
                    seal_us = (sealed - deidentified).as_micros() as u64,
                    durable_us = (started.elapsed() - sealed).as_micros() as u64,
                    "instance durable in the ingest log"
                );
                Ok(())
            }
            Ok(None) => {
                // No free slot (the mover is behind) or too large: into the outbox now.
                let data = unlogged.unwrap_or_default();
                let mut now = Record {
                    location: Location {
                        slot: usize::MAX,
                        start: Default::default(),
                        end: Default::default(),
                    },
                    meta,
                    data,
                };
                now.meta.sha256 = now
                    .meta
                    .sha256
                    .or_else(|| hashing.take().and_then(|h| h.wait()).map(hex::encode));
                let mover = Mover {
                    wal: log.wal.clone(),
                    outbox: self.outbox.clone(),
                    open: self.open.clone(),
                    vault: self.vault.clone(),
                };
                let result = mover.apply(vec![now]);
                self.vault.release(1);
                result
            }
            Err(e) => {
                self.vault.release(1);
                Err(format!("cannot append to the ingest log: {e}"))
            }
        }
    }
}

/// Large buffers (an instance's plaintext, its log record) kept from one instance for the
/// next: a fresh allocation of this size is mapped, faulted in page by page, zeroed and
/// unmapped again for every instance. At most [`Buffers::KEEP`] buffers of up to
/// [`Buffers::LARGEST`] bytes each are kept.
#[derive(Default)]
struct Buffers {
    free: Mutex<Vec<Vec<u8>>>,
}

impl Buffers {
    const KEEP: usize = 4;
    const LARGEST: usize = 2 << 20;

    /// An empty buffer with room for `room` bytes.
    fn take(&self, room: usize) -> Vec<u8> {
        let kept = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut b = kept.unwrap_or_default();
        b.clear();
        b.reserve(room);
        b
    }

    fn give(&self, b: Vec<u8>) {
        if b.capacity() > Self::LARGEST {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < Self::KEEP {
            free.push(b);
        }
    }
}

/// A buffer that goes back to its pool when its last user (the association or the thread
/// hashing it) drops it.
struct Pooled {
    buf: Vec<u8>,
    pool: Arc<Buffers>,
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.buf));
    }
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

/// The memory the listener holds logged instances' plaintext in for the forwarder
/// ([`FORWARD_MEMORY`], `send`'s [`MemoryBudget`]): an instance is held (and offered from
/// memory) only if it fits; beyond that it goes the file way (the mover's outbox copy).
struct ForwardMemory {
    budget: Arc<MemoryBudget>,
}

impl Default for ForwardMemory {
    fn default() -> ForwardMemory {
        ForwardMemory {
            budget: MemoryBudget::new(FORWARD_MEMORY),
        }
    }
}

impl ForwardMemory {
    /// A buffer for an instance's plaintext from the budget's spare buffers when the budget
    /// has room for it (it is about to be held); `None` when it has not.
    fn buffer(&self, room: usize) -> Option<Vec<u8>> {
        (self.budget.used() + room as u64 <= FORWARD_MEMORY).then(|| self.budget.buffer(room))
    }

    /// The plaintext as the log and the hashing thread share it, and the same held under the
    /// budget for the forwarder (`None` when it does not fit: the file way).
    fn hold(&self, buf: Vec<u8>, pool: &Arc<Buffers>) -> (InstanceBody, Option<InstanceBody>) {
        match self.budget.hold(buf) {
            Ok(held) => (held.clone(), Some(held)),
            Err(buf) => (
                Arc::new(Pooled {
                    buf,
                    pool: pool.clone(),
                }),
                None,
            ),
        }
    }

    /// What the forwarder is handed for a logged instance held in memory; makes sure its study
    /// has an outbox entry first (as the mover would).
    fn hand_over(
        &self,
        open: &OpenStudies,
        outbox: &Outbox,
        flow: &IngestFlow,
        meta: &InstanceRecord,
        body: InstanceBody,
        hash: Option<PendingHash>,
    ) -> Result<Handed, String> {
        let route = StudyRoute::from(flow);
        let dir = outbox.study_dir(&route.agreement, &meta.study);
        open.ensure_entry(outbox, &route, &meta.study, &dir)
            .map_err(|e| format!("cannot open the outbox study: {e}"))?;
        let hash = hash.unwrap_or_else(|| {
            let mut d = [0u8; 32];
            let known = meta
                .sha256
                .as_deref()
                .is_some_and(|h| hex::decode_to_slice(h, &mut d).is_ok());
            HashCell::set_to(known.then_some(d))
        });
        Ok(Handed {
            route,
            study: meta.study.clone(),
            dir,
            instance: OutboxInstance {
                file: meta.file.clone(),
                sha256: String::new(),
                size: meta.size,
                sop_instance_uid: meta.sop_instance_uid.clone(),
            },
            modality: meta.modality.clone(),
            patient_token: meta.patient_token.clone(),
            body,
            hash,
        })
    }
}

/// The SHA-256 of a logged instance's plaintext: computed by the listener's hashing thread
/// ([`Hasher`]) beside the log's `fdatasync`, or already computed; the mover waits for it, the
/// forwarder looks whether it is there.
type PendingHash = Arc<HashCell>;

/// Where a [`PendingHash`] arrives: `None` while it is computed, then the hash, or `Some(None)`
/// if the hashing thread failed (the mover then computes it from the record).
#[derive(Default)]
struct HashCell {
    digest: Mutex<Option<Option<[u8; 32]>>>,
    ready: Condvar,
}

impl HashCell {
    fn set_to(d: Option<[u8; 32]>) -> PendingHash {
        let cell = Arc::new(HashCell::default());
        cell.set(d);
        cell
    }

    fn set(&self, d: Option<[u8; 32]>) {
        *self.digest.lock().unwrap_or_else(|p| p.into_inner()) = Some(d);
        self.ready.notify_all();
    }

    /// The hash when it has been computed (or failed), without waiting.
    fn ready(&self) -> Option<Option<[u8; 32]>> {
        *self.digest.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for the hash (`None` only if the hashing thread failed).
    fn wait(&self) -> Option<[u8; 32]> {
        let d = self.digest.lock().unwrap_or_else(|p| p.into_inner());
        let d = self
            .ready
            .wait_while(d, |d| d.is_none())
            .unwrap_or_else(|p| p.into_inner());
        d.flatten()
    }
}

/// One hashing job: the plaintext, where its hash goes, and whom to wake when it is there (the
/// forwarder, for an instance handed to it in memory). A job dropped unfinished (the hashing
/// thread gone) marks its hash failed, so that nobody waits for it forever.
struct HashJob {
    plain: InstanceBody,
    cell: PendingHash,
    wake: Option<Arc<OpenStudies>>,
}

impl Drop for HashJob {
    fn drop(&mut self) {
        if self.cell.ready().is_none() {
            self.cell.set(None);
        }
        if let Some(open) = &self.wake {
            open.wake.notify_one();
        }
    }
}

/// The listener's hashing thread, started with the first logged instance and ended when the
/// listener goes (one thread for all instances, not one per instance: a thread's start and its
/// stack cost more than a small instance's hash). It runs at a lower priority
/// ([`super::BACKGROUND_NICE`]): the association threads, which the modalities wait for, come first.
/// At most [`Hasher::QUEUED`] bytes wait for it; an instance beyond that is hashed at once by its
/// association thread, so that memory stays bounded however far behind the hashing is.
#[derive(Default)]
struct Hasher {
    jobs: Mutex<Option<mpsc::Sender<HashJob>>>,
    queued: Arc<std::sync::atomic::AtomicUsize>,
}

impl Hasher {
    const QUEUED: usize = 16 << 20;

    /// Starts hashing `plain`; `wake` is woken when the hash is there.
    fn start(&self, plain: InstanceBody, wake: Option<Arc<OpenStudies>>) -> PendingHash {
        use sha2::{Digest, Sha256};
        use std::sync::atomic::Ordering;
        let len = (*plain).as_ref().len();
        let cell = Arc::new(HashCell::default());
        let mut job = HashJob {
            plain,
            cell: cell.clone(),
            wake,
        };
        if self.queued.load(Ordering::Relaxed) + len <= Self::QUEUED {
            let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
            if jobs.is_none() {
                let (tx, rx) = mpsc::channel::<HashJob>();
                let queued = self.queued.clone();
                let spawned = std::thread::Builder::new()
                    .name("ingest-hash".into())
                    .spawn(move || {
                        super::lower_priority();
                        for job in rx {
                            let bytes = (*job.plain).as_ref();
                            let digest = Sha256::digest(bytes).into();
                            queued.fetch_sub(bytes.len(), Ordering::Relaxed);
                            job.cell.set(Some(digest));
                        }
                    });
                if spawned.is_ok() {
                    *jobs = Some(tx);
                }
            }
            if let Some(tx) = jobs.as_ref() {
                self.queued.fetch_add(len, Ordering::Relaxed);
                match tx.send(job) {
                    Ok(()) => return cell,
                    Err(mpsc::SendError(back)) => job = back,
                }
                self.queued.fetch_sub(len, Ordering::Relaxed);
                *jobs = None;
            }
        }
        job.cell
            .set(Some(Sha256::digest((*job.plain).as_ref()).into()));
        cell
    }
}

/// What the mover is sent for each appended record: where it is, and its hash when the
/// record's meta leaves it out.
type LoggedInstance = (Location, Option<PendingHash>);

/// Moves logged instances into the outbox.
struct Mover {
    wal: Arc<Wal>,
    outbox: Outbox,
    open: Arc<OpenStudies>,
    vault: Arc<VaultUse>,
}

impl Mover {
    /// Takes appended records in order, in groups, until the listener goes away.
    fn run(self, rx: mpsc::Receiver<LoggedInstance>, pending: Arc<(Mutex<usize>, Condvar)>) {
        while let Ok(first) = rx.recv() {
            let mut group = vec![first];
            let mut bytes = 0usize;
            while bytes < MOVE_BYTES && group.len() < MOVE_RECORDS {
                match rx.try_recv() {
                    Ok(logged) => {
                        bytes += (logged.0.end.offset - logged.0.start.offset) as usize;
                        group.push(logged);
                    }
                    Err(_) => break,
                }
            }
            let n = group.len();
            let group: Vec<(Location, Option<String>)> = group
                .into_iter()
                .map(|(at, hash)| (at, hash.and_then(|h| h.wait()).map(hex::encode)))
                .collect();
            // Retried until it works: the instances are acknowledged and safe in the log.
            let mut wait = Duration::from_millis(100);
            loop {
                let moved = group
                    .iter()
                    .map(|(at, hash)| {
                        // The data stays in the log and is copied from there by the kernel;
                        // a record without its hash is read, to get it from its data.
                        let mut l = self.wal.read_in_log(*at).map_err(|e| e.to_string())?;
                        l.record.meta.sha256 = l.record.meta.sha256.or_else(|| hash.clone());
                        if l.record.meta.sha256.is_some() {
                            return Ok(Moving::InLog(l));
                        }
                        self.wal
                            .read(*at)
                            .map(Moving::Read)
                            .map_err(|e| e.to_string())
                    })
                    .collect::<Result<Vec<_>, String>>()
                    .and_then(|records| self.apply_moving(records));
                match moved {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::error!(error = %e, instances = n, "cannot move logged instances into the outbox; retrying (they are safe in the ingest log)");
                        std::thread::sleep(wait);
                        wait = (wait * 2).min(Duration::from_secs(10));
                    }
                }
            }
            self.vault.release(n);
            let (count, cv) = &*pending;
            let mut c = count.lock().unwrap_or_else(|p| p.into_inner());
            *c = c.saturating_sub(n);
            cv.notify_all();
        }
    }

    /// Writes a group of records into their outbox study folders and records their vault
    /// entries; makes all of it durable (one flush for the group); marks them consumed in the
    /// log; then tells the forwarder. The vault must be in use (acquired) by the caller.
    fn apply(&self, records: Vec<Record>) -> Result<(), String> {
        self.apply_moving(records.into_iter().map(Moving::Read).collect())
    }

    /// [`Mover::apply`] of records read whole or left in the log.
    fn apply_moving(&self, mut records: Vec<Moving>) -> Result<(), String> {
        if records.is_empty() {
            return Ok(());
        }
        // Instances on their way to the partner from memory: their receipt usually comes
        // within a few hundred milliseconds, and then they need no outbox copy. Waited for up
        // to RECEIPT_GRACE (the memory they are held in bounds how many can be waiting).
        let deadline = Instant::now() + RECEIPT_GRACE;
        while Instant::now() < deadline
            && records.iter().any(|m| {
                let r = &m.record().meta;
                self.open.awaiting_receipt(&r.agreement, &r.study, &r.file)
            })
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        // A record whose hash was not computed beside the log gets it from its data.
        for m in records.iter_mut() {
            if let Moving::Read(r) = m {
                if r.meta.sha256.is_none() {
                    self.wal.verify(r).map_err(|e| e.to_string())?;
                }
            }
        }
        let vault = self
            .vault
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
            .ok_or("the vault is not open")?;
        let mut staged = Vec::with_capacity(records.len());
        for m in &records {
            let r = m.record();
            let route = StudyRoute {
                agreement: r.meta.agreement.clone(),
                flow: r.meta.flow.clone(),
                purpose: r.meta.purpose.clone(),
                to: r.meta.to.clone(),
            };
            let dir = self.outbox.study_dir(&route.agreement, &r.meta.study);
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("cannot create the outbox study folder: {}", e.kind()))?;
            self.open
                .ensure_entry(&self.outbox, &route, &r.meta.study, &dir)
                .map_err(|e| format!("cannot open the outbox study: {e}"))?;
            // Offered from memory and confirmed by the partner's signed receipt: no outbox
            // copy (the entry lists it as receipted). Anything else is copied: the partner may
            // be down, and nothing acknowledged may be lost.
            let receipted = r.meta.sha256.as_deref().is_some_and(|sha| {
                self.open
                    .receipted(&route.agreement, &r.meta.study, &r.meta.file, sha)
            });
            let tmp = if receipted {
                None
            } else {
                let mut tmp = tempfile::Builder::new()
                    .prefix(".wal-")
                    .suffix(".part")
                    .tempfile_in(&dir)
                    .map_err(|e| format!("cannot create an outbox file: {}", e.kind()))?;
                match m {
                    Moving::Read(r) => std::io::Write::write_all(tmp.as_file_mut(), &r.data),
                    Moving::InLog(l) => l.copy_to(tmp.as_file()),
                }
                .map_err(|e| format!("cannot write an outbox file: {}", e.kind()))?;
                Some(tmp)
            };
            for (token, entry) in &r.meta.vault_entries {
                vault
                    .record(&r.meta.agreement, token, entry)
                    .map_err(|_| "the vault could not record its tokens".to_string())?;
            }
            staged.push((tmp, dir, route));
        }
        let copied: Vec<bool> = staged.iter().map(|(t, _, _)| t.is_some()).collect();
        flush_files(
            staged
                .iter()
                .filter_map(|(t, _, _)| t.as_ref().map(|t| t.as_file())),
        )?;
        let mut dirs = BTreeSet::new();
        for ((tmp, dir, _), m) in staged.iter_mut().zip(&records) {
            let Some(tmp) = tmp.take() else { continue };
            let target = dir.join(&m.record().meta.file);
            tmp.persist(&target)
                .map_err(|e| format!("cannot name an outbox file: {}", e.error.kind()))?;
            dirs.insert(dir.clone());
        }
        for dir in &dirs {
            crate::store::sync_dir(dir)
                .map_err(|e| format!("cannot sync the outbox folder: {e}"))?;
        }
        vault
            .flush()
            .map_err(|_| "the vault could not be flushed".to_string())?;
        if let Some(last) = records
            .iter()
            .map(Moving::record)
            .rfind(|r| r.location.slot != usize::MAX)
        {
            self.wal
                .consumed(last.location.end)
                .map_err(|e| e.to_string())?;
        }
        for (((_, dir, route), r), copied) in staged.into_iter().zip(records).zip(copied) {
            let m = r.into_record().meta;
            let instance = OutboxInstance {
                file: m.file,
                sha256: m.sha256.unwrap_or_default(),
                size: m.size,
                sop_instance_uid: m.sop_instance_uid,
            };
            self.open.moved(
                &route,
                &m.study,
                dir,
                instance,
                m.modality,
                m.patient_token,
                copied,
            );
        }
        Ok(())
    }
}

/// A record being moved: read whole (recovered at start, or without its hash), or its meta with
/// its data left in the log.
enum Moving {
    Read(Record),
    InLog(super::wal::InLog),
}

impl Moving {
    fn record(&self) -> &Record {
        match self {
            Moving::Read(r) => r,
            Moving::InLog(l) => &l.record,
        }
    }

    fn into_record(self) -> Record {
        match self {
            Moving::Read(r) => r,
            Moving::InLog(l) => l.record,
        }
    }
}

/// Makes written files durable, each with its own `fsync`. Not one flush of the whole file
/// system (`syncfs`): that also writes out whatever else is dirty on the machine, and the
/// log's `fdatasync`, which the modality waits for, would queue behind it.
fn flush_files<'a>(files: impl Iterator<Item = &'a std::fs::File>) -> Result<(), String> {
    for f in files {
        f.sync_all()
            .map_err(|e| format!("cannot sync outbox files: {}", e.kind()))?;
    }
    Ok(())
}

/// Records an instance's tokens in the vault and flushes it to disk.
fn record_durably(
    vault: &Vault,
    agreement: &str,
    entries: &[(String, crate::pseudonym::VaultEntry)],
) -> Result<(), sled::Error> {
    for (token, entry) in entries {
        vault.record(agreement, token, entry)?;
    }
    vault.flush()?;
    Ok(())
}

impl StoreService for DimseIngest {
    type Session = Session;

    fn begin(&self, peer: &AssociationPeer) -> Session {
        let flow = match self.route(peer) {
            None => Err((
                format!(
                    "no [[dicom.routes]] entry matches calling AE `{}` and called AE `{}`",
                    peer.calling_ae, peer.called_ae
                ),
                StoreStatus::NOT_AUTHORIZED,
            )),
            Some(route) => (self.resolve)(route)
                .map(Arc::new)
                .map_err(|e| (e.to_string(), StoreStatus::NOT_AUTHORIZED))
                .and_then(|flow| {
                    let vault = self.vault_for_association().map_err(|e| {
                        (
                            format!("the vault cannot be opened: {e}"),
                            StoreStatus::OUT_OF_RESOURCES,
                        )
                    })?;
                    Ok((flow, vault))
                }),
        };
        if let Err((why, _)) = &flow {
            tracing::warn!(calling_ae = %peer.calling_ae, reason = %why, "association has no usable flow; its instances will be refused");
        }
        Session {
            peer: peer.clone(),
            flow,
            received: 0,
            stored: 0,
            held_back: Vec::new(),
        }
    }

    fn store(&self, s: &mut Session, instance: Received<'_>) -> StoreOutcome {
        s.received += 1;
        let n = s.received;
        let (flow, vault) = match &s.flow {
            Ok((f, v)) => (f.clone(), v.clone()),
            Err((why, status)) => {
                let kind = if *status == StoreStatus::OUT_OF_RESOURCES {
                    HeldBackKind::Failed
                } else {
                    HeldBackKind::NotCovered
                };
                let held = HeldBack {
                    input: format!("instance {n} from {}", s.peer.calling_ae),
                    path: None,
                    kind,
                    reason: why.clone(),
                };
                self.audit(&s.peer, None, held.input.clone(), format!("refused: {why}"));
                s.held_back.push(held);
                return StoreOutcome::refused(*status, why.clone());
            }
        };
        match self.take(&flow, &vault, &s.peer, n, instance) {
            Ok(()) => {
                s.stored += 1;
                StoreOutcome::Stored
            }
            Err((mut held, status)) => {
                if held.kind == HeldBackKind::Quarantined {
                    // Held for review before the spool goes (it is gone once answered); the
                    // answer stays a failure status: nothing quarantined is acknowledged.
                    let reviewed = instance.with_path(|spool| {
                        held.path = Some(spool.to_path_buf());
                        (self.hold_for_review)(&flow, s.peer.calling_ae.trim(), &mut held);
                        held.path = None;
                    });
                    if let Err(e) = reviewed {
                        tracing::error!(error = %e.kind(), "a quarantined instance could not be held for review");
                    }
                }
                tracing::warn!(calling_ae = %s.peer.calling_ae, instance = n, outcome = held.kind.describe(), reason = %held.reason, "instance held back");
                self.audit(
                    &s.peer,
                    Some(&flow),
                    held.input.clone(),
                    format!("{}: {}", held.kind.describe(), held.reason),
                );
                let reason = format!("{}: {}", held.kind.describe(), held.reason);
                s.held_back.push(held);
                StoreOutcome::refused(status, reason)
            }
        }
    }

    fn end(&self, s: Session) {
        let flow = s.flow.as_ref().ok().map(|(f, _)| f.as_ref());
        if s.received > 0 {
            self.audit(
                &s.peer,
                flow,
                format!(
                    "association: {} instances received, {} stored",
                    s.received, s.stored
                ),
                if s.held_back.is_empty() {
                    "ok".into()
                } else {
                    format!("{} held back", s.held_back.len())
                },
            );
        }
        tracing::info!(calling_ae = %s.peer.calling_ae, received = s.received, stored = s.stored, held_back = s.held_back.len(), "association ended");
        if s.flow.is_ok() {
            drop(s);
            self.vault_released();
        }
    }
}

/// A logged instance handed to the forwarder in memory ([`OpenStudies::logged`]): durable in
/// the ingest log, its plaintext held under the listener's [`FORWARD_MEMORY`], its hash coming.
struct Handed {
    route: StudyRoute,
    study: String,
    dir: PathBuf,
    /// Its `sha256` is filled in once `hash` is there.
    instance: OutboxInstance,
    modality: Option<String>,
    patient_token: String,
    body: InstanceBody,
    hash: PendingHash,
}

/// A study still arriving over DICOM.
struct OpenStudy {
    dir: PathBuf,
    entry: OutboxEntry,
    /// How many of `entry.instances` the partner has been sent (in order); they are confirmed
    /// by its signed receipts.
    forwarded: usize,
    last_arrival: Instant,
    /// Not before this instant (after a failed attempt).
    retry_at: Option<Instant>,
    busy: bool,
    /// Instances handed over in memory whose hash is still being computed (in order).
    incoming: std::collections::VecDeque<Handed>,
    /// The plaintext held in memory of listed instances, by file name (with its SHA-256).
    bodies: std::collections::HashMap<String, (String, InstanceBody)>,
    /// Instances handed over in memory that the mover has not taken from the log yet (by file
    /// name, how many): the study's final offer waits for them.
    unmoved: std::collections::HashMap<String, usize>,
}

impl OpenStudy {
    fn new(dir: PathBuf, entry: OutboxEntry) -> OpenStudy {
        OpenStudy {
            dir,
            entry,
            forwarded: 0,
            last_arrival: Instant::now(),
            retry_at: None,
            busy: false,
            incoming: Default::default(),
            bodies: Default::default(),
            unmoved: Default::default(),
        }
    }

    /// Lists an instance that arrived (the same SOP instance sent again replaces what was
    /// there: its file was replaced); false when it was listed already.
    fn add(&mut self, instance: OutboxInstance, modality: Option<String>, patient: String) -> bool {
        let e = &mut self.entry;
        let new = match e.instances.iter().position(|i| i.file == instance.file) {
            Some(at) if e.instances[at] != instance => {
                e.instances.remove(at);
                self.forwarded = self.forwarded.min(at);
                e.receipted = e.receipted.min(at);
                self.bodies.remove(&instance.file);
                e.instances.push(instance);
                true
            }
            Some(_) => false,
            None => {
                e.instances.push(instance);
                true
            }
        };
        if let Some(m) = modality {
            if !e.modalities.contains(&m) {
                let mut all: BTreeSet<String> = e.modalities.drain(..).collect();
                all.insert(m);
                e.modalities = all.into_iter().collect();
            }
        }
        if !e.patient_tokens.contains(&patient) {
            e.patient_tokens.push(patient);
        }
        new
    }

    /// Lists the instances handed over in memory whose hash is there, in order.
    fn promote(&mut self) {
        while self
            .incoming
            .front()
            .is_some_and(|h| h.hash.ready().is_some())
        {
            let h = self.incoming.pop_front().expect("a front");
            // A failed hash: the mover lists the instance (with the hash from its record).
            let Some(Some(digest)) = h.hash.ready() else {
                continue;
            };
            let mut instance = h.instance;
            instance.sha256 = hex::encode(digest);
            let (file, sha) = (instance.file.clone(), instance.sha256.clone());
            self.add(instance, h.modality, h.patient_token);
            self.bodies.insert(file, (sha, h.body));
        }
    }

    /// The bodies held in memory of `instances` (in their order; `None`: from its file).
    fn bodies_of(&self, instances: &[OutboxInstance]) -> Vec<Option<InstanceBody>> {
        instances
            .iter()
            .map(|i| {
                self.bodies
                    .get(&i.file)
                    .filter(|(sha, _)| *sha == i.sha256)
                    .map(|(_, b)| b.clone())
            })
            .collect()
    }
}

/// What the forwarder should do with one study now.
pub struct Forward {
    pub dir: PathBuf,
    /// The study's whole entry (its `complete` says whether this is the final offer).
    pub entry: OutboxEntry,
    /// How many of `entry.instances` the partner has been sent already.
    pub sent: usize,
    /// The instances of `entry` held in memory (in its order; `None`: streamed from its file).
    pub bodies: Vec<Option<InstanceBody>>,
}

impl Forward {
    /// What to offer now. While the study is still arriving, only the instances the partner has
    /// not been sent: the receiver re-verifies (re-hashes and re-checks) every instance an offer
    /// lists as already held, so listing the whole study in every partial offer would cost it
    /// work growing with the square of the study's size. The final offer lists the whole study
    /// (each instance verified once more, then the study is complete).
    pub fn offer(&self) -> OutboxEntry {
        let mut e = self.entry.clone();
        if !e.complete {
            e.instances.drain(..self.sent.min(e.instances.len()));
        }
        e
    }

    /// The bodies of [`Forward::offer`]'s instances, in its order (for
    /// `federation::client::PeerClient::send_study_from`).
    pub fn offer_bodies(&self) -> Vec<Option<InstanceBody>> {
        let from = if self.entry.complete {
            0
        } else {
            self.sent.min(self.bodies.len())
        };
        self.bodies[from..].to_vec()
    }

    /// The whole entry with the bookkeeping of an attempt at [`Forward::offer`] (attempts,
    /// next attempt, last error, state), as the outbox keeps it: every instance listed.
    pub fn with_outcome_of(&self, offer: &OutboxEntry) -> OutboxEntry {
        OutboxEntry {
            attempts: offer.attempts,
            next_attempt: offer.next_attempt,
            last_error: offer.last_error.clone(),
            state: offer.state,
            delivered: offer.delivered,
            ..self.entry.clone()
        }
    }
}

/// The studies the listener is receiving, shared by the association threads, the mover and the
/// forwarder.
///
/// An instance reaches it in one of two ways. Held in memory ([`OpenStudies::logged`], from the
/// association thread the moment the instance is durable in the ingest log): it is listed once
/// its SHA-256 is there and offered from memory, so the forwarder does not wait for the mover.
/// Its vault entries are durable in the log's record by then (the mover records them in the
/// vault, and a restart replays the record before anything else runs). Its memory is given back
/// when the partner's signed receipt confirms it, or, after a failed offer, once the mover has
/// copied it into the outbox (the retry streams it from there). Or by the mover
/// ([`OpenStudies::moved`]), once its outbox file is durable (an instance the memory could not
/// hold, a record recovered at start, or one logged without a free slot). The mover copies an
/// instance into the outbox unless the partner has confirmed it already
/// ([`OpenStudies::receipted`]): such an instance is listed in the study's entry among its
/// [`OutboxEntry::receipted`] ones, with no file. A study's final offer waits until the mover
/// has taken every instance handed over in memory from the log, so that its entry is
/// settled (every instance receipted or a file) when it is marked delivered.
pub struct OpenStudies {
    quiet: Duration,
    studies: Mutex<BTreeMap<(String, String), OpenStudy>>,
    /// Wakes the forwarder when an instance arrives.
    pub wake: tokio::sync::Notify,
}

impl OpenStudies {
    pub fn new(quiet: Duration) -> OpenStudies {
        OpenStudies {
            quiet,
            studies: Mutex::new(BTreeMap::new()),
            wake: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), OpenStudy>> {
        self.studies.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes sure the study has an outbox entry marked as still arriving (a new one, or the
    /// existing one reopened), before its first instance is made durable.
    fn ensure_entry(
        &self,
        outbox: &Outbox,
        flow: &StudyRoute,
        study: &str,
        dir: &Path,
    ) -> Result<(), crate::store::StoreError> {
        let key = (flow.agreement.clone(), study.to_string());
        let mut map = self.lock();
        if map.contains_key(&key) {
            return Ok(());
        }
        let entry = match Outbox::load(dir) {
            Ok(mut e) => {
                e.complete = false;
                e.state = OutboxState::Pending;
                e
            }
            Err(_) => OutboxEntry::pending(
                &flow.agreement,
                &flow.flow,
                &flow.purpose,
                &flow.to,
                study,
                false,
            ),
        };
        outbox.save(&entry)?;
        map.insert(key, OpenStudy::new(dir.to_path_buf(), entry));
        Ok(())
    }

    /// The study's open state, a new one if it has none.
    fn open_study<'a>(
        map: &'a mut BTreeMap<(String, String), OpenStudy>,
        flow: &StudyRoute,
        study: &str,
        dir: PathBuf,
    ) -> &'a mut OpenStudy {
        map.entry((flow.agreement.clone(), study.to_string()))
            .or_insert_with(|| {
                OpenStudy::new(
                    dir,
                    OutboxEntry::pending(
                        &flow.agreement,
                        &flow.flow,
                        &flow.purpose,
                        &flow.to,
                        study,
                        false,
                    ),
                )
            })
    }

    /// An instance durable in the ingest log, handed over in memory (see [`OpenStudies`]).
    fn logged(&self, h: Handed) {
        let mut map = self.lock();
        let open = Self::open_study(&mut map, &h.route, &h.study, h.dir.clone());
        *open.unmoved.entry(h.instance.file.clone()).or_default() += 1;
        open.incoming.push_back(h);
        open.last_arrival = Instant::now();
        drop(map);
        self.wake.notify_one();
    }

    /// Whether the partner has confirmed this instance (file name and SHA-256) by a signed
    /// receipt while its study is open: the mover then makes no outbox copy of it.
    fn receipted(&self, agreement: &str, study: &str, file: &str, sha256: &str) -> bool {
        let map = self.lock();
        map.get(&(agreement.to_string(), study.to_string()))
            .is_some_and(|o| {
                o.entry.instances[..o.forwarded.min(o.entry.instances.len())]
                    .iter()
                    .any(|i| i.file == file && i.sha256 == sha256)
            })
    }

    /// Whether this instance was handed over in memory and is on its way to the partner: not
    /// yet confirmed, and its study's offers are not failing (then the mover copies it at once).
    fn awaiting_receipt(&self, agreement: &str, study: &str, file: &str) -> bool {
        let map = self.lock();
        map.get(&(agreement.to_string(), study.to_string()))
            .is_some_and(|o| {
                o.retry_at.is_none()
                    && o.unmoved.contains_key(file)
                    && !o.entry.instances[..o.forwarded.min(o.entry.instances.len())]
                        .iter()
                        .any(|i| i.file == file)
            })
    }

    /// The mover has taken an instance from the log: copied into the outbox (`copied`; listed
    /// if it is not yet), or skipped as receipted.
    #[allow(clippy::too_many_arguments)]
    fn moved(
        &self,
        flow: &StudyRoute,
        study: &str,
        dir: PathBuf,
        instance: OutboxInstance,
        modality: Option<String>,
        patient_token: String,
        copied: bool,
    ) {
        let mut map = self.lock();
        let open = Self::open_study(&mut map, flow, study, dir);
        if let Some(n) = open.unmoved.get_mut(&instance.file) {
            *n -= 1;
            if *n == 0 {
                open.unmoved.remove(&instance.file);
            }
        }
        if copied {
            // After a failed offer, the retry streams it from its file.
            if open.retry_at.is_some() {
                open.bodies.remove(&instance.file);
            }
            if open.add(instance, modality, patient_token) {
                open.last_arrival = Instant::now();
            }
        }
        drop(map);
        self.wake.notify_one();
    }

    fn arrived(
        &self,
        flow: &StudyRoute,
        study: &str,
        dir: PathBuf,
        instance: OutboxInstance,
        modality: Option<String>,
        patient_token: String,
    ) {
        // As an instance the mover copied into the outbox (it is there, durable, and listed).
        self.moved(flow, study, dir, instance, modality, patient_token, true);
    }

    /// Picks up the studies left open by a node that stopped (or was killed) while they were
    /// arriving: every instance file in their folders was made durable, so it goes.
    pub fn recover(&self, outbox: &Outbox) -> usize {
        let mut n = 0;
        for (dir, mut entry) in outbox.entries() {
            if entry.complete || entry.state != OutboxState::Pending {
                continue;
            }
            if let Err(e) = outbox.reconcile(&dir, &mut entry) {
                tracing::error!(error = %e, "an open outbox study could not be read back");
                continue;
            }
            self.lock().insert(
                (entry.agreement.clone(), entry.study_token.clone()),
                OpenStudy::new(dir, entry),
            );
            n += 1;
        }
        n
    }

    /// The studies with something to send now: new instances since the last forward, or a
    /// quiet time passed (then `entry.complete` is set: the final offer; not while instances
    /// handed over in memory are still hashed or not yet moved). Each returned study is busy
    /// until [`OpenStudies::done`].
    pub fn due(&self) -> Vec<Forward> {
        let now = Instant::now();
        let mut out = Vec::new();
        for open in self.lock().values_mut() {
            open.promote();
            if open.busy || open.retry_at.is_some_and(|t| t > now) {
                continue;
            }
            let quiet = now.duration_since(open.last_arrival) >= self.quiet
                && open.incoming.is_empty()
                && open.unmoved.is_empty();
            let new = open.entry.instances.len() > open.forwarded;
            if !new && !quiet {
                continue;
            }
            open.busy = true;
            let mut entry = open.entry.clone();
            entry.complete = quiet;
            out.push(Forward {
                dir: open.dir.clone(),
                bodies: open.bodies_of(&entry.instances),
                entry,
                sent: open.forwarded,
            });
        }
        out
    }

    /// The outcome of a forward: `Ok` means the partner holds every instance the entry listed
    /// (a complete study leaves the open set; the memory of the confirmed instances is given
    /// back); `Err(retry_in)` waits before the next attempt (the memory of the instances the
    /// mover has copied is given back).
    pub fn done(&self, f: &Forward, result: Result<(), Duration>) {
        let mut map = self.lock();
        let key = (f.entry.agreement.clone(), f.entry.study_token.clone());
        let Some(open) = map.get_mut(&key) else {
            return;
        };
        open.busy = false;
        match result {
            Ok(()) => {
                open.retry_at = None;
                open.forwarded = open.forwarded.max(f.entry.instances.len());
                open.entry.receipted = open.forwarded;
                open.entry.attempts = f.entry.attempts;
                for i in &f.entry.instances {
                    open.bodies.remove(&i.file);
                }
                let more = open.entry.instances.len() > f.entry.instances.len();
                if f.entry.complete && !more {
                    map.remove(&key);
                }
            }
            Err(wait) => {
                open.retry_at = Some(Instant::now() + wait);
                open.entry.attempts = f.entry.attempts;
                let unmoved = &open.unmoved;
                open.bodies.retain(|file, _| unmoved.contains_key(file));
            }
        }
    }

    /// How long until the next study may need attention (at most the quiet time).
    pub fn next_check(&self) -> Duration {
        let now = Instant::now();
        self.lock()
            .values()
            .filter(|o| !o.busy)
            .map(|o| {
                let at = o.retry_at.unwrap_or(o.last_arrival + self.quiet);
                at.saturating_duration_since(now)
            })
            .min()
            .unwrap_or(self.quiet)
            .max(Duration::from_millis(5))
    }

    /// How many studies are still arriving or waiting to be completed.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow() -> IngestFlow {
        crate::ingest::test_flow(&crate::pseudonym::SiteKeys::from_bytes([7; 32], [9; 32]))
    }

    fn instance(name: &str, sha: u8) -> OutboxInstance {
        OutboxInstance {
            file: format!("{name}.dcm"),
            sha256: hex::encode([sha; 32]),
            size: 10,
            sop_instance_uid: name.into(),
        }
    }

    #[test]
    fn an_open_study_is_forwarded_as_it_arrives_and_completed_after_its_quiet_time() {
        let open = OpenStudies::new(Duration::from_millis(100));
        let f = flow();
        let dir = PathBuf::from("unused");
        open.arrived(
            &(&f).into(),
            "s",
            dir.clone(),
            instance("1", 1),
            Some("CT".into()),
            "p".into(),
        );
        let due = open.due();
        assert_eq!(due.len(), 1);
        assert!(!due[0].entry.complete, "not quiet yet: a partial offer");
        assert!(open.due().is_empty(), "busy while it is being sent");
        // A second instance arrives while the first is on its way.
        open.arrived(
            &(&f).into(),
            "s",
            dir.clone(),
            instance("2", 2),
            None,
            "p".into(),
        );
        open.done(&due[0], Ok(()));
        let due = open.due();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].entry.instances.len(), 2);
        let offer = due[0].offer();
        assert_eq!(
            offer.instances,
            vec![instance("2", 2)],
            "a partial offer lists only what the partner has not been sent"
        );
        let mut failed = offer.clone();
        failed.attempts = 1;
        failed.last_error = Some("unavailable".into());
        let kept = due[0].with_outcome_of(&failed);
        assert_eq!((kept.instances.len(), kept.attempts), (2, 1));
        open.done(&due[0], Ok(()));
        assert!(open.due().is_empty(), "nothing new, not quiet");
        // A failed attempt waits before the next one.
        std::thread::sleep(Duration::from_millis(120));
        let due = open.due();
        assert!(due[0].entry.complete, "quiet: the final offer");
        assert_eq!(
            due[0].offer().instances.len(),
            2,
            "the final offer lists all"
        );
        open.done(&due[0], Err(Duration::from_secs(60)));
        assert!(open.due().is_empty(), "waiting for the retry");
        assert_eq!(open.len(), 1);
        // The same instance again with other bytes replaces the first and is sent again.
        open.arrived(&(&f).into(), "s", dir, instance("1", 3), None, "p".into());
        let e = &open.lock()[&("a".to_string(), "s".to_string())].entry;
        assert_eq!(e.instances.len(), 2);
        assert_eq!(e.instances[1].sha256, hex::encode([3u8; 32]));
        assert_eq!(e.patient_tokens, vec!["p".to_string()]);
        assert_eq!(e.modalities, vec!["CT".to_string()]);
    }

    /// The hashing thread computes the SHA-256 of what is queued; once [`Hasher::QUEUED`] bytes
    /// wait for it, the next instance is hashed at once instead (memory stays bounded).
    #[test]
    fn the_hashing_queue_is_bounded_and_beyond_it_the_hash_is_computed_at_once() {
        use sha2::{Digest, Sha256};
        use std::sync::atomic::Ordering;
        let pool = Arc::new(Buffers::default());
        let plain = |n: u8| -> InstanceBody {
            Arc::new(Pooled {
                buf: vec![n; 100_000],
                pool: pool.clone(),
            })
        };
        let want = |n: u8| -> [u8; 32] { Sha256::digest(vec![n; 100_000]).into() };
        let hasher = Hasher::default();
        let open = Arc::new(OpenStudies::new(Duration::from_secs(1)));
        let queued = hasher.start(plain(1), Some(open.clone()));
        assert_eq!(queued.wait(), Some(want(1)));
        hasher.queued.store(Hasher::QUEUED, Ordering::Relaxed);
        let at_once = hasher.start(plain(2), None);
        assert_eq!(
            at_once.ready(),
            Some(Some(want(2))),
            "over the bound: at once"
        );
        hasher.queued.store(0, Ordering::Relaxed);
        assert_eq!(hasher.start(plain(3), None).wait(), Some(want(3)));
        // A job dropped unfinished (its thread gone) marks its hash failed: nobody waits.
        let cell = Arc::new(HashCell::default());
        drop(HashJob {
            plain: plain(4),
            cell: cell.clone(),
            wake: None,
        });
        assert_eq!(cell.wait(), None);
    }

    /// A mover over an empty log, with its outbox, vault and open studies.
    struct Rig {
        _dir: tempfile::TempDir,
        mover: Mover,
        outbox: Outbox,
        open: Arc<OpenStudies>,
        at_rest: crate::store::sealed::AtRest,
        vault: Arc<Vault>,
        forward: ForwardMemory,
    }

    fn rig(quiet: Duration) -> Rig {
        use crate::pseudonym::SiteKeys;
        use crate::store::sealed::AtRest;
        let dir = tempfile::tempdir().unwrap();
        let keys = SiteKeys::from_bytes([7; 32], [9; 32]);
        let at_rest = AtRest::new(&keys, true);
        let (wal, _) = Wal::open(&dir.path().join("wal"), at_rest.clone()).unwrap();
        wal.replayed().unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let vault = Arc::new(Vault::new(&keys, db.open_tree("vault").unwrap()));
        let outbox = Outbox::new(dir.path().join("outbox")).with_at_rest(at_rest.clone());
        let open = Arc::new(OpenStudies::new(quiet));
        let v = vault.clone();
        let use_vault = Arc::new(VaultUse {
            opener: Box::new(move || Ok(v.clone())),
            state: Mutex::new((None, 0)),
        });
        use_vault.acquire().unwrap();
        Rig {
            mover: Mover {
                wal: Arc::new(wal),
                outbox: outbox.clone(),
                open: open.clone(),
                vault: use_vault,
            },
            _dir: dir,
            outbox,
            open,
            at_rest,
            vault,
            forward: ForwardMemory::default(),
        }
    }

    fn bytes(n: u8) -> Vec<u8> {
        vec![n; 50_000]
    }

    impl Rig {
        fn meta(&self, n: u8) -> InstanceRecord {
            crate::ingest::wal::tests::record(n.into(), &bytes(n), &format!("DOE^{n}"))
        }

        /// The record the mover takes (as recovered: read whole).
        fn record(&self, n: u8) -> Record {
            let mut sealed = Vec::new();
            let mut w = self.at_rest.writer(&mut sealed).unwrap();
            std::io::Write::write_all(&mut w, &bytes(n)).unwrap();
            w.finish().unwrap();
            Record {
                location: Location {
                    slot: usize::MAX,
                    start: Default::default(),
                    end: Default::default(),
                },
                meta: self.meta(n),
                data: sealed,
            }
        }

        /// Hands instance `n` over in memory, as the association thread does once it is
        /// durable; false when the memory could not hold it (the file way).
        fn logged(&self, n: u8) -> bool {
            let mut buf = self.forward.buffer(60_000).unwrap_or_default();
            buf.extend_from_slice(&bytes(n));
            let (_, held) = self.forward.hold(buf, &Arc::new(Buffers::default()));
            let Some(body) = held else { return false };
            let meta = self.meta(n);
            let mut d = [0u8; 32];
            hex::decode_to_slice(meta.sha256.as_deref().unwrap(), &mut d).unwrap();
            let h = self
                .forward
                .hand_over(
                    &self.open,
                    &self.outbox,
                    &flow(),
                    &meta,
                    body,
                    Some(HashCell::set_to(Some(d))),
                )
                .unwrap();
            self.open.logged(h);
            true
        }

        fn files(&self) -> Vec<String> {
            let mut f: Vec<String> = std::fs::read_dir(self.outbox.study_dir("a", "study-token"))
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().to_string())
                .filter(|n| n.ends_with(".dcm"))
                .collect();
            f.sort();
            f
        }
    }

    /// Instances handed over in memory are offered from there, before the mover has taken them
    /// from the log; once the partner's receipt confirms them, the mover makes no outbox copy
    /// (their vault entries are still recorded) and their memory is given back. The final
    /// offer waits for the mover; it lists them as receipted.
    #[test]
    fn an_instance_forwarded_from_memory_and_receipted_gets_no_outbox_copy() {
        let rig = rig(Duration::from_millis(200));
        assert!(rig.logged(0) && rig.logged(1));
        let due = rig.open.due();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].entry.instances.len(), 2);
        assert!(!due[0].entry.complete);
        let bodies = due[0].offer_bodies();
        assert_eq!(bodies.len(), 2);
        for (n, b) in bodies.iter().enumerate() {
            assert_eq!((**b.as_ref().expect("in memory")).as_ref(), bytes(n as u8));
        }
        assert!(rig.forward.budget.used() > 0);
        rig.open.done(&due[0], Ok(()));
        drop((due, bodies));
        assert_eq!(rig.forward.budget.used(), 0, "confirmed: memory given back");
        // Quiet, but the mover has not taken them from the log: no final offer yet.
        std::thread::sleep(Duration::from_millis(250));
        assert!(
            rig.open.due().is_empty(),
            "the final offer waits for the mover"
        );
        rig.mover.apply(vec![rig.record(0), rig.record(1)]).unwrap();
        assert!(rig.files().is_empty(), "receipted: no outbox copy");
        for n in 0..2 {
            let entry = rig
                .vault
                .reidentify("a", &format!("tok{n}"))
                .unwrap()
                .unwrap();
            assert_eq!(entry.original, format!("DOE^{n}"));
        }
        let due = rig.open.due();
        assert_eq!(due.len(), 1);
        assert!(due[0].entry.complete, "moved and quiet: the final offer");
        assert_eq!(due[0].entry.instances.len(), 2);
        assert_eq!(due[0].entry.receipted, 2);
    }

    /// The partner down: the failed offer keeps the instances in memory only until the mover
    /// has copied them into the outbox; the retry streams them from their files.
    #[test]
    fn with_the_partner_down_everything_is_copied_and_offered_later_from_files() {
        let rig = rig(Duration::from_secs(60));
        assert!(rig.logged(0));
        let due = rig.open.due();
        assert!(due[0].bodies[0].is_some());
        rig.open.done(&due[0], Err(Duration::from_millis(1)));
        drop(due);
        assert!(rig.forward.budget.used() > 0, "not in the outbox yet: kept");
        rig.mover.apply(vec![rig.record(0)]).unwrap();
        assert_eq!(rig.files(), vec!["0.dcm".to_string()]);
        let file = rig.outbox.study_dir("a", "study-token").join("0.dcm");
        assert_eq!(rig.at_rest.read(&file).unwrap(), bytes(0));
        assert_eq!(rig.forward.budget.used(), 0, "copied: memory given back");
        std::thread::sleep(Duration::from_millis(5));
        let due = rig.open.due();
        assert_eq!(due.len(), 1, "retried");
        assert_eq!(due[0].entry.instances.len(), 1);
        assert!(due[0].offer_bodies()[0].is_none(), "from its file");
        assert_eq!(due[0].entry.receipted, 0);
    }

    /// Beyond the memory budget an instance goes the file way: the mover copies it and lists
    /// it, and it is offered from its file.
    #[test]
    fn beyond_the_memory_budget_an_instance_goes_through_the_outbox() {
        let rig = rig(Duration::from_secs(60));
        let full = rig
            .forward
            .budget
            .hold(Vec::with_capacity(FORWARD_MEMORY as usize))
            .unwrap();
        assert!(!rig.logged(0), "no room: not held");
        assert!(rig.open.due().is_empty(), "nothing handed over");
        rig.mover.apply(vec![rig.record(0)]).unwrap();
        assert_eq!(rig.files(), vec!["0.dcm".to_string()]);
        let due = rig.open.due();
        assert_eq!(due[0].entry.instances.len(), 1);
        assert!(due[0].offer_bodies()[0].is_none());
        drop(full);
        assert!(rig.logged(1), "room again: held");
    }

    /// A listener's ingest with `wal` as its log (the records it `found` are moved first), no
    /// routes, and no partner to forward to.
    fn logged_ingest(
        outbox: &Outbox,
        vault: &Arc<Vault>,
        audit: &Arc<AuditLog>,
        open: Arc<OpenStudies>,
        wal: Wal,
        found: Vec<Record>,
    ) -> DimseIngest {
        let v = vault.clone();
        DimseIngest::new(
            Vec::new(),
            Box::new(|_| Err(super::super::IngestError::NoPeer("c".into()))),
            outbox.clone(),
            Box::new(move || Ok(v.clone())),
            audit.clone(),
            open,
            Box::new(|_, _, _| {}),
        )
        .with_log(wal, found)
        .unwrap()
    }

    /// The listener going away waits for its mover: a record handed to the mover just before is
    /// in the outbox when the drop returns, and nothing writes into the data folder afterwards
    /// (a unit test's temporary folder was left behind, recreated around an ingest log slot and
    /// outbox files, when its removal raced a mover still at work).
    #[test]
    fn dropping_the_listener_waits_for_its_mover_to_finish() {
        use crate::pseudonym::SiteKeys;
        use crate::store::sealed::AtRest;

        let dir = tempfile::tempdir().unwrap();
        let keys = SiteKeys::from_bytes([7; 32], [9; 32]);
        let at_rest = AtRest::new(&keys, true);
        let db = sled::Config::new().temporary(true).open().unwrap();
        let vault = Arc::new(Vault::new(&keys, db.open_tree("vault").unwrap()));
        let outbox = Outbox::new(dir.path().join("outbox")).with_at_rest(at_rest.clone());
        let audit = Arc::new(AuditLog::open(&dir.path().join("audit.log")).unwrap());
        let (wal, found) = Wal::open(&dir.path().join("wal"), at_rest.clone()).unwrap();
        let open = Arc::new(OpenStudies::new(Duration::from_secs(60)));
        let ingest = logged_ingest(&outbox, &vault, &audit, open, wal, found);
        // As `log_instance` does: appended durably, then handed to the mover.
        let log = ingest.log.as_ref().unwrap();
        let bytes = vec![5u8; 70_000];
        let meta = crate::ingest::wal::tests::record(5, &bytes, "DOE^5");
        let mut rec = log.wal.seal(&meta, &bytes).unwrap();
        ingest.vault.acquire().unwrap();
        let mut tries = 0;
        while log
            .wal
            .append(&mut rec, |at| {
                *log.pending.0.lock().unwrap() += 1;
                log.to_mover.lock().unwrap().send((at, None)).unwrap();
            })
            .unwrap()
            .is_none()
        {
            tries += 1;
            assert!(tries < 1000, "no slot");
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(ingest);
        let file = outbox.study_dir("a", "study-token").join("5.dcm");
        assert_eq!(
            at_rest.read(&file).unwrap(),
            bytes,
            "moved before the drop returned"
        );
    }

    /// Instances acknowledged through the log and not moved when the node stopped are moved at
    /// the next start: into the outbox (sealed, named, listed in an open study) with their vault
    /// entries; moving the same records twice (a crash after the move, before the checkpoint)
    /// changes nothing; afterwards the log holds nothing to move.
    #[test]
    fn logged_instances_are_moved_into_the_outbox_at_start_once() {
        use crate::pseudonym::SiteKeys;
        use crate::store::sealed::AtRest;
        use sha2::{Digest, Sha256};

        let dir = tempfile::tempdir().unwrap();
        let keys = SiteKeys::from_bytes([7; 32], [9; 32]);
        let at_rest = AtRest::new(&keys, true);
        let wal_dir = dir.path().join("wal");
        let record = |n: u8, bytes: &[u8]| {
            crate::ingest::wal::tests::record(n.into(), bytes, &format!("DOE^{n}"))
        };
        let bytes = |n: u8| vec![n; 70_000];
        {
            let wal = crate::ingest::wal::tests::ready_log(&wal_dir, at_rest.clone());
            for n in 0..2u8 {
                let mut rec = wal.seal(&record(n, &bytes(n)), &bytes(n)).unwrap();
                let mut tries = 0;
                while wal.append(&mut rec, |_| {}).unwrap().is_none() {
                    tries += 1;
                    assert!(tries < 1000, "no slot");
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        let db = sled::Config::new().temporary(true).open().unwrap();
        let vault = Arc::new(Vault::new(&keys, db.open_tree("vault").unwrap()));
        let outbox = Outbox::new(dir.path().join("outbox")).with_at_rest(at_rest.clone());
        let audit = Arc::new(AuditLog::open(&dir.path().join("audit.log")).unwrap());
        let start = |open: Arc<OpenStudies>| {
            let (wal, found) = Wal::open(&wal_dir, at_rest.clone()).unwrap();
            let n = found.len();
            (n, logged_ingest(&outbox, &vault, &audit, open, wal, found))
        };
        let open = Arc::new(OpenStudies::new(Duration::from_secs(60)));
        let (found, ingest) = start(open.clone());
        assert_eq!(found, 2);
        let study = outbox.study_dir("a", "study-token");
        for n in 0..2u8 {
            let file = study.join(format!("{n}.dcm"));
            assert!(AtRest::key_id_of(&file).unwrap().is_some(), "sealed");
            assert_eq!(at_rest.read(&file).unwrap(), bytes(n));
            let entry = vault.reidentify("a", &format!("tok{n}")).unwrap().unwrap();
            assert_eq!(entry.original, format!("DOE^{n}"));
        }
        let due = open.due();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].entry.instances.len(), 2);
        assert_eq!(
            due[0].entry.instances[0].sha256,
            hex::encode(Sha256::digest(bytes(0)))
        );
        drop(ingest);

        // Moved and checkpointed: a restart finds nothing more to move.
        let (found, _ingest) = start(Arc::new(OpenStudies::new(Duration::from_secs(60))));
        assert_eq!(found, 0);

        // The same records moved again change nothing (same names, bytes and vault records).
        let mut again = Vec::new();
        for n in 0..2u8 {
            let d = bytes(n);
            let mut sealed = Vec::new();
            let mut w = at_rest.writer(&mut sealed).unwrap();
            std::io::Write::write_all(&mut w, &d).unwrap();
            w.finish().unwrap();
            again.push(Record {
                location: Location {
                    slot: usize::MAX,
                    start: Default::default(),
                    end: Default::default(),
                },
                meta: record(n, &d),
                data: sealed,
            });
        }
        let (wal, _) = Wal::open(&dir.path().join("wal2"), at_rest.clone()).unwrap();
        let open = Arc::new(OpenStudies::new(Duration::from_secs(60)));
        let _ingest = logged_ingest(&outbox, &vault, &audit, open.clone(), wal, again);
        let files: Vec<_> = std::fs::read_dir(&study)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".dcm"))
            .collect();
        assert_eq!(files.len(), 2);
        assert_eq!(open.due()[0].entry.instances.len(), 2);
    }
}
