//! Start-up: builds the store, the provider registry and the HTTP server from `Settings`.

use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use actix_web::dev::{Server, ServerHandle};
use actix_web::{web, HttpResponse};
use anyhow::Context;
use tracing_actix_web::TracingLogger;

use crate::alert::shared::SignalPublisher;
use crate::alert::Alerting;
use crate::config::Settings;
use crate::ingestor::Ingestor;
use crate::metrics::Metrics;
use crate::poller::Poller;
use crate::providers::registry::ProviderRegistry;
use crate::reconciler::Reconciler;
use crate::scheduler::Scheduler;
use crate::store::Store;
use crate::telemetry::{BoundedRootSpan, RateLimitedLog};
use crate::wakeups::CrossInstanceWakes;

/// What every request handler and background job shares.
pub struct AppState {
    pub settings: Arc<Settings>,
    pub store: Store,
    /// Webhook ingestion and reprocessing (the use cases over the store).
    pub ingestor: Ingestor,
    pub providers: ProviderRegistry,
    pub metrics: Metrics,
    /// Search sweeps, status checks and queued fetches of every provider.
    pub poller: Arc<Poller>,
    /// Beaten by the scheduler while it runs (for `/readyz`).
    pub scheduler_heartbeat: Heartbeat,
    /// Reconciliation passes and daily reports.
    pub reconciler: Reconciler,
    /// Alert signals, passes and the wake-ups of the alert and outbox jobs.
    pub alerting: Arc<Alerting>,
    /// Rejected webhooks: the first line per (provider, reason), then one per second.
    pub rejection_log: RateLimitedLog,
    /// The ops console's signed-in sessions (shared by every worker).
    pub console: crate::console::Sessions,
}

/// When the scheduler last showed it is alive; `None` before it starts (or when the app
/// runs without background jobs, which then never counts against readiness).
#[derive(Default)]
pub struct Heartbeat {
    expected: std::sync::atomic::AtomicBool,
    last: Mutex<Option<std::time::Instant>>,
}

impl Heartbeat {
    /// How long without a beat before the scheduler counts as stopped.
    pub const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(30);

    /// Records that the scheduler is alive (and from now on expected to stay so).
    pub fn beat(&self) {
        self.expected
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut last) = self.last.lock() {
            *last = Some(std::time::Instant::now());
        }
    }

    /// Why the scheduler does not count as running, if it does not.
    pub fn problem(&self) -> Option<String> {
        if !self.expected.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let last = self.last.lock().ok().and_then(|last| *last);
        match last {
            Some(at) if at.elapsed() <= Self::STALE_AFTER => None,
            Some(at) => Some(format!("scheduler silent for {} s", at.elapsed().as_secs())),
            None => Some("scheduler not running".to_string()),
        }
    }
}

impl AppState {
    /// Builds the shared state over an opened store.
    pub fn new(
        settings: Arc<Settings>,
        store: Store,
        metrics: Metrics,
    ) -> anyhow::Result<AppState> {
        let providers = ProviderRegistry::build(&settings).map_err(anyhow::Error::msg)?;
        let alerting = Arc::new(Alerting::new(chrono::Utc::now()));
        let poller = Arc::new(Poller::new(
            settings.clone(),
            &providers,
            store.clone(),
            metrics.clone(),
            alerting.signals.clone(),
        ));
        let reconciler = Reconciler::new(store.clone(), &settings);
        Ok(AppState {
            reconciler,
            settings,
            ingestor: Ingestor::new(store.clone()),
            store,
            providers,
            metrics,
            poller,
            scheduler_heartbeat: Heartbeat::default(),
            alerting,
            rejection_log: RateLimitedLog::default(),
            console: crate::console::Sessions::default(),
        })
    }

    /// Wakes `provider`'s status fetcher (it reads the queue from the store).
    pub fn request_status_fetch(&self, provider: &str) {
        self.poller.wake_fetcher(provider);
    }

    /// Asks for an alert pass soon (after something that can open or resolve an alert,
    /// e.g. a reconcile pass).
    pub fn wake_alerts(&self) {
        self.alerting.wake();
    }

    /// A `'static` function that does what [`AppState::request_status_fetch`] does.
    pub fn status_fetch_notifier(&self) -> impl Fn(&str) + Send + 'static {
        let poller = self.poller.clone();
        move |provider: &str| poller.wake_fetcher(provider)
    }
}

/// Start-up choices that are not configuration.
#[derive(Clone, Debug)]
pub struct AppOptions {
    /// Stop gracefully on the first SIGTERM/SIGINT, at once on a second (off in tests).
    pub handle_signals: bool,
    /// Serve `POST /bench/noop` (for the ingestion benchmark's baseline).
    pub noop_route: bool,
    /// Run the background jobs (poll cycles, status fetches, housekeeping).
    pub background_jobs: bool,
}

impl Default for AppOptions {
    fn default() -> Self {
        AppOptions {
            handle_signals: true,
            noop_route: false,
            background_jobs: true,
        }
    }
}

/// The running daemon: HTTP server plus store.
pub struct App {
    port: u16,
    server: Server,
    state: web::Data<AppState>,
    scheduler: Option<Scheduler>,
    /// On PostgreSQL, wake-ups relayed to and from the other instances (stopped when
    /// dropped).
    wakes: Option<CrossInstanceWakes>,
    /// On PostgreSQL, publishes this instance's alert signals for the others.
    signal_publisher: Option<SignalPublisher>,
}

impl App {
    /// Builds the daemon with default options.
    pub async fn build(settings: Settings) -> anyhow::Result<App> {
        App::build_with(settings, AppOptions::default()).await
    }

    /// Opens the store, builds the providers and binds the listener (port 0 picks one).
    pub async fn build_with(settings: Settings, options: AppOptions) -> anyhow::Result<App> {
        let listener = TcpListener::bind(&settings.server.listen)
            .with_context(|| format!("binding server.listen {}", settings.server.listen))?;
        App::build_on(settings, options, listener).await
    }

    /// Like [`App::build_with`], on a listener the caller bound (it needs the port before
    /// the app exists, e.g. to point simulators at it).
    pub async fn build_on(
        settings: Settings,
        options: AppOptions,
        listener: TcpListener,
    ) -> anyhow::Result<App> {
        let metrics = Metrics::new();
        let store = Store::connect(&settings.store, metrics.clone())
            .await
            .context("opening the store")?;
        let port = listener
            .local_addr()
            .context("reading the bound address")?
            .port();
        let settings = Arc::new(settings);
        let state = web::Data::new(AppState::new(settings.clone(), store, metrics)?);
        let server_state = state.clone();
        let noop = options.noop_route;
        let mut server = actix_web::HttpServer::new(move || {
            // Runs on each HTTP worker's thread: the writer hands that worker's answers
            // over in one go per group.
            crate::store::reply_inbox::serve_this_thread();
            let app = actix_web::App::new()
                .app_data(server_state.clone())
                .wrap(actix_web::middleware::from_fn(
                    crate::http::gate::read_deadline,
                ))
                .wrap(TracingLogger::<BoundedRootSpan>::new())
                .configure(|config| {
                    crate::http::routes(config, &server_state.providers, &server_state.metrics)
                });
            if noop {
                app.route("/bench/noop", web::post().to(noop_route))
            } else {
                app
            }
        })
        .listen(listener)
        .context("starting the HTTP listener")?
        // actix counts whole seconds: round up, so "500ms" is not "no drain at all".
        .shutdown_timeout(
            settings
                .server
                .shutdown_timeout
                .as_secs()
                .saturating_add(u64::from(
                    settings.server.shutdown_timeout.subsec_nanos() > 0,
                )),
        )
        // The head within read_timeout here; the body by `gate::read_deadline`.
        .client_request_timeout(settings.server.read_timeout)
        .workers(
            settings
                .server
                .workers
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
        );
        // actix stops at once on SIGINT (dropping in-flight requests); both signals are
        // handled here instead, alike (see `stop_on_signals`).
        server = server.disable_signals();
        let scheduler = if options.background_jobs {
            Some(Scheduler::start(state.clone().into_inner()).await?)
        } else {
            None
        };
        // Work this instance queues (a status fetch, an alert pass, deliveries) wakes the
        // instance whose job runs it, and the other way round.
        let wakes = state
            .store
            .postgres()
            .map(|store| crate::wakeups::start_for_daemon(&state, store.clone()));
        // The alert pass and the console of every instance read what this one saw.
        let signal_publisher = state
            .store
            .postgres()
            .map(|store| SignalPublisher::start(store.clone(), state.alerting.signals.clone()));
        let server = server.run();
        if options.handle_signals {
            tokio::spawn(stop_on_signals(server.handle()));
        }
        Ok(App {
            port,
            server,
            state,
            scheduler,
            wakes,
            signal_publisher,
        })
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A handle to stop the server (gracefully) from elsewhere.
    pub fn handle(&self) -> ServerHandle {
        self.server.handle()
    }

    /// The shared state (store, providers, metrics).
    pub fn state(&self) -> web::Data<AppState> {
        self.state.clone()
    }

    /// Serves until stopped (SIGTERM/SIGINT or the handle), then commits what is queued.
    /// Fails when the store's writer thread dies: nothing could be committed any more, so
    /// the process exits non-zero and its supervisor restarts it.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let handle = self.server.handle();
        let store = self.state.store.clone();
        let mut server = self.server;
        let (result, writer_died) = tokio::select! {
            result = &mut server => (result, false),
            () = store.writer_ended() => {
                tracing::error!("the store writer died; stopping so that a supervisor restarts the daemon");
                handle.stop(false).await;
                (server.await, true)
            }
        };
        tracing::info!(
            "HTTP server stopped; stopping background jobs and committing queued writes"
        );
        if let Some(scheduler) = self.scheduler {
            scheduler.stop().await;
        }
        drop(self.wakes);
        if let Some(publisher) = self.signal_publisher {
            publisher.stop().await;
        }
        self.state.store.close().await;
        if writer_died {
            anyhow::bail!("the store writer thread died; no write could be committed");
        }
        result.context("HTTP server failed")
    }
}

/// The first SIGTERM or SIGINT stops the server gracefully (in-flight requests finish
/// within `server.shutdown_timeout`, queued writes are committed); a second one exits at
/// once (nothing acknowledged is lost: a 2xx is only sent after its commit).
async fn stop_on_signals(handle: ServerHandle) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut terminate), Ok(mut interrupt)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot listen for SIGTERM/SIGINT; stop the daemon with SIGKILL");
        return;
    };
    let first = tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    };
    tracing::info!(
        signal = first,
        "stopping: draining in-flight requests (again to force)"
    );
    tokio::spawn(handle.stop(true));
    // Listening until the process ends: once registered, the signals no longer kill it.
    let second = tokio::select! {
        _ = terminate.recv() => "SIGTERM",
        _ = interrupt.recv() => "SIGINT",
    };
    tracing::warn!(signal = second, "second signal: exiting without draining");
    std::process::exit(130);
}

async fn noop_route(body: web::Bytes) -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok", "bytes": body.len() }))
}
