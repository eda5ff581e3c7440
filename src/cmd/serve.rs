//! `serve`: the daemon until SIGTERM/SIGINT, then a graceful drain.

use std::path::PathBuf;

use super::CommandError;
use crate::app::App;
use crate::config::{config_path, Settings};
use crate::store::StoreLock;

/// Loads the config, builds the app and serves until stopped.
pub async fn run(config: Option<PathBuf>) -> Result<(), CommandError> {
    let path = config_path(config);
    let settings = Settings::load(&path)?;
    for provider in &settings.providers {
        if let Some(missing) = provider.missing_outbound_credentials() {
            tracing::warn!(provider = provider.id, "poller off: {missing} is not set");
        }
        if let Some(note) = provider.fees_note() {
            tracing::warn!(provider = provider.id, "fees: {note}");
        }
    }
    if settings.admin.admin_token.is_none() {
        tracing::warn!(
            env = settings.admin.admin_token_env,
            "admin API closed: the admin token variable is not set"
        );
    }
    // Before anything else touches a SQLite store: a second daemon must not start at all.
    // Several instances share a PostgreSQL store (what one instance at a time must do is
    // leased in the database).
    let lock = if settings.store.backend.is_sqlite() {
        Some(
            StoreLock::acquire(&settings.store.path)
                .map_err(|err| CommandError::Runtime(anyhow::anyhow!(err)))?,
        )
    } else {
        None
    };
    let app = App::build(settings).await?;
    tracing::info!(
        port = app.port(),
        config = %path.display(),
        store = %app.state().store.describe(),
        "cashout-recon serving"
    );
    app.run_until_stopped().await?;
    drop(lock);
    tracing::info!("stopped cleanly");
    Ok(())
}
