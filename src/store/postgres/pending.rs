//! Temporary: the facade's operations PostgreSQL does not have yet (reconciliation and the
//! report's rows), each failing with a `Database` error that names it. Their real
//! `impl PgStore` methods (`reconcile.rs`, `report.rs` of this module) replace this file:
//! it is deleted when they are merged (the duplicate definitions make sure of it).

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};

use super::PgStore;
use crate::reconcile::{Finding, MatchGroup, MismatchKind, OpenMismatch};
use crate::store::{
    Changes, DueRule, GroupKey, OpenByProvider, ReconcileCursor, ReportRow, ScanCounts, StoreError,
};

fn not_yet<T>(operation: &str) -> Result<T, StoreError> {
    Err(StoreError::Database(format!(
        "{operation} is not on PostgreSQL yet"
    )))
}

impl PgStore {
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
}
