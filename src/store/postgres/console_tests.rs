//! The ops console's queries on both stores: one book written through the entry points
//! both stores have, every console read taken the same way on each ([`ConsoleOps`]), the
//! two snapshots compared; then every console statement's PostgreSQL plan on a seeded,
//! analyzed book (custom and generic plans): the index it should read, never a
//! sequential scan of the event log, the cash-outs or the findings.

use std::time::Duration as StdDuration;

use async_trait::async_trait;
use chrono::{DateTime, Duration, DurationRound, Utc};
use tokio_postgres::SimpleQueryMessage;

use super::console::{
    by_external_sql, by_ref_sql, event_sql, quarantined_sql, stuck_sql, CASHOUT_ALERTS,
    CASHOUT_MISMATCHES, DELIVERY_SUMMARIES, IN_FLIGHT_FIGURES, OPEN_MISMATCH_COUNTS,
    PROVIDER_FIGURES, STORED_PROVIDERS,
};
use super::ingest_tests::{accepted, observation, record_at, sqlite, Book, PROVIDER};
use super::testing::TestDatabase;
use super::PgStore;
use crate::alert::lifecycle::OpenAlert;
use crate::alert::{AlertKind, AlertPlan, Delivery, DesiredAlert, Severity};
use crate::ingest::plan::PollKind;
use crate::reconcile::MismatchKind;
use crate::state::CashoutStatus;
use crate::store::{
    AppliedAlerts, CashoutAlert, CashoutRow, ConsoleEvent, DeliverySummary, MismatchCount,
    MismatchRecord, OutboxItem, OutboxNext, ProviderFigures, Store, StoreError,
};

/// A second provider.
const OTHER: &str = "other";

/// The console's reads, and the writes the scenario needs besides ingestion, with the
/// facade's signatures.
#[async_trait]
trait ConsoleOps: Book {
    async fn overview(
        &self,
        providers: Vec<(String, DateTime<Utc>)>,
    ) -> Result<Vec<ProviderFigures>, StoreError>;
    async fn find(&self, provider: Option<&str>, id: &str) -> Result<Vec<CashoutRow>, StoreError>;
    async fn stuck(
        &self,
        provider: &str,
        cutoff: DateTime<Utc>,
        limit: usize,
    ) -> Result<Vec<CashoutRow>, StoreError>;
    async fn cashout_findings_of(
        &self,
        provider: &str,
        provider_ref: &str,
        external_id: Option<&str>,
    ) -> Result<(Vec<MismatchRecord>, Vec<CashoutAlert>), StoreError>;
    async fn quarantined(
        &self,
        before_seq: Option<i64>,
        limit: usize,
    ) -> Result<(Vec<ConsoleEvent>, Option<i64>), StoreError>;
    async fn event(
        &self,
        event_id: &str,
        with_body: bool,
    ) -> Result<Option<ConsoleEvent>, StoreError>;
    async fn mismatch_counts(&self) -> Result<Vec<MismatchCount>, StoreError>;
    async fn summaries(&self, ids: Vec<i64>) -> Result<Vec<(i64, DeliverySummary)>, StoreError>;
    async fn apply(&self, plan: AlertPlan) -> Result<AppliedAlerts, StoreError>;
    async fn claim(&self, limit: usize) -> Result<Vec<OutboxItem>, StoreError>;
    async fn record(
        &self,
        outbox_id: i64,
        http_status: Option<u16>,
        error: Option<String>,
        next: OutboxNext,
    ) -> Result<(), StoreError>;
    async fn swept(&self, provider: &str, at: DateTime<Utc>) -> Result<(), StoreError>;
}

/// The same forwarding for both stores (their methods share names and signatures).
macro_rules! forward_console_ops {
    ($store:ty) => {
        #[async_trait]
        impl ConsoleOps for $store {
            async fn overview(
                &self,
                providers: Vec<(String, DateTime<Utc>)>,
            ) -> Result<Vec<ProviderFigures>, StoreError> {
                <$store>::console_overview(self, providers).await
            }
            async fn find(
                &self,
                provider: Option<&str>,
                id: &str,
            ) -> Result<Vec<CashoutRow>, StoreError> {
                <$store>::find_cashouts_by_id(self, provider.map(str::to_string), id.to_string())
                    .await
            }
            async fn stuck(
                &self,
                provider: &str,
                cutoff: DateTime<Utc>,
                limit: usize,
            ) -> Result<Vec<CashoutRow>, StoreError> {
                <$store>::stuck_cashouts(self, provider.to_string(), cutoff, limit).await
            }
            async fn cashout_findings_of(
                &self,
                provider: &str,
                provider_ref: &str,
                external_id: Option<&str>,
            ) -> Result<(Vec<MismatchRecord>, Vec<CashoutAlert>), StoreError> {
                <$store>::cashout_findings(
                    self,
                    provider.to_string(),
                    provider_ref.to_string(),
                    external_id.map(str::to_string),
                )
                .await
            }
            async fn quarantined(
                &self,
                before_seq: Option<i64>,
                limit: usize,
            ) -> Result<(Vec<ConsoleEvent>, Option<i64>), StoreError> {
                <$store>::quarantined_events(self, before_seq, limit).await
            }
            async fn event(
                &self,
                event_id: &str,
                with_body: bool,
            ) -> Result<Option<ConsoleEvent>, StoreError> {
                <$store>::console_event(self, event_id.to_string(), with_body).await
            }
            async fn mismatch_counts(&self) -> Result<Vec<MismatchCount>, StoreError> {
                <$store>::open_mismatch_counts(self).await
            }
            async fn summaries(
                &self,
                ids: Vec<i64>,
            ) -> Result<Vec<(i64, DeliverySummary)>, StoreError> {
                <$store>::alert_delivery_summaries(self, ids).await
            }
            async fn apply(&self, plan: AlertPlan) -> Result<AppliedAlerts, StoreError> {
                <$store>::apply_alert_plan(self, plan, Utc::now(), true).await
            }
            async fn claim(&self, limit: usize) -> Result<Vec<OutboxItem>, StoreError> {
                // A little ahead: deliveries queued "now" by the wall clock are due.
                let now = Utc::now() + Duration::seconds(1);
                <$store>::claim_alert_deliveries(self, now, StdDuration::from_secs(60), limit).await
            }
            async fn record(
                &self,
                outbox_id: i64,
                http_status: Option<u16>,
                error: Option<String>,
                next: OutboxNext,
            ) -> Result<(), StoreError> {
                <$store>::record_alert_delivery(
                    self,
                    outbox_id,
                    Utc::now(),
                    http_status,
                    error,
                    9,
                    next,
                )
                .await
            }
            async fn swept(&self, provider: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
                <$store>::set_watermark(self, provider.to_string(), at).await
            }
        }
    };
}

forward_console_ops!(Store);
forward_console_ops!(PgStore);

const STATUSES: [CashoutStatus; 4] = [
    CashoutStatus::Pending,
    CashoutStatus::Processing,
    CashoutStatus::Completed,
    CashoutStatus::Failed,
];

fn provider_of(i: usize) -> &'static str {
    if i % 3 == 0 {
        OTHER
    } else {
        PROVIDER
    }
}

/// A webhook of `provider` for `provider_ref` (external id `ord-<n>`) at `at`.
#[allow(clippy::too_many_arguments)]
async fn webhook(
    ops: &dyn ConsoleOps,
    provider: &str,
    event_id: &str,
    provider_ref: &str,
    external_id: &str,
    status: CashoutStatus,
    at: DateTime<Utc>,
) {
    let body = format!(r#"{{"id":"{event_id}","ref":"{provider_ref}","status":"{status}"}}"#);
    let mut observed = observation(provider_ref, Some(status));
    observed.external_id = Some(external_id.to_string());
    observed.created_at = Some(at);
    observed.updated_at = Some(at);
    let mut record = record_at(
        event_id,
        &format!("key-{event_id}"),
        &body,
        None,
        Ok(observed),
        at,
    );
    record.provider = provider.to_string();
    record.headers_json = format!(r#"{{"x-request-id":"req-{event_id}"}}"#);
    accepted(&ops.ingest(record).await.expect("ingested"));
}

fn alert(kind: AlertKind, provider: &str, provider_ref: &str) -> OpenAlert {
    OpenAlert {
        alert: DesiredAlert {
            kind,
            subject: format!("{provider}/{provider_ref}"),
            provider: provider.to_string(),
            severity: Severity::Warning,
            summary: format!("{kind} {provider}/{provider_ref}"),
            since: 0,
        },
        delivery: Delivery::Individual,
        notify: true,
    }
}

/// The same book on either store: 24 cash-outs of two providers in four states, two by
/// two created in the same millisecond, external ids shared by four cash-outs across
/// providers; two status conflicts (open findings), a missed webhook (resolved), five
/// quarantined events, alerts about three cash-outs with deliveries failed, delivered
/// and given up, one provider's sweep. Returns the alerts' ids by subject.
async fn write_book(ops: &dyn ConsoleOps, base: DateTime<Utc>) -> Vec<(String, i64)> {
    for i in 0..24 {
        webhook(
            ops,
            provider_of(i),
            &format!("ev-{i:02}"),
            &format!("ref-{i:02}"),
            &format!("ord-{}", i / 4),
            STATUSES[i % STATUSES.len()],
            base + Duration::minutes((i / 2) as i64),
        )
        .await;
    }
    // ref-02 (completed) then failed; other/ref-03 (failed) then completed: conflicts.
    webhook(
        ops,
        PROVIDER,
        "ev-02b",
        "ref-02",
        "ord-0",
        CashoutStatus::Failed,
        base + Duration::minutes(90),
    )
    .await;
    webhook(
        ops,
        OTHER,
        "ev-03b",
        "ref-03",
        "ord-0",
        CashoutStatus::Completed,
        base + Duration::minutes(91),
    )
    .await;
    // A poll finds ref-05 (processing) completed: a missed webhook, recorded resolved.
    let mut polled = observation("ref-05", Some(CashoutStatus::Completed));
    polled.created_at = Some(base + Duration::minutes(2));
    ops.poll(polled, PollKind::Sweep, true)
        .await
        .expect("polled");
    for k in 0..5 {
        let mut record = record_at(
            &format!("ev-q{k}"),
            &format!("key-ev-q{k}"),
            &format!("not json {k}"),
            None,
            Err("unparseable on purpose".to_string()),
            base + Duration::hours(2) + Duration::minutes(k),
        );
        record.provider = if k % 2 == 0 { PROVIDER } else { OTHER }.to_string();
        assert!(matches!(
            ops.ingest(record).await.expect("quarantined"),
            crate::ingest::IngestOutcome::Quarantined { .. }
        ));
    }
    ops.swept(PROVIDER, base).await.expect("a sweep");

    let applied = ops
        .apply(AlertPlan {
            open: vec![
                alert(AlertKind::Stuck, PROVIDER, "ref-01"),
                alert(AlertKind::StatusConflict, PROVIDER, "ref-02"),
                alert(AlertKind::StatusConflict, OTHER, "ref-03"),
            ],
            ..AlertPlan::default()
        })
        .await
        .expect("alerts opened");
    let ids: Vec<(String, i64)> = applied
        .notices
        .iter()
        .map(|notice| (notice.subject.clone(), notice.id))
        .collect();
    assert_eq!(ids.len(), 3);
    let claimed = ops.claim(10).await.expect("claimed");
    assert_eq!(claimed.len(), 3);
    for item in claimed {
        let subject = ids
            .iter()
            .find(|(_, id)| *id == item.alert_id)
            .map(|(subject, _)| subject.as_str())
            .expect("an alert of the plan");
        let (status, error, next) = match subject {
            "fiserv/ref-01" => (Some(200), None, OutboxNext::Delivered),
            "fiserv/ref-02" => (
                Some(500),
                Some("HTTP 500".to_string()),
                OutboxNext::RetryAt(Utc::now() + Duration::minutes(5)),
            ),
            _ => (None, Some("timed out".to_string()), OutboxNext::GaveUp),
        };
        ops.record(item.id, status, error, next)
            .await
            .expect("recorded");
    }
    ids
}

/// Times the stores stamp with the clock at write time, cleared before comparing.
fn stable(mut row: CashoutRow) -> CashoutRow {
    row.updated_at = row.created_at;
    if row.recovered_by_poll > 0 {
        row.completed_at = row.completed_at.map(|_| row.created_at);
    }
    row
}

/// An event as compared: its `seq` is the store's own numbering.
fn stable_event(mut event: ConsoleEvent) -> ConsoleEvent {
    event.seq = 0;
    event
}

/// A finding as compared (its times are the clock's): kind, subject, ref, external id,
/// open.
type FindingSeen = (
    MismatchKind,
    Option<String>,
    Option<String>,
    Option<String>,
    bool,
);

/// An alert as compared: kind, severity, text, open.
type AlertSeen = (AlertKind, Severity, String, bool);

/// Everything the console's reads return on the book, in comparable form.
#[derive(Debug, PartialEq)]
struct Snapshot {
    overview: Vec<ProviderFigures>,
    found: Vec<Vec<CashoutRow>>,
    stuck: Vec<Vec<CashoutRow>>,
    findings: Vec<(Vec<FindingSeen>, Vec<AlertSeen>)>,
    quarantined: Vec<Vec<ConsoleEvent>>,
    events: Vec<Option<ConsoleEvent>>,
    mismatch_counts: Vec<MismatchCount>,
    summaries: Vec<DeliverySummary>,
}

async fn snapshot(ops: &dyn ConsoleOps, base: DateTime<Utc>, alerts: &[(String, i64)]) -> Snapshot {
    let stuck_cutoff = base + Duration::minutes(5);
    let mut overview = ops
        .overview(
            [PROVIDER, OTHER, "nobody"]
                .iter()
                .map(|p| (p.to_string(), stuck_cutoff))
                .collect(),
        )
        .await
        .expect("overview");
    for figures in &mut overview {
        // The sweep's time is the clock's.
        figures.last_sweep_at = figures.last_sweep_at.map(|_| 0);
    }
    assert_eq!(overview[0].last_sweep_at, Some(0));
    assert_eq!(overview[0].quarantined, 3);
    assert_eq!(overview[1].open_mismatches, 1);
    assert_eq!(
        overview[2],
        ProviderFigures {
            provider: "nobody".to_string(),
            in_flight: vec![
                (CashoutStatus::Pending, 0, None),
                (CashoutStatus::Processing, 0, None)
            ],
            ..ProviderFigures::default()
        }
    );

    let mut found = Vec::new();
    for (provider, id) in [
        (None, "ref-07"),
        (Some(OTHER), "ref-07"),
        (None, "ord-0"),
        (Some(PROVIDER), "ord-1"),
        (None, "nothing"),
    ] {
        let rows = ops.find(provider, id).await.expect("found");
        found.push(rows.into_iter().map(stable).collect::<Vec<_>>());
    }
    assert_eq!(found[0].len(), 1);
    assert!(found[1].is_empty());
    assert_eq!(found[2].len(), 4, "ord-0 in both providers");

    let mut stuck = Vec::new();
    for (provider, cutoff, limit) in [
        (PROVIDER, stuck_cutoff, 100),
        (PROVIDER, stuck_cutoff, 1),
        (OTHER, base + Duration::hours(1), 3),
        ("nobody", stuck_cutoff, 10),
    ] {
        let rows = ops.stuck(provider, cutoff, limit).await.expect("stuck");
        stuck.push(rows.into_iter().map(stable).collect::<Vec<_>>());
    }
    assert!(!stuck[0].is_empty());
    assert_eq!(stuck[1].len(), 1);

    let mut findings = Vec::new();
    for (provider, provider_ref, external_id) in [
        (PROVIDER, "ref-02", Some("ord-0")),
        (OTHER, "ref-03", Some("ord-0")),
        (PROVIDER, "ref-05", None),
        (PROVIDER, "ref-01", Some("ord-0")),
    ] {
        let (mismatches, alerts) = ops
            .cashout_findings_of(provider, provider_ref, external_id)
            .await
            .expect("findings");
        findings.push((
            mismatches
                .into_iter()
                .map(|m| {
                    (
                        m.kind,
                        m.subject,
                        m.provider_ref,
                        m.external_id,
                        m.resolved_at.is_none(),
                    )
                })
                .collect::<Vec<_>>(),
            alerts
                .into_iter()
                .map(|a| (a.kind, a.severity, a.text, a.resolved_at.is_none()))
                .collect::<Vec<_>>(),
        ));
    }
    assert_eq!(findings[0].0.len(), 1, "{findings:?}");
    assert_eq!(findings[0].1.len(), 1, "{findings:?}");
    assert_eq!(findings[2].0.len(), 1, "the missed webhook: {findings:?}");

    let mut quarantined = Vec::new();
    let mut before = None;
    loop {
        let (page, next) = ops.quarantined(before, 2).await.expect("a page");
        assert_eq!(next.is_some(), page.len() == 2 && quarantined.len() < 2);
        if let Some(next) = next {
            assert_eq!(page.last().map(|e| e.seq), Some(next));
        }
        assert!(page.windows(2).all(|w| w[0].seq > w[1].seq), "newest first");
        quarantined.push(page.into_iter().map(stable_event).collect::<Vec<_>>());
        match next {
            Some(next) => before = Some(next),
            None => break,
        }
    }
    assert_eq!(quarantined.iter().map(Vec::len).sum::<usize>(), 5);

    let mut events = Vec::new();
    for (id, with_body) in [
        ("ev-q0", true),
        ("ev-q0", false),
        ("ev-07", true),
        ("ev-none", true),
    ] {
        events.push(
            ops.event(id, with_body)
                .await
                .expect("an event")
                .map(stable_event),
        );
    }
    assert_eq!(
        events[0].as_ref().and_then(|e| e.raw_body.clone()),
        Some(b"not json 0".to_vec())
    );
    assert_eq!(events[1].as_ref().and_then(|e| e.body_bytes), Some(10));
    assert_eq!(events[1].as_ref().map(|e| e.raw_body.is_none()), Some(true));
    assert_eq!(events[3], None);

    let mut mismatch_counts = ops.mismatch_counts().await.expect("counts");
    for count in &mut mismatch_counts {
        count.oldest_opened_at = 0;
    }
    assert_eq!(mismatch_counts.len(), 2, "{mismatch_counts:?}");

    let id_of = |subject: &str| {
        alerts
            .iter()
            .find(|(s, _)| s == subject)
            .map(|(_, id)| *id)
            .expect("an alert")
    };
    let ids = vec![
        id_of("fiserv/ref-01"),
        id_of("fiserv/ref-02"),
        id_of("other/ref-03"),
        i64::MAX,
        id_of("fiserv/ref-02"),
    ];
    let got = ops.summaries(ids.clone()).await.expect("summaries");
    assert_eq!(got.iter().map(|(id, _)| *id).collect::<Vec<_>>(), ids);
    let summaries: Vec<DeliverySummary> = got.into_iter().map(|(_, s)| s).collect();
    assert_eq!(summaries[0].delivered, 1);
    assert_eq!(summaries[1].last_error.as_deref(), Some("HTTP 500"));
    assert_eq!(summaries[2].failed, 1);
    assert_eq!(summaries[3], DeliverySummary::default());
    assert!(ops.summaries(Vec::new()).await.expect("none").is_empty());

    Snapshot {
        overview,
        found,
        stuck,
        findings,
        quarantined,
        events,
        mismatch_counts,
        summaries,
    }
}

#[tokio::test]
async fn the_console_reads_one_book_the_same_on_both_stores() {
    let base = (Utc::now() - Duration::hours(6))
        .duration_trunc(Duration::seconds(1))
        .expect("a whole second");
    let (_dir, sqlite_store) = sqlite();
    let alerts = write_book(&sqlite_store, base).await;
    let on_sqlite = snapshot(&sqlite_store, base, &alerts).await;
    sqlite_store.close().await;

    let database = TestDatabase::create().await;
    let pg = database.migrated(4).await;
    let alerts = write_book(&pg, base).await;
    let on_postgres = snapshot(&pg, base, &alerts).await;
    pg.close();

    // Field by field first, for a readable failure.
    assert_eq!(on_sqlite.overview, on_postgres.overview);
    assert_eq!(on_sqlite.found, on_postgres.found);
    assert_eq!(on_sqlite.stuck, on_postgres.stuck);
    assert_eq!(on_sqlite.findings, on_postgres.findings);
    assert_eq!(on_sqlite.quarantined, on_postgres.quarantined);
    assert_eq!(on_sqlite.events, on_postgres.events);
    assert_eq!(on_sqlite.mismatch_counts, on_postgres.mismatch_counts);
    assert_eq!(on_sqlite.summaries, on_postgres.summaries);
    assert_eq!(on_sqlite, on_postgres);
}

#[tokio::test]
async fn an_empty_book_shows_the_same_console_on_both_stores() {
    let (_dir, sqlite_store) = sqlite();
    let database = TestDatabase::create().await;
    let pg = database.migrated(2).await;
    let now = Utc::now();
    for ops in [&sqlite_store as &dyn ConsoleOps, &pg] {
        let overview = ops
            .overview(vec![(PROVIDER.to_string(), now)])
            .await
            .expect("overview");
        assert_eq!(overview[0].stuck, 0);
        assert_eq!(overview[0].last_sweep_at, None);
        assert!(ops.find(None, "ref-1").await.expect("find").is_empty());
        assert_eq!(
            ops.quarantined(None, 10).await.expect("page"),
            (Vec::new(), None)
        );
        assert!(ops.mismatch_counts().await.expect("counts").is_empty());
        assert!(ops
            .stuck(PROVIDER, now, 10)
            .await
            .expect("stuck")
            .is_empty());
    }
    sqlite_store.close().await;
    pg.close();
}

/// A statement whose PostgreSQL plan is checked: `args` are SQL literals for its
/// parameters, `uses` the indexes it must read (`a|b`: either), `ordered` forbids any
/// sort (the index gives the order); `generic`: its generic plan must pass too (the plan
/// a statement prepared once per connection gets after five executions; `false` only for
/// a statement the store prepares on each call, so it is planned with its values).
pub(super) struct Planned {
    pub(super) label: &'static str,
    pub(super) generic: bool,
    pub(super) sql: String,
    pub(super) args: &'static str,
    pub(super) uses: &'static [&'static str],
    pub(super) ordered: bool,
}

/// Tables a statement must never read from end to end.
const NEVER_SCANNED: [&str; 5] = ["events", "cashouts", "mismatches", "alerts", "alert_outbox"];

/// A big, analyzed book of `cashouts` cash-outs over three providers, about 5 % in
/// flight; as many events, 1 % quarantined; a tenth as many findings and alerts, 2 % of
/// them open; two thirds as many deliveries.
pub(super) async fn seed_big_book(pg: &PgStore, cashouts: i64) {
    let findings = (cashouts / 10).max(1);
    let deliveries = cashouts * 2 / 3;
    let client = pg.client().await.expect("a connection");
    client
        .batch_execute(&format!(
            "INSERT INTO cashouts (provider, provider_ref, external_id, status, created_at, first_seen_at, updated_at)
             SELECT (ARRAY['fiserv','mannco','simpay'])[1 + i % 3], 'ref-' || i, 'ord-' || (i / 2),
                    CASE WHEN i % 40 = 0 THEN 'pending' WHEN i % 40 = 1 THEN 'processing'
                         WHEN i % 10 = 2 THEN 'failed' ELSE 'completed' END,
                    1000 + i, 1000 + i, 1000 + i
             FROM generate_series(1, {cashouts}) AS i;
             INSERT INTO events (event_id, cashout_id, provider, source, dedup_key, body_sha256,
                                 raw_body, headers, outcome, provider_ref, received_at)
             SELECT 'ev-' || i, CASE WHEN i % 100 = 0 THEN NULL ELSE i END,
                    (ARRAY['fiserv','mannco','simpay'])[1 + i % 3], 'webhook', 'key-' || i,
                    md5(i::TEXT), convert_to(repeat('x', 300), 'UTF8'), '{{}}',
                    CASE WHEN i % 100 = 0 THEN 'quarantined' ELSE 'applied' END,
                    'ref-' || i, 1000 + i
             FROM generate_series(1, {cashouts}) AS i;
             INSERT INTO mismatches (kind, provider, subject, provider_ref, detail, opened_at, resolved_at)
             SELECT 'status_conflict', (ARRAY['fiserv','mannco','simpay'])[1 + i % 3], 'ref-' || i,
                    'ref-' || i, 'detail', i, CASE WHEN i % 50 = 0 THEN NULL ELSE i + 1 END
             FROM generate_series(1, {findings}) AS i;
             INSERT INTO alerts (kind, subject, severity, text, opened_at, resolved_at, provider)
             SELECT 'stuck', (ARRAY['fiserv','mannco','simpay'])[1 + i % 3] || '/ref-' || i, 'warning',
                    'text', i, CASE WHEN i % 50 = 0 THEN NULL ELSE i + 1 END,
                    (ARRAY['fiserv','mannco','simpay'])[1 + i % 3]
             FROM generate_series(1, {findings}) AS i;
             INSERT INTO alert_outbox (alert_id, webhook_id, status, body, created_at, attempts,
                                       next_attempt_at, delivered_at, last_error)
             SELECT 1 + i % {findings}, 'wh-' || i, 'firing', '{{}}', i, 1, i, i, NULL
             FROM generate_series(1, {deliveries}) AS i;
             INSERT INTO poll_watermarks (provider, watermark, updated_at)
             VALUES ('fiserv', 1, 1), ('mannco', 1, 1), ('simpay', 1, 1);
             ANALYZE;"
        ))
        .await
        .expect("a seeded book");
}

/// Collects `(node type, relation, index)` of every node of an `EXPLAIN (FORMAT JSON)` plan.
pub(super) fn plan_nodes(plan: &serde_json::Value, out: &mut Vec<(String, String, String)>) {
    let text = |key: &str| plan[key].as_str().unwrap_or_default().to_string();
    out.push((text("Node Type"), text("Relation Name"), text("Index Name")));
    if let Some(children) = plan["Plans"].as_array() {
        for child in children {
            plan_nodes(child, out);
        }
    }
}

/// Checks each statement's custom and generic plan (as a prepared statement gets after
/// a few executions): no sequential scan of [`NEVER_SCANNED`], its indexes read, no sort
/// when `ordered`.
pub(super) async fn assert_plans(pg: &PgStore, statements: &[Planned]) {
    let client = pg.client().await.expect("a connection");
    for mode in ["force_custom_plan", "force_generic_plan"] {
        for statement in statements {
            if mode == "force_generic_plan" && !statement.generic {
                continue;
            }
            client
                .batch_execute(&format!(
                    "SET plan_cache_mode = {mode}; PREPARE planned AS {}",
                    statement.sql
                ))
                .await
                .unwrap_or_else(|err| panic!("{}: {err:?}", statement.label));
            let execute = if statement.args.is_empty() {
                "EXECUTE planned".to_string()
            } else {
                format!("EXECUTE planned({})", statement.args)
            };
            let messages = client
                .simple_query(&format!("EXPLAIN (FORMAT JSON) {execute}"))
                .await
                .unwrap_or_else(|err| panic!("{}: {err:?}", statement.label));
            client
                .batch_execute("DEALLOCATE planned")
                .await
                .expect("deallocate");
            let json = messages
                .iter()
                .find_map(|message| match message {
                    SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
                    _ => None,
                })
                .expect("a plan");
            let parsed: serde_json::Value = serde_json::from_str(&json).expect("plan JSON");
            let mut nodes = Vec::new();
            plan_nodes(&parsed[0]["Plan"], &mut nodes);
            let shown = format!("{} ({mode}): {nodes:?}", statement.label);
            for (node, relation, _) in &nodes {
                assert!(
                    !(node == "Seq Scan" && NEVER_SCANNED.contains(&relation.as_str())),
                    "a sequential scan of {relation}: {shown}"
                );
                assert!(
                    !(statement.ordered && node.ends_with("Sort")),
                    "a sort where the index gives the order: {shown}"
                );
            }
            for index in statement.uses {
                assert!(
                    nodes
                        .iter()
                        .any(|(_, _, used)| index.split('|').any(|either| used == either)),
                    "does not read {index}: {shown}"
                );
            }
        }
    }
}

#[tokio::test]
async fn every_console_statement_reads_index_ranges_on_a_big_book() {
    let database = TestDatabase::create().await;
    let pg = database.migrated(2).await;
    seed_big_book(&pg, 30_000).await;
    // Both are ranges of one provider's cash-outs in one state.
    let cashouts_by_provider_status = &["cashouts_by_provider_status_created|cashouts_in_flight"];
    assert_plans(
        &pg,
        &[
            Planned {
                generic: true,
                label: "stored providers",
                sql: STORED_PROVIDERS.to_string(),
                args: "",
                uses: &["cashouts_provider_provider_ref_key"],
                ordered: true,
            },
            Planned {
                generic: true,
                label: "in-flight figures",
                sql: IN_FLIGHT_FIGURES.to_string(),
                args: "'fiserv', 'pending', 20000",
                uses: cashouts_by_provider_status,
                ordered: true,
            },
            Planned {
                generic: true,
                label: "provider figures",
                sql: PROVIDER_FIGURES.to_string(),
                args: "'fiserv'",
                uses: &[
                    "alerts_open_by_provider",
                    "mismatches_open_by_provider",
                    // The quarantined events' partial indexes, either.
                    "events_quarantined_by_provider|events_quarantined_by_seq|events_quarantined",
                ],
                ordered: true,
            },
            Planned {
                generic: true,
                label: "by provider ref",
                sql: by_ref_sql(),
                args: "'fiserv', 'ref-7'",
                uses: &["cashouts_provider_provider_ref_key"],
                ordered: true,
            },
            Planned {
                generic: true,
                label: "by external id",
                sql: by_external_sql(),
                args: "'fiserv', 'ord-7'",
                uses: &["cashouts_by_external_id"],
                ordered: false,
            },
            Planned {
                generic: false,
                label: "stuck",
                sql: stuck_sql(),
                args: "'fiserv', 'processing', 20000, 50",
                uses: cashouts_by_provider_status,
                ordered: true,
            },
            Planned {
                generic: true,
                label: "a cash-out's mismatches",
                sql: CASHOUT_MISMATCHES.to_string(),
                args: "'fiserv', 'ref-7', 'ext:ord-3'",
                uses: &["mismatches_by_subject"],
                ordered: false,
            },
            Planned {
                generic: true,
                label: "a cash-out's alerts",
                sql: CASHOUT_ALERTS.to_string(),
                args: "'fiserv/ref-7'",
                uses: &["alerts_by_subject"],
                ordered: false,
            },
            Planned {
                generic: true,
                label: "quarantined page",
                sql: quarantined_sql(),
                args: "25000, 51",
                uses: &["events_quarantined_by_seq"],
                ordered: true,
            },
            Planned {
                generic: true,
                label: "one event",
                sql: event_sql(),
                args: "'ev-7', true",
                uses: &["events_event_id_key"],
                ordered: true,
            },
            Planned {
                generic: true,
                label: "open mismatch counts",
                sql: OPEN_MISMATCH_COUNTS.to_string(),
                args: "",
                // Either partial index of the open ones.
                uses: &["mismatches_open|mismatches_open_by_provider"],
                ordered: false,
            },
            Planned {
                generic: true,
                label: "delivery summaries",
                sql: DELIVERY_SUMMARIES.to_string(),
                args: "ARRAY[1, 2, 3]::BIGINT[]",
                uses: &["alert_outbox_by_alert"],
                ordered: false,
            },
        ],
    )
    .await;
    pg.close();
}

/// A measurement, not a check: the median time of each console read on PostgreSQL over
/// a seeded book of `PG_CONSOLE_CASHOUTS` cash-outs (default 300 000) and as many events
/// (`PG_CONSOLE_VACUUM` set: vacuumed first, as autovacuum leaves a settled book).
#[tokio::test]
#[ignore = "a measurement: cargo test --lib pg_console_latency -- --ignored --nocapture"]
async fn pg_console_latency() {
    use std::time::Instant;
    let cashouts: i64 = std::env::var("PG_CONSOLE_CASHOUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300_000);
    let database = TestDatabase::create().await;
    let pg = database.migrated(2).await;
    let seeding = Instant::now();
    seed_big_book(&pg, cashouts).await;
    println!(
        "seeded {cashouts} cash-outs and events in {:?}",
        seeding.elapsed()
    );
    if std::env::var_os("PG_CONSOLE_VACUUM").is_some() {
        // As autovacuum leaves a settled book: the visibility map set (index-only scans).
        let client = pg.client().await.expect("a connection");
        client
            .batch_execute("VACUUM ANALYZE")
            .await
            .expect("vacuumed");
        println!("vacuumed");
    }
    let cutoff = super::super::from_millis(1000 + cashouts / 2);
    let providers: Vec<(String, DateTime<Utc>)> = ["fiserv", "mannco", "simpay"]
        .iter()
        .map(|p| (p.to_string(), cutoff))
        .collect();
    let ids: Vec<i64> = (1..=50).collect();
    for label in [
        "overview (3 providers)",
        "find by id (all providers)",
        "stuck (50)",
        "cash-out findings",
        "quarantined page (50)",
        "event with body",
        "open mismatch counts",
        "delivery summaries (50 alerts)",
    ] {
        let mut times = Vec::new();
        for _ in 0..21 {
            let started = Instant::now();
            match label {
                "overview (3 providers)" => {
                    pg.console_overview(providers.clone()).await.map(|_| ())
                }
                "find by id (all providers)" => pg
                    .find_cashouts_by_id(None, "ord-777".to_string())
                    .await
                    .map(|_| ()),
                "stuck (50)" => pg
                    .stuck_cashouts("fiserv".to_string(), cutoff, 50)
                    .await
                    .map(|_| ()),
                "cash-out findings" => pg
                    .cashout_findings("fiserv".to_string(), "ref-7".to_string(), None)
                    .await
                    .map(|_| ()),
                "quarantined page (50)" => pg.quarantined_events(None, 50).await.map(|_| ()),
                "event with body" => pg
                    .console_event("ev-777".to_string(), true)
                    .await
                    .map(|_| ()),
                "open mismatch counts" => pg.open_mismatch_counts().await.map(|_| ()),
                _ => pg.alert_delivery_summaries(ids.clone()).await.map(|_| ()),
            }
            .expect("a read");
            times.push(started.elapsed());
        }
        times.sort();
        println!("{label}: median {:?}, max {:?}", times[10], times[20]);
    }
    pg.close();
}
