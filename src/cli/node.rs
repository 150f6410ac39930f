//! `pacs-broker certs`, `keys`, `serve`, `send`, `demo` and `audit`: running a site.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Subcommand};

use pacs_broker::audit::events::kind;
use pacs_broker::{demo, federation, node::Node, pseudonym::SiteKeys};

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Write a DEVELOPMENT federation CA and one certificate + key per site.
    Dev {
        /// Output folder.
        #[arg(long, default_value = "certs-dev")]
        out: PathBuf,
        /// Comma-separated site ids.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "hospital-a,hospital-b,telerad-c"
        )]
        sites: Vec<String>,
    },
    /// Revoke certificates of the DEVELOPMENT CA: add them to its CRL and write the CRL (PEM).
    /// A real federation CA issues its own CRL; every site points `[tls] crl` at it.
    Revoke {
        /// Folder of the development CA (`ca.pem` and `ca.key`).
        #[arg(long, default_value = "certs-dev")]
        ca_dir: PathBuf,
        /// The CRL file to write (default: `<ca-dir>/crl.pem`). Revocations already in it are kept.
        #[arg(long)]
        crl: Option<PathBuf>,
        /// Days until the CRL's next update.
        #[arg(long, default_value_t = 30)]
        days: u32,
        /// Certificate files (PEM) to revoke; none writes the CRL with what it already lists.
        certs: Vec<PathBuf>,
        /// A node configuration: record the revocation in that site's audit log.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Re-hash every stored instance (blob) and check the index: exits 3 on any mismatch.
    Verify {
        /// The node configuration file.
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Write a new site secret key file (mode 0600) for tokens, UIDs and the vault.
    New {
        #[arg(long)]
        out: PathBuf,
        /// A node configuration: record the new key file in that site's audit log.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Make a new data-encryption key current and re-seal what the node keeps under it, without
    /// stopping the node (the token key stays; see docs/keys.md). Audited.
    Rotate {
        /// The node configuration file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Remove from the key file the old data-encryption keys nothing is sealed under any more
    /// (after `keys rotate`); the current key always stays. Audited.
    Retire {
        /// The node configuration file.
        #[arg(long)]
        config: PathBuf,
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
    /// Slices of the generated CT study.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u16).range(1..=5000))]
    pub slices: u16,
    /// Rows and columns of each generated slice.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u16).range(16..=4096))]
    pub size: u16,
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Verify the audit log: hash chain, the site's signed checkpoints, and the checkpoints of
    /// this site that partners hold. Exit 3 when it fails, naming the entry and line.
    Verify {
        /// The node configuration file.
        #[arg(long)]
        config: PathBuf,
        /// A file of this site's checkpoints as a partner holds them (`audit checkpoints --of
        /// <this site>` run at the partner). Repeatable.
        #[arg(long = "partner-checkpoints")]
        partner_checkpoints: Vec<PathBuf>,
    },
    /// Accounting of disclosures: which studies left, to whom, when, under which agreement,
    /// flow and purpose, in which form, with which receipts. With --party and a time window
    /// and no --patient: the patients whose data went to that party (incident view).
    Report(AuditReportArgs),
    /// Write the audit log to stdout for a SIEM or an IHE ATNA audit repository.
    Export {
        /// The node configuration file.
        #[arg(long)]
        config: PathBuf,
        #[arg(long, value_enum, default_value = "jsonl")]
        format: ExportFormat,
        /// Only entries at or after this time (RFC 3339 or YYYY-MM-DD).
        #[arg(long)]
        since: Option<String>,
    },
    /// The signed checkpoints this site holds of a partner's audit log (JSON lines), for that
    /// partner's `audit verify --partner-checkpoints`.
    Checkpoints {
        /// The node configuration file.
        #[arg(long)]
        config: PathBuf,
        /// The partner's site id.
        #[arg(long)]
        of: String,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ExportFormat {
    /// One JSON object per line, as in the log.
    Jsonl,
    /// RFC 5424 syslog messages, one per line.
    Syslog,
    /// DICOM audit messages (PS3.15 A.5), one XML document per line.
    Dicom,
}

#[derive(Debug, Args)]
pub struct AuditReportArgs {
    /// The node configuration file.
    #[arg(long)]
    pub config: PathBuf,
    /// The local patient id (PatientID) whose disclosures to list.
    #[arg(long)]
    pub patient: Option<String>,
    #[arg(long)]
    pub agreement: Option<String>,
    /// Receiving site id.
    #[arg(long)]
    pub party: Option<String>,
    /// From this time (RFC 3339 or YYYY-MM-DD).
    #[arg(long)]
    pub since: Option<String>,
    /// Until this time (RFC 3339 or YYYY-MM-DD, start of that day).
    #[arg(long)]
    pub until: Option<String>,
    /// JSON for tools instead of text.
    #[arg(long)]
    pub json: bool,
    /// Why you are looking (recorded in the audit log with your user name).
    #[arg(long)]
    pub reason: Option<String>,
}

pub fn certs(cmd: CertsCommand) -> anyhow::Result<i32> {
    match cmd {
        CertsCommand::Dev { out, sites } => {
            let fed = federation::pki::generate_dev_federation(&out, &sites)?;
            println!("wrote development federation CA {}", fed.ca_cert.display());
            for (site, cert, key) in fed.sites {
                println!("  site {site}: {} + {}", cert.display(), key.display());
            }
            println!(
                "These certificates are for development only (see {}/README.md).",
                out.display()
            );
            Ok(0)
        }
        CertsCommand::Revoke {
            ca_dir,
            crl,
            days,
            certs,
            config,
        } => {
            let (code, object) = revoke(ca_dir, crl, days, certs)?;
            if let Some(config) = config {
                let event = super::audit::os_user_event(kind::CERTS_REVOKE, object, "ok".into());
                super::audit::record_admin(&config, event)?;
            }
            Ok(code)
        }
    }
}

/// Writes the CRL; returns the exit code and what was done, for the audit.
fn revoke(
    ca_dir: PathBuf,
    crl: Option<PathBuf>,
    days: u32,
    certs: Vec<PathBuf>,
) -> anyhow::Result<(i32, String)> {
    let out = crl.unwrap_or_else(|| ca_dir.join("crl.pem"));
    let r = federation::crl::revoke_with_dev_ca(
        &ca_dir.join("ca.pem"),
        &ca_dir.join("ca.key"),
        &certs,
        &out,
        days,
    )?;
    println!(
        "wrote CRL {} (number {}, {} revoked certificates, next update in {days} days)",
        r.crl.display(),
        r.crl_number,
        r.serials.len()
    );
    for s in &r.serials {
        println!("  revoked serial {s}");
    }
    println!(
        "Copy it to every site's `[tls] crl` file; running nodes reload it within a second and cut \
         the revoked certificates' connections."
    );
    let object = format!(
        "CRL number {} written with {} revoked certificate(s); serials {}",
        r.crl_number,
        r.serials.len(),
        r.serials.join(" ")
    );
    Ok((0, object))
}

/// `pacs-broker store verify`: every blob re-hashed, every indexed instance present.
pub fn store(cmd: StoreCommand) -> anyhow::Result<i32> {
    let StoreCommand::Verify { config } = cmd;
    let cfg = pacs_broker::config::NodeConfig::load(&config)?;
    let root = cfg.data_dir.join("store");
    if !root.exists() {
        anyhow::bail!(
            "no store at {} (has this node received anything?)",
            root.display()
        );
    }
    let keys = SiteKeys::load(&cfg.key_file)?;
    let at_rest = pacs_broker::store::sealed::AtRest::new(&keys, cfg.storage.encrypt_at_rest);
    let blobs = pacs_broker::store::LocalStore::verify_blobs(&root, &at_rest)?;
    let mut bad = blobs.mismatched.len() + blobs.unreadable.len();
    for (p, why) in &blobs.unreadable {
        println!("UNREADABLE {}: {why}", p.display());
    }
    for p in &blobs.mismatched {
        println!(
            "MISMATCH {}: its bytes do not match its SHA-256 (damaged at rest: the next offer of its study quarantines it and asks for it again)",
            p.display()
        );
    }
    match pacs_broker::store::LocalStore::open_with(&root, at_rest) {
        Ok(store) => {
            if cfg.dicom.as_ref().is_some_and(|d| d.deliver.is_some()) {
                // The sealed blobs are the stored copies (the PACS is the delivery).
                store.enable_pacs_delivery();
            }
            let missing = store.missing_blobs()?;
            for (key, uid) in &missing {
                println!(
                    "MISSING instance {uid} of study {} ({} from site {}): its blob is gone",
                    key.study_token, key.agreement, key.from_site
                );
            }
            bad += missing.len();
        }
        Err(pacs_broker::store::StoreError::InUse(_)) => println!(
            "note: the index is in use by the running node; blobs were checked, index references were not"
        ),
        Err(e) => return Err(e.into()),
    }
    let summary = format!(
        "checked {} blobs and {} inbox copies ({} bytes; {} handed on from the inbox): {}",
        blobs.checked,
        blobs.inbox_checked,
        blobs.bytes,
        blobs.handed_on,
        if bad == 0 {
            "all intact".to_string()
        } else {
            format!("{bad} problems")
        }
    );
    println!("{summary}");
    let outcome = if bad == 0 {
        "ok".into()
    } else {
        format!("failed: {bad} problems")
    };
    let event = super::audit::os_user_event(kind::STORE_VERIFY, summary, outcome);
    super::audit::record_admin(&config, event)?;
    Ok(if bad == 0 { 0 } else { 3 })
}

pub fn keys(cmd: KeysCommand) -> anyhow::Result<i32> {
    match cmd {
        KeysCommand::New { out, config } => {
            SiteKeys::generate().write_new(&out)?;
            println!(
                "wrote site key file {} (mode 0600). Back it up apart from the data.",
                out.display()
            );
            if let Some(config) = config {
                let name = out.file_name().unwrap_or_default().to_string_lossy();
                let object = format!("new site key file {name} written");
                let event = super::audit::os_user_event(kind::KEYS_NEW, object, "ok".into());
                super::audit::record_admin(&config, event)?;
            }
            Ok(0)
        }
        KeysCommand::Rotate { config } => super::custody::rotate(&config),
        KeysCommand::Retire { config } => super::custody::retire(&config),
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
        node.serve(listener, shutdown_signal()).await?;
        println!("site {} stopped", node.site_id());
        Ok(0)
    })
}

/// Completes on Ctrl-C or SIGTERM (what `docker stop` and systemd send).
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async {
                match term.as_mut() {
                    Some(t) => { t.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
    tracing::info!("shutting down: no new connections; in-flight calls finish first");
}

#[derive(Debug, Args)]
pub struct PingArgs {
    /// The node configuration file.
    #[arg(long)]
    pub config: PathBuf,
    /// The partner site to reach (one of the config's peers).
    #[arg(long)]
    pub peer: String,
}

/// Connects to a partner over mutual TLS and shows both identities as each side sees them.
pub fn ping(args: PingArgs) -> anyhow::Result<i32> {
    let node = Node::open_config(&args.config)?;
    let peer = node.config.peers.get(&args.peer).cloned().ok_or_else(|| {
        anyhow::anyhow!(
            "no peer {:?} in {} (add [peers.{}])",
            args.peer,
            args.config.display(),
            args.peer
        )
    })?;
    let rt = runtime()?;
    rt.block_on(async {
        let started = std::time::Instant::now();
        let name = peer.server_name.clone().unwrap_or_else(|| {
            peer.address
                .rsplit_once(':')
                .map(|(h, _)| h.to_string())
                .unwrap_or_default()
        });
        let mut client =
            federation::client::PeerClient::connect(&node.tls, &args.peer, &peer.address, &name)
                .await?;
        let hello = client
            .raw()
            .hello(federation::proto::HelloRequest {})
            .await?
            .into_inner();
        println!(
            "{} at {} answered in {:.1} ms over mutual TLS 1.3: it is {:?} and sees us as {:?}",
            args.peer,
            peer.address,
            started.elapsed().as_secs_f64() * 1000.0,
            hello.receiver_site,
            hello.caller_site
        );
        Ok(if hello.caller_site == node.site_id() {
            0
        } else {
            1
        })
    })
}

pub fn send(args: SendArgs) -> anyhow::Result<i32> {
    // A process of its own: the instance and chunk buffers it frees are reused rather than
    // mapped afresh (a process-wide allocator setting, so not in the shared ingest path).
    pacs_broker::send::reuse_freed_memory();
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
    for h in &report.held_back {
        println!("{} {}: {}", h.kind.describe(), h.input, h.reason);
    }
    for (study, why) in &report.queued {
        println!(
            "queued study {study}: {why}\n  it waits in the outbox; the site's running node \
             (`pacs-broker serve`) retries it with backoff (`pacs-broker outbox` shows it)"
        );
    }
    Ok(send_exit_code(&report))
}

/// Exit codes of `send`, one meaning each: 0 every input was sent; 2 nothing was held back but
/// some studies wait in the outbox for a retry; 3 some inputs were held back (quarantined, not
/// covered by the flow, or failed), whatever happened to the rest; 1 (from `main`) an error
/// stopped the command.
pub const SEND_ALL_SENT: i32 = 0;
pub const SEND_QUEUED: i32 = 2;
pub const SEND_HELD_BACK: i32 = 3;

fn send_exit_code(report: &pacs_broker::node::SendReport) -> i32 {
    if !report.held_back.is_empty() {
        SEND_HELD_BACK
    } else if !report.queued.is_empty() {
        SEND_QUEUED
    } else {
        SEND_ALL_SENT
    }
}

#[derive(Debug, Args)]
pub struct OutboxArgs {
    /// The node configuration file.
    #[arg(long)]
    pub config: PathBuf,
    /// Re-queue FAILED entries and attempt every pending entry now (whatever its backoff),
    /// then list.
    #[arg(long)]
    pub retry: bool,
}

/// Lists the outbox (studies waiting for, or done with, delivery); `--retry` attempts the due ones.
pub fn outbox(args: OutboxArgs) -> anyhow::Result<i32> {
    let node = Node::open_config(&args.config)?;
    if args.retry {
        let requeued = node.outbox().requeue_failed()?;
        if requeued > 0 {
            println!("{requeued} failed studies re-queued");
        }
        let rt = runtime()?;
        let n = rt.block_on(node.drain_outbox(true));
        println!("{n} queued studies delivered");
        // Each delivery is audited as a disclosure; this records who asked for the retry.
        node.audit.record(super::audit::os_user_event(
            kind::OUTBOX_RETRY,
            format!("{requeued} failed studies re-queued, {n} queued studies delivered"),
            "ok".into(),
        ))?;
    }
    let now = pacs_broker::store::outbox::now();
    let entries = node.outbox().entries();
    if entries.is_empty() {
        println!("the outbox is empty");
    }
    let mut pending = 0;
    for (_, e) in &entries {
        let state = match e.state {
            pacs_broker::store::outbox::OutboxState::Pending => {
                pending += 1;
                format!(
                    "pending, attempt {} in {} s",
                    e.attempts + 1,
                    e.next_attempt.saturating_sub(now)
                )
            }
            pacs_broker::store::outbox::OutboxState::Delivered => {
                let (stored, held) = e.delivered.unwrap_or_default();
                format!("delivered ({stored} stored, {held} already held)")
            }
            pacs_broker::store::outbox::OutboxState::Failed => "FAILED".to_string(),
        };
        println!(
            "{} -> {} [{} / {}] study {} ({} instances): {state}{}",
            node.site_id(),
            e.to,
            e.agreement,
            e.flow,
            e.study_token,
            e.instances.len(),
            e.last_error
                .as_deref()
                .map(|x| format!("; last error: {x}"))
                .unwrap_or_default()
        );
    }
    Ok(if pending == 0 { 0 } else { 2 })
}

pub fn demo(args: DemoArgs) -> anyhow::Result<i32> {
    let rt = runtime()?;
    let started = std::time::Instant::now();
    let out = rt.block_on(demo::run(
        args.data_dir,
        args.study,
        args.slices as usize,
        args.size,
    ))?;
    let elapsed = started.elapsed();
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
    println!(
        "Identifying attributes, as sent by {} and as stored by {}:\n",
        demo::SENDER,
        demo::RECEIVER
    );
    println!(
        "{:<26} {:<52} after ({} inbox)",
        "attribute",
        format!("before ({} PACS)", demo::SENDER),
        demo::RECEIVER
    );
    println!("{}", "-".repeat(120));
    for (tag, name) in demo::REPORT_ATTRIBUTES {
        println!(
            "{:<26} {:<52} {}",
            name,
            demo::show(&before, *tag),
            demo::show(&after, *tag)
        );
    }
    for h in &out.report.held_back {
        println!(
            "not sent: {} ({}: {})",
            h.input,
            h.kind.describe(),
            h.reason
        );
    }
    println!(
        "\nSet-up, generation, de-identification and transfer took {:.2} s.",
        elapsed.as_secs_f64()
    );
    println!("Demo data: {}", out.base.display());
    println!("Received DICOM files: {}", out.inbox.display());
    for c in &out.configs {
        println!(
            "Start this site by hand: pacs-broker serve --config {}",
            c.display()
        );
    }
    println!(
        "With both sites running, send a study from a \"modality\" into {}'s DICOM listener \
         (dcmtk); it reaches {} de-identified as it arrives:\n  {}",
        demo::SENDER,
        demo::RECEIVER,
        out.storescu
    );
    Ok(0)
}

pub fn audit(cmd: AuditCommand) -> anyhow::Result<i32> {
    match cmd {
        AuditCommand::Verify {
            config,
            partner_checkpoints,
        } => super::audit::verify(&config, &partner_checkpoints),
        AuditCommand::Report(a) => super::audit::report(a),
        AuditCommand::Export {
            config,
            format,
            since,
        } => super::audit::export(&config, format, since.as_deref()),
        AuditCommand::Checkpoints { config, of } => super::audit::checkpoints(&config, &of),
    }
}
