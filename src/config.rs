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
    #[error("config {path}: {message}")]
    Value { path: PathBuf, message: String },
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
    /// Per-peer and total limits and timeouts of the receiver (`[limits]`).
    #[serde(default)]
    pub limits: Limits,
    /// The DICOM edge of the node (absent: no DICOM listener).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dicom: Option<DicomConfig>,
    /// Audit log: signed checkpoints, live forwarding to syslog, alerts (`[audit]`).
    #[serde(default, skip_serializing_if = "crate::audit::AuditConfig::is_default")]
    pub audit: crate::audit::AuditConfig,
    /// Local users and their roles (`[[users]]`), e.g. who may re-identify.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<crate::users::UserConfig>,
    /// What the node keeps on disk (`[storage]`): encryption at rest.
    #[serde(default, skip_serializing_if = "StorageConfig::is_default")]
    pub storage: StorageConfig,
}

/// `[storage]`: how the node keeps data at rest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Seal everything the node keeps besides its delivery folders with AES-256-GCM under the
    /// key file's data keys (default `true`). `false` only where the disk is encrypted already
    /// (or to measure the cost); `serve` warns when it is off. Sealed files are read either way.
    #[serde(default = "default_true")]
    pub encrypt_at_rest: bool,
}

fn default_true() -> bool {
    true
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            encrypt_at_rest: true,
        }
    }
}

impl StorageConfig {
    fn is_default(&self) -> bool {
        *self == StorageConfig::default()
    }
}

/// `[dicom]`: the node's DICOM networking: the DIMSE listener (C-ECHO and C-STORE SCP), when
/// `listen` is set, and delivery of received studies to the site's PACS (`[dicom.deliver]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DicomConfig {
    /// `host:port` the DICOM listener binds, e.g. `127.0.0.1:11112`; empty: no listener.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub listen: String,
    /// The AE title this node answers to (the called AE title devices must use).
    #[serde(default, skip_serializing_if = "String::is_empty")]
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
    /// `[dicom.deliver]`: forward every received instance to the site's own PACS by C-STORE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deliver: Option<DeliverConfig>,
}

impl Default for DicomConfig {
    fn default() -> Self {
        DicomConfig {
            listen: String::new(),
            ae_title: String::new(),
            allow: Vec::new(),
            routes: Vec::new(),
            max_associations: default_max_associations(),
            study_quiet_secs: default_study_quiet_secs(),
            max_pdu: default_max_pdu(),
            idle_timeout_secs: default_idle_timeout_secs(),
            deliver: None,
        }
    }
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
        if !self.has_listener() {
            if !self.ae_title.is_empty() || !self.allow.is_empty() || !self.routes.is_empty() {
                out.push("[dicom] ae_title, [[dicom.allow]] and [[dicom.routes]] need `listen` (the DICOM listener's address)".into());
            }
            return out;
        }
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
        // A listener without routes is a partner's: it takes only results on studies the site
        // received, which go home to their origin (`results::intake`).
        if self.max_associations == 0 {
            out.push("[dicom] max_associations must be at least 1".into());
        }
        if !(4096..=16 << 20).contains(&self.max_pdu) {
            out.push("[dicom] max_pdu must be between 4096 and 16777216 bytes".into());
        }
        out
    }

    /// Whether `[dicom]` configures a listener (`listen` set).
    pub fn has_listener(&self) -> bool {
        !self.listen.is_empty()
    }
}

/// `[dicom.deliver]`: the local PACS that received studies are forwarded to (receiver side).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliverConfig {
    /// The PACS's (called) AE title.
    pub ae_title: String,
    /// `host:port` of the PACS's DICOM port.
    pub address: String,
    /// Our (calling) AE title; default: the site id upper-cased, at most 16 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calling_ae_title: Option<String>,
    /// Attempts per instance that the PACS answers with a failure before it is marked failed.
    /// Attempts that cannot reach the PACS at all never count: nothing is dropped while it is down.
    #[serde(default = "DeliverConfig::default_max_attempts")]
    pub max_attempts: u32,
    /// First wait after a failed attempt, in milliseconds; it doubles on each further failure.
    #[serde(default = "DeliverConfig::default_retry_initial_ms")]
    pub retry_initial_ms: u64,
    /// Longest wait between attempts, in milliseconds.
    #[serde(default = "DeliverConfig::default_retry_max_ms")]
    pub retry_max_ms: u64,
    /// Most instances sent over one association.
    #[serde(default = "DeliverConfig::default_batch_size")]
    pub batch_size: usize,
    /// Largest PDU we accept from the PACS, in bytes.
    #[serde(default = "DeliverConfig::default_max_pdu_length")]
    pub max_pdu_length: u32,
    /// Connect, read and write timeout of the association, in milliseconds.
    #[serde(default = "DeliverConfig::default_timeout_ms")]
    pub timeout_ms: u64,
}

impl DeliverConfig {
    fn default_max_attempts() -> u32 {
        10
    }
    fn default_retry_initial_ms() -> u64 {
        5_000
    }
    fn default_retry_max_ms() -> u64 {
        600_000
    }
    fn default_batch_size() -> usize {
        500
    }
    fn default_max_pdu_length() -> u32 {
        65_536
    }
    fn default_timeout_ms() -> u64 {
        30_000
    }

    /// A delivery target with every optional key at its default.
    pub fn new(ae_title: &str, address: &str) -> DeliverConfig {
        DeliverConfig {
            ae_title: ae_title.to_string(),
            address: address.to_string(),
            calling_ae_title: None,
            max_attempts: Self::default_max_attempts(),
            retry_initial_ms: Self::default_retry_initial_ms(),
            retry_max_ms: Self::default_retry_max_ms(),
            batch_size: Self::default_batch_size(),
            max_pdu_length: Self::default_max_pdu_length(),
            timeout_ms: Self::default_timeout_ms(),
        }
    }

    /// Our calling AE title: `calling_ae_title`, or the site id upper-cased and cut to 16.
    pub fn calling_ae(&self, site_id: &str) -> String {
        match &self.calling_ae_title {
            Some(t) => t.clone(),
            None => site_id.to_ascii_uppercase().chars().take(16).collect(),
        }
    }

    /// Checks what serde cannot: AE titles (1 to 16 characters of the default repertoire, not
    /// only spaces, no backslash or control characters) and sane numbers.
    pub fn validate(&self, site_id: &str) -> Result<(), String> {
        for (key, v) in [
            ("ae_title", self.ae_title.clone()),
            ("calling_ae_title", self.calling_ae(site_id)),
        ] {
            if v.trim().is_empty()
                || v.len() > 16
                || v.chars()
                    .any(|c| !c.is_ascii() || c.is_ascii_control() || c == '\\')
            {
                return Err(format!(
                    "[dicom.deliver] {key} `{v}` is not a DICOM AE title (1 to 16 ASCII characters, no backslash)"
                ));
            }
        }
        if self.max_attempts == 0 || self.batch_size == 0 {
            return Err("[dicom.deliver] max_attempts and batch_size must be at least 1".into());
        }
        if self.retry_initial_ms == 0
            || self.retry_max_ms < self.retry_initial_ms
            || self.timeout_ms == 0
        {
            return Err(
                "[dicom.deliver] retry_initial_ms and timeout_ms must be positive, retry_max_ms at least retry_initial_ms"
                    .into(),
            );
        }
        if !(4096..=16_777_216).contains(&self.max_pdu_length) {
            return Err("[dicom.deliver] max_pdu_length must be between 4096 and 16777216".into());
        }
        if self
            .address
            .rsplit_once(':')
            .is_none_or(|(_, p)| p.parse::<u16>().is_err())
        {
            return Err(format!(
                "[dicom.deliver] address `{}` is not host:port",
                self.address
            ));
        }
        Ok(())
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
        if let Some(d) = cfg.dicom.as_ref().and_then(|d| d.deliver.as_ref()) {
            d.validate(&cfg.site_id)
                .map_err(|message| ConfigError::Value {
                    path: path.to_owned(),
                    message,
                })?;
        }
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
        cfg.audit.resolve(base);
        Ok(cfg)
    }

    /// The config as TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }
}

#[cfg(test)]
mod dicom_deliver_tests {
    use super::*;

    const BASE: &str = r#"
site_id = "telerad-c"
listen = "127.0.0.1:7443"
data_dir = "data"
key_file = "site.key"
agreements = "agreements"
[tls]
ca = "ca.pem"
cert = "site.pem"
key = "site-tls.key"
"#;

    fn load(extra: &str) -> Result<NodeConfig, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("node.toml");
        std::fs::write(&p, format!("{BASE}{extra}")).unwrap();
        NodeConfig::load(&p)
    }

    #[test]
    fn dicom_may_be_absent_and_deliver_takes_its_defaults() {
        assert_eq!(load("").unwrap().dicom, None);
        let cfg = load("[dicom.deliver]\nae_title = \"ORTHANC\"\naddress = \"127.0.0.1:4242\"\n")
            .unwrap();
        let dicom = cfg.dicom.unwrap();
        assert!(!dicom.has_listener());
        let d = dicom.deliver.unwrap();
        assert_eq!(d, DeliverConfig::new("ORTHANC", "127.0.0.1:4242"));
        assert_eq!(d.calling_ae("telerad-c"), "TELERAD-C");
        assert_eq!(
            d.calling_ae("a-very-long-site-identifier"),
            "A-VERY-LONG-SITE"
        );
    }

    #[test]
    fn bad_deliver_values_are_refused_with_the_key_named() {
        let cases = [
            ("ae_title = \"\"\naddress = \"127.0.0.1:4242\"", "ae_title"),
            (
                "ae_title = \"ORTHANC-WITH-A-LONG-NAME\"\naddress = \"127.0.0.1:4242\"",
                "ae_title",
            ),
            ("ae_title = \"ORTHANC\"\naddress = \"127.0.0.1\"", "address"),
            (
                "ae_title = \"ORTHANC\"\naddress = \"h:1\"\nretry_initial_ms = 0",
                "retry_initial_ms",
            ),
            (
                "ae_title = \"ORTHANC\"\naddress = \"h:1\"\nmax_pdu_length = 10",
                "max_pdu_length",
            ),
        ];
        for (table, key) in cases {
            let err = load(&format!("[dicom.deliver]\n{table}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{table}: {err}");
        }
        let err = load("[dicom.deliver]\nae_title = \"X\"\naddress = \"h:1\"\nretries = 3\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("retries"), "unknown keys are refused: {err}");
    }
}
