//! `bench-recon`: reconciliation at scale. A store of a million cash-outs (three events
//! each) and a million ledger entries on one business day with a few thousand injected
//! discrepancies; timed side by side: the full reconcile of that day, its CSV, and a bare
//! SQL full join of ledger and cash-outs exported to CSV (the floor), plus `import-ledger`
//! of a million-row file in a child process. Every injected discrepancy must be found.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::Args;
use serde::Serialize;

use super::CommandError;
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::reconcile::fees::FeeRule;
use crate::reconciler::Reconciler;
use crate::report::BusinessDay;
use crate::store::bench_seed::{self, SeedSpec};
use crate::store::Store;

/// Arguments of `bench-recon`.
#[derive(Args, Debug, Clone)]
pub struct BenchReconArgs {
    /// Cash-outs in the store (split between two providers), and ledger entries.
    #[arg(long, default_value_t = 1_000_000)]
    pub cashouts: u64,
    /// Rows of the ledger file `import-ledger` loads.
    #[arg(long, default_value_t = 1_000_000)]
    pub import_rows: u64,
    /// Keep the store, reports and files in this folder (default: a temporary one).
    #[arg(long)]
    pub keep: Option<std::path::PathBuf>,
}

/// Where the benchmark's files live.
enum Workspace {
    Temp(tempfile::TempDir),
    Kept(std::path::PathBuf),
}

impl Workspace {
    fn path(&self) -> &Path {
        match self {
            Workspace::Temp(dir) => dir.path(),
            Workspace::Kept(path) => path,
        }
    }
}

/// One timed phase.
#[derive(Debug, Serialize)]
struct Phase {
    name: &'static str,
    seconds: f64,
    rows: u64,
    peak_rss_mib: f64,
}

/// Resets this process's peak resident memory (Linux `clear_refs`), so the next reading
/// is the peak of what runs in between.
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_mib_of(pid: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|line| line.starts_with("VmHWM:"))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|kib| kib.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// A bench store's config: `server` (a `[server]` table, or nothing), the store at `db`,
/// reports in `reports`, and the two seeded providers.
pub(super) fn config_text(server: &str, db: &Path, reports: &Path) -> String {
    format!(
        "{server}[store]\npath = \"{}\"\n\n[reports]\ndir = \"{}\"\n\n[reconcile]\nmissing_grace = \"0s\"\n\n\
         [[providers]]\nid = \"fiserv\"\nkind = \"fiserv_pix\"\nbase_url = \"http://127.0.0.1:9\"\n\
         webhook_secrets_env = [\"BENCH_FISERV_SECRET\"]\nstuck_after = \"1s\"\nledger = true\n\n\
         [[providers]]\nid = \"mannco\"\nkind = \"mannco\"\nbase_url = \"http://127.0.0.1:9\"\n\
         stuck_after = \"1s\"\nledger = true\n",
        db.display(),
        reports.display()
    )
}

/// A fresh, empty bench store (`bench.db` in a folder, reports beside it) with its
/// settings, the business day of now and Mannco's fee rule: what the benches seed from.
pub(super) struct BenchBook {
    pub settings: Settings,
    pub db: PathBuf,
    pub now: DateTime<Utc>,
    pub day: BusinessDay,
    pub fee_rule: FeeRule,
}

impl BenchBook {
    /// Creates the store in `dir` with `server` as the config's `[server]` table and `env`
    /// as the environment (`BENCH_FISERV_SECRET` is always set).
    pub(super) async fn create(
        dir: &Path,
        server: &str,
        env: &[(&str, &str)],
    ) -> Result<BenchBook, CommandError> {
        let db = dir.join("bench.db");
        let config = config_text(server, &db, &dir.join("reports"));
        let env: BTreeMap<String, String> = [("BENCH_FISERV_SECRET", "bench-secret")]
            .iter()
            .chain(env)
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        let settings = Settings::parse(&config, dir, &env)?;
        Store::open(&settings.store, Metrics::new())
            .context("creating the store")?
            .close()
            .await;
        let now = Utc::now();
        let day = BusinessDay::containing(now, settings.reports.timezone);
        let fee_rule = settings
            .providers
            .iter()
            .find(|p| p.id == "mannco")
            .and_then(|p| p.fees.rule_for(Some("payoneer")).copied())
            .context("mannco's fee schedule")?;
        Ok(BenchBook {
            settings,
            db,
            now,
            day,
            fee_rule,
        })
    }

    /// What to seed: `cashouts` on the book's day, up to 2 s ago.
    pub(super) fn seed_spec(&self, cashouts: u64) -> SeedSpec {
        SeedSpec {
            cashouts,
            plain_provider: "fiserv".to_string(),
            fee_provider: "mannco".to_string(),
            fee_rule: self.fee_rule,
            start: self.day.start.timestamp_millis(),
            until: (self.now - chrono::Duration::seconds(2)).timestamp_millis(),
        }
    }
}

/// Runs the benchmark and prints its figures.
pub async fn run(args: BenchReconArgs) -> Result<(), CommandError> {
    if args.cashouts < 4000 {
        return Err(CommandError::Config(
            "--cashouts must be at least 4000 (discrepancies are injected every 2000)".into(),
        ));
    }
    let temp = tempfile::tempdir().context("creating a temporary directory")?;
    let work = match &args.keep {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            Workspace::Kept(dir.canonicalize().context("resolving --keep")?)
        }
        None => Workspace::Temp(temp),
    };
    if work.path().join("bench.db").exists() {
        return Err(CommandError::Config(format!(
            "--keep: {} already holds a bench store; pick an empty folder",
            work.path().display()
        )));
    }
    let book = BenchBook::create(work.path(), "", &[]).await?;
    let (day, reports, db) = (book.day, book.settings.reports.dir.clone(), book.db.clone());
    println!(
        "bench-recon: seeding {} cash-outs (3 events each) and their ledger on {}…",
        args.cashouts,
        day.label()
    );
    let seeding = Instant::now();
    let spec = book.seed_spec(args.cashouts);
    let settings = book.settings;
    let seeded = tokio::task::spawn_blocking(move || bench_seed::seed(&db, &spec))
        .await
        .context("seeding task")?
        .context("seeding the store")?;
    let db = work.path().join("bench.db");
    let db_size = std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0);
    println!(
        "seeded in {:.1}s: {} cash-outs, {} events, {} ledger entries, {} injected findings, {:.0} MiB",
        seeding.elapsed().as_secs_f64(),
        seeded.cashouts,
        seeded.events,
        seeded.ledger,
        seeded.expected.len(),
        db_size as f64 / 1048576.0
    );

    let store = Store::open(&settings.store, Metrics::new()).context("opening the store")?;
    let reconciler = Reconciler::new(store.clone(), &settings);
    let mut phases = Vec::new();

    // The floor first, on a cold-ish cache like the others.
    reset_peak();
    let started = Instant::now();
    let floor_db = db.clone();
    let floor_out = work.path().join("full-join.csv");
    let floor_rows =
        tokio::task::spawn_blocking(move || bench_seed::export_full_join(&floor_db, &floor_out))
            .await
            .context("floor task")?
            .context("exporting the full join")?;
    phases.push(Phase {
        name: "floor: SQL full join → CSV",
        seconds: started.elapsed().as_secs_f64(),
        rows: floor_rows,
        peak_rss_mib: peak_mib_of("self"),
    });

    reset_peak();
    let started = Instant::now();
    let pass = reconciler
        .full_pass(day, Utc::now())
        .await
        .context("the full pass")?;
    phases.push(Phase {
        name: "reconcile (full pass of the day)",
        seconds: started.elapsed().as_secs_f64(),
        rows: pass.groups,
        peak_rss_mib: peak_mib_of("self"),
    });

    reset_peak();
    let started = Instant::now();
    let report =
        crate::report::generate(&store, &reports, day, settings.reports.timezone, Utc::now())
            .await
            .context("the day's report")?;
    phases.push(Phase {
        name: "daily CSV + summary",
        seconds: started.elapsed().as_secs_f64(),
        rows: report.summary.rows,
        peak_rss_mib: peak_mib_of("self"),
    });

    // Every injected discrepancy must be open; anything else open is a false finding.
    let flagged = store.open_findings().await.context("listing mismatches")?;
    store.close().await;
    let missed = seeded.expected.difference(&flagged).count();
    let extra = flagged.difference(&seeded.expected).count();

    let import = import_phase(work.path(), args.import_rows).await?;
    phases.extend(import);

    let floor = phases[0].seconds;
    println!(
        "\n{:<36} {:>9} {:>10} {:>10} {:>12}",
        "phase", "seconds", "× floor", "rows", "peak MiB"
    );
    for phase in &phases {
        println!(
            "{:<36} {:>9.2} {:>10.2} {:>10} {:>12.1}",
            phase.name,
            phase.seconds,
            phase.seconds / floor,
            phase.rows,
            phase.peak_rss_mib
        );
    }
    println!(
        "\nfindings: {} injected, {} found, {} missed, {} not injected (opened {}, resolved {})",
        seeded.expected.len(),
        seeded.expected.len() - missed,
        missed,
        extra,
        pass.opened,
        pass.resolved
    );
    let json = serde_json::json!({
        "cashouts": seeded.cashouts,
        "events": seeded.events,
        "ledger": seeded.ledger,
        "injected": seeded.expected.len(),
        "missed": missed,
        "extra": extra,
        "phases": phases,
    });
    println!("{json}");
    if missed > 0 || extra > 0 {
        return Err(CommandError::Runtime(anyhow::anyhow!(
            "reconciliation missed {missed} injected discrepancies and flagged {extra} others"
        )));
    }
    Ok(())
}

/// `import-ledger` of a `rows`-row file into a fresh store, as a child process (the real
/// command) whose peak memory is sampled from `/proc` while it runs.
async fn import_phase(dir: &Path, rows: u64) -> Result<Vec<Phase>, CommandError> {
    if rows == 0 {
        return Ok(Vec::new());
    }
    let file = dir.join("ledger.csv");
    let config = dir.join("import.toml");
    let generate = file.clone();
    tokio::task::spawn_blocking(move || {
        crate::ledger_import::write_sample_ledger_csv(&generate, rows, &["fiserv", "mannco"], 7)
    })
    .await
    .context("ledger file task")?
    .context("writing the ledger file")?;
    std::fs::write(
        &config,
        config_text("", &dir.join("import.db"), &dir.join("import-reports")),
    )
    .context("writing the import config")?;
    let exe = std::env::current_exe().context("finding this binary")?;
    let started = Instant::now();
    let mut child = std::process::Command::new(exe)
        .arg("import-ledger")
        .arg(&file)
        .arg("--config")
        .arg(&config)
        .env("BENCH_FISERV_SECRET", "bench-secret")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting import-ledger")?;
    let pid = child.id().to_string();
    let mut peak: f64 = 0.0;
    let status = loop {
        peak = peak.max(peak_mib_of(&pid));
        if let Some(status) = child.try_wait().context("waiting for import-ledger")? {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let seconds = started.elapsed().as_secs_f64();
    if !status.success() {
        let mut stderr = String::new();
        if let Some(mut pipe) = child.stderr.take() {
            use std::io::Read as _;
            let _ = pipe.read_to_string(&mut stderr);
        }
        return Err(CommandError::Runtime(anyhow::anyhow!(
            "import-ledger failed ({status}): {stderr}"
        )));
    }
    Ok(vec![Phase {
        name: "import-ledger (child process)",
        seconds,
        rows,
        peak_rss_mib: peak,
    }])
}
