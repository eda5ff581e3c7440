//! Pismo integrated-payments cash-out events (SPEC §4.5): status changes by `authorization_id`.

use std::any::Any;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use reqwest::header::{ACCEPT, AUTHORIZATION};
use reqwest::Url;
use secrecy::SecretString;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::client::{ProviderClient, ProviderError, SearchPage, SearchWindow};
use super::outbound::{bearer_header, endpoint, fill_id, Sender};
use super::spec::{KindContext, KindSettings, KindSpec};
use super::{
    id_text, in_field, optional_id_text, parse_money, parse_rfc3339, peek_json_id, Observation,
    ParseError, ProviderAdapter, ProviderKind,
};
use crate::config::{ConfigError, NamedSecret, ProviderSettings, SchemeChoice};
use crate::money::Currency;
use crate::state::{CashoutStatus, StatusUpdate};
use crate::verify::InboundRequest;
use crate::verify::jwt::JwtScheme;
use crate::verify::Verifier;

/// The `pismo` provider kind: events delivered at least once, deduplicated by `event_id`.
pub struct Pismo;

impl ProviderAdapter for Pismo {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Pismo
    }

    fn body_event_id(&self, request: &InboundRequest<'_>) -> Option<String> {
        peek_json_id(request.body, &["event_id"])
    }

    fn parse_webhook(&self, request: &InboundRequest<'_>) -> Result<Observation, ParseError> {
        let event: Event = serde_json::from_slice(request.body)?;
        let data = event.data;
        let currency = currency_from_json(&data.currency).map_err(in_field("currency"))?;
        Ok(Observation {
            provider_ref: id_text(&data.authorization_id).map_err(in_field("authorization_id"))?,
            external_id: optional_id_text(data.idempotency_key.as_deref())
                .map_err(in_field("idempotency_key"))?,
            status: Some(map_status(&data.new_status)?),
            raw_status: Some(data.new_status),
            reason_code: None,
            amount: Some(parse_money(&data.amount, currency).map_err(in_field("amount"))?),
            fee_minor: None,
            method: None,
            net_minor: None,
            created_at: None,
            updated_at: Some(parse_rfc3339(&event.timestamp).map_err(in_field("timestamp"))?),
        })
    }

    fn peek_provider_ref(&self, request: &InboundRequest<'_>) -> Option<String> {
        peek_json_id(request.body, &["data", "authorization_id"])
    }
}

/// An event envelope. `event_id` is read by [`ProviderAdapter::body_event_id`]; `domain`,
/// `event_type`, `schema_version`, `org_id` and `cid` are routing metadata the raw body
/// keeps.
#[derive(Debug, Deserialize)]
struct Event {
    timestamp: String,
    data: StatusChange,
}

/// The cash-out status change an event carries. `account_id` and `old_status` are not
/// read: the book keys on `authorization_id` and judges order itself (SPEC §3).
#[derive(Debug, Deserialize)]
struct StatusChange {
    authorization_id: Box<RawValue>,
    new_status: String,
    amount: Box<RawValue>,
    currency: Box<RawValue>,
    idempotency_key: Option<Box<RawValue>>,
}

/// Pismo's cash-out statuses (SPEC §4.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PismoStatus {
    Processing,
    Settled,
    Cancelled,
    Error,
}

impl PismoStatus {
    /// Matches the name case-insensitively; both spellings of "cancelled" are accepted.
    fn from_name(name: &str) -> Result<PismoStatus, ParseError> {
        match name.to_ascii_uppercase().as_str() {
            "PROCESSING" => Ok(PismoStatus::Processing),
            "SETTLED" => Ok(PismoStatus::Settled),
            "CANCELLED" | "CANCELED" => Ok(PismoStatus::Cancelled),
            "ERROR" => Ok(PismoStatus::Error),
            _ => Err(ParseError(
                "new_status: not PROCESSING, SETTLED, CANCELLED or ERROR".to_string(),
            )),
        }
    }

    fn status_update(self) -> StatusUpdate {
        StatusUpdate::to(match self {
            PismoStatus::Processing => CashoutStatus::Processing,
            PismoStatus::Settled => CashoutStatus::Completed,
            PismoStatus::Cancelled => CashoutStatus::Canceled,
            PismoStatus::Error => CashoutStatus::Failed,
        })
    }
}

/// Maps a Pismo `new_status` to the canonical state: PROCESSING `processing`, SETTLED
/// `completed`, CANCELLED `canceled`, ERROR `failed`. Names match case-insensitively; any
/// other name is an error (quarantine). Shared with a configured status endpoint.
pub fn map_status(new_status: &str) -> Result<StatusUpdate, ParseError> {
    PismoStatus::from_name(new_status).map(PismoStatus::status_update)
}

/// ISO 4217 numeric codes Pismo may send instead of the alphabetic code.
const NUMERIC_CURRENCIES: [(u16, &str); 14] = [
    (32, "ARS"),
    (68, "BOB"),
    (124, "CAD"),
    (152, "CLP"),
    (170, "COP"),
    (392, "JPY"),
    (484, "MXN"),
    (600, "PYG"),
    (604, "PEN"),
    (826, "GBP"),
    (840, "USD"),
    (858, "UYU"),
    (978, "EUR"),
    (986, "BRL"),
];

/// The currency of an ISO 4217 numeric code (`986` → BRL), for the codes in use in
/// Latin America plus the majors; `None` for any other code.
pub fn currency_from_iso_numeric(code: u16) -> Option<Currency> {
    let (_, alphabetic) = NUMERIC_CURRENCIES
        .iter()
        .find(|(number, _)| *number == code)?;
    Currency::from_code(alphabetic).ok()
}

/// Reads `currency` given as an alphabetic code (`"BRL"`), a numeric one as text
/// (`"986"`, `"032"`) or a numeric one as a number (`986`, `32`).
fn currency_from_json(raw: &RawValue) -> Result<Currency, ParseError> {
    let text = id_text(raw)?;
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(Currency::from_code(&text)?);
    }
    text.parse::<u16>()
        .ok()
        .and_then(currency_from_iso_numeric)
        .ok_or_else(|| ParseError("not an ISO 4217 numeric currency code".to_string()))
}

/// The answer of a configured status endpoint (*proposal*, SPEC §4.5):
/// `{"authorization_id","status","amount","currency","idempotency_key","created_at","updated_at"}`.
#[derive(Debug, Deserialize)]
struct StatusAnswer {
    authorization_id: Box<RawValue>,
    status: String,
    amount: Box<RawValue>,
    currency: Box<RawValue>,
    idempotency_key: Option<Box<RawValue>>,
    created_at: Option<String>,
    updated_at: Option<String>,
}

/// Parses the answer of the configured status endpoint: `status` PROCESSING, SETTLED,
/// CANCELLED or ERROR; `amount` a JSON number or string read as exact decimal text;
/// `currency` alphabetic or ISO 4217 numeric; times RFC 3339 (absent or null allowed).
pub fn observation_from_status_answer(body: &[u8]) -> Result<Observation, ParseError> {
    let answer: StatusAnswer = serde_json::from_slice(body)?;
    let currency = currency_from_json(&answer.currency).map_err(in_field("currency"))?;
    let time = |text: Option<&str>, field: &'static str| {
        text.map(parse_rfc3339).transpose().map_err(in_field(field))
    };
    Ok(Observation {
        provider_ref: id_text(&answer.authorization_id).map_err(in_field("authorization_id"))?,
        external_id: optional_id_text(answer.idempotency_key.as_deref())
            .map_err(in_field("idempotency_key"))?,
        status: Some(map_status(&answer.status)?),
        raw_status: Some(answer.status),
        reason_code: None,
        amount: Some(parse_money(&answer.amount, currency).map_err(in_field("amount"))?),
        fee_minor: None,
        method: None,
        net_minor: None,
        created_at: time(answer.created_at.as_deref(), "created_at")?,
        updated_at: time(answer.updated_at.as_deref(), "updated_at")?,
    })
}

/// Pismo's status endpoint, when `status_path` is configured (SPEC §4.5): events are the
/// main source, so there is no search.
pub struct PismoClient {
    sender: Sender,
    base_url: Url,
    /// `None`: no status endpoint configured.
    status_path: Option<String>,
    bearer_token: Option<SecretString>,
}

impl PismoClient {
    /// The client of `settings`: `GET {base_url}{status_path}` with `{id}` replaced by the
    /// URL-encoded `authorization_id`, with a bearer token when `bearer_token_env` is set.
    pub fn new(settings: &ProviderSettings, sender: Sender) -> Option<PismoClient> {
        let own = settings.kind_settings::<PismoSettings>()?;
        Some(PismoClient {
            sender,
            base_url: settings.base_url.clone(),
            status_path: settings.status_path.clone(),
            bearer_token: own.bearer_token.as_ref().map(|named| named.value.clone()),
        })
    }
}

#[async_trait]
impl ProviderClient for PismoClient {
    fn first_page(&self) -> u32 {
        1
    }

    fn can_search(&self) -> bool {
        false
    }

    async fn search_page(
        &self,
        _window: SearchWindow,
        _page: u32,
    ) -> Result<SearchPage, ProviderError> {
        Err(ProviderError::NotSupported("search"))
    }

    fn can_fetch_status(&self) -> bool {
        self.status_path.is_some()
    }

    async fn fetch_status(&self, provider_ref: &str) -> Result<Observation, ProviderError> {
        let Some(status_path) = &self.status_path else {
            return Err(ProviderError::NotSupported(
                "status (no status_path configured)",
            ));
        };
        let url = endpoint(&self.base_url, &fill_id(status_path, provider_ref)?)?;
        let reply = self
            .sender
            .send(|http| {
                let request = http.get(url.clone()).header(ACCEPT, "application/json");
                Ok(match &self.bearer_token {
                    Some(token) => request.header(AUTHORIZATION, bearer_header(token)?),
                    None => request,
                })
            })
            .await?;
        if reply.status == 404 {
            return Err(ProviderError::NotFound(provider_ref.to_string()));
        }
        let reply = reply.require_success()?;
        let observation = observation_from_status_answer(&reply.body)?;
        if observation.provider_ref != provider_ref {
            return Err(ProviderError::Decode(format!(
                "asked for authorization {provider_ref}, the answer is about {}",
                observation.provider_ref
            )));
        }
        Ok(observation)
    }
}

// ---- The kind's entry: config keys, settings, default verifier, client ----

impl KindSpec for Pismo {
    fn adapter(&self) -> &'static dyn ProviderAdapter {
        &Pismo
    }

    fn id_fields(&self) -> (&'static str, &'static str) {
        ("authorization_id", "idempotency_key")
    }

    fn config_keys(&self) -> &'static [&'static str] {
        &["public_keys", "signature_header", "bearer_token_env"]
    }

    fn path_overrides(&self) -> &'static [&'static str] {
        &["status_path"]
    }

    fn keys_unread_with(&self, scheme: SchemeChoice) -> &'static [&'static str] {
        match scheme {
            SchemeChoice::KindDefault => &[],
            _ => &["public_keys", "signature_header"],
        }
    }

    /// Its default scheme verifies with public keys, not shared secrets.
    fn requires_webhook_secrets(&self, scheme: SchemeChoice) -> bool {
        scheme != SchemeChoice::KindDefault
    }

    fn settings(
        &self,
        keys: toml::Table,
        cx: &mut KindContext<'_>,
    ) -> Result<Arc<dyn KindSettings>, ConfigError> {
        let keys: PismoKeys = cx.parse(keys)?;
        let mut public_keys = Vec::new();
        if cx.scheme == SchemeChoice::KindDefault {
            let entries = keys.public_keys.unwrap_or_default();
            if entries.is_empty() {
                return Err(cx.error(
                    "public_keys",
                    "at least one { kid, pem_file } is required for kind pismo",
                ));
            }
            for (k, entry) in entries.into_iter().enumerate() {
                let path = cx.path(&entry.pem_file);
                let pem = std::fs::read_to_string(&path).map_err(|err| {
                    cx.error(
                        &format!("public_keys[{k}].pem_file"),
                        format!("cannot read {}: {err}", path.display()),
                    )
                })?;
                public_keys.push(PublicKey {
                    kid: entry.kid,
                    pem_file: path,
                    pem,
                });
            }
        }
        Ok(Arc::new(PismoSettings {
            public_keys,
            signature_header: keys.signature_header,
            bearer_token: cx.secret(&keys.bearer_token_env),
        }))
    }

    fn build_client(
        &self,
        settings: &ProviderSettings,
        sender: Sender,
    ) -> Option<Arc<dyn ProviderClient>> {
        Some(Arc::new(PismoClient::new(settings, sender)?))
    }

    fn simulator(&self) -> Option<&'static dyn crate::sim::KindSim> {
        Some(&crate::sim::pismo::PismoSim)
    }
}

/// The `pismo` keys of a `[[providers]]` entry (SPEC §8).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PismoKeys {
    public_keys: Option<Vec<PublicKeyKeys>>,
    signature_header: Option<String>,
    bearer_token_env: Option<String>,
}

/// One `public_keys` entry as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublicKeyKeys {
    kid: String,
    pem_file: PathBuf,
}

/// A public key the webhooks' JWTs are verified with.
#[derive(Debug, Clone)]
pub struct PublicKey {
    pub kid: String,
    pub pem_file: PathBuf,
    pub pem: String,
}

/// A `pismo` provider's own settings.
#[derive(Debug, Clone)]
pub struct PismoSettings {
    /// Empty when another verify scheme is configured.
    pub public_keys: Vec<PublicKey>,
    /// The JWT's header; `x-pismo-signature` when absent.
    pub signature_header: Option<String>,
    /// Sent to the status endpoint, when set.
    pub bearer_token: Option<NamedSecret>,
}

impl KindSettings for PismoSettings {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn default_verifier(
        &self,
        _secrets: &[SecretString],
        tolerance_secs: u64,
    ) -> Result<Option<Verifier>, String> {
        let keys = self
            .public_keys
            .iter()
            .map(|k| (k.kid.clone(), k.pem.clone()))
            .collect();
        let header = self
            .signature_header
            .clone()
            .unwrap_or_else(|| "x-pismo-signature".to_string());
        Ok(Some(Verifier::Jwt(
            JwtScheme::new(keys, header, tolerance_secs).map_err(|e| e.0)?,
        )))
    }

    fn describe_keys(&self) -> Vec<String> {
        self.public_keys
            .iter()
            .map(|key| format!("  public key {}: {}", key.kid, key.pem_file.display()))
            .collect()
    }

    fn credentials(&self) -> Vec<(&'static str, Option<&NamedSecret>)> {
        vec![("bearer token", self.bearer_token.as_ref())]
    }

    /// Without `status_path` Pismo is events only.
    fn missing_outbound_credentials(&self, provider: &ProviderSettings) -> Option<&'static str> {
        provider.status_path.is_none().then_some("status_path")
    }

    fn endpoints(&self, provider: &ProviderSettings) -> Vec<String> {
        let base = provider.base_text();
        match &provider.status_path {
            Some(status) => vec![format!("status GET {base}{status}")],
            None => vec!["none (events only; set status_path to poll statuses)".to_string()],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Money;
    use crate::verify::RequestHeaders;

    fn request_for<T>(body: &[u8], act: impl FnOnce(&InboundRequest<'_>) -> T) -> T {
        let headers = RequestHeaders::new();
        act(&InboundRequest {
            path: "/webhooks/pismo",
            headers: &headers,
            body,
        })
    }

    fn parse(body: &[u8]) -> Result<Observation, ParseError> {
        request_for(body, |request| Pismo.parse_webhook(request))
    }

    fn money(minor: i64, code: &str) -> Option<Money> {
        Some(Money {
            minor,
            currency: Currency::from_code(code).unwrap(),
        })
    }

    fn at(text: &str) -> Option<chrono::DateTime<chrono::Utc>> {
        Some(parse_rfc3339(text).unwrap())
    }

    fn event_with(status: &str, amount: &str, currency: &str) -> String {
        format!(
            r#"{{"event_id":"ev-1","domain":"integrated-payments","event_type":"cashout-status-change","schema_version":1,"org_id":"TN-1","cid":"c-1","timestamp":"2026-11-20T12:00:00Z","data":{{"account_id":1,"authorization_id":"auth-1","old_status":null,"new_status":"{status}","amount":{amount},"currency":{currency}}}}}"#
        )
    }

    const IDEMPOTENCY_KEY: &str = "6a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";

    #[test]
    fn settled_event_is_a_completed_observation() {
        let observation = parse(include_bytes!("../../fixtures/webhooks/pismo/settled.json"));
        assert_eq!(
            observation,
            Ok(Observation {
                provider_ref: "918273645".to_string(),
                external_id: Some(IDEMPOTENCY_KEY.to_string()),
                status: Some(StatusUpdate::to(CashoutStatus::Completed)),
                raw_status: Some("SETTLED".to_string()),
                reason_code: None,
                amount: money(32_075, "BRL"),
                fee_minor: None,
                method: None,
                net_minor: None,
                created_at: None,
                updated_at: at("2026-11-20T12:03:10.482Z"),
            })
        );
    }

    #[test]
    fn cancelled_event_with_integer_ids_and_numeric_currency() {
        let observation = parse(include_bytes!(
            "../../fixtures/webhooks/pismo/cancelled.json"
        ));
        assert_eq!(
            observation,
            Ok(Observation {
                provider_ref: "918273702".to_string(),
                external_id: None,
                status: Some(StatusUpdate::to(CashoutStatus::Canceled)),
                raw_status: Some("CANCELLED".to_string()),
                reason_code: None,
                amount: money(10, "BRL"),
                fee_minor: None,
                method: None,
                net_minor: None,
                created_at: None,
                updated_at: at("2026-11-20T18:20:00Z"),
            })
        );
    }

    #[test]
    fn every_fixture_maps_to_its_state() {
        let cases: [(&[u8], &str, CashoutStatus, Option<Money>); 4] = [
            (
                include_bytes!("../../fixtures/webhooks/pismo/processing.json"),
                "PROCESSING",
                CashoutStatus::Processing,
                money(32_075, "BRL"),
            ),
            (
                include_bytes!("../../fixtures/webhooks/pismo/settled.json"),
                "SETTLED",
                CashoutStatus::Completed,
                money(32_075, "BRL"),
            ),
            (
                include_bytes!("../../fixtures/webhooks/pismo/cancelled.json"),
                "CANCELLED",
                CashoutStatus::Canceled,
                money(10, "BRL"),
            ),
            (
                include_bytes!("../../fixtures/webhooks/pismo/error.json"),
                "ERROR",
                CashoutStatus::Failed,
                money(15_000, "CLP"),
            ),
        ];
        for (body, raw_status, status, amount) in cases {
            let observation = parse(body).unwrap();
            assert_eq!(observation.raw_status.as_deref(), Some(raw_status));
            assert_eq!(
                observation.status,
                Some(StatusUpdate::to(status)),
                "{raw_status}"
            );
            assert_eq!(observation.amount, amount, "{raw_status}");
        }
    }

    #[test]
    fn every_status_maps_as_the_spec_says() {
        let cases = [
            ("PROCESSING", CashoutStatus::Processing),
            ("SETTLED", CashoutStatus::Completed),
            ("CANCELLED", CashoutStatus::Canceled),
            ("ERROR", CashoutStatus::Failed),
            ("settled", CashoutStatus::Completed),
        ];
        for (name, status) in cases {
            assert_eq!(map_status(name), Ok(StatusUpdate::to(status)), "{name}");
        }
        for name in ["CREATED", "REVERSED", ""] {
            assert!(map_status(name).is_err(), "{name:?}");
            assert!(
                parse(event_with(name, "1", "\"BRL\"").as_bytes()).is_err(),
                "{name:?}"
            );
        }
    }

    #[test]
    fn currencies_may_be_alphabetic_or_numeric() {
        let cases = [
            ("\"BRL\"", "BRL"),
            ("\"986\"", "BRL"),
            ("986", "BRL"),
            ("840", "USD"),
            ("\"978\"", "EUR"),
            ("484", "MXN"),
            ("604", "PEN"),
            ("\"032\"", "ARS"),
            ("32", "ARS"),
            ("\"mxn\"", "MXN"),
        ];
        for (currency, code) in cases {
            let observation = parse(event_with("SETTLED", "\"100\"", currency).as_bytes()).unwrap();
            assert_eq!(
                observation.amount,
                money(10_000, code),
                "currency {currency}"
            );
        }
        let clp = parse(event_with("SETTLED", "\"1500\"", "152").as_bytes()).unwrap();
        assert_eq!(clp.amount, money(1500, "CLP"), "CLP has no minor digits");
        let cop = parse(event_with("SETTLED", "\"1500\"", "170").as_bytes()).unwrap();
        assert_eq!(cop.amount, money(150_000, "COP"));
        for currency in ["999", "\"000\"", "\"XYZ\"", "null", "9.86"] {
            assert!(
                parse(event_with("SETTLED", "1", currency).as_bytes()).is_err(),
                "currency {currency}"
            );
        }
    }

    #[test]
    fn amounts_are_read_exactly() {
        for (amount, minor) in [("12.34", 1234), ("0.1", 10), ("\"320.75\"", 32_075)] {
            let observation = parse(event_with("SETTLED", amount, "\"BRL\"").as_bytes()).unwrap();
            assert_eq!(observation.amount, money(minor, "BRL"), "amount {amount}");
        }
        for (amount, currency) in [("12.345", "\"BRL\""), ("1.5", "152"), ("null", "\"BRL\"")] {
            assert!(
                parse(event_with("SETTLED", amount, currency).as_bytes()).is_err(),
                "{amount} in {currency} must be rejected"
            );
        }
    }

    #[test]
    fn malformed_events_are_parse_errors() {
        let good = event_with("SETTLED", "1", "\"BRL\"");
        let cases = [
            (
                good.replace("\"authorization_id\":\"auth-1\",", ""),
                "no authorization_id",
            ),
            (
                good.replace("2026-11-20T12:00:00Z", "1795176000"),
                "a non RFC 3339 timestamp",
            ),
            (
                good.replace("\"new_status\":\"SETTLED\"", "\"new_status\":null"),
                "a null status",
            ),
            ("[]".to_string(), "not an object"),
        ];
        for (body, why) in cases {
            assert!(parse(body.as_bytes()).is_err(), "{why} must be rejected");
        }
    }

    #[test]
    fn event_id_and_authorization_id_are_read_from_the_body() {
        let body = include_bytes!("../../fixtures/webhooks/pismo/processing.json");
        assert_eq!(
            request_for(body, |request| Pismo.body_event_id(request)).as_deref(),
            Some("3f6c1d2e-8a4b-4c7d-9e0f-1a2b3c4d5e6f")
        );
        assert_eq!(
            request_for(body, |request| Pismo.peek_provider_ref(request)).as_deref(),
            Some("918273645")
        );
        let cancelled = include_bytes!("../../fixtures/webhooks/pismo/cancelled.json");
        assert_eq!(
            request_for(cancelled, |request| Pismo.peek_provider_ref(request)).as_deref(),
            Some("918273702")
        );
        for body in [&b"{}"[..], b"{\"event_id\":{}}", b"nonsense"] {
            assert_eq!(
                request_for(body, |request| Pismo.body_event_id(request)),
                None
            );
            assert_eq!(
                request_for(body, |request| Pismo.peek_provider_ref(request)),
                None
            );
        }
    }
}

#[cfg(test)]
mod client_tests {
    use std::time::Duration;

    use futures_util::future::join_all;
    use tokio::time::Instant;
    use wiremock::matchers::{header, method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    use super::*;
    use crate::metrics::Metrics;
    use crate::money::Money;
    use crate::providers::outbound::test_support::{
        counted, fast_sender, poll, provider_settings, Script,
    };

    const STATUS_PATH: &str = "/v1/cashouts/{id}/status";

    fn client_with(
        server: &MockServer,
        bearer: Option<&str>,
        max_rps: u32,
        timeout: Duration,
        retries: u32,
        metrics: &Metrics,
    ) -> PismoClient {
        let bearer_key = if bearer.is_some() {
            "bearer_token_env = \"PISMO_TOKEN\""
        } else {
            ""
        };
        let settings = provider_settings(
            &format!(
                r#"
[[providers]]
id = "pismo"
kind = "pismo"
base_url = "{}"
max_rps = {max_rps}
status_path = "{STATUS_PATH}"
public_keys = [{{ kid = "k1", pem_file = "fixtures/keys/pismo-ec-public.pem" }}]
{bearer_key}
"#,
                server.uri()
            ),
            &[("PISMO_TOKEN", bearer.unwrap_or(""))],
        );
        let poll = poll(timeout, retries);
        PismoClient::new(&settings, fast_sender(&settings, &poll, metrics)).unwrap()
    }

    fn client(server: &MockServer, metrics: &Metrics) -> PismoClient {
        client_with(
            server,
            Some("pismo-token"),
            100,
            Duration::from_secs(5),
            2,
            metrics,
        )
    }

    fn answer_json(id: &str, amount: &str, currency: &str) -> String {
        format!(
            r#"{{"authorization_id":"{id}","status":"SETTLED","amount":{amount},"currency":{currency},"idempotency_key":"ord-7","created_at":"2026-11-20T12:00:00Z","updated_at":"2026-11-20T12:03:10.482Z"}}"#
        )
    }

    fn answer(id: &str) -> ResponseTemplate {
        ResponseTemplate::new(200)
            .set_body_raw(answer_json(id, "\"320.75\"", "\"986\""), "application/json")
    }

    fn money(minor: i64, code: &str) -> Option<Money> {
        Some(Money {
            minor,
            currency: Currency::from_code(code).unwrap(),
        })
    }

    #[test]
    fn the_status_answer_maps_like_an_event() {
        let observation = observation_from_status_answer(
            answer_json("918273645", "320.75", "\"BRL\"").as_bytes(),
        );
        assert_eq!(
            observation,
            Ok(Observation {
                provider_ref: "918273645".to_string(),
                external_id: Some("ord-7".to_string()),
                status: Some(StatusUpdate::to(CashoutStatus::Completed)),
                raw_status: Some("SETTLED".to_string()),
                reason_code: None,
                amount: money(32_075, "BRL"),
                fee_minor: None,
                method: None,
                net_minor: None,
                created_at: Some(parse_rfc3339("2026-11-20T12:00:00Z").unwrap()),
                updated_at: Some(parse_rfc3339("2026-11-20T12:03:10.482Z").unwrap()),
            })
        );
        let cases = [
            (answer_json("1", "\"0.1\"", "986"), money(10, "BRL")),
            (answer_json("1", "1500", "152"), money(1500, "CLP")),
            (answer_json("1", "12.34", "\"840\""), money(1234, "USD")),
        ];
        for (body, amount) in cases {
            assert_eq!(
                observation_from_status_answer(body.as_bytes())
                    .unwrap()
                    .amount,
                amount,
                "{body}"
            );
        }
        let times_null = r#"{"authorization_id":7,"status":"processing","amount":"1","currency":"BRL","idempotency_key":null,"created_at":null,"updated_at":null}"#;
        let observation = observation_from_status_answer(times_null.as_bytes()).unwrap();
        assert_eq!(observation.provider_ref, "7");
        assert_eq!(
            observation.status,
            Some(StatusUpdate::to(CashoutStatus::Processing))
        );
        assert_eq!(
            (observation.created_at, observation.updated_at),
            (None, None)
        );
    }

    #[test]
    fn malformed_status_answers_are_parse_errors() {
        let good = answer_json("1", "\"1.00\"", "\"BRL\"");
        let cases = [
            (good.replace("SETTLED", "REVERSED"), "an unknown status"),
            (
                answer_json("1", "12.345", "\"BRL\""),
                "three decimals in BRL",
            ),
            (answer_json("1", "1.5", "152"), "decimals in CLP"),
            (answer_json("1", "null", "\"BRL\""), "a null amount"),
            (
                answer_json("1", "\"1\"", "999"),
                "an unknown numeric currency",
            ),
            (
                good.replace("2026-11-20T12:00:00Z", "yesterday"),
                "a bad created_at",
            ),
            (
                good.replace(r#""authorization_id":"1","#, ""),
                "no authorization_id",
            ),
        ];
        for (body, why) in cases {
            assert!(
                observation_from_status_answer(body.as_bytes()).is_err(),
                "{why} must be rejected"
            );
        }
    }

    #[tokio::test]
    async fn status_is_fetched_with_the_encoded_id_and_the_bearer_token() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path("/v1/cashouts/auth%201%202/status"))
            .and(header("authorization", "Bearer pismo-token"))
            .respond_with(answer("auth 1 2"))
            .expect(1)
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path("/v1/cashouts/unknown/status"))
            .respond_with(ResponseTemplate::new(404))
            .mount(&server)
            .await;
        let client = client(&server, &Metrics::new());

        let observation = client.fetch_status("auth 1 2").await.unwrap();
        let unknown = client.fetch_status("unknown").await;

        assert_eq!(observation.provider_ref, "auth 1 2");
        assert_eq!(observation.amount, money(32_075, "BRL"));
        assert!(
            matches!(unknown, Err(ProviderError::NotFound(_))),
            "{unknown:?}"
        );
        assert!(client.can_fetch_status() && !client.can_search());
    }

    #[tokio::test]
    async fn without_a_bearer_token_no_authorization_is_sent_and_a_401_is_final() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(401))
            .expect(1)
            .mount(&server)
            .await;
        let client = client_with(
            &server,
            None,
            100,
            Duration::from_secs(5),
            2,
            &Metrics::new(),
        );

        let result = client.fetch_status("1").await;

        assert!(
            matches!(result, Err(ProviderError::Unauthorized(_))),
            "{result:?}"
        );
        let requests = server.received_requests().await.unwrap();
        assert!(requests[0].headers.get("authorization").is_none());
    }

    #[tokio::test]
    async fn a_429_is_retried_after_retry_after() {
        let server = MockServer::start().await;
        let script = Script::new(vec![
            ResponseTemplate::new(429).insert_header("retry-after", "1"),
            answer("1"),
        ]);
        Mock::given(method("GET"))
            .respond_with(script.clone())
            .mount(&server)
            .await;
        let client = client(&server, &Metrics::new());

        client.fetch_status("1").await.unwrap();

        let arrivals = script.arrivals();
        assert_eq!(arrivals.len(), 2);
        assert!(
            arrivals[1] - arrivals[0] >= Duration::from_secs(1),
            "{:?}",
            arrivals[1] - arrivals[0]
        );
    }

    #[tokio::test]
    async fn server_errors_are_retried_then_reported() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(500))
            .expect(3)
            .mount(&server)
            .await;
        let metrics = Metrics::new();
        let client = client(&server, &metrics);

        let result = client.fetch_status("1").await;

        assert!(
            matches!(result, Err(ProviderError::Status { status: 500 })),
            "{result:?}"
        );
        assert_eq!(counted(&metrics, "pismo", "http_5xx"), 3);
    }

    #[tokio::test]
    async fn a_slow_answer_times_out() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .respond_with(answer("1").set_delay(Duration::from_secs(3)))
            .expect(2)
            .mount(&server)
            .await;
        let metrics = Metrics::new();
        let client = client_with(
            &server,
            Some("t"),
            100,
            Duration::from_millis(150),
            1,
            &metrics,
        );

        let result = client.fetch_status("1").await;

        assert!(
            matches!(result, Err(ProviderError::Unreachable(_))),
            "{result:?}"
        );
        assert_eq!(counted(&metrics, "pismo", "timeout"), 2);
    }

    #[tokio::test]
    async fn status_fetches_are_paced_to_max_rps() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .respond_with(answer("1"))
            .mount(&server)
            .await;
        let client = client_with(
            &server,
            Some("t"),
            10,
            Duration::from_secs(5),
            0,
            &Metrics::new(),
        );
        let start = Instant::now();

        let results = join_all((0..11).map(|_| client.fetch_status("1"))).await;

        assert!(results.iter().all(Result::is_ok));
        assert!(
            start.elapsed() >= Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
    }
}
