//! Temporary: the facade's operations PostgreSQL does not have yet (reconciliation, the
//! report's rows, retention, the console's queries), each failing with a `Database` error
//! that names it. Their real `impl PgStore` methods (`reconcile.rs`, `report.rs`,
//! `retention.rs`, `console.rs` of this module) replace this file: it is deleted when they
//! are merged (the duplicate definitions make sure of it).

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};

use super::PgStore;
use crate::reconcile::{Finding, MatchGroup, MismatchKind, OpenMismatch};
use crate::store::{
    CashoutAlert, CashoutRow, Changes, ConsoleEvent, DeliverySummary, DueRule, ExpiredBatch,
    GroupKey, MismatchCount, MismatchRecord, OpenByProvider, ProviderFigures, ReconcileCursor,
    ReportRow, ScanCounts, StoreError,
};

fn not_yet<T>(operation: &str) -> Result<T, StoreError> {
    Err(StoreError::Database(format!(
        "{operation} is not on PostgreSQL yet"
    )))
}

impl PgStore {
    pub async fn retention_cursor(&self) -> Result<i64, StoreError> {
        not_yet("retention_cursor")
    }

    pub async fn expired_raw_bodies(
        &self,
        _after_seq: i64,
        _cutoff: DateTime<Utc>,
        _limit: usize,
        _with_content: bool,
    ) -> Result<ExpiredBatch, StoreError> {
        not_yet("expired_raw_bodies")
    }

    pub async fn clear_raw_bodies(
        &self,
        _after_seq: i64,
        _through_seq: i64,
        _cutoff: DateTime<Utc>,
    ) -> Result<usize, StoreError> {
        not_yet("clear_raw_bodies")
    }

    pub async fn incremental_vacuum(&self, _pages: u32) -> Result<Option<i64>, StoreError> {
        not_yet("incremental_vacuum")
    }

    pub async fn free_pages(&self) -> Result<i64, StoreError> {
        not_yet("free_pages")
    }

    pub async fn reconcile_cursor(&self) -> Result<Option<ReconcileCursor>, StoreError> {
        not_yet("reconcile_cursor")
    }

    pub async fn reconcile_changes(
        &self,
        _since: ReconcileCursor,
        _due: Vec<DueRule>,
        _now: DateTime<Utc>,
    ) -> Result<Changes, StoreError> {
        not_yet("reconcile_changes")
    }

    pub async fn load_groups(
        &self,
        _keys: Vec<GroupKey>,
    ) -> Result<Vec<(GroupKey, MatchGroup, Vec<OpenMismatch>)>, StoreError> {
        not_yet("load_groups")
    }

    pub async fn open_findings(
        &self,
    ) -> Result<BTreeSet<(MismatchKind, String, String)>, StoreError> {
        not_yet("open_findings")
    }

    pub async fn open_mismatches(&self) -> Result<OpenByProvider, StoreError> {
        not_yet("open_mismatches")
    }

    pub async fn scan_day<V>(
        &self,
        _from: DateTime<Utc>,
        _until: DateTime<Utc>,
        _visit: V,
    ) -> Result<ScanCounts, StoreError>
    where
        V: FnMut(&str, MatchGroup) + Clone + Send + 'static,
    {
        not_yet("scan_day")
    }

    pub async fn apply_reconcile_plan(
        &self,
        _opens: Vec<(String, Finding)>,
        _resolves: Vec<i64>,
        _cursor: Option<(ReconcileCursor, Vec<i64>)>,
        _at: DateTime<Utc>,
    ) -> Result<(u64, u64), StoreError> {
        not_yet("apply_reconcile_plan")
    }

    pub async fn report_rows<E>(
        &self,
        _from: DateTime<Utc>,
        _until: DateTime<Utc>,
        _emit: E,
    ) -> Result<u64, StoreError>
    where
        E: FnMut(ReportRow) -> Result<(), StoreError> + Send + 'static,
    {
        not_yet("report_rows")
    }

    pub async fn console_overview(
        &self,
        _providers: Vec<(String, DateTime<Utc>)>,
    ) -> Result<Vec<ProviderFigures>, StoreError> {
        not_yet("console_overview")
    }

    pub async fn find_cashouts_by_id(
        &self,
        _provider: Option<String>,
        _id: String,
    ) -> Result<Vec<CashoutRow>, StoreError> {
        not_yet("find_cashouts_by_id")
    }

    pub async fn stuck_cashouts(
        &self,
        _provider: String,
        _cutoff: DateTime<Utc>,
        _limit: usize,
    ) -> Result<Vec<CashoutRow>, StoreError> {
        not_yet("stuck_cashouts")
    }

    pub async fn cashout_findings(
        &self,
        _provider: String,
        _provider_ref: String,
        _external_id: Option<String>,
    ) -> Result<(Vec<MismatchRecord>, Vec<CashoutAlert>), StoreError> {
        not_yet("cashout_findings")
    }

    pub async fn quarantined_events(
        &self,
        _before_seq: Option<i64>,
        _limit: usize,
    ) -> Result<(Vec<ConsoleEvent>, Option<i64>), StoreError> {
        not_yet("quarantined_events")
    }

    pub async fn console_event(
        &self,
        _event_id: String,
        _with_body: bool,
    ) -> Result<Option<ConsoleEvent>, StoreError> {
        not_yet("console_event")
    }

    pub async fn open_mismatch_counts(&self) -> Result<Vec<MismatchCount>, StoreError> {
        not_yet("open_mismatch_counts")
    }

    pub async fn alert_delivery_summaries(
        &self,
        _ids: Vec<i64>,
    ) -> Result<Vec<(i64, DeliverySummary)>, StoreError> {
        not_yet("alert_delivery_summaries")
    }
}
