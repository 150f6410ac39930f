//! Audit entries in the formats a hospital's SIEM and IHE ATNA repositories read.
//!
//! Owns: one entry as a JSON line, as an RFC 5424 syslog message (facility 13 "log audit",
//! severity from the entry: alert for alerts, warning for refusals and failures, notice
//! otherwise; the chain fields as structured data `pacs-broker@32473`, the entry as JSON in MSG),
//! and as a DICOM audit message (PS3.15 A.5, validated against the schema in docs/schema/).
//!
//! Does not own: transport (see [`super::syslog`]) or choosing entries (the CLI).
//!
//! `32473` is the private enterprise number RFC 5612 reserves for documentation; a site that has
//! its own may ask for it to be configurable.

use std::fmt::Write;

use base64_encode::encode as b64;

use super::Entry;

/// Structured-data id of the syslog messages.
pub const SD_ID: &str = "pacs-broker@32473";
/// RFC 5424 facility 13: log audit.
const FACILITY: u8 = 13;

/// Export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Syslog,
    Dicom,
}

/// One entry in `format`, one line, without the line end.
pub fn format_entry(e: &Entry, format: Format, host: &str, app_name: &str) -> String {
    match format {
        Format::Jsonl => serde_json::to_string(e).expect("entry serialises"),
        Format::Syslog => syslog_message(e, host, app_name),
        Format::Dicom => dicom_message(e, host),
    }
}

/// RFC 5424 severity of an entry.
pub fn severity(e: &Entry) -> u8 {
    let a = e.event.action.as_str();
    if a == "alert" {
        1
    } else if a.starts_with("refuse")
        || !(e.event.outcome.is_empty() || e.event.outcome.starts_with("ok"))
    {
        4
    } else {
        5
    }
}

/// PRINTUSASCII without spaces, at most `max` characters; `-` when empty.
fn header_field(s: &str, max: usize) -> String {
    let v: String = s
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(max)
        .collect();
    if v.is_empty() {
        "-".into()
    } else {
        v
    }
}

fn sd_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// RFC 3339 with at most 6 fractional digits (RFC 5424 TIME-SECFRAC).
fn syslog_time(t: &str) -> String {
    match t.split_once('.') {
        Some((secs, rest)) => {
            let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            let zone = &rest[digits.len()..];
            if digits.is_empty() {
                t.to_string()
            } else {
                format!("{secs}.{}{zone}", &digits[..digits.len().min(6)])
            }
        }
        None => t.to_string(),
    }
}

/// One RFC 5424 message (no framing).
pub fn syslog_message(e: &Entry, host: &str, app_name: &str) -> String {
    let pri = FACILITY * 8 + severity(e);
    let mut sd = format!("[{SD_ID} seq=\"{}\" hash=\"{}\"", e.seq, e.hash);
    let mut param = |k: &str, v: &str| {
        if !v.is_empty() {
            let _ = write!(sd, " {k}=\"{}\"", sd_escape(v));
        }
    };
    param("actor", &e.event.actor);
    param("agreement", &e.event.agreement);
    param("purpose", &e.event.purpose);
    param("outcome", &e.event.outcome);
    param("study", e.detail.study.as_deref().unwrap_or(""));
    param("party", e.detail.party.as_deref().unwrap_or(""));
    param("flow", e.detail.flow.as_deref().unwrap_or(""));
    sd.push(']');
    let json = serde_json::to_string(e).expect("entry serialises");
    format!(
        "<{pri}>1 {} {} {} - {} {sd} \u{feff}{json}",
        syslog_time(&e.time),
        header_field(host, 255),
        header_field(app_name, 48),
        header_field(&e.event.action, 32),
    )
}

fn xml(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// (code, meaning, EventActionCode) of an action, from DICOM CID 400 (Audit Event ID).
/// Every kind of [`super::events::kind`] not named here is Application Activity.
fn dicom_event(action: &str) -> (&'static str, &'static str, &'static str) {
    use super::events::kind::*;
    match action {
        DISCLOSE | RETURN => ("110106", "Export", "R"),
        RECEIVE | RETURN_RECEIVE => ("110107", "Import", "C"),
        REIDENTIFY | QUARANTINE_REVEAL => ("110110", "Patient Record", "R"),
        REPORT | VERIFY | EXPORT | AUDIT_CHECKPOINTS => ("110101", "Audit Log Used", "R"),
        "delete"
        | RETENTION_DELETE
        | DESTRUCTION_RECEIPT
        | DESTRUCTION_RECEIPT_SENT
        | QUARANTINE_DISCARD => ("110105", "DICOM Study Deleted", "D"),
        // Changes of what the node enforces or trusts: security configuration.
        POLICY_LOAD | POLICY_CHANGE | CRL_RELOAD | DSA_SIGN | KEYS_NEW | KEYS_ROTATE
        | KEYS_RETIRE | VAULT_SHRED | CERTS_REVOKE => ("110113", "Security Alert", "E"),
        a if a == ALERT || a.starts_with(REFUSE) => ("110113", "Security Alert", "E"),
        _ => ("110100", "Application Activity", "E"),
    }
}

fn outcome_indicator(e: &Entry) -> &'static str {
    match severity(e) {
        1 => "8",
        4 => "4",
        _ => "0",
    }
}

fn coded(element: &str, code: &str, system: &str, meaning: &str) -> String {
    format!(
        "<{element} csd-code=\"{}\" codeSystemName=\"{}\" originalText=\"{}\"/>",
        xml(code),
        xml(system),
        xml(meaning)
    )
}

fn value_pair(kind: &str, value: &str) -> String {
    format!(
        "<ParticipantObjectDetail type=\"{}\" value=\"{}\"/>",
        xml(kind),
        b64(value.as_bytes())
    )
}

/// One DICOM audit message (PS3.15 A.5) for an entry, on one line.
pub fn dicom_message(e: &Entry, site: &str) -> String {
    let (code, meaning, action) = dicom_event(&e.event.action);
    let mut m = String::from("<AuditMessage>");
    let _ = write!(
        m,
        "<EventIdentification EventActionCode=\"{action}\" EventDateTime=\"{}\" EventOutcomeIndicator=\"{}\">{}",
        xml(&e.time),
        outcome_indicator(e),
        coded("EventID", code, "DCM", meaning)
    );
    if !e.event.outcome.is_empty() && e.event.outcome != "ok" {
        let _ = write!(
            m,
            "<EventOutcomeDescription>{}</EventOutcomeDescription>",
            xml(&e.event.outcome)
        );
    }
    m.push_str("</EventIdentification>");
    let (src_role, dst_role) = (
        coded("RoleIDCode", "110153", "DCM", "Source Role ID"),
        coded("RoleIDCode", "110152", "DCM", "Destination Role ID"),
    );
    let node = format!("pacs-broker:{site}");
    let (requestor, ours) = (xml(&e.event.actor), xml(&node));
    match e.event.action.as_str() {
        "disclose" => {
            let _ = write!(m, "<ActiveParticipant UserID=\"{ours}\" UserIsRequestor=\"true\">{src_role}</ActiveParticipant>");
            if let Some(p) = &e.detail.party {
                let _ = write!(m, "<ActiveParticipant UserID=\"site:{}\" UserIsRequestor=\"false\">{dst_role}</ActiveParticipant>", xml(p));
            }
        }
        "receive" => {
            let _ = write!(m, "<ActiveParticipant UserID=\"{requestor}\" UserIsRequestor=\"true\">{src_role}</ActiveParticipant>");
            let _ = write!(m, "<ActiveParticipant UserID=\"{ours}\" UserIsRequestor=\"false\">{dst_role}</ActiveParticipant>");
        }
        _ => {
            let _ = write!(
                m,
                "<ActiveParticipant UserID=\"{requestor}\" UserIsRequestor=\"true\"/>"
            );
            if e.event.actor != "node" {
                let _ = write!(
                    m,
                    "<ActiveParticipant UserID=\"{ours}\" UserIsRequestor=\"false\"/>"
                );
            }
        }
    }
    let _ = write!(
        m,
        "<AuditSourceIdentification AuditEnterpriseSiteID=\"{0}\" AuditSourceID=\"{0}\"><AuditSourceTypeCode csd-code=\"4\"/></AuditSourceIdentification>",
        xml(site)
    );
    m.push_str(&participant_objects(e));
    m.push_str("</AuditMessage>");
    m
}

fn participant_objects(e: &Entry) -> String {
    let mut m = String::new();
    let chain = [
        value_pair("seq", &e.seq.to_string()),
        value_pair("hash", &e.hash),
        value_pair("agreement", &e.event.agreement),
        value_pair("purpose", &e.event.purpose),
        value_pair("object", &e.event.object),
    ]
    .concat();
    let lifecycle = match e.event.action.as_str() {
        "disclose" => " ParticipantObjectDataLifeCycle=\"11\"",
        "receive" => " ParticipantObjectDataLifeCycle=\"12\"",
        _ => "",
    };
    if let Some(study) = e.detail.study.as_deref().filter(|s| !s.trim().is_empty()) {
        let n = e.detail.instances.unwrap_or(0);
        let _ = write!(
            m,
            "<ParticipantObjectIdentification ParticipantObjectID=\"{0}\" ParticipantObjectTypeCode=\"2\" ParticipantObjectTypeCodeRole=\"3\"{lifecycle}>{1}<ParticipantObjectName>{0}</ParticipantObjectName>{chain}<ParticipantObjectDescription><SOPClass NumberOfInstances=\"{n}\"/><Anonymized>true</Anonymized></ParticipantObjectDescription></ParticipantObjectIdentification>",
            xml(study),
            coded("ParticipantObjectIDTypeCode", "110180", "DCM", "Study Instance UID"),
        );
    } else {
        // The entry itself, so that its chain fields travel even without a study.
        let _ = write!(
            m,
            "<ParticipantObjectIdentification ParticipantObjectID=\"audit-entry-{0}\" ParticipantObjectTypeCode=\"2\" ParticipantObjectTypeCodeRole=\"13\">{1}<ParticipantObjectName>audit-entry-{0}</ParticipantObjectName>{chain}</ParticipantObjectIdentification>",
            e.seq,
            coded("ParticipantObjectIDTypeCode", "pacs-broker-audit-entry", "pacs-broker", "Audit entry"),
        );
    }
    for t in e
        .detail
        .patient_tokens
        .iter()
        .filter(|t| !t.trim().is_empty())
    {
        let _ = write!(
            m,
            "<ParticipantObjectIdentification ParticipantObjectID=\"{0}\" ParticipantObjectTypeCode=\"1\" ParticipantObjectTypeCodeRole=\"1\"{lifecycle}>{1}<ParticipantObjectName>{0}</ParticipantObjectName></ParticipantObjectIdentification>",
            xml(t),
            coded("ParticipantObjectIDTypeCode", "2", "RFC-3881", "Patient Number"),
        );
    }
    m
}

/// Standard base64 (RFC 4648 with padding), for `xsd:base64Binary`.
mod base64_encode {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn encode(bytes: &[u8]) -> String {
        let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Detail, Event};

    fn entry(action: &str, outcome: &str) -> Entry {
        Entry {
            seq: 7,
            time: "2026-12-02T04:50:54.123456789Z".into(),
            event: Event {
                actor: "site:telerad-c".into(),
                action: action.into(),
                object: "study 2.25.9".into(),
                agreement: "agr \"x\" ]".into(),
                purpose: "treatment".into(),
                outcome: outcome.into(),
            },
            detail: Detail {
                study: Some("2.25.9".into()),
                patient_tokens: vec!["ABCDEFGH12345678".into()],
                party: Some("telerad-c".into()),
                ..Detail::default()
            },
            prev: "0".repeat(64),
            hash: "f".repeat(64),
        }
    }

    #[test]
    fn base64_known_values() {
        assert_eq!(b64(b""), "");
        assert_eq!(b64(b"f"), "Zg==");
        assert_eq!(b64(b"fo"), "Zm8=");
        assert_eq!(b64(b"foo"), "Zm9v");
        assert_eq!(b64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn syslog_messages_follow_rfc5424() {
        let m = syslog_message(&entry("receive", "ok"), "hospital-a", "pacs-broker");
        assert!(m.starts_with("<109>1 2026-12-02T04:50:54.123456Z hospital-a pacs-broker - receive [pacs-broker@32473 seq=\"7\""), "{m}");
        assert!(m.contains("agreement=\"agr \\\"x\\\" \\]\""), "{m}");
        assert!(m.contains(" \u{feff}{\"seq\":7"));
        let a = syslog_message(&entry("alert", "x"), "h", "a");
        assert!(a.starts_with("<105>1 "));
        let r = syslog_message(&entry("refuse", "no"), "h", "a");
        assert!(r.starts_with("<108>1 "));
        assert_eq!(syslog_time("2026-01-01T00:00:00Z"), "2026-01-01T00:00:00Z");
    }

    #[test]
    fn dicom_messages_name_the_event_and_objects() {
        let m = dicom_message(&entry("disclose", "ok"), "hospital-a");
        assert!(m.contains("csd-code=\"110106\""));
        assert!(m.contains("ParticipantObjectID=\"2.25.9\""));
        assert!(m.contains("ParticipantObjectID=\"ABCDEFGH12345678\""));
        assert!(!m.contains('\n'));
        let r = dicom_message(&entry("refuse", "bad <x>"), "hospital-a");
        assert!(r.contains("Security Alert"));
        assert!(r.contains("bad &lt;x&gt;"));
    }
}
