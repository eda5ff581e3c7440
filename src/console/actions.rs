//! The console's POSTs: sign-in and sign-out, and the actions (poll now, reconcile a date,
//! generate a report, reprocess a quarantined webhook) through the admin API's use cases.

use std::time::{Duration, Instant};

use actix_web::http::{header, StatusCode};
use actix_web::{web, HttpRequest, HttpResponse};
use maud::{html, Markup};

use super::layout::{self, Frame, Section};
use super::{html_response, session, state_of, ConsoleError, Form, Signed};
use crate::app::AppState;
use crate::http::admin::{poll_now, role_of_token, Role};
use crate::http::reconciliation::{business_date, reconcile_date, report_bytes, ReportFile};
use crate::http::ApiError;
use crate::store::IngestOutcome;

/// How long a wrong token waits before its answer (other requests go on meanwhile).
pub const WRONG_TOKEN_DELAY: Duration = Duration::from_millis(500);

/// Where a role lands after signing in.
fn landing(role: Role) -> &'static str {
    match role {
        Role::Admin => "/console",
        Role::Reports => "/console/reports",
    }
}

fn redirect(to: &str) -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, to))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .finish()
}

fn sign_in_form(message: Option<&str>, csrf: &str) -> Markup {
    layout::bare_page(
        "Sign in",
        html! {
            div.signin {
                h1 { "cashout-recon console" }
                @if let Some(message) = message {
                    p.flash.bad role="alert" { (message) }
                }
                form method="post" action="/console/sign-in" {
                    input type="hidden" name="csrf" value=(csrf);
                    label for="token" { "Admin or reports token" }
                    input #token type="password" name="token" autocomplete="current-password" required autofocus;
                    button type="submit" { "Sign in" }
                }
                p.muted { "The same tokens as the admin API. The session lasts 8 hours." }
            }
        },
    )
}

/// `GET /console/sign-in`: the form (or straight on when already signed in).
pub async fn sign_in_page(request: HttpRequest) -> Result<HttpResponse, ConsoleError> {
    let state = state_of(&request)?;
    let live = request
        .cookie(session::COOKIE)
        .and_then(|c| state.console.get(c.value(), Instant::now()));
    if let Some(session) = live {
        return Ok(redirect(landing(session.role)));
    }
    Ok(sign_in_answer(&request, StatusCode::OK, None))
}

/// The sign-in form with a fresh CSRF token, and the cookie holding it.
fn sign_in_answer(
    request: &HttpRequest,
    status: StatusCode,
    message: Option<&str>,
) -> HttpResponse {
    let csrf = session::random_token();
    let mut answer = html_response(status, sign_in_form(message, &csrf));
    // The cookie is built from constants and hex: adding it cannot fail.
    let _ = answer.add_cookie(&session::sign_in_cookie(&csrf, session::over_tls(request)));
    answer
}

/// `POST /console/sign-in`: refused (403, a fresh form) unless the form's CSRF token is the
/// one in its cookie; then a right token opens a session (cookie) and goes to the role's
/// landing page; a wrong one waits [`WRONG_TOKEN_DELAY`], is counted, and answers 401.
pub async fn sign_in(request: HttpRequest, body: web::Bytes) -> Result<HttpResponse, ConsoleError> {
    let state = state_of(&request)?;
    let form = Form::parse(&body);
    let cookie = request.cookie(session::SIGN_IN_COOKIE);
    if !session::sign_in_csrf_matches(cookie.as_ref().map(|c| c.value()), form.get("csrf")) {
        tracing::warn!("console sign-in refused: the form's CSRF token is missing or stale");
        return Ok(sign_in_answer(
            &request,
            StatusCode::FORBIDDEN,
            Some("This sign-in form expired or came from another site. Sign in again."),
        ));
    }
    let token = form.get("token").map(str::trim).unwrap_or_default();
    let role = (!token.is_empty())
        .then(|| role_of_token(state, token))
        .flatten();
    let Some(role) = role else {
        state.metrics.console_sign_in_failures.inc();
        tracing::warn!("console sign-in refused: wrong token");
        tokio::time::sleep(WRONG_TOKEN_DELAY).await;
        return Ok(sign_in_answer(
            &request,
            StatusCode::UNAUTHORIZED,
            Some("That token is not the admin or the reports token."),
        ));
    };
    let (id, _) = state.console.open(role, Instant::now());
    let secure = session::over_tls(&request);
    let cookie = session::cookie(&id, state.console.lifetime(), secure);
    let mut used = session::sign_in_cookie("", secure);
    used.make_removal();
    tracing::info!(role = ?role, "console sign-in");
    Ok(HttpResponse::SeeOther()
        .cookie(cookie)
        .cookie(used)
        .insert_header((header::LOCATION, landing(role)))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .finish())
}

/// `POST /console/sign-out`: ends the session and forgets the cookie.
pub async fn sign_out(
    request: HttpRequest,
    signed: Signed,
    body: web::Bytes,
) -> Result<HttpResponse, ConsoleError> {
    signed.check_csrf(&Form::parse(&body))?;
    let state = state_of(&request)?;
    state.console.close(&signed.id);
    Ok(HttpResponse::SeeOther()
        .cookie(session::removal_cookie(session::over_tls(&request)))
        .insert_header((header::LOCATION, "/console/sign-in"))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .finish())
}

/// The page an action answers with: what it did and where to go next.
fn outcome_page(signed: &Signed, section: Section, title: &str, content: Markup) -> HttpResponse {
    let frame = Frame {
        role: signed.session.role,
        csrf: &signed.session.csrf,
        section,
    };
    html_response(StatusCode::OK, layout::page(&frame, title, content))
}

/// `POST /console/events/{event_id}/reprocess` (admin): the API's reprocessing.
pub async fn reprocess(
    request: HttpRequest,
    signed: Signed,
    event_id: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ConsoleError> {
    signed.check_csrf(&Form::parse(&body))?;
    signed.require_admin()?;
    let state = state_of(&request)?;
    let event_id = event_id.into_inner();
    let outcome = crate::http::admin::reprocess(state, event_id.clone()).await?;
    let event_href = format!("/console/events/{}", layout::segment(&event_id));
    let content = match outcome {
        IngestOutcome::Accepted { applied, .. } => html! {
            h1 { "Reprocessed: accepted" }
            p.flash role="status" {
                "Event " code { (event_id) } " now parses; the cash-out is "
                strong { (applied.status.as_str()) } "."
            }
        },
        IngestOutcome::Quarantined { reason, .. } => html! {
            h1 { "Reprocessed: still quarantined" }
            p.flash.bad role="status" { "It still does not parse: " (reason) }
        },
        IngestOutcome::Duplicate { .. } => html! {
            h1 { "Reprocessed: duplicate" }
            p.flash role="status" { "The cash-out already had this update." }
        },
        IngestOutcome::Replayed => html! {
            h1 { "Reprocessed: replayed" }
            p.flash.bad role="status" { "Its request id was already used with another body." }
        },
    };
    Ok(outcome_page(
        &signed,
        Section::Quarantine,
        "Reprocessed",
        html! {
            (content)
            p { a href=(event_href) { "The event" } " · " a href="/console/quarantine" { "Quarantine" } }
        },
    ))
}

/// `POST /console/providers/{provider}/poll` (admin): one poll cycle now.
pub async fn poll(
    request: HttpRequest,
    signed: Signed,
    provider: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ConsoleError> {
    signed.check_csrf(&Form::parse(&body))?;
    signed.require_admin()?;
    let state = state_of(&request)?;
    let summary = poll_now(state, &provider).await?;
    Ok(outcome_page(
        &signed,
        Section::Overview,
        "Polled",
        html! {
            h1 { "Polled " (provider.as_str()) }
            p.flash role="status" {
                (summary.fetched) " fetched, " (summary.updated) " updated, "
                (summary.recovered) " recovered (missed webhooks), " (summary.errors) " errors."
            }
            p { a href="/console" { "Overview" } }
        },
    ))
}

fn date_of(state: &AppState, form: &Form) -> Result<chrono::NaiveDate, ConsoleError> {
    let text = form
        .get("date")
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::BadRequest("date: required (YYYY-MM-DD)".to_string()))?;
    Ok(business_date(state, "date", text)?)
}

/// `POST /console/reconcile` (admin): the full pass of a date, then its report.
pub async fn reconcile(
    request: HttpRequest,
    signed: Signed,
    body: web::Bytes,
) -> Result<HttpResponse, ConsoleError> {
    let form = Form::parse(&body);
    signed.check_csrf(&form)?;
    signed.require_admin()?;
    let state = state_of(&request)?;
    let date = date_of(state, &form)?;
    let outcome = reconcile_date(state, date).await?;
    let summary = &outcome.report.summary;
    Ok(outcome_page(
        &signed,
        Section::Reports,
        "Reconciled",
        html! {
            h1 { "Reconciled " (date) }
            p.flash role="status" {
                "The full pass opened " (outcome.pass.opened) " and resolved "
                (outcome.pass.resolved) " mismatches; the report has " (summary.rows) " rows ("
                @if summary.is_final { "final" } @else { "provisional" } ")."
            }
            p {
                a href=(format!("/console/reports/{date}.csv")) { "CSV" } " · "
                a href=(format!("/console/reports/{date}/summary")) { "Summary" } " · "
                a href="/console/reports" { "Reports" }
            }
        },
    ))
}

/// `POST /console/reports` (either role): generates a date's report if it is absent or
/// provisional (what `GET /api/v1/reports/{date}.csv` does), without a reconcile pass.
pub async fn generate_report(
    request: HttpRequest,
    signed: Signed,
    body: web::Bytes,
) -> Result<HttpResponse, ConsoleError> {
    let form = Form::parse(&body);
    signed.check_csrf(&form)?;
    let state = state_of(&request)?;
    let date = date_of(state, &form)?;
    report_bytes(state, date, ReportFile::Csv).await?;
    let generated = state.store.get_report(date.to_string()).await?;
    Ok(outcome_page(
        &signed,
        Section::Reports,
        "Report generated",
        html! {
            h1 { "Report of " (date) }
            p.flash role="status" {
                "The report is ready"
                @if let Some(row) = &generated {
                    ": " (row.rows) " rows, " @if row.is_final { "final" } @else { "provisional" }
                }
                "."
            }
            p {
                a href=(format!("/console/reports/{date}.csv")) { "CSV" } " · "
                a href=(format!("/console/reports/{date}/summary")) { "Summary" } " · "
                a href="/console/reports" { "Reports" }
            }
        },
    ))
}
