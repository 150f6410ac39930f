//! `pacs-broker audit verify | report | export | checkpoints`: the privacy officer's commands.
//! Every one that reads the log is itself recorded in it (who, what, why).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;

use pacs_broker::audit::events::kind;
use pacs_broker::audit::{
    self, events, export::Format, report, AuditLog, Detail, Event, SiteAudit,
};
use pacs_broker::config::NodeConfig;
use pacs_broker::federation::tls::SiteTls;
use pacs_broker::node::Node;

use super::node::{AuditReportArgs, ExportFormat};

/// Exit code of a failed verification.
const VERIFY_FAILED: i32 = 3;

pub(super) fn site_log(cfg: &NodeConfig) -> anyhow::Result<(AuditLog, SiteTls)> {
    let tls = SiteTls::load(&cfg.site_id, &cfg.tls)?;
    let log = AuditLog::open_site(
        &cfg.data_dir.join("audit.log"),
        &SiteAudit {
            site: &cfg.site_id,
            key_pkcs8: &tls.key_pkcs8,
            cert_der: tls.cert.as_ref(),
            data_dir: &cfg.data_dir,
            config: &cfg.audit,
        },
    )?;
    Ok((log, tls))
}

fn admin_event(action: &'static str, object: String, purpose: &str) -> Event {
    Event {
        purpose: purpose.into(),
        ..events::admin(audit::local_user(), action, object, "ok".into())
    }
}

/// The event of an administrative command done by the OS user (no local user is named).
pub(super) fn os_user_event(action: &'static str, object: String, outcome: String) -> Event {
    events::admin(audit::local_user(), action, object, outcome)
}

/// Records an administrative command in the audit log of the node that `config` configures.
/// Commands that also work without a node (`dsa sign`, `keys new`, `certs revoke`) record only
/// when given `--config`.
pub(super) fn record_admin(config: &Path, event: Event) -> anyhow::Result<()> {
    let cfg = NodeConfig::load(config)?;
    let (log, _) = site_log(&cfg)?;
    log.record(event)
        .context("the command was carried out, but the audit log did not record it")?;
    Ok(())
}

pub fn verify(config: &Path, partner_files: &[PathBuf]) -> anyhow::Result<i32> {
    let cfg = NodeConfig::load(config)?;
    let tls = SiteTls::load(&cfg.site_id, &cfg.tls)?;
    let path = cfg.data_dir.join("audit.log");
    match audit::verify_site(&path, &cfg.site_id, tls.cert.as_ref(), partner_files) {
        Ok(v) => {
            println!(
                "audit log {} verified: {} entries, head {}",
                path.display(),
                v.verified.entries,
                v.verified.last_hash
            );
            for (source, n, covered) in &v.sources {
                println!("  {source}: {n} signed checkpoint(s), up to entry {covered}: consistent");
            }
            if v.unsigned_tail > 0 {
                println!(
                    "  the last {} entr{} are not covered by a checkpoint yet (one is signed at the next checkpoint or shutdown)",
                    v.unsigned_tail,
                    if v.unsigned_tail == 1 { "y" } else { "ies" }
                );
            }
            drop(tls);
            let (log, _) = site_log(&cfg)?;
            log.record_or_warn(admin_event(
                kind::VERIFY,
                format!("audit log verified: {} entries", v.verified.entries),
                "",
            ));
            Ok(0)
        }
        Err(e) => {
            eprintln!("audit log FAILED verification: {e}");
            Ok(VERIFY_FAILED)
        }
    }
}

pub fn export(config: &Path, format: ExportFormat, since: Option<&str>) -> anyhow::Result<i32> {
    let cfg = NodeConfig::load(config)?;
    let since = since
        .map(report::parse_time)
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let (log, _) = site_log(&cfg)?;
    let entries = audit::read_entries(log.path())?;
    let format = match format {
        ExportFormat::Jsonl => Format::Jsonl,
        ExportFormat::Syslog => Format::Syslog,
        ExportFormat::Dicom => Format::Dicom,
    };
    let app = cfg
        .audit
        .syslog
        .as_ref()
        .map(|s| s.app_name.clone())
        .unwrap_or_else(|| "pacs-broker".into());
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut n = 0;
    for e in &entries {
        if let Some(s) = since {
            let t = time::OffsetDateTime::parse(
                &e.time,
                &time::format_description::well_known::Rfc3339,
            );
            if t.is_ok_and(|t| t < s) {
                continue;
            }
        }
        writeln!(
            out,
            "{}",
            audit::export::format_entry(e, format, &cfg.site_id, &app)
        )?;
        n += 1;
    }
    out.flush()?;
    log.record_or_warn(admin_event(
        kind::EXPORT,
        format!("{n} audit entries exported ({format:?})"),
        "",
    ));
    Ok(0)
}

pub fn checkpoints(config: &Path, of: &str) -> anyhow::Result<i32> {
    let cfg = NodeConfig::load(config)?;
    let file = audit::checkpoint::partner_file(&cfg.data_dir.join("audit.log"), of);
    let held = audit::checkpoint::load(&file)?;
    let (log, _) = site_log(&cfg)?;
    log.record_or_warn(admin_event(
        kind::AUDIT_CHECKPOINTS,
        format!("{} checkpoint(s) of site:{of} handed out", held.len()),
        "",
    ));
    if held.is_empty() {
        eprintln!(
            "this site holds no checkpoint of site `{of}` ({})",
            file.display()
        );
        return Ok(1);
    }
    for c in held {
        println!("{}", serde_json::to_string(&c)?);
    }
    Ok(0)
}

pub fn report(a: AuditReportArgs) -> anyhow::Result<i32> {
    let node = Node::open_config(&a.config)?;
    let path = node.audit.path().to_owned();
    if let Err(e) = audit::verify(&path) {
        eprintln!(
            "warning: the audit log FAILED verification ({e}); this report may be incomplete"
        );
    }
    let entries = audit::read_entries(&path)?;
    let set = node.agreements();
    let parse = |s: &Option<String>| {
        s.as_deref()
            .map(report::parse_time)
            .transpose()
            .map_err(anyhow::Error::msg)
    };
    let mut q = report::Query {
        agreement: a.agreement.clone(),
        party: a.party.clone(),
        since: parse(&a.since)?,
        until: parse(&a.until)?,
        ..Default::default()
    };
    let vault = node.vault();
    if let Err(e) = &vault {
        eprintln!("warning: the vault cannot be opened ({e}); patient ids cannot be resolved");
    }
    if let Some(patient) = &a.patient {
        let mut agreements: Vec<String> = set.agreements.keys().cloned().collect();
        agreements.extend(entries.iter().map(|e| e.event.agreement.clone()));
        agreements.sort();
        agreements.dedup();
        for ag in agreements {
            if let Some(tok) = node.keys.existing_tokenizer(&ag) {
                let t = tok.token("PatientID", patient);
                q.patient_tokens.push((ag, t));
            }
        }
        if let Ok(v) = &vault {
            q.patient_tokens.extend(
                v.find("PatientID", patient)
                    .context("searching the vault")?,
            );
        }
    }
    let ds = report::disclosures(&entries, &q, &set);
    let patients = a.patient.is_none().then(|| {
        report::patients(&ds, |ag, token| {
            let v = vault.as_ref().ok()?;
            v.reidentify(ag, token)
                .ok()
                .flatten()
                .filter(|e| e.attribute == "PatientID")
                .map(|e| e.original)
        })
    });
    let text = if a.json {
        report::render_json(&ds, patients.as_deref())
    } else {
        report::render_text(&ds, patients.as_deref())
    };
    // Looking is audited before anything is shown: tokens only, never the ids on screen.
    let mut tokens: Vec<String> = ds.iter().flat_map(|d| d.patient_tokens.clone()).collect();
    tokens.sort();
    tokens.dedup();
    let shown = patients
        .as_ref()
        .map(|p| p.iter().filter(|p| p.local_id.is_some()).count());
    node.audit.record_detailed(
        Event {
            agreement: a.agreement.clone().unwrap_or_default(),
            ..admin_event(
                kind::REPORT,
                format!(
                    "disclosure report: {} disclosure(s){}{}",
                    ds.len(),
                    if a.patient.is_some() {
                        " of one patient"
                    } else {
                        ""
                    },
                    shown
                        .map(|n| format!(", {n} local patient id(s) shown"))
                        .unwrap_or_default()
                ),
                a.reason.as_deref().unwrap_or("not stated"),
            )
        },
        Detail {
            patient_tokens: tokens,
            party: a.party.clone(),
            ..Detail::default()
        },
    )?;
    print!("{text}");
    Ok(0)
}
