//! cashout-recon: verified webhook ingestion, recovery polling and reconciliation of
//! payout providers' cash-outs.
//!
//! Map of the modules:
//! - [`config`]: the TOML settings, validated at load; the only reader of the environment.
//! - [`app`]: builds the store, providers and HTTP server; runs until stopped.
//! - [`http`]: webhooks, operations endpoints and the admin API.
//! - [`console`]: the ops console under `/console` (server-rendered pages, sessions, CSRF).
//! - [`ingest`]: the ingestion rules (dedup, replay, quarantine, state change, findings,
//!   fetches) as pure functions returning a plan; [`ingestor`] loads, decides and applies.
//! - [`ids`]: the one rule every id from outside follows (length, characters, no dot segment).
//! - [`verify`]: signature schemes over raw bytes (HMAC, Standard Webhooks, Stripe, JWT).
//! - [`providers`]: one module per provider kind behind one trait; the registry.
//! - [`state`]: canonical states and the transition rule (pure).
//! - [`reconcile`]: the matching rules, ledger × provider facts → findings (pure).
//! - [`reconciler`]: the reconciliation passes (load, examine, apply).
//! - [`report`]: the daily CSV and summary, point in time.
//! - [`money`]: ISO 4217 currencies and exact minor units.
//! - [`ledger_import`]: ledger entry validation (API and CSV) and the streaming CSV import.
//! - [`poller`], [`scheduler`]: recovery polling and the background jobs that run it.
//! - [`store`]: SQLite with one group-committing writer and read connections.
//! - [`retention`]: dropping old raw bodies (`store.retain_raw_bodies`), archive first.
//! - [`metrics`], [`telemetry`]: Prometheus metrics and structured logs.
//! - [`alert`]: alert rules, lifecycle (grouping, inhibition) and delivery (log, signed
//!   webhooks through a persisted outbox).
//! - [`cmd`]: one module per command-line command.
//! - [`sim`]: provider simulators on loopback (tests, `demo`, `simulate`).

pub mod alert;
pub mod app;
pub mod cmd;
pub mod config;
pub mod console;
pub mod http;
pub mod ids;
pub mod ingest;
pub mod ingestor;
pub mod leases;
pub mod ledger_import;
pub mod metrics;
pub mod money;
pub mod poller;
pub mod providers;
pub mod reconcile;
pub mod reconciler;
pub mod report;
pub mod retention;
pub mod scheduler;
pub mod sim;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod verify;
pub mod wakeups;
