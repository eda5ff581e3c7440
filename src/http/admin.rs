//! The admin API (`/api/v1`): bearer-token roles, cash-out views, reprocessing, findings.

use actix_web::{get, post, web, HttpRequest, HttpResponse};
use base64::Engine;
use chrono::{DateTime, NaiveDate, SecondsFormat, Utc};
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::{json, Value};

use super::query::ApiQuery;
use super::ApiError;
use crate::alert::AlertKind;
use crate::app::AppState;
use crate::ingestor::Reprocessed;
use crate::ledger_import::{parse_ledger_row, LedgerFields};
use crate::money::Currency;
use crate::poller::{PollError, PollSummary};
use crate::store::{
    AlertFilter, CashoutFilter, CashoutRow, EventRow, IngestOutcome, LedgerEntry, LedgerOutcome,
};
use crate::verify::constant_time_eq;

/// Who a token belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Everything.
    Admin,
    /// Only `GET /api/v1/reports/…`.
    Reports,
}

/// The role `token` grants, if it is one of the configured tokens (compared in constant
/// time). The API's bearer check and the console's sign-in both ask this.
pub fn role_of_token(state: &AppState, token: &str) -> Option<Role> {
    let matches = |expected: &Option<secrecy::SecretString>| {
        expected.as_ref().is_some_and(|secret| {
            constant_time_eq(secret.expose_secret().as_bytes(), token.as_bytes())
        })
    };
    if matches(&state.settings.admin.admin_token) {
        Some(Role::Admin)
    } else if matches(&state.settings.admin.reports_token) {
        Some(Role::Reports)
    } else {
        None
    }
}

/// Checks the bearer token: missing or unknown → 401, known but not allowed → 403.
pub fn authorize(request: &HttpRequest, state: &AppState, needed: Role) -> Result<Role, ApiError> {
    let token = request
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
        .ok_or(ApiError::Unauthorized)?;
    let role = role_of_token(state, token).ok_or(ApiError::Unauthorized)?;
    match (needed, role) {
        (Role::Reports, _) | (Role::Admin, Role::Admin) => Ok(role),
        (Role::Admin, Role::Reports) => Err(ApiError::Forbidden),
    }
}

/// A list's `limit` parameter: 100 when absent, else 1 to 1000.
pub(super) fn page_limit(limit: Option<usize>) -> Result<usize, ApiError> {
    match limit.unwrap_or(100) {
        limit @ 1..=1000 => Ok(limit),
        limit => Err(ApiError::BadRequest(format!(
            "limit: expected an integer from 1 to 1000, got {limit}"
        ))),
    }
}

/// The token of an `Authorization: Bearer <token>` value. The scheme name is matched
/// without regard to case (RFC 9110 §11.1: `bearer` and `BEARER` are `Bearer`).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn time_text(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn amount_text(minor: Option<i64>, currency: Option<&str>) -> Value {
    match (minor, currency.and_then(|c| Currency::from_code(c).ok())) {
        (Some(minor), Some(currency)) => Value::String(currency.format_minor(minor)),
        _ => Value::Null,
    }
}

/// The SPEC §2.3 JSON of a cash-out.
pub fn cashout_json(row: &CashoutRow) -> Value {
    json!({
        "provider": row.provider,
        "provider_ref": row.provider_ref,
        "external_id": row.external_id,
        "status": row.status,
        "held": row.held,
        "provider_status": row.provider_status,
        "reason_code": row.reason_code,
        "amount": amount_text(row.amount_minor, row.currency.as_deref()),
        "currency": row.currency,
        "fee": amount_text(row.fee_minor, row.currency.as_deref()),
        "created_at": time_text(row.created_at),
        "updated_at": time_text(row.updated_at),
        "completed_at": row.completed_at.map(time_text),
        "webhooks": row.webhook_count,
        "recovered_by_poll": row.recovered_by_poll > 0,
    })
}

fn event_json(event: &EventRow) -> Value {
    json!({
        "event_id": event.event_id,
        "source": event.source.as_str(),
        "outcome": event.outcome.as_str(),
        "raw_status": event.raw_status,
        "reason_code": event.reason_code,
        "status": event.status,
        "received_at": time_text(event.received_at),
        "applied": event.applied,
    })
}

/// Query of `GET /api/v1/cashouts`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    provider: Option<String>,
    status: Option<String>,
    from: Option<String>,
    to: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

pub(crate) fn parse_time(name: &str, text: &str) -> Result<DateTime<Utc>, ApiError> {
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return Ok(time.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .and_then(|date| date.and_hms_opt(0, 0, 0))
        .map(|time| time.and_utc())
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "{name} must be RFC 3339 or YYYY-MM-DD, got {text:?}"
            ))
        })
}

/// A page position as an opaque cursor (`(0, id)` for lists ordered by id alone).
pub(crate) fn encode_cursor((millis, id): (i64, i64)) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{millis}:{id}"))
}

/// The page position of a cursor [`encode_cursor`] gave; anything else is a 400.
pub(crate) fn decode_cursor(text: &str) -> Result<(i64, i64), ApiError> {
    let bad = || ApiError::BadRequest("cursor is not one this API gave".to_string());
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (millis, id) = text.split_once(':').ok_or_else(bad)?;
    Ok((
        millis.parse().map_err(|_| bad())?,
        id.parse().map_err(|_| bad())?,
    ))
}

/// `GET /api/v1/cashouts`: newest first, cursor-paginated.
#[get("/cashouts")]
pub async fn list_cashouts(
    request: HttpRequest,
    query: ApiQuery<ListQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    authorize(&request, &state, Role::Admin)?;
    let query = query.into_inner();
    let status = query
        .status
        .as_deref()
        .map(str::parse::<crate::state::CashoutStatus>)
        .transpose()
        .map_err(|err| {
            let known = crate::state::CashoutStatus::ALL.map(|status| status.as_str());
            ApiError::BadRequest(format!("status: {err} (one of {})", known.join(", ")))
        })?;
    let limit = page_limit(query.limit)?;
    let filter = CashoutFilter {
        provider: query.provider,
        status,
        from: query
            .from
            .as_deref()
            .map(|t| parse_time("from", t))
            .transpose()?,
        to: query
            .to
            .as_deref()
            .map(|t| parse_time("to", t))
            .transpose()?,
        limit,
        after: query.cursor.as_deref().map(decode_cursor).transpose()?,
    };
    let page = state.store.list_cashouts(filter).await?;
    let items: Vec<Value> = page.items.iter().map(cashout_json).collect();
    Ok(HttpResponse::Ok()
        .json(json!({ "items": items, "next_cursor": page.next.map(encode_cursor) })))
}

/// `GET /api/v1/cashouts/{provider_id}/{provider_ref}`: one cash-out and its timeline.
#[get("/cashouts/{provider_id}/{provider_ref}")]
pub async fn get_cashout(
    request: HttpRequest,
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    authorize(&request, &state, Role::Admin)?;
    let (provider, provider_ref) = path.into_inner();
    let (cashout, events) = state
        .store
        .get_cashout(provider, provider_ref)
        .await?
        .ok_or(ApiError::NotFound("no such cash-out"))?;
    let mut body = cashout_json(&cashout);
    body["events"] = Value::Array(events.iter().map(event_json).collect());
    Ok(HttpResponse::Ok().json(body))
}

/// Re-runs parsing on a quarantined event through the Ingestor and wakes the provider's
/// status fetcher when the event queued one: the use case behind
/// `POST /api/v1/events/{event_id}/reprocess` and the console's reprocess button.
pub async fn reprocess(state: &AppState, event_id: String) -> Result<IngestOutcome, ApiError> {
    let Reprocessed { provider, outcome } = state
        .ingestor
        .reprocess(&state.providers, event_id, Utc::now())
        .await?;
    if let IngestOutcome::Accepted { applied, .. } = &outcome {
        if applied.status_fetch_queued {
            state.request_status_fetch(&provider);
        }
    }
    Ok(outcome)
}

/// `POST /api/v1/events/{event_id}/reprocess`: re-runs parsing on a quarantined event.
#[post("/events/{event_id}/reprocess")]
pub async fn reprocess_event(
    request: HttpRequest,
    event_id: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    authorize(&request, &state, Role::Admin)?;
    let body = match reprocess(&state, event_id.into_inner()).await? {
        IngestOutcome::Accepted { event_id, applied } => {
            json!({ "status": "accepted", "event_id": event_id, "cashout_status": applied.status.as_str() })
        }
        IngestOutcome::Quarantined { event_id, reason } => {
            json!({ "status": "quarantined", "event_id": event_id, "error": reason })
        }
        IngestOutcome::Duplicate { event_id } => {
            json!({ "status": "duplicate", "event_id": event_id })
        }
        IngestOutcome::Replayed => json!({ "status": "replayed" }),
    };
    Ok(HttpResponse::Ok().json(body))
}

/// Query of `GET /api/v1/alerts`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsQuery {
    open: Option<bool>,
    kind: Option<String>,
    provider: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

/// `GET /api/v1/alerts?open=&kind=&provider=&limit=&cursor=`: newest first, paginated.
#[get("/alerts")]
pub async fn list_alerts(
    request: HttpRequest,
    query: ApiQuery<AlertsQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    authorize(&request, &state, Role::Admin)?;
    let query = query.into_inner();
    let kind = query
        .kind
        .as_deref()
        .map(str::parse::<AlertKind>)
        .transpose()
        .map_err(|err| ApiError::BadRequest(format!("kind: {err}")))?;
    let before_id = query
        .cursor
        .as_deref()
        .map(decode_cursor)
        .transpose()?
        .map(|(_, id)| id);
    let filter = AlertFilter {
        open_only: query.open.unwrap_or(false),
        kind,
        provider: query.provider,
        before_id,
        limit: page_limit(query.limit)?,
    };
    let (items, next) = state.store.list_alerts(filter).await?;
    Ok(HttpResponse::Ok().json(json!({
        "items": items,
        "next_cursor": next.map(|id| encode_cursor((0, id))),
    })))
}

/// `GET /api/v1/alerts/{id}`: one alert with its deliveries and their attempts.
#[get("/alerts/{id}")]
pub async fn get_alert(
    request: HttpRequest,
    id: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    authorize(&request, &state, Role::Admin)?;
    let id: i64 = id
        .parse()
        .map_err(|_| ApiError::NotFound("unknown alert"))?;
    let Some((alert, deliveries)) = state.store.get_alert(id).await? else {
        return Err(ApiError::NotFound("unknown alert"));
    };
    let mut body = serde_json::to_value(&alert).map_err(|_| ApiError::Internal)?;
    body["deliveries"] = serde_json::to_value(&deliveries).map_err(|_| ApiError::Internal)?;
    Ok(HttpResponse::Ok().json(body))
}

/// One poll cycle of `provider_id` now (the API's and the console's "poll now").
pub async fn poll_now(state: &AppState, provider_id: &str) -> Result<PollSummary, ApiError> {
    match state.poller.poll_once(provider_id).await {
        Ok(summary) => Ok(summary),
        Err(PollError::UnknownProvider(_)) => Err(ApiError::NotFound("unknown provider")),
        Err(err @ PollError::Off(..)) => Err(ApiError::Conflict {
            message: err.to_string(),
            code: "poller_off",
        }),
        Err(PollError::Store(err)) => Err(err.into()),
    }
}

/// `POST /api/v1/providers/{provider_id}/poll`: one poll cycle now.
#[post("/providers/{provider_id}/poll")]
pub async fn poll_provider(
    request: HttpRequest,
    provider_id: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    authorize(&request, &state, Role::Admin)?;
    Ok(HttpResponse::Ok().json(poll_now(&state, &provider_id).await?))
}

/// Body of `POST /api/v1/ledger`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerBody {
    provider: String,
    external_id: String,
    amount: Box<serde_json::value::RawValue>,
    currency: String,
    provider_ref: Option<String>,
    created_at: Option<String>,
}

/// Validates a ledger body into an entry with the rules `import-ledger` applies to a CSV
/// row ([`parse_ledger_row`]); errors are 422 sentences naming the field.
pub fn ledger_entry(state: &AppState, body: LedgerBody) -> Result<LedgerEntry, ApiError> {
    let amount = crate::providers::amount_text(&body.amount)
        .map_err(|err| ApiError::Unprocessable(format!("amount: {err}")))?;
    let fields = LedgerFields {
        provider: &body.provider,
        external_id: &body.external_id,
        amount: &amount,
        currency: &body.currency,
        provider_ref: body.provider_ref.as_deref(),
        created_at: body.created_at.as_deref(),
    };
    parse_ledger_row(&fields, |id| state.providers.get(id).is_some())
        .map_err(|err| ApiError::Unprocessable(err.to_string()))
}

/// `POST /api/v1/ledger`: registers an expected cash-out; idempotent.
#[post("/ledger")]
pub async fn register_ledger(
    request: HttpRequest,
    body: web::Json<LedgerBody>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    authorize(&request, &state, Role::Admin)?;
    let entry = ledger_entry(&state, body.into_inner())?;
    let (provider, external_id) = (entry.provider.clone(), entry.external_id.clone());
    match state.store.register_expected(entry).await? {
        LedgerOutcome::Created => Ok(HttpResponse::Ok().json(
            json!({ "status": "created", "provider": provider, "external_id": external_id }),
        )),
        LedgerOutcome::Unchanged => Ok(HttpResponse::Ok().json(
            json!({ "status": "unchanged", "provider": provider, "external_id": external_id }),
        )),
        LedgerOutcome::Conflict => Err(ApiError::Conflict {
            message: format!(
                "{provider}/{external_id} is already registered with different values"
            ),
            code: "ledger_conflict",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        assert_eq!(
            decode_cursor(&encode_cursor((1_700_000_000_000, 42))).unwrap(),
            (1_700_000_000_000, 42)
        );
        assert!(decode_cursor("not-a-cursor!").is_err());
    }

    #[test]
    fn the_bearer_scheme_is_matched_in_any_case_and_the_token_exactly() {
        for value in [
            "Bearer tok-1",
            "bearer tok-1",
            "BEARER tok-1",
            "Bearer  tok-1 ",
        ] {
            assert_eq!(bearer_token(value), Some("tok-1"), "{value:?}");
        }
        for value in [
            "Bearer",
            "Bearer ",
            "Basic tok-1",
            "Bearertok-1",
            "tok-1",
            "",
        ] {
            assert_eq!(bearer_token(value), None, "{value:?}");
        }
    }
}
