//! `pacs-broker dsa`: the privacy officer's tools for data sharing agreements (issue #5).

use clap::Args;

/// Check, explain, compare, sign and verify data sharing agreements.
#[derive(Debug, Args)]
pub struct DsaArgs {}

pub fn run(_args: DsaArgs) -> anyhow::Result<i32> {
    anyhow::bail!("not built yet")
}
