//! Keyed pseudonyms and the origin-only vault.
//!
//! Owns: the site secret key file ([`SiteKeys`], mode 0600, refused when group or others can read
//! it), the keyed token functions ([`Tokenizer`]: HMAC-SHA256 under the site key in a per-agreement
//! namespace, for identifier tokens, `2.25.` UIDs and per-patient date offsets), and the [`Vault`]
//! that maps a token back to the original value, sealed with AES-256-GCM, at the origin site only.
//!
//! Does not own: which attributes are tokenised (that is `deid`, driven by the agreement), nor where
//! the vault's sealed records are kept (that is `store`).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Errors about key files, tokens and the vault. Messages never carry a secret or an original value.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "key file {path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`"
    )]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("key file {path} is not a valid pacs-broker key file: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("key file {path} already exists; refusing to overwrite a site key")]
    Exists { path: PathBuf },
    #[error("vault record could not be opened (wrong key or tampered record)")]
    VaultDecrypt,
}

/// The site's secrets: the HMAC key for tokens and UIDs, and the AES-256 key for the vault.
#[derive(Clone)]
pub struct SiteKeys {
    token_key: [u8; 32],
    vault_key: [u8; 32],
}

impl std::fmt::Debug for SiteKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SiteKeys(<secret>)")
    }
}

#[derive(Serialize, Deserialize)]
struct KeyFile {
    format: String,
    token_key: String,
    vault_key: String,
}

const KEY_FORMAT: &str = "pacs-broker-site-keys-v1";

impl SiteKeys {
    /// Fresh random keys from the operating system's generator.
    pub fn generate() -> Self {
        let mut token_key = [0u8; 32];
        let mut vault_key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut token_key);
        rand::rngs::OsRng.fill_bytes(&mut vault_key);
        SiteKeys {
            token_key,
            vault_key,
        }
    }

    /// Keys from fixed bytes (tests and benchmarks).
    pub fn from_bytes(token_key: [u8; 32], vault_key: [u8; 32]) -> Self {
        SiteKeys {
            token_key,
            vault_key,
        }
    }

    /// Writes a new key file with mode 0600. Refuses to overwrite an existing file.
    pub fn write_new(&self, path: &Path) -> Result<(), KeyError> {
        let io = |source| KeyError::Io {
            path: path.to_owned(),
            source,
        };
        let body = KeyFile {
            format: KEY_FORMAT.into(),
            token_key: hex::encode(self.token_key),
            vault_key: hex::encode(self.vault_key),
        };
        let text = format!(
            "# pacs-broker site secret keys. Keep private (mode 0600), apart from the data, and backed up:\n\
             # without it tokens cannot be reproduced and the vault cannot be opened.\n{}",
            toml::to_string(&body).expect("key file serialises")
        );
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                KeyError::Exists {
                    path: path.to_owned(),
                }
            } else {
                io(e)
            }
        })?;
        f.write_all(text.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        Ok(())
    }

    /// Loads a key file, refusing one that group or others may read.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let io = |source| KeyError::Io {
            path: path.to_owned(),
            source,
        };
        let meta = fs::metadata(path).map_err(io)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(KeyError::TooOpen {
                    path: path.to_owned(),
                    mode,
                });
            }
        }
        let _ = meta;
        let text = fs::read_to_string(path).map_err(io)?;
        let invalid = |reason: String| KeyError::Invalid {
            path: path.to_owned(),
            reason,
        };
        let kf: KeyFile = toml::from_str(&text).map_err(|e| invalid(e.message().to_string()))?;
        if kf.format != KEY_FORMAT {
            return Err(invalid(format!("unknown format {:?}", kf.format)));
        }
        let parse = |name: &str, v: &str| -> Result<[u8; 32], KeyError> {
            let bytes = hex::decode(v).map_err(|_| invalid(format!("{name} is not hex")))?;
            bytes
                .try_into()
                .map_err(|_| invalid(format!("{name} must be 32 bytes")))
        };
        Ok(SiteKeys {
            token_key: parse("token_key", &kf.token_key)?,
            vault_key: parse("vault_key", &kf.vault_key)?,
        })
    }

    /// A tokenizer for one agreement's namespace.
    pub fn tokenizer(&self, agreement_id: &str) -> Tokenizer {
        Tokenizer {
            key: self.token_key,
            agreement: agreement_id.to_owned(),
        }
    }

    /// The vault cipher of this site.
    pub fn vault_cipher(&self) -> VaultCipher {
        VaultCipher {
            key: self.vault_key,
        }
    }

    /// HMAC-SHA256 under the token key of arbitrary labelled input (used for receipts and audit).
    pub fn mac(&self, label: &str, data: &[u8]) -> [u8; 32] {
        let mut m = <HmacSha256 as Mac>::new_from_slice(&self.token_key).expect("any key length");
        m.update(label.as_bytes());
        m.update(&[0x1f]);
        m.update(data);
        m.finalize().into_bytes().into()
    }
}

/// Keyed, deterministic pseudonyms in one agreement's namespace: the same input under the same
/// key and agreement always gives the same output; another agreement gives an unlinkable one.
#[derive(Clone)]
pub struct Tokenizer {
    key: [u8; 32],
    agreement: String,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokenizer(agreement={})", self.agreement)
    }
}

impl Tokenizer {
    /// The agreement this tokenizer serves.
    pub fn agreement(&self) -> &str {
        &self.agreement
    }

    fn hmac(&self, domain: &str, value: &str) -> [u8; 32] {
        let mut m = <HmacSha256 as Mac>::new_from_slice(&self.key).expect("any key length");
        for part in [self.agreement.as_str(), domain, value] {
            m.update(&(part.len() as u64).to_be_bytes());
            m.update(part.as_bytes());
        }
        m.finalize().into_bytes().into()
    }

    /// A short, stable token for `value` of `attribute` (e.g. "PatientID"): 16 characters of
    /// Crockford base32 over 80 bits of HMAC. Fits every string VR (LO, SH, PN, CS is not used).
    pub fn token(&self, attribute: &str, value: &str) -> String {
        let h = self.hmac(attribute, value.trim());
        base32(&h[..10])
    }

    /// `2.25.<decimal of 128 bits of HMAC>`: a valid UID derived from the original, never equal
    /// to it, the same everywhere the original appears.
    pub fn uid(&self, uid: &str) -> String {
        let uid = uid.trim_end_matches(['\0', ' ']);
        let h = self.hmac("uid", uid);
        let n = u128::from_be_bytes(h[..16].try_into().expect("16 bytes"));
        format!("2.25.{n}")
    }

    /// Days to add to every date of one patient: between -1095 and -1 (never zero, so a shifted
    /// date always differs from the original), the same for that patient across runs and studies.
    pub fn date_offset_days(&self, patient_key: &str) -> i64 {
        let h = self.hmac("date-shift", patient_key.trim());
        let n = u64::from_be_bytes(h[..8].try_into().expect("8 bytes"));
        -((n % 1095) as i64 + 1)
    }
}

/// Crockford base32 (no padding, upper case, no I/L/O/U).
pub fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let mut out = String::with_capacity(bytes.len() * 8 / 5 + 1);
    let mut buffer: u32 = 0;
    let mut bits = 0;
    for &b in bytes {
        buffer = (buffer << 8) | b as u32;
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buffer >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// AES-256-GCM sealing of vault records; the agreement id and token are bound as associated data,
/// so a record cannot be moved to another token or agreement.
#[derive(Clone)]
pub struct VaultCipher {
    key: [u8; 32],
}

impl VaultCipher {
    /// Seals `plaintext` for (agreement, token): 12-byte random nonce followed by the ciphertext.
    pub fn seal(&self, agreement: &str, token: &str, plaintext: &[u8]) -> Vec<u8> {
        let cipher = Aes256Gcm::new_from_slice(&self.key).expect("32-byte key");
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let aad = format!("{agreement}\u{1f}{token}");
        let ct = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: aad.as_bytes(),
                },
            )
            .expect("AES-GCM encryption of an in-memory buffer cannot fail");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&ct);
        out
    }

    /// Opens a record sealed by [`VaultCipher::seal`].
    pub fn open(&self, agreement: &str, token: &str, sealed: &[u8]) -> Result<Vec<u8>, KeyError> {
        if sealed.len() < 12 + 16 {
            return Err(KeyError::VaultDecrypt);
        }
        let cipher = Aes256Gcm::new_from_slice(&self.key).expect("32-byte key");
        let aad = format!("{agreement}\u{1f}{token}");
        cipher
            .decrypt(
                Nonce::from_slice(&sealed[..12]),
                Payload {
                    msg: &sealed[12..],
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| KeyError::VaultDecrypt)
    }
}

/// One original value behind a token, as the vault keeps it (sealed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VaultEntry {
    pub attribute: String,
    pub original: String,
}

/// The origin-only map from token to original value. Records are sealed before they reach the
/// store, so the store (and its backups) never hold an original identifier in clear.
pub struct Vault {
    cipher: VaultCipher,
    tree: sled::Tree,
}

impl Vault {
    /// A vault over a sled tree (the node passes its store's vault tree).
    pub fn new(keys: &SiteKeys, tree: sled::Tree) -> Self {
        Vault {
            cipher: keys.vault_cipher(),
            tree,
        }
    }

    fn key(agreement: &str, token: &str) -> Vec<u8> {
        format!("{agreement}\u{1f}{token}").into_bytes()
    }

    /// Records that `token` stands for `entry` under `agreement`. Idempotent.
    pub fn record(
        &self,
        agreement: &str,
        token: &str,
        entry: &VaultEntry,
    ) -> Result<(), sled::Error> {
        let k = Self::key(agreement, token);
        if self.tree.contains_key(&k)? {
            return Ok(());
        }
        let plain = serde_json::to_vec(entry).expect("vault entry serialises");
        self.tree
            .insert(k, self.cipher.seal(agreement, token, &plain))?;
        Ok(())
    }

    /// The original behind a token, if this site issued it under this agreement.
    pub fn reidentify(&self, agreement: &str, token: &str) -> Result<Option<VaultEntry>, KeyError> {
        let Some(sealed) = self
            .tree
            .get(Self::key(agreement, token))
            .map_err(|_| KeyError::VaultDecrypt)?
        else {
            return Ok(None);
        };
        let plain = self.cipher.open(agreement, token, &sealed)?;
        serde_json::from_slice(&plain)
            .map(Some)
            .map_err(|_| KeyError::VaultDecrypt)
    }

    /// Every (agreement, token) that stands for `original` of `attribute` (a full scan, for the
    /// disclosure report: it finds trial subject IDs, which no key can recompute).
    pub fn find(&self, attribute: &str, original: &str) -> Result<Vec<(String, String)>, KeyError> {
        let mut out = Vec::new();
        for item in self.tree.iter() {
            let (k, sealed) = item.map_err(|_| KeyError::VaultDecrypt)?;
            let key = String::from_utf8_lossy(&k).to_string();
            let Some((agreement, token)) = key.split_once('\u{1f}') else {
                continue;
            };
            let plain = self.cipher.open(agreement, token, &sealed)?;
            let e: VaultEntry =
                serde_json::from_slice(&plain).map_err(|_| KeyError::VaultDecrypt)?;
            if e.attribute == attribute && e.original.trim() == original.trim() {
                out.push((agreement.to_string(), token.to_string()));
            }
        }
        Ok(out)
    }

    /// Crypto-shreds an agreement's vault: every record under it is removed.
    pub fn shred(&self, agreement: &str) -> Result<usize, sled::Error> {
        let prefix = format!("{agreement}\u{1f}");
        let mut n = 0;
        for item in self.tree.scan_prefix(prefix.as_bytes()) {
            let (k, _) = item?;
            self.tree.remove(k)?;
            n += 1;
        }
        self.tree.flush()?;
        Ok(n)
    }

    /// Makes every record durable before anything that depends on it is acknowledged.
    pub fn flush(&self) -> Result<(), sled::Error> {
        self.tree.flush().map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> SiteKeys {
        SiteKeys::from_bytes([7; 32], [9; 32])
    }

    #[test]
    fn tokens_are_stable_and_agreement_scoped() {
        let a = keys().tokenizer("agr-1");
        let b = keys().tokenizer("agr-2");
        assert_eq!(a.token("PatientID", "12345"), a.token("PatientID", "12345"));
        assert_ne!(a.token("PatientID", "12345"), b.token("PatientID", "12345"));
        assert_ne!(a.token("PatientID", "12345"), a.token("PatientID", "12346"));
        assert_eq!(a.token("PatientID", "12345").len(), 16);
    }

    #[test]
    fn uids_are_valid_2_25_and_differ_from_original() {
        let t = keys().tokenizer("agr-1");
        let orig = "1.2.840.113619.2.55.3.604688119.969.1268071029.320";
        let u = t.uid(orig);
        assert!(u.starts_with("2.25."));
        assert!(u.len() <= 64);
        assert_ne!(u, orig);
        assert_eq!(u, t.uid(&format!("{orig}\0")));
        let digits = &u[5..];
        assert!(digits.chars().all(|c| c.is_ascii_digit()));
        assert!(!digits.starts_with('0') || digits == "0");
    }

    #[test]
    fn date_offsets_are_nonzero_and_stable() {
        let t = keys().tokenizer("agr-1");
        for p in ["a", "b", "c", "12345"] {
            let d = t.date_offset_days(p);
            assert!((-1095..=-1).contains(&d));
            assert_eq!(d, t.date_offset_days(p));
        }
    }

    #[test]
    fn key_file_round_trip_and_mode_check() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("site.key");
        let k = SiteKeys::generate();
        k.write_new(&p).unwrap();
        let back = SiteKeys::load(&p).unwrap();
        assert_eq!(back.token_key, k.token_key);
        assert!(matches!(k.write_new(&p), Err(KeyError::Exists { .. })));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
            assert!(matches!(SiteKeys::load(&p), Err(KeyError::TooOpen { .. })));
        }
    }

    #[test]
    fn vault_seals_and_reidentifies() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let v = Vault::new(&keys(), db.open_tree("vault").unwrap());
        let e = VaultEntry {
            attribute: "PatientID".into(),
            original: "MRN-0001".into(),
        };
        v.record("agr", "TOK", &e).unwrap();
        assert_eq!(v.reidentify("agr", "TOK").unwrap(), Some(e));
        assert_eq!(v.reidentify("other", "TOK").unwrap(), None);
        let raw = db
            .open_tree("vault")
            .unwrap()
            .iter()
            .next()
            .unwrap()
            .unwrap()
            .1;
        assert!(!raw.windows(8).any(|w| w == b"MRN-0001"));
        assert_eq!(v.shred("agr").unwrap(), 1);
        assert_eq!(v.reidentify("agr", "TOK").unwrap(), None);
    }

    #[test]
    fn base32_known_values() {
        assert_eq!(base32(&[0]), "00");
        assert_eq!(base32(&[0xff; 5]), "ZZZZZZZZ");
    }
}
