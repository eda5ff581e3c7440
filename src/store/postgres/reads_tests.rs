//! The read queries and the reports index on both stores: one book written through the
//! ingestion entry points both stores have, then every read taken the same way on each
//! ([`Reads`]); the two snapshots must be equal, page by page and filter by filter.

use async_trait::async_trait;
use chrono::{DateTime, Duration, DurationRound, Utc};

use super::ingest_tests::{accepted, observation, record_at, sqlite, Book, PROVIDER};
use super::testing::TestDatabase;
use super::PgStore;
use crate::ingest::plan::PollKind;
use crate::ingest::{EventOutcome, FetchReason, ObservationSource};
use crate::reconcile::MismatchKind;
use crate::state::CashoutStatus;
use crate::store::{
    CashoutFilter, CashoutRow, EventRow, MismatchFilter, MismatchRecord, MismatchRow, Page,
    ReportIndexRow, Store, StoreError,
};

/// A second provider, for the provider filter.
const OTHER: &str = "other";

/// The reads under test, with the facade's signatures.
#[async_trait]
trait Reads: Book {
    async fn list_cashouts(&self, filter: CashoutFilter) -> Result<Page<CashoutRow>, StoreError>;
    async fn get_cashout(
        &self,
        provider: &str,
        provider_ref: &str,
    ) -> Result<Option<(CashoutRow, Vec<EventRow>)>, StoreError>;
    async fn get_event(&self, event_id: &str) -> Result<Option<EventSeen>, StoreError>;
    async fn event_exists(&self, event_id: &str) -> Result<bool, StoreError>;
    async fn pending_status_fetches(
        &self,
        limit: usize,
    ) -> Result<Vec<(String, FetchReason)>, StoreError>;
    async fn list_mismatches(
        &self,
        kind: Option<String>,
        open_only: bool,
    ) -> Result<Vec<MismatchRow>, StoreError>;
    async fn mismatch_page(
        &self,
        filter: MismatchFilter,
    ) -> Result<(Vec<MismatchRecord>, Option<i64>), StoreError>;
    async fn record_report(&self, row: ReportIndexRow) -> Result<(), StoreError>;
    async fn list_reports(&self) -> Result<Vec<ReportIndexRow>, StoreError>;
    async fn get_report(&self, date: &str) -> Result<Option<ReportIndexRow>, StoreError>;
    async fn first_entry_at(&self) -> Result<Option<DateTime<Utc>>, StoreError>;
}

/// A stored event as compared (`StoredEvent` has no `PartialEq`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct EventSeen {
    event_id: String,
    provider: String,
    source: ObservationSource,
    outcome: EventOutcome,
    error: Option<String>,
    raw_body: Option<Vec<u8>>,
    headers_json: Option<String>,
    secret_index: Option<i64>,
}

/// The same forwarding for both stores (their methods share names and signatures).
macro_rules! forward_reads {
    ($store:ty) => {
        #[async_trait]
        impl Reads for $store {
            async fn list_cashouts(
                &self,
                filter: CashoutFilter,
            ) -> Result<Page<CashoutRow>, StoreError> {
                <$store>::list_cashouts(self, filter).await
            }
            async fn get_cashout(
                &self,
                provider: &str,
                provider_ref: &str,
            ) -> Result<Option<(CashoutRow, Vec<EventRow>)>, StoreError> {
                <$store>::get_cashout(self, provider.to_string(), provider_ref.to_string()).await
            }
            async fn get_event(&self, event_id: &str) -> Result<Option<EventSeen>, StoreError> {
                Ok(<$store>::get_event(self, event_id.to_string())
                    .await?
                    .map(|e| EventSeen {
                        event_id: e.event_id,
                        provider: e.provider,
                        source: e.source,
                        outcome: e.outcome,
                        error: e.error,
                        raw_body: e.raw_body,
                        headers_json: e.headers_json,
                        secret_index: e.secret_index,
                    }))
            }
            async fn event_exists(&self, event_id: &str) -> Result<bool, StoreError> {
                <$store>::event_exists(self, event_id.to_string()).await
            }
            async fn pending_status_fetches(
                &self,
                limit: usize,
            ) -> Result<Vec<(String, FetchReason)>, StoreError> {
                <$store>::pending_status_fetches(self, PROVIDER.to_string(), limit).await
            }
            async fn list_mismatches(
                &self,
                kind: Option<String>,
                open_only: bool,
            ) -> Result<Vec<MismatchRow>, StoreError> {
                <$store>::list_mismatches(self, kind, open_only).await
            }
            async fn mismatch_page(
                &self,
                filter: MismatchFilter,
            ) -> Result<(Vec<MismatchRecord>, Option<i64>), StoreError> {
                <$store>::mismatch_page(self, filter).await
            }
            async fn record_report(&self, row: ReportIndexRow) -> Result<(), StoreError> {
                <$store>::record_report(self, row).await
            }
            async fn list_reports(&self) -> Result<Vec<ReportIndexRow>, StoreError> {
                <$store>::list_reports(self).await
            }
            async fn get_report(&self, date: &str) -> Result<Option<ReportIndexRow>, StoreError> {
                <$store>::get_report(self, date.to_string()).await
            }
            async fn first_entry_at(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
                <$store>::first_entry_at(self).await
            }
        }
    };
}

forward_reads!(Store);
forward_reads!(PgStore);

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

/// A webhook of `provider` for `provider_ref` at `at` (the cash-out's creation time too).
async fn webhook(
    reads: &dyn Reads,
    provider: &str,
    event_id: &str,
    provider_ref: &str,
    status: Option<CashoutStatus>,
    at: DateTime<Utc>,
) {
    let body = format!(r#"{{"id":"{event_id}","ref":"{provider_ref}"}}"#);
    let mut observed = observation(provider_ref, status);
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
    accepted(&reads.ingest(record).await.expect("ingested"));
}

/// The same book on either store: 30 cash-outs of two providers in four states, two by
/// two created in the same millisecond (the id breaks the tie), timelines of two
/// events, a quarantined event, a missed webhook found by a poll, a queued fetch, and
/// the reports index.
async fn write_book(reads: &dyn Reads, base: DateTime<Utc>) {
    for i in 0..30 {
        let at = base + Duration::minutes((i / 2) as i64);
        let status = STATUSES[i % STATUSES.len()];
        webhook(
            reads,
            provider_of(i),
            &format!("ev-{i:02}"),
            &format!("ref-{i:02}"),
            Some(status),
            at,
        )
        .await;
    }
    // ref-01 processing → completed: a second event on its timeline.
    webhook(
        reads,
        PROVIDER,
        "ev-01b",
        "ref-01",
        Some(CashoutStatus::Completed),
        base + Duration::hours(1),
    )
    .await;
    // A poll finds ref-05 (processing) completed: a missed webhook.
    let mut polled = observation("ref-05", Some(CashoutStatus::Completed));
    polled.created_at = Some(base + Duration::minutes(2));
    reads
        .poll(polled, PollKind::Sweep, true)
        .await
        .expect("polled");
    // ref-02 completed, then a webhook says failed: a conflict.
    webhook(
        reads,
        PROVIDER,
        "ev-02b",
        "ref-02",
        Some(CashoutStatus::Failed),
        base + Duration::minutes(90),
    )
    .await;
    // A thin notification for ref-02: a fetch queued.
    webhook(
        reads,
        PROVIDER,
        "ev-thin",
        "ref-02",
        None,
        base + Duration::hours(1),
    )
    .await;
    // An unparseable webhook: quarantined.
    let at = base + Duration::hours(2);
    let quarantined = reads
        .ingest(record_at(
            "ev-q",
            "key-ev-q",
            "not json",
            None,
            Err("unparseable on purpose".to_string()),
            at,
        ))
        .await
        .expect("quarantined");
    assert!(
        matches!(
            quarantined,
            crate::ingest::IngestOutcome::Quarantined { .. }
        ),
        "{quarantined:?}"
    );
    for (date, is_final, rows) in [
        ("2026-11-02", false, 3),
        ("2026-11-01", true, 10),
        ("2026-11-03", false, 1),
    ] {
        reads
            .record_report(ReportIndexRow {
                date: date.to_string(),
                is_final,
                rows,
                sha256: format!("sha-{date}"),
                generated_at: base.timestamp_millis(),
            })
            .await
            .expect("recorded");
    }
    // A later generation replaces the day's row.
    reads
        .record_report(ReportIndexRow {
            date: "2026-11-02".to_string(),
            is_final: true,
            rows: 4,
            sha256: "sha-again".to_string(),
            generated_at: base.timestamp_millis() + 1,
        })
        .await
        .expect("recorded again");
}

/// Times the stores stamp with the clock at write time, cleared before comparing.
fn stable(mut row: CashoutRow) -> CashoutRow {
    row.updated_at = row.created_at;
    if row.recovered_by_poll > 0 {
        // Completed by the poll, at the clock's time.
        row.completed_at = row.completed_at.map(|_| row.created_at);
    }
    row
}

fn stable_event(mut event: EventRow, base: DateTime<Utc>) -> EventRow {
    if event.source == ObservationSource::Poll {
        // Named and stamped when polled.
        event.event_id = "(polled)".to_string();
        event.received_at = base;
    }
    event
}

/// Every page of a listing, following the cursors.
async fn pages(reads: &dyn Reads, filter: CashoutFilter) -> Vec<Vec<String>> {
    let mut filter = filter;
    let mut pages = Vec::new();
    loop {
        let page = reads.list_cashouts(filter.clone()).await.expect("a page");
        let refs: Vec<String> = page
            .items
            .iter()
            .map(|c| {
                format!(
                    "{}/{}@{}#{}",
                    c.provider,
                    c.provider_ref,
                    c.created_at.timestamp_millis(),
                    c.status
                )
            })
            .collect();
        // Newest first, the id breaking ties.
        let keys: Vec<(i64, i64)> = page
            .items
            .iter()
            .map(|c| (c.created_at.timestamp_millis(), c.id))
            .collect();
        assert!(keys.windows(2).all(|w| w[0] > w[1]), "{keys:?}");
        pages.push(refs);
        match page.next {
            Some(next) => {
                assert_eq!(Some(&next), keys.last());
                filter.after = Some(next);
            }
            None => return pages,
        }
    }
}

/// A listed mismatch as compared: kind, provider, provider ref, open (its times are
/// the clock's at write time).
type MismatchSeen = (MismatchKind, String, Option<String>, bool);

/// Everything the reads return on a book, in comparable form.
#[derive(Debug, PartialEq)]
struct Snapshot {
    listings: Vec<Vec<Vec<String>>>,
    cashouts: Vec<Option<(CashoutRow, Vec<EventRow>)>>,
    events: Vec<Option<EventSeen>>,
    exists: Vec<bool>,
    fetches: Vec<(String, FetchReason)>,
    mismatches: Vec<Vec<MismatchSeen>>,
    mismatch_pages: Vec<Vec<(MismatchKind, Option<String>)>>,
    reports: Vec<ReportIndexRow>,
    report: Vec<Option<ReportIndexRow>>,
    first_entry_at: Option<DateTime<Utc>>,
}

async fn snapshot(reads: &dyn Reads, base: DateTime<Utc>) -> Snapshot {
    let filter = |limit: usize| CashoutFilter {
        limit,
        ..CashoutFilter::default()
    };
    let mut listings = Vec::new();
    for limit in [4, 7, 1000] {
        listings.push(pages(reads, filter(limit)).await);
    }
    let all: usize = listings[2].iter().map(Vec::len).sum();
    assert_eq!(all, 30);
    assert_eq!(listings[0].len(), 8, "30 rows by 4");
    for provider in [PROVIDER, OTHER, "nobody"] {
        let mut f = filter(3);
        f.provider = Some(provider.to_string());
        listings.push(pages(reads, f).await);
    }
    for status in STATUSES {
        let mut f = filter(2);
        f.status = Some(status);
        listings.push(pages(reads, f.clone()).await);
        f.provider = Some(PROVIDER.to_string());
        listings.push(pages(reads, f).await);
    }
    // [from, to): created at base + 3 min up to (not including) base + 9 min.
    let mut f = filter(3);
    f.from = Some(base + Duration::minutes(3));
    f.to = Some(base + Duration::minutes(9));
    let window = pages(reads, f.clone()).await;
    assert_eq!(window.iter().map(Vec::len).sum::<usize>(), 12);
    listings.push(window);
    f.provider = Some(PROVIDER.to_string());
    f.status = Some(CashoutStatus::Completed);
    listings.push(pages(reads, f).await);

    let mut cashouts = Vec::new();
    for i in 0..31 {
        let got = reads
            .get_cashout(provider_of(i), &format!("ref-{i:02}"))
            .await
            .expect("a cash-out");
        cashouts.push(got.map(|(row, events)| {
            (
                stable(row),
                events
                    .into_iter()
                    .map(|e| stable_event(e, base))
                    .collect::<Vec<_>>(),
            )
        }));
    }
    assert!(cashouts[30].is_none());
    assert_eq!(cashouts[1].as_ref().map(|(_, e)| e.len()), Some(2));
    assert_eq!(
        reads
            .get_cashout(OTHER, "ref-01")
            .await
            .expect("another provider's ref"),
        None
    );

    let mut events = Vec::new();
    let mut exists = Vec::new();
    for id in ["ev-00", "ev-01b", "ev-q", "ev-thin", "ev-none"] {
        events.push(reads.get_event(id).await.expect("an event"));
        exists.push(reads.event_exists(id).await.expect("exists"));
    }
    assert_eq!(exists, [true, true, true, true, false]);

    let fetches = reads.pending_status_fetches(10).await.expect("fetches");
    assert_eq!(fetches.len(), 1, "{fetches:?}");

    let mut mismatches: Vec<Vec<MismatchSeen>> = Vec::new();
    for (kind, open_only) in [
        (None, false),
        (None, true),
        (
            Some(MismatchKind::MissedWebhook.as_str().to_string()),
            false,
        ),
        (Some(MismatchKind::Stuck.as_str().to_string()), false),
    ] {
        let rows = reads
            .list_mismatches(kind, open_only)
            .await
            .expect("mismatches");
        mismatches.push(
            rows.into_iter()
                .map(|m| (m.kind, m.provider, m.provider_ref, m.resolved_at.is_none()))
                .collect(),
        );
    }
    // Recorded resolved: the poll recovered it.
    assert_eq!(
        mismatches[2],
        [(
            MismatchKind::MissedWebhook,
            PROVIDER.to_string(),
            Some("ref-05".to_string()),
            false
        )]
    );

    let mut mismatch_pages: Vec<Vec<(MismatchKind, Option<String>)>> = Vec::new();
    for filter in [
        MismatchFilter {
            limit: 1,
            ..MismatchFilter::default()
        },
        MismatchFilter {
            limit: 1,
            kind: Some(MismatchKind::MissedWebhook),
            provider: Some(PROVIDER.to_string()),
            open: Some(false),
            flagged_during: Some((0, i64::MAX)),
            before_id: None,
        },
        MismatchFilter {
            limit: 5,
            open: Some(false),
            ..MismatchFilter::default()
        },
    ] {
        let mut filter = filter;
        loop {
            let (items, next) = reads.mismatch_page(filter.clone()).await.expect("a page");
            mismatch_pages.push(items.into_iter().map(|m| (m.kind, m.subject)).collect());
            match next {
                Some(id) => filter.before_id = Some(id),
                None => break,
            }
        }
    }

    let reports = reads.list_reports().await.expect("reports");
    let dates: Vec<&str> = reports.iter().map(|r| r.date.as_str()).collect();
    assert_eq!(dates, ["2026-11-03", "2026-11-02", "2026-11-01"]);
    let mut report = Vec::new();
    for date in ["2026-11-02", "2026-10-31"] {
        report.push(reads.get_report(date).await.expect("a report"));
    }
    assert_eq!(
        report[0].as_ref().map(|r| (r.is_final, r.rows)),
        Some((true, 4))
    );
    assert_eq!(report[1], None);

    let first_entry_at = reads.first_entry_at().await.expect("first entry");
    assert_eq!(first_entry_at, Some(base));

    Snapshot {
        listings,
        cashouts,
        events,
        exists,
        fetches,
        mismatches,
        mismatch_pages,
        reports,
        report,
        first_entry_at,
    }
}

#[tokio::test]
async fn an_empty_book_reads_the_same_on_both_stores() {
    let (_dir, sqlite_store) = sqlite();
    let database = TestDatabase::create().await;
    let pg = database.migrated(2).await;
    for reads in [&sqlite_store as &dyn Reads, &pg] {
        let page = reads
            .list_cashouts(CashoutFilter {
                limit: 10,
                ..CashoutFilter::default()
            })
            .await
            .expect("a page");
        assert!(page.items.is_empty());
        assert_eq!(page.next, None);
        assert_eq!(reads.first_entry_at().await.expect("first"), None);
        assert!(reads.list_reports().await.expect("reports").is_empty());
        assert!(reads
            .list_mismatches(None, false)
            .await
            .expect("none")
            .is_empty());
    }
    sqlite_store.close().await;
    pg.close();
}

#[tokio::test]
async fn one_book_reads_the_same_on_both_stores_page_by_page_and_filter_by_filter() {
    let base = (Utc::now() - Duration::hours(6))
        .duration_trunc(Duration::seconds(1))
        .expect("a whole second");
    let (_dir, sqlite_store) = sqlite();
    write_book(&sqlite_store, base).await;
    let on_sqlite = snapshot(&sqlite_store, base).await;
    sqlite_store.close().await;

    let database = TestDatabase::create().await;
    let pg = database.migrated(4).await;
    write_book(&pg, base).await;
    let on_postgres = snapshot(&pg, base).await;
    pg.close();

    // Field by field first, for a readable failure.
    assert_eq!(on_sqlite.listings, on_postgres.listings);
    for (sqlite_row, pg_row) in on_sqlite.cashouts.iter().zip(&on_postgres.cashouts) {
        assert_eq!(sqlite_row, pg_row);
    }
    assert_eq!(on_sqlite.events, on_postgres.events);
    assert_eq!(on_sqlite.fetches, on_postgres.fetches);
    assert_eq!(on_sqlite.mismatches, on_postgres.mismatches);
    assert_eq!(on_sqlite.mismatch_pages, on_postgres.mismatch_pages);
    assert_eq!(on_sqlite, on_postgres);
}

#[tokio::test]
async fn an_unknown_stored_name_is_a_store_error_naming_column_and_value() {
    let database = TestDatabase::create().await;
    let pg = database.migrated(2).await;
    let client = pg.client().await.expect("a connection");
    client
        .execute(
            "INSERT INTO cashouts (provider, provider_ref, status, created_at, first_seen_at, updated_at)
             VALUES ($1, 'ref-x', 'teleported', 1, 1, 1)",
            &[&PROVIDER],
        )
        .await
        .expect("a row written by hand");
    drop(client);
    let read = pg
        .get_cashout(PROVIDER.to_string(), "ref-x".to_string())
        .await;
    match read {
        Err(StoreError::Database(message)) => {
            assert!(message.contains("cashouts.status"), "{message}");
            assert!(message.contains("teleported"), "{message}");
        }
        other => panic!("not a store error: {other:?}"),
    }
    let listed = pg
        .list_cashouts(CashoutFilter {
            limit: 10,
            ..CashoutFilter::default()
        })
        .await;
    assert!(matches!(listed, Err(StoreError::Database(_))), "{listed:?}");
    pg.close();
}
