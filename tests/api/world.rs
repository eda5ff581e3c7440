//! The end-to-end world: all five simulators (webhooks lost, duplicated and reordered,
//! the providers' APIs failing with 5xx and 429) and the daemons they talk to — one, or
//! several instances on one PostgreSQL database with the webhooks sprayed across them.

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::Duration;

use actix_web::dev::ServerHandle;
use actix_web::web::Data;
use cashout_recon::app::{App, AppOptions, AppState};
use cashout_recon::config::Settings;
use cashout_recon::sim::{harness, Faults, SimConfig, Simulator, Truth};

use crate::helpers::{TestBackend, TestStore};

/// Cash-outs per provider (300 in all).
pub const PER_PROVIDER: usize = 60;
pub const SETTLE_WITHIN: Duration = Duration::from_secs(90);

/// The `[poll]` settings of every daemon of the world.
const POLL_SETTINGS: &str =
    "status_batch = 1000\nrequest_timeout = \"5s\"\nmax_retries = 5\nrecheck_completed_every = \"1s\"";

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

/// How the daemons of a world run.
pub struct Layout {
    /// Daemons on the one store (the simulators rotate their webhooks across them).
    pub instances: usize,
    pub backend: TestBackend,
    /// Every provider's `poll_every` ("1h": the test decides when polling happens).
    pub poll_every: &'static str,
    /// Config sections added to every daemon's (`[instances]`, `[alerts]`, …).
    pub sections: String,
    /// Variables added to every daemon's environment.
    pub env: BTreeMap<String, String>,
}

impl Layout {
    /// One daemon on the store the environment chooses; scheduled cycles pushed out of the
    /// way (the status-fetch workers of thin notifications still run).
    pub fn single() -> Layout {
        Layout {
            instances: 1,
            backend: TestBackend::from_env(),
            poll_every: "1h",
            sections: String::new(),
            env: BTreeMap::new(),
        }
    }
}

/// Five simulators pointed at daemon ports chosen up front, and the daemons' config.
pub struct World {
    pub simulators: Vec<(&'static str, Simulator)>,
    pub store: TestStore,
    ports: Vec<u16>,
    layout: Layout,
    env: BTreeMap<String, String>,
}

/// One running daemon of the world.
pub struct Daemon {
    handle: ServerHandle,
    pub state: Data<AppState>,
    join: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl World {
    /// One daemon ([`Layout::single`]).
    pub async fn new(seed: u64) -> World {
        World::with_layout(seed, Layout::single()).await
    }

    pub async fn with_layout(seed: u64, layout: Layout) -> World {
        let ports: Vec<u16> = (0..layout.instances.max(1))
            .map(|_| {
                let probe = TcpListener::bind("127.0.0.1:0").expect("probe port");
                probe.local_addr().expect("port").port()
            })
            .collect();
        let mut simulators = Vec::new();
        for (index, kind) in cashout_recon::sim::simulated_kinds().enumerate() {
            let id = harness::provider_id(kind);
            let mut config = SimConfig::new(kind, seed + index as u64);
            config.faults = faults();
            let mut targets = ports
                .iter()
                .map(|port| format!("http://127.0.0.1:{port}/webhooks/{id}"));
            config.webhook_target = targets.next();
            config.more_webhook_targets = targets.collect();
            let simulator = Simulator::start(config, "127.0.0.1:0")
                .await
                .expect("simulator starts");
            simulators.push((id, simulator));
        }
        let store = TestStore::of(layout.backend).await;
        let (_, mut env) = harness::daemon_config(&simulators, ports[0], &PathBuf::new(), "", None);
        env.insert(
            "CASHOUT_RECON_ADMIN_TOKEN".to_string(),
            crate::helpers::ADMIN_TOKEN.to_string(),
        );
        env.extend(layout.env.clone());
        let env = store.env(env);
        World {
            simulators,
            store,
            ports,
            layout,
            env,
        }
    }

    /// The settings of instance `instance` (its own port and reports directory).
    pub fn settings(&self, instance: usize) -> Settings {
        let (config, _) = harness::daemon_config(
            &self.simulators,
            self.ports[instance],
            &self.store.dir.path().join("recovery.db"),
            POLL_SETTINGS,
            Some(self.layout.poll_every),
        );
        let config = format!(
            "{}\n{}\n[reports]\ndir = \"{}\"\ndaily_at = \"00:00\"\n",
            self.store.configure(&config),
            self.layout.sections,
            self.reports_dir(instance).display()
        );
        Settings::parse(&config, self.store.dir.path(), &self.env).expect("config is valid")
    }

    /// Where instance `instance` writes its reports.
    pub fn reports_dir(&self, instance: usize) -> PathBuf {
        self.store.dir.path().join(format!("reports-{instance}"))
    }

    /// Starts (or restarts) the only daemon.
    pub async fn start_daemon(&self) -> Daemon {
        self.start_instance(0).await
    }

    /// Starts (or restarts) instance `instance` on its port and the world's store.
    pub async fn start_instance(&self, instance: usize) -> Daemon {
        let settings = self.settings(instance);
        let port = self.ports[instance];
        // The previous daemon's socket may linger briefly after a restart.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", port)) {
                Ok(listener) => break listener,
                Err(err) if tokio::time::Instant::now() < deadline => {
                    let _ = err;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(err) => panic!("cannot rebind port {port}: {err}"),
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
    pub async fn register_ledger(&self, store: &cashout_recon::store::Store) {
        for (id, simulator) in &self.simulators {
            harness::register_ledger(store, id, simulator)
                .await
                .expect("ledger entries");
        }
    }

    /// Per provider, what the book (read through `daemon`) still gets wrong.
    pub async fn differences(&self, daemon: &Daemon) -> Vec<String> {
        let mut left = Vec::new();
        for (id, simulator) in &self.simulators {
            let differences = daemon.differences(id, &simulator.ground_truth()).await;
            if !differences.is_empty() {
                left.push(format!("{id}: {differences:?}"));
            }
        }
        left
    }
}

impl Daemon {
    pub async fn stop(self) {
        self.handle.stop(true).await;
        let _ = self.join.await;
    }

    /// Provider refs whose stored state or amount differs from the truth (or are missing).
    pub async fn differences(&self, provider: &str, truth: &[Truth]) -> Vec<String> {
        harness::compare(&self.state.store, provider, truth)
            .await
            .expect("read the book")
            .differences
    }

    /// Waits until no thin-notification status fetch is waiting.
    pub async fn drain_fetches(&self) {
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

    pub fn recovered(&self, provider: &str) -> u64 {
        self.state
            .metrics
            .missed_webhooks
            .with_label_values(&[provider])
            .get()
    }

    /// Poll cycles for every provider until the book equals the truth.
    pub async fn poll_until_settled(&self, world: &World) {
        let deadline = tokio::time::Instant::now() + SETTLE_WITHIN;
        loop {
            for (id, _) in &world.simulators {
                self.state
                    .poller
                    .poll_once(id)
                    .await
                    .expect("poll cycle runs");
            }
            let left = world.differences(self).await;
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

pub async fn run_all_to_completion(world: &World) {
    harness::run_all_to_completion(&world.simulators).await;
}
