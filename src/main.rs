//! The `cashout-recon` binary: parse the command line, run the command, map the exit code.

use std::io::Write;

use clap::Parser;

use cashout_recon::cmd::{self, Cli};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    // Commands that print a summary for people keep library logs to warnings.
    let default_level = match cli.command {
        // The demo tampers with signatures and raises alerts on purpose, then summarises
        // both itself: their log lines would only bury the summary (RUST_LOG shows them).
        cmd::Command::Demo(_) => {
            "warn,cashout_recon::alert=off,cashout_recon::http::webhooks=off,tracing_actix_web=off"
        }
        cmd::Command::Reconcile { .. }
        | cmd::Command::BenchIngest(_)
        | cmd::Command::BenchRecon(_)
        | cmd::Command::BenchRecovery(_)
        | cmd::Command::Cashouts(_)
        | cmd::Command::Cashout(_) => "warn",
        // Its alert pass raises thousands of alerts on purpose: their log lines are noise.
        cmd::Command::BenchConsole(_) => "warn,cashout_recon::alert=off,tracing_actix_web=off",
        _ => "info",
    };
    cashout_recon::telemetry::init_with_default(default_level);
    if let Err(err) = cmd::run(cli).await {
        // Not `eprintln!`: it panics when stderr fails (a full disk), losing the exit code.
        let _ = writeln!(std::io::stderr(), "cashout-recon: {err}");
        std::process::exit(err.exit_code());
    }
}
