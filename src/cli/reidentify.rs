//! `pacs-broker reidentify`: a person asks for the original value behind a token, at the origin.

use std::path::PathBuf;

use clap::Args;

use pacs_broker::node::Node;

#[derive(Debug, Args)]
pub struct ReidentifyArgs {
    /// The node configuration file (of the origin site).
    #[arg(long)]
    pub config: PathBuf,
    /// Agreement id the token was issued under.
    #[arg(long)]
    pub agreement: String,
    /// The token or `2.25.` UID to resolve.
    #[arg(long)]
    pub token: String,
    /// Your user name, as declared in the node's `[[users]]`.
    #[arg(long)]
    pub user: String,
    /// Why you need the original value (recorded in the audit log).
    #[arg(long, default_value = "")]
    pub justification: String,
    /// Purpose of use (default: the returning flow's first purpose).
    #[arg(long)]
    pub purpose: Option<String>,
}

/// Prints `attribute: original` on success; a refusal exits 3, with the reason on stderr.
pub fn run(args: ReidentifyArgs) -> anyhow::Result<i32> {
    let node = Node::open_config(&args.config)?;
    let req = pacs_broker::reidentify::Request {
        agreement: &args.agreement,
        token: &args.token,
        user: &args.user,
        justification: &args.justification,
        purpose: args.purpose.as_deref(),
    };
    match node.reidentify(&req) {
        Ok(entry) => {
            println!("{}: {}", entry.attribute, entry.original);
            eprintln!(
                "(this disclosure is recorded in the audit log under user {})",
                args.user
            );
            Ok(0)
        }
        Err(pacs_broker::node::NodeError::Reidentify(e)) => {
            eprintln!("error: {e}");
            Ok(3)
        }
        Err(e) => Err(e.into()),
    }
}
