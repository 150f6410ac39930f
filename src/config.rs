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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsPaths {
    /// The federation CA certificate (PEM) that every site certificate chains to.
    pub ca: PathBuf,
    /// This site's certificate (PEM).
    pub cert: PathBuf,
    /// This site's private key (PEM, PKCS#8). Refused when group or others can read it.
    pub key: PathBuf,
    /// Certificate revocation lists of the federation CA (PEM, one or more CRLs). Checked on
    /// every handshake in both directions and reloaded within a second of a change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl: Option<PathBuf>,
}

/// What one partner (and all partners together) may hold of this node's receiver. A valid
/// certificate does not make a partner benign: every limit applies per peer site, and in total.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Offers waiting for their transfer, per peer site.
    pub pending_offers_per_peer: usize,
    /// Offers waiting for their transfer, all peers together.
    pub pending_offers_total: usize,
    /// Seconds an offer stays valid without its transfer.
    pub offer_ttl_secs: u64,
    /// Transfers streaming at once, per peer site.
    pub transfers_per_peer: usize,
    /// Transfers streaming at once, all peers together.
    pub transfers_total: usize,
    /// Open connections, per peer site (over it, every call answers RESOURCE_EXHAUSTED).
    pub connections_per_peer: usize,
    /// Open connections (and handshakes in progress), all peers together.
    pub connections_total: usize,
    /// Most instances one offer may announce.
    pub max_instances_per_offer: usize,
    /// Seconds a connection may stay open with no call in progress before it is closed.
    pub idle_timeout_secs: u64,
    /// Seconds a transfer stream may send nothing before it is cut.
    pub stall_timeout_secs: u64,
    /// Refusals of one kind from one peer audited one by one within this many seconds; the
    /// rest of the window is summarised in one audit entry.
    pub refusal_summary_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            pending_offers_per_peer: 8,
            pending_offers_total: 256,
            offer_ttl_secs: 300,
            transfers_per_peer: 4,
            transfers_total: 32,
            connections_per_peer: 16,
            connections_total: 512,
            max_instances_per_offer: 100_000,
            idle_timeout_secs: 60,
            stall_timeout_secs: 120,
            refusal_summary_secs: 60,
        }
    }
}

/// One site node's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Per-peer and total limits and timeouts of the receiver (`[limits]`).
    #[serde(default)]
    pub limits: Limits,
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
        if let Some(p) = cfg.tls.crl.as_mut().filter(|p| p.is_relative()) {
            *p = base.join(&*p);
        }
        Ok(cfg)
    }

    /// The config as TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }
}
