//! The `send` pipeline: the studies de-identified from files are offered to the partner group by
//! group while de-identification goes on, then completed by a final offer.
//!
//! Owns: [`OutgoingStudy`] (one study of a `send`: the instances de-identified so far, held in
//! memory or staged as files, which of them the partner confirmed by a signed receipt, the
//! first failed offer), the [`MemoryBudget`] those held in memory count against,
//! [`offer_as_they_come`] (turns the groups of [`crate::ingest::files::ingest_files`]
//! into partial offers; every group that arrived during an offer goes into the next one) and
//! [`finish`] (a study's final offer, and its outcome recorded in the outbox and the audit).
//!
//! The protocol is the DICOM forwarder's: partial offers (`complete = false`) list only the
//! instances not offered before, and each is audited as a `disclose` with its signed receipt.
//! The final offer (`complete = true`) lists the rest; the newest instance is always kept back
//! for it, so it is never empty. Its signed receipt must then show the partner holding exactly
//! the whole study (`study_digest`, over every instance's SHA-256); where it does not, one more
//! offer lists the whole study, as the forwarder's final offer does, and the partner
//! re-verifies all of it (the instances it confirmed before are no longer here to stream: it
//! answers "already held" for them, or, had it lost one, the attempt fails unretried rather
//! than send it). A failed offer ends the offers of that study: once de-identification
//! has ended, the study is made durable in the outbox (every instance not confirmed) and queued
//! for retry (or failed), like a failed `send` before; the retry's offer lists the whole study,
//! and the partner answers "already held" for what it has.
//!
//! Instances in memory: de-identified instances are held in memory ([`HeldInstance`]) while
//! they are offered, and streamed from there; nothing is written for them on the happy path.
//! They count against a [`MemoryBudget`] ([`MEMORY_BUDGET`] per `send`); an instance that does
//! not fit, or is larger than [`MEMORY_INSTANCE_MAX`], is staged as a sealed working-copy file
//! in the study's outbox folder instead (spilled; `ingest::files`), so a study of any size goes
//! with bounded memory. An instance's memory (or its spilled file) is freed as soon as the
//! partner's signed receipt confirms it, and its buffer is reused for a later instance.
//! De-identification runs at most [`AHEAD`] bytes ahead of the receipts while an offer is under
//! way: beyond that, a worker waits for the offer to free buffers rather than take fresh memory
//! (with no offer under way it never waits, so it cannot wait for an offer that only its own
//! next group would start). Before the final offer, and before a study is queued
//! after a failed offer, every instance not confirmed yet that is held in memory is written as
//! a sealed working copy (usually only the newest instance, kept back for the final offer):
//! the study's outbox entry then finds a file for every instance it needs
//! ([`OutboxEntry::receipted`] counts the first instances, confirmed by receipts, whose files
//! are not kept).
//!
//! Crash safety: no `transfer.json` is written for a study while its partial offers run (the
//! study's folder is claimed, so a running node leaves it alone). A `send` killed meanwhile
//! leaves nothing but spilled working copies no entry lists, which nothing sends (the outbox's
//! retention removes them): the partner holds part of the study (each part audited with its
//! receipt, and the vault records of its tokens durable before it was offered), and the study
//! is completed by sending it again. From the final offer on, the study has its entry
//! (`flushed = false`), written only after every instance it needs is a file, which a running
//! node re-verifies before sending anything ([`crate::store::outbox::Outbox::settle`]): it never
//! lists a file that does not exist.
//!
//! Does not own: de-identification (`ingest::files`), the protocol (`federation::client`), the
//! audit entries and outbox records of an attempt (the [`Courier`]: the node).

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::federation::client::{Delivery, InstanceBody, SendError};
use crate::federation::destruction::study_digest;
use crate::ingest::files::{StagedGroup, StagedStudy};
use crate::store::outbox::{Outbox, OutboxEntry};
use crate::store::StoreError;

/// How much memory one `send` may hold de-identified instances in while it offers them.
pub const MEMORY_BUDGET: u64 = 256 << 20;

/// An instance larger than this is staged as a file whatever the budget has free.
pub const MEMORY_INSTANCE_MAX: u64 = 16 << 20;

/// How much memory of freed instances a [`MemoryBudget`] keeps for the next ones (beside its
/// limit): buffers reused are already in memory, where new ones cost a page fault per page.
/// As much as [`AHEAD`]: de-identification that waits for receipts then finds a freed buffer
/// for every instance.
pub const SPARE_BUFFERS: u64 = AHEAD;

/// How far de-identification may run ahead of the partner's receipts: beyond this much held in
/// memory, a new buffer waits while an offer is under way (its receipt frees what it covers)
/// instead of taking fresh memory (every page of which costs a page fault, and the pages are
/// unmapped again when freed). With no offer under way it never waits: the budget's limit
/// applies as before. Two groups of [`crate::deid::batch::WORKING_GROUP_BYTES`] (each ends past
/// that size by at most one instance) and one largest instance: the offer under way, and a
/// whole group ready for the next offer when it ends, so that waiting never holds that back.
pub const AHEAD: u64 = 2 * crate::deid::batch::WORKING_GROUP_BYTES + MEMORY_INSTANCE_MAX;

/// Blocks up to this size that a `send` frees are kept by the allocator for the next ones
/// ([`reuse_freed_memory`]).
pub const REUSE_UP_TO: usize = 16 << 20;

/// Makes glibc's allocator keep freed blocks of up to [`REUSE_UP_TO`] bytes for reuse, for the
/// rest of the process (a `send`). By default glibc maps every block over 128 KiB afresh and
/// unmaps it when freed, and trims the heap's free top past 128 KiB, until its dynamic
/// threshold has risen: a `send`'s 1 MiB encode buffer of each chunk (tonic's) and its
/// instance buffers were then fresh pages again and again, each page costing a page fault
/// (90 MB of them per 263 MB sent). Freeing one mapped block raises the threshold to its size
/// and the trim threshold to twice that (glibc's documented dynamic `M_MMAP_THRESHOLD`), the
/// same as `mallopt` without unsafe code: so one such block is taken and freed here. The process
/// then keeps up to twice [`REUSE_UP_TO`] of free heap for reuse. Elsewhere it does nothing.
/// The `send` command calls it first (not the node, which runs on for days).
pub fn reuse_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    drop(std::hint::black_box(Vec::<u8>::with_capacity(REUSE_UP_TO)));
}

/// The memory a `send` holds its de-identified instances in, against a limit: an instance is
/// held only if it fits, and gives its share back when its last holder drops it. The buffers of
/// freed instances are kept for the next instances, up to [`SPARE_BUFFERS`] bytes. While an
/// offer of held instances is under way ([`MemoryBudget::offering`]), a request for a buffer
/// beyond [`AHEAD`] held waits for that offer's receipt to free some ([`MemoryBudget::buffer`]).
#[derive(Debug)]
pub struct MemoryBudget {
    limit: u64,
    ahead: u64,
    used: AtomicU64,
    pool: std::sync::Mutex<Pool>,
    /// Signalled when a buffer is freed or an offer ends.
    changed: std::sync::Condvar,
}

#[derive(Debug, Default)]
struct Pool {
    spare: Vec<Vec<u8>>,
    /// Offers of instances held under this budget under way now.
    offers: usize,
}

/// An offer of instances held under a [`MemoryBudget`] under way; see [`MemoryBudget::offering`].
pub struct OfferUnderWay(Arc<MemoryBudget>);

impl Drop for OfferUnderWay {
    fn drop(&mut self) {
        let mut pool = self.0.pool();
        pool.offers = pool.offers.saturating_sub(1);
        self.0.changed.notify_all();
    }
}

impl MemoryBudget {
    pub fn new(limit: u64) -> Arc<MemoryBudget> {
        MemoryBudget::with_ahead(limit, AHEAD)
    }

    /// A budget whose de-identification runs at most `ahead` bytes ahead of receipts (see
    /// [`AHEAD`]).
    pub fn with_ahead(limit: u64, ahead: u64) -> Arc<MemoryBudget> {
        Arc::new(MemoryBudget {
            limit,
            ahead,
            used: AtomicU64::new(0),
            pool: Default::default(),
            changed: Default::default(),
        })
    }

    fn pool(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An empty buffer of at least `capacity` bytes: a spare one of about that size if there
    /// is one, else a new one. While an offer is under way and more than the budget's `ahead`
    /// (see [`AHEAD`]) is held, it first waits for that offer to free a buffer or to end
    /// (de-identification runs ahead of the partner only so far).
    pub fn buffer(&self, capacity: usize) -> Vec<u8> {
        let fits = |b: &Vec<u8>| (capacity..=capacity + capacity / 16).contains(&b.capacity());
        let mut pool = self.pool();
        loop {
            if let Some(i) = pool.spare.iter().position(fits) {
                return pool.spare.swap_remove(i);
            }
            if pool.offers == 0 || self.used() + capacity as u64 <= self.ahead {
                return Vec::with_capacity(capacity);
            }
            // Re-checked now and then as well: nothing is lost if a signal is.
            pool = self
                .changed
                .wait_timeout(pool, std::time::Duration::from_millis(100))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Marks an offer of instances held under this budget as under way until the returned
    /// guard is dropped: [`MemoryBudget::buffer`] may wait for it. Drop it only after the
    /// instances its receipt confirms are freed.
    pub fn offering(self: &Arc<Self>) -> OfferUnderWay {
        self.pool().offers += 1;
        OfferUnderWay(self.clone())
    }

    /// Keeps a freed instance's buffer for [`MemoryBudget::buffer`] while the spare ones stay
    /// under [`SPARE_BUFFERS`].
    fn recycle(&self, mut bytes: Vec<u8>) {
        bytes.clear();
        let mut pool = self.pool();
        let kept: usize = pool.spare.iter().map(Vec::capacity).sum();
        if (kept + bytes.capacity()) as u64 <= SPARE_BUFFERS {
            pool.spare.push(bytes);
        }
        drop(pool);
        self.changed.notify_all();
    }

    /// Bytes held now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// Holds `bytes` (an instance's plaintext) under the budget, or gives them back when they
    /// do not fit in what is left.
    pub fn hold(self: &Arc<Self>, bytes: Vec<u8>) -> Result<Arc<HeldInstance>, Vec<u8>> {
        let n = bytes.capacity() as u64;
        let taken = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used + n <= self.limit).then_some(used + n)
            });
        match taken {
            Ok(_) => Ok(Arc::new(HeldInstance {
                bytes,
                budget: self.clone(),
            })),
            Err(_) => Err(bytes),
        }
    }
}

/// A de-identified instance held in memory under a [`MemoryBudget`]; its share is given back
/// when it is dropped.
pub struct HeldInstance {
    bytes: Vec<u8>,
    budget: Arc<MemoryBudget>,
}

impl HeldInstance {
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl AsRef<[u8]> for HeldInstance {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for HeldInstance {
    fn drop(&mut self) {
        let bytes = std::mem::take(&mut self.bytes);
        self.budget
            .used
            .fetch_sub(bytes.capacity() as u64, Ordering::AcqRel);
        self.budget.recycle(bytes);
    }
}

impl std::fmt::Debug for HeldInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HeldInstance({} bytes)", self.bytes.len())
    }
}

/// An instance of a study: held in memory, or None where it is a file in the study's folder.
pub type Body = Option<Arc<HeldInstance>>;

/// Who carries offers to the partner and records their outcome (the node).
pub trait Courier {
    /// Makes one offer of `offer` and streams what the partner lacks, each instance from its
    /// `bodies` entry (same order) when held in memory, else from its file in `dir`; records
    /// nothing.
    fn deliver(
        &self,
        dir: &Path,
        offer: &OutboxEntry,
        bodies: &[Option<InstanceBody>],
    ) -> impl Future<Output = Result<Delivery, SendError>> + Send;

    /// Records the outcome of an attempt at `entry`: the `disclose` audit entry and, for a
    /// complete study, its outbox entry (delivered, with `earlier` (stored, already held) of
    /// the partial offers added to the receipt's; or made durable and queued, or failed).
    fn record(
        &self,
        dir: &Path,
        entry: &mut OutboxEntry,
        result: &Result<Delivery, SendError>,
        earlier: (u32, u32),
    );
}

/// What the partner confirmed of one study so far, from its signed receipts.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub instances_sent: usize,
    pub bytes_sent: u64,
    pub stored: u32,
    pub already_held: u32,
}

impl Sent {
    fn add(&mut self, d: &Delivery) {
        self.instances_sent += d.instances_sent;
        self.bytes_sent += d.bytes_sent;
        self.stored += d.receipt.instances_stored;
        self.already_held += d.receipt.instances_already_held;
    }
}

/// One study of a `send`, offered while it is de-identified.
#[derive(Debug)]
pub struct OutgoingStudy {
    pub dir: PathBuf,
    /// The whole study as de-identified so far (`complete` and `receipted` are set by
    /// [`finish`]).
    pub entry: OutboxEntry,
    /// Each instance of `entry`, in order: held in memory until the partner confirms it (then
    /// None), or None from the start when it was spilled to its file.
    bodies: Vec<Body>,
    /// (input file, its de-identified instance's file in the outbox, where it is written only
    /// when spilled or needed by the study's entry).
    pub files: Vec<(PathBuf, PathBuf)>,
    /// (de-identified SOP Instance UID, what OCR found and blacked out), for the audit.
    pub cleaned: Vec<(String, crate::deid::OcrEvidence)>,
    /// Held while this `send` offers the study, so that a running node's outbox worker leaves
    /// it alone. None: the node was delivering an earlier entry of this study (no offers).
    claim: Option<std::fs::File>,
    /// How many of `entry.instances` (in order) the partner confirmed.
    confirmed: usize,
    sent: Sent,
    /// The first failed offer: no more offers are made.
    failure: Option<SendError>,
}

impl OutgoingStudy {
    /// A new study of `token` addressed as `route` says (agreement, flow, purpose, partner).
    fn new(outbox: &Outbox, route: &OutboxEntry, token: &str) -> OutgoingStudy {
        let dir = outbox.study_dir(&route.agreement, token);
        let entry = OutboxEntry {
            // Working copies (see `ingest::files`): made durable only if an attempt fails.
            flushed: false,
            ..OutboxEntry::pending(
                &route.agreement,
                &route.flow,
                &route.purpose,
                &route.to,
                token,
                false,
            )
        };
        // Made here once per study (instances held in memory make no folder).
        let _ = std::fs::create_dir_all(&dir);
        OutgoingStudy {
            claim: Outbox::try_claim(&dir),
            dir,
            entry,
            bodies: Vec::new(),
            files: Vec::new(),
            cleaned: Vec::new(),
            confirmed: 0,
            sent: Sent::default(),
            failure: None,
        }
    }

    /// Adds a named group of this study's instances.
    fn add(&mut self, staged: StagedStudy) {
        let e = &mut self.entry;
        for m in staged.modalities {
            if !e.modalities.contains(&m) {
                e.modalities.push(m);
            }
        }
        e.modalities.sort();
        for p in staged.patient_tokens {
            if !e.patient_tokens.contains(&p) {
                e.patient_tokens.push(p);
            }
        }
        e.patient_tokens.sort();
        for (input, instance, body) in staged.instances {
            self.files.push((input, self.dir.join(&instance.file)));
            e.instances.push(instance);
            self.bodies.push(body);
        }
        self.cleaned.extend(staged.cleaned);
    }

    /// The next partial offer: every instance not offered yet but the newest, which is kept
    /// back for the final offer. None when there is nothing to offer, or no offer may be made.
    fn partial_offer(&self) -> Option<OutboxEntry> {
        let upto = self.entry.instances.len().saturating_sub(1);
        if self.claim.is_none() || self.failure.is_some() || upto <= self.confirmed {
            return None;
        }
        Some(OutboxEntry {
            instances: self.entry.instances[self.confirmed..upto].to_vec(),
            complete: false,
            ..self.entry.clone()
        })
    }

    /// The bodies of instances `from..to` as the courier streams them.
    fn bodies(&self, from: usize, to: usize) -> Vec<Option<InstanceBody>> {
        self.bodies[from..to]
            .iter()
            .map(|b| b.clone().map(|b| b as InstanceBody))
            .collect()
    }

    /// The outcome of a partial offer made from [`OutgoingStudy::partial_offer`]: confirmed
    /// instances are freed at once (their memory, or their spilled file).
    fn offered(&mut self, offer: &OutboxEntry, result: Result<&Delivery, SendError>) {
        match result {
            Ok(d) => {
                let upto = self.confirmed + offer.instances.len();
                for i in self.confirmed..upto {
                    if self.bodies[i].take().is_none() {
                        let _ = std::fs::remove_file(self.dir.join(&self.entry.instances[i].file));
                    }
                }
                self.confirmed = upto;
                self.sent.add(d);
            }
            Err(e) => self.failure = Some(e),
        }
    }

    /// Writes every instance not confirmed yet that is held in memory as a sealed working copy
    /// in the study's folder (named, not flushed), so that the outbox entry finds a file for
    /// each. They stay in memory as well: the final offer streams them from there.
    fn write_out(&self, outbox: &Outbox) -> Result<(), StoreError> {
        let mut staged = Vec::new();
        for (instance, body) in self.entry.instances[self.confirmed..]
            .iter()
            .zip(&self.bodies[self.confirmed..])
        {
            let Some(body) = body else { continue };
            let target = self.dir.join(&instance.file);
            let s = crate::deid::batch::stage_bytes(body.bytes(), &target, outbox.at_rest())
                .map_err(|e| StoreError::Corrupt(format!("cannot write an outbox copy: {e}")))?;
            staged.push(s);
        }
        for (_, named) in crate::deid::batch::name_outputs_unflushed(staged) {
            named.map_err(|e| StoreError::Corrupt(format!("cannot write an outbox copy: {e}")))?;
        }
        Ok(())
    }

    /// The final offer: the instances not confirmed yet, the study complete.
    fn final_offer(&self) -> OutboxEntry {
        OutboxEntry {
            instances: self.entry.instances[self.confirmed..].to_vec(),
            complete: true,
            ..self.entry.clone()
        }
    }

    /// True when the partner's signed receipt shows it holding exactly this whole study.
    fn holds_whole_study(&self, d: &Delivery) -> bool {
        d.receipt.study_digest == study_digest(self.entry.instances.iter().map(|i| &i.sha256))
    }

    /// How many instances the study has so far.
    pub fn len(&self) -> usize {
        self.entry.instances.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entry.instances.is_empty()
    }
}

/// Takes the named groups from `groups` as they come and offers each study's new instances to
/// the partner `route` names (with its agreement, flow and purpose; see the module header), until the sender of `groups` is gone (the
/// de-identification ended). Returns every study, by token, for [`finish`].
pub async fn offer_as_they_come<C: Courier>(
    courier: &C,
    outbox: &Outbox,
    route: &OutboxEntry,
    groups: &mut tokio::sync::mpsc::UnboundedReceiver<StagedGroup>,
) -> BTreeMap<String, OutgoingStudy> {
    let mut studies: BTreeMap<String, OutgoingStudy> = BTreeMap::new();
    while let Some(first) = groups.recv().await {
        let mut arrived = vec![first];
        while let Ok(more) = groups.try_recv() {
            arrived.push(more);
        }
        for (token, staged) in arrived.into_iter().flatten() {
            studies
                .entry(token.clone())
                .or_insert_with(|| OutgoingStudy::new(outbox, route, &token))
                .add(staged);
        }
        for study in studies.values_mut() {
            let Some(mut offer) = study.partial_offer() else {
                continue;
            };
            let (from, to) = (study.confirmed, study.confirmed + offer.instances.len());
            let bodies = study.bodies(from, to);
            // De-identification may wait for this offer to free memory (dropped after it has).
            let under_way = study.bodies[from..to]
                .iter()
                .flatten()
                .next()
                .map(|b| b.budget.offering());
            match courier.deliver(&study.dir, &offer, &bodies).await {
                Ok(d) => {
                    courier.record(&study.dir, &mut offer, &Ok(d.clone()), (0, 0));
                    drop(bodies);
                    study.offered(&offer, Ok(&d));
                }
                // Recorded by `finish`, with the whole study queued.
                Err(e) => study.offered(&offer, Err(e)),
            }
            drop(under_way);
        }
    }
    studies
}

/// How one study of a `send` ended.
#[derive(Debug)]
pub enum Outcome {
    /// The partner's signed receipts cover the whole study.
    Delivered(Sent),
    /// Waiting in the outbox (made durable) for a retry: why.
    Queued(String),
    /// Refused for a reason a retry cannot fix.
    Failed(SendError),
}

/// Completes one study once its de-identification ended: the instances not confirmed yet that
/// are held in memory are written as working copies, then its outbox entry is written (the
/// whole study, complete, with the number of instances already confirmed), then the final offer
/// is made (see the module header) and its outcome recorded, or a failed partial offer is
/// recorded as the study's failed attempt (the study made durable and queued).
pub async fn finish<C: Courier>(
    courier: &C,
    outbox: &Outbox,
    mut study: OutgoingStudy,
) -> Result<Outcome, StoreError> {
    study.entry.complete = true;
    study.entry.receipted = study.confirmed;
    study.write_out(outbox)?;
    outbox.save(&study.entry)?;
    let Some(_claim) = study.claim.take() else {
        return Ok(Outcome::Queued(
            "the site's running node is delivering it now".into(),
        ));
    };
    let (dir, earlier) = (
        study.dir.clone(),
        (study.sent.stored, study.sent.already_held),
    );
    let mut result = match study.failure.take() {
        Some(e) => Err(e),
        None => {
            let bodies = study.bodies(study.confirmed, study.len());
            courier.deliver(&dir, &study.final_offer(), &bodies).await
        }
    };
    let mut whole_offered = false;
    if let Ok(d) = &result {
        if study.confirmed > 0 && !study.holds_whole_study(d) {
            tracing::info!(study = %study.entry.study_token, "the partner's receipt does not show the whole study; offering all of it once more");
            study.sent.add(d);
            result = courier
                .deliver(&dir, &study.entry, &study.bodies(0, study.len()))
                .await;
            whole_offered = true;
        }
    }
    // A whole offer's receipt counts the whole study on its own.
    let earlier = if whole_offered { (0, 0) } else { earlier };
    courier.record(&dir, &mut study.entry, &result, earlier);
    Ok(match result {
        Ok(d) => {
            let mut sent = study.sent;
            sent.add(&d);
            if whole_offered {
                (sent.stored, sent.already_held) =
                    (d.receipt.instances_stored, d.receipt.instances_already_held);
            }
            Outcome::Delivered(sent)
        }
        Err(e) if e.is_transient() => Outcome::Queued(e.to_string()),
        Err(e) => Outcome::Failed(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::federation::proto::Receipt;
    use crate::store::outbox::{OutboxInstance, OutboxState};
    use std::sync::Mutex;

    /// (complete, delivered, earlier counts) of each recorded attempt.
    type Recorded = (bool, bool, (u32, u32));

    /// A partner that holds what it was offered, answers every offer with a receipt over the
    /// study as it holds it, and fails the offers it is told to.
    #[derive(Default)]
    struct FakePartner {
        held: Mutex<BTreeMap<String, String>>,
        offers: Mutex<Vec<(bool, Vec<String>)>>,
        fail_offer: Option<usize>,
        recorded: Mutex<Vec<Recorded>>,
        extra_held: Option<String>,
        /// Records outcomes into this outbox as the node does (delivered, or made durable and
        /// queued), when set.
        outbox: Option<Outbox>,
        /// The memory held at each offer, and whether every instance file the offer needs
        /// (not held in memory) and the entry existed then, when set.
        budget: Option<Arc<MemoryBudget>>,
        at_offer: Mutex<Vec<(u64, bool)>>,
    }

    impl Courier for FakePartner {
        fn deliver(
            &self,
            dir: &Path,
            offer: &OutboxEntry,
            bodies: &[Option<InstanceBody>],
        ) -> impl Future<Output = Result<Delivery, SendError>> + Send {
            if let Some(budget) = &self.budget {
                let files = offer.instances.iter().enumerate().all(|(n, i)| {
                    bodies.get(n).is_some_and(Option::is_some) && !offer.complete
                        || dir.join(&i.file).exists()
                });
                let entry = Outbox::load(dir).is_ok();
                self.at_offer
                    .lock()
                    .unwrap()
                    .push((budget.used(), files && (entry || !offer.complete)));
            }
            let n = {
                let mut offers = self.offers.lock().unwrap();
                offers.push((
                    offer.complete,
                    offer.instances.iter().map(|i| i.file.clone()).collect(),
                ));
                offers.len() - 1
            };
            let result = if self.fail_offer == Some(n) {
                Err(SendError::Connect {
                    site: "b".into(),
                    address: "x".into(),
                    reason: "down".into(),
                })
            } else {
                let mut held = self.held.lock().unwrap();
                if let Some(x) = &self.extra_held {
                    held.insert("extra".into(), x.clone());
                }
                let (mut stored, mut already) = (0, 0);
                for i in &offer.instances {
                    match held.insert(i.sop_instance_uid.clone(), i.sha256.clone()) {
                        Some(_) => already += 1,
                        None => stored += 1,
                    }
                }
                Ok(Delivery {
                    receipt: Receipt {
                        instances_stored: stored,
                        instances_already_held: already,
                        study_digest: study_digest(held.values()),
                        ..Default::default()
                    },
                    instances_sent: stored as usize,
                    bytes_sent: stored as u64 * 10,
                    receiver_certificate: None,
                })
            };
            std::future::ready(result)
        }

        fn record(
            &self,
            _dir: &Path,
            entry: &mut OutboxEntry,
            result: &Result<Delivery, SendError>,
            earlier: (u32, u32),
        ) {
            self.recorded
                .lock()
                .unwrap()
                .push((entry.complete, result.is_ok(), earlier));
            match (&self.outbox, result) {
                (Some(ob), Ok(d)) if entry.complete => ob
                    .mark_delivered(
                        _dir,
                        entry,
                        earlier.0 + d.receipt.instances_stored,
                        earlier.1 + d.receipt.instances_already_held,
                    )
                    .unwrap(),
                (Some(ob), Err(e)) => ob
                    .mark_attempt_failed(entry, &e.to_string(), e.is_transient())
                    .unwrap(),
                _ => {}
            }
        }
    }

    fn route() -> OutboxEntry {
        OutboxEntry::pending("dsa-1", "flow", "treatment", "site-b", "", false)
    }

    fn group(token: &str, from: usize, to: usize) -> StagedGroup {
        let mut s = StagedStudy::default();
        for i in from..to {
            s.instances.push((
                PathBuf::from(format!("in/{i}.dcm")),
                OutboxInstance {
                    file: format!("1.2.{i}.dcm"),
                    sha256: format!("{i:064x}"),
                    size: 10,
                    sop_instance_uid: format!("1.2.{i}"),
                },
                None,
            ));
        }
        s.modalities.insert("CT".into());
        s.patient_tokens.insert("p1".into());
        BTreeMap::from([(token.to_string(), s)])
    }

    async fn run(partner: &FakePartner, groups: Vec<StagedGroup>) -> (Outcome, OutboxEntry) {
        let tmp = tempfile::tempdir().unwrap();
        let outbox = Outbox::new(tmp.path().join("outbox"));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for g in groups {
            for token in g.keys() {
                std::fs::create_dir_all(outbox.study_dir("dsa-1", token)).unwrap();
            }
            tx.send(g).unwrap();
        }
        drop(tx);
        let mut studies = offer_as_they_come(partner, &outbox, &route(), &mut rx).await;
        let study = studies.remove("s1").expect("one study");
        let dir = study.dir.clone();
        let outcome = finish(partner, &outbox, study).await.unwrap();
        (outcome, Outbox::load(&dir).unwrap())
    }

    #[tokio::test]
    async fn groups_go_as_partial_offers_and_the_last_instance_completes_the_study() {
        let partner = FakePartner::default();
        // Two groups arrive before the first offer: they go together, the newest kept back.
        let (outcome, entry) = run(&partner, vec![group("s1", 0, 3), group("s1", 3, 5)]).await;
        let offers = partner.offers.lock().unwrap().clone();
        assert_eq!(offers.len(), 2, "{offers:?}");
        assert!(!offers[0].0);
        assert_eq!(offers[0].1.len(), 4);
        assert!(offers[1].0, "the final offer says the study is complete");
        assert_eq!(offers[1].1, vec!["1.2.4.dcm".to_string()]);
        match outcome {
            Outcome::Delivered(sent) => {
                assert_eq!(
                    (sent.instances_sent, sent.stored, sent.already_held),
                    (5, 5, 0)
                )
            }
            other => panic!("{other:?}"),
        }
        // The partial offer is audited as it went; the final one with the partial counts.
        let recorded = partner.recorded.lock().unwrap().clone();
        assert_eq!(recorded, vec![(false, true, (0, 0)), (true, true, (4, 0))]);
        assert!(entry.complete);
        assert_eq!(entry.instances.len(), 5);
        assert_eq!(entry.modalities, vec!["CT".to_string()]);
    }

    #[tokio::test]
    async fn a_single_instance_goes_in_one_complete_offer() {
        let partner = FakePartner::default();
        let (outcome, _) = run(&partner, vec![group("s1", 0, 1)]).await;
        let offers = partner.offers.lock().unwrap().clone();
        assert_eq!(offers, vec![(true, vec!["1.2.0.dcm".to_string()])]);
        assert!(matches!(outcome, Outcome::Delivered(_)));
    }

    #[tokio::test]
    async fn a_failed_partial_offer_queues_the_whole_study_without_more_offers() {
        let partner = FakePartner {
            fail_offer: Some(0),
            ..Default::default()
        };
        let (outcome, entry) = run(&partner, vec![group("s1", 0, 3), group("s1", 3, 6)]).await;
        assert_eq!(
            partner.offers.lock().unwrap().len(),
            1,
            "no offer after a failure"
        );
        assert!(matches!(outcome, Outcome::Queued(_)), "{outcome:?}");
        // The failure is recorded once, against the whole, complete study.
        assert_eq!(
            partner.recorded.lock().unwrap().clone(),
            vec![(true, false, (0, 0))]
        );
        assert!(entry.complete);
        assert_eq!(entry.instances.len(), 6);
        assert_eq!(entry.state, OutboxState::Pending);
    }

    #[tokio::test]
    async fn a_receipt_that_does_not_show_the_whole_study_brings_a_whole_offer() {
        let partner = FakePartner {
            extra_held: Some(format!("{:064x}", 999)),
            ..Default::default()
        };
        let (outcome, _) = run(&partner, vec![group("s1", 0, 4)]).await;
        let offers = partner.offers.lock().unwrap().clone();
        assert_eq!(offers.len(), 3, "{offers:?}");
        assert!(offers[2].0);
        assert_eq!(offers[2].1.len(), 4, "the last offer lists the whole study");
        match outcome {
            Outcome::Delivered(sent) => assert_eq!((sent.stored, sent.already_held), (0, 4)),
            other => panic!("{other:?}"),
        }
    }

    /// A study of `n` instances held in memory under `budget`, in one group.
    fn held_group(budget: &Arc<MemoryBudget>, n: usize) -> StagedGroup {
        use sha2::Digest;
        let mut s = StagedStudy::default();
        for i in 0..n {
            let bytes = vec![i as u8; 1000 + i];
            let instance = OutboxInstance {
                file: format!("1.2.{i}.dcm"),
                sha256: hex::encode(sha2::Sha256::digest(&bytes)),
                size: bytes.len() as u64,
                sop_instance_uid: format!("1.2.{i}"),
            };
            let body = budget.hold(bytes).unwrap();
            s.instances
                .push((PathBuf::from(format!("in/{i}.dcm")), instance, Some(body)));
        }
        s.modalities.insert("CT".into());
        s.patient_tokens.insert("p1".into());
        BTreeMap::from([("s1".to_string(), s)])
    }

    /// A sealed outbox, a partner recording into it, and a budget; runs `send` of one group of
    /// `n` instances held in memory. Returns the outcome, the study's folder (kept in `tmp`).
    async fn run_held(
        tmp: &Path,
        n: usize,
        fail_offer: Option<usize>,
    ) -> (FakePartner, Outcome, PathBuf, Outbox) {
        let keys = crate::pseudonym::SiteKeys::from_bytes([7; 32], [9; 32]);
        let at_rest = crate::store::sealed::AtRest::new(&keys, true);
        let outbox = Outbox::new(tmp.join("outbox")).with_at_rest(at_rest);
        let budget = MemoryBudget::new(MEMORY_BUDGET);
        let partner = FakePartner {
            fail_offer,
            outbox: Some(outbox.clone()),
            budget: Some(budget.clone()),
            ..Default::default()
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tx.send(held_group(&budget, n)).unwrap();
        drop(tx);
        let mut studies = offer_as_they_come(&partner, &outbox, &route(), &mut rx).await;
        let study = studies.remove("s1").expect("one study");
        let dir = study.dir.clone();
        let outcome = finish(&partner, &outbox, study).await.unwrap();
        assert_eq!(
            budget.used(),
            0,
            "all memory given back once the study is done"
        );
        (partner, outcome, dir, outbox)
    }

    fn dcm_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.ends_with(".dcm"))
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn confirmed_instances_are_freed_at_their_receipt_and_only_the_last_is_written() {
        let tmp = tempfile::tempdir().unwrap();
        let (partner, outcome, dir, _) = run_held(tmp.path(), 5, None).await;
        assert!(matches!(outcome, Outcome::Delivered(_)), "{outcome:?}");
        let at_offer = partner.at_offer.lock().unwrap().clone();
        let one = |i: usize| (1000 + i) as u64;
        assert_eq!(
            at_offer,
            vec![
                ((0..5).map(one).sum(), true),
                // The four confirmed are freed; the one kept back was written, with the
                // entry, before the final offer.
                (one(4), true),
            ]
        );
        let entry = Outbox::load(&dir).unwrap();
        assert_eq!(entry.state, OutboxState::Delivered);
        assert_eq!((entry.instances.len(), entry.receipted), (5, 4));
        assert_eq!(entry.delivered, Some((5, 0)));
        assert!(dcm_files(&dir).is_empty(), "no working copy is left");
    }

    #[tokio::test]
    async fn a_failure_after_partial_offers_queues_the_unconfirmed_instances_durably() {
        let tmp = tempfile::tempdir().unwrap();
        let (_, outcome, dir, outbox) = run_held(tmp.path(), 5, Some(1)).await;
        assert!(matches!(outcome, Outcome::Queued(_)), "{outcome:?}");
        let mut entry = Outbox::load(&dir).unwrap();
        assert!(entry.complete && entry.flushed, "{entry:?}");
        assert_eq!(entry.state, OutboxState::Pending);
        assert_eq!(
            (entry.instances.len(), entry.receipted, entry.attempts),
            (5, 4, 1)
        );
        // The partner confirmed the first four: only the fifth waits, sealed, on disk.
        assert_eq!(dcm_files(&dir), vec!["1.2.4.dcm".to_string()]);
        let (sha, size) = outbox.at_rest().hash(&dir.join("1.2.4.dcm")).unwrap();
        assert_eq!(
            (hex::encode(sha), size),
            (entry.instances[4].sha256.clone(), 1004)
        );
        assert!(std::fs::read(dir.join("1.2.4.dcm"))
            .unwrap()
            .starts_with(crate::store::sealed::MAGIC));
        assert_eq!(outbox.due(u64::MAX).len(), 1, "queued for the node's retry");
        assert!(outbox.settle(&dir, &mut entry).unwrap());
    }

    #[tokio::test]
    async fn a_failed_first_offer_queues_every_instance_durably_as_before() {
        let tmp = tempfile::tempdir().unwrap();
        let (partner, outcome, dir, outbox) = run_held(tmp.path(), 5, Some(0)).await;
        assert!(matches!(outcome, Outcome::Queued(_)), "{outcome:?}");
        assert_eq!(partner.offers.lock().unwrap().len(), 1);
        let entry = Outbox::load(&dir).unwrap();
        assert!(entry.complete && entry.flushed && entry.state == OutboxState::Pending);
        assert_eq!((entry.instances.len(), entry.receipted), (5, 0));
        assert_eq!(
            dcm_files(&dir).len(),
            5,
            "every instance written, sealed and durable"
        );
        for i in &entry.instances {
            let (sha, size) = outbox.at_rest().hash(&dir.join(&i.file)).unwrap();
            assert_eq!((hex::encode(sha), size), (i.sha256.clone(), i.size));
        }
    }

    /// Minor page faults of this process so far (`/proc/self/stat`, field 10).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn minor_faults() -> u64 {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        after_name.split(' ').nth(7).unwrap().parse().unwrap()
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn freed_blocks_of_a_send_are_reused_without_faulting_in_fresh_pages() {
        reuse_freed_memory();
        let round = || {
            let mut chunk = Vec::<u8>::with_capacity(1 << 20);
            chunk.resize(1 << 20, 7);
            drop(std::hint::black_box(chunk));
        };
        round();
        let before = minor_faults();
        for _ in 0..64 {
            round();
        }
        let faults = minor_faults() - before;
        // A fresh 1 MiB block each time would be 256 faults a round (16384 in all); other
        // tests running meanwhile in this process fault a little too.
        assert!(
            faults < 4096,
            "{faults} page faults for 64 reused 1 MiB blocks"
        );
    }

    #[test]
    fn a_buffer_beyond_ahead_waits_for_the_offer_under_way_to_free_one() {
        let budget = MemoryBudget::with_ahead(1 << 20, 2000);
        let a = budget.hold(budget.buffer(1500)).unwrap();
        // No offer under way: beyond `ahead`, a new buffer is taken at once.
        let b = budget.hold(budget.buffer(1500)).unwrap();
        assert_eq!(budget.used(), 3000);
        drop(b);
        let spare = budget.buffer(1500);
        assert!(spare.capacity() >= 1500);
        let under_way = budget.offering();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiting = {
            let budget = budget.clone();
            std::thread::spawn(move || {
                let buffer = budget.buffer(1500);
                tx.send(buffer.as_ptr() as usize).unwrap();
            })
        };
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(300))
                .is_err(),
            "it waits while the offer is under way and 1500 bytes are held"
        );
        let freed = a.bytes().as_ptr() as usize;
        drop(a); // the offer's receipt frees it
        let got = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("the freed buffer ends the wait");
        assert_eq!(got, freed, "and it is that buffer, reused");
        waiting.join().unwrap();
        // An offer that ends without freeing anything ends the wait too.
        let c = budget.hold(budget.buffer(1500)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiting = {
            let budget = budget.clone();
            std::thread::spawn(move || tx.send(budget.buffer(1200).capacity()).unwrap())
        };
        assert!(rx
            .recv_timeout(std::time::Duration::from_millis(300))
            .is_err());
        drop(under_way);
        let capacity = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("no offer under way: no wait");
        assert!(capacity >= 1200);
        waiting.join().unwrap();
        drop((c, spare));
    }

    #[test]
    fn the_budget_holds_what_fits_frees_on_drop_and_reuses_buffers() {
        let budget = MemoryBudget::new(3000);
        let a = budget.hold(vec![1u8; 2000]).unwrap();
        let refused = budget.hold(vec![2u8; 1500]).unwrap_err();
        assert_eq!(refused.len(), 1500, "what does not fit is given back");
        let b = budget.hold(vec![3u8; 1000]).unwrap();
        assert_eq!(budget.used(), 3000);
        let ptr = a.bytes().as_ptr();
        drop(a);
        assert_eq!(budget.used(), 1000);
        let reused = budget.buffer(1990);
        assert!(reused.is_empty() && reused.capacity() >= 1990);
        assert_eq!(reused.as_ptr(), ptr, "the freed buffer is reused");
        assert!(budget.buffer(100).capacity() < 2000, "not a far larger one");
        drop(b);
        assert_eq!(budget.used(), 0);
    }
}
