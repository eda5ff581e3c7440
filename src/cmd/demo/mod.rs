//! `demo`: the whole job on an embedded default — the daemon on a temporary store, five
//! provider simulators on loopback with faults injected, a ledger with discrepancies,
//! polling until settled, reconciliation of the day with its CSV, and a verdict that the
//! daemon's book equals the simulators' ground truth and that exactly the injected
//! discrepancies were flagged.

mod alerts;
mod discrepancies;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde::Serialize;

use super::CommandError;
use crate::app::{App, AppOptions};
use crate::config::Settings;
use crate::providers::ProviderKind;
use crate::sim::{harness, Faults, SimConfig, Simulator};
use crate::store::Store;

/// Arguments of `demo`.
#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    /// Cash-outs to drive, split across the five providers.
    #[arg(long, default_value_t = 500)]
    pub cashouts: usize,
    /// Seed of every random choice (paths, amounts, faults).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Where the run's summary is written.
    #[arg(long, default_value = "demo-out")]
    pub out: PathBuf,
}

/// The admin token of the demo's own daemon (it listens on loopback only).
const DEMO_ADMIN_TOKEN: &str = "demo-admin-token";
/// Poll rounds after the simulators settle before the book is judged.
const MAX_POLL_ROUNDS: usize = 30;
/// How long the demo waits for the book to converge.
const SETTLE_DEADLINE: Duration = Duration::from_secs(45);
/// The providers' `stuck_after` in the demo: the cash-out left in flight is stuck by the
/// time the day is reconciled.
const STUCK_AFTER: Duration = Duration::from_secs(4);
/// Fiserv's `silent_after` in the demo: it falls silent once the simulators settle.
const SILENT_AFTER: Duration = Duration::from_secs(2);

/// The webhook faults every simulator injects.
fn demo_faults(kind: ProviderKind) -> Faults {
    Faults {
        webhook_loss_pct: 30,
        webhook_duplicate_pct: 10,
        reorder: true,
        max_delay_ms: 20,
        // One tampered signature per provider that sends webhooks (the daemon answers 401).
        tamper_every: kind.adapter().sends_webhooks().then_some(40),
        api_5xx_pct: 5,
        api_429_pct: 2,
        api_timeout_pct: 0,
    }
}

/// One provider's line of the summary.
#[derive(Debug, Default, Serialize)]
struct ProviderReport {
    provider: String,
    kind: String,
    cashouts: usize,
    webhooks_sent: usize,
    webhooks_lost: usize,
    webhooks_duplicated: usize,
    webhooks_tampered: usize,
    received: u64,
    accepted: u64,
    duplicates: u64,
    rejected: u64,
    recovered_by_poll: u64,
    poll_errors: u64,
    final_states: BTreeMap<String, usize>,
    matching: usize,
    differences: Vec<String>,
}

/// Runs the demo; exits 0 only when the book equals the ground truth.
pub async fn run(args: DemoArgs) -> Result<(), CommandError> {
    let started = Instant::now();
    if args.cashouts == 0 {
        return Err(CommandError::Config(
            "--cashouts must be at least 1".to_string(),
        ));
    }
    let work_dir = tempfile::tempdir().context("creating a temporary directory")?;
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
    let port = listener
        .local_addr()
        .context("reading the bound port")?
        .port();

    // Five simulators, each sending signed webhooks to the daemon.
    let mut simulators = Vec::new();
    for (index, kind) in crate::sim::simulated_kinds().enumerate() {
        let id = harness::provider_id(kind);
        let mut config = SimConfig::new(kind, args.seed.wrapping_add(index as u64));
        config.faults = demo_faults(kind);
        config.webhook_target = Some(format!("http://127.0.0.1:{port}/webhooks/{id}"));
        let simulator = Simulator::start(config, "127.0.0.1:0")
            .await
            .with_context(|| format!("starting the {kind} simulator"))?;
        simulators.push((id, simulator));
    }

    // The daemon, configured from the simulators.
    let (config, mut env) = harness::daemon_config(
        &simulators,
        port,
        &work_dir.path().join("demo.db"),
        "overlap = \"10m\"\nstatus_batch = 1000\nrequest_timeout = \"5s\"\nmax_retries = 4\nrecheck_completed_every = \"1s\"",
        None,
    );
    let out = std::env::current_dir()
        .context("reading the working directory")?
        .join(&args.out);
    // Reconcile every second, flag a ledger entry the moment its provider has not heard
    // of it, and a cash-out in flight after STUCK_AFTER.
    // Alerts go to the demo's own receiver; Fiserv (the first block) falls silent soon
    // after the simulators settle, with the cash-out left in flight.
    let receiver = alerts::start_receiver().await?;
    let (secret_name, secret) = receiver.env_var();
    env.insert(secret_name, secret);
    let config = format!(
        "{}\n[reconcile]\nmissing_grace = \"0s\"\nevery = \"1s\"\n\n[reports]\ndir = \"{}\"\n\n{}",
        config
            .replace(
                "stuck_after = \"10m\"",
                &format!("stuck_after = \"{}s\"", STUCK_AFTER.as_secs())
            )
            .replacen(
                "silent_after = \"10m\"",
                &format!("silent_after = \"{}s\"", SILENT_AFTER.as_secs()),
                1
            ),
        out.display(),
        receiver.alerts_toml()
    );
    env.insert(
        "CASHOUT_RECON_ADMIN_TOKEN".to_string(),
        DEMO_ADMIN_TOKEN.to_string(),
    );
    let settings = Settings::parse(&config, work_dir.path(), &env)?;
    let options = AppOptions {
        handle_signals: false,
        noop_route: false,
        background_jobs: true,
    };
    let app = App::build_on(settings, options, listener).await?;
    let state = app.state();
    let handle = app.handle();
    let server = tokio::spawn(app.run_until_stopped());

    let per_provider = split(args.cashouts, simulators.len());
    println!(
        "cashout-recon demo: daemon on 127.0.0.1:{port}, {} cash-outs across {} simulated providers (seed {})",
        args.cashouts,
        simulators.len(),
        args.seed
    );
    for ((_, simulator), count) in simulators.iter().zip(&per_provider) {
        simulator.create_cashouts(*count);
    }
    // The platform registers what it meant to pay — with the discrepancies the demo
    // injects — and the providers commit theirs.
    let injected = discrepancies::inject(&state.store, &simulators)
        .await
        .map_err(|err| CommandError::Runtime(anyhow::Error::new(err)))?;
    // Every provider moves its cash-outs to their final states, losing, duplicating,
    // reordering and tampering with webhooks on the way.
    harness::run_all_to_completion(&simulators).await;
    println!(
        "simulators settled after {:.1}s; polling to recover what webhooks missed",
        started.elapsed().as_secs_f64()
    );

    let deadline = Instant::now() + SETTLE_DEADLINE;
    let mut rounds = 0;
    // Every provider is polled in the first round; later rounds poll only the providers
    // whose book still differs (each poll waits out its simulator's throttling, about a
    // second a provider).
    let mut unsettled: Vec<String> = simulators.iter().map(|(id, _)| id.to_string()).collect();
    let mut reports = loop {
        rounds += 1;
        for id in &unsettled {
            if state.poller.off_reason(id).is_some() {
                continue;
            }
            // The previous round's changes must age past status_after before a check.
            if let Err(err) = state.poller.poll_once(id).await {
                tracing::warn!(provider = id, error = %err, "demo poll failed");
            }
        }
        let reports = compare(&state.store, &simulators).await?;
        unsettled = reports
            .iter()
            .filter(|report| !report.differences.is_empty())
            .map(|report| report.provider.clone())
            .collect();
        if unsettled.is_empty() || rounds >= MAX_POLL_ROUNDS || Instant::now() >= deadline {
            break reports;
        }
        tracing::debug!(providers = ?unsettled, "the book still differs; polling again");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let rounds = match rounds {
        1 => "1 poll round".to_string(),
        n => format!("{n} poll rounds"),
    };

    // A cash-out counts as stuck only STUCK_AFTER after it was created.
    let stuck_due = started + STUCK_AFTER + Duration::from_millis(200);
    if let Some(wait) = stuck_due.checked_duration_since(Instant::now()) {
        tokio::time::sleep(wait).await;
    }
    let today =
        crate::report::BusinessDay::containing(chrono::Utc::now(), state.reconciler.timezone());
    let reconciled = state
        .reconciler
        .reconcile_day_now(today.date)
        .await
        .context("reconciling the demo's business day")?;
    let flagged = discrepancies::flagged(&state.store)
        .await
        .map_err(|err| CommandError::Runtime(anyhow::Error::new(err)))?;
    let expected = discrepancies::expected(&injected, &simulators);
    let check = discrepancies::Check::of(&expected, &flagged);

    // Ops hear about it: once Fiserv has been silent for SILENT_AFTER, an alert pass
    // raises what is open and the outbox delivers it (retrying the delivery the receiver
    // fails); then the platform registers the cash-out its ledger lacked, and that alert
    // resolves.
    let settled_at = Instant::now();
    tokio::time::sleep(SILENT_AFTER + Duration::from_millis(300)).await;
    alerts::raise_and_deliver(&state).await?;
    discrepancies::register_unknown(&state.store, &injected, &simulators)
        .await
        .map_err(|err| CommandError::Runtime(anyhow::Error::new(err)))?;
    state
        .reconciler
        .continuous_pass_now()
        .await
        .context("reconciling the fix")?;
    alerts::raise_and_deliver(&state).await?;
    let alert_summary = receiver.summary();
    let alert_check = alerts::judge(&alert_summary);
    tracing::debug!(waited = ?settled_at.elapsed(), "alerts delivered");

    for report in &mut reports {
        let id = report.provider.clone();
        let metrics = &state.metrics;
        report.received = metrics.webhooks_received.with_label_values(&[&id]).get();
        report.accepted = metrics
            .webhooks_outcome
            .with_label_values(&[&id, "accepted"])
            .get();
        report.duplicates = metrics
            .webhooks_outcome
            .with_label_values(&[&id, "duplicate"])
            .get();
        report.rejected = report.received.saturating_sub(
            report.accepted
                + report.duplicates
                + metrics
                    .webhooks_outcome
                    .with_label_values(&[&id, "quarantined"])
                    .get(),
        );
        // Scheduled cycles recover too: the metrics count every cycle's work.
        report.recovered_by_poll = metrics.missed_webhooks.with_label_values(&[&id]).get();
        report.poll_errors = metrics
            .poll_results
            .with_label_values(&[&id, "errors"])
            .get();
    }
    handle.stop(true).await;
    let _ = server.await;
    for (_, simulator) in &simulators {
        simulator.stop().await;
    }

    receiver.stop().await;
    let mut table = render(&reports);
    table.push_str(&check.render(&reconciled));
    table.push_str(&alerts::render(&alert_summary));
    println!("{table}");
    let total: usize = reports.iter().map(|r| r.cashouts).sum();
    let matching: usize = reports.iter().map(|r| r.matching).sum();
    let book_ok = matching == total && reports.iter().all(|r| r.differences.is_empty());
    let verdict = match (book_ok, check.is_exact(), &alert_check) {
        (true, true, Ok(())) => format!(
            "VERDICT: the daemon's book equals the simulators' ground truth ({matching}/{total} cash-outs, {rounds}), reconciliation flagged exactly the {} injected discrepancies, and every alert was delivered signed ({:.1}s)",
            check.expected_count(),
            started.elapsed().as_secs_f64()
        ),
        (false, _, _) => format!(
            "VERDICT: MISMATCH — {matching}/{total} cash-outs agree after {rounds}"
        ),
        (true, false, _) => format!(
            "VERDICT: MISMATCH — the book is right, but reconciliation flagged {} unexpected and missed {} injected discrepancies",
            check.unexpected.len(),
            check.missed.len()
        ),
        (true, true, Err(problem)) => format!("VERDICT: MISMATCH — alerts: {problem}"),
    };
    println!("{verdict}");
    write_summary(&args.out, &reports, &table, &verdict)?;
    if book_ok && check.is_exact() && alert_check.is_ok() {
        Ok(())
    } else {
        for report in &reports {
            for difference in report.differences.iter().take(10) {
                eprintln!("  {}: {difference}", report.provider);
            }
        }
        for (what, list) in [("unexpected", &check.unexpected), ("missed", &check.missed)] {
            for finding in list.iter().take(10) {
                eprintln!("  {what}: {finding}");
            }
        }
        Err(CommandError::Runtime(anyhow::anyhow!(
            "the daemon's book or its reconciliation differs from the ground truth"
        )))
    }
}

fn split(total: usize, parts: usize) -> Vec<usize> {
    (0..parts)
        .map(|i| total / parts + usize::from(i < total % parts))
        .collect()
}

async fn compare(
    store: &Store,
    simulators: &[(&str, Simulator)],
) -> Result<Vec<ProviderReport>, CommandError> {
    let mut reports = Vec::new();
    for (id, simulator) in simulators {
        let truth = simulator.ground_truth();
        let stats = simulator.stats();
        let comparison = harness::compare(store, id, &truth)
            .await
            .map_err(|err| CommandError::Runtime(anyhow::Error::new(err)))?;
        let mut final_states = BTreeMap::new();
        for expected in &truth {
            *final_states
                .entry(expected.status.as_str().to_string())
                .or_default() += 1;
        }
        reports.push(ProviderReport {
            provider: id.to_string(),
            kind: simulator.kind().to_string(),
            cashouts: truth.len(),
            webhooks_sent: stats.webhooks_sent,
            webhooks_lost: stats.webhooks_lost,
            webhooks_duplicated: stats.webhooks_duplicated,
            webhooks_tampered: stats.webhooks_tampered,
            final_states,
            matching: comparison.matching,
            differences: comparison.differences,
            ..ProviderReport::default()
        });
    }
    Ok(reports)
}

fn render(reports: &[ProviderReport]) -> String {
    let mut table = String::new();
    let _ = writeln!(
        table,
        "\n{:<8} {:>8} {:>6} {:>5} {:>5} {:>7} | {:>8} {:>8} {:>5} {:>8} {:>9} | {:>9}  final states",
        "provider", "cashouts", "sent", "lost", "dupl", "tamper", "received", "accepted", "dupl", "rejected", "recovered", "book"
    );
    for r in reports {
        let states: Vec<String> = r
            .final_states
            .iter()
            .map(|(s, n)| format!("{s} {n}"))
            .collect();
        let _ = writeln!(
            table,
            "{:<8} {:>8} {:>6} {:>5} {:>5} {:>7} | {:>8} {:>8} {:>5} {:>8} {:>9} | {:>4}/{:<4}  {}",
            r.provider,
            r.cashouts,
            r.webhooks_sent,
            r.webhooks_lost,
            r.webhooks_duplicated,
            r.webhooks_tampered,
            r.received,
            r.accepted,
            r.duplicates,
            r.rejected,
            r.recovered_by_poll,
            r.matching,
            r.cashouts,
            states.join(", ")
        );
    }
    table
}

fn write_summary(
    out: &PathBuf,
    reports: &[ProviderReport],
    table: &str,
    verdict: &str,
) -> Result<(), CommandError> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let json = serde_json::json!({ "verdict": verdict, "providers": reports });
    let text = serde_json::to_string_pretty(&json).context("encoding the summary")?;
    std::fs::write(out.join("summary.json"), text)
        .with_context(|| format!("writing {}/summary.json", out.display()))?;
    std::fs::write(out.join("summary.txt"), format!("{table}\n{verdict}\n"))
        .with_context(|| format!("writing {}/summary.txt", out.display()))?;
    Ok(())
}
