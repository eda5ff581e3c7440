//! Tupay / D24 cashouts v3 (SPEC §4.3): thin form notifications, status answers and search items.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{
    id_text, in_field, optional_id_text, parse_json_timestamp, parse_money, parse_rfc3339,
    peek_json_id, sane_peeked_id, status_code, Observation, ObservationPage, ParseError,
    ProviderAdapter, ProviderKind,
};
use crate::money::Currency;
use crate::state::{CashoutStatus, StatusUpdate};
use crate::verify::InboundRequest;

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
        let notification: Notification = serde_urlencoded::from_bytes(request.body)
            .map_err(|err| ParseError(format!("malformed form notification: {err}")))?;
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
            unknown => Err(ParseError(format!(
                "unknown tupay cashout_status {unknown}"
            ))),
        }
    }
}

/// What a rejection (state 3) means, by rejection code (SPEC §4.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rejection {
    /// 826: the money came back after payment.
    Returned,
    /// 809: the cash-out expired.
    Expired,
    /// Any other code, or none: a failure, which reverses a completion it follows.
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
/// `completed`, 2 Cancelled `canceled`, 3 Rejected `reversed` with rejection code 826,
/// `expired` with 809, else `failed` (a reversal when it follows `completed`). Any other
/// status is an error (quarantine). Shared by the status fetch and the search.
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
            Rejection::Expired => StatusUpdate::to(CashoutStatus::Expired),
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
            (3, Some("809"), StatusUpdate::to(CashoutStatus::Expired)),
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
                created_at: at("2026-11-20T11:58:02Z"),
                updated_at: at("2026-11-20T12:05:31Z"),
            }
        );
        assert_eq!(
            items[1],
            Observation {
                provider_ref: "8405190".to_string(),
                external_id: Some("30000000002".to_string()),
                status: Some(StatusUpdate::to(CashoutStatus::Expired)),
                raw_status: Some("3".to_string()),
                reason_code: Some("809".to_string()),
                amount: money(25_000, "CLP"),
                fee_minor: None,
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
