//! `POST /webhooks/{provider_id}`: bounded read, verification over the raw bytes,
//! durable commit, then the SPEC §2.1 answer.

use std::time::Instant;

use actix_web::error::PayloadError;
use actix_web::http::{header, StatusCode};
use actix_web::{post, web, HttpRequest, HttpResponse};
use chrono::Utc;
use futures_util::StreamExt;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::app::AppState;
use crate::providers::registry::ConfiguredProvider;
use crate::state::Transition;
use crate::store::{IngestOutcome, WebhookRecord};
use crate::telemetry::{bounded, LogVerdict};
use crate::verify::{InboundRequest, RequestHeaders, VerifyError};

/// Headers never stored with an event: credentials.
const UNSTORED_HEADERS: [&str; 6] = [
    "authorization",
    "cookie",
    "apikey",
    "x-api-key",
    "proxy-authorization",
    "set-cookie",
];

fn json_answer(status: StatusCode, body: serde_json::Value) -> HttpResponse {
    HttpResponse::build(status).json(body)
}

fn rejection(status: StatusCode, message: &str, code: &str) -> HttpResponse {
    json_answer(status, json!({ "error": message, "code": code }))
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

fn stored_headers(headers: &RequestHeaders, provider: &ConfiguredProvider) -> String {
    let token_header = provider
        .settings
        .token_header
        .as_deref()
        .map(str::to_ascii_lowercase);
    let kept: serde_json::Map<String, serde_json::Value> = headers
        .iter()
        .filter(|(name, _)| {
            !UNSTORED_HEADERS.contains(name) && Some(*name) != token_header.as_deref()
        })
        .map(|(name, value)| {
            (
                name.to_string(),
                serde_json::Value::String(value.to_string()),
            )
        })
        .collect();
    serde_json::Value::Object(kept).to_string()
}

/// Receives one provider webhook.
#[post("/webhooks/{provider_id}")]
pub async fn receive(
    request: HttpRequest,
    provider_id: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> HttpResponse {
    let started = Instant::now();
    let Some(provider) = state.providers.get(&provider_id).cloned() else {
        return json_answer(
            StatusCode::NOT_FOUND,
            json!({ "error": "unknown provider", "code": "unknown_provider" }),
        );
    };
    let id = provider.id().to_string();
    state
        .metrics
        .webhooks_received
        .with_label_values(&[&id])
        .inc();
    let answer = handle(&request, payload, &state, &provider).await;
    state
        .metrics
        .webhook_seconds
        .with_label_values(&[&id])
        .observe(started.elapsed().as_secs_f64());
    answer
}

async fn handle(
    request: &HttpRequest,
    payload: web::Payload,
    state: &AppState,
    provider: &ConfiguredProvider,
) -> HttpResponse {
    let id = provider.id();
    let limit = state.settings.server.max_body_bytes;
    let reject = |reason: &'static str, detail: &str| record_rejection(state, id, reason, detail);

    let declared_length = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared_length.is_some_and(|length| length > limit) {
        reject(
            "too_large",
            "declared Content-Length over server.max_body_bytes",
        );
        return rejection(
            StatusCode::PAYLOAD_TOO_LARGE,
            &format!("body larger than {limit} bytes"),
            "too_large",
        );
    }
    let body = match read_bounded(payload, limit).await {
        Ok(Some(body)) => body.freeze(),
        Ok(None) => {
            reject("too_large", "body over server.max_body_bytes");
            return rejection(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("body larger than {limit} bytes"),
                "too_large",
            );
        }
        Err(err) if crate::http::gate::is_deadline(&err) => {
            reject("timeout", "body did not arrive within server.read_timeout");
            return HttpResponse::RequestTimeout()
                .force_close()
                .json(json!({ "error": "the request did not arrive whole within server.read_timeout", "code": "request_timeout" }));
        }
        Err(err) => {
            reject("bad_body", &err.to_string());
            return rejection(
                StatusCode::BAD_REQUEST,
                &format!("cannot read the body: {err}"),
                "bad_body",
            );
        }
    };

    let Some(verifier) = &provider.verifier else {
        reject("no_webhooks", "this provider sends no webhooks");
        return rejection(
            StatusCode::NOT_FOUND,
            "this provider sends no webhooks",
            "no_webhooks",
        );
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
        Err(err) => return reject_unverified(state, provider, &inbound, err),
    };
    state
        .alerting
        .signals
        .webhook_verified(id, received_at.timestamp_millis());

    let body_sha256 = hex::encode(Sha256::digest(&body));
    let dedup_key = verified
        .request_id
        .clone()
        .or_else(|| provider.adapter.body_event_id(&inbound))
        .unwrap_or_else(|| body_sha256.clone());
    // The verified MAC (decoded bytes, never the header text) is the replay nonce: the
    // same signed request again, re-encoded or under a new unsigned request id, is a
    // duplicate. Keyed by the signed timestamp first, so the cache grows in time order.
    let nonce = verifier.has_replay_window().then(|| {
        let signed_at = verified.timestamp.unwrap_or(0).max(0);
        format!(
            "{signed_at:012}:{}",
            hex::encode(Sha256::digest(&verified.replay_key))
        )
    });
    let parsed = provider.parse_webhook(&inbound).map_err(|err| err.0);
    let record = WebhookRecord {
        event_id: uuid::Uuid::now_v7().to_string(),
        provider: id.to_string(),
        dedup_key,
        nonce,
        body_sha256,
        raw_body: body.to_vec(),
        headers_json: stored_headers(&headers, provider),
        secret_index: verified.secret_index,
        received_at,
        parsed,
    };

    let outcome = |name: &str| {
        state
            .metrics
            .webhooks_outcome
            .with_label_values(&[id, name])
            .inc()
    };
    match state.store.ingest_webhook(record).await {
        Ok(IngestOutcome::Accepted { event_id, applied }) => {
            outcome("accepted");
            if matches!(applied.transition, Some(Transition::Conflict { .. })) {
                state.wake_alerts();
            }
            if applied.status_fetch_queued {
                state.request_status_fetch(id);
            }
            json_answer(
                StatusCode::OK,
                json!({ "status": "accepted", "event_id": event_id }),
            )
        }
        Ok(IngestOutcome::Duplicate { event_id }) => {
            outcome("duplicate");
            json_answer(
                StatusCode::OK,
                json!({ "status": "duplicate", "event_id": event_id }),
            )
        }
        Ok(IngestOutcome::Quarantined { event_id, reason }) => {
            outcome("quarantined");
            state.wake_alerts();
            tracing::warn!(provider = id, event_id, reason, "webhook quarantined");
            json_answer(
                StatusCode::ACCEPTED,
                json!({ "status": "quarantined", "event_id": event_id }),
            )
        }
        Ok(IngestOutcome::Replayed) => {
            reject("replayed", "request id already used with a different body");
            if state.alerting.signals.signature_rejected(
                id,
                Utc::now().timestamp_millis(),
                state.settings.alerts.signature_failures_per_minute,
            ) {
                state.wake_alerts();
            }
            rejection(
                StatusCode::UNAUTHORIZED,
                "request id already used with a different body",
                "replayed",
            )
        }
        Err(err) => {
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
            HttpResponse::ServiceUnavailable()
                .insert_header((header::RETRY_AFTER, "1"))
                .json(json!({ "error": "the store cannot commit now; retry", "code": "store_unavailable" }))
        }
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
) -> HttpResponse {
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
            let store = state.store.clone();
            let provider_id = id.to_string();
            let notify = state.status_fetch_notifier();
            tokio::spawn(async move {
                let queued = store
                    .request_status_fetch(
                        provider_id.clone(),
                        provider_ref,
                        crate::ingest::FetchReason::UnverifiedWebhook,
                        10_000,
                        Utc::now(),
                    )
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
    rejection(StatusCode::UNAUTHORIZED, &err.to_string(), err.code())
}
