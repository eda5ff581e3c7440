//! `check-config`: validates the config and prints each provider, secrets masked.

use std::path::PathBuf;

use super::CommandError;
use crate::config::{config_path, Settings};

/// Prints the validated config or fails with exit 2 naming the key.
pub fn run(config: Option<PathBuf>) -> Result<(), CommandError> {
    let path = config_path(config);
    let settings = Settings::load(&path)?;
    println!("config {} is valid", path.display());
    println!(
        "listen {}  store {}  max body {} bytes",
        settings.server.listen,
        settings.store.path.display(),
        settings.server.max_body_bytes
    );
    let token = |set: bool| if set { "set" } else { "NOT SET (API closed)" };
    println!(
        "admin token {}: {}  reports token {}: {}",
        settings.admin.admin_token_env,
        token(settings.admin.admin_token.is_some()),
        settings.admin.reports_token_env,
        token(settings.admin.reports_token.is_some())
    );
    println!(
        "reports {} ({} at {})",
        settings.reports.dir.display(),
        settings.reports.timezone,
        settings.reports.daily_at.format("%H:%M")
    );
    for line in settings.alerts.describe() {
        println!("{line}");
    }
    for provider in &settings.providers {
        for line in provider.describe() {
            println!("{line}");
        }
    }
    Ok(())
}
