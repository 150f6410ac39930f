//! The `pacs-broker` command line: parses arguments, calls the library, maps errors to exit codes.
#![forbid(unsafe_code)]

mod cli;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "pacs-broker", version, about = "Federated de-identified DICOM exchange between hospital sites")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// De-identify DICOM files or folders to an output folder.
    Deid(cli::deid::DeidArgs),
    /// Check, explain, compare, sign and verify data sharing agreements.
    Dsa(cli::dsa::DsaArgs),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Deid(a) => cli::deid::run(a),
        Command::Dsa(a) => cli::dsa::run(a),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}
