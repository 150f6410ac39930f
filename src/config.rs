//! The node configuration file (TOML).
//!
//! Owns: what one site node needs to run: its site id, listen address, data directory, key file,
//! certificate paths, the agreements folder, and the addresses of its partner nodes. Relative
//! paths are resolved against the folder of the config file, so a node folder can be moved whole.
//!
//! It also owns the `[dicom]` table: the DICOM listener's address and AE title, the devices that
//! may associate ([`DicomAllow`]), and which agreement's flow what arrives goes to
//! ([`DicomRoute`]).
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
    /// This site's private key (PEM, PKCS#8).
    pub key: PathBuf,
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
    /// The DICOM edge of the node (absent: no DICOM listener).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dicom: Option<DicomConfig>,
}

/// `[dicom]`: the node's DICOM (DIMSE) listener, C-ECHO and C-STORE SCP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DicomConfig {
    /// `host:port` the DICOM listener binds, e.g. `127.0.0.1:11112`.
    pub listen: String,
    /// The AE title this node answers to (the called AE title devices must use).
    pub ae_title: String,
    /// Local devices that may associate: AE title and address, both must match.
    #[serde(default)]
    pub allow: Vec<DicomAllow>,
    /// Where what arrives goes: the first route whose optional matches hold.
    #[serde(default)]
    pub routes: Vec<DicomRoute>,
    /// Most associations served at once; one more is rejected (transient, local limit exceeded).
    #[serde(default = "default_max_associations")]
    pub max_associations: usize,
    /// Seconds without a new instance after which a study counts as complete.
    #[serde(default = "default_study_quiet_secs")]
    pub study_quiet_secs: u64,
    /// Largest PDU this node receives (bytes), offered in the association negotiation.
    #[serde(default = "default_max_pdu")]
    pub max_pdu: u32,
    /// Seconds a silent association may wait for its next PDU before it is aborted.
    #[serde(default = "default_idle_timeout_secs")]
    pub idle_timeout_secs: u64,
}

fn default_max_associations() -> usize {
    8
}
fn default_study_quiet_secs() -> u64 {
    10
}
fn default_max_pdu() -> u32 {
    262_144
}
fn default_idle_timeout_secs() -> u64 {
    60
}

/// `[[dicom.allow]]`: one device that may associate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DicomAllow {
    /// The device's (calling) AE title.
    pub ae_title: String,
    /// The IP address it connects from (`127.0.0.1`, `10.1.2.3`, `::1`).
    pub address: std::net::IpAddr,
}

/// `[[dicom.routes]]`: instances matching it go to an agreement's flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DicomRoute {
    pub agreement: String,
    pub flow: String,
    /// Only associations from this calling AE title (default: any allowed one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calling_ae: Option<String>,
    /// Only associations to this called AE title (default: any the node answers to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub called_ae: Option<String>,
    /// Purpose of use declared to the partner (default: the flow's first purpose).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
}

impl DicomConfig {
    /// Problems a loaded `[dicom]` table has (AE titles are 1-16 characters of the default
    /// repertoire without backslash; at least one device and one route).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let ae_ok = |ae: &str| {
            let t = ae.trim();
            !t.is_empty()
                && t.len() <= 16
                && t.chars().all(|c| c.is_ascii_graphic() || c == ' ')
                && !t.contains('\\')
        };
        if !ae_ok(&self.ae_title) {
            out.push(format!(
                "[dicom] ae_title `{}` is not a valid AE title (1-16 characters, no backslash)",
                self.ae_title
            ));
        }
        for a in &self.allow {
            if !ae_ok(&a.ae_title) {
                out.push(format!(
                    "[[dicom.allow]] ae_title `{}` is not a valid AE title",
                    a.ae_title
                ));
            }
        }
        if self.routes.is_empty() {
            out.push("[dicom] has no [[dicom.routes]]: nothing received could go anywhere".into());
        }
        if self.max_associations == 0 {
            out.push("[dicom] max_associations must be at least 1".into());
        }
        if !(4096..=16 << 20).contains(&self.max_pdu) {
            out.push("[dicom] max_pdu must be between 4096 and 16777216 bytes".into());
        }
        out
    }
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
        if let Some(problem) = cfg
            .dicom
            .as_ref()
            .and_then(|d| d.problems().into_iter().next())
        {
            let at = text.find("[dicom]").unwrap_or(0);
            let line = text[..at].matches('\n').count() + 1;
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                line,
                col: 1,
                message: problem,
            });
        }
        Ok(cfg)
    }

    /// The config as TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }
}
