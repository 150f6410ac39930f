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
use crate::deid::{DeidError, Deidentifier};
use crate::dsa::{Agreement, AgreementSet};
use crate::federation::client::{OutgoingInstance, PeerClient, SendError};
use crate::federation::proto::federation_server::FederationServer;
use crate::federation::receipt::ReceiptSigner;
use crate::federation::service::Receiver;
use crate::federation::tls::{self, SiteTls};
use crate::pseudonym::{SiteKeys, Vault};
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

/// Reads every agreement file under `path`; files that fail are reported (and not enforced).
pub fn load_agreements(path: &Path) -> (AgreementSet, Vec<(PathBuf, String)>) {
    let mut set = AgreementSet::default();
    let mut rejected = Vec::new();
    for f in agreement_files(path) {
        match Agreement::from_file(&f) {
            Ok(a) => {
                set.agreements.insert(a.id.clone(), a);
            }
            Err(e) => rejected.push((f, e.to_string())),
        }
    }
    (set, rejected)
}

fn agreement_files(path: &Path) -> Vec<PathBuf> {
    if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        v.retain(|p| p.extension().is_some_and(|e| e == "toml"));
        v.sort();
        v
    } else {
        vec![path.to_owned()]
    }
}

/// A fingerprint of the agreements folder: every file's name, length and modification time.
fn agreements_fingerprint(path: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut files: Vec<PathBuf> = if path.is_dir() {
        std::fs::read_dir(path)
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    } else {
        vec![path.to_owned()]
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

/// Outcome of sending.
#[derive(Debug, Default, Clone)]
pub struct SendReport {
    pub studies: Vec<SentStudy>,
    /// (input path, reason) for instances held back on purpose.
    pub quarantined: Vec<(PathBuf, String)>,
    /// (input path, reason) for inputs that are not usable DICOM.
    pub failed: Vec<(PathBuf, String)>,
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
    pub store: Arc<LocalStore>,
    pub audit: Arc<AuditLog>,
    pub vault: Vault,
    agreements: watch::Sender<Arc<AgreementSet>>,
}

impl Node {
    /// Opens a node: loads keys (refusing a key file others can read), TLS material (checking the
    /// certificate names this site), the store, the audit log (verifying its chain) and the
    /// agreements.
    pub fn open(config: NodeConfig) -> Result<Node, NodeError> {
        crate::federation::pki::validate_site_id(&config.site_id)
            .map_err(|e| NodeError::Input(e.to_string()))?;
        let keys = SiteKeys::load(&config.key_file)?;
        let tls = SiteTls::load(&config.site_id, &config.tls)?;
        let store = Arc::new(LocalStore::open(&config.data_dir.join("store"))?);
        let audit = Arc::new(AuditLog::open(&config.data_dir.join("audit.log"))?);
        let vault = Vault::new(&keys, store.tree("vault")?);
        let (set, rejected) = load_agreements(&config.agreements);
        for (f, why) in &rejected {
            tracing::error!(file = %f.display(), reason = %why, "agreement not enforced");
        }
        let (agreements, _) = watch::channel(Arc::new(set));
        Ok(Node {
            config,
            keys,
            tls,
            store,
            audit,
            vault,
            agreements,
        })
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
        let (set, rejected) = load_agreements(&self.config.agreements);
        for (f, why) in &rejected {
            tracing::error!(file = %f.display(), reason = %why, "agreement not enforced");
        }
        tracing::info!(agreements = set.agreements.len(), "agreements reloaded");
        self.agreements.send_replace(Arc::new(set));
    }

    /// Serves the federation endpoint on `listener` until `shutdown` completes. A watcher reloads
    /// the agreements within 250 ms of a file change.
    pub async fn serve(
        self: &Arc<Self>,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), NodeError> {
        let receiver = Receiver::new(
            self.config.site_id.clone(),
            self.store.clone() as Arc<dyn Store>,
            self.agreements.subscribe(),
            self.audit.clone(),
            ReceiptSigner::new(&self.tls.key_pkcs8),
        );
        let watcher = {
            let node = self.clone();
            tokio::spawn(async move {
                let mut last = agreements_fingerprint(&node.config.agreements);
                loop {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    let now = agreements_fingerprint(&node.config.agreements);
                    if now != last {
                        last = now;
                        node.reload_agreements();
                    }
                }
            })
        };
        let addr = listener.local_addr().ok();
        tracing::info!(site = %self.config.site_id, ?addr, "federation endpoint listening (mutual TLS 1.3)");
        let incoming = tls::incoming(listener, &self.tls);
        let result = tonic::transport::Server::builder()
            .serve_with_incoming_shutdown(FederationServer::new(receiver), incoming, shutdown)
            .await
            .map_err(|e| NodeError::Serve(e.to_string()));
        watcher.abort();
        result
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
        set.authorise(agreement_id, flow_name, Some(&purpose), self.site_id(), &flow.to)?;
        let peer = self
            .config
            .peers
            .get(&flow.to)
            .cloned()
            .ok_or_else(|| NodeError::NoPeer(flow.to.clone()))?;

        // De-identify into the outbox (blocking work off the async runtime).
        let deid = Deidentifier::new(flow.deid.clone(), self.keys.tokenizer(agreement_id));
        let outbox = self.config.data_dir.join("outbox").join(store::safe_name(agreement_id));
        let files = collect_inputs(inputs).map_err(NodeError::Input)?;
        let vault_tree = self.store.tree("vault")?;
        let keys = self.keys.clone();
        let agreement = agreement_id.to_string();
        let prepared = tokio::task::spawn_blocking(move || {
            let vault = Vault::new(&keys, vault_tree);
            prepare(&deid, &vault, &agreement, &outbox, files)
        })
        .await
        .map_err(|e| NodeError::Input(e.to_string()))??;

        let mut report = SendReport {
            quarantined: prepared.quarantined,
            failed: prepared.failed,
            ..Default::default()
        };
        if prepared.studies.is_empty() {
            return Err(NodeError::NothingToSend);
        }
        let server_name = peer.server_name.clone().unwrap_or_else(|| {
            peer.address
                .rsplit_once(':')
                .map(|(h, _)| h.trim_matches(['[', ']']).to_string())
                .unwrap_or_else(|| peer.address.clone())
        });
        let mut client = PeerClient::connect(&self.tls, &flow.to, &peer.address, &server_name).await?;
        for (study_token, study) in prepared.studies {
            let instances: Vec<OutgoingInstance> = study.iter().map(|p| p.out.clone()).collect();
            let mut modalities: Vec<String> = study.iter().filter_map(|p| p.modality.clone()).collect();
            modalities.sort();
            modalities.dedup();
            let mut attempt = 0;
            let delivery = loop {
                attempt += 1;
                match client
                    .send_study(agreement_id, flow_name, &purpose, &study_token, modalities.clone(), &instances)
                    .await
                {
                    Ok(d) => break d,
                    Err(e) if e.is_transient() && attempt < 3 => {
                        tracing::warn!(peer = %flow.to, attempt, error = %e, "transfer failed; retrying");
                        tokio::time::sleep(Duration::from_millis(500 * attempt)).await;
                    }
                    Err(e) => {
                        self.audit.record_or_warn(Event {
                            actor: "node".into(),
                            action: "disclose".into(),
                            object: format!("study {study_token} to site:{}", flow.to),
                            agreement: agreement_id.into(),
                            purpose: purpose.clone(),
                            outcome: format!("failed: {e}"),
                        });
                        return Err(e.into());
                    }
                }
            };
            self.audit.record(Event {
                actor: "node".into(),
                action: "disclose".into(),
                object: format!(
                    "study {study_token} ({} instances, {} sent) to site:{}",
                    instances.len(),
                    delivery.instances_sent,
                    flow.to
                ),
                agreement: agreement_id.into(),
                purpose: purpose.clone(),
                outcome: "ok (signed receipt verified)".into(),
            })?;
            report.studies.push(SentStudy {
                study_token,
                instances: instances.len(),
                instances_sent: delivery.instances_sent,
                already_held: delivery.receipt.instances_already_held,
                bytes_sent: delivery.bytes_sent,
                files: study.iter().map(|p| (p.input.clone(), p.out.path.clone())).collect(),
            });
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
        for e in walkdir::WalkDir::new(i).follow_links(false).sort_by_file_name() {
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
}

fn prepare(
    deid: &Deidentifier,
    vault: &Vault,
    agreement: &str,
    outbox: &Path,
    files: Vec<PathBuf>,
) -> Result<PreparedBatch, NodeError> {
    let mut batch = PreparedBatch {
        studies: BTreeMap::new(),
        quarantined: Vec::new(),
        failed: Vec::new(),
    };
    for input in files {
        let obj = match dicom_object::open_file(&input) {
            Ok(o) => o,
            Err(e) => {
                batch.failed.push((input, format!("not a readable DICOM file: {e}")));
                continue;
            }
        };
        let modality = obj
            .get(dicom_dictionary_std::tags::MODALITY)
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim().to_string());
        let d = match deid.deidentify(obj) {
            Ok(d) => d,
            Err(DeidError::Quarantined { reason }) => {
                batch.quarantined.push((input, reason));
                continue;
            }
            Err(e) => {
                batch.failed.push((input, e.to_string()));
                continue;
            }
        };
        let mut bytes = Vec::new();
        if let Err(e) = d.object.write_all(&mut bytes) {
            batch.failed.push((input, format!("cannot encode the de-identified object: {e}")));
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
        batch.studies.entry(d.study_uid.clone()).or_default().push(Prepared {
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
