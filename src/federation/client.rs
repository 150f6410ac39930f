//! The sending side of the federation protocol.
//!
//! Owns: [`PeerClient`], a gRPC client over mutual TLS 1.3 to one partner node whose certificate
//! must name the expected site, and [`PeerClient::send_study`]: offer the manifest, stream the
//! instances the receiver lacks in chunks of at most 1 MiB, and check the receiver's signed
//! receipt. An instance is streamed from its file, read from disk chunk by chunk (memory stays
//! flat whatever the study size), or, when the caller holds it in memory already
//! ([`PeerClient::send_study_from`] with an [`InstanceBody`]: `send`'s de-identified instances),
//! from that memory, never written to disk.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use hyper_util::rt::TokioIo;
use rustls_pki_types::CertificateDer;
use std::io::Read;

use crate::store::sealed::{AtRest, SealError};
use tonic::transport::{Channel, Endpoint};

use super::proto::federation_client::FederationClient;
use super::proto::{InstanceManifest, OfferRequest, Receipt, TransferChunk};
use super::tls::{self, SiteTls};
use super::{receipt, CHUNK_SIZE};

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("cannot connect to {site} at {address}: {reason}")]
    Connect {
        site: String,
        address: String,
        reason: String,
    },
    #[error("{site} refused the offer: {status}")]
    Offer { site: String, status: tonic::Status },
    #[error("{site} rejected the transfer: {status}")]
    Transfer { site: String, status: tonic::Status },
    #[error("cannot read outgoing instance {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the receipt from {0} is not signed by the certificate it presented")]
    BadReceipt(String),
    #[error("not sent: {0}")]
    Refused(String),
}

impl SendError {
    /// True for failures worth retrying later: the network, a peer that is unavailable, busy
    /// (RESOURCE_EXHAUSTED: over its limits for now) or timed out. The study stays pending and
    /// is retried with backoff.
    pub fn is_transient(&self) -> bool {
        match self {
            SendError::Connect { .. } => true,
            SendError::Offer { status, .. } | SendError::Transfer { status, .. } => matches!(
                status.code(),
                tonic::Code::Unavailable
                    | tonic::Code::ResourceExhausted
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Unknown
                    | tonic::Code::Aborted
            ),
            _ => false,
        }
    }
}

/// The plaintext bytes of an outgoing instance held in memory (see
/// [`PeerClient::send_study_from`]); whoever owns them decides when they are freed (the last
/// clone dropped).
pub type InstanceBody = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// An instance held in memory, as the owner of the chunks sliced from it.
struct Held(InstanceBody);

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        (*self.0).as_ref()
    }
}

/// One de-identified instance ready to leave, as a file in the outbox.
#[derive(Debug, Clone)]
pub struct OutgoingInstance {
    pub path: PathBuf,
    pub sha256: [u8; 32],
    pub size: u64,
    pub sop_instance_uid: String,
}

/// What a study transfer achieved.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub receipt: Receipt,
    pub instances_sent: usize,
    pub bytes_sent: u64,
    /// The certificate the receiver presented (checks its audit checkpoint in the receipt).
    pub receiver_certificate: Option<CertificateDer<'static>>,
}

/// A connected client to one partner node.
pub struct PeerClient {
    site: String,
    address: String,
    client: FederationClient<Channel>,
    peer_cert: Arc<Mutex<Option<CertificateDer<'static>>>>,
    /// This site's signed audit checkpoint, carried by every offer (see `audit::partner`).
    audit_checkpoint: Vec<u8>,
    /// How the outbox's instance files are opened (sealed at rest, or plain).
    at_rest: AtRest,
    /// The federation CA's revocation lists: a transfer stops when the partner's certificate
    /// is revoked while it streams (see [`still_trusted`]).
    revocation: Arc<crate::federation::crl::Revocation>,
}

impl PeerClient {
    /// Connects over mutual TLS and checks that the server's certificate names `site`.
    pub async fn connect(
        tls: &SiteTls,
        site: &str,
        address: &str,
        server_name: &str,
    ) -> Result<PeerClient, SendError> {
        let err = |reason: String| SendError::Connect {
            site: site.to_string(),
            address: address.to_string(),
            reason,
        };
        let peer_cert = Arc::new(Mutex::new(None));
        let (cfg, addr, name, expected, slot, pins) = (
            tls.client.clone(),
            address.to_string(),
            server_name.to_string(),
            site.to_string(),
            peer_cert.clone(),
            tls.pins.clone(),
        );
        let connector = tower::service_fn(move |_uri: tonic::codegen::http::Uri| {
            let (cfg, addr, name, expected, slot, pins) = (
                cfg.clone(),
                addr.clone(),
                name.clone(),
                expected.clone(),
                slot.clone(),
                pins.clone(),
            );
            async move {
                let (stream, identity) = tls::connect(cfg, &addr, &name, &expected, &pins).await?;
                *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(identity.certificate);
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        });
        let channel = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| err(e.to_string()))?
            .connect_timeout(std::time::Duration::from_secs(10))
            .http2_adaptive_window(true)
            .connect_with_connector(connector)
            .await
            .map_err(|e| {
                let mut reason = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    let c = s.to_string();
                    if !reason.contains(&c) {
                        reason = format!("{reason}: {c}");
                    }
                    src = s.source();
                }
                err(reason)
            })?;
        Ok(PeerClient {
            site: site.to_string(),
            address: address.to_string(),
            client: FederationClient::new(channel),
            peer_cert,
            audit_checkpoint: Vec::new(),
            at_rest: AtRest::plain(),
            revocation: tls.revocation.clone(),
        })
    }

    /// Opens the instance files it sends through `at_rest` (the node's outbox is sealed).
    pub fn reading_at_rest(mut self, at_rest: AtRest) -> Self {
        self.at_rest = at_rest;
        self
    }

    /// Sets the signed audit checkpoint that offers carry.
    pub fn with_audit_checkpoint(mut self, checkpoint: Vec<u8>) -> Self {
        self.audit_checkpoint = checkpoint;
        self
    }

    /// Replaces the signed audit checkpoint that the next offers carry (a connection kept for
    /// several offers carries the latest).
    pub fn set_audit_checkpoint(&mut self, checkpoint: Vec<u8>) {
        self.audit_checkpoint = checkpoint;
    }

    pub fn site(&self) -> &str {
        &self.site
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// The raw client, for protocol-level tests.
    pub fn raw(&mut self) -> &mut FederationClient<Channel> {
        &mut self.client
    }

    /// Offers a study and streams what the receiver lacks; verifies the signed receipt.
    /// `complete` tells the receiver the instances listed are the whole study (false while a
    /// study is still arriving at this site and is forwarded as it comes).
    #[allow(clippy::too_many_arguments)]
    pub async fn send_study(
        &mut self,
        agreement: &str,
        flow: &str,
        purpose: &str,
        study_token: &str,
        modalities: Vec<String>,
        instances: &[OutgoingInstance],
        complete: bool,
    ) -> Result<Delivery, SendError> {
        self.send_study_from(
            agreement,
            flow,
            purpose,
            study_token,
            modalities,
            instances,
            &[],
            complete,
        )
        .await
    }

    /// [`PeerClient::send_study`], streaming each instance whose `bodies` entry (same order as
    /// `instances`; missing or None: from its file) holds its plaintext from that memory.
    #[allow(clippy::too_many_arguments)]
    pub async fn send_study_from(
        &mut self,
        agreement: &str,
        flow: &str,
        purpose: &str,
        study_token: &str,
        modalities: Vec<String>,
        instances: &[OutgoingInstance],
        bodies: &[Option<InstanceBody>],
        complete: bool,
    ) -> Result<Delivery, SendError> {
        let offer = OfferRequest {
            agreement_id: agreement.to_string(),
            flow: flow.to_string(),
            study_token: study_token.to_string(),
            purpose: purpose.to_string(),
            modalities,
            complete,
            instances: instances
                .iter()
                .map(|i| InstanceManifest {
                    sop_instance_uid: i.sop_instance_uid.clone(),
                    sha256: i.sha256.to_vec(),
                    size: i.size,
                })
                .collect(),
            audit_checkpoint: self.audit_checkpoint.clone(),
        };
        let started = std::time::Instant::now();
        let answer = self
            .client
            .offer(offer)
            .await
            .map_err(|status| SendError::Offer {
                site: self.site.clone(),
                status,
            })?
            .into_inner();
        let to_send: Vec<(OutgoingInstance, Option<InstanceBody>)> = instances
            .iter()
            .enumerate()
            .filter(|(_, i)| !answer.already_have.iter().any(|h| h[..] == i.sha256[..]))
            .map(|(n, i)| (i.clone(), bodies.get(n).cloned().flatten()))
            .collect();
        let bytes_sent: u64 = to_send.iter().map(|(i, _)| i.size).sum();
        let n = to_send.len();
        let (tx, rx) = tokio::sync::mpsc::channel::<TransferChunk>(4);
        let (err_tx, err_rx) = tokio::sync::oneshot::channel::<SendError>();
        let transfer_id = answer.transfer_id.clone();
        let at_rest = self.at_rest.clone();
        let (revocation, peer_cert, site) = (
            self.revocation.clone(),
            self.peer_cert.clone(),
            self.site.clone(),
        );
        tokio::spawn(async move {
            let header = TransferChunk {
                transfer_id,
                ..Default::default()
            };
            if tx.send(header).await.is_err() {
                return;
            }
            let mut checked: Option<std::time::Instant> = None;
            for (inst, body) in to_send {
                // A transfer may run for minutes: a certificate revoked meanwhile (the serving
                // node reloaded its CRL) stops it between instances, as the server side cuts the
                // open connections of a newly revoked client.
                if checked.is_none_or(|t| t.elapsed() >= REVOCATION_RECHECK) {
                    checked = Some(std::time::Instant::now());
                    if let Err(e) = still_trusted(&revocation, &peer_cert, &site) {
                        let _ = err_tx.send(e);
                        return;
                    }
                }
                let streamed = match body {
                    Some(body) => stream_memory(&inst, &body, &tx).await,
                    None => stream_file(inst, &tx, &at_rest).await,
                };
                if let Err(e) = streamed {
                    let _ = err_tx.send(e);
                    return;
                }
            }
        });
        let result = self
            .client
            .transfer(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await;
        if let Ok(e) = err_rx.await {
            return Err(e);
        }
        let receipt = result
            .map_err(|status| SendError::Transfer {
                site: self.site.clone(),
                status,
            })?
            .into_inner();
        tracing::debug!(
            instances = n,
            bytes = bytes_sent,
            offer_and_transfer_ms = started.elapsed().as_millis() as u64,
            "study transferred, receipt received"
        );
        let cert = self
            .peer_cert
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if !cert.as_ref().is_some_and(|c| receipt::verify(&receipt, c))
            || receipt.receiver_site != self.site
        {
            return Err(SendError::BadReceipt(self.site.clone()));
        }
        Ok(Delivery {
            receipt,
            instances_sent: n,
            bytes_sent,
            receiver_certificate: cert,
        })
    }
}

/// How often a running transfer re-checks the partner's certificate.
const REVOCATION_RECHECK: std::time::Duration = std::time::Duration::from_millis(250);

/// The partner's certificate is still valid under the CRLs in force; else the transfer is
/// refused, not retried. The CRLs in force are those the serving node reloads when their file
/// changes (and audits, `crl-reload`); this does not reload them itself, so that the node's
/// reload still sees the change, cuts incoming connections and audits it.
fn still_trusted(
    revocation: &crate::federation::crl::Revocation,
    peer_cert: &Mutex<Option<CertificateDer<'static>>>,
    site: &str,
) -> Result<(), SendError> {
    let cert = peer_cert.lock().unwrap_or_else(|p| p.into_inner()).clone();
    match cert {
        Some(c) if !revocation.still_valid(&c) => Err(SendError::Refused(format!(
            "site {site}'s certificate was revoked during the transfer; the transfer was stopped"
        ))),
        _ => Ok(()),
    }
}

/// Sends one instance held in memory in chunks of at most `CHUNK_SIZE` bytes (each chunk a slice
/// of the held buffer, not a copy: the chunks keep it alive until they are encoded).
async fn stream_memory(
    inst: &OutgoingInstance,
    body: &InstanceBody,
    tx: &tokio::sync::mpsc::Sender<TransferChunk>,
) -> Result<(), SendError> {
    let bytes = prost::bytes::Bytes::from_owner(Held(body.clone()));
    if bytes.len() as u64 != inst.size {
        return Err(SendError::Read {
            path: inst.path.clone(),
            source: std::io::Error::other("the instance held in memory is not the size listed"),
        });
    }
    let mut offset = 0usize;
    loop {
        let end = (offset + CHUNK_SIZE).min(bytes.len());
        let last = end == bytes.len();
        let chunk = TransferChunk {
            transfer_id: String::new(),
            instance_sha256: inst.sha256.to_vec(),
            offset: offset as u64,
            data: bytes.slice(offset..end),
            last,
        };
        if tx.send(chunk).await.is_err() {
            return Ok(()); // the receiver ended the stream; its status says why
        }
        if last {
            return Ok(());
        }
        offset = end;
    }
}

async fn stream_file(
    inst: OutgoingInstance,
    tx: &tokio::sync::mpsc::Sender<TransferChunk>,
    at_rest: &AtRest,
) -> Result<(), SendError> {
    let (tx, at_rest) = (tx.clone(), at_rest.clone());
    let path = inst.path.clone();
    tokio::task::spawn_blocking(move || stream_file_blocking(&inst, &tx, &at_rest))
        .await
        .map_err(|e| SendError::Read {
            path,
            source: std::io::Error::other(e.to_string()),
        })?
}

/// Reads one instance file (decrypting a sealed one, each segment authenticated before it is
/// sent) and sends it in chunks of at most `CHUNK_SIZE` bytes.
fn stream_file_blocking(
    inst: &OutgoingInstance,
    tx: &tokio::sync::mpsc::Sender<TransferChunk>,
    at_rest: &AtRest,
) -> Result<(), SendError> {
    let read = |source| SendError::Read {
        path: inst.path.clone(),
        source,
    };
    let mut f = at_rest
        .open(&inst.path)
        .map_err(|e| read(std::io::Error::other(e.to_string())))?;
    let mut offset = 0u64;
    loop {
        // Sized to what is left of the instance and filled without zeroing it first.
        let want = inst.size.saturating_sub(offset).clamp(1, CHUNK_SIZE as u64);
        let mut buf = Vec::with_capacity(want as usize);
        (&mut f).take(want).read_to_end(&mut buf).map_err(|e| {
            read(std::io::Error::other(
                SealError::from_io(&inst.path, e).to_string(),
            ))
        })?;
        let filled = buf.len();
        let last = offset + filled as u64 >= inst.size;
        if filled == 0 && !last {
            return Err(read(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "file shorter than when it was hashed",
            )));
        }
        let chunk = TransferChunk {
            transfer_id: String::new(),
            instance_sha256: inst.sha256.to_vec(),
            offset,
            data: buf.into(),
            last,
        };
        offset += filled as u64;
        if tx.blocking_send(chunk).is_err() {
            return Ok(()); // the receiver ended the stream; its status says why
        }
        if last {
            return Ok(());
        }
    }
}
