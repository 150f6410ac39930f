//! Detached signatures over an agreement file's exact bytes, made with the site's own mutual-TLS
//! certificate key (ECDSA P-256), verified against the federation CA. No second PKI.
//!
//! Layout: the signatures of `policy.toml` live in the folder `policy.toml.sig/`, one file
//! `<site-id>.sig` per party (a small TOML file, so parties can exchange them independently).
//! The signed message is `"pacs-broker DSA signature v1\n" + hex(SHA-256(file bytes)) + "\n"`,
//! signed with ECDSA P-256 / SHA-256, DER-encoded. See docs/dsa.md for checking it with openssl.

use std::fmt;
use std::path::{Path, PathBuf};

use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, KeyPair, UnparsedPublicKey};
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;
use x509_parser::time::ASN1Time;

use super::model::Agreement;

/// The URI SAN prefix that carries a site id in a site certificate.
pub const SITE_URI_PREFIX: &str = "urn:pacs-broker:site:";
const MESSAGE_PREFIX: &str = "pacs-broker DSA signature v1\n";
const ALGORITHM: &str = "ecdsa-p256-sha256";

/// Why a signature could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("{file}: {source}")]
    Io {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn read(path: &Path) -> Result<Vec<u8>, SignError> {
    std::fs::read(path).map_err(|source| SignError::Io {
        file: path.to_owned(),
        source,
    })
}

/// The folder holding the signatures of `policy`: `policy.toml.sig`.
pub fn signature_dir(policy: &Path) -> PathBuf {
    let mut s = policy.as_os_str().to_owned();
    s.push(".sig");
    PathBuf::from(s)
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn message(file_sha256: &str) -> Vec<u8> {
    format!("{MESSAGE_PREFIX}{file_sha256}\n").into_bytes()
}

/// Decodes the first PEM block labelled `label`.
fn pem_block(text: &[u8], label: &str) -> Result<Vec<u8>, String> {
    for pem in x509_parser::pem::Pem::iter_from_buffer(text) {
        let pem = pem.map_err(|e| format!("unreadable PEM: {e}"))?;
        if pem.label == label {
            return Ok(pem.contents);
        }
    }
    Err(format!("no \"{label}\" PEM block found"))
}

/// The site id a site certificate names in its URI SAN (and CN, which must agree).
pub fn site_of(cert: &X509Certificate) -> Result<String, String> {
    let mut site = None;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(u) = name {
                if let Some(s) = u.strip_prefix(SITE_URI_PREFIX) {
                    site = Some(s.to_string());
                }
            }
        }
    }
    let site =
        site.ok_or_else(|| format!("the certificate has no URI SAN {SITE_URI_PREFIX}<site-id>"))?;
    if let Some(cn) = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok())
    {
        if cn != site {
            return Err(format!(
                "the certificate's CN {cn:?} differs from its site id {site:?}"
            ));
        }
    }
    Ok(site)
}

/// Lowercase hex SHA-256 of a certificate's SubjectPublicKeyInfo: the `certificate_pin` value.
pub fn public_key_pin(cert: &X509Certificate) -> String {
    sha256_hex(cert.public_key().raw)
}

/// One site's detached signature of one agreement file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub site: String,
    pub agreement: String,
    pub version: u32,
    pub file_sha256: String,
    /// The signer's claim of when it signed (not covered by the signature).
    pub signed_at: String,
    pub signature: Vec<u8>,
    pub certificate_pem: String,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSignature {
    site: String,
    agreement: String,
    version: u32,
    file_sha256: String,
    signed_at: String,
    algorithm: String,
    signature: String,
    certificate: String,
}

impl Signature {
    /// The `.sig` file text.
    pub fn to_toml(&self) -> String {
        use super::format::quote;
        format!(
            "# Detached signature of a pacs-broker data sharing agreement (docs/dsa.md).\n\
             site = {}\nagreement = {}\nversion = {}\nfile_sha256 = {}\nsigned_at = {}\nalgorithm = {}\nsignature = {}\ncertificate = \"\"\"\n{}\"\"\"\n",
            quote(&self.site),
            quote(&self.agreement),
            self.version,
            quote(&self.file_sha256),
            quote(&self.signed_at),
            quote(ALGORITHM),
            quote(&hex::encode(&self.signature)),
            self.certificate_pem.trim_end().to_string() + "\n",
        )
    }

    pub fn from_toml(text: &str) -> Result<Signature, String> {
        let raw: RawSignature = toml::from_str(text)
            .map_err(|e| format!("unreadable signature file: {}", e.message()))?;
        if raw.algorithm != ALGORITHM {
            return Err(format!(
                "unsupported signature algorithm {:?}",
                raw.algorithm
            ));
        }
        Ok(Signature {
            site: raw.site,
            agreement: raw.agreement,
            version: raw.version,
            file_sha256: raw.file_sha256,
            signed_at: raw.signed_at,
            signature: hex::decode(raw.signature.trim())
                .map_err(|_| "the signature is not hex".to_string())?,
            certificate_pem: raw.certificate,
        })
    }
}

/// Signs the exact `bytes` of an agreement with a site certificate and its PKCS#8 PEM key.
pub fn sign_bytes(
    bytes: &[u8],
    agreement: &Agreement,
    cert_pem: &[u8],
    key_pem: &[u8],
    now: OffsetDateTime,
) -> Result<Signature, SignError> {
    let bad = |m: String| SignError::Invalid(m);
    let cert_der =
        pem_block(cert_pem, "CERTIFICATE").map_err(|m| bad(format!("site certificate: {m}")))?;
    let (_, cert) =
        X509Certificate::from_der(&cert_der).map_err(|e| bad(format!("site certificate: {e}")))?;
    let site = site_of(&cert).map_err(bad)?;
    let party = agreement.party(&site).ok_or_else(|| {
        bad(format!(
            "this certificate is for site {site:?}, which is not a party to agreement {:?}",
            agreement.id
        ))
    })?;
    if let Some(pin) = &party.certificate_pin {
        if *pin != public_key_pin(&cert) {
            return Err(bad(format!(
                "the certificate's public key does not match the certificate_pin of party {site:?}"
            )));
        }
    }
    let key_der = pem_block(key_pem, "PRIVATE KEY")
        .map_err(|m| bad(format!("site key (PKCS#8 PEM expected): {m}")))?;
    let rng = SystemRandom::new();
    let key = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &key_der, &rng)
        .map_err(|_| bad("site key: not an ECDSA P-256 PKCS#8 key".into()))?;
    if key.public_key().as_ref() != cert.public_key().subject_public_key.data.as_ref() {
        return Err(bad("the key does not belong to the certificate".into()));
    }
    let file_sha256 = sha256_hex(bytes);
    let sig = key
        .sign(&rng, &message(&file_sha256))
        .map_err(|_| bad("signing failed".into()))?;
    Ok(Signature {
        site,
        agreement: agreement.id.clone(),
        version: agreement.version,
        file_sha256,
        signed_at: now.format(&Rfc3339).unwrap_or_default(),
        signature: sig.as_ref().to_vec(),
        certificate_pem: String::from_utf8_lossy(cert_pem).trim().to_string() + "\n",
    })
}

/// Signs `policy` (which must parse without errors) and writes `policy.toml.sig/<site>.sig`.
pub fn sign_file(
    policy: &Path,
    cert: &Path,
    key: &Path,
    now: OffsetDateTime,
) -> Result<PathBuf, SignError> {
    let bytes = read(policy)?;
    let text = String::from_utf8(bytes.clone())
        .map_err(|_| SignError::Invalid(format!("{}: not UTF-8 text", policy.display())))?;
    let agreement = super::Agreement::parse(&policy.display().to_string(), &text)
        .map_err(|e| SignError::Invalid(format!("refusing to sign a file with errors:\n{e}")))?;
    let sig = sign_bytes(&bytes, &agreement, &read(cert)?, &read(key)?, now)?;
    let dir = signature_dir(policy);
    std::fs::create_dir_all(&dir).map_err(|source| SignError::Io {
        file: dir.clone(),
        source,
    })?;
    let out = dir.join(format!("{}.sig", sig.site));
    let tmp = dir.join(format!(".{}.sig.tmp", sig.site));
    std::fs::write(&tmp, sig.to_toml()).map_err(|source| SignError::Io {
        file: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, &out).map_err(|source| SignError::Io {
        file: out.clone(),
        source,
    })?;
    Ok(out)
}

/// The federation CA certificate that every site certificate must be issued by.
#[derive(Debug, Clone)]
pub struct FederationCa {
    der: Vec<u8>,
}

impl FederationCa {
    pub fn from_pem(pem: &[u8]) -> Result<FederationCa, SignError> {
        let der = pem_block(pem, "CERTIFICATE")
            .map_err(|m| SignError::Invalid(format!("federation CA: {m}")))?;
        let (_, cert) = X509Certificate::from_der(&der)
            .map_err(|e| SignError::Invalid(format!("federation CA: {e}")))?;
        if !cert.is_ca() {
            return Err(SignError::Invalid(
                "federation CA: the certificate is not a CA certificate".into(),
            ));
        }
        Ok(FederationCa { der })
    }

    pub fn from_pem_file(path: &Path) -> Result<FederationCa, SignError> {
        FederationCa::from_pem(&read(path)?)
    }

    /// Checks that `cert` was issued by this CA and is valid at `now`.
    fn check(&self, cert: &X509Certificate, now: OffsetDateTime) -> Result<(), String> {
        let (_, ca) = X509Certificate::from_der(&self.der).map_err(|e| e.to_string())?;
        if cert.issuer() != ca.subject() || cert.verify_signature(Some(ca.public_key())).is_err() {
            return Err("the signer's certificate was not issued by the federation CA".into());
        }
        let t = ASN1Time::from_timestamp(now.unix_timestamp()).map_err(|e| e.to_string())?;
        if !cert.validity().is_valid_at(t) {
            return Err(format!(
                "the signer's certificate is not valid now (valid {} to {})",
                cert.validity().not_before,
                cert.validity().not_after
            ));
        }
        Ok(())
    }
}

/// The state of one party's signature over one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignatureState {
    /// Valid over these exact bytes, by a certificate of this party issued by the CA.
    Valid { signed_at: String, version: u32 },
    /// No signature from this party yet.
    Missing,
    /// Signed another version of the file (the bytes changed since).
    Stale { signed_sha256: String, version: u32 },
    /// Forged, from a wrong certificate or CA, or unreadable.
    Invalid(String),
}

impl fmt::Display for SignatureState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SignatureState::Valid { signed_at, version } => write!(f, "signed version {version} of these exact bytes at {signed_at}"),
            SignatureState::Missing => f.write_str("has not signed yet"),
            SignatureState::Stale { signed_sha256, version } => write!(
                f,
                "signed a different version of the file (version {version}, sha256 {}…); the file has changed since",
                &signed_sha256[..signed_sha256.len().min(12)]
            ),
            SignatureState::Invalid(why) => write!(f, "signature does not match: {why}"),
        }
    }
}

/// The signatures of one agreement file, one entry per party, plus notes on stray files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verification {
    pub file_sha256: String,
    pub parties: Vec<(String, SignatureState)>,
    /// Signature files that belong to no party (ignored, reported).
    pub notes: Vec<String>,
}

/// The overall verdict, mapped by the CLI to its exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every party has a valid signature over these exact bytes.
    FullySigned,
    /// No signature is wrong, but at least one party has not signed yet.
    Unsigned,
    /// At least one signature does not match this file (changed, forged or wrong certificate).
    Mismatch,
}

impl Verification {
    pub fn verdict(&self) -> Verdict {
        let states = || self.parties.iter().map(|(_, s)| s);
        if states().any(|s| matches!(s, SignatureState::Stale { .. } | SignatureState::Invalid(_)))
        {
            Verdict::Mismatch
        } else if states().any(|s| *s == SignatureState::Missing) {
            Verdict::Unsigned
        } else {
            Verdict::FullySigned
        }
    }

    /// One line naming every party that is not validly signed, for logs and refusals.
    pub fn problems(&self) -> String {
        let v: Vec<String> = self
            .parties
            .iter()
            .filter(|(_, s)| !matches!(s, SignatureState::Valid { .. }))
            .map(|(site, s)| format!("{site} {s}"))
            .collect();
        v.join("; ")
    }
}

/// Checks one signature file against the exact `bytes` and the party `site`.
fn check_one(
    sig_text: &str,
    site: &str,
    agreement: &Agreement,
    bytes_sha: &str,
    ca: &FederationCa,
    now: OffsetDateTime,
) -> SignatureState {
    let sig = match Signature::from_toml(sig_text) {
        Ok(s) => s,
        Err(m) => return SignatureState::Invalid(m),
    };
    let der = match pem_block(sig.certificate_pem.as_bytes(), "CERTIFICATE") {
        Ok(d) => d,
        Err(m) => return SignatureState::Invalid(format!("certificate: {m}")),
    };
    let cert = match X509Certificate::from_der(&der) {
        Ok((_, c)) => c,
        Err(e) => return SignatureState::Invalid(format!("certificate: {e}")),
    };
    if let Err(m) = ca.check(&cert, now) {
        return SignatureState::Invalid(m);
    }
    match site_of(&cert) {
        Ok(s) if s == site && sig.site == site => {}
        Ok(s) => {
            return SignatureState::Invalid(format!(
                "the signature for {site:?} was made with the certificate of site {s:?}"
            ))
        }
        Err(m) => return SignatureState::Invalid(m),
    }
    if let Some(pin) = agreement
        .party(site)
        .and_then(|p| p.certificate_pin.as_ref())
    {
        if *pin != public_key_pin(&cert) {
            return SignatureState::Invalid(
                "the signer's public key does not match the party's certificate_pin".into(),
            );
        }
    }
    let key = UnparsedPublicKey::new(
        &signature::ECDSA_P256_SHA256_ASN1,
        cert.public_key().subject_public_key.data.as_ref(),
    );
    if key
        .verify(&message(&sig.file_sha256), &sig.signature)
        .is_err()
    {
        return SignatureState::Invalid("the signature value is not a valid signature by this certificate (forged or corrupted)".into());
    }
    if sig.file_sha256 != bytes_sha {
        return SignatureState::Stale {
            signed_sha256: sig.file_sha256,
            version: sig.version,
        };
    }
    SignatureState::Valid {
        signed_at: sig.signed_at,
        version: sig.version,
    }
}

/// Verifies the signatures of `policy` (whose exact contents are `bytes`, parsed as `agreement`).
pub fn verify(
    policy: &Path,
    bytes: &[u8],
    agreement: &Agreement,
    ca: &FederationCa,
    now: OffsetDateTime,
) -> Verification {
    let dir = signature_dir(policy);
    let sha = sha256_hex(bytes);
    let parties = agreement
        .parties
        .iter()
        .map(|p| {
            let path = dir.join(format!("{}.sig", p.site));
            let state = match std::fs::read_to_string(&path) {
                Ok(text) => check_one(&text, &p.site, agreement, &sha, ca, now),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => SignatureState::Missing,
                Err(e) => SignatureState::Invalid(format!("{}: {e}", path.display())),
            };
            (p.site.clone(), state)
        })
        .collect();
    let mut notes = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let site = name.strip_suffix(".sig");
            if !name.starts_with('.') && site.is_none_or(|s| agreement.party(s).is_none()) {
                notes.push(format!(
                    "{name}: not the signature of a party to this agreement; ignored"
                ));
            }
        }
    }
    notes.sort();
    Verification {
        file_sha256: sha,
        parties,
        notes,
    }
}
