//! Delivery of received studies to the site's own PACS: a C-STORE SCU fed by the store's durable
//! delivery queue.
//!
//! Owns: the worker that a serving node with `[dicom.deliver]` starts ([`PacsDelivery::start`]).
//! It takes the due entries of the queue (oldest first), opens one association per batch with a
//! presentation context for each (SOP class, transfer syntax) pair the batch holds — read from
//! each file's own meta information, so compressed instances are proposed and sent exactly as
//! stored, never transcoded — and sends each instance by C-STORE, streaming the data set from its
//! blob. Outcomes:
//! - success, or a warning status: delivered, removed from the queue (warnings are logged);
//! - a failure status, or a presentation context the PACS refused: the instance stays queued and
//!   is retried with exponential backoff, and after `max_attempts` such answers it is marked
//!   failed with the reason (kept in the queue, and tried again when the node next starts);
//! - the PACS unreachable, the association rejected or broken: nothing is charged to the
//!   instances (nothing is ever dropped because the PACS is down); the worker backs off
//!   exponentially and tries again.
//!
//! Each association's result is audited per study (tokens and counts, never PHI), with the
//! agreement, flow and purpose the study was received under (found through the agreements in
//! force and the store's record of the study, [`PacsDelivery::with_agreements`]).
//!
//! Does not own: the queue itself and its durability (`store::delivery`), what is received
//! (`federation`), or DICOM input (`ingest`).

use std::collections::BTreeMap;
use std::io::Read;

use crate::store::sealed::{AtRest, SealError};
use crate::store::Store as _;
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dicom_ul::pdu::{PDataValue, PDataValueType, Pdu};
use dicom_ul::{ClientAssociation, ClientAssociationOptions};
use tokio::sync::watch;

use crate::audit::{AuditLog, Detail, Event};
use crate::config::DeliverConfig;
use crate::dsa::AgreementSet;
use crate::store::delivery::{now_ms, DeliveryQueue, DeliveryState, QueueKey, QueuedInstance};
use crate::store::{LocalStore, StoreError, StudyKey};

/// Most presentation contexts one association may propose (odd ids 1 to 255).
const MAX_CONTEXTS: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    #[error("the PACS `{ae}` at {address} cannot be reached: {reason}")]
    Unreachable {
        ae: String,
        address: String,
        reason: String,
    },
    #[error(
        "the PACS `{ae}` at {address} rejected the association: {reason}\n  \
         help: check [dicom.deliver] ae_title and calling_ae_title against the PACS's configuration"
    )]
    Rejected {
        ae: String,
        address: String,
        reason: String,
    },
    #[error("the association with the PACS broke: {0}")]
    Broken(String),
    #[error(
        "the PACS refused the presentation context for SOP class {sop_class} in transfer syntax \
         {transfer_syntax}; instances are sent as stored, never transcoded"
    )]
    ContextRefused {
        sop_class: String,
        transfer_syntax: String,
    },
    #[error("the PACS answered C-STORE with failure status 0x{status:04X} ({meaning}){comment}")]
    Status {
        status: u16,
        meaning: &'static str,
        comment: String,
    },
    #[error("the stored instance cannot be sent: {0}")]
    Unreadable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl DeliverError {
    /// True when the error is about the association as a whole (the PACS down, refusing us, or
    /// the connection breaking), not about one instance.
    pub fn is_association_level(&self) -> bool {
        matches!(
            self,
            DeliverError::Unreachable { .. }
                | DeliverError::Rejected { .. }
                | DeliverError::Broken(_)
        )
    }
}

/// What a C-STORE response status means (PS3.4 Annex B.2.3, PS3.7 Annex C).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreStatus {
    Success,
    Warning(&'static str),
    Failure(&'static str),
}

/// Classifies a C-STORE response status.
pub fn classify_status(status: u16) -> StoreStatus {
    use StoreStatus::*;
    match status {
        0x0000 => Success,
        0xB000 => Warning("coercion of data elements"),
        0xB007 => Warning("data set does not match SOP class"),
        0xB006 => Warning("elements discarded"),
        0x0001 | 0x0107 | 0x0116 => Warning("attribute list or value warning"),
        // Some archives answer a second copy of an instance they hold with this: it is there.
        0x0111 => Warning("duplicate SOP instance: the PACS already holds it"),
        0xA700..=0xA7FF => Failure("refused: out of resources"),
        0xA900..=0xA9FF => Failure("error: data set does not match SOP class"),
        0xC000..=0xCFFF => Failure("error: cannot understand"),
        0x0122 => Failure("refused: SOP class not supported"),
        0x0124 => Failure("refused: not authorized"),
        0x0210 => Failure("duplicate invocation"),
        0x0211 => Failure("unrecognized operation"),
        0x0212 => Failure("mistyped argument"),
        0x0213 => Failure("resource limitation"),
        0xFE00 => Failure("cancelled"),
        _ => Failure("unknown status"),
    }
}

/// The text of an error and its sources (dicom-ul's errors keep the cause in their source).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// One queued instance, opened far enough to know how to propose it.
struct Prepared {
    key: QueueKey,
    entry: QueuedInstance,
    path: PathBuf,
    at_rest: AtRest,
    sop_class: String,
    transfer_syntax: String,
}

/// What one association did with a batch.
#[derive(Default)]
struct BatchOutcome {
    /// Delivered (with the warning, if the PACS gave one).
    delivered: Vec<(QueueKey, QueuedInstance, Option<String>)>,
    /// Refused by the PACS (counts as an attempt).
    refused: Vec<(QueueKey, QueuedInstance, String)>,
    /// Cannot be sent at all (failed at once).
    unreadable: Vec<(QueueKey, QueuedInstance, String)>,
    /// Why the association could not be used, or stopped.
    association: Option<DeliverError>,
}

/// A stored instance's data set, read (and, when sealed, decrypted and authenticated) as it is
/// sent.
type DataSetReader = Box<dyn Read + Send>;

/// Opens a stored instance through `at_rest`: its meta information, and a reader positioned at
/// its data set.
fn open_instance(
    path: &std::path::Path,
    at_rest: &AtRest,
) -> Result<(dicom_object::meta::FileMetaTable, DataSetReader), DeliverError> {
    let unreadable = |e: &dyn std::fmt::Display| DeliverError::Unreadable(format!("{e}"));
    let mut f = at_rest.open(path).map_err(|e| unreadable(&e))?;
    let mut head = Vec::with_capacity(132);
    (&mut f)
        .take(132)
        .read_to_end(&mut head)
        .map_err(|e| unreadable(&SealError::from_io(path, e)))?;
    // The reader goes on from `DICM`, which the meta table reads itself.
    let start = if head.len() == 132 && &head[128..132] == b"DICM" {
        128
    } else if head.len() >= 4 && &head[..4] == b"DICM" {
        0
    } else {
        return Err(DeliverError::Unreadable(
            "not a DICOM file (no `DICM` prefix)".into(),
        ));
    };
    let mut reader: DataSetReader = Box::new(std::io::Cursor::new(head.split_off(start)).chain(f));
    let meta = dicom_object::meta::FileMetaTable::from_reader(&mut reader)
        .map_err(|e| DeliverError::Unreadable(format!("file meta information: {e}")))?;
    Ok((meta, reader))
}

/// The C-STORE-RQ command set (implicit VR little endian, with its group length).
fn store_request(sop_class: &str, sop_instance: &str, message_id: u16) -> Vec<u8> {
    use dicom_core::{DataElement, PrimitiveValue, VR};
    use dicom_dictionary_std::tags;
    use dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN;
    let cmd = dicom_object::InMemDicomObject::command_from_element_iter([
        DataElement::new(
            tags::AFFECTED_SOP_CLASS_UID,
            VR::UI,
            PrimitiveValue::from(sop_class),
        ),
        DataElement::new(tags::COMMAND_FIELD, VR::US, PrimitiveValue::from(0x0001u16)),
        DataElement::new(tags::MESSAGE_ID, VR::US, PrimitiveValue::from(message_id)),
        DataElement::new(tags::PRIORITY, VR::US, PrimitiveValue::from(0x0000u16)),
        DataElement::new(
            tags::COMMAND_DATA_SET_TYPE,
            VR::US,
            PrimitiveValue::from(0x0000u16),
        ),
        DataElement::new(
            tags::AFFECTED_SOP_INSTANCE_UID,
            VR::UI,
            PrimitiveValue::from(sop_instance),
        ),
    ]);
    let mut out = Vec::with_capacity(160);
    cmd.write_dataset_with_ts(&mut out, &IMPLICIT_VR_LITTLE_ENDIAN.erased())
        .expect("a command set of fixed elements encodes");
    out
}

/// Reads the C-STORE-RSP to `message_id`: (status, error comment).
fn read_response(
    assoc: &mut ClientAssociation<TcpStream>,
    message_id: u16,
) -> Result<(u16, Option<String>), DeliverError> {
    use dicom_dictionary_std::tags;
    use dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN;
    let mut command = Vec::new();
    loop {
        match assoc
            .receive()
            .map_err(|e| DeliverError::Broken(chain(&e)))?
        {
            Pdu::PData { data } => {
                let mut last = false;
                for v in data {
                    if v.value_type == PDataValueType::Command {
                        command.extend_from_slice(&v.data);
                        last |= v.is_last;
                    }
                }
                if last {
                    break;
                }
            }
            Pdu::AbortRQ { source } => {
                return Err(DeliverError::Broken(format!(
                    "the PACS aborted the association ({source:?})"
                )))
            }
            other => {
                return Err(DeliverError::Broken(format!(
                    "unexpected PDU instead of a C-STORE response: {}",
                    pdu_name(&other)
                )))
            }
        }
    }
    let obj = dicom_object::InMemDicomObject::read_dataset_with_ts(
        &command[..],
        &IMPLICIT_VR_LITTLE_ENDIAN.erased(),
    )
    .map_err(|e| DeliverError::Broken(format!("unreadable C-STORE response: {e}")))?;
    let int = |tag| obj.element(tag).ok().and_then(|e| e.to_int::<u16>().ok());
    let status = int(tags::STATUS)
        .ok_or_else(|| DeliverError::Broken("C-STORE response without a status".into()))?;
    if int(tags::MESSAGE_ID_BEING_RESPONDED_TO) != Some(message_id) {
        return Err(DeliverError::Broken(format!(
            "C-STORE response does not answer message {message_id}"
        )));
    }
    let comment = obj
        .element(tags::ERROR_COMMENT)
        .ok()
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim().chars().take(64).collect::<String>())
        .filter(|s| !s.is_empty());
    Ok((status, comment))
}

fn pdu_name(p: &Pdu) -> &'static str {
    match p {
        Pdu::ReleaseRQ => "A-RELEASE-RQ",
        Pdu::ReleaseRP => "A-RELEASE-RP",
        Pdu::AssociationRQ(_) => "A-ASSOCIATE-RQ",
        Pdu::AssociationAC(_) => "A-ASSOCIATE-AC",
        Pdu::AssociationRJ(_) => "A-ASSOCIATE-RJ",
        _ => "unknown PDU",
    }
}

/// Sends one instance by C-STORE on context `pc_id`; returns the response (status, comment).
/// The data set streams from the blob in PDUs of the PACS's maximum length.
fn c_store(
    assoc: &mut ClientAssociation<TcpStream>,
    pc_id: u8,
    message_id: u16,
    item: &Prepared,
) -> Result<(u16, Option<String>), DeliverError> {
    // Open before the command goes out: once it is sent, the data set must follow.
    let (_, mut dataset) = open_instance(&item.path, &item.at_rest)?;
    let command = store_request(&item.sop_class, &item.entry.sop_instance_uid, message_id);
    assoc
        .send(&Pdu::PData {
            data: vec![PDataValue {
                presentation_context_id: pc_id,
                value_type: PDataValueType::Command,
                is_last: true,
                data: command,
            }],
        })
        .map_err(|e| DeliverError::Broken(chain(&e)))?;
    {
        let mut writer = assoc.send_pdata(pc_id);
        std::io::copy(&mut dataset, &mut writer).map_err(|e| {
            // A sealed blob that fails authentication mid-way is unreadable (it will not get
            // better by retrying); anything else broke the association.
            if e.get_ref().is_some_and(|i| i.is::<SealError>()) {
                DeliverError::Unreadable(SealError::from_io(&item.path, e).to_string())
            } else {
                DeliverError::Broken(format!("sending the data set: {e}"))
            }
        })?;
        writer
            .finish()
            .map_err(|e| DeliverError::Broken(format!("sending the data set: {e}")))?;
    }
    read_response(assoc, message_id)
}

/// The delivery of received instances to the site's PACS.
pub struct PacsDelivery {
    target: DeliverConfig,
    calling_ae: String,
    site_id: String,
    store: Arc<LocalStore>,
    queue: DeliveryQueue,
    audit: Arc<AuditLog>,
    /// The agreements in force (as reloaded), to name the flow and purpose in the audit.
    agreements: Option<watch::Receiver<Arc<AgreementSet>>>,
}

/// The flow a delivered study was received under, and that flow's purposes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct FlowOfStudy {
    flow: Option<String>,
    /// The flow's purposes of use, comma-separated when it allows several.
    purpose: String,
}

/// A running delivery worker; [`DeliveryWorker::stop`] lets the association in progress finish.
pub struct DeliveryWorker {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl DeliveryWorker {
    /// Stops the worker after the batch in progress (if any) and waits for it.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

impl PacsDelivery {
    /// Turns on queueing of received instances for the PACS in `store` and prepares the worker.
    pub fn new(
        target: &DeliverConfig,
        site_id: &str,
        store: Arc<LocalStore>,
        audit: Arc<AuditLog>,
    ) -> Result<PacsDelivery, String> {
        target.validate(site_id)?;
        let queue = store.enable_pacs_delivery();
        Ok(PacsDelivery {
            calling_ae: target.calling_ae(site_id),
            target: target.clone(),
            site_id: site_id.to_string(),
            store,
            queue,
            audit,
            agreements: None,
        })
    }

    /// The agreements in force, so that each `deliver` entry names the flow the study was
    /// received under and its purpose (without them the entry names the agreement only).
    pub fn with_agreements(mut self, agreements: watch::Receiver<Arc<AgreementSet>>) -> Self {
        self.agreements = Some(agreements);
        self
    }

    /// The flow of `agreement` from `from_site` to this site under which the store holds
    /// `study` (a flow with no record of it still counts when it is the only candidate: the
    /// study's record may have gone with retention), and the flow's purposes.
    fn flow_of(&self, agreement: &str, from_site: &str, study: &str) -> FlowOfStudy {
        let Some(set) = self.agreements.as_ref().map(|a| a.borrow().clone()) else {
            return FlowOfStudy::default();
        };
        let Some(a) = set.agreements.get(agreement) else {
            return FlowOfStudy::default();
        };
        let candidates: Vec<_> = a
            .flows
            .iter()
            .filter(|f| f.from == from_site && f.to == self.site_id)
            .collect();
        let held = |f: &&&crate::dsa::Flow| {
            self.store
                .study(&StudyKey::new(agreement, &f.name, from_site, study))
                .is_ok_and(|r| r.is_some())
        };
        let found = candidates
            .iter()
            .find(held)
            .or(candidates.first().filter(|_| candidates.len() == 1));
        match found {
            Some(f) => FlowOfStudy {
                flow: Some(f.name.clone()),
                purpose: f
                    .purposes
                    .iter()
                    .map(|p| p.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            },
            None => FlowOfStudy::default(),
        }
    }

    /// Starts the worker on the current tokio runtime.
    pub fn start(self) -> DeliveryWorker {
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(Arc::new(self).run(stop_rx));
        DeliveryWorker { stop, task }
    }

    /// Wait after `failures` consecutive failures: the initial wait doubling, capped.
    pub fn backoff(&self, failures: u32) -> Duration {
        let ms = self
            .target
            .retry_initial_ms
            .saturating_mul(1u64 << failures.saturating_sub(1).min(30));
        Duration::from_millis(ms.min(self.target.retry_max_ms))
    }

    async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        tracing::info!(pacs = %self.target.ae_title, address = %self.target.address, "delivery to the PACS started");
        // Instances marked failed get one more round per start: an operator who fixed the
        // PACS's configuration (an AE title, an accepted transfer syntax) restarts the node.
        match self.queue.retry_failed() {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                instances = n,
                "instances that failed delivery before are tried again"
            ),
            Err(e) => tracing::error!(error = %e, "the delivery queue cannot be read"),
        }
        let mut failures = 0u32;
        while !*stop.borrow() {
            let wait = match self.queue.due(now_ms(), self.target.batch_size) {
                Ok(batch) if batch.is_empty() => self.idle_wait(),
                Ok(batch) => {
                    let me = self.clone();
                    match tokio::task::spawn_blocking(move || me.deliver_batch(batch)).await {
                        Ok(true) => {
                            failures = 0;
                            Duration::ZERO
                        }
                        Ok(false) => {
                            failures += 1;
                            self.backoff(failures)
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "PACS delivery batch panicked");
                            failures += 1;
                            self.backoff(failures)
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "the delivery queue cannot be read");
                    failures += 1;
                    self.backoff(failures)
                }
            };
            if wait.is_zero() {
                continue;
            }
            // New arrivals wake an idle worker at once, but not one backing off from a PACS that
            // is down (that would turn every arrival into a connection attempt).
            let woken = self.queue.woken();
            let backing_off = failures > 0;
            tokio::select! {
                _ = stop.changed() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = woken.notified(), if !backing_off => {}
            }
        }
        tracing::info!("delivery to the PACS stopped");
    }

    /// How long to sleep with nothing due: until the next retry is due, at most a second.
    fn idle_wait(&self) -> Duration {
        let cap = Duration::from_secs(1);
        match self.queue.next_due() {
            Ok(Some(at)) => Duration::from_millis(at.saturating_sub(now_ms()))
                .clamp(Duration::from_millis(10), cap),
            _ => cap,
        }
    }

    /// Delivers one batch over one association and records the outcome; false when the
    /// association could not be used (the caller backs off).
    fn deliver_batch(&self, batch: Vec<(QueueKey, QueuedInstance)>) -> bool {
        let started = std::time::Instant::now();
        let outcome = self.send_batch(batch);
        let ok = outcome.association.is_none();
        let n = outcome.delivered.len();
        if let Err(e) = self.settle(outcome) {
            tracing::error!(error = %e, "delivery outcomes could not be recorded; they are retried");
            return false;
        }
        if n > 0 {
            tracing::info!(instances = n, ms = started.elapsed().as_millis() as u64, pacs = %self.target.ae_title, "instances delivered to the PACS");
        }
        ok
    }

    /// Opens the batch's instances, proposes their contexts and sends them.
    fn send_batch(&self, batch: Vec<(QueueKey, QueuedInstance)>) -> BatchOutcome {
        let mut out = BatchOutcome::default();
        let mut items = Vec::new();
        let mut contexts: Vec<(String, String)> = Vec::new();
        for (key, entry) in batch {
            match self.prepare(key, entry.clone()) {
                Ok(p) => {
                    let pair = (p.sop_class.clone(), p.transfer_syntax.clone());
                    if !contexts.contains(&pair) {
                        if contexts.len() == MAX_CONTEXTS {
                            continue; // left for the next association
                        }
                        contexts.push(pair);
                    }
                    items.push(p);
                }
                Err(e) => out.unreadable.push((key, entry, e.to_string())),
            }
        }
        if items.is_empty() {
            return out;
        }
        let mut assoc = match self.associate(&contexts) {
            Ok(a) => a,
            Err(e @ DeliverError::ContextRefused { .. }) => {
                for p in items {
                    let why = DeliverError::ContextRefused {
                        sop_class: p.sop_class.clone(),
                        transfer_syntax: p.transfer_syntax.clone(),
                    };
                    out.refused.push((p.key, p.entry, why.to_string()));
                }
                tracing::warn!(error = %e, "the PACS accepted none of the proposed presentation contexts");
                return out;
            }
            Err(e) => {
                out.association = Some(e);
                return out;
            }
        };
        self.store_all(&mut assoc, items, &mut out);
        if out.association.is_none() {
            if let Err(e) = assoc.release() {
                tracing::debug!(error = %chain(&e), "PACS association release");
            }
        } else {
            let _ = assoc.abort();
        }
        out
    }

    fn prepare(&self, key: QueueKey, entry: QueuedInstance) -> Result<Prepared, DeliverError> {
        let mut sha = [0u8; 32];
        hex::decode_to_slice(&entry.sha256, &mut sha)
            .map_err(|_| DeliverError::Unreadable("queue entry has a malformed SHA-256".into()))?;
        let path = self.store.instance_path(&sha);
        let (meta, _) = open_instance(&path, &self.store.at_rest())?;
        if meta.media_storage_sop_instance_uid() != entry.sop_instance_uid {
            return Err(DeliverError::Unreadable(
                "the stored file's SOP Instance UID differs from the queued one".into(),
            ));
        }
        Ok(Prepared {
            sop_class: meta.media_storage_sop_class_uid().to_string(),
            transfer_syntax: meta.transfer_syntax().to_string(),
            key,
            entry,
            path,
            at_rest: self.store.at_rest(),
        })
    }

    fn associate(
        &self,
        contexts: &[(String, String)],
    ) -> Result<ClientAssociation<TcpStream>, DeliverError> {
        let t = &self.target;
        let timeout = Duration::from_millis(t.timeout_ms);
        let mut options = ClientAssociationOptions::new()
            .calling_ae_title(self.calling_ae.as_str())
            .called_ae_title(t.ae_title.as_str())
            .max_pdu_length(t.max_pdu_length)
            .connection_timeout(timeout)
            .read_timeout(timeout)
            .write_timeout(timeout);
        for (sop_class, ts) in contexts {
            options = options.with_presentation_context(sop_class.as_str(), vec![ts.as_str()]);
        }
        let assoc = options.establish(t.address.as_str()).map_err(|e| {
            use dicom_ul::association::Error as E;
            match e {
                E::Rejected { association_rj, .. } => DeliverError::Rejected {
                    ae: t.ae_title.clone(),
                    address: t.address.clone(),
                    reason: format!("{} ({:?})", association_rj.source, association_rj.result),
                },
                E::NoAcceptedPresentationContexts { .. } => DeliverError::ContextRefused {
                    sop_class: "(all proposed)".into(),
                    transfer_syntax: "(as stored)".into(),
                },
                other => DeliverError::Unreachable {
                    ae: t.ae_title.clone(),
                    address: t.address.clone(),
                    reason: chain(&other),
                },
            }
        })?;
        let mut assoc = assoc;
        // Without TCP_NODELAY, small command PDUs wait for delayed ACKs (tens of ms each).
        if let Err(e) = assoc.inner_stream().set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        Ok(assoc)
    }

    /// C-STOREs every item on its negotiated context, sorting the outcomes into `out`.
    fn store_all(
        &self,
        assoc: &mut ClientAssociation<TcpStream>,
        items: Vec<Prepared>,
        out: &mut BatchOutcome,
    ) {
        let accepted: Vec<(u8, String, String)> = assoc
            .presentation_contexts()
            .iter()
            .map(|pc| {
                (
                    pc.id,
                    pc.abstract_syntax.trim_end_matches('\0').to_string(),
                    pc.transfer_syntax.trim_end_matches('\0').to_string(),
                )
            })
            .collect();
        let mut message_id: u16 = 0;
        for item in items {
            let Some((pc_id, _, _)) = accepted
                .iter()
                .find(|(_, a, ts)| *a == item.sop_class && *ts == item.transfer_syntax)
            else {
                let why = DeliverError::ContextRefused {
                    sop_class: item.sop_class.clone(),
                    transfer_syntax: item.transfer_syntax.clone(),
                };
                out.refused.push((item.key, item.entry, why.to_string()));
                continue;
            };
            message_id = message_id.wrapping_add(1).max(1);
            match c_store(assoc, *pc_id, message_id, &item) {
                Ok((status, comment)) => {
                    let comment = comment.map(|c| format!("; {c}")).unwrap_or_default();
                    match classify_status(status) {
                        StoreStatus::Success => out.delivered.push((item.key, item.entry, None)),
                        StoreStatus::Warning(w) => out.delivered.push((
                            item.key,
                            item.entry,
                            Some(format!("warning 0x{status:04X}: {w}{comment}")),
                        )),
                        StoreStatus::Failure(meaning) => {
                            let why = DeliverError::Status {
                                status,
                                meaning,
                                comment,
                            };
                            out.refused.push((item.key, item.entry, why.to_string()));
                        }
                    }
                }
                Err(e @ DeliverError::Unreadable(_)) => {
                    out.unreadable.push((item.key, item.entry, e.to_string()))
                }
                Err(e) => {
                    // The instance in flight may be what broke the association: it is charged
                    // one attempt; the rest of the batch is not.
                    out.refused.push((item.key, item.entry, e.to_string()));
                    out.association = Some(e);
                    return;
                }
            }
        }
    }

    /// Records a batch's outcome in the queue (one flush) and the audit log.
    fn settle(&self, outcome: BatchOutcome) -> Result<(), StoreError> {
        let now = now_ms();
        let mut updated = Vec::new();
        let mut failed_now = Vec::new();
        for (key, mut e, why) in outcome.refused {
            e.attempts += 1;
            e.last_error = Some(why.clone());
            if e.attempts >= self.target.max_attempts {
                e.state = DeliveryState::Failed;
                failed_now.push((e.clone(), why));
            } else {
                e.next_attempt = now + self.backoff(e.attempts).as_millis() as u64;
            }
            updated.push((key, e));
        }
        for (key, mut e, why) in outcome.unreadable {
            e.attempts += 1;
            e.last_error = Some(why.clone());
            e.state = DeliveryState::Failed;
            failed_now.push((e.clone(), why));
            updated.push((key, e));
        }
        let delivered: Vec<QueueKey> = outcome.delivered.iter().map(|(k, _, _)| *k).collect();
        self.queue.settle(&delivered, &updated)?;
        self.audit_outcome(
            &outcome.delivered,
            &updated,
            &failed_now,
            outcome.association.as_ref(),
        );
        Ok(())
    }

    fn audit_outcome(
        &self,
        delivered: &[(QueueKey, QueuedInstance, Option<String>)],
        retried: &[(QueueKey, QueuedInstance)],
        failed: &[(QueuedInstance, String)],
        association: Option<&DeliverError>,
    ) {
        let to = format!("PACS {} at {}", self.target.ae_title, self.target.address);
        let event = |agreement: &str, purpose: &str, object: String, outcome: String| Event {
            actor: "node".into(),
            action: "deliver".into(),
            object,
            agreement: agreement.to_string(),
            purpose: purpose.to_string(),
            outcome,
        };
        let detail = |from: &str, study: &str, flow: &FlowOfStudy, n: usize| Detail {
            study: Some(study.to_string()),
            party: Some(from.to_string()),
            flow: flow.flow.clone(),
            instances: Some(n as u64),
            ..Detail::default()
        };
        // Per study: delivered count and warnings.
        let mut by_study: BTreeMap<(&str, &str, &str), (usize, usize)> = BTreeMap::new();
        for (_, e, warning) in delivered {
            let s = by_study
                .entry((&e.agreement, &e.from_site, &e.study_token))
                .or_default();
            s.0 += 1;
            if let Some(w) = warning {
                s.1 += 1;
                tracing::warn!(study = %e.study_token, instance = %e.sop_instance_uid, %w, "PACS stored the instance with a warning");
            }
        }
        for ((agreement, from, study), (n, warnings)) in by_study {
            let outcome = if warnings == 0 {
                "ok".to_string()
            } else {
                format!("ok ({warnings} with a warning status)")
            };
            let flow = self.flow_of(agreement, from, study);
            self.audit.record_detailed_or_warn(
                event(
                    agreement,
                    &flow.purpose,
                    format!("study {study} from site:{from}: {n} instances to {to}"),
                    outcome,
                ),
                detail(from, study, &flow, n),
            );
        }
        for (e, why) in failed {
            tracing::error!(study = %e.study_token, instance = %e.sop_instance_uid, reason = %why, "instance not delivered to the PACS; marked failed");
            let flow = self.flow_of(&e.agreement, &e.from_site, &e.study_token);
            self.audit.record_detailed_or_warn(
                event(
                    &e.agreement,
                    &flow.purpose,
                    format!(
                        "instance {} of study {} to {to}",
                        e.sop_instance_uid, e.study_token
                    ),
                    format!("failed after {} attempts: {why}", e.attempts),
                ),
                detail(&e.from_site, &e.study_token, &flow, 1),
            );
        }
        let mut retry: BTreeMap<(&str, &str, &str), usize> = BTreeMap::new();
        for (_, e) in retried
            .iter()
            .filter(|(_, e)| e.state == DeliveryState::Pending)
        {
            *retry
                .entry((&e.agreement, &e.from_site, &e.study_token))
                .or_default() += 1;
        }
        for ((agreement, from, study), n) in retry {
            let flow = self.flow_of(agreement, from, study);
            self.audit.record_detailed_or_warn(
                event(
                    agreement,
                    &flow.purpose,
                    format!("study {study}: {n} instances to {to}"),
                    "refused by the PACS; queued for retry".into(),
                ),
                detail(from, study, &flow, n),
            );
        }
        if let Some(e) = association {
            tracing::warn!(error = %e, "PACS delivery attempt failed; the queue is kept and retried");
            self.audit.record_or_warn(event(
                "",
                "",
                format!("queued instances to {to}"),
                format!("queued for retry: {e}"),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified_as_the_standard_says() {
        assert_eq!(classify_status(0x0000), StoreStatus::Success);
        assert!(matches!(classify_status(0xB000), StoreStatus::Warning(_)));
        assert!(matches!(classify_status(0xB007), StoreStatus::Warning(_)));
        assert!(
            matches!(classify_status(0xA700), StoreStatus::Failure(m) if m.contains("out of resources"))
        );
        assert!(
            matches!(classify_status(0xA900), StoreStatus::Failure(m) if m.contains("does not match"))
        );
        assert!(
            matches!(classify_status(0xC123), StoreStatus::Failure(m) if m.contains("cannot understand"))
        );
        assert!(matches!(classify_status(0x0122), StoreStatus::Failure(_)));
        assert!(
            matches!(classify_status(0xFF00), StoreStatus::Failure(_)),
            "pending is not an answer to C-STORE"
        );
    }

    #[test]
    fn the_store_request_is_a_valid_command_set() {
        use dicom_dictionary_std::tags;
        use dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN;
        let bytes = store_request("1.2.840.10008.5.1.4.1.1.2", "2.25.123", 7);
        let obj = dicom_object::InMemDicomObject::read_dataset_with_ts(
            &bytes[..],
            &IMPLICIT_VR_LITTLE_ENDIAN.erased(),
        )
        .unwrap();
        let int = |t| obj.element(t).unwrap().to_int::<u32>().unwrap();
        assert_eq!(int(tags::COMMAND_FIELD), 1);
        assert_eq!(int(tags::MESSAGE_ID), 7);
        assert_eq!(int(tags::COMMAND_DATA_SET_TYPE), 0);
        assert_eq!(int(tags::COMMAND_GROUP_LENGTH) as usize, bytes.len() - 12);
        let uid = obj
            .element(tags::AFFECTED_SOP_INSTANCE_UID)
            .unwrap()
            .to_str()
            .unwrap();
        assert_eq!(uid.trim_end_matches('\0'), "2.25.123");
        assert_eq!(bytes.len() % 2, 0);
    }

    /// A scripted C-STORE SCP: answers the C-STOREs of one association with `statuses` in turn.
    /// (Orthanc cannot be made to answer a given failure status; the end-to-end behaviour with a
    /// real PACS is in tests/deliver.rs.)
    fn scripted_pacs(statuses: Vec<u16>) -> (String, std::thread::JoinHandle<usize>) {
        use dicom_core::{DataElement, PrimitiveValue, VR};
        use dicom_dictionary_std::tags;
        use dicom_transfer_syntax_registry::entries::IMPLICIT_VR_LITTLE_ENDIAN;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let handle = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut a = dicom_ul::ServerAssociationOptions::new()
                .accept_any()
                .promiscuous(true)
                .with_transfer_syntax("1.2.840.10008.1.2.1")
                .establish(stream)
                .unwrap();
            let mut statuses = statuses.into_iter();
            let mut answered = 0;
            let mut request = None;
            loop {
                match a.receive().unwrap() {
                    Pdu::PData { data } => {
                        for v in data {
                            if v.value_type == PDataValueType::Command {
                                request = Some(
                                    dicom_object::InMemDicomObject::read_dataset_with_ts(
                                        &v.data[..],
                                        &IMPLICIT_VR_LITTLE_ENDIAN.erased(),
                                    )
                                    .unwrap(),
                                );
                            } else if v.is_last {
                                let rq = request.take().unwrap();
                                let int = |t| rq.element(t).unwrap().to_int::<u16>().unwrap();
                                let text = |t| rq.element(t).unwrap().to_str().unwrap().to_string();
                                let rsp =
                                    dicom_object::InMemDicomObject::command_from_element_iter([
                                        DataElement::new(
                                            tags::AFFECTED_SOP_CLASS_UID,
                                            VR::UI,
                                            PrimitiveValue::from(text(
                                                tags::AFFECTED_SOP_CLASS_UID,
                                            )),
                                        ),
                                        DataElement::new(
                                            tags::COMMAND_FIELD,
                                            VR::US,
                                            PrimitiveValue::from(0x8001u16),
                                        ),
                                        DataElement::new(
                                            tags::MESSAGE_ID_BEING_RESPONDED_TO,
                                            VR::US,
                                            PrimitiveValue::from(int(tags::MESSAGE_ID)),
                                        ),
                                        DataElement::new(
                                            tags::COMMAND_DATA_SET_TYPE,
                                            VR::US,
                                            PrimitiveValue::from(0x0101u16),
                                        ),
                                        DataElement::new(
                                            tags::STATUS,
                                            VR::US,
                                            PrimitiveValue::from(statuses.next().unwrap()),
                                        ),
                                        DataElement::new(
                                            tags::AFFECTED_SOP_INSTANCE_UID,
                                            VR::UI,
                                            PrimitiveValue::from(text(
                                                tags::AFFECTED_SOP_INSTANCE_UID,
                                            )),
                                        ),
                                    ]);
                                let mut bytes = Vec::new();
                                rsp.write_dataset_with_ts(
                                    &mut bytes,
                                    &IMPLICIT_VR_LITTLE_ENDIAN.erased(),
                                )
                                .unwrap();
                                a.send(&Pdu::PData {
                                    data: vec![PDataValue {
                                        presentation_context_id: v.presentation_context_id,
                                        value_type: PDataValueType::Command,
                                        is_last: true,
                                        data: bytes,
                                    }],
                                })
                                .unwrap();
                                answered += 1;
                            }
                        }
                    }
                    Pdu::ReleaseRQ => {
                        a.send(&Pdu::ReleaseRP).unwrap();
                        return answered;
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
        });
        (addr, handle)
    }

    /// A store with `n` committed synthetic CT instances queued for delivery to `address`.
    fn queued_store(
        dir: &std::path::Path,
        n: usize,
        address: &str,
    ) -> (PacsDelivery, DeliveryQueue, PathBuf) {
        queued_store_under(dir, n, address, "a", "f")
    }

    /// [`queued_store`], the study received from hospital-a under `agreement` and `flow`.
    fn queued_store_under(
        dir: &std::path::Path,
        n: usize,
        address: &str,
        agreement: &str,
        flow: &str,
    ) -> (PacsDelivery, DeliveryQueue, PathBuf) {
        use crate::store::{StagedInstance, Store, StudyKey};
        use sha2::{Digest, Sha256};
        use std::io::Write;
        let files = crate::demo::write_synthetic_ct(
            &dir.join("in"),
            &crate::demo::SyntheticPatient::default(),
            n,
            16,
        )
        .unwrap();
        let store = Arc::new(LocalStore::open(&dir.join("store")).unwrap());
        let audit_path = dir.join("audit.log");
        let audit = Arc::new(AuditLog::open(&audit_path).unwrap());
        let mut target = DeliverConfig::new("PACS", address);
        target.max_attempts = 2;
        target.retry_initial_ms = 1;
        let delivery = PacsDelivery::new(&target, "telerad-c", store.clone(), audit).unwrap();
        let staged = files
            .iter()
            .map(|f| {
                let bytes = std::fs::read(f).unwrap();
                let (mut file, path) = store.stage_file().unwrap();
                file.write_all(&bytes).unwrap();
                let uid = dicom_object::open_file(f)
                    .unwrap()
                    .meta()
                    .media_storage_sop_instance_uid()
                    .to_string();
                StagedInstance {
                    path,
                    sha256: Sha256::digest(&bytes).into(),
                    size: bytes.len() as u64,
                    sop_instance_uid: uid,
                }
            })
            .collect();
        let key = StudyKey::new(agreement, flow, "hospital-a", "2.25.7");
        store.commit(&key, n, staged, vec![]).unwrap();
        let queue = store.delivery_queue();
        (delivery, queue, audit_path)
    }

    #[test]
    fn statuses_decide_delivered_retried_or_failed_and_each_outcome_is_audited() {
        let dir = tempfile::tempdir().unwrap();
        // First association: failure (out of resources), warning, success.
        let (addr, pacs) = scripted_pacs(vec![0xA700, 0xB000, 0x0000]);
        let (delivery, queue, audit) = queued_store(dir.path(), 3, &addr);
        assert!(delivery.deliver_batch(queue.due(now_ms(), 10).unwrap()));
        assert_eq!(pacs.join().unwrap(), 3, "one association for the batch");
        let left = queue.entries().unwrap();
        assert_eq!(left.len(), 1, "the warning counts as delivered");
        let e = &left[0].1;
        assert_eq!((e.attempts, e.state), (1, DeliveryState::Pending));
        assert!(e
            .last_error
            .as_ref()
            .unwrap()
            .contains("0xA700 (refused: out of resources)"));

        // Second attempt: cannot understand; max_attempts (2) reached: failed, kept, audited.
        let (addr2, pacs) = scripted_pacs(vec![0xC000]);
        let mut target = delivery.target.clone();
        target.address = addr2;
        let delivery = PacsDelivery { target, ..delivery };
        assert!(delivery.deliver_batch(queue.due(u64::MAX, 10).unwrap()));
        assert_eq!(pacs.join().unwrap(), 1);
        let left = queue.entries().unwrap();
        assert_eq!(left[0].1.state, DeliveryState::Failed);
        assert!(left[0]
            .1
            .last_error
            .as_ref()
            .unwrap()
            .contains("cannot understand"));
        assert!(queue.due(u64::MAX, 10).unwrap().is_empty(), "not retried");

        let log = std::fs::read_to_string(audit).unwrap();
        assert!(log.contains("ok (1 with a warning status)"), "{log}");
        assert!(log.contains("refused by the PACS; queued for retry"));
        assert!(log.contains("failed after 2 attempts"));
        assert!(!log.contains("DOE"), "no PHI in the audit log");
    }

    #[test]
    fn deliver_entries_name_the_flow_and_purpose_the_study_was_received_under() {
        let dir = tempfile::tempdir().unwrap();
        let (addr, pacs) = scripted_pacs(vec![0x0000, 0x0000]);
        let (delivery, queue, audit) =
            queued_store_under(dir.path(), 2, &addr, "example-teleradiology", "ct-reads");
        let policy = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("policies")
            .join("example-teleradiology.toml");
        let set = AgreementSet::load(&policy).unwrap();
        let flow = &set.agreements["example-teleradiology"]
            .flows
            .iter()
            .find(|f| f.name == "ct-reads")
            .unwrap()
            .purposes;
        let purposes: Vec<&str> = flow.iter().map(|p| p.name()).collect();
        assert!(
            purposes.len() > 1,
            "the example flow allows several purposes"
        );
        let (_agreements, rx) = watch::channel(Arc::new(set));
        let delivery = delivery.with_agreements(rx);
        assert!(delivery.deliver_batch(queue.due(now_ms(), 10).unwrap()));
        assert_eq!(pacs.join().unwrap(), 2);
        let entries = crate::audit::read_entries(&audit).unwrap();
        let d = entries
            .iter()
            .find(|e| e.event.action == "deliver")
            .expect("a deliver entry");
        assert_eq!(d.event.agreement, "example-teleradiology");
        assert_eq!(d.event.purpose, purposes.join(", "));
        assert_eq!(d.event.outcome, "ok");
        assert_eq!(d.detail.flow.as_deref(), Some("ct-reads"));
        assert_eq!(d.detail.party.as_deref(), Some("hospital-a"));
        assert_eq!(d.detail.study.as_deref(), Some("2.25.7"));
        assert_eq!(d.detail.instances, Some(2));
    }

    #[test]
    fn a_pacs_that_is_down_costs_the_instances_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap().to_string();
        drop(closed);
        let (delivery, queue, _) = queued_store(dir.path(), 2, &addr);
        assert!(!delivery.deliver_batch(queue.due(now_ms(), 10).unwrap()));
        let left = queue.entries().unwrap();
        assert_eq!(left.len(), 2);
        assert!(left
            .iter()
            .all(|(_, e)| e.attempts == 0 && e.next_attempt == 0));
        assert_eq!(delivery.backoff(1), Duration::from_millis(1));
    }

    #[test]
    fn a_file_that_is_not_dicom_is_unreadable_not_sent() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        std::fs::write(&p, b"not dicom at all").unwrap();
        assert!(matches!(
            open_instance(&p, &AtRest::plain()),
            Err(DeliverError::Unreadable(_))
        ));
    }
}
