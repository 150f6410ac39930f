//! `pacs-broker dsa`: the privacy officer's tools for data sharing agreements (issue #5).
//!
//! Exit codes: 0 fine; 1 errors in a file (or unusable input); for `verify`, 2 when a party has
//! not signed yet and 3 when a signature does not match the file (changed or forged).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use pacs_broker::audit::events::kind;
use pacs_broker::dsa::{self, sign, Agreement, FederationCa, SignatureState, Verdict};
use time::OffsetDateTime;

/// Check, explain, compare, sign and verify data sharing agreements.
#[derive(Debug, Args)]
pub struct DsaArgs {
    #[command(subcommand)]
    command: DsaCommand,
}

#[derive(Debug, Subcommand)]
enum DsaCommand {
    /// Report every error (exit 1) and every risky choice (warning) in agreement files.
    Check {
        /// Agreement files (.toml).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Federation CA certificate: also verify the signatures (warn when not fully signed).
        #[arg(long)]
        ca: Option<PathBuf>,
    },
    /// Plain-language summary of an agreement, for a privacy report.
    Explain { file: PathBuf },
    /// What changes in disclosure from <old> to <new>; widening changes first.
    Diff { old: PathBuf, new: PathBuf },
    /// Sign an agreement's exact bytes with the site's certificate key (writes <file>.sig/<site>.sig).
    Sign {
        #[arg(long)]
        site_cert: PathBuf,
        #[arg(long)]
        site_key: PathBuf,
        file: PathBuf,
        /// The signing site's node configuration: record the signature in its audit log.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Show who signed which version; exit 0 only when every party signed these exact bytes.
    Verify {
        /// Federation CA certificate (PEM).
        #[arg(long)]
        ca: PathBuf,
        file: PathBuf,
    },
    /// Print an agreement in canonical form (what the parser understood).
    Format { file: PathBuf },
}

/// Exit code: a party has not signed yet.
pub const EXIT_UNSIGNED: i32 = 2;
/// Exit code: a signature does not match the file (changed or forged).
pub const EXIT_MISMATCH: i32 = 3;

fn load(path: &Path) -> anyhow::Result<Agreement> {
    Ok(Agreement::from_file(path)?)
}

pub fn run(args: DsaArgs) -> anyhow::Result<i32> {
    match args.command {
        DsaCommand::Check { files, ca } => check(&files, ca.as_deref()),
        DsaCommand::Explain { file } => {
            print!("{}", dsa::explain::explain(&load(&file)?));
            Ok(0)
        }
        DsaCommand::Diff { old, new } => {
            let changes = dsa::diff::diff(&load(&old)?, &load(&new)?);
            if changes.is_empty() {
                println!("no changes in disclosure");
            }
            let widening = changes
                .iter()
                .filter(|c| c.impact == dsa::diff::Impact::Widens)
                .count();
            for c in &changes {
                println!("{c}");
            }
            if widening > 0 {
                println!("\n{widening} change(s) widen disclosure: review them before signing.");
            }
            Ok(0)
        }
        DsaCommand::Sign {
            site_cert,
            site_key,
            file,
            config,
        } => {
            let out = sign::sign_file(&file, &site_cert, &site_key, OffsetDateTime::now_utc())?;
            println!("signed {} -> {}", file.display(), out.display());
            if let Some(config) = config {
                audit_signature(&config, &file)?;
            }
            Ok(0)
        }
        DsaCommand::Verify { ca, file } => verify(&ca, &file),
        DsaCommand::Format { file } => {
            print!("{}", dsa::format(&load(&file)?));
            Ok(0)
        }
    }
}

/// Records in the signing site's audit log which agreement version (and exact bytes) it signed.
fn audit_signature(config: &Path, file: &Path) -> anyhow::Result<()> {
    let a = load(file)?;
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    let object = format!(
        "agreement {} version {}, file sha256 {} signed",
        a.id,
        a.version,
        sign::sha256_hex(&bytes)
    );
    let event = pacs_broker::audit::Event {
        agreement: a.id.clone(),
        ..super::audit::os_user_event(kind::DSA_SIGN, object, "ok".into())
    };
    super::audit::record_admin(config, event)
}

fn check(files: &[PathBuf], ca: Option<&Path>) -> anyhow::Result<i32> {
    let ca = ca.map(FederationCa::from_pem_file).transpose()?;
    let now = OffsetDateTime::now_utc();
    let (mut errors, mut warnings) = (0, 0);
    for f in files {
        let bytes = std::fs::read(f).with_context(|| format!("{}", f.display()))?;
        let Ok(text) = String::from_utf8(bytes.clone()) else {
            println!("{}: error: not UTF-8 text", f.display());
            errors += 1;
            continue;
        };
        let name = f.display().to_string();
        let report = dsa::check(&name, &text, now.date());
        for e in &report.errors {
            println!(
                "{}:{}:{}: error: {}\n{}\n",
                e.file, e.line, e.col, e.message, e.snippet
            );
        }
        for w in &report.warnings {
            println!(
                "{}:{}:{}: warning: {}\n{}\n",
                w.file, w.line, w.col, w.message, w.snippet
            );
        }
        errors += report.errors.len();
        warnings += report.warnings.len();
        if let Some(a) = &report.agreement {
            let missing: Vec<&str> = a
                .parties
                .iter()
                .filter(|p| {
                    !sign::signature_dir(f)
                        .join(format!("{}.sig", p.site))
                        .exists()
                })
                .map(|p| p.site.as_str())
                .collect();
            let mut sig_warning = |msg: String| {
                println!("{name}: warning: {msg}\n");
                warnings += 1;
            };
            if let Some(ca) = &ca {
                let v = sign::verify(f, &bytes, a, ca, now);
                if v.verdict() != Verdict::FullySigned {
                    sig_warning(format!("not enforceable: {}", v.problems()));
                }
            } else if !missing.is_empty() {
                let draft = if a.status == dsa::Status::Draft {
                    " (normal for a draft being edited)"
                } else {
                    ""
                };
                sig_warning(format!("not signed by {}{draft}: nodes refuse an agreement until every party has signed this exact version", missing.join(", ")));
            }
        }
    }
    println!(
        "{} file(s): {errors} error(s), {warnings} warning(s)",
        files.len()
    );
    Ok(if errors > 0 { 1 } else { 0 })
}

fn verify(ca: &Path, file: &Path) -> anyhow::Result<i32> {
    let ca = FederationCa::from_pem_file(ca)?;
    let bytes = std::fs::read(file).with_context(|| format!("{}", file.display()))?;
    let a = load(file)?;
    let v = sign::verify(file, &bytes, &a, &ca, OffsetDateTime::now_utc());
    println!(
        "{} — agreement {:?} version {}, sha256 {}",
        file.display(),
        a.id,
        a.version,
        v.file_sha256
    );
    for (site, state) in &v.parties {
        let mark = match state {
            SignatureState::Valid { .. } => "ok      ",
            SignatureState::Missing => "MISSING ",
            SignatureState::Stale { .. } | SignatureState::Invalid(_) => "MISMATCH",
        };
        println!("  {mark} {site}: {state}");
    }
    for n in &v.notes {
        println!("  note: {n}");
    }
    Ok(match v.verdict() {
        Verdict::FullySigned => {
            println!("every party has signed this exact version: enforceable");
            0
        }
        Verdict::Unsigned => {
            println!("not enforceable: a party has not signed yet");
            EXIT_UNSIGNED
        }
        Verdict::Mismatch => {
            println!("not enforceable: a signature does not match this file (changed or forged)");
            EXIT_MISMATCH
        }
    })
}
