//! Federation PKI: certificate and key files, and the site identity a certificate carries.
//!
//! A federation has one CA. Each site certificate carries the site id as a URI SAN
//! `urn:pacs-broker:site:<site-id>` and as CN, and is valid for server and client auth. This module
//! reads those files, extracts the site id from a verified certificate (x509-parser), and writes a
//! development federation (rcgen) for `pacs-broker certs dev`.

use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The URI SAN prefix that names a site.
pub const SITE_URI_PREFIX: &str = "urn:pacs-broker:site:";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: no PEM {what} found")]
    NoPem { path: PathBuf, what: &'static str },
    #[error("certificate is not valid X.509: {0}")]
    BadCertificate(String),
    #[error("certificate carries no site identity (URI SAN {SITE_URI_PREFIX}<site-id>)")]
    NoSiteId,
    #[error("certificate carries more than one site identity")]
    AmbiguousSiteId,
    #[error(
        "site id {0:?} is not valid: use lower-case letters, digits and '-' (1-63 characters)"
    )]
    BadSiteId(String),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error(
        "key file {path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`"
    )]
    KeyTooOpen { path: PathBuf, mode: u32 },
    #[error("{path}: {message}")]
    Crl { path: PathBuf, message: String },
}

/// Checks the form of a site id: `[a-z0-9][a-z0-9-]{0,62}`.
pub fn validate_site_id(id: &str) -> Result<(), PkiError> {
    let ok = !id.is_empty()
        && id.len() <= 63
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(PkiError::BadSiteId(id.to_string()))
    }
}

/// Reads every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let bytes = fs::read(path).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(PkiError::NoPem {
            path: path.to_owned(),
            what: "certificate",
        });
    }
    Ok(certs)
}

/// Refuses a private key file that group or others may read (the same rule, and the same
/// message, as for the site key file).
pub fn check_private_key_mode(path: &Path) -> Result<(), PkiError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = fs::metadata(path).map_err(|source| PkiError::Io {
            path: path.to_owned(),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(PkiError::KeyTooOpen {
                path: path.to_owned(),
                mode,
            });
        }
    }
    let _ = path;
    Ok(())
}

/// Sets a file's mode to 0600 (owner read and write only).
pub fn restrict_to_owner(path: &Path) -> Result<(), PkiError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(|source| {
            PkiError::Io {
                path: path.to_owned(),
                source,
            }
        })?;
    }
    let _ = path;
    Ok(())
}

/// Reads a private key (PKCS#8, SEC1 or PKCS#1) from a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PkiError> {
    let bytes = fs::read(path).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|_| PkiError::NoPem {
        path: path.to_owned(),
        what: "private key",
    })
}

/// The site id a certificate carries in its URI SAN (exactly one is allowed).
pub fn site_id_of(cert: &CertificateDer<'_>) -> Result<String, PkiError> {
    let (_, x) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    let mut found = Vec::new();
    if let Ok(Some(san)) = x.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name {
                if let Some(id) = uri.strip_prefix(SITE_URI_PREFIX) {
                    found.push(id.to_string());
                }
            }
        }
    }
    match found.len() {
        0 => Err(PkiError::NoSiteId),
        1 => {
            let id = found.pop().expect("one");
            validate_site_id(&id)?;
            Ok(id)
        }
        _ => Err(PkiError::AmbiguousSiteId),
    }
}

/// SHA-256 of a certificate's SubjectPublicKeyInfo (the pin an agreement may name).
pub fn spki_sha256(cert: &CertificateDer<'_>) -> Result<[u8; 32], PkiError> {
    use sha2::{Digest, Sha256};
    let (_, x) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    Ok(Sha256::digest(x.public_key().raw).into())
}

fn write(path: &Path, text: &str) -> Result<(), PkiError> {
    fs::write(path, text).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Writes a private key: created with mode 0600 (and set to 0600 if the file existed).
fn write_private(path: &Path, text: &str) -> Result<(), PkiError> {
    use std::io::Write;
    let io = |source| PkiError::Io {
        path: path.to_owned(),
        source,
    };
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(io)?;
    restrict_to_owner(path)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

/// Issues a site certificate (new ECDSA P-256 key) signed by `issuer` and writes
/// `<out>/<site>.pem` and `<out>/<site>.key` (0600).
fn write_site_certificate(
    issuer: &Issuer<'_, KeyPair>,
    site: &str,
    out: &Path,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> Result<(PathBuf, PathBuf), PkiError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut p = CertificateParams::new(vec!["localhost".to_string()])?;
    p.subject_alt_names
        .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    p.subject_alt_names
        .push(SanType::URI(format!("{SITE_URI_PREFIX}{site}").try_into()?));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, site);
    dn.push(
        DnType::OrganizationName,
        "pacs-broker dev (NOT FOR CLINICAL USE)",
    );
    p.distinguished_name = dn;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.not_before = not_before;
    p.not_after = not_after;
    let cert = p.signed_by(&key, issuer)?;
    let cert_path = out.join(format!("{site}.pem"));
    let key_path = out.join(format!("{site}.key"));
    write(&cert_path, &cert.pem())?;
    write_private(&key_path, &key.serialize_pem())?;
    Ok((cert_path, key_path))
}

/// Issues one more development site certificate, with a new key, from the CA in `ca_dir`
/// (`ca.pem`, `ca.key`), into `out` (a re-issued or a second certificate of a site).
pub fn issue_dev_site_certificate(
    ca_dir: &Path,
    site: &str,
    out: &Path,
) -> Result<(PathBuf, PathBuf), PkiError> {
    validate_site_id(site)?;
    let read =
        |p: PathBuf| fs::read_to_string(&p).map_err(|source| PkiError::Io { path: p, source });
    let key = KeyPair::from_pem(&read(ca_dir.join("ca.key"))?)?;
    let issuer = Issuer::from_ca_cert_pem(&read(ca_dir.join("ca.pem"))?, key)?;
    fs::create_dir_all(out).map_err(|source| PkiError::Io {
        path: out.to_owned(),
        source,
    })?;
    let now = time::OffsetDateTime::now_utc();
    write_site_certificate(
        &issuer,
        site,
        out,
        now - time::Duration::days(1),
        now + time::Duration::days(365),
    )
}

/// Files written by [`generate_dev_federation`].
#[derive(Debug, Clone)]
pub struct DevFederation {
    pub ca_cert: PathBuf,
    pub sites: Vec<(String, PathBuf, PathBuf)>,
}

/// Writes a development federation into `out`: `ca.pem`, `ca.key`, and for every site
/// `<site>.pem` and `<site>.key` (ECDSA P-256, PKCS#8), valid for 20 years for server and client
/// auth on localhost / 127.0.0.1, plus a README that marks them as development-only.
pub fn generate_dev_federation(out: &Path, sites: &[String]) -> Result<DevFederation, PkiError> {
    for s in sites {
        validate_site_id(s)?;
    }
    fs::create_dir_all(out).map_err(|source| PkiError::Io {
        path: out.to_owned(),
        source,
    })?;
    let now = time::OffsetDateTime::now_utc();
    let not_before = now - time::Duration::days(1);
    let not_after = now + time::Duration::days(365 * 20);

    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "pacs-broker DEVELOPMENT federation CA");
    dn.push(
        DnType::OrganizationName,
        "pacs-broker dev (NOT FOR CLINICAL USE)",
    );
    ca.distinguished_name = dn;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = not_before;
    ca.not_after = not_after;
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let ca_path = out.join("ca.pem");
    write(&ca_path, &ca_cert.pem())?;
    write_private(&out.join("ca.key"), &issuer.key().serialize_pem())?;

    let mut written = Vec::new();
    for site in sites {
        let (cert_path, key_path) =
            write_site_certificate(&issuer, site, out, not_before, not_after)?;
        written.push((site.clone(), cert_path, key_path));
    }
    write(
        &out.join("README.md"),
        &format!(
            "# DEVELOPMENT CERTIFICATES — NOT FOR CLINICAL USE\n\n\
             Written by `pacs-broker certs dev`. The private keys in this folder are public (they are\n\
             committed to the repository), so anyone can impersonate these sites. Use them only for the\n\
             demo and the tests on one machine. A real federation gets its CA and site certificates\n\
             from the hospitals' own PKI.\n\n\
             - `ca.pem` / `ca.key`: the development federation CA\n\
             {}\n\n\
             Each site certificate carries its site id as URI SAN `{SITE_URI_PREFIX}<site-id>` and as CN,\n\
             and is valid for TLS server and client authentication on `localhost` and `127.0.0.1`.\n",
            sites
                .iter()
                .map(|s| format!("- `{s}.pem` / `{s}.key`: site `{s}`"))
                .collect::<Vec<_>>()
                .join("\n")
        ),
    )?;
    Ok(DevFederation {
        ca_cert: ca_path,
        sites: written,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_federation_certs_carry_site_ids() {
        let dir = tempfile::tempdir().unwrap();
        let fed = generate_dev_federation(dir.path(), &["hospital-a".into(), "telerad-c".into()])
            .unwrap();
        for (site, cert, key) in &fed.sites {
            let c = load_certs(cert).unwrap();
            assert_eq!(&site_id_of(&c[0]).unwrap(), site);
            load_key(key).unwrap();
        }
        let ca = load_certs(&fed.ca_cert).unwrap();
        assert!(matches!(site_id_of(&ca[0]), Err(PkiError::NoSiteId)));
    }

    #[test]
    fn site_ids_are_validated() {
        assert!(validate_site_id("hospital-a").is_ok());
        assert!(validate_site_id("Hospital A").is_err());
        assert!(validate_site_id("").is_err());
        assert!(validate_site_id("-x").is_err());
    }
}
