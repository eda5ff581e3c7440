//! The one rule every id from outside must follow (provider refs, external ids, ledger ids).
//!
//! An id is 1 to [`MAX_ID_CHARS`] characters, not only spaces, with no control character,
//! no bidirectional override or isolate (U+202A–U+202E, U+2066–U+2069: they make a log
//! line or a console cell read differently from what it holds) and no U+FFFD (the mark of
//! bytes that were not UTF-8); it is not `.` or `..` and contains no `/`, so that placed
//! in a URL path it stays one segment and never climbs to another endpoint of the
//! provider's API. Reason codes follow the same character rule, up to
//! [`MAX_REASON_CHARS`]. The rule is applied to webhooks, polled items, the status-fetch
//! queue and the ledger alike; an error names the field and the rule, never the value.

/// Longest id accepted, in characters.
pub const MAX_ID_CHARS: usize = 128;

/// Longest reason code accepted, in characters (some providers send a short text).
pub const MAX_REASON_CHARS: usize = 256;

/// Why an id breaks the rule. `Display` names the field and the rule, never the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{field}: empty")]
    Empty { field: String },
    #[error("{field}: longer than {max} characters")]
    TooLong { field: String, max: usize },
    #[error("{field}: contains a control character")]
    ControlCharacter { field: String },
    #[error("{field}: contains a bidirectional override character")]
    BidiOverride { field: String },
    #[error("{field}: contains U+FFFD (bytes that were not UTF-8)")]
    NotUtf8 { field: String },
    #[error("{field}: is a dot segment or contains '/'")]
    PathSegment { field: String },
}

/// Whether `c` is a bidirectional embedding/override (U+202A–U+202E) or isolate
/// (U+2066–U+2069).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Checks `value` against the id rule; `field` names it in the error.
pub fn validate_id(field: &str, value: &str) -> Result<(), IdError> {
    check_printable(field, value, MAX_ID_CHARS)?;
    if value == "." || value == ".." || value.contains('/') {
        return Err(IdError::PathSegment {
            field: field.to_string(),
        });
    }
    Ok(())
}

/// Checks a provider's reason or rejection code: the id rule's characters and at most
/// [`MAX_REASON_CHARS`] characters (it never goes into a URL, so dots and `/` may appear).
pub fn validate_reason_code(field: &str, value: &str) -> Result<(), IdError> {
    check_printable(field, value, MAX_REASON_CHARS)
}

/// Not empty, at most `max` characters, none of them a control, bidirectional or
/// replacement character.
fn check_printable(field: &str, value: &str, max: usize) -> Result<(), IdError> {
    let field = || field.to_string();
    if value.trim().is_empty() {
        return Err(IdError::Empty { field: field() });
    }
    // `chars().nth` stops early, so a 100 KB value costs no more than `max` characters.
    if value.chars().nth(max).is_some() {
        return Err(IdError::TooLong {
            field: field(),
            max,
        });
    }
    if value.chars().any(char::is_control) {
        return Err(IdError::ControlCharacter { field: field() });
    }
    if value.chars().any(is_bidi_control) {
        return Err(IdError::BidiOverride { field: field() });
    }
    // What a lossy decoder puts for bytes that were not UTF-8 (`%FF%FE` in a form): such
    // an id cannot be sent back to the provider as it was.
    if value.contains('\u{FFFD}') {
        return Err(IdError::NotUtf8 { field: field() });
    }
    Ok(())
}

/// `value` when it follows the rule, else `None` (for ids read from unverified requests).
pub fn valid_id(value: &str) -> Option<&str> {
    validate_id("id", value).ok().map(|()| value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_ids_are_accepted() {
        for id in [
            "tx-1",
            "7200901",
            "ord_9.2",
            "a",
            "é-ação",
            &"x".repeat(MAX_ID_CHARS),
        ] {
            assert_eq!(validate_id("txid", id), Ok(()), "{id:?}");
        }
    }

    #[test]
    fn ids_breaking_the_rule_are_refused_naming_field_and_rule_not_value() {
        let long = "y".repeat(100_000);
        let cases: [(&str, &str, &str); 12] = [
            ("", "txid: empty", "empty"),
            ("  ", "txid: empty", "only spaces"),
            (&long, "txid: longer than 128 characters", "100 KB"),
            ("a\0b", "txid: contains a control character", "NUL"),
            ("a\x1b[31mb", "txid: contains a control character", "ESC"),
            ("a\r\nb", "txid: contains a control character", "CRLF"),
            (
                "a\u{202E}b",
                "txid: contains a bidirectional override character",
                "RLO",
            ),
            (
                "a\u{2067}b",
                "txid: contains a bidirectional override character",
                "RLI",
            ),
            (".", "txid: is a dot segment or contains '/'", "dot"),
            ("..", "txid: is a dot segment or contains '/'", "dot dot"),
            (
                "../admin",
                "txid: is a dot segment or contains '/'",
                "climbing",
            ),
            ("a/b", "txid: is a dot segment or contains '/'", "slash"),
        ];
        for (value, message, case) in cases {
            let err = validate_id("txid", value).expect_err(case);
            assert_eq!(err.to_string(), message, "{case}");
        }
    }

    #[test]
    fn reason_codes_may_be_short_text_but_not_control_characters() {
        assert_eq!(
            validate_reason_code("error", "Chave Pix inválida / 1.2"),
            Ok(())
        );
        assert_eq!(
            validate_reason_code("error", "a\nb").map_err(|e| e.to_string()),
            Err("error: contains a control character".to_string())
        );
        assert_eq!(
            validate_reason_code("error", &"z".repeat(257)).map_err(|e| e.to_string()),
            Err("error: longer than 256 characters".to_string())
        );
    }

    #[test]
    fn valid_id_passes_good_ids_through() {
        assert_eq!(valid_id("co-1"), Some("co-1"));
        assert_eq!(valid_id("\u{FFFD}\u{FFFD}"), None);
        assert_eq!(valid_id(".."), None);
    }
}
