//! Structured logging: JSON lines when stdout is not a terminal, readable text when it is;
//! request spans with bounded fields, and a per-key rate limit for lines strangers cause.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::HttpMessage;
use tracing::Span;
use tracing_actix_web::{RequestId, RootSpanBuilder};
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber; `RUST_LOG` overrides the default `info` level.
pub fn init() {
    init_with_default("info");
}

/// Installs the global subscriber with `default` as the level unless `RUST_LOG` says
/// otherwise (commands whose output is for people, like `demo`, default to `warn`).
pub fn init_with_default(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    // A log sink that fails (a full disk, a closed pipe) drops lines: by default the
    // subscriber reports that with `eprintln!`, which panics when stderr itself fails, and
    // a panic there killed the daemon (SIGABRT) while its store still answered 503s.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    let installed = if std::io::stderr().is_terminal() {
        builder.try_init()
    } else {
        // The current span once, not again in a span list (each field appeared twice).
        builder
            .json()
            .flatten_event(true)
            .with_span_list(false)
            .try_init()
    };
    // A second init (tests, embedded use) keeps the first subscriber.
    let _ = installed;
}

/// The request span of every HTTP request: method, route pattern, request id and status.
/// Nothing a client chose freely (path, query, user agent) is recorded, so a log line
/// inside the span stays small whatever the request.
pub struct BoundedRootSpan;

impl RootSpanBuilder for BoundedRootSpan {
    fn on_request_start(request: &ServiceRequest) -> Span {
        let method = request.method().as_str();
        let method = if method.len() <= 16 { method } else { "other" };
        let route = request
            .match_pattern()
            .unwrap_or_else(|| "unmatched".to_string());
        let request_id = request
            .extensions()
            .get::<RequestId>()
            .map(ToString::to_string)
            .unwrap_or_default();
        tracing::info_span!(
            "request",
            method,
            route = %route,
            request_id = %request_id,
            status = tracing::field::Empty,
        )
    }

    fn on_request_end<B: MessageBody>(
        span: Span,
        outcome: &Result<ServiceResponse<B>, actix_web::Error>,
    ) {
        let status = match outcome {
            Ok(response) => response.status().as_u16(),
            Err(err) => err.as_response_error().status_code().as_u16(),
        };
        span.record("status", status);
    }
}

/// Whether a line of one (provider, reason) may be logged now, and how many were held back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogVerdict {
    /// Log it; `suppressed` lines of this key were dropped since the last one logged.
    Log { suppressed: u64 },
    /// Drop it (counted for the next logged line).
    Suppress,
}

struct KeyWindow {
    last_logged: Instant,
    suppressed: u64,
}

/// Logs the first line of each key, then at most one per `interval`, each carrying the
/// count of lines held back meanwhile. Keys are (provider id, reason code): configured
/// ids and fixed codes, so the map stays small whatever strangers send.
pub struct RateLimitedLog {
    interval: Duration,
    keys: Mutex<HashMap<(String, &'static str), KeyWindow>>,
}

impl Default for RateLimitedLog {
    fn default() -> Self {
        RateLimitedLog::new(Duration::from_secs(1))
    }
}

impl RateLimitedLog {
    /// A limiter allowing one line per key per `interval`.
    pub fn new(interval: Duration) -> RateLimitedLog {
        RateLimitedLog {
            interval,
            keys: Mutex::new(HashMap::new()),
        }
    }

    /// Decides about one line of `(provider, reason)` at `now`.
    pub fn admit(&self, provider: &str, reason: &'static str, now: Instant) -> LogVerdict {
        let Ok(mut keys) = self.keys.lock() else {
            return LogVerdict::Suppress;
        };
        match keys.get_mut(&(provider.to_string(), reason)) {
            None => {
                keys.insert(
                    (provider.to_string(), reason),
                    KeyWindow {
                        last_logged: now,
                        suppressed: 0,
                    },
                );
                LogVerdict::Log { suppressed: 0 }
            }
            Some(window) if now.duration_since(window.last_logged) >= self.interval => {
                let suppressed = std::mem::take(&mut window.suppressed);
                window.last_logged = now;
                LogVerdict::Log { suppressed }
            }
            Some(window) => {
                window.suppressed += 1;
                LogVerdict::Suppress
            }
        }
    }
}

/// `text` cut to `max` characters (a log field that must stay bounded).
pub fn bounded(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((cut, _)) => &text[..cut],
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_rejection_is_logged_then_one_per_second_with_the_suppressed_count() {
        let log = RateLimitedLog::new(Duration::from_secs(1));
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);

        assert_eq!(
            log.admit("fiserv", "bad_signature", at(0)),
            LogVerdict::Log { suppressed: 0 }
        );
        for ms in [1, 10, 500, 999] {
            assert_eq!(
                log.admit("fiserv", "bad_signature", at(ms)),
                LogVerdict::Suppress,
                "{ms} ms"
            );
        }
        // Other keys have their own window.
        assert_eq!(
            log.admit("fiserv", "stale_timestamp", at(5)),
            LogVerdict::Log { suppressed: 0 }
        );
        assert_eq!(
            log.admit("simpay", "bad_signature", at(5)),
            LogVerdict::Log { suppressed: 0 }
        );

        assert_eq!(
            log.admit("fiserv", "bad_signature", at(1000)),
            LogVerdict::Log { suppressed: 4 }
        );
        assert_eq!(
            log.admit("fiserv", "bad_signature", at(1001)),
            LogVerdict::Suppress
        );
        assert_eq!(
            log.admit("fiserv", "bad_signature", at(5000)),
            LogVerdict::Log { suppressed: 1 }
        );
    }

    #[test]
    fn ten_thousand_rejections_in_a_second_log_one_line() {
        let log = RateLimitedLog::new(Duration::from_secs(1));
        let start = Instant::now();
        let logged = (0..10_000u64)
            .filter(|n| {
                let at = start + Duration::from_micros(n * 99);
                matches!(
                    log.admit("fiserv", "bad_signature", at),
                    LogVerdict::Log { .. }
                )
            })
            .count();
        assert_eq!(logged, 1);
    }

    #[test]
    fn bounded_cuts_on_a_character_boundary() {
        assert_eq!(bounded("ação", 2), "aç");
        assert_eq!(bounded("ab", 5), "ab");
    }
}
