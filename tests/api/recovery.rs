//! End to end against all five simulators: webhooks lost, duplicated and reordered, the
//! providers' APIs failing with 5xx and 429; polling must make the book equal the ground
//! truth, counting exactly one `missed_webhook` per state the webhooks failed to report.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::ServerHandle;
use actix_web::web::Data;
use cashout_recon::app::{App, AppOptions, AppState};
use cashout_recon::config::Settings;
use cashout_recon::providers::ProviderKind;
use cashout_recon::sim::{harness, Faults, SimConfig, Simulator, Truth};

/// Cash-outs per provider (300 in all).
const PER_PROVIDER: usize = 60;
const SETTLE_WITHIN: Duration = Duration::from_secs(90);

fn faults() -> Faults {
    Faults {
        webhook_loss_pct: 30,
        webhook_duplicate_pct: 10,
        reorder: true,
        max_delay_ms: 10,
        tamper_every: None,
        api_5xx_pct: 5,
        api_429_pct: 2,
        api_timeout_pct: 0,
    }
}

/// Five simulators pointed at a daemon port chosen up front, and the daemon's config.
struct World {
    simulators: Vec<(&'static str, Simulator)>,
    store: crate::helpers::TestStore,
    port: u16,
    config: String,
    env: BTreeMap<String, String>,
}

struct Daemon {
    handle: ServerHandle,
    state: Data<AppState>,
    join: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl World {
    async fn new(seed: u64) -> World {
        let port = {
            let probe = TcpListener::bind("127.0.0.1:0").expect("probe port");
            probe.local_addr().expect("port").port()
        };
        let mut simulators = Vec::new();
        for (index, kind) in cashout_recon::sim::simulated_kinds().enumerate() {
            let id = harness::provider_id(kind);
            let mut config = SimConfig::new(kind, seed + index as u64);
            config.faults = faults();
            config.webhook_target = Some(format!("http://127.0.0.1:{port}/webhooks/{id}"));
            let simulator = Simulator::start(config, "127.0.0.1:0")
                .await
                .expect("simulator starts");
            simulators.push((id, simulator));
        }
        let store = crate::helpers::TestStore::new().await;
        // Scheduled cycles are pushed out of the way (poll_every 1h) so the test decides
        // when polling happens; the status-fetch workers of thin notifications still run.
        let (config, mut env) = harness::daemon_config(
            &simulators,
            port,
            &store.dir.path().join("recovery.db"),
            "status_batch = 1000\nrequest_timeout = \"5s\"\nmax_retries = 5\nrecheck_completed_every = \"1s\"",
            Some("1h"),
        );
        env.insert(
            "CASHOUT_RECON_ADMIN_TOKEN".to_string(),
            crate::helpers::ADMIN_TOKEN.to_string(),
        );
        let (config, env) = (store.configure(&config), store.env(env));
        World {
            simulators,
            store,
            port,
            config,
            env,
        }
    }

    /// Starts (or restarts) the daemon on the same port and store.
    async fn start_daemon(&self) -> Daemon {
        let settings = Settings::parse(&self.config, self.store.dir.path(), &self.env)
            .expect("config is valid");
        // The previous daemon's socket may linger briefly after a restart.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", self.port)) {
                Ok(listener) => break listener,
                Err(err) if tokio::time::Instant::now() < deadline => {
                    let _ = err;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(err) => panic!("cannot rebind port {}: {err}", self.port),
            }
        };
        let options = AppOptions {
            handle_signals: false,
            noop_route: false,
            background_jobs: true,
        };
        let app = App::build_on(settings, options, listener)
            .await
            .expect("daemon builds");
        let handle = app.handle();
        let state = app.state();
        let join = tokio::spawn(app.run_until_stopped());
        Daemon {
            handle,
            state,
            join,
        }
    }

    /// The platform registers what it pays before paying (SimPay and Pismo have no
    /// search: a cash-out whose every webhook is lost is found through the ledger).
    async fn register_ledger(&self, daemon: &Daemon) {
        for (id, simulator) in &self.simulators {
            harness::register_ledger(&daemon.state.store, id, simulator)
                .await
                .expect("ledger entries");
        }
    }
}

impl Daemon {
    async fn stop(self) {
        self.handle.stop(true).await;
        let _ = self.join.await;
    }

    /// Provider refs whose stored state or amount differs from the truth (or are missing).
    async fn differences(&self, provider: &str, truth: &[Truth]) -> Vec<String> {
        harness::compare(&self.state.store, provider, truth)
            .await
            .expect("read the book")
            .differences
    }

    /// Waits until no thin-notification status fetch is waiting.
    async fn drain_fetches(&self) {
        let deadline = tokio::time::Instant::now() + SETTLE_WITHIN;
        for (id, _) in [("tupay", ())] {
            loop {
                let queued = self
                    .state
                    .store
                    .queued_fetch_count(id.to_string())
                    .await
                    .expect("queue");
                if queued == 0 {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{id}: {queued} fetches still queued"
                );
                self.state.poller.wake_fetcher(id);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    fn recovered(&self, provider: &str) -> u64 {
        self.state
            .metrics
            .missed_webhooks
            .with_label_values(&[provider])
            .get()
    }

    /// Poll cycles for every provider until the book equals the truth.
    async fn poll_until_settled(&self, world: &World) {
        let deadline = tokio::time::Instant::now() + SETTLE_WITHIN;
        loop {
            for (id, _) in &world.simulators {
                self.state
                    .poller
                    .poll_once(id)
                    .await
                    .expect("poll cycle runs");
            }
            let mut left = Vec::new();
            for (id, simulator) in &world.simulators {
                let differences = self.differences(id, &simulator.ground_truth()).await;
                if !differences.is_empty() {
                    left.push(format!("{id}: {differences:?}"));
                }
            }
            if left.is_empty() {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the book did not reach the ground truth: {left:#?}"
            );
            // Status checks wait for status_after (1s) since the last change.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

async fn run_all_to_completion(world: &World) {
    harness::run_all_to_completion(&world.simulators).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_recovers_every_lost_state_and_counts_each_once() {
    // Arrange: 300 cash-outs, 30 % of webhooks lost, 10 % duplicated, reordered; the
    // providers' APIs answer 5 % 5xx and some 429s.
    let world = World::new(1000).await;
    let daemon = world.start_daemon().await;
    for (_, simulator) in &world.simulators {
        simulator.create_cashouts(PER_PROVIDER);
    }
    world.register_ledger(&daemon).await;
    run_all_to_completion(&world).await;
    daemon.drain_fetches().await;

    // What webhooks failed to report: each such cash-out needs exactly one recovery.
    let mut expected_recoveries = BTreeMap::new();
    for (id, simulator) in &world.simulators {
        let differences = daemon.differences(id, &simulator.ground_truth()).await;
        let stats = simulator.stats();
        if simulator.kind() == ProviderKind::Mannco {
            // No webhooks at all: polling is how it works, not a recovery.
            expected_recoveries.insert(*id, 0);
            continue;
        }
        if matches!(
            simulator.kind(),
            ProviderKind::FiservPix | ProviderKind::Simpay | ProviderKind::Pismo
        ) {
            assert_eq!(
                differences.len(),
                stats.lost_final_state,
                "{id}: the book differs exactly where the final webhook was lost: {differences:?}"
            );
        }
        assert!(
            stats.webhooks_lost > 0 && stats.webhooks_duplicated > 0,
            "{id}: faults were injected: {stats:?}"
        );
        expected_recoveries.insert(*id, differences.len() as u64);
    }
    assert!(
        expected_recoveries.values().sum::<u64>() > 0,
        "the faults lost some final states"
    );

    // Act
    daemon.poll_until_settled(&world).await;

    // Assert: the book equals the truth (checked by poll_until_settled), and every lost
    // state was recovered once — no more, no less.
    for (id, expected) in &expected_recoveries {
        assert_eq!(
            daemon.recovered(id),
            *expected,
            "{id}: missed_webhook recoveries"
        );
    }
    let (status, mismatches) = {
        let missed = daemon
            .state
            .store
            .list_mismatches(Some("missed_webhook".to_string()), false)
            .await
            .expect("mismatches");
        (200, missed)
    };
    assert_eq!(status, 200);
    assert_eq!(
        mismatches.len() as u64,
        expected_recoveries.values().sum::<u64>(),
        "one missed_webhook record each"
    );
    let api_faults: usize = world
        .simulators
        .iter()
        .map(|(_, s)| s.stats().api_faults)
        .sum();
    assert!(api_faults > 0, "the providers' APIs did fail along the way");
    daemon.stop().await;
    for (_, simulator) in &world.simulators {
        simulator.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_restarted_between_cycles_loses_nothing_and_skips_no_window() {
    // Arrange
    let world = Arc::new(World::new(2000).await);
    let mut daemon = world.start_daemon().await;
    for (_, simulator) in &world.simulators {
        simulator.create_cashouts(PER_PROVIDER);
    }
    world.register_ledger(&daemon).await;

    // Act: advance in steps; between steps, poll and restart the daemon. Webhooks sent
    // while it is down are lost to it; the watermark carries each sweep over the gap.
    for step in 0..6 {
        let mut moved = 0;
        for (_, simulator) in &world.simulators {
            moved += simulator.advance().await;
        }
        for (id, _) in &world.simulators {
            daemon.state.poller.poll_once(id).await.expect("poll cycle");
        }
        daemon.stop().await;
        if step % 2 == 0 {
            // Webhooks of this step reach nobody.
            for (_, simulator) in &world.simulators {
                simulator.advance().await;
            }
        }
        daemon = world.start_daemon().await;
        if moved == 0 {
            break;
        }
    }
    run_all_to_completion(&world).await;
    daemon.drain_fetches().await;

    // Assert
    daemon.poll_until_settled(&world).await;
    for (id, _) in &world.simulators {
        let watermark = daemon
            .state
            .store
            .watermark(id.to_string())
            .await
            .expect("watermark");
        if matches!(*id, "fiserv" | "tupay" | "mannco") {
            assert!(
                watermark.is_some(),
                "{id}: search sweeps record their window"
            );
        }
    }
    daemon.stop().await;
    for (_, simulator) in &world.simulators {
        simulator.stop().await;
    }
}
