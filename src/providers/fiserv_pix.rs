//! Fiserv LATAM Pix (SPEC §4.1): webhooks and search/status items, states 0–5, fail reasons 0–7.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{
    id_text, in_field, optional_id_text, parse_money, parse_rfc3339, peek_json_id, status_code,
    Observation, ObservationPage, ParseError, ProviderAdapter, ProviderKind,
};
use crate::money::Currency;
use crate::state::{CashoutStatus, StatusUpdate};
use crate::verify::InboundRequest;

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
/// alike. `endToEnd` and `confirmationKey` (null until confirmation) are not read: the book
/// keeps neither, and the raw body is stored anyway.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PixCashout {
    txid: Box<RawValue>,
    status: Box<RawValue>,
    fail_reason: Option<Box<RawValue>>,
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
            unknown => Err(ParseError(format!("unknown fiserv_pix status {unknown}"))),
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

/// Maps one decoded cash-out item. The fail reason is kept as sent, documented or not: the
/// status, not the reason, decides the state.
pub(crate) fn observation_from_item(item: &PixCashout) -> Result<Observation, ParseError> {
    let provider_ref = id_text(&item.txid).map_err(in_field("txid"))?;
    let (raw_status, code) = status_code(&item.status).map_err(in_field("status"))?;
    let status = map_status(code)?;
    let currency = Currency::from_code(&item.currency)
        .map_err(ParseError::from)
        .map_err(in_field("currency"))?;
    let amount = parse_money(&item.amount, currency).map_err(in_field("amount"))?;
    let reason_code =
        optional_id_text(item.fail_reason.as_deref()).map_err(in_field("failReason"))?;
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

#[cfg(test)]
mod tests {
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
