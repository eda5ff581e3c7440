//! Several instances on one PostgreSQL database (SPEC §8), no balancer in front: the
//! tests send to every instance themselves. They always run on PostgreSQL (they need
//! `CASHOUT_RECON_TEST_DATABASE_URL` and fail, never skip, without it), whatever
//! `CASHOUT_RECON_TEST_BACKEND` says.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use cashout_recon::alert::shared::SharedSignals;
use cashout_recon::config::Settings;
use cashout_recon::metrics::Metrics;
use cashout_recon::sim::alert_receiver::{AlertReceiver, ReceiverConfig};
use cashout_recon::sim::{harness, SimConfig, Simulator};
use cashout_recon::store::{LedgerEntry, Store};
use serde_json::Value;
use tokio::time::Instant;

use crate::helpers::{
    assert_accepted, fiserv_headers, now_unix, spawn_app_in, FiservBody, TestApp, TestBackend,
    TestStore, ADMIN_TOKEN, ALERT_SECRET, FISERV_SECRET,
};
use crate::process::{metric_value, metrics_text, send_until_killed, start_serving, Daemon, Load};
use crate::world::{run_all_to_completion, Layout, World, PER_PROVIDER};

/// Short leases, so that a killed instance's jobs are taken over within seconds.
const LEASE_TTL: &str = "2s";
const RENEW_EVERY: &str = "500ms";
const WITHIN: Duration = Duration::from_secs(120);

/// `[instances]` with short leases.
fn instances_section() -> String {
    format!("[instances]\nlease_ttl = \"{LEASE_TTL}\"\nrenew_every = \"{RENEW_EVERY}\"\n")
}

/// Two test apps (the base config, background jobs on) on one fresh PostgreSQL database.
async fn two_apps_on_one_database() -> (TestApp, TestApp) {
    let store = TestStore::of(TestBackend::Postgres).await;
    let a = spawn_app_in(store.clone(), |config| config).await;
    let b = spawn_app_in(store, |config| config).await;
    (a, b)
}

/// One signed Fiserv webhook (its bytes and headers), to be sent as many times as wanted.
struct SignedWebhook {
    provider: &'static str,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

impl SignedWebhook {
    fn fiserv(txid: &str, status: u8) -> SignedWebhook {
        let body = FiservBody::new(txid, status).bytes();
        let headers = fiserv_headers(
            &body,
            "/webhooks/fiserv",
            FISERV_SECRET,
            now_unix(),
            &format!("req-{txid}-{status}"),
        );
        SignedWebhook {
            provider: "fiserv",
            headers,
            body,
        }
    }

    async fn send_to(&self, app: &TestApp) -> (u16, Value) {
        app.post_webhook(self.provider, &self.headers, &self.body)
            .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_webhook_sent_40_times_across_two_instances_is_accepted_once() {
    // Arrange
    let (a, b) = two_apps_on_one_database().await;
    let webhook = Arc::new(SignedWebhook::fiserv("split-1", 1));
    let apps = Arc::new([a, b]);

    // Act: 40 concurrent copies, alternating between the instances.
    let sends: Vec<_> = (0..40)
        .map(|copy| {
            let (webhook, apps) = (webhook.clone(), apps.clone());
            tokio::spawn(async move { webhook.send_to(&apps[copy % 2]).await })
        })
        .collect();
    let mut answers = Vec::new();
    for send in sends {
        answers.push(send.await.expect("send task"));
    }

    // Assert
    let server_errors: Vec<_> = answers.iter().filter(|(s, _)| *s >= 500).collect();
    assert!(server_errors.is_empty(), "5xx answers: {server_errors:?}");
    let accepted: Vec<_> = answers
        .iter()
        .filter(|(_, body)| body["status"] == "accepted")
        .collect();
    let duplicates: Vec<_> = answers
        .iter()
        .filter(|(status, body)| *status == 200 && body["status"] == "duplicate")
        .collect();
    assert_eq!(accepted.len(), 1, "exactly one accepted: {answers:?}");
    let event_id = assert_accepted(accepted[0], "the one accepted copy");
    assert_eq!(
        duplicates.len(),
        39,
        "every other copy a duplicate: {answers:?}"
    );
    assert!(
        duplicates
            .iter()
            .all(|(_, body)| body["event_id"] == event_id),
        "duplicates name the accepted event: {duplicates:?}"
    );
    for app in apps.iter() {
        let (status, cashout) = app.get_cashout("fiserv", "split-1").await;
        assert_eq!(status, 200, "{cashout}");
        let events = cashout["events"].as_array().cloned().unwrap_or_default();
        assert_eq!(events.len(), 1, "one event in the book: {cashout}");
        assert_eq!(events[0]["event_id"], event_id.as_str());
    }
    let Ok([a, b]) = Arc::try_unwrap(apps) else {
        panic!("the send tasks are done");
    };
    a.stop().await;
    b.stop().await;
}

/// Which of `apps` hold the `alerts` lease (their alert pass runs), once exactly one does.
async fn alert_lease_holder(apps: &[TestApp; 2]) -> usize {
    let deadline = Instant::now() + WITHIN;
    loop {
        let holding: Vec<usize> = (0..2)
            .filter(|&i| {
                apps[i]
                    .state
                    .metrics
                    .leases_held
                    .with_label_values(&["alerts"])
                    .get()
                    == 1
            })
            .collect();
        if let [holder] = holding[..] {
            return holder;
        }
        assert!(
            Instant::now() < deadline,
            "alerts lease held by {holding:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_quarantined_on_one_instance_wakes_the_alert_pass_on_the_other() {
    // Arrange: alert passes every hour (and when woken); one instance holds their lease.
    let store = TestStore::of(TestBackend::Postgres).await;
    let hourly = |config: String| format!("{config}\n[alerts]\nevaluate_every = \"1h\"\n");
    let apps = [
        spawn_app_in(store.clone(), hourly).await,
        spawn_app_in(store, hourly).await,
    ];
    let holder = alert_lease_holder(&apps).await;
    let other = &apps[1 - holder];

    // Act: a verified webhook with three decimals, quarantined by the other instance.
    let body = FiservBody::new("wake-1", 3).amount("\"12.345\"").bytes();
    let headers = fiserv_headers(&body, "/webhooks/fiserv", FISERV_SECRET, now_unix(), "w1");
    let (status, answer) = other.post_webhook("fiserv", &headers, &body).await;
    assert_eq!(status, 202, "{answer}");
    let event_id = answer["event_id"].as_str().expect("event id").to_string();

    // Assert: the holder's pass ran at once (not in an hour) and opened the alert.
    apps[holder]
        .wait_for_open_alert(
            "quarantined_webhook",
            &format!("fiserv/{event_id}"),
            Duration::from_secs(30),
        )
        .await;
    let [a, b] = apps;
    a.stop().await;
    b.stop().await;
}

/// The `provider_silent` alerts open on `app`.
async fn open_silent_alerts(app: &TestApp) -> Vec<Value> {
    app.open_alerts()
        .await
        .into_iter()
        .filter(|a| a["kind"] == "provider_silent")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_whose_webhooks_reach_only_the_other_instance_is_not_silent() {
    // Arrange: fiserv silent after an hour; alert passes at start, then driven by the test
    // with its own clock on the instance holding the `alerts` lease.
    let store = TestStore::of(TestBackend::Postgres).await;
    let silent_after_an_hour = |config: String| {
        let config = config.replacen(
            "id = \"fiserv\"\n",
            "id = \"fiserv\"\nstuck_after = \"30m\"\nsilent_after = \"1h\"\n",
            1,
        );
        format!("{config}\n[alerts]\nevaluate_every = \"1h\"\n")
    };
    let apps = [
        spawn_app_in(store.clone(), silent_after_an_hour).await,
        spawn_app_in(store, silent_after_an_hour).await,
    ];
    let holder = alert_lease_holder(&apps).await;
    let (holding, receiving) = (&apps[holder], &apps[1 - holder]);
    let deadline = Instant::now() + WITHIN;
    while holding.state.alerting.passes_completed() == 0 {
        assert!(Instant::now() < deadline, "no alert pass at start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Act: a cash-out in flight for 20 minutes, its webhook sent to the other instance only.
    let created_at = (chrono::Utc::now() - chrono::Duration::minutes(20))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let body = FiservBody::new("silent-1", 1)
        .created_at(&created_at)
        .bytes();
    let headers = fiserv_headers(&body, "/webhooks/fiserv", FISERV_SECRET, now_unix(), "s1");
    let answer = receiving.post_webhook("fiserv", &headers, &body).await;
    assert_accepted(&answer, "fiserv silent-1 on the receiving instance");
    let heard_at = chrono::Utc::now();
    // The receiving instance publishes its signals about once a second.
    loop {
        let shared = SharedSignals::load(&holding.state.store)
            .await
            .expect("peer signals");
        let fiserv = shared.snapshot(
            &holding.state.alerting.signals,
            "fiserv",
            heard_at.timestamp_millis(),
        );
        if fiserv.last_webhook_at.is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the other instance's webhook never reached the holder's signals"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Assert: 50 minutes after the webhook, fiserv is not silent (it would be for the
    // holder's own memory: 70 minutes since the cash-out was created, nothing heard).
    let pass = |at: chrono::DateTime<chrono::Utc>| {
        let app = holding;
        async move {
            app.state
                .alerting
                .run_pass(&app.state, at)
                .await
                .expect("alert pass")
        }
    };
    pass(heard_at + chrono::Duration::minutes(50)).await;
    let silent = open_silent_alerts(holding).await;
    assert!(silent.is_empty(), "fiserv was heard 50 min ago: {silent:?}");

    // Two hours on, neither instance heard anything from fiserv: silent.
    pass(heard_at + chrono::Duration::minutes(120)).await;
    let silent = open_silent_alerts(holding).await;
    assert_eq!(silent.len(), 1, "{silent:?}");
    assert_eq!(silent[0]["subject"], "fiserv", "{silent:?}");
    let [a, b] = apps;
    a.stop().await;
    b.stop().await;
}

/// The poll cycles `daemon` ran for `provider` (`cashout_recon_poll_cycles_total`).
fn poll_cycles(daemon: &crate::world::Daemon, provider: &str) -> u64 {
    daemon
        .state
        .metrics
        .poll_cycles
        .with_label_values(&[provider])
        .get()
}

/// A ledger entry registered two days ago (the store knew the day before today, so each
/// instance starts with that day's daily report to catch up), then the simulators'
/// cash-outs, the first one's amount off by a cent (an alert to deliver).
async fn register_the_ledger_from_two_days_ago(world: &World) {
    let settings: Settings = world.settings(0);
    let store = Store::connect(&settings.store, Metrics::new())
        .await
        .expect("connect to the world's database");
    // First: the store's first entry is the first registered.
    let entry = LedgerEntry {
        provider: "fiserv".to_string(),
        external_id: "paid-two-days-ago".to_string(),
        amount_minor: 1_000,
        currency: "BRL".to_string(),
        provider_ref: None,
        created_at: None,
    };
    store
        .register_expected_at(entry, chrono::Utc::now() - chrono::Duration::days(2))
        .await
        .expect("register");
    // One cash-out the platform meant to pay a cent more: an amount mismatch, alerted.
    let (id, first) = &world.simulators[0];
    let truth = &first.ground_truth()[0];
    let off_by_a_cent = LedgerEntry {
        provider: id.to_string(),
        external_id: truth.ledger_external_id.clone(),
        amount_minor: truth.amount_minor + 1,
        currency: truth.currency.clone(),
        provider_ref: Some(truth.provider_ref.clone()),
        created_at: None,
    };
    store
        .register_expected(off_by_a_cent)
        .await
        .expect("register");
    world.register_ledger(&store).await;
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_sprayed_with_faulty_webhooks_reach_the_truth_with_each_job_on_one_instance()
{
    // Arrange: five simulators (300 cash-outs, webhooks lost, duplicated and reordered,
    // APIs failing) rotating their webhooks across two daemons on one database; scheduled
    // poll cycles on in both, so the leases decide who polls; alerts to a receiver.
    let receiver = AlertReceiver::start(ReceiverConfig {
        secret: ALERT_SECRET.to_string(),
        fail_first: 0,
        hang: false,
    })
    .await
    .expect("alert receiver starts");
    let layout = Layout {
        instances: 2,
        backend: TestBackend::Postgres,
        poll_every: "1s",
        sections: format!(
            "{}\n[reconcile]\nevery = \"1s\"\n\n{}evaluate_every = \"1s\"\n",
            instances_section().replace(LEASE_TTL, "3s"),
            receiver.alerts_toml()
        ),
        env: BTreeMap::from([receiver.env_var()]),
    };
    let world = World::with_layout(3000, layout).await;
    for (_, simulator) in &world.simulators {
        simulator.create_cashouts(PER_PROVIDER);
    }
    register_the_ledger_from_two_days_ago(&world).await;
    let daemons = [world.start_instance(0).await, world.start_instance(1).await];

    // Act
    run_all_to_completion(&world).await;
    let deadline = Instant::now() + WITHIN;
    loop {
        let left = world.differences(&daemons[0]).await;
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the book did not reach the ground truth: {left:#?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let yesterday = (chrono::Utc::now() - chrono::Duration::days(1))
        .format("%Y-%m-%d")
        .to_string();
    let report = loop {
        if let Some(report) = daemons[0]
            .state
            .store
            .get_report(yesterday.clone())
            .await
            .expect("reports index")
        {
            break report;
        }
        assert!(Instant::now() < deadline, "no report of {yesterday}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // Assert: each provider's poll cycles ran on one instance only (the leases are sticky
    // while their holder lives): a few cycles each, all counted by one instance.
    for (id, _) in &world.simulators {
        let cycles = loop {
            let cycles = daemons.each_ref().map(|daemon| poll_cycles(daemon, id));
            if cycles.iter().sum::<u64>() >= 3 {
                break cycles;
            }
            assert!(Instant::now() < deadline, "{id}: poll cycles {cycles:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(
            cycles.iter().filter(|&&n| n > 0).count(),
            1,
            "{id}: poll cycles per instance {cycles:?}: one instance polls"
        );
    }
    // One daily report of yesterday, written by one instance.
    assert!(report.is_final, "{report:?}");
    let reports = daemons[1]
        .state
        .store
        .list_reports()
        .await
        .expect("reports");
    assert_eq!(
        reports.iter().filter(|r| r.date == yesterday).count(),
        1,
        "{reports:?}"
    );
    let written: Vec<usize> = (0..2)
        .filter(|&instance| files_in(&world.reports_dir(instance)) > 0)
        .collect();
    assert_eq!(
        written.len(),
        1,
        "report files written by instances {written:?}"
    );
    // The amount mismatch alerted, its outbox drained, and no alert delivered twice
    // (each delivery has its own webhook-id, the same on its retries).
    loop {
        let pending = daemons[0]
            .state
            .store
            .alert_outbox_counts()
            .await
            .expect("outbox");
        if !receiver.delivered().is_empty() && pending.0 == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "alerts delivered {:?}, outbox (pending, failed) {pending:?}",
            receiver.summary()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let delivered = receiver.delivered();
    let mut seen = HashMap::new();
    for alert in &delivered {
        *seen.entry(alert.webhook_id.clone()).or_insert(0) += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, &n)| n > 1).collect();
    assert!(
        twice.is_empty(),
        "alerts delivered more than once: {twice:?}"
    );
    eprintln!(
        "two instances: {} alerts delivered once each; report of {yesterday} by instance {}",
        delivered.len(),
        written[0]
    );
    for daemon in daemons {
        daemon.stop().await;
    }
    receiver.stop().await;
    for (_, simulator) in &world.simulators {
        simulator.stop().await;
    }
}

fn files_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| entries.count())
}

// ---------------------------------------------------------------------------------------
// Real processes: one instance killed with SIGKILL under load.
// ---------------------------------------------------------------------------------------

/// Concurrent senders (half to each instance).
const SENDERS: usize = 8;
/// Acknowledged webhooks (by either instance) after which one instance is killed.
const KILL_AFTER_ACKS: usize = 200;

/// Two polled providers (simulated) and `fiserv` for the webhook load, on one database.
struct Cluster {
    /// The database, and a directory for the configs, logs and reports.
    store: TestStore,
    simulators: Vec<(&'static str, Simulator)>,
    env: Vec<(String, String)>,
}

impl Cluster {
    async fn new() -> Cluster {
        let mut simulators = Vec::new();
        for (index, (id, kind)) in [
            (
                "polled_fiserv",
                cashout_recon::providers::ProviderKind::FiservPix,
            ),
            (
                "polled_mannco",
                cashout_recon::providers::ProviderKind::Mannco,
            ),
        ]
        .into_iter()
        .enumerate()
        {
            let simulator =
                Simulator::start(SimConfig::new(kind, 4000 + index as u64), "127.0.0.1:0")
                    .await
                    .expect("simulator starts");
            simulator.create_cashouts(5);
            simulators.push((id, simulator));
        }
        let store = TestStore::of(TestBackend::Postgres).await;
        let (_, sim_env) = harness::daemon_config(&simulators, 0, &PathBuf::new(), "", None);
        let mut env = store.env(sim_env);
        env.insert(
            "FISERV_WEBHOOK_SECRET".to_string(),
            FISERV_SECRET.to_string(),
        );
        env.insert(
            "CASHOUT_RECON_ADMIN_TOKEN".to_string(),
            ADMIN_TOKEN.to_string(),
        );
        Cluster {
            store,
            simulators,
            env: env.into_iter().collect(),
        }
    }

    fn polled(&self) -> Vec<&'static str> {
        self.simulators.iter().map(|(id, _)| *id).collect()
    }

    /// Instance `name`'s config on `port`.
    fn write_config(&self, name: &str, port: u16) -> PathBuf {
        let (config, _) = harness::daemon_config(
            &self.simulators,
            port,
            &self.store.dir.path().join("unused.db"),
            "request_timeout = \"5s\"",
            Some("1s"),
        );
        let text = format!(
            "{}\n[[providers]]\nid = \"fiserv\"\nkind = \"fiserv_pix\"\nbase_url = \"http://127.0.0.1:9\"\n\
             webhook_secrets_env = [\"FISERV_WEBHOOK_SECRET\"]\n\n{}\n[reports]\ndir = \"{}\"\n",
            self.store.configure(&config),
            instances_section(),
            self.store.dir.path().join(format!("reports-{name}")).display()
        );
        let path = self.store.dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, text).expect("write the config");
        path
    }

    async fn start(&self, name: &str, client: &reqwest::Client) -> Daemon {
        start_serving(self.store.dir.path(), None, &self.env, client, |port| {
            self.write_config(name, port)
        })
        .await
    }

    /// The first column of `sql`'s rows, read straight from the database.
    async fn strings(&self, sql: &str) -> BTreeSet<String> {
        let url = self.store.database_url().expect("a PostgreSQL store");
        let (client, connection) = cashout_recon::store::postgres::PgTarget::parse(url, None)
            .expect("a connection string")
            .connect()
            .await
            .expect("connect to the test database");
        tokio::spawn(connection);
        let rows = client.query(sql, &[]).await.expect(sql);
        rows.iter().map(|row| row.get::<_, String>(0)).collect()
    }

    /// Every event id and fiserv cash-out stored.
    async fn stored(&self) -> (BTreeSet<String>, BTreeSet<String>) {
        (
            self.strings("SELECT event_id FROM events").await,
            self.strings("SELECT provider_ref FROM cashouts WHERE provider = 'fiserv'")
                .await,
        )
    }
}

/// Which of `daemons` hold the poll lease of `provider` (per their `/metrics`).
async fn poll_lease_holders(
    daemons: &[&Daemon],
    provider: &str,
    client: &reqwest::Client,
) -> Vec<u16> {
    let mut holders = Vec::new();
    for daemon in daemons {
        let text = metrics_text(daemon, client).await;
        let held = metric_value(
            &text,
            "cashout_recon_leases_held",
            &format!("job=\"poll:{provider}\""),
        );
        if held == Some(1.0) {
            holders.push(daemon.port);
        }
    }
    holders
}

/// `cashout_recon_poll_cycles_total{provider}` of `daemon`.
async fn poll_cycles_of(daemon: &Daemon, provider: &str, client: &reqwest::Client) -> f64 {
    let text = metrics_text(daemon, client).await;
    metric_value(
        &text,
        "cashout_recon_poll_cycles_total",
        &format!("provider=\"{provider}\""),
    )
    .unwrap_or(0.0)
}

/// Waits until `holder` ran two more poll cycles of `provider`, asserting that `other`
/// ran none meanwhile.
async fn polls_only_on(
    holder: &Daemon,
    other: &Daemon,
    provider: &str,
    client: &reqwest::Client,
    deadline: Instant,
) {
    let (held_from, other_from) = (
        poll_cycles_of(holder, provider, client).await,
        poll_cycles_of(other, provider, client).await,
    );
    while poll_cycles_of(holder, provider, client).await < held_from + 2.0 {
        assert!(
            Instant::now() < deadline,
            "{provider}: the holder does not poll"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        poll_cycles_of(other, provider, client).await,
        other_from,
        "{provider}: polled by the instance not holding its lease"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instance_killed_under_load_loses_no_acknowledged_webhook_and_the_other_takes_its_jobs()
{
    // Arrange: two real daemons on one database; every poll lease held by one of them.
    let cluster = Cluster::new().await;
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(SENDERS)
        .build()
        .expect("client");
    let a = cluster.start("a", &client).await;
    let b = cluster.start("b", &client).await;
    let deadline = Instant::now() + WITHIN;
    let mut holder_of = BTreeMap::new();
    for provider in cluster.polled() {
        loop {
            let holders = poll_lease_holders(&[&a, &b], provider, &client).await;
            if let [holder] = holders[..] {
                holder_of.insert(provider, holder);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{provider}: poll lease held by {holders:?}\n{}\n{}",
                a.log_tail(),
                b.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // While both live, each provider's cycles run on its lease holder only.
    for (provider, holder) in &holder_of {
        let (holder, other) = if *holder == a.port {
            (&a, &b)
        } else {
            (&b, &a)
        };
        polls_only_on(holder, other, provider, &client, deadline).await;
    }
    // The instance polling `polled_fiserv` is killed; the other survives.
    let (mut victim, survivor) = if holder_of["polled_fiserv"] == a.port {
        (a, b)
    } else {
        (b, a)
    };

    // Act: signed webhooks to both instances; SIGKILL one after the 200th acknowledgement.
    let load = Arc::new(Load::new(KILL_AFTER_ACKS));
    let senders: Vec<_> = (0..SENDERS)
        .map(|sender| {
            let target = if sender % 2 == 0 { &victim } else { &survivor };
            tokio::spawn(send_until_killed(
                load.clone(),
                client.clone(),
                target.url(""),
                sender,
            ))
        })
        .collect();
    if tokio::time::timeout(Duration::from_secs(60), load.threshold.notified())
        .await
        .is_err()
    {
        panic!(
            "only {} webhooks acknowledged in 60 s; unexpected answers: {:?}",
            load.acknowledged.lock().expect("ack list").len(),
            load.unexpected.lock().expect("list"),
        );
    }
    load.killed.store(true, Ordering::SeqCst);
    let killed_at = Instant::now();
    victim.kill_9();
    for sender in senders {
        tokio::time::timeout(Duration::from_secs(30), sender)
            .await
            .expect("senders stop")
            .expect("sender task");
    }

    // Assert: nothing but `200 accepted` before the kill, and every webhook answered 2xx
    // by either instance is stored.
    let acknowledged = load.acknowledged.lock().expect("ack list").clone();
    let unexpected = load.unexpected.lock().expect("list").clone();
    assert!(unexpected.is_empty(), "before the kill: {unexpected:?}");
    let (events, cashouts) = cluster.stored().await;
    let lost: Vec<_> = acknowledged
        .iter()
        .filter(|ack| !events.contains(&ack.event_id) || !cashouts.contains(&ack.txid))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged webhooks lost, e.g. {:?}",
        lost.len(),
        acknowledged.len(),
        &lost[..lost.len().min(5)]
    );

    // The survivor takes every poll lease over once the killed one's lapse, and polls.
    for provider in cluster.polled() {
        loop {
            let holders = poll_lease_holders(&[&survivor], provider, &client).await;
            if holders == [survivor.port] {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{provider}: the survivor never took the poll lease over\n{}",
                survivor.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let taken_over = poll_cycles_of(&survivor, provider, &client).await;
        loop {
            if poll_cycles_of(&survivor, provider, &client).await >= taken_over + 2.0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{provider}: the survivor stopped polling\n{}",
                survivor.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Their requests were paced through the database (max_rps across instances).
    let paced = cluster
        .strings("SELECT provider FROM provider_request_slots")
        .await;
    for provider in cluster.polled() {
        assert!(
            paced.contains(provider),
            "{provider} not paced in {paced:?}"
        );
    }
    eprintln!(
        "kill -9 of one of two instances: {} acknowledged, all stored; poll leases taken over \
         {:.1} s after the kill",
        acknowledged.len(),
        killed_at.elapsed().as_secs_f64()
    );
    drop(survivor);
    for (_, simulator) in &cluster.simulators {
        simulator.stop().await;
    }
}
