//! Signed checkpoints: the site's signature over the head of its audit chain.
//!
//! Owns: the [`Checkpoint`] record (site, entry sequence, that entry's hash, time, key id, ECDSA
//! P-256 signature by the site's certificate key — the key that signs receipts), signing and
//! checking it, and the checkpoint files: the site's own (`audit.checkpoints` beside the log) and
//! the partners' (`audit.partners/<site>.checkpoints`), JSON lines, mode 0600, appended and fsynced.
//!
//! A hash chain alone proves nothing against whoever can rewrite the file: with the last entries
//! removed or the whole file rewritten with recomputed hashes, it still verifies. A checkpoint
//! signed with the site key pins "entry N had hash H"; one held by a partner (it travels with
//! every transfer and receipt) pins it outside this machine.
//!
//! Does not own: when checkpoints are made (the log, [`super::AuditLog`]) or the wire exchange
//! (`federation` carries the bytes).

use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING,
};
use serde::{Deserialize, Serialize};

use super::AuditError;

/// Largest checkpoint accepted from a partner, in bytes of its JSON form.
pub const MAX_WIRE_BYTES: usize = 2048;

/// "Entry `seq` of `site`'s audit log had hash `hash`", signed by the site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub site: String,
    pub seq: u64,
    pub hash: String,
    /// RFC 3339 UTC.
    pub time: String,
    /// Hex SHA-256 of the signing certificate's public key (which key to check it with).
    pub key: String,
    /// Hex ECDSA P-256 / SHA-256 signature (ASN.1) over [`Checkpoint::signed_bytes`].
    pub signature: String,
}

impl Checkpoint {
    /// The exact bytes the signature covers.
    pub fn signed_bytes(&self) -> Vec<u8> {
        format!(
            "pacs-broker-audit-checkpoint-v1\n{}\n{}\n{}\n{}\n{}\n",
            self.site, self.seq, self.hash, self.time, self.key
        )
        .into_bytes()
    }

    /// Checks the signature against a certificate (DER) and that the key id matches it.
    pub fn verify(&self, cert_der: &[u8]) -> Result<(), String> {
        let (_, x) = x509_parser::parse_x509_certificate(cert_der)
            .map_err(|_| "the certificate cannot be parsed".to_string())?;
        let spki = x.public_key().subject_public_key.data.as_ref();
        if key_id(x.public_key().raw) != self.key {
            return Err(format!(
                "signed with another key ({}) than the certificate's",
                short(&self.key)
            ));
        }
        let sig = hex::decode(&self.signature).map_err(|_| "signature is not hex".to_string())?;
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, spki)
            .verify(&self.signed_bytes(), &sig)
            .map_err(|_| "the signature does not match".to_string())
    }

    /// The wire form (JSON).
    pub fn to_wire(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("checkpoint serialises")
    }

    /// Parses a partner's checkpoint, bounded in size.
    pub fn from_wire(bytes: &[u8]) -> Result<Checkpoint, String> {
        if bytes.len() > MAX_WIRE_BYTES {
            return Err(format!(
                "checkpoint of {} bytes (at most {MAX_WIRE_BYTES})",
                bytes.len()
            ));
        }
        let c: Checkpoint =
            serde_json::from_slice(bytes).map_err(|e| format!("not a checkpoint: {e}"))?;
        if c.hash.len() != 64 || !c.hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("checkpoint hash is not a SHA-256".into());
        }
        Ok(c)
    }
}

fn short(s: &str) -> &str {
    &s[..s.len().min(16)]
}

/// Hex SHA-256 of a SubjectPublicKeyInfo (DER).
pub fn key_id(spki_der: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(spki_der))
}

/// Signs checkpoints with the site's PKCS#8 ECDSA P-256 key.
pub struct CheckpointSigner {
    site: String,
    key: EcdsaKeyPair,
    key_id: String,
    rng: SystemRandom,
    /// The site certificate (DER), to verify our own checkpoints.
    pub cert: Vec<u8>,
}

impl CheckpointSigner {
    /// A signer for the site's key and certificate; `None` for a key that is not ECDSA P-256.
    pub fn new(site: &str, pkcs8: &[u8], cert_der: &[u8]) -> Option<CheckpointSigner> {
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8, &rng).ok()?;
        let (_, x) = x509_parser::parse_x509_certificate(cert_der).ok()?;
        Some(CheckpointSigner {
            site: site.to_string(),
            key_id: key_id(x.public_key().raw),
            key,
            rng,
            cert: cert_der.to_vec(),
        })
    }

    pub fn site(&self) -> &str {
        &self.site
    }

    /// A signed checkpoint of entry `seq` with hash `hash`, now.
    pub fn sign(&self, seq: u64, hash: &str) -> Checkpoint {
        let mut c = Checkpoint {
            site: self.site.clone(),
            seq,
            hash: hash.to_string(),
            time: super::now_rfc3339(),
            key: self.key_id.clone(),
            signature: String::new(),
        };
        c.signature = self
            .key
            .sign(&self.rng, &c.signed_bytes())
            .map(|s| hex::encode(s.as_ref()))
            .unwrap_or_default();
        c
    }
}

/// The site's own checkpoint file, beside the log.
pub fn own_file(log: &Path) -> PathBuf {
    sibling(log, "checkpoints")
}

/// The folder of partners' checkpoints, beside the log.
pub fn partners_dir(log: &Path) -> PathBuf {
    sibling(log, "partners")
}

/// The file of one partner's checkpoints.
pub fn partner_file(log: &Path, site: &str) -> PathBuf {
    partners_dir(log).join(format!("{}.checkpoints", crate::store::safe_name(site)))
}

fn sibling(log: &Path, ext: &str) -> PathBuf {
    let name = log
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "audit".into());
    log.with_file_name(format!("{name}.{ext}"))
}

/// Appends a checkpoint to a file (created 0600), fsynced. No folder is created: a data
/// folder that has gone while the node runs is an error, not made anew around one file (see
/// [`append_partner`] for the partners' folder).
pub fn append(path: &Path, c: &Checkpoint) -> Result<(), AuditError> {
    let io = |source| AuditError::Io {
        path: path.to_owned(),
        source,
    };
    let mut opts = OpenOptions::new();
    opts.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(io)?;
    let mut line = serde_json::to_string(c).expect("checkpoint serialises");
    line.push('\n');
    f.write_all(line.as_bytes()).map_err(io)?;
    f.sync_data().map_err(io)
}

/// Appends a partner's checkpoint to its file ([`partner_file`]); the partners' folder beside
/// the log is created at the first one (the log's own folder must exist).
pub fn append_partner(log: &Path, site: &str, c: &Checkpoint) -> Result<(), AuditError> {
    let dir = partners_dir(log);
    match fs::create_dir(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            return Err(AuditError::Io {
                path: dir,
                source: e,
            })
        }
        _ => {}
    }
    append(&partner_file(log, site), c)
}

/// Every checkpoint in a file, in order; a missing file holds none. A line that is not a
/// checkpoint is an error naming the line.
pub fn load(path: &Path) -> Result<Vec<Checkpoint>, AuditError> {
    let f = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(AuditError::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    let mut out = Vec::new();
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let broken = |reason: String| AuditError::Broken {
            path: path.to_owned(),
            line: i + 1,
            reason,
        };
        let line = line.map_err(|e| broken(e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        out.push(
            serde_json::from_str(&line).map_err(|e| broken(format!("not a checkpoint: {e}")))?,
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn site_key() -> (Vec<u8>, Vec<u8>) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (key.serialize_der(), cert.der().to_vec())
    }

    #[test]
    fn signed_checkpoints_verify_and_edits_do_not() {
        let (k, c) = site_key();
        let s = CheckpointSigner::new("hospital-a", &k, &c).unwrap();
        let cp = s.sign(42, &"ab".repeat(32));
        cp.verify(&c).unwrap();
        let back = Checkpoint::from_wire(&cp.to_wire()).unwrap();
        assert_eq!(back, cp);
        let mut forged = cp.clone();
        forged.seq = 41;
        assert!(forged.verify(&c).is_err());
        let (_, other) = site_key();
        assert!(cp.verify(&other).is_err());
        assert!(Checkpoint::from_wire(&vec![b' '; MAX_WIRE_BYTES + 1]).is_err());
    }

    #[test]
    fn files_are_private_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("audit.log");
        let (k, c) = site_key();
        let s = CheckpointSigner::new("hospital-a", &k, &c).unwrap();
        let f = own_file(&log);
        assert!(f.ends_with("audit.checkpoints"));
        append(&f, &s.sign(1, &"00".repeat(32))).unwrap();
        append(&f, &s.sign(2, &"11".repeat(32))).unwrap();
        assert_eq!(load(&f).unwrap().len(), 2);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&f).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        assert!(load(&dir.path().join("none")).unwrap().is_empty());
        // A partner's file: its folder is made at the first checkpoint.
        append_partner(&log, "telerad-c", &s.sign(1, &"22".repeat(32))).unwrap();
        append_partner(&log, "telerad-c", &s.sign(2, &"33".repeat(32))).unwrap();
        assert_eq!(load(&partner_file(&log, "telerad-c")).unwrap().len(), 2);
    }

    #[test]
    fn a_data_folder_that_has_gone_is_an_error_and_is_not_made_anew() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let log = data.join("audit.log");
        let (k, c) = site_key();
        let s = CheckpointSigner::new("hospital-a", &k, &c).unwrap();
        let cp = s.sign(1, &"00".repeat(32));
        let err = append(&own_file(&log), &cp).unwrap_err();
        assert!(err.to_string().contains("audit.checkpoints"), "{err}");
        let err = append_partner(&log, "telerad-c", &cp).unwrap_err();
        assert!(err.to_string().contains("audit.partners"), "{err}");
        assert!(!data.exists());
    }
}
