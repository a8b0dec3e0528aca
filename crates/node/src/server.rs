//! The node server (being assembled).

use anyhow::Result;

use crate::config::Config;

/// Runs a node until interrupted.
pub async fn serve(config: Config) -> Result<()> {
    anyhow::bail!(
        "propd serve is not available yet (config was valid: node {})",
        config.node_id
    )
}
