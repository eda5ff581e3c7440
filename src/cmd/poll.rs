//! `poll --provider ID`: one poll cycle now, printing what it recovered.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

use super::CommandError;
use crate::app::AppState;
use crate::config::{config_path, Settings};
use crate::metrics::Metrics;
use crate::poller::PollError;
use crate::store::Store;

/// Runs one cycle of `provider` against the configured store.
pub async fn run(provider: String, config: Option<PathBuf>) -> Result<(), CommandError> {
    let settings = Settings::load(&config_path(config))?;
    if settings.provider(&provider).is_none() {
        return Err(CommandError::Config(format!(
            "no provider with id {provider:?} in the config"
        )));
    }
    let metrics = Metrics::new();
    let store = Store::connect(&settings.store, metrics.clone())
        .await
        .context("opening the store")?;
    let state = AppState::new(Arc::new(settings), store.clone(), metrics)?;
    let result = state.poller.poll_once(&provider).await;
    store.close().await;
    match result {
        Ok(summary) => {
            println!(
                "provider {provider}: fetched {} updated {} recovered {} errors {}",
                summary.fetched, summary.updated, summary.recovered, summary.errors
            );
            Ok(())
        }
        Err(PollError::Off(id, missing)) => Err(CommandError::Config(format!(
            "the poller of provider {id} is off: {missing} is not set in its [[providers]] entry or environment"
        ))),
        Err(err) => Err(CommandError::Runtime(anyhow::Error::new(err))),
    }
}
