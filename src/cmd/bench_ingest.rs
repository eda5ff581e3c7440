//! `bench-ingest`: in-process throughput and latency of webhook ingestion against a no-op
//! baseline, on SQLite, on PostgreSQL with one and with two instances, or all in one run.
//!
//! Each store under test gets daemons built on `127.0.0.1:0` with one `fiserv_pix`
//! provider: SQLite a fresh file in a temporary directory; PostgreSQL a fresh database
//! created on the server of `$CASHOUT_RECON_DATABASE_URL` (or `--url-env`) and dropped
//! afterwards, shared by one or two daemons (the load split evenly across them). For each
//! target (`POST /bench/noop` once, then `POST /webhooks/fiserv` per store) N closed-loop
//! connections — each its own keep-alive HTTP/1.1 connection — send their next request as
//! soon as the previous one is answered. Every request is a freshly signed, unique Fiserv
//! webhook (signed per request, in the load generator, for both targets so the
//! client-side cost is the same). Latencies go into an HDR histogram (bounded memory).
//! At the end each store must hold exactly as many webhook events as were answered 2xx.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::dev::ServerHandle;
use anyhow::Context;
use base64::Engine as _;
use prometheus::core::Metric as _;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::CommandError;
use crate::app::{App, AppOptions};
use crate::config::{Settings, DEFAULT_POSTGRES_URL_ENV};
use crate::metrics::Metrics;
use crate::store::postgres::scratch::ScratchDatabase;
use crate::store::postgres::{from_postgres, PgOptions, PgStore};
use crate::store::StoreError;
use crate::verify::hmac::{hmac_bytes, HmacAlgorithm};

/// Which stores `bench-ingest` measures.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    /// The embedded SQLite store (one instance).
    Sqlite,
    /// PostgreSQL, with each instance count of `--instances`.
    Postgres,
    /// SQLite, then PostgreSQL with each instance count of `--instances`, in one run.
    Both,
}

/// Options of `cashout-recon bench-ingest`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchIngestArgs {
    /// Concurrent keep-alive connections, each with one request in flight (split evenly
    /// across the instances).
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Measured time per target (after the warm-up), e.g. "10s".
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Unmeasured time per target before measuring, e.g. "2s".
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Size of each webhook body in bytes (padded; the minimum is the bare webhook).
    #[arg(long, default_value_t = 400)]
    pub body_bytes: usize,
    /// HTTP worker threads of each daemon (default: one per core, as `serve`).
    #[arg(long)]
    pub workers: Option<usize>,
    /// After the run, measure the SQLite store's bytes per webhook on disk, then drop every
    /// raw body and header as retention would and measure again (for sizing).
    #[arg(long)]
    pub measure_size: bool,
    /// The stores measured: sqlite, postgres, or both in the same run.
    #[arg(long, value_enum, default_value_t = BackendChoice::Sqlite)]
    pub backend: BackendChoice,
    /// PostgreSQL only: daemons sharing the database, e.g. "1", "2" or "1,2" (each count
    /// measured in turn; default 1,2).
    #[arg(long, value_delimiter = ',')]
    pub instances: Option<Vec<usize>>,
    /// The variable holding the PostgreSQL server's connection string (`store.url_env`);
    /// its role must be allowed to CREATE DATABASE. The bench creates a fresh database
    /// there and drops it at the end; the database the URL names is not touched.
    #[arg(long, default_value = DEFAULT_POSTGRES_URL_ENV)]
    pub url_env: String,
    /// PostgreSQL only: each instance's pool size (`store.max_connections`).
    #[arg(long, default_value_t = PgOptions::default().max_connections)]
    pub max_connections: usize,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim())
        .map_err(|err| format!("{text:?} is not a duration ({err}); use e.g. \"10s\""))
}

/// The goal on the reference 2-core machine: SQLite ingestion at this fraction of no-op
/// throughput...
const GOAL_RATIO: f64 = 0.30;
/// ...with this ingestion p99, in milliseconds.
const GOAL_P99_MS: f64 = 15.0;
/// One PostgreSQL instance at this fraction of the SQLite ingestion throughput...
const GOAL_POSTGRES_RATIO: f64 = 0.5;
/// ...with this p99, in milliseconds.
const GOAL_POSTGRES_P99_MS: f64 = 25.0;

const PROVIDER: &str = "fiserv";
const SECRET_ENV: &str = "BENCH_FISERV_WEBHOOK_SECRET";
const DATABASE_URL_ENV: &str = "BENCH_DATABASE_URL";
const API_KEY: &str = "bench-api-key";
/// The prefix of the databases the bench creates (and drops).
const DATABASE_PREFIX: &str = "cashout_recon_bench";

/// One store configuration measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StoreUnderTest {
    Sqlite,
    /// This many daemons on one PostgreSQL database.
    Postgres {
        instances: usize,
    },
}

impl StoreUnderTest {
    fn name(self) -> &'static str {
        match self {
            StoreUnderTest::Sqlite => "sqlite",
            StoreUnderTest::Postgres { .. } => "postgres",
        }
    }

    fn instances(self) -> usize {
        match self {
            StoreUnderTest::Sqlite => 1,
            StoreUnderTest::Postgres { instances } => instances,
        }
    }

    fn label(self) -> String {
        match self {
            StoreUnderTest::Sqlite => "SQLite".to_string(),
            StoreUnderTest::Postgres { instances } => format!("PostgreSQL x{instances}"),
        }
    }
}

impl BenchIngestArgs {
    /// The stores to measure, in order, or what is wrong with the options.
    fn stores(&self) -> Result<Vec<StoreUnderTest>, CommandError> {
        let instances = match (&self.instances, self.backend) {
            (Some(_), BackendChoice::Sqlite) => {
                return Err(CommandError::Config(
                    "--instances applies to PostgreSQL (the SQLite store takes one instance): \
                     add --backend postgres or --backend both"
                        .to_string(),
                ))
            }
            (Some(counts), _) => counts.clone(),
            (None, _) => vec![1, 2],
        };
        if let Some(bad) = instances.iter().find(|&&n| n == 0 || n > self.connections) {
            return Err(CommandError::Config(format!(
                "--instances {bad}: each count must be between 1 and --connections ({})",
                self.connections
            )));
        }
        let postgres = instances
            .into_iter()
            .map(|instances| StoreUnderTest::Postgres { instances });
        Ok(match self.backend {
            BackendChoice::Sqlite => vec![StoreUnderTest::Sqlite],
            BackendChoice::Postgres => postgres.collect(),
            BackendChoice::Both => std::iter::once(StoreUnderTest::Sqlite)
                .chain(postgres)
                .collect(),
        })
    }
}

/// The PostgreSQL server's connection string from `--url-env`, or a refusal that says
/// what is missing.
fn postgres_server_url(url_env: &str) -> Result<String, CommandError> {
    match std::env::var(url_env) {
        Ok(url) if !url.trim().is_empty() => Ok(url),
        _ => Err(CommandError::Config(format!(
            "measuring PostgreSQL needs a server: set ${url_env} (or name another variable \
             with --url-env) to a connection string such as \
             postgres://user:password@127.0.0.1:5432/postgres whose role may CREATE DATABASE; \
             the bench creates a fresh database there and drops it afterwards"
        ))),
    }
}

/// `postgresql://host:port/db` of a connection string, never its credentials.
fn describe_url(url: &str) -> String {
    crate::store::postgres::tls::describe_url(url)
        .unwrap_or_else(|| "(an unparsable connection string)".to_string())
}

/// Runs the benchmark and prints the table and a final one-line JSON summary.
pub async fn run(args: BenchIngestArgs) -> Result<(), CommandError> {
    if args.connections == 0 {
        return Err(CommandError::Config(
            "--connections must be at least 1".to_string(),
        ));
    }
    if args.duration.is_zero() {
        return Err(CommandError::Config(
            "--duration must be longer than 0s".to_string(),
        ));
    }
    if args.workers == Some(0) {
        return Err(CommandError::Config(
            "--workers must be at least 1".to_string(),
        ));
    }
    if args.max_connections == 0 {
        return Err(CommandError::Config(
            "--max-connections must be at least 1".to_string(),
        ));
    }
    let stores = args.stores()?;
    let server_url = if stores.iter().any(|s| s.name() == "postgres") {
        Some(postgres_server_url(&args.url_env)?)
    } else {
        None
    };
    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let secret = uuid::Uuid::new_v4().simple().to_string();

    println!(
        "bench-ingest: {} connections, {} warm-up + {} measured per target, {}-byte bodies, \
         {workers} HTTP workers per daemon, requests signed per request in the load generator",
        args.connections,
        humantime::format_duration(args.warmup),
        humantime::format_duration(args.duration),
        args.body_bytes,
    );
    if let Some(url) = &server_url {
        println!(
            "postgresql: a fresh database on {} per store row, {} pooled connections per daemon",
            describe_url(url),
            args.max_connections
        );
    }
    let cost = RequestFactory::new(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        secret.clone().into_bytes(),
        args.body_bytes,
    )
    .cost_per_request();
    println!(
        "load generator: building and signing one request costs {:.1} µs",
        cost.as_secs_f64() * 1e6
    );

    let mut noop = None;
    let mut runs = Vec::with_capacity(stores.len());
    for store in stores {
        let (baseline, run) =
            measure_store(store, &args, &secret, server_url.as_deref(), noop.is_none()).await?;
        noop = noop.or(baseline);
        runs.push(run);
    }
    let Some(noop) = noop else {
        return Err(CommandError::Runtime(anyhow::anyhow!(
            "no store was measured"
        )));
    };

    let report = Report::new(noop, runs);
    report.print();
    println!("{}", report.summary(&args, workers));
    if let Some(run) = report.runs.iter().find(|run| !run.verified()) {
        return Err(CommandError::Runtime(anyhow::anyhow!(
            "{}: the store holds {} webhook events but {} webhooks were answered 2xx",
            run.store.label(),
            run.stored,
            run.ingest.ok_total
        )));
    }
    Ok(())
}

/// What one store's row measured.
struct StoreRun {
    store: StoreUnderTest,
    ingest: TargetResult,
    group: GroupStats,
    /// Webhook events in the store after its daemons stopped.
    stored: u64,
    /// PostgreSQL: transactions committed in the database over the run.
    postgres_commits: Option<u64>,
    sizes: Option<Sizes>,
}

impl StoreRun {
    fn verified(&self) -> bool {
        self.stored == self.ingest.ok_total
    }

    /// PostgreSQL: stored webhook events per committed transaction (the batcher's mean
    /// batch; a little low, as the pools' own transactions count too).
    fn events_per_commit(&self) -> Option<f64> {
        let commits = self.postgres_commits?;
        (commits > 0).then(|| self.stored as f64 / commits as f64)
    }
}

/// Sets up `store`, measures the no-op baseline first when `with_baseline`, then
/// ingestion, stops its daemons, counts the stored events and removes the store.
async fn measure_store(
    store: StoreUnderTest,
    args: &BenchIngestArgs,
    secret: &str,
    server_url: Option<&str>,
    with_baseline: bool,
) -> Result<(Option<TargetResult>, StoreRun), CommandError> {
    let dir = ScratchDir::create().context("creating the benchmark's temporary directory")?;
    match store {
        StoreUnderTest::Sqlite => {
            let settings = bench_settings(dir.path(), secret, args, &BenchStore::Sqlite)?;
            let db_path = settings.store.path.clone();
            let (baseline, ingest, group) =
                Deployment::start(vec![settings], secret, args.body_bytes)
                    .await?
                    .measure(args, with_baseline)
                    .await?;
            let stored = count_webhook_events(&db_path)?;
            let sizes = if args.measure_size {
                Some(measure_size(&db_path, stored).await?)
            } else {
                None
            };
            Ok((
                baseline,
                StoreRun {
                    store,
                    ingest,
                    group,
                    stored,
                    postgres_commits: None,
                    sizes,
                },
            ))
        }
        StoreUnderTest::Postgres { instances } => {
            let server_url = server_url.ok_or_else(|| {
                CommandError::Config("measuring PostgreSQL needs --url-env".to_string())
            })?;
            let database = ScratchDatabase::create(server_url, DATABASE_PREFIX)
                .await
                .with_context(|| {
                    format!(
                        "creating the benchmark's database on {} (the role of ${} must be allowed to CREATE DATABASE)",
                        describe_url(server_url),
                        args.url_env
                    )
                })?;
            let measured = async {
                let on_database = BenchStore::Postgres {
                    url: database.url().to_string(),
                    max_connections: args.max_connections,
                };
                let settings = (0..instances)
                    .map(|instance| {
                        let instance_dir = dir.path().join(format!("instance-{instance}"));
                        std::fs::create_dir_all(&instance_dir)
                            .context("creating an instance's directory")?;
                        bench_settings(&instance_dir, secret, args, &on_database)
                    })
                    .collect::<Result<Vec<_>, CommandError>>()?;
                let (baseline, ingest, group) =
                    Deployment::start(settings, secret, args.body_bytes)
                        .await?
                        .measure(args, with_baseline)
                        .await?;
                let counts = count_postgres(database.url()).await?;
                Ok::<_, CommandError>((
                    baseline,
                    StoreRun {
                        store,
                        ingest,
                        group,
                        stored: counts.events,
                        postgres_commits: Some(counts.commits),
                        sizes: None,
                    },
                ))
            }
            .await;
            let described = database.describe();
            let dropped = database.drop_database().await;
            let measured = measured?;
            dropped.with_context(|| format!("dropping the benchmark's database {described}"))?;
            Ok(measured)
        }
    }
}

/// The daemons of one store row, serving until [`Deployment::measure`] stops them.
struct Deployment {
    instances: Vec<Instance>,
    factory: Arc<RequestFactory>,
}

/// One daemon of a deployment.
struct Instance {
    address: SocketAddr,
    handle: ServerHandle,
    metrics: Metrics,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Deployment {
    /// Builds and starts one daemon per settings (on PostgreSQL they share the database).
    async fn start(
        settings: Vec<Settings>,
        secret: &str,
        body_bytes: usize,
    ) -> Result<Deployment, CommandError> {
        let mut instances = Vec::with_capacity(settings.len());
        for settings in settings {
            let app = App::build_with(
                settings,
                AppOptions {
                    handle_signals: false,
                    noop_route: true,
                    background_jobs: false,
                },
            )
            .await?;
            instances.push(Instance {
                address: SocketAddr::from(([127, 0, 0, 1], app.port())),
                handle: app.handle(),
                metrics: app.state().metrics.clone(),
                server: tokio::spawn(app.run_until_stopped()),
            });
        }
        let first = instances
            .first()
            .map_or(SocketAddr::from(([127, 0, 0, 1], 0)), |i| i.address);
        Ok(Deployment {
            instances,
            factory: Arc::new(RequestFactory::new(
                first,
                secret.as_bytes().to_vec(),
                body_bytes,
            )),
        })
    }

    /// The no-op baseline (when asked), then ingestion; then stops every daemon (which
    /// commits or drains what is queued).
    async fn measure(
        self,
        args: &BenchIngestArgs,
        with_baseline: bool,
    ) -> Result<(Option<TargetResult>, TargetResult, GroupStats), CommandError> {
        let addresses: Vec<SocketAddr> = self.instances.iter().map(|i| i.address).collect();
        let metrics: Vec<Metrics> = self.instances.iter().map(|i| i.metrics.clone()).collect();
        let measured = async {
            let baseline = if with_baseline {
                Some(run_target(Target::Noop, &addresses, args, self.factory.clone()).await?)
            } else {
                None
            };
            let before = GroupStats::read(&metrics);
            let ingest = run_target(Target::Ingest, &addresses, args, self.factory.clone()).await?;
            let group = GroupStats::read(&metrics).since(&before);
            Ok::<_, CommandError>((baseline, ingest, group))
        }
        .await;
        for instance in &self.instances {
            instance.handle.stop(true).await;
        }
        for instance in self.instances {
            instance
                .server
                .await
                .context("the benchmark server task failed")?
                .context("the benchmark server failed")?;
        }
        measured
    }
}

/// The store a daemon of the bench runs on.
enum BenchStore {
    /// A SQLite file in the daemon's directory.
    Sqlite,
    /// The PostgreSQL database at `url`.
    Postgres { url: String, max_connections: usize },
}

fn bench_settings(
    dir: &Path,
    secret: &str,
    args: &BenchIngestArgs,
    store: &BenchStore,
) -> Result<Settings, CommandError> {
    let workers = args
        .workers
        .map(|n| format!("workers = {n}\n"))
        .unwrap_or_default();
    let mut env: BTreeMap<String, String> = [(SECRET_ENV.to_string(), secret.to_string())]
        .into_iter()
        .collect();
    let store_keys = match store {
        BenchStore::Sqlite => format!("path = \"{}\"", dir.join("bench.db").display()),
        BenchStore::Postgres {
            url,
            max_connections,
        } => {
            env.insert(DATABASE_URL_ENV.to_string(), url.clone());
            format!(
                "backend = \"postgres\"\nurl_env = \"{DATABASE_URL_ENV}\"\nmax_connections = {max_connections}"
            )
        }
    };
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
{workers}
[store]
{store_keys}

[reports]
dir = "{reports}"

[[providers]]
id = "{PROVIDER}"
kind = "fiserv_pix"
base_url = "http://127.0.0.1:9"
webhook_secrets_env = ["{SECRET_ENV}"]
"#,
        reports = dir.join("reports").display(),
    );
    Ok(Settings::parse(&text, dir, &env)?)
}

/// Bytes per stored event on disk, with raw bodies and after retention dropped them.
struct Sizes {
    full_per_event: f64,
    retained_per_event: f64,
}

/// The database and WAL size after a truncating checkpoint.
fn store_bytes(db: &Path) -> Result<u64, CommandError> {
    let connection = rusqlite::Connection::open(db)
        .with_context(|| format!("opening {} to measure it", db.display()))?;
    connection
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .context("checkpointing the store")?;
    drop(connection);
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    let size = |path: &Path| std::fs::metadata(path).map_or(0, |meta| meta.len());
    Ok(size(db) + size(Path::new(&wal)))
}

/// Measures the store (stopped daemon), runs retention over every event, measures again.
async fn measure_size(db: &Path, events: u64) -> Result<Sizes, CommandError> {
    let per_event = |bytes: u64| bytes as f64 / events.max(1) as f64;
    let full = store_bytes(db)?;
    let settings = crate::config::StoreSettings {
        backend: crate::config::StoreBackend::Sqlite,
        path: db.to_path_buf(),
        busy_timeout: Duration::from_secs(5),
        max_batch: 512,
        read_connections: 2,
        replay_window: crate::config::MIN_REPLAY_WINDOW,
    };
    let store =
        crate::store::Store::open(&settings, Metrics::new()).context("opening the store")?;
    let later = chrono::Utc::now() + chrono::Duration::days(2);
    loop {
        let run = crate::retention::run(&store, Duration::from_secs(86_400), None, later)
            .await
            .context("running retention")?;
        if run.cleared == 0 {
            break;
        }
    }
    store.close().await;
    let retained = store_bytes(db)?;
    Ok(Sizes {
        full_per_event: per_event(full),
        retained_per_event: per_event(retained),
    })
}

/// Webhook events in the store (opened read-only after the daemon stopped).
fn count_webhook_events(db: &Path) -> Result<u64, CommandError> {
    let connection =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("opening {} to count events", db.display()))?;
    let count: i64 = connection
        .query_row(
            "SELECT COUNT(*) FROM events WHERE provider = ?1 AND source = 'webhook'",
            [PROVIDER],
            |row| row.get(0),
        )
        .context("counting stored webhook events")?;
    Ok(u64::try_from(count).unwrap_or(0))
}

/// What the PostgreSQL database holds after its daemons stopped.
struct PostgresCounts {
    /// Webhook events stored.
    events: u64,
    /// Transactions committed in the database over the whole run (`pg_stat_database`):
    /// the webhooks' commits, plus a few of the pools' own (session set-up, migrations).
    commits: u64,
}

/// Counts the stored webhook events and, once every session of the daemons has ended
/// (their statistics are flushed when they exit; waited for at most 10 s), the
/// database's committed transactions.
async fn count_postgres(url: &str) -> Result<PostgresCounts, CommandError> {
    let store = PgStore::connect(
        url,
        PgOptions {
            max_connections: 1,
            ..PgOptions::default()
        },
    )
    .context("connecting to the benchmark's database")?;
    let counted = async {
        let client = store.client().await?;
        let row = client
            .query_one(
                "SELECT COUNT(*) FROM events WHERE provider = $1 AND source = 'webhook'",
                &[&PROVIDER],
            )
            .await
            .map_err(|err| from_postgres(&err))?;
        let events: i64 = row.try_get(0).map_err(|err| from_postgres(&err))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let row = client
                .query_one(
                    "SELECT COUNT(*) FROM pg_stat_activity
                     WHERE datname = current_database() AND pid <> pg_backend_pid()",
                    &[],
                )
                .await
                .map_err(|err| from_postgres(&err))?;
            let others: i64 = row.try_get(0).map_err(|err| from_postgres(&err))?;
            if others == 0 || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        client
            .batch_execute("SELECT pg_stat_clear_snapshot()")
            .await
            .map_err(|err| from_postgres(&err))?;
        let row = client
            .query_one(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
                &[],
            )
            .await
            .map_err(|err| from_postgres(&err))?;
        let commits: i64 = row.try_get(0).map_err(|err| from_postgres(&err))?;
        Ok::<_, StoreError>(PostgresCounts {
            events: u64::try_from(events).unwrap_or(0),
            commits: u64::try_from(commits).unwrap_or(0),
        })
    }
    .await;
    store.close();
    Ok(counted.context("counting stored webhook events and commits")?)
}

/// A temporary directory removed on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn create() -> std::io::Result<ScratchDir> {
        let path = std::env::temp_dir().join(format!(
            "cashout-recon-bench-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&path)?;
        Ok(ScratchDir(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a phase aims at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// `POST /bench/noop`: the HTTP stack alone (baseline).
    Noop,
    /// `POST /webhooks/fiserv`: verification, parsing and a durable commit.
    Ingest,
}

impl Target {
    fn path(self) -> &'static str {
        match self {
            Target::Noop => "/bench/noop",
            Target::Ingest => "/webhooks/fiserv",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Target::Noop => "noop",
            Target::Ingest => "ingest",
        }
    }
}

/// Builds unique, signed Fiserv webhooks as complete HTTP/1.1 requests.
struct RequestFactory {
    host: String,
    secret: Vec<u8>,
    body_bytes: usize,
}

impl RequestFactory {
    fn new(address: SocketAddr, secret: Vec<u8>, body_bytes: usize) -> RequestFactory {
        RequestFactory {
            host: address.to_string(),
            secret,
            body_bytes,
        }
    }

    /// A new "Requested" cash-out `txid`, signed over SPEC §4.1's
    /// apikey ‖ x-timestamp ‖ body ‖ path with the webhook path.
    fn request(&self, target: Target, txid: &str, seq: u64) -> Vec<u8> {
        let now = chrono::Utc::now();
        let timestamp = now.timestamp().to_string();
        let updated = now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let cents = 100 + seq % 1_000_000;
        let head = format!(
            r#"{{"txid":"{txid}","status":1,"failReason":null,"amount":"{}.{:02}","currency":"BRL","endToEnd":""#,
            cents / 100,
            cents % 100
        );
        let tail = format!(
            r#"","confirmationKey":null,"createdAt":"{updated}","updatedAt":"{updated}"}}"#
        );
        let padding = self.body_bytes.saturating_sub(head.len() + tail.len());
        let mut body = String::with_capacity(head.len() + padding + tail.len());
        body.push_str(&head);
        body.extend(std::iter::repeat_n('E', padding));
        body.push_str(&tail);
        let webhook_path = Target::Ingest.path();
        let mac = hmac_bytes(
            HmacAlgorithm::Sha256,
            &self.secret,
            &[
                API_KEY.as_bytes(),
                timestamp.as_bytes(),
                body.as_bytes(),
                webhook_path.as_bytes(),
            ],
        );
        let signature = base64::engine::general_purpose::STANDARD.encode(mac);
        let mut request = String::with_capacity(body.len() + 400);
        let _ = write!(
            request,
            "POST {} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\napikey: {API_KEY}\r\n\
             x-timestamp: {timestamp}\r\nx-request-id: req-{txid}\r\nx-hmac-signature: {signature}\r\n\
             content-length: {}\r\n\r\n",
            target.path(),
            self.host,
            body.len()
        );
        request.push_str(&body);
        request.into_bytes()
    }

    /// The load generator's own cost of building and signing one request.
    fn cost_per_request(&self) -> Duration {
        let rounds: u32 = 2_000;
        let started = Instant::now();
        let mut bytes = 0;
        for seq in 0..rounds {
            bytes += self
                .request(Target::Ingest, &format!("cost-{seq}"), u64::from(seq))
                .len();
        }
        std::hint::black_box(bytes);
        started.elapsed() / rounds
    }
}

/// One keep-alive HTTP/1.1 connection with one request in flight at a time.
struct HttpConnection {
    stream: TcpStream,
    buffer: Vec<u8>,
}

/// The parts of an answer the benchmark needs.
struct Answer {
    status: u16,
    keep_alive: bool,
}

impl HttpConnection {
    async fn open(address: SocketAddr) -> std::io::Result<HttpConnection> {
        let stream = TcpStream::connect(address).await?;
        stream.set_nodelay(true)?;
        Ok(HttpConnection {
            stream,
            buffer: Vec::with_capacity(4096),
        })
    }

    /// Sends one request and reads its whole answer (bodies must have a content-length).
    async fn exchange(&mut self, request: &[u8]) -> std::io::Result<Answer> {
        self.stream.write_all(request).await?;
        self.buffer.clear();
        let mut searched = 0;
        let head_end = loop {
            if let Some(position) = find_head_end(&self.buffer[searched..]) {
                break searched + position;
            }
            searched = self.buffer.len().saturating_sub(3);
            self.read_more().await?;
        };
        let (status, content_length, keep_alive) = parse_head(&self.buffer[..head_end])?;
        while self.buffer.len() < head_end + content_length {
            self.read_more().await?;
        }
        Ok(Answer { status, keep_alive })
    }

    async fn read_more(&mut self) -> std::io::Result<()> {
        if self.buffer.capacity() - self.buffer.len() < 1024 {
            self.buffer.reserve(4096);
        }
        if self.stream.read_buf(&mut self.buffer).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ));
        }
        Ok(())
    }
}

/// The offset just past the blank line ending a response head.
fn find_head_end(bytes: &[u8]) -> Option<usize> {
    bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
}

/// Status, content-length and keep-alive of a response head.
fn parse_head(head: &[u8]) -> std::io::Result<(u16, usize, bool)> {
    let invalid =
        |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let text = std::str::from_utf8(head).map_err(|_| invalid("response head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| invalid("bad status line"))?;
    let mut content_length = None;
    let mut keep_alive = !status_line.starts_with("HTTP/1.0");
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| invalid("bad content-length"))?,
            );
        } else if name.eq_ignore_ascii_case("connection") {
            keep_alive = !value.eq_ignore_ascii_case("close");
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(invalid(
                "chunked answers are not supported by the benchmark client",
            ));
        }
    }
    Ok((status, content_length.unwrap_or(0), keep_alive))
}

/// Latencies in microseconds, 3 significant digits: fixed memory whatever the number
/// of samples.
#[derive(Clone)]
struct Histogram(hdrhistogram::Histogram<u64>);

impl Histogram {
    /// 1 µs to 1 h at 3 significant digits.
    fn new() -> Result<Histogram, hdrhistogram::CreationError> {
        hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3).map(Histogram)
    }

    fn record(&mut self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.0.saturating_record(us.max(1));
    }

    fn merge(&mut self, other: &Histogram) {
        // Both were made by `new`, with the same bounds: adding cannot fail.
        let _ = self.0.add(&other.0);
    }

    /// The `q` quantile (0..=1) in microseconds.
    fn quantile_us(&self, q: f64) -> u64 {
        if self.0.is_empty() {
            return 0;
        }
        self.0.value_at_quantile(q)
    }

    fn quantile_ms(&self, q: f64) -> f64 {
        self.quantile_us(q) as f64 / 1000.0
    }

    fn max_ms(&self) -> f64 {
        self.0.max() as f64 / 1000.0
    }
}

/// What one connection saw during one target's phase.
struct ConnectionReport {
    histogram: Histogram,
    /// Requests started after the warm-up (measured).
    requests: u64,
    ok: u64,
    /// Answers other than 2xx.
    non_2xx: u64,
    /// Requests without an answer (connection refused, reset or closed).
    failed: u64,
    /// 2xx answers over the whole phase, warm-up included (for the store check).
    ok_total: u64,
    last_finish: Instant,
    first_error: Option<String>,
}

/// One target's totals.
struct TargetResult {
    target: Target,
    histogram: Histogram,
    requests: u64,
    ok: u64,
    non_2xx: u64,
    failed: u64,
    ok_total: u64,
    window: Duration,
    first_error: Option<String>,
    cpu: Vec<GroupCpu>,
}

impl TargetResult {
    fn ok_per_sec(&self) -> f64 {
        let seconds = self.window.as_secs_f64();
        if seconds > 0.0 {
            self.ok as f64 / seconds
        } else {
            0.0
        }
    }

    fn summary(&self) -> serde_json::Value {
        json!({
            "target": self.target.name(),
            "path": self.target.path(),
            "requests": self.requests,
            "ok": self.ok,
            "ok_per_sec": round3(self.ok_per_sec()),
            "p50_ms": round3(self.histogram.quantile_ms(0.50)),
            "p90_ms": round3(self.histogram.quantile_ms(0.90)),
            "p99_ms": round3(self.histogram.quantile_ms(0.99)),
            "p999_ms": round3(self.histogram.quantile_ms(0.999)),
            "max_ms": round3(self.histogram.max_ms()),
            "non_2xx": self.non_2xx,
            "failed": self.failed,
            "cpu_cores": self
                .cpu
                .iter()
                .map(|g| (g.group.clone(), json!({ "running": round3(g.running), "waiting": round3(g.waiting) })))
                .collect::<serde_json::Map<_, _>>(),
        })
    }
}

fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

/// One phase against `target`, connection `i` on `addresses[i % addresses.len()]` (the
/// load split evenly across the instances).
async fn run_target(
    target: Target,
    addresses: &[SocketAddr],
    args: &BenchIngestArgs,
    factory: Arc<RequestFactory>,
) -> Result<TargetResult, CommandError> {
    let mut connections = Vec::with_capacity(args.connections);
    for address in addresses.iter().cycle().take(args.connections) {
        connections.push((
            *address,
            HttpConnection::open(*address)
                .await
                .context("connecting to the benchmark server")?,
        ));
    }
    let empty = Histogram::new().context("a latency histogram")?;
    let started = Instant::now();
    let measure_from = started + args.warmup;
    let stop_at = measure_from + args.duration;
    let cpu_before = ThreadCpu::sample();
    let mut cpu_after = None;
    let tasks: Vec<_> = connections
        .into_iter()
        .enumerate()
        .map(|(index, (address, connection))| {
            let factory = factory.clone();
            tokio::spawn(drive_connection(
                target,
                index,
                connection,
                empty.clone(),
                address,
                factory,
                Window {
                    measure_from,
                    stop_at,
                },
            ))
        })
        .collect();
    let mut histogram = empty;
    let mut totals = (0, 0, 0, 0, 0);
    let mut last_finish = measure_from;
    let mut first_error = None;
    for task in tasks {
        let report = task.await.context("a load-generator task failed")?;
        cpu_after.get_or_insert_with(ThreadCpu::sample);
        histogram.merge(&report.histogram);
        totals.0 += report.requests;
        totals.1 += report.ok;
        totals.2 += report.non_2xx;
        totals.3 += report.failed;
        totals.4 += report.ok_total;
        last_finish = last_finish.max(report.last_finish);
        first_error = first_error.or(report.first_error);
    }
    let cpu = match (cpu_before, cpu_after.flatten()) {
        (Some(before), Some(after)) => after.since(&before),
        _ => Vec::new(),
    };
    Ok(TargetResult {
        target,
        histogram,
        requests: totals.0,
        ok: totals.1,
        non_2xx: totals.2,
        failed: totals.3,
        ok_total: totals.4,
        window: last_finish.saturating_duration_since(measure_from),
        first_error,
        cpu,
    })
}

/// A target's phase: measured from `measure_from` (after the warm-up) until `stop_at`.
#[derive(Clone, Copy)]
struct Window {
    measure_from: Instant,
    stop_at: Instant,
}

/// A closed loop on one connection until `stop_at`; reconnects if the server closes it.
async fn drive_connection(
    target: Target,
    index: usize,
    connection: HttpConnection,
    histogram: Histogram,
    address: SocketAddr,
    factory: Arc<RequestFactory>,
    window: Window,
) -> ConnectionReport {
    let Window {
        measure_from,
        stop_at,
    } = window;
    let mut report = ConnectionReport {
        histogram,
        requests: 0,
        ok: 0,
        non_2xx: 0,
        failed: 0,
        ok_total: 0,
        last_finish: measure_from,
        first_error: None,
    };
    let mut connection = Some(connection);
    let mut seq: u64 = 0;
    loop {
        let now = Instant::now();
        if now >= stop_at {
            break;
        }
        let active = match connection.take() {
            Some(active) => Some(active),
            None => match HttpConnection::open(address).await {
                Ok(active) => Some(active),
                Err(err) => {
                    report
                        .first_error
                        .get_or_insert_with(|| format!("connect: {err}"));
                    if now >= measure_from {
                        report.failed += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    None
                }
            },
        };
        let Some(mut active) = active else { continue };
        let txid = format!("{}-{index}-{seq}", target.name());
        let request = factory.request(target, &txid, seq);
        seq += 1;
        let sent = Instant::now();
        let answer = active.exchange(&request).await;
        let finished = Instant::now();
        let measured = sent >= measure_from;
        if measured {
            report.requests += 1;
            report.histogram.record(finished - sent);
            report.last_finish = finished;
        }
        match answer {
            Ok(answer) => {
                if (200..300).contains(&answer.status) {
                    report.ok_total += 1;
                    if measured {
                        report.ok += 1;
                    }
                } else {
                    report
                        .first_error
                        .get_or_insert_with(|| format!("HTTP {}", answer.status));
                    if measured {
                        report.non_2xx += 1;
                    }
                }
                if answer.keep_alive {
                    connection = Some(active);
                }
            }
            Err(err) => {
                report.first_error.get_or_insert_with(|| err.to_string());
                if measured {
                    report.failed += 1;
                }
            }
        }
    }
    report
}

/// The store's group commits during a phase (from `cashout_recon_store_group_size` and
/// `cashout_recon_store_commit_seconds`).
#[derive(Clone, Debug, Default)]
struct GroupStats {
    commits: u64,
    writes: f64,
    commit_seconds: f64,
    /// (upper bound in seconds, commits at most that long) per histogram bucket.
    commit_buckets: Vec<(f64, u64)>,
    /// The same for the webhook handler's time, arrival to answer (server side).
    handler_buckets: Vec<(f64, u64)>,
    handled: u64,
}

/// (upper bound in seconds, cumulative count) of each bucket of a histogram.
fn buckets(histogram: &prometheus::Histogram) -> Vec<(f64, u64)> {
    histogram
        .metric()
        .get_histogram()
        .get_bucket()
        .iter()
        .map(|bucket| (bucket.upper_bound(), bucket.cumulative_count()))
        .collect()
}

/// Bucket-wise difference of two cumulative bucket lists.
fn bucket_delta(now: &[(f64, u64)], then: &[(f64, u64)]) -> Vec<(f64, u64)> {
    now.iter()
        .zip(then)
        .map(|(&(bound, now), &(_, then))| (bound, now.saturating_sub(then)))
        .collect()
}

/// The upper bound (in ms) of the bucket holding the `q` quantile of `total` samples.
fn bucket_quantile_ms(buckets: &[(f64, u64)], total: u64, q: f64) -> Option<f64> {
    let rank = (q * total as f64).ceil() as u64;
    buckets
        .iter()
        .find(|(_, count)| *count >= rank.max(1))
        .map(|(bound, _)| bound * 1000.0)
}

impl GroupStats {
    /// The sums over the daemons of a deployment.
    fn read(instances: &[Metrics]) -> GroupStats {
        instances
            .iter()
            .map(GroupStats::read_one)
            .reduce(|sum, one| sum.plus(&one))
            .unwrap_or_default()
    }

    fn read_one(metrics: &Metrics) -> GroupStats {
        GroupStats {
            commits: metrics.store_group_size.get_sample_count(),
            writes: metrics.store_group_size.get_sample_sum(),
            commit_seconds: metrics.store_commit_seconds.get_sample_sum(),
            commit_buckets: buckets(&metrics.store_commit_seconds),
            handler_buckets: buckets(&metrics.webhook_seconds.with_label_values(&[PROVIDER])),
            handled: metrics
                .webhook_seconds
                .with_label_values(&[PROVIDER])
                .get_sample_count(),
        }
    }

    fn plus(&self, other: &GroupStats) -> GroupStats {
        // Every daemon's histograms have the same buckets; an empty list (the default) adds nothing.
        let add = |a: &[(f64, u64)], b: &[(f64, u64)]| -> Vec<(f64, u64)> {
            match (a.is_empty(), b.is_empty()) {
                (true, _) => b.to_vec(),
                (_, true) => a.to_vec(),
                _ => a
                    .iter()
                    .zip(b)
                    .map(|(&(bound, a), &(_, b))| (bound, a + b))
                    .collect(),
            }
        };
        GroupStats {
            commits: self.commits + other.commits,
            writes: self.writes + other.writes,
            commit_seconds: self.commit_seconds + other.commit_seconds,
            commit_buckets: add(&self.commit_buckets, &other.commit_buckets),
            handler_buckets: add(&self.handler_buckets, &other.handler_buckets),
            handled: self.handled + other.handled,
        }
    }

    fn since(&self, before: &GroupStats) -> GroupStats {
        GroupStats {
            commits: self.commits.saturating_sub(before.commits),
            writes: self.writes - before.writes,
            commit_seconds: self.commit_seconds - before.commit_seconds,
            commit_buckets: bucket_delta(&self.commit_buckets, &before.commit_buckets),
            handler_buckets: bucket_delta(&self.handler_buckets, &before.handler_buckets),
            handled: self.handled.saturating_sub(before.handled),
        }
    }

    fn mean_size(&self) -> f64 {
        if self.commits == 0 {
            0.0
        } else {
            self.writes / self.commits as f64
        }
    }

    fn mean_commit_ms(&self) -> f64 {
        if self.commits == 0 {
            0.0
        } else {
            self.commit_seconds * 1000.0 / self.commits as f64
        }
    }

    /// Group commits that took longer than the bucket bound nearest `seconds`.
    fn commits_over(&self, seconds: f64) -> u64 {
        let within = self
            .commit_buckets
            .iter()
            .find(|(bound, _)| (*bound - seconds).abs() < 1e-9)
            .map_or(self.commits, |&(_, count)| count);
        self.commits.saturating_sub(within)
    }
}

/// CPU use per thread group of this process, from Linux `/proc/self/task/*/schedstat`
/// (empty elsewhere), to show how the cores were split between the load generator, the
/// HTTP workers and the store, how long runnable threads waited for a core, how much the
/// local PostgreSQL server's processes took, and how busy other processes kept the machine.
struct ThreadCpu {
    /// Nanoseconds on a CPU, per group.
    running: BTreeMap<&'static str, u64>,
    /// Nanoseconds runnable but waiting for a CPU, per group.
    waiting: BTreeMap<&'static str, u64>,
    /// Busy ticks of the whole machine (`/proc/stat`).
    machine_ticks: Option<u64>,
    /// CPU ticks of the processes named `postgres` (a local server's backends).
    postgres_ticks: u64,
    at: Instant,
}

/// CPU use of one thread group over a phase, in cores (1.0 = one core all the time).
#[derive(Clone, Debug)]
struct GroupCpu {
    group: String,
    running: f64,
    waiting: f64,
}

/// `/proc/stat` counts in clock ticks of 1/100 s on every common Linux configuration.
const TICKS_PER_SECOND: f64 = 100.0;

impl ThreadCpu {
    fn sample() -> Option<ThreadCpu> {
        let tasks = std::fs::read_dir("/proc/self/task").ok()?;
        let mut running = BTreeMap::new();
        let mut waiting = BTreeMap::new();
        for task in tasks.flatten() {
            let (Ok(name), Ok(schedstat)) = (
                std::fs::read_to_string(task.path().join("comm")),
                std::fs::read_to_string(task.path().join("schedstat")),
            ) else {
                continue;
            };
            let mut fields = schedstat
                .split_whitespace()
                .map(|v| v.parse::<u64>().unwrap_or(0));
            let group = thread_group(name.trim());
            *running.entry(group).or_insert(0) += fields.next().unwrap_or(0);
            *waiting.entry(group).or_insert(0) += fields.next().unwrap_or(0);
        }
        Some(ThreadCpu {
            running,
            waiting,
            machine_ticks: machine_busy_ticks(),
            postgres_ticks: postgres_server_ticks(),
            at: Instant::now(),
        })
    }

    /// Cores used (and waited for) per group between `before` and this sample; the
    /// `postgres_server` row is a local PostgreSQL server's processes (when they ran), the
    /// `other_processes` row the rest of the machine's busy time.
    fn since(&self, before: &ThreadCpu) -> Vec<GroupCpu> {
        let seconds = self.at.saturating_duration_since(before.at).as_secs_f64();
        if seconds <= 0.0 {
            return Vec::new();
        }
        let delta = |now: &BTreeMap<&str, u64>, then: &BTreeMap<&str, u64>, group: &str| {
            let used = now
                .get(group)
                .copied()
                .unwrap_or(0)
                .saturating_sub(then.get(group).copied().unwrap_or(0));
            used as f64 / 1e9 / seconds
        };
        let mut groups: Vec<GroupCpu> = self
            .running
            .keys()
            .map(|group| GroupCpu {
                group: group.to_string(),
                running: delta(&self.running, &before.running, group),
                waiting: delta(&self.waiting, &before.waiting, group),
            })
            .collect();
        let postgres = self.postgres_ticks.saturating_sub(before.postgres_ticks) as f64
            / TICKS_PER_SECOND
            / seconds;
        if postgres > 0.0 {
            groups.push(GroupCpu {
                group: "postgres_server".to_string(),
                running: postgres,
                waiting: 0.0,
            });
        }
        if let (Some(now), Some(then)) = (self.machine_ticks, before.machine_ticks) {
            let machine = now.saturating_sub(then) as f64 / TICKS_PER_SECOND / seconds;
            let ours: f64 = groups.iter().map(|g| g.running).sum();
            groups.push(GroupCpu {
                group: "other_processes".to_string(),
                running: (machine - ours).max(0.0),
                waiting: 0.0,
            });
        }
        groups
    }
}

/// Busy (non-idle, non-iowait) ticks of the whole machine since boot, from `/proc/stat`.
fn machine_busy_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
    let fields: Vec<u64> = cpu
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let idle = fields.get(3)? + fields.get(4)?;
    Some(fields.iter().take(8).sum::<u64>().saturating_sub(idle))
}

/// User and system ticks of the local PostgreSQL server's processes that work for the
/// bench: the sessions on its databases and the server's own background processes (WAL
/// writer, checkpointer, …), not the sessions of other databases (other users of a shared
/// server are `other_processes`). 0 when no server runs here or `/proc` hides it.
fn postgres_server_ticks() -> u64 {
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return 0;
    };
    processes
        .flatten()
        .filter(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|entry| {
            let ticks = process_ticks(
                &std::fs::read_to_string(entry.path().join("stat")).ok()?,
                "postgres",
            )?;
            let title = std::fs::read(entry.path().join("cmdline")).ok()?;
            works_for_the_bench(&String::from_utf8_lossy(&title)).then_some(ticks)
        })
        .sum()
}

/// Whether a `postgres` process title (`postgres: 15/main: user db 127.0.0.1(5432) idle`,
/// `postgres: 15/main: walwriter`) is a session on a bench database or a background process.
fn works_for_the_bench(title: &str) -> bool {
    let session = title.contains('(') || title.contains("[local]");
    !session || title.contains(DATABASE_PREFIX)
}

/// utime + stime of a `/proc/<pid>/stat` line when the process is named `name`.
fn process_ticks(stat: &str, name: &str) -> Option<u64> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    if stat.get(open + 1..close)? != name {
        return None;
    }
    // After the name: state (field 3) … utime (field 14), stime (field 15).
    let mut fields = stat.get(close + 1..)?.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user + system)
}

fn thread_group(name: &str) -> &'static str {
    if name.starts_with("tokio-r") {
        "load_generator"
    } else if name.starts_with("actix-server w") || name.starts_with("actix-rt") {
        "http_workers"
    } else if name.starts_with("store-writer") {
        "store_writer"
    } else if name.starts_with("store-checkp") {
        "store_checkpointer"
    } else {
        "other"
    }
}

/// The results of a run: the no-op baseline and one row per store.
struct Report {
    noop: TargetResult,
    runs: Vec<StoreRun>,
}

impl Report {
    fn new(noop: TargetResult, runs: Vec<StoreRun>) -> Report {
        Report { noop, runs }
    }

    fn run(&self, store: StoreUnderTest) -> Option<&StoreRun> {
        self.runs.iter().find(|run| run.store == store)
    }

    /// A row's ingestion throughput over SQLite's, when SQLite was measured.
    fn over_sqlite(&self, run: &StoreRun) -> Option<f64> {
        let sqlite = self.run(StoreUnderTest::Sqlite)?.ingest.ok_per_sec();
        (sqlite > 0.0).then(|| run.ingest.ok_per_sec() / sqlite)
    }

    /// SQLite ingestion over the no-op baseline, when SQLite was measured.
    fn sqlite_over_noop(&self) -> Option<f64> {
        let sqlite = self.run(StoreUnderTest::Sqlite)?;
        let noop = self.noop.ok_per_sec();
        (noop > 0.0).then(|| sqlite.ingest.ok_per_sec() / noop)
    }

    /// SQLite's goal (ingestion >= GOAL_RATIO x no-op, p99 < GOAL_P99_MS), when measured.
    fn sqlite_goal_met(&self) -> Option<bool> {
        let sqlite = self.run(StoreUnderTest::Sqlite)?;
        Some(
            self.sqlite_over_noop()? >= GOAL_RATIO
                && sqlite.ingest.histogram.quantile_ms(0.99) < GOAL_P99_MS,
        )
    }

    /// PostgreSQL's goal (one instance >= GOAL_POSTGRES_RATIO x SQLite, p99 <=
    /// GOAL_POSTGRES_P99_MS), when both were measured.
    fn postgres_goal_met(&self) -> Option<bool> {
        let one = self.run(StoreUnderTest::Postgres { instances: 1 })?;
        Some(
            self.over_sqlite(one)? >= GOAL_POSTGRES_RATIO
                && one.ingest.histogram.quantile_ms(0.99) <= GOAL_POSTGRES_P99_MS,
        )
    }

    fn print(&self) {
        println!();
        println!(
            "{:<20} {:>8} {:>9} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>9} {:>9} {:>8}",
            "target",
            "requests",
            "2xx/s",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "p99.9ms",
            "max ms",
            "non-2xx",
            "failed",
            "stored",
            "2xx",
            "/SQLite"
        );
        let row = |label: &str, result: &TargetResult, store: Option<(u64, Option<f64>)>| {
            let (stored, ok_total, ratio) = match store {
                Some((stored, ratio)) => (
                    stored.to_string(),
                    result.ok_total.to_string(),
                    ratio.map_or("-".to_string(), |r| format!("{r:.3}")),
                ),
                None => ("-".to_string(), "-".to_string(), "-".to_string()),
            };
            println!(
                "{:<20} {:>8} {:>9.0} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2} {:>7} {:>7} {:>9} {:>9} {:>8}",
                label,
                result.requests,
                result.ok_per_sec(),
                result.histogram.quantile_ms(0.50),
                result.histogram.quantile_ms(0.90),
                result.histogram.quantile_ms(0.99),
                result.histogram.quantile_ms(0.999),
                result.histogram.max_ms(),
                result.non_2xx,
                result.failed,
                stored,
                ok_total,
                ratio
            );
        };
        row("no-op (HTTP only)", &self.noop, None);
        for run in &self.runs {
            row(
                &run.store.label(),
                &run.ingest,
                Some((run.stored, self.over_sqlite(run))),
            );
        }
        println!("(stored: webhook events in the store afterwards; 2xx: answered 2xx, warm-up included; both must be equal)");
        println!();
        if let Some(ratio) = self.sqlite_over_noop() {
            println!("SQLite ingest / noop throughput: {ratio:.3}");
        }
        for run in &self.runs {
            println!("{}:", run.store.label());
            println!(
                "  store check: {} webhook events stored, {} webhooks answered 2xx: {}",
                run.stored,
                run.ingest.ok_total,
                if run.verified() { "equal" } else { "MISMATCH" }
            );
            let group = &run.group;
            if group.commits > 0 {
                println!(
                    "  store group commits: {} commits, {:.1} writes per commit on average, {:.2} ms per commit; \
                     {} over 10 ms, {} over 20 ms, {} over 50 ms",
                    group.commits,
                    group.mean_size(),
                    group.mean_commit_ms(),
                    group.commits_over(0.01),
                    group.commits_over(0.02),
                    group.commits_over(0.05)
                );
            }
            if let (Some(commits), Some(per_commit)) =
                (run.postgres_commits, run.events_per_commit())
            {
                println!(
                    "  postgresql: {commits} transactions committed in the database over the run, \
                     {per_commit:.1} webhook events per commit"
                );
            }
            if let (Some(p50), Some(p99)) = (
                bucket_quantile_ms(&group.handler_buckets, group.handled, 0.50),
                bucket_quantile_ms(&group.handler_buckets, group.handled, 0.99),
            ) {
                println!("  webhook handler time (server side, histogram buckets): p50 <= {p50} ms, p99 <= {p99} ms");
            }
            if let Some(sizes) = &run.sizes {
                println!(
                    "  store size: {:.0} bytes per webhook event on disk (database + WAL after a checkpoint); \
                     {:.0} bytes once retention dropped raw bodies and headers",
                    sizes.full_per_event, sizes.retained_per_event
                );
            }
        }
        print_cpu("noop", &self.noop);
        for run in &self.runs {
            print_cpu(&run.store.label(), &run.ingest);
        }
        let verdict = |met: bool| if met { "met" } else { "missed" };
        if let Some(met) = self.sqlite_goal_met() {
            println!(
                "goal SQLite (ingest >= {GOAL_RATIO:.2} x no-op throughput, ingest p99 < {GOAL_P99_MS} ms): {}",
                verdict(met)
            );
        }
        if let Some(met) = self.postgres_goal_met() {
            println!(
                "goal PostgreSQL (one instance >= {GOAL_POSTGRES_RATIO:.2} x SQLite throughput, p99 <= {GOAL_POSTGRES_P99_MS} ms): {}",
                verdict(met)
            );
        }
    }

    /// One line of JSON with every figure (for scripts).
    fn summary(&self, args: &BenchIngestArgs, workers: usize) -> serde_json::Value {
        let stores: Vec<serde_json::Value> = self
            .runs
            .iter()
            .map(|run| {
                let mut row = run.ingest.summary();
                if let Some(fields) = row.as_object_mut() {
                    fields.insert("store".into(), json!(run.store.name()));
                    fields.insert("instances".into(), json!(run.store.instances()));
                    fields.insert("store_events".into(), json!(run.stored));
                    fields.insert("answered_2xx".into(), json!(run.ingest.ok_total));
                    fields.insert("verified".into(), json!(run.verified()));
                    fields.insert("postgres_commits".into(), json!(run.postgres_commits));
                    fields.insert(
                        "events_per_commit".into(),
                        json!(run.events_per_commit().map(round3)),
                    );
                    fields.insert(
                        "over_sqlite".into(),
                        json!(self.over_sqlite(run).map(round3)),
                    );
                    fields.insert(
                        "store_group".into(),
                        json!({
                            "commits": run.group.commits,
                            "mean_size": round3(run.group.mean_size()),
                            "mean_commit_ms": round3(run.group.mean_commit_ms()),
                            "commits_over_10ms": run.group.commits_over(0.01),
                            "commits_over_20ms": run.group.commits_over(0.02),
                        }),
                    );
                    fields.insert(
                        "bytes_per_event".into(),
                        json!(run.sizes.as_ref().map(|sizes| json!({
                            "full": sizes.full_per_event.round(),
                            "after_retention": sizes.retained_per_event.round(),
                        }))),
                    );
                }
                row
            })
            .collect();
        json!({
            "connections": args.connections,
            "warmup_s": args.warmup.as_secs_f64(),
            "duration_s": args.duration.as_secs_f64(),
            "body_bytes": args.body_bytes,
            "http_workers": workers,
            "postgres_max_connections": args.max_connections,
            "signing": "per_request",
            "noop": self.noop.summary(),
            "stores": stores,
            "ingest_over_noop": self.sqlite_over_noop().map(round3),
            "goal_met": self.sqlite_goal_met(),
            "postgres_goal_met": self.postgres_goal_met(),
        })
    }
}

fn print_cpu(label: &str, result: &TargetResult) {
    if !result.cpu.is_empty() {
        let split: Vec<String> = result
            .cpu
            .iter()
            .map(|g| {
                if g.waiting >= 0.005 {
                    format!(
                        "{} {:.2} (+{:.2} waiting for a core)",
                        g.group, g.running, g.waiting
                    )
                } else {
                    format!("{} {:.2}", g.group, g.running)
                }
            })
            .collect();
        println!("cores during {label}: {}", split.join(", "));
    }
    if let Some(error) = &result.first_error {
        println!("first error during {label}: {error}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    /// The options as the command line gives them.
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: BenchIngestArgs,
    }

    fn stores(line: &[&str]) -> Result<Vec<StoreUnderTest>, String> {
        let cli = Cli::try_parse_from(std::iter::once("bench-ingest").chain(line.iter().copied()))
            .map_err(|err| err.to_string())?;
        cli.args.stores().map_err(|err| err.to_string())
    }

    #[test]
    fn backend_and_instances_choose_the_rows() {
        use StoreUnderTest::{Postgres, Sqlite};
        assert_eq!(stores(&[]), Ok(vec![Sqlite]));
        assert_eq!(
            stores(&["--backend", "both"]),
            Ok(vec![
                Sqlite,
                Postgres { instances: 1 },
                Postgres { instances: 2 }
            ])
        );
        assert_eq!(
            stores(&["--backend", "postgres", "--instances", "2"]),
            Ok(vec![Postgres { instances: 2 }])
        );
        assert_eq!(
            stores(&["--backend", "both", "--instances", "1,2"]),
            Ok(vec![
                Sqlite,
                Postgres { instances: 1 },
                Postgres { instances: 2 }
            ])
        );
        let refused = stores(&["--instances", "2"]).unwrap_err();
        assert!(refused.contains("--backend postgres"), "{refused}");
        let refused = stores(&["--backend", "postgres", "--instances", "0"]).unwrap_err();
        assert!(refused.contains("between 1 and --connections"), "{refused}");
        let refused = stores(&[
            "--backend",
            "postgres",
            "--connections",
            "1",
            "--instances",
            "2",
        ])
        .unwrap_err();
        assert!(
            refused.contains("between 1 and --connections (1)"),
            "{refused}"
        );
    }

    #[test]
    fn a_missing_server_url_is_refused_naming_the_variable() {
        let refused = postgres_server_url("CASHOUT_RECON_BENCH_TEST_UNSET_URL")
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("$CASHOUT_RECON_BENCH_TEST_UNSET_URL")
                && refused.contains("CREATE DATABASE"),
            "{refused}"
        );
    }

    #[test]
    fn postgres_processes_are_counted_from_proc_stat() {
        let backend =
            "4242 (postgres) S 1 4242 4242 0 -1 4194560 300 0 0 0 120 35 0 0 20 0 1 0 99 1000 10";
        assert_eq!(process_ticks(backend, "postgres"), Some(155));
        let other = "17 (cargo) R 1 17 17 0 -1 0 0 0 0 0 900 100 0 0 20 0 1 0 99 1000 10";
        assert_eq!(process_ticks(other, "postgres"), None);
        // A name holding spaces and parentheses ends at the last ')'.
        let odd = "18 (a (b) c) S 1 18 18 0 -1 0 0 0 0 0 7 3 0 0 20 0 1 0 99 1000 10";
        assert_eq!(process_ticks(odd, "a (b) c"), Some(10));
        assert_eq!(process_ticks("garbage", "postgres"), None);
        assert!(works_for_the_bench("postgres: 15/main: walwriter"));
        assert!(works_for_the_bench(&format!(
            "postgres: 15/main: bench {DATABASE_PREFIX}_1f2e 127.0.0.1(40312) idle"
        )));
        assert!(!works_for_the_bench(
            "postgres: 15/main: test test_9a8b 127.0.0.1(40313) INSERT"
        ));
        assert!(!works_for_the_bench(
            "postgres: 15/main: app books [local] idle"
        ));
    }

    #[test]
    fn group_stats_add_up_over_instances() {
        let one = GroupStats {
            commits: 2,
            writes: 6.0,
            commit_seconds: 0.004,
            commit_buckets: vec![(0.01, 2), (0.02, 2)],
            handler_buckets: vec![(0.005, 3), (0.025, 6)],
            handled: 6,
        };
        let both = GroupStats::default().plus(&one);
        assert_eq!(both.commits, 2);
        assert_eq!(both.commit_buckets, one.commit_buckets);
        let twice = one.plus(&one);
        assert_eq!((twice.commits, twice.handled), (4, 12));
        assert_eq!(twice.handler_buckets, vec![(0.005, 6), (0.025, 12)]);
        assert!((twice.mean_size() - 3.0).abs() < 1e-9);
    }

    #[test]
    fn quantiles_come_from_the_recorded_distribution() {
        let mut histogram = Histogram::new().expect("histogram");
        for us in 1..=1_000u64 {
            histogram.record(Duration::from_micros(us));
        }
        let p50 = histogram.quantile_us(0.50);
        let p99 = histogram.quantile_us(0.99);
        assert!((500..=501).contains(&p50), "p50 {p50}");
        assert!((990..=991).contains(&p99), "p99 {p99}");
        assert_eq!(histogram.quantile_us(1.0), 1_000);
        let mut other = Histogram::new().expect("histogram");
        other.record(Duration::from_millis(20));
        histogram.merge(&other);
        assert!(
            (20.0..20.03).contains(&histogram.max_ms()),
            "max {}",
            histogram.max_ms()
        );
        assert_eq!(Histogram::new().expect("histogram").quantile_us(0.5), 0);
    }

    #[test]
    fn response_heads_are_parsed() {
        let head =
            b"HTTP/1.1 200 OK\r\ncontent-length: 42\r\ncontent-type: application/json\r\n\r\n";
        assert_eq!(find_head_end(head), Some(head.len()));
        let (status, length, keep_alive) = parse_head(head).unwrap();
        assert_eq!((status, length, keep_alive), (200, 42, true));
        let (status, _, keep_alive) =
            parse_head(b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n\r\n").unwrap();
        assert_eq!((status, keep_alive), (503, false));
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").is_err());
    }

    #[test]
    fn requests_are_signed_and_sized() {
        let factory = RequestFactory::new(
            SocketAddr::from(([127, 0, 0, 1], 8080)),
            b"secret".to_vec(),
            400,
        );
        let request = factory.request(Target::Ingest, "tx-1", 1);
        let text = String::from_utf8(request).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert_eq!(body.len(), 400);
        assert!(head.starts_with("POST /webhooks/fiserv HTTP/1.1\r\n"));
        let header = |name: &str| {
            head.lines()
                .find_map(|line| line.strip_prefix(&format!("{name}: ")))
                .unwrap()
                .to_string()
        };
        let expected = hmac_bytes(
            HmacAlgorithm::Sha256,
            b"secret",
            &[
                API_KEY.as_bytes(),
                header("x-timestamp").as_bytes(),
                body.as_bytes(),
                b"/webhooks/fiserv",
            ],
        );
        assert_eq!(
            header("x-hmac-signature"),
            base64::engine::general_purpose::STANDARD.encode(expected)
        );
        let parsed: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(parsed["txid"], "tx-1");
    }
}
