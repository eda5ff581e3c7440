//! Mannco.store cash-outs to Payoneer/Tipalti (SPEC §4.4): no webhooks, history items in USD cents.

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use reqwest::header::{ACCEPT, AUTHORIZATION};
use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::client::{ProviderClient, ProviderError, SearchPage, SearchWindow};
use super::outbound::{
    bearer_header, endpoint, post_json_login, with_query, FreshToken, Sender, TokenCache,
    TokenSource,
};
use super::spec::{KindContext, KindSettings, KindSpec};
use super::{
    amount_text, id_text, in_field, parse_json_timestamp, Observation, ObservationPage, ParseError,
    ProviderAdapter, ProviderKind,
};
use crate::config::{ConfigError, NamedSecret, ProviderSettings};
use crate::money::{Currency, Money};
use crate::state::{CashoutStatus, StatusUpdate};
use crate::verify::InboundRequest;
use crate::verify::Verifier;

/// The `mannco` provider kind: it notifies by email only, so it is polled.
pub struct Mannco;

impl ProviderAdapter for Mannco {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Mannco
    }

    fn sends_webhooks(&self) -> bool {
        false
    }

    fn parse_webhook(&self, _request: &InboundRequest<'_>) -> Result<Observation, ParseError> {
        Err(ParseError("mannco sends no webhooks".to_string()))
    }

    fn peek_provider_ref(&self, _request: &InboundRequest<'_>) -> Option<String> {
        None
    }
}

/// The envelope of every Mannco answer: `{"err","success","content"}`, with a `message`
/// when it failed.
#[derive(Debug, Deserialize)]
struct Envelope {
    err: Option<bool>,
    success: Option<bool>,
    message: Option<String>,
    content: Option<HistoryContent>,
}

/// The content of `GET /cashout/history?page=` (SPEC §4.4, *proposal*); items stay raw so
/// that one malformed item is reported on its own.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct HistoryContent {
    items: Vec<Box<RawValue>>,
    page: u64,
    total_pages: u64,
}

/// One cash-out of the history. `netAmount` and `method` feed the fee check (SPEC §4.4).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct HistoryItem {
    cashout_id: Box<RawValue>,
    amount: Box<RawValue>,
    fee: Option<Box<RawValue>>,
    net_amount: Option<Box<RawValue>>,
    method: Option<String>,
    status: String,
    created_at: Option<Box<RawValue>>,
    updated_at: Option<Box<RawValue>>,
}

/// Mannco's cash-out statuses (seed 004).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ManncoStatus {
    Pending,
    Processing,
    Completed,
    /// Failed, the balance refunded to the user.
    Failed,
}

impl ManncoStatus {
    fn from_name(name: &str) -> Result<ManncoStatus, ParseError> {
        match name.to_ascii_lowercase().as_str() {
            "pending" => Ok(ManncoStatus::Pending),
            "processing" => Ok(ManncoStatus::Processing),
            "completed" => Ok(ManncoStatus::Completed),
            "failed" => Ok(ManncoStatus::Failed),
            _ => Err(ParseError(
                "status: not pending, processing, completed or failed".to_string(),
            )),
        }
    }

    fn status_update(self) -> StatusUpdate {
        StatusUpdate::to(match self {
            ManncoStatus::Pending => CashoutStatus::Pending,
            ManncoStatus::Processing => CashoutStatus::Processing,
            ManncoStatus::Completed => CashoutStatus::Completed,
            ManncoStatus::Failed => CashoutStatus::Failed,
        })
    }
}

/// Maps a Mannco status name (pending, processing, completed, failed; case-insensitive)
/// to the canonical state of the same name; any other name is an error.
pub fn map_status(status: &str) -> Result<StatusUpdate, ParseError> {
    ManncoStatus::from_name(status).map(ManncoStatus::status_update)
}

/// Parses one history item from its JSON bytes: amounts are whole cents (a number or a
/// string of digits), `createdAt`/`updatedAt` RFC 3339 text or unix seconds.
pub fn observation_from_history_item(item_json: &[u8]) -> Result<Observation, ParseError> {
    let item: HistoryItem = serde_json::from_slice(item_json)?;
    let currency = Currency::from_code("USD")?;
    let fee_minor = match item.fee.as_deref() {
        Some(fee) => Some(whole_cents(fee).map_err(in_field("fee"))?),
        None => None,
    };
    let net_minor = match item.net_amount.as_deref() {
        Some(net) if net.get().trim() != "null" => {
            Some(whole_cents(net).map_err(in_field("netAmount"))?)
        }
        _ => None,
    };
    Ok(Observation {
        provider_ref: id_text(&item.cashout_id).map_err(in_field("cashoutId"))?,
        external_id: None,
        status: Some(map_status(&item.status)?),
        raw_status: Some(item.status),
        reason_code: None,
        amount: Some(Money {
            minor: whole_cents(&item.amount).map_err(in_field("amount"))?,
            currency,
        }),
        fee_minor,
        method: item.method.filter(|m| !m.is_empty()),
        net_minor,
        created_at: item
            .created_at
            .as_deref()
            .map(parse_json_timestamp)
            .transpose()
            .map_err(in_field("createdAt"))?,
        updated_at: item
            .updated_at
            .as_deref()
            .map(parse_json_timestamp)
            .transpose()
            .map_err(in_field("updatedAt"))?,
    })
}

/// Parses one page of the history answer; the last page is the one whose `page` reaches
/// `totalPages` (pages count from 1). An answer with `err: true` or `success: false` is an
/// error carrying Mannco's message.
pub fn parse_history_page(body: &[u8]) -> Result<ObservationPage, ParseError> {
    let envelope: Envelope = serde_json::from_slice(body)?;
    let failed = envelope.err == Some(true) || envelope.success == Some(false);
    let content = match envelope.content {
        Some(content) if !failed => content,
        _ => {
            let message = envelope.message.unwrap_or_default();
            return Err(ParseError(format!(
                "mannco answered an error: {}",
                super::excerpt(&message)
            )));
        }
    };
    let items = content
        .items
        .iter()
        .map(|item| observation_from_history_item(item.get().as_bytes()))
        .collect();
    Ok(ObservationPage {
        items,
        is_last: content.page >= content.total_pages,
    })
}

/// Reads an amount in whole cents, exactly: digits only, no fraction, no sign.
fn whole_cents(raw: &RawValue) -> Result<i64, ParseError> {
    let text = amount_text(raw)?;
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ParseError("not a whole number of cents".to_string()));
    }
    text.parse::<i64>()
        .map_err(|_| ParseError("too many cents".to_string()))
}

/// The login path of SPEC §4.4 (`login_path` overrides it).
pub const LOGIN_PATH: &str = "/user/login";
/// The history path of SPEC §4.4 (`search_path` overrides it).
pub const HISTORY_PATH: &str = "/cashout/history";

/// Longest provider message quoted in an error.
const MAX_MESSAGE_CHARS: usize = 200;

/// The Mannco API (SPEC §4.4): the cash-out history, newest first, behind a JWT from
/// `POST /user/login`. There is no status endpoint.
pub struct ManncoClient {
    sender: Sender,
    base_url: Url,
    history_path: String,
    tokens: TokenCache,
}

impl ManncoClient {
    /// The client of `settings`; `None` without the API key.
    pub fn new(settings: &ProviderSettings, sender: Sender) -> Option<ManncoClient> {
        let login = ApiKeyLogin {
            url: endpoint(
                &settings.base_url,
                settings.login_path.as_deref().unwrap_or(LOGIN_PATH),
            )
            .ok()?,
            api_key: settings
                .kind_settings::<ManncoSettings>()?
                .api_key
                .as_ref()?
                .value
                .clone(),
        };
        Some(ManncoClient {
            sender,
            base_url: settings.base_url.clone(),
            history_path: settings
                .search_path
                .clone()
                .unwrap_or_else(|| HISTORY_PATH.to_string()),
            tokens: TokenCache::new(login),
        })
    }
}

/// `POST /user/login {"apiKey"}` → `{"err":false,"success":true,"content":{"token"}}`.
struct ApiKeyLogin {
    url: Url,
    api_key: SecretString,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LoginRequest<'a> {
    api_key: &'a str,
}

#[derive(Deserialize)]
struct LoginEnvelope {
    err: Option<bool>,
    success: Option<bool>,
    message: Option<String>,
    content: Option<LoginContent>,
}

#[derive(Deserialize)]
struct LoginContent {
    token: String,
}

#[async_trait]
impl TokenSource for ApiKeyLogin {
    async fn fetch(&self, sender: &Sender) -> Result<FreshToken, ProviderError> {
        let body = serde_json::to_vec(&LoginRequest {
            api_key: self.api_key.expose_secret(),
        })
        .map_err(|_| ProviderError::Unauthorized("cannot encode the login".to_string()))?;
        let reply = post_json_login(sender, &self.url, body).await?;
        // The serde message could quote the token: say only what was expected.
        let envelope: LoginEnvelope = serde_json::from_slice(&reply.body).map_err(|_| {
            ProviderError::Decode(
                "the login answer is not {err, success, content: {token}}".to_string(),
            )
        })?;
        let refused = envelope.err == Some(true) || envelope.success == Some(false);
        match envelope.content {
            Some(content) if !refused => {
                let lifetime = jwt_lifetime(&content.token, Utc::now().timestamp());
                Ok(FreshToken {
                    value: SecretString::from(content.token),
                    lifetime,
                })
            }
            _ => {
                let message: String = envelope
                    .message
                    .unwrap_or_default()
                    .chars()
                    .take(MAX_MESSAGE_CHARS)
                    .collect();
                Err(ProviderError::Unauthorized(format!(
                    "login refused: {message:?}"
                )))
            }
        }
    }
}

/// The claims read from the login JWT (unverified: it only schedules the refresh).
#[derive(Deserialize)]
struct JwtClaims {
    exp: Option<i64>,
}

/// How long the JWT `token` has left by its `exp` claim, read without verifying it;
/// `None` when it has no readable `exp` or `exp` is already past (then the token is kept
/// until a 401, rather than trusting a clock that disagrees with Mannco's).
pub fn jwt_lifetime(token: &str, now_unix: i64) -> Option<Duration> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: JwtClaims = serde_json::from_slice(&bytes).ok()?;
    let left = claims.exp?.checked_sub(now_unix)?;
    u64::try_from(left)
        .ok()
        .filter(|secs| *secs > 0)
        .map(Duration::from_secs)
}

/// Whether a newest-first history page lies wholly before `from`: at least one item
/// could be read and every readable item changed (else was created) before `from`.
fn is_before(items: &[Result<Observation, ParseError>], from: DateTime<Utc>) -> bool {
    let mut readable = items
        .iter()
        .filter_map(|item| item.as_ref().ok())
        .peekable();
    readable.peek().is_some()
        && readable.all(|item| {
            item.updated_at
                .or(item.created_at)
                .is_some_and(|at| at < from)
        })
}

#[async_trait]
impl ProviderClient for ManncoClient {
    fn first_page(&self) -> u32 {
        1
    }

    fn can_search(&self) -> bool {
        true
    }

    /// One page of the history. It is not filtered by time, so a page may also hold
    /// cash-outs changed outside `window`; the walk stops at the last page or at the
    /// first page wholly before `window.from`.
    async fn search_page(
        &self,
        window: SearchWindow,
        page: u32,
    ) -> Result<SearchPage, ProviderError> {
        let url = endpoint(
            &self.base_url,
            &with_query(&self.history_path, &format!("page={page}")),
        )?;
        let reply = self
            .sender
            .send_authorized(&self.tokens, |http, token| {
                Ok(http
                    .get(url.clone())
                    .header(ACCEPT, "application/json")
                    .header(AUTHORIZATION, bearer_header(token)?))
            })
            .await?
            .require_success()?;
        let parsed = parse_history_page(&reply.body)?;
        let next_page = if parsed.is_last || is_before(&parsed.items, window.from) {
            None
        } else {
            page.checked_add(1)
        };
        Ok(SearchPage {
            items: parsed.items,
            next_page,
        })
    }

    fn can_fetch_status(&self) -> bool {
        false
    }

    async fn fetch_status(&self, _provider_ref: &str) -> Result<Observation, ProviderError> {
        Err(ProviderError::NotSupported("status"))
    }
}

// ---- The kind's entry: config keys, settings, client ----

impl KindSpec for Mannco {
    fn adapter(&self) -> &'static dyn ProviderAdapter {
        &Mannco
    }

    fn id_fields(&self) -> (&'static str, &'static str) {
        ("cashoutId", "external_id")
    }

    fn config_keys(&self) -> &'static [&'static str] {
        &["api_key_env"]
    }

    fn path_overrides(&self) -> &'static [&'static str] {
        &["login_path", "search_path"]
    }

    fn reports_fees(&self) -> bool {
        true
    }

    fn settings(
        &self,
        keys: toml::Table,
        cx: &mut KindContext<'_>,
    ) -> Result<Arc<dyn KindSettings>, ConfigError> {
        let keys: ManncoKeys = cx.parse(keys)?;
        Ok(Arc::new(ManncoSettings {
            api_key: cx.secret(&keys.api_key_env),
        }))
    }

    /// Mannco's published schedule (SPEC §4.4).
    fn default_fees(&self) -> &'static [(&'static str, &'static str)] {
        &[("payoneer", "2%"), ("tipalti", "1.5%")]
    }

    fn build_client(
        &self,
        settings: &ProviderSettings,
        sender: Sender,
    ) -> Option<Arc<dyn ProviderClient>> {
        Some(Arc::new(ManncoClient::new(settings, sender)?))
    }

    fn simulator(&self) -> Option<&'static dyn crate::sim::KindSim> {
        Some(&crate::sim::mannco::ManncoSim)
    }
}

/// The `mannco` keys of a `[[providers]]` entry (SPEC §8).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ManncoKeys {
    api_key_env: Option<String>,
}

/// A `mannco` provider's own settings.
#[derive(Debug, Clone)]
pub struct ManncoSettings {
    pub api_key: Option<NamedSecret>,
}

impl KindSettings for ManncoSettings {
    fn as_any(&self) -> &dyn Any {
        self
    }

    /// Mannco sends no webhooks.
    fn default_verifier(
        &self,
        _secrets: &[SecretString],
        _tolerance_secs: u64,
    ) -> Result<Option<Verifier>, String> {
        Ok(None)
    }

    fn credentials(&self) -> Vec<(&'static str, Option<&NamedSecret>)> {
        vec![("api key", self.api_key.as_ref())]
    }

    fn missing_outbound_credentials(&self, _provider: &ProviderSettings) -> Option<&'static str> {
        self.api_key.is_none().then_some("api_key_env")
    }

    fn endpoints(&self, provider: &ProviderSettings) -> Vec<String> {
        let base = provider.base_text();
        vec![
            format!(
                "login POST {base}{}",
                provider.login_path.as_deref().unwrap_or(LOGIN_PATH)
            ),
            format!(
                "history GET {base}{}",
                provider.search_path.as_deref().unwrap_or(HISTORY_PATH)
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::parse_rfc3339;
    use crate::verify::RequestHeaders;

    const HISTORY_PAGE: &[u8] = include_bytes!("../../fixtures/responses/mannco/history_page.json");

    fn usd(minor: i64) -> Option<Money> {
        Some(Money {
            minor,
            currency: Currency::from_code("USD").unwrap(),
        })
    }

    fn at(text: &str) -> Option<chrono::DateTime<chrono::Utc>> {
        Some(parse_rfc3339(text).unwrap())
    }

    fn item_with(amount: &str, status: &str) -> String {
        format!(
            r#"{{"cashoutId":1,"amount":{amount},"fee":20,"netAmount":0,"method":"payoneer","status":"{status}","createdAt":null,"updatedAt":null}}"#
        )
    }

    #[test]
    fn mannco_sends_no_webhooks() {
        let headers = RequestHeaders::new();
        let request = InboundRequest {
            path: "/webhooks/mannco",
            headers: &headers,
            body: b"{\"cashoutId\":4567}",
        };
        assert!(!Mannco.sends_webhooks());
        assert_eq!(
            Mannco.parse_webhook(&request),
            Err(ParseError("mannco sends no webhooks".to_string()))
        );
        assert_eq!(Mannco.peek_provider_ref(&request), None);
    }

    #[test]
    fn history_page_maps_each_item() {
        let page = parse_history_page(HISTORY_PAGE).unwrap();
        assert!(!page.is_last, "page 1 of 3");
        let items: Vec<Observation> = page.items.into_iter().map(Result::unwrap).collect();
        assert_eq!(
            items[0],
            Observation {
                provider_ref: "4567".to_string(),
                external_id: None,
                status: Some(StatusUpdate::to(CashoutStatus::Completed)),
                raw_status: Some("completed".to_string()),
                reason_code: None,
                amount: usd(100_000),
                fee_minor: Some(2000),
                method: Some("payoneer".to_string()),
                net_minor: Some(98000),
                created_at: at("2026-11-18T09:12:44Z"),
                updated_at: at("2026-11-20T10:00:00Z"),
            }
        );
        assert_eq!(
            items[1],
            Observation {
                provider_ref: "4602".to_string(),
                external_id: None,
                status: Some(StatusUpdate::to(CashoutStatus::Processing)),
                raw_status: Some("processing".to_string()),
                reason_code: None,
                amount: usd(5000),
                fee_minor: Some(75),
                method: Some("tipalti".to_string()),
                net_minor: Some(4925),
                created_at: at("2026-11-20T12:00:00Z"),
                updated_at: at("2026-11-20T13:00:00Z"),
            }
        );
        assert_eq!(
            items[2].status,
            Some(StatusUpdate::to(CashoutStatus::Failed))
        );
        assert_eq!(items[2].amount, usd(12_345));
    }

    #[test]
    fn every_status_maps_by_name() {
        let cases = [
            ("pending", CashoutStatus::Pending),
            ("processing", CashoutStatus::Processing),
            ("completed", CashoutStatus::Completed),
            ("failed", CashoutStatus::Failed),
            ("Completed", CashoutStatus::Completed),
        ];
        for (name, status) in cases {
            assert_eq!(map_status(name), Ok(StatusUpdate::to(status)), "{name}");
        }
        for name in ["cancelled", "refunded", ""] {
            assert!(map_status(name).is_err(), "{name:?}");
        }
    }

    #[test]
    fn amounts_are_whole_cents() {
        for (amount, minor) in [("100000", 100_000), ("\"5000\"", 5000), ("0", 0)] {
            let item =
                observation_from_history_item(item_with(amount, "pending").as_bytes()).unwrap();
            assert_eq!(item.amount, usd(minor), "amount {amount}");
            assert_eq!(item.fee_minor, Some(20));
        }
    }

    #[test]
    fn invalid_items_are_parse_errors() {
        let cases = [
            (item_with("12.34", "pending"), "a fraction of a cent"),
            (item_with("0.1", "pending"), "a dollar amount"),
            (item_with("-500", "pending"), "a negative amount"),
            (item_with("1e3", "pending"), "an exponent"),
            (item_with("null", "pending"), "a null amount"),
            (
                item_with("99999999999999999999", "pending"),
                "an overflowing amount",
            ),
            (item_with("100", "cancelled"), "an unknown status"),
            (
                item_with("100", "pending")
                    .replace("\"createdAt\":null", "\"createdAt\":\"last week\""),
                "a bad time",
            ),
            (
                item_with("100", "pending").replace("\"cashoutId\":1", "\"cashoutId\":1.5"),
                "a fractional id",
            ),
        ];
        for (item, why) in cases {
            assert!(
                observation_from_history_item(item.as_bytes()).is_err(),
                "{why} must be rejected"
            );
        }
    }

    #[test]
    fn error_answers_are_parse_errors_with_the_message() {
        let err = parse_history_page(include_bytes!(
            "../../fixtures/responses/mannco/history_error.json"
        ))
        .unwrap_err();
        assert!(err.0.contains("Invalid or expired token"), "{err}");
        assert!(parse_history_page(br#"{"err":false,"success":true}"#).is_err());
    }

    #[test]
    fn the_last_page_says_so_and_bad_items_stay_apart() {
        let body = format!(
            r#"{{"err":false,"success":true,"content":{{"items":[{},{}],"page":3,"totalPages":3}}}}"#,
            item_with("1.5", "pending"),
            item_with("150", "pending")
        );
        let page = parse_history_page(body.as_bytes()).unwrap();
        assert!(page.is_last);
        assert!(page.items[0].is_err());
        assert_eq!(page.items[1].as_ref().unwrap().amount, usd(150));
    }
}

#[cfg(test)]
mod client_tests {
    use futures_util::future::join_all;
    use tokio::time::Instant;
    use wiremock::matchers::{body_json, header, method, path, query_param};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    use super::*;
    use crate::metrics::Metrics;
    use crate::providers::outbound::test_support::{
        counted, fast_sender, poll, provider_settings, Script,
    };
    use crate::providers::parse_rfc3339;

    fn client_with(
        server: &MockServer,
        max_rps: u32,
        timeout: Duration,
        retries: u32,
        metrics: &Metrics,
    ) -> ManncoClient {
        let settings = provider_settings(
            &format!(
                r#"
[[providers]]
id = "mannco"
kind = "mannco"
base_url = "{}"
max_rps = {max_rps}
api_key_env = "MANNCO_KEY"
"#,
                server.uri()
            ),
            &[("MANNCO_KEY", "mannco-api-key")],
        );
        let poll = poll(timeout, retries);
        ManncoClient::new(&settings, fast_sender(&settings, &poll, metrics)).unwrap()
    }

    fn client(server: &MockServer, metrics: &Metrics) -> ManncoClient {
        client_with(server, 100, Duration::from_secs(5), 2, metrics)
    }

    /// A JWT-shaped token (the signature is not checked by the client).
    fn jwt(claims: &serde_json::Value) -> String {
        let encode = |json: &serde_json::Value| URL_SAFE_NO_PAD.encode(json.to_string());
        format!(
            "{}.{}.c2ln",
            encode(&serde_json::json!({"alg": "HS256", "typ": "JWT"})),
            encode(claims)
        )
    }

    fn login_answer(token: &str) -> ResponseTemplate {
        ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "err": false, "success": true, "content": { "token": token }
        }))
    }

    fn history(page: u32, total_pages: u32, updated_at: &str) -> ResponseTemplate {
        let items: Vec<serde_json::Value> = (0..2)
            .map(|n| {
                serde_json::json!({
                    "cashoutId": page * 10 + n, "amount": 5000, "fee": 100, "netAmount": 4900,
                    "method": "payoneer", "status": "completed",
                    "createdAt": "2026-11-01T00:00:00Z", "updatedAt": updated_at
                })
            })
            .collect();
        ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "err": false, "success": true,
            "content": { "items": items, "page": page, "totalPages": total_pages }
        }))
    }

    fn window() -> SearchWindow {
        SearchWindow {
            from: parse_rfc3339("2026-11-20T12:00:00Z").unwrap(),
            to: parse_rfc3339("2026-11-20T13:00:00Z").unwrap(),
        }
    }

    async fn mount_login(server: &MockServer, script: &Script) {
        Mock::given(method("POST"))
            .and(path(LOGIN_PATH))
            .and(body_json(serde_json::json!({"apiKey": "mannco-api-key"})))
            .respond_with(script.clone())
            .mount(server)
            .await;
    }

    async fn walk(client: &ManncoClient) -> Result<Vec<String>, ProviderError> {
        let mut page = Some(client.first_page());
        let mut ids = Vec::new();
        while let Some(number) = page {
            let answer = client.search_page(window(), number).await?;
            ids.extend(
                answer
                    .items
                    .into_iter()
                    .map(|item| item.unwrap().provider_ref),
            );
            page = answer.next_page;
        }
        Ok(ids)
    }

    #[tokio::test]
    async fn the_history_is_walked_to_its_last_page_with_one_login() {
        let server = MockServer::start().await;
        let token = jwt(&serde_json::json!({"sub": "u1", "exp": Utc::now().timestamp() + 3600}));
        let logins = Script::new(vec![login_answer(&token)]);
        mount_login(&server, &logins).await;
        for page in 1..=3 {
            Mock::given(method("GET"))
                .and(path(HISTORY_PATH))
                .and(query_param("page", page.to_string()))
                .and(header("authorization", format!("Bearer {token}")))
                .respond_with(history(page, 3, "2026-11-20T12:30:00Z"))
                .expect(1)
                .mount(&server)
                .await;
        }
        let client = client(&server, &Metrics::new());

        let ids = walk(&client).await.unwrap();

        assert_eq!(ids, ["10", "11", "20", "21", "30", "31"]);
        assert_eq!(logins.arrivals().len(), 1);
        assert!(!client.can_fetch_status());
        assert!(matches!(
            client.fetch_status("10").await,
            Err(ProviderError::NotSupported(_))
        ));
    }

    #[tokio::test]
    async fn the_walk_stops_at_the_first_page_wholly_before_the_window() {
        let server = MockServer::start().await;
        mount_login(&server, &Script::new(vec![login_answer("opaque-token")])).await;
        for (page, updated_at) in [(1, "2026-11-20T12:10:00Z"), (2, "2026-11-20T11:00:00Z")] {
            Mock::given(method("GET"))
                .and(query_param("page", page.to_string()))
                .respond_with(history(page, 50, updated_at))
                .expect(1)
                .mount(&server)
                .await;
        }
        let client = client(&server, &Metrics::new());

        let ids = walk(&client).await.unwrap();

        assert_eq!(
            ids,
            ["10", "11", "20", "21"],
            "page 3 of 50 is never asked for"
        );
    }

    #[tokio::test]
    async fn a_401_logs_in_again_once_and_bad_credentials_end_unauthorized() {
        let server = MockServer::start().await;
        let logins = Script::new(vec![
            login_answer("tok-1"),
            login_answer("tok-2"),
            login_answer("tok-3"),
        ]);
        mount_login(&server, &logins).await;
        Mock::given(method("GET"))
            .and(header("authorization", "Bearer tok-1"))
            .respond_with(ResponseTemplate::new(401).set_body_json(serde_json::json!({
                "err": true, "success": false, "message": "Invalid or expired token"
            })))
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(header("authorization", "Bearer tok-2"))
            .respond_with(Script::new(vec![
                history(1, 1, "2026-11-20T12:10:00Z"),
                ResponseTemplate::new(401),
            ]))
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(header("authorization", "Bearer tok-3"))
            .respond_with(ResponseTemplate::new(401))
            .mount(&server)
            .await;
        let client = client(&server, &Metrics::new());

        let refreshed = client.search_page(window(), 1).await;
        assert!(refreshed.is_ok(), "{refreshed:?}");
        assert_eq!(logins.arrivals().len(), 2, "tok-1 refused, tok-2 works");

        let refused = client.search_page(window(), 1).await;
        assert!(
            matches!(refused, Err(ProviderError::Unauthorized(_))),
            "{refused:?}"
        );
        assert_eq!(
            logins.arrivals().len(),
            3,
            "tok-2 refused, exactly one more login"
        );
    }

    #[tokio::test]
    async fn a_login_answering_an_error_envelope_is_unauthorized() {
        let server = MockServer::start().await;
        let logins = Script::new(vec![ResponseTemplate::new(200).set_body_json(
            serde_json::json!({
                "err": true, "success": false, "message": "Invalid API key"
            }),
        )]);
        mount_login(&server, &logins).await;
        let client = client(&server, &Metrics::new());

        let result = client.search_page(window(), 1).await;

        match result {
            Err(ProviderError::Unauthorized(message)) => {
                assert!(message.contains("Invalid API key"))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(logins.arrivals().len(), 1);
    }

    #[test]
    fn the_jwt_expiry_is_read_when_present_and_in_the_future() {
        let now = 1_795_176_000;
        let cases = [
            (
                jwt(&serde_json::json!({"exp": now + 900})),
                Some(Duration::from_secs(900)),
                "exp ahead",
            ),
            (jwt(&serde_json::json!({"exp": now - 5})), None, "exp past"),
            (jwt(&serde_json::json!({"sub": "u1"})), None, "no exp"),
            (
                jwt(&serde_json::json!({"exp": "soon"})),
                None,
                "exp not a number",
            ),
            ("opaque-token".to_string(), None, "not a JWT"),
            ("a.!!!.c".to_string(), None, "payload not base64url"),
        ];
        for (token, expected, why) in cases {
            assert_eq!(jwt_lifetime(&token, now), expected, "{why}");
        }
    }

    #[tokio::test]
    async fn a_429_is_honoured_with_its_retry_after() {
        let server = MockServer::start().await;
        mount_login(&server, &Script::new(vec![login_answer("tok-1")])).await;
        let pages = Script::new(vec![
            ResponseTemplate::new(429).insert_header("retry-after", "1"),
            history(1, 1, "2026-11-20T12:10:00Z"),
        ]);
        Mock::given(method("GET"))
            .respond_with(pages.clone())
            .mount(&server)
            .await;
        let metrics = Metrics::new();
        let client = client(&server, &metrics);

        client.search_page(window(), 1).await.unwrap();

        let arrivals = pages.arrivals();
        assert_eq!(arrivals.len(), 2);
        assert!(
            arrivals[1] - arrivals[0] >= Duration::from_secs(1),
            "{:?}",
            arrivals[1] - arrivals[0]
        );
        assert_eq!(counted(&metrics, "mannco", "throttled"), 1);
    }

    #[tokio::test]
    async fn server_errors_are_retried_then_reported() {
        let server = MockServer::start().await;
        mount_login(&server, &Script::new(vec![login_answer("tok-1")])).await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(504))
            .expect(3)
            .mount(&server)
            .await;
        let client = client(&server, &Metrics::new());

        let result = client.search_page(window(), 1).await;

        assert!(
            matches!(result, Err(ProviderError::Status { status: 504 })),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn a_slow_history_times_out() {
        let server = MockServer::start().await;
        mount_login(&server, &Script::new(vec![login_answer("tok-1")])).await;
        Mock::given(method("GET"))
            .respond_with(history(1, 1, "2026-11-20T12:10:00Z").set_delay(Duration::from_secs(3)))
            .expect(2)
            .mount(&server)
            .await;
        let metrics = Metrics::new();
        let client = client_with(&server, 100, Duration::from_millis(150), 1, &metrics);

        let result = client.search_page(window(), 1).await;

        assert!(
            matches!(result, Err(ProviderError::Unreachable(_))),
            "{result:?}"
        );
        assert_eq!(counted(&metrics, "mannco", "timeout"), 2);
    }

    #[tokio::test]
    async fn history_requests_are_paced_to_max_rps() {
        let server = MockServer::start().await;
        mount_login(&server, &Script::new(vec![login_answer("tok-1")])).await;
        Mock::given(method("GET"))
            .respond_with(history(1, 1, "2026-11-20T12:10:00Z"))
            .mount(&server)
            .await;
        let client = client_with(&server, 10, Duration::from_secs(5), 0, &Metrics::new());
        let start = Instant::now();

        let results = join_all((0..10).map(|_| client.search_page(window(), 1))).await;

        assert!(results.iter().all(Result::is_ok));
        // 1 login + 10 pages = 11 slots 100 ms apart.
        assert!(
            start.elapsed() >= Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
    }
}
