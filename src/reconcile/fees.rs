//! Fee schedules (SPEC §5): a percentage, a fixed amount or both, rounded half-up to the
//! currency's minor unit.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use rust_decimal::{Decimal, RoundingStrategy};

/// One fee rule: `"2%"`, `"1.50"` or `"1.5% + 0.30"` (the fixed part in major units of the
/// cash-out's currency).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeeRule {
    percent: Decimal,
    fixed: Decimal,
}

/// Why a fee rule's text was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid fee {text:?}: {why} (use e.g. \"2%\", \"1.50\" or \"1.5% + 0.30\")")]
pub struct FeeRuleError {
    text: String,
    why: &'static str,
}

impl FromStr for FeeRule {
    type Err = FeeRuleError;

    fn from_str(text: &str) -> Result<FeeRule, FeeRuleError> {
        let refuse = |why| FeeRuleError {
            text: text.to_string(),
            why,
        };
        let mut rule = FeeRule {
            percent: Decimal::ZERO,
            fixed: Decimal::ZERO,
        };
        let (mut has_percent, mut has_fixed) = (false, false);
        for part in text.split('+') {
            let part = part.trim();
            if part.is_empty() {
                return Err(refuse("an empty part"));
            }
            let (number, is_percent) = match part.strip_suffix('%') {
                Some(number) => (number.trim(), true),
                None => (part, false),
            };
            if !number.chars().all(|c| c.is_ascii_digit() || c == '.') {
                return Err(refuse("not a plain decimal number"));
            }
            let value = Decimal::from_str(number).map_err(|_| refuse("not a decimal number"))?;
            if is_percent {
                if has_percent || value > Decimal::ONE_HUNDRED {
                    return Err(refuse("one percentage of at most 100% is allowed"));
                }
                has_percent = true;
                rule.percent = value;
            } else {
                if has_fixed {
                    return Err(refuse("one fixed amount is allowed"));
                }
                has_fixed = true;
                rule.fixed = value;
            }
        }
        Ok(rule)
    }
}

impl fmt::Display for FeeRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.percent.is_zero(), self.fixed.is_zero()) {
            (false, true) => write!(f, "{}%", self.percent.normalize()),
            (true, _) => write!(f, "{}", self.fixed.normalize()),
            (false, false) => write!(
                f,
                "{}% + {}",
                self.percent.normalize(),
                self.fixed.normalize()
            ),
        }
    }
}

impl FeeRule {
    /// The fee of `amount_minor` in a currency of `minor_digits`, in minor units: the
    /// percentage plus the fixed part, rounded half-up once to the minor unit.
    pub fn fee_minor(&self, amount_minor: i64, minor_digits: u8) -> Option<i64> {
        let scale = Decimal::from(10_i64.checked_pow(u32::from(minor_digits))?);
        let exact = Decimal::from(amount_minor).checked_mul(self.percent)? / Decimal::ONE_HUNDRED
            + self.fixed.checked_mul(scale)?;
        exact
            .round_dp_with_strategy(0, RoundingStrategy::MidpointAwayFromZero)
            .try_into()
            .ok()
    }
}

/// A provider's fee schedule: a rule per payout method, `default` for the rest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FeeSchedule {
    rules: BTreeMap<String, FeeRule>,
}

impl FeeSchedule {
    /// A schedule of `(method, rule)` pairs.
    pub fn new(rules: BTreeMap<String, FeeRule>) -> FeeSchedule {
        FeeSchedule { rules }
    }

    /// The rule for `method` (case-insensitive), else `default`; none means no fee check.
    pub fn rule_for(&self, method: Option<&str>) -> Option<&FeeRule> {
        method
            .and_then(|m| {
                self.rules
                    .iter()
                    .find(|(name, _)| name.eq_ignore_ascii_case(m))
                    .map(|(_, rule)| rule)
            })
            .or_else(|| self.rules.get("default"))
    }

    /// Whether the schedule has no rule at all.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rules, by method.
    pub fn rules(&self) -> impl Iterator<Item = (&str, &FeeRule)> {
        self.rules.iter().map(|(m, r)| (m.as_str(), r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(text: &str) -> FeeRule {
        text.parse().unwrap()
    }

    #[test]
    fn percent_fixed_and_both_are_computed_in_minor_units() {
        let cases = [
            ("2%", 10_000, 2, 200, "2% of 100.00"),
            ("1.5%", 10_000, 2, 150, "1.5% of 100.00"),
            ("1.50", 10_000, 2, 150, "fixed 1.50"),
            ("1.5% + 0.30", 10_000, 2, 180, "1.5% of 100.00 plus 0.30"),
            ("0.30 + 1.5%", 10_000, 2, 180, "either order"),
            ("2%", 1_000, 0, 20, "JPY has no minor digits"),
            ("0.5 + 1%", 1_000, 3, 510, "KWD has three"),
        ];
        for (text, amount, digits, expected, why) in cases {
            assert_eq!(
                rule(text).fee_minor(amount, digits),
                Some(expected),
                "{why}"
            );
        }
    }

    #[test]
    fn rounding_is_half_up_once_on_the_total() {
        // 1.5% of 0.33 = 0.495 cents → 0 (below half); of 0.35 = 0.525 → 1.
        assert_eq!(rule("1.5%").fee_minor(33, 2), Some(0));
        assert_eq!(rule("1.5%").fee_minor(35, 2), Some(1));
        // Exactly half rounds up: 2% of 0.25 = 0.5 cent → 1.
        assert_eq!(rule("2%").fee_minor(25, 2), Some(1));
        // 1.5% of 1.10 = 1.65 cents, + 0.30 = 31.65 → 32 (rounded once, not 2 + 30).
        assert_eq!(rule("1.5% + 0.30").fee_minor(110, 2), Some(32));
    }

    #[test]
    fn bad_rules_are_refused_with_the_reason() {
        for (text, why) in [
            ("", "empty"),
            ("2% + 3%", "two percentages"),
            ("1 + 2", "two fixed amounts"),
            ("abc", "not a number"),
            ("-2%", "negative"),
            ("1e3", "exponent"),
            ("150%", "over 100%"),
        ] {
            assert!(text.parse::<FeeRule>().is_err(), "{why}: {text:?}");
        }
    }

    #[test]
    fn the_method_rule_wins_over_default() {
        let schedule = FeeSchedule::new(BTreeMap::from([
            ("payoneer".to_string(), rule("2%")),
            ("default".to_string(), rule("1%")),
        ]));
        assert_eq!(schedule.rule_for(Some("Payoneer")), Some(&rule("2%")));
        assert_eq!(schedule.rule_for(Some("wire")), Some(&rule("1%")));
        assert_eq!(schedule.rule_for(None), Some(&rule("1%")));
        assert_eq!(FeeSchedule::default().rule_for(Some("payoneer")), None);
        assert_eq!(rule("1.5% + 0.30").to_string(), "1.5% + 0.3");
    }
}
