//! `pacs-broker keys rotate` and `pacs-broker vault shred`: front ends of `custody`.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use pacs_broker::custody::{self, CustodyError, VaultOpen};
use pacs_broker::node::{Node, NodeError};
use pacs_broker::store::StoreError;

#[derive(Debug, Subcommand)]
pub enum VaultCommand {
    /// Crypto-shred an ended agreement whose retention has passed: destroy its vault records
    /// and its token secret, so its tokens can never be reversed again (audited).
    Shred(ShredArgs),
}

#[derive(Debug, Args)]
pub struct ShredArgs {
    /// The node configuration file.
    #[arg(long)]
    pub config: PathBuf,
    /// The agreement to shred.
    #[arg(long)]
    pub agreement: String,
}

pub fn vault(cmd: VaultCommand) -> anyhow::Result<i32> {
    let VaultCommand::Shred(args) = cmd;
    let node = Node::open_config(&args.config)?;
    let actor = pacs_broker::audit::local_user();
    let result = custody::shred(
        &node.agreements(),
        &args.agreement,
        &node.keys,
        || {
            node.vault().map_err(|e| match e {
                NodeError::Store(StoreError::InUse(_)) => VaultOpen::InUse,
                e => VaultOpen::Failed(e.to_string()),
            })
        },
        &node.audit,
        &actor,
        time::OffsetDateTime::now_utc(),
    );
    match result {
        Ok(s) if s.by_running_node => {
            println!(
                "agreement `{}`: its token secret is destroyed; from now on none of its tokens is \
                 reversed or issued.",
                args.agreement
            );
            match wait_for_running_node(&node, &args.agreement) {
                Some(outcome) => println!("The running node that holds the vault: {outcome}."),
                None => println!(
                    "The running node that holds the vault deletes its records at its next \
                     housekeeping round (within seconds); `audit` shows it (`vault-shred` by node)."
                ),
            }
            println!("(recorded in the audit log under {actor})");
            Ok(0)
        }
        Ok(s) => {
            println!(
                "agreement `{}` shredded: {} vault records destroyed.",
                args.agreement, s.records
            );
            if s.legacy {
                println!(
                    "note: this agreement's tokens were made under the site token key (it predates \
                     per-agreement secrets), which stays: its vault is gone, but a token can still be \
                     recomputed from a guessed original value. See docs/keys.md."
                );
            } else {
                println!("Its token secret is destroyed: its tokens can never be reversed again.");
            }
            println!("(recorded in the audit log under {actor})");
            Ok(0)
        }
        Err(CustodyError::Refused(r)) => {
            eprintln!("error: refused: {r}");
            Ok(3)
        }
        Err(e) => Err(e.into()),
    }
}

/// The running node's `vault-shred` entry completing the shred of `agreement`, awaited for a
/// few seconds: its outcome.
fn wait_for_running_node(node: &Node, agreement: &str) -> Option<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while std::time::Instant::now() < deadline {
        let done = pacs_broker::audit::read_entries(node.audit.path())
            .ok()?
            .into_iter()
            .rev()
            .find(|e| {
                e.event.action == "vault-shred"
                    && e.event.actor == "node"
                    && e.event.agreement == agreement
            });
        if let Some(e) = done {
            return Some(e.event.outcome);
        }
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    None
}

/// `pacs-broker keys retire --config node.toml`: exit 0 (done, even with nothing to retire), 3
/// (refused: something could not be checked; nothing removed).
pub fn retire(config: &std::path::Path) -> anyhow::Result<i32> {
    let node = Node::open_config(config)?;
    let actor = pacs_broker::audit::local_user();
    let r = custody::retire(
        &node.keys,
        &node.config.data_dir,
        || node.vault().map_err(|e| e.to_string()),
        &node.audit,
        &actor,
    );
    match r {
        Ok(r) => {
            if r.removed.is_empty() {
                println!(
                    "no data-encryption key to retire ({} files scanned).",
                    r.files_scanned
                );
            } else {
                println!(
                    "retired {} data-encryption keys nothing is sealed under any more: {} ({} files scanned).",
                    r.removed.len(),
                    r.removed.join(", "),
                    r.files_scanned
                );
                println!(
                    "Backups of the data folder taken before the last `keys rotate` need them: keep \
                     the key file backed up with those backups (docs/keys.md)."
                );
            }
            for (id, n) in &r.kept {
                println!("kept `{id}`: {n} files or vault records are still sealed under it (run `keys rotate` to re-seal them).");
            }
            println!("(recorded in the audit log under {actor})");
            Ok(0)
        }
        Err(CustodyError::Retire(why)) => {
            eprintln!("error: refused: {why}");
            Ok(3)
        }
        Err(e) => Err(e.into()),
    }
}

/// `pacs-broker keys rotate --config node.toml`.
pub fn rotate(config: &std::path::Path) -> anyhow::Result<i32> {
    let node = Node::open_config(config)?;
    let vault = node.vault().map_err(|e| e.to_string());
    let known = custody::known_agreements(&node.agreements(), vault.as_deref().ok());
    let actor = pacs_broker::audit::local_user();
    let r = custody::rotate(
        &node.keys,
        &node.config.data_dir,
        &known,
        &node.at_rest(),
        || vault.clone(),
        &node.audit,
        &actor,
    )?;
    if r.upgraded_from_v1 {
        println!(
            "key file {} upgraded to v2 ({} agreements kept as legacy: their tokens stay as they are)",
            node.config.key_file.display(),
            known.len()
        );
    }
    println!(
        "new data-encryption key `{}` is current; {} files re-sealed under it",
        r.new_key, r.files
    );
    match &r.vault_records {
        Ok(n) => println!("{n} vault records re-sealed"),
        Err(e) => println!(
            "vault not re-sealed now ({e}); its records stay readable under their old keys. Run \
             `keys rotate` again while the node is stopped to re-seal them."
        ),
    }
    println!(
        "Old data keys stay in the key file (files a running node wrote meanwhile may use them). \
         The token key is unchanged: tokens stay stable."
    );
    if r.failed > 0 {
        eprintln!(
            "warning: {} files could not be re-sealed (see the log lines above); they keep their old key",
            r.failed
        );
        return Ok(4);
    }
    Ok(0)
}
