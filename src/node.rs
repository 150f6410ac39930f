//! A running site node: wires configuration, keys, TLS, agreements, store, vault, audit and the
//! federation service together.
//!
//! Owns: opening a node from its config ([`Node::open`]), serving the federation endpoint until a
//! shutdown signal ([`Node::serve`]), keeping the agreements in force current without a restart
//! (a watcher reloads the agreements folder when a file changes and cuts off transfers that the
//! new version no longer allows), and sending studies ([`Node::send`]): authorise the flow locally,
//! de-identify into the outbox, record tokens in the vault, offer and transfer to the partner,
//! and audit the disclosure.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::audit::{AuditLog, Event};
use crate::config::NodeConfig;
use crate::deid::batch::{self, NotDeidentified};
use crate::deid::Deidentifier;
use crate::dsa::{Agreement, AgreementSet};
use crate::federation::client::{OutgoingInstance, PeerClient, SendError};
use crate::federation::proto::federation_server::FederationServer;
use crate::federation::receipt::ReceiptSigner;
use crate::federation::service::Receiver;
use crate::federation::tls::{self, SiteTls};
use crate::pseudonym::{SiteKeys, Vault};
use crate::store::outbox::{self, Outbox, OutboxEntry, OutboxInstance, OutboxState};
use crate::store::{self, LocalStore, Store};

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
    #[error("nothing to send: no input produced a de-identified instance")]
    NothingToSend,
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

/// How often a serving node looks for due outbox entries.
pub const OUTBOX_POLL: Duration = Duration::from_secs(5);

/// Outcome of sending.
#[derive(Debug, Default, Clone)]
pub struct SendReport {
    pub studies: Vec<SentStudy>,
    /// (input path, reason) for instances held back on purpose.
    pub quarantined: Vec<(PathBuf, String)>,
    /// (input path, reason) for inputs that are not usable DICOM.
    pub failed: Vec<(PathBuf, String)>,
    /// (input path, reason) for instances the flow's study selector does not cover.
    pub not_selected: Vec<(PathBuf, String)>,
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
    /// Input path -> de-identified file in the outbox.
    pub files: Vec<(PathBuf, PathBuf)>,
}

/// An open site node.
pub struct Node {
    pub config: NodeConfig,
    pub keys: SiteKeys,
    pub tls: SiteTls,
    pub audit: Arc<AuditLog>,
    agreements: watch::Sender<Arc<AgreementSet>>,
    /// Opened on first use: the receiving store by `serve`, the vault by `send`, so that a
    /// `send` process can run beside the site's `serve` process (each sled database is locked by
    /// the one process that opens it).
    store: std::sync::Mutex<Option<Arc<LocalStore>>>,
    vault: std::sync::Mutex<Option<Arc<Vault>>>,
    /// The agreements folder as it was when the node opened.
    loaded_fingerprint: Vec<(PathBuf, u64, Option<SystemTime>)>,
}

impl Node {
    /// Opens a node: loads keys (refusing a key file others can read), TLS material (checking the
    /// certificate names this site), the audit log (verifying its chain) and the agreements.
    pub fn open(config: NodeConfig) -> Result<Node, NodeError> {
        crate::federation::pki::validate_site_id(&config.site_id)
            .map_err(|e| NodeError::Input(e.to_string()))?;
        let keys = SiteKeys::load(&config.key_file)?;
        let loaded_fingerprint = agreements_fingerprint(&config.agreements);
        let tls = SiteTls::load(&config.site_id, &config.tls)?;
        store::private_dir(&config.data_dir)?;
        let audit = Arc::new(AuditLog::open(&config.data_dir.join("audit.log"))?);
        store::private_file(audit.path())?;
        let (set, rejected) = load_agreements(&config.agreements, &config.tls.ca, None);
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
            store: Default::default(),
            vault: Default::default(),
            loaded_fingerprint,
        })
    }

    /// The receiving store (opened on first use).
    pub fn store(&self) -> Result<Arc<LocalStore>, NodeError> {
        let mut slot = self.store.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            let path = self.config.data_dir.join("store");
            store::guard_component(&self.config.data_dir, "store", &path, false)?;
            *slot = Some(Arc::new(LocalStore::open(&path)?));
            store::mark_component(&self.config.data_dir, "store")?;
        }
        Ok(slot.clone().expect("just opened"))
    }

    /// The origin-only vault (opened on first use, in its own database under `data/vault`).
    pub fn vault(&self) -> Result<Arc<Vault>, NodeError> {
        let mut slot = self.vault.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            let path = self.config.data_dir.join("vault");
            store::guard_component(&self.config.data_dir, "vault", &path, false)?;
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
            store::mark_component(&self.config.data_dir, "vault")?;
            *slot = Some(Arc::new(Vault::new(&self.keys, tree)));
        }
        Ok(slot.clone().expect("just opened"))
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
        self.agreements.send_replace(Arc::new(set));
    }

    /// Serves the federation endpoint on `listener` until `shutdown` completes. A watcher reloads
    /// the agreements within 250 ms of a file change.
    pub async fn serve(
        self: &Arc<Self>,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), NodeError> {
        let receiver = Arc::new(
            Receiver::new(
                self.config.site_id.clone(),
                self.store()? as Arc<dyn Store>,
                self.agreements.subscribe(),
                self.audit.clone(),
                ReceiptSigner::new(&self.tls.key_pkcs8),
            )
            .with_limits(self.config.limits.clone())
            .with_connections(self.tls.connections.clone()),
        );
        let watcher = {
            let (node, receiver) = (self.clone(), receiver.clone());
            tokio::spawn(async move {
                // What was loaded at open: a change made since (before this task ran) counts.
                let mut last = node.loaded_fingerprint.clone();
                let mut tick = 0u32;
                loop {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    let now = agreements_fingerprint(&node.config.agreements);
                    if now != last {
                        last = now;
                        node.reload_agreements();
                    }
                    node.tls.reload_crl_if_changed();
                    tick = tick.wrapping_add(1);
                    if tick.is_multiple_of(4) {
                        receiver.housekeeping();
                    }
                }
            })
        };
        let worker = {
            let node = self.clone();
            tokio::spawn(async move {
                loop {
                    node.drain_outbox(false).await;
                    tokio::time::sleep(OUTBOX_POLL).await;
                }
            })
        };
        let addr = listener.local_addr().ok();
        tracing::info!(site = %self.config.site_id, ?addr, "federation endpoint listening (mutual TLS 1.3)");
        let incoming = tls::incoming(listener, &self.tls, &self.config.limits);
        let result = tonic::transport::Server::builder()
            // Calls in flight per connection (each may carry a message of up to 4 MiB); with
            // `[limits] connections_per_peer` this bounds what one partner has in flight.
            .max_concurrent_streams(Some(16))
            .serve_with_incoming_shutdown(FederationServer::from_arc(receiver), incoming, shutdown)
            .await
            .map_err(|e| NodeError::Serve(e.to_string()));
        watcher.abort();
        worker.abort();
        result
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
        Outbox::new(self.config.data_dir.join("outbox"))
    }

    /// One delivery attempt of a queued study: the agreement must still allow it; the partner
    /// gets an offer and the instances it lacks; the signed receipt is verified; the outcome is
    /// recorded in the outbox and the audit log.
    pub async fn attempt(
        &self,
        dir: &Path,
        entry: &mut OutboxEntry,
    ) -> Result<crate::federation::client::Delivery, SendError> {
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
        let result = self.try_deliver(dir, entry).await;
        match &result {
            Ok(d) => {
                self.audit.record_or_warn(audit(
                    "ok (signed receipt verified)".into(),
                    d.instances_sent,
                ));
                if let Err(e) = outbox.mark_delivered(
                    dir,
                    entry,
                    d.receipt.instances_stored,
                    d.receipt.instances_already_held,
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
                self.audit.record_or_warn(audit(format!("{note}{e}"), 0));
                if let Err(err) = outbox.mark_attempt_failed(entry, &e.to_string(), transient) {
                    tracing::error!(error = %err, "the outbox entry could not be updated");
                }
            }
        }
        result
    }

    async fn try_deliver(
        &self,
        dir: &Path,
        entry: &OutboxEntry,
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
        let mut client =
            PeerClient::connect(&self.tls, &entry.to, &peer.address, &server_name).await?;
        client
            .send_study(
                &entry.agreement,
                &entry.flow,
                &entry.purpose,
                &entry.study_token,
                entry.modalities.clone(),
                &instances,
            )
            .await
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

    /// De-identifies `inputs` under (agreement, flow) and sends every resulting study to the
    /// flow's receiver. Inputs that are quarantined or unreadable are reported, never sent.
    pub async fn send(
        &self,
        agreement_id: &str,
        flow_name: &str,
        purpose: Option<&str>,
        inputs: &[PathBuf],
    ) -> Result<SendReport, NodeError> {
        let set = self.agreements();
        let flow = set
            .agreements
            .get(agreement_id)
            .and_then(|a| a.flow(flow_name))
            .cloned()
            .ok_or_else(|| crate::dsa::Refusal::UnknownFlow {
                agreement: agreement_id.to_string(),
                flow: flow_name.to_string(),
            })?;
        let purpose = purpose
            .map(str::to_string)
            .or_else(|| flow.purposes.iter().next().map(|p| p.name().to_string()))
            .unwrap_or_default();
        set.authorise(
            agreement_id,
            flow_name,
            Some(&purpose),
            self.site_id(),
            &flow.to,
        )?;
        if !self.config.peers.contains_key(&flow.to) {
            return Err(NodeError::NoPeer(flow.to.clone()));
        }

        // De-identify into the outbox (blocking work off the async runtime).
        let agreement_path = self.agreement_file(agreement_id).ok_or_else(|| {
            NodeError::Input(format!("the file of agreement {agreement_id:?} is gone"))
        })?;
        let deid = flow
            .deidentifier(agreement_id, &agreement_path, &self.keys)
            .map_err(|e| NodeError::Input(format!("trial subject IDs: {e}")))?;
        let outbox = self
            .config
            .data_dir
            .join("outbox")
            .join(store::safe_name(agreement_id));
        let files = collect_inputs(inputs).map_err(NodeError::Input)?;
        let vault = self.vault()?;
        let agreement = agreement_id.to_string();
        let select = flow.select.clone();
        let prepared = tokio::task::spawn_blocking(move || {
            prepare(&deid, &select, &vault, &agreement, &outbox, files)
        })
        .await
        .map_err(|e| NodeError::Input(e.to_string()))??;

        let mut report = SendReport {
            quarantined: prepared.quarantined,
            failed: prepared.failed,
            not_selected: prepared.not_selected,
            ..Default::default()
        };
        if prepared.studies.is_empty() {
            return Err(NodeError::NothingToSend);
        }
        let outbox = self.outbox();
        for (study_token, study) in prepared.studies {
            let mut modalities: Vec<String> =
                study.iter().filter_map(|p| p.modality.clone()).collect();
            modalities.sort();
            modalities.dedup();
            let mut entry = OutboxEntry {
                agreement: agreement_id.to_string(),
                flow: flow_name.to_string(),
                purpose: purpose.clone(),
                to: flow.to.clone(),
                study_token: study_token.clone(),
                modalities,
                instances: study
                    .iter()
                    .map(|p| OutboxInstance {
                        file: p
                            .out
                            .path
                            .file_name()
                            .map(|f| f.to_string_lossy().to_string())
                            .unwrap_or_default(),
                        sha256: hex::encode(p.out.sha256),
                        size: p.out.size,
                        sop_instance_uid: p.out.sop_instance_uid.clone(),
                    })
                    .collect(),
                state: OutboxState::Pending,
                created: outbox::now(),
                attempts: 0,
                next_attempt: 0,
                last_error: None,
                delivered: None,
            };
            let dir = outbox.save(&entry)?;
            let files = study
                .iter()
                .map(|p| (p.input.clone(), p.out.path.clone()))
                .collect();
            match self.attempt(&dir, &mut entry).await {
                Ok(delivery) => report.studies.push(SentStudy {
                    study_token,
                    instances: entry.instances.len(),
                    instances_sent: delivery.instances_sent,
                    already_held: delivery.receipt.instances_already_held,
                    bytes_sent: delivery.bytes_sent,
                    files,
                }),
                Err(e) if e.is_transient() => report.queued.push((study_token, e.to_string())),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(report)
    }
}

/// Every file under the given files and folders (recursively), sorted.
pub fn collect_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    for i in inputs {
        if !i.exists() {
            return Err(format!("input {} does not exist", i.display()));
        }
        for e in walkdir::WalkDir::new(i)
            .follow_links(false)
            .sort_by_file_name()
        {
            let e = e.map_err(|e| format!("cannot read input {}: {e}", i.display()))?;
            if e.file_type().is_file() {
                files.push(e.into_path());
            }
        }
    }
    Ok(files)
}

struct Prepared {
    input: PathBuf,
    out: OutgoingInstance,
    modality: Option<String>,
}

struct PreparedBatch {
    studies: BTreeMap<String, Vec<Prepared>>,
    quarantined: Vec<(PathBuf, String)>,
    failed: Vec<(PathBuf, String)>,
    not_selected: Vec<(PathBuf, String)>,
}

/// What the flow's selector looks at, read from the original instance (before de-identification).
fn study_facts(obj: &dicom_object::InMemDicomObject) -> crate::dsa::StudyFacts {
    use dicom_dictionary_std::tags;
    let text = |tag| {
        obj.get(tag)
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim_end_matches(['\0', ' ']).trim().to_string())
            .filter(|s| !s.is_empty())
    };
    let study_date = text(tags::STUDY_DATE).and_then(|d| {
        let f = time::macros::format_description!("[year][month][day]");
        time::Date::parse(&d, &f).ok()
    });
    crate::dsa::StudyFacts {
        modalities: text(tags::MODALITY).into_iter().collect(),
        body_parts: text(tags::BODY_PART_EXAMINED).into_iter().collect(),
        study_date,
        description: text(tags::STUDY_DESCRIPTION),
        source_ae: None,
    }
}

fn prepare(
    deid: &Deidentifier,
    select: &crate::dsa::Selector,
    vault: &Vault,
    agreement: &str,
    outbox: &Path,
    files: Vec<PathBuf>,
) -> Result<PreparedBatch, NodeError> {
    let mut batch = PreparedBatch {
        studies: BTreeMap::new(),
        quarantined: Vec::new(),
        failed: Vec::new(),
        not_selected: Vec::new(),
    };
    for input in files {
        let mut modality = None;
        let admit = |obj: &dicom_object::InMemDicomObject| {
            let facts = study_facts(obj);
            modality = facts.modalities.first().cloned();
            select.check(&facts)
        };
        let d = match batch::read_and_deidentify(deid, &input, admit) {
            Ok(d) => d,
            Err(NotDeidentified::Quarantined { reason }) => {
                batch.quarantined.push((input, reason));
                continue;
            }
            Err(NotDeidentified::Failed { reason }) => {
                batch.failed.push((input, reason));
                continue;
            }
            Err(NotDeidentified::NotAdmitted { reason }) => {
                batch.not_selected.push((input, reason));
                continue;
            }
        };
        let mut bytes = Vec::new();
        if let Err(e) =
            crate::deid::batch::encode_output(d.object, d.pixel_data.as_ref(), &mut bytes)
        {
            batch.failed.push((
                input,
                format!("cannot encode the de-identified object: {e}"),
            ));
            continue;
        }
        for (token, entry) in &d.vault_entries {
            vault
                .record(agreement, token, entry)
                .map_err(|e| NodeError::Store(e.into()))?;
        }
        let path = outbox
            .join(store::safe_name(&d.study_uid))
            .join(format!("{}.dcm", store::safe_name(&d.sop_instance_uid)));
        store::write_atomic(&path, &bytes)?;
        batch
            .studies
            .entry(d.study_uid.clone())
            .or_default()
            .push(Prepared {
                input,
                out: OutgoingInstance {
                    path,
                    sha256: Sha256::digest(&bytes).into(),
                    size: bytes.len() as u64,
                    sop_instance_uid: d.sop_instance_uid,
                },
                modality,
            });
    }
    vault.flush().map_err(|e| NodeError::Store(e.into()))?;
    Ok(batch)
}
