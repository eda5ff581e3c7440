//! The summary beside a day's CSV: totals per provider and currency equal to the sums of
//! the CSV's columns, counts per `match` value and mismatch kind, open mismatches by age,
//! and the CSV's SHA-256.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde::Serialize;

use super::csv::{expected_minor, format_amount, match_value, net_minor, row_currency};
use crate::reconcile::MismatchKind;
use crate::store::ReportRow;

/// Sums of one provider and currency, as decimal text in the currency's digits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub provider: String,
    pub currency: String,
    pub rows: u64,
    pub expected_amount: String,
    pub provider_amount: String,
    pub fees: String,
    pub net_amount: String,
}

/// Open mismatches of the report's rows by age at the report's instant.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AgeBuckets {
    #[serde(rename = "<1d")]
    pub under_1d: u64,
    #[serde(rename = "1-3d")]
    pub from_1d_to_3d: u64,
    #[serde(rename = "3-7d")]
    pub from_3d_to_7d: u64,
    #[serde(rename = ">7d")]
    pub over_7d: u64,
}

/// `YYYY-MM-DD.summary.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub date: String,
    #[serde(rename = "final")]
    pub is_final: bool,
    pub timezone: String,
    /// The instant the report shows the book at.
    pub as_of: String,
    pub rows: u64,
    pub totals: Vec<Totals>,
    #[serde(rename = "match")]
    pub match_counts: BTreeMap<String, u64>,
    pub mismatches: BTreeMap<String, u64>,
    pub open_mismatches_by_age: AgeBuckets,
    pub sha256: String,
}

#[derive(Default)]
struct Sums {
    rows: u64,
    expected: i64,
    provider: i64,
    fees: i64,
    net: i64,
}

/// Accumulates a summary row by row.
pub struct SummaryBuilder {
    as_of: DateTime<Utc>,
    rows: u64,
    /// Per provider and currency; few, so a list searched by reference beats a map keyed
    /// by freshly allocated strings on a million rows.
    sums: Vec<((String, String), Sums)>,
    match_counts: BTreeMap<String, u64>,
    mismatches: BTreeMap<String, u64>,
    ages: AgeBuckets,
}

impl SummaryBuilder {
    /// A summary of the book at `as_of`.
    pub fn new(as_of: DateTime<Utc>) -> SummaryBuilder {
        let zero = |names: &[&str]| names.iter().map(|n| (n.to_string(), 0)).collect();
        SummaryBuilder {
            as_of,
            rows: 0,
            sums: Vec::new(),
            match_counts: zero(&["matched", "mismatch", "open"]),
            mismatches: MismatchKind::ALL
                .iter()
                .map(|k| (k.as_str().to_string(), 0))
                .collect(),
            ages: AgeBuckets::default(),
        }
    }

    /// Counts one CSV row.
    pub fn add(&mut self, row: &ReportRow) {
        self.rows += 1;
        let currency = row_currency(row).unwrap_or("");
        let index = match self
            .sums
            .iter()
            .position(|((p, c), _)| *p == row.provider && c == currency)
        {
            Some(index) => index,
            None => {
                self.sums.push((
                    (row.provider.clone(), currency.to_string()),
                    Sums::default(),
                ));
                self.sums.len() - 1
            }
        };
        let sums = &mut self.sums[index].1;
        sums.rows += 1;
        sums.expected += expected_minor(row).unwrap_or(0);
        sums.provider += row.amount_minor.unwrap_or(0);
        sums.fees += row.fee_minor.unwrap_or(0);
        sums.net += net_minor(row).unwrap_or(0);
        if let Some(count) = self.match_counts.get_mut(match_value(row)) {
            *count += 1;
        }
        for kind in &row.mismatches {
            *self
                .mismatches
                .entry(kind.as_str().to_string())
                .or_default() += 1;
        }
        let as_of = self.as_of.timestamp_millis();
        for opened in &row.opened_at {
            const DAY: i64 = 86_400_000;
            match as_of - opened {
                age if age < DAY => self.ages.under_1d += 1,
                age if age < 3 * DAY => self.ages.from_1d_to_3d += 1,
                age if age < 7 * DAY => self.ages.from_3d_to_7d += 1,
                _ => self.ages.over_7d += 1,
            }
        }
    }

    /// The summary of a report of `date`.
    pub fn finish(self, date: &str, timezone: Tz, is_final: bool, sha256: String) -> Summary {
        let mut sums = self.sums;
        sums.sort_by(|a, b| a.0.cmp(&b.0));
        let totals = sums
            .into_iter()
            .map(|((provider, currency), sums)| {
                let code = (!currency.is_empty()).then_some(currency.as_str());
                Totals {
                    rows: sums.rows,
                    expected_amount: format_amount(Some(sums.expected), code),
                    provider_amount: format_amount(Some(sums.provider), code),
                    fees: format_amount(Some(sums.fees), code),
                    net_amount: format_amount(Some(sums.net), code),
                    provider,
                    currency,
                }
            })
            .collect();
        Summary {
            date: date.to_string(),
            is_final,
            timezone: timezone.name().to_string(),
            as_of: self
                .as_of
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            rows: self.rows,
            totals,
            match_counts: self.match_counts,
            mismatches: self.mismatches,
            open_mismatches_by_age: self.ages,
            sha256,
        }
    }
}
