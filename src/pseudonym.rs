//! Keyed pseudonyms and the origin-only vault.
//!
//! Owns: the site secret key file ([`SiteKeys`], mode 0600, refused when group or others can read
//! it), the keyed token functions ([`Tokenizer`]: HMAC-SHA256 under the site key in a per-agreement
//! namespace, for identifier tokens, `2.25.` UIDs and per-patient date offsets), and the [`Vault`]
//! that maps a token back to the original value, sealed with AES-256-GCM, at the origin site only.
//!
//! Does not own: which attributes are tokenised (that is `deid`, driven by the agreement), nor where
//! the vault's sealed records are kept (that is `store`).

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::keyring::{self, KeyRing};

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
    #[error("vault record of token `{token}` under agreement `{agreement}` could not be opened: wrong key file, or the record was damaged or tampered with")]
    VaultRecord { agreement: String, token: String },
    #[error("agreement `{agreement}` was shredded on {on}: its tokens can no longer be reversed or issued")]
    Shredded { agreement: String, on: String },
    #[error("vault storage: {0}")]
    VaultStore(#[from] sled::Error),
}

/// A date for messages: `2026-12-02 07:40 UTC`.
pub fn shown_date(unix: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix as i64)
        .ok()
        .and_then(|t| {
            t.format(time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute] UTC"
            ))
            .ok()
        })
        .unwrap_or_else(|| format!("unix time {unix}"))
}

/// The site's secrets, as its key file holds them ([`KeyRing`]): the HMAC key for tokens and
/// UIDs, per-agreement token secrets, the data-encryption keys and the v1 vault key. Clones share
/// one ring, so a change made through one (a new agreement secret, a rotation read back from the
/// file) is seen by all.
#[derive(Clone)]
pub struct SiteKeys {
    token_key: [u8; 32],
    shared: Arc<Shared>,
}

struct Shared {
    ring: RwLock<KeyRing>,
    /// The key file, when the keys came from one (changes are written back to it).
    path: Option<PathBuf>,
    /// When the file was last looked at, and its modification time then.
    seen: Mutex<(Instant, Option<SystemTime>)>,
}

impl std::fmt::Debug for SiteKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SiteKeys(<secret>)")
    }
}

/// How often a running process looks whether its key file changed (a rotation by `keys rotate`).
const KEY_FILE_RECHECK: Duration = Duration::from_secs(2);

impl SiteKeys {
    fn with_ring(ring: KeyRing, path: Option<PathBuf>) -> Self {
        let mtime = path
            .as_deref()
            .and_then(|p| fs::metadata(p).ok())
            .and_then(|m| m.modified().ok());
        SiteKeys {
            token_key: ring.token_key,
            shared: Arc::new(Shared {
                ring: RwLock::new(ring),
                path,
                seen: Mutex::new((Instant::now(), mtime)),
            }),
        }
    }

    /// Fresh random keys from the operating system's generator (a v2 ring).
    pub fn generate() -> Self {
        SiteKeys::with_ring(KeyRing::generate(), None)
    }

    /// Keys from fixed bytes (tests and benchmarks), as a v1 key file with these keys would
    /// give: every agreement's tokens are made under `token_key`.
    pub fn from_bytes(token_key: [u8; 32], vault_key: [u8; 32]) -> Self {
        SiteKeys::with_ring(KeyRing::from_v1_keys(token_key, vault_key), None)
    }

    /// Writes a new key file with mode 0600. Refuses to overwrite an existing file.
    pub fn write_new(&self, path: &Path) -> Result<(), KeyError> {
        keyring::write_new(path, &self.ring())
    }

    /// Loads a key file (v2, or v1: see [`crate::keyring`]), refusing one that group or others
    /// may read.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        Ok(SiteKeys::with_ring(
            keyring::read(path)?,
            Some(path.to_owned()),
        ))
    }

    fn ring(&self) -> std::sync::RwLockReadGuard<'_, KeyRing> {
        self.shared.ring.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads the key file again if it changed since it was last looked at (at most every two
    /// seconds, or at once when `now` is set), so that a running node picks up a rotation.
    fn refresh(&self, now: bool) {
        self.refresh_within(now, KEY_FILE_RECHECK)
    }

    /// As [`SiteKeys::refresh`], looking at the key file's time stamp at most every `recheck`.
    fn refresh_within(&self, now: bool, recheck: Duration) {
        let Some(path) = &self.shared.path else {
            return;
        };
        let mut seen = self.shared.seen.lock().unwrap_or_else(|p| p.into_inner());
        if !now && seen.0.elapsed() < recheck {
            return;
        }
        seen.0 = Instant::now();
        let mtime = fs::metadata(path).ok().and_then(|m| m.modified().ok());
        if mtime == seen.1 && !now {
            return;
        }
        match keyring::read(path) {
            Ok(ring) if ring.token_key == self.token_key => {
                seen.1 = mtime;
                *self.shared.ring.write().unwrap_or_else(|p| p.into_inner()) = ring;
            }
            Ok(_) => tracing::error!(
                "the key file now holds another token key; keeping the keys loaded at start"
            ),
            Err(e) => tracing::error!(error = %e, "the key file could not be read again"),
        }
    }

    /// Applies `change` to the ring, writing the key file (under its lock) when there is one.
    fn change<T>(&self, change: impl FnOnce(&mut KeyRing) -> T) -> Result<T, KeyError> {
        match &self.shared.path {
            Some(path) => {
                let (ring, out) = keyring::update(path, change)?;
                let mtime = fs::metadata(path).ok().and_then(|m| m.modified().ok());
                *self.shared.ring.write().unwrap_or_else(|p| p.into_inner()) = ring;
                *self.shared.seen.lock().unwrap_or_else(|p| p.into_inner()) =
                    (Instant::now(), mtime);
                Ok(out)
            }
            None => {
                let mut ring = self.shared.ring.write().unwrap_or_else(|p| p.into_inner());
                Ok(change(&mut ring))
            }
        }
    }

    /// A tokenizer for one agreement's namespace: under the agreement's own secret (created on
    /// first use and written to the key file), or under the site token key for a legacy
    /// agreement (one that issued tokens before the key file was v2). Refused once the
    /// agreement was shredded.
    pub fn tokenizer(&self, agreement_id: &str) -> Result<Tokenizer, KeyError> {
        let lookup = || self.ring().agreements.get(agreement_id).cloned();
        let mut known = lookup();
        if known.is_none() {
            // Another process may have made its secret, or upgraded the file, meanwhile.
            self.refresh(true);
            known = lookup();
        }
        let secret = match known {
            Some(k) if k.shredded.is_some() || k.legacy || k.token_secret.is_some() => {
                self.agreement_secret_known(agreement_id, &k)?
            }
            _ if self.ring().v1 => None,
            _ => {
                self.change(|r| r.agreement_secret(agreement_id))?
                    .map_err(|at| shredded(agreement_id, at))?
                    .0
            }
        };
        Ok(Tokenizer {
            key: secret.unwrap_or(self.token_key),
            agreement: agreement_id.to_owned(),
        })
    }

    /// The agreement's tokenizer if it can have issued tokens, without creating a secret (for
    /// look-ups such as the disclosure report): `None` once shredded, or when a v2 key file has
    /// no secret for it yet (no token was ever issued under it).
    pub fn existing_tokenizer(&self, agreement_id: &str) -> Option<Tokenizer> {
        self.refresh(false);
        let ring = self.ring();
        let key = match ring.agreements.get(agreement_id) {
            Some(k) if k.shredded.is_some() => return None,
            Some(k) if k.legacy => self.token_key,
            Some(k) => k.token_secret?,
            None if ring.v1 => self.token_key,
            None => return None,
        };
        Some(Tokenizer {
            key,
            agreement: agreement_id.to_owned(),
        })
    }

    fn agreement_secret_known(
        &self,
        agreement: &str,
        k: &keyring::AgreementKey,
    ) -> Result<Option<[u8; 32]>, KeyError> {
        if let Some(at) = k.shredded {
            return Err(shredded(agreement, at));
        }
        Ok(if k.legacy { None } else { k.token_secret })
    }

    /// True when the agreement's tokens are made under the site token key (a v1 key file, or an
    /// agreement listed as legacy when the file was upgraded): shredding cannot destroy that key.
    pub fn agreement_is_legacy(&self, agreement: &str) -> bool {
        let ring = self.ring();
        ring.v1 || ring.agreements.get(agreement).is_some_and(|k| k.legacy)
    }

    /// When the agreement's key material was destroyed, if it was.
    pub fn shredded_at(&self, agreement: &str) -> Option<u64> {
        self.refresh(false);
        self.ring()
            .agreements
            .get(agreement)
            .and_then(|k| k.shredded)
    }

    /// Ids of the data keys in the key file, and which one is current.
    pub fn data_key_ids(&self) -> (Vec<String>, String) {
        self.refresh(true);
        let ring = self.ring();
        (
            ring.data_keys.iter().map(|k| k.id.clone()).collect(),
            ring.current_data_key.clone(),
        )
    }

    /// Removes the data keys `ids` from the key file (`keys retire`); the current key is never
    /// removed. Returns the ids removed.
    pub fn retire_data_keys(&self, ids: &BTreeSet<String>) -> Result<Vec<String>, KeyError> {
        self.change(|r| {
            let current = r.current_data_key.clone();
            let mut removed = Vec::new();
            r.data_keys.retain(|k| {
                let goes = k.id != current && ids.contains(&k.id);
                if goes {
                    removed.push(k.id.clone());
                }
                !goes
            });
            removed
        })
    }

    /// Agreements whose key material the key file says was destroyed (`vault shred`).
    pub fn shredded_agreements(&self) -> Vec<String> {
        self.refresh(false);
        self.ring()
            .agreements
            .iter()
            .filter(|(_, k)| k.shredded.is_some())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Destroys an agreement's token secret (crypto-shredding; `vault shred`). Returns true when
    /// the agreement was legacy: its tokens were made under the site token key, which stays.
    pub fn shred_agreement(&self, agreement: &str) -> Result<bool, KeyError> {
        let at = keyring::now();
        self.change(|r| r.shred_agreement(agreement, at))
    }

    /// Adds a new data-encryption key and makes it current (`keys rotate`); upgrades a v1 key
    /// file to v2, listing `known_agreements` as legacy. Returns the new key's id.
    pub fn rotate(&self, known_agreements: &[String]) -> Result<String, KeyError> {
        self.change(|r| r.rotate(known_agreements))
    }

    /// The current data-encryption key: (id, key).
    pub fn current_data_key(&self) -> (String, [u8; 32]) {
        // Every new sealed file asks: one stat of the key file (no re-read unless it changed),
        // so a file written just after `keys rotate` in another process is under the new key.
        self.refresh_within(false, Duration::ZERO);
        let ring = self.ring();
        let (id, key) = ring.current();
        (id.to_string(), *key)
    }

    /// The data-encryption key with this id (the key file is read again once if it is not
    /// known yet: another process may have rotated).
    pub fn data_key(&self, id: &str) -> Option<[u8; 32]> {
        if let Some(k) = self.ring().data_key(id) {
            return Some(*k);
        }
        self.refresh(true);
        self.ring().data_key(id).copied()
    }

    /// Whether the key file is still v1 (not upgraded by `keys rotate`).
    pub fn is_v1(&self) -> bool {
        self.ring().v1
    }

    /// The vault cipher of this site.
    pub fn vault_cipher(&self) -> VaultCipher {
        VaultCipher { keys: self.clone() }
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

fn shredded(agreement: &str, at: u64) -> KeyError {
    KeyError::Shredded {
        agreement: agreement.to_string(),
        on: shown_date(at),
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
///
/// A record is `PBV2`, the length and id of the data key that sealed it, a 12-byte random nonce
/// and the ciphertext (the key id is bound as associated data too). Records written before v2
/// key files (a 12-byte nonce and the ciphertext, under the v1 vault key) are still opened;
/// `keys rotate` re-seals them.
#[derive(Clone)]
pub struct VaultCipher {
    keys: SiteKeys,
}

const VAULT_MAGIC: &[u8; 4] = b"PBV2";

fn vault_aad(key_id: Option<&str>, agreement: &str, token: &str) -> String {
    match key_id {
        Some(id) => format!("v2\u{1f}{id}\u{1f}{agreement}\u{1f}{token}"),
        None => format!("{agreement}\u{1f}{token}"),
    }
}

fn gcm_seal(key: &[u8; 32], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let cipher = Aes256Gcm::new_from_slice(key).expect("32-byte key");
    let mut nonce = [0u8; 12];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let ct = cipher
        .encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad,
            },
        )
        .expect("AES-GCM encryption of an in-memory buffer cannot fail");
    let mut out = nonce.to_vec();
    out.extend_from_slice(&ct);
    out
}

fn gcm_open(key: &[u8; 32], aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < 12 + 16 {
        return None;
    }
    let cipher = Aes256Gcm::new_from_slice(key).expect("32-byte key");
    cipher
        .decrypt(
            Nonce::from_slice(&sealed[..12]),
            Payload {
                msg: &sealed[12..],
                aad,
            },
        )
        .ok()
}

impl VaultCipher {
    /// Seals `plaintext` for (agreement, token) under the current data key.
    pub fn seal(&self, agreement: &str, token: &str, plaintext: &[u8]) -> Vec<u8> {
        let (id, key) = self.keys.current_data_key();
        let aad = vault_aad(Some(&id), agreement, token);
        let mut out = VAULT_MAGIC.to_vec();
        out.push(id.len() as u8);
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(&gcm_seal(&key, aad.as_bytes(), plaintext));
        out
    }

    /// The id of the data key a record was sealed under (`None`: a v1 record).
    pub fn key_id(sealed: &[u8]) -> Option<&str> {
        let rest = sealed.strip_prefix(VAULT_MAGIC)?;
        let (&n, rest) = rest.split_first()?;
        std::str::from_utf8(rest.get(..n as usize)?).ok()
    }

    /// Opens a record sealed by [`VaultCipher::seal`] (or by a v1 key file's vault key).
    pub fn open(&self, agreement: &str, token: &str, sealed: &[u8]) -> Result<Vec<u8>, KeyError> {
        let failed = || KeyError::VaultRecord {
            agreement: agreement.to_string(),
            token: token.to_string(),
        };
        if let Some(id) = Self::key_id(sealed) {
            let body = &sealed[VAULT_MAGIC.len() + 1 + id.len()..];
            if let Some(key) = self.keys.data_key(id) {
                let aad = vault_aad(Some(id), agreement, token);
                if let Some(p) = gcm_open(&key, aad.as_bytes(), body) {
                    return Ok(p);
                }
            }
        }
        // A v1 record (whose random nonce may even start like a v2 header).
        let vault_key = self.keys.ring().vault_key;
        gcm_open(
            &vault_key,
            vault_aad(None, agreement, token).as_bytes(),
            sealed,
        )
        .ok_or_else(failed)
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
///
/// Besides the records, the tree holds one marker per shredded agreement (key
/// `\u{1f}shredded\u{1f}<agreement>`, value the unix time), so that re-identification after
/// shredding says so rather than "unknown token".
pub struct Vault {
    keys: SiteKeys,
    cipher: VaultCipher,
    tree: sled::Tree,
}

fn shred_marker(agreement: &str) -> Vec<u8> {
    format!("\u{1f}shredded\u{1f}{agreement}").into_bytes()
}

impl Vault {
    /// A vault over a sled tree (the node passes its store's vault tree).
    pub fn new(keys: &SiteKeys, tree: sled::Tree) -> Self {
        Vault {
            keys: keys.clone(),
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

    /// Ids of the data keys the vault's records are sealed under.
    pub fn data_key_ids(&self) -> Result<BTreeSet<String>, KeyError> {
        let mut ids = BTreeSet::new();
        for item in self.tree.iter() {
            let (_, sealed) = item?;
            if let Some(id) = VaultCipher::key_id(&sealed) {
                ids.insert(id.to_string());
            }
        }
        Ok(ids)
    }

    /// Whether this vault itself has destroyed the agreement's records (its marker), as opposed
    /// to the key file alone saying so: `vault shred` beside a running node destroys the token
    /// secret first and leaves the records to the node that holds the vault.
    pub fn records_shredded(&self, agreement: &str) -> Result<bool, KeyError> {
        Ok(self.tree.get(shred_marker(agreement))?.is_some())
    }

    /// When an agreement was shredded, if it was (the vault's marker, or the key file's).
    pub fn shredded_at(&self, agreement: &str) -> Result<Option<u64>, KeyError> {
        if let Some(v) = self.tree.get(shred_marker(agreement))? {
            let at = std::str::from_utf8(&v)
                .ok()
                .and_then(|t| t.parse().ok())
                .unwrap_or(0);
            return Ok(Some(at));
        }
        Ok(self.keys.shredded_at(agreement))
    }

    /// The original behind a token, if this site issued it under this agreement. An agreement
    /// that was shredded is [`KeyError::Shredded`]; a record that cannot be opened (wrong key
    /// file, damaged) is [`KeyError::VaultRecord`] naming the token.
    pub fn reidentify(&self, agreement: &str, token: &str) -> Result<Option<VaultEntry>, KeyError> {
        if let Some(at) = self.shredded_at(agreement)? {
            return Err(shredded(agreement, at));
        }
        let Some(sealed) = self.tree.get(Self::key(agreement, token))? else {
            return Ok(None);
        };
        let plain = self.cipher.open(agreement, token, &sealed)?;
        serde_json::from_slice(&plain)
            .map(Some)
            .map_err(|_| KeyError::VaultRecord {
                agreement: agreement.to_string(),
                token: token.to_string(),
            })
    }

    /// Every (agreement, token) that stands for `original` of `attribute` (a full scan, for the
    /// disclosure report: it finds trial subject IDs, which no key can recompute). A record that
    /// cannot be opened is reported by a log line naming its token and skipped: one damaged
    /// record does not hide every other disclosure.
    pub fn find(&self, attribute: &str, original: &str) -> Result<Vec<(String, String)>, KeyError> {
        let mut out = Vec::new();
        for item in self.tree.iter() {
            let (k, sealed) = item?;
            let key = String::from_utf8_lossy(&k).to_string();
            let Some((agreement, token)) = key.split_once('\u{1f}') else {
                continue;
            };
            if agreement.is_empty() {
                continue; // a shred marker
            }
            let e: VaultEntry = match self
                .cipher
                .open(agreement, token, &sealed)
                .and_then(|p| serde_json::from_slice(&p).map_err(|_| KeyError::VaultDecrypt))
            {
                Ok(e) => e,
                Err(e) => {
                    tracing::error!(agreement, token, error = %e, "vault record skipped");
                    continue;
                }
            };
            if e.attribute == attribute && e.original.trim() == original.trim() {
                out.push((agreement.to_string(), token.to_string()));
            }
        }
        Ok(out)
    }

    /// Crypto-shreds an agreement: every vault record under it is removed, a marker says when,
    /// and its token secret is destroyed in the key file, so its tokens can never be reversed
    /// (nor recomputed from a guessed original) again. The policy check (agreement ended,
    /// retention passed) is the caller's (`pacs-broker vault shred`). Returns how many records
    /// were removed.
    pub fn shred(&self, agreement: &str) -> Result<usize, KeyError> {
        let prefix = format!("{agreement}\u{1f}");
        let mut n = 0;
        for item in self.tree.scan_prefix(prefix.as_bytes()) {
            let (k, _) = item?;
            self.tree.remove(k)?;
            n += 1;
        }
        let at = keyring::now();
        self.tree
            .insert(shred_marker(agreement), at.to_string().as_bytes())?;
        self.tree.flush()?;
        self.keys.shred_agreement(agreement)?;
        Ok(n)
    }

    /// Re-seals every record not sealed under the current data key (`keys rotate`). A record
    /// that cannot be opened is left as it is and counted in the second number.
    pub fn reseal(&self) -> Result<(usize, usize), KeyError> {
        let (current, _) = self.keys.current_data_key();
        let (mut resealed, mut unreadable) = (0, 0);
        for item in self.tree.iter() {
            let (k, sealed) = item?;
            let key = String::from_utf8_lossy(&k).to_string();
            let Some((agreement, token)) = key.split_once('\u{1f}') else {
                continue;
            };
            if agreement.is_empty() || VaultCipher::key_id(&sealed) == Some(current.as_str()) {
                continue;
            }
            match self.cipher.open(agreement, token, &sealed) {
                Ok(plain) => {
                    let fresh = self.cipher.seal(agreement, token, &plain);
                    // Only if nobody changed it meanwhile (records are never edited in place).
                    let _ = self.tree.compare_and_swap(&k, Some(&sealed), Some(fresh))?;
                    resealed += 1;
                }
                Err(_) => unreadable += 1,
            }
        }
        self.tree.flush()?;
        Ok((resealed, unreadable))
    }

    /// The tokens recorded under an agreement (tokens only, never an original).
    pub fn tokens(&self, agreement: &str) -> Result<Vec<String>, KeyError> {
        let prefix = format!("{agreement}\u{1f}");
        let mut out = Vec::new();
        for k in self.tree.scan_prefix(prefix.as_bytes()).keys() {
            out.push(String::from_utf8_lossy(&k?[prefix.len()..]).to_string());
        }
        Ok(out)
    }

    /// The agreements that have records in the vault.
    pub fn agreements(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .tree
            .iter()
            .keys()
            .flatten()
            .filter_map(|k| {
                let k = String::from_utf8_lossy(&k).to_string();
                let (a, _) = k.split_once('\u{1f}')?;
                (!a.is_empty()).then(|| a.to_string())
            })
            .collect();
        out.dedup();
        out
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
        let a = keys().tokenizer("agr-1").unwrap();
        let b = keys().tokenizer("agr-2").unwrap();
        assert_eq!(a.token("PatientID", "12345"), a.token("PatientID", "12345"));
        assert_ne!(a.token("PatientID", "12345"), b.token("PatientID", "12345"));
        assert_ne!(a.token("PatientID", "12345"), a.token("PatientID", "12346"));
        assert_eq!(a.token("PatientID", "12345").len(), 16);
    }

    #[test]
    fn uids_are_valid_2_25_and_differ_from_original() {
        let t = keys().tokenizer("agr-1").unwrap();
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
        let t = keys().tokenizer("agr-1").unwrap();
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
        assert_eq!(back.current_data_key(), k.current_data_key());
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
        let e = v.reidentify("agr", "TOK").unwrap_err();
        assert!(
            e.to_string().contains("agreement `agr` was shredded on"),
            "{e}"
        );
    }

    #[test]
    fn a_v1_key_file_upgrades_without_changing_tokens_and_processes_see_rotations() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("site.key");
        fs::write(
            &p,
            format!(
                "format = \"pacs-broker-site-keys-v1\"\ntoken_key = \"{}\"\nvault_key = \"{}\"\n",
                hex::encode([7; 32]),
                hex::encode([9; 32])
            ),
        )
        .unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        }
        let serving = SiteKeys::load(&p).unwrap();
        let before = serving
            .tokenizer("old-agr")
            .unwrap()
            .token("PatientID", "MRN-1");
        assert_eq!(
            before,
            keys()
                .tokenizer("old-agr")
                .unwrap()
                .token("PatientID", "MRN-1")
        );
        let old_id = serving.current_data_key().0;
        // Another process (`keys rotate`) upgrades the file.
        let admin = SiteKeys::load(&p).unwrap();
        let new_id = admin.rotate(&["old-agr".to_string()]).unwrap();
        assert!(!admin.is_v1());
        let after = SiteKeys::load(&p).unwrap();
        assert_eq!(
            after
                .tokenizer("old-agr")
                .unwrap()
                .token("PatientID", "MRN-1"),
            before
        );
        // A new agreement gets its own secret: not the site token key.
        let fresh = after
            .tokenizer("new-agr")
            .unwrap()
            .token("PatientID", "MRN-1");
        assert_ne!(
            fresh,
            keys()
                .tokenizer("new-agr")
                .unwrap()
                .token("PatientID", "MRN-1")
        );
        assert!(after.agreement_is_legacy("old-agr") && !after.agreement_is_legacy("new-agr"));
        // The serving process reads files sealed under the new key (it reloads on a miss).
        assert!(serving.data_key(&new_id).is_some());
        assert!(serving.data_key(&old_id).is_some());
        // And the new agreement's secret is the same in every process.
        assert_eq!(
            serving
                .tokenizer("new-agr")
                .unwrap()
                .token("PatientID", "MRN-1"),
            fresh
        );
    }

    #[test]
    fn base32_known_values() {
        assert_eq!(base32(&[0]), "00");
        assert_eq!(base32(&[0xff; 5]), "ZZZZZZZZ");
    }
}
