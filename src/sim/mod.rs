//! Provider simulators: loopback HTTP servers that play the provider side of SPEC §4 with ground truth and injectable faults.
//!
//! A [`Simulator`] holds the truth about its cash-outs, moves them through the provider's own
//! states along a plan drawn from a seeded RNG, serves the provider's status/search API
//! (checking the daemon's credentials) and pushes correctly signed webhooks to a target URL,
//! losing, duplicating, delaying, reordering or tampering with some of them on request.
//!
//! Three independent seeded streams keep runs reproducible: one draws the cash-outs and their
//! paths, one decides the fate of each webhook, one decides the API faults (so API traffic
//! never changes what the webhooks do).
//!
//! Each provider kind lives in its own file behind [`KindSim`]: its credentials, its planned
//! paths, its webhook bodies and signatures, and its API routes.

pub mod alert_receiver;
mod discrepancies;
pub(crate) mod fiserv_pix;
pub mod harness;
pub(crate) mod mannco;
pub(crate) mod pismo;
pub(crate) mod simpay;
pub(crate) mod tupay;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use actix_web::dev::ServerHandle;
use actix_web::{web, HttpRequest, HttpResponse};
use anyhow::Context;
use chrono::{DateTime, SecondsFormat, Utc};
use futures_util::stream::{self, StreamExt};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::value::RawValue;
use tokio::task::JoinHandle;

use crate::money::Currency;
use crate::providers::{ParseError, ProviderKind};
use crate::state::{decide, CashoutStatus, CurrentState, StatusUpdate};
use crate::verify::RequestHeaders;

/// Faults the simulator injects into its webhooks and its API. `Default` injects none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// Percentage (0–100) of webhooks never sent.
    pub webhook_loss_pct: u8,
    /// Percentage (0–100) of delivered webhooks sent a second time (same body and event id,
    /// fresh timestamp and signature).
    pub webhook_duplicate_pct: u8,
    /// Hold back about a quarter of the webhooks and deliver them after later ones.
    pub reorder: bool,
    /// Each webhook waits a random 0..=`max_delay_ms` before delivery (0: none).
    pub max_delay_ms: u64,
    /// Every Nth webhook (counting those not lost) carries a bad signature.
    pub tamper_every: Option<u32>,
    /// Percentage (0–100) of API requests answered 503.
    pub api_5xx_pct: u8,
    /// Percentage (0–100) of API requests answered 429 with `Retry-After: 1`.
    pub api_429_pct: u8,
    /// Percentage (0–100) of API requests held for [`API_TIMEOUT`] before a 504.
    pub api_timeout_pct: u8,
}

/// How long an injected API timeout holds the request (longer than any client timeout).
pub const API_TIMEOUT: Duration = Duration::from_secs(15);

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// The provider kind to play.
    pub kind: ProviderKind,
    /// Seed of every random choice (paths, amounts, ids, faults).
    pub seed: u64,
    /// Faults to inject; can be changed later with [`Simulator::set_faults`].
    pub faults: Faults,
    /// Full URL webhooks are POSTed to (e.g. `http://127.0.0.1:8080/webhooks/fiserv`);
    /// `None` sends none.
    pub webhook_target: Option<String>,
    /// Further daemons (URLs with the same path as `webhook_target`) that deliveries rotate
    /// across with it: several instances with no balancer in front, each attempt going to
    /// the next one.
    pub more_webhook_targets: Vec<String>,
    /// Requests per second the API accepts; more are answered 429 with `Retry-After: 1`.
    pub max_rps: Option<u32>,
}

impl SimConfig {
    /// A config for `kind` with `seed`, no faults, no webhook target and no rate limit.
    pub fn new(kind: ProviderKind, seed: u64) -> SimConfig {
        SimConfig {
            kind,
            seed,
            faults: Faults::default(),
            webhook_target: None,
            more_webhook_targets: Vec::new(),
            max_rps: None,
        }
    }
}

/// The simulator's truth about one cash-out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Truth {
    /// The provider's id (Fiserv `txid`, SimPay `transaction_id`, Tupay `cashout_id`,
    /// Mannco `cashoutId`, Pismo `authorization_id`).
    pub provider_ref: String,
    /// The platform's id as the provider echoes it on the wire (SimPay `tag`, Tupay
    /// `external_id`, Pismo `idempotency_key`); `None` for Fiserv and Mannco, which echo none.
    pub external_id: Option<String>,
    /// The platform's id the cash-out was created with (`ext-<kind>-<n>`), echoed or not:
    /// what a ledger entry for it carries.
    pub ledger_external_id: String,
    /// The canonical state the daemon must reach (the provider state mapped by the provider
    /// module's `map_status`, folded through the transition rule, so Fiserv 4 after 3 is
    /// `reversed`).
    pub status: CashoutStatus,
    /// A pending cash-out the provider holds (Tupay 5).
    pub held: bool,
    /// The provider's own status text (`"3"`, `"SUCCESS"`, `"completed"`).
    pub raw_status: String,
    /// The provider's reason or rejection code, when the current state has one.
    pub reason_code: Option<String>,
    /// Amount in minor units of `currency`.
    pub amount_minor: i64,
    /// ISO 4217 code.
    pub currency: String,
    /// Fee in minor units where the provider reports one (SimPay, Mannco).
    pub fee_minor: Option<i64>,
}

/// Counters of what the simulator did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Webhook events generated (one per creation or state change that has a webhook).
    pub webhook_events: usize,
    /// HTTP POST attempts made to the target: every copy, retry and tampered request.
    pub webhooks_sent: usize,
    /// Events dropped on purpose (never sent).
    pub webhooks_lost: usize,
    /// Events delivered a second time.
    pub webhooks_duplicated: usize,
    /// Events sent once with a bad signature (and then treated as lost).
    pub webhooks_tampered: usize,
    /// Tampered events the target answered 2xx (the daemon must answer 401).
    pub tampered_accepted: usize,
    /// Events still not answered 2xx after all retries (treated as lost).
    pub webhooks_failed: usize,
    /// HTTP status of every webhook attempt (0: no answer).
    pub webhook_responses: BTreeMap<u16, usize>,
    /// Cash-outs in their final planned state whose last webhook did not reach the target
    /// (lost, tampered or failed; or no target): only polling can reveal the final state.
    pub lost_final_state: usize,
    /// Requests the API received.
    pub api_requests: usize,
    /// API requests answered with an injected fault (5xx, 429 or a timeout).
    pub api_faults: usize,
    /// API requests refused by the `max_rps` limiter (429).
    pub api_rate_limited: usize,
    /// API requests answered 401 (bad or missing credentials).
    pub api_auth_failures: usize,
}

/// A running provider simulator. Cheap to clone: clones share one simulator.
#[derive(Clone)]
pub struct Simulator {
    inner: Arc<Inner>,
}

/// Salts that separate the three random streams drawn from one seed.
const PLAN_SALT: u64 = 0x5eed_0001_cafe_f00d;
const WEBHOOK_SALT: u64 = 0x5eed_0002_dead_beef;
const API_SALT: u64 = 0x5eed_0003_0bad_c0de;

/// How many webhooks are in flight at once.
const DELIVERY_CONCURRENCY: usize = 32;
/// Delivery attempts per webhook copy (a real provider retries a failed delivery).
const DELIVERY_ATTEMPTS: u32 = 3;
/// Backoff before the first retry; doubled for each further one.
const RETRY_BACKOFF: Duration = Duration::from_millis(100);
/// Share (percent) of webhooks held back when `reorder` is on.
const REORDER_PCT: u32 = 25;
/// Lifetime of the tokens the simulator issues.
pub(crate) const TOKEN_TTL_SECS: i64 = 3600;

impl Simulator {
    /// A simulator that serves nothing, for printing the config block of one that runs
    /// (or will run) on `listen` (`simulate --print-config`): no socket is bound, so the
    /// address may be in use, by that very simulator. Its port must be given (port 0 is
    /// only known once a server binds it).
    pub fn offline(config: SimConfig, listen: &str) -> anyhow::Result<Simulator> {
        let address = std::net::ToSocketAddrs::to_socket_addrs(listen)
            .with_context(|| format!("resolving {listen}"))?
            .next()
            .with_context(|| format!("{listen} resolves to no address"))?;
        if address.port() == 0 {
            anyhow::bail!(
                "--listen {listen}: port 0 picks a port only when the simulator runs; give the \
                 port of the simulator whose config block to print"
            );
        }
        Ok(Simulator {
            inner: Simulator::prepare(&config, address)?,
        })
    }

    /// Everything of a simulator but its server, for one reached at `address`.
    fn prepare(config: &SimConfig, address: std::net::SocketAddr) -> anyhow::Result<Arc<Inner>> {
        check_faults(&config.faults)?;
        if config.max_rps == Some(0) {
            anyhow::bail!("max_rps must be at least 1");
        }
        let target_path = match &config.webhook_target {
            Some(target) => Some(webhook_path(target)?),
            None => None,
        };
        for more in &config.more_webhook_targets {
            // Fiserv signs the path: every target must share it.
            if target_path.is_none() || Some(webhook_path(more)?) != target_path {
                anyhow::bail!(
                    "webhook target {more} must have the path of the first target ({:?})",
                    config.webhook_target
                );
            }
        }
        let host = if address.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            address.ip().to_string()
        };
        let base_url = if address.is_ipv6() {
            format!("http://[{host}]:{}", address.port())
        } else {
            format!("http://{host}:{}", address.port())
        };
        let Some(sim) = config.kind.spec().simulator() else {
            anyhow::bail!("kind {} has no simulator", config.kind);
        };
        let currencies = sim
            .currencies()
            .iter()
            .map(|code| Currency::from_code(code))
            .collect::<Result<Vec<_>, _>>()
            .context("a simulator currency is not in the ISO 4217 table")?;
        if currencies.is_empty() {
            anyhow::bail!("the {} simulator names no currency", config.kind);
        }
        let credentials = sim
            .credentials()
            .iter()
            .map(|name| (*name, credential_value(config.kind, name, config.seed)))
            .collect();
        let key_file = sim.key_file()?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .no_proxy()
            .build()
            .context("building the webhook HTTP client")?;
        let inner = Arc::new(Inner {
            kind: config.kind,
            sim,
            currencies,
            base_url,
            webhook_target: config.webhook_target.clone(),
            more_webhook_targets: config.more_webhook_targets.clone(),
            next_target: AtomicUsize::new(0),
            target_path,
            max_rps: config.max_rps,
            credentials,
            key_file,
            faults: Mutex::new(config.faults.clone()),
            book: Mutex::new(Book {
                cashouts: Vec::new(),
                by_ref: HashMap::new(),
                plan_rng: StdRng::seed_from_u64(config.seed ^ PLAN_SALT),
                webhook_rng: StdRng::seed_from_u64(config.seed ^ WEBHOOK_SALT),
                next_event: 0,
                counted_for_tamper: 0,
                held: Vec::new(),
            }),
            undelivered: Mutex::new(HashSet::new()),
            stats: Mutex::new(SimStats::default()),
            api_rng: Mutex::new(StdRng::seed_from_u64(config.seed ^ API_SALT)),
            limiter: Mutex::new((Instant::now(), 0)),
            tokens: Mutex::new(HashMap::new()),
            token_counter: AtomicU64::new(0),
            http,
            tasks: Mutex::new(Tasks::default()),
            server: Mutex::new(None),
        });
        Ok(inner)
    }

    /// Starts the simulator's HTTP server on `listen` (e.g. `127.0.0.1:0`).
    pub async fn start(config: SimConfig, listen: &str) -> anyhow::Result<Simulator> {
        let listener =
            TcpListener::bind(listen).with_context(|| format!("binding simulator to {listen}"))?;
        let address = listener
            .local_addr()
            .context("reading the simulator's bound address")?;
        let inner = Simulator::prepare(&config, address)?;
        let data = web::Data::from(inner.clone());
        let server = actix_web::HttpServer::new(move || {
            actix_web::App::new()
                .app_data(data.clone())
                .default_service(web::to(serve_api))
        })
        .workers(1)
        .disable_signals()
        .listen(listener)
        .context("starting the simulator's HTTP listener")?
        .run();
        *lock(&inner.server) = Some(server.handle());
        tokio::spawn(async move {
            if let Err(err) = server.await {
                tracing::warn!(error = %err, "simulator HTTP server failed");
            }
        });
        tracing::info!(kind = %config.kind, base_url = inner.base_url, "simulator started");
        Ok(Simulator { inner })
    }

    /// The provider kind this simulator plays.
    pub fn kind(&self) -> ProviderKind {
        self.inner.kind
    }

    /// The API's base URL, `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        self.inner.base_url.clone()
    }

    /// A complete `[[providers]]` block for the daemon's config pointing at this simulator:
    /// credentials and secrets are read from environment variables named `{env_prefix}_…`
    /// (values from [`Simulator::env_vars`]); `poll_every` and `status_after` are `"1s"`,
    /// `stuck_after` and `silent_after` `"10m"`, `ledger = true`.
    pub fn provider_toml(&self, id: &str, env_prefix: &str) -> String {
        let inner = &self.inner;
        let max_rps = inner.max_rps.unwrap_or(100);
        let mut toml = format!(
            "[[providers]]\n\
             id = \"{id}\"\n\
             kind = \"{kind}\"\n\
             base_url = \"{base}\"\n\
             poll_every = \"1s\"\n\
             status_after = \"1s\"\n\
             stuck_after = \"10m\"\n\
             silent_after = \"10m\"\n\
             max_rps = {max_rps}\n\
             ledger = true\n",
            kind = inner.kind,
            base = inner.base_url,
        );
        toml.push_str(&inner.sim.toml_lines(env_prefix, inner));
        toml
    }

    /// The values of the environment variables [`Simulator::provider_toml`] names. They are
    /// the simulator's test credentials, deterministic from the seed, not secrets.
    pub fn env_vars(&self, env_prefix: &str) -> Vec<(String, String)> {
        self.inner
            .credentials
            .iter()
            .map(|(name, value)| (format!("{env_prefix}_{name}"), value.clone()))
            .collect()
    }

    /// Creates `n` cash-outs in the provider's initial state and returns their provider
    /// refs. Amounts, currencies, fees and paths are drawn from the seed; external ids are
    /// `ext-<kind>-<n>` counting from 1 over the simulator's life. Where the provider has a
    /// creation webhook (Fiserv 0, SimPay `PIX_CASHOUT_CREATED`/NEW, Pismo PROCESSING) it
    /// is sent in the background (faults apply); [`Simulator::advance`] waits for it first.
    pub fn create_cashouts(&self, n: usize) -> Vec<String> {
        let inner = &self.inner;
        let now = now_millis();
        let faults = inner.faults();
        let mut refs = Vec::with_capacity(n);
        let mut outgoing = Vec::new();
        {
            let mut book = lock(&inner.book);
            for _ in 0..n {
                let number = book.cashouts.len() as u64 + 1;
                let external_id = format!("ext-{}-{number}", inner.kind);
                let cashout = {
                    let Book {
                        plan_rng, by_ref, ..
                    } = &mut *book;
                    let mut cashout = inner.sim.new_cashout(
                        plan_rng,
                        number,
                        external_id,
                        now,
                        &inner.currencies,
                    );
                    // Ids drawn at random could repeat; the provider's never do.
                    while by_ref.contains_key(&cashout.provider_ref) {
                        cashout.provider_ref.push('0');
                    }
                    cashout
                };
                let index = book.cashouts.len();
                refs.push(cashout.provider_ref.clone());
                book.by_ref.insert(cashout.provider_ref.clone(), index);
                book.cashouts.push(cashout);
                if inner.sim.creation_webhook() {
                    if let Some(out) = inner.new_event(&mut book, index, &faults) {
                        outgoing.push(out);
                    }
                }
            }
        }
        if !outgoing.is_empty() {
            let (now_batch, later) = split_delayed(outgoing);
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    let task_inner = inner.clone();
                    let handle = runtime.spawn(async move {
                        Inner::send_batch(&task_inner, now_batch).await;
                    });
                    lock(&inner.tasks).creation.push(handle);
                }
                // Without a runtime nothing can be sent now: deliver them with the next step.
                Err(_) => lock(&inner.book).held.extend(now_batch),
            }
            inner.spawn_delayed(later);
        }
        refs
    }

    /// Moves every cash-out whose plan is not exhausted one step, sending the webhook of each
    /// change (faults apply) and, after them, the webhooks held back for reordering in the
    /// previous step. Returns how many cash-outs changed.
    pub async fn advance(&self) -> usize {
        let inner = &self.inner;
        inner.await_creation().await;
        let faults = inner.faults();
        let now = now_millis();
        let mut changed = 0;
        let mut outgoing = Vec::new();
        let previously_held = {
            let mut book = lock(&inner.book);
            let previously_held = std::mem::take(&mut book.held);
            for index in 0..book.cashouts.len() {
                let cashout = &mut book.cashouts[index];
                if cashout.pos + 1 >= cashout.path.len() {
                    continue;
                }
                cashout.pos += 1;
                cashout.updated_at = later_than(now, cashout.updated_at);
                changed += 1;
                if let Some(out) = inner.new_event(&mut book, index, &faults) {
                    outgoing.push(out);
                }
            }
            previously_held
        };
        let (now_batch, later) = split_delayed(outgoing);
        inner.spawn_delayed(later);
        Inner::send_batch(inner, now_batch).await;
        let mut previously_held = previously_held;
        previously_held.shuffle(&mut lock(&inner.book).webhook_rng);
        Inner::send_batch(inner, previously_held).await;
        changed
    }

    /// Advances until every cash-out has reached the end of its plan, then flushes.
    pub async fn run_to_completion(&self) {
        while self.advance().await > 0 {}
        self.flush().await;
    }

    /// Delivers everything held back for reordering and waits for every delayed or
    /// background delivery.
    pub async fn flush(&self) {
        let inner = &self.inner;
        inner.await_creation().await;
        let held = {
            let mut book = lock(&inner.book);
            let mut held = std::mem::take(&mut book.held);
            held.shuffle(&mut book.webhook_rng);
            held
        };
        Inner::send_batch(inner, held).await;
        loop {
            let delayed = std::mem::take(&mut lock(&inner.tasks).delayed);
            if delayed.is_empty() {
                break;
            }
            for handle in delayed {
                if let Err(err) = handle.await {
                    tracing::warn!(error = %err, "delayed webhook task failed");
                }
            }
        }
    }

    /// The truth about every cash-out, in creation order.
    pub fn ground_truth(&self) -> Vec<Truth> {
        let inner = &self.inner;
        let book = lock(&inner.book);
        book.cashouts
            .iter()
            .map(|cashout| inner.truth(cashout))
            .collect()
    }

    /// What the simulator did so far.
    pub fn stats(&self) -> SimStats {
        let inner = &self.inner;
        let mut stats = lock(&inner.stats).clone();
        let undelivered = lock(&inner.undelivered).clone();
        let book = lock(&inner.book);
        let no_target = inner.webhook_target.is_none();
        stats.lost_final_state = book
            .cashouts
            .iter()
            .filter(|cashout| cashout.pos + 1 == cashout.path.len())
            .filter(|cashout| match cashout.last_event {
                Some(event) => no_target || undelivered.contains(&event),
                None => false,
            })
            .count();
        stats
    }

    /// Replaces the faults injected from now on; invalid percentages are clamped to 100.
    pub fn set_faults(&self, faults: Faults) {
        let clamp = |pct: u8| pct.min(100);
        let faults = Faults {
            webhook_loss_pct: clamp(faults.webhook_loss_pct),
            webhook_duplicate_pct: clamp(faults.webhook_duplicate_pct),
            api_5xx_pct: clamp(faults.api_5xx_pct),
            api_429_pct: clamp(faults.api_429_pct),
            api_timeout_pct: clamp(faults.api_timeout_pct),
            tamper_every: faults.tamper_every.filter(|n| *n > 0),
            ..faults
        };
        *lock(&self.inner.faults) = faults;
    }

    /// Invalidates every access token the simulator has issued (SimPay, Tupay, Mannco), so
    /// the next API call with one is answered 401 and the client must log in again.
    pub fn revoke_tokens(&self) {
        lock(&self.inner.tokens).clear();
    }

    /// Stops the HTTP server (without waiting for held requests) and abandons delayed
    /// deliveries.
    pub async fn stop(&self) {
        let inner = &self.inner;
        let tasks = std::mem::take(&mut *lock(&inner.tasks));
        for handle in tasks.creation.into_iter().chain(tasks.delayed) {
            handle.abort();
        }
        let handle = lock(&inner.server).take();
        if let Some(handle) = handle {
            handle.stop(false).await;
        }
    }
}

fn check_faults(faults: &Faults) -> anyhow::Result<()> {
    for (name, pct) in [
        ("webhook_loss_pct", faults.webhook_loss_pct),
        ("webhook_duplicate_pct", faults.webhook_duplicate_pct),
        ("api_5xx_pct", faults.api_5xx_pct),
        ("api_429_pct", faults.api_429_pct),
        ("api_timeout_pct", faults.api_timeout_pct),
    ] {
        if pct > 100 {
            anyhow::bail!("faults.{name} is {pct}; a percentage is at most 100");
        }
    }
    let api_total = u16::from(faults.api_5xx_pct)
        + u16::from(faults.api_429_pct)
        + u16::from(faults.api_timeout_pct);
    if api_total > 100 {
        anyhow::bail!("the API fault percentages add up to {api_total}, over 100");
    }
    if faults.tamper_every == Some(0) {
        anyhow::bail!("faults.tamper_every must be at least 1");
    }
    Ok(())
}

/// The path (and query) of the webhook target URL: what Fiserv signs.
fn webhook_path(target: &str) -> anyhow::Result<String> {
    let url = reqwest::Url::parse(target)
        .with_context(|| format!("webhook target {target:?} is not a URL"))?;
    Ok(match url.query() {
        Some(query) => format!("{}?{query}", url.path()),
        None => url.path().to_string(),
    })
}

/// A test credential of `kind`, readable and deterministic from the seed.
fn credential_value(kind: ProviderKind, name: &str, seed: u64) -> String {
    format!(
        "sim-{}-{}-{seed:x}",
        kind.as_str().replace('_', "-"),
        name.to_ascii_lowercase().replace('_', "-")
    )
}

/// The kinds that have a simulator, in registry order.
pub fn simulated_kinds() -> impl Iterator<Item = ProviderKind> {
    ProviderKind::ALL
        .into_iter()
        .filter(|kind| kind.spec().simulator().is_some())
}

/// One provider kind's part of a simulator, reached through the kind's
/// [`crate::providers::spec::KindSpec::simulator`].
pub(crate) trait KindSim: Send + Sync {
    /// The `[[providers]]` id the harness gives it, when not the kind's name.
    fn provider_id(&self) -> Option<&'static str> {
        None
    }

    /// A file the daemon's config must name (Pismo's public key), written at start.
    fn key_file(&self) -> anyhow::Result<Option<std::path::PathBuf>> {
        Ok(None)
    }

    /// Credential names (suffixes of the env vars), in the order `env_vars` lists them.
    fn credentials(&self) -> &'static [&'static str];

    /// The kind-specific lines of the `[[providers]]` block.
    fn toml_lines(&self, env_prefix: &str, sim: &Inner) -> String;

    /// The currencies its cash-outs use (ISO 4217 codes, at least one), resolved at start.
    fn currencies(&self) -> &'static [&'static str];

    /// Draws a new cash-out (amount, currency, fee, ids and planned path); `currencies` are
    /// those of [`KindSim::currencies`], in the same order.
    fn new_cashout(
        &self,
        rng: &mut StdRng,
        number: u64,
        external_id: String,
        now: DateTime<Utc>,
        currencies: &[Currency],
    ) -> Cashout;

    /// The canonical update a provider state stands for, through the provider module's
    /// `map_status`.
    fn update(&self, step: &Step) -> Result<StatusUpdate, ParseError>;

    /// Whether the provider echoes the platform's id on the wire.
    fn echoes_external_id(&self) -> bool;

    /// Whether the initial state has a webhook of its own.
    fn creation_webhook(&self) -> bool;

    /// The webhook for the cash-out's current state (`None`: this state sends none).
    fn webhook(&self, cashout: &Cashout, sim: &Inner, rng: &mut StdRng) -> Option<WebhookBody>;

    /// Headers and body of one delivery attempt, signed at `now_unix`; `tamper` corrupts the
    /// signature.
    fn sign(
        &self,
        event: &WebhookBody,
        sim: &Inner,
        now_unix: i64,
        tamper: bool,
    ) -> anyhow::Result<SignedRequest>;

    /// Answers an API request whose credentials are still to be checked.
    fn handle(&self, sim: &Inner, request: &HttpRequest, body: &[u8]) -> HttpResponse;
}

/// One state of a provider's path: its status as the provider writes it and the reason
/// (Fiserv `failReason`, Tupay `rejection_code`, SimPay `error`) when there is one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Step {
    pub status: &'static str,
    pub reason: Option<&'static str>,
}

impl Step {
    /// A step without a reason.
    pub(crate) const fn plain(status: &'static str) -> Step {
        Step {
            status,
            reason: None,
        }
    }

    /// A step with a reason code.
    pub(crate) const fn with_reason(status: &'static str, reason: &'static str) -> Step {
        Step {
            status,
            reason: Some(reason),
        }
    }
}

/// The simulator's record of one cash-out.
#[derive(Clone, Debug)]
pub(crate) struct Cashout {
    pub provider_ref: String,
    pub external_id: String,
    pub amount_minor: i64,
    pub currency: Currency,
    pub fee_minor: Option<i64>,
    /// Mannco's payout method (`payoneer`, `tipalti`).
    pub method: Option<&'static str>,
    /// Fiserv sends this cash-out's amount as a JSON string rather than a number.
    pub amount_as_text: bool,
    /// Pismo's account id.
    pub account_id: u64,
    /// Planned provider states; `path[0]` is the initial one.
    pub path: Vec<Step>,
    /// Index of the current state in `path`.
    pub pos: usize,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The event number of the last webhook generated for it.
    pub last_event: Option<u64>,
}

impl Cashout {
    /// A cash-out at the start of `path`, created `now`.
    pub(crate) fn new(
        provider_ref: String,
        external_id: String,
        amount_minor: i64,
        currency: Currency,
        path: Vec<Step>,
        now: DateTime<Utc>,
    ) -> Cashout {
        Cashout {
            provider_ref,
            external_id,
            amount_minor,
            currency,
            fee_minor: None,
            method: None,
            amount_as_text: false,
            account_id: 0,
            path,
            pos: 0,
            created_at: now,
            updated_at: now,
            last_event: None,
        }
    }

    /// The current provider state.
    pub(crate) fn step(&self) -> &Step {
        // `pos` only moves while `pos + 1 < path.len()`, and paths are never empty.
        &self.path[self.pos.min(self.path.len().saturating_sub(1))]
    }

    /// The previous provider state, if any.
    pub(crate) fn previous_step(&self) -> Option<&Step> {
        self.pos.checked_sub(1).and_then(|pos| self.path.get(pos))
    }

    /// The amount as decimal text with the currency's digits (`12.34`).
    pub(crate) fn amount_text(&self) -> String {
        self.currency.format_minor(self.amount_minor)
    }
}

/// A webhook event before signing: the exact body and its event id.
#[derive(Clone, Debug)]
pub(crate) struct WebhookBody {
    /// The provider's event id (`x-request-id`, Pismo `event_id`); for Tupay a local
    /// number (its notifications carry none).
    pub event_id: String,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

/// One signed delivery attempt.
pub(crate) struct SignedRequest {
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// A webhook event with its fate decided.
#[derive(Clone, Debug)]
struct Outgoing {
    event_number: u64,
    webhook: WebhookBody,
    tamper: bool,
    duplicate: bool,
    delay: Duration,
}

/// Cash-outs, the plan and webhook RNGs, and what is held back.
struct Book {
    cashouts: Vec<Cashout>,
    by_ref: HashMap<String, usize>,
    plan_rng: StdRng,
    webhook_rng: StdRng,
    next_event: u64,
    /// Events not lost so far (the count `tamper_every` divides).
    counted_for_tamper: u64,
    /// Events held back for reordering, delivered after the next step's.
    held: Vec<Outgoing>,
}

#[derive(Default)]
struct Tasks {
    creation: Vec<JoinHandle<()>>,
    delayed: Vec<JoinHandle<()>>,
}

/// Shared state of one simulator (the kind modules read it through these fields).
pub(crate) struct Inner {
    kind: ProviderKind,
    sim: &'static dyn KindSim,
    /// The kind's currencies, resolved (never empty).
    currencies: Vec<Currency>,
    base_url: String,
    webhook_target: Option<String>,
    /// Targets that deliveries rotate across with `webhook_target`.
    more_webhook_targets: Vec<String>,
    /// The next delivery attempt's target, counting `webhook_target` as 0.
    next_target: AtomicUsize,
    /// Path (and query) of the webhook target, for Fiserv's signature.
    target_path: Option<String>,
    max_rps: Option<u32>,
    credentials: Vec<(&'static str, String)>,
    /// Pismo: where the public key the daemon verifies with was written.
    key_file: Option<std::path::PathBuf>,
    faults: Mutex<Faults>,
    book: Mutex<Book>,
    /// Event numbers that did not reach the target (lost, tampered, failed).
    undelivered: Mutex<HashSet<u64>>,
    stats: Mutex<SimStats>,
    api_rng: Mutex<StdRng>,
    /// Start of the current one-second window and the requests counted in it.
    limiter: Mutex<(Instant, u32)>,
    /// Issued tokens and their expiry.
    tokens: Mutex<HashMap<String, DateTime<Utc>>>,
    token_counter: AtomicU64,
    http: reqwest::Client,
    tasks: Mutex<Tasks>,
    server: Mutex<Option<ServerHandle>>,
}

impl Inner {
    /// The credential `name` (one of the kind's `credentials()`); empty if unknown.
    pub(crate) fn credential(&self, name: &str) -> &str {
        self.credentials
            .iter()
            .find(|(n, _)| *n == name)
            .map_or("", |(_, value)| value.as_str())
    }

    /// The path of the webhook target (for signatures over it).
    pub(crate) fn target_path(&self) -> &str {
        self.target_path.as_deref().unwrap_or("/")
    }

    /// Pismo: the public key file the daemon is configured with.
    pub(crate) fn key_file(&self) -> Option<&std::path::Path> {
        self.key_file.as_deref()
    }

    fn faults(&self) -> Faults {
        lock(&self.faults).clone()
    }

    /// Runs `read` over the cash-outs, in creation order.
    pub(crate) fn with_cashouts<T>(&self, read: impl FnOnce(&[Cashout]) -> T) -> T {
        read(&lock(&self.book).cashouts)
    }

    /// Runs `read` over the cash-out with this provider ref, if any.
    pub(crate) fn with_cashout<T>(
        &self,
        provider_ref: &str,
        read: impl FnOnce(&Cashout) -> T,
    ) -> Option<T> {
        let book = lock(&self.book);
        let index = *book.by_ref.get(provider_ref)?;
        book.cashouts.get(index).map(read)
    }

    /// Issues a new access token valid for [`TOKEN_TTL_SECS`].
    pub(crate) fn issue_token(&self, prefix: &str) -> String {
        let mut bytes = [0u8; 16];
        lock(&self.api_rng).fill_bytes(&mut bytes);
        let serial = self.token_counter.fetch_add(1, Ordering::Relaxed);
        let token = format!("{prefix}{serial}.{}", hex::encode(bytes));
        let expiry = Utc::now() + chrono::Duration::seconds(TOKEN_TTL_SECS);
        lock(&self.tokens).insert(token.clone(), expiry);
        token
    }

    /// Whether `Authorization: Bearer <token>` carries a token this simulator issued and
    /// has not revoked or seen expire.
    pub(crate) fn bearer_is_valid(&self, request: &HttpRequest) -> bool {
        let Some(token) = bearer(request) else {
            return false;
        };
        lock(&self.tokens)
            .get(token)
            .is_some_and(|expiry| *expiry > Utc::now())
    }

    /// The truth about one cash-out.
    fn truth(&self, cashout: &Cashout) -> Truth {
        let state = canonical_state(self.sim, cashout);
        let step = cashout.step();
        Truth {
            provider_ref: cashout.provider_ref.clone(),
            external_id: self
                .sim
                .echoes_external_id()
                .then(|| cashout.external_id.clone()),
            ledger_external_id: cashout.external_id.clone(),
            status: state.status,
            held: state.held,
            raw_status: step.status.to_string(),
            reason_code: step.reason.map(str::to_string),
            amount_minor: cashout.amount_minor,
            currency: cashout.currency.code().to_string(),
            fee_minor: cashout.fee_minor,
        }
    }

    /// Builds the webhook of cash-out `index`'s current state and decides its fate
    /// (lost, tampered, duplicated, held, delayed). `None` when the state sends none or
    /// the webhook is lost.
    fn new_event(&self, book: &mut Book, index: usize, faults: &Faults) -> Option<Outgoing> {
        let webhook = {
            let Book {
                cashouts,
                webhook_rng,
                ..
            } = &mut *book;
            self.sim.webhook(&cashouts[index], self, webhook_rng)?
        };
        let event_number = book.next_event;
        book.next_event += 1;
        book.cashouts[index].last_event = Some(event_number);
        lock(&self.stats).webhook_events += 1;
        // Without a target the event exists (for the truth) but is never sent.
        self.webhook_target.as_ref()?;
        let rng = &mut book.webhook_rng;
        if roll(rng, faults.webhook_loss_pct) {
            lock(&self.stats).webhooks_lost += 1;
            lock(&self.undelivered).insert(event_number);
            return None;
        }
        book.counted_for_tamper += 1;
        let tamper = faults
            .tamper_every
            .is_some_and(|every| every > 0 && book.counted_for_tamper % u64::from(every) == 0);
        let rng = &mut book.webhook_rng;
        let duplicate = roll(rng, faults.webhook_duplicate_pct);
        let hold = faults.reorder && rng.random_range(0..100u32) < REORDER_PCT;
        let delay = if faults.max_delay_ms > 0 {
            Duration::from_millis(rng.random_range(0..=faults.max_delay_ms))
        } else {
            Duration::ZERO
        };
        let outgoing = Outgoing {
            event_number,
            webhook,
            tamper,
            duplicate,
            delay,
        };
        if hold {
            book.held.push(outgoing);
            return None;
        }
        Some(outgoing)
    }

    async fn await_creation(&self) {
        loop {
            let creation = std::mem::take(&mut lock(&self.tasks).creation);
            if creation.is_empty() {
                return;
            }
            for handle in creation {
                if let Err(err) = handle.await {
                    tracing::warn!(error = %err, "creation webhook task failed");
                }
            }
        }
    }

    fn spawn_delayed(self: &Arc<Self>, delayed: Vec<Outgoing>) {
        if delayed.is_empty() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            lock(&self.book).held.extend(delayed);
            return;
        };
        let mut handles = Vec::with_capacity(delayed.len());
        for outgoing in delayed {
            let inner = self.clone();
            handles.push(runtime.spawn(async move {
                tokio::time::sleep(outgoing.delay).await;
                inner.deliver(outgoing).await;
            }));
        }
        lock(&self.tasks).delayed.extend(handles);
    }

    async fn send_batch(inner: &Arc<Inner>, batch: Vec<Outgoing>) {
        stream::iter(batch)
            .for_each_concurrent(DELIVERY_CONCURRENCY, |outgoing| async move {
                inner.deliver(outgoing).await;
            })
            .await;
    }

    /// Delivers one event: once with a bad signature when tampered, else with retries, and
    /// a second time when duplicated.
    async fn deliver(&self, outgoing: Outgoing) {
        if outgoing.tamper {
            let status = self.attempt(&outgoing.webhook, true).await;
            let mut stats = lock(&self.stats);
            stats.webhooks_tampered += 1;
            if status.is_some_and(is_success) {
                stats.tampered_accepted += 1;
            }
            drop(stats);
            lock(&self.undelivered).insert(outgoing.event_number);
            return;
        }
        if !self.attempt_with_retries(&outgoing.webhook).await {
            lock(&self.stats).webhooks_failed += 1;
            lock(&self.undelivered).insert(outgoing.event_number);
            return;
        }
        if outgoing.duplicate {
            self.attempt_with_retries(&outgoing.webhook).await;
            lock(&self.stats).webhooks_duplicated += 1;
        }
    }

    async fn attempt_with_retries(&self, webhook: &WebhookBody) -> bool {
        let mut backoff = RETRY_BACKOFF;
        for attempt in 1..=DELIVERY_ATTEMPTS {
            if self.attempt(webhook, false).await.is_some_and(is_success) {
                return true;
            }
            if attempt < DELIVERY_ATTEMPTS {
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
        }
        false
    }

    /// Where the next delivery attempt goes: `webhook_target`, then each of
    /// `more_webhook_targets` in turn.
    fn next_webhook_target(&self) -> Option<&str> {
        let first = self.webhook_target.as_deref()?;
        let turn = self.next_target.fetch_add(1, Ordering::Relaxed)
            % (1 + self.more_webhook_targets.len());
        Some(match turn {
            0 => first,
            more => &self.more_webhook_targets[more - 1],
        })
    }

    /// One POST of `webhook`, freshly signed; the HTTP status, `None` when nothing answered.
    async fn attempt(&self, webhook: &WebhookBody, tamper: bool) -> Option<u16> {
        let target = self.next_webhook_target()?;
        let signed = match self.sim.sign(webhook, self, Utc::now().timestamp(), tamper) {
            Ok(signed) => signed,
            Err(err) => {
                tracing::warn!(error = %err, "simulator cannot sign a webhook");
                return None;
            }
        };
        let mut request = self
            .http
            .post(target)
            .header("content-type", webhook.content_type)
            .body(signed.body);
        for (name, value) in &signed.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let status = match request.send().await {
            Ok(response) => Some(response.status().as_u16()),
            Err(err) => {
                tracing::warn!(target, error = %err, "simulated webhook not delivered");
                None
            }
        };
        match status {
            Some(code) if !is_success(code) && !tamper => {
                tracing::warn!(
                    target,
                    status = code,
                    "simulated webhook rejected by the daemon"
                );
            }
            Some(code) if !is_success(code) => {
                tracing::debug!(
                    target,
                    status = code,
                    "tampered webhook rejected, as it should be"
                );
            }
            _ => {}
        }
        let mut stats = lock(&self.stats);
        stats.webhooks_sent += 1;
        *stats
            .webhook_responses
            .entry(status.unwrap_or(0))
            .or_insert(0) += 1;
        status
    }

    /// Counts the request and answers it with a limiter 429 or an injected fault, if any.
    async fn gate(&self) -> Option<HttpResponse> {
        lock(&self.stats).api_requests += 1;
        if let Some(max_rps) = self.max_rps {
            let mut window = lock(&self.limiter);
            let now = Instant::now();
            if now.duration_since(window.0) >= Duration::from_secs(1) {
                *window = (now, 0);
            }
            window.1 += 1;
            if window.1 > max_rps {
                drop(window);
                lock(&self.stats).api_rate_limited += 1;
                return Some(too_many_requests());
            }
        }
        let faults = self.faults();
        let timeout = u32::from(faults.api_timeout_pct);
        let server_error = timeout + u32::from(faults.api_5xx_pct);
        let throttled = server_error + u32::from(faults.api_429_pct);
        if throttled == 0 {
            return None;
        }
        let draw = lock(&self.api_rng).random_range(0..100u32);
        if draw >= throttled {
            return None;
        }
        lock(&self.stats).api_faults += 1;
        if draw < timeout {
            tokio::time::sleep(API_TIMEOUT).await;
            return Some(HttpResponse::GatewayTimeout().finish());
        }
        if draw < server_error {
            return Some(
                HttpResponse::ServiceUnavailable()
                    .content_type("application/json")
                    .body(r#"{"error":"service temporarily unavailable"}"#),
            );
        }
        Some(too_many_requests())
    }
}

/// Every API request: counted, rate-limited, maybe faulted, then answered by the kind.
async fn serve_api(
    request: HttpRequest,
    body: web::Bytes,
    inner: web::Data<Inner>,
) -> HttpResponse {
    if let Some(response) = inner.gate().await {
        return response;
    }
    let response = inner.sim.handle(&inner, &request, &body);
    if response.status() == actix_web::http::StatusCode::UNAUTHORIZED {
        lock(&inner.stats).api_auth_failures += 1;
    }
    response
}

fn too_many_requests() -> HttpResponse {
    HttpResponse::TooManyRequests()
        .insert_header(("Retry-After", "1"))
        .content_type("application/json")
        .body(r#"{"error":"too many requests"}"#)
}

fn is_success(status: u16) -> bool {
    (200..300).contains(&status)
}

/// Splits events into those to send now and those to send after their delay.
fn split_delayed(batch: Vec<Outgoing>) -> (Vec<Outgoing>, Vec<Outgoing>) {
    batch.into_iter().partition(|out| out.delay.is_zero())
}

/// True with probability `pct`%.
fn roll(rng: &mut StdRng, pct: u8) -> bool {
    pct > 0 && rng.random_range(0..100u32) < u32::from(pct)
}

/// Locks a mutex, recovering the data if a panicking thread poisoned it (the simulator's
/// state stays usable for the test that is reporting the panic).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The state the daemon must reach: the path up to the current step folded through the
/// transition rule.
fn canonical_state(sim: &dyn KindSim, cashout: &Cashout) -> CurrentState {
    let mut current: Option<CurrentState> = None;
    for step in &cashout.path[..=cashout.pos.min(cashout.path.len().saturating_sub(1))] {
        match sim.update(step) {
            Ok(update) => current = Some(decide(current, update).next),
            Err(err) => tracing::error!(error = %err, "simulator planned an unmappable state"),
        }
    }
    current.unwrap_or(CurrentState {
        status: CashoutStatus::Pending,
        held: false,
    })
}

/// Now, to the millisecond (what the wire formats carry).
pub(crate) fn now_millis() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now)
}

/// `now`, or one millisecond after `previous` when the clock has not moved past it.
fn later_than(now: DateTime<Utc>, previous: DateTime<Utc>) -> DateTime<Utc> {
    if now > previous {
        now
    } else {
        previous + chrono::Duration::milliseconds(1)
    }
}

/// RFC 3339 UTC with milliseconds (`2026-11-20T12:00:00.000Z`).
pub(crate) fn rfc3339(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// A JSON number with exactly this decimal text (never through a float).
pub(crate) fn json_number(text: String) -> Box<RawValue> {
    RawValue::from_string(text).unwrap_or_else(|_| RawValue::NULL.to_owned())
}

/// A JSON string (escaped) as a raw value.
pub(crate) fn json_string(text: &str) -> Box<RawValue> {
    serde_json::to_string(text)
        .ok()
        .and_then(|quoted| RawValue::from_string(quoted).ok())
        .unwrap_or_else(|| RawValue::NULL.to_owned())
}

/// Serializes an answer; a failure (impossible for the simulator's types) is a 500.
pub(crate) fn json_response<T: serde::Serialize>(
    status: actix_web::http::StatusCode,
    value: &T,
) -> HttpResponse {
    match serde_json::to_string(value) {
        Ok(body) => HttpResponse::build(status)
            .content_type("application/json")
            .body(body),
        Err(err) => HttpResponse::InternalServerError().body(err.to_string()),
    }
}

/// A JSON answer from literal text.
pub(crate) fn json_text(status: actix_web::http::StatusCode, body: &'static str) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("application/json")
        .body(body)
}

/// The bearer token of `Authorization: Bearer <token>`.
pub(crate) fn bearer(request: &HttpRequest) -> Option<&str> {
    let value = request.headers().get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|token| !token.is_empty())
}

/// The request's headers as the verifiers take them.
pub(crate) fn request_headers(request: &HttpRequest) -> RequestHeaders {
    let mut headers = RequestHeaders::new();
    for (name, value) in request.headers() {
        if let Ok(value) = value.to_str() {
            headers.insert(name.as_str(), value);
        }
    }
    headers
}

/// Parses a query string leniently (a `+` a client left unencoded in an RFC 3339 offset
/// decodes as a space; it is put back by [`parse_time`]).
pub(crate) fn query_pairs(request: &HttpRequest) -> HashMap<String, String> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(request.query_string())
        .unwrap_or_default()
        .into_iter()
        .collect()
}

/// Parses RFC 3339 text from a query, restoring a `+` decoded as a space.
pub(crate) fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(&text.trim().replace(' ', "+"))
        .ok()
        .map(|time| time.with_timezone(&Utc))
}

/// Corrupts a signature by changing its character at `index` to another character of the
/// same alphabet (hex, base64 and base64url alike), so it still decodes but never matches.
pub(crate) fn flip_char(signature: &str, index: usize) -> String {
    signature
        .char_indices()
        .map(|(at, c)| {
            if at != index {
                c
            } else if c.is_ascii_uppercase() {
                if c == 'A' {
                    'B'
                } else {
                    'A'
                }
            } else if c == 'a' {
                'b'
            } else {
                'a'
            }
        })
        .collect()
}

/// Random bytes as a UUID (v4 layout), for deterministic event ids.
pub(crate) fn random_uuid(rng: &mut StdRng) -> String {
    let mut bytes = [0u8; 16];
    rng.fill_bytes(&mut bytes);
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .to_string()
}

/// A varied amount in minor units of `currency`: some cents, mostly everyday sums, some
/// large ones and some round ones.
pub(crate) fn draw_amount(rng: &mut StdRng, currency: Currency) -> i64 {
    let unit = 10i64.pow(u32::from(currency.minor_digits()));
    match rng.random_range(0..100u32) {
        0..=9 => rng.random_range(1..=unit.max(2) * 2),
        10..=79 => rng.random_range(unit..=5_000 * unit),
        80..=94 => rng.random_range(10_000 * unit..=2_000_000 * unit),
        _ => rng.random_range(1..=1_000i64) * unit,
    }
}

#[cfg(test)]
mod tests;
