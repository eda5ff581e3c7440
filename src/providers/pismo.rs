//! Pismo integrated-payments cash-out events (SPEC §4.5): status changes by `authorization_id`.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{
    id_text, in_field, optional_id_text, parse_money, parse_rfc3339, peek_json_id, Observation,
    ParseError, ProviderAdapter, ProviderKind,
};
use crate::money::Currency;
use crate::state::{CashoutStatus, StatusUpdate};
use crate::verify::InboundRequest;

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
            _ => Err(ParseError(format!("unknown pismo status {name:?}"))),
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
        .ok_or_else(|| ParseError(format!("unknown ISO 4217 numeric currency {text}")))
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
