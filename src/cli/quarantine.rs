//! `pacs-broker quarantine list / show / release / discard`: a privacy officer's review of the
//! instances a node held back. Nothing identifying is printed unless `show --reveal` asks for it,
//! and then the showing is audited. Release and discard need a justification and are audited.
//!
//! Exit codes: 0 done; 1 the command could not run (unknown item, refused release, bad config);
//! 2 `release` refused because the item still fails the verifier (use `--override`).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use dicom_dictionary_std::tags;
use pacs_broker::node::{Node, ReleaseError};
use pacs_broker::store::quarantine::HeldItem;

/// Review what a node held back from its flows.
#[derive(Debug, Args)]
pub struct QuarantineArgs {
    #[command(subcommand)]
    command: QuarantineCommand,
}

#[derive(Debug, Args)]
struct Common {
    /// The node configuration file.
    #[arg(long)]
    config: PathBuf,
    /// Who acts (recorded in the audit log); default: the login name ($USER).
    #[arg(long, env = "USER")]
    officer: Option<String>,
}

#[derive(Debug, Subcommand)]
enum QuarantineCommand {
    /// Every held item: id, time held, agreement / flow, reason.
    List {
        #[command(flatten)]
        common: Common,
    },
    /// One item's reason and the verifier's findings (no identifying values unless --reveal).
    Show {
        /// The item id (from `quarantine list`).
        id: String,
        #[command(flatten)]
        common: Common,
        /// Also show the patient's identifying values and the original file name (audited).
        #[arg(long)]
        reveal: bool,
    },
    /// Re-run de-identification and the verifier, and queue the result for delivery (audited).
    Release {
        id: String,
        #[command(flatten)]
        common: Common,
        /// Why the officer releases it (recorded in the audit log).
        #[arg(long)]
        justification: String,
        /// Release even if the output still fails the verifier (recorded as an override).
        #[arg(long = "override")]
        override_verifier: bool,
    },
    /// Delete a held item (audited).
    Discard {
        id: String,
        #[command(flatten)]
        common: Common,
        /// Why it is discarded (recorded in the audit log).
        #[arg(long, default_value = "discarded after review")]
        justification: String,
    },
}

fn officer(c: &Common) -> String {
    let name = c.officer.clone().unwrap_or_default();
    let name: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "._-@".contains(*c))
        .take(64)
        .collect();
    if name.is_empty() {
        "unknown".into()
    } else {
        name
    }
}

fn when(unix: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix as i64)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

fn print_item(i: &HeldItem) {
    println!("id:        {}", i.id);
    println!("held:      {}", when(i.held_at));
    println!("agreement: {}", i.agreement);
    println!("flow:      {}", i.flow);
    println!("source:    {}", i.source);
    println!("reason:    {}", i.reason);
    println!(
        "expires:   {}",
        i.expires_at
            .map(when)
            .unwrap_or_else(|| "never (the flow sets no retention)".into())
    );
    println!(
        "input:     {} bytes, SHA-256 {}",
        i.input_size, i.input_sha256
    );
    if !i.findings.is_empty() {
        println!("findings:");
        for f in &i.findings {
            println!("  - {f}");
        }
    }
}

/// The identifying values of a held input, for `--reveal`.
fn reveal(node: &Node, item: &HeldItem) -> anyhow::Result<()> {
    let q = node.quarantine()?;
    let origin = q.origin(&item.id)?;
    println!("identifying values (shown at your request; this is audited):");
    println!("  original:  {}", origin.unwrap_or_else(|| "-".into()));
    let obj = pacs_broker::deid::guard::read_guarded(q.input_view(&item.id)?.path())
        .map_err(|e| anyhow::anyhow!("the held input cannot be read: {e}"))?;
    for (tag, name) in [
        (tags::PATIENT_NAME, "PatientName"),
        (tags::PATIENT_ID, "PatientID"),
        (tags::PATIENT_BIRTH_DATE, "PatientBirthDate"),
        (tags::ACCESSION_NUMBER, "AccessionNumber"),
        (tags::STUDY_DATE, "StudyDate"),
        (tags::STUDY_INSTANCE_UID, "StudyInstanceUID"),
        (tags::SOP_INSTANCE_UID, "SOPInstanceUID"),
    ] {
        let v = obj
            .get(tag)
            .and_then(|e| e.to_str().ok())
            .map(|s| s.trim_matches(['\0', ' ']).to_string())
            .unwrap_or_default();
        println!("  {name:<17}{v}");
    }
    Ok(())
}

pub fn run(args: QuarantineArgs) -> anyhow::Result<i32> {
    match args.command {
        QuarantineCommand::List { common } => {
            let node = Node::open_config(&common.config)?;
            node.sweep_quarantine();
            let items = node.quarantine()?.list();
            if items.is_empty() {
                println!("nothing is held in quarantine");
            }
            for i in &items {
                println!(
                    "{}  {}  {} / {}  {}",
                    i.id,
                    when(i.held_at),
                    i.agreement,
                    i.flow,
                    i.reason
                );
            }
            Ok(0)
        }
        QuarantineCommand::Show {
            id,
            common,
            reveal: show_phi,
        } => {
            let node = Node::open_config(&common.config)?;
            let item = node.quarantine()?.get(&id)?;
            print_item(&item);
            if show_phi {
                node.audit_reveal(&item, &officer(&common))?;
                reveal(&node, &item)?;
            }
            Ok(0)
        }
        QuarantineCommand::Release {
            id,
            common,
            justification,
            override_verifier,
        } => {
            anyhow::ensure!(
                !justification.trim().is_empty(),
                "--justification must say why the item is released"
            );
            let node = Node::open_config(&common.config)?;
            match node.release_quarantined(
                &id,
                &officer(&common),
                &justification,
                override_verifier,
            ) {
                Ok(r) => {
                    if let Some(reason) = &r.verifier_reason {
                        println!(
                            "OVERRIDE: {} still fails the verifier ({reason}); released because you overrode it (recorded in the audit log)",
                            r.item.id
                        );
                    }
                    println!(
                        "released {} to flow {} / {}: queued in the outbox ({}); the running node delivers it (`pacs-broker outbox` shows it)",
                        r.item.id,
                        r.item.agreement,
                        r.item.flow,
                        r.outbox_dir.display()
                    );
                    Ok(0)
                }
                Err(e @ ReleaseError::StillFails { .. }) => {
                    eprintln!("error: {e}");
                    Ok(2)
                }
                Err(e) => Err(e).context("release refused"),
            }
        }
        QuarantineCommand::Discard {
            id,
            common,
            justification,
        } => {
            let node = Node::open_config(&common.config)?;
            let item = node.discard_quarantined(&id, &officer(&common), &justification)?;
            println!("discarded {} ({} / {})", item.id, item.agreement, item.flow);
            Ok(0)
        }
    }
}
