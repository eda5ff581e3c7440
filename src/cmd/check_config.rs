//! `check-config`: validates the config and prints each provider, secrets masked.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::CommandError;
use crate::config::{config_path, Settings, StoreBackend, StoreSettings};

/// Whether files can be created in `dir` (or, when it does not exist yet, in the nearest
/// existing directory above it, where it would be created).
fn check_writable(key: &str, dir: &Path) -> Result<(), CommandError> {
    let mut existing = dir;
    while !existing.exists() {
        match existing.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => existing = parent,
            _ => {
                existing = Path::new(".");
                break;
            }
        }
    }
    tempfile::Builder::new()
        .prefix(".cashout-recon-check")
        .tempfile_in(existing)
        .map(drop)
        .map_err(|err| {
            CommandError::Config(format!(
                "{key}: cannot create files in {}: {err}",
                existing.display()
            ))
        })
}

/// The store's backend and where it is: the SQLite file (locked by one `serve`), or the
/// PostgreSQL database (credentials never shown) and its pool.
fn describe_store(store: &StoreSettings) -> String {
    match &store.backend {
        StoreBackend::Sqlite => format!("sqlite {}", store.path.display()),
        StoreBackend::Postgres(postgres) => format!(
            "postgres {} (from ${}, pool {}, shared by every instance; {})",
            postgres.describe(),
            postgres.url_env,
            postgres.max_connections,
            postgres.describe_tls()
        ),
    }
}

/// `"400d"` for whole days (humantime would print months of 30.44 days), else exact.
fn whole_days_or_exact(duration: std::time::Duration) -> String {
    const DAY: u64 = 86_400;
    if duration.subsec_nanos() == 0 && duration.as_secs() % DAY == 0 {
        format!("{}d", duration.as_secs() / DAY)
    } else {
        humantime::format_duration(duration).to_string()
    }
}

/// Prints the validated config or fails with exit 2 naming the key. A closed stdout
/// (`check-config | head -1`) ends the output quietly.
pub fn run(config: Option<PathBuf>) -> Result<(), CommandError> {
    let path = config_path(config);
    let settings = Settings::load(&path)?;
    if settings.store.backend.is_sqlite() {
        let store_dir = settings
            .store
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        check_writable("store.path", store_dir)?;
    }
    check_writable("reports.dir", &settings.reports.dir)?;
    if let Some(dir) = &settings.retention.archive_dir {
        check_writable("store.archive_dir", dir)?;
    }

    let mut lines = vec![format!("config {} is valid", path.display())];
    lines.push(format!(
        "listen {}  store {}  max body {} bytes  read timeout {}",
        settings.server.listen,
        describe_store(&settings.store),
        settings.server.max_body_bytes,
        humantime::format_duration(settings.server.read_timeout)
    ));
    lines.push(format!(
        "raw bodies kept {}  archive {}",
        settings
            .retention
            .retain_raw_bodies
            .map_or("forever".to_string(), whole_days_or_exact),
        settings
            .retention
            .archive_dir
            .as_ref()
            .map_or("none".to_string(), |dir| dir.display().to_string())
    ));
    let token = |env: &str, set: bool| {
        if set {
            "set"
        } else if settings.admin.set_but_empty.iter().any(|name| name == env) {
            "SET BUT EMPTY (counts as not set: API closed)"
        } else {
            "NOT SET (API closed)"
        }
    };
    lines.push(format!(
        "admin token {}: {}  reports token {}: {}",
        settings.admin.admin_token_env,
        token(
            &settings.admin.admin_token_env,
            settings.admin.admin_token.is_some()
        ),
        settings.admin.reports_token_env,
        token(
            &settings.admin.reports_token_env,
            settings.admin.reports_token.is_some()
        )
    ));
    lines.push(format!(
        "reports {} ({} at {})",
        settings.reports.dir.display(),
        settings.reports.timezone,
        settings.reports.daily_at.format("%H:%M")
    ));
    lines.extend(settings.alerts.describe());
    for provider in &settings.providers {
        lines.extend(provider.describe());
    }
    let mut stdout = std::io::stdout().lock();
    for line in lines {
        match writeln!(stdout, "{line}") {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(err) => {
                return Err(CommandError::Runtime(anyhow::anyhow!(
                    "cannot write to stdout: {err}"
                )))
            }
        }
    }
    Ok(())
}
