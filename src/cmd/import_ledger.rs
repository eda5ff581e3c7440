//! `import-ledger FILE.csv`: registers a CSV of expected cash-outs, all or nothing.

use std::path::PathBuf;

use anyhow::Context;

use super::CommandError;
use crate::config::{config_path, Settings};
use crate::ledger_import::{import_ledger_csv, ImportError, Progress};

/// Arguments of `import-ledger`.
#[derive(clap::Args, Debug)]
pub struct ImportLedgerArgs {
    /// The ledger CSV: a header row, then `provider,external_id,amount,currency` and
    /// optionally `provider_ref,created_at`, in any column order.
    pub file: PathBuf,
    /// Config file (default: $CASHOUT_RECON_CONFIG, then ./config.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// Imports the file into the configured store; exit 2 (nothing imported) on any bad row.
pub async fn run(args: ImportLedgerArgs) -> Result<(), CommandError> {
    let settings = Settings::load(&config_path(args.config))?;
    if !settings.store.backend.is_sqlite() {
        // The bulk import writes the SQLite book directly; it would not reach PostgreSQL.
        return Err(CommandError::Config(
            "store.backend: import-ledger imports into a SQLite store; on \"postgres\" \
             register expected cash-outs with POST /api/v1/ledger"
                .to_string(),
        ));
    }
    let file = args.file;
    let result = tokio::task::spawn_blocking(move || {
        let mut progress = Progress::on_stderr();
        import_ledger_csv(
            &file,
            &settings.store,
            |id| settings.provider(id).is_some(),
            &mut progress,
        )
    })
    .await
    .context("the import task failed")?;
    match result {
        Ok(summary) => {
            println!("import-ledger: {summary}");
            Ok(())
        }
        Err(err) if err.is_bad_input() => Err(CommandError::Config(err.to_string())),
        Err(ImportError::Store(err)) => Err(CommandError::Runtime(
            anyhow::Error::new(err).context("importing the ledger"),
        )),
        Err(err) => Err(CommandError::Runtime(anyhow::Error::new(err))),
    }
}
