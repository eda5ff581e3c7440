//! Fiserv LATAM Pix (SPEC §4.1): webhooks and search/status items, states 0–5, fail reasons 0–7.

use std::any::Any;
use std::sync::Arc;

use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use reqwest::header::{ACCEPT, AUTHORIZATION};
use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::value::RawValue;
use uuid::Uuid;

use super::client::{ProviderClient, ProviderError, SearchPage as ClientSearchPage, SearchWindow};
use super::outbound::{
    bearer_header, endpoint, fill_id, path_and_query, secret_header, with_query, Reply, Sender,
};
use super::spec::{KindContext, KindSettings, KindSpec};
use super::{
    id_text, in_field, optional_id_text, parse_money, parse_rfc3339, peek_json_id, status_code,
    Observation, ObservationPage, ParseError, ProviderAdapter, ProviderKind,
};
use crate::config::{ConfigError, NamedSecret, ProviderSettings, SchemeChoice};
use crate::money::Currency;
use crate::state::{CashoutStatus, StatusUpdate};
use crate::verify::hmac::{hmac_bytes, HmacAlgorithm, HmacScheme};
use crate::verify::InboundRequest;
use crate::verify::Verifier;

/// The `fiserv_pix` provider kind: one webhook per state change, each carrying the whole
/// cash-out (the same shape as a search or status item).
pub struct FiservPix;

impl ProviderAdapter for FiservPix {
    fn kind(&self) -> ProviderKind {
        ProviderKind::FiservPix
    }

    fn parse_webhook(&self, request: &InboundRequest<'_>) -> Result<Observation, ParseError> {
        observation_from_json(request.body)
    }

    fn peek_provider_ref(&self, request: &InboundRequest<'_>) -> Option<String> {
        peek_json_id(request.body, &["txid"])
    }
}

/// One cash-out as Fiserv sends it: the webhook body, a search item and the status answer
/// alike. `endToEnd` is null until the Pix transaction is confirmed (seed 002), so a
/// Failed item that carries one failed after confirmation: a reversal, whatever order the
/// reports arrive in. `confirmationKey` is not read (the raw body is stored anyway).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PixCashout {
    txid: Box<RawValue>,
    status: Box<RawValue>,
    fail_reason: Option<Box<RawValue>>,
    end_to_end: Option<Box<RawValue>>,
    amount: Box<RawValue>,
    currency: String,
    created_at: Option<String>,
    updated_at: String,
}

/// The search answer of `GET /v2/apm/pix/cashout` (SPEC §4.1, *proposal*). Items stay raw so
/// that one malformed item is reported on its own.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SearchPage {
    items: Vec<Box<RawValue>>,
    page: u64,
    total_pages: u64,
}

/// Fiserv's cash-out states (seed 002), by numeric code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PixCashoutState {
    /// 0: created, under validation; balance locked.
    Created,
    /// 1: awaiting the customer's confirmation (confirmation key sent by webhook).
    Requested,
    /// 2: confirmed and sent to the Pix processor.
    Authorized,
    /// 3: Pix transaction completed.
    Confirmed,
    /// 4: failed for the reason in `failReason`; after 3 it is a reversal.
    Failed,
    /// 5: the confirmation timed out.
    Expired,
}

impl PixCashoutState {
    fn from_code(code: i64) -> Result<PixCashoutState, ParseError> {
        match code {
            0 => Ok(PixCashoutState::Created),
            1 => Ok(PixCashoutState::Requested),
            2 => Ok(PixCashoutState::Authorized),
            3 => Ok(PixCashoutState::Confirmed),
            4 => Ok(PixCashoutState::Failed),
            5 => Ok(PixCashoutState::Expired),
            _ => Err(ParseError("status: not a code from 0 to 5".to_string())),
        }
    }

    fn status_update(self) -> StatusUpdate {
        match self {
            PixCashoutState::Created | PixCashoutState::Requested => {
                StatusUpdate::to(CashoutStatus::Pending)
            }
            PixCashoutState::Authorized => StatusUpdate::to(CashoutStatus::Processing),
            PixCashoutState::Confirmed => StatusUpdate::to(CashoutStatus::Completed),
            PixCashoutState::Failed => StatusUpdate {
                status: CashoutStatus::Failed,
                held: false,
                reverses_completed: true,
            },
            PixCashoutState::Expired => StatusUpdate::to(CashoutStatus::Expired),
        }
    }
}

/// Names of the fail reasons 0–7 (seed 002), indexed by code.
const FAIL_REASON_NAMES: [&str; 8] = [
    "security flag",
    "without limit",
    "without balance",
    "expired",
    "concurrency",
    "processing failure",
    "policy violation",
    "validation error",
];

/// Maps a Fiserv Pix status code (0–5) to the canonical state: 0 Created and 1 Requested
/// are `pending`, 2 Authorized `processing`, 3 Confirmed `completed`, 4 Failed `failed`
/// (a reversal when it follows `completed`), 5 Expired `expired`. Any other code is an
/// error (the payload is quarantined). Shared by webhooks and the poller.
pub fn map_status(status_code: i64) -> Result<StatusUpdate, ParseError> {
    PixCashoutState::from_code(status_code).map(PixCashoutState::status_update)
}

/// The seed's name of a fail reason code (`2` → `"without balance"`), for alerts and the
/// admin view; `None` for a code Fiserv has not documented.
pub fn fail_reason_name(fail_reason: &str) -> Option<&'static str> {
    let index = fail_reason.trim().parse::<usize>().ok()?;
    FAIL_REASON_NAMES.get(index).copied()
}

/// Parses one cash-out item (a webhook body, a search item or the status answer of
/// `GET /v2/apm/pix/cashout/{txid}`) from its JSON bytes.
pub(crate) fn observation_from_json(item_json: &[u8]) -> Result<Observation, ParseError> {
    let item: PixCashout = serde_json::from_slice(item_json)?;
    observation_from_item(&item)
}

/// Maps one decoded cash-out item. The fail reason must be one of the documented 0–7
/// (kept as sent); the status, not the reason, decides the state.
pub(crate) fn observation_from_item(item: &PixCashout) -> Result<Observation, ParseError> {
    let provider_ref = id_text(&item.txid).map_err(in_field("txid"))?;
    let (raw_status, code) = status_code(&item.status).map_err(in_field("status"))?;
    let confirmed = item
        .end_to_end
        .as_deref()
        .is_some_and(|raw| !matches!(raw.get().trim(), "null" | "\"\""));
    let mut status = map_status(code)?;
    if confirmed && status.status == CashoutStatus::Failed {
        status = StatusUpdate::to(CashoutStatus::Reversed);
    }
    let currency = Currency::from_code(&item.currency)
        .map_err(ParseError::from)
        .map_err(in_field("currency"))?;
    let amount = parse_money(&item.amount, currency).map_err(in_field("amount"))?;
    // Seed 002 documents 0–7; anything else is not a Fiserv reason code.
    let not_a_reason = || ParseError("failReason: not an integer from 0 to 7".to_string());
    let reason_code = optional_id_text(item.fail_reason.as_deref()).map_err(|_| not_a_reason())?;
    if reason_code
        .as_deref()
        .is_some_and(|reason| !matches!(reason.as_bytes(), [b'0'..=b'7']))
    {
        return Err(not_a_reason());
    }
    let created_at = item
        .created_at
        .as_deref()
        .map(parse_rfc3339)
        .transpose()
        .map_err(in_field("createdAt"))?;
    let updated_at = parse_rfc3339(&item.updated_at).map_err(in_field("updatedAt"))?;
    Ok(Observation {
        provider_ref,
        external_id: None,
        status: Some(status),
        raw_status: Some(raw_status),
        reason_code,
        amount: Some(amount),
        fee_minor: None,
        method: None,
        net_minor: None,
        created_at,
        updated_at: Some(updated_at),
    })
}

/// Parses one page of the search answer `{"items":[…],"page":n,"totalPages":n}`; the last
/// page is the one whose `page` reaches `totalPages` (pages count from 1).
pub fn parse_search_page(body: &[u8]) -> Result<ObservationPage, ParseError> {
    let page: SearchPage = serde_json::from_slice(body)?;
    let items = page
        .items
        .iter()
        .map(|item| observation_from_json(item.get().as_bytes()))
        .collect();
    Ok(ObservationPage {
        items,
        is_last: page.page >= page.total_pages,
    })
}

/// The search path of SPEC §4.1 (`search_path` overrides it).
pub const SEARCH_PATH: &str = "/v2/apm/pix/cashout";
/// The status path of SPEC §4.1 (`status_path` overrides it; `{id}` is the txid).
pub const STATUS_PATH: &str = "/v2/apm/pix/cashout/{id}";
/// Items asked for per search page.
pub const PAGE_SIZE: u32 = 100;

/// The Fiserv Pix API (SPEC §4.1): search and status, every request signed with
/// `x-hmac-signature` and carrying the static bearer token.
pub struct FiservPixClient {
    sender: Sender,
    base_url: Url,
    search_path: String,
    status_path: String,
    api_key: SecretString,
    api_secret: SecretString,
    bearer_token: SecretString,
}

impl FiservPixClient {
    /// The client of `settings`; `None` without the API key, API secret or bearer token.
    pub fn new(settings: &ProviderSettings, sender: Sender) -> Option<FiservPixClient> {
        let own = settings.kind_settings::<FiservPixSettings>()?;
        Some(FiservPixClient {
            sender,
            base_url: settings.base_url.clone(),
            search_path: settings
                .search_path
                .clone()
                .unwrap_or_else(|| SEARCH_PATH.to_string()),
            status_path: settings
                .status_path
                .clone()
                .unwrap_or_else(|| STATUS_PATH.to_string()),
            api_key: own.api_key.as_ref()?.value.clone(),
            api_secret: own.api_secret.as_ref()?.value.clone(),
            bearer_token: own.bearer_token.as_ref()?.value.clone(),
        })
    }

    /// A signed GET of `url`: a fresh timestamp, request id and signature per attempt,
    /// over the path and query exactly as sent.
    async fn signed_get(&self, url: &Url) -> Result<Reply, ProviderError> {
        let signed_url = path_and_query(url);
        self.sender
            .send(|http| {
                let timestamp = Utc::now().timestamp().to_string();
                let signature = request_signature(
                    &self.api_secret,
                    &self.api_key,
                    &timestamp,
                    b"",
                    &signed_url,
                );
                Ok(http
                    .get(url.clone())
                    .header(ACCEPT, "application/json")
                    .header(
                        "apikey",
                        secret_header(self.api_key.expose_secret(), "api key")?,
                    )
                    .header("x-timestamp", timestamp)
                    .header("x-request-id", Uuid::new_v4().to_string())
                    .header("x-hmac-signature", signature)
                    .header(AUTHORIZATION, bearer_header(&self.bearer_token)?))
            })
            .await
    }
}

/// Base64(HMAC-SHA256(api secret, apikey ‖ x-timestamp ‖ body ‖ URL)) of an outbound
/// request, URL being its path and query as sent (SPEC §4.1).
pub fn request_signature(
    api_secret: &SecretString,
    api_key: &SecretString,
    timestamp: &str,
    body: &[u8],
    signed_url: &str,
) -> String {
    let mac = hmac_bytes(
        HmacAlgorithm::Sha256,
        api_secret.expose_secret().as_bytes(),
        &[
            api_key.expose_secret().as_bytes(),
            timestamp.as_bytes(),
            body,
            signed_url.as_bytes(),
        ],
    );
    BASE64.encode(mac)
}

/// A window bound as the search takes it: RFC 3339 UTC to the second, with `Z`.
fn search_time(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Secs, true)
}

#[async_trait]
impl ProviderClient for FiservPixClient {
    fn first_page(&self) -> u32 {
        1
    }

    fn can_search(&self) -> bool {
        true
    }

    async fn search_page(
        &self,
        window: SearchWindow,
        page: u32,
    ) -> Result<ClientSearchPage, ProviderError> {
        // Built by hand, so the signed text is the text sent, byte for byte.
        let query = format!(
            "from={}&to={}&page={page}&pageSize={PAGE_SIZE}",
            search_time(window.from),
            search_time(window.to)
        );
        let url = endpoint(&self.base_url, &with_query(&self.search_path, &query))?;
        let reply = self.signed_get(&url).await?.require_success()?;
        let parsed = parse_search_page(&reply.body)?;
        Ok(ClientSearchPage {
            items: parsed.items,
            next_page: if parsed.is_last {
                None
            } else {
                page.checked_add(1)
            },
        })
    }

    fn can_fetch_status(&self) -> bool {
        true
    }

    async fn fetch_status(&self, provider_ref: &str) -> Result<Observation, ProviderError> {
        let url = endpoint(&self.base_url, &fill_id(&self.status_path, provider_ref)?)?;
        let reply = self.signed_get(&url).await?;
        if reply.status == 404 {
            return Err(ProviderError::NotFound(provider_ref.to_string()));
        }
        let reply = reply.require_success()?;
        let observation = observation_from_json(&reply.body)?;
        if observation.provider_ref != provider_ref {
            return Err(ProviderError::Decode(format!(
                "asked for txid {provider_ref}, the answer is about {}",
                observation.provider_ref
            )));
        }
        Ok(observation)
    }
}

// ---- The kind's entry: config keys, settings, default verifier, client ----

impl KindSpec for FiservPix {
    fn adapter(&self) -> &'static dyn ProviderAdapter {
        &FiservPix
    }

    fn id_fields(&self) -> (&'static str, &'static str) {
        ("txid", "external_id")
    }

    fn config_keys(&self) -> &'static [&'static str] {
        &["api_key_env", "api_secret_env", "bearer_token_env", "signed_url"]
    }

    fn path_overrides(&self) -> &'static [&'static str] {
        &["search_path", "status_path"]
    }

    /// `signed_url` is the signed URL of its own scheme and of `hmac`'s `{path}`.
    fn keys_unread_with(&self, scheme: SchemeChoice) -> &'static [&'static str] {
        match scheme {
            SchemeChoice::StandardWebhooks | SchemeChoice::Stripe => &["signed_url"],
            SchemeChoice::KindDefault | SchemeChoice::Hmac => &[],
        }
    }

    fn settings(
        &self,
        keys: toml::Table,
        cx: &mut KindContext<'_>,
    ) -> Result<Arc<dyn KindSettings>, ConfigError> {
        let keys: FiservPixKeys = cx.parse(keys)?;
        Ok(Arc::new(FiservPixSettings {
            api_key: cx.secret(&keys.api_key_env),
            api_secret: cx.secret(&keys.api_secret_env),
            bearer_token: cx.secret(&keys.bearer_token_env),
            signed_url: keys.signed_url,
        }))
    }

    fn build_client(
        &self,
        settings: &ProviderSettings,
        sender: Sender,
    ) -> Option<Arc<dyn ProviderClient>> {
        Some(Arc::new(FiservPixClient::new(settings, sender)?))
    }

    fn simulator(&self) -> Option<&'static dyn crate::sim::KindSim> {
        Some(&crate::sim::fiserv_pix::FiservPixSim)
    }
}

/// The `fiserv_pix` keys of a `[[providers]]` entry (SPEC §8).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FiservPixKeys {
    api_key_env: Option<String>,
    api_secret_env: Option<String>,
    bearer_token_env: Option<String>,
    signed_url: Option<String>,
}

/// A `fiserv_pix` provider's own settings.
#[derive(Debug, Clone)]
pub struct FiservPixSettings {
    /// Sent as the `apikey` header.
    pub api_key: Option<NamedSecret>,
    /// Key of the outbound request signatures.
    pub api_secret: Option<NamedSecret>,
    pub bearer_token: Option<NamedSecret>,
    /// The URL Fiserv signs, when a proxy rewrites the path.
    pub signed_url: Option<String>,
}

impl KindSettings for FiservPixSettings {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn default_verifier(
        &self,
        secrets: &[SecretString],
        tolerance_secs: u64,
    ) -> Result<Option<Verifier>, String> {
        let spec = crate::verify::hmac::fiserv_default(self.signed_url.clone(), tolerance_secs);
        Ok(Some(Verifier::Hmac(
            HmacScheme::new(spec, &secrets.to_vec(), None).map_err(|e| e.0)?,
        )))
    }

    fn signed_url(&self) -> Option<&str> {
        self.signed_url.as_deref()
    }

    fn credentials(&self) -> Vec<(&'static str, Option<&NamedSecret>)> {
        vec![
            ("api key", self.api_key.as_ref()),
            ("api secret", self.api_secret.as_ref()),
            ("bearer token", self.bearer_token.as_ref()),
        ]
    }

    fn missing_outbound_credentials(&self, _provider: &ProviderSettings) -> Option<&'static str> {
        if self.api_key.is_none() {
            Some("api_key_env")
        } else if self.api_secret.is_none() {
            Some("api_secret_env")
        } else if self.bearer_token.is_none() {
            Some("bearer_token_env")
        } else {
            None
        }
    }

    fn endpoints(&self, provider: &ProviderSettings) -> Vec<String> {
        let base = provider.base_text();
        vec![
            format!(
                "search GET {base}{}",
                provider.search_path.as_deref().unwrap_or(SEARCH_PATH)
            ),
            format!(
                "status GET {base}{}",
                provider.status_path.as_deref().unwrap_or(STATUS_PATH)
            ),
        ]
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_failure_after_confirmation_is_a_reversal_even_when_it_arrives_first() {
        let confirmed = br#"{"txid":"tx-9","status":4,"failReason":5,"amount":"10.00","currency":"BRL","endToEnd":"E1234","confirmationKey":null,"updatedAt":"2026-11-20T12:00:00Z"}"#;
        let unconfirmed = br#"{"txid":"tx-9","status":4,"failReason":5,"amount":"10.00","currency":"BRL","endToEnd":null,"confirmationKey":null,"updatedAt":"2026-11-20T12:00:00Z"}"#;
        let reversed = observation_from_json(confirmed).unwrap().status.unwrap();
        assert_eq!(reversed.status, CashoutStatus::Reversed);
        let failed = observation_from_json(unconfirmed).unwrap().status.unwrap();
        assert_eq!(failed.status, CashoutStatus::Failed);
        assert!(failed.reverses_completed);
    }
    use super::*;
    use crate::money::Money;
    use crate::verify::RequestHeaders;

    fn parse(body: &[u8]) -> Result<Observation, ParseError> {
        let headers = RequestHeaders::new();
        let request = InboundRequest {
            path: "/webhooks/fiserv",
            headers: &headers,
            body,
        };
        FiservPix.parse_webhook(&request)
    }

    fn item_with(field: &str, raw_json: &str) -> String {
        let mut item: serde_json::Map<String, serde_json::Value> = serde_json::from_str(
            r#"{"txid":"tx-1","status":4,"failReason":2,"amount":"10.00","currency":"BRL","endToEnd":null,"updatedAt":"2026-11-20T12:00:00Z"}"#,
        )
        .unwrap();
        item.insert(field.to_string(), serde_json::from_str(raw_json).unwrap());
        serde_json::Value::Object(item).to_string()
    }

    #[test]
    fn fail_reason_must_be_an_integer_from_0_to_7() {
        for good in ["0", "7", "\"3\"", "null"] {
            assert!(
                parse(item_with("failReason", good).as_bytes()).is_ok(),
                "{good}"
            );
        }
        for bad in [
            "8",
            "-1",
            "\"x\"",
            "1e20",
            "100000000000000000000",
            "\"07\"",
        ] {
            assert_eq!(
                parse(item_with("failReason", bad).as_bytes()),
                Err(ParseError(
                    "failReason: not an integer from 0 to 7".to_string()
                )),
                "{bad}"
            );
        }
    }

    #[test]
    fn quarantine_reasons_name_the_field_and_the_rule_never_the_value() {
        let deep = format!("\"{}\"", "A".repeat(80_000));
        let cases = [
            ("txid", deep.as_str(), "txid: longer than 128 characters"),
            (
                "txid",
                "\"a\\u0000b\"",
                "txid: contains a control character",
            ),
            ("txid", "\"..\"", "txid: is a dot segment or contains '/'"),
            ("status", "\"SECRET-VALUE\"", "status: not a small integer"),
            ("amount", "\"SECRET-VALUE\"", "amount: not a decimal number"),
            (
                "currency",
                "\"SECRET-VALUE\"",
                "currency: not an ISO 4217 currency code",
            ),
            (
                "updatedAt",
                "\"SECRET-VALUE\"",
                "updatedAt: not an RFC 3339 timestamp",
            ),
        ];
        for (field, raw, reason) in cases {
            let err = parse(item_with(field, raw).as_bytes()).expect_err(field);
            assert_eq!(err.0, reason, "{field}");
        }
        let typed = parse(br#"{"txid":"tx-1","status":3,"amount":"1.00","currency":["SECRET-VALUE"],"updatedAt":"x"}"#)
            .expect_err("currency is not a string");
        assert!(!typed.0.contains("SECRET"), "{}", typed.0);
        assert!(
            typed.0.starts_with("invalid type, expected a string"),
            "{}",
            typed.0
        );
    }

    fn brl(minor: i64) -> Option<Money> {
        Some(Money {
            minor,
            currency: Currency::from_code("BRL").unwrap(),
        })
    }

    fn at(text: &str) -> Option<chrono::DateTime<chrono::Utc>> {
        Some(parse_rfc3339(text).unwrap())
    }

    fn body_with(status: &str, amount: &str) -> String {
        format!(
            r#"{{"txid":"tx-1","status":{status},"failReason":null,"amount":{amount},"currency":"BRL","updatedAt":"2026-11-20T12:00:00Z"}}"#
        )
    }

    const TXID: &str = "a1f2c3d4e5f60718293a4b5c6d7e8f90";

    #[test]
    fn confirmed_webhook_is_a_completed_observation() {
        let observation = parse(include_bytes!(
            "../../fixtures/webhooks/fiserv_pix/confirmed.json"
        ));
        assert_eq!(
            observation,
            Ok(Observation {
                provider_ref: TXID.to_string(),
                external_id: None,
                status: Some(StatusUpdate::to(CashoutStatus::Completed)),
                raw_status: Some("3".to_string()),
                reason_code: None,
                amount: brl(150_000),
                fee_minor: None,
                method: None,
                net_minor: None,
                created_at: at("2026-11-20T12:00:00Z"),
                updated_at: at("2026-11-20T12:03:10Z"),
            })
        );
    }

    #[test]
    fn failed_webhook_keeps_the_fail_reason_and_may_reverse_a_completion() {
        let observation = parse(include_bytes!(
            "../../fixtures/webhooks/fiserv_pix/failed.json"
        ));
        assert_eq!(
            observation,
            Ok(Observation {
                provider_ref: "b7e4d2c1a09f8e7d6c5b4a3928170f6e".to_string(),
                external_id: None,
                status: Some(StatusUpdate {
                    status: CashoutStatus::Failed,
                    held: false,
                    reverses_completed: true,
                }),
                raw_status: Some("4".to_string()),
                reason_code: Some("2".to_string()),
                amount: brl(25_050),
                fee_minor: None,
                method: None,
                net_minor: None,
                created_at: None,
                updated_at: at("2026-11-20T16:45:00Z"),
            })
        );
        assert_eq!(fail_reason_name("2"), Some("without balance"));
        assert_eq!(fail_reason_name("8"), None);
    }

    #[test]
    fn every_fixture_maps_to_its_state() {
        let cases: [(&[u8], &str, CashoutStatus, i64); 6] = [
            (
                include_bytes!("../../fixtures/webhooks/fiserv_pix/created.json"),
                "0",
                CashoutStatus::Pending,
                150_000,
            ),
            (
                include_bytes!("../../fixtures/webhooks/fiserv_pix/requested.json"),
                "1",
                CashoutStatus::Pending,
                150_000,
            ),
            (
                include_bytes!("../../fixtures/webhooks/fiserv_pix/authorized.json"),
                "2",
                CashoutStatus::Processing,
                150_000,
            ),
            (
                include_bytes!("../../fixtures/webhooks/fiserv_pix/confirmed.json"),
                "3",
                CashoutStatus::Completed,
                150_000,
            ),
            (
                include_bytes!("../../fixtures/webhooks/fiserv_pix/failed.json"),
                "4",
                CashoutStatus::Failed,
                25_050,
            ),
            (
                include_bytes!("../../fixtures/webhooks/fiserv_pix/expired.json"),
                "5",
                CashoutStatus::Expired,
                8_990,
            ),
        ];
        for (body, raw_status, status, minor) in cases {
            let observation = parse(body).unwrap();
            assert_eq!(observation.raw_status.as_deref(), Some(raw_status));
            assert_eq!(
                observation.status.map(|update| update.status),
                Some(status),
                "status {raw_status}"
            );
            assert_eq!(observation.amount, brl(minor), "status {raw_status}");
            assert_eq!(observation.reason_code.is_some(), raw_status == "4");
        }
    }

    #[test]
    fn every_state_code_maps_as_the_spec_says() {
        let cases = [
            (0, CashoutStatus::Pending, false),
            (1, CashoutStatus::Pending, false),
            (2, CashoutStatus::Processing, false),
            (3, CashoutStatus::Completed, false),
            (4, CashoutStatus::Failed, true),
            (5, CashoutStatus::Expired, false),
        ];
        for (code, status, reverses_completed) in cases {
            let update = map_status(code).unwrap();
            assert_eq!(update.status, status, "code {code}");
            assert_eq!(update.reverses_completed, reverses_completed, "code {code}");
            assert!(!update.held, "code {code}");
        }
    }

    #[test]
    fn unknown_status_codes_are_parse_errors() {
        for code in [-1, 6, 42] {
            assert!(map_status(code).is_err(), "code {code}");
        }
        for status in ["6", "\"3a\"", "3.0", "null", "\"\""] {
            assert!(
                parse(body_with(status, "\"1.00\"").as_bytes()).is_err(),
                "status {status}"
            );
        }
    }

    #[test]
    fn a_status_sent_as_text_keeps_its_text() {
        let observation = parse(body_with("\"3\"", "\"1.00\"").as_bytes()).unwrap();
        assert_eq!(observation.raw_status.as_deref(), Some("3"));
        assert_eq!(
            observation.status,
            Some(StatusUpdate::to(CashoutStatus::Completed))
        );
    }

    #[test]
    fn amounts_are_read_exactly_from_strings_and_numbers() {
        let cases = [
            ("12.34", 1234),
            ("\"12.34\"", 1234),
            ("0.1", 10),
            ("0.01", 1),
            ("1234567.89", 123_456_789),
            ("100", 10_000),
            ("\"1.10\"", 110),
        ];
        for (amount, minor) in cases {
            let observation = parse(body_with("3", amount).as_bytes()).unwrap();
            assert_eq!(observation.amount, brl(minor), "amount {amount}");
        }
    }

    #[test]
    fn invalid_payloads_are_parse_errors() {
        let valid = body_with("3", "\"1.00\"");
        let cases = [
            (body_with("3", "12.345"), "three decimals in BRL"),
            (body_with("3", "\"0.001\""), "three decimals as text"),
            (body_with("3", "-1.00"), "a negative amount"),
            (body_with("3", "null"), "a null amount"),
            (body_with("3", "\"12,34\""), "a decimal comma"),
            (valid.replace("BRL", "XYZ"), "an unknown currency"),
            (
                valid.replace("2026-11-20T12:00:00Z", "20/11/2026"),
                "a non RFC 3339 time",
            ),
            (valid.replace("\"tx-1\"", "null"), "a null txid"),
            (valid.replace(r#""txid":"tx-1","#, ""), "no txid"),
            (
                valid.replace(r#""updatedAt""#, r#""updated""#),
                "no updatedAt",
            ),
            ("not json".to_string(), "not JSON"),
        ];
        for (body, why) in cases {
            assert!(parse(body.as_bytes()).is_err(), "{why} must be rejected");
        }
    }

    #[test]
    fn status_answer_parses_like_a_webhook() {
        let observation = observation_from_json(include_bytes!(
            "../../fixtures/responses/fiserv_pix/status.json"
        ))
        .unwrap();
        assert_eq!(observation.provider_ref, "d4c3b2a1f0e9d8c7b6a5948372615049");
        assert_eq!(
            observation.status,
            Some(StatusUpdate::to(CashoutStatus::Processing))
        );
        assert_eq!(observation.amount, brl(1234));
        assert_eq!(observation.updated_at, at("2026-11-20T17:11:30Z"));
    }

    #[test]
    fn search_page_maps_each_item_and_knows_more_pages_follow() {
        let page = parse_search_page(include_bytes!(
            "../../fixtures/responses/fiserv_pix/search_page.json"
        ))
        .unwrap();
        assert!(!page.is_last, "page 1 of 2");
        let items: Vec<Observation> = page.items.into_iter().map(Result::unwrap).collect();
        let summary: Vec<_> = items
            .iter()
            .map(|o| {
                (
                    o.provider_ref.as_str(),
                    o.status.map(|update| update.status),
                    o.reason_code.as_deref(),
                    o.amount.map(|money| money.minor),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (TXID, Some(CashoutStatus::Completed), None, Some(150_000)),
                (
                    "b7e4d2c1a09f8e7d6c5b4a3928170f6e",
                    Some(CashoutStatus::Failed),
                    Some("2"),
                    Some(25_050)
                ),
                (
                    "d4c3b2a1f0e9d8c7b6a5948372615049",
                    Some(CashoutStatus::Pending),
                    None,
                    Some(1234)
                ),
            ]
        );
    }

    #[test]
    fn one_bad_search_item_does_not_hide_the_others() {
        let body = format!(
            r#"{{"items":[{},{}],"page":2,"totalPages":2}}"#,
            body_with("9", "\"1.00\""),
            body_with("2", "\"1.00\"")
        );
        let page = parse_search_page(body.as_bytes()).unwrap();
        assert!(page.is_last);
        assert!(page.items[0].is_err());
        assert_eq!(page.items[1].as_ref().unwrap().provider_ref, "tx-1");
    }

    #[test]
    fn peek_reads_the_txid_of_an_unverified_body() {
        let headers = RequestHeaders::new();
        let peek = |body: &[u8]| {
            FiservPix.peek_provider_ref(&InboundRequest {
                path: "/webhooks/fiserv",
                headers: &headers,
                body,
            })
        };
        assert_eq!(
            peek(include_bytes!(
                "../../fixtures/webhooks/fiserv_pix/created.json"
            ))
            .as_deref(),
            Some(TXID)
        );
        assert_eq!(peek(b"{\"txid\":\"tx\\n1\"}"), None);
        assert_eq!(peek(b"{\"status\":3}"), None);
        assert_eq!(peek(b""), None);
    }
}

#[cfg(test)]
mod client_tests {
    use std::time::Duration;

    use base64::engine::general_purpose::STANDARD as BASE64;
    use base64::Engine as _;
    use futures_util::future::join_all;
    use secrecy::SecretString;
    use tokio::time::Instant;
    use wiremock::matchers::{method, path, query_param};
    use wiremock::{Mock, MockServer, Request, ResponseTemplate};

    use super::*;
    use crate::metrics::Metrics;
    use crate::providers::outbound::test_support::{
        counted, fast_sender, poll, provider_settings, Script,
    };

    const API_KEY: &str = "fiserv-api-key";
    const API_SECRET: &str = "fiserv-api-secret";
    const BEARER: &str = "fiserv-bearer";
    const TXID: &str = "d4c3b2a1f0e9d8c7b6a5948372615049";

    fn client_with(
        server: &MockServer,
        max_rps: u32,
        timeout: Duration,
        retries: u32,
        metrics: &Metrics,
    ) -> FiservPixClient {
        let settings = provider_settings(
            &format!(
                r#"
[[providers]]
id = "fiserv"
kind = "fiserv_pix"
base_url = "{}"
max_rps = {max_rps}
webhook_secrets_env = ["WH"]
api_key_env = "KEY"
api_secret_env = "SECRET"
bearer_token_env = "BEARER"
"#,
                server.uri()
            ),
            &[
                ("WH", "wh"),
                ("KEY", API_KEY),
                ("SECRET", API_SECRET),
                ("BEARER", BEARER),
            ],
        );
        let poll = poll(timeout, retries);
        FiservPixClient::new(&settings, fast_sender(&settings, &poll, metrics)).unwrap()
    }

    fn client(server: &MockServer, metrics: &Metrics) -> FiservPixClient {
        client_with(server, 100, Duration::from_secs(5), 2, metrics)
    }

    fn status_json(txid: &str) -> serde_json::Value {
        serde_json::json!({
            "txid": txid, "status": 2, "failReason": null, "amount": "12.34", "currency": "BRL",
            "endToEnd": null, "confirmationKey": null,
            "createdAt": "2026-11-20T17:10:00Z", "updatedAt": "2026-11-20T17:11:30Z"
        })
    }

    fn page_json(page: u32, total_pages: u32) -> serde_json::Value {
        let items: Vec<serde_json::Value> = (0..2)
            .map(|n| status_json(&format!("tx-{page}-{n}")))
            .collect();
        serde_json::json!({ "items": items, "page": page, "totalPages": total_pages })
    }

    fn window() -> SearchWindow {
        SearchWindow {
            from: parse_rfc3339("2026-11-20T12:00:00Z").unwrap(),
            to: parse_rfc3339("2026-11-20T12:05:00.750Z").unwrap(),
        }
    }

    /// Recomputes the signature from what the server received.
    fn assert_signed(request: &Request) {
        let header = |name: &str| {
            request
                .headers
                .get(name)
                .unwrap()
                .to_str()
                .unwrap()
                .to_string()
        };
        assert_eq!(header("apikey"), API_KEY);
        assert_eq!(header("authorization"), format!("Bearer {BEARER}"));
        let timestamp = header("x-timestamp");
        let skew = Utc::now().timestamp() - timestamp.parse::<i64>().unwrap();
        assert!((0..=5).contains(&skew), "x-timestamp is unix seconds, now");
        assert!(Uuid::parse_str(&header("x-request-id")).is_ok());
        let url = match request.url.query() {
            Some(query) => format!("{}?{query}", request.url.path()),
            None => request.url.path().to_string(),
        };
        let mut signed = format!("{API_KEY}{timestamp}").into_bytes();
        signed.extend_from_slice(&request.body);
        signed.extend_from_slice(url.as_bytes());
        let expected = BASE64.encode(hmac_bytes(
            HmacAlgorithm::Sha256,
            API_SECRET.as_bytes(),
            &[&signed],
        ));
        assert_eq!(header("x-hmac-signature"), expected, "signature over {url}");
    }

    #[tokio::test]
    async fn search_walks_every_page_with_requests_the_server_can_verify() {
        let server = MockServer::start().await;
        for page in 1..=3 {
            Mock::given(method("GET"))
                .and(path(SEARCH_PATH))
                .and(query_param("page", page.to_string()))
                .respond_with(ResponseTemplate::new(200).set_body_json(page_json(page, 3)))
                .expect(1)
                .mount(&server)
                .await;
        }
        let client = client(&server, &Metrics::new());

        let mut page = Some(client.first_page());
        let mut txids = Vec::new();
        while let Some(number) = page {
            let answer = client.search_page(window(), number).await.unwrap();
            txids.extend(
                answer
                    .items
                    .into_iter()
                    .map(|item| item.unwrap().provider_ref),
            );
            page = answer.next_page;
        }

        assert_eq!(
            txids,
            ["tx-1-0", "tx-1-1", "tx-2-0", "tx-2-1", "tx-3-0", "tx-3-1"]
        );
        let requests = server.received_requests().await.unwrap();
        assert_eq!(
            requests[0].url.query(),
            Some("from=2026-11-20T12:00:00Z&to=2026-11-20T12:05:00Z&page=1&pageSize=100")
        );
        let mut request_ids: Vec<_> = requests
            .iter()
            .map(|r| r.headers.get("x-request-id").unwrap().clone())
            .collect();
        request_ids.dedup();
        assert_eq!(request_ids.len(), 3, "a fresh x-request-id per request");
        requests.iter().for_each(assert_signed);
    }

    #[tokio::test]
    async fn status_is_fetched_signed_and_an_unknown_txid_is_not_found() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path(format!("/v2/apm/pix/cashout/{TXID}")))
            .respond_with(ResponseTemplate::new(200).set_body_json(status_json(TXID)))
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path("/v2/apm/pix/cashout/unknown"))
            .respond_with(ResponseTemplate::new(404))
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path("/v2/apm/pix/cashout/other"))
            .respond_with(ResponseTemplate::new(200).set_body_json(status_json(TXID)))
            .mount(&server)
            .await;
        let client = client(&server, &Metrics::new());

        let observation = client.fetch_status(TXID).await.unwrap();
        let unknown = client.fetch_status("unknown").await;
        let mismatched = client.fetch_status("other").await;

        assert_eq!(observation.provider_ref, TXID);
        assert_eq!(
            observation.status,
            Some(StatusUpdate::to(CashoutStatus::Processing))
        );
        assert!(matches!(unknown, Err(ProviderError::NotFound(id)) if id == "unknown"));
        assert!(
            matches!(mismatched, Err(ProviderError::Decode(_))),
            "{mismatched:?}"
        );
        server
            .received_requests()
            .await
            .unwrap()
            .iter()
            .for_each(assert_signed);
    }

    #[tokio::test]
    async fn a_refused_bearer_token_is_unauthorized_at_once() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(401))
            .expect(1)
            .mount(&server)
            .await;
        let metrics = Metrics::new();
        let client = client(&server, &metrics);

        let result = client.fetch_status(TXID).await;

        assert!(
            matches!(result, Err(ProviderError::Unauthorized(_))),
            "{result:?}"
        );
        assert_eq!(counted(&metrics, "fiserv", "http_4xx"), 1);
    }

    #[tokio::test]
    async fn a_429_is_retried_after_retry_after_with_a_fresh_signature() {
        let server = MockServer::start().await;
        let script = Script::new(vec![
            ResponseTemplate::new(429).insert_header("retry-after", "1"),
            ResponseTemplate::new(200).set_body_json(status_json(TXID)),
        ]);
        Mock::given(method("GET"))
            .respond_with(script.clone())
            .mount(&server)
            .await;
        let metrics = Metrics::new();
        let client = client(&server, &metrics);

        let observation = client.fetch_status(TXID).await.unwrap();

        assert_eq!(observation.provider_ref, TXID);
        let arrivals = script.arrivals();
        assert_eq!(arrivals.len(), 2);
        assert!(
            arrivals[1] - arrivals[0] >= Duration::from_secs(1),
            "{:?}",
            arrivals[1] - arrivals[0]
        );
        assert_eq!(counted(&metrics, "fiserv", "throttled"), 1);
        assert_eq!(counted(&metrics, "fiserv", "ok"), 1);
        let requests = server.received_requests().await.unwrap();
        assert_ne!(
            requests[0].headers.get("x-request-id"),
            requests[1].headers.get("x-request-id")
        );
        requests.iter().for_each(assert_signed);
    }

    #[tokio::test]
    async fn server_errors_are_retried_then_reported() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(503))
            .expect(3)
            .mount(&server)
            .await;
        let metrics = Metrics::new();
        let client = client(&server, &metrics);

        let result = client.search_page(window(), 1).await;

        assert!(
            matches!(result, Err(ProviderError::Status { status: 503 })),
            "{result:?}"
        );
        assert_eq!(counted(&metrics, "fiserv", "http_5xx"), 3);
    }

    #[tokio::test]
    async fn a_slow_provider_times_out_and_is_reported_unreachable() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(status_json(TXID))
                    .set_delay(Duration::from_secs(3)),
            )
            .expect(2)
            .mount(&server)
            .await;
        let metrics = Metrics::new();
        let client = client_with(&server, 100, Duration::from_millis(150), 1, &metrics);
        let start = Instant::now();

        let result = client.fetch_status(TXID).await;

        assert!(
            matches!(result, Err(ProviderError::Unreachable(_))),
            "{result:?}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "gave up after the timeouts, not the delay"
        );
        assert_eq!(counted(&metrics, "fiserv", "timeout"), 2);
    }

    #[tokio::test]
    async fn concurrent_requests_are_paced_to_max_rps() {
        let server = MockServer::start().await;
        let script = Script::new(vec![
            ResponseTemplate::new(200).set_body_json(status_json(TXID))
        ]);
        Mock::given(method("GET"))
            .respond_with(script.clone())
            .mount(&server)
            .await;
        let client = client_with(&server, 10, Duration::from_secs(5), 0, &Metrics::new());
        let start = Instant::now();

        let results = join_all((0..11).map(|_| client.fetch_status(TXID))).await;

        assert!(results.iter().all(Result::is_ok));
        assert!(
            start.elapsed() >= Duration::from_secs(1),
            "11 requests at 10/s: {:?}",
            start.elapsed()
        );
        let mut arrivals = script.arrivals();
        arrivals.sort();
        for pair in arrivals.windows(2) {
            assert!(
                pair[1] - pair[0] >= Duration::from_millis(50),
                "no burst: {:?}",
                pair[1] - pair[0]
            );
        }
    }

    #[test]
    fn the_signature_matches_a_known_vector() {
        // HMAC-SHA256("secret", "key" ‖ "1700000000" ‖ "" ‖ "/v2/apm/pix/cashout/tx-1").
        let signature = request_signature(
            &SecretString::from("secret"),
            &SecretString::from("key"),
            "1700000000",
            b"",
            "/v2/apm/pix/cashout/tx-1",
        );
        // openssl dgst -sha256 -hmac secret -binary | base64
        let expected = "748O+f3mXLJ8lRfEBQ/FwUouuOBPViugEy5/7lDQ83s=";
        assert_eq!(signature, expected);
    }
}
