//! Shared machinery of the provider API clients: a paced, retrying HTTP sender and a bearer-token cache.
//!
//! Every provider gets one [`Sender`]: one `reqwest::Client`, one [`Pacer`] holding its
//! requests to `max_rps`, and one [`RetryPolicy`]. A request is described by a closure
//! that builds it afresh for each attempt, so timestamps, request ids and signatures are
//! never reused. Tokens obtained by a login or OAuth call live in a [`TokenCache`].
//!
//! Nothing here logs a header value, a token or a body.

use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};
use reqwest::{RequestBuilder, Url};
use secrecy::{ExposeSecret, SecretString};
use tokio::time::Instant;

use crate::config::PollSettings;
use crate::metrics::Metrics;
use crate::providers::client::ProviderError;
use crate::store::postgres::PgStore;

/// Largest answer read from a provider; anything longer is a decode error.
pub const MAX_ANSWER_BYTES: usize = 16 * 1024 * 1024;

/// A token is refreshed this long before its stated expiry (at most a tenth of its life).
pub const REFRESH_EARLY: Duration = Duration::from_secs(30);

/// How a [`Sender`] retries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after a timeout, a connection error or a 5xx (so `max_retries + 1` attempts).
    pub max_retries: u32,
    /// Retries after a 429 (counted apart from `max_retries`).
    pub max_throttled_retries: u32,
    /// The first backoff; each further retry doubles it.
    pub backoff_base: Duration,
    /// The longest backoff before jitter.
    pub backoff_cap: Duration,
    /// The wait after a 429 without a usable `Retry-After`.
    pub default_retry_after: Duration,
    /// The longest `Retry-After` honoured.
    pub retry_after_cap: Duration,
}

impl RetryPolicy {
    /// The policy of `[poll]`: `max_retries` for both errors and throttling, backoff from
    /// 100 ms doubling up to 5 s, `Retry-After` capped at 60 s (1 s when absent).
    pub fn from_poll(poll: &PollSettings) -> RetryPolicy {
        RetryPolicy {
            max_retries: poll.max_retries,
            max_throttled_retries: poll.max_retries,
            backoff_base: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(5),
            default_retry_after: Duration::from_secs(1),
            retry_after_cap: Duration::from_secs(60),
        }
    }

    /// The wait before retry number `retry` (1-based): exponential, capped, plus up to
    /// half of it again as random jitter so that callers do not retry in step.
    pub fn backoff(&self, retry: u32) -> Duration {
        let factor = 2u32.saturating_pow(retry.saturating_sub(1));
        let delay = self
            .backoff_base
            .saturating_mul(factor)
            .min(self.backoff_cap);
        let jitter_cap = u64::try_from(delay.as_millis() / 2).unwrap_or(u64::MAX);
        let jitter = if jitter_cap == 0 {
            0
        } else {
            rand::Rng::random_range(&mut rand::rng(), 0..=jitter_cap)
        };
        delay.saturating_add(Duration::from_millis(jitter))
    }

    /// The wait a 429 asks for: `Retry-After` in seconds or as an HTTP date, capped at
    /// `retry_after_cap`; `default_retry_after` when absent or unreadable.
    pub fn retry_after(&self, headers: &HeaderMap) -> Duration {
        let Some(text) = headers.get(RETRY_AFTER).and_then(|v| v.to_str().ok()) else {
            return self.default_retry_after;
        };
        let text = text.trim();
        let wait = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
            text.parse::<u64>()
                .map(Duration::from_secs)
                .unwrap_or(self.retry_after_cap)
        } else if let Ok(date) = chrono::DateTime::parse_from_rfc2822(text) {
            (date.with_timezone(&chrono::Utc) - chrono::Utc::now())
                .to_std()
                .unwrap_or(Duration::ZERO)
        } else {
            self.default_retry_after
        };
        wait.min(self.retry_after_cap)
    }
}

/// Holds a provider's requests to at most `max_rps` per second, evenly spaced: each
/// attempt reserves the next free slot and sleeps until it, so there are no bursts.
/// In-process by default; [`Pacer::across_instances`] reserves the slots in PostgreSQL
/// instead, so `max_rps` holds for every instance together.
#[derive(Debug)]
pub struct Pacer {
    interval: Duration,
    next_free: Mutex<Instant>,
    shared: Option<SharedSlots>,
}

/// Where a pacer shared by several instances reserves its slots.
#[derive(Debug)]
struct SharedSlots {
    store: PgStore,
    provider: String,
}

/// Posts a JSON login body to `url` and returns the answer of a successful login
/// (401, 403 or 400 → [`ProviderError::Unauthorized`]).
pub async fn post_json_login(
    sender: &Sender,
    url: &Url,
    body: Vec<u8>,
) -> Result<Reply, ProviderError> {
    sender
        .send(|http| {
            Ok(http
                .post(url.clone())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(reqwest::header::ACCEPT, "application/json")
                .body(body.clone()))
        })
        .await?
        .require_login_success()
}

/// How much wider than `1 / max_rps` the pacer spaces requests.
pub const PACING_HEADROOM_PERCENT: u32 = 2;

impl Pacer {
    /// A pacer letting through at most `max_rps` requests per second (0 is taken as 1).
    /// Slots are spaced [`PACING_HEADROOM_PERCENT`] wider than `1 / max_rps`: requests
    /// paced exactly at a provider's limit arrive bunched by network jitter and trip its
    /// limiter, and each 429 then costs a whole `Retry-After`.
    pub fn new(max_rps: u32) -> Pacer {
        let exact = Duration::from_secs(1) / max_rps.max(1);
        Pacer {
            interval: exact + exact * PACING_HEADROOM_PERCENT / 100,
            next_free: Mutex::new(Instant::now()),
            shared: None,
        }
    }

    /// The same pacer with its slots reserved in `store`'s `provider` row, shared by every
    /// instance on that database. While the database cannot be reached, requests are
    /// paced in-process (each instance at `max_rps`) and a WARN says so.
    pub fn across_instances(mut self, store: PgStore, provider: &str) -> Pacer {
        self.shared = Some(SharedSlots {
            store,
            provider: provider.to_string(),
        });
        self
    }

    /// The time between two slots.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Reserves the next slot as of `now` and returns when it starts: `now` when the
    /// pacer is idle (idle time is not banked), else one interval after the last slot.
    pub fn reserve_at(&self, now: Instant) -> Instant {
        let mut next_free = self
            .next_free
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let slot = (*next_free).max(now);
        *next_free = slot + self.interval;
        slot
    }

    /// Waits for the next slot.
    pub async fn wait(&self) {
        if let Some(shared) = &self.shared {
            match shared
                .store
                .reserve_request_slot(&shared.provider, self.interval)
                .await
            {
                Ok(wait) => return tokio::time::sleep(wait).await,
                Err(err) => tracing::warn!(
                    provider = %shared.provider,
                    error = %err,
                    "cannot reserve a request slot in the store; pacing this instance alone"
                ),
            }
        }
        tokio::time::sleep_until(self.reserve_at(Instant::now())).await;
    }

    /// Pushes every later slot to `wait` from now at the earliest, on every instance
    /// when the pacer is shared.
    pub async fn defer(&self, wait: Duration) {
        self.defer_at(Instant::now(), wait);
        if let Some(shared) = &self.shared {
            if let Err(err) = shared
                .store
                .defer_request_slots(&shared.provider, wait)
                .await
            {
                tracing::warn!(
                    provider = %shared.provider,
                    error = %err,
                    "cannot defer the shared request slots; deferring this instance alone"
                );
            }
        }
    }

    /// Pushes every later slot to `now + wait` at the earliest (the provider said so).
    pub fn defer_at(&self, now: Instant, wait: Duration) {
        let mut next_free = self
            .next_free
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *next_free = (*next_free).max(now + wait);
    }
}

/// A provider's answer that was not retried: any 2xx, 3xx or 4xx other than 429.
pub struct Reply {
    /// The HTTP status code.
    pub status: u16,
    /// The answer's bytes.
    pub body: Vec<u8>,
}

impl fmt::Debug for Reply {
    // Bodies may carry personal data: show their size only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reply")
            .field("status", &self.status)
            .field("body_bytes", &self.body.len())
            .finish()
    }
}

impl Reply {
    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// Keeps a 2xx answer; 401 and 403 become [`ProviderError::Unauthorized`], any other
    /// status [`ProviderError::Status`].
    pub fn require_success(self) -> Result<Reply, ProviderError> {
        match self.status {
            _ if self.is_success() => Ok(self),
            401 | 403 => Err(ProviderError::Unauthorized(format!(
                "the provider answered HTTP {}",
                self.status
            ))),
            status => Err(ProviderError::Status { status }),
        }
    }

    /// Like [`Reply::require_success`] for a login or token call, where 400 also means
    /// the credentials were refused (OAuth `invalid_client`, `invalid_grant`).
    pub fn require_login_success(self) -> Result<Reply, ProviderError> {
        match self.status {
            _ if self.is_success() => Ok(self),
            400 | 401 | 403 => Err(ProviderError::Unauthorized(format!(
                "login refused with HTTP {}",
                self.status
            ))),
            status => Err(ProviderError::Status { status }),
        }
    }
}

/// What one attempt came to.
enum Attempt {
    Answered(Reply),
    Throttled(Duration),
    ServerError(u16),
    TimedOut,
    ConnectFailed(String),
}

/// One provider's HTTP side: paced, retried, counted in
/// `cashout_recon_provider_requests_total{provider, result}` with result `ok`, `http_3xx`,
/// `http_4xx`, `http_5xx`, `timeout`, `connect` or `throttled` (one count per attempt).
pub struct Sender {
    provider: String,
    http: reqwest::Client,
    pacer: Pacer,
    policy: RetryPolicy,
    metrics: Metrics,
}

impl fmt::Debug for Sender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sender")
            .field("provider", &self.provider)
            .field("pacer", &self.pacer)
            .field("policy", &self.policy)
            .finish()
    }
}

impl Sender {
    /// A sender for provider `provider` (its config id, the metrics label): rustls, no
    /// redirects, each attempt bounded by `poll.request_timeout`, at most `max_rps`
    /// attempts per second, retries per [`RetryPolicy::from_poll`].
    pub fn new(
        provider: &str,
        max_rps: u32,
        poll: &PollSettings,
        metrics: &Metrics,
    ) -> Result<Sender, reqwest::Error> {
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(poll.request_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("cashout-recon/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Sender {
            provider: provider.to_string(),
            http,
            pacer: Pacer::new(max_rps),
            policy: RetryPolicy::from_poll(poll),
            metrics: metrics.clone(),
        })
    }

    /// The same sender with `max_rps` held across every instance on `store` (see
    /// [`Pacer::across_instances`]).
    pub fn pace_across_instances(mut self, store: PgStore) -> Sender {
        self.pacer = self.pacer.across_instances(store, &self.provider);
        self
    }

    /// The same sender with another retry policy.
    pub fn with_policy(mut self, policy: RetryPolicy) -> Sender {
        self.policy = policy;
        self
    }

    /// The provider id this sender counts requests for.
    pub fn provider(&self) -> &str {
        &self.provider
    }

    /// Sends the request `build` makes (called once per attempt), pacing every attempt,
    /// retrying timeouts, connection errors and 5xx with backoff and honouring 429
    /// `Retry-After`. Any other answer, error statuses included, is returned as a
    /// [`Reply`]. Gives up with [`ProviderError::Unreachable`], [`ProviderError::Status`]
    /// or [`ProviderError::RateLimited`] once the policy's retries are spent.
    pub async fn send<F>(&self, mut build: F) -> Result<Reply, ProviderError>
    where
        F: FnMut(&reqwest::Client) -> Result<RequestBuilder, ProviderError>,
    {
        let mut failures = 0u32;
        let mut throttles = 0u32;
        loop {
            self.pacer.wait().await;
            let request = build(&self.http)?.build().map_err(|err| {
                ProviderError::Unreachable(format!(
                    "cannot build the request: {}",
                    error_chain(&err.without_url())
                ))
            })?;
            let error = match self.attempt(request).await? {
                Attempt::Answered(reply) => return Ok(reply),
                Attempt::Throttled(wait) => {
                    throttles += 1;
                    if throttles > self.policy.max_throttled_retries {
                        return Err(ProviderError::RateLimited(wait));
                    }
                    tracing::debug!(
                        provider = %self.provider,
                        wait_ms = wait.as_millis() as u64,
                        "throttled; honouring Retry-After"
                    );
                    self.pacer.defer(wait).await;
                    continue;
                }
                Attempt::ServerError(status) => ProviderError::Status { status },
                Attempt::TimedOut => ProviderError::Unreachable(format!(
                    "no answer within the request timeout (attempt {})",
                    failures + 1
                )),
                Attempt::ConnectFailed(detail) => {
                    ProviderError::Unreachable(format!("{detail} (attempt {})", failures + 1))
                }
            };
            failures += 1;
            if failures > self.policy.max_retries {
                return Err(error);
            }
            let backoff = self.policy.backoff(failures);
            tracing::debug!(
                provider = %self.provider,
                retry = failures,
                backoff_ms = backoff.as_millis() as u64,
                error = %error,
                "retrying"
            );
            tokio::time::sleep(backoff).await;
        }
    }

    /// [`Sender::send`] with a bearer token from `tokens`: on a 401 the token is dropped
    /// and refreshed once (callers racing on the same stale token share one refresh);
    /// a second 401 is [`ProviderError::Unauthorized`].
    pub async fn send_authorized<F>(
        &self,
        tokens: &TokenCache,
        mut build: F,
    ) -> Result<Reply, ProviderError>
    where
        F: FnMut(&reqwest::Client, &SecretString) -> Result<RequestBuilder, ProviderError>,
    {
        let token = tokens.token(self).await?;
        let reply = self.send(|http| build(http, token.secret())).await?;
        if reply.status != 401 {
            return Ok(reply);
        }
        tracing::debug!(provider = %self.provider, "token refused; refreshing it once");
        tokens.invalidate(&token).await;
        let token = tokens.token(self).await?;
        let reply = self.send(|http| build(http, token.secret())).await?;
        if reply.status == 401 {
            tokens.invalidate(&token).await;
            return Err(ProviderError::Unauthorized(
                "the provider refused a freshly issued token (HTTP 401)".to_string(),
            ));
        }
        Ok(reply)
    }

    /// One attempt: `Err` only for what no retry can fix (an answer over the size limit).
    async fn attempt(&self, request: reqwest::Request) -> Result<Attempt, ProviderError> {
        let mut response = match self.http.execute(request).await {
            Ok(response) => response,
            Err(err) => return Ok(self.transport_failure(&err)),
        };
        let status = response.status().as_u16();
        if status == 429 {
            self.count("throttled");
            return Ok(Attempt::Throttled(
                self.policy.retry_after(response.headers()),
            ));
        }
        if status >= 500 {
            self.count("http_5xx");
            return Ok(Attempt::ServerError(status));
        }
        let mut body = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                        self.count(status_label(status));
                        return Err(ProviderError::Decode(format!(
                            "the answer is longer than {MAX_ANSWER_BYTES} bytes"
                        )));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(err) => return Ok(self.transport_failure(&err)),
            }
        }
        self.count(status_label(status));
        Ok(Attempt::Answered(Reply { status, body }))
    }

    fn transport_failure(&self, err: &reqwest::Error) -> Attempt {
        if err.is_timeout() {
            self.count("timeout");
            Attempt::TimedOut
        } else {
            self.count("connect");
            Attempt::ConnectFailed(error_chain(err))
        }
    }

    fn count(&self, result: &str) {
        self.metrics
            .provider_requests
            .with_label_values(&[self.provider.as_str(), result])
            .inc();
    }
}

fn status_label(status: u16) -> &'static str {
    match status {
        200..=299 => "ok",
        300..=399 => "http_3xx",
        500..=599 => "http_5xx",
        _ => "http_4xx",
    }
}

/// An error and its sources on one line. reqwest errors name the URL, never headers or
/// bodies, and no URL built here carries a credential.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A token as a login or OAuth call returned it.
pub struct FreshToken {
    /// The token itself.
    pub value: SecretString,
    /// How long the provider says it is valid; `None` keeps it until a 401.
    pub lifetime: Option<Duration>,
}

/// Obtains a new bearer token (a login or OAuth client-credentials call).
#[async_trait]
pub trait TokenSource: Send + Sync {
    /// Calls the provider for a new token through `sender` (paced and retried like any
    /// request). Refused credentials are [`ProviderError::Unauthorized`].
    async fn fetch(&self, sender: &Sender) -> Result<FreshToken, ProviderError>;
}

/// A token handed out by a [`TokenCache`], remembered by generation so that a 401 drops
/// only the token that was refused.
pub struct IssuedToken {
    value: SecretString,
    generation: u64,
}

impl IssuedToken {
    /// The token, to expose at the moment it goes into a header.
    pub fn secret(&self) -> &SecretString {
        &self.value
    }
}

struct CachedToken {
    value: SecretString,
    /// `None`: valid until the provider refuses it.
    refresh_at: Option<Instant>,
    generation: u64,
}

#[derive(Default)]
struct TokenState {
    current: Option<CachedToken>,
    generation: u64,
}

/// A provider's bearer token: fetched on first use, reused until a little before its
/// expiry (or, without one, until a 401), and fetched by one caller at a time so that
/// concurrent callers share one refresh.
pub struct TokenCache {
    source: Box<dyn TokenSource>,
    state: tokio::sync::Mutex<TokenState>,
}

impl fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenCache { .. }")
    }
}

impl TokenCache {
    /// An empty cache filled from `source`.
    pub fn new(source: impl TokenSource + 'static) -> TokenCache {
        TokenCache {
            source: Box::new(source),
            state: tokio::sync::Mutex::new(TokenState::default()),
        }
    }

    /// The cached token, or a new one when there is none or it is about to expire.
    pub async fn token(&self, sender: &Sender) -> Result<IssuedToken, ProviderError> {
        // The lock is held across the fetch on purpose: callers arriving meanwhile wait
        // for this refresh instead of starting their own.
        let mut state = self.state.lock().await;
        if let Some(cached) = &state.current {
            if cached.refresh_at.is_none_or(|at| Instant::now() < at) {
                return Ok(IssuedToken {
                    value: cached.value.clone(),
                    generation: cached.generation,
                });
            }
        }
        let fresh = self.source.fetch(sender).await?;
        if fresh.value.expose_secret().is_empty() {
            return Err(ProviderError::Decode(
                "the provider issued an empty token".to_string(),
            ));
        }
        state.generation += 1;
        let generation = state.generation;
        state.current = Some(CachedToken {
            value: fresh.value.clone(),
            refresh_at: fresh.lifetime.map(|life| Instant::now() + usable_for(life)),
            generation,
        });
        Ok(IssuedToken {
            value: fresh.value,
            generation,
        })
    }

    /// Drops `token` if it is still the cached one (a newer token stays).
    pub async fn invalidate(&self, token: &IssuedToken) {
        let mut state = self.state.lock().await;
        if state
            .current
            .as_ref()
            .is_some_and(|cached| cached.generation == token.generation)
        {
            state.current = None;
        }
    }
}

/// How long a token valid for `lifetime` is used: its life less [`REFRESH_EARLY`], or
/// less a tenth of its life when that is shorter.
pub fn usable_for(lifetime: Duration) -> Duration {
    lifetime.saturating_sub(REFRESH_EARLY.min(lifetime / 10))
}

/// `base` joined with `path_and_query` (which starts with `/`), keeping any path prefix
/// of `base` (`https://host/api` + `/v1/x` → `https://host/api/v1/x`).
pub fn endpoint(base: &Url, path_and_query: &str) -> Result<Url, ProviderError> {
    let text = format!("{}{path_and_query}", base.as_str().trim_end_matches('/'));
    Url::parse(&text).map_err(|err| {
        ProviderError::Unreachable(format!("cannot build a URL from the base_url: {err}"))
    })
}

/// The path and query of `url` exactly as they go on the request line.
pub fn path_and_query(url: &Url) -> String {
    match url.query() {
        Some(query) => format!("{}?{query}", url.path()),
        None => url.path().to_string(),
    }
}

/// `path` with `query` appended after `?`, or after `&` when `path` already has a query.
pub fn with_query(path: &str, query: &str) -> String {
    let separator = if path.contains('?') { '&' } else { '?' };
    format!("{path}{separator}{query}")
}

/// Everything but the RFC 3986 unreserved characters (`A-Z a-z 0-9 - . _ ~`).
const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes everything but RFC 3986 unreserved characters, for an id placed in a
/// path segment or a query value.
pub fn encode_component(text: &str) -> String {
    utf8_percent_encode(text, COMPONENT).to_string()
}

/// A path template with `{id}` replaced by the encoded `id`; without `{id}`, the id is
/// appended as a last segment. An id breaking the rule of [`crate::ids`] is refused: `..`
/// (even percent-encoded) would make the URL another endpoint of the provider's API.
pub fn fill_id(template: &str, id: &str) -> Result<String, ProviderError> {
    crate::ids::validate_id("provider_ref", id)
        .map_err(|err| ProviderError::InvalidId(err.to_string()))?;
    let encoded = encode_component(id);
    Ok(if template.contains("{id}") {
        template.replace("{id}", &encoded)
    } else {
        format!("{}/{encoded}", template.trim_end_matches('/'))
    })
}

/// A header value made from a secret, marked sensitive so no debug output shows it.
/// `what` names the credential in the error, never its value.
pub fn secret_header(value: &str, what: &str) -> Result<HeaderValue, ProviderError> {
    let mut header = HeaderValue::from_str(value).map_err(|_| {
        ProviderError::Unauthorized(format!("the {what} is not a valid HTTP header value"))
    })?;
    header.set_sensitive(true);
    Ok(header)
}

/// `Authorization: Bearer <token>` as a sensitive header value.
pub fn bearer_header(token: &SecretString) -> Result<HeaderValue, ProviderError> {
    secret_header(&format!("Bearer {}", token.expose_secret()), "bearer token")
}

/// Reads a JSON `expires_in` or similar lifetime given as whole seconds (a number or a
/// string of digits).
pub fn seconds_value(value: &serde_json::Value) -> Option<Duration> {
    match value {
        serde_json::Value::Number(number) => number.as_u64().map(Duration::from_secs),
        serde_json::Value::String(text) => text.trim().parse::<u64>().ok().map(Duration::from_secs),
        _ => None,
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Builders shared by the client tests: settings from TOML, fast retries, timing.

    use std::collections::BTreeMap;
    use std::path::Path;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tokio::time::Instant;
    use wiremock::{Request, Respond, ResponseTemplate};

    use super::{RetryPolicy, Sender};
    use crate::config::{PollSettings, ProviderSettings, Settings};
    use crate::metrics::Metrics;

    /// The one provider of `toml` (a `[[providers]]` entry) with `env` as the environment.
    pub fn provider_settings(toml: &str, env: &[(&str, &str)]) -> ProviderSettings {
        let env: BTreeMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut settings =
            Settings::parse(toml, Path::new(env!("CARGO_MANIFEST_DIR")), &env).unwrap();
        settings.providers.remove(0)
    }

    /// `[poll]` with this timeout and retry budget.
    pub fn poll(request_timeout: Duration, max_retries: u32) -> PollSettings {
        PollSettings {
            overlap: Duration::from_secs(600),
            status_batch: 10,
            initial_lookback: Duration::from_secs(3600),
            request_timeout,
            max_retries,
            unverified_fetches_per_minute: 60,
            recheck_completed_for: Duration::from_secs(3600),
            recheck_completed_every: Duration::from_secs(60),
        }
    }

    /// A sender with millisecond backoff so retry tests stay fast.
    pub fn fast_sender(
        settings: &ProviderSettings,
        poll: &PollSettings,
        metrics: &Metrics,
    ) -> Sender {
        let policy = RetryPolicy {
            backoff_base: Duration::from_millis(5),
            backoff_cap: Duration::from_millis(20),
            ..RetryPolicy::from_poll(poll)
        };
        Sender::new(&settings.id, settings.max_rps, poll, metrics)
            .unwrap()
            .with_policy(policy)
    }

    /// Attempts of `provider` counted with `result`.
    pub fn counted(metrics: &Metrics, provider: &str, result: &str) -> u64 {
        metrics
            .provider_requests
            .with_label_values(&[provider, result])
            .get()
    }

    /// Answers each request with the next template of a script (the last one repeats)
    /// and records when each request arrived.
    #[derive(Clone)]
    pub struct Script {
        templates: Arc<Vec<ResponseTemplate>>,
        arrivals: Arc<Mutex<Vec<Instant>>>,
    }

    impl Script {
        pub fn new(templates: Vec<ResponseTemplate>) -> Script {
            Script {
                templates: Arc::new(templates),
                arrivals: Arc::new(Mutex::new(Vec::new())),
            }
        }

        /// Arrival times so far.
        pub fn arrivals(&self) -> Vec<Instant> {
            self.arrivals.lock().unwrap().clone()
        }
    }

    impl Respond for Script {
        fn respond(&self, _request: &Request) -> ResponseTemplate {
            let mut arrivals = self.arrivals.lock().unwrap();
            arrivals.push(Instant::now());
            let index = (arrivals.len() - 1).min(self.templates.len() - 1);
            self.templates[index].clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    use wiremock::matchers::{header, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    use super::test_support::*;
    use super::*;

    fn sender_for(max_rps: u32, timeout: Duration, retries: u32, metrics: &Metrics) -> Sender {
        let poll = poll(timeout, retries);
        let policy = RetryPolicy {
            backoff_base: Duration::from_millis(5),
            backoff_cap: Duration::from_millis(20),
            ..RetryPolicy::from_poll(&poll)
        };
        Sender::new("p", max_rps, &poll, metrics)
            .unwrap()
            .with_policy(policy)
    }

    #[test]
    fn ten_thousand_slots_at_100_rps_span_just_over_100_seconds_without_bursts() {
        let pacer = Pacer::new(100);
        let start = Instant::now();
        let slots: Vec<Instant> = (0..10_000).map(|_| pacer.reserve_at(start)).collect();
        assert_eq!(slots[0], start);
        // 10 ms plus the 2 % headroom between any two requests: never over the limit.
        for pair in slots.windows(2) {
            assert_eq!(pair[1] - pair[0], Duration::from_micros(10_200));
        }
        assert_eq!(slots[9_999] - start, Duration::from_micros(10_200 * 9_999));
    }

    #[test]
    fn an_idle_pacer_does_not_bank_slots_and_defer_moves_them() {
        let pacer = Pacer::new(10);
        let start = Instant::now();
        let later = start + Duration::from_secs(5);
        let first = pacer.reserve_at(later);
        let second = pacer.reserve_at(later);
        assert_eq!(
            first, later,
            "an idle pacer lets the next request go at once"
        );
        assert_eq!(second - first, Duration::from_millis(102), "but no burst");
        pacer.defer_at(later, Duration::from_secs(3));
        assert_eq!(pacer.reserve_at(later) - later, Duration::from_secs(3));
        pacer.defer_at(later, Duration::from_secs(1));
        assert_eq!(
            pacer.reserve_at(later) - later,
            Duration::from_millis(3102),
            "a shorter deferral does not pull slots forward"
        );
    }

    #[test]
    fn backoff_doubles_is_capped_and_jittered_by_at_most_half() {
        let policy = RetryPolicy::from_poll(&poll(Duration::from_secs(1), 3));
        for (retry, base_ms) in [
            (1, 100),
            (2, 200),
            (3, 400),
            (6, 3200),
            (7, 5000),
            (40, 5000),
        ] {
            for _ in 0..50 {
                let wait = policy.backoff(retry).as_millis();
                assert!(
                    (base_ms..=base_ms + base_ms / 2).contains(&wait),
                    "retry {retry}: {wait} ms"
                );
            }
        }
    }

    #[test]
    fn retry_after_is_read_in_seconds_or_as_a_date_and_capped() {
        let policy = RetryPolicy::from_poll(&poll(Duration::from_secs(1), 3));
        let with = |value: Option<&str>| {
            let mut headers = HeaderMap::new();
            if let Some(value) = value {
                headers.insert(RETRY_AFTER, HeaderValue::from_str(value).unwrap());
            }
            policy.retry_after(&headers)
        };
        let in_ten = (chrono::Utc::now() + chrono::Duration::seconds(10)).to_rfc2822();
        let cases = [
            (None, Duration::from_secs(1), "absent: 1 s"),
            (Some("2"), Duration::from_secs(2), "seconds"),
            (Some("0"), Duration::ZERO, "zero"),
            (Some("3600"), Duration::from_secs(60), "capped at 60 s"),
            (
                Some("99999999999999999999999"),
                Duration::from_secs(60),
                "huge",
            ),
            (Some("soon"), Duration::from_secs(1), "unreadable: 1 s"),
            (
                Some("Wed, 21 Oct 2015 07:28:00 GMT"),
                Duration::ZERO,
                "a past date",
            ),
        ];
        for (value, expected, why) in cases {
            assert_eq!(with(value), expected, "{why}");
        }
        let wait = with(Some(&in_ten));
        assert!(
            wait > Duration::from_secs(8) && wait <= Duration::from_secs(10),
            "{wait:?}"
        );
    }

    #[test]
    fn tokens_are_refreshed_a_little_early() {
        assert_eq!(
            usable_for(Duration::from_secs(3600)),
            Duration::from_secs(3570)
        );
        assert_eq!(usable_for(Duration::from_secs(60)), Duration::from_secs(54));
        assert_eq!(usable_for(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn an_outbound_status_path_never_contains_a_dot_segment() {
        for id in [".", "..", "../admin", "a/b", "a\u{202E}b", ""] {
            assert!(
                matches!(fill_id("/v2/x/{id}", id), Err(ProviderError::InvalidId(_))),
                "{id:?} is refused"
            );
        }
    }

    #[test]
    fn urls_keep_the_base_prefix_and_ids_are_encoded() {
        let base = Url::parse("https://provider.example/api/").unwrap();
        let url = endpoint(&base, "/v1/cashouts?from=1&to=2&page=0").unwrap();
        assert_eq!(
            url.as_str(),
            "https://provider.example/api/v1/cashouts?from=1&to=2&page=0"
        );
        assert_eq!(path_and_query(&url), "/api/v1/cashouts?from=1&to=2&page=0");
        assert_eq!(
            fill_id("/v2/x/{id}", "a b?d#").unwrap(),
            "/v2/x/a%20b%3Fd%23"
        );
        assert_eq!(fill_id("/v2/x/", "tx-1.2_~").unwrap(), "/v2/x/tx-1.2_~");
        assert_eq!(encode_component("é"), "%C3%A9");
        assert_eq!(with_query("/a", "page=1"), "/a?page=1");
        assert_eq!(with_query("/a?v=2", "page=1"), "/a?v=2&page=1");
    }

    #[test]
    fn components_keep_only_unreserved_characters() {
        let text: String = (0u8..0x80).map(char::from).chain("é€😀".chars()).collect();
        let mut expected = String::new();
        for byte in text.bytes() {
            if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
                expected.push(char::from(byte));
            } else {
                expected.push_str(&format!("%{byte:02X}"));
            }
        }
        assert_eq!(encode_component(&text), expected);
    }

    #[test]
    fn a_reply_shows_no_body_and_maps_error_statuses() {
        let reply = Reply {
            status: 200,
            body: b"secret stuff".to_vec(),
        };
        assert_eq!(
            format!("{reply:?}"),
            "Reply { status: 200, body_bytes: 12 }"
        );
        let cases = [
            (401, "Unauthorized"),
            (403, "Unauthorized"),
            (404, "Status"),
            (302, "Status"),
        ];
        for (status, kind) in cases {
            let err = Reply {
                status,
                body: Vec::new(),
            }
            .require_success()
            .unwrap_err();
            assert!(format!("{err:?}").starts_with(kind), "{status}: {err:?}");
        }
        let login = Reply {
            status: 400,
            body: Vec::new(),
        }
        .require_login_success();
        assert!(matches!(login, Err(ProviderError::Unauthorized(_))));
    }

    /// Counts fetches; the n-th token is `t<n>`; each fetch takes 20 ms.
    struct CountingSource(Arc<AtomicU32>, Option<Duration>);

    #[async_trait]
    impl TokenSource for CountingSource {
        async fn fetch(&self, _sender: &Sender) -> Result<FreshToken, ProviderError> {
            let n = self.0.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(FreshToken {
                value: SecretString::from(format!("t{n}")),
                lifetime: self.1,
            })
        }
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_fetch_and_one_refresh() {
        let fetches = Arc::new(AtomicU32::new(0));
        let cache = Arc::new(TokenCache::new(CountingSource(fetches.clone(), None)));
        let sender = Arc::new(sender_for(10, Duration::from_secs(1), 0, &Metrics::new()));
        let mut tasks = Vec::new();
        for _ in 0..10 {
            let (cache, sender) = (cache.clone(), sender.clone());
            tasks.push(tokio::spawn(
                async move { cache.token(&sender).await.unwrap() },
            ));
        }
        let mut issued = Vec::new();
        for task in tasks {
            issued.push(task.await.unwrap());
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        assert!(issued.iter().all(|t| t.secret().expose_secret() == "t1"));
        // Every caller saw t1 refused: only the first invalidation counts.
        for token in &issued {
            cache.invalidate(token).await;
            let next = cache.token(&sender).await.unwrap();
            assert_eq!(next.secret().expose_secret(), "t2");
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_token_is_kept_for_its_lifetime_and_an_expired_one_refetched() {
        let sender = sender_for(10, Duration::from_secs(1), 0, &Metrics::new());
        let fetches = Arc::new(AtomicU32::new(0));
        let cache = TokenCache::new(CountingSource(
            fetches.clone(),
            Some(Duration::from_secs(100)),
        ));
        for _ in 0..3 {
            assert_eq!(
                cache.token(&sender).await.unwrap().secret().expose_secret(),
                "t1"
            );
        }
        let fetches = Arc::new(AtomicU32::new(0));
        let cache = TokenCache::new(CountingSource(fetches.clone(), Some(Duration::ZERO)));
        for expected in ["t1", "t2", "t3"] {
            assert_eq!(
                cache.token(&sender).await.unwrap().secret().expose_secret(),
                expected
            );
        }
    }

    #[tokio::test]
    async fn connection_refused_is_retried_then_unreachable() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        drop(listener);
        let metrics = Metrics::new();
        let sender = sender_for(100, Duration::from_secs(2), 2, &metrics);
        let url = format!("http://{address}/x");
        let result = sender.send(|http| Ok(http.get(&url))).await;
        assert!(
            matches!(result, Err(ProviderError::Unreachable(_))),
            "{result:?}"
        );
        assert_eq!(counted(&metrics, "p", "connect"), 3);
    }

    #[tokio::test]
    async fn each_attempt_is_built_afresh_and_4xx_is_not_retried() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path("/x"))
            .and(header("x-attempt", "1"))
            .respond_with(ResponseTemplate::new(503))
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path("/x"))
            .and(header("x-attempt", "2"))
            .respond_with(ResponseTemplate::new(404))
            .mount(&server)
            .await;
        let metrics = Metrics::new();
        let sender = sender_for(100, Duration::from_secs(2), 3, &metrics);
        let url = format!("{}/x", server.uri());
        let mut attempt = 0;
        let reply = sender
            .send(|http| {
                attempt += 1;
                Ok(http.get(&url).header("x-attempt", attempt.to_string()))
            })
            .await
            .unwrap();
        assert_eq!(reply.status, 404);
        assert_eq!(attempt, 2, "the 404 is an answer, not retried");
        assert_eq!(counted(&metrics, "p", "http_5xx"), 1);
        assert_eq!(counted(&metrics, "p", "http_4xx"), 1);
    }

    #[tokio::test]
    async fn persistent_throttling_ends_as_rate_limited() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "0"))
            .expect(3)
            .mount(&server)
            .await;
        let metrics = Metrics::new();
        let sender = sender_for(100, Duration::from_secs(2), 2, &metrics);
        let url = format!("{}/x", server.uri());
        let result = sender.send(|http| Ok(http.get(&url))).await;
        assert!(
            matches!(result, Err(ProviderError::RateLimited(wait)) if wait.is_zero()),
            "{result:?}"
        );
        assert_eq!(counted(&metrics, "p", "throttled"), 3);
    }
}
