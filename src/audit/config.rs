//! The `[audit]` table of node.toml: checkpoint cadence, live forwarding to the hospital's SIEM
//! (`[audit.syslog]`) and alert thresholds (`[audit.alerts]`). Documented in docs/config.md.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

fn default_every() -> u64 {
    100
}
fn default_interval() -> u64 {
    300
}

/// `[audit]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// A signed checkpoint after every this many entries.
    #[serde(default = "default_every")]
    pub checkpoint_every: u64,
    /// ... and at the first entry written this many seconds after the last checkpoint.
    #[serde(default = "default_interval")]
    pub checkpoint_interval_secs: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syslog: Option<SyslogConfig>,
    #[serde(default)]
    pub alerts: AlertConfig,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            checkpoint_every: default_every(),
            checkpoint_interval_secs: default_interval(),
            syslog: None,
            alerts: AlertConfig::default(),
        }
    }
}

impl AuditConfig {
    /// Resolves relative paths against the config file's folder.
    pub fn resolve(&mut self, base: &Path) {
        if let Some(s) = &mut self.syslog {
            if s.ca.is_relative() {
                s.ca = base.join(&s.ca);
            }
        }
    }

    pub fn is_default(&self) -> bool {
        *self == AuditConfig::default()
    }
}

fn default_app_name() -> String {
    "pacs-broker".into()
}

/// `[audit.syslog]`: live forwarding over TLS (RFC 5425).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyslogConfig {
    /// `host:port` of the collector's syslog-over-TLS listener (usually port 6514).
    pub address: String,
    /// The CA certificate (PEM) the collector's certificate must chain to.
    pub ca: PathBuf,
    /// Name to verify in the collector's certificate (default: the host part of `address`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// RFC 5424 APP-NAME.
    #[serde(default = "default_app_name")]
    pub app_name: String,
}

impl SyslogConfig {
    pub fn server_name(&self) -> String {
        self.server_name.clone().unwrap_or_else(|| {
            self.address
                .rsplit_once(':')
                .map(|(h, _)| h.trim_matches(['[', ']']).to_string())
                .unwrap_or_else(|| self.address.clone())
        })
    }
}

fn default_burst() -> u32 {
    10
}
fn default_window() -> u64 {
    60
}

/// `[audit.alerts]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertConfig {
    /// Refusals from one peer within `refusal_window_secs` that raise an alert.
    #[serde(default = "default_burst")]
    pub refusal_burst: u32,
    #[serde(default = "default_window")]
    pub refusal_window_secs: u64,
    /// Hours (UTC) in which re-identification is expected, `"HH:MM-HH:MM"`; one outside them
    /// raises an alert. Unset: no hours check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reidentify_hours: Option<String>,
}

impl Default for AlertConfig {
    fn default() -> Self {
        AlertConfig {
            refusal_burst: default_burst(),
            refusal_window_secs: default_window(),
            reidentify_hours: None,
        }
    }
}
