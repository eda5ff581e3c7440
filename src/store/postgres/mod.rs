//! The PostgreSQL foundation for several instances on one database (issue 10): a pool whose
//! every connection runs with `synchronous_commit = on`, embedded migrations, leases with
//! fencing tokens, a `SKIP LOCKED` claim queue, `LISTEN`/`NOTIFY` wake-ups, the
//! exactly-once primitives of ingestion and the ingestion entry points on them
//! ([`ingest`]), the recovery poller's and the expected ledger's operations ([`polling`],
//! [`ledger`]), the alert operations and outbox ([`alerts`]), the API's reads and the
//! reports index ([`reads`]), the ops console's queries ([`console`]), raw-body retention
//! ([`retention`]), `max_rps` across instances ([`rate`]), the alert signals each instance
//! publishes ([`signals`]), and `copy-store` from a SQLite book. Job leases ([`lease`]) are also `PgStore::lease`, `renew` and `release` (the
//! store interface's), and the writes a job must not make twice check the fence of the
//! lease it runs under ([`lease::check_scoped_fence`]).
//!
//! The [`Store`](super::Store) facade dispatches to it with `[store] backend = "postgres"`.
//! Connections are plaintext or TLS as the connection string's `sslmode` says, the server's
//! certificate always verified ([`tls`]: one connector for every connection). Errors are
//! the store's [`StoreError`]: a refused, dropped or overloaded server is `Unavailable` (an
//! API answers 503).

pub mod alerts;
pub mod claims;
pub mod console;
pub mod copy;
pub mod group_commit;
pub mod ingest;
pub mod lease;
pub mod ledger;
pub mod notify;
pub mod polling;
pub mod queue;
pub mod rate;
pub mod reads;
pub mod reconcile;
pub mod report;
pub mod retention;
pub mod schema;
pub mod scratch;
pub mod signals;
pub mod tls;

#[cfg(test)]
mod alerts_tests;
#[cfg(test)]
mod console_tests;
#[cfg(test)]
mod group_commit_tests;
#[cfg(test)]
mod ingest_tests;
#[cfg(test)]
mod lease_tests;
#[cfg(test)]
mod polling_tests;
#[cfg(test)]
mod reads_tests;
#[cfg(test)]
mod reconcile_tests;
#[cfg(test)]
mod retention_tests;
#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tls_tests;

use std::error::Error as _;
use std::time::Duration;

use deadpool_postgres::{
    HookError, Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime,
};
use tokio_postgres::config::Host;
use tokio_postgres::error::SqlState;

use chrono::Utc;

use super::{to_millis, StoreError, READY_FRESH};

pub use deadpool_postgres::{Object as PgClient, Transaction as PgTransaction};
pub use tls::{PgTarget, TlsConfigError, TlsSetting};

/// How the pool connects and waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PgOptions {
    /// At most this many connections at once.
    pub max_connections: usize,
    /// Time allowed to open one connection (TCP, authentication, session settings).
    pub connect_timeout: Duration,
    /// Time a caller waits for a free connection before the store counts as unavailable.
    pub wait_timeout: Duration,
    /// Longest wait for a row or table lock (the SQLite store's `busy_timeout`): past it
    /// the statement fails `Unavailable` (503) instead of holding the request.
    pub lock_timeout: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            max_connections: 16,
            connect_timeout: Duration::from_secs(5),
            wait_timeout: Duration::from_secs(5),
            lock_timeout: Duration::from_secs(5),
        }
    }
}

/// A pool of PostgreSQL connections, cheap to clone.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    /// Where it points, without credentials (for errors and logs).
    target: String,
    /// Who this pool is when it claims queued work (unique per pool: two instances, or
    /// two pools of one process, never share a claim).
    claimer: String,
    /// The webhook batcher (group commit), started by the first webhook.
    webhook_batcher: group_commit::BatcherCell,
    /// The connection string parsed and its TLS connector: what the pool connects with,
    /// and what the connections of their own (the listener) reuse.
    connect_to: std::sync::Arc<PgTarget>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("target", &self.target)
            .field("claimer", &self.claimer)
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// A pool for a connection string (`postgres://user:pass@host:port/db?…` or
    /// `host=… user=… dbname=…`). Opens no connection yet: the first [`PgStore::client`]
    /// does, and fails `Unavailable` while the server cannot be reached.
    /// Its `sslmode` is honoured (see [`tls`]), with the public roots and the URL's
    /// `sslrootcert` as the trusted roots; [`PgStore::from_target`] adds `store.ca_file`.
    pub fn connect(url: &str, options: PgOptions) -> Result<PgStore, StoreError> {
        PgStore::from_target(parse_target(url, None)?, options)
    }

    /// A pool for a parsed connection string and its TLS (see [`PgStore::connect`]).
    pub fn from_target(connect_to: PgTarget, options: PgOptions) -> Result<PgStore, StoreError> {
        let target = connect_to.describe();
        let lock_timeout = options.lock_timeout;
        let mut config = connect_to.config().clone();
        config.connect_timeout(options.connect_timeout);
        if config.get_application_name().is_none() {
            config.application_name("cashout-recon");
        }
        let manager = Manager::from_config(
            config,
            connect_to.tls(),
            ManagerConfig {
                // Verified: a connection returned to the pool is checked with an empty
                // query before its next use, so one the server dropped (a restart, a
                // failover) is replaced instead of failing a request. One loopback round
                // trip per checkout; `Fast` would skip it.
                recycling_method: RecyclingMethod::Verified,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.max_connections.max(1))
            .wait_timeout(Some(options.wait_timeout))
            .create_timeout(Some(options.connect_timeout))
            .recycle_timeout(Some(options.connect_timeout))
            .runtime(Runtime::Tokio1)
            .post_create(deadpool_postgres::Hook::async_fn(move |client, _| {
                Box::pin(async move {
                    session_settings(client, lock_timeout)
                        .await
                        .map_err(|err| match err {
                            SessionError::Backend(err) => HookError::Backend(err),
                            SessionError::NotDurable(setting) => HookError::message(format!(
                            "synchronous_commit is {setting:?} after SET synchronous_commit = on"
                        )),
                        })
                })
            }))
            .build()
            .map_err(|err| StoreError::Open {
                path: target.clone(),
                reason: err.to_string(),
            })?;
        Ok(PgStore {
            pool,
            target,
            claimer: format!("pool-{}", uuid::Uuid::now_v7().simple()),
            webhook_batcher: group_commit::BatcherCell::default(),
            connect_to: std::sync::Arc::new(connect_to),
        })
    }

    /// Connects, checks the server answers, and applies the embedded migrations (see
    /// [`schema::migrate`]). Returns the versions this call applied.
    pub async fn open(url: &str, options: PgOptions) -> Result<(PgStore, Vec<i64>), StoreError> {
        PgStore::open_target(parse_target(url, None)?, options).await
    }

    /// [`PgStore::open`] for a parsed connection string. A failed TLS handshake (the
    /// server's certificate not trusted, no TLS on the server) is an `Open` error that
    /// says so: retrying will not fix it.
    pub async fn open_target(
        connect_to: PgTarget,
        options: PgOptions,
    ) -> Result<(PgStore, Vec<i64>), StoreError> {
        let store = PgStore::from_target(connect_to, options)?;
        if store.connect_to.uses_tls() {
            if let Err(PoolError::Backend(err)) = store.pool.get().await.map(drop) {
                if let Some(reason) = tls::tls_failure(&err) {
                    return Err(StoreError::Open {
                        path: store.target.clone(),
                        reason: format!("{reason}; {}", store.connect_to.describe_tls()),
                    });
                }
            }
        }
        let applied = store.migrate().await?;
        Ok((store, applied))
    }

    /// The parsed connection string and TLS connector of this pool (for connections
    /// of their own to the same database, e.g. a [`notify::Listener`]).
    pub fn connect_to(&self) -> &PgTarget {
        &self.connect_to
    }

    /// Host, port and database, without credentials.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The name under which this pool claims queued work (see [`queue::claim_due`]).
    pub fn claimer(&self) -> &str {
        &self.claimer
    }

    /// A connection from the pool (its session has `synchronous_commit = on`).
    pub async fn client(&self) -> Result<PgClient, StoreError> {
        self.pool.get().await.map_err(|err| from_pool(&err))
    }

    /// Applies the embedded migrations not applied yet (several instances may call this
    /// at once: one applies, the others wait and find nothing left to do).
    pub async fn migrate(&self) -> Result<Vec<i64>, StoreError> {
        let mut client = self.client().await?;
        schema::migrate(&mut client).await
    }

    /// A round trip through one pooled connection (for readiness).
    pub async fn ping(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .simple_query("SELECT 1")
            .await
            .map_err(|err| from_postgres(&err))?;
        Ok(())
    }

    /// Whether a commit can succeed now (for `/readyz`): a tiny real write (the one-row
    /// `heartbeat` upserted) within [`READY_FRESH`]. An empty transaction or a `SELECT 1`
    /// would not do: they succeed on a read-only standby or with the disk full. `Err`
    /// holds the reason.
    pub async fn readiness(&self) -> Result<(), String> {
        let write = async {
            let client = self.client().await?;
            client
                .execute(
                    "INSERT INTO heartbeat (id, written_at) VALUES (1, $1)
                     ON CONFLICT (id) DO UPDATE SET written_at = EXCLUDED.written_at",
                    &[&to_millis(Utc::now())],
                )
                .await
                .map_err(|err| from_postgres(&err))?;
            Ok::<_, StoreError>(())
        };
        match tokio::time::timeout(READY_FRESH, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(format!("the store cannot commit: {err}")),
            Err(_) => Err(format!(
                "the store did not complete a write within {} s",
                READY_FRESH.as_secs()
            )),
        }
    }

    /// Closes the pool: connections in use close when returned.
    pub fn close(&self) {
        self.pool.close();
    }
}

enum SessionError {
    Backend(tokio_postgres::Error),
    NotDurable(String),
}

/// Sets the session's `lock_timeout`, and `synchronous_commit = on`, read back: an
/// acknowledged write is then on the server's disk (and its synchronous standbys') when
/// `COMMIT` returns, whatever the role or database default says.
///
/// `plan_cache_mode = force_custom_plan`: a prepared statement is planned for its actual
/// parameters every time. The generic plan PostgreSQL otherwise switches to after five
/// executions is made from the statistics of that moment — on a young database, of empty
/// tables — and kept while the tables grow: two instances ingesting into a fresh database
/// fell to 1.1–1.5k webhooks/s with the server's CPU in sequential scans, and 7.5k/s with
/// custom plans (`bench-ingest --backend postgres --instances 2`). The webhook batches
/// alone keep generic plans, made again every second (see
/// [`group_commit::BATCH_PLAN_SETTINGS`]).
async fn session_settings(
    client: &tokio_postgres::Client,
    lock_timeout: Duration,
) -> Result<(), SessionError> {
    client
        .batch_execute(&format!(
            "SET synchronous_commit = on; SET plan_cache_mode = force_custom_plan; SET lock_timeout = {}",
            lock_timeout.as_millis().max(1)
        ))
        .await
        .map_err(SessionError::Backend)?;
    let row = client
        .query_one("SELECT current_setting('synchronous_commit')", &[])
        .await
        .map_err(SessionError::Backend)?;
    let setting: String = row.try_get(0).map_err(SessionError::Backend)?;
    if setting == "on" {
        Ok(())
    } else {
        Err(SessionError::NotDurable(setting))
    }
}

/// [`PgTarget::parse`] as a store error (the message never holds the password).
pub fn parse_target(url: &str, ca_file: Option<&std::path::Path>) -> Result<PgTarget, StoreError> {
    PgTarget::parse(url, ca_file).map_err(|err| StoreError::Open {
        path: "(the PostgreSQL connection string)".to_string(),
        reason: err.to_string(),
    })
}

/// `host:port/dbname` of a configuration (no user, no password).
pub fn describe(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(host)) => host.clone(),
        #[cfg(unix)]
        Some(Host::Unix(path)) => path.display().to_string(),
        None => "localhost".to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let dbname = config
        .get_dbname()
        .or(config.get_user())
        .unwrap_or("(default)");
    format!("postgresql://{host}:{port}/{dbname}")
}

/// Classifies a PostgreSQL error: what a retry later may fix (the server unreachable,
/// restarting, out of connections, disk or memory; the connection lost; a serialization
/// failure or deadlock; a read-only standby after a failover) is `Unavailable`, the rest
/// `Database`.
pub fn from_postgres(err: &tokio_postgres::Error) -> StoreError {
    if err.is_closed() {
        return StoreError::Unavailable(format!("PostgreSQL connection closed: {err}"));
    }
    if let Some(reason) = tls::tls_failure(err) {
        return StoreError::Unavailable(format!("PostgreSQL TLS: {reason}"));
    }
    if let Some(code) = err.code() {
        return if retryable(code) {
            StoreError::Unavailable(describe_error(err))
        } else {
            StoreError::Database(describe_error(err))
        };
    }
    // No SQLSTATE: a client-side failure. An I/O error or a timeout (the connection,
    // the socket) is the server being out of reach; a conversion error is ours.
    let mut source = err.source();
    while let Some(cause) = source {
        if cause.is::<std::io::Error>() {
            return StoreError::Unavailable(describe_error(err));
        }
        source = cause.source();
    }
    let text = err.to_string();
    if text.contains("timeout") || text.contains("timed out") {
        return StoreError::Unavailable(describe_error(err));
    }
    StoreError::Database(describe_error(err))
}

fn retryable(code: &SqlState) -> bool {
    let class = &code.code()[..2];
    matches!(
        class,
        // connection exception, insufficient resources, operator intervention (shutdown,
        // cannot connect now), system error (I/O)
        "08" | "53" | "57" | "58"
    ) || [
        SqlState::T_R_SERIALIZATION_FAILURE,
        SqlState::T_R_DEADLOCK_DETECTED,
        SqlState::LOCK_NOT_AVAILABLE,
        SqlState::READ_ONLY_SQL_TRANSACTION,
    ]
    .contains(code)
}

/// The error with its server message and detail (tokio-postgres' own `Display` says only
/// "db error").
fn describe_error(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => match db.detail() {
            Some(detail) => format!("{}: {} ({detail})", db.code().code(), db.message()),
            None => format!("{}: {}", db.code().code(), db.message()),
        },
        None => match err.source() {
            Some(source) => format!("{err}: {source}"),
            None => err.to_string(),
        },
    }
}

/// Classifies a pool checkout failure: no connection in time, or none could be opened,
/// is `Unavailable`; a closed pool is `Closed`.
pub fn from_pool(err: &PoolError) -> StoreError {
    match err {
        PoolError::Timeout(kind) => StoreError::Unavailable(format!(
            "no PostgreSQL connection in time ({kind:?} timeout)"
        )),
        PoolError::Backend(err) => from_postgres(err),
        PoolError::Closed => StoreError::Closed,
        PoolError::NoRuntimeSpecified => StoreError::Database(err.to_string()),
        PoolError::PostCreateHook(HookError::Backend(err)) => from_postgres(err),
        PoolError::PostCreateHook(HookError::Message(message)) => {
            StoreError::Database(message.to_string())
        }
    }
}

/// `sql` prepared on the transaction's connection once and reused from then on (the
/// pool's per-connection statement cache): each later use is one round trip, not two.
pub async fn cached(
    tx: &PgTransaction<'_>,
    sql: &str,
) -> Result<tokio_postgres::Statement, StoreError> {
    tx.prepare_cached(sql).await.map_err(|e| from_postgres(&e))
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(err: tokio_postgres::Error) -> Self {
        from_postgres(&err)
    }
}
