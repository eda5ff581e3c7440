//! The provider plug-in shape: one module per provider kind, listed once in the
//! `provider_kinds!` registry below, and the registry of configured providers.
//!
//! A provider module owns its wire types (they never leave it), the mapping of its states
//! into [`CashoutStatus`](crate::state::CashoutStatus), its outbound client, its config keys and settings, its default
//! verification scheme and its `check-config` lines (`spec::KindSpec`). Everything it
//! reports leaves as an [`Observation`]: the same normalized record from webhooks and polls.

pub mod client;
pub mod outbound;
pub mod registry;
pub mod spec;

#[cfg(test)]
mod robustness;

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::money::{AmountError, Currency, Money};
use crate::state::StatusUpdate;
use crate::verify::InboundRequest;

/// Declares the provider kinds: for each, its module (`src/providers/<module>.rs`, whose
/// unit struct `<Variant>` implements [`spec::KindSpec`]) and its [`ProviderKind`] variant,
/// whose config name is the module's name.
macro_rules! provider_kinds {
    ($($variant:ident => $module:ident,)+) => {
        $(pub mod $module;)+

        /// The provider kinds of SPEC §4.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
        #[serde(rename_all = "snake_case")]
        pub enum ProviderKind {
            $($variant,)+
        }

        impl ProviderKind {
            /// Every kind, in registry order.
            pub const ALL: [ProviderKind; [$(stringify!($variant),)+].len()] =
                [$(ProviderKind::$variant,)+];

            /// The config name of the kind.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(ProviderKind::$variant => stringify!($module),)+
                }
            }

            /// The kind's entry: adapter, config keys, client, simulator.
            pub(crate) fn spec(self) -> &'static dyn spec::KindSpec {
                match self {
                    $(ProviderKind::$variant => &$module::$variant,)+
                }
            }
        }
    };
}

// The registry: one line per provider kind.
provider_kinds! {
    FiservPix => fiserv_pix,
    Simpay => simpay,
    Tupay => tupay,
    Mannco => mannco,
    Pismo => pismo,
}

impl ProviderKind {
    /// The wire names of the provider's cash-out id and of the platform's id it echoes
    /// (SPEC §4), for error messages.
    pub fn id_fields(self) -> (&'static str, &'static str) {
        self.spec().id_fields()
    }

    /// The module implementing this kind.
    pub fn adapter(self) -> &'static dyn ProviderAdapter {
        self.spec().adapter()
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ProviderKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ProviderKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| format!("unknown provider kind {s:?}"))
    }
}

/// What one provider report (webhook, status or search item) says about one cash-out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    /// The provider's own id of the cash-out (SPEC §4).
    pub provider_ref: String,
    /// The platform's id where the provider echoes it.
    pub external_id: Option<String>,
    /// The mapped state; `None` for a thin notification that carries no state.
    pub status: Option<StatusUpdate>,
    /// The provider's status exactly as sent (`"3"`, `"SUCCESS"`).
    pub raw_status: Option<String>,
    /// The provider's reason or rejection code, when it sent one.
    pub reason_code: Option<String>,
    pub amount: Option<Money>,
    /// Fee in minor units of `amount`'s currency.
    pub fee_minor: Option<i64>,
    /// The payout method, where the provider reports one (Mannco `payoneer`/`tipalti`):
    /// it picks the fee schedule's rule.
    pub method: Option<String>,
    /// The net amount the provider reports (amount − fee), in minor units.
    pub net_minor: Option<i64>,
    pub created_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
}

impl Observation {
    /// An observation of `provider_ref` with nothing else known yet.
    pub fn new(provider_ref: impl Into<String>) -> Observation {
        Observation {
            provider_ref: provider_ref.into(),
            external_id: None,
            status: None,
            raw_status: None,
            reason_code: None,
            amount: None,
            fee_minor: None,
            method: None,
            net_minor: None,
            created_at: None,
            updated_at: None,
        }
    }

    /// Checks the ids against the rule of [`crate::ids`] (every provider, webhooks and
    /// polls alike); the error names the provider's field for each.
    pub fn check_ids(&self, kind: ProviderKind) -> Result<(), ParseError> {
        let (ref_field, external_field) = kind.id_fields();
        crate::ids::validate_id(ref_field, &self.provider_ref)?;
        if let Some(external_id) = &self.external_id {
            crate::ids::validate_id(external_field, external_id)?;
        }
        if let Some(reason) = &self.reason_code {
            crate::ids::validate_reason_code("reason code", reason)?;
        }
        Ok(())
    }

    /// True for a notification that only says "go and look".
    pub fn is_thin(&self) -> bool {
        self.status.is_none()
    }
}

/// A verified payload that cannot be parsed or mapped: it is quarantined.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct ParseError(pub String);

/// Longest text a [`ParseError`] built from a library's message may carry.
const MAX_REASON_CHARS: usize = 200;

impl From<AmountError> for ParseError {
    /// The rule broken, never the value (quarantine reasons end up in logs and alerts).
    fn from(err: AmountError) -> Self {
        ParseError(match err {
            AmountError::UnknownCurrency(_) => "not an ISO 4217 currency code".to_string(),
            AmountError::NotANumber(_) => "not a decimal number".to_string(),
            AmountError::TooManyDecimals {
                currency, digits, ..
            } => format!("more decimals than {currency} allows ({digits})"),
            AmountError::Negative(_) => "negative".to_string(),
            AmountError::Overflow(_) => "too large".to_string(),
        })
    }
}

impl From<serde_json::Error> for ParseError {
    fn from(err: serde_json::Error) -> Self {
        ParseError(describe_json_error(&err))
    }
}

impl From<crate::ids::IdError> for ParseError {
    fn from(err: crate::ids::IdError) -> Self {
        ParseError(err.to_string())
    }
}

/// A JSON error as the rule it broke and where, without the offending value: serde
/// quotes values (`invalid type: string "…"`), and a body's values are the sender's.
pub fn describe_json_error(err: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let at = format!("at line {} column {}", err.line(), err.column());
    let text = match err.classify() {
        Category::Io => "unreadable JSON".to_string(),
        Category::Syntax => format!("malformed JSON {at}"),
        Category::Eof => "truncated JSON".to_string(),
        Category::Data => {
            let message = err.to_string();
            let message = message
                .rsplit_once(" at line ")
                .map_or(message.as_str(), |(head, _)| head);
            let rule =
                if message.starts_with("missing field") || message.starts_with("duplicate field") {
                    // The field names are ours (the wire type's), not the sender's.
                    message.to_string()
                } else if let Some((kind, expected)) = message.split_once(", expected ") {
                    let kind = kind.split(':').next().unwrap_or(kind);
                    let kind = kind.split(" `").next().unwrap_or(kind);
                    format!("{kind}, expected {expected}")
                } else {
                    "unexpected value".to_string()
                };
            format!("{rule} {at}")
        }
    };
    bounded(text)
}

/// A provider's own free text (an error message in an answer) for a log line: at most 80
/// characters, quoted and escaped so no control character reaches the log.
pub fn excerpt(text: &str) -> String {
    let cut: String = text.chars().take(80).collect();
    if cut.len() < text.len() {
        format!("{cut:?}…")
    } else {
        format!("{cut:?}")
    }
}

/// `text` cut to [`MAX_REASON_CHARS`] characters.
fn bounded(text: String) -> String {
    match text.char_indices().nth(MAX_REASON_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

/// One provider kind's inbound side: parsing and mapping of its webhooks.
pub trait ProviderAdapter: Send + Sync {
    /// Which kind this is.
    fn kind(&self) -> ProviderKind;

    /// Whether the provider sends webhooks at all (Mannco does not).
    fn sends_webhooks(&self) -> bool {
        true
    }

    /// The provider's own event id carried in the body, when its format has one
    /// (Pismo `event_id`): the dedup key when the scheme signs no request id.
    fn body_event_id(&self, _request: &InboundRequest<'_>) -> Option<String> {
        None
    }

    /// Parses and maps a verified webhook.
    fn parse_webhook(&self, request: &InboundRequest<'_>) -> Result<Observation, ParseError>;

    /// Best-effort read of the cash-out id from an unverified request, so a genuine
    /// webhook signed with a rotated secret can still be resolved by a status fetch.
    /// Never trusted for anything else.
    fn peek_provider_ref(&self, request: &InboundRequest<'_>) -> Option<String>;
}

/// Reads a JSON amount that may be a string (`"12.34"`) or a number (`12.34`) as its exact
/// decimal text, never through a float.
pub fn amount_text(raw: &RawValue) -> Result<String, ParseError> {
    let text = raw.get().trim();
    if text.starts_with('"') {
        let unquoted: String = serde_json::from_str(text)?;
        Ok(unquoted)
    } else if text == "null" {
        Err(ParseError("amount is null".to_string()))
    } else {
        Ok(text.to_string())
    }
}

/// Parses a JSON amount (string or number) in `currency`.
pub fn parse_money(raw: &RawValue, currency: Currency) -> Result<Money, ParseError> {
    Ok(Money::parse(&amount_text(raw)?, currency)?)
}

/// Parses an RFC 3339 timestamp into UTC.
pub fn parse_rfc3339(text: &str) -> Result<DateTime<Utc>, ParseError> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| ParseError("not an RFC 3339 timestamp".to_string()))
}

/// Reads a JSON id that may be a string or an integer as text.
pub fn id_text(raw: &RawValue) -> Result<String, ParseError> {
    let text = raw.get().trim();
    if text.starts_with('"') {
        let unquoted: String = serde_json::from_str(text)?;
        if unquoted.is_empty() {
            return Err(ParseError("empty id".to_string()));
        }
        crate::ids::validate_id("id", &unquoted).map_err(id_rule)?;
        Ok(unquoted)
    } else if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        crate::ids::validate_id("id", text).map_err(id_rule)?;
        Ok(text.to_string())
    } else {
        Err(ParseError("neither a string nor an integer".to_string()))
    }
}

/// An id error without its own field name (the caller's [`in_field`] adds it).
fn id_rule(err: crate::ids::IdError) -> ParseError {
    let text = err.to_string();
    ParseError(text.strip_prefix("id: ").unwrap_or(&text).to_string())
}

/// Reads an optional JSON id or code (string or integer) as text; absent, `null` and `""`
/// are `None`.
pub fn optional_id_text(raw: Option<&RawValue>) -> Result<Option<String>, ParseError> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    match raw.get().trim() {
        "null" | "\"\"" => Ok(None),
        _ => id_text(raw).map(Some),
    }
}

/// Reads a numeric status code sent as an integer (`3`) or a string of digits (`"3"`):
/// the text exactly as sent (unquoted) and its value.
pub fn status_code(raw: &RawValue) -> Result<(String, i64), ParseError> {
    let text = id_text(raw)?;
    let code = text
        .parse::<i64>()
        .map_err(|_| ParseError("not a small integer".to_string()))?;
    Ok((text, code))
}

/// Latest unix second accepted (9999-12-31T23:59:59Z); anything larger is milliseconds
/// or garbage, not seconds.
const MAX_UNIX_SECONDS: i64 = 253_402_300_799;

/// Reads a JSON timestamp given as RFC 3339 text or as unix seconds (an integer or a
/// string of digits).
pub fn parse_json_timestamp(raw: &RawValue) -> Result<DateTime<Utc>, ParseError> {
    let text = raw.get().trim();
    let is_string = text.starts_with('"');
    let unquoted: String = if is_string {
        serde_json::from_str(text)?
    } else {
        text.to_string()
    };
    if !unquoted.is_empty() && unquoted.bytes().all(|b| b.is_ascii_digit()) {
        let out_of_range = || ParseError("not unix seconds (out of range)".to_string());
        let seconds = unquoted.parse::<i64>().map_err(|_| out_of_range())?;
        if seconds > MAX_UNIX_SECONDS {
            return Err(out_of_range());
        }
        return DateTime::from_timestamp(seconds, 0).ok_or_else(out_of_range);
    }
    if is_string {
        parse_rfc3339(&unquoted)
    } else {
        Err(ParseError(
            "neither RFC 3339 text nor unix seconds".to_string(),
        ))
    }
}

/// Prefixes a field name to a parse error, so a quarantined payload says what was wrong.
pub fn in_field(field: &str) -> impl FnOnce(ParseError) -> ParseError + '_ {
    move |err| ParseError(format!("{field}: {err}"))
}

/// Longest id that [`sane_peeked_id`] lets through.
pub const MAX_PEEKED_ID_LEN: usize = 128;

/// Accepts an id read from an unverified body only when it is 1 to [`MAX_PEEKED_ID_LEN`]
/// printable ASCII characters (no space, no control character) and follows the id rule
/// of [`crate::ids`] (no dot segment, no `/`).
pub fn sane_peeked_id(text: &str) -> Option<String> {
    let is_sane = !text.is_empty()
        && text.len() <= MAX_PEEKED_ID_LEN
        && text.bytes().all(|b| b.is_ascii_graphic())
        && crate::ids::valid_id(text).is_some();
    is_sane.then(|| text.to_string())
}

/// Best-effort read of a string-or-integer id at `path` (object keys from the top) of an
/// unverified JSON body: `None` on anything unexpected, never a panic.
pub fn peek_json_id(body: &[u8], path: &[&str]) -> Option<String> {
    let mut value: &RawValue = serde_json::from_slice(body).ok()?;
    for key in path {
        let object: HashMap<String, &RawValue> = serde_json::from_str(value.get()).ok()?;
        value = object.get(*key).copied()?;
    }
    sane_peeked_id(&id_text(value).ok()?)
}

/// One page of a provider's search or history answer, each item mapped on its own.
#[derive(Debug, PartialEq, Eq)]
pub struct ObservationPage {
    /// The items in the provider's order; a malformed item is an error that does not
    /// hide the others.
    pub items: Vec<Result<Observation, ParseError>>,
    /// The provider says no page follows this one.
    pub is_last: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_registry_line_names_its_own_adapter_and_keys() {
        for kind in ProviderKind::ALL {
            assert_eq!(kind.adapter().kind(), kind, "{kind}'s adapter");
            let keys = kind.spec().config_keys();
            let mut unique = keys.to_vec();
            unique.sort_unstable();
            unique.dedup();
            assert_eq!(unique.len(), keys.len(), "{kind} lists a key twice");
        }
    }

    #[test]
    fn json_amounts_keep_their_exact_text() {
        let brl = Currency::from_code("BRL").unwrap();
        for (json, minor) in [
            ("\"12.34\"", 1234),
            ("12.34", 1234),
            ("0.1", 10),
            ("1e3", 100000),
        ] {
            let raw: Box<RawValue> = serde_json::from_str(json).unwrap();
            assert_eq!(parse_money(&raw, brl).unwrap().minor, minor, "{json}");
        }
        let raw: Box<RawValue> = serde_json::from_str("0.105").unwrap();
        assert!(parse_money(&raw, brl).is_err());
        let raw: Box<RawValue> = serde_json::from_str("null").unwrap();
        assert!(parse_money(&raw, brl).is_err());
    }

    #[test]
    fn ids_may_be_strings_or_integers() {
        let raw: Box<RawValue> = serde_json::from_str("78200134").unwrap();
        assert_eq!(id_text(&raw).unwrap(), "78200134");
        let raw: Box<RawValue> = serde_json::from_str("\"tx-1\"").unwrap();
        assert_eq!(id_text(&raw).unwrap(), "tx-1");
        let raw: Box<RawValue> = serde_json::from_str("1.5").unwrap();
        assert!(id_text(&raw).is_err());
    }

    #[test]
    fn optional_ids_treat_null_and_empty_as_absent() {
        for (json, expected) in [
            ("null", None),
            ("\"\"", None),
            ("\"ord-9\"", Some("ord-9")),
            ("826", Some("826")),
        ] {
            let raw: Box<RawValue> = serde_json::from_str(json).unwrap();
            assert_eq!(
                optional_id_text(Some(&raw)).unwrap().as_deref(),
                expected,
                "{json}"
            );
        }
        assert_eq!(optional_id_text(None), Ok(None));
        let raw: Box<RawValue> = serde_json::from_str("{}").unwrap();
        assert!(optional_id_text(Some(&raw)).is_err());
    }

    #[test]
    fn status_codes_keep_their_text() {
        let raw: Box<RawValue> = serde_json::from_str("3").unwrap();
        assert_eq!(status_code(&raw).unwrap(), ("3".to_string(), 3));
        let raw: Box<RawValue> = serde_json::from_str("\"05\"").unwrap();
        assert_eq!(status_code(&raw).unwrap(), ("05".to_string(), 5));
        for json in ["3.0", "-1", "\"three\"", "99999999999999999999", "null"] {
            let raw: Box<RawValue> = serde_json::from_str(json).unwrap();
            assert!(status_code(&raw).is_err(), "{json} must be rejected");
        }
    }

    #[test]
    fn json_timestamps_are_rfc3339_or_unix_seconds() {
        let expected = parse_rfc3339("2026-11-20T12:00:00Z").unwrap();
        for json in [
            "\"2026-11-20T12:00:00Z\"",
            "\"2026-11-20T09:00:00-03:00\"",
            "1795176000",
            "\"1795176000\"",
        ] {
            let raw: Box<RawValue> = serde_json::from_str(json).unwrap();
            assert_eq!(parse_json_timestamp(&raw), Ok(expected), "{json}");
        }
        for json in [
            "1795176000000",
            "1795176000.5",
            "\"yesterday\"",
            "\"\"",
            "null",
            "true",
        ] {
            let raw: Box<RawValue> = serde_json::from_str(json).unwrap();
            assert!(
                parse_json_timestamp(&raw).is_err(),
                "{json} must be rejected"
            );
        }
    }

    #[test]
    fn peeked_ids_are_short_printable_ascii() {
        let body = br#"{"txid":"tx-1","data":{"id":78200134,"bad":"a b"}}"#;
        assert_eq!(peek_json_id(body, &["txid"]).as_deref(), Some("tx-1"));
        assert_eq!(
            peek_json_id(body, &["data", "id"]).as_deref(),
            Some("78200134")
        );
        let long = format!("{{\"txid\":\"{}\"}}", "x".repeat(MAX_PEEKED_ID_LEN + 1));
        let exact = format!("{{\"txid\":\"{}\"}}", "x".repeat(MAX_PEEKED_ID_LEN));
        let cases: [(&[u8], &[&str], &str); 9] = [
            (body, &["data", "bad"], "a space"),
            (body, &["missing"], "an absent key"),
            (body, &["txid", "deeper"], "a path through a string"),
            (b"{\"txid\":", &["txid"], "truncated JSON"),
            (b"[\"tx-1\"]", &["txid"], "an array"),
            (b"\xff\xfe", &["txid"], "not UTF-8"),
            (b"{\"txid\":1.5}", &["txid"], "a float"),
            (
                b"{\"txid\":\"t\\u0000x\"}",
                &["txid"],
                "a control character",
            ),
            (long.as_bytes(), &["txid"], "an id over the length limit"),
        ];
        for (body, path, why) in cases {
            assert_eq!(peek_json_id(body, path), None, "{why}");
        }
        assert!(peek_json_id(exact.as_bytes(), &["txid"]).is_some());
    }
}
