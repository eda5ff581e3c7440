//! The daily CSV's rows (SPEC §6): exact header and column order, amounts with the
//! currency's digits, RFC 3339 UTC times, formula-injection escaping.

use std::io::Write;

use crate::money::Currency;
use crate::state::CashoutStatus;
use crate::store::{from_millis, ReportRow};

/// The header, exactly.
pub const HEADER: [&str; 18] = [
    "report_date",
    "provider",
    "provider_ref",
    "external_id",
    "currency",
    "expected_amount",
    "provider_amount",
    "fee",
    "net_amount",
    "status",
    "provider_status",
    "created_at",
    "updated_at",
    "completed_at",
    "webhooks",
    "recovered_by_poll",
    "match",
    "mismatches",
];

/// A text cell a spreadsheet would read as a formula gets a leading `'`.
pub fn escape_text(text: &str) -> String {
    match text.as_bytes().first() {
        Some(b'=' | b'+' | b'-' | b'@' | b'\t' | b'\r') => format!("'{text}"),
        _ => text.to_string(),
    }
}

/// `100.00` in the currency's minor digits; empty when unknown.
pub fn format_amount(minor: Option<i64>, currency: Option<&str>) -> String {
    let Some(minor) = minor else {
        return String::new();
    };
    match currency.and_then(|c| Currency::from_code(c).ok()) {
        Some(currency) => currency.format_minor(minor),
        None => minor.to_string(),
    }
}

/// RFC 3339 UTC, whole seconds.
pub fn format_time(millis: Option<i64>) -> String {
    millis
        .map(|m| from_millis(m).to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

/// The `match` column.
pub fn match_value(row: &ReportRow) -> &'static str {
    if !row.mismatches.is_empty() {
        return "mismatch";
    }
    let terminal = row
        .status
        .as_deref()
        .and_then(|s| s.parse::<CashoutStatus>().ok())
        .is_some_and(CashoutStatus::is_terminal);
    if terminal {
        "matched"
    } else {
        "open"
    }
}

/// The net amount: as the provider reports it, else amount − fee when both are known.
pub fn net_minor(row: &ReportRow) -> Option<i64> {
    row.net_minor
        .or_else(|| Some(row.amount_minor? - row.fee_minor?))
}

/// The currency column: the provider's, else the ledger's.
pub fn row_currency(row: &ReportRow) -> Option<&str> {
    row.currency.as_deref().or(row.expected_currency.as_deref())
}

/// The 18 cells of one row.
pub fn cells(report_date: &str, row: &ReportRow) -> [String; 18] {
    let currency = row_currency(row);
    [
        report_date.to_string(),
        escape_text(&row.provider),
        escape_text(row.provider_ref.as_deref().unwrap_or("")),
        escape_text(row.external_id.as_deref().unwrap_or("")),
        escape_text(currency.unwrap_or("")),
        format_amount(row.expected_minor, row.expected_currency.as_deref()),
        format_amount(row.amount_minor, currency),
        format_amount(row.fee_minor, currency),
        format_amount(net_minor(row), currency),
        escape_text(row.status.as_deref().unwrap_or("")),
        escape_text(row.provider_status.as_deref().unwrap_or("")),
        format_time(Some(row.created_at)),
        format_time(row.updated_at),
        format_time(row.completed_at),
        row.webhooks.to_string(),
        row.recovered_by_poll.to_string(),
        match_value(row).to_string(),
        escape_text(&row.mismatches.join(";")),
    ]
}

/// Writes the header, then rows, as CSV with `\n` line ends.
pub struct RowWriter<W: Write> {
    writer: csv::Writer<W>,
    report_date: String,
}

impl<W: Write> RowWriter<W> {
    /// Starts a report of `report_date` (`YYYY-MM-DD`): writes the header.
    pub fn new(sink: W, report_date: &str) -> Result<RowWriter<W>, csv::Error> {
        let mut writer = csv::WriterBuilder::new()
            .terminator(csv::Terminator::Any(b'\n'))
            .from_writer(sink);
        writer.write_record(HEADER)?;
        Ok(RowWriter {
            writer,
            report_date: report_date.to_string(),
        })
    }

    /// Writes one row.
    pub fn write(&mut self, row: &ReportRow) -> Result<(), csv::Error> {
        self.writer.write_record(cells(&self.report_date, row))
    }

    /// Flushes and hands back the sink.
    pub fn finish(self) -> Result<W, std::io::Error> {
        self.writer
            .into_inner()
            .map_err(|err| std::io::Error::other(err.error().to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn row() -> ReportRow {
        ReportRow {
            provider: "fiserv".to_string(),
            provider_ref: Some("tx-1".to_string()),
            external_id: Some("ord-1".to_string()),
            currency: Some("BRL".to_string()),
            amount_minor: Some(123_456_789),
            fee_minor: Some(150),
            net_minor: None,
            expected_minor: Some(123_456_789),
            expected_currency: Some("BRL".to_string()),
            status: Some("completed".to_string()),
            provider_status: Some("3".to_string()),
            created_at: 1_795_176_000_000,
            updated_at: Some(1_795_176_190_000),
            completed_at: Some(1_795_176_190_000),
            webhooks: 2,
            recovered_by_poll: 0,
            mismatches: vec![],
            opened_at: vec![],
        }
    }

    #[test]
    fn a_row_has_the_contract_columns() {
        assert_eq!(
            cells("2026-11-20", &row()).join(","),
            "2026-11-20,fiserv,tx-1,ord-1,BRL,1234567.89,1234567.89,1.50,1234566.39,completed,3,\
             2026-11-20T12:00:00Z,2026-11-20T12:03:10Z,2026-11-20T12:03:10Z,2,0,matched,"
        );
    }

    #[test]
    fn formula_cells_are_escaped_and_numbers_are_not() {
        for (text, escaped) in [
            ("=HYPERLINK(\"x\")", "'=HYPERLINK(\"x\")"),
            ("+1", "'+1"),
            ("-1", "'-1"),
            ("@SUM(A1)", "'@SUM(A1)"),
            ("\tx", "'\tx"),
            ("\rx", "'\rx"),
            ("ord=1", "ord=1"),
        ] {
            assert_eq!(escape_text(text), escaped);
        }
        let mut negative = row();
        negative.fee_minor = Some(200);
        negative.amount_minor = Some(100);
        assert_eq!(cells("d", &negative)[8], "-1.00", "an amount is a number");
    }

    #[test]
    fn amounts_use_the_currency_digits_and_unknowns_are_empty() {
        assert_eq!(format_amount(Some(1), Some("BRL")), "0.01");
        assert_eq!(format_amount(Some(1500), Some("JPY")), "1500");
        assert_eq!(format_amount(Some(1500), Some("KWD")), "1.500");
        assert_eq!(format_amount(None, Some("BRL")), "");
        let mut thin = row();
        thin.fee_minor = None;
        assert_eq!(cells("d", &thin)[7], "");
        assert_eq!(cells("d", &thin)[8], "", "no fee known, no net");
    }

    #[test]
    fn match_is_mismatch_then_open_then_matched() {
        let mut r = row();
        assert_eq!(match_value(&r), "matched");
        r.status = Some("failed".to_string());
        assert_eq!(
            match_value(&r),
            "matched",
            "a failed cash-out whose facts agree"
        );
        r.status = Some("processing".to_string());
        assert_eq!(match_value(&r), "open");
        r.mismatches = vec!["amount_mismatch".to_string(), "stuck".to_string()];
        assert_eq!(match_value(&r), "mismatch");
        assert_eq!(cells("d", &r)[17], "amount_mismatch;stuck");
    }
}
