//! Mannco.store cash-outs to Payoneer/Tipalti (SPEC §4.4): no webhooks, history items in USD cents.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{
    amount_text, id_text, in_field, parse_json_timestamp, Observation, ObservationPage, ParseError,
    ProviderAdapter, ProviderKind,
};
use crate::money::{Currency, Money};
use crate::state::{CashoutStatus, StatusUpdate};
use crate::verify::InboundRequest;

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

/// One cash-out of the history. `netAmount` and `method` feed the fee check (SPEC §4.4),
/// not the observation.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct HistoryItem {
    cashout_id: Box<RawValue>,
    amount: Box<RawValue>,
    fee: Option<Box<RawValue>>,
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
            _ => Err(ParseError(format!("unknown mannco status {name:?}"))),
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
            return Err(ParseError(format!("mannco answered an error: {message:?}")));
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
        return Err(ParseError(format!(
            "{text:?} is not a whole number of cents"
        )));
    }
    text.parse::<i64>()
        .map_err(|_| ParseError(format!("{text:?} cents is too large")))
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
