//! Reconciliation over HTTP: run a business day, list and serve its reports, list
//! mismatches (SPEC §2.3).

use actix_web::http::header;
use actix_web::{get, post, web, HttpRequest, HttpResponse};
use chrono::{NaiveDate, SecondsFormat, Utc};
use serde::Deserialize;
use serde_json::{json, Value};

use super::admin::{authorize, decode_cursor, encode_cursor, Role};
use super::query::ApiQuery;
use super::ApiError;
use crate::app::AppState;
use crate::reconcile::MismatchKind;
use crate::reconciler::DayOutcome;
use crate::report::{BusinessDay, ReportError};
use crate::store::{from_millis, MismatchFilter, MismatchRecord, ReportIndexRow};

fn time_text(millis: i64) -> String {
    from_millis(millis).to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// A `YYYY-MM-DD` business date that has begun (in the reports' time zone).
pub(crate) fn business_date(
    state: &AppState,
    name: &str,
    text: &str,
) -> Result<NaiveDate, ApiError> {
    let date = NaiveDate::parse_from_str(text, "%Y-%m-%d").map_err(|_| {
        ApiError::BadRequest(format!("{name}: expected a date YYYY-MM-DD, got {text:?}"))
    })?;
    let today = BusinessDay::containing(Utc::now(), state.reconciler.timezone()).date;
    if date > today {
        return Err(ApiError::BadRequest(format!(
            "{name}: {date} has not begun yet in {}",
            state.reconciler.timezone().name()
        )));
    }
    Ok(date)
}

impl From<ReportError> for ApiError {
    fn from(err: ReportError) -> Self {
        match err {
            ReportError::Store(err) => err.into(),
            ReportError::Io { .. } => {
                tracing::error!(error = %err, "report could not be written");
                ApiError::Internal
            }
        }
    }
}

/// Query of `POST /api/v1/reconcile`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconcileQuery {
    date: Option<String>,
}

/// The full pass of `date` now, then its report; wakes the alert pass when the pass
/// opened or resolved a mismatch. The API's and the console's "reconcile a date".
pub async fn reconcile_date(state: &AppState, date: NaiveDate) -> Result<DayOutcome, ApiError> {
    let outcome = state.reconciler.reconcile_day_now(date).await?;
    if outcome.pass.opened > 0 || outcome.pass.resolved > 0 {
        state.wake_alerts();
    }
    Ok(outcome)
}

/// `POST /api/v1/reconcile?date=`: the full pass of that business date now, then its
/// report; answers the report's summary (and what the pass did under `reconciled`).
#[post("/reconcile")]
pub async fn reconcile(
    request: HttpRequest,
    query: ApiQuery<ReconcileQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    authorize(&request, &state, Role::Admin)?;
    let text = query
        .date
        .as_deref()
        .ok_or_else(|| ApiError::BadRequest("date: required (YYYY-MM-DD)".to_string()))?;
    let date = business_date(&state, "date", text)?;
    let outcome = reconcile_date(&state, date).await?;
    let mut body = serde_json::to_value(&outcome.report.summary).map_err(|_| ApiError::Internal)?;
    body["reconciled"] = json!(outcome.pass);
    Ok(HttpResponse::Ok().json(body))
}

/// One of a day's two report files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportFile {
    Csv,
    Summary,
}

impl ReportFile {
    /// The file's media type.
    pub fn content_type(self) -> &'static str {
        match self {
            ReportFile::Csv => "text/csv; charset=utf-8",
            ReportFile::Summary => "application/json",
        }
    }

    /// The download's `Content-Disposition`, named after `date`.
    pub fn attachment(self, date: NaiveDate) -> String {
        match self {
            ReportFile::Csv => format!("attachment; filename=\"{date}.csv\""),
            ReportFile::Summary => format!("attachment; filename=\"{date}.summary.json\""),
        }
    }
}

/// The bytes of `date`'s CSV or summary: a final report as it is on disk, else generated
/// now (the API's and the console's downloads).
pub async fn report_bytes(
    state: &AppState,
    date: NaiveDate,
    file: ReportFile,
) -> Result<Vec<u8>, ApiError> {
    let (csv, summary) = state.reconciler.report_files(date, Utc::now()).await?;
    let path = match file {
        ReportFile::Csv => csv,
        ReportFile::Summary => summary,
    };
    tokio::fs::read(&path).await.map_err(|err| {
        tracing::error!(error = %err, path = %path.display(), "report unreadable");
        ApiError::Internal
    })
}

fn report_json(row: &ReportIndexRow) -> Value {
    json!({
        "date": row.date,
        "final": row.is_final,
        "rows": row.rows,
        "sha256": row.sha256,
        "generated_at": time_text(row.generated_at),
    })
}

/// `GET /api/v1/reports`: the generated reports, newest first.
#[get("/reports")]
pub async fn list_reports(
    request: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    authorize(&request, &state, Role::Reports)?;
    let items: Vec<Value> = state
        .store
        .list_reports()
        .await?
        .iter()
        .map(report_json)
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "items": items, "next_cursor": null })))
}

/// `GET /api/v1/reports/{date}.csv`: the day's CSV, generated first if absent (a day not
/// over yet is regenerated on each request).
#[get("/reports/{file}")]
pub async fn report_csv(
    request: HttpRequest,
    file: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    authorize(&request, &state, Role::Reports)?;
    let text = file.strip_suffix(".csv").ok_or(ApiError::NotFound(
        "no such report (use /reports/YYYY-MM-DD.csv)",
    ))?;
    let date = business_date(&state, "date", text)?;
    let file = ReportFile::Csv;
    let bytes = report_bytes(&state, date, file).await?;
    Ok(HttpResponse::Ok()
        .content_type(file.content_type())
        .insert_header((header::CONTENT_DISPOSITION, file.attachment(date)))
        .body(bytes))
}

/// `GET /api/v1/reports/{date}/summary`: the day's summary (generated like the CSV).
#[get("/reports/{date}/summary")]
pub async fn report_summary(
    request: HttpRequest,
    date: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    authorize(&request, &state, Role::Reports)?;
    let date = business_date(&state, "date", &date)?;
    let file = ReportFile::Summary;
    let bytes = report_bytes(&state, date, file).await?;
    Ok(HttpResponse::Ok()
        .content_type(file.content_type())
        .body(bytes))
}

/// Query of `GET /api/v1/mismatches`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MismatchQuery {
    date: Option<String>,
    kind: Option<String>,
    provider: Option<String>,
    open: Option<bool>,
    limit: Option<usize>,
    cursor: Option<String>,
}

fn mismatch_json(row: &MismatchRecord) -> Value {
    json!({
        "id": row.id,
        "kind": row.kind,
        "provider": row.provider,
        "subject": row.subject,
        "provider_ref": row.provider_ref,
        "external_id": row.external_id,
        "detail": row.detail,
        "open": row.resolved_at.is_none(),
        "opened_at": time_text(row.opened_at),
        "resolved_at": row.resolved_at.map(time_text),
    })
}

/// `GET /api/v1/mismatches?date=&kind=&provider=&open=&limit=&cursor=`: newest first;
/// `date` keeps those open at some moment of that business day.
#[get("/mismatches")]
pub async fn list_mismatches(
    request: HttpRequest,
    query: ApiQuery<MismatchQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    authorize(&request, &state, Role::Admin)?;
    let query = query.into_inner();
    let kind = query
        .kind
        .as_deref()
        .map(|k| {
            k.parse::<MismatchKind>()
                .map_err(|err| ApiError::BadRequest(format!("kind: {err}")))
        })
        .transpose()?;
    let limit = super::admin::page_limit(query.limit)?;
    let flagged_during = match query.date.as_deref() {
        Some(text) => {
            let day = state.reconciler.day(business_date(&state, "date", text)?);
            Some((day.start.timestamp_millis(), day.end.timestamp_millis()))
        }
        None => None,
    };
    let filter = MismatchFilter {
        kind,
        provider: query.provider,
        open: query.open,
        flagged_during,
        limit,
        before_id: query
            .cursor
            .as_deref()
            .map(decode_cursor)
            .transpose()?
            .map(|(_, id)| id),
    };
    let (items, next) = state.store.mismatch_page(filter).await?;
    let items: Vec<Value> = items.iter().map(mismatch_json).collect();
    Ok(HttpResponse::Ok()
        .json(json!({ "items": items, "next_cursor": next.map(|id| encode_cursor((0, id))) })))
}
