//! `simulate`: one provider simulator standalone (for staging and load tests) until Ctrl-C.

use std::collections::BTreeMap;
use std::time::Duration;

use super::CommandError;
use crate::providers::ProviderKind;
use crate::sim::{Faults, SimConfig, SimStats, Simulator};

/// Arguments of `cashout-recon simulate`.
#[derive(clap::Args, Debug, Clone)]
pub struct SimulateArgs {
    /// Provider kind to play: fiserv_pix, simpay, tupay, mannco or pismo.
    #[arg(long, value_parser = parse_kind)]
    pub provider: ProviderKind,
    /// Address the simulated provider API listens on (e.g. 127.0.0.1:9101; port 0 picks one).
    #[arg(long)]
    pub listen: String,
    /// Webhook URL of the daemon (e.g. http://127.0.0.1:8080/webhooks/fiserv); not needed
    /// for mannco, which sends no webhooks.
    #[arg(long, required_if_eq_any = [
        ("provider", "fiserv_pix"),
        ("provider", "simpay"),
        ("provider", "tupay"),
        ("provider", "pismo"),
    ])]
    pub target: Option<String>,
    /// How many cash-outs to create.
    #[arg(long, default_value_t = 20)]
    pub cashouts: usize,
    /// Seed of every random choice (paths, amounts, ids, faults, credentials).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Percentage of webhooks never sent.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub loss: u8,
    /// Percentage of webhooks delivered twice.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub duplicate: u8,
    /// Hold back some webhooks and deliver them after later ones.
    #[arg(long)]
    pub reorder: bool,
    /// Every Nth webhook carries a bad signature.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub tamper_every: Option<u32>,
    /// Delay each webhook by a random 0..=N milliseconds.
    #[arg(long, default_value_t = 0)]
    pub max_delay_ms: u64,
    /// Percentage of API requests answered 503.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub api_5xx: u8,
    /// Percentage of API requests answered 429 with Retry-After: 1.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub api_429: u8,
    /// Percentage of API requests held 15 s before a 504.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub api_timeout: u8,
    /// Requests per second the API accepts before answering 429.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_rps: Option<u32>,
    /// Time between two steps of the cash-outs (e.g. 500ms, 1s, 1m).
    #[arg(long, default_value = "1s", value_parser = parse_interval)]
    pub interval: Duration,
    /// Provider id to print in the TOML block (default: the last path segment of
    /// --target, e.g. `fiserv` for http://127.0.0.1:8080/webhooks/fiserv, else the kind).
    #[arg(long)]
    pub id: Option<String>,
    /// Only print the TOML block and the environment for the daemon of a simulator on
    /// --listen (a fixed port: nothing is bound, the simulator may be running), then exit.
    #[arg(long)]
    pub print_config: bool,
    /// Prefix of the environment variable names in the TOML block (default: SIM_<KIND>).
    #[arg(long)]
    pub env_prefix: Option<String>,
}

/// The provider id a webhook URL names: its last non-empty path segment.
fn id_from_target(target: &str) -> Option<String> {
    let url = reqwest::Url::parse(target).ok()?;
    let segment = url.path_segments()?.rev().find(|s| !s.is_empty())?;
    crate::ids::valid_id(segment).map(str::to_string)
}

fn parse_kind(text: &str) -> Result<ProviderKind, String> {
    text.parse()
}

fn parse_interval(text: &str) -> Result<Duration, String> {
    let interval = humantime::parse_duration(text).map_err(|err| err.to_string())?;
    if interval.is_zero() {
        return Err("the interval must be longer than 0s".to_string());
    }
    Ok(interval)
}

/// Starts the simulator, prints how to point the daemon at it, drives the cash-outs to
/// their final states one step per interval, then serves until Ctrl-C.
pub async fn run(args: SimulateArgs) -> Result<(), CommandError> {
    if let Some(target) = &args.target {
        reqwest::Url::parse(target).map_err(|err| {
            CommandError::Config(format!("--target {target:?} is not a URL: {err}"))
        })?;
    }
    if u16::from(args.api_5xx) + u16::from(args.api_429) + u16::from(args.api_timeout) > 100 {
        return Err(CommandError::Config(
            "--api-5xx, --api-429 and --api-timeout add up to more than 100".to_string(),
        ));
    }
    let kind = args.provider;
    if !kind.adapter().sends_webhooks() {
        // Webhook faults change nothing here: say so instead of ignoring them silently
        // (not an error: a script may pass the same flags to every kind).
        for (flag, given) in [
            ("--target", args.target.is_some()),
            ("--loss", args.loss > 0),
            ("--duplicate", args.duplicate > 0),
            ("--reorder", args.reorder),
            ("--tamper-every", args.tamper_every.is_some()),
            ("--max-delay-ms", args.max_delay_ms > 0),
        ] {
            if given {
                eprintln!(
                    "note: {flag} does nothing for {kind}: it sends no webhooks (polled only)"
                );
            }
        }
    }
    let config = SimConfig {
        kind,
        seed: args.seed,
        faults: Faults {
            webhook_loss_pct: args.loss,
            webhook_duplicate_pct: args.duplicate,
            reorder: args.reorder,
            max_delay_ms: args.max_delay_ms,
            tamper_every: args.tamper_every,
            api_5xx_pct: args.api_5xx,
            api_429_pct: args.api_429,
            api_timeout_pct: args.api_timeout,
        },
        webhook_target: args
            .target
            .clone()
            .filter(|_| kind.adapter().sends_webhooks()),
        more_webhook_targets: Vec::new(),
        max_rps: args.max_rps,
    };
    // `--print-config` binds nothing: the simulator it describes may be running already.
    let simulator = if args.print_config {
        Simulator::offline(config, &args.listen)?
    } else {
        Simulator::start(config, &args.listen).await?
    };
    let id = args
        .id
        .clone()
        .or_else(|| args.target.as_deref().and_then(id_from_target))
        .unwrap_or_else(|| kind.as_str().to_string());
    let env_prefix = args
        .env_prefix
        .clone()
        .unwrap_or_else(|| format!("SIM_{}", kind.as_str().to_ascii_uppercase()));

    // The block first: the daemon needs it before the first webhook makes sense.
    println!("# Provider block for the daemon's config:\n");
    print!("{}", simulator.provider_toml(&id, &env_prefix));
    println!(
        "\n# Its environment. These are the simulator's test credentials (derived from the \
         seed), not secrets, so their values are shown:\n"
    );
    for (name, value) in simulator.env_vars(&env_prefix) {
        println!("export {name}='{value}'");
    }
    println!();
    if args.print_config {
        simulator.stop().await;
        return Ok(());
    }
    println!("{kind} simulator listening on {}", simulator.base_url());
    match &args.target {
        Some(target) if kind.adapter().sends_webhooks() => println!("webhooks go to {target}"),
        _ => println!("no webhooks ({kind} is polled only)"),
    }

    let refs = simulator.create_cashouts(args.cashouts);
    println!(
        "created {} cash-outs; one step every {}",
        refs.len(),
        humantime::format_duration(args.interval)
    );

    let mut ticker = tokio::time::interval(args.interval);
    ticker.tick().await;
    let mut step = 0usize;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            signal = tokio::signal::ctrl_c() => {
                signal.map_err(|err| CommandError::Runtime(err.into()))?;
                println!("interrupted before every cash-out was final");
                return stop(&simulator).await;
            }
        }
        step += 1;
        let changed = simulator.advance().await;
        println!("step {step}: {changed} cash-outs changed");
        if changed == 0 {
            break;
        }
    }
    simulator.flush().await;
    print_summary(&simulator);
    println!("every cash-out is final; still serving the API until Ctrl-C");
    tokio::signal::ctrl_c()
        .await
        .map_err(|err| CommandError::Runtime(err.into()))?;
    stop(&simulator).await
}

async fn stop(simulator: &Simulator) -> Result<(), CommandError> {
    simulator.stop().await;
    print_stats(&simulator.stats());
    Ok(())
}

fn print_summary(simulator: &Simulator) {
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    for truth in simulator.ground_truth() {
        *by_status.entry(truth.status.to_string()).or_insert(0) += 1;
    }
    let states: Vec<String> = by_status
        .iter()
        .map(|(status, count)| format!("{status} {count}"))
        .collect();
    println!("final states: {}", states.join(", "));
    print_stats(&simulator.stats());
}

fn print_stats(stats: &SimStats) {
    println!(
        "webhooks: {} events, {} POSTs, {} lost, {} duplicated, {} tampered ({} accepted), {} failed; \
         {} cash-outs whose final webhook never arrived",
        stats.webhook_events,
        stats.webhooks_sent,
        stats.webhooks_lost,
        stats.webhooks_duplicated,
        stats.webhooks_tampered,
        stats.tampered_accepted,
        stats.webhooks_failed,
        stats.lost_final_state,
    );
    println!(
        "api: {} requests, {} injected faults, {} rate-limited, {} refused credentials",
        stats.api_requests, stats.api_faults, stats.api_rate_limited, stats.api_auth_failures,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_provider_id_comes_from_the_targets_last_path_segment() {
        assert_eq!(
            id_from_target("http://127.0.0.1:8080/webhooks/fiserv").as_deref(),
            Some("fiserv")
        );
        assert_eq!(
            id_from_target("http://127.0.0.1:8080/webhooks/simpay-br/").as_deref(),
            Some("simpay-br")
        );
        assert_eq!(id_from_target("http://127.0.0.1:8080/"), None);
    }
}
