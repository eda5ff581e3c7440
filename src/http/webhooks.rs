//! `POST /webhooks/{provider_id}`: bounded read, verification over the raw bytes,
//! durable commit, then the SPEC §2.1 answer.

use std::sync::Arc;
use std::time::Instant;

use actix_web::error::PayloadError;
use actix_web::http::{header, StatusCode};
use actix_web::{guard, post, web, HttpRequest, HttpResponse, ResponseError};
use chrono::Utc;
use futures_util::StreamExt;

use prometheus::{Histogram, IntCounter};

use crate::app::AppState;
use crate::http::error::ApiError;
use crate::ingestor::VerifiedWebhook;
use crate::metrics::Metrics;
use crate::providers::registry::{ConfiguredProvider, ProviderRegistry};
use crate::state::Transition;
use crate::store::IngestOutcome;
use crate::telemetry::{bounded, LogVerdict};
use crate::verify::{InboundRequest, RequestHeaders, VerifyError};

/// The body of a webhook's 200/202 answer (SPEC §2.1).
#[derive(serde::Serialize)]
struct Answer<'a> {
    event_id: &'a str,
    status: &'static str,
}

fn json_answer(status: StatusCode, outcome: &'static str, event_id: &str) -> HttpResponse {
    HttpResponse::build(status).json(Answer {
        event_id,
        status: outcome,
    })
}

/// Reads the body up to `limit` bytes; `None` when it is larger. The read deadline of
/// [`crate::http::gate::read_deadline`] ends a body that does not arrive.
async fn read_bounded(
    mut payload: web::Payload,
    limit: usize,
) -> Result<Option<web::BytesMut>, PayloadError> {
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk?;
        if body.len() + chunk.len() > limit {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

fn collect_headers(request: &HttpRequest) -> RequestHeaders {
    let mut headers = RequestHeaders::new();
    for (name, value) in request.headers() {
        if let Ok(value) = value.to_str() {
            headers.insert(name.as_str(), value);
        }
    }
    headers
}

/// The webhook routes: `POST /webhooks/{id}` as one static path per configured provider,
/// then `POST /webhooks/{provider_id}` for any other id (404 `unknown_provider`).
///
/// A static path is matched by comparing strings; a path with a dynamic segment costs a
/// regular-expression match per request, twice with the request span's route (about a
/// tenth of an HTTP worker's time per webhook, measured under wrk).
pub fn routes(config: &mut web::ServiceConfig, providers: &ProviderRegistry, metrics: &Metrics) {
    for provider in providers.iter() {
        let route = Arc::new(WebhookRoute {
            metrics: WebhookMetrics::of(metrics, provider.id()),
            provider: Arc::clone(provider),
        });
        config.service(
            web::resource(format!("/webhooks/{}", provider.id()))
                .guard(guard::Post())
                .to(
                    move |request: HttpRequest,
                          payload: web::Payload,
                          state: web::Data<AppState>| {
                        receive(request, payload, state, Arc::clone(&route))
                    },
                ),
        );
    }
    config.service(unknown_provider);
}

/// What a provider's webhook route holds: the provider and its metric series, looked up
/// once instead of by label on every request.
struct WebhookRoute {
    provider: Arc<ConfiguredProvider>,
    metrics: WebhookMetrics,
}

/// One provider's webhook metric series.
struct WebhookMetrics {
    received: IntCounter,
    seconds: Histogram,
    accepted: IntCounter,
    duplicate: IntCounter,
    quarantined: IntCounter,
}

impl WebhookMetrics {
    fn of(metrics: &Metrics, provider: &str) -> WebhookMetrics {
        let outcome = |name: &str| {
            metrics
                .webhooks_outcome
                .with_label_values(&[provider, name])
        };
        WebhookMetrics {
            received: metrics.webhooks_received.with_label_values(&[provider]),
            seconds: metrics.webhook_seconds.with_label_values(&[provider]),
            accepted: outcome("accepted"),
            duplicate: outcome("duplicate"),
            quarantined: outcome("quarantined"),
        }
    }
}

/// A webhook for an id no provider has.
#[post("/webhooks/{provider_id}")]
async fn unknown_provider() -> HttpResponse {
    ApiError::UnknownProvider.error_response()
}

/// Receives one webhook of the route's provider.
async fn receive(
    request: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    route: Arc<WebhookRoute>,
) -> HttpResponse {
    let started = Instant::now();
    route.metrics.received.inc();
    let answer = handle(&request, payload, &state, &route)
        .await
        .unwrap_or_else(|err| err.error_response());
    route
        .metrics
        .seconds
        .observe(started.elapsed().as_secs_f64());
    answer
}

/// Reads and verifies the request, hands it to the [`crate::ingestor::Ingestor`] and
/// answers what it did.
async fn handle(
    request: &HttpRequest,
    payload: web::Payload,
    state: &AppState,
    route: &WebhookRoute,
) -> Result<HttpResponse, ApiError> {
    let provider = &*route.provider;
    let id = provider.id();
    let body = read_body(request, payload, state, id).await?;
    let Some(verifier) = &provider.verifier else {
        return Err(rejected(
            state,
            id,
            ApiError::NoWebhooks,
            "this provider sends no webhooks",
        ));
    };
    let headers = collect_headers(request);
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or_else(|| request.path());
    let inbound = InboundRequest {
        path,
        headers: &headers,
        body: &body,
    };
    let received_at = Utc::now();
    let verified = match verifier.verify(&inbound, received_at.timestamp()) {
        Ok(verified) => verified,
        Err(err) => return Err(reject_unverified(state, provider, &inbound, err)),
    };
    state
        .alerting
        .signals
        .webhook_verified(id, received_at.timestamp_millis());

    let webhook = VerifiedWebhook {
        request: &inbound,
        verified,
        received_at,
    };
    let outcome = state
        .ingestor
        .receive(provider, webhook)
        .await
        .map_err(|err| store_failed(state, id, &err))?;
    Ok(match outcome {
        IngestOutcome::Accepted { event_id, applied } => {
            route.metrics.accepted.inc();
            if matches!(applied.transition, Some(Transition::Conflict { .. })) {
                state.wake_alerts();
            }
            if applied.status_fetch_queued {
                state.request_status_fetch(id);
            }
            json_answer(StatusCode::OK, "accepted", &event_id)
        }
        IngestOutcome::Duplicate { event_id } => {
            route.metrics.duplicate.inc();
            json_answer(StatusCode::OK, "duplicate", &event_id)
        }
        IngestOutcome::Quarantined { event_id, reason } => {
            route.metrics.quarantined.inc();
            state.wake_alerts();
            tracing::warn!(provider = id, event_id, reason, "webhook quarantined");
            json_answer(StatusCode::ACCEPTED, "quarantined", &event_id)
        }
        IngestOutcome::Replayed => {
            if state.alerting.signals.signature_rejected(
                id,
                Utc::now().timestamp_millis(),
                state.settings.alerts.signature_failures_per_minute,
            ) {
                state.wake_alerts();
            }
            return Err(rejected(
                state,
                id,
                ApiError::Replayed,
                "request id already used with a different body",
            ));
        }
    })
}

/// The body, at most `server.max_body_bytes`, whole within `server.read_timeout`.
async fn read_body(
    request: &HttpRequest,
    payload: web::Payload,
    state: &AppState,
    id: &str,
) -> Result<web::Bytes, ApiError> {
    let limit = state.settings.server.max_body_bytes;
    let declared_length = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared_length.is_some_and(|length| length > limit) {
        return Err(rejected(
            state,
            id,
            ApiError::TooLarge(limit),
            "declared Content-Length over server.max_body_bytes",
        ));
    }
    match read_bounded(payload, limit).await {
        Ok(Some(body)) => Ok(body.freeze()),
        Ok(None) => Err(rejected(
            state,
            id,
            ApiError::TooLarge(limit),
            "body over server.max_body_bytes",
        )),
        Err(err) if crate::http::gate::is_deadline(&err) => Err(rejected(
            state,
            id,
            ApiError::Timeout,
            "body did not arrive within server.read_timeout",
        )),
        Err(err) => {
            let detail = err.to_string();
            Err(rejected(
                state,
                id,
                ApiError::BadBody(detail.clone()),
                &detail,
            ))
        }
    }
}

/// The store could not commit: counted and logged (rate-limited) as `store_unavailable`.
fn store_failed(state: &AppState, id: &str, err: &crate::store::StoreError) -> ApiError {
    state
        .metrics
        .webhooks_rejected
        .with_label_values(&[id, "store_unavailable"])
        .inc();
    if let LogVerdict::Log { suppressed } =
        state
            .rejection_log
            .admit(id, "store_unavailable", Instant::now())
    {
        tracing::error!(provider = id, error = %err, suppressed, "webhook not committed; answering 503");
    }
    ApiError::NotCommitted
}

/// Records a rejection under the answer's code and returns the answer.
fn rejected(state: &AppState, provider: &str, answer: ApiError, detail: &str) -> ApiError {
    record_rejection(state, provider, rejection_reason(&answer), detail);
    answer
}

/// The `reason` label of a rejected webhook.
fn rejection_reason(answer: &ApiError) -> &'static str {
    match answer {
        ApiError::Timeout => "timeout",
        other => other.code(),
    }
}

/// Longest `detail` of a rejection log line, in characters.
const MAX_DETAIL_CHARS: usize = 160;

/// Counts a rejected webhook (`cashout_recon_webhooks_rejected_total{provider,reason}`)
/// and logs it rate-limited per (provider, reason): the first, then at most one line per
/// second with the count held back. Never the body, never a secret; the line is bounded.
fn record_rejection(state: &AppState, provider: &str, reason: &'static str, detail: &str) {
    state
        .metrics
        .webhooks_rejected
        .with_label_values(&[provider, reason])
        .inc();
    if let LogVerdict::Log { suppressed } =
        state.rejection_log.admit(provider, reason, Instant::now())
    {
        tracing::warn!(
            provider,
            reason,
            detail = bounded(detail, MAX_DETAIL_CHARS),
            suppressed,
            "webhook rejected"
        );
    }
}

/// Answers 401 and, when a cash-out id can be read, queues one (rate-limited) status
/// fetch so a genuine webhook with a rotated secret is still resolved by polling.
fn reject_unverified(
    state: &AppState,
    provider: &ConfiguredProvider,
    inbound: &InboundRequest<'_>,
    err: VerifyError,
) -> ApiError {
    let id = provider.id();
    record_rejection(state, id, err.code(), &err.to_string());
    if state.alerting.signals.signature_rejected(
        id,
        Utc::now().timestamp_millis(),
        state.settings.alerts.signature_failures_per_minute,
    ) {
        state.wake_alerts();
    }
    let per_minute = state.settings.poll.unverified_fetches_per_minute;
    if let Some(provider_ref) = provider.adapter.peek_provider_ref(inbound) {
        if provider.allow_unverified_fetch(per_minute) {
            let ingestor = state.ingestor.clone();
            let provider_id = id.to_string();
            let notify = state.status_fetch_notifier();
            tokio::spawn(async move {
                let queued = ingestor
                    .fetch_unverified(&provider_id, provider_ref, Utc::now())
                    .await;
                match queued {
                    Ok(true) => notify(&provider_id),
                    Ok(false) => {}
                    Err(err) => {
                        tracing::warn!(provider = provider_id, error = %err, "cannot queue a status fetch")
                    }
                }
            });
        }
    }
    ApiError::Unverified(err)
}
