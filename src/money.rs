//! Exact money: ISO 4217 currencies and decimal text to integer minor units, never through floats.

use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;

/// An ISO 4217 currency (from the `iso_currency` table) with its number of minor digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Currency {
    iso: iso_currency::Currency,
    minor_digits: u8,
}

/// Why an amount could not be turned into minor units.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AmountError {
    #[error("unknown currency {0:?}")]
    UnknownCurrency(String),
    #[error("amount {0:?} is not a decimal number")]
    NotANumber(String),
    #[error("amount {text:?} has more decimals than {currency} allows ({digits})")]
    TooManyDecimals {
        text: String,
        currency: String,
        digits: u8,
    },
    #[error("amount {0:?} is negative")]
    Negative(String),
    #[error("amount {0:?} is too large")]
    Overflow(String),
}

impl Currency {
    /// Looks up an alphabetic ISO 4217 code (case-insensitive). Codes without a minor
    /// unit (precious metals, `XXX`, `XDR`…) are not money a cash-out can carry: unknown.
    pub fn from_code(code: &str) -> Result<Currency, AmountError> {
        let upper = code.trim().to_ascii_uppercase();
        let unknown = || AmountError::UnknownCurrency(code.to_string());
        let iso = iso_currency::Currency::from_code(&upper).ok_or_else(unknown)?;
        let minor_digits = iso
            .exponent()
            .and_then(|digits| u8::try_from(digits).ok())
            .ok_or_else(unknown)?;
        Ok(Currency { iso, minor_digits })
    }

    /// The three-letter code.
    pub fn code(&self) -> &'static str {
        self.iso.code()
    }

    /// How many digits follow the decimal point in this currency.
    pub fn minor_digits(&self) -> u8 {
        self.minor_digits
    }

    /// Parses decimal text (`"12.34"`, `"12"`, `"1.5e2"`, a JSON number's literal text)
    /// into integer minor units. More decimals than the currency allows is an error,
    /// never a rounding; trailing zeros are not extra decimals (`"1.10"` is 110 cents).
    pub fn parse_minor(&self, text: &str) -> Result<i64, AmountError> {
        let trimmed = text.trim();
        let not_a_number = || AmountError::NotANumber(text.to_string());
        if trimmed.is_empty()
            || !trimmed
                .bytes()
                .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+' | b'e' | b'E'))
        {
            return Err(not_a_number());
        }
        let decimal = if trimmed.contains(['e', 'E']) {
            Decimal::from_scientific(trimmed).map_err(|_| not_a_number())?
        } else {
            Decimal::from_str_exact(trimmed).map_err(|_| not_a_number())?
        }
        .normalize();
        if decimal.is_sign_negative() && !decimal.is_zero() {
            return Err(AmountError::Negative(text.to_string()));
        }
        if decimal.scale() > u32::from(self.minor_digits) {
            return Err(AmountError::TooManyDecimals {
                text: text.to_string(),
                currency: self.code().to_string(),
                digits: self.minor_digits,
            });
        }
        let factor = 10i128.pow(self.minor_digits as u32 - decimal.scale());
        let minor = decimal
            .mantissa()
            .checked_mul(factor)
            .ok_or_else(|| AmountError::Overflow(text.to_string()))?;
        i64::try_from(minor.abs()).map_err(|_| AmountError::Overflow(text.to_string()))
    }

    /// Formats minor units as decimal text with exactly the currency's digits (`100.00`).
    pub fn format_minor(&self, minor: i64) -> String {
        let digits = u32::from(self.minor_digits);
        if digits == 0 {
            return minor.to_string();
        }
        let factor = 10i64.pow(digits);
        let sign = if minor < 0 { "-" } else { "" };
        let abs = minor.unsigned_abs();
        format!(
            "{sign}{}.{:0width$}",
            abs / factor as u64,
            abs % factor as u64,
            width = digits as usize
        )
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code())
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl FromStr for Currency {
    type Err = AmountError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Currency::from_code(s)
    }
}

/// An exact amount: integer minor units of a currency.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Money {
    pub minor: i64,
    pub currency: Currency,
}

impl Money {
    /// Parses decimal text in the given currency.
    pub fn parse(text: &str, currency: Currency) -> Result<Money, AmountError> {
        Ok(Money {
            minor: currency.parse_minor(text)?,
            currency,
        })
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}",
            self.currency.format_minor(self.minor),
            self.currency
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brl() -> Currency {
        Currency::from_code("BRL").unwrap()
    }

    #[test]
    fn decimal_text_becomes_exact_minor_units() {
        let cases = [
            ("12.34", 1234),
            ("0.01", 1),
            ("1234567.89", 123456789),
            ("100", 10000),
            ("1.10", 110),
            ("1.5e2", 15000),
            ("0.1", 10),
            ("0", 0),
            ("92233720368547758.07", i64::MAX),
        ];
        for (text, minor) in cases {
            assert_eq!(brl().parse_minor(text), Ok(minor), "parsing {text}");
        }
    }

    #[test]
    fn invalid_amounts_are_errors_not_roundings() {
        let cases = [
            ("12.345", "three decimals in BRL"),
            ("abc", "letters"),
            ("", "empty"),
            ("-1.00", "negative"),
            ("1e-3", "exponent giving three decimals"),
            ("92233720368547758.08", "overflow"),
            ("1.2.3", "two points"),
            ("NaN", "not a number"),
        ];
        for (text, why) in cases {
            assert!(
                brl().parse_minor(text).is_err(),
                "{why}: {text} must be rejected"
            );
        }
    }

    #[test]
    fn currencies_know_their_minor_digits() {
        assert_eq!(Currency::from_code("JPY").unwrap().minor_digits(), 0);
        assert_eq!(Currency::from_code("kwd").unwrap().minor_digits(), 3);
        assert_eq!(Currency::from_code("USD").unwrap().minor_digits(), 2);
        assert_eq!(Currency::from_code("CLF").unwrap().minor_digits(), 4);
        assert_eq!(Currency::from_code(" brl ").unwrap().code(), "BRL");
        for (code, why) in [
            ("XXX1", "four letters"),
            ("ZZZ", "not in ISO 4217"),
            ("", "empty"),
            ("XAU", "gold has no minor unit"),
            ("XXX", "no currency"),
        ] {
            assert!(Currency::from_code(code).is_err(), "{why}: {code:?}");
        }
        assert_eq!(
            Currency::from_code("JPY").unwrap().parse_minor("1500"),
            Ok(1500)
        );
        assert!(Currency::from_code("JPY")
            .unwrap()
            .parse_minor("1.5")
            .is_err());
    }

    #[test]
    fn minor_units_format_with_the_currency_digits() {
        assert_eq!(brl().format_minor(10000), "100.00");
        assert_eq!(brl().format_minor(1), "0.01");
        assert_eq!(brl().format_minor(-250), "-2.50");
        assert_eq!(
            Currency::from_code("KWD").unwrap().format_minor(1234),
            "1.234"
        );
        assert_eq!(
            Currency::from_code("JPY").unwrap().format_minor(1234),
            "1234"
        );
    }
}

#[cfg(test)]
mod proptests {
    //! Property tests: formatting then parsing gives back every amount exactly; text with
    //! more decimals than the currency has is refused, never rounded.

    use proptest::prelude::*;

    use super::*;

    /// One currency per number of minor digits that matters.
    fn currency() -> impl Strategy<Value = Currency> {
        prop_oneof![Just("JPY"), Just("BRL"), Just("KWD"), Just("CLF")]
            .prop_map(|code| Currency::from_code(code).expect("a listed code"))
    }

    proptest! {
        #[test]
        fn any_amount_formats_and_parses_back_exactly(currency in currency(), minor in 0..=i64::MAX) {
            let text = currency.format_minor(minor);
            prop_assert_eq!(currency.parse_minor(&text), Ok(minor), "{}", text);
        }

        #[test]
        fn text_within_the_digits_parses_to_the_exact_minor_amount(
            currency in currency(),
            units in 0u64..=9_000_000_000,
            fraction in 0u64..10_000,
            width in 0usize..=4,
        ) {
            let digits = usize::from(currency.minor_digits());
            let width = width.min(digits);
            let fraction = fraction % 10u64.pow(width as u32);
            let text = if width == 0 {
                units.to_string()
            } else {
                format!("{units}.{fraction:0width$}")
            };
            let expected = units * 10u64.pow(digits as u32)
                + fraction * 10u64.pow((digits - width) as u32);
            prop_assert_eq!(currency.parse_minor(&text), Ok(expected as i64), "{}", text);
        }

        #[test]
        fn text_with_too_many_decimals_is_refused_never_rounded(
            currency in currency(),
            units in 0u64..=1_000_000_000,
            extra in 1usize..=6,
            fraction in any::<u64>(),
            last in 1u8..=9,
            zeros in 0usize..3,
        ) {
            // `digits + extra` decimals, the last significant one non-zero (trailing zeros
            // after it are not significant and must not change the verdict).
            let width = usize::from(currency.minor_digits()) + extra - 1;
            let fraction = if width == 0 { 0 } else { fraction % 10u64.pow(width.min(18) as u32) };
            let head = if width == 0 { String::new() } else { format!("{fraction:0width$}") };
            let text = format!("{units}.{head}{last}{}", "0".repeat(zeros));
            let refused = matches!(
                currency.parse_minor(&text),
                Err(AmountError::TooManyDecimals { .. })
            );
            prop_assert!(refused, "{} in {}: {:?}", text, currency, currency.parse_minor(&text));
        }

        #[test]
        fn arbitrary_text_is_parsed_or_refused_without_panic(text in ".{0,64}", currency in currency()) {
            if let Ok(minor) = currency.parse_minor(&text) {
                prop_assert!(minor >= 0);
            }
        }
    }
}
