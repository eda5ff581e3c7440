//! The command line (SPEC §1): one module per command; exit codes 0, 1 runtime, 2 usage/config.

pub mod bench_console;
pub mod bench_ingest;
pub mod bench_recon;
pub mod bench_recovery;
pub mod cashout;
pub mod cashouts;
pub mod check_config;
pub mod copy_store;
pub mod demo;
pub mod import_ledger;
pub mod poll;
pub mod reconcile;
pub mod serve;
pub mod simulate;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// cashout-recon: verified webhooks, recovery polling and reconciliation of cash-outs.
#[derive(Parser, Debug)]
#[command(name = "cashout-recon", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon: HTTP server and scheduler.
    Serve {
        /// Config file (default: $CASHOUT_RECON_CONFIG, then ./config.toml).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Validate the config and print each provider, secrets masked.
    CheckConfig {
        /// Config file (default: $CASHOUT_RECON_CONFIG, then ./config.toml).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// The whole job against five simulated providers; exits 0 only if the book matches.
    Demo(demo::DemoArgs),
    /// One poll cycle of a provider now; prints what it recovered.
    Poll {
        /// The provider's id in the config.
        #[arg(long)]
        provider: String,
        /// Config file (default: $CASHOUT_RECON_CONFIG, then ./config.toml).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Reconcile one business date in full now and write its CSV and summary.
    Reconcile {
        /// The business date, YYYY-MM-DD, in reports.timezone.
        #[arg(long)]
        date: String,
        /// Config file (default: $CASHOUT_RECON_CONFIG, then ./config.toml).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Measure reconciliation, the daily CSV and import-ledger at a million cash-outs.
    BenchRecon(bench_recon::BenchReconArgs),
    /// Measure the ops console's page render times with a million cash-outs.
    BenchConsole(bench_console::BenchConsoleArgs),
    /// Measure how fast polling recovers cash-outs whose webhooks were all lost.
    BenchRecovery(bench_recovery::BenchRecoveryArgs),
    /// Measure webhook ingestion against a no-op baseline on an in-process daemon.
    BenchIngest(bench_ingest::BenchIngestArgs),
    /// Register a CSV of expected cash-outs (same fields and rules as `POST /api/v1/ledger`);
    /// any bad row imports nothing (exit 2); idempotent.
    ImportLedger(import_ledger::ImportLedgerArgs),
    /// A table of cash-outs, newest first, read from the store read-only (works beside `serve`).
    Cashouts(cashouts::CashoutsArgs),
    /// One cash-out and its timeline, read from the store read-only.
    Cashout(cashout::CashoutArgs),
    /// Copy the SQLite book into an empty PostgreSQL database (the URL in the variable `store.url_env` names),
    /// verified by per-table counts and checksums; holds the store lock (stop `serve` first).
    CopyStore(copy_store::CopyStoreArgs),
    /// Run one provider simulator standalone: its API, plus signed webhooks to --target.
    Simulate(simulate::SimulateArgs),
}

/// A command's failure, with the exit code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// Bad usage or configuration: exit 2.
    #[error("{0}")]
    Config(String),
    /// Anything that went wrong while running: exit 1.
    #[error("{0:#}")]
    Runtime(anyhow::Error),
}

impl CommandError {
    /// The process exit code.
    pub fn exit_code(&self) -> i32 {
        match self {
            CommandError::Config(_) => 2,
            CommandError::Runtime(_) => 1,
        }
    }
}

impl From<crate::config::ConfigError> for CommandError {
    fn from(err: crate::config::ConfigError) -> Self {
        CommandError::Config(err.to_string())
    }
}

impl From<anyhow::Error> for CommandError {
    fn from(err: anyhow::Error) -> Self {
        CommandError::Runtime(err)
    }
}

/// Runs the parsed command.
pub async fn run(cli: Cli) -> Result<(), CommandError> {
    match cli.command {
        Command::Serve { config } => serve::run(config).await,
        Command::CheckConfig { config } => check_config::run(config),
        Command::Demo(args) => demo::run(args).await,
        Command::Poll { provider, config } => poll::run(provider, config).await,
        Command::Reconcile { date, config } => reconcile::run(date, config).await,
        Command::BenchRecon(args) => bench_recon::run(args).await,
        Command::BenchConsole(args) => bench_console::run(args).await,
        Command::BenchRecovery(args) => bench_recovery::run(args).await,
        Command::BenchIngest(args) => bench_ingest::run(args).await,
        Command::Simulate(args) => simulate::run(args).await,
        Command::ImportLedger(args) => import_ledger::run(args).await,
        Command::Cashouts(args) => cashouts::run(args).await,
        Command::Cashout(args) => cashout::run(args).await,
        Command::CopyStore(args) => copy_store::run(args).await,
    }
}
