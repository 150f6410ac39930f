//! `pacs-broker certs`, `keys`, `serve`, `send`, `demo` and `audit`: running a site.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Subcommand};

use pacs_broker::{audit, demo, federation, node::Node, pseudonym::SiteKeys};

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Write a DEVELOPMENT federation CA and one certificate + key per site.
    Dev {
        /// Output folder.
        #[arg(long, default_value = "certs-dev")]
        out: PathBuf,
        /// Comma-separated site ids.
        #[arg(long, value_delimiter = ',', default_value = "hospital-a,hospital-b,telerad-c")]
        sites: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Write a new site secret key file (mode 0600) for tokens, UIDs and the vault.
    New {
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The node configuration file.
    #[arg(long)]
    pub config: PathBuf,
}

#[derive(Debug, Args)]
pub struct SendArgs {
    /// The node configuration file.
    #[arg(long)]
    pub config: PathBuf,
    /// Agreement id.
    #[arg(long)]
    pub agreement: String,
    /// Flow name within the agreement.
    #[arg(long)]
    pub flow: String,
    /// Purpose of use (default: the flow's first purpose).
    #[arg(long)]
    pub purpose: Option<String>,
    /// DICOM files or folders (recursive).
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the demo's sites here (default: a new temporary folder, left in place).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Send this folder's DICOM files instead of the generated CT study.
    #[arg(long)]
    pub study: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verify the hash chain of a node's audit log.
    Verify {
        /// The node configuration file.
        #[arg(long)]
        config: PathBuf,
    },
}

pub fn certs(cmd: CertsCommand) -> anyhow::Result<i32> {
    match cmd {
        CertsCommand::Dev { out, sites } => {
            let fed = federation::pki::generate_dev_federation(&out, &sites)?;
            println!("wrote development federation CA {}", fed.ca_cert.display());
            for (site, cert, key) in fed.sites {
                println!("  site {site}: {} + {}", cert.display(), key.display());
            }
            println!("These certificates are for development only (see {}/README.md).", out.display());
            Ok(0)
        }
    }
}

pub fn keys(cmd: KeysCommand) -> anyhow::Result<i32> {
    match cmd {
        KeysCommand::New { out } => {
            SiteKeys::generate().write_new(&out)?;
            println!("wrote site key file {} (mode 0600). Back it up apart from the data.", out.display());
            Ok(0)
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

pub fn serve(args: ServeArgs) -> anyhow::Result<i32> {
    let node = Arc::new(Node::open_config(&args.config)?);
    let rt = runtime()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(&node.config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", node.config.listen))?;
        println!(
            "site {} serving on {} (mutual TLS 1.3); Ctrl-C to stop",
            node.site_id(),
            listener.local_addr()?
        );
        node.serve(listener, async {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("shutting down");
        })
        .await?;
        Ok(0)
    })
}

pub fn send(args: SendArgs) -> anyhow::Result<i32> {
    let node = Node::open_config(&args.config)?;
    let rt = runtime()?;
    let report = rt.block_on(node.send(
        &args.agreement,
        &args.flow,
        args.purpose.as_deref(),
        &args.inputs,
    ))?;
    for s in &report.studies {
        println!(
            "sent study {}: {} instances ({} transferred, {} already held by the receiver, {} bytes)",
            s.study_token, s.instances, s.instances_sent, s.already_held, s.bytes_sent
        );
    }
    for (p, why) in &report.quarantined {
        println!("quarantined {}: {why}", p.display());
    }
    for (p, why) in &report.failed {
        println!("failed {}: {why}", p.display());
    }
    Ok(if report.failed.is_empty() && report.quarantined.is_empty() { 0 } else { 2 })
}

pub fn demo(args: DemoArgs) -> anyhow::Result<i32> {
    let rt = runtime()?;
    let out = rt.block_on(demo::run(args.data_dir, args.study))?;
    let before = dicom_object::open_file(&out.original)
        .with_context(|| format!("cannot re-read {}", out.original.display()))?;
    let after = dicom_object::open_file(&out.received)
        .with_context(|| format!("cannot read the received file {}", out.received.display()))?;
    let s = &out.report.studies[0];
    println!(
        "{} sent study {} ({} instances, {} bytes) to {} under flow {:?}; signed receipt verified.\n",
        demo::SENDER,
        s.study_token,
        s.instances,
        s.bytes_sent,
        demo::RECEIVER,
        demo::FLOW
    );
    println!("Identifying attributes, as sent by {} and as stored by {}:\n", demo::SENDER, demo::RECEIVER);
    println!("{:<26} {:<52} {}", "attribute", "before (hospital-a PACS)", "after (telerad-c inbox)");
    println!("{}", "-".repeat(120));
    for (tag, name) in demo::REPORT_ATTRIBUTES {
        println!(
            "{:<26} {:<52} {}",
            name,
            demo::show(&before, *tag),
            demo::show(&after, *tag)
        );
    }
    for (p, why) in out.report.quarantined.iter().chain(&out.report.failed) {
        println!("not sent: {} ({why})", p.display());
    }
    println!("\nDemo data: {}", out.base.display());
    println!("Received DICOM files: {}", out.inbox.display());
    for c in &out.configs {
        println!("Start this site by hand: pacs-broker serve --config {}", c.display());
    }
    Ok(0)
}

pub fn audit(cmd: AuditCommand) -> anyhow::Result<i32> {
    match cmd {
        AuditCommand::Verify { config } => {
            let cfg = pacs_broker::config::NodeConfig::load(&config)?;
            let path = cfg.data_dir.join("audit.log");
            match audit::verify(&path) {
                Ok(v) => {
                    println!("audit log {} verified: {} entries, head {}", path.display(), v.entries, v.last_hash);
                    Ok(0)
                }
                Err(e) => {
                    eprintln!("audit log FAILED verification: {e}");
                    Ok(3)
                }
            }
        }
    }
}
