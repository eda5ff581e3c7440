//! `copy-store --to postgres`: copies the SQLite book into an empty PostgreSQL database,
//! verified by per-table counts and checksums (SPEC §1).

use std::path::PathBuf;

use super::cashouts::load_settings;
use super::CommandError;
use crate::config::{Environment, ProcessEnvironment};
use crate::store::postgres::copy::{copy_sqlite_book, CopyError};
use crate::store::postgres::{parse_target, PgOptions, PgStore};
use crate::store::StoreLock;

/// Where `copy-store` copies to.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Postgres,
}

/// Arguments of `copy-store`.
#[derive(clap::Args, Debug)]
pub struct CopyStoreArgs {
    /// The backend to copy the book into.
    #[arg(long, value_enum)]
    pub to: Target,
    /// Config file (default: $CASHOUT_RECON_CONFIG, then ./config.toml); its
    /// `store.path` is the SQLite book copied.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// Copies, verifies and prints each table's count and checksum.
pub async fn run(args: CopyStoreArgs) -> Result<(), CommandError> {
    let Target::Postgres = args.to;
    let settings = load_settings(args.config)?;
    let url_env = &settings.postgres_url_env;
    let url = ProcessEnvironment
        .var(url_env)
        .filter(|url| !url.trim().is_empty())
        .ok_or_else(|| {
            CommandError::Config(format!(
                "copy-store --to postgres: {url_env} (store.url_env) is not set (the PostgreSQL connection URL)"
            ))
        })?;
    let summary = copy(
        &settings.store.path,
        &url,
        settings.postgres_ca_file.as_deref(),
        url_env,
    )
    .await?;
    for table in &summary {
        println!(
            "{:<24} {:>10} rows  sha256 {}",
            table.table, table.rows, table.sha256
        );
    }
    let rows: u64 = summary.iter().map(|t| t.rows).sum();
    println!(
        "copy-store: {rows} rows in {} tables copied from {} and verified",
        summary.len(),
        settings.store.path.display()
    );
    Ok(())
}

/// Holds the SQLite store's lock (no `serve` writes meanwhile) and copies. The
/// connections honour the URL's `sslmode`, trusting the public roots and `ca_file`
/// (`store.ca_file`) as the daemon's do.
pub async fn copy(
    sqlite_path: &std::path::Path,
    url: &str,
    ca_file: Option<&std::path::Path>,
    url_env: &str,
) -> Result<Vec<crate::store::postgres::copy::CopiedTable>, CommandError> {
    if !sqlite_path.is_file() {
        return Err(CommandError::Config(format!(
            "store.path {} does not exist: nothing to copy",
            sqlite_path.display()
        )));
    }
    let _lock = StoreLock::acquire(sqlite_path)
        .map_err(|err| CommandError::Runtime(anyhow::Error::new(err)))?;
    let postgres = parse_target(url, ca_file)
        .and_then(|target| PgStore::from_target(target, PgOptions::default()))
        .map_err(|err| CommandError::Config(format!("{url_env}: {err}")))?;
    let result = copy_sqlite_book(sqlite_path, &postgres).await;
    postgres.close();
    result.map_err(|err| match err {
        CopyError::NotEmpty { .. } => CommandError::Config(err.to_string()),
        err => CommandError::Runtime(anyhow::Error::new(err).context("copy-store")),
    })
}
