//! The `cashout-recon` binary: parse the command line, run the command, map the exit code.

use clap::Parser;

use cashout_recon::cmd::{self, Cli};

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    cashout_recon::telemetry::init();
    if let Err(err) = cmd::run(cli).await {
        eprintln!("cashout-recon: {err}");
        std::process::exit(err.exit_code());
    }
}
