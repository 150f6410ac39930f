//! A running site node: wires configuration, keys, TLS, agreements, store, vault, audit and the
//! federation service together.
//!
//! Owns: opening a node from its config ([`Node::open`]), serving the federation endpoint until a
//! shutdown signal ([`Node::serve`]) with the DICOM listener of `[dicom]` beside it, keeping the agreements in force current without a restart
//! (a watcher reloads the agreements folder when a file changes and cuts off transfers that the
//! new version no longer allows), and sending studies: [`Node::send`] stages files through the
//! `ingest` pipeline into the outbox and offers them to the partner; the forwarder sends what the
//! DICOM listener receives as it arrives; the outbox worker retries what could not go, and every
//! disclosure is audited. The pipeline itself (guard, admission, de-identification, staging)
//! lives in `ingest`, the DIMSE association layer in `dicom_net`. With `[dicom.deliver]`, `serve`
//! also runs the worker that forwards received instances to the site's PACS (`dicom_net::deliver`).
//! The return path (`results`, `federation::returns`) is wired here too: the origin's
//! `ReturnResult` desk, the partner's worker that sends queued results home, and the listener's
//! side door for results ([`returns`]).
//! `serve` also runs the retention task (`retention`: expired received studies are destroyed and
//! their origins get signed destruction receipts) and takes partners' destruction receipts.

mod policy;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::audit::{events, AuditLog, Event};
use crate::config::NodeConfig;
use crate::dicom_net::deliver::PacsDelivery;
use crate::dsa::{Agreement, AgreementSet};
use crate::federation::client::{PeerClient, SendError};
use crate::federation::proto::federation_server::FederationServer;
use crate::federation::receipt::ReceiptSigner;
use crate::federation::service::Receiver;
use crate::federation::tls::{self, SiteTls};
use crate::ingest::dimse::{DimseIngest, OpenStudies};
use crate::ingest::{files, HeldBack, IngestError, IngestFlow};
use crate::pseudonym::{SiteKeys, Vault};
use crate::send;
use crate::store::outbox::{self, Outbox, OutboxEntry, OutboxState};
use crate::store::quarantine::Quarantine;
use crate::store::{self, LocalStore, Store};

mod returns;
mod review;
pub use returns::{ReturnOutcome, ReturnReport};
pub use review::{ReleaseError, Released};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Keys(#[from] crate::pseudonym::KeyError),
    #[error(transparent)]
    Tls(#[from] crate::federation::tls::TlsError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    #[error(transparent)]
    Send(#[from] SendError),
    #[error("refused by the agreement: {0}")]
    Refused(#[from] crate::dsa::Refusal),
    #[error("no peer address is configured for site {0:?} (add [peers.{0}] to the node config)")]
    NoPeer(String),
    #[error("federation endpoint failed: {0}")]
    Serve(String),
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error(transparent)]
    Reidentify(#[from] crate::reidentify::ReidentifyError),
    #[error("nothing to send: the inputs hold no files")]
    NothingToSend,
    #[error("{0}")]
    PacsDelivery(String),
    #[error(transparent)]
    Result(#[from] crate::results::ResultError),
}

/// Loads the agreements a node may enforce: only those every party has signed over their exact
/// bytes with a certificate of the federation CA (`dsa::AgreementSet::load_enforced`).
///
/// A file that was enforced before (`previous`) and has since been edited without every party's
/// signature is not dropped silently, nor are its widening changes applied: the last fully signed
/// version stays in force with the edit's suspensions (agreement suspended or ended, a party
/// suspended or removed) applied on top. Narrowing needs no counter-signature, so one site's
/// privacy officer can cut a partner off at once; widening waits for every signature.
pub fn load_agreements(
    path: &Path,
    ca: &Path,
    previous: Option<&AgreementSet>,
) -> (AgreementSet, Vec<(PathBuf, String)>) {
    let (mut set, refused) = AgreementSet::load_enforced(path, ca);
    let mut reported = Vec::new();
    for (file, why) in refused {
        let edited = Agreement::from_file(&file).ok();
        let old = edited
            .as_ref()
            .and_then(|e| previous.and_then(|p| p.agreements.get(&e.id)));
        match (edited, old) {
            (Some(edited), Some(old)) if !set.agreements.contains_key(&edited.id) => {
                set.agreements
                    .insert(edited.id.clone(), narrowed(old, &edited));
                reported.push((
                    file,
                    format!(
                        "{why}; the last fully signed version stays in force, with this edit's suspensions applied"
                    ),
                ));
            }
            _ => reported.push((file, why)),
        }
    }
    (set, reported)
}

/// `old` with the suspensions of `edited` applied (and nothing else).
fn narrowed(old: &Agreement, edited: &Agreement) -> Agreement {
    use crate::dsa::{PartyStatus, Status};
    let mut a = old.clone();
    if matches!(edited.status, Status::Suspended | Status::Ended) && a.status == Status::Active {
        a.status = edited.status;
    }
    for p in &mut a.parties {
        if edited.party(&p.site).is_none_or(|e| e.is_suspended()) {
            p.status = PartyStatus::Suspended;
        }
    }
    a
}

/// A fingerprint of the agreements folder: every file's name, length and modification time,
/// including the signature folders beside the agreements.
fn agreements_fingerprint(path: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut files: Vec<PathBuf> = if path.is_dir() {
        walkdir::WalkDir::new(path)
            .max_depth(2)
            .into_iter()
            .flatten()
            .filter(|e| e.file_type().is_file())
            .map(|e| e.into_path())
            .collect()
    } else {
        let mut v = vec![path.to_owned()];
        v.extend(
            walkdir::WalkDir::new(crate::dsa::sign::signature_dir(path))
                .into_iter()
                .flatten()
                .map(|e| e.into_path()),
        );
        v
    };
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let m = std::fs::metadata(&p).ok();
            (
                p,
                m.as_ref().map(|m| m.len()).unwrap_or(0),
                m.and_then(|m| m.modified().ok()),
            )
        })
        .collect()
}

/// Opens the vault database under `data_dir/vault` (locked while open).
fn open_vault(data_dir: &Path, keys: &SiteKeys) -> Result<Vault, crate::store::StoreError> {
    let path = data_dir.join("vault");
    // A data folder in use whose vault went missing refuses to start (never a new empty vault).
    store::guard_component(data_dir, "vault", &path, false)?;
    let db = sled::open(&path).map_err(|e| match &e {
        sled::Error::Io(io) if io.to_string().contains("lock") => {
            crate::store::StoreError::InUse(path.clone())
        }
        _ => crate::store::StoreError::Index(e),
    })?;
    let tree = db
        .open_tree("vault")
        .map_err(crate::store::StoreError::Index)?;
    db.flush().map_err(crate::store::StoreError::Index)?;
    store::restrict_tree(&path)?;
    store::mark_component(data_dir, "vault")?;
    Ok(Vault::new(keys, tree))
}

/// True when `key_file` lies inside `data_dir` (compared as canonical paths where they exist).
fn key_file_inside(key_file: &Path, data_dir: &Path) -> bool {
    let key = std::fs::canonicalize(key_file).unwrap_or_else(|_| key_file.to_owned());
    let data = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_owned());
    key.starts_with(&data)
}

/// How often a serving node looks for due outbox entries.
pub const OUTBOX_POLL: Duration = Duration::from_secs(5);

/// How often a serving node looks for results queued to go home (`return` beside it).
pub const RETURNS_POLL: Duration = Duration::from_secs(1);

/// How often a serving node deletes quarantined items whose flow retention ended.
pub const QUARANTINE_SWEEP: Duration = Duration::from_secs(3600);

/// How often a serving node looks for received studies whose retention ended, and for
/// destruction receipts due for their origin.
pub const RETENTION_SWEEP: Duration = Duration::from_secs(600);

/// How long the working copies of a `send` killed before it queued its study stay in the outbox
/// before the retention sweep deletes them ([`Outbox::discard_abandoned`]).
pub const ABANDONED_SEND: Duration = Duration::from_secs(3600);

/// What one retention sweep did.
#[derive(Debug, Default, Clone)]
pub struct RetentionRun {
    /// Studies destroyed by this sweep (or finished after an interruption).
    pub destroyed: Vec<crate::store::retention::Destruction>,
    pub receipts: crate::retention::ReceiptsDelivered,
}

/// Outcome of sending.
#[derive(Debug, Default, Clone)]
pub struct SendReport {
    pub studies: Vec<SentStudy>,
    /// Inputs that did not go, each with why (quarantined, not covered by the flow, failed).
    pub held_back: Vec<HeldBack>,
    /// (study token, reason) for studies that could not be delivered now and wait in the
    /// outbox; the running node retries them with backoff.
    pub queued: Vec<(String, String)>,
}

/// One study delivered to a partner.
#[derive(Debug, Clone)]
pub struct SentStudy {
    pub study_token: String,
    pub instances: usize,
    pub instances_sent: usize,
    pub already_held: u32,
    pub bytes_sent: u64,
    /// Input path -> the de-identified instance's file in the outbox (its name; a delivered
    /// study keeps no instance files there, and `send` usually writes none).
    pub files: Vec<(PathBuf, PathBuf)>,
}

/// An open site node.
pub struct Node {
    pub config: NodeConfig,
    pub keys: SiteKeys,
    pub tls: SiteTls,
    pub audit: Arc<AuditLog>,
    agreements: watch::Sender<Arc<AgreementSet>>,
    /// Agreement files not enforced when the node opened, with why (audited at serve start).
    rejected_at_open: Vec<(PathBuf, String)>,
    /// Opened on first use: the receiving store by `serve`, the vault by `send`, so that a
    /// `send` process can run beside the site's `serve` process (each sled database is locked by
    /// the one process that opens it).
    store: std::sync::Mutex<Option<Arc<LocalStore>>>,
    vault: std::sync::Mutex<Option<Arc<Vault>>>,
    /// The vault while a serving node's users hold it (DIMSE associations, returned results):
    /// opened for the first, closed after the last, so `send` can run beside an idle node.
    vault_share: std::sync::Mutex<std::sync::Weak<Vault>>,
    /// The agreements folder as it was when the node opened.
    loaded_fingerprint: Vec<(PathBuf, u64, Option<SystemTime>)>,
    /// The clock retention is judged by (the system clock unless code holding the node sets
    /// another, see [`Node::set_clock`]), and whether a retention sweep is due now.
    clock: std::sync::RwLock<Arc<dyn crate::retention::Clock>>,
    retention_due: std::sync::atomic::AtomicBool,
    /// One retention sweep at a time (the serving loop's and a caller's).
    retention_sweeping: tokio::sync::Mutex<()>,
}

impl Node {
    /// Opens a node: loads keys (refusing a key file others can read), TLS material (checking the
    /// certificate names this site), the audit log (verifying its chain) and the agreements.
    pub fn open(config: NodeConfig) -> Result<Node, NodeError> {
        crate::federation::pki::validate_site_id(&config.site_id)
            .map_err(|e| NodeError::Input(e.to_string()))?;
        let keys = SiteKeys::load(&config.key_file)?;
        if key_file_inside(&config.key_file, &config.data_dir) {
            return Err(NodeError::Input(format!(
                "the key file {} is inside the data folder {}: a copy of the data would carry the keys that open it\n  help: move it out of the data folder and set `key_file` to its new place",
                config.key_file.display(),
                config.data_dir.display()
            )));
        }
        let loaded_fingerprint = agreements_fingerprint(&config.agreements);
        let tls = SiteTls::load(&config.site_id, &config.tls)?;
        store::private_dir(&config.data_dir)?;
        let audit = Arc::new(AuditLog::open_site(
            &config.data_dir.join("audit.log"),
            &crate::audit::SiteAudit {
                site: &config.site_id,
                key_pkcs8: &tls.key_pkcs8,
                cert_der: tls.cert.as_ref(),
                data_dir: &config.data_dir,
                config: &config.audit,
            },
        )?);
        store::private_file(audit.path())?;
        let (set, rejected) = load_agreements(&config.agreements, &config.tls.ca, None);
        crate::audit::alert::set_volume_limits(&audit, &set);
        for (f, why) in &rejected {
            tracing::error!(file = %f.display(), reason = %why, "agreement not enforced");
        }
        tls.pins.update(&set);
        let (agreements, _) = watch::channel(Arc::new(set));
        Ok(Node {
            config,
            keys,
            tls,
            audit,
            agreements,
            rejected_at_open: rejected,
            store: Default::default(),
            vault: Default::default(),
            vault_share: Default::default(),
            loaded_fingerprint,
            clock: std::sync::RwLock::new(Arc::new(crate::retention::SystemClock)),
            retention_due: std::sync::atomic::AtomicBool::new(true),
            retention_sweeping: Default::default(),
        })
    }

    /// The receiving store (opened on first use).
    pub fn store(&self) -> Result<Arc<LocalStore>, NodeError> {
        let mut slot = self.store.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            let path = self.config.data_dir.join("store");
            store::guard_component(&self.config.data_dir, "store", &path, false)?;
            *slot = Some(Arc::new(LocalStore::open_with(&path, self.at_rest())?));
            store::mark_component(&self.config.data_dir, "store")?;
        }
        Ok(slot.clone().expect("just opened"))
    }

    /// The origin-only vault (opened on first use, in its own database under `data/vault`).
    pub fn vault(&self) -> Result<Arc<Vault>, NodeError> {
        let mut slot = self.vault.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            let shared = self
                .vault_share
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .upgrade();
            *slot = Some(match shared {
                Some(v) => v,
                None => Arc::new(open_vault(&self.config.data_dir, &self.keys)?),
            });
        }
        Ok(slot.clone().expect("just opened"))
    }

    /// The vault for a serving node's users (DIMSE associations, returned results): the one
    /// already open in this process if any, else opened until its last user lets it go.
    pub fn shared_vault(&self) -> Result<Arc<Vault>, NodeError> {
        let slot = self.vault.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = slot.as_ref() {
            return Ok(v.clone());
        }
        let mut share = self.vault_share.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = share.upgrade() {
            return Ok(v);
        }
        let v = Arc::new(open_vault(&self.config.data_dir, &self.keys)?);
        *share = Arc::downgrade(&v);
        Ok(v)
    }

    /// A person's request for the original behind a token (`pacs-broker reidentify`): decided,
    /// audited and answered by [`crate::reidentify::reidentify`] against this node's users.
    pub fn reidentify(
        &self,
        req: &crate::reidentify::Request,
    ) -> Result<crate::pseudonym::VaultEntry, NodeError> {
        let users = crate::users::LocalUsers::from_config(&self.config.users)
            .map_err(|e| NodeError::Input(e.to_string()))?;
        let open = || self.vault().map_err(|e| e.to_string());
        Ok(crate::reidentify::reidentify(
            &self.agreements(),
            self.site_id(),
            &users,
            open,
            &self.audit,
            req,
        )?)
    }

    /// Replaces the clock retention is judged by, and makes a retention sweep due at once.
    /// For tests and rehearsals in a process that holds the node: nothing in the binary, its
    /// config or its environment can call this.
    pub fn set_clock(&self, clock: Arc<dyn crate::retention::Clock>) {
        *self.clock.write().unwrap_or_else(|p| p.into_inner()) = clock;
        self.retention_due
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Now, by the node's retention clock (Unix seconds).
    pub fn now(&self) -> u64 {
        self.clock.read().unwrap_or_else(|p| p.into_inner()).now()
    }

    /// One retention sweep (the serving node runs one every [`RETENTION_SWEEP`]): destroys the
    /// received studies whose flow's retention ended and sends their origins the signed
    /// destruction receipts still due (see `retention`).
    pub async fn sweep_retention(&self) -> Result<RetentionRun, NodeError> {
        let _one_at_a_time = self.retention_sweeping.lock().await;
        self.retention_due
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let store = self.store()?;
        let (set, audit) = (self.agreements(), self.audit.clone());
        let (site, now) = (self.site_id().to_string(), self.now());
        let (st, returns, outbox) = (store.clone(), self.return_queue(), self.outbox());
        let destroyed = tokio::task::spawn_blocking(move || {
            outbox.discard_abandoned(ABANDONED_SEND);
            crate::retention::sweep(&st, &returns, &set, &site, &audit, now)
        })
        .await
        .map_err(|e| NodeError::Serve(format!("retention sweep stopped: {e}")))??;
        let receipts = crate::retention::deliver_receipts(
            &store,
            &self.tls,
            &self.config.peers,
            &self.audit,
            now,
        )
        .await?;
        Ok(RetentionRun {
            destroyed,
            receipts,
        })
    }

    /// The serving node's retention task: a sweep at start, every [`RETENTION_SWEEP`], and soon
    /// after the clock is set. (Aborting it mid-sweep is safe: deletions run to their end on the
    /// blocking pool, and an interrupted destruction is finished by the next sweep.)
    async fn run_retention(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut last: Option<std::time::Instant> = None;
        let mut shreds_settled = std::collections::BTreeSet::new();
        loop {
            shreds_settled = self.complete_shreds(shreds_settled).await;
            let due = self.retention_due.load(std::sync::atomic::Ordering::SeqCst);
            if due || last.is_none_or(|t| t.elapsed() >= RETENTION_SWEEP) {
                last = Some(std::time::Instant::now());
                if let Err(e) = self.sweep_retention().await {
                    tracing::error!(error = %e, "retention sweep failed; retried at the next one");
                }
            }
            if pause(&mut stop, Duration::from_millis(500)).await {
                break;
            }
        }
    }

    /// Deletes the vault records of agreements `vault shred` shredded beside this running node
    /// (see [`crate::custody::complete_pending_shreds`]); `settled` is carried between rounds.
    async fn complete_shreds(
        self: &Arc<Self>,
        mut settled: std::collections::BTreeSet<String>,
    ) -> std::collections::BTreeSet<String> {
        let node = self.clone();
        let kept = settled.clone();
        tokio::task::spawn_blocking(move || {
            crate::custody::complete_pending_shreds(
                &node.keys,
                || node.shared_vault().map_err(|e| e.to_string()),
                &node.audit,
                &mut settled,
            );
            settled
        })
        .await
        .unwrap_or(kept)
    }

    /// Opens a node from a config file.
    pub fn open_config(path: &Path) -> Result<Node, NodeError> {
        Node::open(NodeConfig::load(path)?)
    }

    pub fn site_id(&self) -> &str {
        &self.config.site_id
    }

    /// The agreements in force now.
    pub fn agreements(&self) -> Arc<AgreementSet> {
        self.agreements.borrow().clone()
    }

    /// Re-reads the agreements folder and puts the result in force at once (in-flight transfers
    /// are re-authorised against it).
    pub fn reload_agreements(&self) {
        let previous = self.agreements();
        let (set, rejected) = load_agreements(
            &self.config.agreements,
            &self.config.tls.ca,
            Some(&previous),
        );
        for (f, why) in &rejected {
            tracing::error!(file = %f.display(), reason = %why, "agreement not enforced");
        }
        tracing::info!(agreements = set.agreements.len(), "agreements reloaded");
        self.tls.update_pins(&set);
        crate::audit::alert::set_volume_limits(&self.audit, &set);
        let (path, reload) = (&self.config.agreements, policy::Trigger::Reload);
        policy::audit_policy(&self.audit, path, &set, Some(&previous), &rejected, reload);
        self.agreements.send_replace(Arc::new(set));
    }

    /// Serves the federation endpoint on `listener` until `shutdown` completes. A watcher reloads
    /// the agreements within 250 ms of a file change.
    pub async fn serve(
        self: &Arc<Self>,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), NodeError> {
        if !self.config.storage.encrypt_at_rest {
            tracing::warn!(
                "encryption at rest is OFF ([storage] encrypt_at_rest = false): received, queued and held instances are kept in plaintext; only do this on an encrypted disk"
            );
        }
        let receiver = Arc::new(
            Receiver::new(
                self.config.site_id.clone(),
                self.store()? as Arc<dyn Store>,
                self.agreements.subscribe(),
                self.audit.clone(),
                ReceiptSigner::new(&self.tls.key_pkcs8),
            )
            .with_limits(self.config.limits.clone())
            .with_connections(self.tls.connections.clone())
            .with_destruction_ledger(Arc::new(
                crate::federation::destruction::DestructionLedger::new(&self.config.data_dir),
            ))
            .with_returns(Arc::new(self.return_desk()?)),
        );
        // [dicom.deliver]: queue every received instance for the site's PACS and forward it.
        let pacs = match self.config.dicom.as_ref().and_then(|d| d.deliver.as_ref()) {
            Some(target) => Some(
                PacsDelivery::new(target, self.site_id(), self.store()?, self.audit.clone())
                    .map_err(NodeError::PacsDelivery)?
                    .with_agreements(self.agreements.subscribe())
                    .start(),
            ),
            None => None,
        };
        // The background loops end at their next pause once told to (work in flight, blocking
        // work holding the node included, completes): `serve` waits for them, so a stopped node
        // no longer holds its store and vault when it returns.
        let (tasks_stop_tx, tasks_stop) = watch::channel(false);
        let watcher = {
            let (node, receiver, mut stop) = (self.clone(), receiver.clone(), tasks_stop.clone());
            tokio::spawn(async move {
                // What was loaded at open: a change made since (before this task ran) counts.
                let mut last = node.loaded_fingerprint.clone();
                let mut tick = 0u32;
                loop {
                    if pause(&mut stop, Duration::from_millis(250)).await {
                        break;
                    }
                    let now = agreements_fingerprint(&node.config.agreements);
                    if now != last {
                        last = now;
                        node.reload_agreements();
                    }
                    if let Some(r) = node.tls.reload_crl_if_changed() {
                        node.audit.record_or_warn(events::crl_reload(r));
                    }
                    tick = tick.wrapping_add(1);
                    if tick.is_multiple_of(4) {
                        receiver.housekeeping();
                    }
                }
            })
        };
        let worker = {
            let (node, mut stop) = (self.clone(), tasks_stop.clone());
            tokio::spawn(async move {
                let mut last_sweep: Option<std::time::Instant> = None;
                loop {
                    if last_sweep.is_none_or(|t| t.elapsed() >= QUARANTINE_SWEEP) {
                        last_sweep = Some(std::time::Instant::now());
                        let n = node.clone();
                        let _ = tokio::task::spawn_blocking(move || n.sweep_quarantine()).await;
                    }
                    node.drain_outbox(false).await;
                    if pause(&mut stop, OUTBOX_POLL).await {
                        break;
                    }
                }
            })
        };
        // The return path at a partner: results queued by the DICOM listener or `return` go home.
        let returns_wake = Arc::new(tokio::sync::Notify::new());
        let returner = {
            // Weak: a stopped node is dropped (its databases closed) even before this task is.
            let (node, wake) = (Arc::downgrade(self), returns_wake.clone());
            let mut stop = tasks_stop.clone();
            tokio::spawn(async move {
                loop {
                    let Some(n) = node.upgrade() else { break };
                    n.drain_returns().await;
                    let _ = tokio::task::spawn_blocking(move || n.sweep_delivered_results()).await;
                    let stopping = tokio::select! {
                        _ = wake.notified() => false,
                        s = pause(&mut stop, RETURNS_POLL) => s,
                    };
                    if stopping {
                        break;
                    }
                }
            })
        };
        let retention = tokio::spawn(self.clone().run_retention(tasks_stop));
        let background = [watcher, worker, returner, retention];
        let (stop_tx, stop) = watch::channel(false);
        let dicom = match self.config.dicom.clone().filter(|d| d.has_listener()) {
            Some(cfg) => match self.start_dicom(cfg, stop, returns_wake).await {
                Ok(tasks) => tasks,
                Err(e) => {
                    end_background(&tasks_stop_tx, background).await;
                    return Err(e);
                }
            },
            None => Vec::new(),
        };
        let addr = listener.local_addr().ok();
        tracing::info!(site = %self.config.site_id, ?addr, "federation endpoint listening (mutual TLS 1.3)");
        self.audit_start(addr);
        let incoming = tls::incoming(listener, &self.tls, &self.config.limits);
        let flush_at_stop = receiver.clone();
        let shutdown = async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        };
        let result = tonic::transport::Server::builder()
            // Calls in flight per connection (each may carry a message of up to 4 MiB); with
            // `[limits] connections_per_peer` this bounds what one partner has in flight.
            .max_concurrent_streams(Some(16))
            // Flow-control windows sized for 1 MiB chunks: with h2's default 64 KiB a transfer
            // stalls on WINDOW_UPDATE round trips (the sender's adaptive window only governs
            // what it receives). A partner can have at most this much unread per connection.
            .initial_stream_window_size(Some(crate::federation::STREAM_WINDOW))
            .initial_connection_window_size(Some(crate::federation::CONNECTION_WINDOW))
            .serve_with_incoming_shutdown(FederationServer::from_arc(receiver), incoming, shutdown)
            .await
            .map_err(|e| NodeError::Serve(e.to_string()));
        // The DICOM listener drains its associations; the forwarder ends its round.
        for t in dicom {
            let _ = t.await;
        }
        end_background(&tasks_stop_tx, background).await;
        if let Some(pacs) = pacs {
            pacs.stop().await;
        }
        flush_at_stop.flush_audit();
        self.audit_stop(&result);
        result
    }

    /// Audits that `serve` stopped, and how.
    fn audit_stop(&self, result: &Result<(), NodeError>) {
        self.audit.record_or_warn(events::admin(
            events::actor::NODE.into(),
            events::kind::NODE_STOP,
            format!("site {} stopped serving", self.site_id()),
            match result {
                Ok(()) => "ok".into(),
                Err(e) => format!("failed: {e}"),
            },
        ));
    }

    /// Audits that `serve` started (by whom, where) and the policy it enforces.
    fn audit_start(&self, addr: Option<std::net::SocketAddr>) {
        let dicom = self
            .config
            .dicom
            .as_ref()
            .filter(|d| d.has_listener())
            .map(|d| format!(", DICOM listener {} as {}", d.listen, d.ae_title))
            .unwrap_or_default();
        let addr = addr.map_or_else(|| self.config.listen.clone(), |a| a.to_string());
        self.audit.record_or_warn(events::admin(
            crate::audit::local_user(),
            events::kind::NODE_START,
            format!("site {} serving on {addr}{dicom}", self.site_id()),
            "ok".into(),
        ));
        policy::audit_policy(
            &self.audit,
            &self.config.agreements,
            &self.agreements(),
            None,
            &self.rejected_at_open,
            policy::Trigger::ServeStart,
        );
    }

    /// The file that holds agreement `id` in the agreements folder.
    pub fn agreement_file(&self, id: &str) -> Option<PathBuf> {
        let dir = &self.config.agreements;
        let files: Vec<PathBuf> = if dir.is_dir() {
            std::fs::read_dir(dir)
                .ok()?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "toml"))
                .collect()
        } else {
            vec![dir.clone()]
        };
        files
            .into_iter()
            .find(|f| Agreement::from_file(f).is_ok_and(|a| a.id == id))
    }

    /// The node's durable outbox.
    pub fn outbox(&self) -> Outbox {
        Outbox::new(self.config.data_dir.join("outbox")).with_at_rest(self.at_rest())
    }

    /// The node's quarantine of held-back instances (`data_dir/quarantine`).
    pub fn quarantine(&self) -> Result<Quarantine, NodeError> {
        Ok(Quarantine::open(&self.config.data_dir)?.with_at_rest(self.at_rest()))
    }

    /// How this node seals what it keeps (`[storage] encrypt_at_rest`, keys from the key file).
    pub fn at_rest(&self) -> store::sealed::AtRest {
        store::sealed::AtRest::new(&self.keys, self.config.storage.encrypt_at_rest)
    }

    /// Deletes quarantined items whose flow retention has ended, auditing each.
    pub fn sweep_quarantine(&self) {
        let Ok(q) = self.quarantine() else { return };
        for item in q.sweep(outbox::now()) {
            self.audit.record_or_warn(Event {
                actor: "node".into(),
                action: "quarantine-expire".into(),
                object: format!("quarantine item {}", item.id),
                agreement: item.agreement,
                purpose: String::new(),
                outcome: "deleted (flow retention ended)".into(),
            });
        }
    }

    /// One delivery attempt of a queued study: the agreement must still allow it; the partner
    /// gets an offer and the instances it lacks; the signed receipt is verified; the outcome is
    /// recorded in the outbox and the audit log.
    pub async fn attempt(
        &self,
        dir: &Path,
        entry: &mut OutboxEntry,
    ) -> Result<crate::federation::client::Delivery, SendError> {
        let result = self.try_deliver(dir, entry).await;
        self.record_attempt(dir, entry, &result, (0, 0));
        result
    }

    /// Records the outcome of an attempt at `entry` (see [`Node::attempt`]); a delivered complete
    /// study's outbox entry counts `earlier` (stored, already held) of the partial offers that
    /// went before (`send`) besides the receipt's.
    fn record_attempt(
        &self,
        dir: &Path,
        entry: &mut OutboxEntry,
        result: &Result<crate::federation::client::Delivery, SendError>,
        earlier: (u32, u32),
    ) {
        let outbox = self.outbox();
        let audit = |outcome: String, sent: usize| Event {
            actor: "node".into(),
            action: "disclose".into(),
            object: format!(
                "study {} ({} instances, {sent} sent) to site:{}",
                entry.study_token,
                entry.instances.len(),
                entry.to
            ),
            agreement: entry.agreement.clone(),
            purpose: entry.purpose.clone(),
            outcome,
        };
        let detail = |receipt: Option<String>| crate::audit::Detail {
            patient_tokens: entry.patient_tokens.clone(),
            study: Some(entry.study_token.clone()),
            party: Some(entry.to.clone()),
            flow: Some(entry.flow.clone()),
            instances: Some(entry.instances.len() as u64),
            receipt,
        };
        match result {
            Ok(d) if !entry.complete => {
                // Part of a study still arriving: the files stay until the study is complete.
                // These instances have left: the entry carries the patient tokens and receipt
                // so the accounting of disclosures finds it even if the study never completes.
                use prost::Message;
                let receipt = Some(hex::encode(d.receipt.encode_to_vec()));
                self.audit.record_detailed_or_warn(
                    audit(
                        "ok (signed receipt verified; more instances to come)".into(),
                        d.instances_sent,
                    ),
                    detail(receipt),
                );
            }
            Ok(d) => {
                use prost::Message;
                let receipt = Some(hex::encode(d.receipt.encode_to_vec()));
                self.audit.record_detailed_or_warn(
                    audit("ok (signed receipt verified)".into(), d.instances_sent),
                    detail(receipt),
                );
                if let Some(cert) = &d.receiver_certificate {
                    self.audit.accept_partner_checkpoint(
                        &entry.to,
                        cert.as_ref(),
                        &d.receipt.audit_checkpoint,
                    );
                }
                if let Err(e) = outbox.mark_delivered(
                    dir,
                    entry,
                    earlier.0 + d.receipt.instances_stored,
                    earlier.1 + d.receipt.instances_already_held,
                ) {
                    tracing::error!(error = %e, "delivered, but the outbox entry could not be updated");
                }
            }
            Err(e) => {
                let transient = e.is_transient();
                let note = if transient {
                    "queued for retry: "
                } else {
                    "failed: "
                };
                let (event, details) = (audit(format!("{note}{e}"), 0), detail(None));
                // The study's copies are made durable before it is called queued.
                if let Err(err) = outbox.mark_attempt_failed(entry, &e.to_string(), transient) {
                    tracing::error!(error = %err, "the outbox entry could not be updated");
                }
                self.audit.record_detailed_or_warn(event, details);
            }
        }
    }

    async fn try_deliver(
        &self,
        dir: &Path,
        entry: &OutboxEntry,
    ) -> Result<crate::federation::client::Delivery, SendError> {
        self.try_deliver_over(&mut None, dir, entry, &[]).await
    }

    /// [`Node::try_deliver`] over the connection in `connection` when it goes to the same
    /// partner (`send`'s offers of one study share one), else over a new one left there; a
    /// failed attempt drops it. Instances whose `bodies` entry holds them in memory (`send`)
    /// are streamed from there, the others from their files in `dir`.
    async fn try_deliver_over(
        &self,
        connection: &mut Option<PeerClient>,
        dir: &Path,
        entry: &OutboxEntry,
        bodies: &[Option<crate::federation::client::InstanceBody>],
    ) -> Result<crate::federation::client::Delivery, SendError> {
        let set = self.agreements();
        set.authorise(
            &entry.agreement,
            &entry.flow,
            Some(&entry.purpose),
            self.site_id(),
            &entry.to,
        )
        .map_err(|r| SendError::Refused(r.to_string()))?;
        let peer =
            self.config.peers.get(&entry.to).cloned().ok_or_else(|| {
                SendError::Refused(NodeError::NoPeer(entry.to.clone()).to_string())
            })?;
        let server_name = peer.server_name.clone().unwrap_or_else(|| {
            peer.address
                .rsplit_once(':')
                .map(|(h, _)| h.trim_matches(['[', ']']).to_string())
                .unwrap_or_else(|| peer.address.clone())
        });
        let instances = Outbox::outgoing(dir, entry)
            .map_err(|e| SendError::Refused(format!("outbox entry unusable: {e}")))?;
        let reuse = connection
            .as_ref()
            .is_some_and(|c| c.site() == entry.to && c.address() == peer.address);
        let client = match connection {
            Some(c) if reuse => c,
            _ => connection.insert(
                PeerClient::connect(&self.tls, &entry.to, &peer.address, &server_name)
                    .await?
                    .reading_at_rest(self.at_rest()),
            ),
        };
        client.set_audit_checkpoint(self.audit.checkpoint_for_peer());
        let result = client
            .send_study_from(
                &entry.agreement,
                &entry.flow,
                &entry.purpose,
                &entry.study_token,
                entry.modalities.clone(),
                &instances,
                bodies,
                entry.complete,
            )
            .await;
        if result.is_err() {
            *connection = None;
        }
        result
    }

    /// Attempts every due outbox entry once (each under its lock), or every pending one when
    /// `all_pending` is set (an operator's retry); returns how many were delivered.
    pub async fn drain_outbox(&self, all_pending: bool) -> usize {
        let mut delivered = 0;
        let due_by = if all_pending { u64::MAX } else { outbox::now() };
        for (dir, _) in self.outbox().due(due_by) {
            let Some(_claim) = Outbox::try_claim(&dir) else {
                continue;
            };
            // Re-read under the lock: another process may have delivered it meanwhile.
            let mut entry = match Outbox::load(&dir) {
                Ok(e) if e.state == OutboxState::Pending => e,
                _ => continue,
            };
            // Left unflushed by a `send` that stopped: re-verified, and made durable or dropped.
            match self.outbox().settle(&dir, &mut entry) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    tracing::error!(study = %entry.study_token, error = %e, "an interrupted send's outbox study could not be settled");
                    continue;
                }
            }
            match self.attempt(&dir, &mut entry).await {
                Ok(_) => {
                    delivered += 1;
                    tracing::info!(study = %entry.study_token, to = %entry.to, "queued study delivered");
                }
                Err(e) => {
                    tracing::warn!(study = %entry.study_token, to = %entry.to, attempts = entry.attempts, error = %e, "queued study not delivered")
                }
            }
        }
        delivered
    }

    /// The flow `agreement`/`flow` resolved for sending from this site (see
    /// [`IngestFlow::resolve`]), with a partner address configured for its receiver.
    pub fn ingest_flow(
        &self,
        agreement: &str,
        flow: &str,
        purpose: Option<&str>,
    ) -> Result<IngestFlow, IngestError> {
        let set = self.agreements();
        let file = set
            .agreements
            .contains_key(agreement)
            .then(|| self.agreement_file(agreement))
            .flatten();
        let resolved = IngestFlow::resolve(
            &set,
            self.site_id(),
            agreement,
            flow,
            purpose,
            file.as_deref(),
            &self.keys,
        )?;
        if !self.config.peers.contains_key(&resolved.to) {
            return Err(IngestError::NoPeer(resolved.to.clone()));
        }
        Ok(resolved)
    }

    /// De-identifies `inputs` under (agreement, flow) through the ingest pipeline and sends
    /// every resulting study to the flow's receiver. Inputs held back (quarantined, not covered
    /// by the flow, failed) are reported with their reason, never sent.
    pub async fn send(
        &self,
        agreement_id: &str,
        flow_name: &str,
        purpose: Option<&str>,
        inputs: &[PathBuf],
    ) -> Result<SendReport, NodeError> {
        let flow = match self.ingest_flow(agreement_id, flow_name, purpose) {
            Ok(f) => Arc::new(f),
            Err(e) => {
                // Audit (issue 13): sender-side refusals are accounted for as well.
                self.audit.record_or_warn(Event {
                    actor: crate::audit::local_user(),
                    action: "refuse".into(),
                    object: format!("send under flow {flow_name}"),
                    agreement: agreement_id.to_string(),
                    purpose: purpose.unwrap_or_default().to_string(),
                    outcome: e.to_string(),
                });
                return Err(e.into());
            }
        };
        // De-identification holds the instances in memory (or spills them to the outbox) and
        // hands them on group by group; each group is offered to the partner while the next
        // ones are de-identified (`crate::send`).
        let (vault, outbox) = (self.vault()?, self.outbox());
        let (groups_tx, mut groups) = tokio::sync::mpsc::unbounded_channel();
        let (f, inputs) = (flow.clone(), inputs.to_vec());
        let memory = send::MemoryBudget::new(send::MEMORY_BUDGET);
        let deidentifying = tokio::task::spawn_blocking(move || {
            files::ingest_files(&f, &inputs, &outbox, &vault, &memory, &mut |group| {
                groups_tx.send(group).map_err(|_| IngestError::Input {
                    path: PathBuf::from("."),
                    reason: "the send stopped before de-identification ended".into(),
                })
            })
        });
        let route = OutboxEntry::pending(
            &flow.agreement,
            &flow.flow,
            &flow.purpose,
            &flow.to,
            "",
            true,
        );
        let outbox = self.outbox();
        let courier = SendCourier {
            node: self,
            connection: Default::default(),
        };
        let studies = send::offer_as_they_come(&courier, &outbox, &route, &mut groups).await;
        let held_back = deidentifying
            .await
            .map_err(|e| NodeError::Serve(format!("de-identification stopped: {e}")))??;
        let mut report = SendReport {
            held_back,
            ..Default::default()
        };
        if studies.is_empty() && report.held_back.is_empty() {
            return Err(NodeError::NothingToSend);
        }
        self.hold_for_review(&flow.agreement, &flow.flow, "send", &mut report.held_back);
        self.audit_not_sent(&flow, &report.held_back);
        for study in studies.values() {
            self.audit_pixel_cleaning(&flow.agreement, &flow.purpose, &study.cleaned);
        }
        for (study_token, study) in studies {
            let (instances, files) = (study.len(), study.files.clone());
            match send::finish(&courier, &outbox, study).await? {
                send::Outcome::Delivered(sent) => report.studies.push(SentStudy {
                    study_token,
                    instances,
                    instances_sent: sent.instances_sent,
                    already_held: sent.already_held,
                    bytes_sent: sent.bytes_sent,
                    files,
                }),
                send::Outcome::Queued(why) => report.queued.push((study_token, why)),
                send::Outcome::Failed(e) => return Err(e.into()),
            }
        }
        Ok(report)
    }

    /// Starts the DICOM listener of `[dicom]` and the forwarder that sends what it receives on
    /// to the partner as it arrives; both stop when `stop` turns true (the listener drains).
    async fn start_dicom(
        self: &Arc<Self>,
        cfg: crate::config::DicomConfig,
        stop: watch::Receiver<bool>,
        returns_wake: Arc<tokio::sync::Notify>,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>, NodeError> {
        let open = Arc::new(OpenStudies::new(Duration::from_secs(cfg.study_quiet_secs)));
        // The ingest log: instances acknowledged by the last run and not yet in the outbox are
        // moved there first (below), before the open studies are read back and forwarded.
        let (wal, logged) = crate::ingest::wal::Wal::open(
            &self.config.data_dir.join("ingest").join("wal"),
            self.at_rest(),
        )
        .map_err(|e| NodeError::Serve(format!("cannot open the DICOM ingest log: {e}")))?;
        let node = self.clone();
        let resolve = Box::new(move |route: &crate::config::DicomRoute| {
            node.ingest_flow(&route.agreement, &route.flow, route.purpose.as_deref())
        });
        let service = Arc::new(
            DimseIngest::new(
                cfg.routes.clone(),
                resolve,
                self.outbox(),
                {
                    let node = self.clone();
                    Box::new(move || node.shared_vault().map_err(|e| e.to_string()))
                },
                self.audit.clone(),
                open.clone(),
                {
                    let node = self.clone();
                    Box::new(
                        move |flow: &IngestFlow, source: &str, held: &mut HeldBack| {
                            node.hold_for_review(
                                &flow.agreement,
                                &flow.flow,
                                &format!("dicom:{source}"),
                                std::slice::from_mut(held),
                            )
                        },
                    )
                },
            )
            .with_log(wal, logged)
            .map_err(|e| NodeError::Serve(format!("cannot move the DICOM ingest log: {e}")))?,
        );
        let recovered = open.recover(&self.outbox());
        if recovered > 0 {
            tracing::info!(
                studies = recovered,
                "studies left open by the last run are forwarded again"
            );
        }
        let dimse = service.clone();
        let tcp = TcpListener::bind(&cfg.listen).await.map_err(|e| {
            NodeError::Serve(format!("cannot listen for DICOM on {}: {e}", cfg.listen))
        })?;
        tracing::info!(addr = %cfg.listen, ae_title = %cfg.ae_title, "DICOM listener ready");
        let spool = self.config.data_dir.join("ingest").join("spool");
        // Results on received studies go home before any route is consulted.
        let service = Arc::new(crate::results::intake::WithResults {
            intake: Arc::new(self.result_intake(!cfg.routes.is_empty(), returns_wake)),
            inner: service,
        });
        let listener = Arc::new(
            crate::dicom_net::scp::Listener::new(cfg, service, self.audit.clone(), spool)
                .map(|l| l.with_at_rest(self.at_rest()))
                .map_err(|e| {
                    NodeError::Serve(format!("cannot prepare the DICOM spool folder: {e}"))
                })?
                .with_refusal_window(Duration::from_secs(self.config.limits.refusal_summary_secs)),
        );
        let until = |mut stop: watch::Receiver<bool>| async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        let stopping = until(stop.clone());
        let serving = tokio::spawn(async move {
            listener.serve(tcp, stopping).await;
            // What was acknowledged goes into the outbox before the node stops (anything left
            // is in the ingest log and moved at the next start).
            let _ = tokio::task::spawn_blocking(move || dimse.drain(Duration::from_secs(30))).await;
        });
        let forwarder = tokio::spawn(self.clone().forward_open_studies(open, stop));
        Ok(vec![serving, forwarder])
    }

    /// Sends each study arriving over DICOM on to its partner as its instances come (several
    /// offers, each with what has arrived), and once it has been quiet for the configured time,
    /// a last offer that tells the partner the study is complete.
    async fn forward_open_studies(
        self: Arc<Self>,
        open: Arc<OpenStudies>,
        mut stop: watch::Receiver<bool>,
    ) {
        // One connection to the partner for the offers that follow each other (a new one after
        // a failed attempt, an idle pause, or a while).
        let mut connection: Option<PeerClient> = None;
        let (mut connected, mut used) = (Instant::now(), Instant::now());
        loop {
            for f in open.due() {
                // The whole entry is saved; the offer lists what the partner lacks (`offer`),
                // streamed from memory where the listener still holds it (`offer_bodies`).
                let (entry, mut offer) = (f.entry.clone(), f.offer());
                // The outbox worker may be retrying the same study (after a failed final
                // offer): one attempt at a time.
                let Some(_claim) = Outbox::try_claim(&f.dir) else {
                    open.done(&f, Err(Duration::from_secs(1)));
                    continue;
                };
                let outcome = match self.outbox().save(&entry) {
                    Err(e) => {
                        tracing::error!(error = %e, "cannot update an open outbox study");
                        Err(Duration::from_secs(5))
                    }
                    Ok(_) => {
                        if used.elapsed() > FORWARD_IDLE || connected.elapsed() > FORWARD_REUSE {
                            connection = None;
                        }
                        let fresh = connection.is_none();
                        let result = self
                            .try_deliver_over(&mut connection, &f.dir, &offer, &f.offer_bodies())
                            .await;
                        if fresh {
                            connected = Instant::now();
                        }
                        used = Instant::now();
                        self.record_attempt(&f.dir, &mut offer, &result, (0, 0));
                        match result {
                            Ok(_) => Ok(()),
                            Err(e) => {
                                // A failed partial offer was recorded as the offer: the outbox
                                // keeps the whole study.
                                if !entry.complete {
                                    let _ = self.outbox().save(&f.with_outcome_of(&offer));
                                }
                                if e.is_transient() {
                                    Err(Duration::from_secs(outbox::backoff_secs(offer.attempts)))
                                } else {
                                    Err(Duration::from_secs(24 * 3600))
                                }
                            }
                        }
                    }
                };
                open.done(&f, outcome);
            }
            tokio::select! {
                _ = open.wake.notified() => {}
                _ = tokio::time::sleep(open.next_check()) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
    }
}

/// The forwarder's connection to a partner is not used again after this long unused...
const FORWARD_IDLE: Duration = Duration::from_secs(10);
/// ...or this long after it was made (its peer's certificate is checked again on the next).
const FORWARD_REUSE: Duration = Duration::from_secs(300);

/// The node as `send`'s [`send::Courier`]: the offers of one `send` share one connection to
/// the partner.
struct SendCourier<'a> {
    node: &'a Node,
    connection: tokio::sync::Mutex<Option<PeerClient>>,
}

impl send::Courier for SendCourier<'_> {
    async fn deliver(
        &self,
        dir: &Path,
        offer: &OutboxEntry,
        bodies: &[Option<crate::federation::client::InstanceBody>],
    ) -> Result<crate::federation::client::Delivery, SendError> {
        let mut connection = self.connection.lock().await;
        self.node
            .try_deliver_over(&mut connection, dir, offer, bodies)
            .await
    }

    fn record(
        &self,
        dir: &Path,
        entry: &mut OutboxEntry,
        result: &Result<crate::federation::client::Delivery, SendError>,
        earlier: (u32, u32),
    ) {
        self.node.record_attempt(dir, entry, result, earlier)
    }
}

/// Waits `d`, or until `stop` is set (or its sender gone); true when the caller should stop.
async fn pause(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    if *stop.borrow() {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stop.wait_for(|s| *s) => true,
    }
}

/// How long `serve` waits at stop for its background loops to end their round.
const BACKGROUND_GRACE: Duration = Duration::from_secs(20);

/// Tells the serving node's background loops to stop and waits for them (their rounds in
/// flight complete); one still busy after [`BACKGROUND_GRACE`] is aborted, with a warning.
async fn end_background(stop: &watch::Sender<bool>, tasks: [tokio::task::JoinHandle<()>; 4]) {
    let _ = stop.send(true);
    let deadline = tokio::time::Instant::now() + BACKGROUND_GRACE;
    for mut t in tasks {
        if tokio::time::timeout_at(deadline, &mut t).await.is_err() {
            tracing::warn!("a background task did not end its round in time; aborted");
            t.abort();
        }
    }
}
