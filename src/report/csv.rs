//! The daily CSV's rows (SPEC §6): exact header and column order, amounts with the
//! currency's digits, RFC 3339 UTC times, formula-injection escaping.

use std::io::Write;

use crate::money::Currency;
use crate::state::CashoutStatus;
use crate::store::ReportRow;

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
    let mut out = String::with_capacity(text.len() + 1);
    push_text(&mut out, text);
    out
}

fn push_text(out: &mut String, text: &str) {
    if let Some(b'=' | b'+' | b'-' | b'@' | b'\t' | b'\r') = text.as_bytes().first() {
        out.push('\'');
    }
    out.push_str(text);
}

/// `100.00` in the currency's minor digits; empty when unknown.
pub fn format_amount(minor: Option<i64>, currency: Option<&str>) -> String {
    let mut out = String::new();
    push_amount(
        &mut out,
        minor,
        currency.and_then(|c| Currency::from_code(c).ok()),
    );
    out
}

fn push_amount(out: &mut String, minor: Option<i64>, currency: Option<Currency>) {
    use std::fmt::Write as _;
    let Some(minor) = minor else {
        return;
    };
    let digits = currency.map_or(0, |c| u32::from(c.minor_digits()));
    if digits == 0 {
        let _ = write!(out, "{minor}");
        return;
    }
    let factor = 10u64.pow(digits);
    if minor < 0 {
        out.push('-');
    }
    let abs = minor.unsigned_abs();
    let _ = write!(
        out,
        "{}.{:0width$}",
        abs / factor,
        abs % factor,
        width = digits as usize
    );
}

/// RFC 3339 UTC, whole seconds.
pub fn format_time(millis: Option<i64>) -> String {
    let mut out = String::new();
    if let Some(millis) = millis {
        push_time(&mut out, millis);
    }
    out
}

/// Writes unix milliseconds as `YYYY-MM-DDTHH:MM:SSZ` (the civil-from-days algorithm;
/// chrono's general formatter is the slowest part of a million-row report otherwise).
fn push_time(out: &mut String, millis: i64) {
    use std::fmt::Write as _;
    let seconds = millis.div_euclid(1000);
    let (days, of_day) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        of_day / 3600,
        of_day % 3600 / 60,
        of_day % 60
    );
}

/// The `match` column.
pub fn match_value(row: &ReportRow) -> &'static str {
    if !row.mismatches.is_empty() {
        return "mismatch";
    }
    let terminal = row.status.is_some_and(CashoutStatus::is_terminal);
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

/// The `expected_amount` column: the ledger's amount when it is in the row's currency.
/// When the ledger expected another currency (a `currency_mismatch`) it is not an amount
/// of this row's currency: the cell is empty and the day's totals leave it out, so every
/// amount column of a row, and every total, is in the row's currency. The mismatch names
/// both currencies.
pub fn expected_minor(row: &ReportRow) -> Option<i64> {
    let same = match (row.expected_currency.as_deref(), row_currency(row)) {
        (Some(expected), Some(row_currency)) => expected.eq_ignore_ascii_case(row_currency),
        _ => false,
    };
    row.expected_minor.filter(|_| same)
}

/// Looks currencies up once per code.
#[derive(Default)]
struct Currencies {
    known: Vec<(String, Option<Currency>)>,
}

impl Currencies {
    fn get(&mut self, code: Option<&str>) -> Option<Currency> {
        let code = code?;
        if let Some((_, currency)) = self.known.iter().find(|(c, _)| c == code) {
            return *currency;
        }
        let currency = Currency::from_code(code).ok();
        self.known.push((code.to_string(), currency));
        currency
    }
}

/// Puts the 18 cells of `row`, in order, through `sink` (one reused buffer).
fn each_cell(
    report_date: &str,
    row: &ReportRow,
    currencies: &mut Currencies,
    mut sink: impl FnMut(&str),
) {
    let mut cell = String::with_capacity(64);
    let mut put = |cell: &mut String, fill: &dyn Fn(&mut String)| {
        cell.clear();
        fill(cell);
        sink(cell);
    };
    let currency_code = row_currency(row);
    let currency = currencies.get(currency_code);
    put(&mut cell, &|c| c.push_str(report_date));
    put(&mut cell, &|c| push_text(c, &row.provider));
    put(&mut cell, &|c| {
        push_text(c, row.provider_ref.as_deref().unwrap_or(""))
    });
    put(&mut cell, &|c| {
        push_text(c, row.external_id.as_deref().unwrap_or(""))
    });
    put(&mut cell, &|c| push_text(c, currency_code.unwrap_or("")));
    put(&mut cell, &|c| {
        push_amount(c, expected_minor(row), currency)
    });
    put(&mut cell, &|c| push_amount(c, row.amount_minor, currency));
    put(&mut cell, &|c| push_amount(c, row.fee_minor, currency));
    put(&mut cell, &|c| push_amount(c, net_minor(row), currency));
    put(&mut cell, &|c| {
        push_text(c, row.status.map_or("", CashoutStatus::as_str))
    });
    put(&mut cell, &|c| {
        push_text(c, row.provider_status.as_deref().unwrap_or(""))
    });
    put(&mut cell, &|c| push_time(c, row.created_at));
    put(&mut cell, &|c| {
        if let Some(t) = row.updated_at {
            push_time(c, t)
        }
    });
    put(&mut cell, &|c| {
        if let Some(t) = row.completed_at {
            push_time(c, t)
        }
    });
    put(&mut cell, &|c| c.push_str(&row.webhooks.to_string()));
    put(&mut cell, &|c| {
        c.push_str(&row.recovered_by_poll.to_string())
    });
    put(&mut cell, &|c| c.push_str(match_value(row)));
    put(&mut cell, &|c| {
        for (i, kind) in row.mismatches.iter().enumerate() {
            if i == 0 {
                push_text(c, kind.as_str());
            } else {
                c.push(';');
                c.push_str(kind.as_str());
            }
        }
    });
}

/// The 18 cells of one row.
pub fn cells(report_date: &str, row: &ReportRow) -> Vec<String> {
    let mut cells = Vec::with_capacity(18);
    each_cell(report_date, row, &mut Currencies::default(), |cell| {
        cells.push(cell.to_string())
    });
    cells
}

/// Writes the header, then rows, as CSV with `\n` line ends.
pub struct RowWriter<W: Write> {
    writer: csv::Writer<W>,
    report_date: String,
    currencies: Currencies,
}

impl<W: Write> RowWriter<W> {
    /// Starts a report of `report_date` (`YYYY-MM-DD`): writes the header.
    pub fn new(sink: W, report_date: &str) -> Result<RowWriter<W>, csv::Error> {
        let mut writer = csv::WriterBuilder::new()
            .terminator(csv::Terminator::Any(b'\n'))
            .buffer_capacity(1 << 16)
            .from_writer(sink);
        writer.write_record(HEADER)?;
        Ok(RowWriter {
            writer,
            report_date: report_date.to_string(),
            currencies: Currencies::default(),
        })
    }

    /// Writes one row.
    pub fn write(&mut self, row: &ReportRow) -> Result<(), csv::Error> {
        let mut failure = None;
        let writer = &mut self.writer;
        each_cell(&self.report_date, row, &mut self.currencies, |cell| {
            if failure.is_none() {
                failure = writer.write_field(cell).err();
            }
        });
        if let Some(err) = failure {
            return Err(err);
        }
        self.writer.write_record(None::<&[u8]>)
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
    use crate::reconcile::MismatchKind;

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
            status: Some(CashoutStatus::Completed),
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
    fn a_ledger_amount_in_another_currency_is_no_expected_amount_of_the_row() {
        // The ledger expected 1.234 KWD; the provider paid 1.23 BRL (currency_mismatch).
        let mut other = row();
        other.amount_minor = Some(123);
        other.expected_minor = Some(1_234);
        other.expected_currency = Some("KWD".to_string());
        other.mismatches = vec![MismatchKind::CurrencyMismatch];
        let paid = cells("d", &other);
        assert_eq!((paid[4].as_str(), paid[5].as_str()), ("BRL", ""));
        assert_eq!(paid[6], "1.23");
        // The day's totals are the sums of the columns: no KWD fils among the BRL cents.
        let mut summary = super::super::summary::SummaryBuilder::new(chrono::Utc::now());
        summary.add(&other);
        summary.add(&row());
        let totals = summary
            .finish("d", chrono_tz::UTC, false, String::new())
            .totals;
        assert_eq!(totals.len(), 1, "{totals:?}");
        assert_eq!(totals[0].expected_amount, "1234567.89", "{totals:?}");
        // A ledger-only row keeps the ledger's currency and amount.
        let mut ledger_only = row();
        ledger_only.currency = None;
        ledger_only.amount_minor = None;
        ledger_only.expected_currency = Some("KWD".to_string());
        ledger_only.expected_minor = Some(1_234);
        let expected = cells("d", &ledger_only);
        assert_eq!(
            (expected[4].as_str(), expected[5].as_str()),
            ("KWD", "1.234")
        );
    }

    #[test]
    fn times_are_rfc3339_utc_like_chrono_writes_them() {
        for millis in [
            0_i64,
            951_782_400_000,
            1_709_164_800_999,
            1_795_176_190_000,
            4_102_444_799_000,
            -86_400_000,
        ] {
            let chrono = crate::store::from_millis(millis)
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            assert_eq!(format_time(Some(millis)), chrono, "{millis}");
        }
    }

    #[test]
    fn match_is_mismatch_then_open_then_matched() {
        let mut r = row();
        assert_eq!(match_value(&r), "matched");
        r.status = Some(CashoutStatus::Failed);
        assert_eq!(
            match_value(&r),
            "matched",
            "a failed cash-out whose facts agree"
        );
        r.status = Some(CashoutStatus::Processing);
        assert_eq!(match_value(&r), "open");
        r.mismatches = vec![MismatchKind::AmountMismatch, MismatchKind::Stuck];
        assert_eq!(match_value(&r), "mismatch");
        assert_eq!(cells("d", &r)[17], "amount_mismatch;stuck");
    }
}
