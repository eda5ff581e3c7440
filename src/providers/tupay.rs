//! Tupay / D24 cashouts v3 (SPEC §4.3): thin form notifications, status answers and search items.

use std::any::Any;
use std::sync::Arc;

use async_trait::async_trait;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::client::{ProviderClient, ProviderError, SearchPage as ClientSearchPage, SearchWindow};
use super::outbound::{
    bearer_header, endpoint, post_json_login, with_query, FreshToken, Sender, TokenCache,
    TokenSource,
};
use super::spec::{KindContext, KindSettings, KindSpec};
use super::{
    id_text, in_field, optional_id_text, parse_json_timestamp, parse_money, parse_rfc3339,
    peek_json_id, sane_peeked_id, status_code, Observation, ObservationPage, ParseError,
    ProviderAdapter, ProviderKind,
};
use crate::config::{ConfigError, NamedSecret, ProviderSettings, SchemeChoice};
use crate::money::Currency;
use crate::state::{CashoutStatus, StatusUpdate};
use crate::verify::form_control::FormControl;
use crate::verify::hmac::{hmac_bytes, HmacAlgorithm};
use crate::verify::InboundRequest;
use crate::verify::Verifier;

/// The `tupay` provider kind: notifications only say "go and look"; the state comes from
/// `POST /v3/cashout/status` or the search.
pub struct Tupay;

impl ProviderAdapter for Tupay {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Tupay
    }

    /// A thin observation: the cash-out id, the platform's id and, when `date` is RFC 3339
    /// text, its time. No status (the daemon fetches it).
    fn parse_webhook(&self, request: &InboundRequest<'_>) -> Result<Observation, ParseError> {
        let notification: Notification =
            serde_urlencoded::from_bytes(request.body).map_err(|err| {
                let text = err.to_string();
                // Field names are ours; other messages may quote the sender's values.
                ParseError(
                    if text.starts_with("missing field") || text.starts_with("duplicate field") {
                        format!("malformed form notification: {text}")
                    } else {
                        "malformed form notification".to_string()
                    },
                )
            })?;
        if notification.cashout_id.is_empty() {
            return Err(ParseError("cashout_id: empty id".to_string()));
        }
        let mut observation = Observation::new(notification.cashout_id);
        observation.external_id = notification.external_id.filter(|id| !id.is_empty());
        // Tupay documents no format for `date`: only an unambiguous time is kept.
        observation.updated_at = notification
            .date
            .as_deref()
            .and_then(|date| parse_rfc3339(date).ok());
        Ok(observation)
    }

    /// Reads `cashout_id` from a form body (or, failing that, a JSON one); `None` when it is
    /// absent, given twice with different values, or not a sane id.
    fn peek_provider_ref(&self, request: &InboundRequest<'_>) -> Option<String> {
        if request.body.trim_ascii_start().starts_with(b"{") {
            return peek_json_id(request.body, &["cashout_id"]);
        }
        let fields: Vec<(String, String)> = serde_urlencoded::from_bytes(request.body).ok()?;
        let mut ids = fields
            .iter()
            .filter(|(name, _)| name == "cashout_id")
            .map(|(_, value)| value.as_str());
        let first = ids.next()?;
        if ids.any(|other| other != first) {
            return None;
        }
        sane_peeked_id(first)
    }
}

/// A notification as posted (`application/x-www-form-urlencoded`). `control` is checked by
/// the verifier; `bank_reference_id`, `comments` and `status_reason` are free text the raw
/// body keeps. A field given twice is an error.
#[derive(Debug, Deserialize)]
struct Notification {
    cashout_id: String,
    external_id: Option<String>,
    date: Option<String>,
}

/// The answer of `POST /v3/cashout/status`; `cashout_status_description` and
/// `rejection_reason` are human text the raw answer keeps.
#[derive(Debug, Deserialize)]
struct StatusAnswer {
    cashout_status: Box<RawValue>,
    rejection_code: Option<Box<RawValue>>,
    amount: Box<RawValue>,
    currency: String,
}

/// One item of the search answer.
#[derive(Debug, Deserialize)]
struct SearchItem {
    cashout_id: Box<RawValue>,
    external_id: Option<Box<RawValue>>,
    cashout_status: Box<RawValue>,
    rejection_code: Option<Box<RawValue>>,
    amount: Box<RawValue>,
    currency: String,
    created_at: Option<Box<RawValue>>,
    updated_at: Option<Box<RawValue>>,
}

/// The search answer `{"page","rows","maxRows","data":[…]}`; items stay raw so that one
/// malformed item is reported on its own.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SearchPage {
    data: Vec<Box<RawValue>>,
    max_rows: u64,
}

/// Tupay's cash-out states, by `cashout_status` code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TupayState {
    /// 0
    Pending,
    /// 1
    Completed,
    /// 2
    Cancelled,
    /// 3: see [`Rejection`].
    Rejected,
    /// 4: handed to the bank, not yet confirmed.
    Delivered,
    /// 5: pending, held by Tupay.
    OnHold,
}

impl TupayState {
    fn from_code(code: i64) -> Result<TupayState, ParseError> {
        match code {
            0 => Ok(TupayState::Pending),
            1 => Ok(TupayState::Completed),
            2 => Ok(TupayState::Cancelled),
            3 => Ok(TupayState::Rejected),
            4 => Ok(TupayState::Delivered),
            5 => Ok(TupayState::OnHold),
            _ => Err(ParseError(
                "cashout_status: not a code from 0 to 5".to_string(),
            )),
        }
    }
}

/// What a rejection (state 3) means, by rejection code (SPEC §4.3). Whatever the code, a
/// rejection that follows `completed` is a reversal: SPEC's first rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rejection {
    /// 826: the money came back after payment.
    Returned,
    /// 809: the cash-out expired (a reversal when it follows `completed`).
    Expired,
    /// Any other code, or none: a failure (a reversal when it follows `completed`).
    Failed,
}

impl Rejection {
    fn from_code(rejection_code: Option<&str>) -> Rejection {
        match rejection_code.map(str::trim) {
            Some("826") => Rejection::Returned,
            Some("809") => Rejection::Expired,
            _ => Rejection::Failed,
        }
    }
}

/// Maps a Tupay `cashout_status` (0–5) and rejection code to the canonical state: 0 Pending
/// `pending`, 5 On hold `pending` + held, 4 Delivered `processing`, 1 Completed
/// `completed`, 2 Cancelled `canceled`, 3 Rejected `reversed` when it follows `completed`
/// or with rejection code 826, else `expired` with 809, else `failed`. Any other status is
/// an error (quarantine). Shared by the status fetch and the search.
pub fn map_status(
    cashout_status: i64,
    rejection_code: Option<&str>,
) -> Result<StatusUpdate, ParseError> {
    let update = match TupayState::from_code(cashout_status)? {
        TupayState::Pending => StatusUpdate::to(CashoutStatus::Pending),
        TupayState::OnHold => StatusUpdate {
            status: CashoutStatus::Pending,
            held: true,
            reverses_completed: false,
        },
        TupayState::Delivered => StatusUpdate::to(CashoutStatus::Processing),
        TupayState::Completed => StatusUpdate::to(CashoutStatus::Completed),
        TupayState::Cancelled => StatusUpdate::to(CashoutStatus::Canceled),
        TupayState::Rejected => match Rejection::from_code(rejection_code) {
            Rejection::Returned => StatusUpdate::to(CashoutStatus::Reversed),
            Rejection::Expired => StatusUpdate {
                status: CashoutStatus::Expired,
                held: false,
                reverses_completed: true,
            },
            Rejection::Failed => StatusUpdate {
                status: CashoutStatus::Failed,
                held: false,
                reverses_completed: true,
            },
        },
    };
    Ok(update)
}

/// Parses the answer of `POST /v3/cashout/status` for `cashout_id` (the answer does not
/// repeat it). `cashout_status` and `rejection_code` may be numbers or text.
pub fn observation_from_status_answer(
    cashout_id: &str,
    body: &[u8],
) -> Result<Observation, ParseError> {
    let answer: StatusAnswer = serde_json::from_slice(body)?;
    let mut observation = Observation::new(cashout_id);
    fill_state(
        &mut observation,
        &answer.cashout_status,
        answer.rejection_code.as_deref(),
        &answer.amount,
        &answer.currency,
    )?;
    Ok(observation)
}

/// Parses one search item from its JSON bytes. `created_at`/`updated_at` may be RFC 3339
/// text or unix seconds; `cashout_id` and `rejection_code` numbers or text.
pub fn observation_from_search_item(item_json: &[u8]) -> Result<Observation, ParseError> {
    let item: SearchItem = serde_json::from_slice(item_json)?;
    let mut observation =
        Observation::new(id_text(&item.cashout_id).map_err(in_field("cashout_id"))?);
    observation.external_id =
        optional_id_text(item.external_id.as_deref()).map_err(in_field("external_id"))?;
    fill_state(
        &mut observation,
        &item.cashout_status,
        item.rejection_code.as_deref(),
        &item.amount,
        &item.currency,
    )?;
    observation.created_at =
        optional_time(item.created_at.as_deref()).map_err(in_field("created_at"))?;
    observation.updated_at =
        optional_time(item.updated_at.as_deref()).map_err(in_field("updated_at"))?;
    Ok(observation)
}

/// Parses one page of the search answer; fewer items than `maxRows` means the last page.
pub fn parse_search_page(body: &[u8]) -> Result<ObservationPage, ParseError> {
    let page: SearchPage = serde_json::from_slice(body)?;
    let max_rows = usize::try_from(page.max_rows).unwrap_or(usize::MAX);
    let is_last = page.max_rows == 0 || page.data.len() < max_rows;
    let items = page
        .data
        .iter()
        .map(|item| observation_from_search_item(item.get().as_bytes()))
        .collect();
    Ok(ObservationPage { items, is_last })
}

/// Sets status, raw status, reason code and amount from the fields the status answer and
/// the search items share.
fn fill_state(
    observation: &mut Observation,
    cashout_status: &RawValue,
    rejection_code: Option<&RawValue>,
    amount: &RawValue,
    currency: &str,
) -> Result<(), ParseError> {
    let (raw_status, code) = status_code(cashout_status).map_err(in_field("cashout_status"))?;
    let reason_code = optional_id_text(rejection_code).map_err(in_field("rejection_code"))?;
    let currency = Currency::from_code(currency)
        .map_err(ParseError::from)
        .map_err(in_field("currency"))?;
    observation.status = Some(map_status(code, reason_code.as_deref())?);
    observation.raw_status = Some(raw_status);
    observation.reason_code = reason_code;
    observation.amount = Some(parse_money(amount, currency).map_err(in_field("amount"))?);
    Ok(())
}

fn optional_time(
    raw: Option<&RawValue>,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, ParseError> {
    raw.map(parse_json_timestamp).transpose()
}

/// The status path of SPEC §4.3 (`status_path` overrides it), on `base_url`.
pub const STATUS_PATH: &str = "/v3/cashout/status";
/// The search path of SPEC §4.3 (`search_path` overrides it), on `search_base_url`.
pub const SEARCH_PATH: &str = "/v1/cashouts";
/// The login path of the search API (`login_path` overrides it), on `search_base_url`.
pub const LOGIN_PATH: &str = "/v1/auth/login";

/// The Tupay APIs (SPEC §4.3): the status call signed with `Payload-Signature`, and the
/// search behind a bearer token from a login (on `search_base_url` when set).
pub struct TupayClient {
    sender: Sender,
    status_url: Url,
    search_base_url: Url,
    search_path: String,
    login: SecretString,
    pass: SecretString,
    api_signature: SecretString,
    tokens: TokenCache,
}

impl TupayClient {
    /// The client of `settings`; `None` without the login, pass or API signature key.
    pub fn new(settings: &ProviderSettings, sender: Sender) -> Option<TupayClient> {
        let own = settings.kind_settings::<TupaySettings>()?;
        let search_base_url = own
            .search_base_url
            .clone()
            .unwrap_or_else(|| settings.base_url.clone());
        let login = own.login.as_ref()?.value.clone();
        let pass = own.pass.as_ref()?.value.clone();
        let session = Login {
            url: endpoint(
                &search_base_url,
                settings.login_path.as_deref().unwrap_or(LOGIN_PATH),
            )
            .ok()?,
            login: login.clone(),
            pass: pass.clone(),
        };
        Some(TupayClient {
            sender,
            status_url: endpoint(
                &settings.base_url,
                settings.status_path.as_deref().unwrap_or(STATUS_PATH),
            )
            .ok()?,
            search_base_url,
            search_path: settings
                .search_path
                .clone()
                .unwrap_or_else(|| SEARCH_PATH.to_string()),
            login,
            pass,
            api_signature: own.api_signature.as_ref()?.value.clone(),
            tokens: TokenCache::new(session),
        })
    }
}

/// The body of `POST /v3/cashout/status`, fields in this order.
#[derive(Serialize)]
struct StatusRequest<'a> {
    login: &'a str,
    pass: &'a str,
    cashout_id: &'a str,
}

/// The body of the search API's login.
#[derive(Serialize)]
struct LoginRequest<'a> {
    login: &'a str,
    pass: &'a str,
}

/// The login answer `{"token"}`.
#[derive(Deserialize)]
struct LoginAnswer {
    token: String,
}

/// The search API's login: `POST login_path {"login","pass"}` → `{"token"}`, a token
/// without a stated expiry (kept until a 401).
struct Login {
    url: Url,
    login: SecretString,
    pass: SecretString,
}

#[async_trait]
impl TokenSource for Login {
    async fn fetch(&self, sender: &Sender) -> Result<FreshToken, ProviderError> {
        let body = serde_json::to_vec(&LoginRequest {
            login: self.login.expose_secret(),
            pass: self.pass.expose_secret(),
        })
        .map_err(|_| ProviderError::Unauthorized("cannot encode the login".to_string()))?;
        let reply = post_json_login(sender, &self.url, body).await?;
        // The serde message could quote the token: say only what was expected.
        let answer: LoginAnswer = serde_json::from_slice(&reply.body).map_err(|_| {
            ProviderError::Decode("the login answer has no token string".to_string())
        })?;
        Ok(FreshToken {
            value: SecretString::from(answer.token),
            lifetime: None,
        })
    }
}

/// Lowercase hex HMAC-SHA256(api signature key, exact JSON body): the `Payload-Signature`
/// header of the status call (SPEC §4.3).
pub fn payload_signature(api_signature: &SecretString, body: &[u8]) -> String {
    hex::encode(hmac_bytes(
        HmacAlgorithm::Sha256,
        api_signature.expose_secret().as_bytes(),
        &[body],
    ))
}

#[async_trait]
impl ProviderClient for TupayClient {
    fn first_page(&self) -> u32 {
        0
    }

    fn can_search(&self) -> bool {
        true
    }

    async fn search_page(
        &self,
        window: SearchWindow,
        page: u32,
    ) -> Result<ClientSearchPage, ProviderError> {
        let query = format!(
            "from={}&to={}&page={page}",
            window.from.timestamp(),
            window.to.timestamp()
        );
        let url = endpoint(
            &self.search_base_url,
            &with_query(&self.search_path, &query),
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
        crate::ids::validate_id("cashout_id", provider_ref)
            .map_err(|err| ProviderError::InvalidId(err.to_string()))?;
        // Signed once: the signature covers these exact bytes, sent on every attempt.
        let body = serde_json::to_vec(&StatusRequest {
            login: self.login.expose_secret(),
            pass: self.pass.expose_secret(),
            cashout_id: provider_ref,
        })
        .map_err(|_| ProviderError::Unauthorized("cannot encode the status request".to_string()))?;
        let signature = payload_signature(&self.api_signature, &body);
        let reply = self
            .sender
            .send(|http| {
                Ok(http
                    .post(self.status_url.clone())
                    .header(CONTENT_TYPE, "application/json")
                    .header(ACCEPT, "application/json")
                    .header("Payload-Signature", signature.as_str())
                    .body(body.clone()))
            })
            .await?;
        if reply.status == 404 {
            return Err(ProviderError::NotFound(provider_ref.to_string()));
        }
        let reply = reply.require_success()?;
        Ok(observation_from_status_answer(provider_ref, &reply.body)?)
    }
}

// ---- The kind's entry: config keys, settings, default verifier, client ----

impl KindSpec for Tupay {
    fn adapter(&self) -> &'static dyn ProviderAdapter {
        &Tupay
    }

    fn id_fields(&self) -> (&'static str, &'static str) {
        ("cashout_id", "external_id")
    }

    fn config_keys(&self) -> &'static [&'static str] {
        &[
            "login_env",
            "pass_env",
            "api_signature_env",
            "search_base_url",
            "control_prefix",
            "control_suffix",
        ]
    }

    fn path_overrides(&self) -> &'static [&'static str] {
        &["login_path", "status_path", "search_path"]
    }

    fn keys_unread_with(&self, scheme: SchemeChoice) -> &'static [&'static str] {
        match scheme {
            SchemeChoice::KindDefault => &[],
            _ => &["control_prefix", "control_suffix"],
        }
    }

    fn settings(
        &self,
        keys: toml::Table,
        cx: &mut KindContext<'_>,
    ) -> Result<Arc<dyn KindSettings>, ConfigError> {
        let keys: TupayKeys = cx.parse(keys)?;
        let login = cx.secret(&keys.login_env);
        let pass = cx.secret(&keys.pass_env);
        let api_signature = cx.secret(&keys.api_signature_env);
        let search_base_url = match &keys.search_base_url {
            Some(url) => Some(cx.url("search_base_url", url)?),
            None => None,
        };
        Ok(Arc::new(TupaySettings {
            login,
            pass,
            api_signature,
            search_base_url,
            control_prefix: keys.control_prefix.unwrap_or_else(|| "Be4".to_string()),
            control_suffix: keys.control_suffix.unwrap_or_else(|| "Bo7".to_string()),
        }))
    }

    fn build_client(
        &self,
        settings: &ProviderSettings,
        sender: Sender,
    ) -> Option<Arc<dyn ProviderClient>> {
        Some(Arc::new(TupayClient::new(settings, sender)?))
    }

    fn simulator(&self) -> Option<&'static dyn crate::sim::KindSim> {
        Some(&crate::sim::tupay::TupaySim)
    }
}

/// The `tupay` keys of a `[[providers]]` entry (SPEC §8).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TupayKeys {
    login_env: Option<String>,
    pass_env: Option<String>,
    api_signature_env: Option<String>,
    search_base_url: Option<String>,
    control_prefix: Option<String>,
    control_suffix: Option<String>,
}

/// A `tupay` provider's own settings.
#[derive(Debug, Clone)]
pub struct TupaySettings {
    pub login: Option<NamedSecret>,
    pub pass: Option<NamedSecret>,
    /// Key of the `Payload-Signature` HMAC.
    pub api_signature: Option<NamedSecret>,
    /// The search API's host, when not `base_url`.
    pub search_base_url: Option<Url>,
    /// What the notification `control` HMAC wraps the fields in.
    pub control_prefix: String,
    pub control_suffix: String,
}

impl KindSettings for TupaySettings {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn default_verifier(
        &self,
        secrets: &[SecretString],
        _tolerance_secs: u64,
    ) -> Result<Option<Verifier>, String> {
        Ok(Some(Verifier::FormControl(FormControl::new(
            &secrets.to_vec(),
            self.control_prefix.clone(),
            self.control_suffix.clone(),
        ))))
    }

    fn credentials(&self) -> Vec<(&'static str, Option<&NamedSecret>)> {
        vec![
            ("login", self.login.as_ref()),
            ("pass", self.pass.as_ref()),
            ("api signature key", self.api_signature.as_ref()),
        ]
    }

    fn missing_outbound_credentials(&self, _provider: &ProviderSettings) -> Option<&'static str> {
        if self.login.is_none() {
            Some("login_env")
        } else if self.pass.is_none() {
            Some("pass_env")
        } else if self.api_signature.is_none() {
            Some("api_signature_env")
        } else {
            None
        }
    }

    fn endpoints(&self, provider: &ProviderSettings) -> Vec<String> {
        let base = provider.base_text();
        let search_base = self
            .search_base_url
            .as_ref()
            .map_or(base, |u| u.as_str().trim_end_matches('/'));
        vec![
            format!(
                "status POST {base}{}",
                provider.status_path.as_deref().unwrap_or(STATUS_PATH)
            ),
            format!(
                "login POST {search_base}{}",
                provider.login_path.as_deref().unwrap_or(LOGIN_PATH)
            ),
            format!(
                "search GET {search_base}{}",
                provider.search_path.as_deref().unwrap_or(SEARCH_PATH)
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Money;
    use crate::verify::RequestHeaders;

    const NOTIFICATION: &[u8] = include_bytes!("../../fixtures/webhooks/tupay/notification.txt");

    fn request(body: &[u8]) -> (RequestHeaders, Vec<u8>) {
        let mut headers = RequestHeaders::new();
        headers.insert("content-type", "application/x-www-form-urlencoded");
        (headers, body.to_vec())
    }

    fn parse(body: &[u8]) -> Result<Observation, ParseError> {
        let (headers, body) = request(body);
        Tupay.parse_webhook(&InboundRequest {
            path: "/webhooks/tupay",
            headers: &headers,
            body: &body,
        })
    }

    fn peek(body: &[u8]) -> Option<String> {
        let (headers, body) = request(body);
        Tupay.peek_provider_ref(&InboundRequest {
            path: "/webhooks/tupay",
            headers: &headers,
            body: &body,
        })
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

    fn status_body(status: &str, rejection_code: &str, amount: &str) -> String {
        format!(
            r#"{{"cashout_status":{status},"cashout_status_description":"x","rejection_code":{rejection_code},"rejection_reason":null,"amount":{amount},"currency":"PEN"}}"#
        )
    }

    #[test]
    fn notification_is_a_thin_observation() {
        let mut expected = Observation::new("8405147");
        expected.external_id = Some("30000000001".to_string());
        assert_eq!(parse(NOTIFICATION), Ok(expected.clone()));
        assert!(expected.is_thin());
    }

    #[test]
    fn notification_with_an_rfc3339_date_keeps_it() {
        let observation =
            parse(b"cashout_id=8405147&external_id=&date=2026-11-20T12%3A05%3A31Z").unwrap();
        assert_eq!(observation.external_id, None);
        assert_eq!(observation.updated_at, at("2026-11-20T12:05:31Z"));
    }

    #[test]
    fn malformed_notifications_are_parse_errors() {
        let cases: [(&[u8], &str); 4] = [
            (b"external_id=30000000001&control=AB", "no cashout_id"),
            (b"cashout_id=&external_id=1", "an empty cashout_id"),
            (b"cashout_id=1&cashout_id=2", "cashout_id twice"),
            (b"", "an empty body"),
        ];
        for (body, why) in cases {
            assert!(parse(body).is_err(), "{why} must be rejected");
        }
    }

    #[test]
    fn every_state_code_maps_as_the_spec_says() {
        let failed = StatusUpdate {
            status: CashoutStatus::Failed,
            held: false,
            reverses_completed: true,
        };
        let held = StatusUpdate {
            status: CashoutStatus::Pending,
            held: true,
            reverses_completed: false,
        };
        let cases = [
            (0, None, StatusUpdate::to(CashoutStatus::Pending)),
            (5, None, held),
            (4, None, StatusUpdate::to(CashoutStatus::Processing)),
            (1, None, StatusUpdate::to(CashoutStatus::Completed)),
            (2, None, StatusUpdate::to(CashoutStatus::Canceled)),
            (3, Some("826"), StatusUpdate::to(CashoutStatus::Reversed)),
            (
                3,
                Some("809"),
                StatusUpdate {
                    status: CashoutStatus::Expired,
                    held: false,
                    reverses_completed: true,
                },
            ),
            (3, Some("801"), failed),
            (3, None, failed),
        ];
        for (code, rejection_code, update) in cases {
            assert_eq!(
                map_status(code, rejection_code),
                Ok(update),
                "status {code} rejection {rejection_code:?}"
            );
        }
        for code in [-1, 6, 10] {
            assert!(map_status(code, None).is_err(), "status {code}");
        }
    }

    #[test]
    fn a_rejection_after_completed_is_a_reversal_whatever_its_code() {
        // SPEC §4.3: "3 Rejected → reversed if it follows completed or rejection_code 826,
        // expired if 809, else failed": the first rule wins.
        let state = |status| {
            Some(crate::state::CurrentState {
                status,
                held: false,
            })
        };
        let (completed, processing) = (
            state(CashoutStatus::Completed),
            state(CashoutStatus::Processing),
        );
        for (code, before_completion) in [
            (Some("809"), CashoutStatus::Expired),
            (Some("826"), CashoutStatus::Reversed),
            (Some("801"), CashoutStatus::Failed),
            (None, CashoutStatus::Failed),
        ] {
            let update = map_status(3, code).expect("a rejection");
            assert_eq!(
                crate::state::decide(completed, update).next.status,
                CashoutStatus::Reversed,
                "rejection {code:?} after completed"
            );
            assert_eq!(
                crate::state::decide(processing, update).next.status,
                before_completion,
                "rejection {code:?} before completion"
            );
        }
    }

    #[test]
    fn status_answer_becomes_an_observation_of_the_asked_cashout() {
        let observation = observation_from_status_answer(
            "8405147",
            include_bytes!("../../fixtures/responses/tupay/status.json"),
        );
        let mut expected = Observation::new("8405147");
        expected.status = Some(StatusUpdate::to(CashoutStatus::Completed));
        expected.raw_status = Some("1".to_string());
        expected.amount = money(10_000, "PEN");
        assert_eq!(observation, Ok(expected));
    }

    #[test]
    fn rejected_status_answer_keeps_the_rejection_code() {
        let observation = observation_from_status_answer(
            "8405147",
            include_bytes!("../../fixtures/responses/tupay/status_rejected.json"),
        )
        .unwrap();
        assert_eq!(
            observation.status,
            Some(StatusUpdate::to(CashoutStatus::Reversed))
        );
        assert_eq!(observation.raw_status.as_deref(), Some("3"));
        assert_eq!(observation.reason_code.as_deref(), Some("826"));
        assert_eq!(observation.amount, money(10_000, "PEN"));
    }

    #[test]
    fn status_answers_read_codes_and_amounts_as_sent() {
        let cases = [
            (
                status_body("\"3\"", "809", "12.34"),
                "3",
                Some("809"),
                CashoutStatus::Expired,
                1234,
            ),
            (
                status_body("4", "null", "0.1"),
                "4",
                None,
                CashoutStatus::Processing,
                10,
            ),
            (
                status_body("3", "\"\"", "\"100\""),
                "3",
                None,
                CashoutStatus::Failed,
                10_000,
            ),
        ];
        for (body, raw_status, reason_code, status, minor) in cases {
            let observation = observation_from_status_answer("1", body.as_bytes()).unwrap();
            assert_eq!(
                observation.raw_status.as_deref(),
                Some(raw_status),
                "{body}"
            );
            assert_eq!(observation.reason_code.as_deref(), reason_code, "{body}");
            assert_eq!(
                observation.status.map(|update| update.status),
                Some(status),
                "{body}"
            );
            assert_eq!(observation.amount, money(minor, "PEN"), "{body}");
        }
    }

    #[test]
    fn invalid_status_answers_are_parse_errors() {
        let cases = [
            (status_body("7", "null", "1"), "an unknown status"),
            (status_body("1", "null", "12.345"), "three decimals in PEN"),
            (status_body("1", "null", "null"), "a null amount"),
            (
                status_body("1", "null", "1").replace("PEN", "PESO"),
                "an unknown currency",
            ),
            (
                r#"{"code":401,"description":"Invalid credentials"}"#.to_string(),
                "an error answer",
            ),
        ];
        for (body, why) in cases {
            assert!(
                observation_from_status_answer("1", body.as_bytes()).is_err(),
                "{why} must be rejected"
            );
        }
    }

    #[test]
    fn search_page_maps_each_item() {
        let page = parse_search_page(include_bytes!(
            "../../fixtures/responses/tupay/search_page.json"
        ))
        .unwrap();
        assert!(page.is_last, "3 rows of at most 50");
        let items: Vec<Observation> = page.items.into_iter().map(Result::unwrap).collect();
        assert_eq!(
            items[0],
            Observation {
                provider_ref: "8405147".to_string(),
                external_id: Some("30000000001".to_string()),
                status: Some(StatusUpdate::to(CashoutStatus::Completed)),
                raw_status: Some("1".to_string()),
                reason_code: None,
                amount: money(10_000, "PEN"),
                fee_minor: None,
                method: None,
                net_minor: None,
                created_at: at("2026-11-20T11:58:02Z"),
                updated_at: at("2026-11-20T12:05:31Z"),
            }
        );
        assert_eq!(
            items[1],
            Observation {
                provider_ref: "8405190".to_string(),
                external_id: Some("30000000002".to_string()),
                status: Some(StatusUpdate {
                    status: CashoutStatus::Expired,
                    held: false,
                    reverses_completed: true,
                }),
                raw_status: Some("3".to_string()),
                reason_code: Some("809".to_string()),
                amount: money(25_000, "CLP"),
                fee_minor: None,
                method: None,
                net_minor: None,
                created_at: at("2026-11-20T12:00:00Z"),
                updated_at: at("2026-11-20T13:00:00Z"),
            }
        );
        assert_eq!(items[2].status.map(|update| update.held), Some(true));
        assert_eq!(items[2].amount, money(35_050, "PEN"));
        assert_eq!(items[2].created_at, at("2026-11-20T18:00:00Z"));
        assert_eq!(items[2].updated_at, None);
    }

    #[test]
    fn a_full_search_page_is_not_the_last() {
        let item = r#"{"cashout_id":"1","cashout_status":0,"amount":"1.00","currency":"PEN"}"#;
        let body = format!(r#"{{"page":0,"rows":2,"maxRows":2,"data":[{item},{item}]}}"#);
        let page = parse_search_page(body.as_bytes()).unwrap();
        assert!(!page.is_last);
        assert_eq!(page.items.len(), 2);
    }

    #[test]
    fn one_bad_search_item_does_not_hide_the_others() {
        let good = r#"{"cashout_id":"1","cashout_status":0,"amount":"1.00","currency":"PEN"}"#;
        let bad = good.replace(
            r#""cashout_id":"1""#,
            r#""cashout_id":"2","created_at":"soon""#,
        );
        let body = format!(r#"{{"page":0,"rows":2,"maxRows":50,"data":[{bad},{good}]}}"#);
        let page = parse_search_page(body.as_bytes()).unwrap();
        assert!(page.items[0].is_err());
        assert_eq!(page.items[1].as_ref().unwrap().provider_ref, "1");
    }

    #[test]
    fn peek_reads_the_cashout_id_of_an_unverified_body() {
        assert_eq!(peek(NOTIFICATION).as_deref(), Some("8405147"));
        assert_eq!(
            peek(br#"{"cashout_id":8405147}"#).as_deref(),
            Some("8405147")
        );
        assert_eq!(peek(b"cashout_id=1&cashout_id=1").as_deref(), Some("1"));
        let cases: [(&[u8], &str); 5] = [
            (b"cashout_id=1&cashout_id=2", "two different ids"),
            (b"external_id=1", "no id"),
            (b"cashout_id=a%20b", "a space"),
            (b"cashout_id=%00", "a control character"),
            (b"\xff\xfe=\xff", "not UTF-8"),
        ];
        for (body, why) in cases {
            assert_eq!(peek(body), None, "{why}");
        }
        let long = format!("cashout_id={}", "9".repeat(129));
        assert_eq!(peek(long.as_bytes()), None, "an id over the length limit");
    }
}

#[cfg(test)]
mod client_tests {
    use std::time::Duration;

    use futures_util::future::join_all;
    use tokio::time::Instant;
    use wiremock::matchers::{body_json, header, method, path, query_param};
    use wiremock::{Mock, MockServer, Request, ResponseTemplate};

    use super::*;
    use crate::metrics::Metrics;
    use crate::providers::outbound::test_support::{
        counted, fast_sender, poll, provider_settings, Script,
    };

    const SIGNATURE_KEY: &str = "tupay-signature-key";

    fn client_with(
        server: &MockServer,
        search_server: &MockServer,
        max_rps: u32,
        timeout: Duration,
        retries: u32,
        metrics: &Metrics,
    ) -> TupayClient {
        let settings = provider_settings(
            &format!(
                r#"
[[providers]]
id = "tupay"
kind = "tupay"
base_url = "{}"
search_base_url = "{}"
max_rps = {max_rps}
webhook_secrets_env = ["WH"]
login_env = "LOGIN"
pass_env = "PASS"
api_signature_env = "SIG"
"#,
                server.uri(),
                search_server.uri()
            ),
            &[
                ("WH", "wh"),
                ("LOGIN", "merchant"),
                ("PASS", "p\"ass"),
                ("SIG", SIGNATURE_KEY),
            ],
        );
        let poll = poll(timeout, retries);
        TupayClient::new(&settings, fast_sender(&settings, &poll, metrics)).unwrap()
    }

    fn client(server: &MockServer, metrics: &Metrics) -> TupayClient {
        client_with(server, server, 100, Duration::from_secs(5), 2, metrics)
    }

    fn status_answer() -> ResponseTemplate {
        ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "cashout_status": 1, "cashout_status_description": "Completed",
            "rejection_code": null, "rejection_reason": null, "amount": 100.00, "currency": "PEN"
        }))
    }

    fn login_answer(token: &str) -> ResponseTemplate {
        ResponseTemplate::new(200).set_body_json(serde_json::json!({ "token": token }))
    }

    fn search_answer(page: u32, items: u32) -> ResponseTemplate {
        let data: Vec<serde_json::Value> = (0..items)
            .map(|n| {
                serde_json::json!({
                    "cashout_id": format!("{page}{n}"), "external_id": null, "cashout_status": 0,
                    "rejection_code": null, "amount": "1.00", "currency": "PEN",
                    "created_at": 1795176000, "updated_at": 1795176000
                })
            })
            .collect();
        ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "page": page, "rows": items, "maxRows": 2, "data": data
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
            .and(body_json(
                serde_json::json!({"login": "merchant", "pass": "p\"ass"}),
            ))
            .respond_with(script.clone())
            .mount(server)
            .await;
    }

    fn assert_payload_signed(request: &Request) {
        let sent = request
            .headers
            .get("payload-signature")
            .unwrap()
            .to_str()
            .unwrap();
        let expected = hex::encode(hmac_bytes(
            HmacAlgorithm::Sha256,
            SIGNATURE_KEY.as_bytes(),
            &[&request.body],
        ));
        assert_eq!(sent, expected);
    }

    #[tokio::test]
    async fn status_is_posted_with_a_payload_signature_over_the_exact_body() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path(STATUS_PATH))
            .and(header("content-type", "application/json"))
            .respond_with(status_answer())
            .expect(1)
            .mount(&server)
            .await;
        let client = client(&server, &Metrics::new());

        let observation = client.fetch_status("8405147").await.unwrap();

        assert_eq!(observation.provider_ref, "8405147");
        assert_eq!(
            observation.status,
            Some(StatusUpdate::to(CashoutStatus::Completed))
        );
        let requests = server.received_requests().await.unwrap();
        assert_eq!(
            requests[0].body,
            br#"{"login":"merchant","pass":"p\"ass","cashout_id":"8405147"}"#
        );
        assert_payload_signed(&requests[0]);
    }

    #[test]
    fn the_payload_signature_matches_a_known_vector() {
        // printf '%s' '{"login":"l","pass":"p","cashout_id":"8405147"}' | openssl dgst -sha256 -hmac sig
        let body = br#"{"login":"l","pass":"p","cashout_id":"8405147"}"#;
        assert_eq!(
            payload_signature(&SecretString::from("sig"), body),
            "f65d5da7a437b19113790979a5c47047e785f1e55b73f07252b52c4e09d98c04"
        );
    }

    #[tokio::test]
    async fn refused_status_credentials_are_unauthorized_and_unknown_ids_not_found() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(body_json(
                serde_json::json!({"login": "merchant", "pass": "p\"ass", "cashout_id": "1"}),
            ))
            .respond_with(ResponseTemplate::new(401))
            .expect(1)
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(body_json(
                serde_json::json!({"login": "merchant", "pass": "p\"ass", "cashout_id": "2"}),
            ))
            .respond_with(ResponseTemplate::new(404))
            .expect(1)
            .mount(&server)
            .await;
        let client = client(&server, &Metrics::new());

        let refused = client.fetch_status("1").await;
        let unknown = client.fetch_status("2").await;

        assert!(
            matches!(refused, Err(ProviderError::Unauthorized(_))),
            "{refused:?}"
        );
        assert!(
            matches!(unknown, Err(ProviderError::NotFound(_))),
            "{unknown:?}"
        );
    }

    #[tokio::test]
    async fn search_logs_in_once_and_walks_pages_on_the_search_base_url() {
        let status_server = MockServer::start().await;
        let search_server = MockServer::start().await;
        let logins = Script::new(vec![login_answer("tok-1")]);
        mount_login(&search_server, &logins).await;
        for (page, items) in [(0, 2), (1, 2), (2, 1)] {
            Mock::given(method("GET"))
                .and(path(SEARCH_PATH))
                .and(query_param("from", "1795176000"))
                .and(query_param("to", "1795179600"))
                .and(query_param("page", page.to_string()))
                .and(header("authorization", "Bearer tok-1"))
                .respond_with(search_answer(page, items))
                .expect(1)
                .mount(&search_server)
                .await;
        }
        let client = client_with(
            &status_server,
            &search_server,
            100,
            Duration::from_secs(5),
            2,
            &Metrics::new(),
        );

        let mut page = Some(client.first_page());
        let mut ids = Vec::new();
        while let Some(number) = page {
            let answer = client.search_page(window(), number).await.unwrap();
            ids.extend(
                answer
                    .items
                    .into_iter()
                    .map(|item| item.unwrap().provider_ref),
            );
            page = answer.next_page;
        }

        assert_eq!(ids, ["00", "01", "10", "11", "20"]);
        assert_eq!(logins.arrivals().len(), 1);
        assert!(status_server.received_requests().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_401_on_search_logs_in_again_once() {
        let server = MockServer::start().await;
        let logins = Script::new(vec![login_answer("tok-1"), login_answer("tok-2")]);
        mount_login(&server, &logins).await;
        Mock::given(method("GET"))
            .and(header("authorization", "Bearer tok-1"))
            .respond_with(ResponseTemplate::new(401))
            .expect(1)
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(header("authorization", "Bearer tok-2"))
            .respond_with(search_answer(0, 1))
            .expect(2)
            .mount(&server)
            .await;
        let client = client(&server, &Metrics::new());

        let first = client.search_page(window(), 0).await.unwrap();
        let second = client.search_page(window(), 0).await.unwrap();

        assert_eq!(first.next_page, None, "fewer items than maxRows: last page");
        assert_eq!(second.items.len(), 1);
        assert_eq!(logins.arrivals().len(), 2);
    }

    #[tokio::test]
    async fn bad_credentials_are_unauthorized_after_exactly_one_refresh() {
        let server = MockServer::start().await;
        let logins = Script::new(vec![
            login_answer("tok-1"),
            login_answer("tok-2"),
            login_answer("tok-3"),
        ]);
        mount_login(&server, &logins).await;
        Mock::given(method("GET"))
            .respond_with(ResponseTemplate::new(401))
            .expect(2)
            .mount(&server)
            .await;
        let client = client(&server, &Metrics::new());

        let result = client.search_page(window(), 0).await;

        assert!(
            matches!(result, Err(ProviderError::Unauthorized(_))),
            "{result:?}"
        );
        assert_eq!(logins.arrivals().len(), 2);
    }

    #[tokio::test]
    async fn a_refused_login_is_unauthorized() {
        let server = MockServer::start().await;
        let logins = Script::new(vec![ResponseTemplate::new(403)]);
        mount_login(&server, &logins).await;
        let client = client(&server, &Metrics::new());

        let result = client.search_page(window(), 0).await;

        assert!(
            matches!(result, Err(ProviderError::Unauthorized(_))),
            "{result:?}"
        );
        assert_eq!(logins.arrivals().len(), 1);
    }

    #[tokio::test]
    async fn a_429_on_search_is_retried_after_retry_after() {
        let server = MockServer::start().await;
        mount_login(&server, &Script::new(vec![login_answer("tok-1")])).await;
        let search = Script::new(vec![
            ResponseTemplate::new(429).insert_header("retry-after", "1"),
            search_answer(0, 1),
        ]);
        Mock::given(method("GET"))
            .respond_with(search.clone())
            .mount(&server)
            .await;
        let client = client(&server, &Metrics::new());

        client.search_page(window(), 0).await.unwrap();

        let arrivals = search.arrivals();
        assert_eq!(arrivals.len(), 2);
        assert!(
            arrivals[1] - arrivals[0] >= Duration::from_secs(1),
            "{:?}",
            arrivals[1] - arrivals[0]
        );
    }

    #[tokio::test]
    async fn server_errors_are_retried_with_the_same_signed_body_then_reported() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(500))
            .expect(3)
            .mount(&server)
            .await;
        let metrics = Metrics::new();
        let client = client(&server, &metrics);

        let result = client.fetch_status("8405147").await;

        assert!(
            matches!(result, Err(ProviderError::Status { status: 500 })),
            "{result:?}"
        );
        let requests = server.received_requests().await.unwrap();
        assert_eq!(requests.len(), 3);
        requests.iter().for_each(assert_payload_signed);
        assert_eq!(counted(&metrics, "tupay", "http_5xx"), 3);
    }

    #[tokio::test]
    async fn a_slow_status_answer_times_out() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(status_answer().set_delay(Duration::from_secs(3)))
            .expect(2)
            .mount(&server)
            .await;
        let metrics = Metrics::new();
        let client = client_with(
            &server,
            &server,
            100,
            Duration::from_millis(150),
            1,
            &metrics,
        );

        let result = client.fetch_status("8405147").await;

        assert!(
            matches!(result, Err(ProviderError::Unreachable(_))),
            "{result:?}"
        );
        assert_eq!(counted(&metrics, "tupay", "timeout"), 2);
    }

    #[tokio::test]
    async fn status_fetches_are_paced_to_max_rps() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(status_answer())
            .mount(&server)
            .await;
        let client = client_with(
            &server,
            &server,
            10,
            Duration::from_secs(5),
            0,
            &Metrics::new(),
        );
        let start = Instant::now();

        let results = join_all((0..11).map(|n| {
            let id = n.to_string();
            let client = &client;
            async move { client.fetch_status(&id).await }
        }))
        .await;

        assert!(results.iter().all(Result::is_ok));
        assert!(
            start.elapsed() >= Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
    }
}
