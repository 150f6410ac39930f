//! The node configuration file (TOML).
//!
//! Owns: what one site node needs to run: its site id, listen address, data directory, key file,
//! certificate paths, the agreements folder, and the addresses of its partner nodes. Relative
//! paths are resolved against the folder of the config file, so a node folder can be moved whole.
//!
//! Does not own: the agreements themselves (`dsa`) or the keys (`pseudonym`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}:{line}:{col}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        col: usize,
        message: String,
    },
}

/// A peer node: where to reach it. Its identity is checked against its certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    /// `host:port` of the peer's federation endpoint.
    pub address: String,
    /// Name to verify in the peer's server certificate (default: the host part of `address`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
}

/// TLS material of the site.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsPaths {
    /// The federation CA certificate (PEM) that every site certificate chains to.
    pub ca: PathBuf,
    /// This site's certificate (PEM).
    pub cert: PathBuf,
    /// This site's private key (PEM, PKCS#8).
    pub key: PathBuf,
}

/// One site node's configuration. `Default` gives empty paths and no tables, for code that
/// builds a config and sets the required keys itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This site's id; must equal the site id in its own certificate.
    pub site_id: String,
    /// Address the federation (gRPC) endpoint listens on, e.g. `127.0.0.1:7443`.
    pub listen: String,
    /// Where the node keeps its store, vault, audit log and inbox.
    pub data_dir: PathBuf,
    /// The site secret key file (mode 0600).
    pub key_file: PathBuf,
    /// Folder (or file) of agreements this node enforces.
    pub agreements: PathBuf,
    pub tls: TlsPaths,
    /// Partner nodes by site id.
    #[serde(default)]
    pub peers: BTreeMap<String, Peer>,
    /// Local users and their roles (`[[users]]`), e.g. who may re-identify.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<crate::users::UserConfig>,
}

impl NodeConfig {
    /// Reads a config file and resolves its relative paths against the file's folder.
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_owned(),
            source,
        })?;
        let mut cfg: NodeConfig = toml::from_str(&text).map_err(|e| {
            let at = e.span().map(|s| s.start).unwrap_or(0).min(text.len());
            let line = text[..at].matches('\n').count() + 1;
            let col = at - text[..at].rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
            ConfigError::Invalid {
                path: path.to_owned(),
                line,
                col,
                message: e.message().to_string(),
            }
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut cfg.data_dir,
            &mut cfg.key_file,
            &mut cfg.agreements,
            &mut cfg.tls.ca,
            &mut cfg.tls.cert,
            &mut cfg.tls.key,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(cfg)
    }

    /// The config as TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }
}
