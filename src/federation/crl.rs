//! Certificate revocation: the federation CA's CRLs, checked on every handshake in both
//! directions, reloaded without a restart; and the development CA's `certs revoke`.
//!
//! Owns: [`Revocation`], the CRLs in force and the certificate verifiers built from them (the
//! server's client-certificate verifier and the client's server-certificate verifier both ask
//! it, so a reload takes effect for the next handshake either way); loading a CRL file (PEM, one
//! or more CRLs, each signed by a federation CA certificate: a CRL from anyone else is refused);
//! and [`revoke_with_dev_ca`], which adds certificates to the CRL of a CA whose key is on disk.
//!
//! Does not own: cutting the connections of a newly revoked certificate (that is [`super::tls`],
//! which re-verifies every open connection after a reload), nor distributing CRL files to the
//! sites (see docs/revocation.md).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rcgen::{
    CertificateRevocationListParams, Issuer, KeyIdMethod, KeyPair, RevocationReason,
    RevokedCertParams, SerialNumber,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};

use super::pki::{self, PkiError};

fn crl_err(path: &Path, message: impl Into<String>) -> PkiError {
    PkiError::Crl {
        path: path.to_owned(),
        message: message.into(),
    }
}

/// Reads a CRL file: PEM with one or more `X509 CRL` blocks, each signed by one of `cas`.
pub fn load_crls(
    path: &Path,
    cas: &[CertificateDer<'static>],
) -> Result<Vec<CertificateRevocationListDer<'static>>, PkiError> {
    let bytes = fs::read(path).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })?;
    let crls: Vec<CertificateRevocationListDer<'static>> =
        CertificateRevocationListDer::pem_slice_iter(&bytes)
            .collect::<Result<_, _>>()
            .map_err(|e| crl_err(path, format!("not a PEM file of CRLs: {e}")))?;
    if crls.is_empty() {
        return Err(crl_err(path, "no `X509 CRL` PEM block found"));
    }
    for (i, crl) in crls.iter().enumerate() {
        let (_, parsed) = x509_parser::parse_x509_crl(crl)
            .map_err(|e| crl_err(path, format!("CRL {} is not valid: {e}", i + 1)))?;
        let signed_by_ca = cas.iter().any(|ca| {
            x509_parser::parse_x509_certificate(ca.as_ref()).is_ok_and(|(_, c)| {
                c.subject() == parsed.issuer() && parsed.verify_signature(c.public_key()).is_ok()
            })
        });
        if !signed_by_ca {
            return Err(crl_err(
                path,
                format!(
                    "CRL {} is not signed by the federation CA (only the CA that issues the site certificates may revoke them)",
                    i + 1
                ),
            ));
        }
    }
    Ok(crls)
}

struct Verifiers {
    client: Arc<dyn ClientCertVerifier>,
    server: Arc<dyn ServerCertVerifier>,
    /// SHA-256 of the CRL file these were built from (`None`: no CRL configured).
    digest: Option<[u8; 32]>,
}

/// The CRLs in force and the verifiers built from them.
pub struct Revocation {
    path: Option<PathBuf>,
    cas: Vec<CertificateDer<'static>>,
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    hints: Vec<DistinguishedName>,
    current: RwLock<Arc<Verifiers>>,
}

impl std::fmt::Debug for Revocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Revocation")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Revocation {
    /// Builds the verifiers for the federation CA `cas` and, when configured, the CRL file.
    pub fn new(
        cas: Vec<CertificateDer<'static>>,
        crl: Option<&Path>,
        provider: Arc<CryptoProvider>,
    ) -> Result<Arc<Revocation>, PkiError> {
        let mut roots = RootCertStore::empty();
        for c in &cas {
            roots
                .add(c.clone())
                .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
        }
        let roots = Arc::new(roots);
        let hints = roots.subjects();
        let r = Revocation {
            path: crl.map(Path::to_owned),
            cas,
            roots,
            provider,
            hints,
            current: RwLock::new(Arc::new(Verifiers {
                client: Arc::new(RefusingVerifier),
                server: Arc::new(RefusingVerifier),
                digest: None,
            })),
        };
        let (crls, digest) = match &r.path {
            Some(p) => {
                let crls = load_crls(p, &r.cas)?;
                (crls, Some(file_digest(p)?))
            }
            None => (Vec::new(), None),
        };
        let v = r.build(crls, digest)?;
        *r.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(v);
        Ok(Arc::new(r))
    }

    fn build(
        &self,
        crls: Vec<CertificateRevocationListDer<'static>>,
        digest: Option<[u8; 32]>,
    ) -> Result<Verifiers, PkiError> {
        let bad = |e: String| PkiError::BadCertificate(format!("certificate verifier: {e}"));
        let client =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), self.provider.clone())
                .with_crls(crls.clone())
                .only_check_end_entity_revocation()
                .build()
                .map_err(|e| bad(e.to_string()))?;
        let server =
            WebPkiServerVerifier::builder_with_provider(self.roots.clone(), self.provider.clone())
                .with_crls(crls)
                .only_check_end_entity_revocation()
                .build()
                .map_err(|e| bad(e.to_string()))?;
        Ok(Verifiers {
            client,
            server,
            digest,
        })
    }

    /// The configured CRL file, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Re-reads the CRL file when its content changed. `None`: unchanged (or no CRL configured);
    /// `Some(Ok(n))`: the new CRLs (n of them) are in force; `Some(Err)`: the new file is not
    /// usable and the previous CRLs stay in force (a broken file never lifts a revocation).
    pub fn reload_if_changed(&self) -> Option<Result<usize, PkiError>> {
        let path = self.path.as_ref()?;
        let digest = match file_digest(path) {
            Ok(d) => d,
            Err(e) => return Some(Err(e)),
        };
        if self.verifiers().digest == Some(digest) {
            return None;
        }
        let result = load_crls(path, &self.cas).and_then(|crls| {
            let n = crls.len();
            let v = self.build(crls, Some(digest))?;
            *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(v);
            Ok(n)
        });
        if result.is_err() {
            // Remember the broken content so that it is reported once, not every poll.
            let old = self.verifiers();
            *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(Verifiers {
                client: old.client.clone(),
                server: old.server.clone(),
                digest: Some(digest),
            });
        }
        Some(result)
    }

    fn verifiers(&self) -> Arc<Verifiers> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether a peer certificate (already verified once) is still acceptable under the CRLs in
    /// force now.
    pub fn still_valid(&self, end_entity: &CertificateDer<'_>) -> bool {
        self.verifiers()
            .client
            .verify_client_cert(end_entity, &[], UnixTime::now())
            .is_ok()
    }

    /// The verifier a TLS server uses for client certificates.
    pub fn client_verifier(self: &Arc<Self>) -> Arc<dyn ClientCertVerifier> {
        Arc::new(LiveClientVerifier(self.clone()))
    }

    /// The verifier a TLS client uses for server certificates.
    pub fn server_verifier(self: &Arc<Self>) -> Arc<dyn ServerCertVerifier> {
        Arc::new(LiveServerVerifier(self.clone()))
    }
}

fn file_digest(path: &Path) -> Result<[u8; 32], PkiError> {
    let bytes = fs::read(path).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })?;
    Ok(Sha256::digest(&bytes).into())
}

/// Stands in only while a [`Revocation`] is being built.
#[derive(Debug)]
struct RefusingVerifier;

impl ClientCertVerifier for RefusingVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Err(rustls::Error::General("verifier not ready".into()))
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("verifier not ready".into()))
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("verifier not ready".into()))
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        Vec::new()
    }
}

impl ServerCertVerifier for RefusingVerifier {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Err(rustls::Error::General("verifier not ready".into()))
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("verifier not ready".into()))
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("verifier not ready".into()))
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        Vec::new()
    }
}

/// Client-certificate verifier that always asks the CRLs in force now.
#[derive(Debug)]
struct LiveClientVerifier(Arc<Revocation>);

impl ClientCertVerifier for LiveClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &self.0.hints
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verdict = self
            .0
            .verifiers()
            .client
            .verify_client_cert(end_entity, intermediates, now);
        if verdict.is_err() {
            // So the refused connection is audited with what the certificate claims.
            super::tls::note_refused_certificate(end_entity);
        }
        verdict
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .verifiers()
            .client
            .verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .verifiers()
            .client
            .verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.verifiers().client.supported_verify_schemes()
    }
}

/// Server-certificate verifier that always asks the CRLs in force now.
#[derive(Debug)]
struct LiveServerVerifier(Arc<Revocation>);

impl ServerCertVerifier for LiveServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.verifiers().server.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp,
            now,
        )
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .verifiers()
            .server
            .verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .verifiers()
            .server
            .verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.verifiers().server.supported_verify_schemes()
    }
}

/// What [`revoke_with_dev_ca`] wrote.
#[derive(Debug, Clone)]
pub struct Revoked {
    pub crl: PathBuf,
    /// Serial numbers (hex) now on the CRL, the newly revoked ones included.
    pub serials: Vec<String>,
    pub crl_number: u64,
}

/// Adds the certificates `certs` to the CRL of the CA whose certificate and key are `ca_cert`
/// and `ca_key`, and writes the CRL (PEM) to `out`. Revocations already in `out` are kept (its
/// CRL number goes up by one), so revoking is cumulative. The CRL is valid for `days` days: a real
/// federation CA re-issues its CRL before then.
pub fn revoke_with_dev_ca(
    ca_cert: &Path,
    ca_key: &Path,
    certs: &[PathBuf],
    out: &Path,
    days: u32,
) -> Result<Revoked, PkiError> {
    let ca_pem = fs::read_to_string(ca_cert).map_err(|source| PkiError::Io {
        path: ca_cert.to_owned(),
        source,
    })?;
    let key_pem = fs::read_to_string(ca_key).map_err(|source| PkiError::Io {
        path: ca_key.to_owned(),
        source,
    })?;
    let key = KeyPair::from_pem(&key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, key)?;
    let cas = pki::load_certs(ca_cert)?;
    let now = time::OffsetDateTime::now_utc();
    let (mut revoked, mut number) = (Vec::<(Vec<u8>, time::OffsetDateTime)>::new(), 0u64);
    if out.exists() {
        for crl in load_crls(out, &cas)? {
            let (_, parsed) =
                x509_parser::parse_x509_crl(&crl).map_err(|e| crl_err(out, e.to_string()))?;
            if let Some(n) = parsed.crl_number() {
                number = number.max(n.to_u64_digits().first().copied().unwrap_or(0));
            }
            for r in parsed.iter_revoked_certificates() {
                let at = time::OffsetDateTime::from_unix_timestamp(r.revocation_date.timestamp())
                    .unwrap_or(now);
                revoked.push((r.raw_serial().to_vec(), at));
            }
        }
    }
    for c in certs {
        for cert in pki::load_certs(c)? {
            let (_, x) = x509_parser::parse_x509_certificate(cert.as_ref())
                .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
            let serial = x.raw_serial().to_vec();
            if !revoked.iter().any(|(s, _)| *s == serial) {
                revoked.push((serial, now));
            }
        }
    }
    let params = CertificateRevocationListParams {
        this_update: now - time::Duration::minutes(5),
        next_update: now + time::Duration::days(i64::from(days.max(1))),
        crl_number: SerialNumber::from(number + 1),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .map(|(serial, at)| RevokedCertParams {
                serial_number: SerialNumber::from_slice(serial),
                revocation_time: *at,
                reason_code: Some(RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(&issuer)?;
    let pem = crl.pem()?;
    crate::store::write_atomic(out, pem.as_bytes()).map_err(|e| crl_err(out, e.to_string()))?;
    Ok(Revoked {
        crl: out.to_owned(),
        serials: revoked.iter().map(|(s, _)| hex::encode(s)).collect(),
        crl_number: number + 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revoked_certificate_fails_verification_after_reload() {
        crate::federation::tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let pki_dir = dir.path();
        pki::generate_dev_federation(pki_dir, &["hospital-a".into(), "telerad-c".into()]).unwrap();
        let crl = pki_dir.join("crl.pem");
        revoke_with_dev_ca(
            &pki_dir.join("ca.pem"),
            &pki_dir.join("ca.key"),
            &[],
            &crl,
            30,
        )
        .unwrap();
        let cas = pki::load_certs(&pki_dir.join("ca.pem")).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let r = Revocation::new(cas, Some(&crl), provider).unwrap();
        let a = pki::load_certs(&pki_dir.join("hospital-a.pem")).unwrap();
        assert!(r.still_valid(&a[0]));
        assert!(r.reload_if_changed().is_none(), "unchanged file");
        let out = revoke_with_dev_ca(
            &pki_dir.join("ca.pem"),
            &pki_dir.join("ca.key"),
            &[pki_dir.join("hospital-a.pem")],
            &crl,
            30,
        )
        .unwrap();
        assert_eq!(out.crl_number, 2);
        assert_eq!(r.reload_if_changed().unwrap().unwrap(), 1);
        assert!(!r.still_valid(&a[0]));
        let c = pki::load_certs(&pki_dir.join("telerad-c.pem")).unwrap();
        assert!(r.still_valid(&c[0]));
        // A broken file keeps the revocation in force.
        fs::write(&crl, "garbage").unwrap();
        assert!(r.reload_if_changed().unwrap().is_err());
        assert!(!r.still_valid(&a[0]));
    }

    #[test]
    fn a_crl_from_another_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        pki::generate_dev_federation(&a, &["x".into()]).unwrap();
        pki::generate_dev_federation(&b, &["x".into()]).unwrap();
        let crl = dir.path().join("crl.pem");
        revoke_with_dev_ca(&b.join("ca.pem"), &b.join("ca.key"), &[], &crl, 1).unwrap();
        let cas = pki::load_certs(&a.join("ca.pem")).unwrap();
        let e = load_crls(&crl, &cas).unwrap_err().to_string();
        assert!(e.contains("not signed by the federation CA"), "{e}");
    }
}
