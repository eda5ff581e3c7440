//! SimPay Pix (SPEC §4.2): `PIX_CASHOUT_*` webhooks and the status-cashout answer, in BRL.

use std::any::Any;
use std::sync::Arc;

use async_trait::async_trait;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::client::{ProviderClient, ProviderError, SearchPage, SearchWindow};
use super::outbound::{
    bearer_header, encode_component, endpoint, fill_id, seconds_value, with_query, FreshToken,
    Sender, TokenCache, TokenSource,
};
use super::spec::{KindContext, KindSettings, KindSpec};
use super::{
    id_text, in_field, optional_id_text, parse_money, parse_rfc3339, peek_json_id, Observation,
    ParseError, ProviderAdapter, ProviderKind,
};
use crate::config::{ConfigError, NamedSecret, ProviderSettings, SchemeChoice};
use crate::money::Currency;
use crate::state::{CashoutStatus, StatusUpdate};
use crate::verify::hmac::HmacScheme;
use crate::verify::InboundRequest;
use crate::verify::Verifier;

/// The `simpay` provider kind: one webhook per event, `{"type":"PIX_CASHOUT_…","data":{…}}`.
pub struct Simpay;

impl ProviderAdapter for Simpay {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Simpay
    }

    fn parse_webhook(&self, request: &InboundRequest<'_>) -> Result<Observation, ParseError> {
        let webhook: Webhook = serde_json::from_slice(request.body)?;
        let event = SimpayEvent::from_name(&webhook.event_type)?;
        let data = webhook.data;
        let (status, raw_status) = match data.status.as_deref() {
            Some(status) => (map_status(status)?, status.to_string()),
            None => (event.status_update(), webhook.event_type.clone()),
        };
        let currency = pix_currency()?;
        Ok(Observation {
            provider_ref: id_text(&data.transaction_id).map_err(in_field("transaction_id"))?,
            external_id: optional_id_text(data.tag.as_deref()).map_err(in_field("tag"))?,
            status: Some(status),
            raw_status: Some(raw_status),
            reason_code: error_text(data.error.as_deref()),
            amount: Some(parse_money(&data.amount, currency).map_err(in_field("amount"))?),
            fee_minor: fee_minor(data.fee.as_deref(), currency)?,
            method: None,
            net_minor: None,
            created_at: None,
            updated_at: payment_time(data.payment_date.as_deref()),
        })
    }

    fn peek_provider_ref(&self, request: &InboundRequest<'_>) -> Option<String> {
        peek_json_id(request.body, &["data", "transaction_id"])
    }
}

/// A webhook body.
#[derive(Debug, Deserialize)]
struct Webhook {
    #[serde(rename = "type")]
    event_type: String,
    data: WebhookData,
}

/// The cash-out a webhook reports. `end_to_end` and `key` are not read: the book keeps
/// neither, and the raw body is stored anyway.
#[derive(Debug, Deserialize)]
struct WebhookData {
    transaction_id: Box<RawValue>,
    status: Option<String>,
    amount: Box<RawValue>,
    fee: Option<Box<RawValue>>,
    tag: Option<Box<RawValue>>,
    payment_date: Option<String>,
    error: Option<Box<RawValue>>,
}

/// The answer of `GET /v2/finance/status-cashout/?id=…` (seed 001); recipient details are
/// not read.
#[derive(Debug, Deserialize)]
struct StatusAnswer {
    worked: Option<bool>,
    id: Option<Box<RawValue>>,
    transaction_id: Option<Box<RawValue>>,
    status: Option<String>,
    amount: Box<RawValue>,
    fee: Option<Box<RawValue>>,
    tag: Option<Box<RawValue>>,
    erro_descriptor: Option<String>,
    new_erro_descriptor: Option<String>,
}

/// SimPay's cash-out statuses (seed 001 and SPEC §4.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SimpayStatus {
    New,
    Processing,
    Success,
    Canceled,
    Error,
    Refund,
}

impl SimpayStatus {
    /// Matches the name case-insensitively; both spellings of "canceled" are accepted.
    fn from_name(name: &str) -> Result<SimpayStatus, ParseError> {
        match name.to_ascii_uppercase().as_str() {
            "NEW" => Ok(SimpayStatus::New),
            "PROCESSING" => Ok(SimpayStatus::Processing),
            "SUCCESS" => Ok(SimpayStatus::Success),
            "CANCELED" | "CANCELLED" => Ok(SimpayStatus::Canceled),
            "ERROR" => Ok(SimpayStatus::Error),
            "REFUND" => Ok(SimpayStatus::Refund),
            _ => Err(ParseError("status: not a known simpay status".to_string())),
        }
    }

    fn status_update(self) -> StatusUpdate {
        StatusUpdate::to(match self {
            SimpayStatus::New => CashoutStatus::Pending,
            SimpayStatus::Processing => CashoutStatus::Processing,
            SimpayStatus::Success => CashoutStatus::Completed,
            SimpayStatus::Canceled => CashoutStatus::Canceled,
            SimpayStatus::Error => CashoutStatus::Failed,
            SimpayStatus::Refund => CashoutStatus::Reversed,
        })
    }
}

/// SimPay's webhook event types; they decide the state when `data.status` is absent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SimpayEvent {
    Created,
    Success,
    Error,
    Refund,
    Canceled,
}

impl SimpayEvent {
    fn from_name(name: &str) -> Result<SimpayEvent, ParseError> {
        match name.to_ascii_uppercase().as_str() {
            "PIX_CASHOUT_CREATED" => Ok(SimpayEvent::Created),
            "PIX_CASHOUT_SUCCESS" => Ok(SimpayEvent::Success),
            "PIX_CASHOUT_ERROR" => Ok(SimpayEvent::Error),
            "PIX_CASHOUT_REFUND" => Ok(SimpayEvent::Refund),
            "PIX_CASHOUT_CANCELED" | "PIX_CASHOUT_CANCELLED" => Ok(SimpayEvent::Canceled),
            _ => Err(ParseError(
                "type: not a known simpay event type".to_string(),
            )),
        }
    }

    fn status_update(self) -> StatusUpdate {
        StatusUpdate::to(match self {
            SimpayEvent::Created => CashoutStatus::Pending,
            SimpayEvent::Success => CashoutStatus::Completed,
            SimpayEvent::Error => CashoutStatus::Failed,
            SimpayEvent::Refund => CashoutStatus::Reversed,
            SimpayEvent::Canceled => CashoutStatus::Canceled,
        })
    }
}

/// Maps a SimPay status name to the canonical state: NEW `pending`, PROCESSING
/// `processing`, SUCCESS `completed`, CANCELED `canceled`, ERROR `failed`, REFUND
/// `reversed`. Names match case-insensitively; any other name is an error (quarantine).
/// Shared by webhooks and the poller.
pub fn map_status(status: &str) -> Result<StatusUpdate, ParseError> {
    SimpayStatus::from_name(status).map(SimpayStatus::status_update)
}

/// Maps a webhook event type (`PIX_CASHOUT_SUCCESS`, …) to the canonical state, for a
/// webhook whose `data.status` is absent or null.
pub fn map_event_type(event_type: &str) -> Result<StatusUpdate, ParseError> {
    SimpayEvent::from_name(event_type).map(SimpayEvent::status_update)
}

/// Parses the answer of the status endpoint (`worked`, `transaction_id`, `status`,
/// `amount`, `fee`, `tag`, `erro_descriptor`, …). The reason code is the first non-empty
/// of `new_erro_descriptor` and `erro_descriptor`. An answer without a status (for
/// example `worked: false`) is an error.
pub fn observation_from_status_answer(body: &[u8]) -> Result<Observation, ParseError> {
    let answer: StatusAnswer = serde_json::from_slice(body)?;
    let Some(raw_status) = answer.status else {
        let descriptor = answer
            .new_erro_descriptor
            .or(answer.erro_descriptor)
            .unwrap_or_default();
        return Err(ParseError(format!(
            "simpay status answer has no status (worked: {:?}, error: {})",
            answer.worked,
            super::excerpt(&descriptor)
        )));
    };
    let id = answer
        .transaction_id
        .or(answer.id)
        .ok_or_else(|| ParseError("simpay status answer has no transaction_id".to_string()))?;
    let reason_code = [answer.new_erro_descriptor, answer.erro_descriptor]
        .into_iter()
        .flatten()
        .find(|text| !text.trim().is_empty());
    let currency = pix_currency()?;
    Ok(Observation {
        provider_ref: id_text(&id).map_err(in_field("transaction_id"))?,
        external_id: optional_id_text(answer.tag.as_deref()).map_err(in_field("tag"))?,
        status: Some(map_status(&raw_status)?),
        raw_status: Some(raw_status),
        reason_code,
        amount: Some(parse_money(&answer.amount, currency).map_err(in_field("amount"))?),
        fee_minor: fee_minor(answer.fee.as_deref(), currency)?,
        method: None,
        net_minor: None,
        created_at: None,
        updated_at: None,
    })
}

/// SimPay is Pix only: every amount is in reais.
fn pix_currency() -> Result<Currency, ParseError> {
    Ok(Currency::from_code("BRL")?)
}

/// The fee in minor units; absent or null is unknown.
fn fee_minor(fee: Option<&RawValue>, currency: Currency) -> Result<Option<i64>, ParseError> {
    match fee {
        Some(fee) if fee.get().trim() != "null" => {
            let money = parse_money(fee, currency).map_err(in_field("fee"))?;
            Ok(Some(money.minor))
        }
        _ => Ok(None),
    }
}

/// The `error` field as reason code: its text when it is a non-empty string, its JSON
/// text when it is anything else; never an error, since the status decides the state.
fn error_text(error: Option<&RawValue>) -> Option<String> {
    let raw = error?.get().trim();
    let text = match serde_json::from_str::<String>(raw) {
        Ok(text) => text,
        Err(_) if raw == "null" => return None,
        Err(_) => raw.to_string(),
    };
    let trimmed = text.trim();
    (!trimmed.is_empty()).then(|| trimmed.to_string())
}

/// `payment_date` when it is RFC 3339 text. SimPay documents no format for it, so other
/// text leaves the time unknown rather than quarantining a valid state change.
fn payment_time(payment_date: Option<&str>) -> Option<chrono::DateTime<chrono::Utc>> {
    parse_rfc3339(payment_date?).ok()
}

/// The status path of SPEC §4.2 (`status_path` overrides it); the id goes in `?id=`, or
/// in place of `{id}` when the override has one.
pub const STATUS_PATH: &str = "/v2/finance/status-cashout/";
/// The OAuth token path of SPEC §4.2 (`token_path` overrides it).
pub const TOKEN_PATH: &str = "/v2/oauth/token";

/// The SimPay API (SPEC §4.2): status only, with a bearer token from OAuth client
/// credentials.
pub struct SimpayClient {
    sender: Sender,
    base_url: Url,
    status_path: String,
    tokens: TokenCache,
}

impl SimpayClient {
    /// The client of `settings`; `None` without the client id or secret.
    pub fn new(settings: &ProviderSettings, sender: Sender) -> Option<SimpayClient> {
        let own = settings.kind_settings::<SimpaySettings>()?;
        let token_path = settings.token_path.as_deref().unwrap_or(TOKEN_PATH);
        let oauth = ClientCredentials {
            token_url: endpoint(&settings.base_url, token_path).ok()?,
            client_id: own.client_id.as_ref()?.value.clone(),
            client_secret: own.client_secret.as_ref()?.value.clone(),
        };
        Some(SimpayClient {
            sender,
            base_url: settings.base_url.clone(),
            status_path: settings
                .status_path
                .clone()
                .unwrap_or_else(|| STATUS_PATH.to_string()),
            tokens: TokenCache::new(oauth),
        })
    }
}

/// The OAuth client-credentials grant: `POST token_path` with a form body.
struct ClientCredentials {
    token_url: Url,
    client_id: SecretString,
    client_secret: SecretString,
}

/// The token answer `{"access_token","token_type","expires_in"}`; `token_type` is not
/// read (the token is always sent as `Bearer`).
#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    expires_in: Option<serde_json::Value>,
}

#[async_trait]
impl TokenSource for ClientCredentials {
    async fn fetch(&self, sender: &Sender) -> Result<FreshToken, ProviderError> {
        let form = serde_urlencoded::to_string([
            ("grant_type", "client_credentials"),
            ("client_id", self.client_id.expose_secret()),
            ("client_secret", self.client_secret.expose_secret()),
        ])
        .map_err(|_| {
            ProviderError::Unauthorized("cannot form-encode the client credentials".to_string())
        })?;
        let reply = sender
            .send(|http| {
                Ok(http
                    .post(self.token_url.clone())
                    .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .header(ACCEPT, "application/json")
                    .body(form.clone()))
            })
            .await?
            .require_login_success()?;
        // The serde message could quote the token: say only what was expected.
        let answer: TokenAnswer = serde_json::from_slice(&reply.body).map_err(|_| {
            ProviderError::Decode("the token answer has no access_token string".to_string())
        })?;
        Ok(FreshToken {
            value: SecretString::from(answer.access_token),
            lifetime: answer.expires_in.as_ref().and_then(seconds_value),
        })
    }
}

/// The part of a status answer that tells "unknown" from "known".
#[derive(Deserialize)]
struct StatusPresence {
    worked: Option<bool>,
    status: Option<serde_json::Value>,
}

#[async_trait]
impl ProviderClient for SimpayClient {
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
        true
    }

    async fn fetch_status(&self, provider_ref: &str) -> Result<Observation, ProviderError> {
        let path = if self.status_path.contains("{id}") {
            fill_id(&self.status_path, provider_ref)?
        } else {
            crate::ids::validate_id("provider_ref", provider_ref)
                .map_err(|err| ProviderError::InvalidId(err.to_string()))?;
            with_query(
                &self.status_path,
                &format!("id={}", encode_component(provider_ref)),
            )
        };
        let url = endpoint(&self.base_url, &path)?;
        let reply = self
            .sender
            .send_authorized(&self.tokens, |http, token| {
                Ok(http
                    .get(url.clone())
                    .header(ACCEPT, "application/json")
                    .header(AUTHORIZATION, bearer_header(token)?))
            })
            .await?;
        if reply.status == 404 {
            return Err(ProviderError::NotFound(provider_ref.to_string()));
        }
        let reply = reply.require_success()?;
        let presence: StatusPresence =
            serde_json::from_slice(&reply.body).map_err(ParseError::from)?;
        let has_status = presence.status.is_some_and(|status| !status.is_null());
        if presence.worked == Some(false) && !has_status {
            return Err(ProviderError::NotFound(provider_ref.to_string()));
        }
        let observation = observation_from_status_answer(&reply.body)?;
        if observation.provider_ref != provider_ref {
            return Err(ProviderError::Decode(format!(
                "asked for transaction {provider_ref}, the answer is about {}",
                observation.provider_ref
            )));
        }
        Ok(observation)
    }
}

// ---- The kind's entry: config keys, settings, default verifier, client ----

impl KindSpec for Simpay {
    fn adapter(&self) -> &'static dyn ProviderAdapter {
        &Simpay
    }

    fn id_fields(&self) -> (&'static str, &'static str) {
        ("transaction_id", "tag")
    }

    fn config_keys(&self) -> &'static [&'static str] {
        &[
            "client_id_env",
            "client_secret_env",
            "token_header",
            "token_env",
        ]
    }

    fn path_overrides(&self) -> &'static [&'static str] {
        &["token_path", "status_path"]
    }

    /// The static token is part of its own scheme only.
    fn keys_unread_with(&self, scheme: SchemeChoice) -> &'static [&'static str] {
        match scheme {
            SchemeChoice::KindDefault => &[],
            _ => &["token_header", "token_env"],
        }
    }

    fn reports_fees(&self) -> bool {
        true
    }

    fn settings(
        &self,
        keys: toml::Table,
        cx: &mut KindContext<'_>,
    ) -> Result<Arc<dyn KindSettings>, ConfigError> {
        let keys: SimpayKeys = cx.parse(keys)?;
        let settings = SimpaySettings {
            client_id: cx.secret(&keys.client_id_env),
            client_secret: cx.secret(&keys.client_secret_env),
            token: cx.secret(&keys.token_env),
            token_header: keys.token_header,
        };
        if settings.token_header.is_some() && settings.token.is_none() {
            return Err(cx.error(
                "token_env",
                "token_header is set, so token_env must name a set variable",
            ));
        }
        Ok(Arc::new(settings))
    }

    fn build_client(
        &self,
        settings: &ProviderSettings,
        sender: Sender,
    ) -> Option<Arc<dyn ProviderClient>> {
        Some(Arc::new(SimpayClient::new(settings, sender)?))
    }

    fn simulator(&self) -> Option<&'static dyn crate::sim::KindSim> {
        Some(&crate::sim::simpay::SimpaySim)
    }
}

/// The `simpay` keys of a `[[providers]]` entry (SPEC §8).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SimpayKeys {
    client_id_env: Option<String>,
    client_secret_env: Option<String>,
    token_header: Option<String>,
    token_env: Option<String>,
}

/// A `simpay` provider's own settings.
#[derive(Debug, Clone)]
pub struct SimpaySettings {
    /// OAuth client credentials of the status endpoint.
    pub client_id: Option<NamedSecret>,
    pub client_secret: Option<NamedSecret>,
    /// An optional static token header on webhooks, and its value.
    pub token_header: Option<String>,
    pub token: Option<NamedSecret>,
}

impl KindSettings for SimpaySettings {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn default_verifier(
        &self,
        secrets: &[SecretString],
        _tolerance_secs: u64,
    ) -> Result<Option<Verifier>, String> {
        let token = match (&self.token_header, &self.token) {
            (Some(header), Some(token)) => Some((header.clone(), token.value.clone())),
            _ => None,
        };
        Ok(Some(Verifier::Hmac(
            HmacScheme::new(crate::verify::hmac::simpay_default(), &secrets.to_vec(), token)
                .map_err(|e| e.0)?,
        )))
    }

    fn token_header(&self) -> Option<&str> {
        self.token_header.as_deref()
    }

    fn credentials(&self) -> Vec<(&'static str, Option<&NamedSecret>)> {
        vec![
            ("client id", self.client_id.as_ref()),
            ("client secret", self.client_secret.as_ref()),
        ]
    }

    fn missing_outbound_credentials(&self, _provider: &ProviderSettings) -> Option<&'static str> {
        if self.client_id.is_none() {
            Some("client_id_env")
        } else if self.client_secret.is_none() {
            Some("client_secret_env")
        } else {
            None
        }
    }

    fn endpoints(&self, provider: &ProviderSettings) -> Vec<String> {
        let base = provider.base_text();
        vec![
            format!(
                "token POST {base}{}",
                provider.token_path.as_deref().unwrap_or(TOKEN_PATH)
            ),
            format!(
                "status GET {base}{}?id={{id}}",
                provider.status_path.as_deref().unwrap_or(STATUS_PATH)
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Money;
    use crate::verify::RequestHeaders;

    fn parse(body: &[u8]) -> Result<Observation, ParseError> {
        let headers = RequestHeaders::new();
        let request = InboundRequest {
            path: "/webhooks/simpay",
            headers: &headers,
            body,
        };
        Simpay.parse_webhook(&request)
    }

    fn brl(minor: i64) -> Option<Money> {
        Some(Money {
            minor,
            currency: Currency::from_code("BRL").unwrap(),
        })
    }

    fn body_with(event_type: &str, status: &str, amount: &str) -> String {
        format!(
            r#"{{"type":"{event_type}","data":{{"transaction_id":1,"status":{status},"amount":{amount},"fee":0.5,"tag":null,"error":null}}}}"#
        )
    }

    #[test]
    fn success_webhook_is_a_completed_observation() {
        let observation = parse(include_bytes!(
            "../../fixtures/webhooks/simpay/PIX_CASHOUT_SUCCESS.json"
        ));
        assert_eq!(
            observation,
            Ok(Observation {
                provider_ref: "78200134".to_string(),
                external_id: Some("ord-2026-000123".to_string()),
                status: Some(StatusUpdate::to(CashoutStatus::Completed)),
                raw_status: Some("SUCCESS".to_string()),
                reason_code: None,
                amount: brl(150_050),
                fee_minor: Some(199),
                method: None,
                net_minor: None,
                created_at: None,
                updated_at: Some(parse_rfc3339("2026-11-20T15:03:10Z").unwrap()),
            })
        );
    }

    #[test]
    fn error_webhook_keeps_the_error_text_as_reason() {
        let observation = parse(include_bytes!(
            "../../fixtures/webhooks/simpay/PIX_CASHOUT_ERROR.json"
        ));
        assert_eq!(
            observation,
            Ok(Observation {
                provider_ref: "78200188".to_string(),
                external_id: Some("ord-2026-000124".to_string()),
                status: Some(StatusUpdate::to(CashoutStatus::Failed)),
                raw_status: Some("ERROR".to_string()),
                reason_code: Some("Chave Pix inválida".to_string()),
                amount: brl(10),
                fee_minor: Some(0),
                method: None,
                net_minor: None,
                created_at: None,
                updated_at: None,
            })
        );
    }

    #[test]
    fn without_a_status_the_event_type_decides() {
        let refund = parse(include_bytes!(
            "../../fixtures/webhooks/simpay/PIX_CASHOUT_REFUND.json"
        ))
        .unwrap();
        assert_eq!(
            refund.status,
            Some(StatusUpdate::to(CashoutStatus::Reversed))
        );
        assert_eq!(refund.raw_status.as_deref(), Some("PIX_CASHOUT_REFUND"));
        assert_eq!(refund.reason_code.as_deref(), Some("MD06"));

        let canceled = parse(include_bytes!(
            "../../fixtures/webhooks/simpay/PIX_CASHOUT_CANCELED.json"
        ))
        .unwrap();
        assert_eq!(
            canceled,
            Observation {
                provider_ref: "78200201".to_string(),
                external_id: Some("ord-2026-000125".to_string()),
                status: Some(StatusUpdate::to(CashoutStatus::Canceled)),
                raw_status: Some("PIX_CASHOUT_CANCELED".to_string()),
                reason_code: None,
                amount: brl(4200),
                fee_minor: Some(0),
                method: None,
                net_minor: None,
                created_at: None,
                updated_at: None,
            }
        );
    }

    #[test]
    fn every_fixture_maps_to_its_state() {
        let cases: [(&[u8], &str, CashoutStatus); 5] = [
            (
                include_bytes!("../../fixtures/webhooks/simpay/PIX_CASHOUT_CREATED.json"),
                "NEW",
                CashoutStatus::Pending,
            ),
            (
                include_bytes!("../../fixtures/webhooks/simpay/PIX_CASHOUT_SUCCESS.json"),
                "SUCCESS",
                CashoutStatus::Completed,
            ),
            (
                include_bytes!("../../fixtures/webhooks/simpay/PIX_CASHOUT_ERROR.json"),
                "ERROR",
                CashoutStatus::Failed,
            ),
            (
                include_bytes!("../../fixtures/webhooks/simpay/PIX_CASHOUT_REFUND.json"),
                "PIX_CASHOUT_REFUND",
                CashoutStatus::Reversed,
            ),
            (
                include_bytes!("../../fixtures/webhooks/simpay/PIX_CASHOUT_CANCELED.json"),
                "PIX_CASHOUT_CANCELED",
                CashoutStatus::Canceled,
            ),
        ];
        for (body, raw_status, status) in cases {
            let observation = parse(body).unwrap();
            assert_eq!(observation.raw_status.as_deref(), Some(raw_status));
            assert_eq!(
                observation.status,
                Some(StatusUpdate::to(status)),
                "{raw_status}"
            );
        }
    }

    #[test]
    fn every_status_and_event_type_maps_as_the_spec_says() {
        let statuses = [
            ("NEW", CashoutStatus::Pending),
            ("PROCESSING", CashoutStatus::Processing),
            ("SUCCESS", CashoutStatus::Completed),
            ("CANCELED", CashoutStatus::Canceled),
            ("ERROR", CashoutStatus::Failed),
            ("REFUND", CashoutStatus::Reversed),
            ("success", CashoutStatus::Completed),
        ];
        for (name, status) in statuses {
            assert_eq!(map_status(name), Ok(StatusUpdate::to(status)), "{name}");
        }
        let event_types = [
            ("PIX_CASHOUT_CREATED", CashoutStatus::Pending),
            ("PIX_CASHOUT_SUCCESS", CashoutStatus::Completed),
            ("PIX_CASHOUT_ERROR", CashoutStatus::Failed),
            ("PIX_CASHOUT_REFUND", CashoutStatus::Reversed),
            ("PIX_CASHOUT_CANCELED", CashoutStatus::Canceled),
        ];
        for (name, status) in event_types {
            assert_eq!(map_event_type(name), Ok(StatusUpdate::to(status)), "{name}");
        }
    }

    #[test]
    fn the_status_wins_over_the_event_type() {
        let body = body_with("PIX_CASHOUT_CREATED", "\"PROCESSING\"", "1");
        let observation = parse(body.as_bytes()).unwrap();
        assert_eq!(
            observation.status,
            Some(StatusUpdate::to(CashoutStatus::Processing))
        );
        assert_eq!(observation.raw_status.as_deref(), Some("PROCESSING"));
    }

    #[test]
    fn unknown_statuses_and_event_types_are_parse_errors() {
        let cases = [
            (
                body_with("PIX_CASHOUT_SUCCESS", "\"PAID\"", "1"),
                "an unknown status",
            ),
            (
                body_with("PIX_CASHOUT_SUCCESS", "\"\"", "1"),
                "an empty status",
            ),
            (
                body_with("PIX_CASHIN_SUCCESS", "\"SUCCESS\"", "1"),
                "an unknown event type",
            ),
            (
                body_with("PIX_CASHOUT_PAID", "null", "1"),
                "an unknown type without status",
            ),
        ];
        for (body, why) in cases {
            assert!(parse(body.as_bytes()).is_err(), "{why} must be rejected");
        }
    }

    #[test]
    fn amounts_are_read_exactly() {
        for (amount, minor) in [
            ("12.34", 1234),
            ("0.1", 10),
            ("\"1500.50\"", 150_050),
            ("7", 700),
        ] {
            let body = body_with("PIX_CASHOUT_SUCCESS", "\"SUCCESS\"", amount);
            let observation = parse(body.as_bytes()).unwrap();
            assert_eq!(observation.amount, brl(minor), "amount {amount}");
            assert_eq!(observation.fee_minor, Some(50));
        }
    }

    #[test]
    fn invalid_payloads_are_parse_errors() {
        let cases = [
            (
                body_with("PIX_CASHOUT_SUCCESS", "\"SUCCESS\"", "12.345"),
                "three decimals",
            ),
            (
                body_with("PIX_CASHOUT_SUCCESS", "\"SUCCESS\"", "null"),
                "a null amount",
            ),
            (
                body_with("PIX_CASHOUT_SUCCESS", "\"SUCCESS\"", "1").replace("0.5", "0.555"),
                "a fee with three decimals",
            ),
            (
                body_with("PIX_CASHOUT_SUCCESS", "\"SUCCESS\"", "1")
                    .replace("\"transaction_id\":1", "\"transaction_id\":1.5"),
                "a fractional id",
            ),
            (r#"{"type":"PIX_CASHOUT_SUCCESS"}"#.to_string(), "no data"),
        ];
        for (body, why) in cases {
            assert!(parse(body.as_bytes()).is_err(), "{why} must be rejected");
        }
    }

    #[test]
    fn status_answer_becomes_an_observation() {
        let observation = observation_from_status_answer(include_bytes!(
            "../../fixtures/responses/simpay/status.json"
        ));
        assert_eq!(
            observation,
            Ok(Observation {
                provider_ref: "78200134".to_string(),
                external_id: Some("ord-2026-000123".to_string()),
                status: Some(StatusUpdate::to(CashoutStatus::Completed)),
                raw_status: Some("SUCCESS".to_string()),
                reason_code: None,
                amount: brl(150_050),
                fee_minor: Some(199),
                method: None,
                net_minor: None,
                created_at: None,
                updated_at: None,
            })
        );
        let failed = observation_from_status_answer(include_bytes!(
            "../../fixtures/responses/simpay/status_error.json"
        ))
        .unwrap();
        assert_eq!(failed.status, Some(StatusUpdate::to(CashoutStatus::Failed)));
        assert_eq!(failed.reason_code.as_deref(), Some("DICT_KEY_NOT_FOUND"));
        assert_eq!(failed.fee_minor, Some(0));
        assert_eq!(failed.amount, brl(10));
    }

    #[test]
    fn status_answer_without_a_status_is_an_error() {
        let body =
            br#"{"worked":false,"transaction_id":1,"amount":0,"erro_descriptor":"not found"}"#;
        let err = observation_from_status_answer(body).unwrap_err();
        assert!(err.0.contains("not found"), "{err}");
    }

    #[test]
    fn peek_reads_the_transaction_id_of_an_unverified_body() {
        let headers = RequestHeaders::new();
        let peek = |body: &[u8]| {
            Simpay.peek_provider_ref(&InboundRequest {
                path: "/webhooks/simpay",
                headers: &headers,
                body,
            })
        };
        assert_eq!(
            peek(include_bytes!(
                "../../fixtures/webhooks/simpay/PIX_CASHOUT_CREATED.json"
            ))
            .as_deref(),
            Some("78200134")
        );
        assert_eq!(peek(br#"{"data":{"transaction_id":-5}}"#), None);
        assert_eq!(peek(br#"{"transaction_id":5}"#), None);
    }
}

#[cfg(test)]
mod client_tests {
    use std::time::Duration;

    use futures_util::future::join_all;
    use tokio::time::Instant;
    use wiremock::matchers::{body_string, header, method, path, query_param};
    use wiremock::{Mock, MockServer, ResponseTemplate};

    use super::*;
    use crate::metrics::Metrics;
    use crate::providers::outbound::test_support::{
        counted, fast_sender, poll, provider_settings, Script,
    };

    const STATUS: &str = "/v2/finance/status-cashout/";

    fn client_with(
        server: &MockServer,
        max_rps: u32,
        timeout: Duration,
        retries: u32,
        metrics: &Metrics,
    ) -> SimpayClient {
        let settings = provider_settings(
            &format!(
                r#"
[[providers]]
id = "simpay"
kind = "simpay"
base_url = "{}"
max_rps = {max_rps}
webhook_secrets_env = ["WH"]
client_id_env = "CLIENT_ID"
client_secret_env = "CLIENT_SECRET"
"#,
                server.uri()
            ),
            &[
                ("WH", "wh"),
                ("CLIENT_ID", "client-1"),
                ("CLIENT_SECRET", "s3cret&="),
            ],
        );
        let poll = poll(timeout, retries);
        SimpayClient::new(&settings, fast_sender(&settings, &poll, metrics)).unwrap()
    }

    fn client(server: &MockServer, metrics: &Metrics) -> SimpayClient {
        client_with(server, 100, Duration::from_secs(5), 2, metrics)
    }

    fn token(value: &str) -> ResponseTemplate {
        ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "access_token": value, "token_type": "Bearer", "expires_in": 3600
        }))
    }

    fn answer(id: u64) -> ResponseTemplate {
        ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "worked": true, "id": id, "transaction_id": id, "status": "SUCCESS",
            "amount": 1500.5, "fee": 1.99, "tag": "ord-1",
            "erro_descriptor": "", "new_erro_descriptor": ""
        }))
    }

    async fn mount_token(server: &MockServer, script: &Script) {
        Mock::given(method("POST"))
            .and(path(TOKEN_PATH))
            .and(header("content-type", "application/x-www-form-urlencoded"))
            .and(body_string(
                "grant_type=client_credentials&client_id=client-1&client_secret=s3cret%26%3D",
            ))
            .respond_with(script.clone())
            .mount(server)
            .await;
    }

    #[tokio::test]
    async fn the_token_is_fetched_once_and_reused_across_calls() {
        let server = MockServer::start().await;
        let tokens = Script::new(vec![token("t1")]);
        mount_token(&server, &tokens).await;
        Mock::given(method("GET"))
            .and(path(STATUS))
            .and(query_param("id", "78200134"))
            .and(header("authorization", "Bearer t1"))
            .respond_with(answer(78200134))
            .expect(3)
            .mount(&server)
            .await;
        let client = client(&server, &Metrics::new());

        for _ in 0..3 {
            let observation = client.fetch_status("78200134").await.unwrap();
            assert_eq!(
                observation.status,
                Some(StatusUpdate::to(CashoutStatus::Completed))
            );
            assert_eq!(observation.external_id.as_deref(), Some("ord-1"));
        }

        assert_eq!(tokens.arrivals().len(), 1);
    }

    #[tokio::test]
    async fn a_401_refreshes_the_token_once_for_all_concurrent_callers() {
        let server = MockServer::start().await;
        let tokens = Script::new(vec![token("t1"), token("t2"), token("t3")]);
        mount_token(&server, &tokens).await;
        let first_t1_then_refused = Script::new(vec![answer(7), ResponseTemplate::new(401)]);
        Mock::given(method("GET"))
            .and(header("authorization", "Bearer t1"))
            .respond_with(first_t1_then_refused.clone())
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(header("authorization", "Bearer t2"))
            .respond_with(answer(7))
            .mount(&server)
            .await;
        let client = client(&server, &Metrics::new());
        client.fetch_status("7").await.unwrap();
        assert_eq!(tokens.arrivals().len(), 1);

        let results = join_all((0..5).map(|_| client.fetch_status("7"))).await;

        assert!(results.iter().all(Result::is_ok), "{results:?}");
        assert_eq!(
            first_t1_then_refused.arrivals().len(),
            6,
            "every caller tried t1"
        );
        assert_eq!(tokens.arrivals().len(), 2, "one shared refresh");
    }

    #[tokio::test]
    async fn refused_credentials_are_unauthorized_after_exactly_one_refresh() {
        let server = MockServer::start().await;
        let tokens = Script::new(vec![token("t1"), token("t2"), token("t3")]);
        mount_token(&server, &tokens).await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(401))
            .expect(2)
            .mount(&server)
            .await;
        let client = client(&server, &Metrics::new());

        let result = client.fetch_status("7").await;

        assert!(
            matches!(result, Err(ProviderError::Unauthorized(_))),
            "{result:?}"
        );
        assert_eq!(
            tokens.arrivals().len(),
            2,
            "one token, then exactly one refresh"
        );
    }

    #[tokio::test]
    async fn a_refused_client_secret_is_unauthorized_without_a_status_call() {
        let server = MockServer::start().await;
        let tokens = Script::new(vec![ResponseTemplate::new(401)
            .set_body_json(serde_json::json!({"error": "invalid_client"}))]);
        mount_token(&server, &tokens).await;
        Mock::given(method("GET"))
            .respond_with(answer(7))
            .expect(0)
            .mount(&server)
            .await;
        let client = client(&server, &Metrics::new());

        let result = client.fetch_status("7").await;

        assert!(
            matches!(result, Err(ProviderError::Unauthorized(_))),
            "{result:?}"
        );
        assert_eq!(tokens.arrivals().len(), 1);
    }

    #[tokio::test]
    async fn an_answer_that_did_not_work_is_not_found() {
        let server = MockServer::start().await;
        mount_token(&server, &Script::new(vec![token("t1")])).await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({
                "worked": false, "amount": 0, "erro_descriptor": "Transação não encontrada"
            })))
            .mount(&server)
            .await;
        let client = client(&server, &Metrics::new());

        let result = client.fetch_status("99").await;

        assert!(
            matches!(result, Err(ProviderError::NotFound(ref id)) if id == "99"),
            "{result:?}"
        );
        assert!(!client.can_search());
        assert!(matches!(
            client
                .search_page(
                    SearchWindow {
                        from: chrono::Utc::now(),
                        to: chrono::Utc::now()
                    },
                    1
                )
                .await,
            Err(ProviderError::NotSupported(_))
        ));
    }

    #[tokio::test]
    async fn a_429_is_retried_after_retry_after() {
        let server = MockServer::start().await;
        mount_token(&server, &Script::new(vec![token("t1")])).await;
        let status = Script::new(vec![
            ResponseTemplate::new(429).insert_header("retry-after", "1"),
            answer(7),
        ]);
        Mock::given(method("GET"))
            .respond_with(status.clone())
            .mount(&server)
            .await;
        let client = client(&server, &Metrics::new());

        client.fetch_status("7").await.unwrap();

        let arrivals = status.arrivals();
        assert_eq!(arrivals.len(), 2);
        assert!(
            arrivals[1] - arrivals[0] >= Duration::from_secs(1),
            "{:?}",
            arrivals[1] - arrivals[0]
        );
    }

    #[tokio::test]
    async fn server_errors_on_the_token_call_are_retried_then_reported() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(502))
            .expect(3)
            .mount(&server)
            .await;
        let metrics = Metrics::new();
        let client = client(&server, &metrics);

        let result = client.fetch_status("7").await;

        assert!(
            matches!(result, Err(ProviderError::Status { status: 502 })),
            "{result:?}"
        );
        assert_eq!(counted(&metrics, "simpay", "http_5xx"), 3);
    }

    #[tokio::test]
    async fn a_slow_status_answer_times_out() {
        let server = MockServer::start().await;
        mount_token(&server, &Script::new(vec![token("t1")])).await;
        Mock::given(method("GET"))
            .respond_with(answer(7).set_delay(Duration::from_secs(3)))
            .expect(3)
            .mount(&server)
            .await;
        let metrics = Metrics::new();
        let client = client_with(&server, 100, Duration::from_millis(150), 2, &metrics);

        let result = client.fetch_status("7").await;

        assert!(
            matches!(result, Err(ProviderError::Unreachable(_))),
            "{result:?}"
        );
        assert_eq!(counted(&metrics, "simpay", "timeout"), 3);
    }

    #[tokio::test]
    async fn token_and_status_calls_share_the_rate_limit() {
        let server = MockServer::start().await;
        mount_token(&server, &Script::new(vec![token("t1")])).await;
        Mock::given(method("GET"))
            .respond_with(answer(7))
            .mount(&server)
            .await;
        let client = client_with(&server, 10, Duration::from_secs(5), 0, &Metrics::new());
        let start = Instant::now();

        let results = join_all((0..10).map(|_| client.fetch_status("7"))).await;

        assert!(results.iter().all(Result::is_ok));
        // 1 token call + 10 status calls = 11 slots 100 ms apart.
        assert!(
            start.elapsed() >= Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
    }
}
