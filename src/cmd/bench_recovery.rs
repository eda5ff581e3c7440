//! `bench-recovery`: how fast polling recovers cash-outs whose webhooks were all lost,
//! against the floor a provider's rate limit sets (cash-outs / `max_rps`), and whether
//! memory stays flat while it does.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;

use super::CommandError;
use crate::app::{App, AppOptions};
use crate::config::Settings;
use crate::providers::ProviderKind;
use crate::sim::{harness, Faults, SimConfig, Simulator};
use crate::store::CashoutFilter;

/// Arguments of `bench-recovery`.
#[derive(Args, Debug, Clone)]
pub struct BenchRecoveryArgs {
    /// In-flight cash-outs whose later webhooks are all lost.
    #[arg(long, default_value_t = 10_000)]
    pub cashouts: usize,
    /// The provider's rate limit (the simulator enforces it; the daemon is configured with it).
    #[arg(long, default_value_t = 250)]
    pub max_rps: u32,
    /// Seed of the simulator.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

/// Resident and peak memory of this process, in KiB (Linux `/proc/self/status`).
fn memory_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|line| line.starts_with(name))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|value| value.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Runs the benchmark and prints its figures.
pub async fn run(args: BenchRecoveryArgs) -> Result<(), CommandError> {
    if args.cashouts == 0 || args.max_rps == 0 {
        return Err(CommandError::Config(
            "--cashouts and --max-rps must be at least 1".to_string(),
        ));
    }
    let work_dir = tempfile::tempdir().context("creating a temporary directory")?;
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
    let port = listener
        .local_addr()
        .context("reading the bound port")?
        .port();

    // A status-only provider (SimPay): each recovery costs exactly one status request.
    let mut sim_config = SimConfig::new(ProviderKind::Simpay, args.seed);
    sim_config.webhook_target = Some(format!("http://127.0.0.1:{port}/webhooks/simpay"));
    sim_config.max_rps = Some(args.max_rps);
    let simulator = Simulator::start(sim_config, "127.0.0.1:0")
        .await
        .context("starting the simulator")?;
    let simulators = [("simpay", simulator.clone())];
    let (config, env) = harness::daemon_config(
        &simulators,
        port,
        &work_dir.path().join("bench.db"),
        &format!("status_batch = {}\nrequest_timeout = \"5s\"", args.cashouts),
        Some("1h"),
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

    // The daemon learns every cash-out from its creation webhook...
    println!(
        "creating {} cash-outs (their creation webhooks reach the daemon)...",
        args.cashouts
    );
    simulator.create_cashouts(args.cashouts);
    simulator.flush().await;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let known = count_in(&state.store, None).await?;
        if known >= args.cashouts {
            break;
        }
        if Instant::now() >= deadline {
            return Err(CommandError::Runtime(anyhow::anyhow!(
                "only {known} creation webhooks arrived"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // ...then every later webhook is lost while the provider finishes them all.
    simulator.set_faults(Faults {
        webhook_loss_pct: 100,
        ..Faults::default()
    });
    simulator.run_to_completion().await;
    simulator.flush().await;
    // Status checks start once the cash-outs are older than status_after.
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let stop_sampling = Arc::new(AtomicBool::new(false));
    let peak_rss = Arc::new(AtomicU64::new(0));
    let sampler = {
        let stop = stop_sampling.clone();
        let peak = peak_rss.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(memory_kib().0, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let (rss_before, _) = memory_kib();
    let api_before = simulator.stats();
    let started = Instant::now();
    let mut cycles = 0;
    let recovered = loop {
        cycles += 1;
        state
            .poller
            .poll_once("simpay")
            .await
            .map_err(|err| CommandError::Runtime(anyhow::Error::new(err)))?;
        let in_flight = count_in(&state.store, Some(crate::state::CashoutStatus::Pending)).await?
            + count_in(&state.store, Some(crate::state::CashoutStatus::Processing)).await?;
        if in_flight == 0 || started.elapsed() > Duration::from_secs(1800) {
            break args.cashouts - in_flight;
        }
    };
    let elapsed = started.elapsed();
    stop_sampling.store(true, Ordering::Relaxed);
    let _ = sampler.await;
    let (rss_after, _) = memory_kib();
    let api_after = simulator.stats();
    let floor = args.cashouts as f64 / f64::from(args.max_rps);
    let seconds = elapsed.as_secs_f64();
    let requests = api_after.api_requests - api_before.api_requests;
    let rate_limited = api_after.api_rate_limited - api_before.api_rate_limited;
    let missed = state
        .metrics
        .missed_webhooks
        .with_label_values(&["simpay"])
        .get();
    println!(
        "\nrecovery of {} in-flight cash-outs, every later webhook lost (SimPay, status only)",
        args.cashouts
    );
    println!(
        "  provider limit        {} req/s  -> floor {:.1} s",
        args.max_rps, floor
    );
    println!(
        "  time to recover all   {seconds:.1} s  ({:.3} x floor) in {cycles} poll cycle(s)",
        seconds / floor
    );
    println!("  recovered             {recovered} (missed_webhook count {missed})");
    println!(
        "  status requests       {requests} ({:.0} req/s), answered 429: {rate_limited}",
        requests as f64 / seconds
    );
    println!(
        "  memory (RSS)          {:.1} MiB before, peak {:.1} MiB during, {:.1} MiB after",
        rss_before as f64 / 1024.0,
        peak_rss.load(Ordering::Relaxed) as f64 / 1024.0,
        rss_after as f64 / 1024.0
    );
    println!(
        "{{\"cashouts\":{},\"max_rps\":{},\"floor_s\":{floor:.2},\"seconds\":{seconds:.2},\"ratio\":{:.3},\"recovered\":{recovered},\"requests\":{requests},\"rate_limited\":{rate_limited},\"rss_before_kib\":{rss_before},\"rss_peak_kib\":{},\"rss_after_kib\":{rss_after}}}",
        args.cashouts,
        args.max_rps,
        seconds / floor,
        peak_rss.load(Ordering::Relaxed)
    );
    handle.stop(true).await;
    let _ = server.await;
    simulator.stop().await;
    if recovered != args.cashouts {
        return Err(CommandError::Runtime(anyhow::anyhow!(
            "only {recovered} of {} cash-outs were recovered",
            args.cashouts
        )));
    }
    Ok(())
}

async fn count_in(
    store: &crate::store::Store,
    status: Option<crate::state::CashoutStatus>,
) -> Result<usize, CommandError> {
    let mut count = 0;
    let mut after = None;
    loop {
        let filter = CashoutFilter {
            status,
            limit: 1000,
            after,
            ..CashoutFilter::default()
        };
        let page = store
            .list_cashouts(filter)
            .await
            .map_err(|err| CommandError::Runtime(anyhow::Error::new(err)))?;
        count += page.items.len();
        match page.next {
            Some(next) => after = Some(next),
            None => return Ok(count),
        }
    }
}
