//! Mutual TLS 1.3 for the federation endpoint and its clients (rustls, ring provider only).
//!
//! Owns: the rustls server and client configurations (TLS 1.3 only, client certificate required
//! and verified against the federation CA, ALPN h2), the accept loop that completes the handshake
//! before gRPC sees a connection, and [`PeerInfo`]: the peer's site id read from its verified
//! certificate, carried into every request. A request field never names the caller.
//!
//! Also owns what a connection may hold of the node: a total connection limit (checked before
//! the handshake) and a per-peer one (over it, every call on the connection answers
//! RESOURCE_EXHAUSTED), the idle timeout (a connection with no call in progress is closed), the
//! `certificate_pin`s of the agreements in force (a pinned party must present that key, on
//! incoming and outgoing connections), and cutting the open connections of a certificate that a
//! reloaded CRL revokes or a pin no longer admits ([`Connections`]).
//!
//! Every connection it refuses or closes becomes a [`ConnectionEvent`] (with the peer's site when
//! its certificate was verified, otherwise its address and, where it presented a certificate,
//! that certificate's subject, serial and claimed site); the receiver audits them, summarised per
//! window (`federation::refusals`).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Instant;

use futures::task::AtomicWaker;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::crl::Revocation;
use super::pki::{self, PkiError};
use crate::config::{Limits, TlsPaths};

/// Installs the one process-wide crypto provider (ring). Safe to call more than once.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(String),
    #[error("the certificate names site {found:?} but this node is configured as {configured:?}")]
    SiteMismatch { configured: String, found: String },
}

/// The verified identity of the other end of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// Site id from the certificate's URI SAN.
    pub site_id: String,
    /// SHA-256 of the certificate's public key (SPKI), for pins.
    pub spki_sha256: [u8; 32],
    /// The end-entity certificate (DER).
    pub certificate: CertificateDer<'static>,
}

impl PeerIdentity {
    /// Builds the identity from a certificate chain that rustls has already verified.
    pub fn from_verified_chain(chain: &[CertificateDer<'_>]) -> Result<Self, PkiError> {
        let ee = chain.first().ok_or(PkiError::NoSiteId)?;
        Ok(PeerIdentity {
            site_id: pki::site_id_of(ee)?,
            spki_sha256: pki::spki_sha256(ee)?,
            certificate: ee.clone().into_owned(),
        })
    }
}

/// What every gRPC request learns about its connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub identity: PeerIdentity,
    pub remote: SocketAddr,
    /// The connection's state: its admission, calls in progress, and whether it was cut.
    pub connection: Arc<Connection>,
}

/// The `certificate_pin`s of the agreements in force: site id -> SHA-256 of the public keys it
/// may present. A site with no pin may present any key the CA certified.
#[derive(Debug, Default)]
pub struct Pins(RwLock<HashMap<String, Vec<[u8; 32]>>>);

impl Pins {
    /// Replaces the pins with those of `set` (every party with a `certificate_pin`).
    pub fn update(&self, set: &crate::dsa::AgreementSet) {
        let mut map: HashMap<String, Vec<[u8; 32]>> = HashMap::new();
        for a in set.agreements.values() {
            for p in &a.parties {
                let Some(pin) = &p.certificate_pin else {
                    continue;
                };
                let mut key = [0u8; 32];
                if hex::decode_to_slice(pin, &mut key).is_ok() {
                    map.entry(p.site.clone()).or_default().push(key);
                }
            }
        }
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = map;
    }

    /// Refuses a key that is not one of the site's pins (when it has any).
    pub fn check(&self, site: &str, spki_sha256: &[u8; 32]) -> Result<(), String> {
        let map = self.0.read().unwrap_or_else(|p| p.into_inner());
        match map.get(site) {
            Some(pins) if !pins.contains(spki_sha256) => Err(format!(
                "the certificate's public key does not match the certificate_pin of party {site:?}"
            )),
            _ => Ok(()),
        }
    }
}

/// Whether calls on a connection are served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    Admitted,
    /// The peer already holds its share of connections.
    OverLimit,
    /// The peer's key does not match its pin.
    PinMismatch(String),
}

/// What happened to a connection, for the receiver's audit (drained by [`Connections::take_events`]).
#[derive(Debug, Clone)]
pub struct ConnectionEvent {
    /// The peer's site from its verified certificate; empty when the peer was not identified.
    pub site: String,
    /// The peer's address, where known.
    pub remote: Option<SocketAddr>,
    /// What the certificate a refused peer presented says ([`describe_certificate`]): it was not
    /// accepted, so its claims are shown, not trusted.
    pub certificate: Option<String>,
    /// Short kind: `idle connection closed`, `connection cut`, `connection refused`,
    /// `TLS handshake refused`, `TLS handshake timed out`, `certificate names no site`,
    /// `certificate revoked`, `over the total connection limit`.
    pub kind: &'static str,
    pub detail: String,
}

/// One open connection.
pub struct Connection {
    id: u64,
    pub site: String,
    certificate: CertificateDer<'static>,
    spki_sha256: [u8; 32],
    admission: Admission,
    cut: Mutex<Option<String>>,
    is_cut: AtomicBool,
    waker: AtomicWaker,
    calls: AtomicUsize,
    last_call: Mutex<Instant>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("id", &self.id)
            .field("site", &self.site)
            .field("admission", &self.admission)
            .finish_non_exhaustive()
    }
}

/// Held while a call is in progress: the connection is not idle.
pub struct CallGuard(Arc<Connection>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        *self.0.last_call.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.0.calls.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Connection {
    /// Marks a call in progress until the guard drops.
    pub fn begin_call(self: &Arc<Self>) -> CallGuard {
        self.calls.fetch_add(1, Ordering::SeqCst);
        CallGuard(self.clone())
    }

    /// The status every call on this connection gets when it may not be served.
    pub fn admit(&self) -> Result<(), tonic::Status> {
        if let Some(why) = self.cut.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Err(tonic::Status::unavailable(format!("connection cut: {why}")));
        }
        match &self.admission {
            Admission::Admitted => Ok(()),
            Admission::OverLimit => Err(tonic::Status::resource_exhausted(
                "too many connections from your site; reuse one, or retry later",
            )),
            Admission::PinMismatch(why) => Err(tonic::Status::permission_denied(why.clone())),
        }
    }

    fn cut(&self, why: String) {
        *self.cut.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
        self.is_cut.store(true, Ordering::SeqCst);
        self.waker.wake();
    }

    /// When the connection counts as idle from (no call in progress since then), if it is idle.
    fn idle_since(&self) -> Option<Instant> {
        if self.calls.load(Ordering::SeqCst) > 0 {
            None
        } else {
            Some(*self.last_call.lock().unwrap_or_else(|p| p.into_inner()))
        }
    }
}

/// Every open connection of the federation endpoint.
#[derive(Debug, Default)]
pub struct Connections {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Connection>>>,
    events: Mutex<Vec<ConnectionEvent>>,
    /// Events not kept because the buffer was full (reported by the next drain).
    dropped: AtomicU64,
}

/// Most connection events kept between two drains (the rest are counted in the last one).
const MAX_EVENTS: usize = 1024;

impl Connections {
    fn register(&self, identity: &PeerIdentity, per_peer: usize, pins: &Pins) -> Arc<Connection> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let held = open
            .values()
            .filter(|c| c.site == identity.site_id && c.admission == Admission::Admitted)
            .count();
        let admission = if let Err(why) = pins.check(&identity.site_id, &identity.spki_sha256) {
            Admission::PinMismatch(why)
        } else if held >= per_peer {
            Admission::OverLimit
        } else {
            Admission::Admitted
        };
        let c = Arc::new(Connection {
            id: self.next.fetch_add(1, Ordering::SeqCst),
            site: identity.site_id.clone(),
            certificate: identity.certificate.clone(),
            spki_sha256: identity.spki_sha256,
            admission,
            cut: Mutex::new(None),
            is_cut: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            calls: AtomicUsize::new(0),
            last_call: Mutex::new(Instant::now()),
        });
        open.insert(c.id, c.clone());
        c
    }

    fn remove(&self, id: u64) {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// Open connections of one site (admitted ones).
    pub fn count(&self, site: &str) -> usize {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|c| c.site == site && c.admission == Admission::Admitted)
            .count()
    }

    /// All open connections.
    pub fn total(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn event(&self, site: &str, kind: &'static str, detail: String) {
        self.event_at(site, None, kind, detail);
    }

    /// An event of a connection whose peer's certificate was verified, from `remote`.
    fn event_at(&self, site: &str, remote: Option<SocketAddr>, kind: &'static str, detail: String) {
        self.push(ConnectionEvent {
            site: site.to_string(),
            remote,
            certificate: None,
            kind,
            detail,
        });
    }

    /// A connection refused before its peer was identified.
    fn refused(
        &self,
        remote: SocketAddr,
        kind: &'static str,
        detail: String,
        certificate: Option<String>,
    ) {
        self.push(ConnectionEvent {
            site: String::new(),
            remote: Some(remote),
            certificate,
            kind,
            detail,
        });
    }

    fn push(&self, e: ConnectionEvent) {
        let mut ev = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if ev.len() < MAX_EVENTS {
            ev.push(e);
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Takes the events since the last call; events the full buffer did not keep are counted in
    /// one more event at the end.
    pub fn take_events(&self) -> Vec<ConnectionEvent> {
        let mut ev = std::mem::take(&mut *self.events.lock().unwrap_or_else(|p| p.into_inner()));
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            ev.push(ConnectionEvent {
                site: String::new(),
                remote: None,
                certificate: None,
                kind: "connection events not kept",
                detail: format!(
                    "{dropped} more connection events arrived while {MAX_EVENTS} waited to be audited"
                ),
            });
        }
        ev
    }

    /// Re-checks every open connection against the CRLs and pins in force now and cuts those
    /// they no longer admit (calls in progress on them fail at once). Returns how many were cut.
    pub fn recheck(&self, revocation: &Revocation, pins: &Pins) -> usize {
        let open: Vec<Arc<Connection>> = self
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let mut n = 0;
        for c in open {
            if c.is_cut.load(Ordering::SeqCst) {
                continue;
            }
            let why = if !revocation.still_valid(&c.certificate) {
                Some("the peer's certificate is revoked".to_string())
            } else {
                pins.check(&c.site, &c.spki_sha256).err()
            };
            if let Some(why) = why {
                tracing::warn!(peer = %c.site, reason = %why, "open connection cut");
                self.event(&c.site, "connection cut", why.clone());
                c.cut(why);
                n += 1;
            }
        }
        n
    }
}

/// The site's own TLS material, loaded once.
#[derive(Clone)]
pub struct SiteTls {
    pub site_id: String,
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
    /// This site's certificate and PKCS#8 key (also used to sign receipts).
    pub cert: CertificateDer<'static>,
    pub key_pkcs8: Vec<u8>,
    /// The federation CA's CRLs in force (both verifiers ask it at every handshake).
    pub revocation: Arc<Revocation>,
    /// The `certificate_pin`s of the agreements in force.
    pub pins: Arc<Pins>,
    /// The open connections of this site's federation endpoint.
    pub connections: Arc<Connections>,
}

impl SiteTls {
    /// Loads the CA, the site certificate and key (refusing a key that group or others can read),
    /// and the CRL file when configured; checks the certificate names `site_id`.
    pub fn load(site_id: &str, tls: &TlsPaths) -> Result<SiteTls, TlsError> {
        install_crypto_provider();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        pki::check_private_key_mode(&tls.key)?;
        let chain = pki::load_certs(&tls.cert)?;
        let key = pki::load_key(&tls.key)?;
        let found = pki::site_id_of(&chain[0])?;
        if found != site_id {
            return Err(TlsError::SiteMismatch {
                configured: site_id.to_string(),
                found,
            });
        }
        let revocation = Revocation::new(
            pki::load_certs(&tls.ca)?,
            tls.crl.as_deref(),
            provider.clone(),
        )?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(revocation.client_verifier())
            .with_single_cert(chain.clone(), key.clone_key())?;
        server.alpn_protocols = vec![b"h2".to_vec()];
        // No session resumption: a resumed session skips certificate verification, so a
        // certificate revoked since (or a pin changed since) would get back in.
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(revocation.server_verifier())
            .with_client_auth_cert(chain.clone(), key.clone_key())?;
        client.alpn_protocols = vec![b"h2".to_vec()];
        client.resumption = rustls::client::Resumption::disabled();
        let key_pkcs8 = match &key {
            rustls_pki_types::PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
            _ => Vec::new(),
        };
        Ok(SiteTls {
            site_id: site_id.to_string(),
            server: Arc::new(server),
            client: Arc::new(client),
            cert: chain[0].clone(),
            key_pkcs8,
            revocation,
            pins: Arc::default(),
            connections: Arc::default(),
        })
    }

    /// Puts the pins of `set` in force and cuts open connections they no longer admit.
    pub fn update_pins(&self, set: &crate::dsa::AgreementSet) {
        self.pins.update(set);
        self.connections.recheck(&self.revocation, &self.pins);
    }

    /// Re-reads the CRL file if it changed; on a change, cuts the open connections of every
    /// certificate it revokes. A broken file is reported and the previous CRLs stay in force.
    /// Returns what happened when the file changed (for the audit): the CRLs now in force and
    /// the connections cut, or why the file was not taken.
    pub fn reload_crl_if_changed(&self) -> Option<Result<(usize, usize), String>> {
        match self.revocation.reload_if_changed()? {
            Ok(n) => {
                let cut = self.connections.recheck(&self.revocation, &self.pins);
                tracing::info!(
                    crls = n,
                    connections_cut = cut,
                    "certificate revocation list reloaded"
                );
                Some(Ok((n, cut)))
            }
            Err(e) => {
                tracing::error!(error = %e, "certificate revocation list not reloaded; the previous one stays in force");
                Some(Err(e.to_string()))
            }
        }
    }
}

/// A server-side TLS connection with its verified peer. It ends (the read side fails) when the
/// connection has had no call in progress for the idle timeout, or when it is cut.
pub struct PeerStream {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
    idle: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    connections: Arc<Connections>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for PeerStream {
    fn drop(&mut self) {
        self.connections.remove(self.info.connection.id);
    }
}

impl tonic::transport::server::Connected for PeerStream {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl PeerStream {
    /// `Some(error)` when the connection must end now: cut, or idle for too long. Otherwise
    /// arms the timer (and the cut waker) to be woken when that may change.
    fn should_end(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        let conn = self.info.connection.clone();
        conn.waker.register(cx.waker());
        if conn.is_cut.load(Ordering::SeqCst) {
            return Some(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection cut",
            ));
        }
        // A few rounds at most: a timer that fires a hair before the idle deadline is re-armed,
        // never spun on.
        for _ in 0..3 {
            let now = tokio::time::Instant::now();
            let deadline = match conn.idle_since() {
                Some(since) => {
                    let d = tokio::time::Instant::from_std(since) + self.idle;
                    if now >= d {
                        return Some(self.idle_close(&conn));
                    }
                    d
                }
                // A call is in progress: look again an idle period from now (or when the timer
                // already armed fires).
                None if self.timer.deadline() > now => {
                    let _ = self.timer.as_mut().poll(cx);
                    return None;
                }
                None => now + self.idle,
            };
            if self.timer.deadline() != deadline {
                self.timer.as_mut().reset(deadline);
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return None;
            }
        }
        self.timer
            .as_mut()
            .reset(tokio::time::Instant::now() + Duration::from_millis(10));
        let _ = self.timer.as_mut().poll(cx);
        None
    }

    fn idle_close(&self, conn: &Connection) -> io::Error {
        let secs = self.idle.as_secs_f64();
        tracing::warn!(peer = %conn.site, remote = %self.info.remote, idle_secs = secs, "idle connection closed");
        self.connections.event_at(
            &conn.site,
            Some(self.info.remote),
            "idle connection closed",
            format!("no call for {secs:.0} s"),
        );
        io::Error::new(io::ErrorKind::TimedOut, "idle connection closed")
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(e) = self.should_end(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Idle timeout of a connection over its peer's limit or refused by a pin: long enough for the
/// peer to read the status of one call.
const REFUSED_CONNECTION_IDLE: Duration = Duration::from_secs(2);

/// Accepts TCP connections, completes the TLS handshake (10 s limit) and yields only connections
/// whose client certificate chains to the federation CA, is not revoked, and names a site.
/// At most `limits.connections_total` connections (handshakes included) are open at once: over
/// it, a new TCP connection is closed at once. Failed handshakes are logged with the remote
/// address and dropped.
pub fn incoming(
    listener: TcpListener,
    tls: &SiteTls,
    limits: &Limits,
) -> tokio_stream::wrappers::ReceiverStream<Result<PeerStream, io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let total_limit = limits.connections_total.max(1);
    let total = Arc::new(Semaphore::new(total_limit));
    let endpoint = Arc::new(Endpoint {
        acceptor: TlsAcceptor::from(tls.server.clone()),
        connections: tls.connections.clone(),
        pins: tls.pins.clone(),
        revocation: tls.revocation.clone(),
        per_peer: limits.connections_per_peer.max(1),
        idle: Duration::from_secs(limits.idle_timeout_secs.max(1)),
    });
    tokio::spawn(async move {
        let mut over_total = 0u64;
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                break;
            }
            let Ok(permit) = total.clone().try_acquire_owned() else {
                over_total += 1;
                if over_total.is_power_of_two() {
                    tracing::warn!(%remote, refused = over_total, "connection limit reached; new connections are closed");
                }
                endpoint.connections.refused(
                    remote,
                    "over the total connection limit",
                    format!("{total_limit} connections open (`[limits] connections_total`)"),
                    None,
                );
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let (endpoint, tx) = (endpoint.clone(), tx.clone());
            tokio::spawn(async move {
                if let Some(stream) = endpoint.establish(tcp, remote, permit).await {
                    let _ = tx.send(Ok(stream)).await;
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// What the accept loop hands each new connection.
struct Endpoint {
    acceptor: TlsAcceptor,
    connections: Arc<Connections>,
    pins: Arc<Pins>,
    revocation: Arc<Revocation>,
    per_peer: usize,
    idle: Duration,
}

impl Endpoint {
    /// The handshake and the checks after it: a verified, unrevoked peer naming a site gets a
    /// stream (whose calls are refused when it is over its limit or fails its pin); anything
    /// else is closed and recorded for the audit.
    async fn establish(
        &self,
        tcp: TcpStream,
        remote: SocketAddr,
        permit: OwnedSemaphorePermit,
    ) -> Option<PeerStream> {
        let connections = &self.connections;
        let (stream, identity) = handshake(&self.acceptor, tcp, remote, connections).await?;
        if !self.revocation.still_valid(&identity.certificate) {
            tracing::warn!(%remote, peer = %identity.site_id, "revoked certificate; connection closed");
            connections.event_at(
                &identity.site_id,
                Some(remote),
                "certificate revoked",
                "connection closed: the certificate is revoked".into(),
            );
            return None;
        }
        let connection = connections.register(&identity, self.per_peer, &self.pins);
        let idle = match &connection.admission {
            Admission::Admitted => self.idle,
            other => {
                tracing::warn!(%remote, peer = %identity.site_id, admission = ?other, "connection refused its calls");
                connections.event_at(
                    &identity.site_id,
                    Some(remote),
                    "connection refused",
                    match other {
                        Admission::OverLimit => "over the per-peer connection limit".into(),
                        Admission::PinMismatch(why) => why.clone(),
                        Admission::Admitted => String::new(),
                    },
                );
                self.idle.min(REFUSED_CONNECTION_IDLE)
            }
        };
        tracing::debug!(%remote, peer = %identity.site_id, "mutual TLS established");
        Some(PeerStream {
            inner: stream,
            info: PeerInfo {
                identity,
                remote,
                connection,
            },
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            connections: connections.clone(),
            _permit: permit,
        })
    }
}

tokio::task_local! {
    /// What the client certificate refused in this task's handshake says (set by the verifier).
    static REFUSED_CERTIFICATE: std::cell::RefCell<Option<String>>;
}

/// Called by the client-certificate verifier when it refuses a certificate (another CA, revoked,
/// expired...): remembers what the certificate says, so that the refusal is audited with it.
/// rustls verifies synchronously inside the poll of the handshake, so the handshake task's slot
/// is in scope; anywhere else this does nothing.
pub(crate) fn note_refused_certificate(end_entity: &CertificateDer<'_>) {
    let _ = REFUSED_CERTIFICATE.try_with(|slot| {
        *slot.borrow_mut() = Some(describe_certificate(end_entity));
    });
}

/// What a certificate says of itself, bounded for the audit: subject, serial and the site its
/// URI SAN names. For a refused certificate these are claims, not facts.
pub fn describe_certificate(cert: &CertificateDer<'_>) -> String {
    use crate::audit::text::bound_to;
    let Ok((_, x)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return "an unreadable certificate".into();
    };
    let site = match pki::site_id_of(cert) {
        Ok(s) => format!(", names site `{s}`"),
        Err(_) => ", names no site".into(),
    };
    format!(
        "certificate subject `{}` serial {}{site}",
        bound_to(&x.subject().to_string(), 128),
        bound_to(&x.raw_serial_as_string(), 64)
    )
}

/// Most bytes of a handshake error kept (rustls errors are short; this bounds the odd one).
const MAX_HANDSHAKE_ERROR: usize = 200;

async fn handshake(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    remote: SocketAddr,
    connections: &Connections,
) -> Option<(tokio_rustls::server::TlsStream<TcpStream>, PeerIdentity)> {
    let (hs, refused_cert) = REFUSED_CERTIFICATE
        .scope(std::cell::RefCell::new(None), async {
            let hs = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await;
            (hs, REFUSED_CERTIFICATE.with(|c| c.borrow_mut().take()))
        })
        .await;
    let stream = match hs {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            if e.kind() == std::io::ErrorKind::UnexpectedEof && refused_cert.is_none() {
                // Closed before a handshake: a port probe or a load balancer's health check.
                // Audited like every refusal of an unidentified peer (summarised in a flood),
                // but not a warning each: monitoring probes the port all day.
                tracing::debug!(%remote, "connection closed before a TLS handshake");
            } else {
                tracing::warn!(%remote, error = %e, "TLS handshake refused");
            }
            let why = crate::audit::text::bound_to(&e.to_string(), MAX_HANDSHAKE_ERROR);
            connections.refused(remote, "TLS handshake refused", why, refused_cert);
            return None;
        }
        Err(_) => {
            tracing::warn!(%remote, "TLS handshake timed out");
            connections.refused(
                remote,
                "TLS handshake timed out",
                "no complete handshake within 10 s".into(),
                refused_cert,
            );
            return None;
        }
    };
    let chain = stream.get_ref().1.peer_certificates().unwrap_or(&[]);
    match PeerIdentity::from_verified_chain(chain) {
        Ok(id) => Some((stream, id)),
        Err(e) => {
            tracing::warn!(%remote, error = %e, "peer certificate names no site; connection closed");
            connections.refused(
                remote,
                "certificate names no site",
                e.to_string(),
                chain.first().map(describe_certificate),
            );
            None
        }
    }
}

/// Opens a mutual-TLS connection to `address`, verifying the server certificate against the CA
/// (and its CRLs) for `server_name`, and checking that it names `expected_site` and matches that
/// site's `certificate_pin`s in `pins`.
pub async fn connect(
    client: Arc<ClientConfig>,
    address: &str,
    server_name: &str,
    expected_site: &str,
    pins: &Pins,
) -> io::Result<(tokio_rustls::client::TlsStream<TcpStream>, PeerIdentity)> {
    let tcp = TcpStream::connect(address).await?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let tls = TlsConnector::from(client).connect(name, tcp).await?;
    let chain = tls.get_ref().1.peer_certificates().unwrap_or(&[]);
    let identity = PeerIdentity::from_verified_chain(chain)
        .map_err(|e| io::Error::new(io::ErrorKind::PermissionDenied, e.to_string()))?;
    if identity.site_id != expected_site {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "peer at {address} presented site {:?}, expected {expected_site:?}",
                identity.site_id
            ),
        ));
    }
    pins.check(&identity.site_id, &identity.spki_sha256)
        .map_err(|why| io::Error::new(io::ErrorKind::PermissionDenied, why))?;
    Ok((tls, identity))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(cn: &str, san: Option<&str>) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, cn.to_string());
        if let Some(uri) = san {
            p.subject_alt_names
                .push(rcgen::SanType::URI(uri.try_into().unwrap()));
        }
        p.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn a_refused_certificate_is_described_bounded_and_escaped() {
        let cert = self_signed(
            &format!("evil\nforged line\u{202e}{}", "A".repeat(5000)),
            Some("urn:pacs-broker:site:hospital-b"),
        );
        let d = describe_certificate(&cert);
        assert!(!d.chars().any(|c| c.is_control()), "{d}");
        assert!(!d.contains('\u{202e}'), "{d}");
        assert!(d.len() < 500, "{} bytes: {d}", d.len());
        assert!(d.ends_with(", names site `hospital-b`"), "{d}");
        let plain = describe_certificate(&self_signed("hospital-a", None));
        assert!(
            plain.starts_with("certificate subject `CN=hospital-a` serial ")
                && plain.ends_with(", names no site"),
            "{plain}"
        );
        assert_eq!(
            describe_certificate(&CertificateDer::from(vec![1u8, 2, 3])),
            "an unreadable certificate"
        );
    }
}
