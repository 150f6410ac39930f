//! `pacs-broker deid`: de-identify files or folders without a network (issue #4).

use clap::Args;

/// De-identify DICOM files or folders to an output folder.
#[derive(Debug, Args)]
pub struct DeidArgs {}

pub fn run(_args: DeidArgs) -> anyhow::Result<i32> {
    anyhow::bail!("not built yet")
}
