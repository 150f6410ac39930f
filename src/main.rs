//! The `pacs-broker` command line: parses arguments, calls the library, maps errors to exit codes.
#![forbid(unsafe_code)]

mod cli;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "pacs-broker",
    version,
    about = "Federated, agreement-driven de-identified DICOM exchange between hospital sites"
)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `pacs_broker=debug`.
    #[arg(long, global = true, env = "PACS_BROKER_LOG")]
    log: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Certificates for a federation.
    #[command(subcommand)]
    Certs(cli::node::CertsCommand),
    /// Site secret keys.
    #[command(subcommand)]
    Keys(cli::node::KeysCommand),
    /// Run a site node.
    Serve(cli::node::ServeArgs),
    /// De-identify files or folders and send them to a partner under an agreement's flow.
    Send(cli::node::SendArgs),
    /// Studies waiting for delivery (or delivered, or failed) in a node's outbox.
    Outbox(cli::node::OutboxArgs),
    /// Check that a partner node is reachable and who it is (mutual TLS handshake + Hello).
    Ping(cli::node::PingArgs),
    /// Run a two-site federation on this machine and send a study across it.
    Demo(cli::node::DemoArgs),
    /// De-identify DICOM files or folders to an output folder.
    Deid(cli::deid::DeidArgs),
    /// Check, explain, compare, sign and verify data sharing agreements.
    Dsa(cli::dsa::DsaArgs),
    /// Review what a node held back: list, show, release, discard.
    Quarantine(cli::quarantine::QuarantineArgs),
    /// Show the original value behind a token, at the origin, to an authorised user (audited).
    Reidentify(cli::reidentify::ReidentifyArgs),
    /// Send results (reports, KOS, SEG, PDFs...) on studies this site received back to their
    /// origin, which alone re-identifies them.
    Return(cli::returns::ReturnArgs),
    /// The origin-only vault: crypto-shred an ended agreement.
    #[command(subcommand)]
    Vault(cli::custody::VaultCommand),
    /// Audit log tools.
    #[command(subcommand)]
    Audit(cli::node::AuditCommand),
    /// A node's received-instance store.
    #[command(subcommand)]
    Store(cli::node::StoreCommand),
}

fn main() {
    let cli = Cli::parse();
    let default = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(cli.log.as_deref().unwrap_or(default))
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Certs(c) => cli::node::certs(c),
        Command::Keys(c) => cli::node::keys(c),
        Command::Serve(a) => cli::node::serve(a),
        Command::Send(a) => cli::node::send(a),
        Command::Demo(a) => cli::node::demo(a),
        Command::Ping(a) => cli::node::ping(a),
        Command::Outbox(a) => cli::node::outbox(a),
        Command::Deid(a) => cli::deid::run(a),
        Command::Dsa(a) => cli::dsa::run(a),
        Command::Audit(c) => cli::node::audit(c),
        Command::Quarantine(a) => cli::quarantine::run(a),
        Command::Store(c) => cli::node::store(c),
        Command::Reidentify(a) => cli::reidentify::run(a),
        Command::Return(a) => cli::returns::run(a),
        Command::Vault(c) => cli::custody::vault(c),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            // The cause chain, without repeating a cause its parent already quotes.
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !msg.contains(&c) {
                    msg = format!("{msg}: {c}");
                }
            }
            eprintln!("error: {msg}");
            std::process::exit(1);
        }
    }
}
