//! Writes a sample ledger CSV for measuring `import-ledger`:
//! `cargo run --release --example sample_ledger -- PATH ROWS [SEED]`.

use std::path::PathBuf;

use cashout_recon::ledger_import::write_sample_ledger_csv;

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = || std::io::Error::other("usage: sample_ledger PATH ROWS [SEED]");
    let path = PathBuf::from(args.next().ok_or_else(usage)?);
    let rows: u64 = args.next().and_then(|n| n.parse().ok()).ok_or_else(usage)?;
    let seed: u64 = args.next().and_then(|n| n.parse().ok()).unwrap_or(1);
    write_sample_ledger_csv(&path, rows, &["fiserv", "simpay", "tupay", "pismo"], seed)?;
    println!("{rows} rows written to {}", path.display());
    Ok(())
}
