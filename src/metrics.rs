//! Prometheus metrics of the daemon, rendered at `GET /metrics`.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// All metrics, cheap to clone (each is reference-counted inside).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Webhooks that reached a configured provider's endpoint.
    pub webhooks_received: IntCounterVec,
    /// Webhooks by final answer: accepted, duplicate, quarantined.
    pub webhooks_outcome: IntCounterVec,
    /// Rejected webhooks by reason (the SPEC §2.1 codes, `store_unavailable`, `too_large`).
    pub webhooks_rejected: IntCounterVec,
    /// Time from a webhook's arrival to its answer.
    pub webhook_seconds: HistogramVec,
    /// Time to run and commit one group transaction.
    pub store_commit_seconds: Histogram,
    /// Writes committed per group transaction.
    pub store_group_size: Histogram,
    /// Time the writer spent finishing a WAL checkpoint between two groups (every
    /// queued write waits for it).
    pub store_checkpoint_pause_seconds: Histogram,
    /// Poll outcomes per provider: fetched, updated, recovered, errors.
    pub poll_results: IntCounterVec,
    /// Poll cycles this instance ran per provider (with several instances, the one
    /// holding the provider's poll lease counts them).
    pub poll_cycles: IntCounterVec,
    /// State changes found by polling that no webhook reported.
    pub missed_webhooks: IntCounterVec,
    /// Outbound provider requests by provider and result.
    pub provider_requests: IntCounterVec,
    /// Status fetches waiting per provider.
    pub status_fetch_queue: IntGaugeVec,
    /// Open alerts per kind (after the last alert pass).
    pub alerts_open: IntGaugeVec,
    /// Age in seconds of the oldest non-terminal cash-out per provider and state.
    pub oldest_in_flight_seconds: IntGaugeVec,
    /// Alert delivery attempts to the webhook sink by result (delivered, failed, gave_up).
    pub alert_deliveries: IntCounterVec,
    /// Alert deliveries waiting in the outbox (first attempt or retry).
    pub alert_outbox_pending: IntGauge,
    /// Alert deliveries given up (kept in the outbox, visible in the API).
    pub alert_outbox_failed: IntGauge,
    /// 1 when `/readyz` would answer 200 (set at each scrape).
    pub ready: IntGauge,
    /// Nonces the SQLite store's in-memory replay cache holds (70–90 bytes each).
    pub replay_cache_entries: IntGauge,
    /// Console sign-ins refused for a wrong token.
    pub console_sign_in_failures: IntCounter,
    /// 1 while this instance holds a job's lease (by job: `poll:<provider>`,
    /// `reconcile`, `report`, `alerts`, `retention`).
    pub leases_held: IntGaugeVec,
    /// Job leases this instance lost while running the job (another instance took over).
    pub leases_lost: IntCounterVec,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntCounterVec::new(Opts::new(name, help), labels)
                .unwrap_or_else(|err| panic!("metric {name}: {err}"));
            registry
                .register(Box::new(metric.clone()))
                .unwrap_or_else(|err| panic!("metric {name}: {err}"));
            metric
        };
        let webhooks_received = counter(
            "cashout_recon_webhooks_received_total",
            "Webhooks received per provider.",
            &["provider"],
        );
        let webhooks_outcome = counter(
            "cashout_recon_webhooks_total",
            "Webhooks answered 2xx per provider and outcome (accepted, duplicate, quarantined).",
            &["provider", "outcome"],
        );
        let webhooks_rejected = counter(
            "cashout_recon_webhooks_rejected_total",
            "Webhooks rejected per provider and reason.",
            &["provider", "reason"],
        );
        let poll_results = counter(
            "cashout_recon_poll_total",
            "Poll results per provider and kind (fetched, updated, recovered, errors).",
            &["provider", "result"],
        );
        let poll_cycles = counter(
            "cashout_recon_poll_cycles_total",
            "Poll cycles this instance ran per provider (finished or failed).",
            &["provider"],
        );
        let missed_webhooks = counter(
            "cashout_recon_missed_webhooks_total",
            "State changes found by polling that no webhook reported.",
            &["provider"],
        );
        let provider_requests = counter(
            "cashout_recon_provider_requests_total",
            "Outbound provider API requests per provider and result.",
            &["provider", "result"],
        );
        let webhook_seconds = HistogramVec::new(
            HistogramOpts::new(
                "cashout_recon_webhook_seconds",
                "Webhook handling time, arrival to answer.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 1.0,
            ]),
            &["provider"],
        )
        .unwrap_or_else(|err| panic!("webhook histogram: {err}"));
        registry
            .register(Box::new(webhook_seconds.clone()))
            .unwrap_or_else(|err| panic!("webhook histogram: {err}"));
        let store_commit_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "cashout_recon_store_commit_seconds",
                "Time to run and commit one group transaction.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0,
            ]),
        )
        .unwrap_or_else(|err| panic!("commit histogram: {err}"));
        registry
            .register(Box::new(store_commit_seconds.clone()))
            .unwrap_or_else(|err| panic!("commit histogram: {err}"));
        let store_group_size = Histogram::with_opts(
            HistogramOpts::new(
                "cashout_recon_store_group_size",
                "Writes committed per group transaction.",
            )
            .buckets(vec![
                1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0,
            ]),
        )
        .unwrap_or_else(|err| panic!("group histogram: {err}"));
        registry
            .register(Box::new(store_group_size.clone()))
            .unwrap_or_else(|err| panic!("group histogram: {err}"));
        let store_checkpoint_pause_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "cashout_recon_store_checkpoint_pause_seconds",
                "Time the writer spent finishing a WAL checkpoint between two groups.",
            )
            .buckets(vec![0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0]),
        )
        .unwrap_or_else(|err| panic!("checkpoint histogram: {err}"));
        registry
            .register(Box::new(store_checkpoint_pause_seconds.clone()))
            .unwrap_or_else(|err| panic!("checkpoint histogram: {err}"));
        let status_fetch_queue = IntGaugeVec::new(
            Opts::new(
                "cashout_recon_status_fetch_queue",
                "Status fetches waiting per provider.",
            ),
            &["provider"],
        )
        .unwrap_or_else(|err| panic!("queue gauge: {err}"));
        registry
            .register(Box::new(status_fetch_queue.clone()))
            .unwrap_or_else(|err| panic!("queue gauge: {err}"));
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntGaugeVec::new(Opts::new(name, help), labels)
                .unwrap_or_else(|err| panic!("metric {name}: {err}"));
            registry
                .register(Box::new(metric.clone()))
                .unwrap_or_else(|err| panic!("metric {name}: {err}"));
            metric
        };
        let gauge = |name: &str, help: &str| {
            let metric =
                IntGauge::new(name, help).unwrap_or_else(|err| panic!("metric {name}: {err}"));
            registry
                .register(Box::new(metric.clone()))
                .unwrap_or_else(|err| panic!("metric {name}: {err}"));
            metric
        };
        let alerts_open = gauge_vec(
            "cashout_recon_alerts_open",
            "Open alerts per kind.",
            &["kind"],
        );
        let oldest_in_flight_seconds = gauge_vec(
            "cashout_recon_oldest_in_flight_seconds",
            "Age of the oldest non-terminal cash-out per provider and state (0: none).",
            &["provider", "state"],
        );
        let alert_deliveries = counter(
            "cashout_recon_alert_deliveries_total",
            "Alert delivery attempts to alerts.webhook_url by result (delivered, failed, gave_up).",
            &["result"],
        );
        let alert_outbox_pending = gauge(
            "cashout_recon_alert_outbox_pending",
            "Alert deliveries waiting in the outbox.",
        );
        let alert_outbox_failed = gauge(
            "cashout_recon_alert_outbox_failed",
            "Alert deliveries given up after their retries.",
        );
        let ready = gauge(
            "cashout_recon_ready",
            "1 when the store accepts writes and the scheduler runs (as /readyz), else 0.",
        );
        let replay_cache_entries = gauge(
            "cashout_recon_replay_cache_entries",
            "Signed-request nonces held in memory against replays (SQLite store; 70-90 bytes each).",
        );
        let leases_held = gauge_vec(
            "cashout_recon_leases_held",
            "1 while this instance holds the job's lease (runs the job), else 0.",
            &["job"],
        );
        let leases_lost = counter(
            "cashout_recon_leases_lost_total",
            "Job leases lost while running (renewal refused: another instance took over).",
            &["job"],
        );
        let console_sign_in_failures = IntCounter::new(
            "cashout_recon_console_sign_in_failures_total",
            "Ops console sign-ins refused for a wrong token.",
        )
        .unwrap_or_else(|err| panic!("console counter: {err}"));
        registry
            .register(Box::new(console_sign_in_failures.clone()))
            .unwrap_or_else(|err| panic!("console counter: {err}"));
        Metrics {
            registry,
            ready,
            replay_cache_entries,
            leases_held,
            leases_lost,
            console_sign_in_failures,
            alerts_open,
            oldest_in_flight_seconds,
            alert_deliveries,
            alert_outbox_pending,
            alert_outbox_failed,
            webhooks_received,
            webhooks_outcome,
            webhooks_rejected,
            webhook_seconds,
            store_commit_seconds,
            store_group_size,
            store_checkpoint_pause_seconds,
            poll_results,
            poll_cycles,
            missed_webhooks,
            provider_requests,
            status_fetch_queue,
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        if let Err(err) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::error!(error = %err, "cannot encode metrics");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
