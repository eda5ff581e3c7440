//! The console's pages (GET): overview, cash-outs and one cash-out, mismatches, alerts,
//! reports and their downloads, quarantine and one event; each reads through the `Store`
//! with bounded queries and renders with maud.

use std::time::Duration;

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use chrono::{DateTime, NaiveDate, Utc};
use chrono_tz::Tz;
use maud::{html, Markup};
use serde::Deserialize;

use super::layout::{
    self, age_text, ago, amount, cashout_href, csrf_field, empty_row, maybe_time_ms, query,
    segment, text_or_dash, time, time_ms, Frame, Section,
};
use super::{html_response, state_of, ConsoleError, Signed};
use crate::alert::NoticeStatus;
use crate::app::AppState;
use crate::http::admin::{decode_cursor, encode_cursor, Role};
use crate::http::query::parse_query;
use crate::http::reconciliation::{business_date, report_bytes, ReportFile};
use crate::http::ApiError;
use crate::ingest::{EventOutcome, ObservationSource};
use crate::state::CashoutStatus;
use crate::store::{AlertFilter, CashoutFilter, CashoutRow, MismatchFilter, IN_FLIGHT};

/// Rows per page of the lists.
const PAGE: usize = 50;

fn frame(signed: &Signed, section: Section) -> Frame<'_> {
    Frame {
        role: signed.session.role,
        csrf: &signed.session.csrf,
        section,
    }
}

fn ok(signed: &Signed, section: Section, title: &str, content: Markup) -> HttpResponse {
    html_response(
        StatusCode::OK,
        layout::page(&frame(signed, section), title, content),
    )
}

fn tz(state: &AppState) -> Tz {
    state.reconciler.timezone()
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX / 4)
}

/// `GET /console/static/console.css`: the stylesheet (no session needed).
pub async fn stylesheet() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/css; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "public, max-age=3600"))
        .body(layout::CSS)
}

/// Any other path under `/console`: sign in first, then a 404 page.
pub async fn unknown(_signed: Signed) -> Result<HttpResponse, ConsoleError> {
    Err(ApiError::NotFound("no such console page").into())
}

/// `GET /console`: one line per provider; red when something needs a human.
pub async fn overview(request: HttpRequest, signed: Signed) -> Result<HttpResponse, ConsoleError> {
    signed.require_admin()?;
    let state = state_of(&request)?;
    let now = Utc::now();
    let now_ms = now.timestamp_millis();
    let tz = tz(state);
    let providers: Vec<(String, DateTime<Utc>)> = state
        .settings
        .providers
        .iter()
        .map(|p| {
            let stuck_after = chrono::Duration::milliseconds(millis(p.stuck_after));
            (p.id.clone(), now - stuck_after)
        })
        .collect();
    let figures = state.store.console_overview(providers).await?;
    let shared = crate::alert::shared::SharedSignals::load(&state.store).await?;
    let csrf = &signed.session.csrf;
    let content = html! {
        h1 { "Overview" }
        p.muted {
            "In-flight cash-outs per provider. A red line needs a human: stuck cash-outs, open alerts or quarantined webhooks. "
            "Signature failures are counted in memory since the daemon started (at most the last hour), summed over the instances running now."
        }
        div.scroll {
            table {
                thead { tr {
                    th { "Provider" }
                    @for status in IN_FLIGHT { th.num { (status.as_str()) } }
                    th { "Oldest in flight" }
                    th.num { "Stuck" }
                    th { "Last webhook" }
                    th { "Last successful poll" }
                    th.num { "Signature failures, 1 h" }
                    th.num { "Open alerts" }
                    th.num { "Open mismatches" }
                    th.num { "Quarantined" }
                    th { "Poll" }
                } }
                tbody {
                    @for (settings, figures) in state.settings.providers.iter().zip(figures.iter()) {
                        @let signals = shared.snapshot(&state.alerting.signals, &settings.id, now_ms);
                        @let last_poll = signals.last_poll_ok_at.max(figures.last_sweep_at);
                        @let oldest = figures.in_flight.iter().filter_map(|(_, _, oldest)| *oldest).min();
                        @let needs_human = figures.stuck > 0 || figures.open_alerts > 0 || figures.quarantined > 0;
                        @let off = state.poller.off_reason(&settings.id);
                        tr class=[needs_human.then_some("alert")] {
                            td { a href=(format!("/console/cashouts?{}", query(&[("provider", Some(&settings.id))]))) { (settings.id) }
                                @if needs_human { br; span.badge.bad { "needs a human" } } }
                            @for (status, count, _) in &figures.in_flight {
                                td.num { a href=(format!("/console/cashouts?{}", query(&[("provider", Some(&settings.id)), ("status", Some(status.as_str()))]))) { (count) } }
                            }
                            td { @match oldest {
                                Some(at) => { (age_text(now_ms - at)) br; span.muted { (time_ms(at, tz)) } }
                                None => span.muted { "—" }
                            } }
                            td.num {
                                @if figures.stuck > 0 {
                                    a href=(format!("/console/cashouts?{}", query(&[("provider", Some(&settings.id)), ("stuck", Some("1"))]))) { (figures.stuck) " stuck" }
                                } @else { "0" }
                                br; span.muted { "after " (humantime::format_duration(settings.stuck_after)) }
                            }
                            td { (ago(signals.last_webhook_at, now, tz)) }
                            td {
                                @if let Some(reason) = off { span.muted title=(format!("no outbound credentials ({reason})")) { "poller off" } }
                                @else { (ago(last_poll, now, tz))
                                    @if let Some(failures) = signals.consecutive_poll_failures.filter(|f| *f > 0) {
                                        br; span.badge.bad { (failures) " failing" }
                                    } }
                            }
                            td.num { (signals.rejections_last_hour) }
                            td.num { @if figures.open_alerts > 0 { a href=(format!("/console/alerts?{}", query(&[("provider", Some(&settings.id))]))) { (figures.open_alerts) } } @else { "0" } }
                            td.num { @if figures.open_mismatches > 0 { a href=(format!("/console/mismatches?{}", query(&[("provider", Some(&settings.id))]))) { (figures.open_mismatches) } } @else { "0" } }
                            td.num { @if figures.quarantined > 0 { a href="/console/quarantine" { (figures.quarantined) } } @else { "0" } }
                            td { @if off.is_none() {
                                form.inline method="post" action=(format!("/console/providers/{}/poll", segment(&settings.id))) {
                                    (csrf_field(csrf))
                                    button.secondary type="submit" { "Poll now" }
                                }
                            } }
                        }
                    }
                    @if figures.is_empty() { (empty_row(13, "No provider is configured.")) }
                }
            }
        }
    };
    Ok(ok(&signed, Section::Overview, "Overview", content))
}

/// Query of `GET /console/cashouts`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CashoutsQuery {
    provider: Option<String>,
    status: Option<String>,
    /// An external id or a provider ref (exact).
    id: Option<String>,
    /// Business dates (in `reports.timezone`), both inclusive.
    from: Option<String>,
    to: Option<String>,
    stuck: Option<String>,
    cursor: Option<String>,
}

fn nonempty(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

fn cashout_table(rows: &[CashoutRow], tz: Tz, now_ms: i64) -> Markup {
    html! {
        div.scroll { table {
            thead { tr {
                th { "Created" } th { "Provider" } th { "Provider ref" } th { "External id" }
                th { "Status" } th { "Provider status" } th.num { "Amount" } th { "Currency" }
                th.num { "Fee" } th { "Updated" } th.num { "Webhooks" }
            } }
            tbody {
                @for row in rows {
                    @let in_flight = IN_FLIGHT.contains(&row.status);
                    tr {
                        td { (time(row.created_at, tz))
                            @if in_flight { br; span.muted { (age_text(now_ms - row.created_at.timestamp_millis())) " in flight" } } }
                        td { (row.provider) }
                        td { a href=(cashout_href(&row.provider, &row.provider_ref)) { (row.provider_ref) } }
                        td { (text_or_dash(row.external_id.as_deref())) }
                        td { span.badge.bad[row.status == CashoutStatus::Failed || row.held] .ok[row.status == CashoutStatus::Completed] { (row.status) }
                            @if row.held { " " span.badge.bad { "held" } } }
                        td { (text_or_dash(row.provider_status.as_deref())) }
                        td.num { (amount(row.amount_minor, row.currency.as_deref())) }
                        td { (text_or_dash(row.currency.as_deref())) }
                        td.num { (amount(row.fee_minor, row.currency.as_deref())) }
                        td { (time(row.updated_at, tz)) }
                        td.num { (row.webhook_count) }
                    }
                }
                @if rows.is_empty() { (empty_row(11, "No cash-out matches.")) }
            }
        } }
    }
}

/// `GET /console/cashouts`: search by provider, state, id, dates; newest first, paginated
/// with the API's list query and cursor.
pub async fn cashouts(request: HttpRequest, signed: Signed) -> Result<HttpResponse, ConsoleError> {
    signed.require_admin()?;
    let state = state_of(&request)?;
    let query_params: CashoutsQuery = parse_query(request.query_string())?;
    let tz = tz(state);
    let now = Utc::now();
    let provider = nonempty(&query_params.provider).map(str::to_string);
    if let Some(provider) = &provider {
        if state.settings.providers.iter().all(|p| &p.id != provider) {
            return Err(
                ApiError::BadRequest(format!("provider: {provider:?} is not configured")).into(),
            );
        }
    }
    let status = nonempty(&query_params.status).map(str::to_string);
    let status_filter = status
        .as_deref()
        .map(str::parse::<CashoutStatus>)
        .transpose()
        .map_err(|err| ApiError::BadRequest(format!("status: {err}")))?;
    // A search range may end (or start) after today: only the format is checked, as the
    // API's list does (a report's date, by contrast, must have begun).
    let date = |name: &str, value: &Option<String>| -> Result<Option<NaiveDate>, ConsoleError> {
        nonempty(value)
            .map(|text| {
                NaiveDate::parse_from_str(text, "%Y-%m-%d").map_err(|_| {
                    ApiError::BadRequest(format!(
                        "{name}: expected a date YYYY-MM-DD, got {text:?}"
                    ))
                    .into()
                })
            })
            .transpose()
    };
    let from = date("from", &query_params.from)?;
    let to = date("to", &query_params.to)?;
    let id = nonempty(&query_params.id).map(str::to_string);
    let stuck = nonempty(&query_params.stuck).is_some();

    let (title, rows, next) = if stuck {
        let provider = provider
            .clone()
            .ok_or_else(|| ApiError::BadRequest("stuck: needs a provider".to_string()))?;
        let stuck_after = state
            .settings
            .providers
            .iter()
            .find(|p| p.id == provider)
            .map_or(Duration::ZERO, |p| p.stuck_after);
        let cutoff = now - chrono::Duration::milliseconds(millis(stuck_after));
        let rows = state
            .store
            .stuck_cashouts(provider.clone(), cutoff, 200)
            .await?;
        (
            format!("Stuck at {provider} (oldest first, at most 200)"),
            rows,
            None,
        )
    } else if let Some(id) = &id {
        let rows = state
            .store
            .find_cashouts_by_id(provider.clone(), id.clone())
            .await?;
        (format!("Cash-outs with id {id}"), rows, None)
    } else {
        let filter = CashoutFilter {
            provider: provider.clone(),
            status: status_filter,
            from: from.map(|d| state.reconciler.day(d).start),
            to: to.map(|d| state.reconciler.day(d).end),
            limit: PAGE,
            after: nonempty(&query_params.cursor)
                .map(decode_cursor)
                .transpose()?,
        };
        let page = state.store.list_cashouts(filter).await?;
        ("Cash-outs".to_string(), page.items, page.next)
    };
    let keep = |cursor: Option<&str>| {
        query(&[
            ("provider", provider.as_deref()),
            ("status", status.as_deref()),
            ("from", nonempty(&query_params.from)),
            ("to", nonempty(&query_params.to)),
            ("cursor", cursor),
        ])
    };
    let content = html! {
        h1 { (title) }
        form.search method="get" action="/console/cashouts" role="search" {
            label { "Provider"
                select name="provider" {
                    option value="" { "any" }
                    @for p in &state.settings.providers {
                        option value=(p.id) selected[provider.as_deref() == Some(p.id.as_str())] { (p.id) }
                    }
                }
            }
            label { "Status"
                select name="status" {
                    option value="" { "any" }
                    @for s in CashoutStatus::ALL {
                        option value=(s.as_str()) selected[status.as_deref() == Some(s.as_str())] { (s.as_str()) }
                    }
                }
            }
            label { "External id or provider ref"
                input type="search" name="id" value=[id.as_deref()];
            }
            label { "Created from" input type="date" name="from" value=[nonempty(&query_params.from)]; }
            label { "to (inclusive)" input type="date" name="to" value=[nonempty(&query_params.to)]; }
            button type="submit" { "Search" }
            a href="/console/cashouts" { "Clear" }
        }
        p.muted { "Dates are business dates in " (tz.name()) "." }
        (cashout_table(&rows, tz, now.timestamp_millis()))
        div.pager {
            @if nonempty(&query_params.cursor).is_some() { a href=(format!("/console/cashouts?{}", keep(None))) { "← First page" } }
            @if let Some(next) = next {
                a href=(format!("/console/cashouts?{}", keep(Some(&encode_cursor(next))))) rel="next" { "Next page →" }
            }
        }
    };
    Ok(ok(&signed, Section::Cashouts, "Cash-outs", content))
}

/// Which secret verified a webhook: its position in `webhook_secrets_env` (0 the first).
fn secret_text(index: Option<i64>) -> Markup {
    match index {
        Some(0) => html! { "current (#0)" },
        Some(n) => html! { "rotation slot #" (n) },
        None => html! { span.muted { "—" } },
    }
}

/// `GET /console/cashouts/{provider}/{provider_ref}`: states, amounts, ids, the full
/// timeline, its mismatches and alerts.
pub async fn cashout(
    request: HttpRequest,
    signed: Signed,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ConsoleError> {
    signed.require_admin()?;
    let state = state_of(&request)?;
    let tz = tz(state);
    let (provider, provider_ref) = path.into_inner();
    let (row, events) = state
        .store
        .get_cashout(provider.clone(), provider_ref.clone())
        .await?
        .ok_or(ApiError::NotFound("no such cash-out"))?;
    let (mismatches, alerts) = state
        .store
        .cashout_findings(
            provider.clone(),
            provider_ref.clone(),
            row.external_id.clone(),
        )
        .await?;
    let net = match (row.amount_minor, row.fee_minor) {
        (Some(amount), Some(fee)) => amount.checked_sub(fee),
        _ => None,
    };
    let currency = row.currency.as_deref();
    let content = html! {
        h1 { "Cash-out " (provider) " / " (provider_ref) }
        dl.facts {
            dt { "Status (canonical)" } dd { span.badge { (row.status) } @if row.held { " " span.badge.bad { "held" } } }
            dt { "Provider status (raw)" } dd { (text_or_dash(row.provider_status.as_deref())) }
            dt { "Reason code" } dd { (text_or_dash(row.reason_code.as_deref())) }
            dt { "Amount" } dd { (amount(row.amount_minor, currency)) " " (text_or_dash(currency)) }
            dt { "Fee" } dd { (amount(row.fee_minor, currency)) }
            dt { "Net" } dd { (amount(net, currency)) }
            dt { "Provider" } dd { (row.provider) }
            dt { "Provider ref" } dd { code { (row.provider_ref) } }
            dt { "External id" } dd { (text_or_dash(row.external_id.as_deref())) }
            dt { "Created" } dd { (time(row.created_at, tz)) }
            dt { "Updated" } dd { (time(row.updated_at, tz)) }
            dt { "Completed" } dd { @match row.completed_at { Some(at) => (time(at, tz)), None => span.muted { "—" } } }
            dt { "Webhooks" } dd { (row.webhook_count) }
            dt { "Recovered by poll" } dd { @if row.recovered_by_poll > 0 { "yes" } @else { "no" } }
        }
        h2 #timeline { "Timeline" }
        div.scroll { table {
            thead { tr {
                th { "Received" } th { "Source" } th { "Raw status" } th { "Canonical" }
                th { "Reason" } th { "Outcome" } th { "Applied" } th { "Secret matched" } th { "Event" }
            } }
            tbody {
                @for event in &events {
                    tr {
                        td { (time(event.received_at, tz)) }
                        td { (event.source) }
                        td { (text_or_dash(event.raw_status.as_deref())) }
                        td { (text_or_dash(event.status.map(CashoutStatus::as_str))) }
                        td { (text_or_dash(event.reason_code.as_deref())) }
                        td { (event.outcome) }
                        td { @if event.applied { span.badge.ok { "applied" } } @else { span.badge { "not applied" } } }
                        td { @if event.source == ObservationSource::Webhook { (secret_text(event.secret_index)) } @else { span.muted { "—" } } }
                        td { a href=(format!("/console/events/{}", segment(&event.event_id))) { code { (event.event_id) } } }
                    }
                }
                @if events.is_empty() { (empty_row(9, "No event is linked to this cash-out.")) }
            }
        } }
        h2 { "Mismatches" }
        div.scroll { table {
            thead { tr { th { "Kind" } th { "State" } th { "Opened" } th { "Resolved" } th { "Detail" } } }
            tbody {
                @for m in &mismatches {
                    tr class=[m.resolved_at.is_none().then_some("alert")] {
                        td { (m.kind) }
                        td { @if m.resolved_at.is_none() { span.badge.bad { "open" } } @else { "resolved" } }
                        td { (time_ms(m.opened_at, tz)) }
                        td { (maybe_time_ms(m.resolved_at, tz)) }
                        td.wrap { (m.detail) }
                    }
                }
                @if mismatches.is_empty() { (empty_row(5, "None.")) }
            }
        } }
        h2 { "Alerts" }
        div.scroll { table {
            thead { tr { th { "Kind" } th { "Severity" } th { "State" } th { "Opened" } th { "Resolved" } th { "Text" } } }
            tbody {
                @for a in &alerts {
                    tr class=[a.resolved_at.is_none().then_some("alert")] {
                        td { a href=(format!("/console/alerts/{}", a.id)) { (a.kind) } }
                        td { (a.severity) }
                        td { @if a.resolved_at.is_none() { span.badge.bad { "firing" } } @else { "resolved" } }
                        td { (time_ms(a.opened_at, tz)) }
                        td { (maybe_time_ms(a.resolved_at, tz)) }
                        td.wrap { (a.text) }
                    }
                }
                @if alerts.is_empty() { (empty_row(6, "None.")) }
            }
        } }
    };
    Ok(ok(&signed, Section::Cashouts, "Cash-out", content))
}

/// Query of `GET /console/mismatches`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MismatchesQuery {
    provider: Option<String>,
    resolved: Option<String>,
    cursor: Option<String>,
}

/// `GET /console/mismatches`: open ones by kind and provider with age; resolved ones on
/// request (`?resolved=1`).
pub async fn mismatches(
    request: HttpRequest,
    signed: Signed,
) -> Result<HttpResponse, ConsoleError> {
    signed.require_admin()?;
    let state = state_of(&request)?;
    let params: MismatchesQuery = parse_query(request.query_string())?;
    let tz = tz(state);
    let now_ms = Utc::now().timestamp_millis();
    let resolved = nonempty(&params.resolved).is_some();
    let provider = nonempty(&params.provider).map(str::to_string);
    let counts = state.store.open_mismatch_counts().await?;
    let (items, next) = state
        .store
        .mismatch_page(MismatchFilter {
            kind: None,
            provider: provider.clone(),
            open: Some(!resolved),
            flagged_during: None,
            limit: PAGE,
            before_id: nonempty(&params.cursor)
                .map(decode_cursor)
                .transpose()?
                .map(|(_, id)| id),
        })
        .await?;
    let keep = |resolved: bool, cursor: Option<&str>| {
        query(&[
            ("provider", provider.as_deref()),
            ("resolved", resolved.then_some("1")),
            ("cursor", cursor),
        ])
    };
    let content = html! {
        h1 { "Mismatches" }
        h2 { "Open, by kind and provider" }
        div.scroll { table {
            thead { tr { th { "Kind" } th { "Provider" } th.num { "Open" } th { "Oldest open for" } } }
            tbody {
                @for c in &counts {
                    tr {
                        td { (c.kind) } td { (c.provider) } td.num { (c.count) }
                        td { (age_text(now_ms - c.oldest_opened_at)) " " span.muted { "(" (time_ms(c.oldest_opened_at, tz)) ")" } }
                    }
                }
                @if counts.is_empty() { (empty_row(4, "No open mismatch.")) }
            }
        } }
        h2 { @if resolved { "Resolved" } @else { "Open" } @if let Some(p) = &provider { " at " (p) } ", newest first" }
        p {
            @if resolved { a href=(format!("/console/mismatches?{}", keep(false, None))) { "Show open ones" } }
            @else { a href=(format!("/console/mismatches?{}", keep(true, None))) { "Show resolved ones" } }
        }
        div.scroll { table {
            thead { tr { th { "Kind" } th { "Provider" } th { "Subject" } th { "Opened" } th { "Age" } th { "Resolved" } th { "Detail" } } }
            tbody {
                @for m in &items {
                    tr {
                        td { (m.kind) }
                        td { (m.provider) }
                        td { @match &m.provider_ref {
                            Some(r) => a href=(cashout_href(&m.provider, r)) { (r) },
                            None => (text_or_dash(m.subject.as_deref())),
                        } }
                        td { (time_ms(m.opened_at, tz)) }
                        td { (age_text(m.resolved_at.unwrap_or(now_ms) - m.opened_at)) }
                        td { (maybe_time_ms(m.resolved_at, tz)) }
                        td.wrap { (m.detail) }
                    }
                }
                @if items.is_empty() { (empty_row(7, "None.")) }
            }
        } }
        div.pager { @if let Some(id) = next {
            a href=(format!("/console/mismatches?{}", keep(resolved, Some(&encode_cursor((0, id)))))) rel="next" { "Next page →" }
        } }
    };
    Ok(ok(&signed, Section::Mismatches, "Mismatches", content))
}

/// Query of `GET /console/alerts`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AlertsQuery {
    provider: Option<String>,
}

fn rfc3339_time(text: &str, tz: Tz) -> Markup {
    match DateTime::parse_from_rfc3339(text) {
        Ok(at) => time(at.with_timezone(&Utc), tz),
        Err(_) => html! { (text) },
    }
}

/// `GET /console/alerts`: open ones and the most recent, with their deliveries in short.
pub async fn alerts(request: HttpRequest, signed: Signed) -> Result<HttpResponse, ConsoleError> {
    signed.require_admin()?;
    let state = state_of(&request)?;
    let params: AlertsQuery = parse_query(request.query_string())?;
    let tz = tz(state);
    let provider = nonempty(&params.provider).map(str::to_string);
    let filter = |open_only: bool, limit: usize| AlertFilter {
        open_only,
        kind: None,
        provider: provider.clone(),
        before_id: None,
        limit,
    };
    let (open, _) = state.store.list_alerts(filter(true, 200)).await?;
    let (recent, _) = state.store.list_alerts(filter(false, PAGE)).await?;
    let ids: Vec<i64> = open.iter().chain(recent.iter()).map(|a| a.id).collect();
    let deliveries = state.store.alert_delivery_summaries(ids).await?;
    let summary_of = |id: i64| {
        deliveries
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, s)| s.clone())
            .unwrap_or_default()
    };
    let table = |alerts: &[crate::store::AlertView]| {
        html! {
            div.scroll { table {
                thead { tr {
                    th { "Kind" } th { "Severity" } th { "State" } th { "Subject" } th { "Opened" }
                    th { "Resolved" } th { "Deliveries" } th { "Text" }
                } }
                tbody {
                    @for a in alerts {
                        @let d = summary_of(a.id);
                        tr class=[(a.status == NoticeStatus::Firing).then_some("alert")] {
                            td { a href=(format!("/console/alerts/{}", a.id)) { (a.kind) } }
                            td { (a.severity) }
                            td { (a.status.as_str()) }
                            td { (a.subject) }
                            td { (rfc3339_time(&a.opened_at, tz)) }
                            td { @match &a.resolved_at { Some(t) => (rfc3339_time(t, tz)), None => span.muted { "—" } } }
                            td {
                                @if d.deliveries == 0 { span.muted { "none (" (a.delivery.as_str()) ")" } }
                                @else {
                                    (d.delivered) "/" (d.deliveries) " delivered, " (d.attempts) " attempts"
                                    @if d.failed > 0 { " " span.badge.bad { (d.failed) " given up" } }
                                    @if let Some(e) = &d.last_error { br; span.muted { (e) } }
                                }
                            }
                            td.wrap { (a.text) }
                        }
                    }
                    @if alerts.is_empty() { (empty_row(8, "None.")) }
                }
            } }
        }
    };
    let content = html! {
        h1 { "Alerts" @if let Some(p) = &provider { " at " (p) } }
        h2 { "Open (" (open.len()) ")" }
        (table(&open))
        h2 { "Recent" }
        (table(&recent))
    };
    Ok(ok(&signed, Section::Alerts, "Alerts", content))
}

/// `GET /console/alerts/{id}`: one alert, its deliveries and every attempt.
pub async fn alert(
    request: HttpRequest,
    signed: Signed,
    id: web::Path<String>,
) -> Result<HttpResponse, ConsoleError> {
    signed.require_admin()?;
    let state = state_of(&request)?;
    let tz = tz(state);
    let id: i64 = id
        .parse()
        .map_err(|_| ApiError::NotFound("unknown alert"))?;
    let (alert, deliveries) = state
        .store
        .get_alert(id)
        .await?
        .ok_or(ApiError::NotFound("unknown alert"))?;
    let content = html! {
        h1 { "Alert " (alert.kind) " · " (alert.subject) }
        dl.facts {
            dt { "State" } dd { (alert.status.as_str()) }
            dt { "Severity" } dd { (alert.severity) }
            dt { "Provider" } dd { (text_or_dash(alert.provider.as_deref())) }
            dt { "Delivery" } dd { (alert.delivery.as_str()) }
            dt { "Opened" } dd { (rfc3339_time(&alert.opened_at, tz)) }
            dt { "Resolved" } dd { @match &alert.resolved_at { Some(t) => (rfc3339_time(t, tz)), None => span.muted { "—" } } }
            dt { "Text" } dd { (alert.text) }
        }
        h2 { "Deliveries" }
        @for d in &deliveries {
            h3 { code { (d.webhook_id) } " · " (d.status.as_str()) " · " (d.state) }
            div.scroll { table {
                thead { tr { th { "Attempted" } th.num { "HTTP status" } th { "Error" } th.num { "ms" } } }
                tbody {
                    @for a in &d.attempts {
                        tr {
                            td { (rfc3339_time(&a.attempted_at, tz)) }
                            td.num { @match a.http_status { Some(s) => (s), None => span.muted { "—" } } }
                            td { (text_or_dash(a.error.as_deref())) }
                            td.num { (a.duration_ms) }
                        }
                    }
                    @if d.attempts.is_empty() { (empty_row(4, "No attempt yet.")) }
                }
            } }
        }
        @if deliveries.is_empty() { p.muted { "No delivery (no alerts.webhook_url, or grouped/inhibited)." } }
        p { a href="/console/alerts" { "All alerts" } }
    };
    Ok(ok(&signed, Section::Alerts, "Alert", content))
}

/// `GET /console/reports`: the generated days with downloads and the generate forms.
pub async fn reports(request: HttpRequest, signed: Signed) -> Result<HttpResponse, ConsoleError> {
    let state = state_of(&request)?;
    let tz = tz(state);
    let rows = state.store.list_reports().await?;
    let today = crate::report::BusinessDay::containing(Utc::now(), tz).date;
    let csrf = &signed.session.csrf;
    let content = html! {
        h1 { "Reports" }
        p.muted { "Business days in " (tz.name()) ". A provisional report (a day not over yet) is regenerated on each download." }
        div.scroll { table {
            thead { tr { th { "Date" } th { "State" } th.num { "Rows" } th { "SHA-256 of the CSV" } th { "Generated" } th { "Download" } } }
            tbody {
                @for r in &rows {
                    tr {
                        td { (r.date) }
                        td { @if r.is_final { span.badge.ok { "final" } } @else { span.badge { "provisional" } } }
                        td.num { (r.rows) }
                        td { code { (r.sha256) } }
                        td { (time_ms(r.generated_at, tz)) }
                        td {
                            a href=(format!("/console/reports/{}.csv", segment(&r.date))) download { "CSV" } " · "
                            a href=(format!("/console/reports/{}/summary", segment(&r.date))) { "Summary" }
                        }
                    }
                }
                @if rows.is_empty() { (empty_row(6, "No report generated yet.")) }
            }
        } }
        h2 { "Generate a day" }
        form.search method="post" action="/console/reports" {
            (csrf_field(csrf))
            label { "Business date" input type="date" name="date" value=(today) required; }
            button type="submit" { "Generate report" }
        }
        @if signed.session.role == Role::Admin {
            h2 { "Reconcile a day" }
            p.muted { "Runs the day's full reconciliation pass now, then rewrites its report." }
            form.search method="post" action="/console/reconcile" {
                (csrf_field(csrf))
                label { "Business date" input type="date" name="date" value=(today) required; }
                button type="submit" { "Reconcile and regenerate" }
            }
        }
    };
    Ok(ok(&signed, Section::Reports, "Reports", content))
}

/// `GET /console/reports/{date}.csv`: the same bytes as the API's CSV.
pub async fn report_csv(
    request: HttpRequest,
    _signed: Signed,
    date: web::Path<String>,
) -> Result<HttpResponse, ConsoleError> {
    download(&request, &date, ReportFile::Csv).await
}

/// `GET /console/reports/{date}/summary`: the day's summary JSON.
pub async fn report_summary(
    request: HttpRequest,
    _signed: Signed,
    date: web::Path<String>,
) -> Result<HttpResponse, ConsoleError> {
    download(&request, &date, ReportFile::Summary).await
}

/// One of a day's report files as a download (never cached).
async fn download(
    request: &HttpRequest,
    date: &str,
    file: ReportFile,
) -> Result<HttpResponse, ConsoleError> {
    let state = state_of(request)?;
    let date = business_date(state, "date", date)?;
    let bytes = report_bytes(state, date, file).await?;
    Ok(HttpResponse::Ok()
        .content_type(file.content_type())
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header((header::CONTENT_DISPOSITION, file.attachment(date)))
        .body(bytes))
}

/// Query of `GET /console/quarantine`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct QuarantineQuery {
    cursor: Option<String>,
}

/// `GET /console/quarantine`: quarantined webhooks with their parse error (no body).
pub async fn quarantine(
    request: HttpRequest,
    signed: Signed,
) -> Result<HttpResponse, ConsoleError> {
    signed.require_admin()?;
    let state = state_of(&request)?;
    let params: QuarantineQuery = parse_query(request.query_string())?;
    let tz = tz(state);
    let before = nonempty(&params.cursor)
        .map(decode_cursor)
        .transpose()?
        .map(|(_, seq)| seq);
    let (events, next) = state.store.quarantined_events(before, PAGE).await?;
    let csrf = &signed.session.csrf;
    let content = html! {
        h1 { "Quarantine" }
        p.muted { "Verified webhooks that could not be parsed or mapped. Their bodies show on each event's page only." }
        div.scroll { table {
            thead { tr { th { "Received" } th { "Provider" } th { "Event" } th { "Provider ref" } th { "Parse error" } th.num { "Bytes" } th { "Action" } } }
            tbody {
                @for e in &events {
                    tr {
                        td { (time_ms(e.received_at, tz)) }
                        td { (e.provider) }
                        td { a href=(format!("/console/events/{}", segment(&e.event_id))) { code { (e.event_id) } } }
                        td { (text_or_dash(e.provider_ref.as_deref())) }
                        td.wrap { (text_or_dash(e.error.as_deref())) }
                        td.num { @match e.body_bytes { Some(n) => (n), None => span.muted { "cleared" } } }
                        td {
                            form.inline method="post" action=(format!("/console/events/{}/reprocess", segment(&e.event_id))) {
                                (csrf_field(csrf))
                                button type="submit" { "Reprocess" }
                            }
                        }
                    }
                }
                @if events.is_empty() { (empty_row(7, "Nothing is quarantined.")) }
            }
        } }
        div.pager { @if let Some(seq) = next {
            a href=(format!("/console/quarantine?{}", query(&[("cursor", Some(&encode_cursor((0, seq))))]))) rel="next" { "Next page →" }
        } }
    };
    Ok(ok(&signed, Section::Quarantine, "Quarantine", content))
}

/// Query of `GET /console/events/{event_id}`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct EventQuery {
    body: Option<String>,
}

/// `GET /console/events/{event_id}`: one stored event; its body only with `?body=1`.
pub async fn event(
    request: HttpRequest,
    signed: Signed,
    event_id: web::Path<String>,
) -> Result<HttpResponse, ConsoleError> {
    signed.require_admin()?;
    let state = state_of(&request)?;
    let params: EventQuery = parse_query(request.query_string())?;
    let tz = tz(state);
    let with_body = nonempty(&params.body).is_some();
    let event_id = event_id.into_inner();
    let event = state
        .store
        .console_event(event_id.clone(), with_body)
        .await?
        .ok_or(ApiError::NotFound("no such event"))?;
    let href = format!("/console/events/{}", segment(&event.event_id));
    let content = html! {
        h1 { "Event " code { (event.event_id) } }
        dl.facts {
            dt { "Provider" } dd { (event.provider) }
            dt { "Source" } dd { (event.source) }
            dt { "Outcome" } dd { @if event.outcome == EventOutcome::Quarantined { span.badge.bad { (event.outcome) } } @else { (event.outcome) } }
            dt { "Parse error" } dd { (text_or_dash(event.error.as_deref())) }
            dt { "Provider ref" } dd { @match &event.provider_ref {
                Some(r) => a href=(cashout_href(&event.provider, r)) { (r) },
                None => span.muted { "—" },
            } }
            dt { "Received" } dd { (time_ms(event.received_at, tz)) }
            dt { "Secret matched" } dd { @if event.source == ObservationSource::Webhook { (secret_text(event.secret_index)) } @else { span.muted { "—" } } }
            dt { "Body SHA-256" } dd { code { (text_or_dash(event.body_sha256.as_deref())) } }
            dt { "Body" } dd { @match event.body_bytes {
                Some(n) => { (n) " bytes" @if !with_body { " · " a href=(format!("{href}?body=1")) { "Show the body" } } }
                None => span.muted { "cleared by retention (or none)" },
            } }
        }
        @if let Some(body) = &event.raw_body {
            h2 { "Body" }
            pre { (String::from_utf8_lossy(body)) }
        }
        @if event.outcome == EventOutcome::Quarantined {
            form method="post" action=(format!("{href}/reprocess")) {
                (csrf_field(&signed.session.csrf))
                p { button type="submit" { "Reprocess this event" } }
            }
        }
        p { a href="/console/quarantine" { "Quarantine" } }
    };
    Ok(ok(&signed, Section::Quarantine, "Event", content))
}
