//! Delivery of alert notices to `alerts.webhook_url` through the persisted outbox: a
//! dedicated task with its own HTTP client and a per-request timeout, Standard Webhooks
//! signatures (`webhook-id` fixed per delivery, so every retry carries the same one),
//! exponential backoff with jitter on errors, timeouts and 5xx, `Retry-After` on 429.
//! A slow or dead receiver only delays this task: webhooks and polling never wait on it.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rand::Rng;
use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::store::{OutboxItem, OutboxNext, Store};
use crate::verify::standard_webhooks;

/// How deliveries are retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Timeout of one POST.
    pub timeout: Duration,
    /// The first retry waits about this long; each later one twice as long...
    pub base: Duration,
    /// ...up to this.
    pub cap: Duration,
    /// A delivery is given up (and counted failed) after this many attempts.
    pub max_attempts: u32,
}

impl RetryPolicy {
    /// The policy of the daemon: 1 s doubling to 10 min, 30 attempts (about 3 hours).
    pub fn new(timeout: Duration) -> RetryPolicy {
        RetryPolicy {
            timeout,
            base: Duration::from_secs(1),
            cap: Duration::from_secs(600),
            max_attempts: 30,
        }
    }
}

/// What the receiver did with one attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// It answered with this status (and `Retry-After`, when it sent one).
    Status {
        code: u16,
        retry_after: Option<Duration>,
    },
    /// No answer: connection refused, reset, or timed out.
    Failed(String),
}

/// What to do after an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    RetryAfter(Duration),
    GiveUp,
}

/// The wait before retry number `attempt` (1 = the first retry): exponential, capped,
/// scaled by `jitter` in [0, 1) into [½, 1) of it so retries of many deliveries spread.
pub fn backoff(attempt: u32, policy: &RetryPolicy, jitter: f64) -> Duration {
    let exponent = attempt.saturating_sub(1).min(30);
    let full = policy.base.saturating_mul(1u32 << exponent).min(policy.cap);
    full.mul_f64(0.5 + jitter.clamp(0.0, 1.0) / 2.0)
}

/// Judges attempt number `attempts` (1 = the first) from its answer.
pub fn judge(answer: &Answer, attempts: u32, policy: &RetryPolicy, jitter: f64) -> Verdict {
    let retry = |hint: Option<Duration>| {
        if attempts >= policy.max_attempts {
            Verdict::GiveUp
        } else {
            Verdict::RetryAfter(
                hint.map(|wait| wait.min(Duration::from_secs(3600)))
                    .unwrap_or_else(|| backoff(attempts, policy, jitter)),
            )
        }
    };
    match answer {
        Answer::Status { code, .. } if (200..300).contains(code) => Verdict::Delivered,
        Answer::Status {
            code: 429 | 503,
            retry_after,
        } => retry(*retry_after),
        Answer::Status { code, .. } if *code >= 500 || *code == 408 => retry(None),
        // Any other answer (a 4xx: wrong URL, revoked hook) will not change by itself.
        Answer::Status { .. } => Verdict::GiveUp,
        Answer::Failed(_) => retry(None),
    }
}

/// `Retry-After` as seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = DateTime::parse_from_rfc2822(value)
        .ok()?
        .with_timezone(&Utc);
    Some((at - now).to_std().unwrap_or(Duration::ZERO))
}

/// Where and how notices are POSTed.
#[derive(Clone)]
pub struct Sink {
    pub url: Url,
    pub secret: SecretString,
    pub policy: RetryPolicy,
}

impl Sink {
    /// The sink of `[alerts]`, when `webhook_url` is set (config validation guarantees
    /// the secret then).
    pub fn from_settings(settings: &crate::config::AlertSettings) -> Option<Sink> {
        Some(Sink {
            url: settings.webhook_url.clone()?,
            secret: settings.signing_secret.clone()?,
            policy: RetryPolicy::new(settings.delivery_timeout),
        })
    }
}

/// The Standard Webhooks headers of one delivery: `webhook-id`, `webhook-timestamp`
/// and `webhook-signature: v1,<base64 HMAC-SHA256(key, id.timestamp.body)>`, the key
/// being the base64-decoded secret after `whsec_`.
pub fn signature_headers(
    secret: &str,
    webhook_id: &str,
    timestamp: i64,
    body: &[u8],
) -> Result<[(&'static str, String); 3], String> {
    let signature = standard_webhooks::sign(secret, webhook_id, timestamp, body)
        .map_err(|err| format!("cannot sign: {err}"))?;
    Ok([
        ("webhook-id", webhook_id.to_string()),
        ("webhook-timestamp", timestamp.to_string()),
        ("webhook-signature", signature),
    ])
}

/// POSTs one outbox item, signed at send time with its fixed `webhook-id`.
pub async fn attempt(client: &reqwest::Client, sink: &Sink, item: &OutboxItem) -> Answer {
    let headers = match signature_headers(
        sink.secret.expose_secret(),
        &item.webhook_id,
        Utc::now().timestamp(),
        item.body.as_bytes(),
    ) {
        Ok(headers) => headers,
        Err(err) => return Answer::Failed(err),
    };
    let mut request = client
        .post(sink.url.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json");
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let sent = request.body(item.body.clone()).send().await;
    match sent {
        Ok(response) => Answer::Status {
            code: response.status().as_u16(),
            retry_after: response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, Utc::now())),
        },
        Err(err) if err.is_timeout() => Answer::Failed(format!(
            "no answer within {} s",
            sink.policy.timeout.as_secs_f64()
        )),
        Err(err) => Answer::Failed(without_url(&err)),
    }
}

/// A reqwest error without its URL (Slack and PagerDuty URLs carry credentials).
fn without_url(err: &reqwest::Error) -> String {
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(err);
    let mut text = if err.is_connect() {
        "cannot connect".to_string()
    } else {
        "request failed".to_string()
    };
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// How often the worker looks for due retries when nothing woke it.
const OUTBOX_TICK: Duration = Duration::from_millis(500);
/// Items claimed at once.
const CLAIM_BATCH: usize = 16;

/// Delivers the outbox until cancelled: due items oldest first, one at a time (a
/// resolution never overtakes its firing notice), each attempt bounded by the timeout.
pub async fn run_outbox(
    store: Store,
    metrics: Metrics,
    sink: Sink,
    waker: Arc<Notify>,
    cancel: CancellationToken,
) {
    let client = match reqwest::Client::builder()
        .timeout(sink.policy.timeout)
        .connect_timeout(sink.policy.timeout)
        .user_agent(concat!("cashout-recon/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(client) => client,
        Err(err) => {
            tracing::error!(error = %err, "alert delivery: cannot build the HTTP client; alerts go to the log only");
            return;
        }
    };
    let lease = sink.policy.timeout + Duration::from_secs(30);
    loop {
        loop {
            let claimed = store
                .claim_alert_deliveries(Utc::now(), lease, CLAIM_BATCH)
                .await;
            let items = match claimed {
                Ok(items) => items,
                Err(err) => {
                    tracing::warn!(error = %err, "alert delivery: cannot read the outbox");
                    break;
                }
            };
            if items.is_empty() {
                break;
            }
            for item in items {
                let started = std::time::Instant::now();
                let answer = tokio::select! {
                    _ = cancel.cancelled() => return,
                    answer = attempt(&client, &sink, &item) => answer,
                };
                let attempts = item.attempts + 1;
                let jitter = rand::rng().random::<f64>();
                let verdict = judge(&answer, attempts, &sink.policy, jitter);
                record(&store, &metrics, &item, &answer, verdict, started.elapsed()).await;
            }
        }
        if let Ok((pending, failed)) = store.alert_outbox_counts().await {
            metrics.alert_outbox_pending.set(pending);
            metrics.alert_outbox_failed.set(failed);
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = waker.notified() => {}
            _ = tokio::time::sleep(OUTBOX_TICK) => {}
        }
    }
}

async fn record(
    store: &Store,
    metrics: &Metrics,
    item: &OutboxItem,
    answer: &Answer,
    verdict: Verdict,
    took: Duration,
) {
    let now = Utc::now();
    let (status, error) = match answer {
        Answer::Status { code, .. } => (Some(*code), None),
        Answer::Failed(error) => (None, Some(error.clone())),
    };
    let next = match verdict {
        Verdict::Delivered => OutboxNext::Delivered,
        Verdict::RetryAfter(wait) => OutboxNext::RetryAt(
            now + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::seconds(60)),
        ),
        Verdict::GiveUp => OutboxNext::GaveUp,
    };
    let result = match verdict {
        Verdict::Delivered => "delivered",
        Verdict::RetryAfter(_) => "failed",
        Verdict::GiveUp => "gave_up",
    };
    metrics.alert_deliveries.with_label_values(&[result]).inc();
    let describe = match (&status, &error) {
        (Some(code), _) => format!("HTTP {code}"),
        (None, Some(error)) => error.clone(),
        (None, None) => String::new(),
    };
    match verdict {
        Verdict::Delivered => tracing::info!(
            alert_id = item.alert_id,
            webhook_id = %item.webhook_id,
            attempt = item.attempts + 1,
            "alert delivered"
        ),
        Verdict::RetryAfter(wait) => tracing::warn!(
            alert_id = item.alert_id,
            webhook_id = %item.webhook_id,
            attempt = item.attempts + 1,
            answer = %describe,
            retry_in_ms = wait.as_millis() as u64,
            "alert delivery failed; will retry"
        ),
        Verdict::GiveUp => tracing::error!(
            alert_id = item.alert_id,
            webhook_id = %item.webhook_id,
            attempt = item.attempts + 1,
            answer = %describe,
            "alert delivery given up"
        ),
    }
    let took_ms = i64::try_from(took.as_millis()).unwrap_or(i64::MAX);
    if let Err(err) = store
        .record_alert_delivery(item.id, now, status, error, took_ms, next)
        .await
    {
        tracing::warn!(error = %err, outbox_id = item.id, "alert delivery: cannot record the attempt");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RetryPolicy = RetryPolicy {
        timeout: Duration::from_secs(10),
        base: Duration::from_secs(1),
        cap: Duration::from_secs(600),
        max_attempts: 5,
    };

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter_in_its_upper_half() {
        for (attempt, full) in [(1, 1), (2, 2), (3, 4), (10, 512), (11, 600), (40, 600)] {
            let full = Duration::from_secs(full);
            assert_eq!(
                backoff(attempt, &POLICY, 0.0),
                full / 2,
                "attempt {attempt}"
            );
            let most = backoff(attempt, &POLICY, 0.999);
            assert!(
                most < full && most > full * 9 / 10,
                "attempt {attempt}: {most:?}"
            );
        }
    }

    #[test]
    fn answers_are_judged_as_spec_7_says() {
        let status = |code: u16, retry_after: Option<u64>| Answer::Status {
            code,
            retry_after: retry_after.map(Duration::from_secs),
        };
        let table = [
            (status(200, None), 1, Verdict::Delivered, "2xx delivers"),
            (status(204, None), 3, Verdict::Delivered, "any 2xx"),
            (
                status(500, None),
                1,
                Verdict::RetryAfter(Duration::from_millis(500)),
                "5xx retries with backoff",
            ),
            (
                Answer::Failed("timeout".into()),
                2,
                Verdict::RetryAfter(Duration::from_secs(1)),
                "no answer retries",
            ),
            (
                status(429, Some(7)),
                1,
                Verdict::RetryAfter(Duration::from_secs(7)),
                "429 honours Retry-After",
            ),
            (
                status(429, None),
                1,
                Verdict::RetryAfter(Duration::from_millis(500)),
                "429 without it backs off",
            ),
            (status(404, None), 1, Verdict::GiveUp, "4xx will not heal"),
            (status(502, None), 5, Verdict::GiveUp, "attempts exhausted"),
        ];
        for (answer, attempts, verdict, case) in table {
            assert_eq!(judge(&answer, attempts, &POLICY, 0.0), verdict, "{case}");
        }
    }

    #[test]
    fn deliveries_are_signed_as_spec_4_6_s_test_vector() {
        let headers = signature_headers(
            "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            1_649_367_553,
            br#"{"email":"test@example.com","username":"test_user"}"#,
        )
        .unwrap();
        assert_eq!(
            headers,
            [
                ("webhook-id", "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk".to_string()),
                ("webhook-timestamp", "1649367553".to_string()),
                (
                    "webhook-signature",
                    "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=".to_string()
                ),
            ]
        );
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = DateTime::parse_from_rfc3339("2026-11-30T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            parse_retry_after("Mon, 30 Nov 2026 10:00:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
