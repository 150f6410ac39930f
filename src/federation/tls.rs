//! Mutual TLS 1.3 for the federation endpoint and its clients (rustls, ring provider only).
//!
//! Owns: the rustls server and client configurations (TLS 1.3 only, client certificate required
//! and verified against the federation CA, ALPN h2), the accept loop that completes the handshake
//! before gRPC sees a connection, and [`PeerInfo`]: the peer's site id read from its verified
//! certificate, carried into every request. A request field never names the caller.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::pki::{self, PkiError};
use crate::config::TlsPaths;

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
}

fn roots(tls: &TlsPaths) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in pki::load_certs(&tls.ca)? {
        roots.add(c)?;
    }
    Ok(roots)
}

impl SiteTls {
    /// Loads the CA, the site certificate and key; checks the certificate names `site_id`.
    pub fn load(site_id: &str, tls: &TlsPaths) -> Result<SiteTls, TlsError> {
        install_crypto_provider();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = pki::load_certs(&tls.cert)?;
        let key = pki::load_key(&tls.key)?;
        let found = pki::site_id_of(&chain[0])?;
        if found != site_id {
            return Err(TlsError::SiteMismatch {
                configured: site_id.to_string(),
                found,
            });
        }
        let roots = Arc::new(roots(tls)?);
        let verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())?;
        server.alpn_protocols = vec![b"h2".to_vec()];
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain.clone(), key.clone_key())?;
        client.alpn_protocols = vec![b"h2".to_vec()];
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
        })
    }
}

/// A server-side TLS connection with its verified peer.
pub struct PeerStream {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
}

impl tonic::transport::server::Connected for PeerStream {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
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

/// Accepts TCP connections, completes the TLS handshake (10 s limit) and yields only connections
/// whose client certificate chains to the federation CA and names a site. Failed handshakes are
/// logged with the remote address and dropped.
pub fn incoming(
    listener: TcpListener,
    tls: &SiteTls,
) -> tokio_stream::wrappers::ReceiverStream<Result<PeerStream, io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = TlsAcceptor::from(tls.server.clone());
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            if tx.is_closed() {
                break;
            }
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let hs = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await;
                let stream = match hs {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::warn!(%remote, error = %e, "TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(%remote, "TLS handshake timed out");
                        return;
                    }
                };
                let chain = stream.get_ref().1.peer_certificates().unwrap_or(&[]);
                let identity = match PeerIdentity::from_verified_chain(chain) {
                    Ok(id) => id,
                    Err(e) => {
                        tracing::warn!(%remote, error = %e, "peer certificate names no site; connection closed");
                        return;
                    }
                };
                tracing::debug!(%remote, peer = %identity.site_id, "mutual TLS established");
                let _ = tx
                    .send(Ok(PeerStream {
                        inner: stream,
                        info: PeerInfo { identity, remote },
                    }))
                    .await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Opens a mutual-TLS connection to `address`, verifying the server certificate against the CA
/// for `server_name`, and checking that it names `expected_site`.
pub async fn connect(
    client: Arc<ClientConfig>,
    address: &str,
    server_name: &str,
    expected_site: &str,
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
    Ok((tls, identity))
}
