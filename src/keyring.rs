//! The site key file and the keys it holds besides the token key.
//!
//! Owns: the key file format (`pacs-broker-site-keys-v2`, and reading the older `-v1`), the
//! data-encryption keys that seal everything a node keeps at rest (each with an id, one of them
//! current; [`KeyRing::rotate`] adds a new current one and keeps the old ones so that files
//! sealed under them stay readable), the per-agreement token secrets (created on first use, so
//! that an agreement's tokens can be made irreversible by destroying its secret:
//! [`KeyRing::shred_agreement`]), and the locked read-modify-write of the file that several
//! processes of one site (`serve`, `send`, `keys rotate`, `vault shred`) share.
//!
//! Does not own: what the keys are used for (tokens and the vault are `pseudonym`, sealed files
//! are `store::sealed`), nor where the data lives (the key file is never kept beside the data).
//!
//! Upgrading: a v1 file (token key and vault key only) is read as it is: its data key is derived
//! from its vault key (id `v1-<fingerprint>`) and every agreement is "legacy" (tokens under the site token key,
//! as before). `pacs-broker keys rotate` writes it as v2, listing the agreements it finds in
//! the agreements folder and the vault as legacy so that their tokens stay stable, and adds a
//! fresh random data key. See docs/keys.md.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::pseudonym::KeyError;

/// The format line of a current key file.
pub const FORMAT_V2: &str = "pacs-broker-site-keys-v2";
/// The format line of the first key files (token key and vault key only).
pub const FORMAT_V1: &str = "pacs-broker-site-keys-v1";
/// The id of the data key derived from a v1 file's vault key: `v1-` and a fingerprint of the
/// key, so that another v1 key file is told apart (a wrong key file, not a damaged file).
pub fn v1_data_key_id(vault_key: &[u8; 32]) -> String {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(vault_key).expect("any key length");
    m.update(b"pacs-broker data-encryption key id v1");
    format!("v1-{}", hex::encode(&m.finalize().into_bytes()[..4]))
}

/// One data-encryption key.
#[derive(Clone, Serialize, Deserialize)]
pub struct DataKey {
    pub id: String,
    #[serde(with = "hex_key")]
    pub key: [u8; 32],
    /// Unix seconds when it was made.
    pub created: u64,
}

/// What the key file says about one agreement's tokens.
#[derive(Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgreementKey {
    /// Its own random token secret (absent for a legacy agreement or a shredded one).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "hex_key_opt")]
    pub token_secret: Option<[u8; 32]>,
    /// Tokens of this agreement were issued under the site token key before v2: kept so that
    /// they stay stable (its tokens cannot be made irreversible by shredding; docs/keys.md).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub legacy: bool,
    /// Unix seconds when its key material was destroyed (`vault shred`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shredded: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct FileV2 {
    format: String,
    #[serde(with = "hex_key")]
    token_key: [u8; 32],
    /// The v1 vault key: opens vault records sealed before v2.
    #[serde(with = "hex_key")]
    vault_key: [u8; 32],
    current_data_key: String,
    data_keys: Vec<DataKey>,
    #[serde(default)]
    agreements: BTreeMap<String, AgreementKey>,
}

#[derive(Deserialize)]
struct FileV1 {
    format: String,
    token_key: String,
    vault_key: String,
}

/// The contents of a key file, in memory.
#[derive(Clone)]
pub struct KeyRing {
    pub token_key: [u8; 32],
    pub vault_key: [u8; 32],
    pub current_data_key: String,
    pub data_keys: Vec<DataKey>,
    pub agreements: BTreeMap<String, AgreementKey>,
    /// Read from a v1 file (not yet upgraded): agreements are all legacy, nothing is written.
    pub v1: bool,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "KeyRing(current data key {}, {} data keys, <secret>)",
            self.current_data_key,
            self.data_keys.len()
        )
    }
}

fn random_key() -> [u8; 32] {
    let mut k = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut k);
    k
}

/// Unix seconds now.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The data key a v1 file stands for: derived from its vault key under a fixed label, so a v1
/// site seals files without its key file changing.
fn v1_data_key(vault_key: &[u8; 32]) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(vault_key).expect("any key length");
    m.update(b"pacs-broker data-encryption key v1");
    m.finalize().into_bytes().into()
}

fn new_data_key_id() -> String {
    let mut r = [0u8; 4];
    rand::rngs::OsRng.fill_bytes(&mut r);
    let day = time::OffsetDateTime::now_utc().date();
    format!(
        "dk-{:04}{:02}{:02}-{}",
        day.year(),
        u8::from(day.month()),
        day.day(),
        hex::encode(r)
    )
}

impl KeyRing {
    /// A fresh v2 ring: random token, vault and data keys.
    pub fn generate() -> KeyRing {
        let id = new_data_key_id();
        KeyRing {
            token_key: random_key(),
            vault_key: random_key(),
            current_data_key: id.clone(),
            data_keys: vec![DataKey {
                id,
                key: random_key(),
                created: now(),
            }],
            agreements: BTreeMap::new(),
            v1: false,
        }
    }

    /// A ring from fixed token and vault keys, as a v1 file would give (tests, benchmarks).
    pub fn from_v1_keys(token_key: [u8; 32], vault_key: [u8; 32]) -> KeyRing {
        KeyRing {
            token_key,
            vault_key,
            current_data_key: v1_data_key_id(&vault_key),
            data_keys: vec![DataKey {
                id: v1_data_key_id(&vault_key),
                key: v1_data_key(&vault_key),
                created: 0,
            }],
            agreements: BTreeMap::new(),
            v1: true,
        }
    }

    /// The current data key (id, key).
    pub fn current(&self) -> (&str, &[u8; 32]) {
        let k = self
            .data_keys
            .iter()
            .find(|k| k.id == self.current_data_key)
            .expect("the current data key is in the ring (checked on load)");
        (&k.id, &k.key)
    }

    /// The data key with this id.
    pub fn data_key(&self, id: &str) -> Option<&[u8; 32]> {
        self.data_keys.iter().find(|k| k.id == id).map(|k| &k.key)
    }

    /// Adds a new random data key and makes it current; older keys stay (files sealed under
    /// them are still read). Upgrades a v1 ring to v2, listing `known_agreements` as legacy.
    pub fn rotate(&mut self, known_agreements: &[String]) -> String {
        if self.v1 {
            for a in known_agreements {
                self.agreements.entry(a.clone()).or_default().legacy = true;
            }
            self.v1 = false;
        }
        let id = new_data_key_id();
        self.data_keys.push(DataKey {
            id: id.clone(),
            key: random_key(),
            created: now(),
        });
        self.current_data_key = id.clone();
        id
    }

    /// Serialises as a v2 file.
    pub fn to_text(&self) -> String {
        let body = FileV2 {
            format: FORMAT_V2.into(),
            token_key: self.token_key,
            vault_key: self.vault_key,
            current_data_key: self.current_data_key.clone(),
            data_keys: self.data_keys.clone(),
            agreements: self.agreements.clone(),
        };
        format!(
            "# pacs-broker site secret keys. Keep private (mode 0600), apart from the data, and backed up:\n\
             # without it tokens cannot be reproduced, the vault cannot be opened and nothing the node\n\
             # keeps at rest can be read. See docs/keys.md.\n{}",
            toml::to_string(&body).expect("key file serialises")
        )
    }

    /// Parses a key file's text (v1 or v2). `path` only names the file in errors.
    pub fn parse(path: &Path, text: &str) -> Result<KeyRing, KeyError> {
        let invalid = |reason: String| KeyError::Invalid {
            path: path.to_owned(),
            reason,
        };
        #[derive(Deserialize)]
        struct Format {
            format: String,
        }
        let f: Format = toml::from_str(text).map_err(|e| invalid(e.message().to_string()))?;
        match f.format.as_str() {
            FORMAT_V1 => {
                let kf: FileV1 =
                    toml::from_str(text).map_err(|e| invalid(e.message().to_string()))?;
                debug_assert_eq!(kf.format, FORMAT_V1);
                let parse = |name: &str, v: &str| -> Result<[u8; 32], KeyError> {
                    let bytes =
                        hex::decode(v).map_err(|_| invalid(format!("{name} is not hex")))?;
                    bytes
                        .try_into()
                        .map_err(|_| invalid(format!("{name} must be 32 bytes")))
                };
                Ok(KeyRing::from_v1_keys(
                    parse("token_key", &kf.token_key)?,
                    parse("vault_key", &kf.vault_key)?,
                ))
            }
            FORMAT_V2 => {
                let kf: FileV2 =
                    toml::from_str(text).map_err(|e| invalid(e.message().to_string()))?;
                if !kf.data_keys.iter().any(|k| k.id == kf.current_data_key) {
                    return Err(invalid(format!(
                        "current_data_key `{}` is not among its data_keys",
                        kf.current_data_key
                    )));
                }
                let mut ids: Vec<&str> = kf.data_keys.iter().map(|k| k.id.as_str()).collect();
                ids.sort_unstable();
                if ids.windows(2).any(|w| w[0] == w[1]) {
                    return Err(invalid("two data keys have the same id".into()));
                }
                Ok(KeyRing {
                    token_key: kf.token_key,
                    vault_key: kf.vault_key,
                    current_data_key: kf.current_data_key,
                    data_keys: kf.data_keys,
                    agreements: kf.agreements,
                    v1: false,
                })
            }
            other => Err(invalid(format!("unknown format {other:?}"))),
        }
    }

    /// The token secret of an agreement, creating one if it has none and is not legacy nor
    /// shredded. `Ok(None)`: tokens are made under the site token key (legacy, or a v1 ring).
    /// Returns whether the ring changed (and must be written).
    pub fn agreement_secret(&mut self, agreement: &str) -> Result<(Option<[u8; 32]>, bool), u64> {
        if self.v1 {
            return Ok((None, false));
        }
        let entry = self.agreements.entry(agreement.to_string()).or_default();
        if let Some(at) = entry.shredded {
            return Err(at);
        }
        if entry.legacy {
            return Ok((None, false));
        }
        if let Some(s) = entry.token_secret {
            return Ok((Some(s), false));
        }
        let s = random_key();
        entry.token_secret = Some(s);
        Ok((Some(s), true))
    }

    /// Destroys an agreement's token secret and records when. Returns whether it was legacy
    /// (its tokens were made under the site token key, which cannot be destroyed for one
    /// agreement).
    pub fn shred_agreement(&mut self, agreement: &str, at: u64) -> bool {
        let entry = self.agreements.entry(agreement.to_string()).or_default();
        let legacy = self.v1 || entry.legacy || entry.token_secret.is_none();
        entry.token_secret = None;
        entry.shredded.get_or_insert(at);
        legacy
    }
}

/// Reads a key file, refusing one that group or others may read.
pub fn read(path: &Path) -> Result<KeyRing, KeyError> {
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
    KeyRing::parse(path, &text)
}

/// Writes a new key file with mode 0600. Refuses to overwrite an existing file.
pub fn write_new(path: &Path, ring: &KeyRing) -> Result<(), KeyError> {
    let io = |source| KeyError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = private_options().create_new(true).open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            KeyError::Exists {
                path: path.to_owned(),
            }
        } else {
            io(e)
        }
    })?;
    f.write_all(ring.to_text().as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok(())
}

fn private_options() -> fs::OpenOptions {
    let mut opts = fs::OpenOptions::new();
    opts.write(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts
}

/// Changes the key file under an exclusive lock (a sibling `.lock` file), so that two processes
/// of the site never lose each other's change: the file is read again under the lock, `change`
/// edits it, and it is replaced atomically (temporary file 0600, fsync, rename, fsync folder).
/// A crash leaves the old file or the new one, never a mix. Returns the ring as written.
pub fn update<T>(
    path: &Path,
    change: impl FnOnce(&mut KeyRing) -> T,
) -> Result<(KeyRing, T), KeyError> {
    let io = |source| KeyError::Io {
        path: path.to_owned(),
        source,
    };
    let lock_path = lock_path(path);
    let lock = private_options()
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(|source| KeyError::Io {
            path: lock_path.clone(),
            source,
        })?;
    lock.lock().map_err(io)?;
    let mut ring = read(path)?;
    let out = change(&mut ring);
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let dir = dir.unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.{:08x}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("site.key"),
        rand::random::<u32>()
    ));
    let written = (|| {
        let mut f = private_options().create_new(true).open(&tmp)?;
        f.write_all(ring.to_text().as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.map_err(io)?;
    drop(lock);
    Ok((ring, out))
}

fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    path.with_file_name(name)
}

mod hex_key {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(k: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(k))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        let bytes = hex::decode(&text).map_err(|_| serde::de::Error::custom("key is not hex"))?;
        bytes
            .try_into()
            .map_err(|_| serde::de::Error::custom("key must be 32 bytes (64 hex digits)"))
    }
}

mod hex_key_opt {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(k: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
        match k {
            Some(k) => super::hex_key::serialize(k, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<[u8; 32]>, D::Error> {
        super::hex_key::deserialize(d).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_round_trips_and_v1_is_read_and_upgraded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("site.key");
        let mut ring = KeyRing::generate();
        let (s, changed) = ring.agreement_secret("agr-1").unwrap();
        assert!(changed && s.is_some());
        write_new(&p, &ring).unwrap();
        let back = read(&p).unwrap();
        assert_eq!(back.current().1, ring.current().1);
        assert_eq!(back.agreements["agr-1"].token_secret, s);

        let v1 = dir.path().join("old.key");
        write_new(&v1, &KeyRing::from_v1_keys([1; 32], [2; 32])).unwrap();
        // A v1 file as the first release wrote it.
        fs::write(
            &v1,
            format!(
                "format = \"{FORMAT_V1}\"\ntoken_key = \"{}\"\nvault_key = \"{}\"\n",
                hex::encode([1; 32]),
                hex::encode([2; 32])
            ),
        )
        .unwrap();
        let old = read(&v1).unwrap();
        assert!(old.v1);
        assert_eq!(old.current().0, v1_data_key_id(&[2; 32]));
        assert_ne!(old.current().0, v1_data_key_id(&[3; 32]));
        let old_key = *old.current().1;
        let (ring, new_id) = update(&v1, |r| r.rotate(&["agr-old".into()])).unwrap();
        assert!(!ring.v1);
        assert_eq!(ring.current().0, new_id);
        assert_eq!(
            ring.data_key(&v1_data_key_id(&[2; 32])),
            Some(&old_key),
            "old key kept"
        );
        assert!(ring.agreements["agr-old"].legacy);
        let again = read(&v1).unwrap();
        assert_eq!(again.current().0, new_id);
    }

    #[test]
    fn shredding_destroys_the_secret_and_refuses_new_ones() {
        let mut ring = KeyRing::generate();
        ring.agreement_secret("a").unwrap();
        assert!(!ring.shred_agreement("a", 1000));
        assert!(ring.agreements["a"].token_secret.is_none());
        assert_eq!(ring.agreement_secret("a"), Err(1000));
        assert!(!ring.to_text().contains("token_secret"));
    }

    #[test]
    fn a_bad_file_is_refused_with_a_reason() {
        let p = Path::new("k");
        let e = KeyRing::parse(p, "format = \"pacs-broker-site-keys-v9\"\n").unwrap_err();
        assert!(e.to_string().contains("unknown format"), "{e}");
        let mut ring = KeyRing::generate();
        ring.current_data_key = "nope".into();
        let e = KeyRing::parse(p, &ring.to_text()).unwrap_err();
        assert!(e.to_string().contains("current_data_key"), "{e}");
    }
}
