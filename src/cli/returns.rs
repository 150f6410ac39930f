//! `pacs-broker return`: a partner sends results on studies it received back to their origin.

use std::path::PathBuf;

use clap::Args;

use pacs_broker::node::{Node, ReturnOutcome};

#[derive(Debug, Args)]
pub struct ReturnArgs {
    /// The node configuration file (of the partner site that received the study).
    #[arg(long)]
    pub config: PathBuf,
    /// The agreement the study was received under; its flow must allow returns.
    #[arg(long)]
    pub agreement: String,
    /// Result files or folders (SR, Encapsulated PDF, Secondary Capture, presentation states,
    /// key object selections, segmentations...).
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
}

/// Exit codes: 0 every result went home; 2 some wait in the queue for a retry by the running
/// node; 3 some were refused (here or by the origin); 1 (from `main`) an error stopped it.
pub fn run(args: ReturnArgs) -> anyhow::Result<i32> {
    let node = Node::open_config(&args.config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(node.return_results(&args.agreement, &args.inputs))?;
    let (mut queued, mut refused) = (false, false);
    for (input, outcome) in &report.outcomes {
        match outcome {
            ReturnOutcome::Returned {
                sop_instance_uid,
                origin,
            } => println!(
                "returned {}: result {sop_instance_uid} taken by {origin}",
                input.display()
            ),
            ReturnOutcome::Queued { reason } => {
                queued = true;
                println!(
                    "queued {}: {reason}\n  the site's running node (`pacs-broker serve`) retries it with backoff",
                    input.display()
                );
            }
            ReturnOutcome::Refused { reason } => {
                refused = true;
                println!("refused {}: {reason}", input.display());
            }
        }
    }
    Ok(if refused {
        3
    } else if queued {
        2
    } else {
        0
    })
}
