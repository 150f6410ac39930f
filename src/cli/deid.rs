//! `pacs-broker deid`: de-identify files or folders without a network (issue #4), and
//! `pacs-broker deid preview`: what a flow would change in one file.
//!
//! Exit codes: 0 every input de-identified; 3 the batch finished but some inputs were quarantined
//! or failed (listed in `<out>/quarantine.jsonl`); 1 the command could not run.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use pacs_broker::deid::{self, BatchOutcome, DeidConfig, Deidentifier, ProfileOption};
use pacs_broker::dsa::Agreement;
use pacs_broker::pseudonym::SiteKeys;

/// De-identify DICOM files or folders to an output folder (PS3.15 Annex E).
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DeidArgs {
    #[command(subcommand)]
    command: Option<DeidCommand>,
    #[command(flatten)]
    run: Box<RunArgs>,
}

#[derive(Debug, Subcommand)]
enum DeidCommand {
    /// Before/after table of every attribute a flow changes in one file, with the rule.
    Preview(PreviewArgs),
}

/// Which de-identification to apply: an agreement's flow, or a profile with options.
#[derive(Debug, Args)]
struct Selection {
    /// Data sharing agreement (TOML).
    #[arg(long, requires = "flow", conflicts_with_all = ["profile", "option"])]
    agreement: Option<PathBuf>,
    /// Flow of the agreement whose de-identification settings apply.
    #[arg(long, requires = "agreement")]
    flow: Option<String>,
    /// Profile without an agreement (one-off use and testing); only `basic` exists.
    #[arg(long)]
    profile: Option<String>,
    /// PS3.15 option in kebab case (repeatable), e.g. retain-longitudinal-modified-dates.
    #[arg(long = "option", value_name = "NAME")]
    option: Vec<ProfileOption>,
    /// What to do with images at risk of burned-in text: `quarantine` (default) or
    /// `clean-pixel-data` (find text with OCR, black it out, release only if none remains).
    #[arg(
        long = "burned-in-text",
        value_name = "MODE",
        conflicts_with = "agreement"
    )]
    burned_in_text: Option<deid::BurnedInTextMode>,
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    selection: Selection,
    /// Site key file (0600), from `pacs-broker keys new`.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Output folder; outputs keep their paths relative to each input folder.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Files or folders (searched recursively).
    inputs: Vec<PathBuf>,
}

#[derive(Debug, Args)]
struct PreviewArgs {
    #[command(flatten)]
    selection: Selection,
    /// Site key file; without it a throw-away key is used (tokens then differ from real runs).
    #[arg(long)]
    key: Option<PathBuf>,
    /// The DICOM file to preview.
    file: PathBuf,
}

impl Selection {
    /// The engine: the agreement flow's (with its trial subject IDs, if any), or the basic
    /// profile with the given options in an ad-hoc token namespace.
    fn resolve(&self, keys: &SiteKeys) -> anyhow::Result<Deidentifier> {
        if let (Some(path), Some(flow)) = (&self.agreement, &self.flow) {
            let agreement = Agreement::from_file(path)?;
            let Some(f) = agreement.flow(flow) else {
                let names: Vec<_> = agreement.flows.iter().map(|f| f.name.as_str()).collect();
                bail!(
                    "agreement {} has no flow {flow:?}; flows: {}",
                    agreement.id,
                    names.join(", ")
                );
            };
            return Ok(f.deidentifier(&agreement.id, path, keys)?);
        }
        match self.profile.as_deref() {
            Some("basic") => {}
            Some(other) => bail!("unknown profile {other:?}; only \"basic\" (PS3.15 Basic Application Level Confidentiality Profile) exists"),
            None => bail!("say how to de-identify: --agreement <file> --flow <name>, or --profile basic [--option <name>]..."),
        }
        let options: BTreeSet<ProfileOption> = self.option.iter().copied().collect();
        let config = DeidConfig {
            options,
            burned_in_text: self.burned_in_text.unwrap_or_default(),
            ..DeidConfig::default()
        };
        Ok(Deidentifier::new(
            config,
            keys.tokenizer("adhoc:profile-basic")?,
        ))
    }
}

pub fn run(args: DeidArgs) -> anyhow::Result<i32> {
    match args.command {
        Some(DeidCommand::Preview(p)) => preview(p),
        None => batch(*args.run),
    }
}

fn batch(args: RunArgs) -> anyhow::Result<i32> {
    let key = args.key.context("--key <keyfile> is required")?;
    let out = args.out.context("--out <dir> is required")?;
    if args.inputs.is_empty() {
        bail!("no input files or folders given");
    }
    let keys = SiteKeys::load(&key)?;
    let deidentifier = args.selection.resolve(&keys)?;
    for p in deidentifier.config().problems() {
        eprintln!("warning: {p}");
    }
    if deidentifier.config().burned_in_text == deid::BurnedInTextMode::CleanPixelData {
        if let Err(e) = deid::OcrEngine::from_env().version() {
            eprintln!("warning: {e}: every image at risk of burned-in text will be quarantined");
        }
    }
    let total = deid::batch::collect_inputs(&args.inputs, &out).len() as u64;
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} {per_sec} eta {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut problems = Vec::new();
    let summary = deid::run_batch(&deidentifier, &args.inputs, &out, |item| {
        bar.inc(1);
        match &item.outcome {
            BatchOutcome::Deidentified { .. } => {}
            BatchOutcome::Quarantined { reason } => {
                problems.push(format!("quarantined {}: {reason}", item.input.display()))
            }
            BatchOutcome::Failed { reason } => {
                problems.push(format!("failed {}: {reason}", item.input.display()))
            }
        }
    })?;
    bar.finish_and_clear();
    for p in &problems {
        println!("{p}");
    }
    println!(
        "de-identified {}, quarantined {}, failed {} (list: {})",
        summary.deidentified,
        summary.quarantined,
        summary.failed,
        out.join(deid::batch::QUARANTINE_FILE).display()
    );
    Ok(if summary.quarantined + summary.failed == 0 {
        0
    } else {
        3
    })
}

fn preview(args: PreviewArgs) -> anyhow::Result<i32> {
    let keys = match &args.key {
        Some(k) => SiteKeys::load(k)?,
        None => {
            eprintln!("note: no --key given; tokens and UIDs below come from a throw-away key");
            SiteKeys::generate()
        }
    };
    // Through the same guard as every input: length bombs refused; bare, deflated and CP-246
    // files read.
    let obj = pacs_broker::deid::guard::read_guarded(&args.file).map_err(|e| {
        anyhow::anyhow!("{} is not a readable DICOM file: {e}", args.file.display())
    })?;
    let deidentifier = args.selection.resolve(&keys)?;
    let preview = deidentifier
        .preview(obj)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let rows: Vec<[String; 6]> = preview
        .changes
        .iter()
        .map(|c| {
            [
                c.path.clone(),
                c.keyword.clone(),
                c.action.to_string(),
                c.before.clone().unwrap_or_default(),
                c.after.clone().unwrap_or_else(|| {
                    if c.action == "X" {
                        "(removed)".into()
                    } else {
                        String::new()
                    }
                }),
                c.rule.clone(),
            ]
        })
        .collect();
    let header = ["ATTRIBUTE", "KEYWORD", "ACTION", "BEFORE", "AFTER", "RULE"].map(String::from);
    let mut widths = [0usize; 6];
    for r in std::iter::once(&header).chain(rows.iter()) {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count().min(48));
        }
    }
    for r in std::iter::once(&header).chain(rows.iter()) {
        let cells: Vec<String> = r
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (c, w))| {
                if i == 5 {
                    c.clone()
                } else {
                    format!("{:<w$}", c.chars().take(48).collect::<String>())
                }
            })
            .collect();
        println!("{}", cells.join("  ").trim_end());
    }
    match preview.verdict {
        Ok(()) => {
            println!("\nverdict: released ({} changes)", rows.len());
            Ok(0)
        }
        Err(e) => {
            println!("\nverdict: NOT released: {e}");
            Ok(3)
        }
    }
}
